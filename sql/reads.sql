-- Reads: usage windows, the daily cost limit, and flat views for BI tools.
-- Everything here reads the aggregates (daily_logs, monthly_logs), never the
-- detail, so its cost grows with the number of days, not of calls.

CREATE FUNCTION usage_agg._check_reader_args(p_user_id uuid, p_at timestamptz) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM usage_agg._check_user(p_user_id);
    PERFORM usage_agg._check_at(p_at);
END;
$$;

-- Usage of one user in the windows today, month and all_time, as of the business
-- day that contains `at` (configured time zone). Months already rolled up into
-- monthly_logs count whole.
CREATE FUNCTION usage_agg.usage_summary(user_id uuid, at timestamptz DEFAULT now())
RETURNS TABLE (period text, calls bigint, successful bigint, failed bigint, tokens bigint, cost numeric,
               input_tokens bigint, output_tokens bigint, cache_read_tokens bigint, cache_write_tokens bigint,
               unpriced_calls bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tz text;
    v_day date;
    v_month date;
    v_today_known boolean;
BEGIN
    PERFORM usage_agg._check_reader_args($1, $2);
    v_tz := usage_agg._timezone();
    v_day := ($2 AT TIME ZONE v_tz)::date;
    v_month := date_trunc('month', v_day::timestamp)::date;
    -- A day already rolled up into its month cannot be told apart there.
    v_today_known := v_day >= (SELECT h.daily_kept_from FROM usage_agg.retention_horizon h);
    -- One pass over the user's rows, each window a filtered sum (this is on the
    -- request path of applications).
    RETURN QUERY
    WITH rows_of_user AS (
        SELECT d.date AS first_day, true AS is_day, t.calls, t.successful, t.failed, t.tokens, t.cost,
               t.input_tokens AS i, t.output_tokens AS o, t.cache_read_tokens AS cr, t.cache_write_tokens AS cw,
               t.unpriced_calls AS u
          FROM usage_agg.daily_logs d CROSS JOIN LATERAL usage_agg._totals(d.log_data) t
         WHERE d.user_id = $1 AND d.date <= v_day
        UNION ALL
        SELECT m.month, false, t.calls, t.successful, t.failed, t.tokens, t.cost,
               t.input_tokens, t.output_tokens, t.cache_read_tokens, t.cache_write_tokens, t.unpriced_calls
          FROM usage_agg.monthly_logs m CROSS JOIN LATERAL usage_agg._totals(m.log_data) t
         WHERE m.user_id = $1 AND m.month <= v_day
        UNION ALL
        -- Deferred mode: calls not folded into daily_logs yet.
        SELECT p.day, true, p.calls, p.successful, p.calls - p.successful, p.tokens, p.cost,
               p.input_tokens, p.output_tokens, p.cache_read_tokens, p.cache_write_tokens, p.unpriced
          FROM usage_agg.pending_deltas p
         WHERE p.user_id = $1 AND p.day <= v_day
    ), totals AS (
        SELECT sum(r.calls) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_calls,
               sum(r.successful) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_ok,
               sum(r.failed) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_failed,
               sum(r.tokens) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_tokens,
               sum(r.cost) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_cost,
               sum(r.i) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_i,
               sum(r.o) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_o,
               sum(r.cr) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_cr,
               sum(r.cw) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_cw,
               sum(r.u) FILTER (WHERE r.is_day AND r.first_day = v_day) AS d_u,
               sum(r.calls) FILTER (WHERE r.first_day >= v_month) AS m_calls,
               sum(r.successful) FILTER (WHERE r.first_day >= v_month) AS m_ok,
               sum(r.failed) FILTER (WHERE r.first_day >= v_month) AS m_failed,
               sum(r.tokens) FILTER (WHERE r.first_day >= v_month) AS m_tokens,
               sum(r.cost) FILTER (WHERE r.first_day >= v_month) AS m_cost,
               sum(r.i) FILTER (WHERE r.first_day >= v_month) AS m_i,
               sum(r.o) FILTER (WHERE r.first_day >= v_month) AS m_o,
               sum(r.cr) FILTER (WHERE r.first_day >= v_month) AS m_cr,
               sum(r.cw) FILTER (WHERE r.first_day >= v_month) AS m_cw,
               sum(r.u) FILTER (WHERE r.first_day >= v_month) AS m_u,
               sum(r.calls) AS a_calls, sum(r.successful) AS a_ok, sum(r.failed) AS a_failed,
               sum(r.tokens) AS a_tokens, sum(r.cost) AS a_cost,
               sum(r.i) AS a_i, sum(r.o) AS a_o, sum(r.cr) AS a_cr, sum(r.cw) AS a_cw, sum(r.u) AS a_u
          FROM rows_of_user r
    )
    SELECT w.period,
           CASE WHEN w.known THEN COALESCE(w.calls, 0)::bigint END,
           CASE WHEN w.known THEN COALESCE(w.ok, 0)::bigint END,
           CASE WHEN w.known THEN COALESCE(w.failed, 0)::bigint END,
           CASE WHEN w.known THEN COALESCE(w.tokens, 0)::bigint END,
           CASE WHEN w.known THEN COALESCE(w.cost, 0) END,
           CASE WHEN w.known THEN COALESCE(w.i, 0)::bigint END,
           CASE WHEN w.known THEN COALESCE(w.o, 0)::bigint END,
           CASE WHEN w.known THEN COALESCE(w.cr, 0)::bigint END,
           CASE WHEN w.known THEN COALESCE(w.cw, 0)::bigint END,
           CASE WHEN w.known THEN COALESCE(w.u, 0)::bigint END
      FROM totals t
     CROSS JOIN LATERAL (VALUES
           (1, 'today', v_today_known, t.d_calls, t.d_ok, t.d_failed, t.d_tokens, t.d_cost,
            t.d_i, t.d_o, t.d_cr, t.d_cw, t.d_u),
           (2, 'month', true, t.m_calls, t.m_ok, t.m_failed, t.m_tokens, t.m_cost,
            t.m_i, t.m_o, t.m_cr, t.m_cw, t.m_u),
           (3, 'all_time', true, t.a_calls, t.a_ok, t.a_failed, t.a_tokens, t.a_cost,
            t.a_i, t.a_o, t.a_cr, t.a_cw, t.a_u))
           AS w(ord, period, known, calls, ok, failed, tokens, cost, i, o, cr, cw, u)
     ORDER BY w.ord;
