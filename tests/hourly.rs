//! The hourly tier over real connections: exact numbers across both DST
//! changes of a non-UTC time zone in every mode, single rows, bulk statements,
//! COPY, rollbacks and corrections moving calls between hours, verify and
//! rebuild, retention with exact counts, the readers and their errors.
#![cfg(not(feature = "pg_test"))]

mod common;

use std::io::Write;

use common::*;
use postgres::Client;

const U1: &str = "c1000000-0000-0000-0000-000000000001";
const U2: &str = "c1000000-0000-0000-0000-000000000002";
const K1: &str = "c2000000-0000-0000-0000-000000000001";
const K2: &str = "c2000000-0000-0000-0000-000000000002";

/// Rows of verify_hourly_logs, as "scope id hour field aggregate vs detail".
fn verify_hours(c: &mut Client, from: &str, to: &str) -> Vec<String> {
    c.query(
        "SELECT scope || ' ' || right(id::text, 2) || ' ' || to_char(hour AT TIME ZONE 'UTC', 'MM-DD HH24:MI') || ' '
                || field || ' ' || aggregate_value || ' vs ' || detail_value
           FROM usage_agg.verify_hourly_logs($1::text::date, $2::text::date)",
        &[&from, &to],
    )
    .expect("verify_hourly_logs")
    .iter()
    .map(|r| r.get::<_, String>(0))
    .collect()
}

/// One line per hour of a view's rows for `id`: "UTC start = local start
/// calls/successful/failed/tokens/cost".
fn hours_of(c: &mut Client, view: &str, id_column: &str, id: &str) -> Vec<String> {
    // `view` and `id_column` are constants of this file.
    c.query(
        &format!(
            "SELECT to_char(hour AT TIME ZONE 'UTC', 'MM-DD HH24:MI') || 'Z=' || to_char(local_hour, 'HH24:MI') || ' '
                    || calls || '/' || successful_calls || '/' || failed_calls || '/' || tokens_used || '/' || estimated_cost
               FROM usage_agg.{view} WHERE {id_column} = $1::text::uuid ORDER BY hour"
        ),
        &[&id],
    )
    .unwrap()
    .iter()
    .map(|r| r.get::<_, String>(0))
    .collect()
}

fn user_hours(c: &mut Client, user: &str) -> Vec<String> {
    hours_of(c, "hourly_usage", "user_id", user)
}

fn key_hours(c: &mut Client, key: &str) -> Vec<String> {
    hours_of(c, "key_hourly_usage", "shared_key_id", key)
}

/// Calls around the fall-back night of America/New_York (2026-11-01: 01:00 to
/// 01:59 happens twice, first EDT, then EST): single rows, a multi-row
/// statement, a bulk statement (grouped in Rust), COPY, and a rollback.
fn fall_back_calls(c: &mut Client) -> i64 {
    c.batch_execute(&format!(
        "UPDATE usage_agg.config SET timezone = 'America/New_York';
         INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, tokens_used, cost_estimate, success, created_at)
         VALUES ('{U1}', '{K1}', 10, 0.10, true, '2026-11-01 04:10+00');  -- 00:10 EDT
         INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, tokens_used, cost_estimate, success, created_at)
         VALUES ('{U1}', '{K1}', 20, 0.20, true, '2026-11-01 05:30+00'),   -- 01:30 EDT
                ('{U1}', '{K1}', 30, 0.30, false, '2026-11-01 06:30+00'),  -- 01:30 EST
                ('{U1}', NULL, 40, 0.40, true, '2026-11-01 06:59:59.999999+00');
         INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, tokens_used, cost_estimate, success, created_at)
         VALUES ('{U1}', '{K2}', 50, 0.50, true, '2026-11-01 07:00+00');  -- 02:00 EST
         -- 100 rows, one a minute from 04:50Z: 10 at 00:xx EDT, 60 at 01:xx EDT, 30 at 01:xx EST.
         INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, tokens_used, cost_estimate, success, created_at)
         SELECT '{U2}', '{K1}', 1, 0.001, g % 10 <> 0, TIMESTAMPTZ '2026-11-01 04:50+00' + g * interval '1 minute'
           FROM generate_series(0, 99) g;"
    ))
    .unwrap();
    // Its own batch: a BEGIN would make the statements before it part of the
    // transaction rolled back.
    c.batch_execute(&format!(
        "BEGIN;
         INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, tokens_used, cost_estimate, created_at)
         VALUES ('{U1}', '{K1}', 1000, 10, '2026-11-01 05:40+00');
         ROLLBACK;"
    ))
    .unwrap();
    let mut copy = c
        .copy_in("COPY usage_agg.key_usage_logs (user_id, shared_key_id, tokens_used, cost_estimate, success, created_at) FROM STDIN")
        .unwrap();
    for (i, at) in [
        "2026-11-01 05:59:59+00",
        "2026-11-01 06:00:00+00",
        "2026-11-01 06:00:01+00",
    ]
    .iter()
    .enumerate()
    {
        writeln!(copy, "{U2}\t{K2}\t5\t0.05\t{}\t{at}", i != 1).unwrap();
    }
    copy.finish().unwrap();
    5 + 100 + 3
}

