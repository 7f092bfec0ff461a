#!/usr/bin/env bash
# Builds and installs usage_agg, then demonstrates it on a throw-away cluster.
source "$(dirname "$0")/lib.sh"
ua_setup
ua_install_extension
PORT="${USAGE_AGG_DEMO_PORT:-28815}"
ua_log "starting a throw-away cluster on port ${PORT} (${UA_RUN_DIR}/demo)"
ua_cluster_start demo "$PORT"
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
\echo '== usage_agg.daily_logs (day = created_at in Asia/Shanghai) =='
SELECT user_id, date, jsonb_pretty(log_data) AS log_data FROM usage_agg.daily_logs ORDER BY user_id, date;
\echo '== verify_daily_logs: no rows means the aggregate equals GROUP BY over the detail =='
SELECT * FROM usage_agg.verify_daily_logs('2026-11-01', '2026-11-30');
SQL
ua_log "demo done; the cluster is stopped and can be deleted: ${UA_RUN_DIR}/demo"
