-- Quotas: plans, per-user monthly quotas, and the atomic consume step.
--
-- Every step on a user's quota runs under that user's row lock in usage_agg.quotas
-- and reads the clock only after the lock is granted, so concurrent calls are
-- serialised in the order they are counted: no over-consumption, and a call that
-- races the monthly reset lands in exactly one month (the one of its created_at).
--
-- consume_quota and try_consume_quota take the common case in Rust with one
-- kept statement (src/quotas.rs) and hand every other case to _consume below,
-- which raises QUOTA_EXCEEDED with SQLSTATE UAQ01.

CREATE TABLE usage_agg.quota_plans (
    membership_level text    PRIMARY KEY,
    monthly_quota    integer NOT NULL,
    daily_cost_limit numeric,
    CONSTRAINT quota_plans_monthly_quota_not_negative CHECK (monthly_quota >= 0),
    CONSTRAINT quota_plans_daily_cost_limit_finite_not_negative
        CHECK (daily_cost_limit >= 0 AND daily_cost_limit < 'Infinity'::numeric),
    -- Added in 0.4.0 (last, as ALTER TABLE ... ADD COLUMN puts it).
    monthly_cost_budget numeric,
    CONSTRAINT quota_plans_monthly_cost_budget_finite_not_negative
        CHECK (monthly_cost_budget >= 0 AND monthly_cost_budget < 'Infinity'::numeric)
);
COMMENT ON TABLE usage_agg.quota_plans IS
    'Membership plans: monthly quota (units), optional daily cost limit and monthly cost budget (NULL: none). Plans are ordered by monthly_quota.';
INSERT INTO usage_agg.quota_plans (membership_level, monthly_quota) VALUES
    ('free', 100), ('basic', 300), ('plus', 1000), ('pro', 3000);

CREATE TABLE usage_agg.quotas (
    user_id          uuid        PRIMARY KEY,
    membership_level text        NOT NULL REFERENCES usage_agg.quota_plans (membership_level) ON UPDATE CASCADE,
    monthly_quota    integer     NOT NULL,
    monthly_used     integer     NOT NULL DEFAULT 0,
    quota_reset_at   timestamptz NOT NULL,
    total_used       bigint      NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT quotas_monthly_quota_not_negative CHECK (monthly_quota >= 0),
    CONSTRAINT quotas_monthly_used_not_negative CHECK (monthly_used >= 0),
    CONSTRAINT quotas_total_used_not_negative CHECK (total_used >= 0)
) WITH (fillfactor = 80);
CREATE INDEX quotas_quota_reset_at ON usage_agg.quotas (quota_reset_at);
COMMENT ON TABLE usage_agg.quotas IS
    'Per-user monthly quota state. Written only by usage_agg functions (consume_quota, set_membership, refund_quota, reset_expired_quotas).';

CREATE TABLE usage_agg.quota_usage_logs (
    id               uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id          uuid        NOT NULL,
    session_id       text,
    membership_level text        NOT NULL,
    amount           integer     NOT NULL,
    tokens_used      integer     NOT NULL DEFAULT 0,
    request_id       text        UNIQUE,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- Set once by refund_quota(request_id): the consumption was given back.
    refunded_at      timestamptz,
    CONSTRAINT quota_usage_logs_amount_positive CHECK (amount > 0),
    CONSTRAINT quota_usage_logs_tokens_used_not_negative CHECK (tokens_used >= 0)
);
CREATE INDEX quota_usage_logs_user_created_at ON usage_agg.quota_usage_logs (user_id, created_at);
-- For the retention cleanup: rows arrive in time order, so a BRIN index finds
-- the old ones and costs the quota step next to nothing.
CREATE INDEX quota_usage_logs_created_at ON usage_agg.quota_usage_logs USING brin (created_at);
COMMENT ON TABLE usage_agg.quota_usage_logs IS
    'One row per granted consume_quota call. refunded_at is set when refund_quota gave it back.';

