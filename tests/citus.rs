//! usage_agg on Citus: a coordinator and two workers on three local ports
//! (scripts/citus.sh, which scripts/test-version.sh starts where Citus 13.2.2
//! is built for the PostgreSQL version under test), the extension created on
//! the coordinator and placed by `usage_agg.distribute()`. What this covers,
//! and what does not work on Citus yet: docs/citus.md.
//!
//! The tests share the cluster's database (Citus propagates neither databases
//! nor their extensions by default); each uses users and keys of its own.
#![cfg(not(feature = "pg_test"))]

mod common;

use std::sync::OnceLock;

use common::*;
use postgres::{Client, NoTls};

/// The coordinator's port, or None (and a line saying why) when the test
/// command started no Citus cluster.
fn citus_port(test: &str) -> Option<u16> {
    match std::env::var("USAGE_AGG_CITUS_PORT") {
        Ok(port) => Some(port.parse().expect("USAGE_AGG_CITUS_PORT is a port")),
        Err(_) => {
            let why = std::env::var("USAGE_AGG_CITUS_SKIPPED").unwrap_or_else(|_| {
                "USAGE_AGG_CITUS_PORT is not set (run through scripts/test.sh)".into()
            });
            eprintln!("skipped: citus::{test}: {why}");
            None
        }
    }
}

fn connect(port: u16) -> Client {
    Client::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=usage_agg_test"),
        NoTls,
    )
    .unwrap_or_else(|e| panic!("connect to the Citus node on port {port}: {e}"))
}

/// The nodes: the coordinator, then the two workers.
fn nodes(coordinator: u16) -> [u16; 3] {
    [coordinator, coordinator + 1, coordinator + 2]
}

/// What `distribute()` answered, once per test binary: the extension is
/// created and distributed by the first test that needs it, and every worker's
/// applier has started (inserts on a shard may then leave their calls to it).
fn distributed(coordinator: u16) -> &'static Vec<String> {
    static PLACED: OnceLock<Vec<String>> = OnceLock::new();
    PLACED.get_or_init(|| {
        let mut c = connect(coordinator);
        c.batch_execute("CREATE EXTENSION usage_agg")
            .expect("CREATE EXTENSION usage_agg on the coordinator");
        let placed = texts(
            &mut c,
            "SELECT table_name || ' ' || placement FROM usage_agg.distribute()",
            &[],
        );
        for port in &nodes(coordinator)[1..] {
            let mut w = connect(*port);
            wait_for(&mut w, "the worker's applier to start", |w| {
                scalar_text(
                    w,
                    "SELECT effective_mode || ' ' || applier_running FROM usage_agg.fold_status",
                )
                .as_deref()
                    == Some("async true")
            });
        }
        placed
    })
}

/// Waits until no node has calls pending, nor per-key deltas of corrections:
/// every applier has folded its own.
fn wait_until_every_node_folded(coordinator: u16) {
    for port in nodes(coordinator) {
        let mut c = connect(port);
        wait_for(
            &mut c,
            &format!("the applier on port {port} to fold its calls"),
            |c| {
                scalar_i64(
                    c,
                    "SELECT (SELECT pending_calls FROM usage_agg.fold_status)
                            + (SELECT count(*) FROM usage_agg.pending_key_deltas)",
                ) == 0
            },
        );
    }
}

/// Every (user, hour) of `users` as "user hour calls successful tokens cost",
/// from hourly_logs (`from_detail` false) or from a GROUP BY over the detail.
/// The business time zone is UTC, so an hour is `date_trunc('hour', ...)`.
fn user_hours(c: &mut Client, users: &[String], from_detail: bool) -> Vec<String> {
    let sql = if from_detail {
        "SELECT user_id || ' ' || date_trunc('hour', created_at) || ' ' || count(*) || ' '
                || count(*) FILTER (WHERE success) || ' ' || sum(tokens_used) || ' ' || trim_scale(sum(cost_estimate))
           FROM usage_agg.key_usage_logs WHERE user_id = ANY ($1::text[]::uuid[])
          GROUP BY user_id, date_trunc('hour', created_at) ORDER BY 1"
    } else {
        "SELECT user_id || ' ' || hour || ' ' || calls || ' ' || successful || ' ' || tokens || ' ' || trim_scale(cost)
           FROM usage_agg.hourly_logs WHERE user_id = ANY ($1::text[]::uuid[]) AND calls <> 0 ORDER BY 1"
    };
    texts(c, sql, &[&users])
}

