-- A lever for issue 15 under measurement: consume_quota with one statement that
-- locks, checks and deducts (UPDATE ... WHERE monthly_used + amount <=
-- monthly_quota RETURNING, race-free under READ COMMITTED: a concurrent
-- update makes it recheck the condition on the latest row version) and logs
-- the call in the same statement. The clock is read once, in the UPDATE's SET,
-- after the row lock; a call whose month has ended, a replayed request_id, a
-- new user, an exceeded quota or bad arguments go to the shipped _consume.
CREATE OR REPLACE FUNCTION usage_agg.consume_quota(user_id uuid, amount integer DEFAULT 1, session_id text DEFAULT NULL,
                                                   request_id text DEFAULT NULL, tokens_used integer DEFAULT 0)
RETURNS usage_agg.quota_state
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    r record;
BEGIN
    IF amount BETWEEN 1 AND 1000000 AND coalesce(tokens_used, 0) >= 0
       AND coalesce(length(request_id), 0) <= 1000 AND coalesce(length(session_id), 0) <= 1000 THEN
        WITH q AS (
            UPDATE usage_agg.quotas t
               SET monthly_used = t.monthly_used + amount, total_used = t.total_used + amount,
                   updated_at = clock_timestamp()
             WHERE t.user_id = consume_quota.user_id AND t.monthly_used + amount <= t.monthly_quota
            RETURNING t.*
        ), logged AS (
            INSERT INTO usage_agg.quota_usage_logs AS l
                   (user_id, session_id, membership_level, amount, tokens_used, request_id, created_at)
            SELECT q.user_id, session_id, q.membership_level, amount, coalesce(tokens_used, 0), request_id, q.updated_at
              FROM q WHERE q.updated_at < q.quota_reset_at
            ON CONFLICT ON CONSTRAINT quota_usage_logs_request_id_key DO NOTHING
            RETURNING l.id
        )
        SELECT q.*, EXISTS (SELECT FROM logged) AS done INTO r FROM q;
        IF r.done THEN
            RETURN ROW(r.user_id, r.membership_level, r.monthly_quota, r.monthly_used,
                       greatest(r.monthly_quota - r.monthly_used, 0), r.quota_reset_at, r.total_used,
                       true, false)::usage_agg.quota_state;
        END IF;
        IF r.user_id IS NOT NULL THEN
            -- Deducted but not logged (the month has ended, or the request_id is
            -- known): give it back under the lock now held, then the full step.
            UPDATE usage_agg.quotas t
               SET monthly_used = t.monthly_used - amount, total_used = t.total_used - amount
             WHERE t.user_id = consume_quota.user_id;
        END IF;
    END IF;
    RETURN usage_agg._consume(user_id, amount, session_id, request_id, tokens_used, true);
END;
$$;
