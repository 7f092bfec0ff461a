-- Money budgets and threshold alerts (0.4.0).
--
-- A plan carries a daily cost limit and a monthly cost budget (NULL: none);
-- usage_agg.user_limits overrides either for one user. Crossing a threshold of
-- the monthly quota (where quota is consumed), of the daily cost limit or of
-- the monthly budget (where costs are folded) records one row in
-- usage_agg.alerts and sends NOTIFY usage_agg_alerts, in the transaction that
-- crossed: a rolled-back call alerts nothing, and a unique constraint makes it
-- once per (user, kind, threshold, period) however many sessions cross at once.

CREATE TABLE usage_agg.user_limits (
    user_id             uuid        PRIMARY KEY,
    daily_cost_limit    numeric,
    monthly_cost_budget numeric,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT user_limits_daily_cost_limit_finite_not_negative
        CHECK (daily_cost_limit >= 0 AND daily_cost_limit < 'Infinity'::numeric),
    CONSTRAINT user_limits_monthly_cost_budget_finite_not_negative
        CHECK (monthly_cost_budget >= 0 AND monthly_cost_budget < 'Infinity'::numeric)
);
COMMENT ON TABLE usage_agg.user_limits IS
    'Per-user overrides of the plan''s daily_cost_limit and monthly_cost_budget (an enterprise deal); NULL keeps the plan''s value';

CREATE TABLE usage_agg.alerts (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id     uuid        NOT NULL,
    kind        text        NOT NULL,
    threshold   numeric     NOT NULL,
    period      date        NOT NULL,
    value       numeric     NOT NULL,
    limit_value numeric     NOT NULL,
    at          timestamptz NOT NULL,
    CONSTRAINT alerts_kind_known CHECK (kind IN ('monthly_quota', 'daily_cost', 'monthly_budget')),
    CONSTRAINT alerts_once_per_period UNIQUE (user_id, kind, threshold, period)
);
CREATE INDEX alerts_at ON usage_agg.alerts (at);
COMMENT ON TABLE usage_agg.alerts IS
    'One row per threshold crossed: kind monthly_quota (units), daily_cost or monthly_budget (money); threshold in percent of limit_value; period is the business day (daily_cost) or the first day of the month; value is what was used when it crossed';

SELECT pg_catalog.pg_extension_config_dump('usage_agg.user_limits', '');
SELECT pg_catalog.pg_extension_config_dump('usage_agg.alerts', '');
SELECT pg_catalog.pg_extension_config_dump('usage_agg.alerts_id_seq', '');

-- The fold checks cost alerts only while some plan or user has a cost limit:
-- every backend's cached settings are dropped when these tables change.
CREATE TRIGGER quota_plans_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON usage_agg.quota_plans
    FOR EACH STATEMENT EXECUTE FUNCTION usage_agg._config_changed();
CREATE TRIGGER user_limits_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON usage_agg.user_limits
    FOR EACH STATEMENT EXECUTE FUNCTION usage_agg._config_changed();

-- Whether any plan or user has a daily cost limit or a monthly budget.
CREATE FUNCTION usage_agg._cost_limits_in_use() RETURNS boolean
LANGUAGE sql STABLE
AS $$
SELECT EXISTS (SELECT 1 FROM usage_agg.quota_plans p
                WHERE p.daily_cost_limit IS NOT NULL OR p.monthly_cost_budget IS NOT NULL)
    OR EXISTS (SELECT 1 FROM usage_agg.user_limits l
                WHERE l.daily_cost_limit IS NOT NULL OR l.monthly_cost_budget IS NOT NULL)
$$;

-- A user's plan and the cost limits that apply (overrides first; users without
-- a quota row are on plan free): one row. No SET clause, so that it is inlined
-- into the query that reads it (each insert's cost alert check does, in
-- immediate mode) instead of planned again on every call; names and operators
-- are qualified instead (not a SQL-standard body: see _timezone).
CREATE FUNCTION usage_agg._cost_limits(p_user_id uuid)
RETURNS TABLE (membership_level text, daily_cost_limit numeric, monthly_cost_budget numeric)
LANGUAGE sql STABLE
AS $$
    SELECT lv.level,
           COALESCE(o.daily_cost_limit, p.daily_cost_limit),
           COALESCE(o.monthly_cost_budget, p.monthly_cost_budget)
      FROM (SELECT COALESCE((SELECT q.membership_level FROM usage_agg.quotas q
                              WHERE q.user_id OPERATOR(pg_catalog.=) p_user_id),
                            'free') AS level) lv
      LEFT JOIN usage_agg.quota_plans p ON p.membership_level OPERATOR(pg_catalog.=) lv.level
      LEFT JOIN usage_agg.user_limits o ON o.user_id OPERATOR(pg_catalog.=) p_user_id
