-- 1,000,000 calls in one INSERT ... SELECT, over 10,000 users, 20 keys and 3 days.
INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, api_endpoint, model_used, tokens_used, cost_estimate, success, created_at)
SELECT ('00000000-0000-0000-0000-' || lpad((i % 10000)::text, 12, '0'))::uuid,
       ('10000000-0000-0000-0000-' || lpad((i % 20)::text, 12, '0'))::uuid,
       '/v1/chat/completions', 'model-' || (i % 3), i % 4000, (i % 4000) * 0.000002, i % 50 <> 0,
       now() - (i % 3) * interval '1 day'
  FROM generate_series(1, 1000000) i;
