//! On a streaming-replication hot standby (made by the test with
//! `pg_basebackup -R`): the readers, the views, fold_status and
//! verify_daily_logs work and give the primary's numbers; every function that
//! writes (quota_status too: it applies an expired monthly reset) fails with
//! SQLSTATE 25006 (read-only transaction) and changes nothing.
#![cfg(not(feature = "pg_test"))]

mod common;

use std::process::Command;

use common::*;
use postgres::{Client, NoTls};

fn standby(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/standby.sh");
    let out = Command::new("bash")
        .arg(script)
        .args(args)
        .output()
        .expect("run standby.sh");
    assert!(
        out.status.success(),
        "standby.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Stops the standby when the test ends, also by a failure.
struct Standby;

impl Drop for Standby {
    fn drop(&mut self) {
        standby(&["stop"]);
    }
}

#[test]
fn a_hot_standby_answers_reads_and_refuses_writes_with_25006() {
    let db = TestDb::new("standby");
    let mut primary = db.connect();
    let u = "e5000000-0000-0000-0000-000000000001";
    primary
        .batch_execute(&format!(
            "UPDATE usage_agg.quota_plans SET daily_cost_limit = 5 WHERE membership_level = 'free';
             INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, success, created_at)
             SELECT '{u}', 'e6000000-0000-0000-0000-000000000001', 'gpt-4o', 10, 0.25, g % 4 <> 0, '2026-09-10 12:00+00'
               FROM generate_series(1, 8) g;
             SELECT usage_agg.consume_quota('{u}', 3, NULL, 'before-standby');"
        ))
        .unwrap();
    let primary_port = port();
    let port: u16 = primary_port.parse::<u16>().unwrap() + 4;
    standby(&["start", &primary_port, &port.to_string()]);
    let _stop = Standby;
    let mut s = Client::connect(
        &format!(
            "host=127.0.0.1 port={port} user=postgres dbname={}",
            db.name
        ),
        NoTls,
    )
    .expect("connect to the standby");
    assert_eq!(
        scalar_text(&mut s, "SELECT pg_is_in_recovery()::text"),
        Some("true".to_string())
    );
    // Reads give the primary's numbers.
    let reads = |c: &mut Client| -> Vec<String> {
        let mut out: Vec<String> = c
            .query(
                &format!(
                    "SELECT period || ' ' || calls || ' ' || failed || ' ' || tokens || ' ' || cost
                       FROM usage_agg.usage_summary('{u}', '2026-09-10 13:00+00')
                     UNION ALL
                     SELECT 'limit ' || today_cost || ' ' || daily_cost_limit || ' ' || remaining || ' ' || allowed
                       FROM usage_agg.check_usage_limit('{u}', '2026-09-10 13:00+00')
                     UNION ALL
                     SELECT 'view ' || calls || ' ' || failed_calls || ' ' || estimated_cost FROM usage_agg.daily_usage
                     UNION ALL
                     SELECT 'verify ' || count(*) FROM usage_agg.verify_daily_logs('2026-09-01', '2026-09-30')"
                ),
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        out.sort();
        out
    };
    let expected = vec![
        "all_time 8 2 80 2.00".to_string(),
        "limit 2.00 5 3.00 true".to_string(),
        "month 8 2 80 2.00".to_string(),
        "today 8 2 80 2.00".to_string(),
        "verify 0".to_string(),
        "view 8 2 2.00".to_string(),
    ];
    assert_eq!(reads(&mut primary), expected);
    assert_eq!(reads(&mut s), expected);
    assert_eq!(
        scalar_text(
            &mut s,
            "SELECT effective_mode || ' ' || applier_running || ' ' || pending_calls FROM usage_agg.fold_status"
        ),
        Some("immediate false 0".to_string())
    );
    // Writes: a clear read-only error, nothing else.
    for write in [
        format!("SELECT usage_agg.consume_quota('{u}')"),
        format!("SELECT usage_agg.try_consume_quota('{u}')"),
        // quota_status applies an expired monthly reset, so it may write.
        format!("SELECT usage_agg.quota_status('{u}')"),
        "SELECT usage_agg.refund_quota('before-standby')".to_string(),
        format!("SELECT usage_agg.set_membership('{u}', 'pro')"),
        format!("INSERT INTO usage_agg.key_usage_logs (user_id) VALUES ('{u}')"),
        "SELECT usage_agg.apply_pending_deltas()".to_string(),
        "SELECT usage_agg.run_maintenance()".to_string(),
        "SELECT usage_agg.rebuild_daily_logs('2026-09-10', '2026-09-10')".to_string(),
        "UPDATE usage_agg.config SET timezone = 'Asia/Tokyo'".to_string(),
    ] {
        assert_eq!(sqlstate(s.batch_execute(&write)), "25006", "{write}");
    }
    assert_eq!(reads(&mut s), expected);
}
