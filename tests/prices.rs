//! Token kinds and table prices over real connections: tokens_used from the
//! kinds, contradictions refused, exact costs for mixed kinds from
//! usage_agg.model_prices (a price change in the middle of a business day of a
//! non-UTC time zone), unpriced calls counted and listed, then priced by
//! reprice_calls() over a range with corrections and application costs, bad
//! prices refused, and the roles: an application's inserts are priced, it
//! cannot change prices or reprice.
#![cfg(not(feature = "pg_test"))]

mod common;

use common::*;
use postgres::Client;

const U1: &str = "e1000000-0000-0000-0000-000000000001";
const U2: &str = "e1000000-0000-0000-0000-000000000002";

/// Each call of U1 and U2 as "request_id tokens_used cost source", in
/// request_id order; source is the price row's valid_from (UTC) or "app".
fn calls(c: &mut Client) -> Vec<String> {
    texts(
        c,
        "SELECT request_id || ' ' || coalesce(tokens_used::text, '-') || ' ' || coalesce(cost_estimate::text, 'NULL') || ' '
                || coalesce(to_char(price_valid_from AT TIME ZONE 'UTC', 'MM-DD HH24:MI'), 'app')
           FROM usage_agg.key_usage_logs ORDER BY request_id",
        &[],
    )
}

