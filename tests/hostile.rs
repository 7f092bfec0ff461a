//! Hostile input: every public function of the SQL surface, called with NULLs,
//! extreme numbers, long and odd strings and extreme dates, either works or
//! raises a clear error (a proper SQLSTATE, never an internal error), writes
//! nothing half-done, and the server stays up. Malformed log_data written by an
//! application gets a clear error or a repair, never a crash.
#![cfg(not(feature = "pg_test"))]

mod common;

use common::*;
use postgres::Client;

/// A harmless value and hostile values, as SQL literals, for an argument type.
fn values_for(ty: &str) -> (&'static str, Vec<&'static str>) {
    match ty {
        "uuid" => (
            "'0e000000-0000-0000-0000-000000000001'::uuid",
            vec!["NULL::uuid", "'00000000-0000-0000-0000-000000000000'::uuid"],
        ),
        "integer" => (
            "1",
            vec![
                "NULL::integer",
                "(-2147483648)::integer",
                "2147483647",
                "0",
                "-1",
            ],
        ),
        "bigint" => (
            "1::bigint",
            vec![
                "NULL::bigint",
                "(-9223372036854775808)::bigint",
                "9223372036854775807::bigint",
            ],
        ),
        "text" => (
            "'x'::text",
            vec![
                "NULL::text",
                "''::text",
                "repeat('x', 1000000)::text",
                "E'\\x01''; DROP TABLE usage_agg.daily_logs; --'::text",
                "'17 3 * * * ; SELECT 1'::text",
            ],
        ),
        "name" => (
            "'ua_hostile_nobody'::name",
            vec![
                "NULL::name",
                "''::name",
                "repeat('y', 100)::name",
                "'x\"; DROP TABLE t; --'::name",
            ],
        ),
        "interval" => (
            "'30 days'::interval",
            vec![
                "NULL::interval",
                "'-1 day'::interval",
                "'0'::interval",
                "'1 microsecond'::interval",
                "'100000 years'::interval",
            ],
        ),
        "date" => (
            "'2026-01-01'::date",
            vec![
                "NULL::date",
                "'infinity'::date",
                "'-infinity'::date",
                "'4713-01-01 BC'::date",
                "'5874897-12-31'::date",
            ],
        ),
        "timestamp with time zone" => (
            "'2026-01-01 00:00+00'::timestamptz",
            vec![
                "NULL::timestamptz",
                "'infinity'::timestamptz",
                "'-infinity'::timestamptz",
                "'4713-01-01 00:00+00 BC'::timestamptz",
                "'294276-12-31 00:00+00'::timestamptz",
            ],
        ),
        "regclass" => (
            "'usage_agg.config'::regclass",
            vec![
                "NULL::regclass",
                "'pg_catalog.pg_class'::regclass",
                "'usage_agg.key_usage_logs'::regclass",
                "'usage_agg.daily_logs'::regclass",
            ],
        ),
        other => panic!("no hostile values for argument type {other}: add them"),
    }
}

/// Runs one call in a transaction that is rolled back; returns the SQLSTATE of
/// its error, or "ok".
fn attempt(c: &mut Client, call: &str) -> String {
    c.batch_execute("BEGIN").unwrap();
    let outcome = match c.batch_execute(&format!("SELECT * FROM {call}")) {
        Ok(()) => "ok".to_string(),
        Err(e) => match e.as_db_error() {
            Some(db) => db.code().code().to_string(),
            None => panic!("{call}: the connection broke: {e}"),
        },
    };
    c.batch_execute("ROLLBACK").unwrap();
    outcome
}

#[test]
fn every_public_function_survives_hostile_arguments() {
    let db = TestDb::new("hostile_arguments");
    let mut c = db.connect();
    // Some data for the functions to work on, and a bound on any call.
    c.batch_execute(
        "INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, request_id, created_at)
         SELECT '0e000000-0000-0000-0000-000000000001', 'm', 1, 0.1, 'x', now() - interval '40 days';
         SELECT usage_agg.consume_quota('0e000000-0000-0000-0000-000000000001', 1, NULL, 'x');
         SET statement_timeout = '20s';",
    )
    .unwrap();
    let functions: Vec<(String, Vec<String>)> = c
        .query(
            "SELECT p.proname::text,
                    coalesce(array_agg(format_type(t.oid, NULL) ORDER BY a.ord) FILTER (WHERE t.oid IS NOT NULL), '{}')
               FROM pg_proc p
               LEFT JOIN LATERAL unnest(p.proargtypes::oid[]) WITH ORDINALITY AS a(typ, ord) ON true
               LEFT JOIN pg_type t ON t.oid = a.typ
              WHERE p.pronamespace = 'usage_agg'::regnamespace AND p.proname !~ '^_'
                AND p.prokind = 'f' AND p.prorettype <> 'trigger'::regtype
              GROUP BY p.oid, p.proname ORDER BY p.proname",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        functions.len() >= 20,
        "found {} public functions",
        functions.len()
    );

    let mut calls = 0;
    let mut failures = Vec::new();
    for (name, types) in &functions {
        let normal: Vec<&str> = types.iter().map(|t| values_for(t).0).collect();
        let mut arg_lists = vec![types.iter().map(|t| values_for(t).1[0]).collect::<Vec<_>>()];
        for (i, t) in types.iter().enumerate() {
            for v in values_for(t).1 {
                let mut args = normal.clone();
                args[i] = v;
                arg_lists.push(args);
            }
        }
        for args in arg_lists {
            let call = format!("usage_agg.{name}({})", args.join(", "));
            let outcome = attempt(&mut c, &call);
            calls += 1;
            // XX000 is an internal error, 57014 a call that ran into the timeout,
            // 08xxx/57Pxx a broken connection or a crashed server.
            if outcome == "XX000"
                || outcome == "57014"
                || outcome.starts_with("08")
                || outcome.starts_with("57P")
            {
                failures.push(format!("{call} -> {outcome}"));
            }
        }
    }
    assert_eq!(failures, Vec::<String>::new());
    assert!(calls > 100, "{calls} calls");
    // The server is up and nothing was half-written.
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.key_usage_logs"),
        1
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT monthly_used::bigint FROM usage_agg.quotas"),
        1
    );
    assert_eq!(
        verify(&mut c, "2000-01-01", "2100-01-01"),
        Vec::<String>::new()
    );
}

