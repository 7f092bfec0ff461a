//! Per-key and service aggregates over real connections: exact against the
//! detail under concurrent sessions, corrections, rollbacks, COPY and retention,
//! in every mode; reads with fixed numbers; a hot key never makes inserts wait.
#![cfg(not(feature = "pg_test"))]

mod common;

use std::io::Write;
use std::thread;

use common::*;
use postgres::{Client, NoTls};

/// Rows of verify_key_daily_logs, as "key date field aggregate vs detail".
fn verify_keys(c: &mut Client, from: &str, to: &str) -> Vec<String> {
    c.query(
        "SELECT coalesce(shared_key_id::text, 'service') || ' ' || date || ' ' || field || ' '
                || coalesce(aggregate_value::text, 'NULL') || ' vs ' || coalesce(detail_value::text, 'NULL')
           FROM usage_agg.verify_key_daily_logs($1::text::date, $2::text::date)",
        &[&from, &to],
    )
    .expect("verify_key_daily_logs")
    .iter()
    .map(|r| r.get::<_, String>(0))
    .collect()
}

/// (key, day)s where key_daily_usage and a GROUP BY over the detail differ in
/// calls, successes, tokens, cost or distinct users; computed here, not by the
/// extension's verify.
fn key_mismatches(c: &mut Client) -> i64 {
    scalar_i64(
        c,
        "WITH tz AS (SELECT timezone AS name FROM usage_agg.config),
              g AS (SELECT k.shared_key_id, (k.created_at AT TIME ZONE tz.name)::date AS d,
                           count(*) AS calls, count(*) FILTER (WHERE k.success) AS ok,
                           coalesce(sum(k.tokens_used), 0) AS tokens, coalesce(sum(k.cost_estimate), 0) AS cost,
                           count(DISTINCT k.user_id) AS users
                      FROM usage_agg.key_usage_logs k, tz WHERE k.shared_key_id IS NOT NULL GROUP BY 1, 2)
         SELECT count(*) FROM g FULL JOIN usage_agg.key_daily_usage u ON u.shared_key_id = g.shared_key_id AND u.date = g.d
          WHERE coalesce(u.calls, 0) IS DISTINCT FROM coalesce(g.calls, 0)
             OR coalesce(u.successful_calls, 0) IS DISTINCT FROM coalesce(g.ok, 0)
             OR coalesce(u.tokens_used, 0) IS DISTINCT FROM coalesce(g.tokens, 0)
             OR coalesce(u.estimated_cost, 0) IS DISTINCT FROM coalesce(g.cost, 0)
             OR coalesce(u.users, 0) IS DISTINCT FROM coalesce(g.users, 0)",
    )
}

/// Deltas waiting for an apply (statements that folded their own calls).
fn pending_key_rows(c: &mut Client) -> i64 {
    scalar_i64(c, "SELECT count(*) FROM usage_agg.pending_key_deltas")
}

