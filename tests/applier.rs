//! The background applier, on the cluster that preloads usage_agg (scripts/
//! test.sh starts it and sets USAGE_AGG_APPLIER_PORT): calls reach daily_logs
//! with nobody calling apply_pending_deltas(), every reader is exact meanwhile,
//! the applier comes back when it is terminated, a corrupted day neither fails
//! an INSERT nor holds up other days, and DROP EXTENSION / DROP DATABASE work
//! while it runs.
#![cfg(not(feature = "pg_test"))]

mod common;

use std::io::Write;
use std::thread;

use common::*;
use postgres::Client;

fn admin() -> Client {
    admin_client(&applier_port())
}

fn applier_pid(c: &mut Client) -> Option<i32> {
    c.query_one("SELECT applier_pid FROM usage_agg.fold_status", &[])
        .unwrap()
        .get(0)
}

/// Appliers connected to `db`, as pg_stat_activity shows them.
fn appliers_in(admin: &mut Client, db: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'usage_agg applier' AND datname = $1",
            &[&db],
        )
        .unwrap()
        .get(0)
}

fn summary(c: &mut Client, user: &str) -> String {
    scalar_text(
        c,
        &format!(
            "SELECT string_agg(period || '=' || calls || '/' || failed || '/' || tokens || '/' || cost, ' ' ORDER BY period)
               FROM usage_agg.usage_summary('{user}', '2026-09-10 12:00+00')"
        ),
    )
    .unwrap()
}

#[test]
fn calls_reach_daily_logs_with_nobody_applying() {
    let db = TestDb::with_applier("applier_basic");
    let mut c = db.connect();
    let u = "a1000000-0000-0000-0000-000000000001";
    for i in 0..10 {
        c.execute(
            "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, success, created_at)
             VALUES ($1::text::uuid, 'a2000000-0000-0000-0000-000000000001', 'gpt-4o', 10, 0.01, $2, '2026-09-10 08:00+00')",
            &[&u, &(i != 0)],
        )
        .unwrap();
    }
    c.batch_execute(&format!(
        "INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, created_at)
         SELECT '{u}', 'claude', 1, 0.001, '2026-09-10 09:00+00' FROM generate_series(1, 200)"
    ))
    .unwrap();
    let mut copy = c
        .copy_in("COPY usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, created_at) FROM STDIN")
        .unwrap();
    for _ in 0..100 {
        writeln!(copy, "{u}\to1\t2\t0.5\t2026-09-10 10:00:00+00").unwrap();
    }
    copy.finish().unwrap();
    // Readers are exact whether or not the applier has run yet.
    let expected = "all_time=310/1/500/50.300 month=310/1/500/50.300 today=310/1/500/50.300";
    assert_eq!(summary(&mut c, u), expected);
    wait_until_folded(&mut c);
    assert_eq!(summary(&mut c, u), expected);
    assert_eq!(
        scalar_text(
            &mut c,
            &format!("SELECT (log_data->>'api_call_count') || ' ' || (log_data#>>'{{shared_service_usage,estimated_cost}}') || ' ' || (log_data#>>'{{shared_service_usage,by_model,o1,calls}}')
                        FROM usage_agg.daily_logs WHERE user_id = '{u}' AND date = '2026-09-10'")
        ),
        Some("310 50.300 100".to_string())
    );
    assert_eq!(
        verify(&mut c, "2026-09-01", "2026-09-30"),
        Vec::<String>::new()
    );
    assert_eq!(group_by_mismatches(&mut c), 0);
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT applied_total || ' ' || skipped_days || ' ' || coalesce(hint, 'no hint') FROM usage_agg.fold_status"
        ),
        Some("310 0 no hint".to_string())
    );
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT last_run_ok || ' ' || overdue FROM usage_agg.maintenance_health WHERE step = 'background_fold'"
        ),
        Some("true false".to_string())
    );
}

