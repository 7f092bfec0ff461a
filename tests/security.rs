//! Least privilege and search_path safety, over real connections as real roles.
#![cfg(not(feature = "pg_test"))]

mod common;

use common::*;
use postgres::{Client, NoTls};

fn connect_as(db: &TestDb, role: &str) -> Client {
    Client::connect(
        &format!(
            "host=127.0.0.1 port={} user={role} dbname={}",
            port(),
            db.name
        ),
        NoTls,
    )
    .unwrap_or_else(|e| panic!("connect as {role}: {e}"))
}

fn fresh_role(admin: &mut Client, role: &str) {
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN;"
        ))
        .unwrap();
}

const U: &str = "5ec00000-0000-0000-0000-000000000001";

#[test]
fn an_application_role_writes_calls_and_quota_but_nothing_else() {
    let db = TestDb::new("security_app_role");
    let mut admin = db.connect();
    fresh_role(&mut admin, "ua_test_app");
    admin
        .batch_execute("SELECT usage_agg.grant_app_role('ua_test_app')")
        .unwrap();
    let mut app = connect_as(&db, "ua_test_app");

    // What it may do.
    app.batch_execute(&format!(
        "INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, request_id)
         VALUES ('{U}', 'gpt-4o', 10, 0.5, 'r1') ON CONFLICT (request_id) DO NOTHING;
         INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, request_id)
         SELECT '{U}', 'gpt-4o', 1, 0.25, 'bulk-' || g FROM generate_series(1, 100) g;
         SELECT usage_agg.consume_quota('{U}', 3, 's', 'q1');
         SELECT usage_agg.try_consume_quota('{U}');
         SELECT usage_agg.refund_quota('q1');"
    ))
    .unwrap();
    assert_eq!(
        scalar_text(
            &mut app,
            &format!("SELECT calls || ' ' || cost FROM usage_agg.usage_summary('{U}') WHERE period = 'today'")
        ),
        Some("101 25.50".to_string())
    );
    assert_eq!(
        scalar_text(
            &mut app,
            &format!("SELECT monthly_used || ' ' || total_used FROM usage_agg.quota_status('{U}')")
        ),
        Some("1 1".to_string())
    );
    assert_eq!(
        scalar_i64(
            &mut app,
            "SELECT count(*) FROM usage_agg.daily_usage_by_model"
        ),
        1
    );
    app.query_one(
        &format!("SELECT * FROM usage_agg.check_usage_limit('{U}')"),
        &[],
    )
    .unwrap();
    // In deferred mode its calls land in pending_deltas, written on its behalf.
    admin
        .batch_execute("UPDATE usage_agg.config SET fold_mode = 'deferred'")
        .unwrap();
    app.batch_execute(&format!(
        "INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate) VALUES ('{U}', 1)"
    ))
    .unwrap();
    assert_eq!(
        scalar_i64(&mut admin, "SELECT count(*) FROM usage_agg.pending_deltas"),
        1
    );

    // What it may not do.
    for sql in [
        format!("INSERT INTO usage_agg.daily_logs (user_id, date, log_data) VALUES ('{U}', current_date, '{{}}')"),
        "UPDATE usage_agg.daily_logs SET log_data = '{}'".to_string(),
        format!("INSERT INTO usage_agg.monthly_logs (user_id, month, log_data) VALUES ('{U}', '2026-01-01', '{{}}')"),
        "UPDATE usage_agg.quotas SET monthly_used = 0".to_string(),
        "DELETE FROM usage_agg.quota_usage_logs".to_string(),
        "UPDATE usage_agg.quota_plans SET monthly_quota = 1000000".to_string(),
        "UPDATE usage_agg.config SET fold_mode = 'immediate'".to_string(),
        "DELETE FROM usage_agg.pending_deltas".to_string(),
        "UPDATE usage_agg.key_usage_logs SET cost_estimate = 0".to_string(),
        "DELETE FROM usage_agg.key_usage_logs".to_string(),
        "SELECT usage_agg.cleanup_old_key_usage_logs()".to_string(),
        "SELECT usage_agg.cleanup_old_daily_logs()".to_string(),
        "SELECT usage_agg.cleanup_old_hourly_logs()".to_string(),
        "SELECT usage_agg._rebuild_hours(current_date)".to_string(),
        "DELETE FROM usage_agg.hourly_logs".to_string(),
        "UPDATE usage_agg.key_hourly_logs SET calls = 0".to_string(),
        "INSERT INTO usage_agg.pending_key_hour_deltas (shared_key_id, hour, calls, successful, tokens, cost) VALUES (gen_random_uuid(), now(), 1, 1, 1, 1)".to_string(),
        "SELECT usage_agg.run_maintenance()".to_string(),
        "SELECT usage_agg.apply_pending_deltas()".to_string(),
        "SELECT usage_agg.reset_expired_quotas()".to_string(),
        format!("SELECT usage_agg.set_membership('{U}', 'pro')"),
        "SELECT usage_agg.rebuild_daily_logs(current_date, current_date)".to_string(),
        "SELECT usage_agg.schedule_maintenance()".to_string(),
        "SELECT usage_agg.schedule_apply()".to_string(),
        "SELECT usage_agg.post_restore()".to_string(),
        "INSERT INTO usage_agg.key_daily_logs (shared_key_id, date, log_data) VALUES (gen_random_uuid(), current_date, '{}')".to_string(),
        "DELETE FROM usage_agg.pending_key_deltas".to_string(),
        "SELECT usage_agg.grant_app_role('ua_test_app')".to_string(),
        // The internal step behind consume_quota runs as the caller: no rights.
        format!("SELECT usage_agg._consume('{U}', 1, NULL, NULL, 0, true)"),
    ] {
        assert_eq!(sqlstate(app.batch_execute(&sql)), "42501", "{sql}");
    }
    assert_eq!(
        verify(&mut admin, "2000-01-01", "2100-01-01"),
        Vec::<String>::new()
    );
}

