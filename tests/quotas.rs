//! Quotas over real concurrent connections.
#![cfg(not(feature = "pg_test"))]

mod common;

use std::sync::{Arc, Barrier};
use std::thread;

use common::*;
use postgres::Client;

/// Calls consume_quota until it raises QUOTA_EXCEEDED (or `max_calls` calls);
/// returns the units granted. Any error other than UAQ01 fails the test.
fn hammer(c: &mut Client, user: &str, max_calls: usize) -> i64 {
    count_granted(max_calls, || {
        c.query_one(
            "SELECT monthly_used FROM usage_agg.consume_quota($1::text::uuid)",
            &[&user],
        )
        .map(|_| ())
    })
}

#[test]
fn quota_exceeded_is_uaq01_with_detail_and_hint_and_writes_nothing() {
    let db = TestDb::new("quota_exceeded");
    let mut c = db.connect();
    let user = "a0000000-0000-0000-0000-000000000001";
    let st = c
        .query_one(
            "SELECT membership_level, monthly_quota, monthly_used, remaining, total_used, allowed
               FROM usage_agg.consume_quota($1::text::uuid, 98)",
            &[&user],
        )
        .unwrap();
    assert_eq!(st.get::<_, String>(0), "free");
    assert_eq!(
        (
            st.get::<_, i32>(1),
            st.get::<_, i32>(2),
            st.get::<_, i32>(3)
        ),
        (100, 98, 2)
    );
    assert_eq!((st.get::<_, i64>(4), st.get::<_, bool>(5)), (98, true));

    let reset: String = c
        .query_one(
            "SELECT usage_agg._iso_utc(quota_reset_at) FROM usage_agg.quotas",
            &[],
        )
        .unwrap()
        .get(0);
    let err = db_error(c.query_one(
        "SELECT * FROM usage_agg.consume_quota($1::text::uuid, 3)",
        &[&user],
    ));
    assert_eq!(err.code().code(), "UAQ01");
    assert_eq!(
        err.message(),
        format!("QUOTA_EXCEEDED: user {user} requested 3 but only 2 of 100 remain this month")
    );
    assert_eq!(
        err.detail(),
        Some(format!("requested: 3, remaining: 2, monthly_quota: 100, monthly_used: 98, plan: free, resets at: {reset}").as_str())
    );
    assert_eq!(
        err.hint(),
        Some(format!("Upgrade to plan basic (300 a month), or wait until {reset}.").as_str())
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT monthly_used::int8 FROM usage_agg.quotas"),
        98
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.quota_usage_logs"),
        1
    );

    // try_consume_quota answers instead of raising.
    let st = c
        .query_one(
            "SELECT allowed, remaining FROM usage_agg.try_consume_quota($1::text::uuid, 3)",
            &[&user],
        )
        .unwrap();
    assert_eq!((st.get::<_, bool>(0), st.get::<_, i32>(1)), (false, 2));

    // On the highest plan the hint says so.
    c.execute(
        "SELECT usage_agg.set_membership($1::text::uuid, 'pro')",
        &[&user],
    )
    .unwrap();
    let err = db_error(c.query_one(
        "SELECT * FROM usage_agg.consume_quota($1::text::uuid, 5000)",
        &[&user],
    ));
    assert_eq!(
        err.hint(),
        Some(format!("pro is the highest plan; the quota resets at {reset}.").as_str())
    );
}

#[test]
fn sixty_four_clients_grant_exactly_the_quota() {
    let db = TestDb::new("quota_race_64");
    let user = "a0000000-0000-0000-0000-000000000064";
    let barrier = Arc::new(Barrier::new(64));
    let handles: Vec<_> = (0..64)
        .map(|_| {
            let mut c = db.connect();
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                hammer(&mut c, user, 4)
            })
        })
        .collect();
    let granted: i64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let mut c = db.connect();
    assert_eq!(granted, 100);
    assert_eq!(three_way(&mut c, user, "-infinity"), (100, 100, 100));
    assert_eq!(
        scalar_i64(&mut c, "SELECT total_used FROM usage_agg.quotas"),
        100
    );
}

