-- usage_agg 0.2.0 -> 0.3.0
--
-- The asynchronous fold by default: fold_mode 'auto' for new installs (an
-- updated install keeps its mode; 'deferred' is now called 'async'), the
-- background applier (config.apply_interval), pending_deltas.appended_at, days
-- the applier could not fold (fold_skipped), fold_status, and the fold's row in
-- maintenance_health. Maintenance checks the most recent days for drift
-- (config.verify_recent_days, config.repair_drift) and heals a restore it
-- noticed (usage_agg.restores, post_restore()). Keeps all data. A fresh install
-- of 0.3.0 and 0.2.0 + this script give the same catalog (tests/upgrade.rs
-- checks it).

\echo Use "ALTER EXTENSION usage_agg UPDATE TO '0.3.0'" to load this file. \quit

ALTER TABLE usage_agg.config DROP CONSTRAINT config_fold_mode_known;
UPDATE usage_agg.config SET fold_mode = 'async' WHERE fold_mode = 'deferred';
ALTER TABLE usage_agg.config
    ALTER COLUMN fold_mode SET DEFAULT 'auto',
    ADD COLUMN apply_interval interval NOT NULL DEFAULT '100 milliseconds',
    ADD COLUMN pending_alert_after interval NOT NULL DEFAULT '5 minutes',
    ADD COLUMN verify_recent_days integer NOT NULL DEFAULT 2,
    ADD COLUMN repair_drift boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT config_verify_recent_days_range CHECK (verify_recent_days BETWEEN 0 AND 366),
    ADD CONSTRAINT config_fold_mode_known CHECK (fold_mode IN ('auto', 'async', 'immediate')),
    ADD CONSTRAINT config_apply_interval_range CHECK (apply_interval BETWEEN interval '10 milliseconds' AND interval '1 hour'),
    ADD CONSTRAINT config_pending_alert_after_positive CHECK (pending_alert_after > interval '0');
COMMENT ON COLUMN usage_agg.config.fold_mode IS
    'auto: async while a background applier serves this database, immediate otherwise; async (formerly deferred): inserts record their calls in pending_deltas, folded by the applier or apply_pending_deltas(); immediate: every statement updates daily_logs';
COMMENT ON COLUMN usage_agg.config.apply_interval IS
    'How often the background applier folds pending calls (sooner while a backlog remains)';
COMMENT ON COLUMN usage_agg.config.pending_alert_after IS
    'maintenance_health reports the fold as overdue when a call has been pending longer than this';
COMMENT ON COLUMN usage_agg.config.verify_recent_days IS
    'run_maintenance() checks this many most recent business days against the detail (0: not at all)';
COMMENT ON COLUMN usage_agg.config.repair_drift IS
    'run_maintenance() rebuilds the recent days it finds drifted (the drift is reported either way)';

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
               pending_alert_after = NEW.pending_alert_after,
               verify_recent_days = NEW.verify_recent_days,
               repair_drift = NEW.repair_drift;
        -- The restored detail is folded again on top of the restored aggregates:
        -- usage_agg.post_restore() (which run_maintenance() runs) recomputes them.
        INSERT INTO usage_agg.restores (restored_at) VALUES (now());
        RETURN NULL;
    END IF;
    RETURN NEW;
END;
$$;


CREATE TABLE usage_agg.restores (
    restored_at    timestamptz NOT NULL,
    healed_at      timestamptz,
    rows_rewritten bigint
);
COMMENT ON TABLE usage_agg.restores IS
    'Restores of a pg_dump noticed by usage_agg, and when post_restore() recomputed the aggregates they had folded twice';


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


CREATE OR REPLACE FUNCTION usage_agg.post_restore()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tz text := usage_agg._timezone();
    v_from date;
    v_to date;
    v_rows bigint := 0;
BEGIN
    SELECT (min(k.created_at) AT TIME ZONE v_tz)::date, (max(k.created_at) AT TIME ZONE v_tz)::date
      INTO v_from, v_to
      FROM usage_agg.key_usage_logs k;
    IF v_from IS NOT NULL THEN
        v_rows := usage_agg.rebuild_daily_logs(v_from, v_to);
    END IF;
    UPDATE usage_agg.restores SET healed_at = now(), rows_rewritten = v_rows WHERE healed_at IS NULL;
    RETURN v_rows;
END;
$$;
COMMENT ON FUNCTION usage_agg.post_restore() IS
    'After restoring a pg_dump: recomputes the aggregates of every day with detail (the restore folded the detail a second time); run_maintenance() runs it when a restore is noticed; harmless when run again';

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

CREATE OR REPLACE FUNCTION usage_agg.cleanup_old_key_usage_logs(keep interval DEFAULT NULL)
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