#[test]
fn a_read_role_reads_and_nothing_more() {
    let db = TestDb::new("security_read_role");
    let mut admin = db.connect();
    fresh_role(&mut admin, "ua_test_reader");
    admin
        .batch_execute(&format!(
            "SELECT usage_agg.grant_read_role('ua_test_reader');
             INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate) VALUES ('{U}', 2);"
        ))
        .unwrap();
    let mut reader = connect_as(&db, "ua_test_reader");
    assert_eq!(
        scalar_text(
            &mut reader,
            &format!("SELECT calls || ' ' || cost FROM usage_agg.usage_summary('{U}') WHERE period = 'all_time'")
        ),
        Some("1 2".to_string())
    );
    assert_eq!(
        scalar_i64(&mut reader, "SELECT count(*) FROM usage_agg.monthly_usage"),
        1
    );
    for sql in [
        format!("INSERT INTO usage_agg.key_usage_logs (user_id) VALUES ('{U}')"),
        format!("SELECT usage_agg.consume_quota('{U}')"),
        "SELECT usage_agg.refund_quota('x')".to_string(),
    ] {
        assert_eq!(sqlstate(reader.batch_execute(&sql)), "42501", "{sql}");
    }
    for (arg, code) in [("NULL", "22023"), ("'no_such_role_here'", "42704")] {
        assert_eq!(
            sqlstate(admin.batch_execute(&format!("SELECT usage_agg.grant_app_role({arg})"))),
            code,
            "{arg}"
        );
    }
}