#[test]
fn calls_racing_the_monthly_reset_count_in_exactly_one_month() {
    let db = TestDb::new("quota_month_race");
    let user = "a0000000-0000-0000-0000-0000000000b0";
    let mut c = db.connect();
    c.execute(
        "SELECT usage_agg.set_membership($1::text::uuid, 'pro')",
        &[&user],
    )
    .unwrap();
    let barrier = Arc::new(Barrier::new(9));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let mut c = db.connect();
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                hammer(&mut c, user, 150)
            })
        })
        .collect();
    barrier.wait();
    thread::sleep(std::time::Duration::from_millis(150));
    // Move the reset instant into the past while the clients hammer. The clock is
    // read under the row lock: calls before it belong to the old month, calls
    // after it to the new one.
    let mut tx = c.transaction().unwrap();
    tx.execute(
        "UPDATE usage_agg.quotas SET quota_reset_at = clock_timestamp() - interval '1 second' WHERE user_id = $1::text::uuid",
        &[&user],
    )
    .unwrap();
    let boundary: String = tx
        .query_one("SELECT clock_timestamp()::text", &[])
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    let granted: i64 = handles.into_iter().map(|h| h.join().unwrap()).sum();

    assert_eq!(granted, 1200);
    let (used, sum, count) = three_way(&mut c, user, &boundary);
    assert_eq!((used, sum), (count, count));
    let before = scalar_i64(
        &mut c,
        &format!("SELECT count(*) FROM usage_agg.quota_usage_logs WHERE created_at < '{boundary}'"),
    );
    assert!(
        before > 0 && count > 0,
        "the reset fell inside the storm: {before} before, {count} after"
    );
    assert_eq!(before + count, 1200);
    assert_eq!(
        scalar_i64(&mut c, "SELECT total_used FROM usage_agg.quotas"),
        1200
    );
    // The new reset instant is the first instant of a later month.
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT to_char(quota_reset_at AT TIME ZONE 'UTC', 'DD HH24:MI:SS') || ' ' || (quota_reset_at > now())::text FROM usage_agg.quotas"
        ),
        Some("01 00:00:00 true".to_string())
    );
}

#[test]
fn a_request_id_charges_once_even_when_racing() {
    let db = TestDb::new("quota_request_id");
    let user = "a0000000-0000-0000-0000-0000000000c0";
    let barrier = Arc::new(Barrier::new(16));
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let mut c = db.connect();
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                let r = c
                    .query_one(
                        "SELECT allowed, replayed, monthly_used FROM usage_agg.consume_quota($1::text::uuid, 7, 'sess', 'req-race')",
                        &[&user],
                    )
                    .unwrap();
                (r.get::<_, bool>(0), r.get::<_, bool>(1), r.get::<_, i32>(2))
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(results.iter().all(|r| r.0 && r.2 == 7), "{results:?}");
    assert_eq!(
        results.iter().filter(|r| !r.1).count(),
        1,
        "exactly one call charged: {results:?}"
    );
    let mut c = db.connect();
    assert_eq!(three_way(&mut c, user, "-infinity"), (7, 7, 1));

    // Another user cannot reuse it.
    assert_eq!(
        sqlstate(c.query_one(
            "SELECT * FROM usage_agg.consume_quota('a0000000-0000-0000-0000-0000000000c1', 1, NULL, 'req-race')",
            &[]
        )),
        "22023"
    );
}