$$;

-- The cost a user's folded aggregates hold for the business month that starts
-- on `month`: its days in daily_logs plus its row in monthly_logs (days already
-- rolled up), up to and including `through`. One row; inlined where it is read
-- (see _cost_limits).
CREATE FUNCTION usage_agg._folded_month_cost(p_user_id uuid, p_month date, p_through date)
RETURNS TABLE (cost numeric)
LANGUAGE sql STABLE
AS $$
    SELECT COALESCE((SELECT pg_catalog.sum(t.cost)
                       FROM usage_agg.daily_logs d CROSS JOIN LATERAL usage_agg._totals(d.log_data) t
                      WHERE d.user_id OPERATOR(pg_catalog.=) p_user_id
                        AND d.date OPERATOR(pg_catalog.>=) p_month
                        AND d.date OPERATOR(pg_catalog.<=) p_through), 0)
         OPERATOR(pg_catalog.+)
           COALESCE((SELECT t.cost
                       FROM usage_agg.monthly_logs m CROSS JOIN LATERAL usage_agg._totals(m.log_data) t
                      WHERE m.user_id OPERATOR(pg_catalog.=) p_user_id
                        AND m.month OPERATOR(pg_catalog.=) p_month), 0)
$$;

-- Serialises the writers of each user's business month while cost limits are
-- in use (the folds call it before they write the day rows): a session adding
-- cost to one day of a month sees the other days only as committed, so two
-- sessions adding to different days at once would each miss the other's part
-- and neither would record a budget threshold that their sum crosses. Taken in
-- one order and before the day rows, it adds no deadlock; writers of one day
-- wait for each other on its row anyway. Read committed sees, after the wait,
-- what the other writer committed (repeatable read would not).
CREATE FUNCTION usage_agg._lock_cost_months(p_users uuid[], p_days date[]) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_key integer;
BEGIN
    FOR v_key IN
        SELECT DISTINCT hashtext(u.user_id::text || ' ' || date_trunc('month', u.day::timestamp)::date::text)
          FROM unnest(p_users, p_days) AS u(user_id, day)
         ORDER BY 1
    LOOP
        -- The two-key space (apart from single bigint keys), first key 'uagg'.
        PERFORM pg_advisory_xact_lock(1969317735, v_key);
    END LOOP;
END;
$$;

-- Records and announces the thresholds (config.alert_thresholds, in percent of
-- `limit`) that a step from `before` to `after` crossed; returns how many.
CREATE FUNCTION usage_agg._record_alerts(p_user_id uuid, p_kind text, p_period date, p_before numeric,
                                         p_after numeric, p_limit numeric, p_at timestamptz)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    a usage_agg.alerts;
    n integer := 0;
BEGIN
    IF p_limit IS NULL OR p_limit <= 0 OR p_after <= p_before THEN
        RETURN 0;
    END IF;
    FOR a IN
        INSERT INTO usage_agg.alerts AS t (user_id, kind, threshold, period, value, limit_value, at)
        SELECT p_user_id, p_kind, th.pct, p_period, p_after, p_limit, p_at
          FROM usage_agg.config c, unnest(c.alert_thresholds) AS th(pct)
         WHERE p_before * 100 < th.pct * p_limit AND p_after * 100 >= th.pct * p_limit
         ORDER BY th.pct
        ON CONFLICT ON CONSTRAINT alerts_once_per_period DO NOTHING
        RETURNING t.*
    LOOP
        PERFORM pg_notify('usage_agg_alerts',
                          jsonb_build_object('id', a.id, 'user_id', a.user_id, 'kind', a.kind,
                                            'threshold', a.threshold, 'period', a.period,
                                            'value', a.value, 'limit', a.limit_value,
                                            'at', usage_agg._iso_utc(a.at))::text);
        n := n + 1;
    END LOOP;
    RETURN n;
END;
$$;

