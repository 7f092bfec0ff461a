//! Money budgets, threshold alerts and what quota widgets read, over real
//! connections (a listener among them).
#![cfg(not(feature = "pg_test"))]

mod common;

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use common::*;
use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;

/// The alerts recorded, oldest first: "kind threshold period value limit".
fn alerts(c: &mut Client) -> Vec<String> {
    c.query(
        "SELECT kind || ' ' || threshold || ' ' || period || ' ' || value || ' ' || limit_value
           FROM usage_agg.alerts ORDER BY id",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// What a LISTEN usage_agg_alerts connection has received, as
/// "kind threshold period value limit" from each JSON payload.
fn received(listener: &mut Client) -> Vec<String> {
    // A round trip makes the client read what the server has sent.
    listener.batch_execute("SELECT 1").unwrap();
    let mut notifications = listener.notifications();
    let mut out = Vec::new();
    let mut pending = notifications.timeout_iter(Duration::from_millis(500));
    while let Some(n) = pending.next().unwrap() {
        assert_eq!(n.channel(), "usage_agg_alerts");
        let v: serde_json::Value = serde_json::from_str(n.payload()).unwrap();
        out.push(format!(
            "{} {} {} {} {}",
            v["kind"].as_str().unwrap(),
            v["threshold"],
            v["period"].as_str().unwrap(),
            v["value"],
            v["limit"]
        ));
    }
    out
}

fn listen(db: &TestDb) -> Client {
    let mut listener = db.connect();
    listener.batch_execute("LISTEN usage_agg_alerts").unwrap();
    listener
}

/// The first day of the current quota month of a user (the alerts' period).
fn quota_period(c: &mut Client, user: &str) -> String {
    scalar_text(
        c,
        &format!(
            "SELECT (((quota_reset_at AT TIME ZONE usage_agg._timezone()) - interval '1 month')::date)::text
               FROM usage_agg.quotas WHERE user_id = '{user}'"
        ),
    )
    .unwrap()
}

#[test]
fn sixteen_sessions_crossing_at_once_alert_once_per_threshold() {
    let db = TestDb::new("alerts_race");
    let user = "b0000000-0000-0000-0000-000000000016";
    let mut listener = listen(&db);
    let barrier = Arc::new(Barrier::new(16));
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let mut c = db.connect();
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                count_granted(10, || {
                    c.query_one("SELECT usage_agg.consume_quota($1::text::uuid)", &[&user])
                        .map(|_| ())
                })
            })
        })
        .collect();
    let granted: i64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let mut c = db.connect();
    assert_eq!(granted, 100);
    assert_eq!(three_way(&mut c, user, "-infinity"), (100, 100, 100));
    let period = quota_period(&mut c, user);
    // One unit at a time: the 80th unit crosses 80%, the 100th 100%.
    let expected = vec![
        format!("monthly_quota 80 {period} 80 100"),
        format!("monthly_quota 100 {period} 100 100"),
    ];
    assert_eq!(alerts(&mut c), expected);
    assert_eq!(received(&mut listener), expected);
    // Nothing is sent twice.
    assert_eq!(received(&mut listener), Vec::<String>::new());
}

