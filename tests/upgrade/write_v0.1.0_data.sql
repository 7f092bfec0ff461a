-- Data written by usage_agg 0.1.0 (its own library) before the update test:
-- every table holds something, including retention and maintenance state.
CREATE EXTENSION usage_agg VERSION '0.1.0';
UPDATE usage_agg.config SET timezone = 'Asia/Shanghai', cleanup_batch_size = 500;
UPDATE usage_agg.quota_plans SET daily_cost_limit = 2.5 WHERE membership_level = 'free';

INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, success, request_id, created_at)
SELECT ('f0000000-0000-0000-0000-00000000000' || (g % 3))::uuid,
       ('f1000000-0000-0000-0000-00000000000' || (g % 2))::uuid,
       'model-' || (g % 4), g, 0.001 * g, g % 5 <> 0, 'req-' || g,
       now() - (g / 3) * interval '1 day'
  FROM generate_series(0, 599) g;
UPDATE usage_agg.daily_logs SET log_data = log_data || '{"conversation_count": 2}';
-- a correction and a deletion
UPDATE usage_agg.key_usage_logs SET cost_estimate = 9.99 WHERE request_id = 'req-3';
DELETE FROM usage_agg.key_usage_logs WHERE request_id = 'req-4';

SELECT count(usage_agg.consume_quota(('f0000000-0000-0000-0000-00000000000' || (g % 3))::uuid, 2, 's', 'q-' || g))
  FROM generate_series(1, 30) g;
SELECT usage_agg.set_membership('f0000000-0000-0000-0000-000000000001', 'pro');
SELECT usage_agg.refund_quota('q-1');
SELECT count(*) FROM usage_agg.run_maintenance();