-- A quota step took the user's monthly_used from `before` to `after` (under
-- the user's row lock) in the quota month that ends at `reset_at`.
CREATE FUNCTION usage_agg._quota_alerts(p_user_id uuid, p_before integer, p_after integer, p_quota integer,
                                        p_reset_at timestamptz, p_at timestamptz)
RETURNS integer
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT usage_agg._record_alerts(p_user_id, 'monthly_quota',
                                    ((p_reset_at AT TIME ZONE usage_agg._timezone()) - interval '1 month')::date,
                                    p_before, p_after, p_quota, p_at)
$$;

-- The fold added `delta` to the cost of (user, day) for each element of the
-- arrays (costs already written to daily_logs): the daily cost limit and the
-- monthly budget alerts those additions crossed. Called by the fold only while
-- _cost_limits_in_use().
CREATE FUNCTION usage_agg._cost_alerts(p_users uuid[], p_days date[], p_deltas numeric[])
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
-- Planned once per session: a custom plan per call cost more than the check
-- (0.7 ms of 0.8 per insert in immediate mode). Like every cached plan, one
-- made while the tables were recorded as empty (ANALYZE of an empty table)
-- scans them until autoanalyze invalidates it.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    r record;
    v_at timestamptz := clock_timestamp();
    v_thresholds numeric[] := (SELECT c.alert_thresholds FROM usage_agg.config c);
    n integer := 0;
BEGIN
    -- Almost every step crosses nothing: one query per kind finds the steps
    -- that cross a threshold, and only those are recorded.
    FOR r IN
        SELECT f.user_id, f.day, s.after - f.delta AS before, s.after, l.daily_cost_limit AS cost_limit
          FROM (SELECT u.user_id, u.day, sum(u.delta) AS delta
                  FROM unnest(p_users, p_days, p_deltas) AS u(user_id, day, delta)
                 GROUP BY u.user_id, u.day) f
         CROSS JOIN LATERAL usage_agg._cost_limits(f.user_id) l
         CROSS JOIN LATERAL (
               SELECT COALESCE((SELECT t.cost
                                  FROM usage_agg.daily_logs d CROSS JOIN LATERAL usage_agg._totals(d.log_data) t
                                 WHERE d.user_id = f.user_id AND d.date = f.day), 0) AS after
               OFFSET 0) s  -- (computed once, not once per reference)
         WHERE f.delta > 0 AND l.daily_cost_limit > 0
           AND EXISTS (SELECT FROM unnest(v_thresholds) AS th(pct)
                        WHERE (s.after - f.delta) * 100 < th.pct * l.daily_cost_limit
                          AND s.after * 100 >= th.pct * l.daily_cost_limit)
         ORDER BY f.user_id, f.day
    LOOP
        n := n + usage_agg._record_alerts(r.user_id, 'daily_cost', r.day, r.before, r.after, r.cost_limit, v_at);
    END LOOP;
    FOR r IN
        SELECT f.user_id, f.month, s.after - f.delta AS before, s.after, l.monthly_cost_budget AS cost_limit
          FROM (SELECT u.user_id, date_trunc('month', u.day)::date AS month, sum(u.delta) AS delta
                  FROM unnest(p_users, p_days, p_deltas) AS u(user_id, day, delta)
                 GROUP BY u.user_id, date_trunc('month', u.day)) f
         CROSS JOIN LATERAL usage_agg._cost_limits(f.user_id) l
         -- The whole month as folded (days after the ones added to too: a call
         -- folded late still counts towards the month it belongs to).
         CROSS JOIN LATERAL (
               SELECT c.cost AS after
                 FROM usage_agg._folded_month_cost(f.user_id, f.month, (f.month + interval '1 month - 1 day')::date) c
               OFFSET 0) s
         WHERE f.delta > 0 AND l.monthly_cost_budget > 0
           AND EXISTS (SELECT FROM unnest(v_thresholds) AS th(pct)
                        WHERE (s.after - f.delta) * 100 < th.pct * l.monthly_cost_budget
                          AND s.after * 100 >= th.pct * l.monthly_cost_budget)
         ORDER BY f.user_id, f.month
    LOOP
        n := n + usage_agg._record_alerts(r.user_id, 'monthly_budget', r.month, r.before, r.after,
                                          r.cost_limit, v_at);
    END LOOP;
    RETURN n;
END;
$$;