/// A key's day (`key` Some) or the service's day as "calls tokens cost users
/// last_call_at last_failure_at".
fn rollup_day(c: &mut Client, key: Option<&str>, day: &str) -> Option<String> {
    // Table names and filters are this function's constants.
    let (table, key_filter) = match key {
        Some(_) => ("key_daily_logs", "shared_key_id = $1::text::uuid"),
        None => ("service_daily_logs", "$1::text IS NULL"),
    };
    c.query_opt(
        &format!(
            "SELECT (log_data->>'total_calls') || ' ' || (log_data->>'tokens_used') || ' '
                    || trim_scale((log_data->>'estimated_cost')::numeric) || ' ' || (log_data->>'users') || ' '
                    || (log_data->>'last_call_at') || ' ' || (log_data->>'last_failure_at')
               FROM usage_agg.{table} WHERE {key_filter} AND date = $2::text::date"
        ),
        &[&key, &day],
    )
    .expect("a key's or the service's day")
    .map(|r| r.get(0))
}

/// The port of the worker holding `user`'s shard of key_usage_logs.
fn worker_of(c: &mut Client, user: &str) -> i32 {
    c.query_one(
        "SELECT p.nodeport FROM pg_dist_placement pl JOIN pg_dist_node p USING (groupid)
          WHERE pl.shardid = get_shard_id_for_distribution_column('usage_agg.key_usage_logs', $1::text::uuid)",
        &[&user],
    )
    .expect("the placement of a user's shard")
    .get(0)
}

#[test]
fn distribute_without_citus_is_refused_and_changes_nothing() {
    // The main test cluster has no Citus: this part runs everywhere.
    let db = TestDb::new("citus_missing");
    let mut c = db.connect();
    let e = db_error(c.query("SELECT * FROM usage_agg.distribute()", &[]));
    assert_eq!(e.code().code(), "55000");
    assert_eq!(e.message(), "Citus is not installed in this database");
    assert_eq!(
        e.hint(),
        Some("Preload citus (shared_preload_libraries = 'citus,usage_agg'), CREATE EXTENSION citus and add the worker nodes first; on a single server nothing needs distributing.")
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT array_length(conkey, 1)::int8 FROM pg_constraint WHERE conname = 'key_usage_logs_pkey'"
        ),
        1
    );
    // Administrators only: an application role may use the schema, not these.
    c.batch_execute(
        "DROP ROLE IF EXISTS ua_test_citus_app; CREATE ROLE ua_test_citus_app;
         SELECT usage_agg.grant_app_role('ua_test_citus_app');
         SET ROLE ua_test_citus_app",
    )
    .unwrap();
    assert_eq!(
        sqlstate(c.query("SELECT * FROM usage_agg.distribute()", &[])),
        "42501"
    );
    assert_eq!(
        sqlstate(c.query("SELECT usage_agg.sync_plan_quotas()", &[])),
        "42501"
    );
    c.batch_execute("RESET ROLE; DROP OWNED BY ua_test_citus_app; DROP ROLE ua_test_citus_app")
        .unwrap();
}

