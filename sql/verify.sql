-- Verification and rebuild of daily_logs from the detail.

-- The owned fields of every (user, day) in [p_from, p_to], built by GROUP BY from
-- two sources: 'detail' (key_usage_logs, what daily_logs must hold) and
-- 'pending' (pending_deltas of deferred mode, not yet folded into daily_logs).
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
               k.tokens_used::bigint AS tokens, k.cost_estimate AS cost, k.created_at AS at,
               k.input_tokens::bigint AS i, k.output_tokens::bigint AS o, k.cache_read_tokens::bigint AS cr,
               k.cache_write_tokens::bigint AS cw, CASE WHEN k.cost_estimate IS NULL THEN 1 ELSE 0 END AS u
          FROM usage_agg.key_usage_logs k, tz
         WHERE k.created_at >= usage_agg._day_start(p_from, tz.name)
           AND k.created_at <  usage_agg._day_start(p_to + 1, tz.name)
        UNION ALL
        SELECT 'pending', p.user_id, p.day, p.model_used, p.shared_key_id, p.calls, p.successful,
               p.tokens, p.cost, p.last_at,
               p.input_tokens, p.output_tokens, p.cache_read_tokens, p.cache_write_tokens, p.unpriced
          FROM usage_agg.pending_deltas p
         WHERE p.day BETWEEN p_from AND p_to
    ), per_day AS (
        SELECT c.source, c.user_id, c.day,
               sum(c.n) AS calls,
               sum(c.ok) AS successful,
               sum(c.n - c.ok) AS failed,
               COALESCE(sum(c.tokens), 0) AS tokens,
               COALESCE(sum(c.cost), 0) AS cost,
               max(c.at) AS last_at,
               usage_agg._kinds_json(sum(c.i), sum(c.o), sum(c.cr), sum(c.cw), sum(c.u)) AS kinds
          FROM calls c GROUP BY c.source, c.user_id, c.day
    ), per_model AS (
        SELECT m.source, m.user_id, m.day,
               jsonb_object_agg(m.model_used, jsonb_build_object(
                   'calls', m.calls, 'tokens', m.tokens, 'cost', m.cost) || m.kinds) AS by_model
          FROM (SELECT c.source, c.user_id, c.day, c.model_used, sum(c.n) AS calls,
                       COALESCE(sum(c.tokens), 0) AS tokens,
                       COALESCE(sum(c.cost), 0) AS cost,
                       usage_agg._kinds_json(sum(c.i), sum(c.o), sum(c.cr), sum(c.cw), sum(c.u)) AS kinds
                  FROM calls c WHERE c.model_used IS NOT NULL
                 GROUP BY c.source, c.user_id, c.day, c.model_used) m
         GROUP BY m.source, m.user_id, m.day
    ), per_key AS (
        SELECT k.source, k.user_id, k.day,
               jsonb_agg(k.key ORDER BY k.key) AS keys_used,
               jsonb_object_agg(k.key, jsonb_build_object(
                   'calls', k.calls, 'tokens', k.tokens, 'cost', k.cost) || k.kinds) AS by_key
          FROM (SELECT c.source, c.user_id, c.day, c.shared_key_id::text AS key, sum(c.n) AS calls,
                       COALESCE(sum(c.tokens), 0) AS tokens,
                       COALESCE(sum(c.cost), 0) AS cost,
                       usage_agg._kinds_json(sum(c.i), sum(c.o), sum(c.cr), sum(c.cw), sum(c.u)) AS kinds
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
                   'by_key', COALESCE(k.by_key, '{}'::jsonb)) || d.kinds,
               'last_api_call_at', usage_agg._iso_utc(d.last_at))
      FROM per_day d
      LEFT JOIN per_model m ON m.source = d.source AND m.user_id = d.user_id AND m.day = d.day
      LEFT JOIN per_key k ON k.source = d.source AND k.user_id = d.user_id AND k.day = d.day
$$;

-- The owned fields of a day without calls.
CREATE FUNCTION usage_agg._empty_log_data() RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN '{"api_call_count": 0,
         "shared_service_usage": {"total_calls": 0, "successful_calls": 0, "failed_calls": 0,
                                  "tokens_used": 0, "estimated_cost": 0, "keys_used": [],
                                  "by_model": {}, "by_key": {}},
         "last_api_call_at": null}'::jsonb;