/// The day rows of a user: "date calls tokens cost".
fn days(c: &mut Client, user: &str) -> Vec<String> {
    texts(
        c,
        "SELECT date || ' ' || (log_data->>'api_call_count') || ' ' || (log_data#>>'{shared_service_usage,tokens_used}')
                || ' ' || (log_data#>>'{shared_service_usage,estimated_cost}')
           FROM usage_agg.daily_logs WHERE user_id = $1::text::uuid ORDER BY date",
        &[&user],
    )
}

/// The aggregates agree with the detail (verify and an independent GROUP BY).
fn exact(c: &mut Client) {
    assert_eq!(verify(c, "2026-01-01", "2026-12-31"), Vec::<String>::new());
    assert_eq!(group_by_mismatches(c), 0);
}

fn insert(c: &mut Client, values: &str) {
    c.batch_execute(&format!(
        "INSERT INTO usage_agg.key_usage_logs
             (request_id, user_id, model_used, created_at, tokens_used, input_tokens, output_tokens,
              cache_read_tokens, cache_write_tokens, cost_estimate)
         VALUES {values}"
    ))
    .unwrap();
}

#[test]
fn tokens_used_follows_the_kinds_and_contradictions_are_refused() {
    let db = TestDb::new("prices_kinds");
    let mut c = db.connect();
    insert(
        &mut c,
        &format!(
            "('k1', '{U1}', 'm', '2026-11-20 10:00Z', NULL, 100, 20, 300, 4, 0.1),
             ('k2', '{U1}', 'm', '2026-11-20 10:01Z', 424, 100, 20, 300, 4, 0.1),
             ('k3', '{U1}', 'm', '2026-11-20 10:02Z', NULL, NULL, 7, NULL, NULL, 0.1),
             ('k4', '{U1}', 'm', '2026-11-20 10:03Z', 50, NULL, NULL, NULL, NULL, 0.1),
             ('k5', '{U1}', 'm', '2026-11-20 10:04Z', NULL, NULL, NULL, NULL, NULL, 0.1)"
        ),
    );
    // The sum when left NULL; as given otherwise; a call without any stays NULL.
    assert_eq!(
        calls(&mut c),
        vec![
            "k1 424 0.1 app",
            "k2 424 0.1 app",
            "k3 7 0.1 app",
            "k4 50 0.1 app",
            "k5 - 0.1 app"
        ]
    );
    assert_eq!(days(&mut c, U1), vec!["2026-11-20 5 905 0.5"]);

    // Contradictions and negative counts: refused, nothing written.
    let refused = [
        (
            format!("('x1', '{U1}', 'm', now(), 425, 100, 20, 300, 4, 0.1)"),
            "key_usage_logs_tokens_used_is_the_sum_of_the_kinds",
        ),
        (
            format!("('x2', '{U1}', 'm', now(), NULL, 100, -20, NULL, NULL, 0.1)"),
            "key_usage_logs_token_kinds_not_negative",
        ),
        (
            format!("('x3', '{U1}', 'm', now(), 5, 6, NULL, -1, NULL, 0.1)"),
            "key_usage_logs_token_kinds_not_negative",
        ),
    ];
    for (values, constraint) in refused {
        let err = db_error(c.execute(
            &format!(
                "INSERT INTO usage_agg.key_usage_logs
                     (request_id, user_id, model_used, created_at, tokens_used, input_tokens, output_tokens,
                      cache_read_tokens, cache_write_tokens, cost_estimate)
                 VALUES {values}"
            ),
            &[],
        ));
        assert_eq!(err.code().code(), "23514", "{values}");
        assert_eq!(err.constraint(), Some(constraint), "{values}");
    }
    // A sum that does not fit tokens_used.
    let err = db_error(c.execute(
        &format!(
            "INSERT INTO usage_agg.key_usage_logs (user_id, input_tokens, output_tokens, cost_estimate)
             VALUES ('{U1}', 2147483647, 1, 0)"
        ),
        &[],
    ));
    assert_eq!(err.code().code(), "22003");
    assert_eq!(
        err.message(),
        "usage_agg: the token kinds of a call add up to 2147483648, more than tokens_used (integer) holds"
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.key_usage_logs"),
        5
    );

    // An update of the kinds: tokens_used follows when it was their sum.
    c.batch_execute(
        "UPDATE usage_agg.key_usage_logs SET output_tokens = 70 WHERE request_id IN ('k1', 'k3');
         UPDATE usage_agg.key_usage_logs SET input_tokens = 1 WHERE request_id = 'k4';",
    )
    .unwrap_err();
    // (k4 had tokens_used 50 without kinds: 1 input token contradicts it.)
    c.batch_execute(
        "UPDATE usage_agg.key_usage_logs SET output_tokens = 70 WHERE request_id IN ('k1', 'k3')",
    )
    .unwrap();
    assert_eq!(
        calls(&mut c),
        vec![
            "k1 474 0.1 app",
            "k2 424 0.1 app",
            "k3 70 0.1 app",
            "k4 50 0.1 app",
            "k5 - 0.1 app"
        ]
    );
    assert_eq!(days(&mut c, U1), vec!["2026-11-20 5 1018 0.5"]);
    exact(&mut c);
}

/// Prices for model "chat-1" in euros-per-million style, changed at 14:30
/// Berlin time on 2026-11-20, and a per-call-only model "search".
const PRICES: &str = "
    INSERT INTO usage_agg.model_prices
        (model, valid_from, input_per_mtok, output_per_mtok, cache_read_per_mtok, cache_write_per_mtok, per_call)
    VALUES ('chat-1', '2026-11-01 00:00+01', 3, 15, 0.30, 3.75, NULL),
           ('chat-1', '2026-11-20 14:30+01', 2.5, 10, 0.25, NULL, 0.0001),
           ('search', '2026-01-01 00:00Z', NULL, NULL, NULL, NULL, 0.005);";

#[test]
fn costs_come_exactly_from_the_row_valid_at_each_call() {
    for mode in [FoldMode::Default, FoldMode::Async] {
        let db = mode.db("prices_exact");
        let mut c = db.connect();
        c.batch_execute(&format!(
            "UPDATE usage_agg.config SET timezone = 'Europe/Berlin'; {PRICES}"
        ))
        .unwrap();
        insert(
            &mut c,
            &format!(
                // Before the change (14:29:59 Berlin), at it, after it; mixed kinds.
                "('p1', '{U1}', 'chat-1', '2026-11-20 13:29:59Z', NULL, 1234, 567, 10000, 2000, NULL),
                 ('p2', '{U1}', 'chat-1', '2026-11-20 13:30:00Z', NULL, 1234, 567, 10000, NULL, NULL),
                 ('p3', '{U1}', 'chat-1', '2026-11-20 22:59:00Z', NULL, 1, NULL, NULL, NULL, NULL),
                 -- Cache writes have no price after the change: unpriced, not free.
                 ('p4', '{U1}', 'chat-1', '2026-11-20 15:00:00Z', NULL, 10, 10, NULL, 5, NULL),
                 -- A per-call price prices any call; an application cost is kept.
                 ('p5', '{U2}', 'search', '2026-11-20 12:00:00Z', 900, NULL, NULL, NULL, NULL, NULL),
                 ('p6', '{U2}', 'chat-1', '2026-11-20 12:00:00Z', NULL, 1000, 1000, NULL, NULL, 0.5),
                 -- Tokens not split into kinds at a per-token price: unpriced.
                 ('p7', '{U2}', 'chat-1', '2026-11-20 12:00:00Z', 300, NULL, NULL, NULL, NULL, NULL),
                 -- The day after in Berlin (23:00Z is midnight there).
                 ('p8', '{U2}', 'chat-1', '2026-11-20 23:00:00Z', NULL, 0, 1000000, NULL, NULL, NULL)"
            ),
        );
        // p1: 1234*3 + 567*15 + 10000*0.30 + 2000*3.75 = 22707 per million.
        // p2: 1234*2.5 + 567*10 + 10000*0.25 = 11255 per million + 0.0001.
        assert_eq!(
            calls(&mut c),
            vec![
                "p1 13801 0.022707 10-31 23:00",
                "p2 11801 0.011355 11-20 13:30",
                "p3 1 0.0001025 11-20 13:30",
                "p4 25 NULL app",
                "p5 900 0.005 01-01 00:00",
                "p6 2000 0.5 app",
                "p7 300 NULL app",
                "p8 1000000 10.0001 11-20 13:30",
            ]
        );
        mode.settle(&mut c, 8);
        assert_eq!(days(&mut c, U1), vec!["2026-11-20 4 25628 0.0341645"]);
        assert_eq!(
            days(&mut c, U2),
            vec!["2026-11-20 3 3200 0.505", "2026-11-21 1 1000000 10.0001"]
        );
        exact(&mut c);
        // call_cost() answers what the trigger does, without a row.
        assert_eq!(
            scalar_text(
                &mut c,
                "SELECT cost || ' ' || (price_valid_from AT TIME ZONE 'UTC')
                   FROM usage_agg.call_cost('chat-1', '2026-11-20 13:29:59Z', NULL, 1234, 567, 10000, 2000)"
            ),
            Some("0.022707 2026-10-31 23:00:00".to_string())
        );
        assert_eq!(
            scalar_text(
                &mut c,
                "SELECT coalesce(cost::text, 'NULL') FROM usage_agg.call_cost('chat-1', '2026-10-31 22:59:59Z', input_tokens => 5)"
            ),
            Some("NULL".to_string())
        );
    }
}

#[test]
fn call_cost_refuses_bad_counts() {
    let db = TestDb::new("prices_call_cost");
    let mut c = db.connect();
    c.batch_execute(PRICES).unwrap();
    // A model priced per call only: any call, whatever its token kinds.
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT cost::text FROM usage_agg.call_cost('search', now(), input_tokens => 50, cache_write_tokens => 7)"
        ),
        Some("0.005".to_string())
    );
    let err = db_error(c.query_one(
        "SELECT * FROM usage_agg.call_cost('chat-1', now(), input_tokens => -1)",
        &[],
    ));
    assert_eq!(err.code().code(), "22023");
    assert_eq!(
        err.message(),
        "usage_agg: input_tokens must not be negative, got -1"
    );
    let err = db_error(c.query_one(
        "SELECT * FROM usage_agg.call_cost('chat-1', now(), 10, 3, 4)",
        &[],
    ));
    assert_eq!(err.code().code(), "22023");
    assert_eq!(
        err.message(),
        "usage_agg: tokens_used 10 is not the sum of the token kinds (7)"
    );
}

