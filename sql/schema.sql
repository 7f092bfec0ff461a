-- usage_agg: tables and configuration.
-- Every name is schema-qualified and every function pins its search_path, so a
-- caller's search_path cannot redirect what the extension does.

-- ---------------------------------------------------------------------------
-- Configuration: one typed row, validated on change.
-- ---------------------------------------------------------------------------
CREATE TABLE usage_agg.config (
    timezone           text     NOT NULL DEFAULT 'UTC',
    detail_retention   interval NOT NULL DEFAULT '30 days',
    daily_retention    interval NOT NULL DEFAULT '90 days',
    cleanup_batch_size integer  NOT NULL DEFAULT 10000,
    fold_mode          text     NOT NULL DEFAULT 'auto',
    apply_interval     interval NOT NULL DEFAULT '100 milliseconds',
    pending_alert_after interval NOT NULL DEFAULT '5 minutes',
    verify_recent_days integer  NOT NULL DEFAULT 2,
    repair_drift       boolean  NOT NULL DEFAULT false,
    CONSTRAINT config_verify_recent_days_range CHECK (verify_recent_days BETWEEN 0 AND 366),
    CONSTRAINT config_fold_mode_known CHECK (fold_mode IN ('auto', 'async', 'immediate')),
    CONSTRAINT config_apply_interval_range CHECK (apply_interval BETWEEN interval '10 milliseconds' AND interval '1 hour'),
    CONSTRAINT config_pending_alert_after_positive CHECK (pending_alert_after > interval '0'),
    CONSTRAINT config_detail_retention_positive CHECK (detail_retention > interval '0'),
    CONSTRAINT config_daily_retention_covers_detail CHECK (daily_retention >= detail_retention),
    CONSTRAINT config_cleanup_batch_size_range CHECK (cleanup_batch_size BETWEEN 1 AND 1000000),
    -- Added in 0.4.0 (last, as ALTER TABLE ... ADD COLUMN puts it).
    alert_thresholds   numeric[] NOT NULL DEFAULT '{80,100}',
    CONSTRAINT config_alert_thresholds_range CHECK (
        cardinality(alert_thresholds) <= 10 AND array_position(alert_thresholds, NULL) IS NULL
        AND 0 < ALL (alert_thresholds) AND 1000 >= ALL (alert_thresholds)),
    quota_log_retention interval NOT NULL DEFAULT '90 days',
    alert_retention    interval NOT NULL DEFAULT '400 days',
    -- A refund and a replayed request_id need the rows of the current quota
    -- month, and an alert's row stops a second alert in its period.
    CONSTRAINT config_quota_log_retention_covers_a_month CHECK (quota_log_retention >= interval '31 days'),
    CONSTRAINT config_alert_retention_covers_a_month CHECK (alert_retention >= interval '31 days'),
    hourly_retention   interval,
    CONSTRAINT config_hourly_retention_positive CHECK (hourly_retention > interval '0')
);
-- At most one row: an index on a constant.
CREATE UNIQUE INDEX config_single_row ON usage_agg.config ((true));

COMMENT ON TABLE usage_agg.config IS
    'usage_agg settings: exactly one row. Change with UPDATE usage_agg.config SET ...';
COMMENT ON COLUMN usage_agg.config.timezone IS
    'Business time zone (IANA name) that decides which day a call belongs to';
COMMENT ON COLUMN usage_agg.config.fold_mode IS
    'auto: async while a background applier serves this database, immediate otherwise; async (formerly deferred): inserts record their calls in pending_deltas, folded by the applier or apply_pending_deltas(); immediate: every statement updates daily_logs';
COMMENT ON COLUMN usage_agg.config.apply_interval IS
    'How often the background applier folds pending calls (sooner while a backlog remains)';
COMMENT ON COLUMN usage_agg.config.pending_alert_after IS
    'maintenance_health reports the fold as overdue when a call has been pending longer than this';
COMMENT ON COLUMN usage_agg.config.verify_recent_days IS
    'run_maintenance() checks this many most recent business days against the detail (0: not at all)';
COMMENT ON COLUMN usage_agg.config.alert_thresholds IS
    'Percentages of a monthly quota, daily cost limit or monthly budget at which usage_agg.alerts records a crossing (empty: no alerts)';
COMMENT ON COLUMN usage_agg.config.quota_log_retention IS
    'run_maintenance() deletes quota_usage_logs rows older than this (the totals stay in quotas; a request_id older than this is no longer recognised)';
COMMENT ON COLUMN usage_agg.config.alert_retention IS
    'run_maintenance() deletes usage_agg.alerts rows older than this';
COMMENT ON COLUMN usage_agg.config.hourly_retention IS
    'run_maintenance() deletes hourly_logs and key_hourly_logs rows of hours older than this (NULL: detail_retention)';
COMMENT ON COLUMN usage_agg.config.repair_drift IS
    'run_maintenance() rebuilds the recent days it finds drifted (the drift is reported either way)';

CREATE FUNCTION usage_agg._config_validate() RETURNS trigger
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

