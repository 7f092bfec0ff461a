//! The fold and the quotas through pgbouncer in transaction pooling mode
//! (scripts/pgbouncer.sh, started by scripts/test.sh): many clients share a few
//! server connections, each transaction may run on another one, and the clients
//! use no server-side prepared statements (the simple query protocol, or one
//! unnamed statement per query with `query_typed`). The totals stay exact.
#![cfg(not(feature = "pg_test"))]

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Barrier};
use std::thread;

use common::*;
use postgres::types::Type;
use postgres::{Client, SimpleQueryMessage};

/// default_pool_size in scripts/pgbouncer.sh.
const POOL_SIZE: usize = 6;

/// How a client talks to the server: never with named prepared statements.
#[derive(Clone, Copy, Debug)]
enum Protocol {
    /// Simple query protocol, values written into the SQL text.
    Simple,
    /// Extended protocol with one unnamed statement per query.
    Unnamed,
}

impl Protocol {
    fn for_client(i: usize) -> Protocol {
        if i % 2 == 0 {
            Protocol::Simple
        } else {
            Protocol::Unnamed
        }
    }
}

/// The first column of the first row of a simple query, as text.
fn simple_scalar(c: &mut Client, sql: &str) -> Option<String> {
    c.simple_query(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .into_iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
            _ => None,
        })
        .flatten()
}

/// The server process this transaction ran on.
fn backend_pid(c: &mut Client) -> i32 {
    simple_scalar(c, "SELECT pg_backend_pid()")
        .unwrap()
        .parse()
        .unwrap()
}

const INSERT_TYPED: &str = "INSERT INTO usage_agg.key_usage_logs
        (user_id, shared_key_id, model_used, tokens_used, cost_estimate, success, request_id, created_at)
    VALUES ($1::uuid, $2::uuid, $3, $4, $5::numeric, $6, $7, '2026-07-01 12:00+00'::timestamptz + $8 * interval '1 second')";

/// One call: user, key, model, tokens, cost in cents, success, request id, second.
struct Call {
    user: String,
    key: String,
    model: &'static str,
    tokens: i32,
    cents: i64,
    success: bool,
    request_id: String,
    second: i32,
}

impl Call {
    fn insert_sql(&self) -> String {
        // Test values only (uuids, digits, two model names), never user input.
        format!(
            "INSERT INTO usage_agg.key_usage_logs
                 (user_id, shared_key_id, model_used, tokens_used, cost_estimate, success, request_id, created_at)
             VALUES ('{}', '{}', '{}', {}, {}.{:02}, {}, '{}', '2026-07-01 12:00+00'::timestamptz + {} * interval '1 second')",
            self.user,
            self.key,
            self.model,
            self.tokens,
            self.cents / 100,
            self.cents % 100,
            self.success,
            self.request_id,
            self.second
        )
    }

    fn insert(&self, c: &mut Client, protocol: Protocol) {
        match protocol {
            Protocol::Simple => {
                c.simple_query(&self.insert_sql()).unwrap();
            }
            Protocol::Unnamed => {
                let cost = format!("{}.{:02}", self.cents / 100, self.cents % 100);
                c.query_typed(
                    INSERT_TYPED,
                    &[
                        (&self.user, Type::TEXT),
                        (&self.key, Type::TEXT),
                        (&self.model, Type::TEXT),
                        (&self.tokens, Type::INT4),
                        (&cost, Type::TEXT),
                        (&self.success, Type::BOOL),
                        (&self.request_id, Type::TEXT),
                        (&self.second, Type::INT4),
                    ],
                )
                .unwrap();
            }
        }
    }
}

const SHARED_USER: &str = "aaaaaaaa-0000-0000-0000-0000000000b0";

/// Where the pooled fold test runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Setup {
    /// The main cluster, default mode: no applier, so every statement folds.
    NoApplier,
    /// The main cluster in `async` mode, applied by hand afterwards.
    Async,
    /// The applier cluster, default mode: the background applier folds.
    Applier,
}