#[test]
fn refunds_racing_consumptions_give_back_exactly_once() {
    let db = TestDb::new("quota_refund_race");
    let user = "a0000000-0000-0000-0000-0000000000d0";
    let mut c = db.connect();
    for i in 0..50 {
        c.execute(
            "SELECT usage_agg.consume_quota($1::text::uuid, 1, NULL, $2)",
            &[&user, &format!("r{i}")],
        )
        .unwrap();
    }
    let barrier = Arc::new(Barrier::new(12));
    let mut handles = Vec::new();
    for t in 0..4 {
        let mut c = db.connect();
        let barrier = barrier.clone();
        handles.push(thread::spawn(move || {
            barrier.wait();
            let mut refunded = 0;
            // Two threads try every refund.
            for i in (t % 2..50).step_by(2) {
                let r = c
                    .query_one(
                        "SELECT allowed FROM usage_agg.refund_quota($1)",
                        &[&format!("r{i}")],
                    )
                    .unwrap();
                if r.get::<_, bool>(0) {
                    refunded += 1;
                }
            }
            (refunded, 0)
        }));
    }
    for _ in 0..8 {
        let mut c = db.connect();
        let barrier = barrier.clone();
        handles.push(thread::spawn(move || {
            barrier.wait();
            (0, hammer(&mut c, user, 20))
        }));
    }
    let (refunded, granted) = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    assert_eq!(refunded, 50);
    let (used, sum, count) = three_way(&mut c, user, "-infinity");
    assert_eq!((used, sum), (count, count));
    assert_eq!(used, granted);
    assert!(used <= 100);
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM usage_agg.quota_usage_logs WHERE refunded_at IS NOT NULL"
        ),
        50
    );
    // A refund again changes nothing.
    let r = c
        .query_one(
            "SELECT allowed, replayed FROM usage_agg.refund_quota('r0')",
            &[],
        )
        .unwrap();
    assert_eq!((r.get::<_, bool>(0), r.get::<_, bool>(1)), (false, true));
    assert_eq!(three_way(&mut c, user, "-infinity").0, used);
}

#[test]
fn membership_changes_keep_what_was_used() {
    let db = TestDb::new("quota_membership");
    let mut c = db.connect();
    let user = "a0000000-0000-0000-0000-0000000000e0";
    c.execute(
        "SELECT usage_agg.consume_quota($1::text::uuid, 90)",
        &[&user],
    )
    .unwrap();
    let r = c
        .query_one("SELECT monthly_quota, monthly_used, remaining FROM usage_agg.set_membership($1::text::uuid, 'pro')", &[&user])
        .unwrap();
    assert_eq!(
        (r.get::<_, i32>(0), r.get::<_, i32>(1), r.get::<_, i32>(2)),
        (3000, 90, 2910)
    );
    c.execute(
        "SELECT usage_agg.consume_quota($1::text::uuid, 200)",
        &[&user],
    )
    .unwrap();
    let r = c
        .query_one("SELECT monthly_quota, monthly_used, remaining FROM usage_agg.set_membership($1::text::uuid, 'basic')", &[&user])
        .unwrap();
    assert_eq!(
        (r.get::<_, i32>(0), r.get::<_, i32>(1), r.get::<_, i32>(2)),
        (300, 290, 10)
    );
    let r = c
        .query_one("SELECT monthly_quota, monthly_used, remaining FROM usage_agg.set_membership($1::text::uuid, 'free')", &[&user])
        .unwrap();
    assert_eq!(
        (r.get::<_, i32>(0), r.get::<_, i32>(1), r.get::<_, i32>(2)),
        (100, 290, 0)
    );
    let s = c
        .query_one(
            "SELECT percent_used::text, low_quota, next_plan, remaining FROM usage_agg.quota_status($1::text::uuid)",
            &[&user],
        )
        .unwrap();
    assert_eq!(s.get::<_, String>(0), "290.00");
    assert!(s.get::<_, bool>(1));
    assert_eq!(s.get::<_, String>(2), "basic");
    assert_eq!(s.get::<_, i32>(3), 0);
    let err = db_error(c.query_one(
        "SELECT * FROM usage_agg.set_membership($1::text::uuid, 'platinum')",
        &[&user],
    ));
    assert_eq!(err.code().code(), "22023");
    assert_eq!(err.message(), "usage_agg: unknown plan 'platinum'");
    assert_eq!(err.hint(), Some("Known plans: free, basic, plus, pro."));
    // A plan's new quota applies to its members at once.
    c.execute(
        "UPDATE usage_agg.quota_plans SET monthly_quota = 500 WHERE membership_level = 'free'",
        &[],
    )
    .unwrap();
    assert_eq!(scalar_i64(&mut c, "SELECT remaining::int8 FROM usage_agg.quota_status('a0000000-0000-0000-0000-0000000000e0')"), 210);
}

