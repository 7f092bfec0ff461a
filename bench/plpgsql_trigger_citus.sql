-- The hand-written contender of bench/citus.sh: bench/plpgsql_trigger.sql's
-- row-level PL/pgSQL trigger as a team would adapt it to Citus (writing
-- bench.daily_logs, colocated with the calls, so its statements run on the
-- shard's node). The JSON it writes is the same.
CREATE FUNCTION public.plpgsql_fold() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    d date := (NEW.created_at AT TIME ZONE 'UTC')::date;
    k text := NEW.shared_key_id::text;
    m text := NEW.model_used;
    t bigint := coalesce(NEW.tokens_used, 0);
    c numeric := coalesce(NEW.cost_estimate, 0);
    ok int := CASE WHEN NEW.success THEN 1 ELSE 0 END;
    cell jsonb := jsonb_build_object('calls', 1, 'tokens', t, 'cost', c);
    cur jsonb;
BEGIN
    -- On Citus an UPDATE of a distributed table may not call stable functions
    -- (jsonb_build_object) on its columns, nor ON CONFLICT DO UPDATE any at
    -- all: read the row locked, compute the new document here, write it.
    LOOP
        SELECT dl.log_data INTO cur FROM bench.daily_logs dl
         WHERE dl.user_id = NEW.user_id AND dl.date = d FOR UPDATE;
        IF FOUND THEN
            cur := cur || jsonb_build_object(
                'api_call_count', (cur->>'api_call_count')::bigint + 1,
                'shared_service_usage', (cur->'shared_service_usage') || jsonb_build_object(
                    'total_calls', (cur->'shared_service_usage'->>'total_calls')::bigint + 1,
                    'successful_calls', (cur->'shared_service_usage'->>'successful_calls')::bigint + ok,
                    'failed_calls', (cur->'shared_service_usage'->>'failed_calls')::bigint + 1 - ok,
                    'tokens_used', (cur->'shared_service_usage'->>'tokens_used')::bigint + t,
                    'estimated_cost', (cur->'shared_service_usage'->>'estimated_cost')::numeric + c,
                    'keys_used', CASE WHEN k IS NULL OR (cur->'shared_service_usage'->'keys_used') ? k
                                      THEN cur->'shared_service_usage'->'keys_used'
                                      ELSE (cur->'shared_service_usage'->'keys_used') || to_jsonb(k) END,
                    'by_model', CASE WHEN m IS NULL THEN cur->'shared_service_usage'->'by_model'
                                     ELSE (cur->'shared_service_usage'->'by_model') || jsonb_build_object(m, jsonb_build_object(
                                         'calls', coalesce((cur->'shared_service_usage'->'by_model'->m->>'calls')::bigint, 0) + 1,
                                         'tokens', coalesce((cur->'shared_service_usage'->'by_model'->m->>'tokens')::bigint, 0) + t,
                                         'cost', coalesce((cur->'shared_service_usage'->'by_model'->m->>'cost')::numeric, 0) + c)) END,
                    'by_key', CASE WHEN k IS NULL THEN cur->'shared_service_usage'->'by_key'
                                   ELSE (cur->'shared_service_usage'->'by_key') || jsonb_build_object(k, jsonb_build_object(
                                       'calls', coalesce((cur->'shared_service_usage'->'by_key'->k->>'calls')::bigint, 0) + 1,
                                       'tokens', coalesce((cur->'shared_service_usage'->'by_key'->k->>'tokens')::bigint, 0) + t,
                                       'cost', coalesce((cur->'shared_service_usage'->'by_key'->k->>'cost')::numeric, 0) + c)) END),
                'last_api_call_at', greatest((cur->>'last_api_call_at')::timestamptz, NEW.created_at));
            UPDATE bench.daily_logs SET log_data = cur, last_modified = now()
             WHERE user_id = NEW.user_id AND date = d;
            EXIT;
        END IF;
        INSERT INTO bench.daily_logs AS dl (user_id, date, log_data, last_modified)
        VALUES (NEW.user_id, d, jsonb_build_object(
            'api_call_count', 1,
            'shared_service_usage', jsonb_build_object(
                'total_calls', 1, 'successful_calls', ok, 'failed_calls', 1 - ok,
                'tokens_used', t, 'estimated_cost', c,
                'keys_used', CASE WHEN k IS NULL THEN '[]'::jsonb ELSE jsonb_build_array(k) END,
                'by_model', CASE WHEN m IS NULL THEN '{}'::jsonb ELSE jsonb_build_object(m, cell) END,
                'by_key', CASE WHEN k IS NULL THEN '{}'::jsonb ELSE jsonb_build_object(k, cell) END),
            'last_api_call_at', NEW.created_at), now())
        ON CONFLICT (user_id, date) DO NOTHING;
        EXIT WHEN FOUND;
    END LOOP;
    RETURN NULL;
END;
$$;