SELECT pg_catalog.pg_extension_config_dump('usage_agg.quota_plans', '');
SELECT pg_catalog.pg_extension_config_dump('usage_agg.quotas', '');
SELECT pg_catalog.pg_extension_config_dump('usage_agg.quota_usage_logs', '');

-- A restore of quota_plans lands on the plans CREATE EXTENSION shipped: take the
-- restored values instead of failing on the primary key.
CREATE FUNCTION usage_agg._quota_plans_restore() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- On Citus this fires on a reference table's shard (quota_plans_<shardid>)
    -- as Citus copies rows to a node: a plain insert there.
    IF TG_RELID <> 'usage_agg.quota_plans'::regclass THEN
        RETURN NEW;
    END IF;
    UPDATE usage_agg.quota_plans
       SET monthly_quota = NEW.monthly_quota, daily_cost_limit = NEW.daily_cost_limit,
           monthly_cost_budget = NEW.monthly_cost_budget
     WHERE membership_level = NEW.membership_level;
    IF FOUND THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER quota_plans_restore
    BEFORE INSERT ON usage_agg.quota_plans
    FOR EACH ROW WHEN (pg_trigger_depth() = 0)
    EXECUTE FUNCTION usage_agg._quota_plans_restore();

-- A plan's new monthly quota applies to its members at once.
CREATE FUNCTION usage_agg._quota_plans_propagate() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- On Citus this fires on every node's shard of the reference table, where a
    -- distributed UPDATE cannot run: usage_agg.sync_plan_quotas() does it there
    -- (docs/citus.md).
    IF TG_RELID <> 'usage_agg.quota_plans'::regclass THEN
        RETURN NULL;
    END IF;
    UPDATE usage_agg.quotas
       SET monthly_quota = NEW.monthly_quota, updated_at = now()
     WHERE membership_level = NEW.membership_level
       AND monthly_quota IS DISTINCT FROM NEW.monthly_quota;
    RETURN NULL;
END;
$$;
CREATE TRIGGER quota_plans_propagate
    AFTER UPDATE OF monthly_quota ON usage_agg.quota_plans
    FOR EACH ROW EXECUTE FUNCTION usage_agg._quota_plans_propagate();

-- The result of every quota function.
CREATE TYPE usage_agg.quota_state AS (
    user_id          uuid,
    membership_level text,
    monthly_quota    integer,
    monthly_used     integer,
    remaining        integer,
    quota_reset_at   timestamptz,
    total_used       bigint,
    allowed          boolean,  -- the requested amount was granted (or had been, for a replayed request_id)
    replayed         boolean   -- a repeated request_id: the original grant, nothing charged now
);

-- First instant of the calendar month after `ts`, in the business time zone.
CREATE FUNCTION usage_agg._next_month_start(ts timestamptz) RETURNS timestamptz
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (date_trunc('month', ts AT TIME ZONE tz.name) + interval '1 month') AT TIME ZONE tz.name
      FROM (SELECT usage_agg._timezone() AS name) tz
$$;

CREATE FUNCTION usage_agg._next_plan(level text) RETURNS usage_agg.quota_plans
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT n.* FROM usage_agg.quota_plans n, usage_agg.quota_plans cur
     WHERE cur.membership_level = level AND n.monthly_quota > cur.monthly_quota
     ORDER BY n.monthly_quota, n.membership_level LIMIT 1
$$;

CREATE FUNCTION usage_agg._check_user(p_user_id uuid) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_user_id IS NULL THEN
        RAISE EXCEPTION 'usage_agg: user_id must not be NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END;
$$;

-- Locks the user's quota row, creating it on plan 'free' on first use, and applies
-- the monthly reset if its time has come. Returns the locked row with its
-- updated_at set to the instant of this step (read after the lock): every caller
-- stamps that instant on what it writes.
CREATE FUNCTION usage_agg._lock_quota(p_user_id uuid)
RETURNS usage_agg.quotas
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q usage_agg.quotas;
    at timestamptz;
