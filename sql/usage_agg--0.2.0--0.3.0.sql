-- usage_agg 0.2.0 -> 0.3.0
--
-- The asynchronous fold by default: fold_mode 'auto' for new installs (an
-- updated install keeps its mode; 'deferred' is now called 'async'), the
-- background applier (config.apply_interval), pending_deltas.appended_at, days
-- the applier could not fold (fold_skipped), fold_status, and the fold's row in
-- maintenance_health. Keeps all data. A fresh install of 0.3.0 and 0.2.0 + this
-- script give the same catalog (tests/upgrade.rs checks it).

\echo Use "ALTER EXTENSION usage_agg UPDATE TO '0.3.0'" to load this file. \quit

ALTER TABLE usage_agg.config DROP CONSTRAINT config_fold_mode_known;
UPDATE usage_agg.config SET fold_mode = 'async' WHERE fold_mode = 'deferred';
ALTER TABLE usage_agg.config
    ALTER COLUMN fold_mode SET DEFAULT 'auto',
    ADD COLUMN apply_interval interval NOT NULL DEFAULT '500 milliseconds',
    ADD COLUMN pending_alert_after interval NOT NULL DEFAULT '5 minutes',
    ADD CONSTRAINT config_fold_mode_known CHECK (fold_mode IN ('auto', 'async', 'immediate')),
    ADD CONSTRAINT config_apply_interval_range CHECK (apply_interval BETWEEN interval '10 milliseconds' AND interval '1 hour'),
    ADD CONSTRAINT config_pending_alert_after_positive CHECK (pending_alert_after > interval '0');
COMMENT ON COLUMN usage_agg.config.fold_mode IS
    'auto: async while a background applier serves this database, immediate otherwise; async (formerly deferred): inserts record their calls in pending_deltas, folded by the applier or apply_pending_deltas(); immediate: every statement updates daily_logs';
COMMENT ON COLUMN usage_agg.config.apply_interval IS
    'How often the background applier folds pending calls (sooner while a backlog remains)';
COMMENT ON COLUMN usage_agg.config.pending_alert_after IS
    'maintenance_health reports the fold as overdue when a call has been pending longer than this';

CREATE OR REPLACE FUNCTION usage_agg._config_validate() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- The name of async mode before 0.3.0.
    IF NEW.fold_mode = 'deferred' THEN
        NEW.fold_mode := 'async';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_timezone_names WHERE name = NEW.timezone) THEN
        RAISE EXCEPTION 'usage_agg: invalid time zone "%"', NEW.timezone
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'usage_agg.config.timezone must be a time zone name known to the server.',
                  HINT = 'Use an IANA name such as ''UTC'', ''Asia/Shanghai'' or ''America/New_York'' (see pg_timezone_names).';
    END IF;
    IF TG_OP = 'INSERT' AND EXISTS (SELECT 1 FROM usage_agg.config) THEN
        -- A restore (pg_dump data of this config table) lands on the row that
        -- CREATE EXTENSION made: take the restored values instead of failing.
        UPDATE usage_agg.config
           SET timezone = NEW.timezone,
               detail_retention = NEW.detail_retention,
               daily_retention = NEW.daily_retention,
               cleanup_batch_size = NEW.cleanup_batch_size,
               fold_mode = NEW.fold_mode,
               apply_interval = NEW.apply_interval,
               pending_alert_after = NEW.pending_alert_after;
        RETURN NULL;
    END IF;
    RETURN NEW;
END;
$$;


-- Calls pending from 0.2.0 count as appended now.
ALTER TABLE usage_agg.pending_deltas
    ADD COLUMN appended_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE usage_agg.pending_deltas
    SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
         autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 10000);
COMMENT ON TABLE usage_agg.pending_deltas IS
    'Calls recorded by the asynchronous fold, folded into daily_logs by the background applier or usage_agg.apply_pending_deltas(); readers include them.';

CREATE TABLE usage_agg.fold_skipped (
    user_id    uuid        NOT NULL,
    day        date        NOT NULL,
    field      text        NOT NULL,
    error      text        NOT NULL,
    first_seen timestamptz NOT NULL,
    last_seen  timestamptz NOT NULL,
    retry_at   timestamptz NOT NULL,
    PRIMARY KEY (user_id, day)
);
COMMENT ON TABLE usage_agg.fold_skipped IS
    'Days the background applier could not fold (a corrupted daily_logs row); repair with usage_agg.rebuild_daily_logs(day, day).';


