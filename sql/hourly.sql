-- The hourly tier: calls per user and per shared key, per hour of the business
-- day (config.timezone).
--
-- An hour is stored as the instant it starts (timestamptz), so the two 01:00s
-- of a fall-back night are two rows an hour apart and a spring-forward day has
-- 23 hours. The fold feeds it from the groups it folds into daily_logs, which
-- it splits by hour (each group lies in one hour, its newest call's): a user's
-- hours are written with the user's day, in the same transaction; a key's hours,
-- which every user of the key touches, only by applies (like key_daily_logs),
-- from the calls they apply and from pending_key_hour_deltas, which statements
-- that fold their own calls (immediate mode, corrections) append to. Readers add
-- what is pending, so they are exact at any moment.

-- ---------------------------------------------------------------------------
-- Tables.
-- ---------------------------------------------------------------------------
CREATE TABLE usage_agg.hourly_logs (
    user_id       uuid        NOT NULL,
    hour          timestamptz NOT NULL,
    calls         bigint      NOT NULL,
    successful    bigint      NOT NULL,
    tokens        bigint      NOT NULL,
    cost          numeric     NOT NULL,
    last_modified timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT hourly_logs_pkey PRIMARY KEY (user_id, hour)
) WITH (fillfactor = 80);  -- room for HOT updates: a user's current hour is rewritten often
CREATE INDEX hourly_logs_hour ON usage_agg.hourly_logs (hour);
COMMENT ON TABLE usage_agg.hourly_logs IS
    'Per user and business hour (the instant the hour starts in config.timezone): calls, successful calls, tokens, exact cost. Read through hourly_usage (which adds pending calls).';

CREATE TABLE usage_agg.key_hourly_logs (
    shared_key_id uuid        NOT NULL,
    hour          timestamptz NOT NULL,
    calls         bigint      NOT NULL,
    successful    bigint      NOT NULL,
    tokens        bigint      NOT NULL,
    cost          numeric     NOT NULL,
    last_modified timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT key_hourly_logs_pkey PRIMARY KEY (shared_key_id, hour)
) WITH (fillfactor = 80);
CREATE INDEX key_hourly_logs_hour ON usage_agg.key_hourly_logs (hour);
COMMENT ON TABLE usage_agg.key_hourly_logs IS
    'Per shared key and business hour, across users: calls, successful calls, tokens, exact cost. Written by applies only; read through key_hourly_usage (which adds pending calls).';

CREATE TABLE usage_agg.pending_key_hour_deltas (
    shared_key_id uuid        NOT NULL,
    hour          timestamptz NOT NULL,
    calls         bigint      NOT NULL,
    successful    bigint      NOT NULL,
    tokens        bigint      NOT NULL,
    cost          numeric     NOT NULL,
    appended_at   timestamptz NOT NULL DEFAULT now()
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
        autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 10000);
CREATE INDEX pending_key_hour_deltas_key_hour ON usage_agg.pending_key_hour_deltas (shared_key_id, hour);
COMMENT ON TABLE usage_agg.pending_key_hour_deltas IS
    'Per-key hourly deltas of statements that folded their own calls; folded into key_hourly_logs by the next apply; readers include them.';

SELECT pg_catalog.pg_extension_config_dump('usage_agg.hourly_logs', '');
SELECT pg_catalog.pg_extension_config_dump('usage_agg.key_hourly_logs', '');
SELECT pg_catalog.pg_extension_config_dump('usage_agg.pending_key_hour_deltas', '');

-- The instant the business hour of `at` starts in time zone `tz` (the Rust
-- fold computes the same). An instant, not a local time: the two 01:00s of a
-- fall-back night differ. STABLE as timestamptz - interval is (it is exact
-- here: the interval is less than an hour); inlined into the queries using it.
CREATE FUNCTION usage_agg._hour_start(at timestamptz, tz text) RETURNS timestamptz
LANGUAGE sql STABLE STRICT PARALLEL SAFE
RETURN at - ((at AT TIME ZONE tz) - date_trunc('hour', at AT TIME ZONE tz));

-- Every call the hourly tier counts, by source: folded user hours ('user'),
-- folded key hours ('key'), and what is pending for each. One row per stored
-- row or pending row; the readers below add them up.
CREATE FUNCTION usage_agg._hourly_parts(p_tz text)
RETURNS TABLE (scope text, id uuid, hour timestamptz, calls bigint, successful bigint, tokens bigint,
               cost numeric)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT 'user', h.user_id, h.hour, h.calls, h.successful, h.tokens, h.cost
      FROM usage_agg.hourly_logs h
    UNION ALL
    SELECT 'user', p.user_id, usage_agg._hour_start(p.last_at, p_tz), p.calls::bigint, p.successful::bigint,
           p.tokens, p.cost
      FROM usage_agg.pending_deltas p
    UNION ALL
    SELECT 'key', k.shared_key_id, k.hour, k.calls, k.successful, k.tokens, k.cost
      FROM usage_agg.key_hourly_logs k
    UNION ALL
    SELECT 'key', q.shared_key_id, q.hour, q.calls, q.successful, q.tokens, q.cost
      FROM usage_agg.pending_key_hour_deltas q
    UNION ALL
    SELECT 'key', p.shared_key_id, usage_agg._hour_start(p.last_at, p_tz), p.calls::bigint, p.successful::bigint,
           p.tokens, p.cost
      FROM usage_agg.pending_deltas p
     WHERE p.shared_key_id IS NOT NULL
$$;

-- ---------------------------------------------------------------------------
-- Reads.
-- ---------------------------------------------------------------------------
-- Both read _hourly_parts (inlined: a filter on the id and hour reaches the
-- tables' primary keys, and the other scope's arms are pruned).
CREATE VIEW usage_agg.hourly_usage AS
SELECT x.id AS user_id, x.hour,
       x.hour AT TIME ZONE z.tz AS local_hour,
       (x.hour AT TIME ZONE z.tz)::date AS date,
       sum(x.calls)::bigint AS calls,
       sum(x.successful)::bigint AS successful_calls,
       sum(x.calls - x.successful)::bigint AS failed_calls,
       sum(x.tokens)::bigint AS tokens_used,
       sum(x.cost) AS estimated_cost
  FROM (SELECT usage_agg._timezone() AS tz) z,
       LATERAL usage_agg._hourly_parts(z.tz) x
 WHERE x.scope = 'user'
 GROUP BY x.id, x.hour, z.tz
HAVING sum(x.calls) <> 0 OR sum(x.tokens) <> 0 OR sum(x.cost) <> 0;
COMMENT ON VIEW usage_agg.hourly_usage IS
    'One row per user and business hour with calls (hour: the instant it starts; local_hour and date in config.timezone), exact with pending calls';

CREATE VIEW usage_agg.key_hourly_usage AS
SELECT x.id AS shared_key_id, x.hour,
       x.hour AT TIME ZONE z.tz AS local_hour,
       (x.hour AT TIME ZONE z.tz)::date AS date,
       sum(x.calls)::bigint AS calls,
       sum(x.successful)::bigint AS successful_calls,
       sum(x.calls - x.successful)::bigint AS failed_calls,
       sum(x.tokens)::bigint AS tokens_used,
       sum(x.cost) AS estimated_cost
  FROM (SELECT usage_agg._timezone() AS tz) z,
       LATERAL usage_agg._hourly_parts(z.tz) x
 WHERE x.scope = 'key'
 GROUP BY x.id, x.hour, z.tz
HAVING sum(x.calls) <> 0 OR sum(x.tokens) <> 0 OR sum(x.cost) <> 0;
COMMENT ON VIEW usage_agg.key_hourly_usage IS
    'One row per shared key and business hour with calls, across users (hour: the instant it starts; local_hour and date in config.timezone), exact with pending calls';

CREATE FUNCTION usage_agg._check_hours(p_hours integer) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_hours IS NULL OR p_hours < 1 OR p_hours > 8784 THEN
        RAISE EXCEPTION 'usage_agg: hours must be between 1 and 8784 (366 days)'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('hours = %s', COALESCE(p_hours::text, 'NULL')),
                  HINT = 'For longer ranges read usage_agg.daily_usage.';
    END IF;
END;
$$;

-- The last p_hours business hours up to the one containing p_at, oldest first,
-- hours without calls included (zeros), for one user (p_scope 'user') or key.
CREATE FUNCTION usage_agg._recent_hours(p_scope text, p_id uuid, p_hours integer, p_at timestamptz)
RETURNS TABLE (hour timestamptz, local_hour timestamp, calls bigint, successful_calls bigint,
               failed_calls bigint, tokens_used bigint, estimated_cost numeric)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tz text := usage_agg._timezone();
    v_last timestamptz;
BEGIN
    PERFORM usage_agg._check_hours(p_hours);
    PERFORM usage_agg._check_at(p_at);
    v_last := usage_agg._hour_start(p_at, v_tz);
    RETURN QUERY
    WITH series AS (
        SELECT v_last - i * interval '1 hour' AS hour FROM generate_series(0, p_hours - 1) i
    ), parts AS (
        SELECT x.hour, x.calls, x.successful, x.tokens, x.cost
          FROM usage_agg._hourly_parts(v_tz) x
         WHERE x.scope = p_scope AND x.id = p_id
           AND x.hour BETWEEN v_last - (p_hours - 1) * interval '1 hour' AND v_last
    )
    SELECT s.hour, s.hour AT TIME ZONE v_tz,
           COALESCE(sum(p.calls), 0)::bigint,
           COALESCE(sum(p.successful), 0)::bigint,
           COALESCE(sum(p.calls - p.successful), 0)::bigint,
           COALESCE(sum(p.tokens), 0)::bigint,
           COALESCE(sum(p.cost), 0)
      FROM series s LEFT JOIN parts p ON p.hour = s.hour
     GROUP BY s.hour
     ORDER BY s.hour;
END;
$$;

CREATE FUNCTION usage_agg.recent_hours(user_id uuid, hours integer DEFAULT 24, at timestamptz DEFAULT now())
RETURNS TABLE (hour timestamptz, local_hour timestamp, calls bigint, successful_calls bigint,
               failed_calls bigint, tokens_used bigint, estimated_cost numeric)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM usage_agg._check_user($1);
    RETURN QUERY SELECT * FROM usage_agg._recent_hours('user', $1, $2, $3);
END;
$$;
COMMENT ON FUNCTION usage_agg.recent_hours(uuid, integer, timestamptz) IS
    'One user''s last `hours` business hours up to the one containing `at`, oldest first, hours without calls included, exact with pending calls';

CREATE FUNCTION usage_agg.key_recent_hours(shared_key_id uuid, hours integer DEFAULT 24, at timestamptz DEFAULT now())
RETURNS TABLE (hour timestamptz, local_hour timestamp, calls bigint, successful_calls bigint,
               failed_calls bigint, tokens_used bigint, estimated_cost numeric)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF $1 IS NULL THEN
        RAISE EXCEPTION 'usage_agg: shared_key_id must not be NULL'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'Calls without a key are counted per user: usage_agg.recent_hours().';
    END IF;
    RETURN QUERY SELECT * FROM usage_agg._recent_hours('key', $1, $2, $3);
END;
$$;
COMMENT ON FUNCTION usage_agg.key_recent_hours(uuid, integer, timestamptz) IS
    'One shared key''s last `hours` business hours up to the one containing `at`, across users, oldest first, hours without calls included, exact with pending calls';

-- ---------------------------------------------------------------------------
-- Verification and rebuild against the detail.
-- ---------------------------------------------------------------------------

-- The detail of [p_start, p_end) per user hour and key hour. A string body,
-- so that nothing depends on key_usage_logs (the detail table can be swapped
-- for a partitioned one).
CREATE FUNCTION usage_agg._hours_from_detail(p_start timestamptz, p_end timestamptz, p_tz text)
RETURNS TABLE (scope text, id uuid, hour timestamptz, calls bigint, successful bigint, tokens bigint,
               cost numeric)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH calls AS (
        SELECT k.user_id, k.shared_key_id, usage_agg._hour_start(k.created_at, p_tz) AS hour,
               CASE WHEN k.success THEN 1 ELSE 0 END AS ok, COALESCE(k.tokens_used, 0)::bigint AS tokens,
               COALESCE(k.cost_estimate, 0) AS cost
          FROM usage_agg.key_usage_logs k
         WHERE k.created_at >= p_start AND k.created_at < p_end
    )
    SELECT 'user', c.user_id, c.hour, count(*), sum(c.ok)::bigint, sum(c.tokens)::bigint, sum(c.cost)
      FROM calls c GROUP BY c.user_id, c.hour
    UNION ALL
    SELECT 'key', c.shared_key_id, c.hour, count(*), sum(c.ok)::bigint, sum(c.tokens)::bigint, sum(c.cost)
      FROM calls c WHERE c.shared_key_id IS NOT NULL GROUP BY c.shared_key_id, c.hour
$$;

-- Every (scope, user or key, hour, field) in the business days [p_from, p_to]
-- where the hourly tier (plus pending calls) and a GROUP BY over
-- key_usage_logs disagree. No rows: consistent. Days whose detail has expired
-- are skipped.
CREATE FUNCTION usage_agg.verify_hourly_logs(p_from date, p_to date)
RETURNS TABLE (scope text, id uuid, hour timestamptz, field text, aggregate_value numeric,
               detail_value numeric)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_from date;
    v_tz text := usage_agg._timezone();
    v_start timestamptz;
    v_end timestamptz;
BEGIN
    v_from := usage_agg._detail_from(p_from, p_to);
    IF v_from > p_to THEN
        RETURN;
    END IF;
    v_start := usage_agg._day_start(v_from, v_tz);
    v_end := usage_agg._day_start(p_to + 1, v_tz);
    RETURN QUERY
    WITH stored AS (
        SELECT x.scope, x.id, x.hour, sum(x.calls) AS calls, sum(x.successful) AS successful,
               sum(x.tokens) AS tokens, sum(x.cost) AS cost
          FROM usage_agg._hourly_parts(v_tz) x
         WHERE x.hour >= v_start AND x.hour < v_end
         GROUP BY x.scope, x.id, x.hour
    ), expected AS (
        SELECT * FROM usage_agg._hours_from_detail(v_start, v_end, v_tz)
    ), pairs AS (
        SELECT COALESCE(s.scope, e.scope) AS scope, COALESCE(s.id, e.id) AS id,
               COALESCE(s.hour, e.hour) AS hour,
               ARRAY[COALESCE(s.calls, 0), COALESCE(s.successful, 0), COALESCE(s.tokens, 0), COALESCE(s.cost, 0)] AS a,
               ARRAY[COALESCE(e.calls, 0), COALESCE(e.successful, 0), COALESCE(e.tokens, 0), COALESCE(e.cost, 0)] AS x
          FROM stored s
          FULL JOIN expected e ON e.scope = s.scope AND e.id = s.id AND e.hour = s.hour
    )
    SELECT p.scope, p.id, p.hour, f.field, p.a[f.i], p.x[f.i]
      FROM pairs p
     CROSS JOIN unnest(ARRAY['calls', 'successful', 'tokens', 'cost']) WITH ORDINALITY AS f(field, i)
     WHERE p.a[f.i] <> p.x[f.i]
     ORDER BY p.hour, p.scope, p.id, f.i;
END;
$$;
COMMENT ON FUNCTION usage_agg.verify_hourly_logs(date, date) IS
    'Lists every (scope, user or key, hour, field) in a day range where hourly_logs or key_hourly_logs (plus pending calls) and a GROUP BY over key_usage_logs disagree; empty means consistent. Days whose detail has expired are skipped.';

-- Recomputes the user and key hours of one business day from the detail
-- (rebuild_daily_logs calls it with detail writers locked out and the day's
-- pending calls dropped). Returns the hourly rows written.
CREATE FUNCTION usage_agg._rebuild_hours(p_day date)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tz text := usage_agg._timezone();
    v_start timestamptz := usage_agg._day_start(p_day, v_tz);
    v_end timestamptz := usage_agg._day_start(p_day + 1, v_tz);
    v_users bigint;
    v_keys bigint;
BEGIN
    DELETE FROM usage_agg.pending_key_hour_deltas q WHERE q.hour >= v_start AND q.hour < v_end;
    DELETE FROM usage_agg.hourly_logs h WHERE h.hour >= v_start AND h.hour < v_end;
    DELETE FROM usage_agg.key_hourly_logs k WHERE k.hour >= v_start AND k.hour < v_end;
    INSERT INTO usage_agg.hourly_logs (user_id, hour, calls, successful, tokens, cost)
    SELECT e.id, e.hour, e.calls, e.successful, e.tokens, e.cost
      FROM usage_agg._hours_from_detail(v_start, v_end, v_tz) e WHERE e.scope = 'user';
    GET DIAGNOSTICS v_users = ROW_COUNT;
    INSERT INTO usage_agg.key_hourly_logs (shared_key_id, hour, calls, successful, tokens, cost)
    SELECT e.id, e.hour, e.calls, e.successful, e.tokens, e.cost
      FROM usage_agg._hours_from_detail(v_start, v_end, v_tz) e WHERE e.scope = 'key';
    GET DIAGNOSTICS v_keys = ROW_COUNT;
    RETURN v_users + v_keys;
END;
$$;

-- ---------------------------------------------------------------------------
-- Retention.
-- ---------------------------------------------------------------------------

-- Deletes user and key hours that started before now() - keep (default
-- config.hourly_retention, or config.detail_retention when that is NULL), in
-- batches of config.cleanup_batch_size. Returns the rows deleted.
CREATE FUNCTION usage_agg.cleanup_old_hourly_logs(keep interval DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_cfg usage_agg.config;
    v_cutoff timestamptz;
    v_removed bigint := 0;
    v_n bigint;
    v_started timestamptz := clock_timestamp();
BEGIN
    SELECT * INTO v_cfg FROM usage_agg.config;
    v_cutoff := now() - usage_agg._check_keep(keep, COALESCE(v_cfg.hourly_retention, v_cfg.detail_retention),
                                              'cleanup_old_hourly_logs');
    LOOP
        WITH gone AS (
            DELETE FROM usage_agg.hourly_logs h
             WHERE h.ctid = ANY (ARRAY(SELECT o.ctid FROM usage_agg.hourly_logs o
                                        WHERE o.hour < v_cutoff LIMIT v_cfg.cleanup_batch_size))
               AND h.hour < v_cutoff
            RETURNING 1)
        SELECT count(*) INTO v_n FROM gone;
        IF v_n = 0 THEN
            WITH gone AS (
                DELETE FROM usage_agg.key_hourly_logs k
                 WHERE k.ctid = ANY (ARRAY(SELECT o.ctid FROM usage_agg.key_hourly_logs o
                                            WHERE o.hour < v_cutoff LIMIT v_cfg.cleanup_batch_size))
                   AND k.hour < v_cutoff
                RETURNING 1)
            SELECT count(*) INTO v_n FROM gone;
        END IF;
        EXIT WHEN v_n = 0;
        v_removed := v_removed + v_n;
        RAISE NOTICE 'usage_agg.cleanup_old_hourly_logs: % rows deleted, % elapsed',
            v_removed, clock_timestamp() - v_started;
    END LOOP;
    RETURN v_removed;
END;
$$;
COMMENT ON FUNCTION usage_agg.cleanup_old_hourly_logs(interval) IS
    'Deletes hourly_logs and key_hourly_logs rows of hours that started before now() - keep (default config.hourly_retention, or detail_retention when NULL), in batches; returns rows deleted';
