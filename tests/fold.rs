//! The fold over real connections: concurrency, bulk loads, COPY, rollbacks,
//! corrections, idempotency and bad input.
#![cfg(not(feature = "pg_test"))]

mod common;

use std::io::Write;
use std::thread;

use common::*;

const SHARED_USER: &str = "aaaaaaaa-0000-0000-0000-000000000000";

/// Runs `name(mode)` as two tests, `name::default_mode` and `name::async_mode`:
/// the asynchronous mode must pass the same exactness and concurrency tests.
macro_rules! in_both_fold_modes {
    ($name:ident) => {
        mod $name {
            use super::*;

            #[test]
            fn default_mode() {
                super::$name(FoldMode::Default);
            }

            #[test]
            fn async_mode() {
                super::$name(FoldMode::Async);
            }
        }
    };
}

in_both_fold_modes!(concurrent_sessions_fold_exactly);

fn concurrent_sessions_fold_exactly(mode: FoldMode) {
    let db = mode.db("concurrent_fold");
    const CLIENTS: usize = 8;
    const CALLS: usize = 300;
    let handles: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let mut c = db.connect();
            thread::spawn(move || {
                let own_user = format!("bbbbbbbb-0000-0000-0000-{:012}", i);
                let stmt = c
                    .prepare(
                        "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, success, created_at)
                         VALUES ($1::text::uuid, $2::text::uuid, $3, $4, $5::text::numeric, $6, '2026-07-01 12:00+00'::timestamptz + $7::int * interval '1 second')",
                    )
                    .unwrap();
                for n in 0..CALLS {
                    // Every other call goes to the user all clients share.
                    let user = if n % 2 == 0 { SHARED_USER.to_string() } else { own_user.clone() };
                    let key = format!("cccccccc-0000-0000-0000-{:012}", n % 3);
                    let model = if n % 5 == 0 { "gpt-4o" } else { "claude" };
                    c.execute(&stmt, &[&user, &key, &model, &(n as i32), &"0.01", &(n % 7 != 0), &(n as i32)])
                        .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mut c = db.connect();
    assert_eq!(
        verify(&mut c, "2026-07-01", "2026-07-01"),
        Vec::<String>::new()
    );
    mode.settle(&mut c, (CLIENTS * CALLS) as i64);
    assert_eq!(group_by_mismatches(&mut c), 0);
    // The shared user's day: 8 clients x 150 calls, each 0.01.
    let shared = format!(
        "SELECT (log_data->>'api_call_count') || ' ' || (log_data->'shared_service_usage'->>'estimated_cost')
           FROM usage_agg.daily_logs WHERE user_id = '{SHARED_USER}' AND date = '2026-07-01'"
    );
    assert_eq!(scalar_text(&mut c, &shared), Some("1200 12.00".to_string()));
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.daily_logs"),
        CLIENTS as i64 + 1
    );
}

#[test]
fn bulk_insert_select_of_200k_rows() {
    let db = TestDb::new("bulk_200k");
    let mut c = db.connect();
    c.batch_execute(
        "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, success, created_at)
         SELECT ('dddddddd-0000-0000-0000-' || lpad((i % 1000)::text, 12, '0'))::uuid,
                ('eeeeeeee-0000-0000-0000-' || lpad((i % 4)::text, 12, '0'))::uuid,
                'model-' || (i % 3), i % 1000, 0.001, i % 10 <> 0,
                '2026-08-01 00:00+00'::timestamptz + (i % 3) * interval '1 day' + i * interval '1 millisecond'
           FROM generate_series(1, 200000) i",
    )
    .unwrap();
    assert_eq!(
        verify(&mut c, "2026-08-01", "2026-08-03"),
        Vec::<String>::new()
    );
    assert_eq!(group_by_mismatches(&mut c), 0);
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.daily_logs"),
        3000
    );
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT sum((log_data->>'api_call_count')::bigint)::text || ' ' || sum((log_data->'shared_service_usage'->>'estimated_cost')::numeric)::text
               FROM usage_agg.daily_logs"
        ),
        Some("200000 200.000".to_string())
    );
}