#[test]
fn distribute_places_every_table_once_and_only_on_the_coordinator() {
    let Some(port) = citus_port("distribute_places_every_table_once_and_only_on_the_coordinator")
    else {
        return;
    };
    let placed = distributed(port);
    assert_eq!(
        placed.join(", "),
        "config reference, retention_horizon reference, quota_plans reference, model_prices reference, \
         service_daily_logs reference, service_monthly_logs reference, user_limits reference, \
         key_usage_logs by user, daily_logs by user, monthly_logs by user, hourly_logs by user, \
         quotas by user, quota_usage_logs by user, alerts by user, \
         key_daily_logs by key, key_monthly_logs by key, key_hourly_logs by key"
    );
    let mut c = connect(port);
    // Citus's own record: reference tables ('n'), hash-distributed ones ('h')
    // by the column named, the per-user tables in one colocation group with
    // key_usage_logs and the per-key ones in another.
    assert_eq!(
        texts(
            &mut c,
            "WITH t AS (
                 SELECT p.logicalrelid::regclass::text AS rel, p.partmethod::text AS method,
                        column_to_column_name(p.logicalrelid, p.partkey) AS col,
                        p.colocationid = (SELECT colocationid FROM pg_dist_partition
                                           WHERE logicalrelid = 'usage_agg.key_usage_logs'::regclass) AS with_calls
                   FROM pg_dist_partition p
                  WHERE p.logicalrelid::regclass::text LIKE 'usage_agg.%')
             SELECT string_agg(rel || ' ' || method || COALESCE(' ' || col, '')
                               || CASE WHEN method = 'h' THEN ' ' || with_calls ELSE '' END, ', ' ORDER BY rel)
               FROM t",
            &[]
        ),
        vec!["usage_agg.alerts h user_id true, usage_agg.config n, usage_agg.daily_logs h user_id true, \
              usage_agg.hourly_logs h user_id true, usage_agg.key_daily_logs h shared_key_id false, \
              usage_agg.key_hourly_logs h shared_key_id false, usage_agg.key_monthly_logs h shared_key_id false, \
              usage_agg.key_usage_logs h user_id true, usage_agg.model_prices n, usage_agg.monthly_logs h user_id true, \
              usage_agg.quota_plans n, usage_agg.quota_usage_logs h user_id true, usage_agg.quotas h user_id true, \
              usage_agg.retention_horizon n, usage_agg.service_daily_logs n, usage_agg.service_monthly_logs n, \
              usage_agg.user_limits n"
            .to_string()]
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(DISTINCT colocationid) FROM pg_dist_partition
              WHERE logicalrelid IN ('usage_agg.key_daily_logs'::regclass, 'usage_agg.key_monthly_logs'::regclass,
                                     'usage_agg.key_hourly_logs'::regclass)"
        ),
        1
    );
    // A second call changes nothing.
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.distribute()"),
        0
    );
    // On a worker: refused.
    let mut w = connect(port + 1);
    let e = db_error(w.query("SELECT * FROM usage_agg.distribute()", &[]));
    assert_eq!(e.code().code(), "55000");
    assert_eq!(
        e.message(),
        "usage_agg.distribute() must be called on the coordinator"
    );
}

const DAY: &str = "2026-11-20";

fn user(i: usize) -> String {
    format!("c1000000-0000-0000-0000-{i:012}")
}

fn key(j: usize) -> String {
    format!("c2000000-0000-0000-0000-{j:012}")
}

