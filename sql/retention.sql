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

-- The detail cleanup in steps, shared by the function (one transaction) and the
-- procedure (a commit after every step). Begin: the first business day that
-- stays becomes the detail horizon, expired partitions are dropped; returns the
-- cutoff, the batch size and the rows the partitions held. Advancing the
-- horizon first means the fold ignores the deletes that follow, and
-- verify_daily_logs stops checking these days, in every transaction that sees
-- it committed.
CREATE FUNCTION usage_agg._cleanup_detail_begin(keep interval,
                                                OUT cutoff timestamptz, OUT batch integer, OUT dropped bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_cfg usage_agg.config;
    v_keep interval;
    v_horizon date;
BEGIN
    SELECT * INTO v_cfg FROM usage_agg.config;
    v_keep := usage_agg._check_keep(keep, v_cfg.detail_retention, 'cleanup_old_key_usage_logs');
    UPDATE usage_agg.retention_horizon
       SET detail_kept_from = greatest(detail_kept_from, ((now() - v_keep) AT TIME ZONE v_cfg.timezone)::date)
    RETURNING detail_kept_from INTO v_horizon;
    cutoff := usage_agg._day_start(v_horizon, v_cfg.timezone);
    batch := v_cfg.cleanup_batch_size;
    dropped := usage_agg._drop_expired_partitions(cutoff);
END;
$$;

-- One batch of expired detail; returns the rows deleted (0: done).
CREATE FUNCTION usage_agg._cleanup_detail_batch(cutoff timestamptz, batch integer)
RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH gone AS (
        DELETE FROM usage_agg.key_usage_logs k
         WHERE k.created_at < cutoff
           AND k.id IN (SELECT o.id FROM usage_agg.key_usage_logs o
                         WHERE o.created_at < cutoff
                         LIMIT batch)
        RETURNING 1)
    SELECT count(*) FROM gone
$$;

CREATE FUNCTION usage_agg.cleanup_old_key_usage_logs(keep interval DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_begin record;
    v_removed bigint;
    v_left bigint;
    v_n bigint;
    v_started timestamptz := clock_timestamp();
BEGIN
    SELECT * INTO v_begin FROM usage_agg._cleanup_detail_begin(keep);
    v_removed := v_begin.dropped;
    SELECT count(*) INTO v_left FROM usage_agg.key_usage_logs WHERE created_at < v_begin.cutoff;
    WHILE v_left > 0 LOOP
        v_n := usage_agg._cleanup_detail_batch(v_begin.cutoff, v_begin.batch);
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
    'Deletes detail rows of whole business days older than keep (default config.detail_retention) in batches, in one transaction; aggregates are untouched. Returns rows deleted. CALL usage_agg.expire_key_usage_logs() does the same committing after every batch.';

-- The daily roll-up in steps, shared like the detail cleanup's. Begin: pending
-- calls are applied (days are rolled up with every call they have), the daily
-- horizon advances (never past the detail horizon: a day whose detail exists
-- keeps its daily row, which verify checks and corrections fold into); returns
-- the first day that stays and the batch size.
CREATE FUNCTION usage_agg._cleanup_daily_begin(keep interval, OUT target date, OUT batch integer)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_cfg usage_agg.config;
    v_keep interval;
    v_horizon usage_agg.retention_horizon;
BEGIN
    SELECT * INTO v_cfg FROM usage_agg.config;
    v_keep := usage_agg._check_keep(keep, v_cfg.daily_retention, 'cleanup_old_daily_logs');
    PERFORM usage_agg.apply_pending_deltas();
    target := ((now() - v_keep) AT TIME ZONE v_cfg.timezone)::date;
    SELECT * INTO v_horizon FROM usage_agg.retention_horizon FOR UPDATE;
    IF target > v_horizon.detail_kept_from THEN
        RAISE NOTICE 'usage_agg.cleanup_old_daily_logs: days from % on still have detail and stay in daily_logs',
            v_horizon.detail_kept_from
            USING HINT = 'Run usage_agg.cleanup_old_key_usage_logs() first (run_maintenance() does).';
        target := v_horizon.detail_kept_from;
    END IF;
    UPDATE usage_agg.retention_horizon
       SET daily_kept_from = greatest(daily_kept_from, target)
    RETURNING daily_kept_from INTO target;
    batch := v_cfg.cleanup_batch_size;
END;
$$;

-- One batch of the roll-up: deletes daily rows and adds what they held to the
-- months in one statement (a row a fold updates meanwhile is deleted, and rolled
-- up, in its newest version; a row a fold creates afterwards waits for the next
-- run). Returns the rows moved (0: done).
CREATE FUNCTION usage_agg._cleanup_daily_batch(target date, batch integer)
RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH moved AS (
        DELETE FROM usage_agg.daily_logs d
         WHERE d.date < target
           AND d.id IN (SELECT o.id FROM usage_agg.daily_logs o
                         WHERE o.date < target
                         ORDER BY o.date
                         LIMIT batch)
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
    SELECT count(*) FROM moved
$$;

CREATE FUNCTION usage_agg.cleanup_old_daily_logs(keep interval DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_begin record;
    v_removed bigint := 0;
    v_left bigint;
    v_n bigint;
    v_started timestamptz := clock_timestamp();
BEGIN
    SELECT * INTO v_begin FROM usage_agg._cleanup_daily_begin(keep);
    SELECT count(*) INTO v_left FROM usage_agg.daily_logs WHERE date < v_begin.target;
    WHILE v_left > 0 LOOP
        v_n := usage_agg._cleanup_daily_batch(v_begin.target, v_begin.batch);
        EXIT WHEN v_n = 0;
        v_removed := v_removed + v_n;
        v_left := greatest(v_left - v_n, 0);
        RAISE NOTICE 'usage_agg.cleanup_old_daily_logs: % rows rolled up and deleted, % left, % elapsed',
            v_removed, v_left, clock_timestamp() - v_started;
    END LOOP;
    -- Per-key and service days (a row per key or service and day: no batches;
    -- not counted, the result is daily_logs rows as before 0.4.0).
    PERFORM usage_agg._cleanup_key_days(v_begin.target);
    RETURN v_removed;
END;
$$;
COMMENT ON FUNCTION usage_agg.cleanup_old_daily_logs(interval) IS
    'Rolls daily_logs rows older than keep (default config.daily_retention) into monthly_logs and deletes them, in one transaction; only days whose detail has expired. Returns rows removed. CALL usage_agg.expire_daily_logs() does the same committing after every batch.';

-- The cleanups as procedures that commit after every batch: vacuum is not held
-- back for the whole run, and a cancel (or statement_timeout, which counts from
-- the CALL) loses only the batch under way; every committed batch is consistent
-- on its own. A procedure with SET search_path cannot commit, so these pin
-- nothing: every name and operator in them is schema-qualified.
CREATE PROCEDURE usage_agg.expire_key_usage_logs(keep interval DEFAULT NULL, INOUT removed bigint DEFAULT NULL)
LANGUAGE plpgsql
AS $$
DECLARE
    v_cutoff timestamptz;
    v_batch integer;
    v_n bigint;
    v_started timestamptz := pg_catalog.clock_timestamp();
BEGIN
    SELECT b.cutoff, b.batch, b.dropped INTO v_cutoff, v_batch, removed
      FROM usage_agg._cleanup_detail_begin(keep) b;
    COMMIT;
    LOOP
        v_n := usage_agg._cleanup_detail_batch(v_cutoff, v_batch);
        EXIT WHEN v_n OPERATOR(pg_catalog.=) 0;
        removed := removed OPERATOR(pg_catalog.+) v_n;
        COMMIT;
        RAISE NOTICE 'usage_agg.expire_key_usage_logs: % rows deleted, % elapsed',
            removed, pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) v_started;
    END LOOP;
END;
$$;
COMMENT ON PROCEDURE usage_agg.expire_key_usage_logs(interval, bigint) IS
    'cleanup_old_key_usage_logs as a procedure committing after every batch (CALL it outside a transaction block); removed: rows deleted';

CREATE PROCEDURE usage_agg.expire_daily_logs(keep interval DEFAULT NULL, INOUT removed bigint DEFAULT NULL)
LANGUAGE plpgsql
AS $$
DECLARE
    v_target date;
    v_batch integer;
    v_n bigint;
    v_started timestamptz := pg_catalog.clock_timestamp();
BEGIN
    SELECT b.target, b.batch INTO v_target, v_batch FROM usage_agg._cleanup_daily_begin(keep) b;
    removed := 0;
    COMMIT;
    LOOP
        v_n := usage_agg._cleanup_daily_batch(v_target, v_batch);
        EXIT WHEN v_n OPERATOR(pg_catalog.=) 0;
        removed := removed OPERATOR(pg_catalog.+) v_n;
        COMMIT;
        RAISE NOTICE 'usage_agg.expire_daily_logs: % rows rolled up and deleted, % elapsed',
            removed, pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) v_started;
    END LOOP;
    PERFORM usage_agg._cleanup_key_days(v_target);
END;
$$;
COMMENT ON PROCEDURE usage_agg.expire_daily_logs(interval, bigint) IS
    'cleanup_old_daily_logs as a procedure committing after every batch (CALL it outside a transaction block); removed: rows rolled up';

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

-- The most recent config.verify_recent_days business days checked against the
-- detail: NULL when they agree, else what disagrees (and, with
-- config.repair_drift, the days are rebuilt). Drift is reported as a WARNING too.
CREATE FUNCTION usage_agg._verify_recent_days(OUT drifted bigint, OUT problem text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_cfg usage_agg.config;
    v_today date;
    v_from date;
    v_days text;
    v_first text;
    v_keys bigint;
BEGIN
    SELECT * INTO v_cfg FROM usage_agg.config;
    drifted := 0;
    IF v_cfg.verify_recent_days = 0 THEN
        RETURN;
    END IF;
    v_today := (now() AT TIME ZONE v_cfg.timezone)::date;
    v_from := v_today - (v_cfg.verify_recent_days - 1);
    SELECT count(*), string_agg(DISTINCT v.date::text, ', '),
           min(v.user_id || ' ' || v.date || ' ' || v.field || ': ' || COALESCE(v.aggregate_value::text, 'NULL')
               || ' in the aggregate, ' || COALESCE(v.detail_value::text, 'NULL') || ' in the detail')
      INTO drifted, v_days, v_first
      FROM usage_agg.verify_daily_logs(v_from, v_today) v;
    IF drifted > 0 THEN
        problem := format('drift: %s field(s) of daily_logs disagree with the detail on %s (for example %s)',
                          drifted, v_days, v_first);
    END IF;
    -- The per-key and service days too.
    SELECT count(*), string_agg(DISTINCT v.date::text, ', '),
           min(COALESCE(v.shared_key_id::text, 'service') || ' ' || v.date || ' ' || v.field || ': '
               || COALESCE(v.aggregate_value::text, 'NULL') || ' in the aggregate, '
               || COALESCE(v.detail_value::text, 'NULL') || ' in the detail')
      INTO v_keys, v_days, v_first
      FROM usage_agg.verify_key_daily_logs(v_from, v_today) v;
    IF v_keys > 0 THEN
        problem := concat_ws('; ', problem,
                             format('drift: %s field(s) of the per-key days disagree with the detail on %s (for example %s)',
                                    v_keys, v_days, v_first));
        drifted := drifted + v_keys;
    END IF;
    IF drifted = 0 THEN
        RETURN;
    END IF;
    IF v_cfg.repair_drift THEN
        PERFORM usage_agg.rebuild_daily_logs(v_from, v_today);
        problem := problem || '; repaired by rebuild_daily_logs';
    ELSE
        problem := problem || format('; repair with SELECT usage_agg.rebuild_daily_logs(%L, %L)', v_from, v_today);
    END IF;
    RAISE WARNING 'usage_agg.run_maintenance: %', problem;
END;
$$;

-- Quota logs and alerts expire after config.quota_log_retention and
-- config.alert_retention: the detail of consumption goes, the per-user totals
-- stay in usage_agg.quotas. In batches of config.cleanup_batch_size, one
-- transaction; returns the rows deleted (both tables).
CREATE FUNCTION usage_agg.cleanup_old_quota_logs(keep interval DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_cfg usage_agg.config;
    v_keep interval;
    v_cutoff timestamptz;
    v_alert_cutoff timestamptz;
    v_removed bigint := 0;
    v_left bigint;
    v_n bigint;
    v_started timestamptz := clock_timestamp();
BEGIN
    SELECT * INTO v_cfg FROM usage_agg.config;
    v_keep := usage_agg._check_keep(keep, v_cfg.quota_log_retention, 'cleanup_old_quota_logs');
    IF v_keep < interval '31 days' THEN
        RAISE EXCEPTION 'usage_agg: cleanup_old_quota_logs must keep at least 31 days'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('keep = %s', v_keep),
                  HINT = 'A refund and a replayed request_id need the rows of the current quota month.';
    END IF;
    v_cutoff := now() - v_keep;
    v_alert_cutoff := now() - v_cfg.alert_retention;
    SELECT (SELECT count(*) FROM usage_agg.quota_usage_logs l WHERE l.created_at < v_cutoff)
         + (SELECT count(*) FROM usage_agg.alerts a WHERE a.at < v_alert_cutoff)
      INTO v_left;
    WHILE v_left > 0 LOOP
        WITH gone AS (
            DELETE FROM usage_agg.quota_usage_logs l
             WHERE l.ctid = ANY (ARRAY(SELECT o.ctid FROM usage_agg.quota_usage_logs o
                                        WHERE o.created_at < v_cutoff LIMIT v_cfg.cleanup_batch_size))
               AND l.created_at < v_cutoff
            RETURNING 1)
        SELECT count(*) INTO v_n FROM gone;
        IF v_n = 0 THEN
            WITH gone AS (
                DELETE FROM usage_agg.alerts a
                 WHERE a.id IN (SELECT o.id FROM usage_agg.alerts o
                                 WHERE o.at < v_alert_cutoff LIMIT v_cfg.cleanup_batch_size)
                RETURNING 1)
            SELECT count(*) INTO v_n FROM gone;
        END IF;
        EXIT WHEN v_n = 0;
        v_removed := v_removed + v_n;
        v_left := greatest(v_left - v_n, 0);
        RAISE NOTICE 'usage_agg.cleanup_old_quota_logs: % rows deleted, % left, % elapsed',
            v_removed, v_left, clock_timestamp() - v_started;
    END LOOP;
    RETURN v_removed;
END;
$$;
COMMENT ON FUNCTION usage_agg.cleanup_old_quota_logs(interval) IS
    'Deletes quota_usage_logs rows older than keep (default config.quota_log_retention, at least 31 days) and alerts older than config.alert_retention, in batches; the totals in quotas are untouched. Returns rows deleted.';

-- The maintenance steps in the order they run: run_maintenance(), maintain()
-- and maintenance_health read this list.
CREATE FUNCTION usage_agg._maintenance_steps() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ARRAY['post_restore', 'apply_pending_deltas', 'verify_recent_days',
             'cleanup_old_key_usage_logs', 'cleanup_old_daily_logs', 'cleanup_old_hourly_logs',
             'reset_expired_quotas', 'cleanup_old_quota_logs'];

-- One maintenance step, in a subtransaction: a failing step is rolled back,
-- logged with its SQLSTATE and message, and raises a WARNING; the caller goes
-- on. Returns the step's log row.
CREATE FUNCTION usage_agg._run_maintenance_step(step text)
RETURNS usage_agg.maintenance_runs
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_started timestamptz := clock_timestamp();
    v_rows bigint;
    v_problem text;
    v_run usage_agg.maintenance_runs;
    v_state text;
    v_message text;
BEGIN
    BEGIN
        CASE step
            WHEN 'post_restore' THEN
                -- Only after a restore was noticed (see usage_agg.restores).
                v_rows := CASE WHEN EXISTS (SELECT 1 FROM usage_agg.restores r WHERE r.healed_at IS NULL)
                               THEN usage_agg.post_restore() ELSE 0 END;
            WHEN 'apply_pending_deltas' THEN v_rows := usage_agg.apply_pending_deltas();
            WHEN 'verify_recent_days' THEN
                SELECT v.drifted, v.problem INTO v_rows, v_problem FROM usage_agg._verify_recent_days() v;
            WHEN 'cleanup_old_key_usage_logs' THEN v_rows := usage_agg.cleanup_old_key_usage_logs();
            WHEN 'cleanup_old_daily_logs' THEN v_rows := usage_agg.cleanup_old_daily_logs();
            WHEN 'cleanup_old_hourly_logs' THEN v_rows := usage_agg.cleanup_old_hourly_logs();
            WHEN 'reset_expired_quotas' THEN v_rows := usage_agg.reset_expired_quotas();
            WHEN 'cleanup_old_quota_logs' THEN v_rows := usage_agg.cleanup_old_quota_logs();
        END CASE;
        INSERT INTO usage_agg.maintenance_runs (step, started, finished, rows, ok, error)
        VALUES (step, v_started, clock_timestamp(), v_rows, v_problem IS NULL, v_problem)
        RETURNING * INTO v_run;
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_message = MESSAGE_TEXT;
        INSERT INTO usage_agg.maintenance_runs (step, started, finished, rows, ok, error)
        VALUES (step, v_started, clock_timestamp(), NULL, false, v_state || ': ' || v_message)
        RETURNING * INTO v_run;
        RAISE WARNING 'usage_agg.run_maintenance: step % failed: %', step, v_message
            USING DETAIL = 'SQLSTATE ' || v_state || '. The other steps ran; see usage_agg.maintenance_runs.';
    END;
    RETURN v_run;
END;
$$;

-- The log itself is kept as long as the daily aggregates.
CREATE FUNCTION usage_agg._trim_maintenance_runs() RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM usage_agg.maintenance_runs
     WHERE started < now() - (SELECT c.daily_retention FROM usage_agg.config c)
$$;

CREATE FUNCTION usage_agg.run_maintenance()
RETURNS SETOF usage_agg.maintenance_runs
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_step text;
BEGIN
    -- A cancel (or statement_timeout) stops them all.
    FOREACH v_step IN ARRAY usage_agg._maintenance_steps() LOOP
        RETURN NEXT usage_agg._run_maintenance_step(v_step);
    END LOOP;
    PERFORM usage_agg._trim_maintenance_runs();
END;
$$;
COMMENT ON FUNCTION usage_agg.run_maintenance() IS
    'Runs post_restore (after a restore), apply_pending_deltas, verify_recent_days (drift, repaired with config.repair_drift), cleanup_old_key_usage_logs, cleanup_old_daily_logs, cleanup_old_hourly_logs, reset_expired_quotas and cleanup_old_quota_logs in one transaction, each logged in usage_agg.maintenance_runs; a failing step does not stop the others. CALL usage_agg.maintain() does the same committing as it goes.';

-- run_maintenance() as a procedure (what the pg_cron job runs): the same steps
-- and log, each committed, the two cleanups committing after every batch. A
-- cleanup that fails or is cancelled stops the run (a procedure cannot catch an
-- error around a commit): its log row, written before it starts, stays ok =
-- false with 'did not finish', so maintenance_health shows it.
CREATE PROCEDURE usage_agg.maintain()
LANGUAGE plpgsql
AS $$
DECLARE
    v_step text;
    v_id uuid;
    v_rows bigint;
BEGIN
    FOREACH v_step IN ARRAY usage_agg._maintenance_steps() LOOP
        IF NOT v_step OPERATOR(pg_catalog.=) ANY (ARRAY['cleanup_old_key_usage_logs', 'cleanup_old_daily_logs']) THEN
            PERFORM usage_agg._run_maintenance_step(v_step);
            COMMIT;
            CONTINUE;
        END IF;
        INSERT INTO usage_agg.maintenance_runs (step, started, finished, ok, error)
        VALUES (v_step, pg_catalog.clock_timestamp(), pg_catalog.clock_timestamp(), false,
                'did not finish: failed or cancelled (see the server log)')
        RETURNING id INTO v_id;
        COMMIT;
        IF v_step OPERATOR(pg_catalog.=) 'cleanup_old_key_usage_logs' THEN
            CALL usage_agg.expire_key_usage_logs(NULL, v_rows);
        ELSE
            CALL usage_agg.expire_daily_logs(NULL, v_rows);
        END IF;
        UPDATE usage_agg.maintenance_runs
           SET finished = pg_catalog.clock_timestamp(), rows = v_rows, ok = true, error = NULL
         WHERE id OPERATOR(pg_catalog.=) v_id;
        COMMIT;
    END LOOP;
    PERFORM usage_agg._trim_maintenance_runs();
END;
$$;
COMMENT ON PROCEDURE usage_agg.maintain() IS
    'run_maintenance() as a procedure that commits after every step and every cleanup batch (what schedule_maintenance() schedules); CALL it outside a transaction block';

-- Per step: the last run, the last success, and whether a success is overdue
-- (none within 25 hours: the nightly schedule plus an hour); post_restore is
-- overdue while a restore waits to be healed. The last row is the background
-- fold: overdue when a call has been pending longer than
-- config.pending_alert_after, or a day could not be folded. alert: overdue, or
-- the last run failed or found drift.
CREATE VIEW usage_agg.maintenance_health AS
SELECT h.step, h.last_run_at, h.last_run_ok, h.last_error, h.last_success_at, h.last_success_rows,
       h.overdue_after, h.overdue, h.overdue OR NOT COALESCE(h.last_run_ok, true) AS alert
  FROM (SELECT s.ord, s.step,
               last_run.started AS last_run_at,
               last_run.ok AS last_run_ok,
               CASE WHEN s.step = 'post_restore' AND rs.restored_at IS NOT NULL
                    THEN format('restored at %s: the restored days are counted twice until SELECT usage_agg.post_restore() runs (run_maintenance() runs it)', rs.restored_at)
                    ELSE last_run.error END AS last_error,
               last_ok.finished AS last_success_at,
               last_ok.rows AS last_success_rows,
               interval '25 hours' AS overdue_after,
               CASE WHEN s.step = 'post_restore' THEN rs.restored_at IS NOT NULL
                    ELSE (last_ok.finished IS NULL OR last_ok.finished < now() - interval '25 hours') END AS overdue
          FROM unnest(usage_agg._maintenance_steps()) WITH ORDINALITY AS s(step, ord)
          CROSS JOIN (SELECT min(r.restored_at) AS restored_at FROM usage_agg.restores r WHERE r.healed_at IS NULL) rs
          LEFT JOIN LATERAL (SELECT r.started, r.ok, r.error FROM usage_agg.maintenance_runs r
                              WHERE r.step = s.step ORDER BY r.started DESC LIMIT 1) last_run ON true
          LEFT JOIN LATERAL (SELECT r.finished, r.rows FROM usage_agg.maintenance_runs r
                              WHERE r.step = s.step AND r.ok ORDER BY r.started DESC LIMIT 1) last_ok ON true
        UNION ALL
        -- After every step.
        SELECT 1000, 'background_fold',
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
         CROSS JOIN (SELECT least((SELECT min(q.appended_at) FROM usage_agg.pending_deltas q),
                             (SELECT min(q.appended_at) FROM usage_agg.pending_key_deltas q),
                             (SELECT min(q.appended_at) FROM usage_agg.pending_key_hour_deltas q)) AS oldest) p
         CROSS JOIN (SELECT count(*) AS days FROM usage_agg.fold_skipped) sk
        UNION ALL
        -- Calls without a cost, once usage_agg.model_prices is in use (before
        -- that, a cost left NULL is the application's choice).
        SELECT 1001, 'unpriced_calls', NULL, NULL,
               CASE WHEN u.calls > 0
                    THEN format('%s call(s) of %s model(s) have no cost, the oldest from %s: see usage_agg.unpriced_calls',
                                u.calls, u.models, u.since) END,
               NULL, NULL, NULL, u.calls > 0
          FROM (SELECT COALESCE(sum(u.calls), 0) AS calls, count(u.model) AS models, min(u.since) AS since
                  FROM usage_agg._unpriced_calls() u
                 WHERE EXISTS (SELECT 1 FROM usage_agg.model_prices)) u) h
 ORDER BY h.ord;
COMMENT ON VIEW usage_agg.maintenance_health IS
    'Per maintenance step: last run, last success and its rows, overdue when no success within overdue_after (post_restore: while a restore waits to be healed), alert when overdue or the last run failed or found drift; background_fold: overdue when a call waits longer than config.pending_alert_after or a day could not be folded; unpriced_calls: overdue while calls have no cost and usage_agg.model_prices has rows';

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
        USING 'usage_agg_maintenance', schedule, 'CALL usage_agg.maintain()';
    RETURN v_job;
END;
$$;
COMMENT ON FUNCTION usage_agg.schedule_maintenance(text) IS
    'Registers (or updates) the pg_cron job usage_agg_maintenance running CALL usage_agg.maintain(); returns its job id';

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

-- Without the background applier (usage_agg not in shared_preload_libraries),
-- calls of async mode and the per-key deltas of immediate statements wait for
-- an apply: a pg_cron job runs one on `every` (a cron expression; every minute
-- by default; pg_cron 1.5 and later also take '[1-59] seconds').
CREATE FUNCTION usage_agg.schedule_apply(every text DEFAULT '* * * * *')
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job bigint;
BEGIN
    IF every IS NULL OR btrim(every) = '' THEN
        RAISE EXCEPTION 'usage_agg: every must be a pg_cron schedule'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'For example ''* * * * *'' (every minute), or ''30 seconds'' with pg_cron 1.5 or later.';
    END IF;
    PERFORM usage_agg._require_pg_cron();
    EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO v_job
        USING 'usage_agg_apply', every, 'SELECT usage_agg.apply_pending_deltas()';
    RETURN v_job;
END;
$$;
COMMENT ON FUNCTION usage_agg.schedule_apply(text) IS
    'Registers (or updates) the pg_cron job usage_agg_apply running SELECT usage_agg.apply_pending_deltas() (for servers without the background applier); returns its job id';

CREATE FUNCTION usage_agg.unschedule_apply()
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_exists boolean;
BEGIN
    PERFORM usage_agg._require_pg_cron();
    EXECUTE 'SELECT EXISTS (SELECT 1 FROM cron.job WHERE jobname = $1 AND username = current_user)'
        INTO v_exists USING 'usage_agg_apply';
    IF v_exists THEN
        EXECUTE 'SELECT cron.unschedule($1)' USING 'usage_agg_apply';
    END IF;
    RETURN v_exists;
END;
$$;
COMMENT ON FUNCTION usage_agg.unschedule_apply() IS
    'Removes the pg_cron job usage_agg_apply; returns false when there was none';