#[test]
fn copy_is_folded_per_statement() {
    let db = TestDb::new("copy_fold");
    let mut c = db.connect();
    let mut w = c
        .copy_in("COPY usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, created_at) FROM STDIN")
        .unwrap();
    for i in 0..10_000 {
        writeln!(
            w,
            "ffffffff-0000-0000-0000-{:012}\tm{}\t{}\t0.25\t2026-09-0{} 10:00:00+00",
            i % 50,
            i % 2,
            i,
            1 + i % 2
        )
        .unwrap();
    }
    w.finish().unwrap();
    assert_eq!(
        verify(&mut c, "2026-09-01", "2026-09-02"),
        Vec::<String>::new()
    );
    assert_eq!(group_by_mismatches(&mut c), 0);
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT sum((log_data->>'api_call_count')::bigint)::text || ' ' || sum((log_data->'shared_service_usage'->>'estimated_cost')::numeric)::text
               FROM usage_agg.daily_logs"
        ),
        Some("10000 2500.00".to_string())
    );
}

in_both_fold_modes!(rolled_back_work_leaves_no_trace);

fn rolled_back_work_leaves_no_trace(mode: FoldMode) {
    let db = mode.db("rollback");
    let mut c = db.connect();
    c.batch_execute(
        "INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate, created_at)
         VALUES ('11111111-0000-0000-0000-000000000001', 1, '2026-10-01 10:00+00')",
    )
    .unwrap();
    let written = "SELECT (SELECT count(*) FROM usage_agg.daily_logs) || ' ' || (SELECT count(*) FROM usage_agg.pending_deltas)";
    let before = scalar_text(&mut c, written);
    assert_eq!(
        before.as_deref(),
        Some(if mode == FoldMode::Default {
            "1 0"
        } else {
            "0 1"
        })
    );

    let mut tx = c.transaction().unwrap();
    tx.batch_execute(
        "INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate, created_at)
         SELECT '11111111-0000-0000-0000-000000000001', 5, '2026-10-01 11:00+00' FROM generate_series(1, 10);
         INSERT INTO usage_agg.key_usage_logs (user_id, created_at) VALUES ('11111111-0000-0000-0000-000000000002', '2026-10-01 11:00+00');
         DELETE FROM usage_agg.key_usage_logs WHERE cost_estimate = 1;",
    )
    .unwrap();
    tx.rollback().unwrap();
    assert_eq!(scalar_text(&mut c, written), before);

    // A savepoint rolled back inside a committed transaction.
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(
        "INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate, created_at)
         VALUES ('11111111-0000-0000-0000-000000000001', 2, '2026-10-01 12:00+00');
         SAVEPOINT s;
         INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate, created_at)
         VALUES ('11111111-0000-0000-0000-000000000001', 100, '2026-10-01 13:00+00');
         ROLLBACK TO SAVEPOINT s;",
    )
    .unwrap();
    tx.commit().unwrap();

    assert_eq!(
        verify(&mut c, "2026-10-01", "2026-10-01"),
        Vec::<String>::new()
    );
    mode.settle(&mut c, 2);
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.daily_logs"),
        1
    );
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT (log_data->>'api_call_count') || ' ' || (log_data->'shared_service_usage'->>'estimated_cost') || ' ' || (log_data->>'last_api_call_at')
               FROM usage_agg.daily_logs"
        ),
        Some("2 3 2026-10-01T12:00:00Z".to_string())
    );
    assert_eq!(
        verify(&mut c, "2026-10-01", "2026-10-01"),
        Vec::<String>::new()
    );
}

