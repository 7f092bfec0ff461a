-- Tiered retention: detail expires after config.detail_retention, daily rows are
-- rolled up into monthly_logs after config.daily_retention, monthly rows stay.
-- Plus run_maintenance(), its log, a health view, and pg_cron scheduling.
--
-- Cleanups remove whole business days only. Each first advances its horizon in
-- usage_agg.retention_horizon (a row lock that also serialises two cleanups of the
-- same tier), then removes rows in batches of config.cleanup_batch_size. Inserts
-- never wait for a cleanup: deleting old detail takes row locks on those old rows
-- only, and the fold ignores removals before the detail horizon, so it touches no
-- daily row.

-- The day sum of daily and monthly rows: adds one log_data into another.
CREATE AGGREGATE usage_agg._rollup(jsonb) (
    SFUNC = usage_agg._rollup_merge,
    STYPE = jsonb,
    INITCOND = '{}'
);

-- A retention period: the argument, or the configured default when NULL.
CREATE FUNCTION usage_agg._check_keep(p_keep interval, p_default interval, p_what text)
RETURNS interval
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF COALESCE(p_keep, p_default) <= interval '0' THEN
        RAISE EXCEPTION 'usage_agg: % must keep a positive interval', p_what
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('keep = %s', COALESCE(p_keep, p_default)),
                  HINT = 'Pass an interval such as ''30 days'', or NULL for the configured default.';
    END IF;
    RETURN COALESCE(p_keep, p_default);
END;
$$;

-- When key_usage_logs is range-partitioned on created_at (by hand or by
-- pg_partman), drops every partition that lies wholly before p_cutoff and returns
-- how many rows they held. A partition whose lock cannot be had within a second
-- is left for the row deletes.
CREATE FUNCTION usage_agg._drop_expired_partitions(p_cutoff timestamptz)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_part record;
    v_upper text;
    v_rows bigint;
    v_dropped bigint := 0;
    v_lock_timeout text := current_setting('lock_timeout');
BEGIN
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = 'usage_agg.key_usage_logs'::regclass) <> 'p' THEN
        RETURN 0;
    END IF;
    FOR v_part IN
        SELECT i.inhrelid::regclass AS rel, pg_get_expr(c.relpartbound, c.oid) AS bound
          FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'usage_agg.key_usage_logs'::regclass
         ORDER BY 2
    LOOP
        -- FOR VALUES FROM ('...') TO ('...'): the upper bound is exclusive. DEFAULT
        -- and MAXVALUE partitions have no literal upper bound and stay.
        v_upper := substring(v_part.bound FROM 'TO \(''([^'']+)''\)');
        CONTINUE WHEN v_upper IS NULL OR v_upper::timestamptz > p_cutoff;
        -- regclass text is quoted and schema-qualified by the server.
        EXECUTE format('SELECT count(*) FROM %s', v_part.rel) INTO v_rows;
        BEGIN
            PERFORM set_config('lock_timeout', '1s', true);
            EXECUTE format('DROP TABLE %s', v_part.rel);
            PERFORM set_config('lock_timeout', v_lock_timeout, true);
            v_dropped := v_dropped + v_rows;
            RAISE NOTICE 'usage_agg.cleanup_old_key_usage_logs: dropped partition % (% rows)', v_part.rel, v_rows;
        EXCEPTION WHEN lock_not_available THEN
            PERFORM set_config('lock_timeout', v_lock_timeout, true);
            RAISE NOTICE 'usage_agg.cleanup_old_key_usage_logs: partition % is busy, deleting its rows instead', v_part.rel;
        END;
    END LOOP;
    RETURN v_dropped;
END;
$$;