-- Replaces the owned fields of a stored document, keeping every application key
-- (top level and inside shared_service_usage).
CREATE FUNCTION usage_agg._replace_owned(stored jsonb, owned jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN CASE WHEN jsonb_typeof(stored) = 'object' THEN stored ELSE '{}'::jsonb END
       || jsonb_build_object(
            'api_call_count', owned->'api_call_count',
            'shared_service_usage',
                CASE WHEN jsonb_typeof(stored->'shared_service_usage') = 'object'
                     THEN (stored->'shared_service_usage') - usage_agg._owned_service_fields()
                     ELSE '{}'::jsonb END
                || (owned->'shared_service_usage'),
            'last_api_call_at', owned->'last_api_call_at');

-- A jsonb array sorted, for comparing keys_used as a set; other values unchanged.
CREATE FUNCTION usage_agg._sorted_array(v jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN CASE WHEN jsonb_typeof(v) = 'array'
            THEN COALESCE((SELECT jsonb_agg(e ORDER BY e) FROM jsonb_array_elements(v) e), '[]'::jsonb)
            ELSE v END;

CREATE FUNCTION usage_agg._check_day_range(p_from date, p_to date) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_from IS NULL OR p_to IS NULL THEN
        RAISE EXCEPTION 'usage_agg: the day range must not be NULL'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass two dates, for example (''2026-01-01'', ''2026-01-31'').';
    END IF;
    IF p_from > p_to THEN
        RAISE EXCEPTION 'usage_agg: the day range starts after it ends'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('from = %s, to = %s', p_from, p_to),
                  HINT = 'Pass the earlier date first.';
    END IF;
    IF p_from = '-infinity'::date OR p_to = 'infinity'::date THEN
        RAISE EXCEPTION 'usage_agg: the day range must be finite'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END;
$$;

-- The first day of [p_from, p_to] whose detail still exists, after checking
-- the range: days before the retention horizon can be neither verified nor
-- rebuilt from the detail. Later than p_to: none of the range can.
CREATE FUNCTION usage_agg._detail_from(p_from date, p_to date) RETURNS date
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM usage_agg._check_day_range(p_from, p_to);
    RETURN greatest(p_from, (SELECT h.detail_kept_from FROM usage_agg.retention_horizon h));
END;
$$;

-- Every (user, date, field) in [p_from, p_to] where daily_logs and a GROUP BY over
-- key_usage_logs disagree. No rows: consistent.
CREATE FUNCTION usage_agg.verify_daily_logs(p_from date, p_to date)
RETURNS TABLE (user_id uuid, date date, field text, aggregate_value jsonb, detail_value jsonb)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_from date;
BEGIN
    v_from := usage_agg._detail_from(p_from, p_to);
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
               s.log_data AS a,
               COALESCE(e.log_data, usage_agg._empty_log_data()) AS x
          FROM stored s FULL JOIN expected e ON e.user_id = s.user_id AND e.date = s.date
    )
    SELECT p.user_id, p.date, f.field, f.a, f.x
      FROM pairs p
     -- Every owned field (keys_used compared as a set).
     CROSS JOIN LATERAL (
        SELECT o.field,
               usage_agg._sorted_array(p.a #> pg_catalog.string_to_array(o.field, '.')) AS a,
               usage_agg._sorted_array(p.x #> pg_catalog.string_to_array(o.field, '.')) AS x
          FROM unnest(ARRAY['api_call_count', 'last_api_call_at']
                      || ARRAY(SELECT 'shared_service_usage.' || s
                                 FROM unnest(usage_agg._owned_service_fields()) s)) AS o(field)
     ) AS f
     WHERE f.a IS DISTINCT FROM f.x
     ORDER BY p.date, p.user_id, f.field;
END;
$$;

COMMENT ON FUNCTION usage_agg.verify_daily_logs(date, date) IS
    'Lists every (user, date, field) where daily_logs (plus pending deltas) and a GROUP BY over key_usage_logs disagree; empty means consistent. Days whose detail has expired are skipped.';

-- Recomputes the owned fields of daily_logs in [p_from, p_to] from the detail,
-- day by day, keeping application keys. Returns the number of rows written.
CREATE FUNCTION usage_agg.rebuild_daily_logs(p_from date, p_to date)
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
    -- Days whose detail has expired keep their aggregates: rebuilding them from
    -- no detail would zero them.
    v_day := usage_agg._detail_from(p_from, p_to);
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
        (SELECT min(q.day) FROM usage_agg.pending_deltas q WHERE q.day BETWEEN p_from AND p_to),
        (SELECT min(q.date) FROM usage_agg.key_daily_logs q WHERE q.date BETWEEN p_from AND p_to),
        (SELECT (min(q.hour) AT TIME ZONE v_tz)::date FROM usage_agg.hourly_logs q
          WHERE q.hour >= usage_agg._day_start(p_from, v_tz) AND q.hour < usage_agg._day_start(p_to + 1, v_tz)));
    v_last := greatest(
        (SELECT (max(k.created_at) AT TIME ZONE v_tz)::date FROM usage_agg.key_usage_logs k
          WHERE k.created_at >= usage_agg._day_start(p_from, v_tz) AND k.created_at < usage_agg._day_start(p_to + 1, v_tz)),
        (SELECT max(d.date) FROM usage_agg.daily_logs d WHERE d.date BETWEEN p_from AND p_to),
        (SELECT max(q.day) FROM usage_agg.pending_deltas q WHERE q.day BETWEEN p_from AND p_to),
        (SELECT max(q.date) FROM usage_agg.key_daily_logs q WHERE q.date BETWEEN p_from AND p_to),
        (SELECT (max(q.hour) AT TIME ZONE v_tz)::date FROM usage_agg.hourly_logs q
          WHERE q.hour >= usage_agg._day_start(p_from, v_tz) AND q.hour < usage_agg._day_start(p_to + 1, v_tz)));
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
        -- The day's per-key and service rows too (not counted: the result is
        -- daily_logs rows, as before 0.4.0).
        PERFORM usage_agg._rebuild_key_day(v_day);
        -- And its user and key hours.
        PERFORM usage_agg._rebuild_hours(v_day);
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

COMMENT ON FUNCTION usage_agg.rebuild_daily_logs(date, date) IS
    'Recomputes the usage_agg-owned fields of daily_logs, the per-key and service rows and the user and key hours, in a day range from key_usage_logs, keeping application keys; returns the daily_logs rows written';

-- After restoring a pg_dump of a database using usage_agg: restoring the detail
-- fires the fold on top of the restored daily_logs, so every day that has
-- detail is recomputed from it (keeping application keys; pending calls of those
-- days are dropped, they are in the detail), and the restore is marked healed.
-- Returns the rows rewritten.
CREATE FUNCTION usage_agg.post_restore()
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