#[test]
fn hours_are_exact_across_a_fall_back_night_in_every_mode() {
    for mode in [FoldMode::Default, FoldMode::Async] {
        let db = mode.db("hourly_fall_back");
        let mut c = db.connect();
        let calls = fall_back_calls(&mut c);
        // Exact before the apply too: the readers add pending calls.
        for settled in [false, true] {
            if settled {
                mode.settle(&mut c, calls);
                assert_eq!(
                    scalar_i64(&mut c, "SELECT usage_agg.apply_pending_deltas()"),
                    0
                );
            }
            assert_eq!(
                user_hours(&mut c, U1),
                [
                    "11-01 04:00Z=00:00 1/1/0/10/0.10",
                    "11-01 05:00Z=01:00 1/1/0/20/0.20",
                    "11-01 06:00Z=01:00 2/1/1/70/0.70",
                    "11-01 07:00Z=02:00 1/1/0/50/0.50",
                ],
                "{mode:?}, settled: {settled}"
            );
            assert_eq!(
                user_hours(&mut c, U2),
                [
                    "11-01 04:00Z=00:00 10/9/1/10/0.010",
                    "11-01 05:00Z=01:00 61/55/6/65/0.110",
                    "11-01 06:00Z=01:00 32/28/4/40/0.130",
                ],
                "{mode:?}, settled: {settled}"
            );
            assert_eq!(
                key_hours(&mut c, K1),
                [
                    "11-01 04:00Z=00:00 11/10/1/20/0.110",
                    "11-01 05:00Z=01:00 61/55/6/80/0.260",
                    "11-01 06:00Z=01:00 31/27/4/60/0.330",
                ],
                "{mode:?}, settled: {settled}"
            );
            assert_eq!(
                key_hours(&mut c, K2),
                [
                    "11-01 05:00Z=01:00 1/1/0/5/0.05",
                    "11-01 06:00Z=01:00 2/1/1/10/0.10",
                    "11-01 07:00Z=02:00 1/1/0/50/0.50",
                ],
                "{mode:?}, settled: {settled}"
            );
            assert_eq!(
                verify_hours(&mut c, "2026-10-31", "2026-11-02"),
                Vec::<String>::new()
            );
        }
        // Nothing waits and the stored rows alone say the same.
        assert_eq!(
            scalar_i64(
                &mut c,
                "SELECT count(*) FROM usage_agg.pending_key_hour_deltas"
            ),
            0
        );
        assert_eq!(
            scalar_i64(&mut c, "SELECT sum(calls)::int8 FROM usage_agg.hourly_logs"),
            calls
        );
        assert_eq!(
            scalar_i64(
                &mut c,
                "SELECT sum(calls)::int8 FROM usage_agg.key_hourly_logs"
            ),
            calls - 1
        );
    }
}

