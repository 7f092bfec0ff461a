-- The fold triggers. One statement-level trigger per event; each sees the whole
-- statement's rows through its transition tables (multi-row INSERT, INSERT ...
-- SELECT and COPY are folded once per statement). TRUNCATE and the retention
-- cleanups do not touch aggregates.
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

-- Every backend caches usage_agg.config for the fold; a change announces itself
-- (relcache invalidation) so that the caches are dropped.
CREATE TRIGGER config_changed
    AFTER INSERT OR UPDATE ON usage_agg.config
    FOR EACH STATEMENT EXECUTE FUNCTION usage_agg._config_changed();