#[test]
fn bad_prices_are_refused_and_nothing_is_written() {
    let db = TestDb::new("prices_bad");
    let mut c = db.connect();
    c.batch_execute(PRICES).unwrap();
    let cases = [
        (
            "('chat-1', '2026-11-20 14:30+01', 1, 1, 1, 1, NULL)",
            "23505",
            "model_prices_pkey",
        ),
        (
            "('x', now(), -1, NULL, NULL, NULL, NULL)",
            "23514",
            "model_prices_prices_finite_not_negative",
        ),
        (
            "('x', now(), 'NaN', NULL, NULL, NULL, NULL)",
            "23514",
            "model_prices_prices_finite_not_negative",
        ),
        (
            "('x', now(), NULL, NULL, NULL, NULL, 'Infinity')",
            "23514",
            "model_prices_prices_finite_not_negative",
        ),
        (
            "('x', now(), NULL, NULL, NULL, NULL, NULL)",
            "23514",
            "model_prices_some_price",
        ),
        (
            "('x', '-infinity', 1, NULL, NULL, NULL, NULL)",
            "23514",
            "model_prices_valid_from_finite",
        ),
    ];
    for (values, state, constraint) in cases {
        // With a good row first in the same statement: none of it is kept.
        let err = db_error(c.execute(
            &format!(
                "INSERT INTO usage_agg.model_prices
                     (model, valid_from, input_per_mtok, output_per_mtok, cache_read_per_mtok, cache_write_per_mtok, per_call)
                 VALUES ('y', now(), 1, NULL, NULL, NULL, NULL), {values}"
            ),
            &[],
        ));
        assert_eq!(err.code().code(), state, "{values}");
        assert_eq!(err.constraint(), Some(constraint), "{values}");
    }
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.model_prices"),
        3
    );

    // reprice_calls: a range that is no range, or reaches into the future.
    for (call, state) in [
        (
            "usage_agg.reprice_calls('2026-11-02', '2026-11-01')",
            "22023",
        ),
        ("usage_agg.reprice_calls(NULL, now())", "22023"),
        ("usage_agg.reprice_calls('2026-11-01', now(), 0)", "22023"),
        (
            "usage_agg.reprice_calls('2026-11-01', now() + interval '1 day')",
            "22023",
        ),
    ] {
        assert_eq!(
            sqlstate(c.query_one(&format!("SELECT {call}"), &[])),
            state,
            "{call}"
        );
    }
}