#[test]
fn a_rolled_back_call_alerts_nothing_and_the_next_period_alerts_again() {
    let db = TestDb::new("alerts_rollback");
    let user = "b0000000-0000-0000-0000-0000000000a1";
    let mut listener = listen(&db);
    let mut c = db.connect();
    c.execute(
        "SELECT usage_agg.consume_quota($1::text::uuid, 79)",
        &[&user],
    )
    .unwrap();
    let mut tx = c.transaction().unwrap();
    tx.execute(
        "SELECT usage_agg.consume_quota($1::text::uuid, 5)",
        &[&user],
    )
    .unwrap();
    let inside: i64 = tx
        .query_one("SELECT count(*) FROM usage_agg.alerts", &[])
        .unwrap()
        .get(0);
    assert_eq!(inside, 1);
    tx.rollback().unwrap();
    assert_eq!(alerts(&mut c), Vec::<String>::new());
    assert_eq!(received(&mut listener), Vec::<String>::new());

    // The same crossing, committed: recorded and sent; a try that is refused
    // crosses nothing.
    c.execute(
        "SELECT usage_agg.consume_quota($1::text::uuid, 5)",
        &[&user],
    )
    .unwrap();
    let state: bool = c
        .query_one(
            "SELECT allowed FROM usage_agg.try_consume_quota($1::text::uuid, 50)",
            &[&user],
        )
        .unwrap()
        .get(0);
    assert!(!state);
    let period = quota_period(&mut c, user);
    let first = vec![format!("monthly_quota 80 {period} 84 100")];
    assert_eq!(alerts(&mut c), first);
    assert_eq!(received(&mut listener), first);

    // A refund and a new crossing in the same month: still once.
    c.execute(
        "SELECT usage_agg.consume_quota($1::text::uuid, 1, NULL, 'r-1')",
        &[&user],
    )
    .unwrap();
    c.execute("SELECT usage_agg.refund_quota('r-1')", &[])
        .unwrap();
    c.execute(
        "SELECT usage_agg.consume_quota($1::text::uuid, 1)",
        &[&user],
    )
    .unwrap();
    assert_eq!(alerts(&mut c), first);

    // The next quota month: the recorded alerts are moved back a month (as if
    // recorded then) and the month ends now; crossing again alerts again.
    c.batch_execute(&format!(
        "UPDATE usage_agg.alerts SET period = (period - interval '1 month')::date;
         UPDATE usage_agg.quotas SET quota_reset_at = clock_timestamp() - interval '1 second'
          WHERE user_id = '{user}'"
    ))
    .unwrap();
    c.execute(
        "SELECT usage_agg.consume_quota($1::text::uuid, 90)",
        &[&user],
    )
    .unwrap();
    let period = quota_period(&mut c, user);
    let again = format!("monthly_quota 80 {period} 90 100");
    assert_eq!(alerts(&mut c).last(), Some(&again));
    assert_eq!(alerts(&mut c).len(), 2);
    assert_eq!(received(&mut listener), vec![again]);
}

/// Calls of one user on both sides of a month boundary in Los Angeles:
/// 2026-03-31 23:30 PDT is 2026-04-01 06:30 UTC.
const BOUNDARY_CALLS: &str = "
    INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, created_at) VALUES
        ('b0000000-0000-0000-0000-0000000000b1', 'm', 1, 3.25,  '2026-03-31 23:30-07'),
        ('b0000000-0000-0000-0000-0000000000b1', 'm', 1, 1.50,  '2026-04-01 00:30-07'),
        ('b0000000-0000-0000-0000-0000000000b1', 'm', 1, 2.125, '2026-04-01 10:00-07'),
        ('b0000000-0000-0000-0000-0000000000b2', 'm', 1, 4.00,  '2026-04-01 09:00-07'),
        ('b0000000-0000-0000-0000-0000000000b2', 'm', 1, 1.00,  '2026-04-02 09:00-07');";

fn limit_row(c: &mut Client, user: &str, at: &str) -> String {
    scalar_text(
        c,
        &format!(
            "SELECT concat_ws(' ', membership_level, today_cost, daily_cost_limit, remaining, allowed::text,
                              month_cost, monthly_cost_budget, month_remaining)
               FROM usage_agg.check_usage_limit('{user}', '{at}')"
        ),
    )
    .unwrap()
}