END;
$$;
COMMENT ON FUNCTION usage_agg.usage_summary(uuid, timestamptz) IS
    'Calls, successful, failed, tokens and cost of a user for today, this month and all time, as of at (business time zone), from the aggregates only';

-- Today's and this month's cost against the user's daily cost limit and monthly
-- budget (the plan's, or the user's overrides in user_limits; users without a
-- quota row are on plan free), pending calls included. Months are months of
-- the business time zone; the month's cost is its days up to the day of `at`.
-- Reads aggregates only; takes no locks.
CREATE FUNCTION usage_agg.check_usage_limit(user_id uuid, at timestamptz DEFAULT now())
RETURNS TABLE (membership_level text, today_cost numeric, daily_cost_limit numeric, remaining numeric,
               allowed boolean, month_cost numeric, monthly_cost_budget numeric, month_remaining numeric)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_day date;
    v_month date;
    v_limits record;
    v_cost numeric;
    v_month_cost numeric;
BEGIN
    PERFORM usage_agg._check_reader_args($1, $2);
    v_day := ($2 AT TIME ZONE usage_agg._timezone())::date;
    v_month := date_trunc('month', v_day)::date;
    SELECT * INTO v_limits FROM usage_agg._cost_limits($1);
    v_cost := COALESCE((SELECT t.cost
                          FROM usage_agg.daily_logs d CROSS JOIN LATERAL usage_agg._totals(d.log_data) t
                         WHERE d.user_id = $1 AND d.date = v_day), 0)
            + COALESCE((SELECT sum(p.cost) FROM usage_agg.pending_deltas p
                         WHERE p.user_id = $1 AND p.day = v_day), 0);
    v_month_cost := (SELECT c.cost FROM usage_agg._folded_month_cost($1, v_month, v_day) c)
            + COALESCE((SELECT sum(p.cost) FROM usage_agg.pending_deltas p
                         WHERE p.user_id = $1 AND p.day >= v_month AND p.day <= v_day), 0);
    RETURN QUERY SELECT v_limits.membership_level, v_cost, v_limits.daily_cost_limit,
                        CASE WHEN v_limits.daily_cost_limit IS NOT NULL
                             THEN greatest(v_limits.daily_cost_limit - v_cost, 0) END,
                        COALESCE(v_cost < v_limits.daily_cost_limit, true)
                            AND COALESCE(v_month_cost < v_limits.monthly_cost_budget, true),
                        v_month_cost, v_limits.monthly_cost_budget,
                        CASE WHEN v_limits.monthly_cost_budget IS NOT NULL
                             THEN greatest(v_limits.monthly_cost_budget - v_month_cost, 0) END;
