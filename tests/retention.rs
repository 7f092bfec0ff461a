//! Retention tiers, maintenance and its log, the read API and
//! the BI views, over real connections to the live cluster.
#![cfg(not(feature = "pg_test"))]

mod common;

use std::thread;

use common::*;
use postgres::Client;

const USERS: [&str; 3] = [
    "a0000000-0000-0000-0000-000000000001",
    "a0000000-0000-0000-0000-000000000002",
    "a0000000-0000-0000-0000-000000000003",
];

/// One call per user and day for the last `days` days (day 0 is today), at noon
/// UTC: tokens g, cost 0.001 * g, model m0..m2, two keys, every fourth failed.
/// Each daily row also gets an application key conversation_count = 1.
fn load_history(c: &mut Client, users: &[&str], days: i32) {
    for u in users {
        c.execute(
            "INSERT INTO usage_agg.key_usage_logs (user_id, model_used, shared_key_id, tokens_used, cost_estimate, success, created_at)
             SELECT $1::text::uuid, 'm' || (g % 3), ('b0000000-0000-0000-0000-00000000000' || (g % 2))::uuid,
                    g, 0.001 * g, g % 4 <> 0,
                    date_trunc('day', now(), 'UTC') + interval '12 hours' - g * interval '1 day'
               FROM generate_series(0, $2 - 1) g",
            &[u, &days],
        )
        .unwrap();
    }
    c.batch_execute(
        "UPDATE usage_agg.daily_logs SET log_data = log_data || '{\"conversation_count\": 1}'",
    )
    .unwrap();
}

/// usage_summary as "period calls successful failed tokens cost" lines.
fn summary(c: &mut Client, user: &str, at: Option<&str>) -> Vec<String> {
    let sql = "SELECT period || ' ' || coalesce(calls::text, 'NULL') || ' ' || coalesce(successful::text, 'NULL') || ' '
                      || coalesce(failed::text, 'NULL') || ' ' || coalesce(tokens::text, 'NULL') || ' ' || coalesce(cost::text, 'NULL')
                 FROM usage_agg.usage_summary($1::text::uuid, coalesce($2::text::timestamptz, now()))";
    c.query(sql, &[&user, &at])
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

fn daily_fingerprint(c: &mut Client) -> String {
    scalar_text(
        c,
        "SELECT coalesce(md5(string_agg(user_id::text || date::text || log_data::text, ',' ORDER BY user_id, date)), '')
           FROM usage_agg.daily_logs",
    )
    .unwrap()
}

fn verify_all(c: &mut Client) -> Vec<String> {
    verify(c, "2000-01-01", "2100-01-01")
}

#[test]
fn detail_cleanup_keeps_aggregates_and_daily_rows_roll_into_months() {
    let db = TestDb::new("retention_tiers");
    let mut c = db.connect();
    load_history(&mut c, &USERS, 200);
    let before: Vec<Vec<String>> = USERS.iter().map(|u| summary(&mut c, u, None)).collect();
    // 200 calls, 150 successful, tokens 0+..+199 = 19900, cost 19.900.
    assert_eq!(before[0][2], "all_time 200 150 50 19900 19.900");
    let daily_before = daily_fingerprint(&mut c);

    // Detail: days 0..=30 stay (the day of now() - 30 days is kept whole).
    assert_eq!(
        scalar_i64(&mut c, "SELECT usage_agg.cleanup_old_key_usage_logs()"),
        3 * 169
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.key_usage_logs"),
        3 * 31
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM usage_agg.retention_horizon
              WHERE detail_kept_from = ((now() - interval '30 days') AT TIME ZONE 'UTC')::date
                AND daily_kept_from = '-infinity'"
        ),
        1
    );
    assert_eq!(daily_fingerprint(&mut c), daily_before);
    assert_eq!(verify_all(&mut c), Vec::<String>::new());
    // Rerunning finds nothing to do.
    assert_eq!(
        scalar_i64(&mut c, "SELECT usage_agg.cleanup_old_key_usage_logs()"),
        0
    );
    assert_eq!(daily_fingerprint(&mut c), daily_before);

    // Daily: days 0..=90 stay, 91..199 go into their months.
    assert_eq!(
        scalar_i64(&mut c, "SELECT usage_agg.cleanup_old_daily_logs()"),
        3 * 109
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.daily_logs"),
        3 * 91
    );
    let months = scalar_i64(
        &mut c,
        "SELECT count(DISTINCT date_trunc('month', d)) FROM generate_series(91, 199) g,
                LATERAL (SELECT (date_trunc('day', now(), 'UTC') + interval '12 hours' - g * interval '1 day') AT TIME ZONE 'UTC' AS d) x",
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.monthly_logs"),
        3 * months
    );
    let after: Vec<Vec<String>> = USERS.iter().map(|u| summary(&mut c, u, None)).collect();
    assert_eq!(after, before);
    assert_eq!(verify_all(&mut c), Vec::<String>::new());
    // Application counters roll up too: one conversation per rolled-up day.
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT sum((log_data->>'conversation_count')::bigint)::bigint FROM usage_agg.monthly_logs"
        ),
        3 * 109
    );
    // The BI views see months and days as one series, per model and per key too.
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT sum(calls) || ' ' || sum(successful_calls) || ' ' || sum(failed_calls) || ' ' || sum(tokens_used) || ' ' || sum(estimated_cost)
               FROM usage_agg.monthly_usage WHERE user_id = 'a0000000-0000-0000-0000-000000000001'"
        ),
        Some("200 150 50 19900 19.900".to_string())
    );
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT string_agg(model || '=' || calls || '/' || cost, ' ' ORDER BY model) FROM (
                SELECT model, sum(calls) AS calls, sum(cost) AS cost FROM usage_agg.monthly_usage_by_model
                 WHERE user_id = 'a0000000-0000-0000-0000-000000000002' GROUP BY model) s"
        ),
        // g % 3 = 0: 67 calls, sum of g = 0+3+..+198 = 6633; 1: 67, 6700; 2: 66, 6567.
        Some("m0=67/6.633 m1=67/6.700 m2=66/6.567".to_string())
    );
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT string_agg(shared_key_id || '=' || calls, ' ' ORDER BY shared_key_id) FROM (
                SELECT shared_key_id, sum(calls) AS calls FROM usage_agg.monthly_usage_by_key
                 WHERE user_id = 'a0000000-0000-0000-0000-000000000003' GROUP BY shared_key_id) s"
        ),
        Some(
            "b0000000-0000-0000-0000-000000000000=100 b0000000-0000-0000-0000-000000000001=100"
                .to_string()
        )
    );
    let monthly_before = scalar_text(
        &mut c,
        "SELECT md5(string_agg(user_id::text || month::text || log_data::text, ',' ORDER BY user_id, month)) FROM usage_agg.monthly_logs",
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT usage_agg.cleanup_old_daily_logs()"),
        0
    );
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT md5(string_agg(user_id::text || month::text || log_data::text, ',' ORDER BY user_id, month)) FROM usage_agg.monthly_logs"
        ),
        monthly_before
    );
}