fn pooled_clients_fold_exactly(setup: Setup) {
    let db = match setup {
        Setup::NoApplier => FoldMode::Default.db("pooled_fold"),
        Setup::Async => FoldMode::Async.db("pooled_fold"),
        Setup::Applier => TestDb::with_applier("pooled_fold_applier"),
    };
    const CLIENTS: usize = 16;
    const ROUNDS: usize = 60;
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let handles: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let mut c = db.connect_pooled();
            let barrier = barrier.clone();
            let protocol = Protocol::for_client(i);
            thread::spawn(move || {
                let own_user = format!("bbbbbbbb-0000-0000-0000-{i:012}");
                let call = |n: usize, part: usize| Call {
                    // Every other call goes to the user all clients share.
                    user: if n % 2 == 0 { SHARED_USER.to_string() } else { own_user.clone() },
                    key: format!("cccccccc-0000-0000-0000-{:012}", n % 3),
                    model: if n % 5 == 0 { "gpt-4o" } else { "claude" },
                    tokens: n as i32,
                    cents: 1 + (n % 4) as i64,
                    success: n % 7 != 0,
                    request_id: format!("c{i}-n{n}-p{part}"),
                    second: (i * 1000 + n) as i32,
                };
                let mut pids = BTreeSet::new();
                // (calls, cents) committed for the shared user.
                let mut shared = (0i64, 0i64);
                let count = |c: &Call, shared: &mut (i64, i64)| {
                    if c.user == SHARED_USER {
                        shared.0 += 1;
                        shared.1 += c.cents;
                    }
                };
                barrier.wait();
                for n in 0..ROUNDS {
                    match n % 6 {
                        // Two calls in one explicit transaction, committed.
                        4 => {
                            let (a, b) = (call(n, 0), call(n + 1, 1));
                            c.simple_query(&format!(
                                "BEGIN; {}; {}; COMMIT",
                                a.insert_sql(),
                                b.insert_sql()
                            ))
                            .unwrap();
                            count(&a, &mut shared);
                            count(&b, &mut shared);
                        }
                        // Two calls rolled back: no trace.
                        5 => {
                            let (a, b) = (call(n, 0), call(n + 1, 1));
                            c.simple_query(&format!(
                                "BEGIN; {}; {}; ROLLBACK",
                                a.insert_sql(),
                                b.insert_sql()
                            ))
                            .unwrap();
                        }
                        _ => {
                            let a = call(n, 0);
                            a.insert(&mut c, protocol);
                            count(&a, &mut shared);
                        }
                    }
                    // A correction of an earlier call of this client: its cost
                    // goes up by 0.10 (a row the shared user owns when n-3 is even).
                    if n % 10 == 9 {
                        let earlier = call(n - 3, 0);
                        c.simple_query(&format!(
                            "UPDATE usage_agg.key_usage_logs SET cost_estimate = cost_estimate + 0.10
                              WHERE request_id = '{}'",
                            earlier.request_id
                        ))
                        .unwrap();
                        if earlier.user == SHARED_USER {
                            shared.1 += 10;
                        }
                    }
                    if n % 10 == 0 {
                        pids.insert(backend_pid(&mut c));
                    }
                }
                (pids, shared)
            })
        })
        .collect();
    let mut pids = BTreeSet::new();
    let mut multiplexed = false;
    let mut shared = (0i64, 0i64);
    for h in handles {
        let (p, s) = h.join().unwrap();
        multiplexed |= p.len() > 1;
        pids.extend(p);
        shared = (shared.0 + s.0, shared.1 + s.1);
    }
    // The pooler did pool: a few server processes, shared by the clients.
    assert!(
        pids.len() <= POOL_SIZE,
        "{} server processes for a pool of {POOL_SIZE}",
        pids.len()
    );
    assert!(multiplexed, "no client moved between server connections");

    let mut c = db.connect();
    // Per client: 60 rounds, 10 of them two committed calls, 10 two rolled back.
    let committed = (CLIENTS * (40 + 10 * 2)) as i64;
    match setup {
        Setup::NoApplier => assert_eq!(pending(&mut c), 0),
        Setup::Async => {
            scalar_i64(&mut c, "SELECT usage_agg.apply_pending_deltas()");
        }
        Setup::Applier => wait_until_folded(&mut c),
    }
    assert_eq!(pending(&mut c), 0);
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.key_usage_logs"),
        committed
    );
    assert_eq!(group_by_mismatches(&mut c), 0);
    assert_eq!(
        verify(&mut c, "2026-07-01", "2026-07-01"),
        Vec::<String>::new()
    );
    // The shared user's day, against what the clients committed.
    assert_eq!(
        scalar_text(
            &mut c,
            &format!(
                "SELECT (log_data->>'api_call_count') || ' ' || (log_data->'shared_service_usage'->>'estimated_cost')
                   FROM usage_agg.daily_logs WHERE user_id = '{SHARED_USER}' AND date = '2026-07-01'"
            )
        ),
        Some(format!("{} {}.{:02}", shared.0, shared.1 / 100, shared.1 % 100))
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT sum((log_data->>'api_call_count')::int8)::int8 FROM usage_agg.daily_logs"
        ),
        committed
    );
}