#[test]
fn inserts_fold_exactly_through_the_coordinator_and_through_each_worker() {
    let Some(port) =
        citus_port("inserts_fold_exactly_through_the_coordinator_and_through_each_worker")
    else {
        return;
    };
    distributed(port);
    let users: Vec<String> = (1..=8).map(user).collect();
    let mut c = connect(port);
    // The eight users live on both workers, so both appliers fold.
    let mut workers: Vec<i32> = users.iter().map(|u| worker_of(&mut c, u)).collect();
    workers.sort();
    workers.dedup();
    assert_eq!(workers, vec![i32::from(port) + 1, i32::from(port) + 2]);

    let users_sql = format!("'{{{}}}'::uuid[]", users.join(","));
    // Through the coordinator: one row per statement, a multi-row statement,
    // COPY, and a rolled-back insert.
    for u in &users {
        c.execute(
            "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, created_at)
             VALUES ($1::text::uuid, $2::text::uuid, 'gpt-4o', 100, 0.5, $3::text::timestamptz)",
            &[u, &key(1), &format!("{DAY} 10:00+00")],
        )
        .unwrap();
    }
    c.batch_execute(&format!(
        "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, success, created_at)
         SELECT ({users_sql})[g % 8 + 1], '{k2}', 'gpt-4o-mini', 10, 0.25, g % 4 <> 0, '{DAY} 11:00+00'
           FROM generate_series(1, 40) g",
        k2 = key(2)
    ))
    .unwrap();
    let mut copy = String::new();
    for u in &users {
        for _ in 0..2 {
            copy.push_str(&format!(
                "{u}\t{}\tclaude\t5\t0.1\t{DAY} 12:00+00\n",
                key(3)
            ));
        }
    }
    let mut w = c
        .copy_in("COPY usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, created_at) FROM STDIN")
        .unwrap();
    std::io::Write::write_all(&mut w, copy.as_bytes()).unwrap();
    assert_eq!(w.finish().unwrap(), 16);
    let mut tx = c.transaction().unwrap();
    tx.execute(
        "INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, created_at)
         VALUES ($1::text::uuid, 'gpt-4o', 1000, 99, $2::text::timestamptz)",
        &[&users[0], &format!("{DAY} 12:30+00")],
    )
    .unwrap();
    tx.rollback().unwrap();
    // Through each worker: Citus sends every row to its user's shard, on
    // whichever node that is.
    for (worker, tokens, cost, k) in [
        (port + 1, 7, "0.05", Some(key(1))),
        (port + 2, 3, "0.01", None),
    ] {
        let mut wc = connect(worker);
        wc.execute(
            "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, created_at)
             SELECT u, $2::text::uuid, 'gpt-4o', $3, $4::text::numeric, $5::text::timestamptz
               FROM unnest($1::text[]::uuid[]) u",
            &[&users, &k, &tokens, &cost, &format!("{DAY} 13:00+00")],
        )
        .unwrap();
    }
    wait_until_every_node_folded(port);

    // Per user: 1 + 5 + 2 + 1 + 1 calls; users 1 and 5 have the five failed
    // calls of the multi-row statement (g % 4 = 0 gives g % 8 in {0, 4}).
    let expected: Vec<String> = users
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let ok = if i == 0 || i == 4 { 5 } else { 10 };
            format!("{u} {DAY} 10 {ok} 170 2.01")
        })
        .collect();
    let daily = "SELECT d.user_id || ' ' || d.date || ' ' || (d.log_data->>'api_call_count') || ' '
                        || (d.log_data->'shared_service_usage'->>'successful_calls') || ' '
                        || (d.log_data->'shared_service_usage'->>'tokens_used') || ' '
                        || trim_scale((d.log_data->'shared_service_usage'->>'estimated_cost')::numeric)
                   FROM usage_agg.daily_logs d WHERE d.user_id = ANY ($1::text[]::uuid[]) ORDER BY d.user_id";
    assert_eq!(texts(&mut c, daily, &[&users]), expected);
    // The same from a GROUP BY over the detail (Citus runs it on the shards).
    let detail = "SELECT k.user_id || ' ' || (k.created_at AT TIME ZONE 'UTC')::date || ' ' || count(*) || ' '
                         || count(*) FILTER (WHERE k.success) || ' ' || sum(k.tokens_used) || ' '
                         || trim_scale(sum(k.cost_estimate))
                    FROM usage_agg.key_usage_logs k WHERE k.user_id = ANY ($1::text[]::uuid[])
                   GROUP BY k.user_id, (k.created_at AT TIME ZONE 'UTC')::date ORDER BY k.user_id";
    assert_eq!(texts(&mut c, detail, &[&users]), expected);

    // Per key (distributed by key, written by both workers' appliers) and for
    // the whole service (a reference table).
    let keys: Vec<String> = (1..=3).map(key).collect();
    assert_eq!(
        texts(
            &mut c,
            "SELECT k.shared_key_id || ' ' || (k.log_data->>'total_calls') || ' ' || (k.log_data->>'successful_calls')
                    || ' ' || (k.log_data->>'tokens_used') || ' ' || trim_scale((k.log_data->>'estimated_cost')::numeric)
                    || ' ' || (k.log_data->>'users')
               FROM usage_agg.key_daily_logs k WHERE k.shared_key_id = ANY ($1::text[]::uuid[]) AND k.date = $2::text::date
              ORDER BY k.shared_key_id",
            &[&keys, &DAY]
        ),
        vec![
            format!("{} 16 16 856 4.4 8", key(1)),
            format!("{} 40 30 400 10 8", key(2)),
            format!("{} 16 16 80 1.6 8", key(3)),
        ]
    );
    assert_eq!(
        scalar_text(
            &mut c,
            &format!(
                "SELECT (log_data->>'total_calls') || ' ' || (log_data->>'tokens_used') || ' '
                        || trim_scale((log_data->>'estimated_cost')::numeric)
                   FROM usage_agg.service_daily_logs WHERE date = '{DAY}'"
            )
        ),
        Some("80 1360 16.08".to_string())
    );
    // A reader on the coordinator.
    assert_eq!(
        texts(
            &mut c,
            "SELECT period || ' ' || calls || ' ' || failed || ' ' || tokens || ' ' || trim_scale(cost)
               FROM usage_agg.usage_summary($1::text::uuid, $2::text::timestamptz)",
            &[&users[0], &format!("{DAY} 23:00+00")]
        ),
        vec!["today 10 5 170 2.01", "month 10 5 170 2.01", "all_time 10 5 170 2.01"]
    );
    // The hourly tier: four hours per user.
    let hours = user_hours(&mut c, &users, false);
    assert_eq!(hours.len(), 32);
    assert_eq!(hours, user_hours(&mut c, &users, true));
}