CREATE FUNCTION usage_agg."_applier_state"() RETURNS TABLE (
	"preloaded" bool,
	"running" bool,
	"pid" INT,
	"state" TEXT,
	"started_at" timestamp with time zone,
	"last_run_at" timestamp with time zone,
	"last_applied" bigint,
	"applied_last_minute" bigint,
	"applied_total" bigint,
	"errors" bigint,
	"last_error_at" timestamp with time zone
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'applier_state_wrapper';

CREATE FUNCTION usage_agg."_wake_applier"() RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'wake_applier_wrapper';

CREATE OR REPLACE FUNCTION usage_agg.rebuild_daily_logs(p_from date, p_to date)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_day date;
    v_written bigint := 0;
    v_n bigint;
    v_days_total integer;
    v_started timestamptz := clock_timestamp();
    v_tz text;
    v_first date;
    v_last date;
BEGIN
    PERFORM usage_agg._check_day_range(p_from, p_to);
    -- Days whose detail has expired keep their aggregates: rebuilding them from
    -- no detail would zero them.
    v_day := (SELECT h.detail_kept_from FROM usage_agg.retention_horizon h);
    IF p_from < v_day THEN
        RAISE NOTICE 'usage_agg.rebuild_daily_logs: days before % have no detail any more and are left as they are', v_day;
        p_from := v_day;
        IF p_from > p_to THEN
            RETURN 0;
        END IF;
    END IF;
    -- Hold detail writers off while recomputing, so no fold can interleave with the
    -- recomputation of a day (reads keep working).
    LOCK TABLE usage_agg.key_usage_logs IN SHARE MODE;
    -- Only days that hold something need work, so that a range of centuries
    -- costs no more than the days in it that have data.
    v_tz := usage_agg._timezone();
    v_first := least(
        (SELECT (min(k.created_at) AT TIME ZONE v_tz)::date FROM usage_agg.key_usage_logs k
          WHERE k.created_at >= usage_agg._day_start(p_from, v_tz) AND k.created_at < usage_agg._day_start(p_to + 1, v_tz)),
        (SELECT min(d.date) FROM usage_agg.daily_logs d WHERE d.date BETWEEN p_from AND p_to),
        (SELECT min(q.day) FROM usage_agg.pending_deltas q WHERE q.day BETWEEN p_from AND p_to));
    v_last := greatest(
        (SELECT (max(k.created_at) AT TIME ZONE v_tz)::date FROM usage_agg.key_usage_logs k
          WHERE k.created_at >= usage_agg._day_start(p_from, v_tz) AND k.created_at < usage_agg._day_start(p_to + 1, v_tz)),
        (SELECT max(d.date) FROM usage_agg.daily_logs d WHERE d.date BETWEEN p_from AND p_to),
        (SELECT max(q.day) FROM usage_agg.pending_deltas q WHERE q.day BETWEEN p_from AND p_to));
    IF v_first IS NULL THEN
        RETURN 0;
    END IF;
    p_from := greatest(p_from, v_first);
    p_to := least(p_to, v_last);
    v_days_total := p_to - p_from + 1;
    v_day := p_from;
    WHILE v_day <= p_to LOOP
        -- Calls still pending for this day are in the detail too: drop them (waiting
        -- for an apply_pending_deltas() that is applying some of them right now).
        DELETE FROM usage_agg.pending_deltas p WHERE p.day = v_day;
        -- Days the applier skipped are folded now, from the detail.
        DELETE FROM usage_agg.fold_skipped s WHERE s.day = v_day;
        WITH expected AS (
            SELECT e.user_id, e.date, e.log_data FROM usage_agg._aggregates(v_day, v_day) e
             WHERE e.source = 'detail'
        ), upserted AS (
            INSERT INTO usage_agg.daily_logs AS d (user_id, date, log_data, last_modified)
            SELECT e.user_id, e.date, e.log_data, now() FROM expected e
            ON CONFLICT (user_id, date) DO UPDATE
               SET log_data = usage_agg._replace_owned(d.log_data, EXCLUDED.log_data),
                   last_modified = EXCLUDED.last_modified
             WHERE d.log_data IS DISTINCT FROM usage_agg._replace_owned(d.log_data, EXCLUDED.log_data)
            RETURNING 1
        ), emptied AS (
            UPDATE usage_agg.daily_logs d
               SET log_data = usage_agg._replace_owned(d.log_data, usage_agg._empty_log_data()),
                   last_modified = now()
             WHERE d.date = v_day
               AND NOT EXISTS (SELECT 1 FROM expected e WHERE e.user_id = d.user_id)
               AND d.log_data IS DISTINCT FROM usage_agg._replace_owned(d.log_data, usage_agg._empty_log_data())
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM upserted) + (SELECT count(*) FROM emptied) INTO v_n;
        v_written := v_written + v_n;
        IF v_days_total > 1 THEN
            RAISE NOTICE 'usage_agg.rebuild_daily_logs: % done, % rows written, % days left, % elapsed',
                v_day, v_written, p_to - v_day, clock_timestamp() - v_started;
        END IF;
        v_day := v_day + 1;
    END LOOP;
    RETURN v_written;
END;
$$;


CREATE OR REPLACE VIEW usage_agg.maintenance_health AS
SELECT h.step, h.last_run_at, h.last_run_ok, h.last_error, h.last_success_at, h.last_success_rows,
       h.overdue_after, h.overdue
  FROM (SELECT s.ord, s.step,
               last_run.started AS last_run_at,
               last_run.ok AS last_run_ok,
               last_run.error AS last_error,
               last_ok.finished AS last_success_at,
               last_ok.rows AS last_success_rows,
               interval '25 hours' AS overdue_after,
               (last_ok.finished IS NULL OR last_ok.finished < now() - interval '25 hours') AS overdue
          FROM (VALUES (0, 'apply_pending_deltas'), (1, 'cleanup_old_key_usage_logs'), (2, 'cleanup_old_daily_logs'),
                       (3, 'reset_expired_quotas'))
               AS s(ord, step)
          LEFT JOIN LATERAL (SELECT r.started, r.ok, r.error FROM usage_agg.maintenance_runs r
                              WHERE r.step = s.step ORDER BY r.started DESC LIMIT 1) last_run ON true
          LEFT JOIN LATERAL (SELECT r.finished, r.rows FROM usage_agg.maintenance_runs r
                              WHERE r.step = s.step AND r.ok ORDER BY r.started DESC LIMIT 1) last_ok ON true
        UNION ALL
        SELECT 4, 'background_fold',
               a.last_run_at,
               CASE WHEN a.running THEN a.state = 'running' END,
               CASE WHEN sk.days > 0 THEN sk.days || ' day(s) could not be folded: see usage_agg.fold_skipped'
                    WHEN a.errors > 0 AND NOT a.running THEN 'the applier stopped after errors: see the server log'
               END,
               a.last_run_at,
               a.applied_last_minute,
               c.pending_alert_after,
               COALESCE(p.oldest < now() - c.pending_alert_after, false) OR sk.days > 0
          FROM usage_agg.config c
         CROSS JOIN usage_agg._applier_state() a
         CROSS JOIN (SELECT min(q.appended_at) AS oldest FROM usage_agg.pending_deltas q) p
         CROSS JOIN (SELECT count(*) AS days FROM usage_agg.fold_skipped) sk) h
 ORDER BY h.ord;
COMMENT ON VIEW usage_agg.maintenance_health IS
    'Per maintenance step: last run, last success and its rows, and overdue when no success within overdue_after; background_fold: overdue when a call waits longer than config.pending_alert_after or a day could not be folded';


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


-- CREATE OR REPLACE VIEW resets the options.
ALTER VIEW usage_agg.maintenance_health SET (security_invoker = true);
ALTER VIEW usage_agg.fold_status SET (security_invoker = true);

CREATE OR REPLACE FUNCTION usage_agg.grant_read_role(role_name name) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM usage_agg._check_role(role_name);
    -- Identifiers go through %I (quote_ident); GRANT takes no parameters.
    EXECUTE format('GRANT USAGE ON SCHEMA usage_agg TO %I', role_name);
    EXECUTE format('GRANT SELECT ON usage_agg.key_usage_logs, usage_agg.daily_logs, usage_agg.monthly_logs,
                           usage_agg.pending_deltas, usage_agg.config, usage_agg.retention_horizon,
                           usage_agg.quota_plans, usage_agg.quotas, usage_agg.quota_usage_logs,
                           usage_agg.maintenance_runs, usage_agg.maintenance_health,
                           usage_agg.fold_status, usage_agg.fold_skipped,
                           usage_agg.daily_usage, usage_agg.monthly_usage,
                           usage_agg.daily_usage_by_model, usage_agg.daily_usage_by_key,
                           usage_agg.monthly_usage_by_model, usage_agg.monthly_usage_by_key
                    TO %I', role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION usage_agg.quota_status(uuid) TO %I', role_name);
END;
$$;

-- Serve this database from now on (the launcher is woken at commit).
SELECT usage_agg._wake_applier();