#[test]
fn unpriced_calls_are_listed_then_priced_by_reprice_calls() {
    for mode in [FoldMode::Default, FoldMode::Async] {
        let db = mode.db("prices_unpriced");
        let mut c = db.connect();
        // Before any price row, a call without a cost is the application's
        // choice: listed, but maintenance_health does not alert.
        insert(
            &mut c,
            &format!(
                "('u1', '{U1}', 'new-model', '2026-11-20 09:00Z', NULL, 1000, 100, NULL, NULL, NULL),
                 ('u2', '{U1}', 'new-model', '2026-11-21 09:00Z', NULL, 2000, 200, NULL, NULL, NULL),
                 ('u3', '{U2}', NULL, '2026-11-21 10:00Z', 5, NULL, NULL, NULL, NULL, NULL)"
            ),
        );
        let listed = |c: &mut Client| -> Vec<String> {
            texts(
                c,
                "SELECT coalesce(model, '(none)') || ' ' || calls || ' ' || (since AT TIME ZONE 'UTC') || ' ' || has_prices
                   FROM usage_agg.unpriced_calls ORDER BY model NULLS LAST",
                &[],
            )
        };
        let health = "SELECT overdue || ' ' || alert || ' ' || coalesce(last_error, '-')
                        FROM usage_agg.maintenance_health WHERE step = 'unpriced_calls'";
        assert_eq!(
            listed(&mut c),
            vec![
                "new-model 2 2026-11-20 09:00:00 false",
                "(none) 1 2026-11-21 10:00:00 false"
            ]
        );
        assert_eq!(
            scalar_text(&mut c, health),
            Some("false false -".to_string())
        );

        // A price list for another model: now the unpriced calls alert.
        c.batch_execute(PRICES).unwrap();
        assert_eq!(
            scalar_text(&mut c, health),
            Some("true true 3 call(s) of 1 model(s) have no cost, the oldest from 2026-11-20 09:00:00+00: see usage_agg.unpriced_calls".to_string())
        );
        mode.settle(&mut c, 3);
        assert_eq!(
            days(&mut c, U1),
            vec!["2026-11-20 1 1100 0", "2026-11-21 1 2200 0"]
        );

        // The model gets a price valid from 2026-11-21: reprice the month, in
        // batches of one call.
        c.batch_execute(
            "INSERT INTO usage_agg.model_prices (model, valid_from, input_per_mtok, output_per_mtok)
             VALUES ('new-model', '2026-11-21 00:00Z', 1, 2)",
        )
        .unwrap();
        assert_eq!(
            scalar_i64(
                &mut c,
                "SELECT usage_agg.reprice_calls('2026-11-01', '2026-12-01', batch_size => 1)"
            ),
            1
        );
        assert_eq!(
            calls(&mut c),
            vec![
                "u1 1100 NULL app",
                "u2 2200 0.0024 11-21 00:00",
                "u3 5 NULL app"
            ]
        );
        assert_eq!(
            listed(&mut c),
            vec![
                "new-model 1 2026-11-20 09:00:00 true",
                "(none) 1 2026-11-21 10:00:00 false"
            ]
        );
        mode.settle_all(&mut c);
        assert_eq!(
            days(&mut c, U1),
            vec!["2026-11-20 1 1100 0", "2026-11-21 1 2200 0.0024"]
        );
        exact(&mut c);
        // Nothing changed since: a second run writes nothing.
        assert_eq!(
            scalar_i64(
                &mut c,
                "SELECT usage_agg.reprice_calls('2026-11-01', '2026-12-01')"
            ),
            0
        );
        assert_eq!(pending(&mut c), 0);
    }
}