#[test]
fn many_sessions_stay_exact_while_the_applier_runs() {
    let db = TestDb::with_applier("applier_sessions");
    const SESSIONS: usize = 8;
    let handles: Vec<_> = (0..SESSIONS)
        .map(|s| {
            let mut w = db.connect();
            thread::spawn(move || {
                for n in 0..60usize {
                    let user = format!("a3000000-0000-0000-0000-{:012}", (s + n) % 5);
                    let key = format!("a4000000-0000-0000-0000-{:012}", n % 20);
                    match n % 6 {
                        // a small multi-row statement
                        0 => w.batch_execute(&format!(
                            "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, created_at)
                             SELECT '{user}', '{key}', 'm' || g, g, 0.01 * g, '2026-09-10 11:00+00' FROM generate_series(1, 3) g"
                        )),
                        // a bulk statement, grouped (tagged, for the correction and
                        // the deletion below)
                        1 => w.batch_execute(&format!(
                            "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, api_endpoint, created_at)
                             SELECT '{user}', '{key}', 'bulk', 1, 0.001, 'b-{s}-{n}', '2026-09-09 23:30+00' FROM generate_series(1, 80)"
                        )),
                        // a rolled-back insert
                        2 => w.batch_execute(&format!(
                            "BEGIN; INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate, created_at) VALUES ('{user}', 100, '2026-09-10 11:00+00'); ROLLBACK;"
                        )),
                        // a correction: a call moved to another key and day
                        3 => w.batch_execute(&format!(
                            "UPDATE usage_agg.key_usage_logs SET shared_key_id = '{key}', created_at = created_at - interval '1 day', cost_estimate = 0.5
                              WHERE id = (SELECT id FROM usage_agg.key_usage_logs WHERE api_endpoint = 'b-{s}-{}' ORDER BY id LIMIT 1)",
                            n - 2
                        )),
                        // a deletion of one call of this session's last bulk
                        4 => w.batch_execute(&format!(
                            "DELETE FROM usage_agg.key_usage_logs
                              WHERE id = (SELECT id FROM usage_agg.key_usage_logs WHERE api_endpoint = 'b-{s}-{}' ORDER BY id DESC LIMIT 1)",
                            n - 3
                        )),
                        // a single-row insert
                        _ => w
                            .execute(
                                "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, created_at)
                                 VALUES ($1::text::uuid, $2::text::uuid, 'gpt-4o', 7, 0.07, '2026-09-10 12:00+00')",
                                &[&user, &key],
                            )
                            .map(|_| ()),
                    }
                    .unwrap();
                }
            })
        })
        .collect();
    let mut c = db.connect();
    // Mid-flight, readers and verify (which include pending calls) are exact.
    for _ in 0..5 {
        assert_eq!(
            verify(&mut c, "2026-09-01", "2026-09-30"),
            Vec::<String>::new()
        );
        thread::sleep(std::time::Duration::from_millis(100));
    }
    for h in handles {
        h.join().unwrap();
    }
    wait_until_folded(&mut c);
    assert_eq!(
        verify(&mut c, "2026-09-01", "2026-09-30"),
        Vec::<String>::new()
    );
    assert_eq!(group_by_mismatches(&mut c), 0);
    // 8 sessions x 10 rounds x (3 + 80 + 1) calls, less 8 x 10 deletions.
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.key_usage_logs"),
        (SESSIONS * 10 * (3 + 80 + 1) - SESSIONS * 10) as i64
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT sum((log_data->>'api_call_count')::bigint)::int8 FROM usage_agg.daily_logs"
        ),
        (SESSIONS * 10 * (3 + 80 + 1) - SESSIONS * 10) as i64
    );
}

#[test]
fn the_applier_comes_back_after_being_terminated() {
    let db = TestDb::with_applier("applier_terminated");
    let mut c = db.connect();
    let first = applier_pid(&mut c).unwrap();
    assert!(c
        .query_one("SELECT pg_terminate_backend($1)", &[&first])
        .unwrap()
        .get::<_, bool>(0));
    wait_for(&mut c, "a new applier", |c| {
        applier_pid(c).is_some_and(|p| p != first)
    });
    c.batch_execute(
        "INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate, created_at)
         SELECT 'a5000000-0000-0000-0000-000000000001', 1, '2026-09-10 12:00+00' FROM generate_series(1, 5)",
    )
    .unwrap();
    wait_until_folded(&mut c);
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT (log_data->>'api_call_count')::int8 FROM usage_agg.daily_logs"
        ),
        5
    );
}

