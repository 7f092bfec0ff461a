-- Data written by usage_agg 0.3.0 (its own library) before the update test:
-- every table holds something, including calls still pending in async mode
-- and the maintenance runs of run_maintenance() (verify included).
CREATE EXTENSION usage_agg VERSION '0.3.0';
UPDATE usage_agg.config SET timezone = 'America/New_York', cleanup_batch_size = 700;
UPDATE usage_agg.quota_plans SET daily_cost_limit = 3.5 WHERE membership_level = 'free';

INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, success, request_id, created_at)
SELECT ('f4000000-0000-0000-0000-00000000000' || (g % 3))::uuid,
       ('f5000000-0000-0000-0000-00000000000' || (g % 2))::uuid,
       'model-' || (g % 4), g, 0.001 * g, g % 5 <> 0, 'req-' || g,
       now() - (g / 3) * interval '1 day'
  FROM generate_series(0, 599) g;
-- Calls without a cost (0.4.0 counts them as unpriced).
INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, created_at)
SELECT 'f4000000-0000-0000-0000-000000000002', 'f5000000-0000-0000-0000-000000000001', 'free-model', 11,
       now() - interval '2 days'
  FROM generate_series(1, 3);
SELECT usage_agg.apply_pending_deltas();
UPDATE usage_agg.daily_logs SET log_data = log_data || '{"conversation_count": 3}';
UPDATE usage_agg.key_usage_logs SET cost_estimate = 9.99 WHERE request_id = 'req-3';
DELETE FROM usage_agg.key_usage_logs WHERE request_id = 'req-4';

SELECT count(usage_agg.consume_quota(('f4000000-0000-0000-0000-00000000000' || (g % 3))::uuid, 2, 's', 'q-' || g))
  FROM generate_series(1, 30) g;
SELECT usage_agg.set_membership('f4000000-0000-0000-0000-000000000001', 'pro');
SELECT usage_agg.refund_quota('q-1');
SELECT count(*) FROM usage_agg.run_maintenance();

-- Async mode, with calls left pending for the new version to apply.
UPDATE usage_agg.config SET fold_mode = 'async';
INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, created_at)
SELECT 'f4000000-0000-0000-0000-000000000001', 'f5000000-0000-0000-0000-000000000001', 'pending-model', 7, 0.07, now()
  FROM generate_series(1, 5);
INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, created_at)
SELECT 'f4000000-0000-0000-0000-000000000001', 'f5000000-0000-0000-0000-000000000001', 'pending-model', 3, now()
  FROM generate_series(1, 2);
