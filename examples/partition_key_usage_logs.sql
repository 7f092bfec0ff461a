-- Turns usage_agg.key_usage_logs into a table range-partitioned by month on
-- created_at, keeping every row and the aggregates as they are. After this,
-- usage_agg.cleanup_old_key_usage_logs() drops expired partitions whole instead
-- of deleting rows. pg_partman can take over creating partitions from here
-- (partman.create_parent('usage_agg.key_usage_logs', 'created_at', ...)).
--
-- PostgreSQL requires unique keys of a partitioned table to include the
-- partition key, so request_id is then unique per (request_id, created_at): a
-- retry counts once only if it sends the same created_at.
--
-- Run it in one transaction, as the extension's owner, at a quiet moment: it
-- locks the detail table against writers while it copies it.
BEGIN;
LOCK TABLE usage_agg.key_usage_logs IN EXCLUSIVE MODE;
ALTER TABLE usage_agg.key_usage_logs RENAME TO key_usage_logs_unpartitioned;
ALTER INDEX usage_agg.key_usage_logs_pkey RENAME TO key_usage_logs_unpartitioned_pkey;
ALTER INDEX usage_agg.key_usage_logs_request_id_key RENAME TO key_usage_logs_unpartitioned_request_id_key;
ALTER INDEX usage_agg.key_usage_logs_user_created_at RENAME TO key_usage_logs_unpartitioned_user_created_at;
ALTER INDEX usage_agg.key_usage_logs_created_at RENAME TO key_usage_logs_unpartitioned_created_at;
ALTER INDEX usage_agg.key_usage_logs_unpriced RENAME TO key_usage_logs_unpartitioned_unpriced;

CREATE TABLE usage_agg.key_usage_logs (
    LIKE usage_agg.key_usage_logs_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING COMMENTS,
    PRIMARY KEY (id, created_at),
    UNIQUE (request_id, created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX key_usage_logs_user_created_at ON usage_agg.key_usage_logs (user_id, created_at);
CREATE INDEX key_usage_logs_created_at ON usage_agg.key_usage_logs (created_at);
CREATE INDEX key_usage_logs_unpriced ON usage_agg.key_usage_logs (model_used, created_at)
    WHERE cost_estimate IS NULL;
CREATE TABLE usage_agg.key_usage_logs_default PARTITION OF usage_agg.key_usage_logs DEFAULT;

-- One partition per month (UTC), from the oldest row's month to two months ahead.
DO $$
DECLARE
    m timestamptz;
BEGIN
    FOR m IN
        SELECT generate_series(
                   date_trunc('month', COALESCE(min(created_at), now()), 'UTC'),
                   date_trunc('month', now(), 'UTC') + interval '2 months',
                   interval '1 month')
          FROM usage_agg.key_usage_logs_unpartitioned
    LOOP
        EXECUTE format('CREATE TABLE usage_agg.%I PARTITION OF usage_agg.key_usage_logs FOR VALUES FROM (%L) TO (%L)',
                       'key_usage_logs_p' || to_char(m AT TIME ZONE 'UTC', 'YYYY_MM'),
                       m, m + interval '1 month');
    END LOOP;
END;
$$;

-- Copy the rows before the fold is attached: they are already counted.
INSERT INTO usage_agg.key_usage_logs SELECT * FROM usage_agg.key_usage_logs_unpartitioned;

CREATE TRIGGER fold_insert
    AFTER INSERT ON usage_agg.key_usage_logs
    REFERENCING NEW TABLE AS usage_agg_new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION usage_agg.fold_key_usage_logs();
CREATE TRIGGER fold_update
    AFTER UPDATE ON usage_agg.key_usage_logs
    REFERENCING OLD TABLE AS usage_agg_old_rows NEW TABLE AS usage_agg_new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION usage_agg.fold_key_usage_logs();
CREATE TRIGGER fold_delete
    AFTER DELETE ON usage_agg.key_usage_logs
    REFERENCING OLD TABLE AS usage_agg_old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION usage_agg.fold_key_usage_logs();
-- The pricing triggers, as sql/prices.sql creates them.
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

ALTER EXTENSION usage_agg DROP TABLE usage_agg.key_usage_logs_unpartitioned;
DROP TABLE usage_agg.key_usage_logs_unpartitioned;
COMMIT;
