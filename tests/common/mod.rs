//! Helpers for the integration tests: each test gets a database of its own on the
//! live cluster that scripts/test.sh started, with the extension really installed.
#![allow(dead_code)]

use postgres::{Client, NoTls};

pub fn port() -> String {
    std::env::var("USAGE_AGG_TEST_PORT")
        .expect("USAGE_AGG_TEST_PORT is not set: run the integration tests through scripts/test.sh")
}

/// The bin/ directory of the server version under test (pg_dump, psql, ...).
pub fn pg_bin() -> String {
    std::env::var("USAGE_AGG_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".to_string())
}

pub fn dsn_for(db: &str) -> String {
    format!("host=127.0.0.1 port={} user=postgres dbname={db}", port())
}

/// The cluster with the background applier (usage_agg preloaded).
pub fn applier_port() -> String {
    std::env::var("USAGE_AGG_APPLIER_PORT").expect(
        "USAGE_AGG_APPLIER_PORT is not set: run the integration tests through scripts/test.sh",
    )
}

/// A superuser connection to the `postgres` database of the cluster on `port`
/// (creating and dropping databases and roles).
pub fn admin_client(port: &str) -> Client {
    let dsn = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    Client::connect(&dsn, NoTls).expect("connect to the test cluster")
}

pub struct TestDb {
    pub name: String,
    pub port: String,
}

impl TestDb {
    /// A fresh database with `CREATE EXTENSION usage_agg` done, on the main
    /// test cluster (no background applier: the default mode folds at once).
    pub fn new(name: &str) -> TestDb {
        TestDb::on(port(), name)
    }

    /// A fresh database with the extension on the applier cluster, once its
    /// applier runs (the default mode is then asynchronous).
    pub fn with_applier(name: &str) -> TestDb {
        let db = TestDb::on(applier_port(), name);
        let mut c = db.connect();
        wait_for(&mut c, "the applier to start", |c| {
            scalar_text(c, "SELECT applier_running::text FROM usage_agg.fold_status").as_deref()
                == Some("true")
        });
        assert_eq!(
            scalar_text(&mut c, "SELECT effective_mode FROM usage_agg.fold_status").as_deref(),
            Some("async")
        );
        db
    }

    fn on(port: String, name: &str) -> TestDb {
        let name = format!("ua_{name}");
        let mut admin = admin_client(&port);
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .expect("drop old test database");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create test database");
        let db = TestDb { name, port };
        db.connect()
            .batch_execute("CREATE EXTENSION usage_agg")
            .expect("create extension");
        db
    }

    pub fn dsn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={}",
            self.port, self.name
        )
    }

    pub fn connect(&self) -> Client {
        Client::connect(&self.dsn(), NoTls).expect("connect to the test database")
    }

    /// A connection to this database through the pgbouncer (transaction
    /// pooling) in front of its cluster, which scripts/test.sh starts.
    pub fn connect_pooled(&self) -> Client {
        let var = if self.port == port() {
            "USAGE_AGG_PGBOUNCER_PORT"
        } else {
            "USAGE_AGG_APPLIER_PGBOUNCER_PORT"
        };
        let pooler = std::env::var(var).unwrap_or_else(|_| {
            panic!("{var} is not set: run the integration tests through scripts/test.sh")
        });
        let dsn = format!(
            "host=127.0.0.1 port={pooler} user=postgres dbname={}",
            self.name
        );
        Client::connect(&dsn, NoTls).expect("connect through pgbouncer")
    }
}

/// Polls `done` every 50 ms for up to 20 seconds; fails the test naming `what`.
pub fn wait_for(c: &mut Client, what: &str, mut done: impl FnMut(&mut Client) -> bool) {
    let start = std::time::Instant::now();
    while !done(c) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "waited 20 s for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// With an applier running: waits until it has folded every pending call.
pub fn wait_until_folded(c: &mut Client) {
    wait_for(c, "the applier to fold every pending call", |c| {
        pending(c) == 0
    });
}

/// How a test database folds; tests that must hold in both run once per mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FoldMode {
    /// The default (`auto`) on a server without the applier: every statement
    /// folds at once.
    Default,
    /// `async`: calls wait in pending_deltas until apply_pending_deltas().
    Async,
}