#[test]
fn explicit_keep_and_bad_keep() {
    let db = TestDb::new("retention_keep");
    let mut c = db.connect();
    load_history(&mut c, &USERS[..1], 40);
    for f in ["cleanup_old_key_usage_logs", "cleanup_old_daily_logs"] {
        for keep in ["0", "-1 day"] {
            let err = db_error(c.query_one(
                &format!("SELECT usage_agg.{f}($1::text::interval)"),
                &[&keep],
            ));
            assert_eq!(err.code().code(), "22023", "{f}({keep})");
            assert_eq!(
                err.message(),
                format!("usage_agg: {f} must keep a positive interval")
            );
        }
    }
    // Daily rows whose detail is still there stay, whatever keep says.
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT usage_agg.cleanup_old_daily_logs(interval '5 days')"
        ),
        0
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT usage_agg.cleanup_old_key_usage_logs(interval '10 days')"
        ),
        29
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT usage_agg.cleanup_old_daily_logs(interval '5 days')"
        ),
        29
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.daily_logs"),
        11
    );
    // The horizon never moves back: a longer keep later deletes nothing and
    // verify still skips the expired days.
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT usage_agg.cleanup_old_key_usage_logs(interval '300 days')"
        ),
        0
    );
    assert_eq!(verify_all(&mut c), Vec::<String>::new());
    // rebuild leaves expired days alone (it would otherwise zero them).
    c.execute(
        "SELECT usage_agg.rebuild_daily_logs('2000-01-01', current_date + 1)",
        &[],
    )
    .unwrap();
    assert_eq!(
        summary(&mut c, USERS[0], None)[2],
        "all_time 40 30 10 780 0.780"
    );
}