const K1: &str = "e1000000-0000-0000-0000-0000000000a1";
const K2: &str = "e1000000-0000-0000-0000-0000000000a2";

/// Tokens by kind and unpriced calls of U1 per day, model and key, and of
/// K1 and K2 per day and model, as the BI views show them (pending calls
/// included where the view adds them): "scope date in out cache_read
/// cache_write unpriced".
fn kinds(c: &mut Client) -> Vec<String> {
    texts(
        c,
        "SELECT s || ' ' || d || ' ' || i || ' ' || o || ' ' || cr || ' ' || cw || ' ' || u FROM (
             SELECT 'day' AS s, date::text AS d, input_tokens AS i, output_tokens AS o, cache_read_tokens AS cr,
                    cache_write_tokens AS cw, unpriced_calls AS u
               FROM usage_agg.daily_usage WHERE user_id = $1::text::uuid
             UNION ALL
             SELECT 'model:' || model, date::text, input_tokens, output_tokens, cache_read_tokens,
                    cache_write_tokens, unpriced_calls
               FROM usage_agg.daily_usage_by_model WHERE user_id = $1::text::uuid
             UNION ALL
             SELECT 'key:' || right(shared_key_id::text, 2), date::text, input_tokens, output_tokens,
                    cache_read_tokens, cache_write_tokens, unpriced_calls
               FROM usage_agg.daily_usage_by_key WHERE user_id = $1::text::uuid
             UNION ALL
             SELECT 'month', month::text, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                    unpriced_calls
               FROM usage_agg.monthly_usage WHERE user_id = $1::text::uuid
             UNION ALL
             SELECT 'month-model:' || model, month::text, input_tokens, output_tokens, cache_read_tokens,
                    cache_write_tokens, unpriced_calls
               FROM usage_agg.monthly_usage_by_model WHERE user_id = $1::text::uuid
             UNION ALL
             SELECT 'keyday:' || right(shared_key_id::text, 2), date::text, input_tokens, output_tokens,
                    cache_read_tokens, cache_write_tokens, unpriced_calls
               FROM usage_agg.key_daily_usage
             UNION ALL
             SELECT 'keyday-model:' || right(shared_key_id::text, 2) || ':' || model, date::text, input_tokens,
                    output_tokens, cache_read_tokens, cache_write_tokens, unpriced_calls
               FROM usage_agg.key_daily_usage_by_model
             UNION ALL
             SELECT 'keymonth:' || right(shared_key_id::text, 2), month::text, input_tokens, output_tokens,
                    cache_read_tokens, cache_write_tokens, unpriced_calls
               FROM usage_agg.key_monthly_usage
             UNION ALL
             SELECT 'service', date::text, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                    unpriced_calls
               FROM usage_agg.service_daily_usage) x
          ORDER BY 1",
        &[&U1],
    )
}

/// Tokens by kind and unpriced calls of U1, K1 and the service per period,
/// as the readers return them at 2026-11-20 13:00 UTC: "reader period in out
/// cache_read cache_write unpriced".
fn read_kinds(c: &mut Client) -> Vec<String> {
    texts(
        c,
        "SELECT 'user ' || period || ' ' || input_tokens || ' ' || output_tokens || ' ' || cache_read_tokens || ' '
                || cache_write_tokens || ' ' || unpriced_calls
           FROM usage_agg.usage_summary($1::text::uuid, '2026-11-20 13:00Z')
          UNION ALL
         SELECT 'key ' || period || ' ' || input_tokens || ' ' || output_tokens || ' ' || cache_read_tokens || ' '
                || cache_write_tokens || ' ' || unpriced_calls
           FROM usage_agg.key_usage_summary($2::text::uuid, '2026-11-20 13:00Z')
          UNION ALL
         SELECT 'service ' || period || ' ' || input_tokens || ' ' || output_tokens || ' ' || cache_read_tokens || ' '
                || cache_write_tokens || ' ' || unpriced_calls
           FROM usage_agg.usage_overview('2026-11-20 13:00Z')",
        &[&U1, &K1],
    )
}

