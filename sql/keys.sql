-- Per-key and service aggregates: what each shared key did per business day and
-- month across users, and the same for the whole service.
--
-- Only applies (the background applier, apply_pending_deltas()) write these
-- rows: every call of a key touches its row, so a statement that folds its own
-- calls (immediate mode, corrections) appends its deltas to pending_key_deltas
-- instead, and never waits for another session. Every reader below adds what is
-- pending, so it is exact at any moment.

-- ---------------------------------------------------------------------------
-- Tables.
-- ---------------------------------------------------------------------------
CREATE TABLE usage_agg.key_daily_logs (
    shared_key_id uuid        NOT NULL,
    date          date        NOT NULL,
    log_data      jsonb       NOT NULL,
    last_modified timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT key_daily_logs_pkey PRIMARY KEY (shared_key_id, date)
) WITH (fillfactor = 70);  -- room for HOT updates: every apply rewrites the row
CREATE INDEX key_daily_logs_date ON usage_agg.key_daily_logs (date);
COMMENT ON TABLE usage_agg.key_daily_logs IS
    'Per shared key and business day, across users: calls, failures, tokens, exact cost, by_model, users, last call and failure. Written by applies only; read through key_daily_usage (which adds pending calls).';

CREATE TABLE usage_agg.key_monthly_logs (
    shared_key_id uuid        NOT NULL,
    month         date        NOT NULL,
    log_data      jsonb       NOT NULL,
    last_modified timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT key_monthly_logs_month_is_first_day CHECK (extract(day FROM month) = 1),
    CONSTRAINT key_monthly_logs_pkey PRIMARY KEY (shared_key_id, month)
);
COMMENT ON TABLE usage_agg.key_monthly_logs IS
    'Per shared key and calendar month: key_daily_logs rows older than daily_retention, rolled up (no distinct users).';

CREATE TABLE usage_agg.service_daily_logs (
    date          date        NOT NULL,
    log_data      jsonb       NOT NULL,
    last_modified timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT service_daily_logs_pkey PRIMARY KEY (date)
) WITH (fillfactor = 70);
COMMENT ON TABLE usage_agg.service_daily_logs IS
    'Every call of a business day (with or without a key): the layout of key_daily_logs; users are the day''s active users.';

CREATE TABLE usage_agg.service_monthly_logs (
    month         date        NOT NULL,
    log_data      jsonb       NOT NULL,
    last_modified timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT service_monthly_logs_month_is_first_day CHECK (extract(day FROM month) = 1),
    CONSTRAINT service_monthly_logs_pkey PRIMARY KEY (month)
);
COMMENT ON TABLE usage_agg.service_monthly_logs IS
    'Every call of a calendar month: service_daily_logs rows older than daily_retention, rolled up.';

-- Deltas of statements that folded their own calls into daily_logs, for the
-- next apply: one row per (key, day) a statement touched; shared_key_id NULL is
-- the service row. id orders them as they were appended.
CREATE TABLE usage_agg.pending_key_deltas (
    id                      bigint      GENERATED ALWAYS AS IDENTITY,
    shared_key_id           uuid,
    day                     date        NOT NULL,
    delta                   jsonb       NOT NULL,
    removed_last_at         timestamptz,
    removed_last_failure_at timestamptz,
    appended_at             timestamptz NOT NULL DEFAULT now()
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
        autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 10000);
CREATE INDEX pending_key_deltas_key_day ON usage_agg.pending_key_deltas (shared_key_id, day);
COMMENT ON TABLE usage_agg.pending_key_deltas IS
    'Per-key (and, with shared_key_id NULL, service) deltas of statements that folded their own calls; folded into key_daily_logs and service_daily_logs by the next apply; readers include them.';

SELECT pg_catalog.pg_extension_config_dump('usage_agg.key_daily_logs', '');
SELECT pg_catalog.pg_extension_config_dump('usage_agg.key_monthly_logs', '');
SELECT pg_catalog.pg_extension_config_dump('usage_agg.service_daily_logs', '');
SELECT pg_catalog.pg_extension_config_dump('usage_agg.service_monthly_logs', '');
SELECT pg_catalog.pg_extension_config_dump('usage_agg.pending_key_deltas', '');
-- Its ids order the deltas: a restore continues after the restored ones.
SELECT pg_catalog.pg_extension_config_dump('usage_agg.pending_key_deltas_id_seq', '');