#[test]
fn a_hostile_search_path_changes_nothing() {
    let db = TestDb::new("security_search_path");
    let mut admin = db.connect();
    // A schema of look-alikes that record every call made to them.
    admin
        .batch_execute(
            "CREATE SCHEMA evil;
             CREATE TABLE evil.calls (what text);
             CREATE TABLE evil.daily_logs (LIKE usage_agg.daily_logs);
             CREATE TABLE evil.key_usage_logs (LIKE usage_agg.key_usage_logs);
             CREATE TABLE evil.config (timezone text, fold_mode text);
             INSERT INTO evil.config VALUES ('Pacific/Kiritimati', 'deferred');
             CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE sql
                 AS $$ INSERT INTO evil.calls VALUES ('now') RETURNING '2001-01-01'::timestamptz $$;
             CREATE FUNCTION evil.jsonb_build_object(VARIADIC text[]) RETURNS jsonb LANGUAGE sql
                 AS $$ INSERT INTO evil.calls VALUES ('jsonb_build_object') RETURNING '{}'::jsonb $$;
             CREATE FUNCTION evil.coalesce_text(text, text) RETURNS text LANGUAGE sql AS $$ SELECT 'x' $$;
             CREATE FUNCTION evil.int_plus(integer, integer) RETURNS integer LANGUAGE sql
                 AS $$ INSERT INTO evil.calls VALUES ('+') RETURNING 0 $$;
             CREATE OPERATOR evil.+ (LEFTARG = integer, RIGHTARG = integer, FUNCTION = evil.int_plus);
             CREATE FUNCTION evil.bigint_plus(bigint, bigint) RETURNS bigint LANGUAGE sql
                 AS $$ INSERT INTO evil.calls VALUES ('+') RETURNING 0::bigint $$;
             CREATE OPERATOR evil.+ (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = evil.bigint_plus);
             CREATE FUNCTION evil.numeric_plus(numeric, numeric) RETURNS numeric LANGUAGE sql
                 AS $$ INSERT INTO evil.calls VALUES ('+') RETURNING 0::numeric $$;
             CREATE OPERATOR evil.+ (LEFTARG = numeric, RIGHTARG = numeric, FUNCTION = evil.numeric_plus);
             -- What the kept statement of consume_quota's common case uses.
             CREATE FUNCTION evil.int_minus(integer, integer) RETURNS integer LANGUAGE sql
                 AS $$ INSERT INTO evil.calls VALUES ('-') RETURNING 0 $$;
             CREATE OPERATOR evil.- (LEFTARG = integer, RIGHTARG = integer, FUNCTION = evil.int_minus);
             CREATE FUNCTION evil.int_le(integer, integer) RETURNS boolean LANGUAGE sql
                 AS $$ INSERT INTO evil.calls VALUES ('<=') RETURNING true $$;
             CREATE OPERATOR evil.<= (LEFTARG = integer, RIGHTARG = integer, FUNCTION = evil.int_le);
             CREATE FUNCTION evil.uuid_eq(uuid, uuid) RETURNS boolean LANGUAGE sql
                 AS $$ INSERT INTO evil.calls VALUES ('=') RETURNING true $$;
             CREATE OPERATOR evil.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = evil.uuid_eq);
             CREATE FUNCTION evil.ts_lt(timestamptz, timestamptz) RETURNS boolean LANGUAGE sql
                 AS $$ INSERT INTO evil.calls VALUES ('<') RETURNING true $$;
             CREATE OPERATOR evil.< (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = evil.ts_lt);
             CREATE FUNCTION evil.length(text) RETURNS integer LANGUAGE sql
                 AS $$ INSERT INTO evil.calls VALUES ('length') RETURNING 0 $$;
             GRANT ALL ON SCHEMA evil TO PUBLIC;",
        )
        .unwrap();
    let mut c = db.connect();
    c.batch_execute("SET search_path = evil, pg_catalog, usage_agg, public")
        .unwrap();
    c.batch_execute(&format!(
        "INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, created_at)
         VALUES ('{U}', 'm', 5, 0.5, '2026-05-01 10:00+00');
         INSERT INTO usage_agg.key_usage_logs (user_id, model_used, tokens_used, cost_estimate, created_at)
         SELECT '{U}', 'm', 5, 0.5, '2026-05-01 11:00+00' FROM generate_series(1, 99);
         UPDATE usage_agg.key_usage_logs SET tokens_used = 6 WHERE created_at = '2026-05-01 10:00+00';
         SELECT usage_agg.consume_quota('{U}', 2);
         SELECT usage_agg.consume_quota('{U}', 3, 'session', 'request-1');
         SELECT usage_agg.try_consume_quota('{U}', 1);
         SELECT usage_agg.consume_quota('{U}', 3, 'session', 'request-1');
         SELECT usage_agg.quota_status('{U}');
         SELECT * FROM usage_agg.usage_summary('{U}', '2026-05-01 12:00+00');
         SELECT * FROM usage_agg.check_usage_limit('{U}', '2026-05-01 12:00+00');
         SELECT usage_agg.cleanup_old_key_usage_logs('10000 days');
         SELECT usage_agg.cleanup_old_daily_logs('10000 days');
         SELECT * FROM usage_agg.verify_daily_logs('2026-05-01', '2026-05-01');
         SELECT usage_agg.rebuild_daily_logs('2026-05-01', '2026-05-01');"
    ))
    .unwrap();
    assert_eq!(scalar_i64(&mut admin, "SELECT count(*) FROM evil.calls"), 0);
    assert_eq!(
        scalar_i64(&mut admin, "SELECT count(*) FROM evil.daily_logs"),
        0
    );
    assert_eq!(
        scalar_text(
            &mut admin,
            &format!("SELECT date || ' ' || (log_data->>'api_call_count') || ' ' || (log_data->'shared_service_usage'->>'tokens_used')
                             || ' ' || (log_data->'shared_service_usage'->>'estimated_cost')
                        FROM usage_agg.daily_logs WHERE user_id = '{U}'")
        ),
        Some("2026-05-01 100 501 50.0".to_string())
    );
    assert_eq!(
        scalar_text(
            &mut c,
            &format!("SELECT monthly_used::text FROM usage_agg.quotas WHERE user_id = '{U}'")
        ),
        Some("6".to_string())
    );
    assert_eq!(
        verify(&mut admin, "2026-05-01", "2026-05-01"),
        Vec::<String>::new()
    );
}