#[test]
fn pooled_clients_fold_exactly_without_an_applier() {
    pooled_clients_fold_exactly(Setup::NoApplier);
}

#[test]
fn pooled_clients_fold_exactly_in_async_mode() {
    pooled_clients_fold_exactly(Setup::Async);
}

#[test]
fn pooled_clients_fold_exactly_with_the_background_applier() {
    pooled_clients_fold_exactly(Setup::Applier);
}

/// Consumes one unit until refused with UAQ01 (or `max_calls` calls); returns
/// the units granted. Any other error fails the test.
fn hammer_pooled(c: &mut Client, protocol: Protocol, user: &str, max_calls: usize) -> i64 {
    count_granted(max_calls, || match protocol {
        Protocol::Simple => c
            .simple_query(&format!(
                "SELECT monthly_used FROM usage_agg.consume_quota('{user}')"
            ))
            .map(|_| ()),
        Protocol::Unnamed => c
            .query_typed(
                "SELECT monthly_used FROM usage_agg.consume_quota($1::uuid)",
                &[(&user, Type::TEXT)],
            )
            .map(|_| ()),
    })
}

#[test]
fn sixty_four_pooled_clients_grant_exactly_the_quota() {
    let db = TestDb::new("pooled_quota_64");
    let user = "a0000000-0000-0000-0000-0000000000e4";
    let barrier = Arc::new(Barrier::new(64));
    let handles: Vec<_> = (0..64)
        .map(|i| {
            let mut c = db.connect_pooled();
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                hammer_pooled(&mut c, Protocol::for_client(i), user, 4)
            })
        })
        .collect();
    let granted: i64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let mut c = db.connect();
    // The default plan's monthly quota is 100.
    assert_eq!(granted, 100);
    assert_eq!(three_way(&mut c, user, "-infinity"), (100, 100, 100));
}

#[test]
fn pooled_request_ids_and_refunds_count_exactly_once() {
    let db = TestDb::new("pooled_quota_replay");
    let user = "a0000000-0000-0000-0000-0000000000e5";
    // 16 clients send the same request id at once: one charge, 15 replays.
    let barrier = Arc::new(Barrier::new(16));
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let mut c = db.connect_pooled();
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                simple_scalar(
                    &mut c,
                    &format!(
                        "SELECT allowed::text || ' ' || replayed::text || ' ' || monthly_used
                           FROM usage_agg.consume_quota('{user}', 7, 'sess', 'pooled-req')"
                    ),
                )
                .unwrap()
            })
        })
        .collect();
    let mut results: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    results.sort();
    let mut expected = vec!["true false 7".to_string()];
    expected.extend(std::iter::repeat_n("true true 7".to_string(), 15));
    assert_eq!(results, expected);

    // 30 more charges with request ids, then four clients race to refund all
    // of them (each refund tried by two clients) while four others consume.
    let mut c = db.connect_pooled();
    for i in 0..30 {
        c.simple_query(&format!(
            "SELECT usage_agg.consume_quota('{user}', 1, NULL, 'r{i}')"
        ))
        .unwrap();
    }
    let barrier = Arc::new(Barrier::new(8));
    let mut handles = Vec::new();
    for t in 0..8 {
        let mut c = db.connect_pooled();
        let barrier = barrier.clone();
        handles.push(thread::spawn(move || {
            barrier.wait();
            if t >= 4 {
                return (0, hammer_pooled(&mut c, Protocol::for_client(t), user, 10));
            }
            let mut refunded = 0;
            for i in (t % 2..30).step_by(2) {
                let r = c
                    .query_typed(
                        "SELECT allowed FROM usage_agg.refund_quota($1)",
                        &[(&format!("r{i}"), Type::TEXT)],
                    )
                    .unwrap();
                if r[0].get::<_, bool>(0) {
                    refunded += 1;
                }
            }
            (refunded, 0)
        }));
    }
    let (refunded, granted) = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    assert_eq!(refunded, 30);
    // 4 clients x 10 calls, all within the quota (7 + 30 - 30 + 40 <= 100).
    assert_eq!(granted, 40);
    assert_eq!(
        three_way(&mut db.connect(), user, "-infinity"),
        (47, 47, 41)
    );
}