#[test]
fn a_fall_back_day_has_25_hours_and_a_spring_forward_day_23() {
    for mode in [FoldMode::Default, FoldMode::Async] {
        let db = mode.db("hourly_dst_days");
        let mut c = db.connect();
        // One call at half past every hour of both business days, one statement each.
        c.batch_execute(&format!(
            "UPDATE usage_agg.config SET timezone = 'America/New_York';
             INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, tokens_used, created_at)
             SELECT '{U1}', '{K1}', 1, TIMESTAMPTZ '2026-11-01 04:30+00' + g * interval '1 hour'
               FROM generate_series(0, 24) g;
             INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, tokens_used, created_at)
             SELECT '{U1}', '{K1}', 1, TIMESTAMPTZ '2026-03-08 05:30+00' + g * interval '1 hour'
               FROM generate_series(0, 22) g;"
        ))
        .unwrap();
        mode.settle(&mut c, 48);
        for (view, column, id) in [
            ("hourly_usage", "user_id", U1),
            ("key_hourly_usage", "shared_key_id", K1),
        ] {
            let per_day = |c: &mut Client, day: &str| -> String {
                c.query_one(
                    &format!(
                        "SELECT count(*) || ' hours, ' || sum(calls) || ' calls, local '
                                || string_agg(to_char(local_hour, 'HH24'), ',' ORDER BY hour)
                           FROM usage_agg.{view} WHERE {column} = $1::text::uuid AND date = $2::text::date"
                    ),
                    &[&id, &day],
                )
                .unwrap()
                .get(0)
            };
            assert_eq!(
                per_day(&mut c, "2026-11-01"),
                "25 hours, 25 calls, local 00,01,01,02,03,04,05,06,07,08,09,10,11,12,13,14,15,16,17,18,19,20,21,22,23",
                "{mode:?} {view}"
            );
            assert_eq!(
                per_day(&mut c, "2026-03-08"),
                "23 hours, 23 calls, local 00,01,03,04,05,06,07,08,09,10,11,12,13,14,15,16,17,18,19,20,21,22,23",
                "{mode:?} {view}"
            );
        }
        assert_eq!(
            verify_hours(&mut c, "2026-03-01", "2026-11-30"),
            Vec::<String>::new()
        );
    }
}

#[test]
fn corrections_move_calls_between_hours_users_and_keys() {
    for mode in [FoldMode::Default, FoldMode::Async] {
        let db = mode.db("hourly_corrections");
        let mut c = db.connect();
        c.batch_execute(&format!(
            "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, tokens_used, cost_estimate, api_endpoint, created_at)
             VALUES ('{U1}', '{K1}', 10, 1, 'a', '2026-10-10 10:15+00'),
                    ('{U1}', '{K1}', 20, 2, 'b', '2026-10-10 10:45+00'),
                    ('{U1}', '{K1}', 30, 3, 'c', '2026-10-10 11:15+00');"
        ))
        .unwrap();
        // Corrections fold at once in every mode, with the pending calls of their days.
        c.batch_execute(&format!(
            "UPDATE usage_agg.key_usage_logs SET created_at = created_at + interval '1 hour' WHERE api_endpoint = 'a';
             UPDATE usage_agg.key_usage_logs SET user_id = '{U2}', shared_key_id = '{K2}', success = false
              WHERE api_endpoint = 'b';
             DELETE FROM usage_agg.key_usage_logs WHERE api_endpoint = 'c';"
        ))
        .unwrap();
        c.batch_execute("BEGIN; DELETE FROM usage_agg.key_usage_logs; ROLLBACK;")
            .unwrap();
        mode.settle_all(&mut c);
        assert_eq!(
            user_hours(&mut c, U1),
            ["10-10 11:00Z=11:00 1/1/0/10/1"],
            "{mode:?}"
        );
        assert_eq!(
            user_hours(&mut c, U2),
            ["10-10 10:00Z=10:00 1/0/1/20/2"],
            "{mode:?}"
        );
        assert_eq!(
            key_hours(&mut c, K1),
            ["10-10 11:00Z=11:00 1/1/0/10/1"],
            "{mode:?}"
        );
        assert_eq!(
            key_hours(&mut c, K2),
            ["10-10 10:00Z=10:00 1/0/1/20/2"],
            "{mode:?}"
        );
        // The emptied hours are rows of zeros, which the views leave out.
        assert_eq!(
            scalar_i64(
                &mut c,
                "SELECT count(*) FROM usage_agg.hourly_logs WHERE calls = 0"
            ),
            1
        );
        assert_eq!(
            verify_hours(&mut c, "2026-10-01", "2026-10-31"),
            Vec::<String>::new()
        );
    }
}