#[test]
fn updates_and_deletes_correct_the_aggregate() {
    let db = TestDb::new("corrections");
    let mut c = db.connect();
    c.batch_execute(
        "INSERT INTO usage_agg.key_usage_logs (id, user_id, shared_key_id, model_used, tokens_used, cost_estimate, success, created_at) VALUES
         ('20000000-0000-0000-0000-000000000001', '22222222-0000-0000-0000-000000000001', '30000000-0000-0000-0000-000000000001', 'a', 100, 1.10, true,  '2026-10-02 08:00+00'),
         ('20000000-0000-0000-0000-000000000002', '22222222-0000-0000-0000-000000000001', '30000000-0000-0000-0000-000000000002', 'b', 200, 2.20, false, '2026-10-02 09:00+00'),
         ('20000000-0000-0000-0000-000000000003', '22222222-0000-0000-0000-000000000001', '30000000-0000-0000-0000-000000000001', 'a', 300, 3.30, true,  '2026-10-02 10:00+00');
         -- a corrected cost
         UPDATE usage_agg.key_usage_logs SET cost_estimate = 0.10 WHERE id = '20000000-0000-0000-0000-000000000001';
         -- a call moved to another user and to the next day
         UPDATE usage_agg.key_usage_logs SET user_id = '22222222-0000-0000-0000-000000000002', created_at = '2026-10-03 01:00+00'
          WHERE id = '20000000-0000-0000-0000-000000000003';
         -- an update of a column the fold ignores
         UPDATE usage_agg.key_usage_logs SET error_message = 'timeout' WHERE id = '20000000-0000-0000-0000-000000000002';",
    )
    .unwrap();
    assert_eq!(
        verify(&mut c, "2026-10-01", "2026-10-04"),
        Vec::<String>::new()
    );
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT log_data->'shared_service_usage'->>'estimated_cost' || ' ' || (log_data->>'last_api_call_at') || ' ' ||
                    (log_data->'shared_service_usage'->'keys_used')::text
               FROM usage_agg.daily_logs WHERE user_id = '22222222-0000-0000-0000-000000000001'"
        ),
        Some("2.30 2026-10-02T09:00:00Z [\"30000000-0000-0000-0000-000000000001\", \"30000000-0000-0000-0000-000000000002\"]".to_string())
    );
    // Delete the key-2 call: key 2 and model b disappear from the day.
    c.batch_execute(
        "DELETE FROM usage_agg.key_usage_logs WHERE id = '20000000-0000-0000-0000-000000000002'",
    )
    .unwrap();
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT (log_data->>'api_call_count') || ' ' || (log_data->'shared_service_usage'->>'failed_calls') || ' ' ||
                    (log_data->'shared_service_usage'->'keys_used')::text || ' ' || (log_data->'shared_service_usage'->'by_model')::text || ' ' ||
                    (log_data->>'last_api_call_at')
               FROM usage_agg.daily_logs WHERE user_id = '22222222-0000-0000-0000-000000000001'"
        ),
        Some("1 0 [\"30000000-0000-0000-0000-000000000001\"] {\"a\": {\"cost\": 0.10, \"calls\": 1, \"tokens\": 100}} 2026-10-02T08:00:00Z".to_string())
    );
    // Delete everything: the days remain with zero counters.
    c.batch_execute("DELETE FROM usage_agg.key_usage_logs")
        .unwrap();
    assert_eq!(
        verify(&mut c, "2026-10-01", "2026-10-04"),
        Vec::<String>::new()
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT sum((log_data->>'api_call_count')::int) FROM usage_agg.daily_logs"
        ),
        0
    );
}

in_both_fold_modes!(concurrent_corrections_and_inserts_stay_exact);