#[test]
fn a_request_id_is_unique_per_user_and_counts_once() {
    let Some(port) = citus_port("a_request_id_is_unique_per_user_and_counts_once") else {
        return;
    };
    distributed(port);
    let (a, b) = (user(101), user(102));
    let insert = "INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, request_id, created_at)
                  VALUES ($1::text::uuid, 'gpt-4o', 10, 0.5, 'req-1', $2::text::timestamptz) ON CONFLICT DO NOTHING";
    // A day of its own: the service's day row counts every user's calls.
    let at = "2026-11-21 09:00+00".to_string();
    let mut c = connect(port);
    let mut w1 = connect(port + 1);
    let mut w2 = connect(port + 2);
    // The same call retried through the coordinator and both workers.
    assert_eq!(c.execute(insert, &[&a, &at]).unwrap(), 1);
    assert_eq!(w1.execute(insert, &[&a, &at]).unwrap(), 0);
    assert_eq!(w2.execute(insert, &[&a, &at]).unwrap(), 0);
    // Another user's request_id is another call.
    assert_eq!(w1.execute(insert, &[&b, &at]).unwrap(), 1);
    // Without ON CONFLICT, a replay is a unique violation naming the key.
    let e = db_error(c.execute(
        "INSERT INTO usage_agg.key_usage_logs (user_id, request_id) VALUES ($1::text::uuid, 'req-1')",
        &[&a],
    ));
    assert_eq!(e.code().code(), "23505");
    // (Citus reports the worker's error, which names the shard's index,
    // key_usage_logs_request_id_key_<shard id>.)
    assert!(
        e.message().starts_with(
            "duplicate key value violates unique constraint \"key_usage_logs_request_id_key_"
        ),
        "{e:?}"
    );
    assert_eq!(
        e.detail(),
        Some(format!("Key (user_id, request_id)=({a}, req-1) already exists.").as_str())
    );
    wait_until_every_node_folded(port);
    assert_eq!(
        texts(
            &mut c,
            "SELECT user_id || ' ' || (log_data->>'api_call_count') FROM usage_agg.daily_logs
              WHERE user_id IN ($1::text::uuid, $2::text::uuid) ORDER BY user_id",
            &[&a, &b]
        ),
        vec![format!("{a} 1"), format!("{b} 1")]
    );
}

