//! Timeouts and resource limits an administrator or an application role sets:
//! a fold or an apply they interrupt leaves the detail and the aggregates
//! consistent and says what became of the calls; the background applier is not
//! bound by them.
#![cfg(not(feature = "pg_test"))]

mod common;

use std::time::Duration;

use common::*;
use postgres::Client;

const USER: &str = "dddddddd-0000-0000-0000-000000000001";

fn insert_calls(c: &mut Client, n: i32) {
    c.execute(
        "INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, created_at)
         SELECT $1::text::uuid, 'gpt-4o', 10, 0.01, '2026-07-01 12:00+00'::timestamptz + g * interval '1 second'
           FROM generate_series(1, $2) g",
        &[&USER, &n],
    )
    .unwrap();
}

/// calls and cost of USER's day in daily_logs, or None without a row.
fn day_totals(c: &mut Client) -> Option<String> {
    scalar_text(
        c,
        &format!(
            "SELECT (log_data->>'api_call_count') || ' ' || (log_data->'shared_service_usage'->>'estimated_cost')
               FROM usage_agg.daily_logs WHERE user_id = '{USER}' AND date = '2026-07-01'"
        ),
    )
}

/// A session holding the lock of USER's daily row until it is dropped.
fn lock_daily_row(db: &TestDb) -> Client {
    let mut locker = db.connect();
    locker
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM usage_agg.daily_logs WHERE user_id = '{USER}' AND date = '2026-07-01' FOR UPDATE"
        ))
        .unwrap();
    locker
}

#[test]
fn an_immediate_fold_that_gives_up_on_a_lock_undoes_the_statement_and_says_so() {
    let db = FoldMode::Default.db("limits_immediate");
    let mut c = db.connect();
    insert_calls(&mut c, 3);
    let mut locker = lock_daily_row(&db);

    c.batch_execute("SET lock_timeout = '50ms'").unwrap();
    let r = c.execute(
        "INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate, created_at)
         VALUES ($1::text::uuid, 1, '2026-07-01 13:00+00')",
        &[&USER],
    );
    let err = db_error(r);
    assert_eq!(err.code().code(), "55P03");
    assert_eq!(err.message(), "canceling statement due to lock timeout");
    assert!(
        err.detail()
            .unwrap()
            .contains("The statement was undone as a whole: none of its calls was recorded"),
        "{err:?}"
    );
    assert!(
        err.hint().unwrap().starts_with("Retry the statement."),
        "{err:?}"
    );

    // Same with a statement_timeout, on a correction.
    c.batch_execute("SET lock_timeout = 0; SET statement_timeout = '50ms'")
        .unwrap();
    let err = db_error(c.execute(
        "UPDATE usage_agg.key_usage_logs SET cost_estimate = 2 WHERE user_id = $1::text::uuid",
        &[&USER],
    ));
    assert_eq!(err.code().code(), "57014");
    assert_eq!(
        err.message(),
        "canceling statement due to statement timeout"
    );
    assert!(
        err.detail().unwrap().contains("corrections always"),
        "{err:?}"
    );

    locker.batch_execute("COMMIT").unwrap();
    c.batch_execute("RESET statement_timeout").unwrap();
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.key_usage_logs"),
        3
    );
    assert_eq!(day_totals(&mut c), Some("3 0.03".to_string()));
    assert_eq!(
        verify(&mut c, "2026-07-01", "2026-07-01"),
        Vec::<String>::new()
    );
}

#[test]
fn an_apply_that_gives_up_keeps_its_calls_pending_and_says_so() {
    let db = FoldMode::Async.db("limits_apply");
    let mut c = db.connect();
    insert_calls(&mut c, 2);
    scalar_i64(&mut c, "SELECT usage_agg.apply_pending_deltas()");
    insert_calls(&mut c, 5);
    assert_eq!(pending(&mut c), 5);
    let mut locker = lock_daily_row(&db);

    c.batch_execute("SET lock_timeout = '50ms'").unwrap();
    let err = db_error(c.query_one("SELECT usage_agg.apply_pending_deltas()", &[]));
    assert_eq!(err.code().code(), "55P03");
    assert!(
        err.detail()
            .unwrap()
            .contains("its calls stay in usage_agg.pending_deltas"),
        "{err:?}"
    );
    assert!(err.hint().unwrap().contains("lock_timeout"), "{err:?}");
    // Nothing was lost: the calls still wait, and the readers count them.
    assert_eq!(pending(&mut c), 5);
    assert_eq!(
        scalar_i64(
            &mut c,
            &format!(
                "SELECT calls FROM usage_agg.usage_summary('{USER}', '2026-07-01 18:00+00') WHERE period = 'today'"
            )
        ),
        7
    );

    locker.batch_execute("COMMIT").unwrap();
    assert_eq!(
        scalar_i64(&mut c, "SELECT usage_agg.apply_pending_deltas()"),
        5
    );
    assert_eq!(day_totals(&mut c), Some("7 0.07".to_string()));
    assert_eq!(
        verify(&mut c, "2026-07-01", "2026-07-01"),
        Vec::<String>::new()
    );
}