#[test]
fn late_rows_for_expired_days_are_counted_once() {
    let db = TestDb::new("retention_late_rows");
    let mut c = db.connect();
    load_history(&mut c, &USERS[..1], 200);
    c.execute("SELECT usage_agg.run_maintenance()", &[])
        .unwrap();
    assert_eq!(
        summary(&mut c, USERS[0], None)[2],
        "all_time 200 150 50 19900 19.900"
    );
    // A late row for a day already rolled up lands in a daily row of its own ...
    c.batch_execute(&format!(
        "INSERT INTO usage_agg.key_usage_logs (user_id, tokens_used, cost_estimate, created_at)
         VALUES ('{}', 5, 0.5, date_trunc('day', now(), 'UTC') + interval '12 hours' - interval '150 days')",
        USERS[0]
    ))
    .unwrap();
    assert_eq!(
        summary(&mut c, USERS[0], None)[2],
        "all_time 201 151 50 19905 20.400"
    );
    // ... and the next run adds it to its month and deletes the row and its detail.
    c.execute("SELECT usage_agg.run_maintenance()", &[])
        .unwrap();
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM usage_agg.daily_logs WHERE date < current_date - 91"
        ),
        0
    );
    assert_eq!(
        summary(&mut c, USERS[0], None)[2],
        "all_time 201 151 50 19905 20.400"
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM usage_agg.key_usage_logs WHERE created_at < now() - interval '31 days'"
        ),
        0
    );
}

#[test]
fn cleanups_run_while_sessions_insert() {
    let db = TestDb::new("retention_concurrent");
    let mut c = db.connect();
    load_history(&mut c, &USERS, 120);
    c.batch_execute("UPDATE usage_agg.config SET cleanup_batch_size = 50")
        .unwrap();
    const CLIENTS: usize = 4;
    const CALLS: i32 = 300;
    let writers: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let mut w = db.connect();
            thread::spawn(move || {
                let stmt = w
                    .prepare(
                        "INSERT INTO usage_agg.key_usage_logs (user_id, tokens_used, cost_estimate, created_at)
                         VALUES ($1::text::uuid, 1, 0.01, now() - $2::int * interval '1 day')",
                    )
                    .unwrap();
                for n in 0..CALLS {
                    // Half today, half on days that are being expired and rolled up.
                    let age = if n % 2 == 0 { 0 } else { 35 + (n % 80) };
                    w.execute(&stmt, &[&USERS[(i + n as usize) % 3], &age])
                        .unwrap();
                }
            })
        })
        .collect();
    let mut removed = 0;
    for _ in 0..5 {
        removed += scalar_i64(&mut c, "SELECT usage_agg.cleanup_old_key_usage_logs()");
        removed += scalar_i64(&mut c, "SELECT usage_agg.cleanup_old_daily_logs()");
    }
    for w in writers {
        w.join().unwrap();
    }
    c.execute("SELECT usage_agg.run_maintenance()", &[])
        .unwrap();
    assert!(removed > 0, "the cleanups ran against the inserts");
    assert_eq!(verify_all(&mut c), Vec::<String>::new());
    // Every call counted exactly once, wherever it ended up.
    let calls: i64 = USERS
        .iter()
        .map(|u| {
            scalar_i64(
                &mut c,
                &format!(
                    "SELECT calls FROM usage_agg.usage_summary('{u}') WHERE period = 'all_time'"
                ),
            )
        })
        .sum();
    assert_eq!(calls, 3 * 120 + CLIENTS as i64 * CALLS as i64);
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT sum(estimated_cost)::text FROM usage_agg.monthly_usage"
        ),
        // 3 x (0.001 x (0+..+119)) + 1200 x 0.01
        Some("33.420".to_string())
    );
}

