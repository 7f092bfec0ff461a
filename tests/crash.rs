//! The server is killed with SIGKILL in the middle of a many-client insert and
//! quota storm, then restarted (WAL recovery): the aggregates still equal the
//! detail and the quota tables agree with each other.
//!
//! Runs against the cluster that preloads usage_agg (scripts/test.sh starts it
//! and sets USAGE_AGG_APPLIER_PORT), since it kills the server: the storm runs in
//! immediate mode and in the default mode with the background applier, which
//! must be back after the restart and fold what was pending.
#![cfg(not(feature = "pg_test"))]

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use postgres::{Client, NoTls};

fn crash_dsn(db: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user=postgres dbname={db}",
        applier_port()
    )
}

fn cluster(action: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/crash_restart.sh");
    let out = Command::new("bash")
        .args([
            script,
            action,
            &std::env::var("USAGE_AGG_APPLIER_CLUSTER")
                .expect("USAGE_AGG_APPLIER_CLUSTER is not set"),
        ])
        .output()
        .expect("run crash_restart.sh");
    assert!(
        out.status.success(),
        "crash_restart.sh {action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn storm(mode: &str) {
    let mut admin = Client::connect(&crash_dsn("postgres"), NoTls).unwrap();
    admin
        .batch_execute("DROP DATABASE IF EXISTS crash WITH (FORCE)")
        .unwrap();
    admin.batch_execute("CREATE DATABASE crash").unwrap();
    let mut c = Client::connect(&crash_dsn("crash"), NoTls).unwrap();
    c.batch_execute(&format!(
        "CREATE EXTENSION usage_agg; UPDATE usage_agg.config SET fold_mode = {mode};
         UPDATE usage_agg.quota_plans SET monthly_quota = 100000000 WHERE membership_level = 'free';"
    ))
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..16)
        .map(|i| {
            let stop = stop.clone();
            let done = done.clone();
            thread::spawn(move || {
                let Ok(mut w) = Client::connect(&crash_dsn("crash"), NoTls) else { return };
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let user = if n.is_multiple_of(2) {
                        "c0000000-0000-0000-0000-000000000000".to_string()
                    } else {
                        format!("c0000000-0000-0000-0000-{i:012}")
                    };
                    let r = match i % 4 {
                        // single-row inserts, half on one hot user
                        0 | 1 => w.execute(
                            "INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate)
                             VALUES ($1::text::uuid, 'm', 3, 0.001)",
                            &[&user],
                        ),
                        // multi-row statements and corrections
                        2 => w
                            .batch_execute(&format!(
                                "INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate)
                                 SELECT '{user}', 'bulk', 1, 0.01 FROM generate_series(1, 100);
                                 UPDATE usage_agg.key_usage_logs SET cost_estimate = 0.02
                                  WHERE id = (SELECT id FROM usage_agg.key_usage_logs WHERE user_id = '{user}' LIMIT 1);"
                            ))
                            .map(|_| 0),
                        // quota consumption with request ids, and refunds
                        _ => w
                            .batch_execute(&format!(
                                "SELECT usage_agg.try_consume_quota('{user}', 1, NULL, 'q-{i}-{n}');
                                 SELECT usage_agg.refund_quota('q-{i}-{}') WHERE {n} % 5 = 0;",
                                n - 1
                            ))
                            .map(|_| 0),
                    };
                    match r {
                        Ok(_) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => return, // the server went away
                    }
                }
            })
        })
        .collect();
    // Let the storm build up, then kill the server in the middle of it.
    while done.load(Ordering::Relaxed) < 2000 {
        thread::sleep(Duration::from_millis(20));
    }
    cluster("kill");
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    cluster("start");

    let mut c = Client::connect(&crash_dsn("crash"), NoTls).unwrap();
    let detail = scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.key_usage_logs");
    assert!(
        detail > 1000,
        "the storm wrote {detail} calls before the crash"
    );
    assert_eq!(
        verify(&mut c, "2000-01-01", "2100-01-01"),
        Vec::<String>::new()
    );
    // The applier is back after the restart and folds what was pending.
    wait_for(&mut c, "the applier after the restart", |c| {
        scalar_text(c, "SELECT applier_running::text FROM usage_agg.fold_status").as_deref()
            == Some("true")
    });
    wait_until_folded(&mut c);
    assert_eq!(
        verify(&mut c, "2000-01-01", "2100-01-01"),
        Vec::<String>::new()
    );
    assert_eq!(group_by_mismatches(&mut c), 0);
    // Quotas: used = granted and not refunded; total = all granted not refunded.
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM usage_agg.quotas q
              WHERE q.monthly_used <> (SELECT coalesce(sum(l.amount), 0) FROM usage_agg.quota_usage_logs l
                                        WHERE l.user_id = q.user_id AND l.refunded_at IS NULL)
                 OR q.total_used <> (SELECT coalesce(sum(l.amount), 0) FROM usage_agg.quota_usage_logs l
                                      WHERE l.user_id = q.user_id AND l.refunded_at IS NULL)"
        ),
        0
    );
    assert!(scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.quota_usage_logs") > 0);
}

#[test]
fn sigkill_during_a_storm_leaves_everything_consistent() {
    storm("'immediate'");
    // The default of a fresh install: asynchronous, the applier running.
    storm("DEFAULT");
}