#[test]
fn verify_reports_a_drifted_hour_and_rebuild_repairs_it() {
    let db = TestDb::new("hourly_verify");
    let mut c = db.connect();
    c.batch_execute(&format!(
        "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, tokens_used, cost_estimate, created_at)
         VALUES ('{U1}', '{K1}', 10, 1, '2026-10-10 10:15+00'), ('{U1}', '{K1}', 20, 2, '2026-10-10 10:45+00');
         SELECT usage_agg.apply_pending_deltas();
         UPDATE usage_agg.hourly_logs SET calls = calls + 1, cost = 2.5;
         DELETE FROM usage_agg.key_hourly_logs;
         INSERT INTO usage_agg.hourly_logs (user_id, hour, calls, successful, tokens, cost)
         VALUES ('{U2}', '2026-10-11 03:00+00', 1, 1, 1, 0);"
    ))
    .unwrap();
    assert_eq!(
        verify_hours(&mut c, "2026-10-01", "2026-10-31"),
        [
            "key 01 10-10 10:00 calls 0 vs 2",
            "key 01 10-10 10:00 successful 0 vs 2",
            "key 01 10-10 10:00 tokens 0 vs 30",
            "key 01 10-10 10:00 cost 0 vs 3",
            "user 01 10-10 10:00 calls 3 vs 2",
            "user 01 10-10 10:00 cost 2.5 vs 3",
            "user 02 10-11 03:00 calls 1 vs 0",
            "user 02 10-11 03:00 successful 1 vs 0",
            "user 02 10-11 03:00 tokens 1 vs 0",
        ]
    );
    c.batch_execute("SELECT usage_agg.rebuild_daily_logs('2026-10-01', '2026-10-31')")
        .unwrap();
    assert_eq!(
        verify_hours(&mut c, "2026-10-01", "2026-10-31"),
        Vec::<String>::new()
    );
    assert_eq!(user_hours(&mut c, U1), ["10-10 10:00Z=10:00 2/2/0/30/3"]);
    assert_eq!(user_hours(&mut c, U2), Vec::<String>::new());
    assert_eq!(key_hours(&mut c, K1), ["10-10 10:00Z=10:00 2/2/0/30/3"]);
    assert_eq!(
        sqlstate(c.query(
            "SELECT * FROM usage_agg.verify_hourly_logs('2026-10-02', '2026-10-01')",
            &[]
        )),
        "22023"
    );
}

#[test]
fn hours_expire_after_hourly_retention_through_run_maintenance() {
    let db = TestDb::new("hourly_retention");
    let mut c = db.connect();
    // Calls 1 hour, 3 days and 5 days ago (all within the detail's 30 days).
    c.batch_execute(&format!(
        "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, created_at)
         SELECT '{U1}', '{K1}', now() - d * interval '1 day' - interval '1 hour'
           FROM unnest(ARRAY[0, 3, 5]) d;"
    ))
    .unwrap();
    // User hours are written at once; key hours wait for an apply.
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.hourly_logs"),
        3
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM usage_agg.pending_key_hour_deltas"
        ),
        3
    );
    c.batch_execute("SELECT usage_agg.apply_pending_deltas()")
        .unwrap();
    // By default hours are kept as long as the detail: nothing goes.
    c.batch_execute("SELECT count(*) FROM usage_agg.run_maintenance()")
        .unwrap();
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.hourly_logs"),
        3
    );
    c.batch_execute("UPDATE usage_agg.config SET hourly_retention = '2 days'")
        .unwrap();
    c.batch_execute("SELECT count(*) FROM usage_agg.run_maintenance()")
        .unwrap();
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT rows FROM usage_agg.maintenance_runs WHERE step = 'cleanup_old_hourly_logs'
              ORDER BY started DESC LIMIT 1"
        ),
        4
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.hourly_logs"),
        1
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.key_hourly_logs"),
        1
    );
    // The detail and the days are untouched.
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.key_usage_logs"),
        3
    );
    assert_eq!(
        sqlstate(c.batch_execute("SELECT usage_agg.cleanup_old_hourly_logs('0 days')")),
        "22023"
    );
    assert_eq!(
        sqlstate(c.batch_execute("UPDATE usage_agg.config SET hourly_retention = '-1 day'")),
        "23514"
    );
}