-- Days roll up into months without users (they do not add up over days).
CREATE FUNCTION usage_agg._rollup_month_add(month jsonb, day jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN usage_agg._rollup_add(month, day, false);

CREATE AGGREGATE usage_agg._rollup_month(jsonb) (
    SFUNC = usage_agg._rollup_month_add,
    STYPE = jsonb,
    INITCOND = '{}'
);

-- The newest call (p_failed: failed call) of a key's business day in the
-- detail, or of the whole service's (p_key NULL): where a correction removed the
-- stored newest one. A string body, so that views calling it do not depend on
-- key_usage_logs (the detail table can be swapped for a partitioned one).
CREATE FUNCTION usage_agg._detail_newest(p_key uuid, p_day date, p_failed boolean)
RETURNS timestamptz
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT x.created_at FROM usage_agg.key_usage_logs x
     WHERE x.created_at >= usage_agg._day_start(p_day, usage_agg._timezone())
       AND x.created_at <  usage_agg._day_start(p_day + 1, usage_agg._timezone())
       AND (p_key IS NULL OR x.shared_key_id = p_key)
       AND (NOT p_failed OR NOT x.success)
     ORDER BY x.created_at DESC LIMIT 1
$$;

-- ---------------------------------------------------------------------------
-- Flat views for BI tools, exact: the stored rows plus every pending call.
-- ---------------------------------------------------------------------------

-- Per key and day. The three sources: stored rows, deltas of statements that
-- folded their own calls, and calls waiting in pending_deltas (whose users are
-- counted when their day row does not list the key yet). Where a pending
-- correction removed the newest call, the newest is read from the detail.
CREATE VIEW usage_agg.key_daily_usage AS
WITH parts AS (
    SELECT k.shared_key_id, k.date,
           (k.log_data->>'total_calls')::bigint AS calls,
           (k.log_data->>'successful_calls')::bigint AS successful,
           (k.log_data->>'failed_calls')::bigint AS failed,
           (k.log_data->>'tokens_used')::bigint AS tokens,
           (k.log_data->>'estimated_cost')::numeric AS cost,
           (k.log_data->>'users')::bigint AS users,
           (k.log_data->>'last_call_at')::timestamptz AS last_at,
           (k.log_data->>'last_failure_at')::timestamptz AS last_failure_at,
           NULL::timestamptz AS removed_last_at,
           NULL::timestamptz AS removed_last_failure_at,
           kk.input_tokens, kk.output_tokens, kk.cache_read_tokens, kk.cache_write_tokens, kk.unpriced_calls
      FROM usage_agg.key_daily_logs k CROSS JOIN LATERAL usage_agg._kinds(k.log_data) kk
    UNION ALL
    SELECT q.shared_key_id, q.day,
           (q.delta->>'total_calls')::bigint, (q.delta->>'successful_calls')::bigint,
           (q.delta->>'failed_calls')::bigint, (q.delta->>'tokens_used')::bigint,
           (q.delta->>'estimated_cost')::numeric, (q.delta->>'users')::bigint,
           (q.delta->>'last_call_at')::timestamptz, (q.delta->>'last_failure_at')::timestamptz,
           q.removed_last_at, q.removed_last_failure_at,
           kk.input_tokens, kk.output_tokens, kk.cache_read_tokens, kk.cache_write_tokens, kk.unpriced_calls
      FROM usage_agg.pending_key_deltas q CROSS JOIN LATERAL usage_agg._kinds(q.delta) kk
     WHERE q.shared_key_id IS NOT NULL
    UNION ALL
    -- day + 0: a filter on the day must not walk the (user_id, day) index,
    -- which after a burst of calls holds many dead entries; the table itself is
    -- small once applied (vacuum truncates it).
    SELECT p.shared_key_id, p.day + 0, sum(p.calls), sum(p.successful), sum(p.calls - p.successful),
           sum(p.tokens), sum(p.cost),
           count(DISTINCT p.user_id) FILTER (WHERE NOT EXISTS (
               SELECT 1 FROM usage_agg.daily_logs d
                WHERE d.user_id = p.user_id AND d.date = p.day
                  AND d.log_data->'shared_service_usage'->'by_key' ? p.shared_key_id::text)),
           max(p.last_at), max(p.last_failure_at), NULL, NULL,
           sum(p.input_tokens), sum(p.output_tokens), sum(p.cache_read_tokens), sum(p.cache_write_tokens),
           sum(p.unpriced)
      FROM usage_agg.pending_deltas p
     WHERE p.shared_key_id IS NOT NULL
     GROUP BY p.shared_key_id, p.day + 0
), summed AS (
    SELECT s.shared_key_id, s.date,
           sum(s.calls)::bigint AS calls, sum(s.successful)::bigint AS successful,
           sum(s.failed)::bigint AS failed, sum(s.tokens)::bigint AS tokens,
           sum(s.cost) AS cost, sum(s.users)::bigint AS users,
           max(s.last_at) AS last_at, max(s.last_failure_at) AS last_failure_at,
           max(s.removed_last_at) AS removed_last_at,
           max(s.removed_last_failure_at) AS removed_last_failure_at,
           COALESCE(sum(s.input_tokens), 0)::bigint AS input_tokens,
           COALESCE(sum(s.output_tokens), 0)::bigint AS output_tokens,
           COALESCE(sum(s.cache_read_tokens), 0)::bigint AS cache_read_tokens,
           COALESCE(sum(s.cache_write_tokens), 0)::bigint AS cache_write_tokens,
           COALESCE(sum(s.unpriced_calls), 0)::bigint AS unpriced_calls
      FROM parts s
     GROUP BY s.shared_key_id, s.date
)
SELECT s.shared_key_id, s.date,
       s.calls, s.successful AS successful_calls, s.failed AS failed_calls,
       s.tokens AS tokens_used, s.cost AS estimated_cost, s.users,
       CASE WHEN s.removed_last_at IS NOT NULL AND NOT COALESCE(s.last_at > s.removed_last_at, false)
            THEN usage_agg._detail_newest(s.shared_key_id, s.date, false)
            ELSE s.last_at END AS last_call_at,
       CASE WHEN s.removed_last_failure_at IS NOT NULL AND NOT COALESCE(s.last_failure_at > s.removed_last_failure_at, false)
            THEN usage_agg._detail_newest(s.shared_key_id, s.date, true)
            ELSE s.last_failure_at END AS last_failure_at,
       s.input_tokens, s.output_tokens, s.cache_read_tokens, s.cache_write_tokens, s.unpriced_calls
  FROM summed s;
COMMENT ON VIEW usage_agg.key_daily_usage IS
    'Usage per shared key and business day across users (exact: pending calls included); users = distinct users of the key that day';

-- The whole service per day: every call, with or without a key.
CREATE VIEW usage_agg.service_daily_usage AS
WITH parts AS (
    SELECT s.date,
           (s.log_data->>'total_calls')::bigint AS calls,
           (s.log_data->>'successful_calls')::bigint AS successful,
           (s.log_data->>'failed_calls')::bigint AS failed,
           (s.log_data->>'tokens_used')::bigint AS tokens,
           (s.log_data->>'estimated_cost')::numeric AS cost,
           (s.log_data->>'users')::bigint AS users,
           (s.log_data->>'last_call_at')::timestamptz AS last_at,
           (s.log_data->>'last_failure_at')::timestamptz AS last_failure_at,
           NULL::timestamptz AS removed_last_at,
           NULL::timestamptz AS removed_last_failure_at,
           kk.input_tokens, kk.output_tokens, kk.cache_read_tokens, kk.cache_write_tokens, kk.unpriced_calls
      FROM usage_agg.service_daily_logs s CROSS JOIN LATERAL usage_agg._kinds(s.log_data) kk
    UNION ALL
    SELECT q.day,
           (q.delta->>'total_calls')::bigint, (q.delta->>'successful_calls')::bigint,
           (q.delta->>'failed_calls')::bigint, (q.delta->>'tokens_used')::bigint,
           (q.delta->>'estimated_cost')::numeric, (q.delta->>'users')::bigint,
           (q.delta->>'last_call_at')::timestamptz, (q.delta->>'last_failure_at')::timestamptz,
           q.removed_last_at, q.removed_last_failure_at,
           kk.input_tokens, kk.output_tokens, kk.cache_read_tokens, kk.cache_write_tokens, kk.unpriced_calls
      FROM usage_agg.pending_key_deltas q CROSS JOIN LATERAL usage_agg._kinds(q.delta) kk
     WHERE q.shared_key_id IS NULL
    UNION ALL
    -- day + 0: as in key_daily_usage.
    SELECT p.day + 0, sum(p.calls), sum(p.successful), sum(p.calls - p.successful),
           sum(p.tokens), sum(p.cost),
           count(DISTINCT p.user_id) FILTER (WHERE NOT EXISTS (
               SELECT 1 FROM usage_agg.daily_logs d
                WHERE d.user_id = p.user_id AND d.date = p.day
                  AND d.log_data->'api_call_count' > '0'::jsonb)),
           max(p.last_at), max(p.last_failure_at), NULL, NULL,
           sum(p.input_tokens), sum(p.output_tokens), sum(p.cache_read_tokens), sum(p.cache_write_tokens),
           sum(p.unpriced)
      FROM usage_agg.pending_deltas p
     GROUP BY p.day + 0
), summed AS (
    SELECT s.date,
           sum(s.calls)::bigint AS calls, sum(s.successful)::bigint AS successful,
           sum(s.failed)::bigint AS failed, sum(s.tokens)::bigint AS tokens,
           sum(s.cost) AS cost, sum(s.users)::bigint AS users,
           max(s.last_at) AS last_at, max(s.last_failure_at) AS last_failure_at,
           max(s.removed_last_at) AS removed_last_at,
           max(s.removed_last_failure_at) AS removed_last_failure_at,
           COALESCE(sum(s.input_tokens), 0)::bigint AS input_tokens,
           COALESCE(sum(s.output_tokens), 0)::bigint AS output_tokens,
           COALESCE(sum(s.cache_read_tokens), 0)::bigint AS cache_read_tokens,
           COALESCE(sum(s.cache_write_tokens), 0)::bigint AS cache_write_tokens,
           COALESCE(sum(s.unpriced_calls), 0)::bigint AS unpriced_calls
      FROM parts s
     GROUP BY s.date
)
SELECT s.date,
       s.calls, s.successful AS successful_calls, s.failed AS failed_calls,
       s.tokens AS tokens_used, s.cost AS estimated_cost, s.users AS active_users,
       CASE WHEN s.removed_last_at IS NOT NULL AND NOT COALESCE(s.last_at > s.removed_last_at, false)
            THEN usage_agg._detail_newest(NULL, s.date, false)
            ELSE s.last_at END AS last_call_at,
       CASE WHEN s.removed_last_failure_at IS NOT NULL AND NOT COALESCE(s.last_failure_at > s.removed_last_failure_at, false)
            THEN usage_agg._detail_newest(NULL, s.date, true)
            ELSE s.last_failure_at END AS last_failure_at,
       s.input_tokens, s.output_tokens, s.cache_read_tokens, s.cache_write_tokens, s.unpriced_calls
  FROM summed s;
COMMENT ON VIEW usage_agg.service_daily_usage IS
    'Usage of the whole service per business day (every call, with or without a key; exact: pending calls included); active_users = distinct users with calls that day';

-- Per key, day and model.
CREATE VIEW usage_agg.key_daily_usage_by_model AS
SELECT u.shared_key_id, u.date, u.model,
       sum(u.calls)::bigint AS calls, sum(u.failed)::bigint AS failed_calls,
       sum(u.tokens)::bigint AS tokens_used, sum(u.cost) AS estimated_cost,
       sum(u.i)::bigint AS input_tokens, sum(u.o)::bigint AS output_tokens,
       sum(u.cr)::bigint AS cache_read_tokens, sum(u.cw)::bigint AS cache_write_tokens,
       sum(u.u)::bigint AS unpriced_calls
  FROM (SELECT k.shared_key_id, k.date, c.key AS model,
               (c.value->>'calls')::bigint AS calls, (c.value->>'failed')::bigint AS failed,
               (c.value->>'tokens')::bigint AS tokens, (c.value->>'cost')::numeric AS cost,
               kk.input_tokens AS i, kk.output_tokens AS o, kk.cache_read_tokens AS cr,
               kk.cache_write_tokens AS cw, kk.unpriced_calls AS u
          FROM usage_agg.key_daily_logs k CROSS JOIN LATERAL jsonb_each(k.log_data->'by_model') c
         CROSS JOIN LATERAL usage_agg._kinds(c.value) kk
        UNION ALL
        SELECT q.shared_key_id, q.day, c.key,
               (c.value->>'calls')::bigint, (c.value->>'failed')::bigint,
               (c.value->>'tokens')::bigint, (c.value->>'cost')::numeric,
               kk.input_tokens, kk.output_tokens, kk.cache_read_tokens, kk.cache_write_tokens, kk.unpriced_calls
          FROM usage_agg.pending_key_deltas q CROSS JOIN LATERAL jsonb_each(q.delta->'by_model') c
         CROSS JOIN LATERAL usage_agg._kinds(c.value) kk
         WHERE q.shared_key_id IS NOT NULL
        UNION ALL
        SELECT p.shared_key_id, p.day + 0, p.model_used, p.calls, p.calls - p.successful, p.tokens, p.cost,
               COALESCE(p.input_tokens, 0), COALESCE(p.output_tokens, 0), COALESCE(p.cache_read_tokens, 0),
               COALESCE(p.cache_write_tokens, 0), COALESCE(p.unpriced, 0)
          FROM usage_agg.pending_deltas p
         WHERE p.shared_key_id IS NOT NULL AND p.model_used IS NOT NULL) u
 GROUP BY u.shared_key_id, u.date, u.model
HAVING sum(u.calls) <> 0 OR sum(u.failed) <> 0 OR sum(u.tokens) <> 0 OR sum(u.cost) <> 0
    OR sum(u.i) <> 0 OR sum(u.o) <> 0 OR sum(u.cr) <> 0 OR sum(u.cw) <> 0 OR sum(u.u) <> 0;
COMMENT ON VIEW usage_agg.key_daily_usage_by_model IS
    'Usage per shared key, business day and model (exact: pending calls included)';

-- Per key and month: rolled-up months plus the days not rolled up yet.
CREATE VIEW usage_agg.key_monthly_usage AS
SELECT u.shared_key_id, u.month,
       sum(u.calls)::bigint AS calls, sum(u.successful_calls)::bigint AS successful_calls,
       sum(u.failed_calls)::bigint AS failed_calls, sum(u.tokens_used)::bigint AS tokens_used,
       sum(u.estimated_cost) AS estimated_cost,
       max(u.last_call_at) AS last_call_at, max(u.last_failure_at) AS last_failure_at,
       sum(u.input_tokens)::bigint AS input_tokens, sum(u.output_tokens)::bigint AS output_tokens,
       sum(u.cache_read_tokens)::bigint AS cache_read_tokens,
       sum(u.cache_write_tokens)::bigint AS cache_write_tokens, sum(u.unpriced_calls)::bigint AS unpriced_calls
  FROM (SELECT m.shared_key_id, m.month,
               (m.log_data->>'total_calls')::bigint AS calls,
               (m.log_data->>'successful_calls')::bigint AS successful_calls,
               (m.log_data->>'failed_calls')::bigint AS failed_calls,
               (m.log_data->>'tokens_used')::bigint AS tokens_used,
               (m.log_data->>'estimated_cost')::numeric AS estimated_cost,
               (m.log_data->>'last_call_at')::timestamptz AS last_call_at,
               (m.log_data->>'last_failure_at')::timestamptz AS last_failure_at,
               kk.input_tokens, kk.output_tokens, kk.cache_read_tokens, kk.cache_write_tokens, kk.unpriced_calls
          FROM usage_agg.key_monthly_logs m CROSS JOIN LATERAL usage_agg._kinds(m.log_data) kk
        UNION ALL
        SELECT d.shared_key_id, date_trunc('month', d.date::timestamp)::date,
               d.calls, d.successful_calls, d.failed_calls, d.tokens_used, d.estimated_cost,
               d.last_call_at, d.last_failure_at,
               d.input_tokens, d.output_tokens, d.cache_read_tokens, d.cache_write_tokens, d.unpriced_calls
          FROM usage_agg.key_daily_usage d) u
 GROUP BY u.shared_key_id, u.month;
COMMENT ON VIEW usage_agg.key_monthly_usage IS
    'Usage per shared key and calendar month (business time zone): key_monthly_logs plus the days not rolled up yet; no distinct users';

CREATE VIEW usage_agg.service_monthly_usage AS
SELECT u.month,
       sum(u.calls)::bigint AS calls, sum(u.successful_calls)::bigint AS successful_calls,
       sum(u.failed_calls)::bigint AS failed_calls, sum(u.tokens_used)::bigint AS tokens_used,
       sum(u.estimated_cost) AS estimated_cost,
       max(u.last_call_at) AS last_call_at, max(u.last_failure_at) AS last_failure_at,
       sum(u.input_tokens)::bigint AS input_tokens, sum(u.output_tokens)::bigint AS output_tokens,
       sum(u.cache_read_tokens)::bigint AS cache_read_tokens,
       sum(u.cache_write_tokens)::bigint AS cache_write_tokens, sum(u.unpriced_calls)::bigint AS unpriced_calls
  FROM (SELECT m.month,
               (m.log_data->>'total_calls')::bigint AS calls,
               (m.log_data->>'successful_calls')::bigint AS successful_calls,
               (m.log_data->>'failed_calls')::bigint AS failed_calls,
               (m.log_data->>'tokens_used')::bigint AS tokens_used,
               (m.log_data->>'estimated_cost')::numeric AS estimated_cost,
               (m.log_data->>'last_call_at')::timestamptz AS last_call_at,
               (m.log_data->>'last_failure_at')::timestamptz AS last_failure_at,
               kk.input_tokens, kk.output_tokens, kk.cache_read_tokens, kk.cache_write_tokens, kk.unpriced_calls
          FROM usage_agg.service_monthly_logs m CROSS JOIN LATERAL usage_agg._kinds(m.log_data) kk
        UNION ALL
        SELECT date_trunc('month', d.date::timestamp)::date,
               d.calls, d.successful_calls, d.failed_calls, d.tokens_used, d.estimated_cost,
               d.last_call_at, d.last_failure_at,
               d.input_tokens, d.output_tokens, d.cache_read_tokens, d.cache_write_tokens, d.unpriced_calls
          FROM usage_agg.service_daily_usage d) u
 GROUP BY u.month;
COMMENT ON VIEW usage_agg.service_monthly_usage IS
    'Usage of the whole service per calendar month: service_monthly_logs plus the days not rolled up yet';

-- Key health for an admin page or a dashboard panel: one row per key ever
-- seen, today and this month in the business time zone.
CREATE VIEW usage_agg.key_health AS
WITH today AS MATERIALIZED (  -- once, not per row
    SELECT t.day, date_trunc('month', t.day::timestamp)::date AS month
      FROM (SELECT (now() AT TIME ZONE usage_agg._timezone())::date AS day) t
), rows AS (
    -- One pass: every day not rolled up (pending included), and the months.
    SELECT d.shared_key_id, d.date, d.calls, d.failed_calls, d.users, d.last_call_at, d.last_failure_at
      FROM usage_agg.key_daily_usage d
    UNION ALL
    SELECT m.shared_key_id, m.month, (m.log_data->>'total_calls')::bigint, (m.log_data->>'failed_calls')::bigint,
           NULL, (m.log_data->>'last_call_at')::timestamptz, (m.log_data->>'last_failure_at')::timestamptz
      FROM usage_agg.key_monthly_logs m
), per_key AS (
    SELECT r.shared_key_id,
           sum(r.calls) FILTER (WHERE r.date = t.day) AS calls_today,
           sum(r.failed_calls) FILTER (WHERE r.date = t.day) AS failed_today,
           sum(r.users) FILTER (WHERE r.date = t.day) AS users_today,
           sum(r.calls) FILTER (WHERE r.date >= t.month) AS calls_this_month,
           sum(r.failed_calls) FILTER (WHERE r.date >= t.month) AS failed_this_month,
           max(r.last_call_at) AS last_call_at,
           max(r.last_failure_at) AS last_failure_at
      FROM rows r, today t
     GROUP BY r.shared_key_id
)
SELECT k.shared_key_id,
       COALESCE(k.calls_today, 0)::bigint AS calls_today,
       COALESCE(k.failed_today, 0)::bigint AS failed_today,
       CASE WHEN COALESCE(k.calls_today, 0) > 0 THEN round(k.failed_today::numeric / k.calls_today, 4) END AS failure_rate_today,
       COALESCE(k.calls_this_month, 0)::bigint AS calls_this_month,
       COALESCE(k.failed_this_month, 0)::bigint AS failed_this_month,
       CASE WHEN COALESCE(k.calls_this_month, 0) > 0
            THEN round(k.failed_this_month::numeric / k.calls_this_month, 4) END AS failure_rate_this_month,
       COALESCE(k.users_today, 0)::bigint AS users_today,
       k.last_call_at,
       k.last_failure_at
  FROM per_key k;
COMMENT ON VIEW usage_agg.key_health IS
    'Per shared key: calls, failures and failure rate today and this month, users today, last call and last failure (exact)';

-- ---------------------------------------------------------------------------
-- Reads.
-- ---------------------------------------------------------------------------
CREATE FUNCTION usage_agg._check_at(p_at timestamptz) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_at IS NULL OR NOT isfinite(p_at) THEN
        RAISE EXCEPTION 'usage_agg: at must be a finite timestamp'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('at = %s', COALESCE(p_at::text, 'NULL')),
                  HINT = 'Leave it out for now().';
    END IF;
END;
$$;

-- One key in the windows today, month and all_time, as of the business day that
-- contains `at`. users: distinct users today (months have none).
CREATE FUNCTION usage_agg.key_usage_summary(shared_key_id uuid, at timestamptz DEFAULT now())
RETURNS TABLE (period text, calls bigint, successful bigint, failed bigint, failure_rate numeric,
               tokens bigint, cost numeric, users bigint, input_tokens bigint, output_tokens bigint,
               cache_read_tokens bigint, cache_write_tokens bigint, unpriced_calls bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_day date;
    v_month date;
BEGIN
    IF $1 IS NULL THEN
        RAISE EXCEPTION 'usage_agg: shared_key_id must not be NULL'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'Calls without a key are counted in usage_agg.usage_overview().';
    END IF;
    PERFORM usage_agg._check_at($2);
    v_day := ($2 AT TIME ZONE usage_agg._timezone())::date;
    v_month := date_trunc('month', v_day::timestamp)::date;
    -- One pass over the key's rows (what key_daily_usage adds up, without the
    -- columns this does not return): days, pending deltas, pending calls (and
    -- today's users among them not in their day rows yet), months.
    RETURN QUERY
    WITH parts AS (
        SELECT k.date AS day, false AS is_month,
               (k.log_data->>'total_calls')::bigint AS calls, (k.log_data->>'successful_calls')::bigint AS ok,
               (k.log_data->>'failed_calls')::bigint AS failed, (k.log_data->>'tokens_used')::bigint AS tokens,
               (k.log_data->>'estimated_cost')::numeric AS cost, (k.log_data->>'users')::bigint AS users,
               kk.input_tokens AS i, kk.output_tokens AS o, kk.cache_read_tokens AS cr,
               kk.cache_write_tokens AS cw, kk.unpriced_calls AS u
          FROM usage_agg.key_daily_logs k CROSS JOIN LATERAL usage_agg._kinds(k.log_data) kk
         WHERE k.shared_key_id = $1 AND k.date <= v_day
        UNION ALL
        SELECT q.day, false, (q.delta->>'total_calls')::bigint, (q.delta->>'successful_calls')::bigint,
               (q.delta->>'failed_calls')::bigint, (q.delta->>'tokens_used')::bigint,
               (q.delta->>'estimated_cost')::numeric, (q.delta->>'users')::bigint,
               kk.input_tokens, kk.output_tokens, kk.cache_read_tokens, kk.cache_write_tokens, kk.unpriced_calls
          FROM usage_agg.pending_key_deltas q CROSS JOIN LATERAL usage_agg._kinds(q.delta) kk
         WHERE q.shared_key_id = $1 AND q.day <= v_day
        UNION ALL
        -- day + 0: see key_daily_usage.
        SELECT p.day, false, p.calls::bigint, p.successful::bigint, (p.calls - p.successful)::bigint, p.tokens, p.cost,
               CASE WHEN p.day = v_day THEN 0 END,
               p.input_tokens, p.output_tokens, p.cache_read_tokens, p.cache_write_tokens, p.unpriced
          FROM usage_agg.pending_deltas p
         WHERE p.shared_key_id = $1 AND p.day + 0 <= v_day
        UNION ALL
        SELECT v_day, false, 0, 0, 0, 0, 0, count(DISTINCT p.user_id), 0, 0, 0, 0, 0
          FROM usage_agg.pending_deltas p
         WHERE p.shared_key_id = $1 AND p.day + 0 = v_day
           AND NOT EXISTS (SELECT 1 FROM usage_agg.daily_logs d
                            WHERE d.user_id = p.user_id AND d.date = p.day
                              AND d.log_data->'shared_service_usage'->'by_key' ? p.shared_key_id::text)
        UNION ALL
        SELECT m.month, true, (m.log_data->>'total_calls')::bigint, (m.log_data->>'successful_calls')::bigint,
               (m.log_data->>'failed_calls')::bigint, (m.log_data->>'tokens_used')::bigint,
               (m.log_data->>'estimated_cost')::numeric, NULL,
               kk.input_tokens, kk.output_tokens, kk.cache_read_tokens, kk.cache_write_tokens, kk.unpriced_calls
          FROM usage_agg.key_monthly_logs m CROSS JOIN LATERAL usage_agg._kinds(m.log_data) kk
         WHERE m.shared_key_id = $1 AND m.month <= v_month
    ), sums AS (
        SELECT sum(x.calls) FILTER (WHERE x.day = v_day AND NOT x.is_month) AS t_calls,
               sum(x.ok) FILTER (WHERE x.day = v_day AND NOT x.is_month) AS t_ok,
               sum(x.failed) FILTER (WHERE x.day = v_day AND NOT x.is_month) AS t_failed,
               sum(x.tokens) FILTER (WHERE x.day = v_day AND NOT x.is_month) AS t_tokens,
               sum(x.cost) FILTER (WHERE x.day = v_day AND NOT x.is_month) AS t_cost,
               sum(x.users) FILTER (WHERE x.day = v_day AND NOT x.is_month) AS t_users,
               sum(x.i) FILTER (WHERE x.day = v_day AND NOT x.is_month) AS t_i,
               sum(x.o) FILTER (WHERE x.day = v_day AND NOT x.is_month) AS t_o,
               sum(x.cr) FILTER (WHERE x.day = v_day AND NOT x.is_month) AS t_cr,
               sum(x.cw) FILTER (WHERE x.day = v_day AND NOT x.is_month) AS t_cw,
               sum(x.u) FILTER (WHERE x.day = v_day AND NOT x.is_month) AS t_u,
               sum(x.calls) FILTER (WHERE x.day >= v_month) AS m_calls,
               sum(x.ok) FILTER (WHERE x.day >= v_month) AS m_ok,
               sum(x.failed) FILTER (WHERE x.day >= v_month) AS m_failed,
               sum(x.tokens) FILTER (WHERE x.day >= v_month) AS m_tokens,
               sum(x.cost) FILTER (WHERE x.day >= v_month) AS m_cost,
               sum(x.i) FILTER (WHERE x.day >= v_month) AS m_i,
               sum(x.o) FILTER (WHERE x.day >= v_month) AS m_o,
               sum(x.cr) FILTER (WHERE x.day >= v_month) AS m_cr,
               sum(x.cw) FILTER (WHERE x.day >= v_month) AS m_cw,
               sum(x.u) FILTER (WHERE x.day >= v_month) AS m_u,
               sum(x.calls) AS a_calls, sum(x.ok) AS a_ok, sum(x.failed) AS a_failed,
               sum(x.tokens) AS a_tokens, sum(x.cost) AS a_cost,
               sum(x.i) AS a_i, sum(x.o) AS a_o, sum(x.cr) AS a_cr, sum(x.cw) AS a_cw, sum(x.u) AS a_u
          FROM parts x
    )
    SELECT w.period, COALESCE(w.calls, 0)::bigint, COALESCE(w.ok, 0)::bigint, COALESCE(w.failed, 0)::bigint,
           CASE WHEN COALESCE(w.calls, 0) > 0 THEN round(w.failed::numeric / w.calls, 4) END,
           COALESCE(w.tokens, 0)::bigint, COALESCE(w.cost, 0),
           CASE WHEN w.ord = 1 THEN COALESCE(w.users, 0)::bigint END,
           COALESCE(w.i, 0)::bigint, COALESCE(w.o, 0)::bigint, COALESCE(w.cr, 0)::bigint,
           COALESCE(w.cw, 0)::bigint, COALESCE(w.u, 0)::bigint
      FROM sums s
     CROSS JOIN LATERAL (VALUES
           ('today', 1, s.t_calls, s.t_ok, s.t_failed, s.t_tokens, s.t_cost, s.t_users,
            s.t_i, s.t_o, s.t_cr, s.t_cw, s.t_u),
           ('month', 2, s.m_calls, s.m_ok, s.m_failed, s.m_tokens, s.m_cost, NULL,
            s.m_i, s.m_o, s.m_cr, s.m_cw, s.m_u),
           ('all_time', 3, s.a_calls, s.a_ok, s.a_failed, s.a_tokens, s.a_cost, NULL,
            s.a_i, s.a_o, s.a_cr, s.a_cw, s.a_u))
           AS w(period, ord, calls, ok, failed, tokens, cost, users, i, o, cr, cw, u)
     ORDER BY w.ord;
END;
$$;
COMMENT ON FUNCTION usage_agg.key_usage_summary(uuid, timestamptz) IS
    'One shared key today, this month and all time (business time zone), across users, exact with pending calls; users: distinct users today';

-- The whole service in the same windows. active_users: distinct users with calls
-- today; NULL for month and all_time (distinct users do not add up over days,
-- and counting them exactly would read every user).
CREATE FUNCTION usage_agg.usage_overview(at timestamptz DEFAULT now())
RETURNS TABLE (period text, calls bigint, successful bigint, failed bigint, failure_rate numeric,
               tokens bigint, cost numeric, active_users bigint, input_tokens bigint, output_tokens bigint,
               cache_read_tokens bigint, cache_write_tokens bigint, unpriced_calls bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_day date;
    v_month date;
BEGIN
    PERFORM usage_agg._check_at($1);
    v_day := ($1 AT TIME ZONE usage_agg._timezone())::date;
    v_month := date_trunc('month', v_day::timestamp)::date;
    -- One pass, as key_usage_summary does, over the service rows; users: the
    -- day's active users.
    RETURN QUERY
    WITH parts AS (
        SELECT k.date AS day, false AS is_month,
               (k.log_data->>'total_calls')::bigint AS calls, (k.log_data->>'successful_calls')::bigint AS ok,
               (k.log_data->>'failed_calls')::bigint AS failed, (k.log_data->>'tokens_used')::bigint AS tokens,
               (k.log_data->>'estimated_cost')::numeric AS cost, (k.log_data->>'users')::bigint AS users,
               kk.input_tokens AS i, kk.output_tokens AS o, kk.cache_read_tokens AS cr,
               kk.cache_write_tokens AS cw, kk.unpriced_calls AS u
          FROM usage_agg.service_daily_logs k CROSS JOIN LATERAL usage_agg._kinds(k.log_data) kk
         WHERE k.date <= v_day
        UNION ALL
        SELECT q.day, false, (q.delta->>'total_calls')::bigint, (q.delta->>'successful_calls')::bigint,
               (q.delta->>'failed_calls')::bigint, (q.delta->>'tokens_used')::bigint,
               (q.delta->>'estimated_cost')::numeric, (q.delta->>'users')::bigint,
               kk.input_tokens, kk.output_tokens, kk.cache_read_tokens, kk.cache_write_tokens, kk.unpriced_calls
          FROM usage_agg.pending_key_deltas q CROSS JOIN LATERAL usage_agg._kinds(q.delta) kk
         WHERE q.shared_key_id IS NULL AND q.day <= v_day
        UNION ALL
        -- day + 0: see key_daily_usage.
        SELECT p.day, false, p.calls::bigint, p.successful::bigint, (p.calls - p.successful)::bigint, p.tokens, p.cost,
               CASE WHEN p.day = v_day THEN 0 END,
               p.input_tokens, p.output_tokens, p.cache_read_tokens, p.cache_write_tokens, p.unpriced
          FROM usage_agg.pending_deltas p
         WHERE p.day + 0 <= v_day
        UNION ALL
        SELECT v_day, false, 0, 0, 0, 0, 0, count(DISTINCT p.user_id), 0, 0, 0, 0, 0
          FROM usage_agg.pending_deltas p
         WHERE p.day + 0 = v_day
           AND NOT EXISTS (SELECT 1 FROM usage_agg.daily_logs d
                            WHERE d.user_id = p.user_id AND d.date = p.day
                              AND d.log_data->'api_call_count' > '0'::jsonb)
        UNION ALL
        SELECT m.month, true, (m.log_data->>'total_calls')::bigint, (m.log_data->>'successful_calls')::bigint,
               (m.log_data->>'failed_calls')::bigint, (m.log_data->>'tokens_used')::bigint,
               (m.log_data->>'estimated_cost')::numeric, NULL,
               kk.input_tokens, kk.output_tokens, kk.cache_read_tokens, kk.cache_write_tokens, kk.unpriced_calls
          FROM usage_agg.service_monthly_logs m CROSS JOIN LATERAL usage_agg._kinds(m.log_data) kk
         WHERE m.month <= v_month
    ), sums AS (
        SELECT sum(x.calls) FILTER (WHERE x.day = v_day AND NOT x.is_month) AS t_calls,
               sum(x.ok) FILTER (WHERE x.day = v_day AND NOT x.is_month) AS t_ok,
               sum(x.failed) FILTER (WHERE x.day = v_day AND NOT x.is_month) AS t_failed,
               sum(x.tokens) FILTER (WHERE x.day = v_day AND NOT x.is_month) AS t_tokens,
               sum(x.cost) FILTER (WHERE x.day = v_day AND NOT x.is_month) AS t_cost,
               sum(x.users) FILTER (WHERE x.day = v_day AND NOT x.is_month) AS t_users,
               sum(x.i) FILTER (WHERE x.day = v_day AND NOT x.is_month) AS t_i,
               sum(x.o) FILTER (WHERE x.day = v_day AND NOT x.is_month) AS t_o,
               sum(x.cr) FILTER (WHERE x.day = v_day AND NOT x.is_month) AS t_cr,
               sum(x.cw) FILTER (WHERE x.day = v_day AND NOT x.is_month) AS t_cw,
               sum(x.u) FILTER (WHERE x.day = v_day AND NOT x.is_month) AS t_u,
               sum(x.calls) FILTER (WHERE x.day >= v_month) AS m_calls,
               sum(x.ok) FILTER (WHERE x.day >= v_month) AS m_ok,
               sum(x.failed) FILTER (WHERE x.day >= v_month) AS m_failed,
               sum(x.tokens) FILTER (WHERE x.day >= v_month) AS m_tokens,
               sum(x.cost) FILTER (WHERE x.day >= v_month) AS m_cost,
               sum(x.i) FILTER (WHERE x.day >= v_month) AS m_i,
               sum(x.o) FILTER (WHERE x.day >= v_month) AS m_o,
               sum(x.cr) FILTER (WHERE x.day >= v_month) AS m_cr,
               sum(x.cw) FILTER (WHERE x.day >= v_month) AS m_cw,
               sum(x.u) FILTER (WHERE x.day >= v_month) AS m_u,
               sum(x.calls) AS a_calls, sum(x.ok) AS a_ok, sum(x.failed) AS a_failed,
               sum(x.tokens) AS a_tokens, sum(x.cost) AS a_cost,
               sum(x.i) AS a_i, sum(x.o) AS a_o, sum(x.cr) AS a_cr, sum(x.cw) AS a_cw, sum(x.u) AS a_u
          FROM parts x
    )
    SELECT w.period, COALESCE(w.calls, 0)::bigint, COALESCE(w.ok, 0)::bigint, COALESCE(w.failed, 0)::bigint,
           CASE WHEN COALESCE(w.calls, 0) > 0 THEN round(w.failed::numeric / w.calls, 4) END,
           COALESCE(w.tokens, 0)::bigint, COALESCE(w.cost, 0),
           CASE WHEN w.ord = 1 THEN COALESCE(w.users, 0)::bigint END,
           COALESCE(w.i, 0)::bigint, COALESCE(w.o, 0)::bigint, COALESCE(w.cr, 0)::bigint,
           COALESCE(w.cw, 0)::bigint, COALESCE(w.u, 0)::bigint
      FROM sums s
     CROSS JOIN LATERAL (VALUES
           ('today', 1, s.t_calls, s.t_ok, s.t_failed, s.t_tokens, s.t_cost, s.t_users,
            s.t_i, s.t_o, s.t_cr, s.t_cw, s.t_u),
           ('month', 2, s.m_calls, s.m_ok, s.m_failed, s.m_tokens, s.m_cost, NULL,
            s.m_i, s.m_o, s.m_cr, s.m_cw, s.m_u),
           ('all_time', 3, s.a_calls, s.a_ok, s.a_failed, s.a_tokens, s.a_cost, NULL,
            s.a_i, s.a_o, s.a_cr, s.a_cw, s.a_u))
           AS w(period, ord, calls, ok, failed, tokens, cost, users, i, o, cr, cw, u)
     ORDER BY w.ord;
END;
$$;
COMMENT ON FUNCTION usage_agg.usage_overview(timestamptz) IS
    'The whole service today, this month and all time (business time zone), every call with or without a key, exact with pending calls; active_users today';

-- ---------------------------------------------------------------------------
-- Verification and rebuild from the detail.
-- ---------------------------------------------------------------------------

-- What the per-key (shared_key_id set) and service (NULL) rows of [p_from, p_to]
-- must hold: a GROUP BY over key_usage_logs, in the columns of the views.
CREATE FUNCTION usage_agg._key_days_from_detail(p_from date, p_to date)
RETURNS TABLE (shared_key_id uuid, date date, log_data jsonb)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH tz AS (
        SELECT usage_agg._timezone() AS name
    ), calls AS (
        SELECT k.shared_key_id, (k.created_at AT TIME ZONE tz.name)::date AS day, k.user_id,
               k.model_used, k.success, k.tokens_used, k.cost_estimate, k.created_at,
               k.input_tokens::bigint AS i, k.output_tokens::bigint AS o, k.cache_read_tokens::bigint AS cr,
               k.cache_write_tokens::bigint AS cw, CASE WHEN k.cost_estimate IS NULL THEN 1 ELSE 0 END AS u
          FROM usage_agg.key_usage_logs k, tz
         WHERE k.created_at >= usage_agg._day_start(p_from, tz.name)
           AND k.created_at <  usage_agg._day_start(p_to + 1, tz.name)
    ), scoped AS (
        SELECT c.shared_key_id AS scope_key, c.* FROM calls c WHERE c.shared_key_id IS NOT NULL
        UNION ALL
        SELECT NULL::uuid, c.* FROM calls c
    ), per_day AS (
        SELECT s.scope_key, s.day,
               count(*) AS calls, count(*) FILTER (WHERE s.success) AS successful,
               COALESCE(sum(s.tokens_used), 0) AS tokens, COALESCE(sum(s.cost_estimate), 0) AS cost,
               count(DISTINCT s.user_id) AS users, max(s.created_at) AS last_at,
               max(s.created_at) FILTER (WHERE NOT s.success) AS last_failure_at,
               usage_agg._kinds_json(sum(s.i), sum(s.o), sum(s.cr), sum(s.cw), sum(s.u)) AS kinds
          FROM scoped s GROUP BY s.scope_key, s.day
    ), per_model AS (
        SELECT m.scope_key, m.day,
               jsonb_object_agg(m.model_used, jsonb_build_object(
                   'calls', m.calls, 'failed', m.failed, 'tokens', m.tokens, 'cost', m.cost) || m.kinds) AS by_model
          FROM (SELECT s.scope_key, s.day, s.model_used, count(*) AS calls,
                       count(*) FILTER (WHERE NOT s.success) AS failed,
                       COALESCE(sum(s.tokens_used), 0) AS tokens, COALESCE(sum(s.cost_estimate), 0) AS cost,
                       usage_agg._kinds_json(sum(s.i), sum(s.o), sum(s.cr), sum(s.cw), sum(s.u)) AS kinds
                  FROM scoped s WHERE s.model_used IS NOT NULL
                 GROUP BY s.scope_key, s.day, s.model_used) m
         GROUP BY m.scope_key, m.day
    )
    SELECT d.scope_key, d.day,
           jsonb_build_object(
               'total_calls', d.calls, 'successful_calls', d.successful,
               'failed_calls', d.calls - d.successful, 'tokens_used', d.tokens,
               'estimated_cost', d.cost, 'users', d.users,
               'by_model', COALESCE(m.by_model, '{}'::jsonb),
               'last_call_at', usage_agg._iso_utc(d.last_at),
               'last_failure_at', usage_agg._iso_utc(d.last_failure_at)) || d.kinds
      FROM per_day d
      LEFT JOIN per_model m ON m.scope_key IS NOT DISTINCT FROM d.scope_key AND m.day = d.day
$$;

-- Every (key, date, field) in [p_from, p_to] where the per-key aggregates (with
-- pending calls) and a GROUP BY over key_usage_logs disagree; shared_key_id NULL
-- is the service row. No rows: consistent. Days whose detail expired are skipped.
CREATE FUNCTION usage_agg.verify_key_daily_logs(p_from date, p_to date)
RETURNS TABLE (shared_key_id uuid, date date, field text, aggregate_value jsonb, detail_value jsonb)
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
    WITH expected AS (
        SELECT e.shared_key_id, e.date, e.log_data FROM usage_agg._key_days_from_detail(v_from, p_to) e
    ), models AS (
        SELECT m.shared_key_id, m.date,
               jsonb_object_agg(m.model, jsonb_build_object('calls', m.calls, 'failed', m.failed_calls,
                                'tokens', m.tokens_used, 'cost', m.estimated_cost)
                                || usage_agg._kinds_json(m.input_tokens, m.output_tokens, m.cache_read_tokens,
                                                         m.cache_write_tokens, m.unpriced_calls)) AS by_model
          FROM usage_agg.key_daily_usage_by_model m
         WHERE m.date BETWEEN v_from AND p_to
         GROUP BY m.shared_key_id, m.date
    ), service_models AS (
        SELECT m.date,
               jsonb_object_agg(m.model, jsonb_build_object('calls', m.calls, 'failed', m.failed,
                                'tokens', m.tokens, 'cost', m.cost)
                                || usage_agg._kinds_json(m.i, m.o, m.cr, m.cw, m.u)) AS by_model
          FROM (SELECT u.date, u.model, sum(u.calls) AS calls, sum(u.failed) AS failed,
                       sum(u.tokens) AS tokens, sum(u.cost) AS cost,
                       sum(u.i) AS i, sum(u.o) AS o, sum(u.cr) AS cr, sum(u.cw) AS cw, sum(u.u) AS u
                  FROM (SELECT s.date, c.key AS model, (c.value->>'calls')::bigint AS calls,
                               (c.value->>'failed')::bigint AS failed, (c.value->>'tokens')::bigint AS tokens,
                               (c.value->>'cost')::numeric AS cost,
                               kk.input_tokens AS i, kk.output_tokens AS o, kk.cache_read_tokens AS cr,
                               kk.cache_write_tokens AS cw, kk.unpriced_calls AS u
                          FROM usage_agg.service_daily_logs s CROSS JOIN LATERAL jsonb_each(s.log_data->'by_model') c
                         CROSS JOIN LATERAL usage_agg._kinds(c.value) kk
                         WHERE s.date BETWEEN v_from AND p_to
                        UNION ALL
                        SELECT q.day, c.key, (c.value->>'calls')::bigint, (c.value->>'failed')::bigint,
                               (c.value->>'tokens')::bigint, (c.value->>'cost')::numeric,
                               kk.input_tokens, kk.output_tokens, kk.cache_read_tokens, kk.cache_write_tokens,
                               kk.unpriced_calls
                          FROM usage_agg.pending_key_deltas q CROSS JOIN LATERAL jsonb_each(q.delta->'by_model') c
                         CROSS JOIN LATERAL usage_agg._kinds(c.value) kk
                         WHERE q.shared_key_id IS NULL AND q.day BETWEEN v_from AND p_to
                        UNION ALL
                        SELECT p.day, p.model_used, p.calls, p.calls - p.successful, p.tokens, p.cost,
                               COALESCE(p.input_tokens, 0), COALESCE(p.output_tokens, 0),
                               COALESCE(p.cache_read_tokens, 0), COALESCE(p.cache_write_tokens, 0),
                               COALESCE(p.unpriced, 0)
                          FROM usage_agg.pending_deltas p
                         WHERE p.model_used IS NOT NULL AND p.day BETWEEN v_from AND p_to) u
                 GROUP BY u.date, u.model
                HAVING sum(u.calls) <> 0 OR sum(u.failed) <> 0 OR sum(u.tokens) <> 0 OR sum(u.cost) <> 0
                    OR sum(u.i) <> 0 OR sum(u.o) <> 0 OR sum(u.cr) <> 0 OR sum(u.cw) <> 0 OR sum(u.u) <> 0) m
         GROUP BY m.date
    ), stored AS (
        SELECT d.shared_key_id, d.date,
               jsonb_build_object(
                   'total_calls', d.calls, 'successful_calls', d.successful_calls,
                   'failed_calls', d.failed_calls, 'tokens_used', d.tokens_used,
                   'estimated_cost', d.estimated_cost, 'users', d.users,
                   'by_model', COALESCE(m.by_model, '{}'::jsonb),
                   'last_call_at', usage_agg._iso_utc(d.last_call_at),
                   'last_failure_at', usage_agg._iso_utc(d.last_failure_at))
               || usage_agg._kinds_json(d.input_tokens, d.output_tokens, d.cache_read_tokens,
                                        d.cache_write_tokens, d.unpriced_calls) AS log_data
          FROM usage_agg.key_daily_usage d
          LEFT JOIN models m ON m.shared_key_id = d.shared_key_id AND m.date = d.date
         WHERE d.date BETWEEN v_from AND p_to
        UNION ALL
        SELECT NULL::uuid, d.date,
               jsonb_build_object(
                   'total_calls', d.calls, 'successful_calls', d.successful_calls,
                   'failed_calls', d.failed_calls, 'tokens_used', d.tokens_used,
                   'estimated_cost', d.estimated_cost, 'users', d.active_users,
                   'by_model', COALESCE(m.by_model, '{}'::jsonb),
                   'last_call_at', usage_agg._iso_utc(d.last_call_at),
                   'last_failure_at', usage_agg._iso_utc(d.last_failure_at))
               || usage_agg._kinds_json(d.input_tokens, d.output_tokens, d.cache_read_tokens,
                                        d.cache_write_tokens, d.unpriced_calls)
          FROM usage_agg.service_daily_usage d
          LEFT JOIN service_models m ON m.date = d.date
         WHERE d.date BETWEEN v_from AND p_to
    ), pairs AS (
        SELECT COALESCE(s.shared_key_id, e.shared_key_id) AS shared_key_id,
               COALESCE(s.date, e.date) AS date,
               COALESCE(s.log_data, usage_agg._empty_key_log_data()) AS a,
               COALESCE(e.log_data, usage_agg._empty_key_log_data()) AS x
          FROM stored s
          FULL JOIN expected e ON e.shared_key_id IS NOT DISTINCT FROM s.shared_key_id AND e.date = s.date
    )
    SELECT p.shared_key_id, p.date, f.field, p.a->f.field, p.x->f.field
      FROM pairs p
     CROSS JOIN LATERAL (VALUES ('total_calls'), ('successful_calls'), ('failed_calls'), ('tokens_used'),
                                ('estimated_cost'), ('users'), ('by_model'), ('last_call_at'),
                                ('last_failure_at'), ('input_tokens'), ('output_tokens'),
                                ('cache_read_tokens'), ('cache_write_tokens'), ('unpriced_calls')) AS f(field)
     WHERE (p.a->f.field) IS DISTINCT FROM (p.x->f.field)
     ORDER BY p.date, p.shared_key_id NULLS FIRST, f.field;
END;
$$;
COMMENT ON FUNCTION usage_agg.verify_key_daily_logs(date, date) IS
    'Lists every (key, date, field) where the per-key aggregates (shared_key_id NULL: the service overview), pending calls included, disagree with a GROUP BY over key_usage_logs; empty means consistent. Days whose detail has expired are skipped.';

CREATE FUNCTION usage_agg._empty_key_log_data() RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN '{"total_calls": 0, "successful_calls": 0, "failed_calls": 0, "tokens_used": 0,
         "estimated_cost": 0, "users": 0, "by_model": {}, "last_call_at": null,
         "last_failure_at": null}'::jsonb;

-- Recomputes the per-key and service rows of one day from the detail (called
-- by rebuild_daily_logs, which holds detail writers off). Pending deltas of the
-- day are dropped: the detail has their calls. Returns the rows written.
CREATE FUNCTION usage_agg._rebuild_key_day(p_day date)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_n bigint;
    v_m bigint;
BEGIN
    -- Waits for an apply taking pending per-key deltas (see src/keys.rs).
    PERFORM pg_advisory_xact_lock(8463215221469571952);
    DELETE FROM usage_agg.pending_key_deltas q WHERE q.day = p_day;
    WITH expected AS (
        SELECT e.shared_key_id, e.log_data FROM usage_agg._key_days_from_detail(p_day, p_day) e
    ), keys AS (
        INSERT INTO usage_agg.key_daily_logs AS k (shared_key_id, date, log_data, last_modified)
        SELECT e.shared_key_id, p_day, e.log_data, now() FROM expected e WHERE e.shared_key_id IS NOT NULL
        ON CONFLICT (shared_key_id, date) DO UPDATE
           SET log_data = EXCLUDED.log_data, last_modified = EXCLUDED.last_modified
         WHERE k.log_data IS DISTINCT FROM EXCLUDED.log_data
        RETURNING 1
    ), service AS (
        INSERT INTO usage_agg.service_daily_logs AS s (date, log_data, last_modified)
        SELECT p_day, e.log_data, now() FROM expected e WHERE e.shared_key_id IS NULL
        ON CONFLICT (date) DO UPDATE
           SET log_data = EXCLUDED.log_data, last_modified = EXCLUDED.last_modified
         WHERE s.log_data IS DISTINCT FROM EXCLUDED.log_data
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM keys) + (SELECT count(*) FROM service) INTO v_n;
    -- Rows the detail no longer has.
    WITH expected AS (
        SELECT e.shared_key_id FROM usage_agg._key_days_from_detail(p_day, p_day) e
    ), gone_keys AS (
        DELETE FROM usage_agg.key_daily_logs k
         WHERE k.date = p_day
           AND NOT EXISTS (SELECT 1 FROM expected e WHERE e.shared_key_id = k.shared_key_id)
        RETURNING 1
    ), gone_service AS (
        DELETE FROM usage_agg.service_daily_logs s
         WHERE s.date = p_day
           AND NOT EXISTS (SELECT 1 FROM expected e WHERE e.shared_key_id IS NULL)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM gone_keys) + (SELECT count(*) FROM gone_service) INTO v_m;
    RETURN v_n + v_m;
END;
$$;

-- ---------------------------------------------------------------------------
-- Per-key and service days from the users' daily rows, for days without
-- detail (the update from 0.3.0, import_legacy): per key, calls, tokens and
-- cost come from the users' by_key cells and users from who has the key; what
-- those documents never held (successful and failed calls per key, models per
-- key, the times of the last call and failure) is null, and "recovered_from"
-- says where the row came from. The service row has every user total; its
-- models lack failures. Days that have a service row already are left alone
-- (their per-key rows exist). Returns the rows written.
-- ---------------------------------------------------------------------------
CREATE FUNCTION usage_agg._key_days_from_users(p_before date)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_keys bigint;
    v_service bigint;
BEGIN
    INSERT INTO usage_agg.key_daily_logs AS t (shared_key_id, date, log_data)
    SELECT c.name::uuid, d.date,
           jsonb_build_object(
               'total_calls', sum(c.calls), 'successful_calls', NULL, 'failed_calls', NULL,
               'tokens_used', sum(c.tokens), 'estimated_cost', sum(c.cost),
               'users', count(*), 'by_model', '{}'::jsonb, 'last_call_at', NULL, 'last_failure_at', NULL,
               'recovered_from', 'daily_logs.by_key')
      FROM usage_agg.daily_logs d CROSS JOIN LATERAL usage_agg._document_cells(d.log_data, 'by_key') c
     WHERE d.date < p_before
       AND c.calls > 0
       AND NOT EXISTS (SELECT 1 FROM usage_agg.service_daily_logs s WHERE s.date = d.date)
     GROUP BY c.name, d.date
    ON CONFLICT (shared_key_id, date) DO UPDATE
       SET log_data = usage_agg._rollup_add(t.log_data, EXCLUDED.log_data), last_modified = now();
    GET DIAGNOSTICS v_keys = ROW_COUNT;

    INSERT INTO usage_agg.service_daily_logs AS t (date, log_data)
    SELECT d.date,
           jsonb_build_object(
               'total_calls', sum(t.calls),
               'successful_calls', sum(t.successful),
               'failed_calls', sum(t.failed),
               'tokens_used', sum(t.tokens),
               'estimated_cost', sum(t.cost),
               'users', count(*) FILTER (WHERE t.calls > 0),
               'by_model', COALESCE((SELECT jsonb_object_agg(m.model, jsonb_build_object(
                                            'calls', m.calls, 'failed', NULL, 'tokens', m.tokens, 'cost', m.cost))
                                       FROM (SELECT c.name AS model, sum(c.calls) AS calls,
                                                    sum(c.tokens) AS tokens, sum(c.cost) AS cost
                                               FROM usage_agg.daily_logs u
                                              CROSS JOIN LATERAL usage_agg._document_cells(u.log_data, 'by_model') c
                                              WHERE u.date = d.date
                                              GROUP BY c.name) m), '{}'::jsonb),
               'last_call_at', usage_agg._iso_utc(max(t.last_api_call_at)),
               'last_failure_at', NULL,
               'recovered_from', 'daily_logs')
      FROM usage_agg.daily_logs d CROSS JOIN LATERAL usage_agg._totals(d.log_data) t
     WHERE d.date < p_before
       AND NOT EXISTS (SELECT 1 FROM usage_agg.service_daily_logs s WHERE s.date = d.date)
     GROUP BY d.date
    ON CONFLICT (date) DO UPDATE
       SET log_data = usage_agg._rollup_add(t.log_data, EXCLUDED.log_data), last_modified = now();
    GET DIAGNOSTICS v_service = ROW_COUNT;
    RETURN v_keys + v_service;
END;
$$;

-- ---------------------------------------------------------------------------
-- Retention: key and service days older than the daily horizon roll up into
-- months, like users' days. Returns the rows moved.
-- ---------------------------------------------------------------------------
CREATE FUNCTION usage_agg._cleanup_key_days(target date)
RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH moved_keys AS (
        DELETE FROM usage_agg.key_daily_logs d WHERE d.date < target
        RETURNING d.shared_key_id, d.date, d.log_data
    ), key_months AS (
        INSERT INTO usage_agg.key_monthly_logs AS t (shared_key_id, month, log_data, last_modified)
        SELECT m.shared_key_id, date_trunc('month', m.date::timestamp)::date,
               usage_agg._rollup_month(m.log_data ORDER BY m.date), now()
          FROM moved_keys m
         GROUP BY 1, 2
        ON CONFLICT (shared_key_id, month) DO UPDATE
           SET log_data = usage_agg._rollup_add(t.log_data, EXCLUDED.log_data, false),
               last_modified = EXCLUDED.last_modified
        RETURNING 1
    ), moved_service AS (
        DELETE FROM usage_agg.service_daily_logs d WHERE d.date < target
        RETURNING d.date, d.log_data
    ), service_months AS (
        INSERT INTO usage_agg.service_monthly_logs AS t (month, log_data, last_modified)
        SELECT date_trunc('month', m.date::timestamp)::date,
               usage_agg._rollup_month(m.log_data ORDER BY m.date), now()
          FROM moved_service m
         GROUP BY 1
        ON CONFLICT (month) DO UPDATE
           SET log_data = usage_agg._rollup_add(t.log_data, EXCLUDED.log_data, false),
               last_modified = EXCLUDED.last_modified
        RETURNING 1
    )
    -- Data-modifying CTEs run to completion whether or not they are read.
    SELECT (SELECT count(*) FROM moved_keys) + (SELECT count(*) FROM moved_service)
$$;