END;
$$;
COMMENT ON FUNCTION usage_agg.check_usage_limit(uuid, timestamptz) IS
    'Today''s and this month''s cost of a user against the daily_cost_limit and monthly_cost_budget that apply (plan or user_limits; NULL: none): remaining, and allowed when both are below their limits';

-- ---------------------------------------------------------------------------
-- Flat views for BI tools: plain columns, one row per user and day/month, and
-- per model and per key.
-- ---------------------------------------------------------------------------
CREATE VIEW usage_agg.daily_usage AS
SELECT d.user_id,
       d.date,
       t.calls,
       t.successful AS successful_calls,
       t.failed AS failed_calls,
       t.tokens AS tokens_used,
       t.cost AS estimated_cost,
       CASE WHEN jsonb_typeof(d.log_data->'shared_service_usage'->'keys_used') = 'array'
            THEN jsonb_array_length(d.log_data->'shared_service_usage'->'keys_used') ELSE 0 END AS keys_used,
       t.last_api_call_at,
       t.input_tokens, t.output_tokens, t.cache_read_tokens, t.cache_write_tokens, t.unpriced_calls
  FROM usage_agg.daily_logs d CROSS JOIN LATERAL usage_agg._totals(d.log_data) t;
COMMENT ON VIEW usage_agg.daily_usage IS 'daily_logs as plain columns (one row per user and business day)';

-- Months: the rolled-up monthly rows plus the days not rolled up yet.
CREATE VIEW usage_agg.monthly_usage AS
SELECT u.user_id, u.month,
       sum(u.calls)::bigint AS calls,
       sum(u.successful_calls)::bigint AS successful_calls,
       sum(u.failed_calls)::bigint AS failed_calls,
       sum(u.tokens_used)::bigint AS tokens_used,
       sum(u.estimated_cost) AS estimated_cost,
       max(u.last_api_call_at) AS last_api_call_at,
       sum(u.input_tokens)::bigint AS input_tokens, sum(u.output_tokens)::bigint AS output_tokens,
       sum(u.cache_read_tokens)::bigint AS cache_read_tokens,
       sum(u.cache_write_tokens)::bigint AS cache_write_tokens, sum(u.unpriced_calls)::bigint AS unpriced_calls
  FROM (SELECT m.user_id, m.month, t.calls, t.successful AS successful_calls, t.failed AS failed_calls,
               t.tokens AS tokens_used, t.cost AS estimated_cost, t.last_api_call_at,
               t.input_tokens, t.output_tokens, t.cache_read_tokens, t.cache_write_tokens, t.unpriced_calls
          FROM usage_agg.monthly_logs m CROSS JOIN LATERAL usage_agg._totals(m.log_data) t
        UNION ALL
        SELECT d.user_id, date_trunc('month', d.date::timestamp)::date,
               d.calls, d.successful_calls, d.failed_calls, d.tokens_used, d.estimated_cost, d.last_api_call_at,
               d.input_tokens, d.output_tokens, d.cache_read_tokens, d.cache_write_tokens, d.unpriced_calls
          FROM usage_agg.daily_usage d) u
 GROUP BY u.user_id, u.month;