/// One line per (key, day) of key_daily_usage.
fn key_days(c: &mut Client) -> Vec<String> {
    c.query(
        "SELECT right(shared_key_id::text, 2) || ' ' || date || ' ' || calls || '/' || successful_calls || '/'
                || failed_calls || '/' || tokens_used || '/' || estimated_cost || ' users=' || users
                || ' last=' || coalesce(to_char(last_call_at AT TIME ZONE 'UTC', 'HH24:MI'), '-')
                || ' failure=' || coalesce(to_char(last_failure_at AT TIME ZONE 'UTC', 'HH24:MI'), '-')
           FROM usage_agg.key_daily_usage WHERE calls <> 0 OR users <> 0 ORDER BY shared_key_id, date",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get::<_, String>(0))
    .collect()
}

fn key(n: usize) -> String {
    format!("b1000000-0000-0000-0000-{n:012}")
}

fn user(n: usize) -> String {
    format!("b2000000-0000-0000-0000-{n:012}")
}

/// Eight sessions over twenty keys: single and multi-row inserts, bulk, COPY,
/// rollbacks, corrections moving calls between keys, users and days, deletions.
fn hammer(db: &TestDb) -> i64 {
    const SESSIONS: usize = 8;
    let handles: Vec<_> = (0..SESSIONS)
        .map(|s| {
            let mut w = db.connect();
            thread::spawn(move || {
                for n in 0..40usize {
                    let u = user((s + n) % 6);
                    let k = key((s * 7 + n) % 20);
                    match n % 8 {
                        0 => w.batch_execute(&format!(
                            "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, success, created_at)
                             SELECT '{u}', '{k}', 'm' || g, g, 0.01 * g, g <> 2, '2026-10-10 11:00+00' FROM generate_series(1, 3) g"
                        )),
                        1 => w.batch_execute(&format!(
                            "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, api_endpoint, created_at)
                             SELECT '{u}', '{k}', 'bulk', 1, 0.001, 'b-{s}-{n}', '2026-10-09 23:30+00' FROM generate_series(1, 70)"
                        )),
                        2 => w.batch_execute(&format!(
                            "BEGIN; INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, cost_estimate, created_at)
                             VALUES ('{u}', '{k}', 100, '2026-10-10 11:00+00'); ROLLBACK;"
                        )),
                        // moved to another key, user and day
                        3 => w.batch_execute(&format!(
                            "UPDATE usage_agg.key_usage_logs
                                SET shared_key_id = '{k}', user_id = '{}', created_at = created_at - interval '1 day',
                                    cost_estimate = 0.5, success = false
                              WHERE id = (SELECT id FROM usage_agg.key_usage_logs WHERE api_endpoint = 'b-{s}-{}' ORDER BY id LIMIT 1)",
                            user((s + n + 1) % 6),
                            n - 2
                        )),
                        4 => w.batch_execute(&format!(
                            "DELETE FROM usage_agg.key_usage_logs
                              WHERE id = (SELECT id FROM usage_agg.key_usage_logs WHERE api_endpoint = 'b-{s}-{}' ORDER BY id DESC LIMIT 1)",
                            n - 3
                        )),
                        5 => {
                            let mut copy = w
                                .copy_in("COPY usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, success, created_at) FROM STDIN")
                                .unwrap();
                            for i in 0..5 {
                                writeln!(copy, "{u}\t{k}\tcopy\t3\t0.03\t{}\t2026-10-10 13:0{i}:00+00", i != 0).unwrap();
                            }
                            copy.finish().map(|_| ())
                        }
                        // a call without a key: the service counts it, no key does
                        6 => w.batch_execute(&format!(
                            "INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, created_at)
                             VALUES ('{u}', 'nokey', 2, 0.2, '2026-10-10 12:00+00')"
                        )),
                        _ => w
                            .execute(
                                "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, created_at)
                                 VALUES ($1::text::uuid, $2::text::uuid, 'gpt-4o', 7, 0.07, '2026-10-10 12:00+00')",
                                &[&u, &k],
                            )
                            .map(|_| ()),
                    }
                    .unwrap();
                }
            })
        })
        .collect();
    let mut c = db.connect();
    for _ in 0..4 {
        assert_eq!(
            verify_keys(&mut c, "2026-10-01", "2026-10-31"),
            Vec::<String>::new()
        );
        assert_eq!(hourly_mismatches(&mut c), 0);
        thread::sleep(std::time::Duration::from_millis(100));
    }
    for h in handles {
        h.join().unwrap();
    }
    // 8 sessions x 5 rounds x (3 + 70 + 5 + 1) keyed calls, less one deletion a round.
    (SESSIONS * 5 * (3 + 70 + 5 + 1) - SESSIONS * 5) as i64
}

fn assert_keys_exact(c: &mut Client, keyed_calls: i64) {
    assert_eq!(
        verify_keys(c, "2026-10-01", "2026-10-31"),
        Vec::<String>::new()
    );
    assert_eq!(key_mismatches(c), 0);
    assert_eq!(hourly_mismatches(c), 0);
    assert_eq!(
        scalar_i64(c, "SELECT sum(calls)::int8 FROM usage_agg.key_daily_usage"),
        keyed_calls
    );
    // The service: every call, 8 x 5 of them without a key.
    assert_eq!(
        scalar_i64(
            c,
            "SELECT sum(calls)::int8 FROM usage_agg.service_daily_usage"
        ),
        keyed_calls + 8 * 5
    );
    assert_eq!(
        scalar_i64(
            c,
            "SELECT count(DISTINCT shared_key_id) FROM usage_agg.key_daily_usage"
        ),
        20
    );
}

#[test]
fn eight_sessions_over_twenty_keys_stay_exact_while_the_applier_runs() {
    let db = TestDb::with_applier("keys_sessions_applier");
    let keyed = hammer(&db);
    let mut c = db.connect();
    assert_keys_exact(&mut c, keyed);
    wait_until_folded(&mut c);
    wait_for(&mut c, "the applier to fold the per-key deltas", |c| {
        pending_key_rows(c) == 0
    });
    assert_keys_exact(&mut c, keyed);
    // Stored rows alone, nothing pending: the same numbers.
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT sum((log_data->>'total_calls')::bigint)::int8 FROM usage_agg.key_daily_logs"
        ),
        keyed
    );
}

