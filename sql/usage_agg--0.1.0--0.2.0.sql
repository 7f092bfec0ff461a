-- usage_agg 0.1.0 -> 0.2.0
--
-- Deferred fold mode (config.fold_mode, pending_deltas, apply_pending_deltas());
-- readers, verify, rebuild and the daily roll-up include pending calls;
-- run_maintenance() applies them first; _day_start() can be inlined.
-- Keeps all data. A fresh install of 0.2.0 and 0.1.0 + this script give the
-- same catalog (tests/upgrade.rs checks it).

\echo Use "ALTER EXTENSION usage_agg UPDATE TO '0.2.0'" to load this file. \quit

ALTER TABLE usage_agg.config
    ADD COLUMN fold_mode text NOT NULL DEFAULT 'immediate',
    ADD CONSTRAINT config_fold_mode_known CHECK (fold_mode IN ('immediate', 'deferred'));
COMMENT ON COLUMN usage_agg.config.fold_mode IS
    'immediate: every statement updates daily_logs; deferred: small inserts append to pending_deltas, folded by apply_pending_deltas()';

CREATE OR REPLACE FUNCTION usage_agg._config_validate() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
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
               fold_mode = NEW.fold_mode;
        RETURN NULL;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TABLE usage_agg.pending_deltas (
    user_id       uuid        NOT NULL,
    day           date        NOT NULL,
    model_used    text,
    shared_key_id uuid,
    calls         integer     NOT NULL,
    successful    integer     NOT NULL,
    tokens        bigint      NOT NULL,
    cost          numeric     NOT NULL,
    last_at       timestamptz NOT NULL
);
CREATE INDEX pending_deltas_user_id_day ON usage_agg.pending_deltas (user_id, day);
COMMENT ON TABLE usage_agg.pending_deltas IS
    'Deferred mode: usage folded into daily_logs by usage_agg.apply_pending_deltas(); readers include it.';

SELECT pg_catalog.pg_extension_config_dump('usage_agg.pending_deltas', '');

ALTER FUNCTION usage_agg._day_start(date, text) RESET search_path;

CREATE FUNCTION usage_agg.apply_pending_deltas(
	"max_rows" INT DEFAULT 1000000 /* i32 */
) RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'apply_pending_deltas_wrapper';

DROP FUNCTION usage_agg._detail_aggregates(date, date);

CREATE FUNCTION usage_agg._aggregates(p_from date, p_to date)
RETURNS TABLE (source text, user_id uuid, date date, log_data jsonb)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH tz AS (
        SELECT usage_agg._timezone() AS name
    ), calls AS (
        SELECT 'detail' AS source, k.user_id, (k.created_at AT TIME ZONE tz.name)::date AS day,
               k.model_used, k.shared_key_id, 1 AS n, CASE WHEN k.success THEN 1 ELSE 0 END AS ok,
               k.tokens_used::bigint AS tokens, k.cost_estimate AS cost, k.created_at AS at
          FROM usage_agg.key_usage_logs k, tz
         WHERE k.created_at >= usage_agg._day_start(p_from, tz.name)
           AND k.created_at <  usage_agg._day_start(p_to + 1, tz.name)
        UNION ALL
        SELECT 'pending', p.user_id, p.day, p.model_used, p.shared_key_id, p.calls, p.successful,
               p.tokens, p.cost, p.last_at
          FROM usage_agg.pending_deltas p
         WHERE p.day BETWEEN p_from AND p_to
    ), per_day AS (
        SELECT c.source, c.user_id, c.day,
               sum(c.n) AS calls,
               sum(c.ok) AS successful,
               sum(c.n - c.ok) AS failed,
               COALESCE(sum(c.tokens), 0) AS tokens,
               COALESCE(sum(c.cost), 0) AS cost,
               max(c.at) AS last_at
          FROM calls c GROUP BY c.source, c.user_id, c.day
    ), per_model AS (
        SELECT m.source, m.user_id, m.day,
               jsonb_object_agg(m.model_used, jsonb_build_object(
                   'calls', m.calls, 'tokens', m.tokens, 'cost', m.cost)) AS by_model
          FROM (SELECT c.source, c.user_id, c.day, c.model_used, sum(c.n) AS calls,
                       COALESCE(sum(c.tokens), 0) AS tokens,
                       COALESCE(sum(c.cost), 0) AS cost
                  FROM calls c WHERE c.model_used IS NOT NULL
                 GROUP BY c.source, c.user_id, c.day, c.model_used) m
         GROUP BY m.source, m.user_id, m.day
    ), per_key AS (
        SELECT k.source, k.user_id, k.day,
               jsonb_agg(k.key ORDER BY k.key) AS keys_used,
               jsonb_object_agg(k.key, jsonb_build_object(
                   'calls', k.calls, 'tokens', k.tokens, 'cost', k.cost)) AS by_key
          FROM (SELECT c.source, c.user_id, c.day, c.shared_key_id::text AS key, sum(c.n) AS calls,
                       COALESCE(sum(c.tokens), 0) AS tokens,
                       COALESCE(sum(c.cost), 0) AS cost
                  FROM calls c WHERE c.shared_key_id IS NOT NULL
                 GROUP BY c.source, c.user_id, c.day, c.shared_key_id) k
         GROUP BY k.source, k.user_id, k.day
    )
    SELECT d.source, d.user_id, d.day,
           jsonb_build_object(
               'api_call_count', d.calls,
               'shared_service_usage', jsonb_build_object(
                   'total_calls', d.calls,
                   'successful_calls', d.successful,
                   'failed_calls', d.failed,
                   'tokens_used', d.tokens,
                   'estimated_cost', d.cost,
                   'keys_used', COALESCE(k.keys_used, '[]'::jsonb),
                   'by_model', COALESCE(m.by_model, '{}'::jsonb),
                   'by_key', COALESCE(k.by_key, '{}'::jsonb)),
               'last_api_call_at', usage_agg._iso_utc(d.last_at))
      FROM per_day d
      LEFT JOIN per_model m ON m.source = d.source AND m.user_id = d.user_id AND m.day = d.day
      LEFT JOIN per_key k ON k.source = d.source AND k.user_id = d.user_id AND k.day = d.day