#[test]
fn a_bulk_load_over_temp_file_limit_records_nothing() {
    let db = FoldMode::Default.db("limits_temp_file");
    let mut c = db.connect();
    insert_calls(&mut c, 3);
    // The statement's transition table spills to a temporary file.
    c.batch_execute("SET work_mem = '64kB'; SET temp_file_limit = '128kB'")
        .unwrap();
    let err = db_error(c.execute(
        "INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate, created_at)
         SELECT $1::text::uuid, 0.01, '2026-07-01 12:00+00'::timestamptz + g * interval '1 ms'
           FROM generate_series(1, 100000) g",
        &[&USER],
    ));
    assert_eq!(err.code().code(), "53400");
    c.batch_execute("RESET work_mem; RESET temp_file_limit")
        .unwrap();
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.key_usage_logs"),
        3
    );
    assert_eq!(pending(&mut c), 0);
    assert_eq!(day_totals(&mut c), Some("3 0.03".to_string()));
}

/// The applier of the database restarts and reconnects, so that settings made
/// with ALTER DATABASE apply to it.
fn restart_applier(c: &mut Client) {
    let first: i32 = c
        .query_one("SELECT applier_pid FROM usage_agg.fold_status", &[])
        .unwrap()
        .get(0);
    c.execute("SELECT pg_terminate_backend($1)", &[&first])
        .unwrap();
    wait_for(c, "the applier to come back", |c| {
        c.query_one(
            "SELECT applier_pid FROM usage_agg.fold_status WHERE applier_running",
            &[],
        )
        .ok()
        .and_then(|r| r.get::<_, Option<i32>>(0))
        .is_some_and(|p| p != first)
    });
}

#[test]
fn the_applier_is_not_bound_by_the_timeouts_of_its_database() {
    let db = TestDb::with_applier("limits_applier");
    let mut admin = db.connect();
    // What a cautious administrator sets for every session of an application
    // database: far too little for a batch of 20,000 pending calls, or for a
    // wait on a daily row a correction holds.
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} SET statement_timeout = '1ms';
             ALTER DATABASE {} SET lock_timeout = '1ms';
             ALTER DATABASE {} SET idle_in_transaction_session_timeout = '200ms'",
            db.name, db.name, db.name
        ))
        .unwrap();
    restart_applier(&mut admin);
    let errors_before = scalar_i64(
        &mut admin,
        "SELECT applier_errors FROM usage_agg.fold_status",
    );

    let mut c = db.connect();
    c.batch_execute(
        "SET statement_timeout = 0; SET lock_timeout = 0; SET idle_in_transaction_session_timeout = 0",
    )
    .unwrap();
    insert_calls(&mut c, 1);
    wait_until_folded(&mut c);
    // 20,000 calls, each a statement of its own, so each is a pending row.
    c.batch_execute(&format!(
        "DO $$ BEGIN FOR i IN 1..20000 LOOP
             INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate, created_at)
             VALUES ('{USER}', 0.01, '2026-07-01 13:00+00');
         END LOOP; END $$"
    ))
    .unwrap();
    wait_until_folded(&mut c);
    assert_eq!(day_totals(&mut c), Some("20001 200.01".to_string()));

    // A transaction holding the daily row: the applier waits for it (past its
    // database's lock_timeout) and folds once it ends.
    // (Its session lifts the database's timeouts first, in a query of its own.)
    let mut locker = db.connect();
    locker
        .batch_execute(
            "SET statement_timeout = 0; SET lock_timeout = 0; SET idle_in_transaction_session_timeout = 0",
        )
        .unwrap();
    locker
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM usage_agg.daily_logs WHERE user_id = '{USER}' AND date = '2026-07-01' FOR UPDATE"
        ))
        .unwrap();
    insert_calls(&mut c, 4);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(pending(&mut c), 4, "the applier cannot fold past the lock");
    locker.batch_execute("COMMIT").unwrap();
    wait_until_folded(&mut c);
    assert_eq!(day_totals(&mut c), Some("20005 200.05".to_string()));
    assert_eq!(
        scalar_i64(&mut c, "SELECT applier_errors FROM usage_agg.fold_status"),
        errors_before,
        "the applier failed a batch"
    );
    assert_eq!(
        verify(&mut c, "2026-07-01", "2026-07-01"),
        Vec::<String>::new()
    );
}