#[test]
fn token_kinds_and_unpriced_calls_reach_every_aggregate_exactly() {
    for mode in [FoldMode::Default, FoldMode::Async] {
        let db = mode.db("prices_kinds_aggregates");
        let mut c = db.connect();
        // One call at a time (appended without SPI in async mode), a call
        // without kinds or cost, 70 calls in one statement (grouped in Rust;
        // every even one without a cost), and a call in August.
        c.batch_execute(&format!(
            "INSERT INTO usage_agg.key_usage_logs (request_id, user_id, shared_key_id, model_used, created_at,
                                                   input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                                                   cost_estimate)
             VALUES ('a1', '{U1}', '{K1}', 'm1', '2026-11-20 10:00Z', 100, 20, 300, 4, 0.1);
             INSERT INTO usage_agg.key_usage_logs (request_id, user_id, shared_key_id, model_used, created_at, tokens_used)
             VALUES ('a2', '{U1}', '{K1}', 'm1', '2026-11-20 11:00Z', 50);
             INSERT INTO usage_agg.key_usage_logs (request_id, user_id, shared_key_id, model_used, created_at,
                                                   input_tokens, output_tokens, cost_estimate)
             SELECT 'g' || i, '{U1}', '{K2}', 'm2', '2026-11-20 12:00Z'::timestamptz + i * interval '1 second', i, 2,
                    CASE WHEN i % 2 = 1 THEN 0.01 END
               FROM generate_series(1, 70) i;
             INSERT INTO usage_agg.key_usage_logs (request_id, user_id, shared_key_id, model_used, created_at,
                                                   input_tokens, output_tokens)
             VALUES ('a3', '{U1}', '{K1}', 'm1', '2026-08-10 10:00Z', 10, 5);"
        ))
        .unwrap();
        // The per-key views add what is pending: exact before any apply.
        let key_rows = |c: &mut Client| -> Vec<String> {
            kinds(c)
                .into_iter()
                .filter(|r| {
                    r.starts_with("keyday") || r.starts_with("keymonth") || r.starts_with("service")
                })
                .collect()
        };
        let keys_before = vec![
            "keyday-model:a1:m1 2026-08-10 10 5 0 0 1",
            "keyday-model:a1:m1 2026-11-20 100 20 300 4 1",
            "keyday-model:a2:m2 2026-11-20 2485 140 0 0 35",
            "keyday:a1 2026-08-10 10 5 0 0 1",
            "keyday:a1 2026-11-20 100 20 300 4 1",
            "keyday:a2 2026-11-20 2485 140 0 0 35",
            "keymonth:a1 2026-08-01 10 5 0 0 1",
            "keymonth:a1 2026-11-01 100 20 300 4 1",
            "keymonth:a2 2026-11-01 2485 140 0 0 35",
            "service 2026-08-10 10 5 0 0 1",
            "service 2026-11-20 2585 160 300 4 36",
        ];
        assert_eq!(key_rows(&mut c), keys_before);
        let readers_before = vec![
            "user today 2585 160 300 4 36",
            "user month 2585 160 300 4 36",
            "user all_time 2595 165 300 4 37",
            "key today 100 20 300 4 1",
            "key month 100 20 300 4 1",
            "key all_time 110 25 300 4 2",
            "service today 2585 160 300 4 36",
            "service month 2585 160 300 4 36",
            "service all_time 2595 165 300 4 37",
        ];
        assert_eq!(read_kinds(&mut c), readers_before);
        mode.settle(&mut c, 73);
        assert_eq!(read_kinds(&mut c), readers_before);
        assert_eq!(key_rows(&mut c), keys_before);
        exact(&mut c);

        // Corrections: a2 gets a cost and its kinds, g2 (unpriced) is deleted.
        c.batch_execute(
            "UPDATE usage_agg.key_usage_logs SET cost_estimate = 0.2, input_tokens = 50 WHERE request_id = 'a2';
             DELETE FROM usage_agg.key_usage_logs WHERE request_id = 'g2';",
        )
        .unwrap();
        mode.settle_all(&mut c);
        assert_eq!(
            kinds(&mut c),
            vec![
                "day 2026-08-10 10 5 0 0 1",
                "day 2026-11-20 2633 158 300 4 34",
                "key:a1 2026-08-10 10 5 0 0 1",
                "key:a1 2026-11-20 150 20 300 4 0",
                "key:a2 2026-11-20 2483 138 0 0 34",
                "keyday-model:a1:m1 2026-08-10 10 5 0 0 1",
                "keyday-model:a1:m1 2026-11-20 150 20 300 4 0",
                "keyday-model:a2:m2 2026-11-20 2483 138 0 0 34",
                "keyday:a1 2026-08-10 10 5 0 0 1",
                "keyday:a1 2026-11-20 150 20 300 4 0",
                "keyday:a2 2026-11-20 2483 138 0 0 34",
                "keymonth:a1 2026-08-01 10 5 0 0 1",
                "keymonth:a1 2026-11-01 150 20 300 4 0",
                "keymonth:a2 2026-11-01 2483 138 0 0 34",
                "model:m1 2026-08-10 10 5 0 0 1",
                "model:m1 2026-11-20 150 20 300 4 0",
                "model:m2 2026-11-20 2483 138 0 0 34",
                "month 2026-08-01 10 5 0 0 1",
                "month 2026-11-01 2633 158 300 4 34",
                "month-model:m1 2026-08-01 10 5 0 0 1",
                "month-model:m1 2026-11-01 150 20 300 4 0",
                "month-model:m2 2026-11-01 2483 138 0 0 34",
                "service 2026-08-10 10 5 0 0 1",
                "service 2026-11-20 2633 158 300 4 34",
            ]
        );
        assert_eq!(
            read_kinds(&mut c),
            vec![
                "user today 2633 158 300 4 34",
                "user month 2633 158 300 4 34",
                "user all_time 2643 163 300 4 35",
                "key today 150 20 300 4 0",
                "key month 150 20 300 4 0",
                "key all_time 160 25 300 4 1",
                "service today 2633 158 300 4 34",
                "service month 2633 158 300 4 34",
                "service all_time 2643 163 300 4 35",
            ]
        );
        exact(&mut c);
        assert_eq!(
            texts(
                &mut c,
                "SELECT shared_key_id::text || ' ' || date || ' ' || field
                   FROM usage_agg.verify_key_daily_logs('2026-01-01', '2026-12-31')",
                &[]
            ),
            Vec::<String>::new()
        );
        // Sparse: a counter that is zero is not in the document.
        assert_eq!(
            scalar_text(
                &mut c,
                &format!(
                    "SELECT log_data#>>'{{shared_service_usage,by_model,m1}}' FROM usage_agg.daily_logs
                      WHERE user_id = '{U1}' AND date = '2026-11-20'"
                )
            ),
            Some(
                r#"{"cost": 0.3, "calls": 2, "tokens": 474, "input_tokens": 150, "output_tokens": 20, "cache_read_tokens": 300, "cache_write_tokens": 4}"#
                    .to_string()
            )
        );

        // August expires (detail retention: 30 days, daily: 90) and rolls up
        // into its month: the months keep the counters.
        scalar_i64(&mut c, "SELECT usage_agg.cleanup_old_key_usage_logs()");
        scalar_i64(&mut c, "SELECT usage_agg.cleanup_old_daily_logs()");
        let months: Vec<String> = kinds(&mut c)
            .into_iter()
            .filter(|r| r.contains("2026-08"))
            .collect();
        assert_eq!(
            months,
            vec![
                "keymonth:a1 2026-08-01 10 5 0 0 1",
                "month 2026-08-01 10 5 0 0 1",
                "month-model:m1 2026-08-01 10 5 0 0 1",
            ]
        );
    }
}

