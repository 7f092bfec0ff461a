//! `#[pg_test]`s: the SQL surface inside one session (each test is rolled back).

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn one<T: pgrx::IntoDatum + pgrx::FromDatum>(sql: &str) -> Option<T> {
        Spi::get_one::<T>(sql).expect("query failed")
    }

    /// The binary jsonb conversion gives what jsonb_in/jsonb_out give, both ways.
    #[pg_test]
    fn jsonb_binary_round_trip() {
        use crate::jsonb::Jsonb;
        let text = r#"{"a": 1, "b": -0.000002, "c": 12345678901234567890.123456789,
                        "d": [1, "x", null, true, false, {"e": []}, [[]]], "f": {},
                        "g": "ünïcødé \" quote \\ back", "h": 1e-7, "": 0, "i": 2.50}"#;
        let parsed: serde_json::Value = serde_json::from_str(text).unwrap();
        // Rust -> binary jsonb equals the server's parse of the same text.
        let same = Spi::get_one_with_args::<bool>(
            "SELECT $1 = $2::jsonb AND $1::text = $2::jsonb::text",
            &[Jsonb(parsed.clone()).into(), text.into()],
        )
        .unwrap();
        assert_eq!(same, Some(true));
        // binary jsonb -> Rust equals serde's parse of the server's text.
        let back = Spi::get_one_with_args::<Jsonb>("SELECT $1::jsonb", &[text.into()])
            .unwrap()
            .unwrap();
        let printed = Spi::get_one_with_args::<String>("SELECT $1::jsonb::text", &[text.into()])
            .unwrap()
            .unwrap();
        assert_eq!(
            back.0,
            serde_json::from_str::<serde_json::Value>(&printed).unwrap()
        );
        assert_eq!(back.0["i"].to_string(), "2.50");
        // A bare scalar and an array at the top level.
        for scalar in ["3.10", "\"s\"", "null", "[1, 2]"] {
            let v: serde_json::Value = serde_json::from_str(scalar).unwrap();
            let ok = Spi::get_one_with_args::<bool>(
                "SELECT $1 = $2::jsonb",
                &[Jsonb(v.clone()).into(), scalar.into()],
            )
            .unwrap();
            assert_eq!(ok, Some(true), "{scalar}");
            let read = Spi::get_one_with_args::<Jsonb>("SELECT $1::jsonb", &[scalar.into()])
                .unwrap()
                .unwrap();
            assert_eq!(read.0, v, "{scalar}");
        }
    }

    #[pg_test]
    fn fold_first_call_of_the_day() {
        Spi::run(
            "INSERT INTO usage_agg.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, created_at)
             VALUES ('00000000-0000-0000-0000-000000000001', '00000000-0000-0000-0000-0000000000aa', 'gpt-4o', 900, 0.01, '2026-01-15 11:45:00+00')",
        )
        .unwrap();
        let doc = one::<pgrx::JsonB>(
            "SELECT log_data FROM usage_agg.daily_logs WHERE user_id = '00000000-0000-0000-0000-000000000001' AND date = '2026-01-15'",
        )
        .unwrap();
        assert_eq!(
            doc.0,
            serde_json::json!({
                "api_call_count": 1,
                "shared_service_usage": {
                    "total_calls": 1, "successful_calls": 1, "failed_calls": 0,
                    "tokens_used": 900, "estimated_cost": 0.01,
                    "keys_used": ["00000000-0000-0000-0000-0000000000aa"],
                    "by_model": {"gpt-4o": {"calls": 1, "tokens": 900, "cost": 0.01}},
                    "by_key": {"00000000-0000-0000-0000-0000000000aa": {"calls": 1, "tokens": 900, "cost": 0.01}}
                },
                "last_api_call_at": "2026-01-15T11:45:00Z"
            })
        );
    }

    #[pg_test]
    fn fold_uses_the_business_time_zone() {
        Spi::run("UPDATE usage_agg.config SET timezone = 'Asia/Shanghai'").unwrap();
        Spi::run(
            "INSERT INTO usage_agg.key_usage_logs (user_id, created_at)
             VALUES ('00000000-0000-0000-0000-000000000002', '2026-11-20 17:30:00+00')",
        )
        .unwrap();
        assert_eq!(
            one::<String>("SELECT date::text FROM usage_agg.daily_logs WHERE user_id = '00000000-0000-0000-0000-000000000002'"),
            Some("2026-11-21".to_string())
        );
    }

    /// Multi-row statements are grouped in Rust (`grouping`), or in SQL when a cost
    /// does not fit an exact i128 sum: both must give, digit for digit, what a
    /// GROUP BY over the detail gives (`_aggregates`), across DST changes and
    /// midnights in the business time zone, with NULL models, keys, tokens and
    /// costs, non-ASCII model names and costs of mixed scales.
    #[pg_test]
    fn statement_grouping_matches_sql_group_by() {
        Spi::run("UPDATE usage_agg.config SET timezone = 'America/New_York'").unwrap();
        for (start, cost_of_the_fallback) in [
            ("2026-03-07 22:00:00-05", None),
            (
                "2026-10-30 21:00:00-04",
                Some("123456789012345678901234567890.123456789"),
            ),
        ] {
            Spi::run_with_args(
                "INSERT INTO usage_agg.key_usage_logs
                        (user_id, shared_key_id, model_used, tokens_used, cost_estimate, success, created_at)
                 SELECT ('00000000-0000-0000-0000-0000000001' || lpad((i % 7)::text, 2, '0'))::uuid,
                        CASE WHEN i % 5 = 0 THEN NULL
                             ELSE ('10000000-0000-0000-0000-00000000000' || (i % 3))::uuid END,
                        CASE WHEN i % 11 = 0 THEN NULL WHEN i % 4 = 0 THEN 'modèle-ü'
                             ELSE 'gpt-' || (i % 3) END,
                        CASE WHEN i % 13 = 0 THEN NULL ELSE i * 7 END,
                        CASE WHEN i = 1000 THEN $2::numeric
                             WHEN i % 17 = 0 THEN NULL
                             WHEN i % 3 = 0 THEN (i * 0.000001)::numeric(12, 6)
                             WHEN i % 3 = 1 THEN round(i / 7.0, 2)
                             ELSE i * 1000 END,
                        i % 9 <> 0,
                        $1::timestamptz + i * interval '7 minutes 13.000017 seconds'
                   FROM generate_series(1, 2000) i",
                &[start.into(), cost_of_the_fallback.into()],
            )
            .unwrap();
        }
        let days = one::<i64>(
            "SELECT count(*) FROM (SELECT DISTINCT user_id, (created_at AT TIME ZONE 'America/New_York')::date
                                     FROM usage_agg.key_usage_logs) s",
        );
        assert_eq!(
            days,
            one::<i64>("SELECT count(*) FROM usage_agg.daily_logs")
        );
        assert!(days.unwrap() > 140, "{days:?}");
        let differing = one::<i64>(
            "SELECT count(*)
               FROM usage_agg.daily_logs d
               FULL JOIN (SELECT * FROM usage_agg._aggregates('2026-03-01', '2026-11-30')
                           WHERE source = 'detail') a
                 ON a.user_id = d.user_id AND a.date = d.date
              WHERE d.log_data::text IS DISTINCT FROM a.log_data::text",
        );
        assert_eq!(differing, Some(0));
        assert_eq!(
            one::<String>(
                "SELECT sum((log_data #>> '{shared_service_usage,estimated_cost}')::numeric)::text
                   FROM usage_agg.daily_logs"
            ),
            one::<String>("SELECT sum(cost_estimate)::text FROM usage_agg.key_usage_logs")
        );
    }

    /// Deferred mode writes small statements' rows into pending_deltas without
    /// SPI (`pending`): every row as the SQL append writes it (time zone, DST,
    /// NULLs, a TOASTed model name), every index entry present; and once the table
    /// carries something that only the executor enforces, the SQL append again.
    #[pg_test]
    fn deferred_append_matches_the_sql_append() {
        Spi::run(
            "UPDATE usage_agg.config SET timezone = 'America/New_York', fold_mode = 'deferred'",
        )
        .unwrap();
        let insert = |rows: i32, first: i32| {
            Spi::run_with_args(
                "INSERT INTO usage_agg.key_usage_logs
                        (user_id, shared_key_id, model_used, tokens_used, cost_estimate, success, created_at)
                 SELECT ('00000000-0000-0000-0000-0000000001' || lpad((i % 3)::text, 2, '0'))::uuid,
                        CASE WHEN i % 5 = 0 THEN NULL ELSE ('10000000-0000-0000-0000-00000000000' || (i % 2))::uuid END,
                        CASE WHEN i % 7 = 0 THEN NULL WHEN i % 7 = 1 THEN 'modèle-ü'
                             WHEN i % 7 = 2 THEN repeat('long-model-', 900) ELSE 'gpt-' || (i % 3) END,
                        CASE WHEN i % 4 = 0 THEN NULL ELSE i * 11 END,
                        CASE WHEN i % 6 = 0 THEN NULL WHEN i % 2 = 0 THEN round(i / 7.0, 6) ELSE i END,
                        i % 9 <> 0,
                        TIMESTAMPTZ '2026-10-31 22:30-04' + i * interval '4 minutes 7.000003 seconds'
                   FROM generate_series($2, $2 + $1 - 1) i",
                &[rows.into(), first.into()],
            )
            .unwrap();
        };
        insert(64, 1); // one statement, across midnight and the end of DST (06:00 UTC)
        insert(1, 65);
        insert(1, 66);
        insert(2, 67);
        const DIFFERENCES: &str = "
            WITH expected AS (
                SELECT user_id, (created_at AT TIME ZONE 'America/New_York')::date AS day, model_used,
                       shared_key_id, 1 AS calls, CASE WHEN success THEN 1 ELSE 0 END AS successful,
                       coalesce(tokens_used, 0)::int8 AS tokens, coalesce(cost_estimate, 0)::text AS cost,
                       created_at AS last_at
                  FROM usage_agg.key_usage_logs),
            pending AS (
                SELECT user_id, day, model_used, shared_key_id, calls, successful, tokens, cost::text, last_at
                  FROM usage_agg.pending_deltas)
            SELECT count(*) FROM ((SELECT * FROM expected EXCEPT ALL SELECT * FROM pending)
                                  UNION ALL (SELECT * FROM pending EXCEPT ALL SELECT * FROM expected)) d";
        assert_eq!(one::<i64>(DIFFERENCES), Some(0));
        assert_eq!(
            one::<i64>("SELECT count(*) FROM usage_agg.pending_deltas"),
            Some(68)
        );
        assert_eq!(
            one::<i64>("SELECT count(DISTINCT day) FROM usage_agg.pending_deltas"),
            Some(2)
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM usage_agg.daily_logs"),
            Some(0)
        );
        // Every heap tuple has its index entry (amcheck's heapallindexed).
        let amcheck = check_pending_index();
        // Readers see the pending rows through the index.
        Spi::run("SET LOCAL enable_seqscan = off").unwrap();
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM usage_agg.pending_deltas
                  WHERE user_id = '00000000-0000-0000-0000-000000000100' AND day = '2026-11-01'"
            ),
            one::<i64>(
                "SELECT count(*) FROM usage_agg.key_usage_logs
                  WHERE user_id = '00000000-0000-0000-0000-000000000100'
                    AND (created_at AT TIME ZONE 'America/New_York')::date = '2026-11-01'"
            )
        );
        Spi::run("RESET enable_seqscan").unwrap();

        // A trigger on pending_deltas: rows go through the executor, which fires it.
        Spi::run(
            "CREATE FUNCTION pg_temp.mark() RETURNS trigger LANGUAGE plpgsql AS
                 $f$ BEGIN NEW.tokens := NEW.tokens + 1000000; RETURN NEW; END $f$;
             CREATE TRIGGER mark BEFORE INSERT ON usage_agg.pending_deltas
                 FOR EACH ROW EXECUTE FUNCTION pg_temp.mark()",
        )
        .unwrap();
        insert(1, 100);
        insert(3, 101);
        assert_eq!(
            one::<i64>("SELECT count(*) FROM usage_agg.pending_deltas WHERE tokens >= 1000000"),
            Some(4)
        );
        Spi::run("DROP TRIGGER mark ON usage_agg.pending_deltas").unwrap();
        // A CHECK constraint (NOT VALID: still checked for new rows): enforced.
        Spi::run(
            "UPDATE usage_agg.pending_deltas SET tokens = tokens - 1000000 WHERE tokens >= 1000000",
        )
        .unwrap();
        Spi::run(
            "ALTER TABLE usage_agg.pending_deltas ADD CONSTRAINT few_tokens CHECK (tokens < 5000) NOT VALID",
        )
        .unwrap();
        let check_error = error_of(
            "INSERT INTO usage_agg.key_usage_logs (user_id, tokens_used)
             VALUES ('00000000-0000-0000-0000-000000000100', 5000)",
        );
        assert_eq!(
            check_error.split('|').take(2).collect::<Vec<_>>(),
            [
                "23514",
                "new row for relation \"pending_deltas\" violates check constraint \"few_tokens\""
            ]
        );
        Spi::run("ALTER TABLE usage_agg.pending_deltas DROP CONSTRAINT few_tokens").unwrap();
        // A unique index: the executor checks it.
        Spi::run(
            "CREATE UNIQUE INDEX one_per_instant ON usage_agg.pending_deltas (user_id, last_at)",
        )
        .unwrap();
        assert_eq!(
            error_of(
                "INSERT INTO usage_agg.key_usage_logs (user_id, created_at)
                 VALUES ('00000000-0000-0000-0000-000000000100', TIMESTAMPTZ '2026-10-31 22:30-04' + 3 * interval '4 minutes 7.000003 seconds')"
            )
            .split('|')
            .next(),
            Some("23505")
        );
        // Back to plain: the direct path again, with all index entries.
        Spi::run("DROP INDEX usage_agg.one_per_instant").unwrap();
        insert(5, 200);
        assert_eq!(one::<i64>(DIFFERENCES), Some(0));
        if amcheck {
            check_pending_index();
        }
    }

    /// amcheck's bt_index_check with heapallindexed on pending_deltas' index;
    /// false (printed) where contrib's amcheck is not installed (the
    /// PostgreSQL 16 wheel has none).
    fn check_pending_index() -> bool {
        if one::<bool>("SELECT EXISTS (SELECT FROM pg_available_extensions WHERE name = 'amcheck')")
            != Some(true)
        {
            println!(
                "skipped amcheck's index check: contrib's amcheck is not installed in this server"
            );
            return false;
        }
        Spi::run("CREATE EXTENSION IF NOT EXISTS amcheck").unwrap();
        Spi::run("SELECT bt_index_check('usage_agg.pending_deltas_user_id_day', true)").unwrap();
        true
    }

    /// The fold reads key_usage_logs' columns in binary form: a column whose type
    /// was changed is refused with 42804 and a hint, in every path, never misread.
    #[pg_test]
    fn a_changed_column_type_is_refused() {
        // The pricing triggers' WHEN clauses name tokens_used, so PostgreSQL
        // refuses the type change while they exist; the fold's own check is
        // what this test is about.
        Spi::run(
            "DROP TRIGGER price_insert ON usage_agg.key_usage_logs;
             DROP TRIGGER price_update ON usage_agg.key_usage_logs;
             ALTER TABLE usage_agg.key_usage_logs ALTER COLUMN tokens_used TYPE bigint",
        )
        .unwrap();
        let expected = [
            "42804",
            "usage_agg: column key_usage_logs.tokens_used has type bigint, the fold needs integer",
            "The fold reads the columns of usage_agg.key_usage_logs in their binary form; their types are fixed by usage_agg.",
            "Change it back: ALTER TABLE usage_agg.key_usage_logs ALTER COLUMN tokens_used TYPE integer;",
        ]
        .join("|");
        let one_row = "INSERT INTO usage_agg.key_usage_logs (user_id, tokens_used) VALUES (gen_random_uuid(), 5)";
        let many_rows = "INSERT INTO usage_agg.key_usage_logs (user_id, tokens_used)
                         SELECT gen_random_uuid(), i FROM generate_series(1, 100) i";
        assert_eq!(error_of(one_row), expected);
        assert_eq!(error_of(many_rows), expected);
        Spi::run("UPDATE usage_agg.config SET fold_mode = 'deferred'").unwrap();
        assert_eq!(error_of(one_row), expected);
        assert_eq!(
            one::<i64>("SELECT count(*) FROM usage_agg.key_usage_logs"),
            Some(0)
        );
        // varchar is read as text is.
        Spi::run(
            "ALTER TABLE usage_agg.key_usage_logs ALTER COLUMN tokens_used TYPE integer,
                                                 ALTER COLUMN model_used TYPE varchar(100)",
        )
        .unwrap();
        Spi::run(one_row).unwrap();
        Spi::run(
            "INSERT INTO usage_agg.key_usage_logs (user_id, model_used) VALUES (gen_random_uuid(), 'm')",
        )
        .unwrap();
        assert_eq!(
            one::<String>("SELECT string_agg(coalesce(model_used, '-') || ':' || tokens, ',' ORDER BY tokens) FROM usage_agg.pending_deltas"),
            Some("m:0,-:5".to_string())
        );
    }

    #[pg_test]
    fn session_time_zone_does_not_change_the_bucket() {
        Spi::run("SET LOCAL TimeZone = 'America/Los_Angeles'").unwrap();
        Spi::run(
            "INSERT INTO usage_agg.key_usage_logs (user_id, created_at)
             VALUES ('00000000-0000-0000-0000-000000000003', '2026-11-20 23:30:00+00')",
        )
        .unwrap();
        assert_eq!(
            one::<String>("SELECT date::text FROM usage_agg.daily_logs WHERE user_id = '00000000-0000-0000-0000-000000000003'"),
            Some("2026-11-20".to_string())
        );
    }

    #[pg_test(error = "usage_agg: invalid time zone \"Mars/Olympus\"")]
    fn invalid_time_zone_is_refused() {
        Spi::run("UPDATE usage_agg.config SET timezone = 'Mars/Olympus'").unwrap();
    }

    #[pg_test(error = "usage_agg: the configuration row cannot be deleted")]
    fn config_row_cannot_be_deleted() {
        Spi::run("DELETE FROM usage_agg.config").unwrap();
    }

    #[pg_test]
    fn money_is_exact() {
        Spi::run(
            "INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate, created_at)
             SELECT '00000000-0000-0000-0000-000000000004', 0.1, '2026-03-01 10:00+00' FROM generate_series(1, 1000)",
        )
        .unwrap();
        Spi::run(
            "INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate, created_at)
             VALUES ('00000000-0000-0000-0000-000000000004', 0.1, '2026-03-01 11:00+00')",
        )
        .unwrap();
        assert_eq!(
            one::<bool>(
                "SELECT (log_data->'shared_service_usage'->>'estimated_cost')::numeric = 100.1
                   FROM usage_agg.daily_logs WHERE user_id = '00000000-0000-0000-0000-000000000004'"
            ),
            Some(true)
        );
        assert_eq!(
            one::<String>(
                "SELECT log_data->'shared_service_usage'->>'estimated_cost'
                   FROM usage_agg.daily_logs WHERE user_id = '00000000-0000-0000-0000-000000000004'"
            ),
            Some("100.1".to_string())
        );
    }

    #[pg_test]
    fn application_keys_survive_folds() {
        Spi::run(
            "INSERT INTO usage_agg.daily_logs (user_id, date, log_data, last_modified)
             VALUES ('00000000-0000-0000-0000-000000000005', '2026-02-02', '{\"conversation_count\": 3, \"upload_count\": 1}', now())",
        )
        .unwrap();
        Spi::run(
            "INSERT INTO usage_agg.key_usage_logs (user_id, tokens_used, created_at)
             VALUES ('00000000-0000-0000-0000-000000000005', 7, '2026-02-02 08:00+00')",
        )
        .unwrap();
        assert_eq!(
            one::<String>(
                "SELECT (log_data->>'conversation_count') || '/' || (log_data->>'upload_count') || '/' || (log_data->>'api_call_count')
                   FROM usage_agg.daily_logs WHERE user_id = '00000000-0000-0000-0000-000000000005'"
            ),
            Some("3/1/1".to_string())
        );
    }

    #[pg_test]
    fn update_and_delete_correct_the_aggregate() {
        Spi::run(
            "INSERT INTO usage_agg.key_usage_logs (id, user_id, model_used, tokens_used, cost_estimate, created_at) VALUES
             ('10000000-0000-0000-0000-000000000001', '00000000-0000-0000-0000-000000000006', 'm', 10, 1.5, '2026-04-01 10:00+00'),
             ('10000000-0000-0000-0000-000000000002', '00000000-0000-0000-0000-000000000006', 'm', 20, 2.5, '2026-04-01 11:00+00')",
        )
        .unwrap();
        Spi::run("UPDATE usage_agg.key_usage_logs SET cost_estimate = 0.5 WHERE id = '10000000-0000-0000-0000-000000000001'").unwrap();
        Spi::run("DELETE FROM usage_agg.key_usage_logs WHERE id = '10000000-0000-0000-0000-000000000002'").unwrap();
        assert_eq!(
            one::<String>(
                "SELECT (log_data->>'api_call_count') || '/' || (log_data->'shared_service_usage'->>'estimated_cost') || '/' || (log_data->>'last_api_call_at')
                   FROM usage_agg.daily_logs WHERE user_id = '00000000-0000-0000-0000-000000000006'"
            ),
            Some("1/0.5/2026-04-01T10:00:00Z".to_string())
        );
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM usage_agg.verify_daily_logs('2026-04-01', '2026-04-01')"
            ),
            Some(0)
        );
    }

    #[pg_test(
        error = "new row for relation \"key_usage_logs\" violates check constraint \"key_usage_logs_cost_estimate_finite_not_negative\""
    )]
    fn nan_cost_is_rejected() {
        Spi::run("INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate) VALUES (gen_random_uuid(), 'NaN')").unwrap();
    }

    #[pg_test(
        error = "new row for relation \"key_usage_logs\" violates check constraint \"key_usage_logs_tokens_used_not_negative\""
    )]
    fn negative_tokens_are_rejected() {
        Spi::run("INSERT INTO usage_agg.key_usage_logs (user_id, tokens_used) VALUES (gen_random_uuid(), -1)").unwrap();
    }

    /// Immediate mode: an addition to a corrupted daily row raises, naming it.
    #[pg_test(
        error = "usage_agg: daily_logs row of user 00000000-0000-0000-0000-000000000007 on 2026-05-05 has a corrupted field \"api_call_count\""
    )]
    fn corrupted_daily_row_names_user_and_date() {
        Spi::run("UPDATE usage_agg.config SET fold_mode = 'immediate'").unwrap();
        Spi::run(
            "INSERT INTO usage_agg.daily_logs (user_id, date, log_data, last_modified)
             VALUES ('00000000-0000-0000-0000-000000000007', '2026-05-05', '{\"api_call_count\": \"abc\"}', now())",
        )
        .unwrap();
        Spi::run(
            "INSERT INTO usage_agg.key_usage_logs (user_id, created_at)
             VALUES ('00000000-0000-0000-0000-000000000007', '2026-05-05 12:00+00')",
        )
        .unwrap();
    }

    /// The default mode with no applier (this test cluster does not preload
    /// usage_agg) folds at once, but a corrupted daily row never makes an
    /// INSERT fail: that (user, day)'s calls wait in pending_deltas, every other
    /// day is folded, and a rebuild of the day folds them from the detail.
    #[pg_test]
    fn auto_mode_records_the_call_despite_a_corrupted_row() {
        assert_eq!(
            one::<String>("SELECT fold_mode FROM usage_agg.config"),
            Some("auto".into())
        );
        assert_eq!(
            one::<String>("SELECT effective_mode FROM usage_agg.fold_status"),
            Some("immediate".into())
        );
        Spi::run(
            "INSERT INTO usage_agg.daily_logs (user_id, date, log_data, last_modified)
             VALUES ('00000000-0000-0000-0000-000000000007', '2026-05-05', '{\"api_call_count\": \"abc\", \"upload_count\": 1}', now())",
        )
        .unwrap();
        Spi::run(
            "INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate, created_at)
             SELECT ('00000000-0000-0000-0000-00000000000' || (i % 2 + 7))::uuid, 0.25, '2026-05-05 12:00+00'
               FROM generate_series(1, 100) i",
        )
        .unwrap();
        // User 8's day was folded; user 7's 50 calls wait, its row untouched.
        assert_eq!(
            one::<i64>("SELECT (log_data->>'api_call_count')::bigint FROM usage_agg.daily_logs WHERE user_id = '00000000-0000-0000-0000-000000000008'"),
            Some(50)
        );
        assert_eq!(
            one::<String>("SELECT log_data::text FROM usage_agg.daily_logs WHERE user_id = '00000000-0000-0000-0000-000000000007'"),
            Some(r#"{"upload_count": 1, "api_call_count": "abc"}"#.into())
        );
        assert_eq!(
            one::<String>("SELECT sum(calls) || ' ' || sum(cost) FROM usage_agg.pending_deltas WHERE user_id = '00000000-0000-0000-0000-000000000007'"),
            Some("50 12.50".into())
        );
        // The applier path skips the day too, and records it.
        assert_eq!(
            one::<i64>("SELECT usage_agg.apply_pending_deltas()"),
            Some(0)
        );
        assert_eq!(
            one::<String>(
                "SELECT user_id || ' ' || day || ' ' || field FROM usage_agg.fold_skipped"
            ),
            Some("00000000-0000-0000-0000-000000000007 2026-05-05 api_call_count".into())
        );
        assert_eq!(
            one::<i64>("SELECT sum(calls) FROM usage_agg.pending_deltas"),
            Some(50)
        );
        assert_eq!(
            one::<i64>("SELECT skipped_days FROM usage_agg.fold_status"),
            Some(1)
        );
        // Repaired by a rebuild: nothing pending or skipped, nothing lost or doubled.
        assert_eq!(
            one::<i64>("SELECT usage_agg.rebuild_daily_logs('2026-05-05', '2026-05-05')"),
            Some(1)
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM usage_agg.pending_deltas"),
            Some(0)
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM usage_agg.fold_skipped"),
            Some(0)
        );
        assert_eq!(
            one::<String>("SELECT log_data->>'api_call_count' || ' ' || (log_data->>'upload_count') || ' ' || (log_data#>>'{shared_service_usage,estimated_cost}') FROM usage_agg.daily_logs WHERE user_id = '00000000-0000-0000-0000-000000000007'"),
            Some("50 1 12.50".into())
        );
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM usage_agg.verify_daily_logs('2026-05-05', '2026-05-05')"
            ),
            Some(0)
        );
    }

    #[pg_test]
    fn verify_reports_and_rebuild_repairs() {
        Spi::run(
            "INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, created_at)
             SELECT '00000000-0000-0000-0000-000000000008', 'm' || (i % 3), i, i / 100.0, '2026-06-01 00:00+00'::timestamptz + i * interval '1 minute'
               FROM generate_series(1, 50) i",
        )
        .unwrap();
        Spi::run(
            "UPDATE usage_agg.daily_logs SET log_data = jsonb_set(log_data || '{\"upload_count\": 2}', '{api_call_count}', '\"abc\"')
              WHERE user_id = '00000000-0000-0000-0000-000000000008'",
        )
        .unwrap();
        assert_eq!(
            one::<String>("SELECT string_agg(field, ',') FROM usage_agg.verify_daily_logs('2026-06-01', '2026-06-01')"),
            Some("api_call_count".to_string())
        );
        assert_eq!(
            one::<i64>("SELECT usage_agg.rebuild_daily_logs('2026-06-01', '2026-06-01')"),
            Some(1)
        );
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM usage_agg.verify_daily_logs('2026-06-01', '2026-06-01')"
            ),
            Some(0)
        );
        assert_eq!(
            one::<String>("SELECT log_data->>'upload_count' FROM usage_agg.daily_logs WHERE user_id = '00000000-0000-0000-0000-000000000008'"),
            Some("2".to_string())
        );
        // A second rebuild finds nothing to change.
        assert_eq!(
            one::<i64>("SELECT usage_agg.rebuild_daily_logs('2026-06-01', '2026-06-01')"),
            Some(0)
        );
    }

    #[pg_test(error = "usage_agg: the day range starts after it ends")]
    fn verify_rejects_a_reversed_range() {
        Spi::run("SELECT * FROM usage_agg.verify_daily_logs('2026-06-02', '2026-06-01')").unwrap();
    }

    /// Runs `sql` and returns "SQLSTATE|message|detail|hint" of the error it raises.
    fn error_of(sql: &str) -> String {
        Spi::run(
            "CREATE OR REPLACE FUNCTION pg_temp.error_of(q text) RETURNS text LANGUAGE plpgsql AS $f$
             DECLARE s text; m text; d text; h text;
             BEGIN
                 EXECUTE q;
                 RETURN 'no error';
             EXCEPTION WHEN OTHERS THEN
                 GET STACKED DIAGNOSTICS s = RETURNED_SQLSTATE, m = MESSAGE_TEXT, d = PG_EXCEPTION_DETAIL, h = PG_EXCEPTION_HINT;
                 RETURN s || '|' || m || '|' || d || '|' || h;
             END $f$",
        )
        .unwrap();
        Spi::get_one_with_args::<String>("SELECT pg_temp.error_of($1)", &[sql.into()])
            .unwrap()
            .unwrap()
    }

    #[pg_test]
    fn quota_first_call_creates_a_free_row() {
        assert_eq!(
            one::<String>(
                "SELECT membership_level || ' ' || monthly_quota || ' ' || monthly_used || ' ' || remaining || ' ' || total_used || ' ' || allowed
                   FROM usage_agg.consume_quota('90000000-0000-0000-0000-000000000001')"
            ),
            Some("free 100 1 99 1 true".to_string())
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM usage_agg.quota_usage_logs"),
            Some(1)
        );
    }

    #[pg_test]
    fn quota_exceeded_is_reported_exactly() {
        Spi::run("SELECT usage_agg.set_membership('90000000-0000-0000-0000-000000000003', 'plus')")
            .unwrap();
        Spi::run("SELECT usage_agg.consume_quota('90000000-0000-0000-0000-000000000003', 999)")
            .unwrap();
        Spi::run("UPDATE usage_agg.quotas SET quota_reset_at = '2099-01-01 00:00+00'").unwrap();
        assert_eq!(
            error_of("SELECT usage_agg.consume_quota('90000000-0000-0000-0000-000000000003', 2)"),
            "UAQ01|QUOTA_EXCEEDED: user 90000000-0000-0000-0000-000000000003 requested 2 but only 1 of 1000 remain this month\
             |requested: 2, remaining: 1, monthly_quota: 1000, monthly_used: 999, plan: plus, resets at: 2099-01-01T00:00:00Z\
             |Upgrade to plan pro (3000 a month), or wait until 2099-01-01T00:00:00Z."
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM usage_agg.quota_usage_logs"),
            Some(1)
        );
        assert_eq!(
            one::<String>("SELECT allowed::text FROM usage_agg.try_consume_quota('90000000-0000-0000-0000-000000000003', 2)"),
            Some("false".to_string())
        );
    }

    #[pg_test]
    fn quota_bad_amount_is_22023() {
        assert_eq!(
            error_of("SELECT usage_agg.consume_quota('90000000-0000-0000-0000-000000000004', 0)"),
            "22023|usage_agg: amount must be between 1 and 1000000|amount = 0|"
        );
    }

    #[pg_test]
    fn quota_request_id_is_idempotent_and_refund_once() {
        Spi::run("SELECT usage_agg.consume_quota('90000000-0000-0000-0000-000000000005', 4, 's', 'req-a')").unwrap();
        assert_eq!(
            one::<String>(
                "SELECT monthly_used || ' ' || replayed FROM usage_agg.consume_quota('90000000-0000-0000-0000-000000000005', 4, 's', 'req-a')"
            ),
            Some("4 true".to_string())
        );
        assert_eq!(
            one::<String>(
                "SELECT monthly_used || ' ' || allowed FROM usage_agg.refund_quota('req-a')"
            ),
            Some("0 true".to_string())
        );
        assert_eq!(
            one::<String>(
                "SELECT monthly_used || ' ' || allowed FROM usage_agg.refund_quota('req-a')"
            ),
            Some("0 false".to_string())
        );
    }
}
