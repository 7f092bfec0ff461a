-- ---------------------------------------------------------------------------
-- Citus: usage_agg.distribute(), called once by the administrator on the
-- coordinator after CREATE EXTENSION (not from this script: it runs again on
-- every node Citus propagates the extension to). docs/citus.md.
-- ---------------------------------------------------------------------------

-- What distribute() does, table by table, in the order it does it: the
-- per-user tables colocated with key_usage_logs by user_id, the per-key ones
-- colocated by shared_key_id, and the small ones every node reads as reference
-- tables. The pending tables stay local to each node: the fold on a worker's
-- shard appends to them and that node's applier folds them; so does
-- fold_skipped, that applier's own record of the days it could not fold.
CREATE FUNCTION usage_agg._citus_layout()
RETURNS TABLE (table_name text, placement text, column_name text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT t.table_name, t.placement, t.column_name
      FROM (VALUES
        (1, 'config', 'reference', NULL),
        (2, 'retention_horizon', 'reference', NULL),
        (3, 'quota_plans', 'reference', NULL),
        (4, 'model_prices', 'reference', NULL),
        (5, 'service_daily_logs', 'reference', NULL),
        (6, 'service_monthly_logs', 'reference', NULL),
        -- Read by the fold on every shard (are cost limits in use?), where
        -- only reference tables can be read; one row per user with an override.
        (6, 'user_limits', 'reference', NULL),
        (7, 'key_usage_logs', 'by user', 'user_id'),
        (8, 'daily_logs', 'by user', 'user_id'),
        (9, 'monthly_logs', 'by user', 'user_id'),
        (10, 'hourly_logs', 'by user', 'user_id'),
        (13, 'quotas', 'by user', 'user_id'),
        (14, 'quota_usage_logs', 'by user', 'user_id'),
        (15, 'alerts', 'by user', 'user_id'),
        (16, 'key_daily_logs', 'by key', 'shared_key_id'),
        (17, 'key_monthly_logs', 'by key', 'shared_key_id'),
        (18, 'key_hourly_logs', 'by key', 'shared_key_id')
      ) AS t (ord, table_name, placement, column_name)
     ORDER BY t.ord;
END;

COMMENT ON FUNCTION usage_agg._citus_layout() IS
    'The tables usage_agg.distribute() places on a Citus cluster, in its order: reference tables, tables distributed by user_id (colocated with key_usage_logs) and by shared_key_id.';

-- On each node, before distribute() places the tables: a distributed table's
-- unique constraints must include its distribution column, so the primary keys
-- become (user_id, id) and a request_id is unique per user; the names stay, so
-- ON CONFLICT ON CONSTRAINT keeps working. quotas loses its foreign key to
-- quota_plans until both are placed (Citus would otherwise convert quotas when
-- quota_plans becomes a reference table). Idempotent: a distribute() that
-- failed half-way runs it again.
CREATE FUNCTION usage_agg._citus_prepare_node() RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_key record;
BEGIN
    FOR v_key IN
        SELECT * FROM (VALUES
            ('key_usage_logs', 'key_usage_logs_pkey', 'PRIMARY KEY (user_id, id)'),
            ('key_usage_logs', 'key_usage_logs_request_id_key', 'UNIQUE (user_id, request_id)'),
            ('daily_logs', 'daily_logs_pkey', 'PRIMARY KEY (user_id, id)'),
            ('monthly_logs', 'monthly_logs_pkey', 'PRIMARY KEY (user_id, id)'),
            ('quota_usage_logs', 'quota_usage_logs_pkey', 'PRIMARY KEY (user_id, id)'),
            ('quota_usage_logs', 'quota_usage_logs_request_id_key', 'UNIQUE (user_id, request_id)'),
            ('alerts', 'alerts_pkey', 'PRIMARY KEY (user_id, id)')
        ) AS k (table_name, constraint_name, definition)
    LOOP
        IF EXISTS (SELECT 1 FROM pg_constraint c
                    WHERE c.conrelid = pg_catalog.to_regclass('usage_agg.' || v_key.table_name)
                      AND c.conname = v_key.constraint_name
                      AND pg_catalog.array_length(c.conkey, 1) = 1) THEN
            -- Names and definitions come from the list above, not from input.
            EXECUTE format('ALTER TABLE usage_agg.%I DROP CONSTRAINT %I, ADD CONSTRAINT %I %s',
                           v_key.table_name, v_key.constraint_name, v_key.constraint_name,
                           v_key.definition);
        END IF;
    END LOOP;
    ALTER TABLE usage_agg.quotas DROP CONSTRAINT IF EXISTS quotas_membership_level_fkey;
END;
$$;

CREATE FUNCTION usage_agg.distribute()
RETURNS TABLE (table_name text, placement text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_table    record;
    v_rel      regclass;
    v_first    regclass;
    v_key_first regclass;
    v_found    boolean;
    v_worker   record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RAISE EXCEPTION 'Citus is not installed in this database'
            USING ERRCODE = '55000',
                  DETAIL = 'usage_agg.distribute() places the usage_agg tables on a Citus cluster.',
                  HINT = 'Preload citus (shared_preload_libraries = ''citus,usage_agg''), CREATE EXTENSION citus and add the worker nodes first; on a single server nothing needs distributing.';
    END IF;
    IF NOT pg_catalog.citus_is_coordinator() THEN
        RAISE EXCEPTION 'usage_agg.distribute() must be called on the coordinator'
            USING ERRCODE = '55000',
                  DETAIL = 'This node is a Citus worker: the tables are distributed from the coordinator, which sends them to every worker.',
                  HINT = 'Connect to the coordinator and call it there.';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_dist_partition
                WHERE logicalrelid = 'usage_agg.key_usage_logs'::regclass) THEN
        RAISE NOTICE 'usage_agg is distributed already: nothing to do';
        RETURN;
    END IF;
    -- Citus copies a table's rows into its shards as inserts, which would fire
    -- the fold again on the worker: the tables that hold usage start empty.
    FOR v_table IN
        SELECT l.table_name FROM usage_agg._citus_layout() l
         WHERE l.placement <> 'reference' OR l.table_name LIKE 'service\_%'
        UNION ALL
        SELECT unnest(ARRAY['pending_deltas', 'pending_key_deltas', 'pending_key_hour_deltas'])
    LOOP
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM usage_agg.%I)', v_table.table_name) INTO v_found;
        IF v_found THEN
            RAISE EXCEPTION 'usage_agg cannot be distributed: usage_agg.% has rows', v_table.table_name
                USING ERRCODE = '55000',
                      DETAIL = 'distribute() places the tables of a fresh installation; copying existing usage into the shards would fold it a second time.',
                      HINT = 'Call it right after CREATE EXTENSION, then load existing calls through the coordinator (INSERT ... SELECT or COPY into usage_agg.key_usage_logs): the fold aggregates them on the workers.';
        END IF;
    END LOOP;
    IF (SELECT c.fold_mode FROM usage_agg.config c) = 'immediate' THEN
        RAISE EXCEPTION 'usage_agg cannot be distributed while config.fold_mode is ''immediate'''
            USING ERRCODE = '55000',
                  DETAIL = 'On Citus the fold runs on the worker holding the call''s shard, which cannot write the per-key and service aggregates on other nodes from there; the asynchronous fold hands them to that node''s applier.',
                  HINT = 'UPDATE usage_agg.config SET fold_mode = ''auto'' first.';
    END IF;
    IF pg_catalog.current_setting('shared_preload_libraries') !~ '(^|[ ,])usage_agg([ ,]|$)' THEN
        RAISE WARNING 'usage_agg is not in shared_preload_libraries on the coordinator'
            USING DETAIL = 'Each node that holds shards needs the background applier: preload usage_agg there too.';
    END IF;

    -- The fold's triggers go with key_usage_logs to every shard; Citus asks
    -- for this to accept triggers on distributed and reference tables.
    PERFORM pg_catalog.set_config('citus.enable_unsafe_triggers', 'on', true);
    -- Shards created one connection per node, so that the foreign key of
    -- quotas can be added in the same transaction (Citus refuses it after a
    -- parallel operation).
    PERFORM pg_catalog.set_config('citus.multi_shard_modify_mode', 'sequential', true);

    -- Every node's copy of the tables (the worker's are shells Citus keeps as
    -- they are) gets the keys a distributed table needs.
    PERFORM usage_agg._citus_prepare_node();
    FOR v_worker IN SELECT * FROM pg_catalog.run_command_on_workers(
                        'SELECT usage_agg._citus_prepare_node()') LOOP
        IF NOT v_worker.success THEN
            RAISE EXCEPTION 'usage_agg cannot be distributed: worker %:% failed to prepare its tables',
                            v_worker.nodename, v_worker.nodeport
                USING ERRCODE = '55000',
                      DETAIL = v_worker.result,
                      HINT = 'Check that usage_agg is installed on every worker (CREATE EXTENSION on the coordinator sends it), then call distribute() again.';
        END IF;
    END LOOP;

    FOR v_table IN SELECT * FROM usage_agg._citus_layout() LOOP
        v_rel := pg_catalog.to_regclass('usage_agg.' || v_table.table_name);
        IF v_table.placement = 'reference' THEN
            PERFORM pg_catalog.create_reference_table(v_rel);
        ELSIF v_table.placement = 'by user' THEN
            PERFORM pg_catalog.create_distributed_table(v_rel, v_table.column_name,
                colocate_with => coalesce(v_first::text, 'none'));
            v_first := coalesce(v_first, v_rel);
        ELSE
            PERFORM pg_catalog.create_distributed_table(v_rel, v_table.column_name,
                colocate_with => coalesce(v_key_first::text, 'none'));
            v_key_first := coalesce(v_key_first, v_rel);
        END IF;
        table_name := v_table.table_name;
        placement := v_table.placement;
        RETURN NEXT;
    END LOOP;
    ALTER TABLE usage_agg.quotas
        ADD CONSTRAINT quotas_membership_level_fkey FOREIGN KEY (membership_level)
            REFERENCES usage_agg.quota_plans (membership_level) ON UPDATE CASCADE;
END;
$$;

COMMENT ON FUNCTION usage_agg.distribute() IS
    'On a Citus coordinator: distributes the per-user tables by user_id (colocated with key_usage_logs), the per-key aggregates by shared_key_id and makes the small tables reference tables. Once, after CREATE EXTENSION; see docs/citus.md.';

-- On Citus a change of a plan's monthly_quota cannot reach its members from the
-- trigger (it fires on each node's shard of quota_plans, where a distributed
-- UPDATE cannot run): the administrator calls this after such a change.
CREATE FUNCTION usage_agg.sync_plan_quotas() RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_changed bigint;
BEGIN
    UPDATE usage_agg.quotas q
       SET monthly_quota = p.monthly_quota, updated_at = now()
      FROM usage_agg.quota_plans p
     WHERE p.membership_level = q.membership_level
       AND q.monthly_quota IS DISTINCT FROM p.monthly_quota;
    GET DIAGNOSTICS v_changed = ROW_COUNT;
    RETURN v_changed;
END;
$$;

COMMENT ON FUNCTION usage_agg.sync_plan_quotas() IS
    'Gives every user its plan''s current monthly_quota; returns how many changed. On one server the quota_plans trigger does this at once; on Citus call it after changing a plan (docs/citus.md).';
