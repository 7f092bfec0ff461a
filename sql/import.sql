-- Moving in from a hand-written setup: a detail table and a daily JSONB table
-- kept by a PL/pgSQL trigger, usually in public.

CREATE FUNCTION usage_agg._require_columns(rel regclass, wanted text[], what text) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_missing text[];
BEGIN
    SELECT array_agg(w ORDER BY w) INTO v_missing
      FROM unnest(wanted) w
     WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = rel AND a.attname = w AND a.attnum > 0 AND NOT a.attisdropped);
    IF v_missing IS NOT NULL THEN
        RAISE EXCEPTION 'usage_agg: the % table % has no column %', what, rel, array_to_string(v_missing, ', ')
            USING ERRCODE = 'undefined_column',
                  HINT = format('The %s table needs the columns %s.', what, array_to_string(wanted, ', '));
    END IF;
END;
$$;

-- A backup copy of a table next to it (kept when it exists: reruns keep the
-- first backup).
CREATE FUNCTION usage_agg._backup_table(rel regclass) RETURNS regclass
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_schema name;
    v_name name;
    v_backup regclass;
BEGIN
    SELECT n.nspname, left(c.relname, 40) || '_backup_usage_agg'
      INTO v_schema, v_name
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel;
    v_backup := to_regclass(format('%I.%I', v_schema, v_name));
    IF v_backup IS NULL THEN
        EXECUTE format('CREATE TABLE %I.%I AS TABLE %s', v_schema, v_name, rel);
        v_backup := to_regclass(format('%I.%I', v_schema, v_name));
    END IF;
    RETURN v_backup;
END;
$$;

CREATE FUNCTION usage_agg.import_legacy(detail regclass, daily regclass)
RETURNS TABLE (detail_rows_copied bigint, detail_rows_already_there bigint,
               daily_rows_merged bigint, daily_rows_copied bigint,
               detail_backup regclass, daily_backup regclass)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_columns text;
    v_total bigint;
    v_copied bigint;
    v_tz text := usage_agg._timezone();
    v_first date;
    v_with_detail bigint := 0;
    v_n bigint;
    v_copied_days bigint := 0;
    v_bad bigint;
    v_detail_backup regclass;
    v_daily_backup regclass;
BEGIN
    IF detail IS NULL OR daily IS NULL THEN
        RAISE EXCEPTION 'usage_agg: import_legacy needs the detail and the daily table'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'For example: SELECT * FROM usage_agg.import_legacy(''public.key_usage_logs'', ''public.daily_logs'');';
    END IF;
    IF detail IN ('usage_agg.key_usage_logs'::regclass, 'usage_agg.daily_logs'::regclass)
       OR daily IN ('usage_agg.key_usage_logs'::regclass, 'usage_agg.daily_logs'::regclass) THEN
        RAISE EXCEPTION 'usage_agg: import_legacy imports from tables of your own, not from usage_agg''s'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM usage_agg._require_columns(detail, ARRAY['user_id', 'created_at'], 'detail');
    PERFORM usage_agg._require_columns(daily, ARRAY['user_id', 'date', 'log_data'], 'daily');

    -- Nothing of the old tables is dropped or changed: they are copied aside first.
    v_detail_backup := usage_agg._backup_table(detail);
    v_daily_backup := usage_agg._backup_table(daily);

    -- 1. The detail, every column the two tables share. The fold computes the
    --    aggregates from it; a row already imported (same id or request_id) is
    --    skipped, so a rerun counts nothing twice.
    SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO v_columns
      FROM pg_attribute a
     WHERE a.attrelid = 'usage_agg.key_usage_logs'::regclass AND a.attnum > 0 AND NOT a.attisdropped
       AND EXISTS (SELECT 1 FROM pg_attribute l
                    WHERE l.attrelid = detail AND l.attname = a.attname AND l.attnum > 0 AND NOT l.attisdropped);
    EXECUTE format('SELECT count(*) FROM %s', detail) INTO v_total;
    EXECUTE format('INSERT INTO usage_agg.key_usage_logs (%s) SELECT %s FROM %s ORDER BY created_at ON CONFLICT DO NOTHING',
                   v_columns, v_columns, detail);
    GET DIAGNOSTICS v_copied = ROW_COUNT;
    PERFORM usage_agg.apply_pending_deltas();

    -- 2. The daily rows. Days from the first day of the detail on keep the
    --    aggregates the fold computed from it and take only the application's
    --    keys from the old row; earlier days (their detail expired) are copied as
    --    they are, once.
    EXECUTE format('SELECT (min(created_at) AT TIME ZONE $1)::date FROM %s', detail)
       INTO v_first USING v_tz;
    EXECUTE format('SELECT count(*) FROM %s WHERE jsonb_typeof(log_data) IS DISTINCT FROM ''object''', daily) INTO v_bad;
    IF v_bad > 0 THEN
        RAISE EXCEPTION 'usage_agg: % rows of % have a log_data that is not a JSON object', v_bad, daily
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Fix or delete those rows, then run import_legacy again; nothing was imported.';
    END IF;
    IF v_first IS NOT NULL THEN
        EXECUTE format(
            'INSERT INTO usage_agg.daily_logs AS d (user_id, date, log_data, last_modified)
             SELECT l.user_id, l.date, usage_agg._replace_owned(l.log_data, usage_agg._empty_log_data()), now()
               FROM %s l WHERE l.date >= $1
             ON CONFLICT (user_id, date) DO UPDATE
                SET log_data = usage_agg._replace_owned(EXCLUDED.log_data, d.log_data)
              WHERE d.log_data IS DISTINCT FROM usage_agg._replace_owned(EXCLUDED.log_data, d.log_data)', daily)
        USING v_first;
        EXECUTE format('SELECT count(*) FROM %s l WHERE l.date >= $1', daily) INTO v_with_detail USING v_first;
    END IF;
    EXECUTE format(
        'INSERT INTO usage_agg.daily_logs (user_id, date, log_data, last_modified)
         SELECT l.user_id, l.date, l.log_data, now()
           FROM %s l WHERE $1::date IS NULL OR l.date < $1
         ON CONFLICT (user_id, date) DO NOTHING', daily)
    USING v_first;
    GET DIAGNOSTICS v_copied_days = ROW_COUNT;
    -- Their per-key and service days (the days with detail got theirs from the
    -- fold of the copied detail).
    PERFORM usage_agg._key_days_from_users(COALESCE(v_first, 'infinity'::date));

    -- Days before the first day of the old detail have none any more: like days
    -- the retention cleanup expired, verify_daily_logs skips them and
    -- rebuild_daily_logs leaves them alone.
    IF v_first IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM usage_agg.key_usage_logs k WHERE k.created_at < usage_agg._day_start(v_first, v_tz)) THEN
        UPDATE usage_agg.retention_horizon SET detail_kept_from = greatest(detail_kept_from, v_first);
    END IF;

    RAISE NOTICE 'usage_agg.import_legacy: % of % detail rows copied, % daily rows merged with detail, % copied as they were; backups % and %',
        v_copied, v_total, v_with_detail, v_copied_days, v_detail_backup, v_daily_backup;
    RETURN QUERY SELECT v_copied, v_total - v_copied, v_with_detail, v_copied_days, v_detail_backup, v_daily_backup;
END;
$$;
COMMENT ON FUNCTION usage_agg.import_legacy(regclass, regclass) IS
    'Moves a hand-written setup in: copies its detail (folded once), merges its daily rows keeping application keys, backs both tables up; all or nothing, safe to rerun';
REVOKE EXECUTE ON FUNCTION usage_agg.import_legacy(regclass, regclass) FROM PUBLIC;