fn concurrent_corrections_and_inserts_stay_exact(mode: FoldMode) {
    let db = mode.db("concurrent_corrections");
    let mut setup = db.connect();
    setup
        .batch_execute(
            "INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, created_at)
             SELECT ('44444444-0000-0000-0000-' || lpad((i % 4)::text, 12, '0'))::uuid, 'm' || (i % 2), i, i * 0.01,
                    '2026-10-05 00:00+00'::timestamptz + i * interval '1 minute'
               FROM generate_series(1, 400) i",
        )
        .unwrap();
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let mut c = db.connect();
            thread::spawn(move || {
                for n in 0..60 {
                    let r = match (t + n) % 3 {
                        0 => c.batch_execute(&format!(
                            "INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, created_at)
                             VALUES ('44444444-0000-0000-0000-{:012}', 'm9', 5, 0.05, '2026-10-05 23:00+00'::timestamptz + interval '{} seconds')",
                            n % 4, t * 100 + n
                        )),
                        1 => c.batch_execute(&format!(
                            "UPDATE usage_agg.key_usage_logs SET cost_estimate = cost_estimate + 1, tokens_used = tokens_used + 1
                              WHERE id = (SELECT id FROM usage_agg.key_usage_logs WHERE user_id = '44444444-0000-0000-0000-{:012}' ORDER BY created_at OFFSET {} LIMIT 1)",
                            n % 4, n
                        )),
                        _ => c.batch_execute(&format!(
                            "DELETE FROM usage_agg.key_usage_logs
                              WHERE id = (SELECT id FROM usage_agg.key_usage_logs WHERE user_id = '44444444-0000-0000-0000-{:012}' ORDER BY created_at DESC LIMIT 1)",
                            n % 4
                        )),
                    };
                    if let Err(e) = r {
                        // A deadlock between crossing corrections is reported by
                        // Postgres and rolled back; anything else is a failure.
                        let code = e.as_db_error().map(|d| d.code().code().to_string());
                        assert_eq!(code.as_deref(), Some("40P01"), "unexpected error: {e}");
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mut c = db.connect();
    assert_eq!(
        verify(&mut c, "2026-10-05", "2026-10-06"),
        Vec::<String>::new()
    );
    mode.settle_all(&mut c);
    assert_eq!(
        verify(&mut c, "2026-10-05", "2026-10-06"),
        Vec::<String>::new()
    );
    assert_eq!(group_by_mismatches(&mut c), 0);
}

#[test]
fn request_id_counts_a_retried_call_once() {
    let db = TestDb::new("idempotency");
    let insert = "INSERT INTO usage_agg.key_usage_logs (user_id, request_id, cost_estimate, created_at)
                  VALUES ('55555555-0000-0000-0000-000000000001', 'req-1', 0.5, '2026-10-07 10:00+00')
                  ON CONFLICT (request_id) DO NOTHING";
    let mut c = db.connect();
    c.batch_execute(insert).unwrap();
    c.batch_execute(insert).unwrap();
    // Eight sessions retrying the same request at once.
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let mut c = db.connect();
            thread::spawn(move || {
                c.batch_execute(
                    "INSERT INTO usage_agg.key_usage_logs (user_id, request_id, cost_estimate, created_at)
                     VALUES ('55555555-0000-0000-0000-000000000001', 'req-2', 0.25, '2026-10-07 11:00+00')
                     ON CONFLICT (request_id) DO NOTHING",
                )
                .unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT (log_data->>'api_call_count') || ' ' || (log_data->'shared_service_usage'->>'estimated_cost') FROM usage_agg.daily_logs"
        ),
        Some("2 0.75".to_string())
    );
    assert_eq!(
        verify(&mut c, "2026-10-07", "2026-10-07"),
        Vec::<String>::new()
    );
}

#[test]
fn bad_input_is_refused_and_nothing_is_written() {
    let db = TestDb::new("bad_input");
    let mut c = db.connect();
    let cases = [
        ("INSERT INTO usage_agg.key_usage_logs (user_id) VALUES (NULL)", "23502"),
        ("INSERT INTO usage_agg.key_usage_logs (user_id, tokens_used) VALUES (gen_random_uuid(), -5)", "23514"),
        ("INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate) VALUES (gen_random_uuid(), -0.01)", "23514"),
        ("INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate) VALUES (gen_random_uuid(), 'NaN')", "23514"),
        ("INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate) VALUES (gen_random_uuid(), 'Infinity')", "23514"),
        // One bad row in a multi-row statement rejects the whole statement.
        ("INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate) VALUES (gen_random_uuid(), 1), (gen_random_uuid(), -1)", "23514"),
        ("UPDATE usage_agg.config SET timezone = 'Not/AZone'", "22023"),
        ("UPDATE usage_agg.config SET cleanup_batch_size = 0", "23514"),
        ("SELECT * FROM usage_agg.verify_daily_logs(NULL, '2026-01-01')", "22023"),
        ("SELECT usage_agg.rebuild_daily_logs('2026-02-01', '2026-01-01')", "22023"),
    ];
    for (sql, code) in cases {
        assert_eq!(sqlstate(c.batch_execute(sql)), code, "{sql}");
    }
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.key_usage_logs"),
        0
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.daily_logs"),
        0
    );

    // A daily row whose owned field an application corrupted. In immediate
    // mode the insert fails and says how to repair (the default mode records
    // the call instead: see tests/applier.rs).
    c.batch_execute(
        "UPDATE usage_agg.config SET fold_mode = 'immediate';
         INSERT INTO usage_agg.daily_logs (user_id, date, log_data, last_modified)
         VALUES ('66666666-0000-0000-0000-000000000001', '2026-10-08', '{\"api_call_count\": \"abc\", \"upload_count\": 4}', now())",
    )
    .unwrap();
    let err = db_error(c.batch_execute(
        "INSERT INTO usage_agg.key_usage_logs (user_id, created_at) VALUES ('66666666-0000-0000-0000-000000000001', '2026-10-08 10:00+00')",
    ));
    assert_eq!(err.code().code(), "XX001");
    assert_eq!(
        err.message(),
        "usage_agg: daily_logs row of user 66666666-0000-0000-0000-000000000001 on 2026-10-08 has a corrupted field \"api_call_count\""
    );
    assert_eq!(
        err.detail(),
        Some("field \"api_call_count\" holds \"abc\" where an integer was expected.")
    );
    assert!(err
        .hint()
        .unwrap()
        .contains("rebuild_daily_logs('2026-10-08', '2026-10-08')"));
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.key_usage_logs"),
        0
    );
    // The hint's repair works and keeps the application's key.
    c.batch_execute("SELECT usage_agg.rebuild_daily_logs('2026-10-08', '2026-10-08')")
        .unwrap();
    c.batch_execute(
        "INSERT INTO usage_agg.key_usage_logs (user_id, created_at) VALUES ('66666666-0000-0000-0000-000000000001', '2026-10-08 10:00+00')",
    )
    .unwrap();
    assert_eq!(
        scalar_text(&mut c, "SELECT (log_data->>'api_call_count') || ' ' || (log_data->>'upload_count') FROM usage_agg.daily_logs"),
        Some("1 4".to_string())
    );
}

#[test]
fn day_is_the_calls_own_time_in_the_business_time_zone() {
    let db = TestDb::new("time_zone");
    let mut c = db.connect();
    c.batch_execute(
        "UPDATE usage_agg.config SET timezone = 'Asia/Shanghai';
         SET TimeZone = 'America/New_York';
         INSERT INTO usage_agg.key_usage_logs (user_id, created_at) VALUES
           ('77777777-0000-0000-0000-000000000001', '2026-11-20 17:30:00+00'),
           ('77777777-0000-0000-0000-000000000001', '2026-11-20 15:59:59+00'),
           ('77777777-0000-0000-0000-000000000001', '2024-02-29 03:00:00+00');",
    )
    .unwrap();
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT string_agg(date::text || '=' || (log_data->>'api_call_count'), ',' ORDER BY date) FROM usage_agg.daily_logs"
        ),
        Some("2024-02-29=1,2026-11-20=1,2026-11-21=1".to_string())
    );
    assert_eq!(
        verify(&mut c, "2024-01-01", "2026-12-31"),
        Vec::<String>::new()
    );
}