BEGIN
    SELECT * INTO q FROM usage_agg.quotas WHERE user_id = p_user_id FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO usage_agg.quotas AS t (user_id, membership_level, monthly_quota, monthly_used, quota_reset_at, total_used)
        SELECT p_user_id, p.membership_level, p.monthly_quota, 0, usage_agg._next_month_start(clock_timestamp()), 0
          FROM usage_agg.quota_plans p WHERE p.membership_level = 'free'
        ON CONFLICT (user_id) DO NOTHING;
        SELECT * INTO q FROM usage_agg.quotas WHERE user_id = p_user_id FOR UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'usage_agg: no plan ''free'' in usage_agg.quota_plans for a new user'
                USING ERRCODE = 'no_data_found',
                      HINT = 'INSERT INTO usage_agg.quota_plans VALUES (''free'', 100, NULL);';
        END IF;
    END IF;
    at := clock_timestamp();
    IF at >= q.quota_reset_at THEN
        UPDATE usage_agg.quotas
           SET monthly_used = 0, quota_reset_at = usage_agg._next_month_start(at), updated_at = at
         WHERE user_id = p_user_id
        RETURNING * INTO q;
    END IF;
    q.updated_at := at;
    RETURN q;
END;
$$;

-- What is left of the month's quota; never negative (a plan can be lowered
-- below what was used). A SQL-standard body: bound at creation, so it needs no
-- search_path, and inlined into its callers.
CREATE FUNCTION usage_agg._remaining(q usage_agg.quotas) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN greatest(q.monthly_quota - q.monthly_used, 0);

CREATE FUNCTION usage_agg._state(q usage_agg.quotas, allowed boolean, replayed boolean)
RETURNS usage_agg.quota_state
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ROW(q.user_id, q.membership_level, q.monthly_quota, q.monthly_used,
               usage_agg._remaining(q), q.quota_reset_at, q.total_used,
               allowed, replayed)::usage_agg.quota_state
$$;

-- The atomic step behind consume_quota and try_consume_quota.
CREATE FUNCTION usage_agg._consume(p_user_id uuid, p_amount integer, p_session_id text,
                                   p_request_id text, p_tokens_used integer, p_raise boolean)
RETURNS usage_agg.quota_state
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q usage_agg.quotas;
    v_at timestamptz;
    v_log usage_agg.quota_usage_logs;
    v_next usage_agg.quota_plans;
    v_remaining integer;