#[test]
fn partitioned_detail_drops_expired_partitions() {
    let db = TestDb::new("retention_partitions");
    let mut c = db.connect();
    load_history(&mut c, &USERS[..2], 200);
    let daily_before = daily_fingerprint(&mut c);
    c.batch_execute(include_str!("../examples/partition_key_usage_logs.sql"))
        .unwrap();
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.key_usage_logs"),
        400
    );
    assert_eq!(daily_fingerprint(&mut c), daily_before);
    let expired_partitions = "SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhrelid
         WHERE i.inhparent = 'usage_agg.key_usage_logs'::regclass
           AND substring(pg_get_expr(p.relpartbound, p.oid) FROM 'TO \\(''([^'']+)''\\)')::timestamptz
               <= date_trunc('day', now() - interval '30 days', 'UTC')";
    let whole_months_expired = scalar_i64(&mut c, expired_partitions);
    assert!(
        whole_months_expired >= 5,
        "200 days back there are at least 5 whole months before the cutoff, found {whole_months_expired}"
    );
    let partitions_before = scalar_i64(
        &mut c,
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'usage_agg.key_usage_logs'::regclass",
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT usage_agg.cleanup_old_key_usage_logs()"),
        2 * 169
    );
    assert_eq!(scalar_i64(&mut c, expired_partitions), 0);
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'usage_agg.key_usage_logs'::regclass"
        ),
        partitions_before - whole_months_expired
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.key_usage_logs"),
        2 * 31
    );
    assert_eq!(daily_fingerprint(&mut c), daily_before);
    assert_eq!(verify_all(&mut c), Vec::<String>::new());
    // The fold goes on working on the partitioned table.
    c.batch_execute(&format!(
        "INSERT INTO usage_agg.key_usage_logs (user_id, tokens_used, cost_estimate) VALUES ('{0}', 7, 1), ('{0}', 1003, 1);
         DELETE FROM usage_agg.key_usage_logs WHERE user_id = '{0}' AND tokens_used = 1003;",
        USERS[0]
    ))
    .unwrap();
    assert_eq!(verify_all(&mut c), Vec::<String>::new());
    assert_eq!(
        summary(&mut c, USERS[0], None)[2],
        "all_time 201 151 50 19907 20.900"
    );
    // So does the pricing trigger.
    c.batch_execute(&format!(
        "INSERT INTO usage_agg.model_prices (model, valid_from, per_call) VALUES ('m-part', '2000-01-01Z', 0.25);
         INSERT INTO usage_agg.key_usage_logs (user_id, model_used, input_tokens) VALUES ('{0}', 'm-part', 3);",
        USERS[0]
    ))
    .unwrap();
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT tokens_used || ' ' || cost_estimate || ' ' || (price_valid_from IS NOT NULL)
               FROM usage_agg.key_usage_logs WHERE model_used = 'm-part'"
        ),
        Some("3 0.25 true".to_string())
    );
    assert_eq!(verify_all(&mut c), Vec::<String>::new());
}

#[test]
fn maintenance_logs_each_step_and_survives_a_failing_step() {
    let db = TestDb::new("retention_maintenance");
    let mut c = db.connect();
    load_history(&mut c, &USERS[..1], 150);
    // A quota whose month is over, for the reset step.
    c.batch_execute(&format!(
        "SELECT usage_agg.consume_quota('{0}', 5);
         UPDATE usage_agg.quotas SET quota_reset_at = now() - interval '1 hour';
         -- An application broke an old daily row: the roll-up cannot add it.
         UPDATE usage_agg.daily_logs SET log_data = jsonb_set(log_data, '{{api_call_count}}', '\"many\"')
          WHERE date = current_date - 120;",
        USERS[0]
    ))
    .unwrap();
    // Hours that started more than detail_retention (30 days) ago, user and
    // key: the calls at noon UTC from 30 or 31 days ago on, by the time of day.
    // (The key hours wait for an apply, which run_maintenance runs first.)
    c.batch_execute("SELECT usage_agg.apply_pending_deltas()")
        .unwrap();
    let expired_hours = scalar_i64(
        &mut c,
        "SELECT (SELECT count(*) FROM usage_agg.hourly_logs WHERE hour < now() - interval '30 days')
              + (SELECT count(*) FROM usage_agg.key_hourly_logs WHERE hour < now() - interval '30 days')",
    );
    assert!(
        expired_hours == 238 || expired_hours == 240,
        "{expired_hours}"
    );
    let runs: Vec<String> = c
        .query(
            "SELECT step || ' ' || ok || ' ' || coalesce(rows::text, 'NULL') || ' ' || coalesce(error, '') FROM usage_agg.run_maintenance()",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        runs,
        vec![
            "post_restore true 0 ".to_string(),
            "apply_pending_deltas true 0 ".to_string(),
            "verify_recent_days true 0 ".to_string(),
            "cleanup_old_key_usage_logs true 119 ".to_string(),
            "cleanup_old_daily_logs false NULL XX001: usage_agg: cannot roll a daily_logs row up into monthly_logs: corrupted field \"api_call_count\"".to_string(),
            format!("cleanup_old_hourly_logs true {expired_hours} "),
            "reset_expired_quotas true 1 ".to_string(),
            "cleanup_old_quota_logs true 0 ".to_string(),
        ]
    );
    // The failed step left nothing half-done.
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.daily_logs"),
        150
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.monthly_logs"),
        0
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.maintenance_runs"),
        8
    );
    let hourly_line = format!("cleanup_old_hourly_logs true {expired_hours} false false");
    let health = |c: &mut Client| -> Vec<String> {
        c.query(
            "SELECT step || ' ' || coalesce(last_run_ok::text, 'NULL') || ' ' || coalesce(last_success_rows::text, 'NULL') || ' ' || overdue
                    || ' ' || (last_error IS NOT NULL)
               FROM usage_agg.maintenance_health",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    assert_eq!(
        health(&mut c),
        vec![
            "post_restore true 0 false false",
            "apply_pending_deltas true 0 false false",
            "verify_recent_days true 0 false false",
            "cleanup_old_key_usage_logs true 119 false false",
            "cleanup_old_daily_logs false NULL true true",
            hourly_line.as_str(),
            "reset_expired_quotas true 1 false false",
            "cleanup_old_quota_logs true 0 false false",
            // No background applier on this cluster, nothing pending.
            "background_fold NULL 0 false false",
            // No price list: calls without a cost are the application's choice.
            "unpriced_calls NULL NULL false false",
        ]
    );
    // Repaired, the next run rolls the days up.
    c.batch_execute(
        "UPDATE usage_agg.daily_logs SET log_data = jsonb_set(log_data, '{api_call_count}', '1')
          WHERE date = current_date - 120",
    )
    .unwrap();
    c.execute("SELECT usage_agg.run_maintenance()", &[])
        .unwrap();
    assert_eq!(
        health(&mut c),
        vec![
            "post_restore true 0 false false",
            "apply_pending_deltas true 0 false false",
            "verify_recent_days true 0 false false",
            "cleanup_old_key_usage_logs true 0 false false",
            "cleanup_old_daily_logs true 59 false false",
            "cleanup_old_hourly_logs true 0 false false",
            "reset_expired_quotas true 0 false false",
            "cleanup_old_quota_logs true 0 false false",
            "background_fold NULL 0 false false",
            "unpriced_calls NULL NULL false false",
        ]
    );
    assert_eq!(
        summary(&mut c, USERS[0], None)[2],
        "all_time 150 112 38 11175 11.175"
    );
}