#[test]
fn malformed_log_data_gets_a_clear_error_or_a_repair() {
    let db = TestDb::new("hostile_log_data");
    let mut c = db.connect();
    let malformed = [
        "'\"a string\"'",
        "'[]'",
        "'null'",
        "'{\"api_call_count\": \"many\"}'",
        "'{\"api_call_count\": 1e400}'",
        "'{\"shared_service_usage\": []}'",
        "'{\"shared_service_usage\": {\"by_model\": {\"m\": 5}}}'",
        "'{\"shared_service_usage\": {\"keys_used\": {\"a\": 1}}}'",
        "'{\"shared_service_usage\": {\"estimated_cost\": \"NaN\"}}'",
        "'{\"last_api_call_at\": \"not a time\"}'",
        "'{\"last_api_call_at\": 12}'",
    ];
    for (n, bad) in malformed.iter().enumerate() {
        let user = format!("0b000000-0000-0000-0000-{n:012}");
        c.batch_execute(&format!(
            "INSERT INTO usage_agg.key_usage_logs (user_id, model_used, cost_estimate, created_at)
             VALUES ('{user}', 'm', 1, '2026-04-01 10:00+00');
             UPDATE usage_agg.daily_logs SET log_data = {bad}::jsonb WHERE user_id = '{user}';"
        ))
        .unwrap();
        for call in [
            format!("INSERT INTO usage_agg.key_usage_logs (user_id, model_used, cost_estimate, created_at) VALUES ('{user}', 'm', 1, '2026-04-01 11:00+00')"),
            format!("DELETE FROM usage_agg.key_usage_logs WHERE user_id = '{user}' AND created_at = '2026-04-01 10:00+00'"),
            format!("SELECT * FROM usage_agg.usage_summary('{user}', '2026-04-01 12:00+00')"),
            format!("SELECT * FROM usage_agg.check_usage_limit('{user}', '2026-04-01 12:00+00')"),
            "SELECT * FROM usage_agg.daily_usage".to_string(),
            "SELECT * FROM usage_agg.daily_usage_by_model".to_string(),
            "SELECT * FROM usage_agg.verify_daily_logs('2026-04-01', '2026-04-01')".to_string(),
            "SELECT usage_agg.cleanup_old_daily_logs('1 day')".to_string(),
        ] {
            c.batch_execute("BEGIN").unwrap();
            if let Err(e) = c.batch_execute(&call) {
                let db_err = e
                    .as_db_error()
                    .unwrap_or_else(|| panic!("{bad}: {call}: the connection broke: {e}"));
                let code = db_err.code().code();
                assert!(
                    code != "XX000" && !code.starts_with("08") && !code.starts_with("57"),
                    "{bad}: {call}: {code} {}",
                    db_err.message()
                );
                // The fold names the broken row and field.
                if code == "XX001" && call.contains("key_usage_logs") {
                    assert!(db_err.message().contains(&user), "{}", db_err.message());
                }
            }
            c.batch_execute("ROLLBACK").unwrap();
        }
        // rebuild_daily_logs repairs the day, keeping nothing broken.
        c.batch_execute("SELECT usage_agg.rebuild_daily_logs('2026-04-01', '2026-04-01')")
            .unwrap();
        assert_eq!(
            scalar_text(
                &mut c,
                &format!("SELECT (log_data->>'api_call_count') || ' ' || (log_data->'shared_service_usage'->>'estimated_cost') FROM usage_agg.daily_logs WHERE user_id = '{user}'")
            ),
            Some("1 1".to_string()),
            "{bad}"
        );
    }
    assert_eq!(
        verify(&mut c, "2026-04-01", "2026-04-01"),
        Vec::<String>::new()
    );
}