BEGIN
    PERFORM usage_agg._check_user(p_user_id);
    IF p_amount IS NULL OR p_amount <= 0 OR p_amount > 1000000 THEN
        RAISE EXCEPTION 'usage_agg: amount must be between 1 and 1000000'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('amount = %s', coalesce(p_amount::text, 'NULL'));
    END IF;
    IF p_tokens_used IS NOT NULL AND p_tokens_used < 0 THEN
        RAISE EXCEPTION 'usage_agg: tokens_used must not be negative'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('tokens_used = %s', p_tokens_used);
    END IF;
    IF length(p_request_id) > 1000 OR length(p_session_id) > 1000 THEN
        RAISE EXCEPTION 'usage_agg: request_id and session_id are limited to 1000 characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    q := usage_agg._lock_quota(p_user_id);
    v_at := q.updated_at;

    -- Under the row lock every earlier call with this request_id has committed
    -- (or rolled back), so this check cannot race.
    IF p_request_id IS NOT NULL THEN
        SELECT * INTO v_log FROM usage_agg.quota_usage_logs WHERE request_id = p_request_id;
        IF FOUND THEN
            IF v_log.user_id <> p_user_id THEN
                RAISE EXCEPTION 'usage_agg: request_id % belongs to another user', p_request_id
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'request_id must be unique per call.';
            END IF;
            RETURN usage_agg._state(q, true, true);
        END IF;
    END IF;

    v_remaining := usage_agg._remaining(q);
    IF p_amount > v_remaining THEN
        IF NOT p_raise THEN
            RETURN usage_agg._state(q, false, false);
        END IF;
        v_next := usage_agg._next_plan(q.membership_level);
        RAISE EXCEPTION 'QUOTA_EXCEEDED: user % requested % but only % of % remain this month',
                p_user_id, p_amount, v_remaining, q.monthly_quota
            USING ERRCODE = 'UAQ01',
                  DETAIL = format('requested: %s, remaining: %s, monthly_quota: %s, monthly_used: %s, plan: %s, resets at: %s',
                                  p_amount, v_remaining, q.monthly_quota, q.monthly_used, q.membership_level,
                                  usage_agg._iso_utc(q.quota_reset_at)),
                  HINT = CASE WHEN v_next.membership_level IS NULL
                              THEN format('%s is the highest plan; the quota resets at %s.',
                                          q.membership_level, usage_agg._iso_utc(q.quota_reset_at))
                              ELSE format('Upgrade to plan %s (%s a month), or wait until %s.',
                                          v_next.membership_level, v_next.monthly_quota,
                                          usage_agg._iso_utc(q.quota_reset_at)) END;
    END IF;

    UPDATE usage_agg.quotas
       SET monthly_used = monthly_used + p_amount, total_used = total_used + p_amount, updated_at = v_at
     WHERE user_id = p_user_id
    RETURNING * INTO q;
    INSERT INTO usage_agg.quota_usage_logs (user_id, session_id, membership_level, amount, tokens_used, request_id, created_at)
    VALUES (p_user_id, p_session_id, q.membership_level, p_amount, coalesce(p_tokens_used, 0), p_request_id, v_at);
    PERFORM usage_agg._quota_alerts(p_user_id, q.monthly_used - p_amount, q.monthly_used, q.monthly_quota,
                                    q.quota_reset_at, v_at);
    RETURN usage_agg._state(q, true, false);
END;
$$;

-- consume_quota and try_consume_quota are in Rust (src/quotas.rs): the common
-- case in one kept statement, every other case in _consume above.

-- What quota_status returns: the quota state, percent used, a low-quota flag,
-- the next plan up, and the units consumed today (business day, refunds
-- excluded): what a quota widget shows.
CREATE TYPE usage_agg.quota_status_result AS (
    user_id          uuid,
    membership_level text,
    monthly_quota    integer,
    monthly_used     integer,
    remaining        integer,
    quota_reset_at   timestamptz,
    total_used       bigint,
    percent_used     numeric,
    low_quota        boolean,
    next_plan        text,
    today_used       bigint
);

CREATE FUNCTION usage_agg.quota_status(user_id uuid)
RETURNS usage_agg.quota_status_result
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q usage_agg.quotas;
    v_pct numeric;
    v_tz text;
    v_today date;
BEGIN
    PERFORM usage_agg._check_user($1);
    q := usage_agg._lock_quota($1);
    v_pct := CASE WHEN q.monthly_quota = 0 THEN 100
                  ELSE round(100.0 * q.monthly_used / q.monthly_quota, 2) END;
    v_tz := usage_agg._timezone();
    v_today := (q.updated_at AT TIME ZONE v_tz)::date;
    RETURN ROW(q.user_id, q.membership_level, q.monthly_quota, q.monthly_used,
               usage_agg._remaining(q), q.quota_reset_at, q.total_used,
               v_pct, v_pct > 80, (usage_agg._next_plan(q.membership_level)).membership_level,
               COALESCE((SELECT sum(l.amount) FROM usage_agg.quota_usage_logs l
                          WHERE l.user_id = $1 AND l.refunded_at IS NULL
                            AND l.created_at >= usage_agg._day_start(v_today, v_tz)
                            AND l.created_at < usage_agg._day_start(v_today + 1, v_tz)), 0)
              )::usage_agg.quota_status_result;
END;
$$;
COMMENT ON FUNCTION usage_agg.quota_status(uuid) IS
    'The user''s quota state with percent used, a low-quota flag (above 80%), the next plan up and the units consumed today';

