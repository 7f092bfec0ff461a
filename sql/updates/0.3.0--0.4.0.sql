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
-- @replace usage_agg._timezone
-- @replace usage_agg._retention_horizon_restore

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
-- @create usage_agg._totals
-- @create usage_agg._document_cells
-- @create usage_agg._kinds
-- @create usage_agg._kinds_json
-- @replace usage_agg._aggregates
-- The days of a range that still have detail, for verify and rebuild.
-- @create usage_agg._detail_from

-- @create usage_agg._rollup_add
-- @create usage_agg._rollup_correct_last
-- @create usage_agg._needs_detail

-- @include sql/keys.sql

-- The hourly tier (filled at the end).
-- @include sql/hourly.sql

-- Token kinds and table prices: five columns of key_usage_logs (NULL in every
-- existing row; their CHECK constraints scan the table once), model_prices,
-- the pricing triggers, unpriced_calls, reprice_calls(), call_cost().
-- @create usage_agg._price_call
-- @create usage_agg.call_cost
-- @include sql/prices.sql

-- @replace usage_agg.rebuild_daily_logs
-- @replace usage_agg.cleanup_old_daily_logs
-- @replace usage_agg.expire_daily_logs
-- @replace usage_agg.grant_read_role
-- @create usage_agg._maintenance_steps
-- @replace usage_agg.maintenance_health
-- @replace usage_agg.import_legacy
-- @replace usage_agg._verify_recent_days
-- @replace usage_agg._check_reader_args

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
-- @replace usage_agg._config_validate
-- @replace usage_agg._quota_plans_restore
-- @replace usage_agg._quota_plans_propagate
-- @include sql/budgets.sql
-- _lock_quota returns the locked row alone (its updated_at: the step's instant).
DROP FUNCTION usage_agg._lock_quota(uuid);
-- @create usage_agg._lock_quota
-- @create usage_agg._remaining
-- @replace usage_agg._state
-- @replace usage_agg._consume
-- @create usage_agg._owned_service_fields
-- @replace usage_agg._replace_owned
-- @replace usage_agg.verify_daily_logs
-- @create usage_agg.cleanup_old_quota_logs
-- @replace usage_agg._run_maintenance_step
-- @replace usage_agg.run_maintenance
-- @replace usage_agg.maintain
-- check_usage_limit reports the month too (new result columns).
DROP FUNCTION usage_agg.check_usage_limit(uuid, timestamptz);
-- @create usage_agg.check_usage_limit

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
-- @create usage_agg.quota_status_result
-- @create usage_agg.quota_status
-- @create usage_agg.set_membership
-- @create usage_agg.refund_quota
REVOKE EXECUTE ON FUNCTION usage_agg.quota_status(uuid), usage_agg.set_membership(uuid, text),
    usage_agg.refund_quota(text) FROM PUBLIC;
UPDATE pg_catalog.pg_proc p
   SET proacl = NULLIF(pg_catalog.current_setting('usage_agg_update.acl_' || p.proname), '')::pg_catalog.aclitem[]
 WHERE p.oid IN ('usage_agg.quota_status(uuid)'::pg_catalog.regprocedure,
                 'usage_agg.set_membership(uuid, text)'::pg_catalog.regprocedure,
                 'usage_agg.refund_quota(text)'::pg_catalog.regprocedure);

-- consume_quota and try_consume_quota: the common case in Rust (one kept
-- statement), the rest in _consume as before; SECURITY DEFINER without SET.
-- @replace usage_agg.consume_quota
-- @replace usage_agg.try_consume_quota

-- @create usage_agg.schedule_apply
-- @create usage_agg.unschedule_apply

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
-- @create usage_agg.usage_summary
UPDATE pg_catalog.pg_proc p
   SET proacl = NULLIF(pg_catalog.current_setting('usage_agg_update.acl_usage_summary'), '')::pg_catalog.aclitem[]
 WHERE p.oid = 'usage_agg.usage_summary(uuid, timestamptz)'::pg_catalog.regprocedure;
-- @replace usage_agg.daily_usage
-- @replace usage_agg.monthly_usage
-- @replace usage_agg.daily_usage_by_model
-- @replace usage_agg.daily_usage_by_key
-- @replace usage_agg.monthly_usage_by_model
-- @replace usage_agg.monthly_usage_by_key
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
-- @include sql/citus.sql
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
