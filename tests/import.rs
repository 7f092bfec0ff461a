//! Moving in from the hand-written design with usage_agg.import_legacy().
#![cfg(not(feature = "pg_test"))]

mod common;

use common::*;
use postgres::Client;

/// The hand-written setup: detail and daily tables in public, a row-level
/// PL/pgSQL trigger folding into the JSONB layout, an application key, and a
/// cleanup that deleted detail older than 30 days by timestamp.
const LEGACY: &str = "
CREATE TABLE public.key_usage_logs (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(), shared_key_id uuid, user_id uuid NOT NULL,
    api_endpoint text, model_used text, tokens_used integer, cost_estimate numeric,
    success boolean NOT NULL DEFAULT true, error_message text, request_id text UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE public.daily_logs (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(), user_id uuid NOT NULL, date date NOT NULL,
    log_data jsonb NOT NULL, last_modified timestamptz NOT NULL DEFAULT now(), UNIQUE (user_id, date));
CREATE FUNCTION public.legacy_fold() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.daily_logs AS d (user_id, date, log_data)
    VALUES (NEW.user_id, (NEW.created_at AT TIME ZONE 'UTC')::date,
            jsonb_build_object('api_call_count', 1,
                'shared_service_usage', jsonb_build_object('total_calls', 1,
                    'successful_calls', CASE WHEN NEW.success THEN 1 ELSE 0 END,
                    'failed_calls', CASE WHEN NEW.success THEN 0 ELSE 1 END,
                    'tokens_used', coalesce(NEW.tokens_used, 0), 'estimated_cost', coalesce(NEW.cost_estimate, 0),
                    'keys_used', '[]'::jsonb, 'by_model', '{}'::jsonb, 'by_key', '{}'::jsonb),
                'last_api_call_at', NEW.created_at))
    ON CONFLICT (user_id, date) DO UPDATE SET log_data = d.log_data || jsonb_build_object(
        'api_call_count', (d.log_data->>'api_call_count')::int + 1,
        'shared_service_usage', (d.log_data->'shared_service_usage') || jsonb_build_object(
            'total_calls', (d.log_data->'shared_service_usage'->>'total_calls')::int + 1,
            -- the classic drift: cost summed as a float
            'estimated_cost', (d.log_data->'shared_service_usage'->>'estimated_cost')::float8 + coalesce(NEW.cost_estimate, 0)::float8));
    RETURN NULL;
END $$;
CREATE TRIGGER legacy_fold AFTER INSERT ON public.key_usage_logs FOR EACH ROW EXECUTE FUNCTION public.legacy_fold();
INSERT INTO public.key_usage_logs (user_id, shared_key_id, model_used, tokens_used, cost_estimate, success, request_id, created_at)
SELECT ('1e000000-0000-0000-0000-00000000000' || (g % 3))::uuid, ('1f000000-0000-0000-0000-00000000000' || (g % 2))::uuid,
       'm' || (g % 2), g, 0.1, g % 9 <> 0, 'legacy-' || g,
       date_trunc('day', now(), 'UTC') + interval '13 hours' - (g / 6) * interval '1 day' - (g % 6) * interval '1 hour'
  FROM generate_series(0, 599) g;
UPDATE public.daily_logs SET log_data = log_data || jsonb_build_object('conversation_count', 4);
DELETE FROM public.key_usage_logs WHERE created_at < now() - interval '30 days';
";

fn daily_fingerprint(c: &mut Client) -> String {
    scalar_text(
        c,
        "SELECT count(*) || ' ' || md5(string_agg(user_id::text || date::text || log_data::text, ',' ORDER BY user_id, date)) FROM usage_agg.daily_logs",
    )
    .unwrap()
}

#[test]
fn a_hand_written_setup_moves_in_with_one_call() {
    let db = TestDb::new("import_legacy");
    let mut c = db.connect();
    c.batch_execute(LEGACY).unwrap();
    let legacy_detail = scalar_i64(&mut c, "SELECT count(*) FROM public.key_usage_logs");
    let legacy_days = scalar_i64(&mut c, "SELECT count(*) FROM public.daily_logs");
    // 600 calls over 100 days, 3 users: 300 daily rows; the detail of 30-odd days is left.
    assert_eq!(legacy_days, 300);
    let first_detail_day = scalar_text(
        &mut c,
        "SELECT (min(created_at) AT TIME ZONE 'UTC')::date::text FROM public.key_usage_logs",
    )
    .unwrap();
    let days_before: i64 = scalar_i64(
        &mut c,
        &format!("SELECT count(*) FROM public.daily_logs WHERE date < '{first_detail_day}'"),
    );

    let report = |c: &mut Client| -> String {
        scalar_text(
            c,
            "SELECT concat_ws(' ', detail_rows_copied, detail_rows_already_there, daily_rows_merged, daily_rows_copied, detail_backup, daily_backup)
               FROM usage_agg.import_legacy('public.key_usage_logs', 'public.daily_logs')",
        )
        .unwrap()
    };
    assert_eq!(
        report(&mut c),
        format!(
            "{legacy_detail} 0 {} {days_before} key_usage_logs_backup_usage_agg daily_logs_backup_usage_agg",
            legacy_days - days_before
        )
    );
    // Where detail exists the aggregates are the detail's (exact money, by model,
    // by key), keeping the application's key; verify finds nothing.
    assert_eq!(
        verify(&mut c, "2000-01-01", "2100-01-01"),
        Vec::<String>::new()
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            &format!("SELECT count(*) FROM usage_agg.daily_logs WHERE date >= '{first_detail_day}' AND (log_data->>'conversation_count')::int = 4")
        ),
        legacy_days - days_before
    );
    // Earlier days are the old rows, as they were.
    assert_eq!(
        scalar_i64(
            &mut c,
            &format!(
                "SELECT count(*) FROM usage_agg.daily_logs d JOIN public.daily_logs l USING (user_id, date)
                  WHERE d.date < '{first_detail_day}' AND d.log_data = l.log_data"
            )
        ),
        days_before
    );
    // The old tables are untouched and backed up.
    for t in ["key_usage_logs", "daily_logs"] {
        assert_eq!(
            scalar_i64(
                &mut c,
                &format!("SELECT count(*) FROM public.{t}_backup_usage_agg")
            ),
            scalar_i64(&mut c, &format!("SELECT count(*) FROM public.{t}"))
        );
    }
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.key_usage_logs"),
        legacy_detail
    );

    // The per-key and service rows: exact where detail exists, and in total
    // equal to what the users' rows hold (the legacy days without detail
    // included); a rerun adds nothing to them.
    let keys_and_users = |c: &mut Client| -> (bool, bool, String) {
        let row = c
            .query_one(
                "WITH k AS (SELECT sum(calls) AS calls, sum(estimated_cost) AS cost FROM usage_agg.key_monthly_usage),
                      u AS (SELECT sum(calls) AS calls, sum(cost) AS cost FROM usage_agg.monthly_usage_by_key),
                      s AS (SELECT sum(calls) AS calls, sum(estimated_cost) AS cost FROM usage_agg.service_monthly_usage),
                      a AS (SELECT sum(calls) AS calls, sum(estimated_cost) AS cost FROM usage_agg.monthly_usage)
                 SELECT k.calls IS NOT DISTINCT FROM u.calls AND k.cost IS NOT DISTINCT FROM u.cost,
                        s.calls IS NOT DISTINCT FROM a.calls AND s.cost IS NOT DISTINCT FROM a.cost,
                        concat_ws(' ', k.calls, u.calls, s.calls, a.calls) FROM k, u, s, a",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    let (keys_equal, service_equal, shown) = keys_and_users(&mut c);
    assert!(
        keys_equal && service_equal,
        "per-key and service totals: {shown}"
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(DISTINCT shared_key_id) FROM usage_agg.key_daily_usage"
        ),
        2,
        "the detail's two keys have per-key rows"
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM usage_agg.verify_key_daily_logs('2000-01-01', '2100-01-01')"
        ),
        0
    );

    // A rerun changes nothing.
    let before = daily_fingerprint(&mut c);
    assert_eq!(
        report(&mut c),
        format!(
            "0 {legacy_detail} {} 0 key_usage_logs_backup_usage_agg daily_logs_backup_usage_agg",
            legacy_days - days_before
        )
    );
    assert_eq!(daily_fingerprint(&mut c), before);
    assert_eq!(
        verify(&mut c, "2000-01-01", "2100-01-01"),
        Vec::<String>::new()
    );
    assert_eq!(keys_and_users(&mut c), (true, true, shown));

    // From here on the application writes to usage_agg.
    c.batch_execute(
        "INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate) VALUES ('1e000000-0000-0000-0000-000000000001', 1)",
    )
    .unwrap();
    assert_eq!(
        verify(&mut c, "2000-01-01", "2100-01-01"),
        Vec::<String>::new()
    );
}

