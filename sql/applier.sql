-- The asynchronous fold at a glance: how far daily_logs is behind the detail,
-- whether a background applier serves this database, and what it cannot fold.
CREATE VIEW usage_agg.fold_status AS
SELECT c.fold_mode,
       CASE WHEN c.fold_mode = 'async' OR (c.fold_mode = 'auto' AND a.running) THEN 'async'
            ELSE 'immediate' END AS effective_mode,
       c.apply_interval,
       a.running AS applier_running,
       a.pid AS applier_pid,
       a.state AS applier_state,
       a.last_run_at AS applier_last_run_at,
       a.applied_last_minute,
       a.applied_total,
       a.errors AS applier_errors,
       p.calls AS pending_calls,
       p.rows AS pending_rows,
       p.oldest AS oldest_pending_at,
       clock_timestamp() - p.oldest AS oldest_pending_age,
       sk.days AS skipped_days,
       CASE WHEN NOT a.preloaded AND c.fold_mode <> 'immediate' THEN
                'No background applier in this server: add usage_agg to shared_preload_libraries (next to pg_cron) and restart; '
                || CASE WHEN c.fold_mode = 'auto' THEN 'meanwhile every statement folds immediately.'
                        ELSE 'meanwhile schedule SELECT usage_agg.apply_pending_deltas() (for example with pg_cron every minute).' END
            WHEN c.fold_mode <> 'immediate' AND NOT a.running THEN
                'The applier of this database is not running (' || a.state || '); see the server log. '
                || CASE WHEN c.fold_mode = 'auto' THEN 'Meanwhile every statement folds immediately.'
                        ELSE 'Pending calls wait; readers include them.' END
            WHEN sk.days > 0 THEN
                'Some days could not be folded: see usage_agg.fold_skipped and repair them with usage_agg.rebuild_daily_logs(day, day).'
       END AS hint
  FROM usage_agg.config c
 CROSS JOIN usage_agg._applier_state() a
 CROSS JOIN (SELECT COALESCE(sum(q.calls), 0)::bigint AS calls, count(*) AS rows, min(q.appended_at) AS oldest
               FROM usage_agg.pending_deltas q) p
 CROSS JOIN (SELECT count(*) AS days FROM usage_agg.fold_skipped) sk;
COMMENT ON VIEW usage_agg.fold_status IS
    'The asynchronous fold: mode in effect, background applier state, pending calls and the age of the oldest, days that could not be folded, and what to do';

-- Serve this database from now on (the launcher is woken at commit).
SELECT usage_agg._wake_applier();