#[test]
fn a_corrupted_day_is_skipped_reported_and_folds_after_repair() {
    let db = TestDb::with_applier("applier_poisoned");
    let mut c = db.connect();
    let bad = "a6000000-0000-0000-0000-000000000001";
    let good = "a6000000-0000-0000-0000-000000000002";
    let insert = |c: &mut Client, user: &str, n: i32| {
        c.batch_execute(&format!(
            "INSERT INTO usage_agg.key_usage_logs (user_id, model_used, cost_estimate, created_at)
             VALUES ('{user}', 'm', 0.5, '2026-09-10 12:00+00');
             INSERT INTO usage_agg.key_usage_logs (user_id, model_used, cost_estimate, created_at)
             SELECT '{user}', 'm', 0.5, '2026-09-10 12:00+00' FROM generate_series(2, {n})"
        ))
        .unwrap();
    };
    insert(&mut c, bad, 3);
    insert(&mut c, good, 3);
    wait_until_folded(&mut c);
    c.batch_execute(&format!(
        "UPDATE usage_agg.daily_logs SET log_data = jsonb_set(log_data, '{{api_call_count}}', '\"abc\"') WHERE user_id = '{bad}'"
    ))
    .unwrap();
    // Neither a single-row insert, a bulk insert nor COPY fails.
    insert(&mut c, bad, 100);
    insert(&mut c, good, 100);
    let mut copy = c
        .copy_in("COPY usage_agg.key_usage_logs (user_id, model_used, cost_estimate, created_at) FROM STDIN")
        .unwrap();
    for user in [bad, good] {
        writeln!(copy, "{user}\tm\t0.5\t2026-09-10 13:00:00+00").unwrap();
    }
    copy.finish().unwrap();
    // The good user's day is folded; the bad one's 101 calls wait, recorded.
    wait_for(&mut c, "the day to be skipped", |c| {
        scalar_i64(c, "SELECT count(*) FROM usage_agg.fold_skipped") == 1
    });
    wait_for(&mut c, "every other call to be folded", |c| {
        pending(c) == 101
    });
    assert_eq!(
        scalar_text(
            &mut c,
            &format!("SELECT (log_data->>'api_call_count') FROM usage_agg.daily_logs WHERE user_id = '{good}'")
        ),
        Some("104".to_string())
    );
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT user_id || ' ' || day || ' ' || field FROM usage_agg.fold_skipped"
        ),
        Some(format!("{bad} 2026-09-10 api_call_count"))
    );
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT skipped_days || ' ' || (hint LIKE 'Some days could not be folded%') FROM usage_agg.fold_status"
        ),
        Some("1 true".to_string())
    );
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT overdue || ' ' || last_error FROM usage_agg.maintenance_health WHERE step = 'background_fold'"
        ),
        Some("true 1 day(s) could not be folded: see usage_agg.fold_skipped".to_string())
    );
    // The server log names the user, the day and the field.
    let log = std::fs::read_to_string(
        std::env::var("USAGE_AGG_APPLIER_LOG").expect("USAGE_AGG_APPLIER_LOG is not set"),
    )
    .unwrap();
    assert!(
        log.contains(&format!(
            "WARNING:  usage_agg: daily_logs row of user {bad} on 2026-09-10 has a corrupted field \"api_call_count\"; its calls wait in pending_deltas"
        )),
        "the server log has the applier's warning"
    );
    // Repaired: the day folds from the detail, nothing lost, nothing doubled.
    c.batch_execute("SELECT usage_agg.rebuild_daily_logs('2026-09-10', '2026-09-10')")
        .unwrap();
    assert_eq!(pending(&mut c), 0);
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.fold_skipped"),
        0
    );
    insert(&mut c, bad, 2);
    wait_until_folded(&mut c);
    assert_eq!(
        scalar_text(
            &mut c,
            &format!("SELECT (log_data->>'api_call_count') || ' ' || (log_data#>>'{{shared_service_usage,estimated_cost}}') FROM usage_agg.daily_logs WHERE user_id = '{bad}'")
        ),
        Some("106 53.0".to_string())
    );
    assert_eq!(
        verify(&mut c, "2026-09-10", "2026-09-10"),
        Vec::<String>::new()
    );
    assert_eq!(group_by_mismatches(&mut c), 0);
}

#[test]
fn drop_extension_and_drop_database_while_the_applier_runs() {
    let db = TestDb::with_applier("applier_drops");
    let mut admin = admin();
    let mut c = db.connect();
    c.batch_execute("DROP EXTENSION usage_agg").unwrap();
    wait_for(&mut admin, "the applier to leave", |a| {
        appliers_in(a, &db.name) == 0
    });
    // Created again: served again at once (the launcher is woken at commit).
    c.batch_execute("CREATE EXTENSION usage_agg").unwrap();
    wait_for(&mut c, "the applier to come back", |c| {
        applier_pid(c).is_some()
    });
    drop(c);
    assert_eq!(appliers_in(&mut admin, &db.name), 1);
    // A plain DROP DATABASE (no FORCE) does not wait for the applier.
    admin
        .batch_execute(&format!("DROP DATABASE {}", db.name))
        .expect("DROP DATABASE while its applier runs");
}

#[test]
fn errors_carry_no_backtrace_whatever_the_server_environment() {
    // This cluster was started with RUST_BACKTRACE=1 and RUST_LIB_BACKTRACE=1.
    let db = TestDb::with_applier("applier_backtrace");
    let mut c = db.connect();
    c.batch_execute(
        "UPDATE usage_agg.config SET fold_mode = 'immediate';
         INSERT INTO usage_agg.daily_logs (user_id, date, log_data, last_modified)
         VALUES ('a7000000-0000-0000-0000-000000000001', '2026-09-10', '{\"api_call_count\": \"abc\"}', now())",
    )
    .unwrap();
    let err = db_error(c.batch_execute(
        "INSERT INTO usage_agg.key_usage_logs (user_id, created_at) VALUES ('a7000000-0000-0000-0000-000000000001', '2026-09-10 10:00+00')",
    ));
    assert_eq!(err.code().code(), "XX001");
    assert_eq!(
        err.detail(),
        Some("field \"api_call_count\" holds \"abc\" where an integer was expected.")
    );
    let err = db_error(c.batch_execute("SELECT usage_agg.apply_pending_deltas(-1)"));
    assert_eq!(err.code().code(), "22023");
    assert_eq!(err.detail(), Some("max_rows = -1"));
}