#[test]
fn eight_sessions_over_twenty_keys_stay_exact_folding_immediately() {
    let db = TestDb::new("keys_sessions_immediate");
    let keyed = hammer(&db);
    let mut c = db.connect();
    // Nothing applied yet: the per-key rows are all in pending_key_deltas.
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.key_daily_logs"),
        0
    );
    assert!(pending_key_rows(&mut c) > 0);
    assert_keys_exact(&mut c, keyed);
    scalar_i64(&mut c, "SELECT usage_agg.apply_pending_deltas()");
    assert_eq!(pending_key_rows(&mut c), 0);
    assert_keys_exact(&mut c, keyed);
}

/// Fixed calls on 2026-10-20 (UTC), two keys, three users.
fn fixed_calls(c: &mut Client) {
    c.batch_execute(&format!(
        "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, success, request_id, created_at) VALUES
            ('{u1}', '{k1}', 'gpt-4o', 100, 0.010, true,  'r1', '2026-10-20 08:00+00'),
            ('{u1}', '{k1}', 'gpt-4o', 200, 0.020, false, 'r2', '2026-10-20 09:00+00'),
            ('{u2}', '{k1}', 'claude', 300, 0.030, true,  'r3', '2026-10-20 10:00+00'),
            ('{u2}', '{k2}', 'claude', 400, 0.040, true,  'r4', '2026-10-20 11:00+00'),
            ('{u3}', NULL,   'gpt-4o', 500, 0.050, false, 'r5', '2026-10-20 12:00+00'),
            ('{u3}', '{k2}', 'claude', 600, 0.060, false, 'r6', '2026-10-19 12:00+00');",
        u1 = user(1),
        u2 = user(2),
        u3 = user(3),
        k1 = key(1),
        k2 = key(2)
    ))
    .unwrap();
}

fn summary(c: &mut Client, k: &str) -> Vec<String> {
    c.query(
        "SELECT period || ' ' || calls || '/' || successful || '/' || failed || ' rate=' || coalesce(failure_rate::text, '-')
                || ' tokens=' || tokens || ' cost=' || cost || ' users=' || coalesce(users::text, '-')
           FROM usage_agg.key_usage_summary($1::text::uuid, '2026-10-20 18:00+00')",
        &[&k],
    )
    .unwrap()
    .iter()
    .map(|r| r.get::<_, String>(0))
    .collect()
}

