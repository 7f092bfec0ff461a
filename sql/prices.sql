-- Token kinds and table prices (docs/prices.md).
--
-- A call may report its tokens by kind. The kinds are disjoint: input (the
-- uncached prompt), cache reads, cache writes, output (reasoning included);
-- tokens_used is their sum. NULL means "not reported". The pricing trigger
-- (src/prices.rs) fills tokens_used from the kinds when it is left NULL, and
-- prices a call inserted without a cost from usage_agg.model_prices.
-- price_valid_from records which costs the table gave: the valid_from of the
-- price row used, NULL for a cost the application supplied (or none).
ALTER TABLE usage_agg.key_usage_logs
    ADD COLUMN input_tokens integer,
    ADD COLUMN output_tokens integer,
    ADD COLUMN cache_read_tokens integer,
    ADD COLUMN cache_write_tokens integer,
    ADD COLUMN price_valid_from timestamptz,
    ADD CONSTRAINT key_usage_logs_token_kinds_not_negative CHECK (
        input_tokens >= 0 AND output_tokens >= 0 AND cache_read_tokens >= 0 AND cache_write_tokens >= 0),
    ADD CONSTRAINT key_usage_logs_tokens_used_is_the_sum_of_the_kinds CHECK (
        tokens_used IS NULL
        OR num_nonnulls(input_tokens, output_tokens, cache_read_tokens, cache_write_tokens) = 0
        OR tokens_used::bigint = COALESCE(input_tokens, 0)::bigint + COALESCE(output_tokens, 0)::bigint
                                 + COALESCE(cache_read_tokens, 0)::bigint + COALESCE(cache_write_tokens, 0)::bigint),
    ADD CONSTRAINT key_usage_logs_price_valid_from_has_a_cost CHECK (
        price_valid_from IS NULL OR cost_estimate IS NOT NULL);
COMMENT ON COLUMN usage_agg.key_usage_logs.input_tokens IS
    'Prompt tokens not read from or written to a cache (NULL: not reported)';
COMMENT ON COLUMN usage_agg.key_usage_logs.output_tokens IS
    'Generated tokens, reasoning included (NULL: not reported)';
COMMENT ON COLUMN usage_agg.key_usage_logs.cache_read_tokens IS
    'Prompt tokens read from the provider''s cache (NULL: not reported)';
COMMENT ON COLUMN usage_agg.key_usage_logs.cache_write_tokens IS
    'Prompt tokens written to the provider''s cache (NULL: not reported)';
COMMENT ON COLUMN usage_agg.key_usage_logs.price_valid_from IS
    'valid_from of the usage_agg.model_prices row that priced this call; NULL when the application gave the cost, or the call is unpriced';
-- Unpriced calls (cost NULL) per model: the unpriced_calls view reads this index
-- only, however large the table.
CREATE INDEX key_usage_logs_unpriced ON usage_agg.key_usage_logs (model_used, created_at)
    WHERE cost_estimate IS NULL;

CREATE TABLE usage_agg.model_prices (
    model                text        NOT NULL,
    valid_from           timestamptz NOT NULL,
    input_per_mtok       numeric,
    output_per_mtok      numeric,
    cache_read_per_mtok  numeric,
    cache_write_per_mtok numeric,
    per_call             numeric,
    PRIMARY KEY (model, valid_from),
    CONSTRAINT model_prices_valid_from_finite CHECK (valid_from > '-infinity' AND valid_from < 'infinity'),
    -- NaN sorts above Infinity in numeric, so the upper bound rejects both.
    CONSTRAINT model_prices_prices_finite_not_negative CHECK (
        input_per_mtok >= 0 AND input_per_mtok < 'Infinity'::numeric
        AND output_per_mtok >= 0 AND output_per_mtok < 'Infinity'::numeric
        AND cache_read_per_mtok >= 0 AND cache_read_per_mtok < 'Infinity'::numeric
        AND cache_write_per_mtok >= 0 AND cache_write_per_mtok < 'Infinity'::numeric
        AND per_call >= 0 AND per_call < 'Infinity'::numeric),
    CONSTRAINT model_prices_some_price CHECK (
        num_nonnulls(input_per_mtok, output_per_mtok, cache_read_per_mtok, cache_write_per_mtok, per_call) > 0)
);
COMMENT ON TABLE usage_agg.model_prices IS
    'Prices per model from valid_from on (until the next row of the model): per million tokens of each kind, and per call. A call inserted without a cost is priced from the row valid at its created_at; a kind without a price leaves a call with tokens of that kind unpriced. A change applies to new calls; usage_agg.reprice_calls() applies it to earlier ones.';
SELECT pg_catalog.pg_extension_config_dump('usage_agg.model_prices', '');
-- Every backend keeps a copy of the prices; a change announces itself.
CREATE TRIGGER model_prices_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON usage_agg.model_prices
    FOR EACH STATEMENT EXECUTE FUNCTION usage_agg._config_changed();

-- Only rows the trigger has something to do for: a call with a cost and
-- tokens_used (or no kinds) costs the insert path nothing more.
CREATE TRIGGER price_insert
    BEFORE INSERT ON usage_agg.key_usage_logs
    FOR EACH ROW
    WHEN (NEW.cost_estimate IS NULL
          OR (NEW.tokens_used IS NULL
              AND num_nonnulls(NEW.input_tokens, NEW.output_tokens, NEW.cache_read_tokens, NEW.cache_write_tokens) > 0))
    EXECUTE FUNCTION usage_agg._price_call();
