-- The hand-written contender: a row-level PL/pgSQL AFTER INSERT trigger doing the
-- same fold into the same JSONB layout with INSERT ... ON CONFLICT DO UPDATE, as
-- teams write it today. Installed on a copy of the schema with usage_agg's own
-- fold triggers dropped.
DROP TRIGGER fold_insert ON usage_agg.key_usage_logs;
DROP TRIGGER fold_update ON usage_agg.key_usage_logs;
DROP TRIGGER fold_delete ON usage_agg.key_usage_logs;
-- usage_agg's pricing (its calls carry a cost: it would not fire anyway).
DROP TRIGGER price_insert ON usage_agg.key_usage_logs;
DROP TRIGGER price_update ON usage_agg.key_usage_logs;

CREATE FUNCTION public.plpgsql_fold() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    d date := (NEW.created_at AT TIME ZONE 'UTC')::date;
    k text := NEW.shared_key_id::text;
    m text := NEW.model_used;
    t bigint := coalesce(NEW.tokens_used, 0);
    c numeric := coalesce(NEW.cost_estimate, 0);
    ok int := CASE WHEN NEW.success THEN 1 ELSE 0 END;
    cell jsonb := jsonb_build_object('calls', 1, 'tokens', t, 'cost', c);
BEGIN
    INSERT INTO usage_agg.daily_logs AS dl (user_id, date, log_data, last_modified)
    VALUES (NEW.user_id, d, jsonb_build_object(
        'api_call_count', 1,
        'shared_service_usage', jsonb_build_object(
            'total_calls', 1, 'successful_calls', ok, 'failed_calls', 1 - ok,
            'tokens_used', t, 'estimated_cost', c,
            'keys_used', CASE WHEN k IS NULL THEN '[]'::jsonb ELSE jsonb_build_array(k) END,
            'by_model', CASE WHEN m IS NULL THEN '{}'::jsonb ELSE jsonb_build_object(m, cell) END,
            'by_key', CASE WHEN k IS NULL THEN '{}'::jsonb ELSE jsonb_build_object(k, cell) END),
        'last_api_call_at', NEW.created_at), now())
    ON CONFLICT (user_id, date) DO UPDATE SET
        log_data = dl.log_data || jsonb_build_object(
            'api_call_count', (dl.log_data->>'api_call_count')::bigint + 1,
            'shared_service_usage', (dl.log_data->'shared_service_usage') || jsonb_build_object(
                'total_calls', (dl.log_data->'shared_service_usage'->>'total_calls')::bigint + 1,
                'successful_calls', (dl.log_data->'shared_service_usage'->>'successful_calls')::bigint + ok,
                'failed_calls', (dl.log_data->'shared_service_usage'->>'failed_calls')::bigint + 1 - ok,
                'tokens_used', (dl.log_data->'shared_service_usage'->>'tokens_used')::bigint + t,
                'estimated_cost', (dl.log_data->'shared_service_usage'->>'estimated_cost')::numeric + c,
                'keys_used', CASE WHEN k IS NULL OR (dl.log_data->'shared_service_usage'->'keys_used') ? k
                                  THEN dl.log_data->'shared_service_usage'->'keys_used'
                                  ELSE (dl.log_data->'shared_service_usage'->'keys_used') || to_jsonb(k) END,
                'by_model', CASE WHEN m IS NULL THEN dl.log_data->'shared_service_usage'->'by_model'
                                 ELSE (dl.log_data->'shared_service_usage'->'by_model') || jsonb_build_object(m, jsonb_build_object(
                                     'calls', coalesce((dl.log_data->'shared_service_usage'->'by_model'->m->>'calls')::bigint, 0) + 1,
                                     'tokens', coalesce((dl.log_data->'shared_service_usage'->'by_model'->m->>'tokens')::bigint, 0) + t,
                                     'cost', coalesce((dl.log_data->'shared_service_usage'->'by_model'->m->>'cost')::numeric, 0) + c)) END,
                'by_key', CASE WHEN k IS NULL THEN dl.log_data->'shared_service_usage'->'by_key'
                               ELSE (dl.log_data->'shared_service_usage'->'by_key') || jsonb_build_object(k, jsonb_build_object(
                                   'calls', coalesce((dl.log_data->'shared_service_usage'->'by_key'->k->>'calls')::bigint, 0) + 1,
                                   'tokens', coalesce((dl.log_data->'shared_service_usage'->'by_key'->k->>'tokens')::bigint, 0) + t,
                                   'cost', coalesce((dl.log_data->'shared_service_usage'->'by_key'->k->>'cost')::numeric, 0) + c)) END),
            'last_api_call_at', greatest((dl.log_data->>'last_api_call_at')::timestamptz, NEW.created_at)),
        last_modified = now();
    RETURN NULL;
END;
$$;

CREATE TRIGGER plpgsql_fold AFTER INSERT ON usage_agg.key_usage_logs
    FOR EACH ROW EXECUTE FUNCTION public.plpgsql_fold();