#[test]
fn extension_tables_are_registered_for_pg_dump() {
    let db = TestDb::new("config_dump");
    let mut c = db.connect();
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT string_agg(c.relname, ',' ORDER BY c.relname)
               FROM pg_extension e, unnest(e.extconfig) AS x(oid) JOIN pg_class c ON c.oid = x.oid
              WHERE e.extname = 'usage_agg'"
        ),
        Some(
            "alerts,alerts_id_seq,config,daily_logs,hourly_logs,key_daily_logs,key_hourly_logs,key_monthly_logs,key_usage_logs,maintenance_runs,model_prices,monthly_logs,pending_deltas,pending_key_deltas,pending_key_deltas_id_seq,pending_key_hour_deltas,quota_plans,quota_usage_logs,quotas,retention_horizon,service_daily_logs,service_monthly_logs,user_limits"
                .to_string()
        )
    );
}

#[test]
fn a_config_change_reaches_sessions_that_cached_it() {
    let db = TestDb::new("config_cache");
    let mut a = db.connect();
    let mut b = db.connect();
    let insert = "INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate, created_at)
                  VALUES ('cccccccc-0000-0000-0000-000000000001', 1, '2026-03-01 20:00+00')";
    // Session a folds (and caches the UTC configuration) ...
    a.batch_execute(insert).unwrap();
    // ... session b moves the business day to Shanghai (UTC+8) and deferred mode ...
    b.batch_execute(
        "UPDATE usage_agg.config SET timezone = 'Asia/Shanghai', fold_mode = 'deferred'",
    )
    .unwrap();
    // ('deferred', the name before 0.3.0, is kept as 'async') ...
    assert_eq!(
        scalar_text(&mut b, "SELECT fold_mode FROM usage_agg.config"),
        Some("async".to_string())
    );
    // ... and a's next single-row insert uses both.
    a.batch_execute(insert).unwrap();
    assert_eq!(
        scalar_text(
            &mut a,
            "SELECT string_agg(day::text, ',') FROM usage_agg.pending_deltas"
        ),
        Some("2026-03-02".to_string())
    );
    // Inside a transaction the change is seen by the very next statement.
    a.batch_execute(&format!(
        "BEGIN; UPDATE usage_agg.config SET fold_mode = 'immediate', timezone = 'UTC'; {insert}; COMMIT;"
    ))
    .unwrap();
    assert_eq!(
        scalar_text(
            &mut a,
            "SELECT string_agg(date::text || '=' || (log_data->>'api_call_count'), ',' ORDER BY date) FROM usage_agg.daily_logs"
        ),
        Some("2026-03-01=2".to_string())
    );
    assert_eq!(
        scalar_i64(&mut a, "SELECT count(*) FROM usage_agg.pending_deltas"),
        1
    );
}