CREATE OR REPLACE FUNCTION usage_agg.cleanup_old_daily_logs(keep interval DEFAULT NULL)
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
END;
$$;
COMMENT ON PROCEDURE usage_agg.expire_daily_logs(interval, bigint) IS
    'cleanup_old_daily_logs as a procedure committing after every batch (CALL it outside a transaction block); removed: rows rolled up';


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
    IF drifted = 0 THEN
        RETURN;
    END IF;
    problem := format('drift: %s field(s) of daily_logs disagree with the detail on %s (for example %s)',
                      drifted, v_days, v_first);
    IF v_cfg.repair_drift THEN
        PERFORM usage_agg.rebuild_daily_logs(v_from, v_today);
        problem := problem || '; repaired by rebuild_daily_logs';
    ELSE
        problem := problem || format('; repair with SELECT usage_agg.rebuild_daily_logs(%L, %L)', v_from, v_today);
    END IF;
    RAISE WARNING 'usage_agg.run_maintenance: %', problem;
END;
$$;

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
            WHEN 'reset_expired_quotas' THEN v_rows := usage_agg.reset_expired_quotas();
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

CREATE OR REPLACE FUNCTION usage_agg.run_maintenance()
RETURNS SETOF usage_agg.maintenance_runs
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_step text;
BEGIN
    -- A cancel (or statement_timeout) stops them all.
    FOREACH v_step IN ARRAY ARRAY['post_restore', 'apply_pending_deltas', 'verify_recent_days',
                                  'cleanup_old_key_usage_logs', 'cleanup_old_daily_logs', 'reset_expired_quotas'] LOOP
        RETURN NEXT usage_agg._run_maintenance_step(v_step);
    END LOOP;
    PERFORM usage_agg._trim_maintenance_runs();
END;
$$;
COMMENT ON FUNCTION usage_agg.run_maintenance() IS
    'Runs post_restore (after a restore), apply_pending_deltas, verify_recent_days (drift, repaired with config.repair_drift), cleanup_old_key_usage_logs, cleanup_old_daily_logs and reset_expired_quotas in one transaction, each logged in usage_agg.maintenance_runs; a failing step does not stop the others. CALL usage_agg.maintain() does the same committing as it goes.';

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
    FOREACH v_step IN ARRAY ARRAY['post_restore', 'apply_pending_deltas', 'verify_recent_days'] LOOP
        PERFORM usage_agg._run_maintenance_step(v_step);
        COMMIT;
    END LOOP;
    FOREACH v_step IN ARRAY ARRAY['cleanup_old_key_usage_logs', 'cleanup_old_daily_logs'] LOOP
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
    PERFORM usage_agg._run_maintenance_step('reset_expired_quotas');
    PERFORM usage_agg._trim_maintenance_runs();
END;
$$;
COMMENT ON PROCEDURE usage_agg.maintain() IS
    'run_maintenance() as a procedure that commits after every step and every cleanup batch (what schedule_maintenance() schedules); CALL it outside a transaction block';


CREATE OR REPLACE FUNCTION usage_agg.schedule_maintenance(schedule text DEFAULT '17 3 * * *')
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


CREATE OR REPLACE VIEW usage_agg.maintenance_health AS
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
          FROM (VALUES (0, 'post_restore'), (1, 'apply_pending_deltas'), (2, 'verify_recent_days'),
                       (3, 'cleanup_old_key_usage_logs'), (4, 'cleanup_old_daily_logs'), (5, 'reset_expired_quotas'))
               AS s(ord, step)
          CROSS JOIN (SELECT min(r.restored_at) AS restored_at FROM usage_agg.restores r WHERE r.healed_at IS NULL) rs
          LEFT JOIN LATERAL (SELECT r.started, r.ok, r.error FROM usage_agg.maintenance_runs r
                              WHERE r.step = s.step ORDER BY r.started DESC LIMIT 1) last_run ON true
          LEFT JOIN LATERAL (SELECT r.finished, r.rows FROM usage_agg.maintenance_runs r
                              WHERE r.step = s.step AND r.ok ORDER BY r.started DESC LIMIT 1) last_ok ON true
        UNION ALL
        SELECT 6, 'background_fold',
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
    'Per maintenance step: last run, last success and its rows, overdue when no success within overdue_after (post_restore: while a restore waits to be healed), alert when overdue or the last run failed or found drift; background_fold: overdue when a call waits longer than config.pending_alert_after or a day could not be folded';


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


ALTER VIEW usage_agg.maintenance_health SET (security_invoker = true);
ALTER VIEW usage_agg.fold_status SET (security_invoker = true);
REVOKE EXECUTE ON FUNCTION usage_agg._verify_recent_days() FROM PUBLIC;
REVOKE EXECUTE ON PROCEDURE
    usage_agg.expire_key_usage_logs(interval, bigint),
    usage_agg.expire_daily_logs(interval, bigint),
    usage_agg.maintain()
FROM PUBLIC;

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
                           usage_agg.fold_status, usage_agg.fold_skipped, usage_agg.restores,
                           usage_agg.daily_usage, usage_agg.monthly_usage,
                           usage_agg.daily_usage_by_model, usage_agg.daily_usage_by_key,
                           usage_agg.monthly_usage_by_model, usage_agg.monthly_usage_by_key
                    TO %I', role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION usage_agg.quota_status(uuid) TO %I', role_name);
END;
$$;

-- Serve this database from now on (the launcher is woken at commit).
SELECT usage_agg._wake_applier();
