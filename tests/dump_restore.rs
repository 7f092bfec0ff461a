//! pg_dump of a database using usage_agg, restored into a fresh database with
//! the extension available, in the custom format (pg_restore) and as plain SQL
//! (psql): the restore is noticed, `run_maintenance()` heals it with no extra
//! step (the restored detail was folded again on top of the restored
//! aggregates), and then detail, aggregates, quotas, plans and config are
//! identical; `post_restore()` stays harmless; folds and quota calls go on.
#![cfg(not(feature = "pg_test"))]

mod common;

use std::process::Command;

use common::*;
use postgres::Client;

/// Every table's data, as readers see it (pending calls applied first);
/// maintenance runs up to `until` (the runs of the restored database are its own).
fn fingerprint(c: &mut Client, until: &str) -> Vec<String> {
    [
        ("config", "timezone, detail_retention, daily_retention, cleanup_batch_size, fold_mode", "1"),
        ("retention_horizon", "detail_kept_from, daily_kept_from", "1"),
        ("key_usage_logs", "id, shared_key_id, user_id, api_endpoint, model_used, tokens_used, cost_estimate, success, error_message, request_id, created_at", "id"),
        // keys_used is a set: a rebuilt day lists its keys sorted, a folded day in first-use order.
        ("daily_logs", "user_id, date, jsonb_set(log_data, '{shared_service_usage,keys_used}', usage_agg._sorted_array(log_data->'shared_service_usage'->'keys_used'))", "user_id, date"),
        ("monthly_logs", "user_id, month, log_data", "user_id, month"),
        ("key_daily_logs", "shared_key_id, date, log_data", "shared_key_id, date"),
        ("key_monthly_logs", "shared_key_id, month, log_data", "shared_key_id, month"),
        ("service_daily_logs", "date, log_data", "date"),
        ("service_monthly_logs", "month, log_data", "month"),
        ("quota_plans", "membership_level, monthly_quota, daily_cost_limit", "membership_level"),
        ("quotas", "user_id, membership_level, monthly_quota, monthly_used, quota_reset_at, total_used, created_at, updated_at", "user_id"),
        ("quota_usage_logs", "id, user_id, session_id, membership_level, amount, tokens_used, request_id, created_at, refunded_at", "id"),
        ("maintenance_runs", "id, step, started, finished, rows, ok, error", "id"),
    ]
    .iter()
    .map(|(t, cols, order)| {
        let filter = if *t == "maintenance_runs" {
            format!("WHERE started <= '{until}'")
        } else {
            String::new()
        };
        let sql = format!(
            "SELECT count(*) || ' ' || coalesce(md5(string_agg(row({cols})::text, '|' ORDER BY {order})), '-') FROM usage_agg.{t} {filter}"
        );
        format!("{t}: {}", scalar_text(c, &sql).unwrap())
    })
    .collect()
}

