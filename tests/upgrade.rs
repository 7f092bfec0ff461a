//! ALTER EXTENSION usage_agg UPDATE from every released version keeps all data
//! and gives the same catalog as a fresh install.
//!
//! scripts/test.sh builds and installs each release from its tag, creates a
//! database with it and writes data (tests/upgrade/write_vX.Y.Z_data.sql), then
//! installs the current version; these tests update those databases.
#![cfg(not(feature = "pg_test"))]

mod common;

use common::*;
use postgres::{Client, NoTls};

/// Fingerprints of every table's data, one line per table.
fn data_fingerprint(c: &mut Client) -> Vec<String> {
    let tables = [
        (
            "config",
            "timezone, detail_retention, daily_retention, cleanup_batch_size",
        ),
        ("key_usage_logs", "id"),
        ("daily_logs", "user_id, date"),
        ("monthly_logs", "user_id, month"),
        ("retention_horizon", "detail_kept_from"),
        ("maintenance_runs", "id"),
        ("quota_plans", "membership_level"),
        ("quotas", "user_id"),
        ("quota_usage_logs", "id"),
    ];
    tables
        .iter()
        .map(|(t, order)| {
            // Only the columns 0.1.0 has, so that both sides compare alike.
            let cols = c
                .query(
                    "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute
                      WHERE attrelid = ('usage_agg.' || $1)::regclass AND attnum > 0 AND NOT attisdropped
                        AND attname NOT IN ('fold_mode', 'apply_interval', 'pending_alert_after', 'verify_recent_days', 'repair_drift',
                                            'alert_thresholds', 'quota_log_retention', 'alert_retention', 'monthly_cost_budget',
                                            'hourly_retention', 'input_tokens', 'output_tokens', 'cache_read_tokens',
                                            'cache_write_tokens', 'price_valid_from')",
                    &[t],
                )
                .unwrap()[0]
                .get::<_, String>(0);
            let sql = if *t == "daily_logs" {
                // The update folds the calls still pending (their days are
                // checked by verify instead) and adds unpriced_calls to the
                // days with detail; every other byte stays.
                format!(
                    "SELECT count(*) || ' ' || coalesce(md5(string_agg(row({cols})::text, '|' ORDER BY {order})), '-')
                       FROM (SELECT d.id, d.user_id, d.date,
                                    regexp_replace(d.log_data::text, ', \"unpriced_calls\": [0-9]+', '', 'g') AS log_data,
                                    d.last_modified
                               FROM usage_agg.daily_logs d
                              WHERE NOT EXISTS (SELECT 1 FROM upgrade_pending_days p
                                                 WHERE p.user_id = d.user_id AND p.day = d.date)) x"
                )
            } else {
                format!(
                    "SELECT count(*) || ' ' || coalesce(md5(string_agg(row({cols})::text, '|' ORDER BY {order})), '-') FROM usage_agg.{t}"
                )
            };
            format!("{t}: {}", scalar_text(c, &sql).unwrap())
        })
        .collect()
}

