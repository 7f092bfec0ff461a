//! Asynchronous fold mode (`config.fold_mode = 'async'`, formerly 'deferred'): the same exactness and
//! concurrency guarantees as the immediate fold, with calls pending in
//! `pending_deltas` until `apply_pending_deltas()` folds them, over real
//! connections.
#![cfg(not(feature = "pg_test"))]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use common::*;
use postgres::Client;

const HOT_USER: &str = "d0000000-0000-0000-0000-000000000000";

fn all_time(c: &mut Client, user: &str) -> String {
    scalar_text(
        c,
        &format!(
            "SELECT calls || ' ' || successful || ' ' || failed || ' ' || tokens || ' ' || cost
               FROM usage_agg.usage_summary('{user}', '2026-07-01 23:00+00') WHERE period = 'all_time'"
        ),
    )
    .unwrap()
}

#[test]
fn hot_user_from_many_sessions_with_concurrent_apply_is_exact() {
    let db = FoldMode::Async.db("hot_user");
    const CLIENTS: usize = 16;
    const CALLS: usize = 150;
    let stop = Arc::new(AtomicBool::new(false));
    // Two sessions apply pending calls while the inserts go on.
    let appliers: Vec<_> = (0..2)
        .map(|_| {
            let mut a = db.connect();
            let stop = stop.clone();
            thread::spawn(move || {
                let mut applied = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    applied += scalar_i64(&mut a, "SELECT usage_agg.apply_pending_deltas(500)");
                }
                applied
            })
        })
        .collect();
    let writers: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let mut w = db.connect();
            thread::spawn(move || {
                let stmt = w
                    .prepare(
                        "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, success, created_at)
                         VALUES ($1::text::uuid, $2::text::uuid, $3, 10, 0.001, $4, '2026-07-01 12:00+00')",
                    )
                    .unwrap();
                for n in 0..CALLS {
                    let key = format!("e0000000-0000-0000-0000-{:012}", n % 4);
                    let model = if (i + n) % 3 == 0 { "gpt-4o" } else { "claude" };
                    w.execute(&stmt, &[&HOT_USER, &key, &model, &(n % 10 != 0)])
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let applied: i64 = appliers.into_iter().map(|a| a.join().unwrap()).sum();
    let mut c = db.connect();
    let left = pending(&mut c);
    assert_eq!(
        applied + left,
        (CLIENTS * CALLS) as i64,
        "every call is applied once or still pending"
    );
    // Readers are exact with calls still pending ...
    assert_eq!(all_time(&mut c, HOT_USER), "2400 2160 240 24000 2.400");
    assert_eq!(
        scalar_text(
            &mut c,
            &format!("SELECT today_cost::text FROM usage_agg.check_usage_limit('{HOT_USER}', '2026-07-01 23:00+00')")
        ),
        Some("2.400".to_string())
    );
    assert_eq!(
        verify(&mut c, "2026-07-01", "2026-07-01"),
        Vec::<String>::new()
    );
    // ... and after the rest is applied, daily_logs alone holds it all.
    assert_eq!(
        scalar_i64(&mut c, "SELECT usage_agg.apply_pending_deltas()"),
        left
    );
    assert_eq!(pending(&mut c), 0);
    assert_eq!(
        scalar_text(
            &mut c,
            &format!(
                "SELECT (log_data->>'api_call_count') || ' ' || (log_data->'shared_service_usage'->>'estimated_cost') || ' '
                        || jsonb_array_length(log_data->'shared_service_usage'->'keys_used')
                   FROM usage_agg.daily_logs WHERE user_id = '{HOT_USER}'"
            )
        ),
        Some("2400 2.400 4".to_string())
    );
    assert_eq!(group_by_mismatches(&mut c), 0);
    assert_eq!(
        verify(&mut c, "2026-07-01", "2026-07-01"),
        Vec::<String>::new()
    );
}

#[test]
fn rollback_copy_bulk_and_corrections_stay_exact() {
    let db = FoldMode::Async.db("corrections");
    let mut c = db.connect();
    let u = "d1000000-0000-0000-0000-000000000001";
    let v = "d1000000-0000-0000-0000-000000000002";
    // A rolled-back insert leaves nothing pending.
    c.batch_execute(&format!(
        "BEGIN;
         INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate, created_at) VALUES ('{u}', 100, '2026-07-01 10:00+00');
         ROLLBACK;"
    ))
    .unwrap();
    assert_eq!(pending(&mut c), 0);
    // A small COPY appends row by row; a bulk INSERT ... SELECT is recorded
    // grouped per (user, day, model, key): one row for its 1000 calls.
    let mut copy = c
        .copy_in("COPY usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, created_at) FROM STDIN")
        .unwrap();
    use std::io::Write;
    for i in 0..10 {
        writeln!(copy, "{u}\tgpt-4o\t{i}\t0.5\t2026-07-01 10:{i:02}:00+00").unwrap();
    }
    copy.finish().unwrap();
    assert_eq!(pending(&mut c), 10);
    c.batch_execute(&format!(
        "INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, created_at)
         SELECT '{u}', 'claude', 1, 0.25, '2026-07-01 11:00+00'::timestamptz + g * interval '1 second'
           FROM generate_series(1, 1000) g"
    ))
    .unwrap();
    assert_eq!(pending(&mut c), 1010);
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.pending_deltas"),
        11
    );
    assert_eq!(all_time(&mut c, u), "1010 1010 0 1045 255.00");

    // A call that exists only as a pending row, for a model daily_logs has never
    // seen, is deleted: the correction must take the pending row with it.
    c.batch_execute(&format!(
        "INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, request_id, created_at)
         VALUES ('{u}', 'o1', 7, 3, 'only-pending', '2026-07-01 12:00+00');
         DELETE FROM usage_agg.key_usage_logs WHERE request_id = 'only-pending';"
    ))
    .unwrap();
    assert_eq!(
        verify(&mut c, "2026-07-01", "2026-07-01"),
        Vec::<String>::new()
    );
    // Corrections: a cost fixed, a call moved to another user and day.
    c.batch_execute(&format!(
        "UPDATE usage_agg.key_usage_logs SET cost_estimate = 1.5 WHERE user_id = '{u}' AND tokens_used = 3;
         UPDATE usage_agg.key_usage_logs SET user_id = '{v}', created_at = '2026-06-30 09:00+00'
          WHERE user_id = '{u}' AND tokens_used = 4;"
    ))
    .unwrap();
    assert_eq!(
        verify(&mut c, "2026-06-01", "2026-07-31"),
        Vec::<String>::new()
    );
    assert_eq!(all_time(&mut c, u), "1009 1009 0 1041 255.50");
    assert_eq!(all_time(&mut c, v), "1 1 0 4 0.5");
    c.execute("SELECT usage_agg.apply_pending_deltas()", &[])
        .unwrap();
    assert_eq!(pending(&mut c), 0);
    assert_eq!(
        verify(&mut c, "2026-06-01", "2026-07-31"),
        Vec::<String>::new()
    );
    assert_eq!(group_by_mismatches(&mut c), 0);
    assert_eq!(
        scalar_text(
            &mut c,
            &format!("SELECT string_agg(m, ',' ORDER BY m) FROM usage_agg.daily_logs, jsonb_object_keys(log_data->'shared_service_usage'->'by_model') m WHERE user_id = '{u}'")
        ),
        Some("claude,gpt-4o".to_string())
    );
}