#[test]
fn budgets_are_exact_across_a_month_boundary_in_the_business_time_zone() {
    for mode in [FoldMode::Default, FoldMode::Async] {
        let db = mode.db("budgets_boundary");
        let mut c = db.connect();
        c.batch_execute(
            "UPDATE usage_agg.config SET timezone = 'America/Los_Angeles';
             UPDATE usage_agg.quota_plans SET daily_cost_limit = 10, monthly_cost_budget = 20
              WHERE membership_level = 'free';
             -- An enterprise deal for b2: its own budget, the plan's daily limit.
             INSERT INTO usage_agg.user_limits (user_id, monthly_cost_budget)
             VALUES ('b0000000-0000-0000-0000-0000000000b2', 5);",
        )
        .unwrap();
        c.batch_execute(BOUNDARY_CALLS).unwrap();
        let b1 = "b0000000-0000-0000-0000-0000000000b1";
        let b2 = "b0000000-0000-0000-0000-0000000000b2";
        // Pending calls count (Async) exactly as folded ones (Default).
        let check = |c: &mut Client| {
            assert_eq!(
                limit_row(c, b1, "2026-03-31 23:59-07"),
                "free 3.25 10 6.75 true 3.25 20 16.75"
            );
            assert_eq!(
                limit_row(c, b1, "2026-04-01 12:00-07"),
                "free 3.625 10 6.375 true 3.625 20 16.375",
                "{mode:?}: April starts at midnight in Los Angeles"
            );
            assert_eq!(
                limit_row(c, b2, "2026-04-01 12:00-07"),
                "free 4.00 10 6.00 true 4.00 5 1.00"
            );
            assert_eq!(
                limit_row(c, b2, "2026-04-02 12:00-07"),
                "free 1.00 10 9.00 false 5.00 5 0.00",
                "{mode:?}: the month's budget is spent"
            );
            // A user with no limits anywhere.
            assert_eq!(
                limit_row(
                    c,
                    "b0000000-0000-0000-0000-0000000000ff",
                    "2026-04-02 12:00-07"
                ),
                "free 0 10 10 true 0 20 20"
            );
        };
        check(&mut c);
        if mode == FoldMode::Async {
            assert_eq!(pending(&mut c), 5);
            c.execute("SELECT usage_agg.apply_pending_deltas()", &[])
                .unwrap();
            assert_eq!(pending(&mut c), 0);
            check(&mut c);
        }
        // The fold of the one statement (or of the one apply) took b2's month
        // from 0 to 5.00: both thresholds of its budget of 5 at once, with the
        // value after the step; nobody came near a daily limit of 10.
        assert_eq!(
            alerts(&mut c),
            vec![
                "monthly_budget 80 2026-04-01 5.00 5".to_string(),
                "monthly_budget 100 2026-04-01 5.00 5".to_string()
            ],
            "{mode:?}"
        );
    }
}