fn overview(c: &mut Client) -> Vec<String> {
    c.query(
        "SELECT period || ' ' || calls || '/' || successful || '/' || failed || ' tokens=' || tokens
                || ' cost=' || cost || ' active=' || coalesce(active_users::text, '-')
           FROM usage_agg.usage_overview('2026-10-20 18:00+00')",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get::<_, String>(0))
    .collect()
}

#[test]
fn reads_return_the_exact_numbers_in_both_modes() {
    for mode in [FoldMode::Default, FoldMode::Async] {
        let db = mode.db("keys_reads");
        let mut c = db.connect();
        fixed_calls(&mut c);
        for round in ["before apply", "after apply"] {
            assert_eq!(
                summary(&mut c, &key(1)),
                vec![
                    "today 3/2/1 rate=0.3333 tokens=600 cost=0.060 users=2",
                    "month 3/2/1 rate=0.3333 tokens=600 cost=0.060 users=-",
                    "all_time 3/2/1 rate=0.3333 tokens=600 cost=0.060 users=-",
                ],
                "{mode:?}, {round}"
            );
            assert_eq!(
                summary(&mut c, &key(2)),
                vec![
                    "today 1/1/0 rate=0.0000 tokens=400 cost=0.040 users=1",
                    "month 2/1/1 rate=0.5000 tokens=1000 cost=0.100 users=-",
                    "all_time 2/1/1 rate=0.5000 tokens=1000 cost=0.100 users=-",
                ],
                "{mode:?}, {round}"
            );
            assert_eq!(
                overview(&mut c),
                vec![
                    "today 5/3/2 tokens=1500 cost=0.150 active=3",
                    "month 6/3/3 tokens=2100 cost=0.210 active=-",
                    "all_time 6/3/3 tokens=2100 cost=0.210 active=-",
                ],
                "{mode:?}, {round}"
            );
            assert_eq!(
                key_days(&mut c),
                vec![
                    "01 2026-10-20 3/2/1/600/0.060 users=2 last=10:00 failure=09:00",
                    "02 2026-10-19 1/0/1/600/0.060 users=1 last=12:00 failure=12:00",
                    "02 2026-10-20 1/1/0/400/0.040 users=1 last=11:00 failure=-",
                ],
                "{mode:?}, {round}"
            );
            assert_eq!(
                c.query(
                    "SELECT right(shared_key_id::text, 2) || ' ' || model || ' ' || calls || '/' || failed_calls || '/' || tokens_used || '/' || estimated_cost
                       FROM usage_agg.key_daily_usage_by_model WHERE date = '2026-10-20' ORDER BY 1",
                    &[]
                )
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>(),
                vec!["01 claude 1/0/300/0.030", "01 gpt-4o 2/1/300/0.030", "02 claude 1/0/400/0.040"],
                "{mode:?}, {round}"
            );
            assert_eq!(
                scalar_text(
                    &mut c,
                    "SELECT string_agg(right(shared_key_id::text, 2) || ' ' || month || ' ' || calls || '/' || failed_calls || '/' || estimated_cost, '; ' ORDER BY shared_key_id)
                       FROM usage_agg.key_monthly_usage"
                ),
                Some("01 2026-10-01 3/1/0.060; 02 2026-10-01 2/1/0.100".to_string()),
                "{mode:?}, {round}"
            );
            scalar_i64(&mut c, "SELECT usage_agg.apply_pending_deltas()");
        }
        // The health view exists for every key ever seen; its today is now().
        assert_eq!(
            scalar_text(
                &mut c,
                "SELECT string_agg(right(shared_key_id::text, 2) || ' today=' || calls_today || ' month=' || calls_this_month
                        || ' last=' || to_char(last_call_at AT TIME ZONE 'UTC', 'MM-DD HH24:MI')
                        || ' failure=' || to_char(last_failure_at AT TIME ZONE 'UTC', 'MM-DD HH24:MI'), '; ' ORDER BY shared_key_id)
                   FROM usage_agg.key_health"
            ),
            Some("01 today=0 month=0 last=10-20 10:00 failure=10-20 09:00; 02 today=0 month=0 last=10-20 11:00 failure=10-19 12:00".to_string()),
            "{mode:?}"
        );
        assert_eq!(
            sqlstate(c.query("SELECT * FROM usage_agg.key_usage_summary(NULL)", &[])),
            "22004"
        );
        assert_eq!(
            sqlstate(c.query("SELECT * FROM usage_agg.usage_overview('infinity')", &[])),
            "22023"
        );
    }
}