#[test]
fn bad_quota_arguments_are_refused_and_change_nothing() {
    let db = TestDb::new("quota_bad_input");
    let mut c = db.connect();
    for sql in [
        "SELECT * FROM usage_agg.consume_quota('a0000000-0000-0000-0000-0000000000f0', 0)",
        "SELECT * FROM usage_agg.consume_quota('a0000000-0000-0000-0000-0000000000f0', -1)",
        "SELECT * FROM usage_agg.consume_quota('a0000000-0000-0000-0000-0000000000f0', 1000001)",
        "SELECT * FROM usage_agg.consume_quota('a0000000-0000-0000-0000-0000000000f0', NULL)",
        "SELECT * FROM usage_agg.consume_quota(NULL)",
        "SELECT * FROM usage_agg.try_consume_quota(NULL, 1)",
        "SELECT * FROM usage_agg.consume_quota('a0000000-0000-0000-0000-0000000000f0', 1, NULL, NULL, -5)",
        "SELECT * FROM usage_agg.quota_status(NULL)",
        "SELECT * FROM usage_agg.set_membership(NULL, 'pro')",
        "SELECT * FROM usage_agg.set_membership('a0000000-0000-0000-0000-0000000000f0', NULL)",
        "SELECT * FROM usage_agg.refund_quota(NULL)",
        "SELECT * FROM usage_agg.refund_quota('never-seen')",
    ] {
        assert_eq!(sqlstate(c.batch_execute(sql)), "22023", "{sql}");
    }
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.quotas"),
        0
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.quota_usage_logs"),
        0
    );
}

#[test]
fn expired_quotas_reset_lazily_and_in_batch() {
    let db = TestDb::new("quota_reset");
    let mut c = db.connect();
    c.batch_execute("UPDATE usage_agg.config SET timezone = 'Asia/Shanghai'")
        .unwrap();
    for i in 0..5 {
        c.execute(
            &format!(
                "SELECT usage_agg.consume_quota('b0000000-0000-0000-0000-00000000000{i}', 10)"
            ),
            &[],
        )
        .unwrap();
    }
    // Reset instants are the first instant of next month in the business time zone.
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT string_agg(DISTINCT to_char(quota_reset_at AT TIME ZONE 'Asia/Shanghai', 'DD HH24:MI:SS'), ',') FROM usage_agg.quotas"
        ),
        Some("01 00:00:00".to_string())
    );
    c.batch_execute(
        "UPDATE usage_agg.quotas SET quota_reset_at = now() - interval '1 hour'
          WHERE user_id IN ('b0000000-0000-0000-0000-000000000000', 'b0000000-0000-0000-0000-000000000001', 'b0000000-0000-0000-0000-000000000002')",
    )
    .unwrap();
    // Lazy: the next call of an expired user starts from zero.
    let r = c
        .query_one("SELECT monthly_used, total_used FROM usage_agg.consume_quota('b0000000-0000-0000-0000-000000000000', 3)", &[])
        .unwrap();
    assert_eq!((r.get::<_, i32>(0), r.get::<_, i64>(1)), (3, 13));
    // Batch: the two other expired users.
    assert_eq!(
        scalar_i64(&mut c, "SELECT usage_agg.reset_expired_quotas()"),
        2
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT usage_agg.reset_expired_quotas()"),
        0
    );
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT string_agg(monthly_used::text, ',' ORDER BY user_id) FROM usage_agg.quotas"
        ),
        Some("3,0,0,10,10".to_string())
    );
}