#[test]
fn cost_alerts_once_per_day_and_month_in_both_modes_and_none_for_a_rollback() {
    for mode in [FoldMode::Default, FoldMode::Async] {
        let db = mode.db("cost_alerts");
        let mut listener = listen(&db);
        let mut c = db.connect();
        c.batch_execute(
            "UPDATE usage_agg.config SET alert_thresholds = '{50,80,100}';
             UPDATE usage_agg.quota_plans SET daily_cost_limit = 10, monthly_cost_budget = 20
              WHERE membership_level = 'free';",
        )
        .unwrap();
        let user = "b0000000-0000-0000-0000-0000000000c1";
        let insert = |c: &mut Client, cost: &str, at: &str| {
            c.execute(
                "INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, created_at)
                 VALUES ($1::text::uuid, 'm', 1, $2::text::numeric, $3::text::timestamptz)",
                &[&user, &cost, &at],
            )
            .unwrap();
            if mode == FoldMode::Async {
                c.execute("SELECT usage_agg.apply_pending_deltas()", &[])
                    .unwrap();
            }
        };
        // A rolled-back call that would cross 50% of the day alerts nothing.
        let mut tx = c.transaction().unwrap();
        tx.execute(
            "INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, created_at)
             VALUES ($1::text::uuid, 'm', 1, 6, '2026-05-01 08:00+00')",
            &[&user],
        )
        .unwrap();
        tx.rollback().unwrap();
        if mode == FoldMode::Async {
            c.execute("SELECT usage_agg.apply_pending_deltas()", &[])
                .unwrap();
        }
        assert_eq!(alerts(&mut c), Vec::<String>::new());

        insert(&mut c, "4", "2026-05-01 09:00+00");
        insert(&mut c, "4.5", "2026-05-01 10:00+00"); // 8.5 of 10: 50% and 80%
        insert(&mut c, "0.5", "2026-05-01 11:00+00"); // 9.0: nothing new
        insert(&mut c, "2", "2026-05-01 12:00+00"); // 11.0: 100% of the day, 50% of the month
        insert(&mut c, "6", "2026-05-02 09:00+00"); // a new day: 50%; month 17.0: 80%
        insert(&mut c, "1", "2026-04-30 09:00+00"); // April: 10% of its month
        let expected: Vec<String> = [
            "daily_cost 50 2026-05-01 8.5 10",
            "daily_cost 80 2026-05-01 8.5 10",
            "daily_cost 100 2026-05-01 11.0 10",
            "monthly_budget 50 2026-05-01 11.0 20",
            "daily_cost 50 2026-05-02 6 10",
            "monthly_budget 80 2026-05-01 17.0 20",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(alerts(&mut c), expected, "{mode:?}");
        assert_eq!(received(&mut listener), expected, "{mode:?}");
        // A correction that lowers a cost alerts nothing, nor does adding the
        // same again after it.
        c.execute(
            "UPDATE usage_agg.key_usage_logs SET cost_estimate = 1 WHERE created_at = '2026-05-02 09:00+00'",
            &[],
        )
        .unwrap();
        insert(&mut c, "5", "2026-05-02 10:00+00");
        assert_eq!(alerts(&mut c), expected, "{mode:?}");
        assert_eq!(
            verify(&mut c, "2026-04-30", "2026-05-02"),
            Vec::<String>::new()
        );
    }
}

#[test]
fn quota_status_reports_today_and_the_quota_functions_take_named_arguments() {
    let db = TestDb::new("quota_named");
    let mut c = db.connect();
    let user = "b0000000-0000-0000-0000-0000000000d1";
    c.batch_execute(&format!(
        "SELECT usage_agg.set_membership(user_id => '{user}', level => 'basic');
         SELECT usage_agg.consume_quota(user_id => '{user}', amount => 3, request_id => 'n-1');
         SELECT usage_agg.try_consume_quota(user_id => '{user}', amount => 4, session_id => 's', tokens_used => 9);
         SELECT usage_agg.consume_quota('{user}', 5, NULL, 'n-2');
         SELECT usage_agg.refund_quota(request_id => 'n-2');
         -- Consumed yesterday (business day): counted in the month, not today.
         INSERT INTO usage_agg.quota_usage_logs (user_id, membership_level, amount, created_at)
         VALUES ('{user}', 'basic', 11, now() - interval '1 day');"
    ))
    .unwrap();
    assert_eq!(
        scalar_text(
            &mut c,
            &format!(
                "SELECT concat_ws(' ', membership_level, monthly_quota, monthly_used, remaining, total_used,
                                  percent_used, low_quota::text, next_plan, today_used)
                   FROM usage_agg.quota_status(user_id => '{user}')"
            )
        ),
        Some("basic 300 7 293 7 2.33 false plus 7".to_string())
    );
    // Positional calls keep working, and the result is one row.
    assert_eq!(
        scalar_i64(
            &mut c,
            &format!("SELECT count(*) FROM usage_agg.quota_status('{user}')")
        ),
        1
    );
}

#[test]
fn quota_logs_and_alerts_expire_through_run_maintenance() {
    let db = TestDb::new("quota_retention");
    let mut c = db.connect();
    let user = "b0000000-0000-0000-0000-0000000000e1";
    c.batch_execute(&format!(
        "SELECT usage_agg.consume_quota('{user}', 3, NULL, 'today');
         INSERT INTO usage_agg.quota_usage_logs (user_id, membership_level, amount, request_id, created_at) VALUES
             ('{user}', 'free', 1, 'old', now() - interval '100 days'),
             ('{user}', 'free', 1, 'older', now() - interval '200 days'),
             ('{user}', 'free', 1, 'last-month', now() - interval '40 days');
         INSERT INTO usage_agg.alerts (user_id, kind, threshold, period, value, limit_value, at) VALUES
             ('{user}', 'daily_cost', 80, '2025-01-01', 8, 10, now() - interval '500 days'),
             ('{user}', 'daily_cost', 80, '2025-01-02', 8, 10, now() - interval '10 days');"
    ))
    .unwrap();
    // Less than a month would lose what refunds and replays need.
    assert_eq!(
        sqlstate(c.execute("SELECT usage_agg.cleanup_old_quota_logs('30 days')", &[])),
        "22023"
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.quota_usage_logs"),
        4
    );
    let steps: Vec<(String, bool, Option<i64>)> = c
        .query(
            "SELECT step, ok, rows FROM usage_agg.run_maintenance()
              WHERE step IN ('cleanup_old_quota_logs', 'reset_expired_quotas') ORDER BY step",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    // The 100- and 200-day logs (default 90 days) and the 500-day alert
    // (default 400 days).
    assert_eq!(
        steps,
        vec![
            ("cleanup_old_quota_logs".to_string(), true, Some(3)),
            ("reset_expired_quotas".to_string(), true, Some(0))
        ]
    );
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT string_agg(request_id, ',' ORDER BY created_at) FROM usage_agg.quota_usage_logs"
        ),
        Some("last-month,today".to_string())
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.alerts"),
        1
    );
    // The totals stay; an explicit keep goes further.
    assert_eq!(
        scalar_i64(
            &mut c,
            &format!("SELECT total_used FROM usage_agg.quotas WHERE user_id = '{user}'")
        ),
        3
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT usage_agg.cleanup_old_quota_logs('35 days')"),
        1
    );
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT last_success_rows::text FROM usage_agg.maintenance_health WHERE step = 'cleanup_old_quota_logs'"
        ),
        Some("3".to_string())
    );
}