#[test]
fn corrections_move_calls_users_and_times_between_keys() {
    for mode in [FoldMode::Default, FoldMode::Async] {
        let db = mode.db("keys_corrections");
        let mut c = db.connect();
        fixed_calls(&mut c);
        scalar_i64(&mut c, "SELECT usage_agg.apply_pending_deltas()");
        // u1's failed 09:00 call moves to key 2 (and succeeds); u2's only call
        // with key 1 is deleted: key 1 keeps u1 alone, its last failure is gone.
        c.batch_execute(&format!(
            "UPDATE usage_agg.key_usage_logs SET shared_key_id = '{}', success = true WHERE request_id = 'r2';
             DELETE FROM usage_agg.key_usage_logs WHERE request_id = 'r3';",
            key(2)
        ))
        .unwrap();
        let expected = vec![
            "01 2026-10-20 1/1/0/100/0.010 users=1 last=08:00 failure=-",
            "02 2026-10-19 1/0/1/600/0.060 users=1 last=12:00 failure=12:00",
            "02 2026-10-20 2/2/0/600/0.060 users=2 last=11:00 failure=-",
        ];
        assert_eq!(key_days(&mut c), expected, "{mode:?}, before apply");
        assert_eq!(
            verify_keys(&mut c, "2026-10-01", "2026-10-31"),
            Vec::<String>::new()
        );
        scalar_i64(&mut c, "SELECT usage_agg.apply_pending_deltas()");
        assert_eq!(pending_key_rows(&mut c), 0);
        assert_eq!(key_days(&mut c), expected, "{mode:?}, after apply");
        // The stored row itself, not only the view.
        assert_eq!(
            scalar_text(
                &mut c,
                &format!("SELECT (log_data->>'users') || ' ' || coalesce(log_data->>'last_failure_at', 'null') || ' ' || (log_data->>'last_call_at')
                            FROM usage_agg.key_daily_logs WHERE shared_key_id = '{}' AND date = '2026-10-20'", key(1))
            ),
            Some("1 null 2026-10-20T08:00:00Z".to_string())
        );
        // A user's last call with a key removed: the key's users drop to zero.
        c.batch_execute("DELETE FROM usage_agg.key_usage_logs WHERE request_id = 'r1'")
            .unwrap();
        scalar_i64(&mut c, "SELECT usage_agg.apply_pending_deltas()");
        assert_eq!(
            scalar_text(
                &mut c,
                &format!("SELECT calls || ' ' || users || ' ' || coalesce(last_call_at::text, 'none') FROM usage_agg.key_daily_usage
                           WHERE shared_key_id = '{}' AND date = '2026-10-20'", key(1))
            ),
            Some("0 0 none".to_string())
        );
        // A call moved to another day moves the service's active users too.
        c.batch_execute("UPDATE usage_agg.key_usage_logs SET created_at = '2026-10-19 13:00+00' WHERE request_id = 'r5'")
            .unwrap();
        assert_eq!(
            overview(&mut c)[0],
            "today 2/2/0 tokens=600 cost=0.060 active=2",
            "{mode:?}"
        );
        assert_eq!(
            verify_keys(&mut c, "2026-10-01", "2026-10-31"),
            Vec::<String>::new()
        );
        scalar_i64(&mut c, "SELECT usage_agg.apply_pending_deltas()");
        assert_eq!(
            verify_keys(&mut c, "2026-10-01", "2026-10-31"),
            Vec::<String>::new()
        );
        assert_eq!(key_mismatches(&mut c), 0);
    }
}

#[test]
fn verify_reports_a_drifted_key_row_and_rebuild_repairs_it() {
    let db = TestDb::new("keys_drift");
    let mut c = db.connect();
    fixed_calls(&mut c);
    scalar_i64(&mut c, "SELECT usage_agg.apply_pending_deltas()");
    c.batch_execute(&format!(
        "UPDATE usage_agg.key_daily_logs SET log_data = jsonb_set(log_data, '{{total_calls}}', '9')
          WHERE shared_key_id = '{}' AND date = '2026-10-20'",
        key(1)
    ))
    .unwrap();
    assert_eq!(
        verify_keys(&mut c, "2026-10-01", "2026-10-31"),
        vec![format!("{} 2026-10-20 total_calls 9 vs 3", key(1))]
    );
    // The users' rows were right: none of them is rewritten.
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT usage_agg.rebuild_daily_logs('2026-10-20', '2026-10-20')"
        ),
        0
    );
    assert_eq!(
        verify_keys(&mut c, "2026-10-01", "2026-10-31"),
        Vec::<String>::new()
    );
    assert_eq!(
        sqlstate(c.query(
            "SELECT * FROM usage_agg.verify_key_daily_logs('2026-10-02', '2026-10-01')",
            &[]
        )),
        "22023"
    );
}