$$;

CREATE OR REPLACE FUNCTION usage_agg.verify_daily_logs(p_from date, p_to date)
RETURNS TABLE (user_id uuid, date date, field text, aggregate_value jsonb, detail_value jsonb)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_from date;
BEGIN
    PERFORM usage_agg._check_day_range(p_from, p_to);
    -- Days whose detail the retention cleanup removed cannot be checked.
    v_from := greatest(p_from, (SELECT h.detail_kept_from FROM usage_agg.retention_horizon h));
    IF v_from > p_to THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH agg AS MATERIALIZED (
        SELECT a.source, a.user_id, a.date, a.log_data FROM usage_agg._aggregates(v_from, p_to) a
    ), expected AS (
        SELECT e.user_id, e.date, e.log_data FROM agg e WHERE e.source = 'detail'
    ), pending AS (
        SELECT e.user_id, e.date, e.log_data FROM agg e WHERE e.source = 'pending'
    ), stored AS (
        -- What readers see: daily_logs plus the calls still pending (deferred mode).
        SELECT COALESCE(d.user_id, p.user_id) AS user_id, COALESCE(d.date, p.date) AS date,
               CASE WHEN p.log_data IS NULL THEN d.log_data
                    ELSE usage_agg._rollup_merge(COALESCE(d.log_data, '{}'::jsonb), p.log_data) END AS log_data
          FROM (SELECT dl.user_id, dl.date, dl.log_data FROM usage_agg.daily_logs dl
                 WHERE dl.date BETWEEN v_from AND p_to) d
          FULL JOIN pending p ON p.user_id = d.user_id AND p.date = d.date
    ), pairs AS (
        SELECT COALESCE(s.user_id, e.user_id) AS user_id,
               COALESCE(s.date, e.date) AS date,
               CASE WHEN s.log_data IS NULL THEN NULL ELSE s.log_data END AS a,
               COALESCE(e.log_data, usage_agg._empty_log_data()) AS x
          FROM stored s FULL JOIN expected e ON e.user_id = s.user_id AND e.date = s.date
    )
    SELECT p.user_id, p.date, f.field, f.a, f.x
      FROM pairs p
     CROSS JOIN LATERAL (VALUES
        ('api_call_count', p.a->'api_call_count', p.x->'api_call_count'),
        ('shared_service_usage.total_calls', p.a->'shared_service_usage'->'total_calls', p.x->'shared_service_usage'->'total_calls'),
        ('shared_service_usage.successful_calls', p.a->'shared_service_usage'->'successful_calls', p.x->'shared_service_usage'->'successful_calls'),
        ('shared_service_usage.failed_calls', p.a->'shared_service_usage'->'failed_calls', p.x->'shared_service_usage'->'failed_calls'),
        ('shared_service_usage.tokens_used', p.a->'shared_service_usage'->'tokens_used', p.x->'shared_service_usage'->'tokens_used'),
        ('shared_service_usage.estimated_cost', p.a->'shared_service_usage'->'estimated_cost', p.x->'shared_service_usage'->'estimated_cost'),
        ('shared_service_usage.keys_used', usage_agg._sorted_array(p.a->'shared_service_usage'->'keys_used'), usage_agg._sorted_array(p.x->'shared_service_usage'->'keys_used')),
        ('shared_service_usage.by_model', p.a->'shared_service_usage'->'by_model', p.x->'shared_service_usage'->'by_model'),
        ('shared_service_usage.by_key', p.a->'shared_service_usage'->'by_key', p.x->'shared_service_usage'->'by_key'),
        ('last_api_call_at', p.a->'last_api_call_at', p.x->'last_api_call_at')
     ) AS f(field, a, x)
     WHERE f.a IS DISTINCT FROM f.x
     ORDER BY p.date, p.user_id, f.field;