#[test]
fn sixteen_sessions_adding_cost_to_one_day_alert_once_per_threshold() {
    let db = TestDb::new("cost_alerts_race");
    let mut listener = listen(&db);
    let mut c = db.connect();
    c.batch_execute(
        "UPDATE usage_agg.quota_plans SET daily_cost_limit = 10, monthly_cost_budget = 40
          WHERE membership_level = 'free'",
    )
    .unwrap();
    let user = "b0000000-0000-0000-0000-0000000000f1";
    let barrier = Arc::new(Barrier::new(16));
    // 16 sessions, 3 calls each of 0.25, folded by each inserting statement:
    // the day's row lock orders them, so each crossing happens exactly once.
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let mut c = db.connect();
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                for _ in 0..3 {
                    c.execute(
                        "INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, created_at)
                         VALUES ($1::text::uuid, 'm', 1, 0.25, '2026-06-10 12:00+00')",
                        &[&user],
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // 48 calls: 12.00 of 10 for the day (80% at 8.00, 100% at 10.00), 30% of
    // the month.
    let expected = vec![
        "daily_cost 80 2026-06-10 8.00 10".to_string(),
        "daily_cost 100 2026-06-10 10.00 10".to_string(),
    ];
    assert_eq!(alerts(&mut c), expected);
    assert_eq!(received(&mut listener), expected);
    assert_eq!(
        limit_row(&mut c, user, "2026-06-10 23:00+00"),
        "free 12.00 10 0 false 12.00 40 28.00"
    );
}

#[test]
fn two_sessions_adding_cost_to_different_days_of_a_month_see_its_budget_crossed() {
    // Each session's day is below 80% of the month; together they are above.
    // The second session's fold runs while the first has not committed: it
    // waits for it (the month's writers are serialised), then sees its day.
    let db = TestDb::new("cost_alerts_two_days");
    let mut listener = listen(&db);
    let mut c = db.connect();
    c.batch_execute(
        "UPDATE usage_agg.quota_plans SET monthly_cost_budget = 10 WHERE membership_level = 'free'",
    )
    .unwrap();
    let user = "b0000000-0000-0000-0000-0000000000d2";
    let insert = "INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, created_at)
                  VALUES ($1::text::uuid, 'm', 1, 5, $2::text::timestamptz)";
    let (inserted, wait_for_first) = std::sync::mpsc::channel();
    let mut first_client = db.connect();
    let first = thread::spawn(move || {
        let mut tx = first_client.transaction().unwrap();
        tx.execute(insert, &[&user, &"2026-07-01 12:00+00"])
            .unwrap();
        inserted.send(()).unwrap();
        // Long enough for the second session's fold to finish before this
        // commits, were it not made to wait.
        thread::sleep(Duration::from_millis(800));
        tx.commit().unwrap();
    });
    wait_for_first.recv().unwrap();
    let mut second = db.connect();
    second
        .execute(insert, &[&user, &"2026-07-02 12:00+00"])
        .unwrap();
    first.join().unwrap();
    let expected = vec![
        "monthly_budget 80 2026-07-01 10 10".to_string(),
        "monthly_budget 100 2026-07-01 10 10".to_string(),
    ];
    assert_eq!(alerts(&mut c), expected);
    assert_eq!(received(&mut listener), expected);
}
