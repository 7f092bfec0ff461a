#!/usr/bin/env bash
# Builds and installs usage_agg, then demonstrates it on a throw-away cluster.
source "$(dirname "$0")/lib.sh"
ua_setup
ua_install_extension
PORT="${USAGE_AGG_DEMO_PORT:-28815}"
ua_log "starting a throw-away cluster on port ${PORT} (${UA_RUN_DIR}/demo)"
# usage_agg preloaded next to pg_cron: its background applier folds calls.
ua_cluster_start demo "$PORT" "shared_preload_libraries = 'pg_cron,usage_agg'"
trap 'ua_cluster_stop demo' EXIT
ua_psql "$PORT" usage_agg_test <<'SQL'
CREATE EXTENSION usage_agg;
UPDATE usage_agg.config SET timezone = 'Asia/Shanghai';

-- Three calls by one user, one of them failed, and a bulk load for a second user.
INSERT INTO usage_agg.key_usage_logs
    (user_id, shared_key_id, api_endpoint, model_used, tokens_used, cost_estimate, success, created_at)
VALUES
    ('11111111-1111-1111-1111-111111111111', 'aaaaaaaa-0000-0000-0000-000000000001', '/v1/chat/completions', 'gpt-4o',      1200, 0.0180, true,  '2026-11-20 17:30:00+00'),
    ('11111111-1111-1111-1111-111111111111', 'aaaaaaaa-0000-0000-0000-000000000002', '/v1/chat/completions', 'claude-sonnet', 800, 0.0120, true,  '2026-11-21 02:00:00+00'),
    ('11111111-1111-1111-1111-111111111111', 'aaaaaaaa-0000-0000-0000-000000000001', '/v1/chat/completions', 'gpt-4o',         0, 0,      false, '2026-11-21 03:15:00+00');
INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, created_at)
SELECT '22222222-2222-2222-2222-222222222222', 'gpt-4o-mini', 100, 0.1, '2026-11-21 08:00:00+08'
  FROM generate_series(1, 1000);

\echo
\echo '== the inserts only recorded their calls; readers are exact at once =='
SELECT * FROM usage_agg.usage_summary('11111111-1111-1111-1111-111111111111', '2026-11-21 12:00+00');
\echo '== the background applier folds them within apply_interval (100 ms) =='
SELECT pg_sleep(1);
SELECT effective_mode, applier_running, applied_total, pending_calls FROM usage_agg.fold_status;
\echo '== usage_agg.daily_logs (day = created_at in Asia/Shanghai) =='
SELECT user_id, date, jsonb_pretty(log_data) AS log_data FROM usage_agg.daily_logs ORDER BY user_id, date;
\echo '== verify_daily_logs: no rows means the aggregate equals GROUP BY over the detail =='
SELECT * FROM usage_agg.verify_daily_logs('2026-11-01', '2026-11-30');

\echo '== usage_summary: today, this month and all time, from the aggregates only =='
SELECT * FROM usage_agg.usage_summary('11111111-1111-1111-1111-111111111111', '2026-11-21 12:00+00');
\echo '== check_usage_limit: the free plan gets a daily cost limit of 0.02 =='
UPDATE usage_agg.quota_plans SET daily_cost_limit = 0.02 WHERE membership_level = 'free';
SELECT * FROM usage_agg.check_usage_limit('11111111-1111-1111-1111-111111111111', '2026-11-21 12:00+00');
\echo '== quotas: consume 3 units of the free plan =='
SELECT user_id, membership_level, monthly_used, remaining, allowed
  FROM usage_agg.consume_quota('11111111-1111-1111-1111-111111111111', 3);

\echo '== retention: 200 days of history, then one maintenance run =='
INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, created_at)
SELECT '33333333-3333-3333-3333-333333333333', 'gpt-4o', 10, 0.01, now() - g * interval '1 day'
  FROM generate_series(0, 199) g;
SELECT * FROM usage_agg.usage_summary('33333333-3333-3333-3333-333333333333');
SELECT step, rows, ok, error FROM usage_agg.run_maintenance();
SELECT (SELECT count(*) FROM usage_agg.key_usage_logs WHERE user_id = '33333333-3333-3333-3333-333333333333') AS detail_rows_left,
       (SELECT count(*) FROM usage_agg.daily_logs WHERE user_id = '33333333-3333-3333-3333-333333333333') AS daily_rows_left,
       (SELECT count(*) FROM usage_agg.monthly_logs WHERE user_id = '33333333-3333-3333-3333-333333333333') AS months;
\echo '== all-time totals survive the roll-up =='
SELECT * FROM usage_agg.usage_summary('33333333-3333-3333-3333-333333333333');
SELECT * FROM usage_agg.monthly_usage WHERE user_id = '33333333-3333-3333-3333-333333333333' ORDER BY month;
SELECT step, last_success_at IS NOT NULL AS succeeded, last_success_rows, overdue FROM usage_agg.maintenance_health;

\echo '== pg_cron: one named nightly job =='
CREATE EXTENSION pg_cron;
SELECT usage_agg.schedule_maintenance();
SELECT jobname, schedule, command FROM cron.job;
SELECT usage_agg.unschedule_maintenance();
SQL
ua_log "demo done; the cluster is stopped and can be deleted: ${UA_RUN_DIR}/demo"