CREATE FUNCTION usage_agg._config_keep_row() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'usage_agg: the configuration row cannot be deleted'
        USING ERRCODE = 'object_in_use',
              HINT = 'Change settings with UPDATE usage_agg.config SET ...';
END;
$$;

CREATE TRIGGER config_validate
    BEFORE INSERT OR UPDATE ON usage_agg.config
    FOR EACH ROW EXECUTE FUNCTION usage_agg._config_validate();
CREATE TRIGGER config_keep_row
    BEFORE DELETE ON usage_agg.config
    FOR EACH ROW EXECUTE FUNCTION usage_agg._config_keep_row();
CREATE TRIGGER config_keep_row_truncate
    BEFORE TRUNCATE ON usage_agg.config
    FOR EACH STATEMENT EXECUTE FUNCTION usage_agg._config_keep_row();

INSERT INTO usage_agg.config DEFAULT VALUES;

-- Restores seen: a pg_dump of the config row landing on the one CREATE
-- EXTENSION made. Until usage_agg.post_restore() heals it (run_maintenance()
-- does), the days with detail are counted twice; maintenance_health and
-- fold_status say so. Not dumped.
CREATE TABLE usage_agg.restores (
    restored_at    timestamptz NOT NULL,
    healed_at      timestamptz,
    rows_rewritten bigint
);
COMMENT ON TABLE usage_agg.restores IS
    'Restores of a pg_dump noticed by usage_agg, and when post_restore() recomputed the aggregates they had folded twice';

-- ---------------------------------------------------------------------------
-- Detail: one row per API call.
-- ---------------------------------------------------------------------------
CREATE TABLE usage_agg.key_usage_logs (
    id             uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    shared_key_id  uuid,
    user_id        uuid        NOT NULL,
    api_endpoint   text,
    model_used     text,
    tokens_used    integer,
    cost_estimate  numeric,
    success        boolean     NOT NULL DEFAULT true,
    error_message  text,
    request_id     text        UNIQUE,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT key_usage_logs_tokens_used_not_negative CHECK (tokens_used >= 0),
    -- NaN sorts above Infinity in numeric, so the upper bound rejects both.
    CONSTRAINT key_usage_logs_cost_estimate_finite_not_negative
        CHECK (cost_estimate >= 0 AND cost_estimate < 'Infinity'::numeric)
);
-- Per-user day ranges (verify, rebuild, corrections) and retention by age.
CREATE INDEX key_usage_logs_user_created_at ON usage_agg.key_usage_logs (user_id, created_at);
CREATE INDEX key_usage_logs_created_at ON usage_agg.key_usage_logs (created_at);

COMMENT ON TABLE usage_agg.key_usage_logs IS
    'One row per API call. Inserts, updates and deletes are folded into usage_agg.daily_logs.';
COMMENT ON COLUMN usage_agg.key_usage_logs.request_id IS
    'Optional idempotency key: INSERT ... ON CONFLICT (request_id) DO NOTHING counts a retried call once';

-- ---------------------------------------------------------------------------
-- Daily aggregate per user and business day.
-- ---------------------------------------------------------------------------
CREATE TABLE usage_agg.daily_logs (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id       uuid        NOT NULL,
    date          date        NOT NULL,
    log_data      jsonb       NOT NULL,
    last_modified timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT daily_logs_user_id_date_key UNIQUE (user_id, date)
) WITH (fillfactor = 70);  -- room for HOT updates: every fold rewrites the row
CREATE INDEX daily_logs_date ON usage_agg.daily_logs (date);

COMMENT ON TABLE usage_agg.daily_logs IS
    'Per-user daily usage, kept exact by the fold trigger on usage_agg.key_usage_logs. '
    'Keys of log_data other than api_call_count, shared_service_usage and last_api_call_at belong to the application.';

-- ---------------------------------------------------------------------------
-- Asynchronous fold: calls recorded by the fold, not yet in daily_logs. Readers
-- add them in; the background applier (or apply_pending_deltas()) folds them.
-- A row is one call, or one (user, day, model, key) group of a bulk statement.
-- ---------------------------------------------------------------------------
CREATE TABLE usage_agg.pending_deltas (
    user_id       uuid        NOT NULL,
    day           date        NOT NULL,
    model_used    text,
    shared_key_id uuid,
    calls         integer     NOT NULL,
    successful    integer     NOT NULL,
    tokens        bigint      NOT NULL,
    cost          numeric     NOT NULL,
    last_at       timestamptz NOT NULL,
    appended_at   timestamptz NOT NULL DEFAULT now(),
    -- Newest failed call among them (NULL: none failed); added in 0.4.0.
    last_failure_at timestamptz,
    -- Tokens by kind and calls without a cost (0.4.0); NULL stands for 0, so
    -- that calls which report none cost no space.
    input_tokens       bigint,
    output_tokens      bigint,
    cache_read_tokens  bigint,
    cache_write_tokens bigint,
    unpriced           integer
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
        autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 10000);
-- Every row is deleted soon after it is written: vacuum it by count, not by size.
CREATE INDEX pending_deltas_user_id_day ON usage_agg.pending_deltas (user_id, day);
COMMENT ON TABLE usage_agg.pending_deltas IS
    'Calls recorded by the asynchronous fold, folded into daily_logs by the background applier or usage_agg.apply_pending_deltas(); readers include them.';