#[test]
fn key_days_roll_up_into_months_with_retention() {
    let db = TestDb::new("keys_retention");
    let mut c = db.connect();
    // 2026-01: 31 days x 2 keys x 2 calls (one failed), 3 users; long expired.
    c.batch_execute(&format!(
        "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, success, created_at)
         SELECT ('b2000000-0000-0000-0000-00000000000' || (g % 3))::uuid,
                CASE WHEN g % 2 = 0 THEN '{k1}'::uuid ELSE '{k2}'::uuid END,
                'm', 10, 0.001, g % 4 < 2, TIMESTAMPTZ '2026-01-01 12:00+00' + (g / 4) * interval '1 day'
           FROM generate_series(0, 123) g;
         INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, cost_estimate, created_at)
         VALUES ('{u}', '{k1}', 1, now());",
        k1 = key(1),
        k2 = key(2),
        u = user(1)
    ))
    .unwrap();
    scalar_i64(&mut c, "SELECT usage_agg.apply_pending_deltas()");
    let before_all_time = summary_all_time(&mut c, &key(1));
    assert_eq!(before_all_time, "63/32/31 cost=1.062");
    c.batch_execute("SELECT count(*) FROM usage_agg.run_maintenance()")
        .unwrap();
    // January is gone from the detail and from the daily tiers; today stays.
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM usage_agg.key_daily_logs WHERE date < '2026-02-01'"
        ),
        0
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM usage_agg.service_daily_logs WHERE date < '2026-02-01'"
        ),
        0
    );
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT string_agg(right(shared_key_id::text, 2) || ' ' || month || ' ' || (log_data->>'total_calls') || '/'
                    || (log_data->>'failed_calls') || '/' || (log_data->>'tokens_used') || '/' || (log_data->>'estimated_cost')
                    || ' users=' || coalesce(log_data->>'users', 'absent')
                    || ' last=' || (log_data->>'last_call_at'), '; ' ORDER BY shared_key_id)
               FROM usage_agg.key_monthly_logs"
        ),
        Some("01 2026-01-01 62/31/620/0.062 users=absent last=2026-01-31T12:00:00Z; 02 2026-01-01 62/31/620/0.062 users=absent last=2026-01-31T12:00:00Z".to_string())
    );
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT month || ' ' || (log_data->>'total_calls') || ' ' || (log_data->'by_model'->'m'->>'failed')
               FROM usage_agg.service_monthly_logs"
        ),
        Some("2026-01-01 124 62".to_string())
    );
    assert_eq!(summary_all_time(&mut c, &key(1)), before_all_time);
    assert_eq!(
        scalar_text(&mut c, "SELECT string_agg(calls::text, ',' ORDER BY month) FROM usage_agg.service_monthly_usage"),
        Some("124,1".to_string())
    );
}

fn summary_all_time(c: &mut Client, k: &str) -> String {
    scalar_text_with(
        c,
        "SELECT calls || '/' || successful || '/' || failed || ' cost=' || cost
           FROM usage_agg.key_usage_summary($1::text::uuid) WHERE period = 'all_time'",
        k,
    )
}

fn scalar_text_with(c: &mut Client, sql: &str, arg: &str) -> String {
    c.query_one(sql, &[&arg]).unwrap().get(0)
}