#[test]
fn bad_imports_change_nothing() {
    let db = TestDb::new("import_bad");
    let mut c = db.connect();
    c.batch_execute(LEGACY).unwrap();
    c.batch_execute(
        "CREATE TABLE public.not_detail (x int);
         INSERT INTO public.key_usage_logs (user_id, tokens_used, request_id) VALUES ('1e000000-0000-0000-0000-000000000009', -5, 'negative');",
    )
    .unwrap();
    for (args, code) in [
        ("NULL, 'public.daily_logs'", "22023"),
        ("'usage_agg.key_usage_logs', 'public.daily_logs'", "22023"),
        ("'public.not_detail', 'public.daily_logs'", "42703"),
        ("'public.key_usage_logs', 'public.not_detail'", "42703"),
        // a legacy row usage_agg refuses (negative tokens): all or nothing
        ("'public.key_usage_logs', 'public.daily_logs'", "23514"),
    ] {
        assert_eq!(
            sqlstate(c.batch_execute(&format!("SELECT * FROM usage_agg.import_legacy({args})"))),
            code,
            "{args}"
        );
    }
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.key_usage_logs"),
        0
    );
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM usage_agg.daily_logs"),
        0
    );
    assert_eq!(
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM pg_class WHERE relname LIKE '%backup_usage_agg'"
        ),
        0
    );
}
