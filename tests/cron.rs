//! pg_cron runs what usage_agg schedules: the nightly maintenance and the
//! per-minute apply, in the database named by cron.database_name
//! (usage_agg_test) of the live cluster.
//!
//! A binary of its own: the other retention tests create and drop databases
//! and load the two cores while this one waits for minute boundaries, and
//! once (CI, 2026-12-03) pg_cron started nothing within 190 s while they ran;
//! alone, it has passed every run. A failure prints pg_cron's state and its
//! lines of the server log.
#![cfg(not(feature = "pg_test"))]

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;
use postgres::Client;

/// The lines of the test cluster's server log that contain `needle` (the
/// last 40), when the log is known (`USAGE_AGG_TEST_LOG`).
fn server_log_lines(needle: &str) -> String {
    let Ok(path) = std::env::var("USAGE_AGG_TEST_LOG") else {
        return "(server log not known: USAGE_AGG_TEST_LOG is not set)".to_string();
    };
    match std::fs::read_to_string(&path) {
        Ok(log) => {
            let lines: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            format!("{path}, lines with {needle:?}:\n  {}", tail.join("\n  "))
        }
        Err(e) => format!("(cannot read {path}: {e})"),
    }
}

/// What pg_cron is doing, for a test that waited for it in vain: its
/// launcher, its job runs, and the sessions it opened.
fn pg_cron_state(c: &mut Client) -> String {
    let rows = |c: &mut Client, sql: &str| -> String {
        match c.query(sql, &[]) {
            Ok(rows) => rows
                .iter()
                .map(|r| r.get::<_, Option<String>>(0).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n  "),
            Err(e) => format!("({e})"),
        }
    };
    format!(
        "now: {}\ncron.job:\n  {}\ncron.job_run_details:\n  {}\nsessions:\n  {}",
        rows(c, "SELECT now()::text"),
        rows(c, "SELECT concat_ws(' ', jobid, jobname, schedule, command, database, username, active) FROM cron.job"),
        rows(c, "SELECT concat_ws(' ', jobid, runid, status, start_time, end_time, return_message) FROM cron.job_run_details ORDER BY runid"),
        rows(c, "SELECT concat_ws(' ', pid, backend_type, application_name, state, wait_event_type, wait_event, backend_start, left(query, 80)) FROM pg_stat_activity WHERE backend_type <> 'client backend' OR application_name LIKE 'pg_cron%' OR query LIKE '%usage_agg.maintain%'"),
    )
}

/// Waits until `done` holds, for pg_cron to start a job scheduled every
/// minute: three minute boundaries are ample. `failed` is checked on every
/// round, so a job that ran and failed fails at once with its message.
fn wait_for_pg_cron(
    c: &mut Client,
    what: &str,
    mut done: impl FnMut(&mut Client) -> bool,
    mut failed: impl FnMut(&mut Client) -> Option<String>,
) {
    let deadline = Instant::now() + Duration::from_secs(190);
    while !done(c) {
        assert_eq!(failed(c), None, "pg_cron ran {what} and it failed");
        assert!(
            Instant::now() < deadline,
            "pg_cron did not run {what} within 190 s\n{}\n{}",
            pg_cron_state(c),
            server_log_lines("cron")
        );
        thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn pg_cron_schedules_and_runs_maintenance() {
    // pg_cron lives in the database named by cron.database_name (usage_agg_test).
    let mut c = Client::connect(&dsn_for("usage_agg_test"), postgres::NoTls)
        .expect("connect usage_agg_test");
    c.batch_execute(
        "CREATE EXTENSION IF NOT EXISTS pg_cron;
         DROP EXTENSION IF EXISTS usage_agg CASCADE;
         CREATE EXTENSION usage_agg;
         DELETE FROM cron.job_run_details;",
    )
    .unwrap();
    // Every wait below needs pg_cron's launcher connected to this database.
    let launcher_deadline = Instant::now() + Duration::from_secs(30);
    while scalar_i64(
        &mut c,
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_cron launcher' AND datname = current_database()",
    ) != 1
    {
        assert!(
            Instant::now() < launcher_deadline,
            "pg_cron's launcher is not connected to usage_agg_test\n{}",
            pg_cron_state(&mut c)
        );
        thread::sleep(Duration::from_millis(500));
    }
    let id = scalar_i64(&mut c, "SELECT usage_agg.schedule_maintenance()");
    assert_eq!(
        scalar_i64(&mut c, "SELECT usage_agg.schedule_maintenance()"),
        id
    );
    let job = |c: &mut Client| -> Vec<String> {
        texts(
            c,
            "SELECT jobid || ' ' || jobname || ' ' || schedule || ' ' || command || ' ' || database FROM cron.job",
            &[],
        )
    };
    assert_eq!(
        job(&mut c),
        vec![format!(
            "{id} usage_agg_maintenance 17 3 * * * CALL usage_agg.maintain() usage_agg_test"
        )]
    );
    assert_eq!(
        sqlstate(c.query_one("SELECT usage_agg.schedule_maintenance('every night')", &[])),
        "22023"
    );
    assert_eq!(
        sqlstate(c.query_one("SELECT usage_agg.schedule_maintenance(NULL)", &[])),
        "22023"
    );

    // The command the job holds works when run by hand ...
    let command = scalar_text(&mut c, "SELECT command FROM cron.job").unwrap();
    c.batch_execute(&command).unwrap();
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM usage_agg.maintenance_runs WHERE ok"
        ),
        8
    );
    // ... and when pg_cron runs it: every minute, so within about a minute.
    assert_eq!(
        scalar_i64(&mut c, "SELECT usage_agg.schedule_maintenance('* * * * *')"),
        id
    );
    // pg_cron starts jobs on minute boundaries: three of them is ample.
    let succeeded = format!(
        "SELECT count(*) FROM cron.job_run_details WHERE jobid = {id} AND status = 'succeeded'"
    );
    let failed = format!(
        "SELECT string_agg(status || ': ' || coalesce(return_message, ''), '; ') FROM cron.job_run_details WHERE jobid = {id} AND status = 'failed'"
    );
    wait_for_pg_cron(
        &mut c,
        "the maintenance job",
        |c| scalar_i64(c, &succeeded) > 0,
        |c| scalar_text(c, &failed),
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM usage_agg.maintenance_runs WHERE ok"
        ),
        16
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM usage_agg.maintenance_health WHERE NOT overdue AND last_run_ok AND NOT alert"
        ),
        8
    );

    assert!(c
        .query_one("SELECT usage_agg.unschedule_maintenance()", &[])
        .unwrap()
        .get::<_, bool>(0));
    assert_eq!(job(&mut c), Vec::<String>::new());
    assert!(!c
        .query_one("SELECT usage_agg.unschedule_maintenance()", &[])
        .unwrap()
        .get::<_, bool>(0));

    // Without the background applier (this cluster has none), the per-key
    // deltas of immediate statements wait for an apply: pg_cron runs one.
    c.batch_execute(
        "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, cost_estimate)
         VALUES ('c1000000-0000-0000-0000-000000000001', 'c2000000-0000-0000-0000-000000000001', 0.5)",
    )
    .unwrap();
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.pending_key_deltas"),
        2
    );
    // Every minute (the default; pg_cron 1.4 of Debian's PostgreSQL 15 has no
    // second schedules).
    let apply_job = scalar_i64(&mut c, "SELECT usage_agg.schedule_apply()");
    assert_eq!(
        job(&mut c),
        vec![format!(
            "{apply_job} usage_agg_apply * * * * * SELECT usage_agg.apply_pending_deltas() usage_agg_test"
        )]
    );
    let apply_failed = format!(
        "SELECT string_agg(status || ': ' || coalesce(return_message, ''), '; ') FROM cron.job_run_details WHERE jobid = {apply_job} AND status = 'failed'"
    );
    wait_for_pg_cron(
        &mut c,
        "the apply job",
        |c| scalar_i64(c, "SELECT count(*) FROM usage_agg.pending_key_deltas") == 0,
        |c| scalar_text(c, &apply_failed),
    );
    assert_eq!(
        scalar_text(&mut c, "SELECT (log_data->>'total_calls') || ' ' || (log_data->>'estimated_cost') FROM usage_agg.key_daily_logs"),
        Some("1 0.5".to_string())
    );
    assert_eq!(
        sqlstate(c.query_one("SELECT usage_agg.schedule_apply('')", &[])),
        "22023"
    );
    assert!(c
        .query_one("SELECT usage_agg.unschedule_apply()", &[])
        .unwrap()
        .get::<_, bool>(0));
    assert_eq!(job(&mut c), Vec::<String>::new());
}