#[test]
fn without_pg_cron_scheduling_fails_clearly() {
    let db = TestDb::new("retention_no_cron");
    let mut c = db.connect();
    for f in [
        "schedule_maintenance()",
        "unschedule_maintenance()",
        "schedule_apply()",
        "unschedule_apply()",
    ] {
        let err = db_error(c.query_one(&format!("SELECT usage_agg.{f}"), &[]));
        assert_eq!(err.code().code(), "55000", "{f}");
        assert_eq!(
            err.message(),
            "usage_agg: pg_cron is not installed in database \"ua_retention_no_cron\""
        );
        assert_eq!(
            err.detail(),
            Some("pg_cron is loaded and runs jobs from database \"usage_agg_test\" (cron.database_name).")
        );
        assert!(
            err.hint().unwrap().contains("CREATE EXTENSION pg_cron"),
            "{:?}",
            err.hint()
        );
    }
}

#[test]
fn windows_follow_the_business_time_zone() {
    let db = TestDb::new("reads_time_zone");
    let mut c = db.connect();
    let u = USERS[0];
    c.batch_execute(&format!(
        "UPDATE usage_agg.config SET timezone = 'Asia/Shanghai';
         INSERT INTO usage_agg.key_usage_logs (user_id, tokens_used, cost_estimate, success, created_at) VALUES
           ('{u}', 1, 1, true,  '2026-01-31 15:59:59+00'),  -- Jan 31, 23:59:59 in Shanghai
           ('{u}', 2, 2, false, '2026-01-31 16:00:00+00'),  -- Feb 1, 00:00 in Shanghai
           ('{u}', 4, 4, true,  '2026-01-15 00:00:00+00'),
           ('{u}', 8, 8, true,  '2025-12-31 17:00:00+00');  -- Jan 1, 01:00 in Shanghai"
    ))
    .unwrap();
    assert_eq!(
        summary(&mut c, u, Some("2026-01-31 15:59:59.999+00")),
        vec![
            "today 1 1 0 1 1",
            "month 3 3 0 13 13",
            "all_time 3 3 0 13 13"
        ]
    );
    assert_eq!(
        summary(&mut c, u, Some("2026-01-31 16:00:00+00")),
        vec!["today 1 0 1 2 2", "month 1 0 1 2 2", "all_time 4 3 1 15 15"]
    );
    assert_eq!(
        summary(&mut c, u, Some("2025-12-31 15:59:59+00")),
        vec!["today 0 0 0 0 0", "month 0 0 0 0 0", "all_time 0 0 0 0 0"]
    );

    // The daily cost limit of the plan, on the business day.
    let limit = |c: &mut Client, at: &str| -> String {
        scalar_text(
            c,
            &format!(
                "SELECT membership_level || ' ' || today_cost || ' ' || coalesce(daily_cost_limit::text, 'NULL') || ' '
                        || coalesce(remaining::text, 'NULL') || ' ' || allowed
                   FROM usage_agg.check_usage_limit('{u}', '{at}')"
            ),
        )
        .unwrap()
    };
    assert_eq!(
        limit(&mut c, "2026-01-31 16:30+00"),
        "free 2 NULL NULL true"
    );
    c.batch_execute(
        "UPDATE usage_agg.quota_plans SET daily_cost_limit = 3 WHERE membership_level = 'free'",
    )
    .unwrap();
    assert_eq!(limit(&mut c, "2026-01-31 16:30+00"), "free 2 3 1 true");
    assert_eq!(limit(&mut c, "2026-01-31 15:30+00"), "free 1 3 2 true");
    c.batch_execute(&format!(
        "INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate, created_at) VALUES ('{u}', 1.5, '2026-02-01 03:00+00')"
    ))
    .unwrap();
    assert_eq!(limit(&mut c, "2026-01-31 16:30+00"), "free 3.5 3 0 false");
    c.batch_execute(&format!("SELECT usage_agg.set_membership('{u}', 'pro')"))
        .unwrap();
    assert_eq!(
        limit(&mut c, "2026-01-31 16:30+00"),
        "pro 3.5 NULL NULL true"
    );

    // Month ends in New York (UTC-5 in winter), after a rebuild into that zone.
    c.batch_execute(
        "UPDATE usage_agg.config SET timezone = 'America/New_York';
         DELETE FROM usage_agg.daily_logs;
         SELECT usage_agg.rebuild_daily_logs('2025-12-01', '2026-03-01');",
    )
    .unwrap();
    assert_eq!(verify_all(&mut c), Vec::<String>::new());
    // 2026-02-01 03:00Z is Jan 31, 22:00 in New York; 2025-12-31 17:00Z stays in December.
    assert_eq!(
        summary(&mut c, u, Some("2026-02-01 04:59:59+00")),
        vec![
            "today 3 2 1 3 4.5",
            "month 4 3 1 7 8.5",
            "all_time 5 4 1 15 16.5"
        ]
    );
    assert_eq!(
        summary(&mut c, u, Some("2026-02-01 05:00:00+00")),
        vec![
            "today 0 0 0 0 0",
            "month 0 0 0 0 0",
            "all_time 5 4 1 15 16.5"
        ]
    );

    for bad in [
        "SELECT * FROM usage_agg.usage_summary(NULL)".to_string(),
        format!("SELECT * FROM usage_agg.usage_summary('{u}', 'infinity')"),
        format!("SELECT * FROM usage_agg.usage_summary('{u}', NULL)"),
        "SELECT * FROM usage_agg.check_usage_limit(NULL)".to_string(),
        format!("SELECT * FROM usage_agg.check_usage_limit('{u}', '-infinity')"),
    ] {
        assert_eq!(sqlstate(c.query(bad.as_str(), &[])), "22023", "{bad}");
    }
}