/// Everything the extension defines, as sorted text lines.
fn catalog(c: &mut Client) -> Vec<String> {
    let mut lines: Vec<String> = c
        .query(
            "WITH ns AS (SELECT oid FROM pg_namespace WHERE nspname = 'usage_agg'),
                  ext AS (SELECT oid, extconfig, extcondition FROM pg_extension WHERE extname = 'usage_agg')
             SELECT 'function ' || p.proname || '(' || pg_get_function_arguments(p.oid) || ') ' || coalesce(pg_get_function_result(p.oid), '')
                    || ' lang=' || l.lanname || ' kind=' || p.prokind::text || ' vol=' || p.provolatile::text || ' strict=' || p.proisstrict
                    || ' par=' || p.proparallel::text || ' secdef=' || p.prosecdef
                    || ' config=' || coalesce(array_to_string(p.proconfig, ','), '')
                    || ' body=' || md5(coalesce(p.prosrc, '') || coalesce(p.probin, '') || coalesce(pg_get_function_sqlbody(p.oid), ''))
                    || ' acl=' || coalesce(p.proacl::text, '') || ' comment=' || coalesce(obj_description(p.oid, 'pg_proc'), '')
               FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang WHERE p.pronamespace IN (SELECT oid FROM ns)
             UNION ALL
             SELECT 'relation ' || c.relname || ' kind=' || c.relkind::text || ' options=' || coalesce(array_to_string(c.reloptions, ','), '')
                    || ' acl=' || coalesce(c.relacl::text, '') || ' comment=' || coalesce(obj_description(c.oid, 'pg_class'), '')
               FROM pg_class c WHERE c.relnamespace IN (SELECT oid FROM ns)
             UNION ALL
             SELECT 'column ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                    || ' notnull=' || a.attnotnull || ' default=' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
                    || ' acl=' || coalesce(a.attacl::text, '') || ' comment=' || coalesce(col_description(c.oid, a.attnum), '')
               FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
               LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
              WHERE c.relnamespace IN (SELECT oid FROM ns) AND c.relkind IN ('r', 'p', 'v', 'c')
             UNION ALL
             SELECT 'index ' || pg_get_indexdef(i.indexrelid)
               FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relnamespace IN (SELECT oid FROM ns)
             UNION ALL
             SELECT 'constraint ' || coalesce(r.relname, t.typname) || ' ' || co.conname || ' ' || pg_get_constraintdef(co.oid)
               FROM pg_constraint co LEFT JOIN pg_class r ON r.oid = co.conrelid LEFT JOIN pg_type t ON t.oid = co.contypid
              WHERE co.connamespace IN (SELECT oid FROM ns)
             UNION ALL
             SELECT 'trigger ' || pg_get_triggerdef(t.oid) || ' enabled=' || t.tgenabled::text
               FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
              WHERE c.relnamespace IN (SELECT oid FROM ns) AND NOT t.tgisinternal
             UNION ALL
             SELECT 'view ' || c.relname || ' ' || pg_get_viewdef(c.oid)
               FROM pg_class c WHERE c.relnamespace IN (SELECT oid FROM ns) AND c.relkind = 'v'
             UNION ALL
             SELECT 'aggregate ' || a.aggfnoid::regprocedure || ' ' || a.aggtransfn::regproc || ' ' || coalesce(a.agginitval, '')
               FROM pg_aggregate a JOIN pg_proc p ON p.oid = a.aggfnoid WHERE p.pronamespace IN (SELECT oid FROM ns)
             UNION ALL
             SELECT 'type ' || t.typname || ' ' || t.typtype::text
               FROM pg_type t WHERE t.typnamespace IN (SELECT oid FROM ns)
             UNION ALL
             SELECT 'member ' || pg_describe_object(d.classid, d.objid, d.objsubid)
               FROM pg_depend d, ext WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'
             UNION ALL
             SELECT 'dumped ' || x.rel::regclass || ' ' || coalesce(x.cond, '')
               FROM ext, unnest(ext.extconfig, ext.extcondition) AS x(rel, cond)
             UNION ALL
             SELECT 'schema acl=' || coalesce(n.nspacl::text, '') FROM pg_namespace n WHERE n.nspname = 'usage_agg'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    lines.sort();
    lines
}

/// The database an earlier release wrote, or None (printed) when that release
/// was not built for this server's PostgreSQL version (scripts/lib.sh,
/// UA_RELEASE_PG_VERSIONS).
fn old_database(release: &str, version: &str) -> Option<Client> {
    let tag = format!("v{version}");
    let written = std::env::var("USAGE_AGG_UPGRADE_RELEASES").unwrap_or_default();
    if !written.split_whitespace().any(|r| r == tag) {
        println!(
            "skipped: usage_agg {version} was not built for PostgreSQL {}, so there is nothing to update from on it",
            std::env::var("USAGE_AGG_PG_MAJOR").unwrap_or_else(|_| "?".into())
        );
        return None;
    }
    let dsn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=usage_agg_upgrade_{release}",
        std::env::var("USAGE_AGG_UPGRADE_PORT")
            .expect("USAGE_AGG_UPGRADE_PORT is not set: run the tests through scripts/test.sh")
    );
    let mut old = Client::connect(&dsn, NoTls).expect("connect to the old release's database");
    assert_eq!(
        scalar_text(
            &mut old,
            "SELECT extversion FROM pg_extension WHERE extname = 'usage_agg'"
        ),
        Some(version.to_string())
    );
    Some(old)
}

/// This connection runs the new library against the old catalog (the window
/// between installing the new version and ALTER EXTENSION ... UPDATE): inserts,
/// corrections and quota calls keep working and stay exact.
fn write_with_the_new_library(old: &mut Client, user: &str) {
    old.batch_execute(&format!(
        "INSERT INTO usage_agg.key_usage_logs (user_id, model_used, cost_estimate) VALUES ('{user}', 'new-lib', 0.5);
         INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate)
         SELECT '{user}', 0.25 FROM generate_series(1, 3);
         UPDATE usage_agg.key_usage_logs SET cost_estimate = 0.75 WHERE model_used = 'new-lib';
         DELETE FROM usage_agg.key_usage_logs WHERE request_id = 'req-6';
         SELECT usage_agg.consume_quota('{user}', 1, NULL, 'window');"
    ))
    .unwrap();
    assert_eq!(
        verify(old, "2000-01-01", "2100-01-01"),
        Vec::<String>::new()
    );
}