CREATE FUNCTION usage_agg.cleanup_old_key_usage_logs(keep interval DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_cfg usage_agg.config;
    v_keep interval;
    v_horizon date;
    v_cutoff timestamptz;
    v_removed bigint;
    v_left bigint;
    v_n bigint;
    v_started timestamptz := clock_timestamp();
BEGIN
    SELECT * INTO v_cfg FROM usage_agg.config;
    v_keep := usage_agg._check_keep(keep, v_cfg.detail_retention, 'cleanup_old_key_usage_logs');
    -- The first business day that stays. Advancing the horizon first means the
    -- fold ignores the deletes below, and verify_daily_logs stops checking these
    -- days, in this transaction and in every one that sees it committed.
    UPDATE usage_agg.retention_horizon
       SET detail_kept_from = greatest(detail_kept_from, ((now() - v_keep) AT TIME ZONE v_cfg.timezone)::date)
    RETURNING detail_kept_from INTO v_horizon;
    v_cutoff := usage_agg._day_start(v_horizon, v_cfg.timezone);

    v_removed := usage_agg._drop_expired_partitions(v_cutoff);

    SELECT count(*) INTO v_left FROM usage_agg.key_usage_logs WHERE created_at < v_cutoff;
    WHILE v_left > 0 LOOP
        DELETE FROM usage_agg.key_usage_logs k
         WHERE k.created_at < v_cutoff
           AND k.id IN (SELECT o.id FROM usage_agg.key_usage_logs o
                         WHERE o.created_at < v_cutoff
                         LIMIT v_cfg.cleanup_batch_size);
        GET DIAGNOSTICS v_n = ROW_COUNT;
        EXIT WHEN v_n = 0;
        v_removed := v_removed + v_n;
        v_left := greatest(v_left - v_n, 0);
        RAISE NOTICE 'usage_agg.cleanup_old_key_usage_logs: % rows deleted, % left, % elapsed',
            v_removed, v_left, clock_timestamp() - v_started;
    END LOOP;
    RETURN v_removed;
END;
$$;
COMMENT ON FUNCTION usage_agg.cleanup_old_key_usage_logs(interval) IS
    'Deletes detail rows of whole business days older than keep (default config.detail_retention) in batches; aggregates are untouched. Returns rows deleted.';

CREATE FUNCTION usage_agg.cleanup_old_daily_logs(keep interval DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_cfg usage_agg.config;
    v_keep interval;
    v_target date;
    v_horizon usage_agg.retention_horizon;
    v_removed bigint := 0;
    v_left bigint;
    v_n bigint;
    v_started timestamptz := clock_timestamp();
BEGIN
    SELECT * INTO v_cfg FROM usage_agg.config;
    v_keep := usage_agg._check_keep(keep, v_cfg.daily_retention, 'cleanup_old_daily_logs');
    -- Deferred mode: days are rolled up with every call they have.
    PERFORM usage_agg.apply_pending_deltas();
    v_target := ((now() - v_keep) AT TIME ZONE v_cfg.timezone)::date;
    SELECT * INTO v_horizon FROM usage_agg.retention_horizon FOR UPDATE;
    -- A day whose detail still exists must keep its daily row: verify_daily_logs
    -- checks it and corrections of its detail fold into it.
    IF v_target > v_horizon.detail_kept_from THEN
        RAISE NOTICE 'usage_agg.cleanup_old_daily_logs: days from % on still have detail and stay in daily_logs',
            v_horizon.detail_kept_from
            USING HINT = 'Run usage_agg.cleanup_old_key_usage_logs() first (run_maintenance() does).';
        v_target := v_horizon.detail_kept_from;
    END IF;
    UPDATE usage_agg.retention_horizon
       SET daily_kept_from = greatest(daily_kept_from, v_target)
    RETURNING daily_kept_from INTO v_target;

    SELECT count(*) INTO v_left FROM usage_agg.daily_logs WHERE date < v_target;
    WHILE v_left > 0 LOOP
        -- Delete a batch and add what it held to the months, in one statement: a
        -- row a fold updates meanwhile is deleted (and rolled up) in its newest
        -- version, and a row a fold creates afterwards waits for the next run.
        WITH moved AS (
            DELETE FROM usage_agg.daily_logs d
             WHERE d.date < v_target
               AND d.id IN (SELECT o.id FROM usage_agg.daily_logs o
                             WHERE o.date < v_target
                             ORDER BY o.date
                             LIMIT v_cfg.cleanup_batch_size)
            RETURNING d.user_id, d.date, d.log_data
        ), per_month AS (
            SELECT m.user_id, date_trunc('month', m.date::timestamp)::date AS month,
                   usage_agg._rollup(m.log_data ORDER BY m.date) AS log_data
              FROM moved m
             GROUP BY 1, 2
        ), rolled AS (
            INSERT INTO usage_agg.monthly_logs AS t (user_id, month, log_data, last_modified)
            SELECT p.user_id, p.month, p.log_data, now() FROM per_month p
            ON CONFLICT (user_id, month) DO UPDATE
               SET log_data = usage_agg._rollup_merge(t.log_data, EXCLUDED.log_data),
                   last_modified = EXCLUDED.last_modified
            RETURNING 1
        )
        SELECT count(*) INTO v_n FROM moved;
        EXIT WHEN v_n = 0;
        v_removed := v_removed + v_n;
        v_left := greatest(v_left - v_n, 0);
        RAISE NOTICE 'usage_agg.cleanup_old_daily_logs: % rows rolled up and deleted, % left, % elapsed',
            v_removed, v_left, clock_timestamp() - v_started;
    END LOOP;
    RETURN v_removed;
END;
$$;
COMMENT ON FUNCTION usage_agg.cleanup_old_daily_logs(interval) IS
    'Rolls daily_logs rows older than keep (default config.daily_retention) into monthly_logs and deletes them; only days whose detail has expired. Returns rows removed.';

-- ---------------------------------------------------------------------------
-- Maintenance: every tier plus expired quota resets, logged step by step.
-- ---------------------------------------------------------------------------
CREATE TABLE usage_agg.maintenance_runs (
    id       uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    step     text        NOT NULL,
    started  timestamptz NOT NULL,
    finished timestamptz NOT NULL,
    rows     bigint,
    ok       boolean     NOT NULL,
    error    text
);
CREATE INDEX maintenance_runs_step_started ON usage_agg.maintenance_runs (step, started DESC);
COMMENT ON TABLE usage_agg.maintenance_runs IS
    'One row per step of usage_agg.run_maintenance(): rows affected, or the error that made the step fail.';
SELECT pg_catalog.pg_extension_config_dump('usage_agg.maintenance_runs', '');

CREATE FUNCTION usage_agg.run_maintenance()
RETURNS SETOF usage_agg.maintenance_runs
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_step text;
    v_started timestamptz;
    v_rows bigint;
    v_run usage_agg.maintenance_runs;
    v_state text;
    v_message text;
BEGIN
    FOREACH v_step IN ARRAY ARRAY['apply_pending_deltas', 'cleanup_old_key_usage_logs', 'cleanup_old_daily_logs', 'reset_expired_quotas'] LOOP
        v_started := clock_timestamp();
        -- Each step in a subtransaction: a failing step is rolled back and logged,
        -- and the next step runs. A cancel (or statement_timeout) stops them all.
        BEGIN
            CASE v_step
                WHEN 'apply_pending_deltas' THEN v_rows := usage_agg.apply_pending_deltas();
                WHEN 'cleanup_old_key_usage_logs' THEN v_rows := usage_agg.cleanup_old_key_usage_logs();
                WHEN 'cleanup_old_daily_logs' THEN v_rows := usage_agg.cleanup_old_daily_logs();
                WHEN 'reset_expired_quotas' THEN v_rows := usage_agg.reset_expired_quotas();
            END CASE;
            INSERT INTO usage_agg.maintenance_runs (step, started, finished, rows, ok)
            VALUES (v_step, v_started, clock_timestamp(), v_rows, true)
            RETURNING * INTO v_run;
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_message = MESSAGE_TEXT;
            INSERT INTO usage_agg.maintenance_runs (step, started, finished, rows, ok, error)
            VALUES (v_step, v_started, clock_timestamp(), NULL, false, v_state || ': ' || v_message)
            RETURNING * INTO v_run;
            RAISE WARNING 'usage_agg.run_maintenance: step % failed: %', v_step, v_message
                USING DETAIL = 'SQLSTATE ' || v_state || '. The other steps ran; see usage_agg.maintenance_runs.';
        END;
        RETURN NEXT v_run;
    END LOOP;
    -- The log itself is kept as long as the daily aggregates.
    DELETE FROM usage_agg.maintenance_runs
     WHERE started < now() - (SELECT c.daily_retention FROM usage_agg.config c);
END;
$$;
COMMENT ON FUNCTION usage_agg.run_maintenance() IS
    'Runs apply_pending_deltas, cleanup_old_key_usage_logs, cleanup_old_daily_logs and reset_expired_quotas, each logged in usage_agg.maintenance_runs; a failing step does not stop the others';

-- Per step: the last run, the last success, and whether a success is overdue
-- (none within 25 hours: the nightly schedule plus an hour). The last row is the
-- background fold: overdue when a call has been pending longer than
-- config.pending_alert_after, or a day could not be folded.
CREATE VIEW usage_agg.maintenance_health AS
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

-- ---------------------------------------------------------------------------
-- pg_cron scheduling. pg_cron is optional: it is looked up at call time.
-- ---------------------------------------------------------------------------
CREATE FUNCTION usage_agg._require_pg_cron() RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_cron_db text := current_setting('cron.database_name', true);
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
        RAISE EXCEPTION 'usage_agg: pg_cron is not installed in database "%"', current_database()
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = CASE WHEN v_cron_db IS NULL
                                THEN 'The pg_cron library is not loaded by this server.'
                                ELSE format('pg_cron is loaded and runs jobs from database "%s" (cron.database_name).', v_cron_db) END,
                  HINT = 'Install pg_cron (Debian: apt-get install postgresql-15-cron), set shared_preload_libraries = ''pg_cron'' '
                         'and cron.database_name = ''' || current_database() || ''' in postgresql.conf, restart the server, '
                         'then run CREATE EXTENSION pg_cron in this database. Without pg_cron, run SELECT usage_agg.run_maintenance() nightly from any scheduler.';
    END IF;
END;
$$;

CREATE FUNCTION usage_agg.schedule_maintenance(schedule text DEFAULT '17 3 * * *')
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job bigint;
BEGIN
    IF schedule IS NULL OR btrim(schedule) = '' THEN
        RAISE EXCEPTION 'usage_agg: schedule must be a cron expression'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'For example ''17 3 * * *'' (03:17 every night, in the time zone of the server''s pg_cron).';
    END IF;
    PERFORM usage_agg._require_pg_cron();
    -- A named job: scheduling again updates it in place and keeps its id.
    EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO v_job
        USING 'usage_agg_maintenance', schedule, 'SELECT usage_agg.run_maintenance()';
    RETURN v_job;
END;
$$;
COMMENT ON FUNCTION usage_agg.schedule_maintenance(text) IS
    'Registers (or updates) the pg_cron job usage_agg_maintenance running usage_agg.run_maintenance(); returns its job id';

CREATE FUNCTION usage_agg.unschedule_maintenance()
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_exists boolean;
BEGIN
    PERFORM usage_agg._require_pg_cron();
    EXECUTE 'SELECT EXISTS (SELECT 1 FROM cron.job WHERE jobname = $1 AND username = current_user)'
        INTO v_exists USING 'usage_agg_maintenance';
    IF v_exists THEN
        EXECUTE 'SELECT cron.unschedule($1)' USING 'usage_agg_maintenance';
    END IF;
    RETURN v_exists;
END;
$$;
COMMENT ON FUNCTION usage_agg.unschedule_maintenance() IS
    'Removes the pg_cron job usage_agg_maintenance; returns false when there was none';