/// The row-level security example of README.md, as written there.
const RLS_EXAMPLE: &str = "
CREATE ROLE ua_test_end_users NOLOGIN;
SELECT usage_agg.grant_read_role('ua_test_end_users');
-- quota_status runs as the extension's owner (it may create or reset the row):
-- end users read usage_agg.quotas instead.
REVOKE EXECUTE ON FUNCTION usage_agg.quota_status(uuid) FROM ua_test_end_users;
ALTER TABLE usage_agg.daily_logs ENABLE ROW LEVEL SECURITY;
ALTER TABLE usage_agg.monthly_logs ENABLE ROW LEVEL SECURITY;
ALTER TABLE usage_agg.pending_deltas ENABLE ROW LEVEL SECURITY;
ALTER TABLE usage_agg.quotas ENABLE ROW LEVEL SECURITY;
ALTER TABLE usage_agg.quota_usage_logs ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON usage_agg.daily_logs FOR SELECT TO ua_test_end_users
    USING (user_id = nullif(current_setting('app.user_id', true), '')::uuid);
CREATE POLICY own_rows ON usage_agg.monthly_logs FOR SELECT TO ua_test_end_users
    USING (user_id = nullif(current_setting('app.user_id', true), '')::uuid);
CREATE POLICY own_rows ON usage_agg.pending_deltas FOR SELECT TO ua_test_end_users
    USING (user_id = nullif(current_setting('app.user_id', true), '')::uuid);
CREATE POLICY own_rows ON usage_agg.quotas FOR SELECT TO ua_test_end_users
    USING (user_id = nullif(current_setting('app.user_id', true), '')::uuid);
CREATE POLICY own_rows ON usage_agg.quota_usage_logs FOR SELECT TO ua_test_end_users
    USING (user_id = nullif(current_setting('app.user_id', true), '')::uuid);
