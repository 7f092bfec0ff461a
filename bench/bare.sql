-- The physical limit: the same table and indexes with no aggregation at all.
DROP TRIGGER fold_insert ON usage_agg.key_usage_logs;
DROP TRIGGER fold_update ON usage_agg.key_usage_logs;
DROP TRIGGER fold_delete ON usage_agg.key_usage_logs;
-- usage_agg's pricing (its calls carry a cost: it would not fire anyway).
DROP TRIGGER price_insert ON usage_agg.key_usage_logs;
DROP TRIGGER price_update ON usage_agg.key_usage_logs;