/// The per-key and service tables (0.4.0) hold what the users' rows do: exact
/// against the detail where it exists, and in total (calls, cost) over every
/// day and month, pending calls included.
fn per_key_tables_are_filled(c: &mut Client) {
    let verified: Vec<String> = c
        .query(
            "SELECT coalesce(shared_key_id::text, 'service') || ' ' || date || ' ' || field || ' '
                    || coalesce(aggregate_value::text, 'NULL') || ' vs ' || coalesce(detail_value::text, 'NULL')
               FROM usage_agg.verify_key_daily_logs('2000-01-01', '2100-01-01')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(verified, Vec::<String>::new());
    // (per-key side, users' side) for calls and cost; numeric equality, not text.
    let compare = |c: &mut Client, sql: &str| -> (bool, String) {
        let row = c
            .query_one(sql, &[])
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        (row.get(0), row.get(1))
    };
    let (equal, shown) = compare(
        c,
        "WITH k AS (SELECT sum(calls) AS calls, sum(estimated_cost) AS cost FROM usage_agg.key_monthly_usage),
              u AS (SELECT (SELECT sum(calls) FROM usage_agg.monthly_usage_by_key)
                           + (SELECT coalesce(sum(calls), 0) FROM usage_agg.pending_deltas WHERE shared_key_id IS NOT NULL) AS calls,
                           (SELECT sum(cost) FROM usage_agg.monthly_usage_by_key)
                           + (SELECT coalesce(sum(cost), 0) FROM usage_agg.pending_deltas WHERE shared_key_id IS NOT NULL) AS cost)
         SELECT k.calls IS NOT DISTINCT FROM u.calls AND k.cost IS NOT DISTINCT FROM u.cost, concat_ws(' ', k.calls, k.cost, 'vs', u.calls, u.cost) FROM k, u",
    );
    assert!(
        equal,
        "per-key totals equal the users' by_key totals: {shown}"
    );
    let (equal, shown) = compare(
        c,
        "WITH s AS (SELECT sum(calls) AS calls, sum(estimated_cost) AS cost FROM usage_agg.service_monthly_usage),
              u AS (SELECT (SELECT sum(calls) FROM usage_agg.monthly_usage)
                           + (SELECT coalesce(sum(calls), 0) FROM usage_agg.pending_deltas) AS calls,
                           (SELECT sum(estimated_cost) FROM usage_agg.monthly_usage)
                           + (SELECT coalesce(sum(cost), 0) FROM usage_agg.pending_deltas) AS cost)
         SELECT s.calls IS NOT DISTINCT FROM u.calls AND s.cost IS NOT DISTINCT FROM u.cost, concat_ws(' ', s.calls, s.cost, 'vs', u.calls, u.cost) FROM s, u",
    );
    assert!(equal, "service totals equal the users' totals: {shown}");
    assert!(
        scalar_i64(c, "SELECT count(*) FROM usage_agg.key_daily_logs") > 0,
        "the per-key days were filled"
    );
}

/// The hourly tier (0.4.0) holds the detail that is left, per user hour and
/// key hour, pending calls included (at the hour the readers put them).
fn hourly_tier_is_filled(c: &mut Client) {
    assert_eq!(hourly_mismatches(c), 0);
    assert_eq!(
        scalar_i64(
            c,
            "SELECT count(*) FROM usage_agg.verify_hourly_logs('2000-01-01', '2100-01-01')"
        ),
        0
    );
    assert_eq!(
        scalar_i64(c, "SELECT sum(calls)::int8 FROM usage_agg.hourly_usage"),
        scalar_i64(c, "SELECT count(*) FROM usage_agg.key_usage_logs"),
        "every call of the detail is in an hour"
    );
}

/// Updates, checks that the data is kept and that the new version folds on top
/// of it, and compares the catalog with a fresh install.
fn update_and_compare(old: &mut Client, user: &str, mode_after: &str, fresh_name: &str) {
    // The (user, day)s with calls pending (0.1.0 has no pending_deltas).
    old.batch_execute(
        "CREATE TEMP TABLE upgrade_pending_days (user_id uuid, day date);
         DO $$ BEGIN
             IF to_regclass('usage_agg.pending_deltas') IS NOT NULL THEN
                 INSERT INTO upgrade_pending_days SELECT DISTINCT user_id, day FROM usage_agg.pending_deltas;
             END IF;
         END $$;",
    )
    .unwrap();
    let before = data_fingerprint(old);
    assert_eq!(before.len(), 9);
    assert!(
        before.iter().all(|l| !l.contains(": 0 ")),
        "every table holds data before the update: {before:?}"
    );
    // A role granted quota functions before the update keeps its grants, also
    // on the functions the update drops and creates again (renamed arguments).
    let role = format!("ua_upgrade_role_{fresh_name}");
    old.batch_execute(&format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role};
         GRANT EXECUTE ON FUNCTION usage_agg.refund_quota(text), usage_agg.quota_status(uuid) TO {role};"
    ))
    .unwrap();
    old.batch_execute("ALTER EXTENSION usage_agg UPDATE")
        .unwrap();
    assert_eq!(
        scalar_text(
            old,
            &format!(
                "SELECT concat_ws(' ', has_function_privilege('{role}', 'usage_agg.refund_quota(text)', 'EXECUTE'),
                                  has_function_privilege('{role}', 'usage_agg.quota_status(uuid)', 'EXECUTE'),
                                  has_function_privilege('{role}', 'usage_agg.set_membership(uuid, text)', 'EXECUTE'),
                                  has_function_privilege('public', 'usage_agg.quota_status(uuid)', 'EXECUTE'))"
            )
        ),
        Some("t t f f".to_string())
    );
    old.batch_execute(&format!(
        "REVOKE ALL ON FUNCTION usage_agg.refund_quota(text), usage_agg.quota_status(uuid) FROM {role};
         DROP ROLE {role};"
    ))
    .unwrap();

    assert_eq!(
        scalar_text(
            old,
            "SELECT extversion FROM pg_extension WHERE extname = 'usage_agg'"
        ),
        Some(env!("CARGO_PKG_VERSION").to_string())
    );
    assert_eq!(data_fingerprint(old), before);
    // Named and positional calls of the renamed arguments.
    assert_eq!(
        scalar_text(
            old,
            &format!(
                "SELECT (SELECT membership_level FROM usage_agg.set_membership(user_id => '{user}', level => 'pro'))
                        || ' ' || (SELECT membership_level FROM usage_agg.quota_status(user_id => '{user}'))
                        || ' ' || (SELECT membership_level FROM usage_agg.set_membership('{user}', 'pro'))"
            )
        ),
        Some("pro pro pro".to_string())
    );
    // An updated install keeps the mode it had ('deferred' is now 'async').
    assert_eq!(
        scalar_text(old, "SELECT fold_mode FROM usage_agg.config"),
        Some(mode_after.to_string())
    );
    // The aggregates written by the old version still agree with their detail,
    // and the new version folds on top of them.
    assert_eq!(
        verify(old, "2000-01-01", "2100-01-01"),
        Vec::<String>::new()
    );
    per_key_tables_are_filled(old);
    hourly_tier_is_filled(old);
    // Token kinds and prices: the existing calls have none, and keep their
    // costs (the application's); a call without a cost is priced by the table.
    assert_eq!(
        scalar_i64(
            old,
            "SELECT count(*) FROM usage_agg.key_usage_logs
              WHERE price_valid_from IS NOT NULL
                 OR num_nonnulls(input_tokens, output_tokens, cache_read_tokens, cache_write_tokens) > 0"
        ),
        0
    );
    old.batch_execute(&format!(
        "INSERT INTO usage_agg.model_prices (model, valid_from, input_per_mtok) VALUES ('upgrade-model', '2000-01-01Z', 2);
         INSERT INTO usage_agg.key_usage_logs (user_id, model_used, input_tokens, request_id)
         VALUES ('{user}', 'upgrade-model', 500000, 'upgrade-priced');"
    ))
    .unwrap();
    assert_eq!(
        scalar_text(
            old,
            "SELECT tokens_used || ' ' || cost_estimate || ' ' || (price_valid_from AT TIME ZONE 'UTC')
               FROM usage_agg.key_usage_logs WHERE request_id = 'upgrade-priced'"
        ),
        Some("500000 1 2000-01-01 00:00:00".to_string())
    );
    old.batch_execute(&format!(
        "INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate) VALUES ('{user}', 1);
         UPDATE usage_agg.config SET fold_mode = 'async';
         INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate) VALUES ('{user}', 1);
         DELETE FROM usage_agg.key_usage_logs WHERE request_id = 'req-5';
         SELECT usage_agg.consume_quota('{user}');"
    ))
    .unwrap();
    assert_eq!(
        verify(old, "2000-01-01", "2100-01-01"),
        Vec::<String>::new()
    );
    old.batch_execute("SELECT usage_agg.apply_pending_deltas();")
        .unwrap();
    assert_eq!(pending(old), 0);
    assert_eq!(
        verify(old, "2000-01-01", "2100-01-01"),
        Vec::<String>::new()
    );
    per_key_tables_are_filled(old);
    hourly_tier_is_filled(old);
    old.batch_execute(&format!(
        "UPDATE usage_agg.config SET fold_mode = '{mode_after}', apply_interval = DEFAULT, pending_alert_after = DEFAULT"
    ))
    .unwrap();

    let fresh = TestDb::new(fresh_name);
    let mut fresh = fresh.connect();
    let updated = catalog(old);
    let installed = catalog(&mut fresh);
    let only_updated: Vec<&String> = updated.iter().filter(|l| !installed.contains(l)).collect();
    let only_fresh: Vec<&String> = installed.iter().filter(|l| !updated.contains(l)).collect();
    assert!(
        only_updated.is_empty() && only_fresh.is_empty(),
        "catalog differs\nonly after update: {only_updated:#?}\nonly in a fresh install: {only_fresh:#?}"
    );
    assert!(
        updated.len() > 150,
        "the catalog query sees the extension: {} lines",
        updated.len()
    );
    // A fresh install folds asynchronously by default.
    assert_eq!(
        scalar_text(&mut fresh, "SELECT fold_mode FROM usage_agg.config"),
        Some("auto".to_string())
    );
}