impl FoldMode {
    /// A fresh database (named after the test and the mode) in this mode.
    pub fn db(self, name: &str) -> TestDb {
        let db = TestDb::new(&format!("{name}_{self:?}").to_lowercase());
        if self == FoldMode::Async {
            db.connect()
                .batch_execute("UPDATE usage_agg.config SET fold_mode = 'async'")
                .expect("switch to async mode");
        }
        db
    }

    /// Async mode: checks that `expected` calls wait in pending_deltas, then
    /// applies them, so that daily_logs alone holds everything afterwards.
    pub fn settle(self, c: &mut Client, expected: i64) {
        let waiting = pending(c);
        match self {
            FoldMode::Default => assert_eq!(waiting, 0, "nothing pends without an applier"),
            FoldMode::Async => {
                assert_eq!(waiting, expected, "pending calls");
                assert_eq!(
                    scalar_i64(c, "SELECT usage_agg.apply_pending_deltas()"),
                    expected
                );
            }
        }
    }

    /// Like `settle`, where the number of pending calls is not known (corrections
    /// absorb pending calls of their days): applies all, none may be left.
    pub fn settle_all(self, c: &mut Client) {
        if self == FoldMode::Async {
            scalar_i64(c, "SELECT usage_agg.apply_pending_deltas()");
        }
        assert_eq!(pending(c), 0);
    }
}

/// Calls waiting in pending_deltas.
pub fn pending(c: &mut Client) -> i64 {
    scalar_i64(
        c,
        "SELECT COALESCE(sum(calls), 0)::int8 FROM usage_agg.pending_deltas",
    )
}

/// The SQLSTATE of a failed statement.
pub fn sqlstate<T: std::fmt::Debug>(r: Result<T, postgres::Error>) -> String {
    let err = r.expect_err("the statement should have failed");
    err.as_db_error()
        .map(|e| e.code().code().to_string())
        .unwrap_or_else(|| panic!("not a database error: {err}"))
}

pub fn db_error<T: std::fmt::Debug>(r: Result<T, postgres::Error>) -> postgres::error::DbError {
    let err = r.expect_err("the statement should have failed");
    err.as_db_error()
        .cloned()
        .unwrap_or_else(|| panic!("not a database error: {err}"))
}

/// Rows of verify_daily_logs over a range, as "user date field" strings.
pub fn verify(c: &mut Client, from: &str, to: &str) -> Vec<String> {
    c.query(
        "SELECT user_id::text || ' ' || date::text || ' ' || field || ' ' || coalesce(aggregate_value::text, 'NULL') || ' vs ' || coalesce(detail_value::text, 'NULL')
           FROM usage_agg.verify_daily_logs($1::text::date, $2::text::date)",
        &[&from, &to],
    )
    .expect("verify_daily_logs")
    .iter()
    .map(|r| r.get::<_, String>(0))
    .collect()
}

/// (user, day) pairs whose calls, successes, tokens or cost differ between the
/// aggregate and a GROUP BY over the detail, computed independently of
/// verify_daily_logs, plus the (user, hour)s and (key, hour)s where the hourly
/// views and the detail differ (see [`hourly_mismatches`]). Uses the
/// configured time zone.
pub fn group_by_mismatches(c: &mut Client) -> i64 {
    daily_mismatches(c) + hourly_mismatches(c)
}

/// (user, hour)s and (key, hour)s whose calls, successes, tokens or cost differ
/// between hourly_usage or key_hourly_usage (which add pending calls) and a
/// GROUP BY over the detail; the hour computed here from the local minutes and
/// seconds, not by the extension's _hour_start.
pub fn hourly_mismatches(c: &mut Client) -> i64 {
    c.query_one(
        "WITH tz AS (SELECT timezone AS name FROM usage_agg.config),
              calls AS (
                SELECT k.*, k.created_at - make_interval(
                           mins => extract(minute FROM k.created_at AT TIME ZONE tz.name)::int,
                           secs => extract(second FROM k.created_at AT TIME ZONE tz.name)) AS h
                  FROM usage_agg.key_usage_logs k, tz),
              g AS (SELECT 'user' AS scope, user_id AS id, h, count(*) AS calls, count(*) FILTER (WHERE success) AS ok,
                           coalesce(sum(tokens_used), 0) AS tokens, coalesce(sum(cost_estimate), 0) AS cost
                      FROM calls GROUP BY 2, 3
                    UNION ALL
                    SELECT 'key', shared_key_id, h, count(*), count(*) FILTER (WHERE success),
                           coalesce(sum(tokens_used), 0), coalesce(sum(cost_estimate), 0)
                      FROM calls WHERE shared_key_id IS NOT NULL GROUP BY 2, 3),
              a AS (SELECT 'user' AS scope, user_id AS id, hour AS h, calls, successful_calls AS ok, tokens_used AS tokens,
                           estimated_cost AS cost FROM usage_agg.hourly_usage
                    UNION ALL
                    SELECT 'key', shared_key_id, hour, calls, successful_calls, tokens_used, estimated_cost
                      FROM usage_agg.key_hourly_usage)
         SELECT count(*) FROM g FULL JOIN a ON a.scope = g.scope AND a.id = g.id AND a.h = g.h
          WHERE coalesce(a.calls, 0) <> coalesce(g.calls, 0) OR coalesce(a.ok, 0) <> coalesce(g.ok, 0)
             OR coalesce(a.tokens, 0) <> coalesce(g.tokens, 0) OR coalesce(a.cost, 0) <> coalesce(g.cost, 0)",
        &[],
    )
    .expect("hourly group by comparison")
    .get(0)
}