END;
$$;

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

CREATE OR REPLACE FUNCTION usage_agg.usage_summary(user_id uuid, at timestamptz DEFAULT now())
RETURNS TABLE (period text, calls bigint, successful bigint, failed bigint, tokens bigint, cost numeric)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tz text;
    v_day date;
    v_month date;
    v_today_known boolean;
BEGIN
    PERFORM usage_agg._check_reader_args($1, $2);
    v_tz := usage_agg._timezone();
    v_day := ($2 AT TIME ZONE v_tz)::date;
    v_month := date_trunc('month', v_day::timestamp)::date;
    -- A day already rolled up into its month cannot be told apart there.
    v_today_known := v_day >= (SELECT h.daily_kept_from FROM usage_agg.retention_horizon h);
    -- One pass over the user's rows, each window a filtered sum (this is on the
    -- request path of applications: #>> reads a nested number without copying
    -- the object around it).
    RETURN QUERY
    WITH rows_of_user AS (
        SELECT d.date AS first_day, true AS is_day,
               (d.log_data->>'api_call_count')::bigint AS calls,
               (d.log_data#>>'{shared_service_usage,successful_calls}')::bigint AS successful,
               (d.log_data#>>'{shared_service_usage,failed_calls}')::bigint AS failed,
               (d.log_data#>>'{shared_service_usage,tokens_used}')::bigint AS tokens,
               (d.log_data#>>'{shared_service_usage,estimated_cost}')::numeric AS cost
          FROM usage_agg.daily_logs d
         WHERE d.user_id = $1 AND d.date <= v_day
        UNION ALL
        SELECT m.month, false,
               (m.log_data->>'api_call_count')::bigint,
               (m.log_data#>>'{shared_service_usage,successful_calls}')::bigint,
               (m.log_data#>>'{shared_service_usage,failed_calls}')::bigint,
               (m.log_data#>>'{shared_service_usage,tokens_used}')::bigint,
               (m.log_data#>>'{shared_service_usage,estimated_cost}')::numeric
          FROM usage_agg.monthly_logs m
         WHERE m.user_id = $1 AND m.month <= v_day
        UNION ALL
        -- Deferred mode: calls not folded into daily_logs yet.
        SELECT p.day, true, p.calls, p.successful, p.calls - p.successful, p.tokens, p.cost
          FROM usage_agg.pending_deltas p
         WHERE p.user_id = $1 AND p.day <= v_day
    ), totals AS (
        SELECT sum(r.calls) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_calls,
               sum(r.successful) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_ok,
               sum(r.failed) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_failed,
               sum(r.tokens) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_tokens,
               sum(r.cost) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_cost,
               sum(r.calls) FILTER (WHERE r.first_day >= v_month) AS m_calls,
               sum(r.successful) FILTER (WHERE r.first_day >= v_month) AS m_ok,
               sum(r.failed) FILTER (WHERE r.first_day >= v_month) AS m_failed,
               sum(r.tokens) FILTER (WHERE r.first_day >= v_month) AS m_tokens,
               sum(r.cost) FILTER (WHERE r.first_day >= v_month) AS m_cost,
               sum(r.calls) AS a_calls, sum(r.successful) AS a_ok, sum(r.failed) AS a_failed,
               sum(r.tokens) AS a_tokens, sum(r.cost) AS a_cost
          FROM rows_of_user r
    )
    SELECT w.period,
           CASE WHEN w.known THEN COALESCE(w.calls, 0)::bigint END,
           CASE WHEN w.known THEN COALESCE(w.ok, 0)::bigint END,
           CASE WHEN w.known THEN COALESCE(w.failed, 0)::bigint END,
           CASE WHEN w.known THEN COALESCE(w.tokens, 0)::bigint END,
           CASE WHEN w.known THEN COALESCE(w.cost, 0) END
      FROM totals t
     CROSS JOIN LATERAL (VALUES
           (1, 'today', v_today_known, t.d_calls, t.d_ok, t.d_failed, t.d_tokens, t.d_cost),
           (2, 'month', true, t.m_calls, t.m_ok, t.m_failed, t.m_tokens, t.m_cost),
           (3, 'all_time', true, t.a_calls, t.a_ok, t.a_failed, t.a_tokens, t.a_cost))
           AS w(ord, period, known, calls, ok, failed, tokens, cost)
     ORDER BY w.ord;
END;
$$;

CREATE OR REPLACE FUNCTION usage_agg.check_usage_limit(user_id uuid, at timestamptz DEFAULT now())
RETURNS TABLE (membership_level text, today_cost numeric, daily_cost_limit numeric, remaining numeric, allowed boolean)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_day date;
    v_level text;
    v_limit numeric;
    v_cost numeric;
BEGIN
    PERFORM usage_agg._check_reader_args($1, $2);
    v_day := ($2 AT TIME ZONE usage_agg._timezone())::date;
    v_level := COALESCE((SELECT q.membership_level FROM usage_agg.quotas q WHERE q.user_id = $1), 'free');
    v_limit := (SELECT p.daily_cost_limit FROM usage_agg.quota_plans p WHERE p.membership_level = v_level);
    v_cost := COALESCE((SELECT (d.log_data#>>'{shared_service_usage,estimated_cost}')::numeric
                          FROM usage_agg.daily_logs d
                         WHERE d.user_id = $1 AND d.date = v_day), 0)
            + COALESCE((SELECT sum(p.cost) FROM usage_agg.pending_deltas p
                         WHERE p.user_id = $1 AND p.day = v_day), 0);
    RETURN QUERY SELECT v_level, v_cost, v_limit,
                        CASE WHEN v_limit IS NULL THEN NULL ELSE greatest(v_limit - v_cost, 0) END,
                        v_limit IS NULL OR v_cost < v_limit;
END;
$$;

CREATE OR REPLACE FUNCTION usage_agg.cleanup_old_daily_logs(keep interval DEFAULT NULL)
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

CREATE OR REPLACE FUNCTION usage_agg.run_maintenance()
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

COMMENT ON FUNCTION usage_agg.verify_daily_logs(date, date) IS
    'Lists every (user, date, field) where daily_logs (plus pending deltas) and a GROUP BY over key_usage_logs disagree; empty means consistent. Days whose detail has expired are skipped.';

COMMENT ON FUNCTION usage_agg.run_maintenance() IS
    'Runs apply_pending_deltas, cleanup_old_key_usage_logs, cleanup_old_daily_logs and reset_expired_quotas, each logged in usage_agg.maintenance_runs; a failing step does not stop the others';

CREATE OR REPLACE VIEW usage_agg.maintenance_health AS
SELECT s.step,
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
 ORDER BY s.ord;

-- The fold caches usage_agg.config per backend; changes invalidate the caches.
CREATE FUNCTION usage_agg._config_changed() RETURNS trigger
    LANGUAGE c
    SET search_path = pg_catalog, pg_temp
    AS 'MODULE_PATHNAME', 'config_changed_wrapper';
CREATE TRIGGER config_changed
    AFTER INSERT OR UPDATE ON usage_agg.config
    FOR EACH STATEMENT EXECUTE FUNCTION usage_agg._config_changed();

-- After restoring a pg_dump of a database using usage_agg: restoring the detail
-- fires the fold on top of the restored daily_logs, so every day that has
-- detail is recomputed from it (keeping application keys; pending calls of those
-- days are dropped, they are in the detail). Returns the rows rewritten.
CREATE FUNCTION usage_agg.post_restore()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tz text := usage_agg._timezone();
    v_from date;
    v_to date;
BEGIN
    SELECT (min(k.created_at) AT TIME ZONE v_tz)::date, (max(k.created_at) AT TIME ZONE v_tz)::date
      INTO v_from, v_to
      FROM usage_agg.key_usage_logs k;
    IF v_from IS NULL THEN
        RETURN 0;
    END IF;
    RETURN usage_agg.rebuild_daily_logs(v_from, v_to);
END;
$$;
COMMENT ON FUNCTION usage_agg.post_restore() IS
    'Run once after restoring a pg_dump: recomputes the aggregates of every day with detail (the restore folded the detail a second time)';

-- Moving in from a hand-written setup: a detail table and a daily JSONB table
-- kept by a PL/pgSQL trigger, usually in public.

CREATE FUNCTION usage_agg._require_columns(rel regclass, wanted text[], what text) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_missing text[];
BEGIN
    SELECT array_agg(w ORDER BY w) INTO v_missing
      FROM unnest(wanted) w
     WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = rel AND a.attname = w AND a.attnum > 0 AND NOT a.attisdropped);
    IF v_missing IS NOT NULL THEN
        RAISE EXCEPTION 'usage_agg: the % table % has no column %', what, rel, array_to_string(v_missing, ', ')
            USING ERRCODE = 'undefined_column',
                  HINT = format('The %s table needs the columns %s.', what, array_to_string(wanted, ', '));
    END IF;
END;
$$;

-- A backup copy of a table next to it (kept when it exists: reruns keep the
-- first backup).
CREATE FUNCTION usage_agg._backup_table(rel regclass) RETURNS regclass
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_schema name;
    v_name name;
    v_backup regclass;
BEGIN
    SELECT n.nspname, left(c.relname, 40) || '_backup_usage_agg'
      INTO v_schema, v_name
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel;
    v_backup := to_regclass(format('%I.%I', v_schema, v_name));
    IF v_backup IS NULL THEN
        EXECUTE format('CREATE TABLE %I.%I AS TABLE %s', v_schema, v_name, rel);
        v_backup := to_regclass(format('%I.%I', v_schema, v_name));
    END IF;
    RETURN v_backup;
END;
$$;

CREATE FUNCTION usage_agg.import_legacy(detail regclass, daily regclass)
RETURNS TABLE (detail_rows_copied bigint, detail_rows_already_there bigint,
               daily_rows_merged bigint, daily_rows_copied bigint,
               detail_backup regclass, daily_backup regclass)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_columns text;
    v_total bigint;
    v_copied bigint;
    v_tz text := usage_agg._timezone();
    v_first date;
    v_with_detail bigint := 0;
    v_n bigint;
    v_copied_days bigint := 0;
    v_bad bigint;
    v_detail_backup regclass;
    v_daily_backup regclass;
BEGIN
    IF detail IS NULL OR daily IS NULL THEN
        RAISE EXCEPTION 'usage_agg: import_legacy needs the detail and the daily table'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'For example: SELECT * FROM usage_agg.import_legacy(''public.key_usage_logs'', ''public.daily_logs'');';
    END IF;
    IF detail IN ('usage_agg.key_usage_logs'::regclass, 'usage_agg.daily_logs'::regclass)
       OR daily IN ('usage_agg.key_usage_logs'::regclass, 'usage_agg.daily_logs'::regclass) THEN
        RAISE EXCEPTION 'usage_agg: import_legacy imports from tables of your own, not from usage_agg''s'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM usage_agg._require_columns(detail, ARRAY['user_id', 'created_at'], 'detail');
    PERFORM usage_agg._require_columns(daily, ARRAY['user_id', 'date', 'log_data'], 'daily');

    -- Nothing of the old tables is dropped or changed: they are copied aside first.
    v_detail_backup := usage_agg._backup_table(detail);
    v_daily_backup := usage_agg._backup_table(daily);

    -- 1. The detail, every column the two tables share. The fold computes the
    --    aggregates from it; a row already imported (same id or request_id) is
    --    skipped, so a rerun counts nothing twice.
    SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO v_columns
      FROM pg_attribute a
     WHERE a.attrelid = 'usage_agg.key_usage_logs'::regclass AND a.attnum > 0 AND NOT a.attisdropped
       AND EXISTS (SELECT 1 FROM pg_attribute l
                    WHERE l.attrelid = detail AND l.attname = a.attname AND l.attnum > 0 AND NOT l.attisdropped);
    EXECUTE format('SELECT count(*) FROM %s', detail) INTO v_total;
    EXECUTE format('INSERT INTO usage_agg.key_usage_logs (%s) SELECT %s FROM %s ORDER BY created_at ON CONFLICT DO NOTHING',
                   v_columns, v_columns, detail);
    GET DIAGNOSTICS v_copied = ROW_COUNT;
    PERFORM usage_agg.apply_pending_deltas();

    -- 2. The daily rows. Days from the first day of the detail on keep the
    --    aggregates the fold computed from it and take only the application's
    --    keys from the old row; earlier days (their detail expired) are copied as
    --    they are, once.
    EXECUTE format('SELECT (min(created_at) AT TIME ZONE $1)::date FROM %s', detail)
       INTO v_first USING v_tz;
    EXECUTE format('SELECT count(*) FROM %s WHERE jsonb_typeof(log_data) IS DISTINCT FROM ''object''', daily) INTO v_bad;
    IF v_bad > 0 THEN
        RAISE EXCEPTION 'usage_agg: % rows of % have a log_data that is not a JSON object', v_bad, daily
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Fix or delete those rows, then run import_legacy again; nothing was imported.';
    END IF;
    IF v_first IS NOT NULL THEN
        EXECUTE format(
            'INSERT INTO usage_agg.daily_logs AS d (user_id, date, log_data, last_modified)
             SELECT l.user_id, l.date, usage_agg._replace_owned(l.log_data, usage_agg._empty_log_data()), now()
               FROM %s l WHERE l.date >= $1
             ON CONFLICT (user_id, date) DO UPDATE
                SET log_data = usage_agg._replace_owned(EXCLUDED.log_data, d.log_data)
              WHERE d.log_data IS DISTINCT FROM usage_agg._replace_owned(EXCLUDED.log_data, d.log_data)', daily)
        USING v_first;
        EXECUTE format('SELECT count(*) FROM %s l WHERE l.date >= $1', daily) INTO v_with_detail USING v_first;
    END IF;
    EXECUTE format(
        'INSERT INTO usage_agg.daily_logs (user_id, date, log_data, last_modified)
         SELECT l.user_id, l.date, l.log_data, now()
           FROM %s l WHERE $1::date IS NULL OR l.date < $1
         ON CONFLICT (user_id, date) DO NOTHING', daily)
    USING v_first;
    GET DIAGNOSTICS v_copied_days = ROW_COUNT;

    -- Days before the first day of the old detail have none any more: like days
    -- the retention cleanup expired, verify_daily_logs skips them and
    -- rebuild_daily_logs leaves them alone.
    IF v_first IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM usage_agg.key_usage_logs k WHERE k.created_at < usage_agg._day_start(v_first, v_tz)) THEN
        UPDATE usage_agg.retention_horizon SET detail_kept_from = greatest(detail_kept_from, v_first);
    END IF;

    RAISE NOTICE 'usage_agg.import_legacy: % of % detail rows copied, % daily rows merged with detail, % copied as they were; backups % and %',
        v_copied, v_total, v_with_detail, v_copied_days, v_detail_backup, v_daily_backup;
    RETURN QUERY SELECT v_copied, v_total - v_copied, v_with_detail, v_copied_days, v_detail_backup, v_daily_backup;
END;
$$;
COMMENT ON FUNCTION usage_agg.import_legacy(regclass, regclass) IS
    'Moves a hand-written setup in: copies its detail (folded once), merges its daily rows keeping application keys, backs both tables up; all or nothing, safe to rerun';
REVOKE EXECUTE ON FUNCTION usage_agg.import_legacy(regclass, regclass) FROM PUBLIC;

-- Least privilege.
--
-- An application role needs INSERT on key_usage_logs and EXECUTE on the quota
-- functions; it never writes aggregates or quotas itself. The functions that
-- write on its behalf therefore run as the extension's owner (SECURITY DEFINER);
-- each of them pins its search_path and qualifies every name, so the caller's
-- search_path cannot redirect them. Maintenance and administration functions
-- are not executable by PUBLIC. usage_agg.grant_app_role(role) and
-- usage_agg.grant_read_role(role) hand out exactly the rest.

ALTER FUNCTION usage_agg.fold_key_usage_logs() SECURITY DEFINER;
ALTER FUNCTION usage_agg.consume_quota(uuid, integer, text, text, integer) SECURITY DEFINER;
ALTER FUNCTION usage_agg.try_consume_quota(uuid, integer, text, text, integer) SECURITY DEFINER;
ALTER FUNCTION usage_agg.refund_quota(text) SECURITY DEFINER;
ALTER FUNCTION usage_agg.quota_status(uuid) SECURITY DEFINER;

REVOKE EXECUTE ON FUNCTION
    usage_agg.consume_quota(uuid, integer, text, text, integer),
    usage_agg.try_consume_quota(uuid, integer, text, text, integer),
    usage_agg.refund_quota(text),
    usage_agg.quota_status(uuid),
    usage_agg.set_membership(uuid, text),
    usage_agg.reset_expired_quotas(),
    usage_agg.cleanup_old_key_usage_logs(interval),
    usage_agg.cleanup_old_daily_logs(interval),
    usage_agg.run_maintenance(),
    usage_agg.schedule_maintenance(text),
    usage_agg.unschedule_maintenance(),
    usage_agg.rebuild_daily_logs(date, date),
    usage_agg.apply_pending_deltas(integer),
    usage_agg.post_restore()
FROM PUBLIC;

-- Views read with the privileges (and row-level security policies) of whoever
-- queries them, not of their owner.
ALTER VIEW usage_agg.daily_usage SET (security_invoker = true);
ALTER VIEW usage_agg.monthly_usage SET (security_invoker = true);
ALTER VIEW usage_agg.daily_usage_by_model SET (security_invoker = true);
ALTER VIEW usage_agg.daily_usage_by_key SET (security_invoker = true);
ALTER VIEW usage_agg.monthly_usage_by_model SET (security_invoker = true);
ALTER VIEW usage_agg.monthly_usage_by_key SET (security_invoker = true);
ALTER VIEW usage_agg.maintenance_health SET (security_invoker = true);

CREATE FUNCTION usage_agg._check_role(role_name name) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF role_name IS NULL THEN
        RAISE EXCEPTION 'usage_agg: role_name must not be NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = role_name) THEN
        RAISE EXCEPTION 'usage_agg: role "%" does not exist', role_name
            USING ERRCODE = 'undefined_object',
                  HINT = format('Create it first, for example: CREATE ROLE %I LOGIN PASSWORD ''...'';', role_name);
    END IF;
END;
$$;

-- Read access: the aggregates, the detail, quotas, plans, settings, the BI views,
-- the read functions and quota_status.
CREATE FUNCTION usage_agg.grant_read_role(role_name name) RETURNS void
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
                           usage_agg.daily_usage, usage_agg.monthly_usage,
                           usage_agg.daily_usage_by_model, usage_agg.daily_usage_by_key,
                           usage_agg.monthly_usage_by_model, usage_agg.monthly_usage_by_key
                    TO %I', role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION usage_agg.quota_status(uuid) TO %I', role_name);
END;
$$;
COMMENT ON FUNCTION usage_agg.grant_read_role(name) IS
    'Lets a role read usage_agg tables and views and call the read functions and quota_status';

-- An application: read access, plus inserting calls and consuming quota.
CREATE FUNCTION usage_agg.grant_app_role(role_name name) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM usage_agg.grant_read_role(role_name);
    EXECUTE format('GRANT INSERT ON usage_agg.key_usage_logs TO %I', role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION usage_agg.consume_quota(uuid, integer, text, text, integer),
                           usage_agg.try_consume_quota(uuid, integer, text, text, integer),
                           usage_agg.refund_quota(text)
                    TO %I', role_name);
END;
$$;
COMMENT ON FUNCTION usage_agg.grant_app_role(name) IS
    'Lets an application role insert into key_usage_logs, consume and refund quota, and read; it cannot write aggregates, quotas or config, nor run maintenance';

REVOKE EXECUTE ON FUNCTION usage_agg.grant_read_role(name), usage_agg.grant_app_role(name) FROM PUBLIC;
