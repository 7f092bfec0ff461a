-- usage_agg 0.3.0 -> 0.4.0
--
-- Per-key and service aggregates: key_daily_logs, key_monthly_logs,
-- service_daily_logs, service_monthly_logs, pending_key_deltas, their views
-- (key_daily_usage, key_daily_usage_by_model, key_monthly_usage, key_health,
-- service_daily_usage, service_monthly_usage), key_usage_summary(),
-- usage_overview() and verify_key_daily_logs(); rebuild_daily_logs() and the
-- daily roll-up cover them; pending_deltas.last_failure_at; usage_agg.distribute()
-- for Citus. Keeps all data and
-- fills the new tables from it (see the end). A fresh install of 0.4.0 and
-- 0.3.0 + this script give the same catalog (tests/upgrade.rs checks it).
--
-- Generated: tests/update_scripts.rs writes sql/usage_agg--0.3.0--0.4.0.sql
-- from sql/updates/0.3.0--0.4.0.sql (this template) and the install script, so
-- that no function is copied by hand. Edit the template, not the output.

\echo Use "ALTER EXTENSION usage_agg UPDATE TO '0.4.0'" to load this file. \quit

-- No call may be folded between filling the new tables and the end of the update.
LOCK TABLE usage_agg.key_usage_logs IN SHARE MODE;

-- Helpers that read tables lose their SQL-standard bodies (Citus 13 cannot run
-- those), and the restore triggers act on the table alone, not on a Citus shard.
CREATE OR REPLACE FUNCTION usage_agg._timezone() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT COALESCE((SELECT c.timezone FROM usage_agg.config c), 'UTC') $$;
CREATE OR REPLACE FUNCTION usage_agg._retention_horizon_restore() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- On Citus this fires on a reference table's shard
    -- (retention_horizon_<shardid>) as Citus copies rows to a node: a plain
    -- insert there.
    IF TG_RELID <> 'usage_agg.retention_horizon'::regclass THEN
        RETURN NEW;
    END IF;
    IF EXISTS (SELECT 1 FROM usage_agg.retention_horizon) THEN
        UPDATE usage_agg.retention_horizon
           SET detail_kept_from = NEW.detail_kept_from, daily_kept_from = NEW.daily_kept_from;
        RETURN NULL;
    END IF;
    RETURN NEW;
END;
$$;

ALTER TABLE usage_agg.pending_deltas ADD COLUMN last_failure_at timestamptz;
-- One row per call (all but bulk groups): exact; a bulk group: its newest call.
UPDATE usage_agg.pending_deltas SET last_failure_at = last_at WHERE successful < calls;
-- Tokens by kind and calls without a cost (NULL: 0). A pending call of 0.3.0
-- does not say whether its cost was NULL: the update folds those calls below
-- and counts unpriced calls from the detail instead.
ALTER TABLE usage_agg.pending_deltas ADD COLUMN input_tokens bigint, ADD COLUMN output_tokens bigint,
    ADD COLUMN cache_read_tokens bigint, ADD COLUMN cache_write_tokens bigint, ADD COLUMN unpriced integer;

