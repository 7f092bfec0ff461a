-- 1,000,000 calls over the last 80 days, 10,000 users, 20 shared keys (one in
-- fifty calls without a key), 3 models, one in fifty failed: the history of the
-- per-key read benchmark (bench/keys_reads.sh loads it ten times).
INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, api_endpoint, model_used, tokens_used, cost_estimate, success, created_at)
SELECT ('00000000-0000-0000-0000-' || lpad((i % 10000)::text, 12, '0'))::uuid,
       CASE WHEN i % 50 = 7 THEN NULL ELSE ('10000000-0000-0000-0000-' || lpad((i % 20)::text, 12, '0'))::uuid END,
       '/v1/chat/completions', 'model-' || (i % 3), i % 4000, (i % 4000) * 0.000002, i % 50 <> 0,
       now() - random() * interval '80 days'
  FROM generate_series(1, 1000000) i;