CREATE FUNCTION usage_agg.set_membership(user_id uuid, level text)
RETURNS usage_agg.quota_state
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q usage_agg.quotas;
    v_plan usage_agg.quota_plans;
BEGIN
    PERFORM usage_agg._check_user($1);
    SELECT * INTO v_plan FROM usage_agg.quota_plans p WHERE p.membership_level = $2;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'usage_agg: unknown plan %', coalesce(quote_literal($2), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('Known plans: %s.', (SELECT string_agg(p.membership_level, ', ' ORDER BY p.monthly_quota)
                                                      FROM usage_agg.quota_plans p));
    END IF;
    q := usage_agg._lock_quota($1);
    UPDATE usage_agg.quotas t
       SET membership_level = v_plan.membership_level, monthly_quota = v_plan.monthly_quota, updated_at = q.updated_at
     WHERE t.user_id = $1
    RETURNING * INTO q;
    RETURN usage_agg._state(q, true, false);
END;
$$;
COMMENT ON FUNCTION usage_agg.set_membership(uuid, text) IS
    'Moves the user to a plan at once, keeping what was used this month';

-- First instant of the month that ends at `reset_at` (the current quota period's start).
CREATE FUNCTION usage_agg._month_before(reset_at timestamptz) RETURNS timestamptz
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (date_trunc('month', (reset_at AT TIME ZONE tz.name) - interval '1 day')) AT TIME ZONE tz.name
      FROM (SELECT usage_agg._timezone() AS name) tz
$$;

CREATE FUNCTION usage_agg.refund_quota(request_id text)
RETURNS usage_agg.quota_state
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_user uuid;
    v_log usage_agg.quota_usage_logs;
    q usage_agg.quotas;
    v_at timestamptz;
BEGIN
    IF $1 IS NULL THEN
        RAISE EXCEPTION 'usage_agg: request_id must not be NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT l.user_id INTO v_user FROM usage_agg.quota_usage_logs l WHERE l.request_id = $1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'usage_agg: no consumption with request_id %', $1
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Only calls made with a request_id can be refunded.';
    END IF;
    -- Same lock order as consume: the user's quota row first, then the log row.
    q := usage_agg._lock_quota(v_user);
    v_at := q.updated_at;
    SELECT * INTO v_log FROM usage_agg.quota_usage_logs l WHERE l.request_id = $1 FOR UPDATE;
    IF v_log.refunded_at IS NOT NULL THEN
        RETURN usage_agg._state(q, false, true);
    END IF;
    UPDATE usage_agg.quota_usage_logs l SET refunded_at = v_at WHERE l.id = v_log.id;
    -- Only a consumption of the current month gives monthly quota back.
    UPDATE usage_agg.quotas t
       SET monthly_used = CASE WHEN v_log.created_at >= usage_agg._month_before(q.quota_reset_at)
                               THEN greatest(t.monthly_used - v_log.amount, 0) ELSE t.monthly_used END,
           total_used = greatest(t.total_used - v_log.amount, 0),
           updated_at = v_at
     WHERE t.user_id = v_user
    RETURNING * INTO q;
    RETURN usage_agg._state(q, true, false);
END;
$$;
COMMENT ON FUNCTION usage_agg.refund_quota(text) IS
    'Gives back the consumption made with request_id, exactly once (allowed = true when refunded now, replayed = true when it already was)';

CREATE FUNCTION usage_agg.reset_expired_quotas()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_n bigint;
BEGIN
    -- Row locks serialise this with consume_quota; the condition is rechecked on
    -- the latest row version, so a row a concurrent call already reset is skipped.
    UPDATE usage_agg.quotas
       SET monthly_used = 0, quota_reset_at = usage_agg._next_month_start(clock_timestamp()), updated_at = clock_timestamp()
     WHERE quota_reset_at <= clock_timestamp();
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END;
$$;
COMMENT ON FUNCTION usage_agg.reset_expired_quotas() IS
    'Resets every quota whose month has ended (for pg_cron); returns how many were reset';