#[test]
fn recent_hours_returns_every_hour_with_zeros_and_checks_its_arguments() {
    let db = TestDb::new("hourly_recent");
    let mut c = db.connect();
    c.batch_execute(&format!(
        "UPDATE usage_agg.config SET timezone = 'Asia/Kolkata';  -- +05:30: hours start at :30 UTC
         INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, tokens_used, cost_estimate, success, created_at)
         VALUES ('{U1}', '{K1}', 10, 0.1, true, '2026-10-10 08:29+00'),
                ('{U1}', '{K1}', 20, 0.2, false, '2026-10-10 08:30+00'),
                ('{U2}', '{K1}', 30, 0.3, true, '2026-10-10 10:10+00');"
    ))
    .unwrap();
    let recent = |c: &mut Client, function: &str, id: &str| -> Vec<String> {
        c.query(
            &format!(
                "SELECT to_char(hour AT TIME ZONE 'UTC', 'HH24:MI') || 'Z=' || to_char(local_hour, 'HH24:MI') || ' '
                        || calls || '/' || successful_calls || '/' || failed_calls || '/' || tokens_used || '/' || estimated_cost
                   FROM usage_agg.{function}($1::text::uuid, 4, '2026-10-10 10:59+00')"
            ),
            &[&id],
        )
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
    };
    // Pending key hours included (no apply has run).
    assert_eq!(
        recent(&mut c, "key_recent_hours", K1),
        [
            "07:30Z=13:00 1/1/0/10/0.1",
            "08:30Z=14:00 1/0/1/20/0.2",
            "09:30Z=15:00 1/1/0/30/0.3",
            "10:30Z=16:00 0/0/0/0/0",
        ]
    );
    assert_eq!(
        recent(&mut c, "recent_hours", U1),
        [
            "07:30Z=13:00 1/1/0/10/0.1",
            "08:30Z=14:00 1/0/1/20/0.2",
            "09:30Z=15:00 0/0/0/0/0",
            "10:30Z=16:00 0/0/0/0/0",
        ]
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            &format!("SELECT count(*) FROM usage_agg.recent_hours('{U1}')")
        ),
        24
    );
    for (sql, state) in [
        (
            format!("SELECT * FROM usage_agg.recent_hours('{U1}', 0)"),
            "22023",
        ),
        (
            format!("SELECT * FROM usage_agg.recent_hours('{U1}', 8785)"),
            "22023",
        ),
        (
            format!("SELECT * FROM usage_agg.recent_hours('{U1}', NULL)"),
            "22023",
        ),
        (
            format!("SELECT * FROM usage_agg.recent_hours('{U1}', 1, 'infinity')"),
            "22023",
        ),
        (
            "SELECT * FROM usage_agg.key_recent_hours(NULL)".to_string(),
            "22004",
        ),
    ] {
        assert_eq!(sqlstate(c.batch_execute(&sql)), state, "{sql}");
    }
}

#[test]
fn with_hourly_aggregates_off_folds_write_no_hours_and_rebuild_catches_up() {
    let db = TestDb::new("hourly_off");
    let mut c = db.connect();
    c.batch_execute(&format!(
        "SET usage_agg.hourly_aggregates = off;
         INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, created_at)
         SELECT '{U1}', '{K1}', TIMESTAMPTZ '2026-10-10 10:00+00' + g * interval '1 minute' FROM generate_series(0, 99) g;
         SELECT usage_agg.apply_pending_deltas();"
    ))
    .unwrap();
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.hourly_logs")
            + scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.key_hourly_logs")
            + scalar_i64(
                &mut c,
                "SELECT count(*) FROM usage_agg.pending_key_hour_deltas"
            ),
        0
    );
    // Two user and two key hours, each missing its calls and successful calls.
    assert_eq!(
        verify_hours(&mut c, "2026-10-10", "2026-10-10").len(),
        4 * 2
    );
    c.batch_execute("SELECT usage_agg.rebuild_daily_logs('2026-10-10', '2026-10-10')")
        .unwrap();
    assert_eq!(
        user_hours(&mut c, U1),
        [
            "10-10 10:00Z=10:00 60/60/0/0/0",
            "10-10 11:00Z=11:00 40/40/0/0/0"
        ]
    );
}