COMMENT ON VIEW usage_agg.monthly_usage IS
    'Usage per user and calendar month (business time zone): monthly_logs plus the daily_logs days not rolled up yet';

CREATE VIEW usage_agg.daily_usage_by_model AS
SELECT d.user_id, d.date, c.name AS model, c.calls, c.tokens, c.cost, c.input_tokens, c.output_tokens, c.cache_read_tokens, c.cache_write_tokens, c.unpriced_calls
  FROM usage_agg.daily_logs d CROSS JOIN LATERAL usage_agg._document_cells(d.log_data, 'by_model') c;
COMMENT ON VIEW usage_agg.daily_usage_by_model IS 'One row per user, business day and model';

CREATE VIEW usage_agg.daily_usage_by_key AS
SELECT d.user_id, d.date, c.name::uuid AS shared_key_id, c.calls, c.tokens, c.cost, c.input_tokens, c.output_tokens, c.cache_read_tokens, c.cache_write_tokens, c.unpriced_calls
  FROM usage_agg.daily_logs d CROSS JOIN LATERAL usage_agg._document_cells(d.log_data, 'by_key') c;
COMMENT ON VIEW usage_agg.daily_usage_by_key IS 'One row per user, business day and shared key';

CREATE VIEW usage_agg.monthly_usage_by_model AS
SELECT u.user_id, u.month, u.model, sum(u.calls)::bigint AS calls, sum(u.tokens)::bigint AS tokens, sum(u.cost) AS cost,
       sum(u.input_tokens)::bigint AS input_tokens, sum(u.output_tokens)::bigint AS output_tokens,
       sum(u.cache_read_tokens)::bigint AS cache_read_tokens,
       sum(u.cache_write_tokens)::bigint AS cache_write_tokens, sum(u.unpriced_calls)::bigint AS unpriced_calls
  FROM (SELECT m.user_id, m.month, c.name AS model, c.calls, c.tokens, c.cost, c.input_tokens, c.output_tokens, c.cache_read_tokens, c.cache_write_tokens, c.unpriced_calls
          FROM usage_agg.monthly_logs m CROSS JOIN LATERAL usage_agg._document_cells(m.log_data, 'by_model') c
        UNION ALL
        SELECT d.user_id, date_trunc('month', d.date::timestamp)::date, d.model, d.calls, d.tokens, d.cost, d.input_tokens, d.output_tokens, d.cache_read_tokens, d.cache_write_tokens, d.unpriced_calls
          FROM usage_agg.daily_usage_by_model d) u
 GROUP BY u.user_id, u.month, u.model;
COMMENT ON VIEW usage_agg.monthly_usage_by_model IS 'One row per user, calendar month and model';

CREATE VIEW usage_agg.monthly_usage_by_key AS
SELECT u.user_id, u.month, u.shared_key_id, sum(u.calls)::bigint AS calls, sum(u.tokens)::bigint AS tokens, sum(u.cost) AS cost,
       sum(u.input_tokens)::bigint AS input_tokens, sum(u.output_tokens)::bigint AS output_tokens,
       sum(u.cache_read_tokens)::bigint AS cache_read_tokens,
       sum(u.cache_write_tokens)::bigint AS cache_write_tokens, sum(u.unpriced_calls)::bigint AS unpriced_calls
  FROM (SELECT m.user_id, m.month, c.name::uuid AS shared_key_id, c.calls, c.tokens, c.cost, c.input_tokens, c.output_tokens, c.cache_read_tokens, c.cache_write_tokens, c.unpriced_calls
          FROM usage_agg.monthly_logs m CROSS JOIN LATERAL usage_agg._document_cells(m.log_data, 'by_key') c
        UNION ALL
        SELECT d.user_id, date_trunc('month', d.date::timestamp)::date, d.shared_key_id, d.calls, d.tokens, d.cost, d.input_tokens, d.output_tokens, d.cache_read_tokens, d.cache_write_tokens, d.unpriced_calls
          FROM usage_agg.daily_usage_by_key d) u
 GROUP BY u.user_id, u.month, u.shared_key_id;
COMMENT ON VIEW usage_agg.monthly_usage_by_key IS 'One row per user, calendar month and shared key';