#[test]
fn sync_plan_quotas_gives_members_their_plans_new_quota() {
    let Some(port) = citus_port("sync_plan_quotas_gives_members_their_plans_new_quota") else {
        return;
    };
    distributed(port);
    let mut c = connect(port);
    let members = [user(201), user(202), user(203)];
    for u in &members {
        c.execute(
            "SELECT usage_agg.set_membership($1::text::uuid, 'plus')",
            &[u],
        )
        .unwrap();
    }
    let quotas =
        "SELECT string_agg(monthly_quota::text, ' ' ORDER BY user_id) FROM usage_agg.quotas
                   WHERE user_id = ANY ($1::text[]::uuid[])";
    let members: Vec<String> = members.to_vec();
    assert_eq!(texts(&mut c, quotas, &[&members]), vec!["1000 1000 1000"]);
    // The plan's trigger fires on each node's shard of quota_plans, where it
    // cannot update the distributed quotas: the members keep the old quota
    // until sync_plan_quotas().
    c.batch_execute(
        "UPDATE usage_agg.quota_plans SET monthly_quota = 1200 WHERE membership_level = 'plus'",
    )
    .unwrap();
    assert_eq!(texts(&mut c, quotas, &[&members]), vec!["1000 1000 1000"]);
    assert_eq!(scalar_i64(&mut c, "SELECT usage_agg.sync_plan_quotas()"), 3);
    assert_eq!(texts(&mut c, quotas, &[&members]), vec!["1200 1200 1200"]);
    assert_eq!(scalar_i64(&mut c, "SELECT usage_agg.sync_plan_quotas()"), 0);
}

#[test]
fn a_shard_moved_to_the_other_worker_keeps_folding() {
    let Some(port) = citus_port("a_shard_moved_to_the_other_worker_keeps_folding") else {
        return;
    };
    distributed(port);
    let (u, k) = (user(301), key(301));
    let day = "2026-11-22";
    let insert = "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, created_at)
                  SELECT $1::text::uuid, $2::text::uuid, 'gpt-4o', 10, 0.5, $3::text::timestamptz FROM generate_series(1, $4)";
    let mut c = connect(port);
    c.execute(insert, &[&u, &k, &format!("{day} 08:00+00"), &3i32])
        .unwrap();
    wait_until_every_node_folded(port);
    let from = worker_of(&mut c, &u);
    let to = if from == i32::from(port) + 1 {
        from + 1
    } else {
        from - 1
    };
    // Moves the user's shard and every shard colocated with it (its day rows
    // among them); block_writes: these servers have no logical decoding.
    c.execute(
        "SELECT citus_move_shard_placement(
                    get_shard_id_for_distribution_column('usage_agg.key_usage_logs', $1::text::uuid),
                    '127.0.0.1', $2, '127.0.0.1', $3, shard_transfer_mode => 'block_writes')",
        &[&u, &from, &to],
    )
    .unwrap();
    assert_eq!(worker_of(&mut c, &u), to);
    c.execute(insert, &[&u, &k, &format!("{day} 09:00+00"), &2i32])
        .unwrap();
    connect(to as u16)
        .execute(insert, &[&u, &k, &format!("{day} 10:00+00"), &1i32])
        .unwrap();
    wait_until_every_node_folded(port);
    assert_eq!(
        texts(
            &mut c,
            "SELECT (log_data->>'api_call_count') || ' ' || (log_data->'shared_service_usage'->>'tokens_used') || ' '
                    || trim_scale((log_data->'shared_service_usage'->>'estimated_cost')::numeric)
               FROM usage_agg.daily_logs WHERE user_id = $1::text::uuid AND date = $2::text::date",
            &[&u, &day]
        ),
        vec!["6 60 3"]
    );
    // The key's day: one user, not one per node that folded.
    assert_eq!(
        texts(
            &mut c,
            "SELECT (log_data->>'total_calls') || ' ' || (log_data->>'users') FROM usage_agg.key_daily_logs
              WHERE shared_key_id = $1::text::uuid AND date = $2::text::date",
            &[&k, &day]
        ),
        vec!["6 1"]
    );
}

