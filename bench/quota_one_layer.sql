-- A lever for issue 15, measured and not shipped: usage_agg's own
-- consume_quota with its function layers flattened into one PL/pgSQL function
-- (one SET search_path instead of five: consume_quota -> _consume ->
-- _check_user, _lock_quota, _state), same tables, same semantics (the clock is
-- read under the row lock). Every uncommon case (bad arguments, a new user, a
-- due reset, a replayed request id, an exceeded quota) goes to the shipped
-- _consume, under the lock already held. Loaded over the extension's function
-- in a benchmark database only (bench/quota.sh).
CREATE OR REPLACE FUNCTION usage_agg.consume_quota(user_id uuid, amount integer DEFAULT 1, session_id text DEFAULT NULL,
                                                   request_id text DEFAULT NULL, tokens_used integer DEFAULT 0)
RETURNS usage_agg.quota_state
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    q usage_agg.quotas;
    v_at timestamptz;
BEGIN
    IF user_id IS NULL OR amount IS NULL OR amount <= 0 OR amount > 1000000 OR tokens_used < 0
       OR length(request_id) > 1000 OR length(session_id) > 1000 THEN
        RETURN usage_agg._consume(user_id, amount, session_id, request_id, tokens_used, true);
    END IF;
    SELECT * INTO q FROM usage_agg.quotas t WHERE t.user_id = consume_quota.user_id FOR UPDATE;
    v_at := clock_timestamp();
    IF q.user_id IS NULL OR v_at >= q.quota_reset_at OR q.monthly_used + amount > q.monthly_quota
       OR (request_id IS NOT NULL
           AND EXISTS (SELECT FROM usage_agg.quota_usage_logs l WHERE l.request_id = consume_quota.request_id)) THEN
        RETURN usage_agg._consume(user_id, amount, session_id, request_id, tokens_used, true);
    END IF;
    UPDATE usage_agg.quotas t
       SET monthly_used = t.monthly_used + amount, total_used = t.total_used + amount, updated_at = v_at
     WHERE t.user_id = consume_quota.user_id
    RETURNING * INTO q;
    INSERT INTO usage_agg.quota_usage_logs (user_id, session_id, membership_level, amount, tokens_used, request_id, created_at)
    VALUES (consume_quota.user_id, session_id, q.membership_level, amount, coalesce(tokens_used, 0), request_id, v_at);
    RETURN ROW(q.user_id, q.membership_level, q.monthly_quota, q.monthly_used,
               greatest(q.monthly_quota - q.monthly_used, 0), q.quota_reset_at, q.total_used, true, false)::usage_agg.quota_state;
END;
$$;