/// A hot key: one session holds an open transaction that inserted calls with
/// it, another holds an apply open (which locked the key's row); inserts with
/// the same key from other sessions go through at once in every mode.
#[test]
fn a_hot_key_never_makes_inserts_wait() {
    for mode in [FoldMode::Default, FoldMode::Async] {
        let db = mode.db("keys_hot");
        let mut c = db.connect();
        let k = key(9);
        c.execute(
            "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, cost_estimate) VALUES ($1::text::uuid, $2::text::uuid, 1)",
            &[&user(1), &k],
        )
        .unwrap();
        let mut holder = db.connect();
        holder
            .batch_execute(&format!(
                "BEGIN; INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, cost_estimate) VALUES ('{}', '{k}', 1);",
                user(2)
            ))
            .unwrap();
        let mut applier = db.connect();
        applier
            .batch_execute("BEGIN; SELECT usage_agg.apply_pending_deltas();")
            .unwrap();
        assert_eq!(
            scalar_i64(
                &mut applier,
                &format!(
                    "SELECT count(*) FROM usage_agg.key_daily_logs WHERE shared_key_id = '{k}'"
                )
            ),
            1,
            "the apply wrote (and holds) the key's row"
        );
        let mut other = Client::connect(&db.dsn(), NoTls).unwrap();
        other.batch_execute("SET lock_timeout = '2s'").unwrap();
        for u in 3..8 {
            other
                .execute(
                    "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, cost_estimate) VALUES ($1::text::uuid, $2::text::uuid, 1)",
                    &[&user(u), &k],
                )
                .unwrap_or_else(|e| panic!("{mode:?}: an insert with the hot key waited: {e}"));
        }
        applier.batch_execute("COMMIT").unwrap();
        holder.batch_execute("COMMIT").unwrap();
        scalar_i64(&mut c, "SELECT usage_agg.apply_pending_deltas()");
        assert_eq!(
            scalar_text(
                &mut c,
                &format!("SELECT calls || ' ' || users FROM usage_agg.key_daily_usage WHERE shared_key_id = '{k}'")
            ),
            Some("7 7".to_string()),
            "{mode:?}"
        );
    }
}

#[test]
fn applications_cannot_write_the_per_key_tables_and_readers_read_them() {
    let db = TestDb::new("keys_roles");
    let mut admin = db.connect();
    admin
        .batch_execute(
            "DROP ROLE IF EXISTS ua_keys_app; CREATE ROLE ua_keys_app LOGIN;
             DROP ROLE IF EXISTS ua_keys_reader; CREATE ROLE ua_keys_reader LOGIN;
             SELECT usage_agg.grant_app_role('ua_keys_app');
             SELECT usage_agg.grant_read_role('ua_keys_reader');",
        )
        .unwrap();
    let connect_as = |role: &str| {
        Client::connect(
            &format!(
                "host=127.0.0.1 port={} user={role} dbname={}",
                port(),
                db.name
            ),
            NoTls,
        )
        .unwrap()
    };
    let mut app = connect_as("ua_keys_app");
    app.execute(
        "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, cost_estimate) VALUES ($1::text::uuid, $2::text::uuid, 1)",
        &[&user(1), &key(1)],
    )
    .unwrap();
    for sql in [
        "INSERT INTO usage_agg.key_daily_logs (shared_key_id, date, log_data) VALUES (gen_random_uuid(), current_date, '{}')",
        "UPDATE usage_agg.service_daily_logs SET log_data = '{}'",
        "DELETE FROM usage_agg.pending_key_deltas",
        "INSERT INTO usage_agg.key_monthly_logs (shared_key_id, month, log_data) VALUES (gen_random_uuid(), '2026-01-01', '{}')",
    ] {
        assert_eq!(sqlstate(app.batch_execute(sql)), "42501", "{sql}");
    }
    let mut reader = connect_as("ua_keys_reader");
    assert_eq!(
        scalar_i64(
            &mut reader,
            "SELECT sum(calls)::int8 FROM usage_agg.key_daily_usage"
        ),
        1
    );
    assert_eq!(
        scalar_i64(&mut reader, "SELECT count(*) FROM usage_agg.key_health"),
        1
    );
    assert_eq!(
        scalar_i64(
            &mut reader,
            "SELECT calls FROM usage_agg.usage_overview() WHERE period = 'today'"
        ),
        1
    );
    assert_eq!(
        sqlstate(reader.batch_execute("SELECT usage_agg._rebuild_key_day(current_date)")),
        "42501"
    );
}
