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
-- (consume_quota and try_consume_quota are created SECURITY DEFINER in
-- src/quotas.rs, refund_quota and quota_status in sql/quotas.sql.)

REVOKE EXECUTE ON FUNCTION
    usage_agg.consume_quota(uuid, integer, text, text, integer),
    usage_agg.try_consume_quota(uuid, integer, text, text, integer),
    usage_agg.refund_quota(text),
    usage_agg.quota_status(uuid),
    usage_agg.set_membership(uuid, text),
    usage_agg.reset_expired_quotas(),
    usage_agg.cleanup_old_key_usage_logs(interval),
    usage_agg.cleanup_old_daily_logs(interval),
    usage_agg.cleanup_old_quota_logs(interval),
    usage_agg.run_maintenance(),
    usage_agg.schedule_maintenance(text),
    usage_agg.unschedule_maintenance(),
    usage_agg.schedule_apply(text),
    usage_agg.unschedule_apply(),
    usage_agg.rebuild_daily_logs(date, date),
    usage_agg.apply_pending_deltas(integer),
    usage_agg.post_restore(),
    usage_agg._verify_recent_days(),
    usage_agg._rebuild_key_day(date),
    usage_agg._cleanup_key_days(date),
    usage_agg._key_days_from_users(date),
    usage_agg._record_alerts(uuid, text, date, numeric, numeric, numeric, timestamptz),
    usage_agg._quota_alerts(uuid, integer, integer, integer, timestamptz, timestamptz),
    usage_agg._cost_alerts(uuid[], date[], numeric[]),
    usage_agg._lock_cost_months(uuid[], date[]),
    usage_agg.cleanup_old_hourly_logs(interval),
    usage_agg._rebuild_hours(date),
    usage_agg.reprice_calls(timestamptz, timestamptz, integer),
    usage_agg.distribute(),
    usage_agg._citus_prepare_node(),
    usage_agg.sync_plan_quotas()
FROM PUBLIC;
REVOKE EXECUTE ON PROCEDURE
    usage_agg.expire_key_usage_logs(interval, bigint),
    usage_agg.expire_daily_logs(interval, bigint),
    usage_agg.maintain()
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
ALTER VIEW usage_agg.fold_status SET (security_invoker = true);
ALTER VIEW usage_agg.key_daily_usage SET (security_invoker = true);
ALTER VIEW usage_agg.key_daily_usage_by_model SET (security_invoker = true);
ALTER VIEW usage_agg.key_monthly_usage SET (security_invoker = true);
ALTER VIEW usage_agg.key_health SET (security_invoker = true);
ALTER VIEW usage_agg.service_daily_usage SET (security_invoker = true);
ALTER VIEW usage_agg.service_monthly_usage SET (security_invoker = true);
ALTER VIEW usage_agg.hourly_usage SET (security_invoker = true);
ALTER VIEW usage_agg.key_hourly_usage SET (security_invoker = true);
ALTER VIEW usage_agg.unpriced_calls SET (security_invoker = true);

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