#[test]
fn corrections_fold_exactly_per_user_key_and_service_day() {
    let Some(port) = citus_port("corrections_fold_exactly_per_user_key_and_service_day") else {
        return;
    };
    distributed(port);
    let users: Vec<String> = (401..=404).map(user).collect();
    let k = key(401);
    let day = "2026-11-24";
    let mut c = connect(port);
    // Call g (1..40) at 10:00 + g minutes, of user 401 + g % 4; every third
    // one failed.
    c.execute(
        "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, success, created_at)
         SELECT ($1::text[]::uuid[])[g % 4 + 1], $2::text::uuid, 'gpt-4o', 10, 0.25, g % 3 <> 0,
                $3::text::timestamptz + g * interval '1 minute'
           FROM generate_series(1, 40) g",
        &[&users, &k, &format!("{day} 10:00+00")],
    )
    .unwrap();
    wait_until_every_node_folded(port);
    let at = |hm: &str| format!("{day} {hm}+00");
    // Through the coordinator and through each worker, one user and several.
    c.execute(
        "UPDATE usage_agg.key_usage_logs SET cost_estimate = 1
          WHERE user_id = $1::text::uuid AND created_at < $2::text::timestamptz",
        &[&users[0], &at("10:20")],
    )
    .unwrap();
    connect(port + 1)
        .execute(
            "DELETE FROM usage_agg.key_usage_logs WHERE user_id = $1::text::uuid AND created_at > $2::text::timestamptz",
            &[&users[1], &at("10:30")],
        )
        .unwrap();
    c.execute(
        "UPDATE usage_agg.key_usage_logs SET tokens_used = 20
          WHERE shared_key_id = $1::text::uuid AND created_at < $2::text::timestamptz",
        &[&k, &at("10:10")],
    )
    .unwrap();
    // The newest call of user 401's day and of the key's day.
    connect(port + 2)
        .execute(
            "DELETE FROM usage_agg.key_usage_logs WHERE shared_key_id = $1::text::uuid AND created_at = $2::text::timestamptz",
            &[&k, &at("10:40")],
        )
        .unwrap();
    let mut tx = c.transaction().unwrap();
    tx.execute(
        "DELETE FROM usage_agg.key_usage_logs WHERE shared_key_id = $1::text::uuid",
        &[&k],
    )
    .unwrap();
    tx.rollback().unwrap();
    wait_until_every_node_folded(port);

    let expected = vec![
        format!("{} 9 110 5.25 {day}T10:36:00Z", users[0]),
        format!("{} 8 110 2 {day}T10:29:00Z", users[1]),
        format!("{} 10 120 2.5 {day}T10:38:00Z", users[2]),
        format!("{} 10 120 2.5 {day}T10:39:00Z", users[3]),
    ];
    assert_eq!(
        texts(
            &mut c,
            "SELECT user_id || ' ' || (log_data->>'api_call_count') || ' '
                    || (log_data->'shared_service_usage'->>'tokens_used') || ' '
                    || trim_scale((log_data->'shared_service_usage'->>'estimated_cost')::numeric) || ' '
                    || (log_data->>'last_api_call_at')
               FROM usage_agg.daily_logs WHERE user_id = ANY ($1::text[]::uuid[]) ORDER BY user_id",
            &[&users]
        ),
        expected
    );
    assert_eq!(
        texts(
            &mut c,
            "SELECT user_id || ' ' || count(*) || ' ' || sum(tokens_used) || ' ' || trim_scale(sum(cost_estimate)) || ' '
                    || to_char(max(created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
               FROM usage_agg.key_usage_logs WHERE user_id = ANY ($1::text[]::uuid[]) GROUP BY user_id ORDER BY user_id",
            &[&users]
        ),
        expected
    );
    // The key's day and the service's: 37 calls, the newest call and failure
    // read again from the detail after the newest was deleted.
    let rollup = format!("37 460 12.25 4 {day}T10:39:00Z {day}T10:39:00Z");
    assert_eq!(rollup_day(&mut c, Some(&k), day), Some(rollup.clone()));
    assert_eq!(rollup_day(&mut c, None, day), Some(rollup));
    // The hourly tier after the corrections: each user's 10:00 hour.
    let hours = user_hours(&mut c, &users, false);
    assert_eq!(hours.len(), 4);
    assert_eq!(hours, user_hours(&mut c, &users, true));
}
