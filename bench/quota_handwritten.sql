-- The quota step a team would write by hand instead of usage_agg (issue 15's
-- contender): the same tables, columns, constraints and indexes as usage_agg's
-- quotas and quota_usage_logs, in a schema named usage_agg of a database of its
-- own, so that bench/consume_*.pgbench run unchanged. One PL/pgSQL function:
-- create the row if missing, lock it, reset the month lazily, check, deduct,
-- log; SECURITY DEFINER with a pinned search_path; QUOTA_EXCEEDED as UAQ01.
CREATE SCHEMA usage_agg;

CREATE TABLE usage_agg.quota_plans (
    membership_level text    PRIMARY KEY,
    monthly_quota    integer NOT NULL CHECK (monthly_quota >= 0),
    daily_cost_limit numeric
);
INSERT INTO usage_agg.quota_plans (membership_level, monthly_quota) VALUES
    ('free', 100), ('bench', 2000000000);

CREATE TABLE usage_agg.quotas (
    user_id          uuid        PRIMARY KEY,
    membership_level text        NOT NULL REFERENCES usage_agg.quota_plans (membership_level) ON UPDATE CASCADE,
    monthly_quota    integer     NOT NULL CHECK (monthly_quota >= 0),
    monthly_used     integer     NOT NULL DEFAULT 0 CHECK (monthly_used >= 0),
    quota_reset_at   timestamptz NOT NULL,
    total_used       bigint      NOT NULL DEFAULT 0 CHECK (total_used >= 0),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 80);
CREATE INDEX quotas_quota_reset_at ON usage_agg.quotas (quota_reset_at);

CREATE TABLE usage_agg.quota_usage_logs (
    id               uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id          uuid        NOT NULL,
    session_id       text,
    membership_level text        NOT NULL,
    amount           integer     NOT NULL CHECK (amount > 0),
    tokens_used      integer     NOT NULL DEFAULT 0 CHECK (tokens_used >= 0),
    request_id       text        UNIQUE,
    created_at       timestamptz NOT NULL DEFAULT now(),
    refunded_at      timestamptz
);
CREATE INDEX quota_usage_logs_user_created_at ON usage_agg.quota_usage_logs (user_id, created_at);
CREATE INDEX quota_usage_logs_created_at ON usage_agg.quota_usage_logs USING brin (created_at);

CREATE TYPE usage_agg.quota_state AS (
    user_id uuid, membership_level text, monthly_quota integer, monthly_used integer,
    remaining integer, quota_reset_at timestamptz, total_used bigint, allowed boolean, replayed boolean);

CREATE FUNCTION usage_agg.consume_quota(p_user_id uuid, p_amount integer DEFAULT 1, p_session_id text DEFAULT NULL,
                                        p_request_id text DEFAULT NULL, p_tokens_used integer DEFAULT 0)
RETURNS usage_agg.quota_state
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q usage_agg.quotas;
    v_at timestamptz;
BEGIN
    IF p_amount IS NULL OR p_amount <= 0 THEN
        RAISE EXCEPTION 'amount must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO usage_agg.quotas (user_id, membership_level, monthly_quota, quota_reset_at)
    SELECT p_user_id, 'free', p.monthly_quota, date_trunc('month', now()) + interval '1 month'
      FROM usage_agg.quota_plans p WHERE p.membership_level = 'free'
    ON CONFLICT (user_id) DO NOTHING;
    SELECT * INTO q FROM usage_agg.quotas WHERE user_id = p_user_id FOR UPDATE;
    v_at := clock_timestamp();
    IF v_at >= q.quota_reset_at THEN
        q.monthly_used := 0;
        q.quota_reset_at := date_trunc('month', v_at) + interval '1 month';
    END IF;
    IF p_request_id IS NOT NULL
       AND EXISTS (SELECT FROM usage_agg.quota_usage_logs l WHERE l.request_id = p_request_id) THEN
        RETURN ROW(q.user_id, q.membership_level, q.monthly_quota, q.monthly_used,
                   greatest(q.monthly_quota - q.monthly_used, 0), q.quota_reset_at, q.total_used, true, true);
    END IF;
    IF q.monthly_used + p_amount > q.monthly_quota THEN
        RAISE EXCEPTION 'QUOTA_EXCEEDED: user % requested % but only % remain', p_user_id, p_amount,
              greatest(q.monthly_quota - q.monthly_used, 0)
            USING ERRCODE = 'UAQ01';
    END IF;
    UPDATE usage_agg.quotas
       SET monthly_used = q.monthly_used + p_amount, quota_reset_at = q.quota_reset_at,
           total_used = total_used + p_amount, updated_at = v_at
     WHERE user_id = p_user_id
    RETURNING * INTO q;
    INSERT INTO usage_agg.quota_usage_logs (user_id, session_id, membership_level, amount, tokens_used, request_id, created_at)
    VALUES (p_user_id, p_session_id, q.membership_level, p_amount, coalesce(p_tokens_used, 0), p_request_id, v_at);
    RETURN ROW(q.user_id, q.membership_level, q.monthly_quota, q.monthly_used,
               greatest(q.monthly_quota - q.monthly_used, 0), q.quota_reset_at, q.total_used, true, false);
END;
$$;

-- 10,000 users on a plan large enough never to refuse, as bench/quota_setup.sql.
INSERT INTO usage_agg.quotas (user_id, membership_level, monthly_quota, quota_reset_at)
SELECT ('00000000-0000-0000-0000-' || lpad(u::text, 12, '0'))::uuid, 'bench', 2000000000,
       date_trunc('month', now()) + interval '1 month'
  FROM generate_series(1, 10000) u;