/// A PostgreSQL client program connected to the test cluster as postgres.
fn pg_tool(program: &str) -> Command {
    let mut cmd = Command::new(format!("{}/{program}", pg_bin()));
    cmd.args(["-h", "127.0.0.1", "-p", &port(), "-U", "postgres"]);
    cmd
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dump_and_restore_keep_everything() {
    let source = TestDb::new("dump_source");
    let mut c = source.connect();
    c.batch_execute(
        "UPDATE usage_agg.config SET timezone = 'Europe/Berlin', cleanup_batch_size = 777;
         UPDATE usage_agg.quota_plans SET daily_cost_limit = 4 WHERE membership_level = 'basic';
         INSERT INTO usage_agg.quota_plans VALUES ('enterprise', 100000, NULL);
         INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, success, request_id, created_at)
         SELECT ('d0d00000-0000-0000-0000-00000000000' || (g % 4))::uuid, ('d1d00000-0000-0000-0000-00000000000' || (g % 3))::uuid,
                'model-' || (g % 5), g, 0.0001 * g, g % 7 <> 0, 'r-' || g, now() - (g % 150) * interval '1 day' - interval '1 hour'
           FROM generate_series(1, 3000) g;
         UPDATE usage_agg.daily_logs SET log_data = log_data || '{\"conversation_count\": 5}';
         SELECT usage_agg.run_maintenance();
         SELECT usage_agg.consume_quota(('d0d00000-0000-0000-0000-00000000000' || (g % 4))::uuid, 1, 's', 'q-' || g)
           FROM generate_series(1, 40) g;
         SELECT usage_agg.set_membership('d0d00000-0000-0000-0000-000000000001', 'enterprise');
         SELECT usage_agg.refund_quota('q-7');
         -- calls still pending at dump time
         UPDATE usage_agg.config SET fold_mode = 'deferred';
         INSERT INTO usage_agg.key_usage_logs (user_id, model_used, cost_estimate) VALUES ('d0d00000-0000-0000-0000-000000000002', 'late', 0.5);",
    )
    .unwrap();
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.pending_deltas"),
        1
    );
    let summaries = |c: &mut Client| -> Vec<String> {
        c.query(
            "SELECT u::text || ' ' || s.period || ' ' || s.calls || ' ' || s.tokens || ' ' || s.cost
               FROM generate_series(0, 3) g, LATERAL (SELECT ('d0d00000-0000-0000-0000-00000000000' || g)::uuid AS u) x,
                    LATERAL usage_agg.usage_summary(x.u) s ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    let summaries_before = summaries(&mut c);

    let dumped_at = scalar_text(&mut c, "SELECT clock_timestamp()::text").unwrap();
    let dump = std::env::temp_dir().join(format!("usage_agg_dump_{}.pgdump", std::process::id()));
    run(pg_tool("pg_dump").args(["-Fc", "-f", dump.to_str().unwrap(), &source.name]));
    let plain = std::env::temp_dir().join(format!("usage_agg_dump_{}.sql", std::process::id()));
    run(pg_tool("pg_dump").args(["-Fp", "-f", plain.to_str().unwrap(), &source.name]));
    // The source, as readers see it, once its pending calls are applied.
    c.batch_execute("SELECT usage_agg.apply_pending_deltas()")
        .unwrap();
    let before = fingerprint(&mut c, &dumped_at);

    let mut admin = Client::connect(&dsn_for("postgres"), postgres::NoTls).unwrap();
    for (target, format) in [
        ("ua_dump_target", "custom"),
        ("ua_dump_target_plain", "plain"),
    ] {
        // A fresh, empty database on a server with usage_agg installed: the dump
        // creates the schema and the extension, then restores the data.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {target} WITH (FORCE)"))
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {target}"))
            .unwrap();
        if format == "custom" {
            run(pg_tool("pg_restore").args([
                "--exit-on-error",
                "-d",
                target,
                dump.to_str().unwrap(),
            ]));
        } else {
            run(pg_tool("psql").args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                target,
                "-f",
                plain.to_str().unwrap(),
            ]));
        }
        let mut t = Client::connect(&dsn_for(target), postgres::NoTls).unwrap();
        // Noticed: until healed, the restored days are counted twice, and
        // maintenance_health says so.
        assert_ne!(
            summaries(&mut t),
            summaries_before,
            "{format}: the restore folded the detail again"
        );
        assert_eq!(
            scalar_text(
                &mut t,
                "SELECT overdue || ' ' || alert || ' ' || (last_error LIKE 'restored at %: the restored days are counted twice until SELECT usage_agg.post_restore() runs%')
                   FROM usage_agg.maintenance_health WHERE step = 'post_restore'"
            ),
            Some("true true true".to_string()),
            "{format}"
        );
        // The next maintenance run heals it: no extra step.
        let healed = scalar_i64(
            &mut t,
            "SELECT rows FROM usage_agg.run_maintenance() WHERE step = 'post_restore' AND ok",
        );
        assert!(healed > 0, "{format}: post_restore rewrote {healed} rows");
        assert_eq!(summaries(&mut t), summaries_before, "{format}");
        assert_eq!(pending(&mut t), 0, "{format}");
        assert_eq!(fingerprint(&mut t, &dumped_at), before, "{format}");
        assert_eq!(
            verify(&mut t, "2000-01-01", "2100-01-01"),
            Vec::<String>::new()
        );
        assert_eq!(
            scalar_i64(
                &mut t,
                "SELECT count(*) FROM usage_agg.verify_key_daily_logs('2000-01-01', '2100-01-01')"
            ),
            0,
            "{format}: the per-key rows agree with the detail"
        );
        assert_eq!(
            scalar_text(
                &mut t,
                "SELECT overdue || ' ' || alert || ' ' || coalesce(last_error, '-') FROM usage_agg.maintenance_health WHERE step = 'post_restore'"
            ),
            Some("false false -".to_string()),
            "{format}"
        );
        // post_restore() by hand, again: harmless.
        t.batch_execute("SELECT usage_agg.post_restore()").unwrap();
        assert_eq!(fingerprint(&mut t, &dumped_at), before, "{format}");
        assert_eq!(
            scalar_i64(
                &mut t,
                "SELECT count(*) FROM usage_agg.restores WHERE healed_at IS NULL"
            ),
            0
        );

        // Folds and quota calls go on.
        t.batch_execute(
            "UPDATE usage_agg.config SET fold_mode = 'immediate';
             INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate) VALUES ('d0d00000-0000-0000-0000-000000000003', 1);
             SELECT usage_agg.consume_quota('d0d00000-0000-0000-0000-000000000003', 1, NULL, 'after-restore');",
        )
        .unwrap();
        assert_eq!(
            verify(&mut t, "2000-01-01", "2100-01-01"),
            Vec::<String>::new()
        );
        assert_eq!(
            scalar_text(
                &mut t,
                "SELECT (SELECT monthly_used FROM usage_agg.quotas WHERE user_id = 'd0d00000-0000-0000-0000-000000000003')
                        || ' ' || (SELECT count(*) FROM usage_agg.quota_usage_logs WHERE user_id = 'd0d00000-0000-0000-0000-000000000003' AND refunded_at IS NULL)"
            ),
            // 10 consumptions of user 3 (q-3, q-7, ..., q-39), q-7 refunded, one more now
            Some("10 10".to_string())
        );
    }
    std::fs::remove_file(&dump).ok();
    std::fs::remove_file(&plain).ok();
}