#[test]
fn bi_views_show_plain_columns() {
    let db = TestDb::new("reads_views");
    let mut c = db.connect();
    let u = USERS[1];
    c.batch_execute(&format!(
        "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, success, created_at) VALUES
           ('{u}', 'c0000000-0000-0000-0000-000000000001', 'gpt-4o', 100, 0.25, true,  '2026-03-02 10:00+00'),
           ('{u}', 'c0000000-0000-0000-0000-000000000001', 'claude', 50,  0.10, false, '2026-03-02 11:30+00'),
           ('{u}', 'c0000000-0000-0000-0000-000000000002', 'gpt-4o', 10,  0.05, true,  '2026-03-02 12:00+00'),
           ('{u}', NULL, NULL, NULL, NULL, true, '2026-03-05 12:00+00');"
    ))
    .unwrap();
    let rows = |c: &mut Client, sql: &str| -> Vec<String> {
        c.query(sql, &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    assert_eq!(
        rows(
            &mut c,
            "SELECT concat_ws(' ', date, calls, successful_calls, failed_calls, tokens_used, estimated_cost, keys_used, last_api_call_at AT TIME ZONE 'UTC')
               FROM usage_agg.daily_usage ORDER BY date"
        ),
        vec![
            "2026-03-02 3 2 1 160 0.40 2 2026-03-02 12:00:00",
            "2026-03-05 1 1 0 0 0 0 2026-03-05 12:00:00"
        ]
    );
    assert_eq!(
        rows(
            &mut c,
            "SELECT concat_ws(' ', date, model, calls, tokens, cost) FROM usage_agg.daily_usage_by_model ORDER BY date, model"
        ),
        vec!["2026-03-02 claude 1 50 0.10", "2026-03-02 gpt-4o 2 110 0.30"]
    );
    assert_eq!(
        rows(
            &mut c,
            "SELECT concat_ws(' ', date, shared_key_id, calls, tokens, cost) FROM usage_agg.daily_usage_by_key ORDER BY date, shared_key_id"
        ),
        vec![
            "2026-03-02 c0000000-0000-0000-0000-000000000001 2 150 0.35",
            "2026-03-02 c0000000-0000-0000-0000-000000000002 1 10 0.05"
        ]
    );
    assert_eq!(
        rows(
            &mut c,
            "SELECT concat_ws(' ', month, calls, successful_calls, failed_calls, tokens_used, estimated_cost) FROM usage_agg.monthly_usage"
        ),
        vec!["2026-03-01 4 3 1 160 0.40"]
    );
}

#[test]
fn maintenance_finds_drift_in_recent_days_and_repairs_it_when_asked() {
    let db = TestDb::new("drift");
    let mut c = db.connect();
    let u = "d5000000-0000-0000-0000-000000000001";
    c.batch_execute(&format!(
        "INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate) SELECT '{u}', 0.5 FROM generate_series(1, 4);
         INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate, created_at) VALUES ('{u}', 1, now() - interval '5 days');"
    ))
    .unwrap();
    let step = |c: &mut Client| -> String {
        scalar_text(
            c,
            "SELECT r.ok || ' ' || r.rows || ' ' || coalesce(r.error, '-')
               FROM usage_agg.run_maintenance() r WHERE r.step = 'verify_recent_days'",
        )
        .unwrap()
    };
    let health = |c: &mut Client| -> String {
        scalar_text(
            c,
            "SELECT last_run_ok || ' ' || alert FROM usage_agg.maintenance_health WHERE step = 'verify_recent_days'",
        )
        .unwrap()
    };
    assert_eq!(step(&mut c), "true 0 -");
    assert_eq!(health(&mut c), "true false");
    // An aggregate changed behind the fold's back (today), and one outside the
    // checked window (5 days ago), which the nightly check does not look at.
    c.batch_execute(&format!(
        "UPDATE usage_agg.daily_logs SET log_data = jsonb_set(log_data, '{{shared_service_usage,estimated_cost}}', '0')
          WHERE user_id = '{u}'"
    ))
    .unwrap();
    let today = scalar_text(&mut c, "SELECT (now() AT TIME ZONE 'UTC')::date::text").unwrap();
    let from = scalar_text(
        &mut c,
        "SELECT ((now() AT TIME ZONE 'UTC')::date - 1)::text",
    )
    .unwrap();
    let found = format!(
        "drift: 1 field(s) of daily_logs disagree with the detail on {today} (for example {u} {today} shared_service_usage.estimated_cost: 0 in the aggregate, 2.0 in the detail)"
    );
    assert_eq!(
        step(&mut c),
        format!(
            "false 1 {found}; repair with SELECT usage_agg.rebuild_daily_logs('{from}', '{today}')"
        )
    );
    assert_eq!(health(&mut c), "false true");
    // With repair_drift, the next run rebuilds the window and says so.
    c.batch_execute("UPDATE usage_agg.config SET repair_drift = true")
        .unwrap();
    assert_eq!(
        step(&mut c),
        format!("false 1 {found}; repaired by rebuild_daily_logs")
    );
    assert_eq!(step(&mut c), "true 0 -");
    assert_eq!(health(&mut c), "true false");
    assert_eq!(verify(&mut c, &from, &today), Vec::<String>::new());
    // The per-key and service days are checked (and repaired) too.
    c.batch_execute(
        "UPDATE usage_agg.service_daily_logs SET log_data = jsonb_set(log_data, '{total_calls}', '99')
          WHERE date = (now() AT TIME ZONE 'UTC')::date",
    )
    .unwrap();
    assert_eq!(
        step(&mut c),
        format!(
            "false 1 drift: 1 field(s) of the per-key days disagree with the detail on {today} (for example service {today} total_calls: 99 in the aggregate, 4 in the detail); repaired by rebuild_daily_logs"
        )
    );
    assert_eq!(step(&mut c), "true 0 -");
    // The older day is still drifted: only the recent window is checked.
    assert_eq!(verify(&mut c, "2000-01-01", "2100-01-01").len(), 1);
    c.batch_execute("UPDATE usage_agg.config SET verify_recent_days = 0")
        .unwrap();
    assert_eq!(step(&mut c), "true 0 -");
    let err = db_error(c.batch_execute("UPDATE usage_agg.config SET verify_recent_days = 400"));
    assert_eq!(err.code().code(), "23514");
}

#[test]
fn a_cancelled_batched_cleanup_keeps_its_finished_batches() {
    let db = TestDb::new("cleanup_cancel");
    let mut c = db.connect();
    c.batch_execute(
        "UPDATE usage_agg.config SET cleanup_batch_size = 500;
         INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate, created_at)
         SELECT ('d6000000-0000-0000-0000-00000000000' || (g % 5))::uuid, 0.01,
                now() - interval '40 days' - (g % 1000) * interval '1 second'
           FROM generate_series(1, 60000) g;
         INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate)
         SELECT 'd6000000-0000-0000-0000-000000000001', 0.01 FROM generate_series(1, 10);",
    )
    .unwrap();
    let expired = "SELECT count(*) FROM usage_agg.key_usage_logs WHERE created_at < now() - interval '35 days'";
    let aggregates =
        "SELECT sum((log_data->>'api_call_count')::bigint)::int8 FROM usage_agg.daily_logs";
    assert_eq!(scalar_i64(&mut c, aggregates), 60010);

    let mut worker = db.connect();
    let pid: i32 = worker
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let call = thread::spawn(move || {
        worker
            .batch_execute("CALL usage_agg.expire_key_usage_logs()")
            .map_err(|e| e.code().map(|c| c.code().to_string()))
    });
    // Cancelled once a few batches are committed.
    wait_for(&mut c, "the first batches", |c| {
        scalar_i64(c, expired) <= 58000
    });
    assert!(c
        .query_one("SELECT pg_cancel_backend($1)", &[&pid])
        .unwrap()
        .get::<_, bool>(0));
    assert_eq!(
        call.join().unwrap(),
        Err(Some("57014".to_string())),
        "the CALL was cancelled"
    );
    let left = scalar_i64(&mut c, expired);
    assert!(left > 0 && left <= 58000, "{left} expired rows left");
    assert_eq!((60000 - left) % 500, 0, "only whole batches were deleted");
    // Consistent as it stands: aggregates untouched, nothing to verify wrong.
    assert_eq!(scalar_i64(&mut c, aggregates), 60010);
    assert_eq!(verify_all(&mut c), Vec::<String>::new());

    // statement_timeout counts from the CALL: it stops it between batches too.
    c.batch_execute("SET statement_timeout = '300ms'").unwrap();
    let err = db_error(c.batch_execute("CALL usage_agg.expire_key_usage_logs()"));
    assert_eq!(err.code().code(), "57014");
    c.batch_execute("RESET statement_timeout").unwrap();
    let after_timeout = scalar_i64(&mut c, expired);
    assert!(after_timeout <= left && (60000 - after_timeout) % 500 == 0);

    // Run again, it finishes what is left; the days stay summed.
    let removed = call_returning(&mut c, "CALL usage_agg.expire_key_usage_logs(NULL, NULL)");
    assert_eq!(removed, after_timeout);
    assert_eq!(scalar_i64(&mut c, expired), 0);
    assert_eq!(scalar_i64(&mut c, aggregates), 60010);
    assert_eq!(verify_all(&mut c), Vec::<String>::new());
    // The daily roll-up as a procedure, committing per batch.
    c.batch_execute("UPDATE usage_agg.config SET daily_retention = '35 days'")
        .unwrap();
    let old_days = scalar_i64(
        &mut c,
        "SELECT count(*) FROM usage_agg.daily_logs WHERE date < (now() - interval '35 days')::date",
    );
    assert!(old_days >= 5);
    let rolled = call_returning(&mut c, "CALL usage_agg.expire_daily_logs(NULL, NULL)");
    assert_eq!(rolled, old_days);
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT sum((log_data->>'api_call_count')::bigint)::int8 FROM usage_agg.monthly_logs"
        ),
        60000
    );
}

/// Runs a CALL through the simple protocol (its procedure commits) and returns
/// its one INOUT value.
fn call_returning(c: &mut Client, call: &str) -> i64 {
    c.simple_query(call)
        .unwrap()
        .iter()
        .find_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse::<i64>().unwrap()),
            _ => None,
        })
        .expect("the CALL returns its INOUT value")
}