-- (user, day)s the applier could not fold because their daily_logs row is
-- corrupted: their calls stay pending; retried after retry_at, and at once after
-- rebuild_daily_logs of the day.
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

-- ---------------------------------------------------------------------------
-- Monthly aggregate: daily rows older than daily_retention, rolled up per user
-- and calendar month (business time zone), same log_data layout.
-- ---------------------------------------------------------------------------
CREATE TABLE usage_agg.monthly_logs (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id       uuid        NOT NULL,
    month         date        NOT NULL,
    log_data      jsonb       NOT NULL,
    last_modified timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT monthly_logs_month_is_first_day CHECK (extract(day FROM month) = 1),
    CONSTRAINT monthly_logs_user_id_month_key UNIQUE (user_id, month)
);
COMMENT ON TABLE usage_agg.monthly_logs IS
    'Per-user monthly usage: daily_logs rows rolled up by usage_agg.cleanup_old_daily_logs() before they are deleted.';

-- ---------------------------------------------------------------------------
-- Retention horizons: how far the cleanups have gone. Days before
-- detail_kept_from have no detail any more (the fold ignores removals there and
-- verify_daily_logs skips them); days before daily_kept_from were rolled up into
-- monthly_logs. Written only by the cleanups; they never move back.
-- ---------------------------------------------------------------------------
CREATE TABLE usage_agg.retention_horizon (
    detail_kept_from date NOT NULL DEFAULT '-infinity',
    daily_kept_from  date NOT NULL DEFAULT '-infinity',
    CONSTRAINT retention_horizon_daily_before_detail CHECK (daily_kept_from <= detail_kept_from)
);
CREATE UNIQUE INDEX retention_horizon_single_row ON usage_agg.retention_horizon ((true));
COMMENT ON TABLE usage_agg.retention_horizon IS
    'How far usage_agg retention has gone (one row, written by the cleanup functions).';

-- A restore (pg_dump data) lands on the row CREATE EXTENSION made.
CREATE FUNCTION usage_agg._retention_horizon_restore() RETURNS trigger
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
CREATE TRIGGER retention_horizon_restore
    BEFORE INSERT ON usage_agg.retention_horizon
    FOR EACH ROW EXECUTE FUNCTION usage_agg._retention_horizon_restore();

INSERT INTO usage_agg.retention_horizon DEFAULT VALUES;

-- ---------------------------------------------------------------------------
-- Helpers shared by the fold, verification and rebuild.
-- ---------------------------------------------------------------------------

-- The business time zone. Inlined where it is read (no SET clause); every name
-- in it is qualified, so the caller's search_path cannot change what it reads.
-- Not a SQL-standard body: Citus 13 cannot run those when they read its
-- tables (docs/citus.md); the same holds for the other helpers that read
-- tables.
CREATE FUNCTION usage_agg._timezone() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT COALESCE((SELECT c.timezone FROM usage_agg.config c), 'UTC') $$;

-- The canonical text of last_api_call_at: 2026-01-15T11:45:00Z, with .ffffff only
-- when the microseconds are not zero. The Rust fold writes the same text.
CREATE FUNCTION usage_agg._iso_utc(ts timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN CASE
    WHEN pg_catalog.date_part('microseconds', ts AT TIME ZONE 'UTC')::bigint % 1000000 = 0
        THEN pg_catalog.to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
    ELSE pg_catalog.to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
END;

-- First instant of a business day in the configured time zone.
-- A SQL-standard body is bound at creation; without SET it can be inlined.
CREATE FUNCTION usage_agg._day_start(day date, tz text) RETURNS timestamptz
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN (day::timestamp AT TIME ZONE tz);

-- pg_dump keeps the data of these tables (they are extension members).
SELECT pg_catalog.pg_extension_config_dump('usage_agg.config', '');
SELECT pg_catalog.pg_extension_config_dump('usage_agg.key_usage_logs', '');
SELECT pg_catalog.pg_extension_config_dump('usage_agg.daily_logs', '');
SELECT pg_catalog.pg_extension_config_dump('usage_agg.monthly_logs', '');
SELECT pg_catalog.pg_extension_config_dump('usage_agg.pending_deltas', '');
SELECT pg_catalog.pg_extension_config_dump('usage_agg.retention_horizon', '');

-- The totals of a daily or monthly log_data document as columns: the one
-- place that reads them. A SQL-standard body is bound when it is created (no
-- search_path needed) and is inlined into the query that calls it, so reading
-- through it costs nothing (#>> reads a nested number without copying the
-- object around it).
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

-- The sparse counters of a document object (shared_service_usage, a cell, a
-- per-key document): tokens by kind and calls without a cost, 0 when absent.
-- Bound and inlined like _totals.
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

-- The sparse counters as the fold writes them: only those that are not zero.
-- (numeric: what sum() of bigint gives.)
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

-- The by_model / by_key cells of a document as rows (name, calls, tokens,
-- cost, the sparse counters); none when the document has no such object.
-- Bound and inlined like _totals.
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
