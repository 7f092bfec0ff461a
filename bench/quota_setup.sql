-- A plan large enough that a benchmark never runs out, and 10,000 users on it.
INSERT INTO usage_agg.quota_plans (membership_level, monthly_quota) VALUES ('bench', 2000000000)
ON CONFLICT (membership_level) DO UPDATE SET monthly_quota = EXCLUDED.monthly_quota;
SELECT count(usage_agg.set_membership(('00000000-0000-0000-0000-' || lpad(u::text, 12, '0'))::uuid, 'bench'))
  FROM generate_series(1, 10000) u;