fn daily_mismatches(c: &mut Client) -> i64 {
    c.query_one(
        "WITH tz AS (SELECT timezone AS name FROM usage_agg.config),
              g AS (SELECT k.user_id, (k.created_at AT TIME ZONE tz.name)::date AS d,
                           count(*) AS calls, count(*) FILTER (WHERE k.success) AS ok,
                           coalesce(sum(k.tokens_used), 0) AS tokens, coalesce(sum(k.cost_estimate), 0) AS cost
                      FROM usage_agg.key_usage_logs k, tz GROUP BY 1, 2)
         SELECT count(*) FROM g FULL JOIN usage_agg.daily_logs dl ON dl.user_id = g.user_id AND dl.date = g.d
          WHERE (dl.log_data->>'api_call_count')::bigint IS DISTINCT FROM coalesce(g.calls, 0)
             OR (dl.log_data->'shared_service_usage'->>'successful_calls')::bigint IS DISTINCT FROM coalesce(g.ok, 0)
             OR (dl.log_data->'shared_service_usage'->>'tokens_used')::bigint IS DISTINCT FROM coalesce(g.tokens, 0)
             OR (dl.log_data->'shared_service_usage'->>'estimated_cost')::numeric IS DISTINCT FROM coalesce(g.cost, 0)",
        &[],
    )
    .expect("group by comparison")
    .get(0)
}

pub fn scalar_i64(c: &mut Client, sql: &str) -> i64 {
    c.query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get(0)
}

pub fn scalar_text(c: &mut Client, sql: &str) -> Option<String> {
    c.query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get(0)
}

/// The first (text) column of every row of `sql`.
pub fn texts(
    c: &mut Client,
    sql: &str,
    params: &[&(dyn postgres::types::ToSql + Sync)],
) -> Vec<String> {
    c.query(sql, params)
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// monthly_used, the sum of granted (unrefunded) amounts since `since`, and the
/// number of those log rows.
pub fn three_way(c: &mut Client, user: &str, since: &str) -> (i64, i64, i64) {
    let row = c
        .query_one(
            "SELECT (SELECT monthly_used::int8 FROM usage_agg.quotas WHERE user_id = $1::text::uuid),
                    (SELECT coalesce(sum(amount), 0)::int8 FROM usage_agg.quota_usage_logs
                      WHERE user_id = $1::text::uuid AND refunded_at IS NULL AND created_at > $2::text::timestamptz),
                    (SELECT count(*) FROM usage_agg.quota_usage_logs
                      WHERE user_id = $1::text::uuid AND refunded_at IS NULL AND created_at > $2::text::timestamptz)",
            &[&user, &since],
        )
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// Calls `consume` (one consume_quota call) up to `max_calls` times and returns
/// how many were granted. A refusal must be QUOTA_EXCEEDED (UAQ01): any other
/// error fails the test.
pub fn count_granted(
    max_calls: usize,
    mut consume: impl FnMut() -> Result<(), postgres::Error>,
) -> i64 {
    let mut granted = 0;
    for _ in 0..max_calls {
        match consume() {
            Ok(()) => granted += 1,
            Err(e) => {
                let code = e.as_db_error().map(|d| d.code().code().to_string());
                assert_eq!(code.as_deref(), Some("UAQ01"), "unexpected error: {e}");
            }
        }
    }
    granted
}