#[test]
fn update_from_0_1_0_keeps_data_and_equals_a_fresh_install() {
    let Some(mut old) = old_database("v0_1_0", "0.1.0") else {
        return;
    };
    write_with_the_new_library(&mut old, "f0000000-0000-0000-0000-000000000002");
    update_and_compare(
        &mut old,
        "f0000000-0000-0000-0000-000000000001",
        "immediate",
        "upgrade_fresh_010",
    );
}

#[test]
fn update_from_0_2_0_keeps_data_and_pending_calls() {
    let Some(mut old) = old_database("v0_2_0", "0.2.0") else {
        return;
    };
    // 0.2.0 left five calls pending in deferred mode.
    assert_eq!(pending(&mut old), 5);
    assert_eq!(
        scalar_text(&mut old, "SELECT fold_mode FROM usage_agg.config"),
        Some("deferred".to_string())
    );
    write_with_the_new_library(&mut old, "f2000000-0000-0000-0000-000000000002");
    update_and_compare(
        &mut old,
        "f2000000-0000-0000-0000-000000000001",
        "async",
        "upgrade_fresh_020",
    );
}

/// Runs once a release after 0.3.0 exists (scripts/test-version.sh updates
/// only from releases older than this build); 0.3.0 is the first release built
/// for PostgreSQL 16 and 18.
#[test]
fn update_from_0_3_0_keeps_data_and_pending_calls() {
    let Some(mut old) = old_database("v0_3_0", "0.3.0") else {
        return;
    };
    // 0.3.0 left seven calls pending in async mode, two of them without a cost.
    assert_eq!(pending(&mut old), 7);
    write_with_the_new_library(&mut old, "f4000000-0000-0000-0000-000000000002");
    update_and_compare(
        &mut old,
        "f4000000-0000-0000-0000-000000000001",
        "async",
        "upgrade_fresh_030",
    );
    // The five calls of 0.3.0 without a cost (three folded, two pending at the
    // update) are counted as unpriced once, per user, key and service day.
    assert_eq!(
        scalar_text(
            &mut old,
            "SELECT (SELECT sum(unpriced_calls) FROM usage_agg.daily_usage) || ' '
                    || (SELECT sum(unpriced_calls) FROM usage_agg.daily_usage_by_model) || ' '
                    || (SELECT sum(unpriced_calls) FROM usage_agg.key_daily_usage) || ' '
                    || (SELECT sum(unpriced_calls) FROM usage_agg.key_daily_usage_by_model) || ' '
                    || (SELECT sum(unpriced_calls) FROM usage_agg.service_daily_usage) || ' '
                    || (SELECT count(*) FROM usage_agg.key_usage_logs WHERE cost_estimate IS NULL)"
        ),
        Some("5 5 5 5 5 5".to_string())
    );
}