CREATE TRIGGER price_update
    BEFORE UPDATE ON usage_agg.key_usage_logs
    FOR EACH ROW
    WHEN (NEW.cost_estimate IS NULL OR OLD.price_valid_from IS NOT NULL OR NEW.tokens_used IS NULL
          OR (NEW.input_tokens, NEW.output_tokens, NEW.cache_read_tokens, NEW.cache_write_tokens)
             IS DISTINCT FROM (OLD.input_tokens, OLD.output_tokens, OLD.cache_read_tokens, OLD.cache_write_tokens))
    EXECUTE FUNCTION usage_agg._price_call();

-- Models with calls that have no cost: what the table does not price (yet),
-- and calls the application sent without a cost. A string body, so that the
-- views reading it do not depend on key_usage_logs (the detail table can be
-- swapped for a partitioned one); inlined into them.
CREATE FUNCTION usage_agg._unpriced_calls()
RETURNS TABLE (model text, calls bigint, since timestamptz, last_at timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT l.model_used, pg_catalog.count(*), pg_catalog.min(l.created_at), pg_catalog.max(l.created_at)
      FROM usage_agg.key_usage_logs l
     WHERE l.cost_estimate IS NULL
     GROUP BY l.model_used
$$;

CREATE VIEW usage_agg.unpriced_calls AS
SELECT u.model, u.calls, u.since, u.last_at,
       EXISTS (SELECT 1 FROM usage_agg.model_prices p WHERE p.model = u.model) AS has_prices
  FROM usage_agg._unpriced_calls() u;
COMMENT ON VIEW usage_agg.unpriced_calls IS
    'Per model (NULL: calls without a model): calls without a cost in the detail that is kept, since when, the last one, and whether usage_agg.model_prices has rows for the model (then the calls are older than its first row, or have tokens of a kind it has no price for, or tokens not split into kinds)';

-- Prices the calls of [from, to) again from usage_agg.model_prices: the
-- table-priced ones and the unpriced ones; a cost the application gave is never
-- touched. Each changed call is an UPDATE, so the fold corrects every
-- aggregate. In batches of batch_size calls in created_at order, a NOTICE per
-- batch; one transaction (an error leaves nothing repriced). Returns the
-- number of calls whose cost changed.
CREATE FUNCTION usage_agg.reprice_calls(
    "from" timestamptz,
    "to" timestamptz,
    batch_size integer DEFAULT 10000
) RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_after_at timestamptz := '-infinity';
    v_after_id uuid := '00000000-0000-0000-0000-000000000000';
    v_last_at timestamptz;
    v_last_id uuid;
    v_seen bigint;
    v_checked bigint := 0;
    v_changed bigint := 0;
    v_rows bigint;
BEGIN
    IF "from" IS NULL OR "to" IS NULL OR "from" > "to" THEN
        RAISE EXCEPTION 'usage_agg: reprice_calls needs a range with from <= to, got [%, %)', "from", "to"
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'For example: SELECT usage_agg.reprice_calls(''2026-11-01'', ''2026-12-01'');';
    END IF;
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'usage_agg: batch_size must be at least 1, got %', batch_size
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF "to" > now() + interval '1 minute' THEN
        RAISE EXCEPTION 'usage_agg: reprice_calls cannot reprice calls that have not happened yet (to = %)', "to"
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'A price row valid from a future instant prices the calls from then on, as they are inserted.',
                  HINT = 'End the range at now() or earlier.';
    END IF;
    LOOP
        -- One batch in created_at order. Only the calls whose cost or price
        -- row would change are written; setting their cost NULL has the
        -- pricing trigger price them (an UPDATE that set a new cost with the
        -- same price_valid_from would read as the application's cost).
        WITH batch AS (
            SELECT l.created_at, l.id,
                   (p.cost, p.price_valid_from) IS DISTINCT FROM (l.cost_estimate, l.price_valid_from) AS changed
              FROM (SELECT l.*
                      FROM usage_agg.key_usage_logs l
                     WHERE l.created_at >= "from" AND l.created_at < "to"
                       AND (l.created_at, l.id) > (v_after_at, v_after_id)
                       AND (l.cost_estimate IS NULL OR l.price_valid_from IS NOT NULL)
                     ORDER BY l.created_at, l.id
                     LIMIT batch_size) l
             CROSS JOIN LATERAL usage_agg.call_cost(l.model_used, l.created_at, l.tokens_used, l.input_tokens,
                                                    l.output_tokens, l.cache_read_tokens, l.cache_write_tokens) p
        ), written AS (
            UPDATE usage_agg.key_usage_logs l
               SET cost_estimate = NULL
              FROM batch b
             WHERE b.changed AND l.id = b.id AND l.created_at = b.created_at
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM batch), (SELECT count(*) FROM written), b.created_at, b.id
          INTO v_seen, v_rows, v_last_at, v_last_id
          FROM batch b
         ORDER BY b.created_at DESC, b.id DESC
         LIMIT 1;
        EXIT WHEN NOT FOUND;
        v_checked := v_checked + v_seen;
        v_changed := v_changed + v_rows;
        RAISE NOTICE 'usage_agg.reprice_calls: % call(s) checked up to %, % repriced', v_checked, v_last_at, v_changed;
        v_after_at := v_last_at;
        v_after_id := v_last_id;
    END LOOP;
    RETURN v_changed;
END;
$$;
COMMENT ON FUNCTION usage_agg.reprice_calls(timestamptz, timestamptz, integer) IS
    'Prices the calls of [from, to) again from usage_agg.model_prices (those the table priced, and those without a cost), in batches with a NOTICE each; costs the application gave are kept. The aggregates follow through the correction fold. Returns the number of calls whose cost changed.';