-- The totals and cells of a user's document read in one place each, inlined
-- into the queries that read them (budgets.sql and keys.sql below use them).
CREATE FUNCTION usage_agg._totals(log_data jsonb)
RETURNS TABLE (calls bigint, successful bigint, failed bigint, tokens bigint, cost numeric,
               last_api_call_at timestamptz, input_tokens bigint, output_tokens bigint,
               cache_read_tokens bigint, cache_write_tokens bigint, unpriced_calls bigint)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT (log_data->>'api_call_count')::bigint,
           (log_data#>>'{shared_service_usage,successful_calls}')::bigint,
           (log_data#>>'{shared_service_usage,failed_calls}')::bigint,
           (log_data#>>'{shared_service_usage,tokens_used}')::bigint,
           (log_data#>>'{shared_service_usage,estimated_cost}')::numeric,
           (log_data->>'last_api_call_at')::timestamptz,
           COALESCE((log_data#>>'{shared_service_usage,input_tokens}')::bigint, 0),
           COALESCE((log_data#>>'{shared_service_usage,output_tokens}')::bigint, 0),
           COALESCE((log_data#>>'{shared_service_usage,cache_read_tokens}')::bigint, 0),
           COALESCE((log_data#>>'{shared_service_usage,cache_write_tokens}')::bigint, 0),
           COALESCE((log_data#>>'{shared_service_usage,unpriced_calls}')::bigint, 0);
END;
CREATE FUNCTION usage_agg._document_cells(log_data jsonb, kind text)
RETURNS TABLE (name text, calls bigint, tokens bigint, cost numeric, input_tokens bigint,
               output_tokens bigint, cache_read_tokens bigint, cache_write_tokens bigint,
               unpriced_calls bigint)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT c.key, (c.value->>'calls')::bigint, (c.value->>'tokens')::bigint, (c.value->>'cost')::numeric,
           COALESCE((c.value->>'input_tokens')::bigint, 0), COALESCE((c.value->>'output_tokens')::bigint, 0),
           COALESCE((c.value->>'cache_read_tokens')::bigint, 0),
           COALESCE((c.value->>'cache_write_tokens')::bigint, 0),
           COALESCE((c.value->>'unpriced_calls')::bigint, 0)
      FROM jsonb_each(CASE WHEN jsonb_typeof(log_data->'shared_service_usage'->kind) = 'object'
                           THEN log_data->'shared_service_usage'->kind ELSE '{}'::jsonb END) c;
END;
CREATE FUNCTION usage_agg._kinds(counters jsonb)
RETURNS TABLE (input_tokens bigint, output_tokens bigint, cache_read_tokens bigint,
               cache_write_tokens bigint, unpriced_calls bigint)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT COALESCE((counters->>'input_tokens')::bigint, 0),
           COALESCE((counters->>'output_tokens')::bigint, 0),
           COALESCE((counters->>'cache_read_tokens')::bigint, 0),
           COALESCE((counters->>'cache_write_tokens')::bigint, 0),
           COALESCE((counters->>'unpriced_calls')::bigint, 0);
END;
CREATE FUNCTION usage_agg._kinds_json(input_tokens numeric, output_tokens numeric, cache_read_tokens numeric,
                                      cache_write_tokens numeric, unpriced_calls numeric)
RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT jsonb_strip_nulls(jsonb_build_object(
               'input_tokens', NULLIF(input_tokens, 0),
               'output_tokens', NULLIF(output_tokens, 0),
               'cache_read_tokens', NULLIF(cache_read_tokens, 0),
               'cache_write_tokens', NULLIF(cache_write_tokens, 0),
               'unpriced_calls', NULLIF(unpriced_calls, 0)));
END;
CREATE OR REPLACE FUNCTION usage_agg._aggregates(p_from date, p_to date)
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
-- The days of a range that still have detail, for verify and rebuild.
CREATE FUNCTION usage_agg._detail_from(p_from date, p_to date) RETURNS date
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM usage_agg._check_day_range(p_from, p_to);
    RETURN greatest(p_from, (SELECT h.detail_kept_from FROM usage_agg.retention_horizon h));
END;
$$;

CREATE FUNCTION usage_agg."_rollup_add"(
	"stored" jsonb, /* Jsonb */
	"delta" jsonb, /* Jsonb */
	"keep_users" bool DEFAULT true /* bool */
) RETURNS jsonb /* Jsonb */
IMMUTABLE STRICT PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'rollup_add_wrapper';
CREATE FUNCTION usage_agg."_rollup_correct_last"(
	"stored" jsonb, /* Jsonb */
	"removed_last_at" bigint, /* Option < i64 > */
	"removed_last_failure_at" bigint, /* Option < i64 > */
	"detail_last_at" bigint, /* Option < i64 > */
	"detail_last_failure_at" bigint /* Option < i64 > */
) RETURNS jsonb /* Jsonb */
IMMUTABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'rollup_correct_last_wrapper';
CREATE FUNCTION usage_agg."_needs_detail"(
	"stored" TEXT, /* Option < & str > */
	"removed" bigint /* Option < i64 > */
) RETURNS bool /* bool */
IMMUTABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'needs_detail_wrapper';

-- From sql/keys.sql:
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

-- The hourly tier (filled at the end).
-- From sql/hourly.sql:
-- The hourly tier: calls per user and per shared key, per hour of the business
-- day (config.timezone).
--
-- An hour is stored as the instant it starts (timestamptz), so the two 01:00s
-- of a fall-back night are two rows an hour apart and a spring-forward day has
-- 23 hours. The fold feeds it from the groups it folds into daily_logs, which
-- it splits by hour (each group lies in one hour, its newest call's): a user's
-- hours are written with the user's day, in the same transaction; a key's hours,
-- which every user of the key touches, only by applies (like key_daily_logs),
-- from the calls they apply and from pending_key_hour_deltas, which statements
-- that fold their own calls (immediate mode, corrections) append to. Readers add
-- what is pending, so they are exact at any moment.

-- ---------------------------------------------------------------------------
-- Tables.
-- ---------------------------------------------------------------------------
CREATE TABLE usage_agg.hourly_logs (
    user_id       uuid        NOT NULL,
    hour          timestamptz NOT NULL,
    calls         bigint      NOT NULL,
    successful    bigint      NOT NULL,
    tokens        bigint      NOT NULL,
    cost          numeric     NOT NULL,
    last_modified timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT hourly_logs_pkey PRIMARY KEY (user_id, hour)
) WITH (fillfactor = 80);  -- room for HOT updates: a user's current hour is rewritten often
CREATE INDEX hourly_logs_hour ON usage_agg.hourly_logs (hour);
COMMENT ON TABLE usage_agg.hourly_logs IS
    'Per user and business hour (the instant the hour starts in config.timezone): calls, successful calls, tokens, exact cost. Read through hourly_usage (which adds pending calls).';

CREATE TABLE usage_agg.key_hourly_logs (
    shared_key_id uuid        NOT NULL,
    hour          timestamptz NOT NULL,
    calls         bigint      NOT NULL,
    successful    bigint      NOT NULL,
    tokens        bigint      NOT NULL,
    cost          numeric     NOT NULL,
    last_modified timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT key_hourly_logs_pkey PRIMARY KEY (shared_key_id, hour)
) WITH (fillfactor = 80);
CREATE INDEX key_hourly_logs_hour ON usage_agg.key_hourly_logs (hour);
COMMENT ON TABLE usage_agg.key_hourly_logs IS
    'Per shared key and business hour, across users: calls, successful calls, tokens, exact cost. Written by applies only; read through key_hourly_usage (which adds pending calls).';

CREATE TABLE usage_agg.pending_key_hour_deltas (
    shared_key_id uuid        NOT NULL,
    hour          timestamptz NOT NULL,
    calls         bigint      NOT NULL,
    successful    bigint      NOT NULL,
    tokens        bigint      NOT NULL,
    cost          numeric     NOT NULL,
    appended_at   timestamptz NOT NULL DEFAULT now()
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
        autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 10000);
CREATE INDEX pending_key_hour_deltas_key_hour ON usage_agg.pending_key_hour_deltas (shared_key_id, hour);
COMMENT ON TABLE usage_agg.pending_key_hour_deltas IS
    'Per-key hourly deltas of statements that folded their own calls; folded into key_hourly_logs by the next apply; readers include them.';

SELECT pg_catalog.pg_extension_config_dump('usage_agg.hourly_logs', '');
SELECT pg_catalog.pg_extension_config_dump('usage_agg.key_hourly_logs', '');
SELECT pg_catalog.pg_extension_config_dump('usage_agg.pending_key_hour_deltas', '');

-- The instant the business hour of `at` starts in time zone `tz` (the Rust
-- fold computes the same). An instant, not a local time: the two 01:00s of a
-- fall-back night differ. STABLE as timestamptz - interval is (it is exact
-- here: the interval is less than an hour); inlined into the queries using it.
CREATE FUNCTION usage_agg._hour_start(at timestamptz, tz text) RETURNS timestamptz
LANGUAGE sql STABLE STRICT PARALLEL SAFE
RETURN at - ((at AT TIME ZONE tz) - date_trunc('hour', at AT TIME ZONE tz));

-- Every call the hourly tier counts, by source: folded user hours ('user'),
-- folded key hours ('key'), and what is pending for each. One row per stored
-- row or pending row; the readers below add them up.
CREATE FUNCTION usage_agg._hourly_parts(p_tz text)
RETURNS TABLE (scope text, id uuid, hour timestamptz, calls bigint, successful bigint, tokens bigint,
               cost numeric)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT 'user', h.user_id, h.hour, h.calls, h.successful, h.tokens, h.cost
      FROM usage_agg.hourly_logs h
    UNION ALL
    SELECT 'user', p.user_id, usage_agg._hour_start(p.last_at, p_tz), p.calls::bigint, p.successful::bigint,
           p.tokens, p.cost
      FROM usage_agg.pending_deltas p
    UNION ALL
    SELECT 'key', k.shared_key_id, k.hour, k.calls, k.successful, k.tokens, k.cost
      FROM usage_agg.key_hourly_logs k
    UNION ALL
    SELECT 'key', q.shared_key_id, q.hour, q.calls, q.successful, q.tokens, q.cost
      FROM usage_agg.pending_key_hour_deltas q
    UNION ALL
    SELECT 'key', p.shared_key_id, usage_agg._hour_start(p.last_at, p_tz), p.calls::bigint, p.successful::bigint,
           p.tokens, p.cost
      FROM usage_agg.pending_deltas p
     WHERE p.shared_key_id IS NOT NULL
$$;

-- ---------------------------------------------------------------------------
-- Reads.
-- ---------------------------------------------------------------------------
-- Both read _hourly_parts (inlined: a filter on the id and hour reaches the
-- tables' primary keys, and the other scope's arms are pruned).
CREATE VIEW usage_agg.hourly_usage AS
SELECT x.id AS user_id, x.hour,
       x.hour AT TIME ZONE z.tz AS local_hour,
       (x.hour AT TIME ZONE z.tz)::date AS date,
       sum(x.calls)::bigint AS calls,
       sum(x.successful)::bigint AS successful_calls,
       sum(x.calls - x.successful)::bigint AS failed_calls,
       sum(x.tokens)::bigint AS tokens_used,
       sum(x.cost) AS estimated_cost
  FROM (SELECT usage_agg._timezone() AS tz) z,
       LATERAL usage_agg._hourly_parts(z.tz) x
 WHERE x.scope = 'user'
 GROUP BY x.id, x.hour, z.tz
HAVING sum(x.calls) <> 0 OR sum(x.tokens) <> 0 OR sum(x.cost) <> 0;
COMMENT ON VIEW usage_agg.hourly_usage IS
    'One row per user and business hour with calls (hour: the instant it starts; local_hour and date in config.timezone), exact with pending calls';

CREATE VIEW usage_agg.key_hourly_usage AS
SELECT x.id AS shared_key_id, x.hour,
       x.hour AT TIME ZONE z.tz AS local_hour,
       (x.hour AT TIME ZONE z.tz)::date AS date,
       sum(x.calls)::bigint AS calls,
       sum(x.successful)::bigint AS successful_calls,
       sum(x.calls - x.successful)::bigint AS failed_calls,
       sum(x.tokens)::bigint AS tokens_used,
       sum(x.cost) AS estimated_cost
  FROM (SELECT usage_agg._timezone() AS tz) z,
       LATERAL usage_agg._hourly_parts(z.tz) x
 WHERE x.scope = 'key'
 GROUP BY x.id, x.hour, z.tz
HAVING sum(x.calls) <> 0 OR sum(x.tokens) <> 0 OR sum(x.cost) <> 0;
COMMENT ON VIEW usage_agg.key_hourly_usage IS
    'One row per shared key and business hour with calls, across users (hour: the instant it starts; local_hour and date in config.timezone), exact with pending calls';

CREATE FUNCTION usage_agg._check_hours(p_hours integer) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_hours IS NULL OR p_hours < 1 OR p_hours > 8784 THEN
        RAISE EXCEPTION 'usage_agg: hours must be between 1 and 8784 (366 days)'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('hours = %s', COALESCE(p_hours::text, 'NULL')),
                  HINT = 'For longer ranges read usage_agg.daily_usage.';
    END IF;
END;
$$;

-- The last p_hours business hours up to the one containing p_at, oldest first,
-- hours without calls included (zeros), for one user (p_scope 'user') or key.
CREATE FUNCTION usage_agg._recent_hours(p_scope text, p_id uuid, p_hours integer, p_at timestamptz)
RETURNS TABLE (hour timestamptz, local_hour timestamp, calls bigint, successful_calls bigint,
               failed_calls bigint, tokens_used bigint, estimated_cost numeric)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tz text := usage_agg._timezone();
    v_last timestamptz;
BEGIN
    PERFORM usage_agg._check_hours(p_hours);
    PERFORM usage_agg._check_at(p_at);
    v_last := usage_agg._hour_start(p_at, v_tz);
    RETURN QUERY
    WITH series AS (
        SELECT v_last - i * interval '1 hour' AS hour FROM generate_series(0, p_hours - 1) i
    ), parts AS (
        SELECT x.hour, x.calls, x.successful, x.tokens, x.cost
          FROM usage_agg._hourly_parts(v_tz) x
         WHERE x.scope = p_scope AND x.id = p_id
           AND x.hour BETWEEN v_last - (p_hours - 1) * interval '1 hour' AND v_last
    )
    SELECT s.hour, s.hour AT TIME ZONE v_tz,
           COALESCE(sum(p.calls), 0)::bigint,
           COALESCE(sum(p.successful), 0)::bigint,
           COALESCE(sum(p.calls - p.successful), 0)::bigint,
           COALESCE(sum(p.tokens), 0)::bigint,
           COALESCE(sum(p.cost), 0)
      FROM series s LEFT JOIN parts p ON p.hour = s.hour
     GROUP BY s.hour
     ORDER BY s.hour;
END;
$$;

CREATE FUNCTION usage_agg.recent_hours(user_id uuid, hours integer DEFAULT 24, at timestamptz DEFAULT now())
RETURNS TABLE (hour timestamptz, local_hour timestamp, calls bigint, successful_calls bigint,
               failed_calls bigint, tokens_used bigint, estimated_cost numeric)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM usage_agg._check_user($1);
    RETURN QUERY SELECT * FROM usage_agg._recent_hours('user', $1, $2, $3);
END;
$$;
COMMENT ON FUNCTION usage_agg.recent_hours(uuid, integer, timestamptz) IS
    'One user''s last `hours` business hours up to the one containing `at`, oldest first, hours without calls included, exact with pending calls';

CREATE FUNCTION usage_agg.key_recent_hours(shared_key_id uuid, hours integer DEFAULT 24, at timestamptz DEFAULT now())
RETURNS TABLE (hour timestamptz, local_hour timestamp, calls bigint, successful_calls bigint,
               failed_calls bigint, tokens_used bigint, estimated_cost numeric)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF $1 IS NULL THEN
        RAISE EXCEPTION 'usage_agg: shared_key_id must not be NULL'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'Calls without a key are counted per user: usage_agg.recent_hours().';
    END IF;
    RETURN QUERY SELECT * FROM usage_agg._recent_hours('key', $1, $2, $3);
END;
$$;
COMMENT ON FUNCTION usage_agg.key_recent_hours(uuid, integer, timestamptz) IS
    'One shared key''s last `hours` business hours up to the one containing `at`, across users, oldest first, hours without calls included, exact with pending calls';

-- ---------------------------------------------------------------------------
-- Verification and rebuild against the detail.
-- ---------------------------------------------------------------------------

-- The detail of [p_start, p_end) per user hour and key hour. A string body,
-- so that nothing depends on key_usage_logs (the detail table can be swapped
-- for a partitioned one).
CREATE FUNCTION usage_agg._hours_from_detail(p_start timestamptz, p_end timestamptz, p_tz text)
RETURNS TABLE (scope text, id uuid, hour timestamptz, calls bigint, successful bigint, tokens bigint,
               cost numeric)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH calls AS (
        SELECT k.user_id, k.shared_key_id, usage_agg._hour_start(k.created_at, p_tz) AS hour,
               CASE WHEN k.success THEN 1 ELSE 0 END AS ok, COALESCE(k.tokens_used, 0)::bigint AS tokens,
               COALESCE(k.cost_estimate, 0) AS cost
          FROM usage_agg.key_usage_logs k
         WHERE k.created_at >= p_start AND k.created_at < p_end
    )
    SELECT 'user', c.user_id, c.hour, count(*), sum(c.ok)::bigint, sum(c.tokens)::bigint, sum(c.cost)
      FROM calls c GROUP BY c.user_id, c.hour
    UNION ALL
    SELECT 'key', c.shared_key_id, c.hour, count(*), sum(c.ok)::bigint, sum(c.tokens)::bigint, sum(c.cost)
      FROM calls c WHERE c.shared_key_id IS NOT NULL GROUP BY c.shared_key_id, c.hour
$$;

-- Every (scope, user or key, hour, field) in the business days [p_from, p_to]
-- where the hourly tier (plus pending calls) and a GROUP BY over
-- key_usage_logs disagree. No rows: consistent. Days whose detail has expired
-- are skipped.
CREATE FUNCTION usage_agg.verify_hourly_logs(p_from date, p_to date)
RETURNS TABLE (scope text, id uuid, hour timestamptz, field text, aggregate_value numeric,
               detail_value numeric)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_from date;
    v_tz text := usage_agg._timezone();
    v_start timestamptz;
    v_end timestamptz;
BEGIN
    v_from := usage_agg._detail_from(p_from, p_to);
    IF v_from > p_to THEN
        RETURN;
    END IF;
    v_start := usage_agg._day_start(v_from, v_tz);
    v_end := usage_agg._day_start(p_to + 1, v_tz);
    RETURN QUERY
    WITH stored AS (
        SELECT x.scope, x.id, x.hour, sum(x.calls) AS calls, sum(x.successful) AS successful,
               sum(x.tokens) AS tokens, sum(x.cost) AS cost
          FROM usage_agg._hourly_parts(v_tz) x
         WHERE x.hour >= v_start AND x.hour < v_end
         GROUP BY x.scope, x.id, x.hour
    ), expected AS (
        SELECT * FROM usage_agg._hours_from_detail(v_start, v_end, v_tz)
    ), pairs AS (
        SELECT COALESCE(s.scope, e.scope) AS scope, COALESCE(s.id, e.id) AS id,
               COALESCE(s.hour, e.hour) AS hour,
               ARRAY[COALESCE(s.calls, 0), COALESCE(s.successful, 0), COALESCE(s.tokens, 0), COALESCE(s.cost, 0)] AS a,
               ARRAY[COALESCE(e.calls, 0), COALESCE(e.successful, 0), COALESCE(e.tokens, 0), COALESCE(e.cost, 0)] AS x
          FROM stored s
          FULL JOIN expected e ON e.scope = s.scope AND e.id = s.id AND e.hour = s.hour
    )
    SELECT p.scope, p.id, p.hour, f.field, p.a[f.i], p.x[f.i]
      FROM pairs p
     CROSS JOIN unnest(ARRAY['calls', 'successful', 'tokens', 'cost']) WITH ORDINALITY AS f(field, i)
     WHERE p.a[f.i] <> p.x[f.i]
     ORDER BY p.hour, p.scope, p.id, f.i;
END;
$$;
COMMENT ON FUNCTION usage_agg.verify_hourly_logs(date, date) IS
    'Lists every (scope, user or key, hour, field) in a day range where hourly_logs or key_hourly_logs (plus pending calls) and a GROUP BY over key_usage_logs disagree; empty means consistent. Days whose detail has expired are skipped.';

-- Recomputes the user and key hours of one business day from the detail
-- (rebuild_daily_logs calls it with detail writers locked out and the day's
-- pending calls dropped). Returns the hourly rows written.
CREATE FUNCTION usage_agg._rebuild_hours(p_day date)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tz text := usage_agg._timezone();
    v_start timestamptz := usage_agg._day_start(p_day, v_tz);
    v_end timestamptz := usage_agg._day_start(p_day + 1, v_tz);
    v_users bigint;
    v_keys bigint;
BEGIN
    DELETE FROM usage_agg.pending_key_hour_deltas q WHERE q.hour >= v_start AND q.hour < v_end;
    DELETE FROM usage_agg.hourly_logs h WHERE h.hour >= v_start AND h.hour < v_end;
    DELETE FROM usage_agg.key_hourly_logs k WHERE k.hour >= v_start AND k.hour < v_end;
    INSERT INTO usage_agg.hourly_logs (user_id, hour, calls, successful, tokens, cost)
    SELECT e.id, e.hour, e.calls, e.successful, e.tokens, e.cost
      FROM usage_agg._hours_from_detail(v_start, v_end, v_tz) e WHERE e.scope = 'user';
    GET DIAGNOSTICS v_users = ROW_COUNT;
    INSERT INTO usage_agg.key_hourly_logs (shared_key_id, hour, calls, successful, tokens, cost)
    SELECT e.id, e.hour, e.calls, e.successful, e.tokens, e.cost
      FROM usage_agg._hours_from_detail(v_start, v_end, v_tz) e WHERE e.scope = 'key';
    GET DIAGNOSTICS v_keys = ROW_COUNT;
    RETURN v_users + v_keys;
END;
$$;

-- ---------------------------------------------------------------------------
-- Retention.
-- ---------------------------------------------------------------------------

-- Deletes user and key hours that started before now() - keep (default
-- config.hourly_retention, or config.detail_retention when that is NULL), in
-- batches of config.cleanup_batch_size. Returns the rows deleted.
CREATE FUNCTION usage_agg.cleanup_old_hourly_logs(keep interval DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_cfg usage_agg.config;
    v_cutoff timestamptz;
    v_removed bigint := 0;
    v_n bigint;
    v_started timestamptz := clock_timestamp();
BEGIN
    SELECT * INTO v_cfg FROM usage_agg.config;
    v_cutoff := now() - usage_agg._check_keep(keep, COALESCE(v_cfg.hourly_retention, v_cfg.detail_retention),
                                              'cleanup_old_hourly_logs');
    LOOP
        WITH gone AS (
            DELETE FROM usage_agg.hourly_logs h
             WHERE h.ctid = ANY (ARRAY(SELECT o.ctid FROM usage_agg.hourly_logs o
                                        WHERE o.hour < v_cutoff LIMIT v_cfg.cleanup_batch_size))
               AND h.hour < v_cutoff
            RETURNING 1)
        SELECT count(*) INTO v_n FROM gone;
        IF v_n = 0 THEN
            WITH gone AS (
                DELETE FROM usage_agg.key_hourly_logs k
                 WHERE k.ctid = ANY (ARRAY(SELECT o.ctid FROM usage_agg.key_hourly_logs o
                                            WHERE o.hour < v_cutoff LIMIT v_cfg.cleanup_batch_size))
                   AND k.hour < v_cutoff
                RETURNING 1)
            SELECT count(*) INTO v_n FROM gone;
        END IF;
        EXIT WHEN v_n = 0;
        v_removed := v_removed + v_n;
        RAISE NOTICE 'usage_agg.cleanup_old_hourly_logs: % rows deleted, % elapsed',
            v_removed, clock_timestamp() - v_started;
    END LOOP;
    RETURN v_removed;
END;
$$;
COMMENT ON FUNCTION usage_agg.cleanup_old_hourly_logs(interval) IS
    'Deletes hourly_logs and key_hourly_logs rows of hours that started before now() - keep (default config.hourly_retention, or detail_retention when NULL), in batches; returns rows deleted';

-- Token kinds and table prices: five columns of key_usage_logs (NULL in every
-- existing row; their CHECK constraints scan the table once), model_prices,
-- the pricing triggers, unpriced_calls, reprice_calls(), call_cost().
CREATE FUNCTION usage_agg._price_call() RETURNS trigger
    LANGUAGE c SECURITY DEFINER
    AS 'MODULE_PATHNAME', 'price_call_wrapper';
COMMENT ON FUNCTION usage_agg._price_call() IS
    'Before a call is written: tokens_used from the token kinds when NULL, cost_estimate from usage_agg.model_prices when NULL';
CREATE FUNCTION usage_agg."call_cost"(
	"model" TEXT, /* Option < & str > */
	"at" timestamp with time zone, /* Option < TimestampWithTimeZone > */
	"tokens_used" INT DEFAULT NULL, /* Option < i32 > */
	"input_tokens" INT DEFAULT NULL, /* Option < i32 > */
	"output_tokens" INT DEFAULT NULL, /* Option < i32 > */
	"cache_read_tokens" INT DEFAULT NULL, /* Option < i32 > */
	"cache_write_tokens" INT DEFAULT NULL /* Option < i32 > */
) RETURNS TABLE (
	"cost" NUMERIC,  /* Option < AnyNumeric > */
	"price_valid_from" timestamp with time zone  /* Option < TimestampWithTimeZone > */
)
STABLE PARALLEL RESTRICTED 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'call_cost_wrapper';
-- From sql/prices.sql:
-- Token kinds and table prices (docs/prices.md).
--
-- A call may report its tokens by kind. The kinds are disjoint: input (the
-- uncached prompt), cache reads, cache writes, output (reasoning included);
-- tokens_used is their sum. NULL means "not reported". The pricing trigger
-- (src/prices.rs) fills tokens_used from the kinds when it is left NULL, and
-- prices a call inserted without a cost from usage_agg.model_prices.
-- price_valid_from records which costs the table gave: the valid_from of the
-- price row used, NULL for a cost the application supplied (or none).
ALTER TABLE usage_agg.key_usage_logs
    ADD COLUMN input_tokens integer,
    ADD COLUMN output_tokens integer,
    ADD COLUMN cache_read_tokens integer,
    ADD COLUMN cache_write_tokens integer,
    ADD COLUMN price_valid_from timestamptz,
    ADD CONSTRAINT key_usage_logs_token_kinds_not_negative CHECK (
        input_tokens >= 0 AND output_tokens >= 0 AND cache_read_tokens >= 0 AND cache_write_tokens >= 0),
    ADD CONSTRAINT key_usage_logs_tokens_used_is_the_sum_of_the_kinds CHECK (
        tokens_used IS NULL
        OR num_nonnulls(input_tokens, output_tokens, cache_read_tokens, cache_write_tokens) = 0
        OR tokens_used::bigint = COALESCE(input_tokens, 0)::bigint + COALESCE(output_tokens, 0)::bigint
                                 + COALESCE(cache_read_tokens, 0)::bigint + COALESCE(cache_write_tokens, 0)::bigint),
    ADD CONSTRAINT key_usage_logs_price_valid_from_has_a_cost CHECK (
        price_valid_from IS NULL OR cost_estimate IS NOT NULL);
COMMENT ON COLUMN usage_agg.key_usage_logs.input_tokens IS
    'Prompt tokens not read from or written to a cache (NULL: not reported)';
COMMENT ON COLUMN usage_agg.key_usage_logs.output_tokens IS
    'Generated tokens, reasoning included (NULL: not reported)';
COMMENT ON COLUMN usage_agg.key_usage_logs.cache_read_tokens IS
    'Prompt tokens read from the provider''s cache (NULL: not reported)';
COMMENT ON COLUMN usage_agg.key_usage_logs.cache_write_tokens IS
    'Prompt tokens written to the provider''s cache (NULL: not reported)';
COMMENT ON COLUMN usage_agg.key_usage_logs.price_valid_from IS
    'valid_from of the usage_agg.model_prices row that priced this call; NULL when the application gave the cost, or the call is unpriced';
-- Unpriced calls (cost NULL) per model: the unpriced_calls view reads this index
-- only, however large the table.
CREATE INDEX key_usage_logs_unpriced ON usage_agg.key_usage_logs (model_used, created_at)
    WHERE cost_estimate IS NULL;

CREATE TABLE usage_agg.model_prices (
    model                text        NOT NULL,
    valid_from           timestamptz NOT NULL,
    input_per_mtok       numeric,
    output_per_mtok      numeric,
    cache_read_per_mtok  numeric,
    cache_write_per_mtok numeric,
    per_call             numeric,
    PRIMARY KEY (model, valid_from),
    CONSTRAINT model_prices_valid_from_finite CHECK (valid_from > '-infinity' AND valid_from < 'infinity'),
    -- NaN sorts above Infinity in numeric, so the upper bound rejects both.
    CONSTRAINT model_prices_prices_finite_not_negative CHECK (
        input_per_mtok >= 0 AND input_per_mtok < 'Infinity'::numeric
        AND output_per_mtok >= 0 AND output_per_mtok < 'Infinity'::numeric
        AND cache_read_per_mtok >= 0 AND cache_read_per_mtok < 'Infinity'::numeric
        AND cache_write_per_mtok >= 0 AND cache_write_per_mtok < 'Infinity'::numeric
        AND per_call >= 0 AND per_call < 'Infinity'::numeric),
    CONSTRAINT model_prices_some_price CHECK (
        num_nonnulls(input_per_mtok, output_per_mtok, cache_read_per_mtok, cache_write_per_mtok, per_call) > 0)
);
COMMENT ON TABLE usage_agg.model_prices IS
    'Prices per model from valid_from on (until the next row of the model): per million tokens of each kind, and per call. A call inserted without a cost is priced from the row valid at its created_at; a kind without a price leaves a call with tokens of that kind unpriced. A change applies to new calls; usage_agg.reprice_calls() applies it to earlier ones.';
SELECT pg_catalog.pg_extension_config_dump('usage_agg.model_prices', '');
-- Every backend keeps a copy of the prices; a change announces itself.
CREATE TRIGGER model_prices_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON usage_agg.model_prices
    FOR EACH STATEMENT EXECUTE FUNCTION usage_agg._config_changed();

-- Only rows the trigger has something to do for: a call with a cost and
-- tokens_used (or no kinds) costs the insert path nothing more.
CREATE TRIGGER price_insert
    BEFORE INSERT ON usage_agg.key_usage_logs
    FOR EACH ROW
    WHEN (NEW.cost_estimate IS NULL
          OR (NEW.tokens_used IS NULL
              AND num_nonnulls(NEW.input_tokens, NEW.output_tokens, NEW.cache_read_tokens, NEW.cache_write_tokens) > 0))
    EXECUTE FUNCTION usage_agg._price_call();
CREATE TRIGGER price_update
    BEFORE UPDATE ON usage_agg.key_usage_logs
    FOR EACH ROW
    WHEN (NEW.cost_estimate IS NULL OR OLD.price_valid_from IS NOT NULL OR NEW.tokens_used IS NULL
          OR (NEW.input_tokens, NEW.output_tokens, NEW.cache_read_tokens, NEW.cache_write_tokens)
             IS DISTINCT FROM (OLD.input_tokens, OLD.output_tokens, OLD.cache_read_tokens, OLD.cache_write_tokens))
    EXECUTE FUNCTION usage_agg._price_call();

-- Models with calls that have no cost: what the table does not price (yet),
-- and calls the application sent without a cost. A string body, so that the
-- views reading it do not depend on key_usage_logs (the detail table can be
-- swapped for a partitioned one); inlined into them.
CREATE FUNCTION usage_agg._unpriced_calls()
RETURNS TABLE (model text, calls bigint, since timestamptz, last_at timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT l.model_used, pg_catalog.count(*), pg_catalog.min(l.created_at), pg_catalog.max(l.created_at)
      FROM usage_agg.key_usage_logs l
     WHERE l.cost_estimate IS NULL
     GROUP BY l.model_used
$$;

CREATE VIEW usage_agg.unpriced_calls AS
SELECT u.model, u.calls, u.since, u.last_at,
       EXISTS (SELECT 1 FROM usage_agg.model_prices p WHERE p.model = u.model) AS has_prices
  FROM usage_agg._unpriced_calls() u;
COMMENT ON VIEW usage_agg.unpriced_calls IS
    'Per model (NULL: calls without a model): calls without a cost in the detail that is kept, since when, the last one, and whether usage_agg.model_prices has rows for the model (then the calls are older than its first row, or have tokens of a kind it has no price for, or tokens not split into kinds)';

-- Prices the calls of [from, to) again from usage_agg.model_prices: the
-- table-priced ones and the unpriced ones; a cost the application gave is never
-- touched. Each changed call is an UPDATE, so the fold corrects every
-- aggregate. In batches of batch_size calls in created_at order, a NOTICE per
-- batch; one transaction (an error leaves nothing repriced). Returns the
-- number of calls whose cost changed.
CREATE FUNCTION usage_agg.reprice_calls(
    "from" timestamptz,
    "to" timestamptz,
    batch_size integer DEFAULT 10000
) RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_after_at timestamptz := '-infinity';
    v_after_id uuid := '00000000-0000-0000-0000-000000000000';
    v_last_at timestamptz;
    v_last_id uuid;
    v_seen bigint;
    v_checked bigint := 0;
    v_changed bigint := 0;
    v_rows bigint;
BEGIN
    IF "from" IS NULL OR "to" IS NULL OR "from" > "to" THEN
        RAISE EXCEPTION 'usage_agg: reprice_calls needs a range with from <= to, got [%, %)', "from", "to"
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'For example: SELECT usage_agg.reprice_calls(''2026-11-01'', ''2026-12-01'');';
    END IF;
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'usage_agg: batch_size must be at least 1, got %', batch_size
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF "to" > now() + interval '1 minute' THEN
        RAISE EXCEPTION 'usage_agg: reprice_calls cannot reprice calls that have not happened yet (to = %)', "to"
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'A price row valid from a future instant prices the calls from then on, as they are inserted.',
                  HINT = 'End the range at now() or earlier.';
    END IF;
    LOOP
        -- One batch in created_at order. Only the calls whose cost or price
        -- row would change are written; setting their cost NULL has the
        -- pricing trigger price them (an UPDATE that set a new cost with the
        -- same price_valid_from would read as the application's cost).
        WITH batch AS (
            SELECT l.created_at, l.id,
                   (p.cost, p.price_valid_from) IS DISTINCT FROM (l.cost_estimate, l.price_valid_from) AS changed
              FROM (SELECT l.*
                      FROM usage_agg.key_usage_logs l
                     WHERE l.created_at >= "from" AND l.created_at < "to"
                       AND (l.created_at, l.id) > (v_after_at, v_after_id)
                       AND (l.cost_estimate IS NULL OR l.price_valid_from IS NOT NULL)
                     ORDER BY l.created_at, l.id
                     LIMIT batch_size) l
             CROSS JOIN LATERAL usage_agg.call_cost(l.model_used, l.created_at, l.tokens_used, l.input_tokens,
                                                    l.output_tokens, l.cache_read_tokens, l.cache_write_tokens) p
        ), written AS (
            UPDATE usage_agg.key_usage_logs l
               SET cost_estimate = NULL
              FROM batch b
             WHERE b.changed AND l.id = b.id AND l.created_at = b.created_at
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM batch), (SELECT count(*) FROM written), b.created_at, b.id
          INTO v_seen, v_rows, v_last_at, v_last_id
          FROM batch b
         ORDER BY b.created_at DESC, b.id DESC
         LIMIT 1;
        EXIT WHEN NOT FOUND;
        v_checked := v_checked + v_seen;
        v_changed := v_changed + v_rows;
        RAISE NOTICE 'usage_agg.reprice_calls: % call(s) checked up to %, % repriced', v_checked, v_last_at, v_changed;
        v_after_at := v_last_at;
        v_after_id := v_last_id;
    END LOOP;
    RETURN v_changed;
END;
$$;
COMMENT ON FUNCTION usage_agg.reprice_calls(timestamptz, timestamptz, integer) IS
    'Prices the calls of [from, to) again from usage_agg.model_prices (those the table priced, and those without a cost), in batches with a NOTICE each; costs the application gave are kept. The aggregates follow through the correction fold. Returns the number of calls whose cost changed.';

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
    -- Per-key and service days (a row per key or service and day: no batches;
    -- not counted, the result is daily_logs rows as before 0.4.0).
    PERFORM usage_agg._cleanup_key_days(v_begin.target);
    RETURN v_removed;
END;
$$;
COMMENT ON FUNCTION usage_agg.cleanup_old_daily_logs(interval) IS
    'Rolls daily_logs rows older than keep (default config.daily_retention) into monthly_logs and deletes them, in one transaction; only days whose detail has expired. Returns rows removed. CALL usage_agg.expire_daily_logs() does the same committing after every batch.';
CREATE OR REPLACE PROCEDURE usage_agg.expire_daily_logs(keep interval DEFAULT NULL, INOUT removed bigint DEFAULT NULL)
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
                           usage_agg.monthly_usage_by_model, usage_agg.monthly_usage_by_key,
                           usage_agg.key_daily_logs, usage_agg.key_monthly_logs,
                           usage_agg.service_daily_logs, usage_agg.service_monthly_logs,
                           usage_agg.pending_key_deltas,
                           usage_agg.key_daily_usage, usage_agg.key_daily_usage_by_model,
                           usage_agg.key_monthly_usage, usage_agg.key_health,
                           usage_agg.service_daily_usage, usage_agg.service_monthly_usage,
                           usage_agg.user_limits, usage_agg.alerts,
                           usage_agg.hourly_logs, usage_agg.key_hourly_logs,
                           usage_agg.pending_key_hour_deltas,
                           usage_agg.hourly_usage, usage_agg.key_hourly_usage,
                           usage_agg.model_prices, usage_agg.unpriced_calls
                    TO %I', role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION usage_agg.quota_status(uuid) TO %I', role_name);
END;
$$;
COMMENT ON FUNCTION usage_agg.grant_read_role(name) IS
    'Lets a role read usage_agg tables and views and call the read functions and quota_status';
CREATE FUNCTION usage_agg._maintenance_steps() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ARRAY['post_restore', 'apply_pending_deltas', 'verify_recent_days',
             'cleanup_old_key_usage_logs', 'cleanup_old_daily_logs', 'cleanup_old_hourly_logs',
             'reset_expired_quotas', 'cleanup_old_quota_logs'];
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
CREATE OR REPLACE FUNCTION usage_agg.import_legacy(detail regclass, daily regclass)
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
    -- Their per-key and service days (the days with detail got theirs from the
    -- fold of the copied detail).
    PERFORM usage_agg._key_days_from_users(COALESCE(v_first, 'infinity'::date));

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
CREATE OR REPLACE FUNCTION usage_agg._verify_recent_days(OUT drifted bigint, OUT problem text)
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
CREATE OR REPLACE FUNCTION usage_agg._check_reader_args(p_user_id uuid, p_at timestamptz) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM usage_agg._check_user(p_user_id);
    PERFORM usage_agg._check_at(p_at);
END;
$$;

-- Money budgets and alerts: a monthly cost budget per plan, per-user
-- overrides, alert thresholds, the alerts table and the functions that fill it.
ALTER TABLE usage_agg.quota_plans ADD COLUMN monthly_cost_budget numeric,
    ADD CONSTRAINT quota_plans_monthly_cost_budget_finite_not_negative
        CHECK (monthly_cost_budget >= 0 AND monthly_cost_budget < 'Infinity'::numeric);
COMMENT ON TABLE usage_agg.quota_plans IS
    'Membership plans: monthly quota (units), optional daily cost limit and monthly cost budget (NULL: none). Plans are ordered by monthly_quota.';
ALTER TABLE usage_agg.config ADD COLUMN alert_thresholds numeric[] NOT NULL DEFAULT '{80,100}',
    ADD CONSTRAINT config_alert_thresholds_range CHECK (
        cardinality(alert_thresholds) <= 10 AND array_position(alert_thresholds, NULL) IS NULL
        AND 0 < ALL (alert_thresholds) AND 1000 >= ALL (alert_thresholds));
COMMENT ON COLUMN usage_agg.config.alert_thresholds IS
    'Percentages of a monthly quota, daily cost limit or monthly budget at which usage_agg.alerts records a crossing (empty: no alerts)';
-- Quota logs and alerts expire (run_maintenance() step cleanup_old_quota_logs).
ALTER TABLE usage_agg.config ADD COLUMN quota_log_retention interval NOT NULL DEFAULT '90 days',
    ADD COLUMN alert_retention interval NOT NULL DEFAULT '400 days',
    ADD CONSTRAINT config_quota_log_retention_covers_a_month CHECK (quota_log_retention >= interval '31 days'),
    ADD CONSTRAINT config_alert_retention_covers_a_month CHECK (alert_retention >= interval '31 days');
COMMENT ON COLUMN usage_agg.config.quota_log_retention IS
    'run_maintenance() deletes quota_usage_logs rows older than this (the totals stay in quotas; a request_id older than this is no longer recognised)';
ALTER TABLE usage_agg.config ADD COLUMN hourly_retention interval,
    ADD CONSTRAINT config_hourly_retention_positive CHECK (hourly_retention > interval '0');
COMMENT ON COLUMN usage_agg.config.hourly_retention IS
    'run_maintenance() deletes hourly_logs and key_hourly_logs rows of hours older than this (NULL: detail_retention)';
COMMENT ON COLUMN usage_agg.config.alert_retention IS
    'run_maintenance() deletes usage_agg.alerts rows older than this';
CREATE INDEX quota_usage_logs_created_at ON usage_agg.quota_usage_logs USING brin (created_at);
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
    -- (TG_RELID: on Citus a shard of the reference table receives its rows as
    -- plain inserts.)
    IF TG_OP = 'INSERT' AND TG_RELID = 'usage_agg.config'::regclass
       AND EXISTS (SELECT 1 FROM usage_agg.config) THEN
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
               repair_drift = NEW.repair_drift,
               alert_thresholds = NEW.alert_thresholds,
               quota_log_retention = NEW.quota_log_retention,
               alert_retention = NEW.alert_retention,
               hourly_retention = NEW.hourly_retention;
        -- The restored detail is folded again on top of the restored aggregates:
        -- usage_agg.post_restore() (which run_maintenance() runs) recomputes them.
        INSERT INTO usage_agg.restores (restored_at) VALUES (now());
        RETURN NULL;
    END IF;
    RETURN NEW;
END;
$$;
CREATE OR REPLACE FUNCTION usage_agg._quota_plans_restore() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- On Citus this fires on a reference table's shard (quota_plans_<shardid>)
    -- as Citus copies rows to a node: a plain insert there.
    IF TG_RELID <> 'usage_agg.quota_plans'::regclass THEN
        RETURN NEW;
    END IF;
    UPDATE usage_agg.quota_plans
       SET monthly_quota = NEW.monthly_quota, daily_cost_limit = NEW.daily_cost_limit,
           monthly_cost_budget = NEW.monthly_cost_budget
     WHERE membership_level = NEW.membership_level;
    IF FOUND THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END;
$$;
CREATE OR REPLACE FUNCTION usage_agg._quota_plans_propagate() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- On Citus this fires on every node's shard of the reference table, where a
    -- distributed UPDATE cannot run: usage_agg.sync_plan_quotas() does it there
    -- (docs/citus.md).
    IF TG_RELID <> 'usage_agg.quota_plans'::regclass THEN
        RETURN NULL;
    END IF;
    UPDATE usage_agg.quotas
       SET monthly_quota = NEW.monthly_quota, updated_at = now()
     WHERE membership_level = NEW.membership_level
       AND monthly_quota IS DISTINCT FROM NEW.monthly_quota;
    RETURN NULL;
END;
$$;
-- From sql/budgets.sql:
-- Money budgets and threshold alerts (0.4.0).
--
-- A plan carries a daily cost limit and a monthly cost budget (NULL: none);
-- usage_agg.user_limits overrides either for one user. Crossing a threshold of
-- the monthly quota (where quota is consumed), of the daily cost limit or of
-- the monthly budget (where costs are folded) records one row in
-- usage_agg.alerts and sends NOTIFY usage_agg_alerts, in the transaction that
-- crossed: a rolled-back call alerts nothing, and a unique constraint makes it
-- once per (user, kind, threshold, period) however many sessions cross at once.

CREATE TABLE usage_agg.user_limits (
    user_id             uuid        PRIMARY KEY,
    daily_cost_limit    numeric,
    monthly_cost_budget numeric,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT user_limits_daily_cost_limit_finite_not_negative
        CHECK (daily_cost_limit >= 0 AND daily_cost_limit < 'Infinity'::numeric),
    CONSTRAINT user_limits_monthly_cost_budget_finite_not_negative
        CHECK (monthly_cost_budget >= 0 AND monthly_cost_budget < 'Infinity'::numeric)
);
COMMENT ON TABLE usage_agg.user_limits IS
    'Per-user overrides of the plan''s daily_cost_limit and monthly_cost_budget (an enterprise deal); NULL keeps the plan''s value';

CREATE TABLE usage_agg.alerts (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id     uuid        NOT NULL,
    kind        text        NOT NULL,
    threshold   numeric     NOT NULL,
    period      date        NOT NULL,
    value       numeric     NOT NULL,
    limit_value numeric     NOT NULL,
    at          timestamptz NOT NULL,
    CONSTRAINT alerts_kind_known CHECK (kind IN ('monthly_quota', 'daily_cost', 'monthly_budget')),
    CONSTRAINT alerts_once_per_period UNIQUE (user_id, kind, threshold, period)
);
CREATE INDEX alerts_at ON usage_agg.alerts (at);
COMMENT ON TABLE usage_agg.alerts IS
    'One row per threshold crossed: kind monthly_quota (units), daily_cost or monthly_budget (money); threshold in percent of limit_value; period is the business day (daily_cost) or the first day of the month; value is what was used when it crossed';

SELECT pg_catalog.pg_extension_config_dump('usage_agg.user_limits', '');
SELECT pg_catalog.pg_extension_config_dump('usage_agg.alerts', '');
SELECT pg_catalog.pg_extension_config_dump('usage_agg.alerts_id_seq', '');

-- The fold checks cost alerts only while some plan or user has a cost limit:
-- every backend's cached settings are dropped when these tables change.
CREATE TRIGGER quota_plans_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON usage_agg.quota_plans
    FOR EACH STATEMENT EXECUTE FUNCTION usage_agg._config_changed();
CREATE TRIGGER user_limits_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON usage_agg.user_limits
    FOR EACH STATEMENT EXECUTE FUNCTION usage_agg._config_changed();

-- Whether any plan or user has a daily cost limit or a monthly budget.
CREATE FUNCTION usage_agg._cost_limits_in_use() RETURNS boolean
LANGUAGE sql STABLE
AS $$
SELECT EXISTS (SELECT 1 FROM usage_agg.quota_plans p
                WHERE p.daily_cost_limit IS NOT NULL OR p.monthly_cost_budget IS NOT NULL)
    OR EXISTS (SELECT 1 FROM usage_agg.user_limits l
                WHERE l.daily_cost_limit IS NOT NULL OR l.monthly_cost_budget IS NOT NULL)
$$;

-- A user's plan and the cost limits that apply (overrides first; users without
-- a quota row are on plan free): one row. No SET clause, so that it is inlined
-- into the query that reads it (each insert's cost alert check does, in
-- immediate mode) instead of planned again on every call; names and operators
-- are qualified instead (not a SQL-standard body: see _timezone).
CREATE FUNCTION usage_agg._cost_limits(p_user_id uuid)
RETURNS TABLE (membership_level text, daily_cost_limit numeric, monthly_cost_budget numeric)
LANGUAGE sql STABLE
AS $$
    SELECT lv.level,
           COALESCE(o.daily_cost_limit, p.daily_cost_limit),
           COALESCE(o.monthly_cost_budget, p.monthly_cost_budget)
      FROM (SELECT COALESCE((SELECT q.membership_level FROM usage_agg.quotas q
                              WHERE q.user_id OPERATOR(pg_catalog.=) p_user_id),
                            'free') AS level) lv
      LEFT JOIN usage_agg.quota_plans p ON p.membership_level OPERATOR(pg_catalog.=) lv.level
      LEFT JOIN usage_agg.user_limits o ON o.user_id OPERATOR(pg_catalog.=) p_user_id
$$;

-- The cost a user's folded aggregates hold for the business month that starts
-- on `month`: its days in daily_logs plus its row in monthly_logs (days already
-- rolled up), up to and including `through`. One row; inlined where it is read
-- (see _cost_limits).
CREATE FUNCTION usage_agg._folded_month_cost(p_user_id uuid, p_month date, p_through date)
RETURNS TABLE (cost numeric)
LANGUAGE sql STABLE
AS $$
    SELECT COALESCE((SELECT pg_catalog.sum(t.cost)
                       FROM usage_agg.daily_logs d CROSS JOIN LATERAL usage_agg._totals(d.log_data) t
                      WHERE d.user_id OPERATOR(pg_catalog.=) p_user_id
                        AND d.date OPERATOR(pg_catalog.>=) p_month
                        AND d.date OPERATOR(pg_catalog.<=) p_through), 0)
         OPERATOR(pg_catalog.+)
           COALESCE((SELECT t.cost
                       FROM usage_agg.monthly_logs m CROSS JOIN LATERAL usage_agg._totals(m.log_data) t
                      WHERE m.user_id OPERATOR(pg_catalog.=) p_user_id
                        AND m.month OPERATOR(pg_catalog.=) p_month), 0)
$$;

-- Serialises the writers of each user's business month while cost limits are
-- in use (the folds call it before they write the day rows): a session adding
-- cost to one day of a month sees the other days only as committed, so two
-- sessions adding to different days at once would each miss the other's part
-- and neither would record a budget threshold that their sum crosses. Taken in
-- one order and before the day rows, it adds no deadlock; writers of one day
-- wait for each other on its row anyway. Read committed sees, after the wait,
-- what the other writer committed (repeatable read would not).
CREATE FUNCTION usage_agg._lock_cost_months(p_users uuid[], p_days date[]) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_key integer;
BEGIN
    FOR v_key IN
        SELECT DISTINCT hashtext(u.user_id::text || ' ' || date_trunc('month', u.day::timestamp)::date::text)
          FROM unnest(p_users, p_days) AS u(user_id, day)
         ORDER BY 1
    LOOP
        -- The two-key space (apart from single bigint keys), first key 'uagg'.
        PERFORM pg_advisory_xact_lock(1969317735, v_key);
    END LOOP;
END;
$$;

-- Records and announces the thresholds (config.alert_thresholds, in percent of
-- `limit`) that a step from `before` to `after` crossed; returns how many.
CREATE FUNCTION usage_agg._record_alerts(p_user_id uuid, p_kind text, p_period date, p_before numeric,
                                         p_after numeric, p_limit numeric, p_at timestamptz)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    a usage_agg.alerts;
    n integer := 0;
BEGIN
    IF p_limit IS NULL OR p_limit <= 0 OR p_after <= p_before THEN
        RETURN 0;
    END IF;
    FOR a IN
        INSERT INTO usage_agg.alerts AS t (user_id, kind, threshold, period, value, limit_value, at)
        SELECT p_user_id, p_kind, th.pct, p_period, p_after, p_limit, p_at
          FROM usage_agg.config c, unnest(c.alert_thresholds) AS th(pct)
         WHERE p_before * 100 < th.pct * p_limit AND p_after * 100 >= th.pct * p_limit
         ORDER BY th.pct
        ON CONFLICT ON CONSTRAINT alerts_once_per_period DO NOTHING
        RETURNING t.*
    LOOP
        PERFORM pg_notify('usage_agg_alerts',
                          jsonb_build_object('id', a.id, 'user_id', a.user_id, 'kind', a.kind,
                                            'threshold', a.threshold, 'period', a.period,
                                            'value', a.value, 'limit', a.limit_value,
                                            'at', usage_agg._iso_utc(a.at))::text);
        n := n + 1;
    END LOOP;
    RETURN n;
END;
$$;

-- A quota step took the user's monthly_used from `before` to `after` (under
-- the user's row lock) in the quota month that ends at `reset_at`.
CREATE FUNCTION usage_agg._quota_alerts(p_user_id uuid, p_before integer, p_after integer, p_quota integer,
                                        p_reset_at timestamptz, p_at timestamptz)
RETURNS integer
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT usage_agg._record_alerts(p_user_id, 'monthly_quota',
                                    ((p_reset_at AT TIME ZONE usage_agg._timezone()) - interval '1 month')::date,
                                    p_before, p_after, p_quota, p_at)
$$;

-- The fold added `delta` to the cost of (user, day) for each element of the
-- arrays (costs already written to daily_logs): the daily cost limit and the
-- monthly budget alerts those additions crossed. Called by the fold only while
-- _cost_limits_in_use().
CREATE FUNCTION usage_agg._cost_alerts(p_users uuid[], p_days date[], p_deltas numeric[])
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
-- Planned once per session: a custom plan per call cost more than the check
-- (0.7 ms of 0.8 per insert in immediate mode). Like every cached plan, one
-- made while the tables were recorded as empty (ANALYZE of an empty table)
-- scans them until autoanalyze invalidates it.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    r record;
    v_at timestamptz := clock_timestamp();
    v_thresholds numeric[] := (SELECT c.alert_thresholds FROM usage_agg.config c);
    n integer := 0;
BEGIN
    -- Almost every step crosses nothing: one query per kind finds the steps
    -- that cross a threshold, and only those are recorded.
    FOR r IN
        SELECT f.user_id, f.day, s.after - f.delta AS before, s.after, l.daily_cost_limit AS cost_limit
          FROM (SELECT u.user_id, u.day, sum(u.delta) AS delta
                  FROM unnest(p_users, p_days, p_deltas) AS u(user_id, day, delta)
                 GROUP BY u.user_id, u.day) f
         CROSS JOIN LATERAL usage_agg._cost_limits(f.user_id) l
         CROSS JOIN LATERAL (
               SELECT COALESCE((SELECT t.cost
                                  FROM usage_agg.daily_logs d CROSS JOIN LATERAL usage_agg._totals(d.log_data) t
                                 WHERE d.user_id = f.user_id AND d.date = f.day), 0) AS after
               OFFSET 0) s  -- (computed once, not once per reference)
         WHERE f.delta > 0 AND l.daily_cost_limit > 0
           AND EXISTS (SELECT FROM unnest(v_thresholds) AS th(pct)
                        WHERE (s.after - f.delta) * 100 < th.pct * l.daily_cost_limit
                          AND s.after * 100 >= th.pct * l.daily_cost_limit)
         ORDER BY f.user_id, f.day
    LOOP
        n := n + usage_agg._record_alerts(r.user_id, 'daily_cost', r.day, r.before, r.after, r.cost_limit, v_at);
    END LOOP;
    FOR r IN
        SELECT f.user_id, f.month, s.after - f.delta AS before, s.after, l.monthly_cost_budget AS cost_limit
          FROM (SELECT u.user_id, date_trunc('month', u.day)::date AS month, sum(u.delta) AS delta
                  FROM unnest(p_users, p_days, p_deltas) AS u(user_id, day, delta)
                 GROUP BY u.user_id, date_trunc('month', u.day)) f
         CROSS JOIN LATERAL usage_agg._cost_limits(f.user_id) l
         -- The whole month as folded (days after the ones added to too: a call
         -- folded late still counts towards the month it belongs to).
         CROSS JOIN LATERAL (
               SELECT c.cost AS after
                 FROM usage_agg._folded_month_cost(f.user_id, f.month, (f.month + interval '1 month - 1 day')::date) c
               OFFSET 0) s
         WHERE f.delta > 0 AND l.monthly_cost_budget > 0
           AND EXISTS (SELECT FROM unnest(v_thresholds) AS th(pct)
                        WHERE (s.after - f.delta) * 100 < th.pct * l.monthly_cost_budget
                          AND s.after * 100 >= th.pct * l.monthly_cost_budget)
         ORDER BY f.user_id, f.month
    LOOP
        n := n + usage_agg._record_alerts(r.user_id, 'monthly_budget', r.month, r.before, r.after,
                                          r.cost_limit, v_at);
    END LOOP;
    RETURN n;
END;
$$;
-- _lock_quota returns the locked row alone (its updated_at: the step's instant).
DROP FUNCTION usage_agg._lock_quota(uuid);
CREATE FUNCTION usage_agg._lock_quota(p_user_id uuid)
RETURNS usage_agg.quotas
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q usage_agg.quotas;
    at timestamptz;
BEGIN
    SELECT * INTO q FROM usage_agg.quotas WHERE user_id = p_user_id FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO usage_agg.quotas AS t (user_id, membership_level, monthly_quota, monthly_used, quota_reset_at, total_used)
        SELECT p_user_id, p.membership_level, p.monthly_quota, 0, usage_agg._next_month_start(clock_timestamp()), 0
          FROM usage_agg.quota_plans p WHERE p.membership_level = 'free'
        ON CONFLICT (user_id) DO NOTHING;
        SELECT * INTO q FROM usage_agg.quotas WHERE user_id = p_user_id FOR UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'usage_agg: no plan ''free'' in usage_agg.quota_plans for a new user'
                USING ERRCODE = 'no_data_found',
                      HINT = 'INSERT INTO usage_agg.quota_plans VALUES (''free'', 100, NULL);';
        END IF;
    END IF;
    at := clock_timestamp();
    IF at >= q.quota_reset_at THEN
        UPDATE usage_agg.quotas
           SET monthly_used = 0, quota_reset_at = usage_agg._next_month_start(at), updated_at = at
         WHERE user_id = p_user_id
        RETURNING * INTO q;
    END IF;
    q.updated_at := at;
    RETURN q;
END;
$$;
CREATE FUNCTION usage_agg._remaining(q usage_agg.quotas) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN greatest(q.monthly_quota - q.monthly_used, 0);
CREATE OR REPLACE FUNCTION usage_agg._state(q usage_agg.quotas, allowed boolean, replayed boolean)
RETURNS usage_agg.quota_state
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ROW(q.user_id, q.membership_level, q.monthly_quota, q.monthly_used,
               usage_agg._remaining(q), q.quota_reset_at, q.total_used,
               allowed, replayed)::usage_agg.quota_state
$$;
CREATE OR REPLACE FUNCTION usage_agg._consume(p_user_id uuid, p_amount integer, p_session_id text,
                                   p_request_id text, p_tokens_used integer, p_raise boolean)
RETURNS usage_agg.quota_state
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q usage_agg.quotas;
    v_at timestamptz;
    v_log usage_agg.quota_usage_logs;
    v_next usage_agg.quota_plans;
    v_remaining integer;
BEGIN
    PERFORM usage_agg._check_user(p_user_id);
    IF p_amount IS NULL OR p_amount <= 0 OR p_amount > 1000000 THEN
        RAISE EXCEPTION 'usage_agg: amount must be between 1 and 1000000'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('amount = %s', coalesce(p_amount::text, 'NULL'));
    END IF;
    IF p_tokens_used IS NOT NULL AND p_tokens_used < 0 THEN
        RAISE EXCEPTION 'usage_agg: tokens_used must not be negative'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('tokens_used = %s', p_tokens_used);
    END IF;
    IF length(p_request_id) > 1000 OR length(p_session_id) > 1000 THEN
        RAISE EXCEPTION 'usage_agg: request_id and session_id are limited to 1000 characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    q := usage_agg._lock_quota(p_user_id);
    v_at := q.updated_at;

    -- Under the row lock every earlier call with this request_id has committed
    -- (or rolled back), so this check cannot race.
    IF p_request_id IS NOT NULL THEN
        SELECT * INTO v_log FROM usage_agg.quota_usage_logs WHERE request_id = p_request_id;
        IF FOUND THEN
            IF v_log.user_id <> p_user_id THEN
                RAISE EXCEPTION 'usage_agg: request_id % belongs to another user', p_request_id
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'request_id must be unique per call.';
            END IF;
            RETURN usage_agg._state(q, true, true);
        END IF;
    END IF;

    v_remaining := usage_agg._remaining(q);
    IF p_amount > v_remaining THEN
        IF NOT p_raise THEN
            RETURN usage_agg._state(q, false, false);
        END IF;
        v_next := usage_agg._next_plan(q.membership_level);
        RAISE EXCEPTION 'QUOTA_EXCEEDED: user % requested % but only % of % remain this month',
                p_user_id, p_amount, v_remaining, q.monthly_quota
            USING ERRCODE = 'UAQ01',
                  DETAIL = format('requested: %s, remaining: %s, monthly_quota: %s, monthly_used: %s, plan: %s, resets at: %s',
                                  p_amount, v_remaining, q.monthly_quota, q.monthly_used, q.membership_level,
                                  usage_agg._iso_utc(q.quota_reset_at)),
                  HINT = CASE WHEN v_next.membership_level IS NULL
                              THEN format('%s is the highest plan; the quota resets at %s.',
                                          q.membership_level, usage_agg._iso_utc(q.quota_reset_at))
                              ELSE format('Upgrade to plan %s (%s a month), or wait until %s.',
                                          v_next.membership_level, v_next.monthly_quota,
                                          usage_agg._iso_utc(q.quota_reset_at)) END;
    END IF;

    UPDATE usage_agg.quotas
       SET monthly_used = monthly_used + p_amount, total_used = total_used + p_amount, updated_at = v_at
     WHERE user_id = p_user_id
    RETURNING * INTO q;
    INSERT INTO usage_agg.quota_usage_logs (user_id, session_id, membership_level, amount, tokens_used, request_id, created_at)
    VALUES (p_user_id, p_session_id, q.membership_level, p_amount, coalesce(p_tokens_used, 0), p_request_id, v_at);
    PERFORM usage_agg._quota_alerts(p_user_id, q.monthly_used - p_amount, q.monthly_used, q.monthly_quota,
                                    q.quota_reset_at, v_at);
    RETURN usage_agg._state(q, true, false);
END;
$$;
CREATE FUNCTION usage_agg."_owned_service_fields"() RETURNS TEXT[] /* Vec < String > */
IMMUTABLE STRICT PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'owned_service_fields_wrapper';
CREATE OR REPLACE FUNCTION usage_agg._replace_owned(stored jsonb, owned jsonb) RETURNS jsonb
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
CREATE OR REPLACE FUNCTION usage_agg.verify_daily_logs(p_from date, p_to date)
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
CREATE OR REPLACE FUNCTION usage_agg._run_maintenance_step(step text)
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
CREATE OR REPLACE FUNCTION usage_agg.run_maintenance()
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
CREATE OR REPLACE PROCEDURE usage_agg.maintain()
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
-- check_usage_limit reports the month too (new result columns).
DROP FUNCTION usage_agg.check_usage_limit(uuid, timestamptz);
CREATE FUNCTION usage_agg.check_usage_limit(user_id uuid, at timestamptz DEFAULT now())
RETURNS TABLE (membership_level text, today_cost numeric, daily_cost_limit numeric, remaining numeric,
               allowed boolean, month_cost numeric, monthly_cost_budget numeric, month_remaining numeric)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_day date;
    v_month date;
    v_limits record;
    v_cost numeric;
    v_month_cost numeric;
BEGIN
    PERFORM usage_agg._check_reader_args($1, $2);
    v_day := ($2 AT TIME ZONE usage_agg._timezone())::date;
    v_month := date_trunc('month', v_day)::date;
    SELECT * INTO v_limits FROM usage_agg._cost_limits($1);
    v_cost := COALESCE((SELECT t.cost
                          FROM usage_agg.daily_logs d CROSS JOIN LATERAL usage_agg._totals(d.log_data) t
                         WHERE d.user_id = $1 AND d.date = v_day), 0)
            + COALESCE((SELECT sum(p.cost) FROM usage_agg.pending_deltas p
                         WHERE p.user_id = $1 AND p.day = v_day), 0);
    v_month_cost := (SELECT c.cost FROM usage_agg._folded_month_cost($1, v_month, v_day) c)
            + COALESCE((SELECT sum(p.cost) FROM usage_agg.pending_deltas p
                         WHERE p.user_id = $1 AND p.day >= v_month AND p.day <= v_day), 0);
    RETURN QUERY SELECT v_limits.membership_level, v_cost, v_limits.daily_cost_limit,
                        CASE WHEN v_limits.daily_cost_limit IS NOT NULL
                             THEN greatest(v_limits.daily_cost_limit - v_cost, 0) END,
                        COALESCE(v_cost < v_limits.daily_cost_limit, true)
                            AND COALESCE(v_month_cost < v_limits.monthly_cost_budget, true),
                        v_month_cost, v_limits.monthly_cost_budget,
                        CASE WHEN v_limits.monthly_cost_budget IS NOT NULL
                             THEN greatest(v_limits.monthly_cost_budget - v_month_cost, 0) END;
END;
$$;
COMMENT ON FUNCTION usage_agg.check_usage_limit(uuid, timestamptz) IS
    'Today''s and this month''s cost of a user against the daily_cost_limit and monthly_cost_budget that apply (plan or user_limits; NULL: none): remaining, and allowed when both are below their limits';

-- The quota functions take user_id, level and request_id in named notation
-- (they were p_user_id, p_level, p_request_id), and quota_status reports the
-- units used today. A parameter cannot be renamed in place, so these three are
-- dropped and created again; the roles they were granted to keep their grant
-- (the ACL is carried over as it was, so pg_dump still dumps those grants).
SELECT pg_catalog.set_config('usage_agg_update.acl_' || p.proname, COALESCE(p.proacl::text, ''), true)
  FROM pg_catalog.pg_proc p
 WHERE p.oid IN ('usage_agg.quota_status(uuid)'::pg_catalog.regprocedure,
                 'usage_agg.set_membership(uuid, text)'::pg_catalog.regprocedure,
                 'usage_agg.refund_quota(text)'::pg_catalog.regprocedure);
DROP FUNCTION usage_agg.quota_status(uuid);
DROP FUNCTION usage_agg.set_membership(uuid, text);
DROP FUNCTION usage_agg.refund_quota(text);
CREATE TYPE usage_agg.quota_status_result AS (
    user_id          uuid,
    membership_level text,
    monthly_quota    integer,
    monthly_used     integer,
    remaining        integer,
    quota_reset_at   timestamptz,
    total_used       bigint,
    percent_used     numeric,
    low_quota        boolean,
    next_plan        text,
    today_used       bigint
);
CREATE FUNCTION usage_agg.quota_status(user_id uuid)
RETURNS usage_agg.quota_status_result
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q usage_agg.quotas;
    v_pct numeric;
    v_tz text;
    v_today date;
BEGIN
    PERFORM usage_agg._check_user($1);
    q := usage_agg._lock_quota($1);
    v_pct := CASE WHEN q.monthly_quota = 0 THEN 100
                  ELSE round(100.0 * q.monthly_used / q.monthly_quota, 2) END;
    v_tz := usage_agg._timezone();
    v_today := (q.updated_at AT TIME ZONE v_tz)::date;
    RETURN ROW(q.user_id, q.membership_level, q.monthly_quota, q.monthly_used,
               usage_agg._remaining(q), q.quota_reset_at, q.total_used,
               v_pct, v_pct > 80, (usage_agg._next_plan(q.membership_level)).membership_level,
               COALESCE((SELECT sum(l.amount) FROM usage_agg.quota_usage_logs l
                          WHERE l.user_id = $1 AND l.refunded_at IS NULL
                            AND l.created_at >= usage_agg._day_start(v_today, v_tz)
                            AND l.created_at < usage_agg._day_start(v_today + 1, v_tz)), 0)
              )::usage_agg.quota_status_result;
END;
$$;
COMMENT ON FUNCTION usage_agg.quota_status(uuid) IS
    'The user''s quota state with percent used, a low-quota flag (above 80%), the next plan up and the units consumed today';
CREATE FUNCTION usage_agg.set_membership(user_id uuid, level text)
RETURNS usage_agg.quota_state
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q usage_agg.quotas;
    v_plan usage_agg.quota_plans;
BEGIN
    PERFORM usage_agg._check_user($1);
    SELECT * INTO v_plan FROM usage_agg.quota_plans p WHERE p.membership_level = $2;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'usage_agg: unknown plan %', coalesce(quote_literal($2), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('Known plans: %s.', (SELECT string_agg(p.membership_level, ', ' ORDER BY p.monthly_quota)
                                                      FROM usage_agg.quota_plans p));
    END IF;
    q := usage_agg._lock_quota($1);
    UPDATE usage_agg.quotas t
       SET membership_level = v_plan.membership_level, monthly_quota = v_plan.monthly_quota, updated_at = q.updated_at
     WHERE t.user_id = $1
    RETURNING * INTO q;
    RETURN usage_agg._state(q, true, false);
END;
$$;
COMMENT ON FUNCTION usage_agg.set_membership(uuid, text) IS
    'Moves the user to a plan at once, keeping what was used this month';
CREATE FUNCTION usage_agg.refund_quota(request_id text)
RETURNS usage_agg.quota_state
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_user uuid;
    v_log usage_agg.quota_usage_logs;
    q usage_agg.quotas;
    v_at timestamptz;
BEGIN
    IF $1 IS NULL THEN
        RAISE EXCEPTION 'usage_agg: request_id must not be NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT l.user_id INTO v_user FROM usage_agg.quota_usage_logs l WHERE l.request_id = $1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'usage_agg: no consumption with request_id %', $1
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Only calls made with a request_id can be refunded.';
    END IF;
    -- Same lock order as consume: the user's quota row first, then the log row.
    q := usage_agg._lock_quota(v_user);
    v_at := q.updated_at;
    SELECT * INTO v_log FROM usage_agg.quota_usage_logs l WHERE l.request_id = $1 FOR UPDATE;
    IF v_log.refunded_at IS NOT NULL THEN
        RETURN usage_agg._state(q, false, true);
    END IF;
    UPDATE usage_agg.quota_usage_logs l SET refunded_at = v_at WHERE l.id = v_log.id;
    -- Only a consumption of the current month gives monthly quota back.
    UPDATE usage_agg.quotas t
       SET monthly_used = CASE WHEN v_log.created_at >= usage_agg._month_before(q.quota_reset_at)
                               THEN greatest(t.monthly_used - v_log.amount, 0) ELSE t.monthly_used END,
           total_used = greatest(t.total_used - v_log.amount, 0),
           updated_at = v_at
     WHERE t.user_id = v_user
    RETURNING * INTO q;
    RETURN usage_agg._state(q, true, false);
END;
$$;
COMMENT ON FUNCTION usage_agg.refund_quota(text) IS
    'Gives back the consumption made with request_id, exactly once (allowed = true when refunded now, replayed = true when it already was)';
REVOKE EXECUTE ON FUNCTION usage_agg.quota_status(uuid), usage_agg.set_membership(uuid, text),
    usage_agg.refund_quota(text) FROM PUBLIC;
UPDATE pg_catalog.pg_proc p
   SET proacl = NULLIF(pg_catalog.current_setting('usage_agg_update.acl_' || p.proname), '')::pg_catalog.aclitem[]
 WHERE p.oid IN ('usage_agg.quota_status(uuid)'::pg_catalog.regprocedure,
                 'usage_agg.set_membership(uuid, text)'::pg_catalog.regprocedure,
                 'usage_agg.refund_quota(text)'::pg_catalog.regprocedure);

-- consume_quota and try_consume_quota: the common case in Rust (one kept
-- statement), the rest in _consume as before; SECURITY DEFINER without SET.
CREATE OR REPLACE FUNCTION usage_agg.consume_quota(user_id uuid, amount integer DEFAULT 1, session_id text DEFAULT NULL,
                                        request_id text DEFAULT NULL, tokens_used integer DEFAULT 0)
    RETURNS usage_agg.quota_state
    LANGUAGE c VOLATILE SECURITY DEFINER
    AS 'MODULE_PATHNAME', 'consume_quota_wrapper';
COMMENT ON FUNCTION usage_agg.consume_quota(uuid, integer, text, text, integer) IS
    'Atomically deducts amount from the user''s monthly quota and logs it; raises SQLSTATE UAQ01 (QUOTA_EXCEEDED) when it would be exceeded';
CREATE OR REPLACE FUNCTION usage_agg.try_consume_quota(user_id uuid, amount integer DEFAULT 1, session_id text DEFAULT NULL,
                                            request_id text DEFAULT NULL, tokens_used integer DEFAULT 0)
    RETURNS usage_agg.quota_state
    LANGUAGE c VOLATILE SECURITY DEFINER
    AS 'MODULE_PATHNAME', 'try_consume_quota_wrapper';
COMMENT ON FUNCTION usage_agg.try_consume_quota(uuid, integer, text, text, integer) IS
    'Like consume_quota, but returns allowed = false instead of raising when the quota would be exceeded';

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

REVOKE EXECUTE ON FUNCTION usage_agg._rebuild_key_day(date), usage_agg._cleanup_key_days(date),
    usage_agg._key_days_from_users(date),
    usage_agg.schedule_apply(text), usage_agg.unschedule_apply(),
    usage_agg._record_alerts(uuid, text, date, numeric, numeric, numeric, timestamptz),
    usage_agg._quota_alerts(uuid, integer, integer, integer, timestamptz, timestamptz),
    usage_agg._cost_alerts(uuid[], date[], numeric[]), usage_agg._lock_cost_months(uuid[], date[]),
    usage_agg.cleanup_old_quota_logs(interval) FROM PUBLIC;
-- The readers of user documents through _totals. usage_summary returns the
-- token kinds and unpriced calls too (new result columns): dropped and created
-- again, with its ACL carried over as the quota functions' above.
SELECT pg_catalog.set_config('usage_agg_update.acl_usage_summary', COALESCE(p.proacl::text, ''), true)
  FROM pg_catalog.pg_proc p WHERE p.oid = 'usage_agg.usage_summary(uuid, timestamptz)'::pg_catalog.regprocedure;
DROP FUNCTION usage_agg.usage_summary(uuid, timestamptz);
CREATE FUNCTION usage_agg.usage_summary(user_id uuid, at timestamptz DEFAULT now())
RETURNS TABLE (period text, calls bigint, successful bigint, failed bigint, tokens bigint, cost numeric,
               input_tokens bigint, output_tokens bigint, cache_read_tokens bigint, cache_write_tokens bigint,
               unpriced_calls bigint)
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
    -- request path of applications).
    RETURN QUERY
    WITH rows_of_user AS (
        SELECT d.date AS first_day, true AS is_day, t.calls, t.successful, t.failed, t.tokens, t.cost,
               t.input_tokens AS i, t.output_tokens AS o, t.cache_read_tokens AS cr, t.cache_write_tokens AS cw,
               t.unpriced_calls AS u
          FROM usage_agg.daily_logs d CROSS JOIN LATERAL usage_agg._totals(d.log_data) t
         WHERE d.user_id = $1 AND d.date <= v_day
        UNION ALL
        SELECT m.month, false, t.calls, t.successful, t.failed, t.tokens, t.cost,
               t.input_tokens, t.output_tokens, t.cache_read_tokens, t.cache_write_tokens, t.unpriced_calls
          FROM usage_agg.monthly_logs m CROSS JOIN LATERAL usage_agg._totals(m.log_data) t
         WHERE m.user_id = $1 AND m.month <= v_day
        UNION ALL
        -- Deferred mode: calls not folded into daily_logs yet.
        SELECT p.day, true, p.calls, p.successful, p.calls - p.successful, p.tokens, p.cost,
               p.input_tokens, p.output_tokens, p.cache_read_tokens, p.cache_write_tokens, p.unpriced
          FROM usage_agg.pending_deltas p
         WHERE p.user_id = $1 AND p.day <= v_day
    ), totals AS (
        SELECT sum(r.calls) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_calls,
               sum(r.successful) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_ok,
               sum(r.failed) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_failed,
               sum(r.tokens) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_tokens,
               sum(r.cost) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_cost,
               sum(r.i) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_i,
               sum(r.o) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_o,
               sum(r.cr) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_cr,
               sum(r.cw) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_cw,
               sum(r.u) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_u,
               sum(r.calls) FILTER (WHERE r.first_day >= v_month) AS m_calls,
               sum(r.successful) FILTER (WHERE r.first_day >= v_month) AS m_ok,
               sum(r.failed) FILTER (WHERE r.first_day >= v_month) AS m_failed,
               sum(r.tokens) FILTER (WHERE r.first_day >= v_month) AS m_tokens,
               sum(r.cost) FILTER (WHERE r.first_day >= v_month) AS m_cost,
               sum(r.i) FILTER (WHERE r.first_day >= v_month) AS m_i,
               sum(r.o) FILTER (WHERE r.first_day >= v_month) AS m_o,
               sum(r.cr) FILTER (WHERE r.first_day >= v_month) AS m_cr,
               sum(r.cw) FILTER (WHERE r.first_day >= v_month) AS m_cw,
               sum(r.u) FILTER (WHERE r.first_day >= v_month) AS m_u,
               sum(r.calls) AS a_calls, sum(r.successful) AS a_ok, sum(r.failed) AS a_failed,
               sum(r.tokens) AS a_tokens, sum(r.cost) AS a_cost,
               sum(r.i) AS a_i, sum(r.o) AS a_o, sum(r.cr) AS a_cr, sum(r.cw) AS a_cw, sum(r.u) AS a_u
          FROM rows_of_user r
    )
    SELECT w.period,
           CASE WHEN w.known THEN COALESCE(w.calls, 0)::bigint END,
           CASE WHEN w.known THEN COALESCE(w.ok, 0)::bigint END,
           CASE WHEN w.known THEN COALESCE(w.failed, 0)::bigint END,
           CASE WHEN w.known THEN COALESCE(w.tokens, 0)::bigint END,
           CASE WHEN w.known THEN COALESCE(w.cost, 0) END,
           CASE WHEN w.known THEN COALESCE(w.i, 0)::bigint END,
           CASE WHEN w.known THEN COALESCE(w.o, 0)::bigint END,
           CASE WHEN w.known THEN COALESCE(w.cr, 0)::bigint END,
           CASE WHEN w.known THEN COALESCE(w.cw, 0)::bigint END,
           CASE WHEN w.known THEN COALESCE(w.u, 0)::bigint END
      FROM totals t
     CROSS JOIN LATERAL (VALUES
           (1, 'today', v_today_known, t.d_calls, t.d_ok, t.d_failed, t.d_tokens, t.d_cost,
            t.d_i, t.d_o, t.d_cr, t.d_cw, t.d_u),
           (2, 'month', true, t.m_calls, t.m_ok, t.m_failed, t.m_tokens, t.m_cost,
            t.m_i, t.m_o, t.m_cr, t.m_cw, t.m_u),
           (3, 'all_time', true, t.a_calls, t.a_ok, t.a_failed, t.a_tokens, t.a_cost,
            t.a_i, t.a_o, t.a_cr, t.a_cw, t.a_u))
           AS w(ord, period, known, calls, ok, failed, tokens, cost, i, o, cr, cw, u)
     ORDER BY w.ord;
END;
$$;
COMMENT ON FUNCTION usage_agg.usage_summary(uuid, timestamptz) IS
    'Calls, successful, failed, tokens and cost of a user for today, this month and all time, as of at (business time zone), from the aggregates only';
UPDATE pg_catalog.pg_proc p
   SET proacl = NULLIF(pg_catalog.current_setting('usage_agg_update.acl_usage_summary'), '')::pg_catalog.aclitem[]
 WHERE p.oid = 'usage_agg.usage_summary(uuid, timestamptz)'::pg_catalog.regprocedure;
CREATE OR REPLACE VIEW usage_agg.daily_usage AS
SELECT d.user_id,
       d.date,
       t.calls,
       t.successful AS successful_calls,
       t.failed AS failed_calls,
       t.tokens AS tokens_used,
       t.cost AS estimated_cost,
       CASE WHEN jsonb_typeof(d.log_data->'shared_service_usage'->'keys_used') = 'array'
            THEN jsonb_array_length(d.log_data->'shared_service_usage'->'keys_used') ELSE 0 END AS keys_used,
       t.last_api_call_at,
       t.input_tokens, t.output_tokens, t.cache_read_tokens, t.cache_write_tokens, t.unpriced_calls
  FROM usage_agg.daily_logs d CROSS JOIN LATERAL usage_agg._totals(d.log_data) t;
COMMENT ON VIEW usage_agg.daily_usage IS 'daily_logs as plain columns (one row per user and business day)';
CREATE OR REPLACE VIEW usage_agg.monthly_usage AS
SELECT u.user_id, u.month,
       sum(u.calls)::bigint AS calls,
       sum(u.successful_calls)::bigint AS successful_calls,
       sum(u.failed_calls)::bigint AS failed_calls,
       sum(u.tokens_used)::bigint AS tokens_used,
       sum(u.estimated_cost) AS estimated_cost,
       max(u.last_api_call_at) AS last_api_call_at,
       sum(u.input_tokens)::bigint AS input_tokens, sum(u.output_tokens)::bigint AS output_tokens,
       sum(u.cache_read_tokens)::bigint AS cache_read_tokens,
       sum(u.cache_write_tokens)::bigint AS cache_write_tokens, sum(u.unpriced_calls)::bigint AS unpriced_calls
  FROM (SELECT m.user_id, m.month, t.calls, t.successful AS successful_calls, t.failed AS failed_calls,
               t.tokens AS tokens_used, t.cost AS estimated_cost, t.last_api_call_at,
               t.input_tokens, t.output_tokens, t.cache_read_tokens, t.cache_write_tokens, t.unpriced_calls
          FROM usage_agg.monthly_logs m CROSS JOIN LATERAL usage_agg._totals(m.log_data) t
        UNION ALL
        SELECT d.user_id, date_trunc('month', d.date::timestamp)::date,
               d.calls, d.successful_calls, d.failed_calls, d.tokens_used, d.estimated_cost, d.last_api_call_at,
               d.input_tokens, d.output_tokens, d.cache_read_tokens, d.cache_write_tokens, d.unpriced_calls
          FROM usage_agg.daily_usage d) u
 GROUP BY u.user_id, u.month;
COMMENT ON VIEW usage_agg.monthly_usage IS
    'Usage per user and calendar month (business time zone): monthly_logs plus the daily_logs days not rolled up yet';
CREATE OR REPLACE VIEW usage_agg.daily_usage_by_model AS
SELECT d.user_id, d.date, c.name AS model, c.calls, c.tokens, c.cost, c.input_tokens, c.output_tokens, c.cache_read_tokens, c.cache_write_tokens, c.unpriced_calls
  FROM usage_agg.daily_logs d CROSS JOIN LATERAL usage_agg._document_cells(d.log_data, 'by_model') c;
COMMENT ON VIEW usage_agg.daily_usage_by_model IS 'One row per user, business day and model';
CREATE OR REPLACE VIEW usage_agg.daily_usage_by_key AS
SELECT d.user_id, d.date, c.name::uuid AS shared_key_id, c.calls, c.tokens, c.cost, c.input_tokens, c.output_tokens, c.cache_read_tokens, c.cache_write_tokens, c.unpriced_calls
  FROM usage_agg.daily_logs d CROSS JOIN LATERAL usage_agg._document_cells(d.log_data, 'by_key') c;
COMMENT ON VIEW usage_agg.daily_usage_by_key IS 'One row per user, business day and shared key';
CREATE OR REPLACE VIEW usage_agg.monthly_usage_by_model AS
SELECT u.user_id, u.month, u.model, sum(u.calls)::bigint AS calls, sum(u.tokens)::bigint AS tokens, sum(u.cost) AS cost,
       sum(u.input_tokens)::bigint AS input_tokens, sum(u.output_tokens)::bigint AS output_tokens,
       sum(u.cache_read_tokens)::bigint AS cache_read_tokens,
       sum(u.cache_write_tokens)::bigint AS cache_write_tokens, sum(u.unpriced_calls)::bigint AS unpriced_calls
  FROM (SELECT m.user_id, m.month, c.name AS model, c.calls, c.tokens, c.cost, c.input_tokens, c.output_tokens, c.cache_read_tokens, c.cache_write_tokens, c.unpriced_calls
          FROM usage_agg.monthly_logs m CROSS JOIN LATERAL usage_agg._document_cells(m.log_data, 'by_model') c
        UNION ALL
        SELECT d.user_id, date_trunc('month', d.date::timestamp)::date, d.model, d.calls, d.tokens, d.cost, d.input_tokens, d.output_tokens, d.cache_read_tokens, d.cache_write_tokens, d.unpriced_calls
          FROM usage_agg.daily_usage_by_model d) u
 GROUP BY u.user_id, u.month, u.model;
COMMENT ON VIEW usage_agg.monthly_usage_by_model IS 'One row per user, calendar month and model';
CREATE OR REPLACE VIEW usage_agg.monthly_usage_by_key AS
SELECT u.user_id, u.month, u.shared_key_id, sum(u.calls)::bigint AS calls, sum(u.tokens)::bigint AS tokens, sum(u.cost) AS cost,
       sum(u.input_tokens)::bigint AS input_tokens, sum(u.output_tokens)::bigint AS output_tokens,
       sum(u.cache_read_tokens)::bigint AS cache_read_tokens,
       sum(u.cache_write_tokens)::bigint AS cache_write_tokens, sum(u.unpriced_calls)::bigint AS unpriced_calls
  FROM (SELECT m.user_id, m.month, c.name::uuid AS shared_key_id, c.calls, c.tokens, c.cost, c.input_tokens, c.output_tokens, c.cache_read_tokens, c.cache_write_tokens, c.unpriced_calls
          FROM usage_agg.monthly_logs m CROSS JOIN LATERAL usage_agg._document_cells(m.log_data, 'by_key') c
        UNION ALL
        SELECT d.user_id, date_trunc('month', d.date::timestamp)::date, d.shared_key_id, d.calls, d.tokens, d.cost, d.input_tokens, d.output_tokens, d.cache_read_tokens, d.cache_write_tokens, d.unpriced_calls
          FROM usage_agg.daily_usage_by_key d) u
 GROUP BY u.user_id, u.month, u.shared_key_id;
COMMENT ON VIEW usage_agg.monthly_usage_by_key IS 'One row per user, calendar month and shared key';
-- Replaced by _document_cells (which reads the token kinds too).
DROP FUNCTION usage_agg._cells(jsonb, text);

-- CREATE OR REPLACE VIEW resets the view's options.
ALTER VIEW usage_agg.daily_usage SET (security_invoker = true);
ALTER VIEW usage_agg.monthly_usage SET (security_invoker = true);
ALTER VIEW usage_agg.daily_usage_by_model SET (security_invoker = true);
ALTER VIEW usage_agg.daily_usage_by_key SET (security_invoker = true);
ALTER VIEW usage_agg.monthly_usage_by_model SET (security_invoker = true);
ALTER VIEW usage_agg.monthly_usage_by_key SET (security_invoker = true);
ALTER VIEW usage_agg.maintenance_health SET (security_invoker = true);
ALTER VIEW usage_agg.key_daily_usage SET (security_invoker = true);
ALTER VIEW usage_agg.key_daily_usage_by_model SET (security_invoker = true);
ALTER VIEW usage_agg.key_monthly_usage SET (security_invoker = true);
ALTER VIEW usage_agg.key_health SET (security_invoker = true);
ALTER VIEW usage_agg.service_daily_usage SET (security_invoker = true);
ALTER VIEW usage_agg.service_monthly_usage SET (security_invoker = true);
ALTER VIEW usage_agg.hourly_usage SET (security_invoker = true);
ALTER VIEW usage_agg.key_hourly_usage SET (security_invoker = true);
REVOKE EXECUTE ON FUNCTION usage_agg.cleanup_old_hourly_logs(interval), usage_agg._rebuild_hours(date) FROM PUBLIC;
ALTER VIEW usage_agg.unpriced_calls SET (security_invoker = true);
REVOKE EXECUTE ON FUNCTION usage_agg.reprice_calls(timestamptz, timestamptz, integer) FROM PUBLIC;
-- Citus: usage_agg.distribute() and what it needs (docs/citus.md).
-- From sql/citus.sql:
-- ---------------------------------------------------------------------------
-- Citus: usage_agg.distribute(), called once by the administrator on the
-- coordinator after CREATE EXTENSION (not from this script: it runs again on
-- every node Citus propagates the extension to). docs/citus.md.
-- ---------------------------------------------------------------------------

-- What distribute() does, table by table, in the order it does it: the
-- per-user tables colocated with key_usage_logs by user_id, the per-key ones
-- colocated by shared_key_id, and the small ones every node reads as reference
-- tables. The pending tables stay local to each node: the fold on a worker's
-- shard appends to them and that node's applier folds them; so does
-- fold_skipped, that applier's own record of the days it could not fold.
CREATE FUNCTION usage_agg._citus_layout()
RETURNS TABLE (table_name text, placement text, column_name text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT t.table_name, t.placement, t.column_name
      FROM (VALUES
        (1, 'config', 'reference', NULL),
        (2, 'retention_horizon', 'reference', NULL),
        (3, 'quota_plans', 'reference', NULL),
        (4, 'model_prices', 'reference', NULL),
        (5, 'service_daily_logs', 'reference', NULL),
        (6, 'service_monthly_logs', 'reference', NULL),
        -- Read by the fold on every shard (are cost limits in use?), where
        -- only reference tables can be read; one row per user with an override.
        (6, 'user_limits', 'reference', NULL),
        (7, 'key_usage_logs', 'by user', 'user_id'),
        (8, 'daily_logs', 'by user', 'user_id'),
        (9, 'monthly_logs', 'by user', 'user_id'),
        (10, 'hourly_logs', 'by user', 'user_id'),
        (13, 'quotas', 'by user', 'user_id'),
        (14, 'quota_usage_logs', 'by user', 'user_id'),
        (15, 'alerts', 'by user', 'user_id'),
        (16, 'key_daily_logs', 'by key', 'shared_key_id'),
        (17, 'key_monthly_logs', 'by key', 'shared_key_id'),
        (18, 'key_hourly_logs', 'by key', 'shared_key_id')
      ) AS t (ord, table_name, placement, column_name)
     ORDER BY t.ord;
END;

COMMENT ON FUNCTION usage_agg._citus_layout() IS
    'The tables usage_agg.distribute() places on a Citus cluster, in its order: reference tables, tables distributed by user_id (colocated with key_usage_logs) and by shared_key_id.';

-- On each node, before distribute() places the tables: a distributed table's
-- unique constraints must include its distribution column, so the primary keys
-- become (user_id, id) and a request_id is unique per user; the names stay, so
-- ON CONFLICT ON CONSTRAINT keeps working. quotas loses its foreign key to
-- quota_plans until both are placed (Citus would otherwise convert quotas when
-- quota_plans becomes a reference table). Idempotent: a distribute() that
-- failed half-way runs it again.
CREATE FUNCTION usage_agg._citus_prepare_node() RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_key record;
BEGIN
    FOR v_key IN
        SELECT * FROM (VALUES
            ('key_usage_logs', 'key_usage_logs_pkey', 'PRIMARY KEY (user_id, id)'),
            ('key_usage_logs', 'key_usage_logs_request_id_key', 'UNIQUE (user_id, request_id)'),
            ('daily_logs', 'daily_logs_pkey', 'PRIMARY KEY (user_id, id)'),
            ('monthly_logs', 'monthly_logs_pkey', 'PRIMARY KEY (user_id, id)'),
            ('quota_usage_logs', 'quota_usage_logs_pkey', 'PRIMARY KEY (user_id, id)'),
            ('quota_usage_logs', 'quota_usage_logs_request_id_key', 'UNIQUE (user_id, request_id)'),
            ('alerts', 'alerts_pkey', 'PRIMARY KEY (user_id, id)')
        ) AS k (table_name, constraint_name, definition)
    LOOP
        IF EXISTS (SELECT 1 FROM pg_constraint c
                    WHERE c.conrelid = pg_catalog.to_regclass('usage_agg.' || v_key.table_name)
                      AND c.conname = v_key.constraint_name
                      AND pg_catalog.array_length(c.conkey, 1) = 1) THEN
            -- Names and definitions come from the list above, not from input.
            EXECUTE format('ALTER TABLE usage_agg.%I DROP CONSTRAINT %I, ADD CONSTRAINT %I %s',
                           v_key.table_name, v_key.constraint_name, v_key.constraint_name,
                           v_key.definition);
        END IF;
    END LOOP;
    ALTER TABLE usage_agg.quotas DROP CONSTRAINT IF EXISTS quotas_membership_level_fkey;
END;
$$;

CREATE FUNCTION usage_agg.distribute()
RETURNS TABLE (table_name text, placement text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_table    record;
    v_rel      regclass;
    v_first    regclass;
    v_key_first regclass;
    v_found    boolean;
    v_worker   record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RAISE EXCEPTION 'Citus is not installed in this database'
            USING ERRCODE = '55000',
                  DETAIL = 'usage_agg.distribute() places the usage_agg tables on a Citus cluster.',
                  HINT = 'Preload citus (shared_preload_libraries = ''citus,usage_agg''), CREATE EXTENSION citus and add the worker nodes first; on a single server nothing needs distributing.';
    END IF;
    IF NOT pg_catalog.citus_is_coordinator() THEN
        RAISE EXCEPTION 'usage_agg.distribute() must be called on the coordinator'
            USING ERRCODE = '55000',
                  DETAIL = 'This node is a Citus worker: the tables are distributed from the coordinator, which sends them to every worker.',
                  HINT = 'Connect to the coordinator and call it there.';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_dist_partition
                WHERE logicalrelid = 'usage_agg.key_usage_logs'::regclass) THEN
        RAISE NOTICE 'usage_agg is distributed already: nothing to do';
        RETURN;
    END IF;
    -- Citus copies a table's rows into its shards as inserts, which would fire
    -- the fold again on the worker: the tables that hold usage start empty.
    FOR v_table IN
        SELECT l.table_name FROM usage_agg._citus_layout() l
         WHERE l.placement <> 'reference' OR l.table_name LIKE 'service\_%'
        UNION ALL
        SELECT unnest(ARRAY['pending_deltas', 'pending_key_deltas', 'pending_key_hour_deltas'])
    LOOP
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM usage_agg.%I)', v_table.table_name) INTO v_found;
        IF v_found THEN
            RAISE EXCEPTION 'usage_agg cannot be distributed: usage_agg.% has rows', v_table.table_name
                USING ERRCODE = '55000',
                      DETAIL = 'distribute() places the tables of a fresh installation; copying existing usage into the shards would fold it a second time.',
                      HINT = 'Call it right after CREATE EXTENSION, then load existing calls through the coordinator (INSERT ... SELECT or COPY into usage_agg.key_usage_logs): the fold aggregates them on the workers.';
        END IF;
    END LOOP;
    IF (SELECT c.fold_mode FROM usage_agg.config c) = 'immediate' THEN
        RAISE EXCEPTION 'usage_agg cannot be distributed while config.fold_mode is ''immediate'''
            USING ERRCODE = '55000',
                  DETAIL = 'On Citus the fold runs on the worker holding the call''s shard, which cannot write the per-key and service aggregates on other nodes from there; the asynchronous fold hands them to that node''s applier.',
                  HINT = 'UPDATE usage_agg.config SET fold_mode = ''auto'' first.';
    END IF;
    IF pg_catalog.current_setting('shared_preload_libraries') !~ '(^|[ ,])usage_agg([ ,]|$)' THEN
        RAISE WARNING 'usage_agg is not in shared_preload_libraries on the coordinator'
            USING DETAIL = 'Each node that holds shards needs the background applier: preload usage_agg there too.';
    END IF;

    -- The fold's triggers go with key_usage_logs to every shard; Citus asks
    -- for this to accept triggers on distributed and reference tables.
    PERFORM pg_catalog.set_config('citus.enable_unsafe_triggers', 'on', true);
    -- Shards created one connection per node, so that the foreign key of
    -- quotas can be added in the same transaction (Citus refuses it after a
    -- parallel operation).
    PERFORM pg_catalog.set_config('citus.multi_shard_modify_mode', 'sequential', true);

    -- Every node's copy of the tables (the worker's are shells Citus keeps as
    -- they are) gets the keys a distributed table needs.
    PERFORM usage_agg._citus_prepare_node();
    FOR v_worker IN SELECT * FROM pg_catalog.run_command_on_workers(
                        'SELECT usage_agg._citus_prepare_node()') LOOP
        IF NOT v_worker.success THEN
            RAISE EXCEPTION 'usage_agg cannot be distributed: worker %:% failed to prepare its tables',
                            v_worker.nodename, v_worker.nodeport
                USING ERRCODE = '55000',
                      DETAIL = v_worker.result,
                      HINT = 'Check that usage_agg is installed on every worker (CREATE EXTENSION on the coordinator sends it), then call distribute() again.';
        END IF;
    END LOOP;

    FOR v_table IN SELECT * FROM usage_agg._citus_layout() LOOP
        v_rel := pg_catalog.to_regclass('usage_agg.' || v_table.table_name);
        IF v_table.placement = 'reference' THEN
            PERFORM pg_catalog.create_reference_table(v_rel);
        ELSIF v_table.placement = 'by user' THEN
            PERFORM pg_catalog.create_distributed_table(v_rel, v_table.column_name,
                colocate_with => coalesce(v_first::text, 'none'));
            v_first := coalesce(v_first, v_rel);
        ELSE
            PERFORM pg_catalog.create_distributed_table(v_rel, v_table.column_name,
                colocate_with => coalesce(v_key_first::text, 'none'));
            v_key_first := coalesce(v_key_first, v_rel);
        END IF;
        table_name := v_table.table_name;
        placement := v_table.placement;
        RETURN NEXT;
    END LOOP;
    ALTER TABLE usage_agg.quotas
        ADD CONSTRAINT quotas_membership_level_fkey FOREIGN KEY (membership_level)
            REFERENCES usage_agg.quota_plans (membership_level) ON UPDATE CASCADE;
END;
$$;

COMMENT ON FUNCTION usage_agg.distribute() IS
    'On a Citus coordinator: distributes the per-user tables by user_id (colocated with key_usage_logs), the per-key aggregates by shared_key_id and makes the small tables reference tables. Once, after CREATE EXTENSION; see docs/citus.md.';

-- On Citus a change of a plan's monthly_quota cannot reach its members from the
-- trigger (it fires on each node's shard of quota_plans, where a distributed
-- UPDATE cannot run): the administrator calls this after such a change.
CREATE FUNCTION usage_agg.sync_plan_quotas() RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_changed bigint;
BEGIN
    UPDATE usage_agg.quotas q
       SET monthly_quota = p.monthly_quota, updated_at = now()
      FROM usage_agg.quota_plans p
     WHERE p.membership_level = q.membership_level
       AND q.monthly_quota IS DISTINCT FROM p.monthly_quota;
    GET DIAGNOSTICS v_changed = ROW_COUNT;
    RETURN v_changed;
END;
$$;

COMMENT ON FUNCTION usage_agg.sync_plan_quotas() IS
    'Gives every user its plan''s current monthly_quota; returns how many changed. On one server the quota_plans trigger does this at once; on Citus call it after changing a plan (docs/citus.md).';
REVOKE EXECUTE ON FUNCTION usage_agg.distribute(), usage_agg._citus_prepare_node(),
    usage_agg.sync_plan_quotas() FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- Filling the new tables from what the database holds.
-- ---------------------------------------------------------------------------

-- The calls still pending are folded into daily_logs now (a (user, day) the
-- applier could not fold stays pending), so that every call of a day with
-- detail has its day row and cell for the unpriced counts below.
WITH range AS (
    SELECT min(p.day) AS first_day, max(p.day) AS last_day FROM usage_agg.pending_deltas p
), pending AS (
    SELECT a.user_id, a.date, a.log_data
      FROM range r CROSS JOIN LATERAL usage_agg._aggregates(r.first_day, r.last_day) a
     WHERE r.first_day IS NOT NULL AND a.source = 'pending'
       AND NOT EXISTS (SELECT 1 FROM usage_agg.fold_skipped s WHERE s.user_id = a.user_id AND s.day = a.date)
), folded AS (
    INSERT INTO usage_agg.daily_logs AS d (user_id, date, log_data, last_modified)
    SELECT p.user_id, p.date, p.log_data, now() FROM pending p
    ON CONFLICT (user_id, date) DO UPDATE
       SET log_data = usage_agg._rollup_merge(d.log_data, EXCLUDED.log_data), last_modified = now()
    RETURNING d.user_id, d.date
)
DELETE FROM usage_agg.pending_deltas q USING folded f WHERE q.user_id = f.user_id AND q.day = f.date;

-- Calls without a cost in the days that have detail: unpriced_calls of the day,
-- its models and its keys. (No call of 0.3.0 reports token kinds.) Months and
-- days without detail cannot tell and count none.
WITH horizon AS (
    SELECT h.detail_kept_from AS day, usage_agg._timezone() AS tz FROM usage_agg.retention_horizon h
), calls AS (
    SELECT k.user_id, (k.created_at AT TIME ZONE h.tz)::date AS day, k.model_used AS model,
           k.shared_key_id::text AS key
      FROM usage_agg.key_usage_logs k, horizon h
     WHERE k.cost_estimate IS NULL AND k.created_at >= usage_agg._day_start(h.day, h.tz)
), per_day AS (
    SELECT c.user_id, c.day, count(*) AS n FROM calls c GROUP BY c.user_id, c.day
), per_model AS (
    SELECT m.user_id, m.day, jsonb_object_agg(m.model, jsonb_build_object('unpriced_calls', m.n)) AS cells
      FROM (SELECT c.user_id, c.day, c.model, count(*) AS n FROM calls c WHERE c.model IS NOT NULL
             GROUP BY c.user_id, c.day, c.model) m
     GROUP BY m.user_id, m.day
), per_key AS (
    SELECT k.user_id, k.day, jsonb_object_agg(k.key, jsonb_build_object('unpriced_calls', k.n)) AS cells
      FROM (SELECT c.user_id, c.day, c.key, count(*) AS n FROM calls c WHERE c.key IS NOT NULL
             GROUP BY c.user_id, c.day, c.key) k
     GROUP BY k.user_id, k.day
)
UPDATE usage_agg.daily_logs d
   SET log_data = usage_agg._rollup_merge(d.log_data, jsonb_build_object('shared_service_usage', jsonb_build_object(
           'unpriced_calls', p.n, 'by_model', COALESCE(m.cells, '{}'::jsonb), 'by_key', COALESCE(k.cells, '{}'::jsonb))))
  FROM per_day p
  LEFT JOIN per_model m ON m.user_id = p.user_id AND m.day = p.day
  LEFT JOIN per_key k ON k.user_id = p.user_id AND k.day = p.day
 WHERE d.user_id = p.user_id AND d.date = p.day
   AND NOT EXISTS (SELECT 1 FROM usage_agg.pending_deltas q WHERE q.user_id = p.user_id AND q.day = p.day);

-- Days with detail: a GROUP BY over it, less the calls still pending (the
-- next apply adds those, as it does for every pending call). Users of a key (or
-- of the service) on a day: the users whose day row lists the key (has calls).
WITH horizon AS (
    SELECT h.detail_kept_from AS day, usage_agg._timezone() AS tz FROM usage_agg.retention_horizon h
), calls AS (
    SELECT k.shared_key_id AS key, (k.created_at AT TIME ZONE h.tz)::date AS day, k.model_used AS model,
           1 AS n, CASE WHEN k.success THEN 1 ELSE 0 END AS ok, COALESCE(k.tokens_used, 0)::bigint AS tokens,
           COALESCE(k.cost_estimate, 0) AS cost, k.created_at AS at,
           CASE WHEN NOT k.success THEN k.created_at END AS failed_at,
           CASE WHEN k.cost_estimate IS NULL THEN 1 ELSE 0 END AS unpriced
      FROM usage_agg.key_usage_logs k, horizon h
     WHERE k.created_at >= usage_agg._day_start(h.day, h.tz)
    UNION ALL
    -- (Their unpriced calls are counted here: the apply adds none for them.)
    SELECT p.shared_key_id, p.day, p.model_used, -p.calls, -p.successful, -p.tokens, -p.cost, NULL, NULL, 0
      FROM usage_agg.pending_deltas p, horizon h
     WHERE p.day >= h.day
), scoped AS (
    SELECT c.key AS scope, c.* FROM calls c WHERE c.key IS NOT NULL
    UNION ALL
    SELECT NULL::uuid, c.* FROM calls c
), per_model AS (
    SELECT m.scope, m.day,
           jsonb_object_agg(m.model, jsonb_build_object('calls', m.n, 'failed', m.failed,
                                                        'tokens', m.tokens, 'cost', m.cost)
                                     || usage_agg._kinds_json(0, 0, 0, 0, m.unpriced)) AS by_model
      FROM (SELECT s.scope, s.day, s.model, sum(s.n) AS n, sum(s.n - s.ok) AS failed,
                   sum(s.tokens) AS tokens, sum(s.cost) AS cost, sum(s.unpriced) AS unpriced
              FROM scoped s WHERE s.model IS NOT NULL
             GROUP BY s.scope, s.day, s.model
            HAVING sum(s.n) <> 0 OR sum(s.tokens) <> 0 OR sum(s.cost) <> 0 OR sum(s.unpriced) <> 0) m
     GROUP BY m.scope, m.day
), per_day AS (
    SELECT s.scope, s.day, sum(s.n) AS n, sum(s.ok) AS ok, sum(s.tokens) AS tokens, sum(s.cost) AS cost,
           max(s.at) AS at, max(s.failed_at) AS failed_at, sum(s.unpriced) AS unpriced
      FROM scoped s GROUP BY s.scope, s.day
), docs AS (
    SELECT d.scope, d.day,
           jsonb_build_object(
               'total_calls', d.n, 'successful_calls', d.ok, 'failed_calls', d.n - d.ok,
               'tokens_used', d.tokens, 'estimated_cost', d.cost,
               'users', CASE WHEN d.scope IS NULL
                             THEN (SELECT count(*) FROM usage_agg.daily_logs u
                                    WHERE u.date = d.day AND u.log_data->'api_call_count' > '0'::jsonb)
                             ELSE (SELECT count(*) FROM usage_agg.daily_logs u
                                    WHERE u.date = d.day
                                      AND u.log_data->'shared_service_usage'->'by_key' ? d.scope::text) END,
               'by_model', COALESCE(m.by_model, '{}'::jsonb),
               'last_call_at', usage_agg._iso_utc(d.at),
               'last_failure_at', usage_agg._iso_utc(d.failed_at))
           || usage_agg._kinds_json(0, 0, 0, 0, d.unpriced) AS log_data
      FROM per_day d
      LEFT JOIN per_model m ON m.scope IS NOT DISTINCT FROM d.scope AND m.day = d.day
     WHERE d.n <> 0 OR d.tokens <> 0 OR d.cost <> 0 OR d.unpriced <> 0
), keys AS (
    INSERT INTO usage_agg.key_daily_logs (shared_key_id, date, log_data)
    SELECT d.scope, d.day, d.log_data FROM docs d WHERE d.scope IS NOT NULL
    RETURNING 1
)
INSERT INTO usage_agg.service_daily_logs (date, log_data)
SELECT d.day, d.log_data FROM docs d WHERE d.scope IS NULL;

-- Days whose detail expired: from the users' daily rows (what cannot be
-- recovered there is null, see _key_days_from_users).
SELECT usage_agg._key_days_from_users((SELECT h.detail_kept_from FROM usage_agg.retention_horizon h));

-- Months rolled up already: the same from the users' monthly rows.
INSERT INTO usage_agg.key_monthly_logs (shared_key_id, month, log_data)
SELECT c.key::uuid, m.month,
       jsonb_build_object(
           'total_calls', sum((c.value->>'calls')::bigint), 'successful_calls', NULL, 'failed_calls', NULL,
           'tokens_used', sum((c.value->>'tokens')::bigint), 'estimated_cost', sum((c.value->>'cost')::numeric),
           'by_model', '{}'::jsonb, 'last_call_at', NULL, 'last_failure_at', NULL,
           'recovered_from', 'monthly_logs.by_key')
  FROM usage_agg.monthly_logs m
 CROSS JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(m.log_data->'shared_service_usage'->'by_key') = 'object'
                                    THEN m.log_data->'shared_service_usage'->'by_key' ELSE '{}'::jsonb END) c
 WHERE (c.value->>'calls')::bigint > 0
 GROUP BY c.key, m.month;

INSERT INTO usage_agg.service_monthly_logs (month, log_data)
SELECT m.month,
       jsonb_build_object(
           'total_calls', sum((m.log_data->>'api_call_count')::bigint),
           'successful_calls', sum((m.log_data->'shared_service_usage'->>'successful_calls')::bigint),
           'failed_calls', sum((m.log_data->'shared_service_usage'->>'failed_calls')::bigint),
           'tokens_used', sum((m.log_data->'shared_service_usage'->>'tokens_used')::bigint),
           'estimated_cost', sum((m.log_data->'shared_service_usage'->>'estimated_cost')::numeric),
           'by_model', '{}'::jsonb,
           'last_call_at', usage_agg._iso_utc(max((m.log_data->>'last_api_call_at')::timestamptz)),
           'last_failure_at', NULL,
           'recovered_from', 'monthly_logs')
  FROM usage_agg.monthly_logs m
 GROUP BY m.month;

-- Hours with detail: a GROUP BY over it, less the calls still pending, each
-- at the hour of its pending row's newest call (where the readers and the next
-- apply put them), so the hours are exact at once and after that apply.
WITH horizon AS (
    SELECT h.detail_kept_from AS day, usage_agg._timezone() AS tz FROM usage_agg.retention_horizon h
), calls AS (
    SELECT k.user_id, k.shared_key_id AS key, usage_agg._hour_start(k.created_at, h.tz) AS hour,
           1 AS n, CASE WHEN k.success THEN 1 ELSE 0 END AS ok, COALESCE(k.tokens_used, 0)::bigint AS tokens,
           COALESCE(k.cost_estimate, 0) AS cost
      FROM usage_agg.key_usage_logs k, horizon h
     WHERE k.created_at >= usage_agg._day_start(h.day, h.tz)
    UNION ALL
    SELECT p.user_id, p.shared_key_id, usage_agg._hour_start(p.last_at, h.tz), -p.calls, -p.successful,
           -p.tokens, -p.cost
      FROM usage_agg.pending_deltas p, horizon h
     WHERE p.last_at >= usage_agg._day_start(h.day, h.tz)
), users AS (
    INSERT INTO usage_agg.hourly_logs (user_id, hour, calls, successful, tokens, cost)
    SELECT c.user_id, c.hour, sum(c.n), sum(c.ok), sum(c.tokens), sum(c.cost)
      FROM calls c GROUP BY c.user_id, c.hour
    HAVING sum(c.n) <> 0 OR sum(c.tokens) <> 0 OR sum(c.cost) <> 0
    RETURNING 1
)
INSERT INTO usage_agg.key_hourly_logs (shared_key_id, hour, calls, successful, tokens, cost)
SELECT c.key, c.hour, sum(c.n), sum(c.ok), sum(c.tokens), sum(c.cost)
  FROM calls c WHERE c.key IS NOT NULL GROUP BY c.key, c.hour
HAVING sum(c.n) <> 0 OR sum(c.tokens) <> 0 OR sum(c.cost) <> 0;