#[test]
fn reprice_calls_touches_only_table_prices_through_corrections() {
    for mode in [FoldMode::Default, FoldMode::Async] {
        let db = mode.db("prices_reprice");
        let mut c = db.connect();
        c.batch_execute(PRICES).unwrap();
        insert(
            &mut c,
            &format!(
                "('r1', '{U1}', 'chat-1', '2026-11-10 10:00Z', NULL, 1000000, NULL, NULL, NULL, NULL),
                 ('r2', '{U1}', 'chat-1', '2026-11-10 11:00Z', NULL, 1000000, NULL, NULL, NULL, 7),
                 ('r3', '{U1}', 'chat-1', '2026-11-10 12:00Z', NULL, 2000000, NULL, NULL, NULL, NULL),
                 ('r4', '{U1}', 'chat-1', '2026-11-10 13:00Z', NULL, 3000000, NULL, NULL, NULL, NULL),
                 ('r5', '{U1}', 'chat-1', '2026-12-01 13:00Z', NULL, 1000000, NULL, NULL, NULL, NULL)"
            ),
        );
        // Corrections: r3's tokens (repriced at once), r4's cost set by the
        // application (it is the application's from now on).
        c.batch_execute(
            "UPDATE usage_agg.key_usage_logs SET input_tokens = 4000000 WHERE request_id = 'r3';
             UPDATE usage_agg.key_usage_logs SET cost_estimate = 1 WHERE request_id = 'r4';",
        )
        .unwrap();
        assert_eq!(
            calls(&mut c),
            vec![
                "r1 1000000 3 10-31 23:00",
                "r2 1000000 7 app",
                "r3 4000000 12 10-31 23:00",
                "r4 3000000 1 app",
                "r5 1000000 2.5001 11-20 13:30",
            ]
        );
        // The November price was wrong: corrected, then November repriced.
        c.batch_execute(
            "UPDATE usage_agg.model_prices SET input_per_mtok = 3.5
              WHERE model = 'chat-1' AND valid_from = '2026-11-01 00:00+01'",
        )
        .unwrap();
        assert_eq!(
            scalar_i64(
                &mut c,
                "SELECT usage_agg.reprice_calls('2026-11-01', '2026-11-20', batch_size => 2)"
            ),
            2
        );
        assert_eq!(
            calls(&mut c),
            vec![
                "r1 1000000 3.5 10-31 23:00",
                "r2 1000000 7 app",
                "r3 4000000 14 10-31 23:00",
                "r4 3000000 1 app",
                "r5 1000000 2.5001 11-20 13:30",
            ]
        );
        mode.settle_all(&mut c);
        assert_eq!(
            days(&mut c, U1),
            vec!["2026-11-10 4 9000000 25.5", "2026-12-01 1 1000000 2.5001"]
        );
        exact(&mut c);
    }
}