#[test]
fn request_id_races_count_once() {
    let db = FoldMode::Async.db("request_id");
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let mut w = db.connect();
            thread::spawn(move || {
                for n in 0..50 {
                    w.execute(
                        "INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate, request_id, created_at)
                         VALUES ('d2000000-0000-0000-0000-000000000001', 0.1, $1, '2026-07-01 08:00+00')
                         ON CONFLICT (request_id) DO NOTHING",
                        &[&format!("req-{n}")],
                    )
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
        all_time(&mut c, "d2000000-0000-0000-0000-000000000001"),
        "50 50 0 0 5.0"
    );
    assert_eq!(
        verify(&mut c, "2026-07-01", "2026-07-01"),
        Vec::<String>::new()
    );
}

#[test]
fn switching_modes_and_maintenance_keep_totals() {
    let db = FoldMode::Async.db("switch");
    let mut c = db.connect();
    let u = "d3000000-0000-0000-0000-000000000001";
    // Pending calls for today and for a day 120 days back (late data).
    c.batch_execute(&format!(
        "INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate, created_at) VALUES ('{u}', 1, now());
         INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate, created_at) VALUES ('{u}', 2, now() - interval '120 days');
         UPDATE usage_agg.config SET fold_mode = 'immediate';
         INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate, created_at) VALUES ('{u}', 4, now());"
    ))
    .unwrap();
    assert_eq!(pending(&mut c), 2);
    let summary = |c: &mut Client| -> String {
        scalar_text(
            c,
            &format!("SELECT string_agg(period || '=' || calls || '/' || cost, ' ' ORDER BY period) FROM usage_agg.usage_summary('{u}')"),
        )
        .unwrap()
    };
    assert_eq!(summary(&mut c), "all_time=3/7 month=2/5 today=2/5");
    // In immediate mode a correction still takes the pending rows of its day.
    c.batch_execute(&format!(
        "DELETE FROM usage_agg.key_usage_logs WHERE user_id = '{u}' AND cost_estimate = 1"
    ))
    .unwrap();
    assert_eq!(summary(&mut c), "all_time=2/6 month=1/4 today=1/4");
    assert_eq!(pending(&mut c), 1);
    // Maintenance applies the old pending call before rolling its day up.
    let runs: Vec<String> = c
        .query(
            "SELECT step || ' ' || rows FROM usage_agg.run_maintenance() WHERE ok",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        runs,
        vec![
            "post_restore 0",
            "apply_pending_deltas 1",
            "verify_recent_days 0",
            "cleanup_old_key_usage_logs 1",
            "cleanup_old_daily_logs 1",
            "cleanup_old_hourly_logs 1",
            "reset_expired_quotas 0",
            "cleanup_old_quota_logs 0"
        ]
    );
    assert_eq!(pending(&mut c), 0);
    assert_eq!(summary(&mut c), "all_time=2/6 month=1/4 today=1/4");
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.monthly_logs"),
        1
    );
    let err = db_error(c.query_one("SELECT usage_agg.apply_pending_deltas(0)", &[]));
    assert_eq!(err.code().code(), "22023");
    assert_eq!(
        err.message(),
        "usage_agg: apply_pending_deltas needs a positive max_rows"
    );
}