-- the application role itself still reads every user
CREATE POLICY app_reads_all ON usage_agg.daily_logs FOR SELECT TO ua_test_rls_app USING (true);
CREATE POLICY app_reads_all ON usage_agg.monthly_logs FOR SELECT TO ua_test_rls_app USING (true);
CREATE POLICY app_reads_all ON usage_agg.pending_deltas FOR SELECT TO ua_test_rls_app USING (true);
CREATE POLICY app_reads_all ON usage_agg.quotas FOR SELECT TO ua_test_rls_app USING (true);
CREATE POLICY app_reads_all ON usage_agg.quota_usage_logs FOR SELECT TO ua_test_rls_app USING (true);
";

#[test]
fn row_level_security_lets_each_end_user_read_only_their_rows() {
    let db = TestDb::new("security_rls");
    let mut admin = db.connect();
    admin
        .batch_execute(
            "DROP ROLE IF EXISTS ua_test_alice; DROP ROLE IF EXISTS ua_test_end_users; DROP ROLE IF EXISTS ua_test_rls_app;
             CREATE ROLE ua_test_rls_app LOGIN;
             SELECT usage_agg.grant_app_role('ua_test_rls_app');",
        )
        .unwrap();
    admin.batch_execute(RLS_EXAMPLE).unwrap();
    admin
        .batch_execute("CREATE ROLE ua_test_alice LOGIN IN ROLE ua_test_end_users")
        .unwrap();
    let alice = "a11ce000-0000-0000-0000-000000000001";
    let bob = "b0b00000-0000-0000-0000-000000000002";
    // The application writes for both users (the fold and quota functions run as
    // the extension's owner, so RLS does not stop them).
    let mut app = connect_as(&db, "ua_test_rls_app");
    app.batch_execute(&format!(
        "INSERT INTO usage_agg.key_usage_logs (user_id, cost_estimate) VALUES ('{alice}', 1), ('{bob}', 2), ('{bob}', 3);
         SELECT usage_agg.consume_quota('{alice}', 1, NULL, 'a1');
         SELECT usage_agg.consume_quota('{bob}', 5, NULL, 'b1');"
    ))
    .unwrap();
    assert_eq!(
        scalar_i64(&mut app, "SELECT count(*) FROM usage_agg.daily_logs"),
        2
    );

    let mut a = connect_as(&db, "ua_test_alice");
    a.batch_execute(&format!("SET app.user_id = '{alice}'"))
        .unwrap();
    let own = |c: &mut Client, sql: &str| scalar_text(c, sql).unwrap();
    assert_eq!(
        own(
            &mut a,
            "SELECT string_agg(user_id::text, ',') FROM usage_agg.daily_logs"
        ),
        alice
    );
    assert_eq!(
        own(
            &mut a,
            "SELECT string_agg(user_id::text || '=' || monthly_used, ',') FROM usage_agg.quotas"
        ),
        format!("{alice}=1")
    );
    assert_eq!(
        own(
            &mut a,
            "SELECT count(*)::text FROM usage_agg.quota_usage_logs"
        ),
        "1"
    );
    // The views and the read functions apply the same policies.
    assert_eq!(
        own(
            &mut a,
            "SELECT string_agg(user_id::text, ',') FROM usage_agg.daily_usage"
        ),
        alice
    );
    assert_eq!(
        own(
            &mut a,
            &format!("SELECT calls::text FROM usage_agg.usage_summary('{bob}') WHERE period = 'all_time'")
        ),
        "0"
    );
    assert_eq!(
        own(
            &mut a,
            &format!("SELECT calls::text FROM usage_agg.usage_summary('{alice}') WHERE period = 'all_time'")
        ),
        "1"
    );
    // Without a user set, nothing.
    a.batch_execute("RESET app.user_id").unwrap();
    assert_eq!(
        scalar_i64(&mut a, "SELECT count(*) FROM usage_agg.daily_logs"),
        0
    );
    admin
        .batch_execute("DROP OWNED BY ua_test_alice, ua_test_end_users, ua_test_rls_app; DROP ROLE ua_test_alice; DROP ROLE ua_test_end_users; DROP ROLE ua_test_rls_app;")
        .unwrap();
}