#[test]
fn an_application_role_is_priced_but_cannot_change_prices() {
    let db = TestDb::new("prices_roles");
    let mut c = db.connect();
    c.batch_execute(&format!(
        "{PRICES}
         DROP ROLE IF EXISTS ua_prices_app;
         CREATE ROLE ua_prices_app;
         SELECT usage_agg.grant_app_role('ua_prices_app');
         SET ROLE ua_prices_app;
         INSERT INTO usage_agg.key_usage_logs (user_id, model_used, created_at, input_tokens, request_id)
         VALUES ('{U1}', 'chat-1', '2026-11-10 10:00Z', 1000, 'a1');"
    ))
    .unwrap();
    assert_eq!(calls(&mut c), vec!["a1 1000 0.003 10-31 23:00"]);
    for sql in [
        "INSERT INTO usage_agg.model_prices (model, valid_from, per_call) VALUES ('z', now(), 1)",
        "UPDATE usage_agg.model_prices SET per_call = 0",
        "SELECT usage_agg.reprice_calls('2026-11-01', '2026-11-20')",
    ] {
        assert_eq!(sqlstate(c.execute(sql, &[])), "42501", "{sql}");
    }
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.model_prices"),
        3
    );
    c.batch_execute("RESET ROLE; DROP OWNED BY ua_prices_app; DROP ROLE ua_prices_app")
        .unwrap();
}

#[test]
fn the_sample_price_list_loads() {
    let db = TestDb::new("prices_sample");
    let mut c = db.connect();
    let sample = include_str!("../examples/model_prices_sample.sql");
    // Twice: it skips rows that are there.
    c.batch_execute(sample).unwrap();
    c.batch_execute(sample).unwrap();
    assert_eq!(
        scalar_text(
            &mut c,
            "SELECT string_agg(model, ' ' ORDER BY model) FROM usage_agg.model_prices"
        ),
        Some("claude-3-5-haiku claude-3-5-sonnet gpt-4o gpt-4o-mini".to_string())
    );
    // A call with cache writes on a model without a cache-write price stays unpriced.
    c.batch_execute(&format!(
        "INSERT INTO usage_agg.key_usage_logs (request_id, user_id, model_used, created_at, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens)
         VALUES ('s1', '{U1}', 'claude-3-5-sonnet', '2026-11-20 12:00Z', 1000, 500, 20000, 4000),
                ('s2', '{U1}', 'gpt-4o', '2026-11-20 12:00Z', 1000, 500, 20000, 4000)"
    ))
    .unwrap();
    // 1000*3 + 500*15 + 20000*0.30 + 4000*3.75 = 31500 per million.
    assert_eq!(
        calls(&mut c),
        vec!["s1 25500 0.0315 10-22 00:00", "s2 25500 NULL app"]
    );
}
