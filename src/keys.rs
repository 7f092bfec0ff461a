//! Per-key and service aggregates: `key_daily_logs` (one row per shared key
//! and business day, across users) and `service_daily_logs` (one row per
//! business day, every call).
//!
//! These are the hottest rows there are (every call of a key touches one), so
//! only the applier writes them: an apply folds the calls it takes from
//! `pending_deltas` into them in the same transaction. A statement that folds
//! its own calls into `daily_logs` (immediate mode, corrections) appends its
//! per-key and service deltas to `pending_key_deltas` instead, one row per
//! (key, day) it touched, which never waits for another session; the next apply
//! folds them. Readers add both pending tables in.
//!
//! Users of a key's day: the user fold reports who joined or left a key's day
//! (`fold::UserChange`), in the transaction that changed the user's row, so the
//! count is exact without looking at other users.

use std::collections::BTreeMap;

use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::errors;
use crate::fold::{Group, Written};
use crate::jsonb::Jsonb;
use crate::keydata::{self, RollupDelta};
use crate::plans::{kept_statement, Sql};

/// A (key, day): the key's uuid as text, the day in days since 2000-01-01.
pub type KeyDay = (String, i32);

/// The per-key and service deltas of one statement or one apply.
#[derive(Default)]
pub struct Rollups {
    pub keys: BTreeMap<KeyDay, RollupDelta>,
    pub service: BTreeMap<i32, RollupDelta>,
}

impl Rollups {
    /// The deltas of `groups` as `written` wrote them: leaving out the (user,
    /// day)s it skipped (their calls stay pending), with the users it reports.
    pub fn of(groups: &[Group], written: &Written) -> Rollups {
        let (skipped, changes) = (&written.skipped, &written.changes);
        let mut out = Rollups::default();
        for ((user, day), row, removed) in groups {
            if skipped.iter().any(|s| s.key == (*user, *day)) {
                continue;
            }
            out.service.entry(*day).or_default().apply(row, *removed);
            if let Some(key) = &row.key {
                out.keys
                    .entry((key.clone(), *day))
                    .or_default()
                    .apply(row, *removed);
            }
        }
        for change in changes {
            let day = change.key.1;
            if change.active != 0 {
                out.service.entry(day).or_default().users += change.active;
            }
            for (key, n) in &change.keys {
                out.keys.entry((key.clone(), day)).or_default().users += n;
            }
        }
        out.keys.retain(|_, d| !d.is_noop() || d.has_removals());
        out.service.retain(|_, d| !d.is_noop() || d.has_removals());
        out
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.service.is_empty()
    }

    fn add(&mut self, key: Option<String>, day: i32, delta: &RollupDelta) {
        match key {
            Some(k) => self.keys.entry((k, day)).or_default().add(delta),
            None => self.service.entry(day).or_default().add(delta),
        }
    }
}

kept_statement! {
    /// A statement's per-key (key set) and service (key NULL) deltas, for the
    /// next apply. Removed times in Unix microseconds.
    APPEND_KEY_PENDING {
        what: "appending per-key deltas",
        sql: Sql::Text("
            INSERT INTO usage_agg.pending_key_deltas
                   (shared_key_id, day, delta, removed_last_at, removed_last_failure_at)
            SELECT u.key::uuid, DATE '2000-01-01' + u.day, u.delta,
                   TIMESTAMPTZ 'epoch' + u.removed_last * INTERVAL '1 microsecond',
                   TIMESTAMPTZ 'epoch' + u.removed_failure * INTERVAL '1 microsecond'
              FROM ROWS FROM (pg_catalog.unnest($1::text[]), pg_catalog.unnest($2::int4[]),
                              pg_catalog.unnest($3::jsonb[]), pg_catalog.unnest($4::int8[]),
                              pg_catalog.unnest($5::int8[]))
                   AS u(key, day, delta, removed_last, removed_failure)"),
        args: [TEXTARRAYOID, INT4ARRAYOID, JSONBARRAYOID, INT8ARRAYOID, INT8ARRAYOID],
        mutating: true,
    }
}

/// Records `rollups` in pending_key_deltas (a statement that folded its own
/// calls into daily_logs).
pub fn append_pending(client: &SpiClient<'_>, rollups: &Rollups) {
    if rollups.is_empty() {
        return;
    }
    let mut keys: Vec<Option<String>> = Vec::new();
    let mut days = Vec::new();
    let mut docs = Vec::new();
    let mut removed = Vec::new();
    let mut removed_failure = Vec::new();
    let entries = rollups
        .keys
        .iter()
        .map(|((k, d), delta)| (Some(k.clone()), *d, delta))
        .chain(rollups.service.iter().map(|(d, delta)| (None, *d, delta)));
    for (key, day, delta) in entries {
        keys.push(key);
        days.push(day);
        docs.push(Jsonb(delta.to_document()));
        removed.push(delta.removed_last_at);
        removed_failure.push(delta.removed_last_failure_at);
    }
    APPEND_KEY_PENDING.run(
        client,
        &[
            keys.into(),
            days.into(),
            docs.into(),
            removed.into(),
            removed_failure.into(),
        ],
    );
}

/// Held while an apply takes pending_key_deltas: one session at a time, so
/// that every (key, day)'s deltas are folded in the order they were appended.
const KEY_PENDING_LOCK: i64 = 0x7573_6167_655f_6b70; // "usage_kp"

kept_statement! {
    TRY_KEY_PENDING_LOCK {
        what: "locking pending per-key deltas",
        sql: Sql::Text("SELECT pg_catalog.pg_try_advisory_xact_lock($1)"),
        args: [INT8OID],
        mutating: false,
    }
}

kept_statement! {
    /// The oldest $1 pending per-key deltas, taken. Appended in causal order
    /// (a correction's delta comes after the additions it corrects), so a prefix
    /// by id never holds a removal without its addition.
    TAKE_KEY_PENDING {
        what: "taking pending per-key deltas",
        sql: Sql::Text("
            WITH taken AS (
                DELETE FROM usage_agg.pending_key_deltas p
                 WHERE p.id IN (SELECT q.id FROM usage_agg.pending_key_deltas q ORDER BY q.id LIMIT $1)
                RETURNING p.*)
            SELECT t.shared_key_id::text, (t.day - DATE '2000-01-01')::int4, t.delta,
                   (extract(epoch FROM t.removed_last_at) * 1000000)::int8,
                   (extract(epoch FROM t.removed_last_failure_at) * 1000000)::int8
              FROM taken t"),
        args: [INT4OID],
        mutating: true,
    }
}

/// Adds up to `max_rows` pending per-key deltas to `rollups`, unless another
/// session is taking them (then they wait for the next apply).
pub fn take_pending(client: &SpiClient<'_>, rollups: &mut Rollups, max_rows: i32) {
    let locked = TRY_KEY_PENDING_LOCK
        .run(client, &[KEY_PENDING_LOCK.into()])
        .first()
        .get::<bool>(1)
        .unwrap_or_else(|e| errors::internal("locking pending per-key deltas", e))
        .unwrap_or(false);
    if !locked {
        return;
    }
    for row in TAKE_KEY_PENDING.run(client, &[max_rows.into()]) {
        let fail = |e: String| -> ! { errors::internal("reading pending per-key deltas", e) };
        let key = row.get::<String>(1).unwrap_or_else(|e| fail(e.to_string()));
        let day = row
            .get::<i32>(2)
            .unwrap_or_else(|e| fail(e.to_string()))
            .unwrap_or_else(|| fail("day is NULL".into()));
        let doc = row
            .get::<Jsonb>(3)
            .unwrap_or_else(|e| fail(e.to_string()))
            .unwrap_or_else(|| fail("delta is NULL".into()));
        let removed = row.get::<i64>(4).unwrap_or_else(|e| fail(e.to_string()));
        let removed_failure = row.get::<i64>(5).unwrap_or_else(|e| fail(e.to_string()));
        let delta = RollupDelta::from_document(&doc.0, removed, removed_failure)
            .unwrap_or_else(|e| fail(e.to_string()));
        rollups.add(key, day, &delta);
    }
}

kept_statement! {
    /// Per-key days: one upsert for every (key, day) of an apply, in key order.
    UPSERT_KEY_DAYS {
        what: "writing per-key daily rows",
        sql: Sql::Text("
            INSERT INTO usage_agg.key_daily_logs AS k (shared_key_id, date, log_data, last_modified)
            SELECT u.key::uuid, DATE '2000-01-01' + u.day, u.delta, pg_catalog.now()
              FROM ROWS FROM (pg_catalog.unnest($1::text[]), pg_catalog.unnest($2::int4[]), pg_catalog.unnest($3::jsonb[]))
                   WITH ORDINALITY AS u(key, day, delta, ord)
             ORDER BY u.ord
            ON CONFLICT (shared_key_id, date) DO UPDATE
               SET log_data = usage_agg._rollup_add(k.log_data, EXCLUDED.log_data),
                   last_modified = EXCLUDED.last_modified"),
        args: [TEXTARRAYOID, INT4ARRAYOID, JSONBARRAYOID],
        mutating: true,
    }
}

kept_statement! {
    UPSERT_SERVICE_DAYS {
        what: "writing service daily rows",
        sql: Sql::Text("
            INSERT INTO usage_agg.service_daily_logs AS s (date, log_data, last_modified)
            SELECT DATE '2000-01-01' + u.day, u.delta, pg_catalog.now()
              FROM ROWS FROM (pg_catalog.unnest($1::int4[]), pg_catalog.unnest($2::jsonb[]))
                   WITH ORDINALITY AS u(day, delta, ord)
             ORDER BY u.ord
            ON CONFLICT (date) DO UPDATE
               SET log_data = usage_agg._rollup_add(s.log_data, EXCLUDED.log_data),
                   last_modified = EXCLUDED.last_modified"),
        args: [INT4ARRAYOID, JSONBARRAYOID],
        mutating: true,
    }
}

/// The corrected document of `alias`'s row: the newest call and failure
/// removed (`removed_last`, `removed_failure`) replaced by the detail's
/// (`last`, `last_failure`, read only where `_needs_detail` says so). All
/// arguments are SQL fragments of this module.
fn corrected_log_data(
    alias: &str,
    removed_last: &str,
    removed_failure: &str,
    last: &str,
    last_failure: &str,
) -> String {
    format!(
        "usage_agg._rollup_correct_last({alias}.log_data, {removed_last}, {removed_failure},
                    CASE WHEN usage_agg._needs_detail({alias}.log_data->>'last_call_at', {removed_last})
                         THEN {last} END,
                    CASE WHEN usage_agg._needs_detail({alias}.log_data->>'last_failure_at', {removed_failure})
                         THEN {last_failure} END)"
    )
}

/// After removals: the newest call and failure of a day, read from the
/// detail (`_detail_newest`, which the views use too) where the stored ones may
/// have been removed. `table` and its columns are constants of this module.
fn correct_query(table: &str, alias: &str, key_column: Option<&str>) -> String {
    let key = key_column.map_or("NULL".to_string(), |c| format!("{alias}.{c}"));
    let join = key_column.map_or(String::new(), |c| format!("{alias}.{c} = u.key::uuid AND"));
    let newest = |failed: bool| {
        format!(
            "(extract(epoch FROM usage_agg._detail_newest({key}, {alias}.date, {failed})) * 1000000)::int8"
        )
    };
    let log_data = corrected_log_data(
        alias,
        "u.removed_last",
        "u.removed_failure",
        &newest(false),
        &newest(true),
    );
    format!(
        "UPDATE usage_agg.{table} {alias}
            SET log_data = {log_data},
                last_modified = pg_catalog.now()
           FROM ROWS FROM (pg_catalog.unnest($1::text[]), pg_catalog.unnest($2::int4[]),
                           pg_catalog.unnest($3::int8[]), pg_catalog.unnest($4::int8[]))
                    AS u(key, day, removed_last, removed_failure)
          WHERE {join} {alias}.date = DATE '2000-01-01' + u.day
            AND {alias}.date >= (SELECT h.detail_kept_from FROM usage_agg.retention_horizon h)"
    )
}

kept_statement! {
    CORRECT_KEY_DAYS {
        what: "correcting per-key daily rows",
        sql: Sql::Built(|| correct_query("key_daily_logs", "k", Some("shared_key_id"))),
        args: [TEXTARRAYOID, INT4ARRAYOID, INT8ARRAYOID, INT8ARRAYOID],
        mutating: true,
    }
}

kept_statement! {
    CORRECT_SERVICE_DAYS {
        what: "correcting service daily rows",
        sql: Sql::Built(|| correct_query("service_daily_logs", "s", None)),
        args: [TEXTARRAYOID, INT4ARRAYOID, INT8ARRAYOID, INT8ARRAYOID],
        mutating: true,
    }
}

// On Citus, the newest calls of a corrected key's (or the service's) day come
// from a query of their own (a query over every user's shards cannot run
// inside the UPDATE of one row), and each row is corrected by itself.
kept_statement! {
    /// The newest call and failure of a day in the detail, of key `$1` (NULL:
    /// every call), in Unix microseconds.
    NEWEST_IN_DETAIL {
        what: "reading the newest calls of a corrected day",
        sql: Sql::Text("
            SELECT (extract(epoch FROM max(x.created_at)) * 1000000)::int8,
                   (extract(epoch FROM max(x.created_at) FILTER (WHERE NOT x.success)) * 1000000)::int8
              FROM usage_agg.key_usage_logs x
             WHERE x.created_at >= usage_agg._day_start(DATE '2000-01-01' + $2, $3)
               AND x.created_at <  usage_agg._day_start(DATE '2000-01-01' + $2 + 1, $3)
               AND ($1::pg_catalog.uuid IS NULL OR x.shared_key_id = $1::pg_catalog.uuid)"),
        args: [TEXTOID, INT4OID, TEXTOID],
        mutating: false,
    }
}

/// One row of [`correct_query`]'s UPDATE with the newest calls given.
/// `table` and its columns are constants of this module.
fn correct_one_query(table: &str, alias: &str, key_column: Option<&str>) -> String {
    let key = key_column.map_or(String::new(), |c| {
        format!("{alias}.{c} = $1::pg_catalog.uuid AND")
    });
    let log_data = corrected_log_data(alias, "$3", "$4", "$5", "$6");
    format!(
        "UPDATE usage_agg.{table} {alias}
            SET log_data = {log_data},
                last_modified = pg_catalog.now()
          WHERE {key} {alias}.date = DATE '2000-01-01' + $2 AND {alias}.date >= $7"
    )
}

kept_statement! {
    CORRECT_KEY_DAY {
        what: "correcting a per-key daily row",
        sql: Sql::Built(|| correct_one_query("key_daily_logs", "k", Some("shared_key_id"))),
        args: [TEXTOID, INT4OID, INT8OID, INT8OID, INT8OID, INT8OID, DATEOID],
        mutating: true,
    }
}

kept_statement! {
    CORRECT_SERVICE_DAY {
        what: "correcting a service daily row",
        sql: Sql::Built(|| correct_one_query("service_daily_logs", "s", None)),
        args: [TEXTOID, INT4OID, INT8OID, INT8OID, INT8OID, INT8OID, DATEOID],
        mutating: true,
    }
}

/// The corrections of an apply, as arrays: keys (None: the service), days,
/// and the newest call and failure removed (Unix microseconds).
type Corrections = (
    Vec<Option<String>>,
    Vec<i32>,
    Vec<Option<i64>>,
    Vec<Option<i64>>,
);

/// The corrections of [`write`] one row at a time (Citus).
fn correct_one_by_one(
    client: &SpiClient<'_>,
    statement: &'static crate::plans::KeptStatement,
    fix: Corrections,
    timezone: &str,
) {
    let kept_from = crate::fold::KEPT_FROM
        .run(client, &[timezone.into()])
        .first()
        .get::<pgrx::datum::Date>(1)
        .unwrap_or_else(|e| errors::internal("reading usage_agg.retention_horizon", e))
        .unwrap_or_else(|| errors::internal("reading usage_agg.retention_horizon", "no row"));
    let (keys, days, removed, removed_failure) = fix;
    for (((key, day), removed), removed_failure) in
        keys.into_iter().zip(days).zip(removed).zip(removed_failure)
    {
        let newest =
            NEWEST_IN_DETAIL.run(client, &[key.clone().into(), day.into(), timezone.into()]);
        let newest = newest.first();
        let read = |i: usize| {
            newest.get::<i64>(i).unwrap_or_else(|e| {
                errors::internal("reading the newest calls of a corrected day", e)
            })
        };
        let (last, last_failure) = (read(1), read(2));
        statement.run(
            client,
            &[
                key.into(),
                day.into(),
                removed.into(),
                removed_failure.into(),
                last.into(),
                last_failure.into(),
                kept_from.into(),
            ],
        );
    }
}

/// Folds `rollups` into key_daily_logs and service_daily_logs (the applier;
/// `timezone` the business time zone, for the days of corrections on Citus).
pub fn write(client: &SpiClient<'_>, rollups: Rollups, timezone: &str) {
    if rollups.is_empty() {
        return;
    }
    let mut key_fix: Corrections = Default::default();
    let mut service_fix: Corrections = Default::default();
    let push_fix = |fix: &mut Corrections, key: Option<String>, day: i32, d: &RollupDelta| {
        if d.has_removals() {
            fix.0.push(key);
            fix.1.push(day);
            fix.2.push(d.removed_last_at);
            fix.3.push(d.removed_last_failure_at);
        }
    };

    if !rollups.keys.is_empty() {
        let n = rollups.keys.len();
        let (mut keys, mut days, mut docs) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for ((key, day), delta) in &rollups.keys {
            push_fix(&mut key_fix, Some(key.clone()), *day, delta);
            keys.push(key.clone());
            days.push(*day);
            docs.push(Jsonb(delta.to_document()));
        }
        UPSERT_KEY_DAYS.run(client, &[keys.into(), days.into(), docs.into()]);
    }
    if !rollups.service.is_empty() {
        let (mut days, mut docs) = (Vec::new(), Vec::new());
        for (day, delta) in &rollups.service {
            push_fix(&mut service_fix, None, *day, delta);
            days.push(*day);
            docs.push(Jsonb(delta.to_document()));
        }
        UPSERT_SERVICE_DAYS.run(client, &[days.into(), docs.into()]);
    }
    let corrections = !key_fix.1.is_empty() || !service_fix.1.is_empty();
    if corrections && crate::fold::citus_loaded() {
        for (statement, fix) in [
            (&CORRECT_KEY_DAY, key_fix),
            (&CORRECT_SERVICE_DAY, service_fix),
        ] {
            if !fix.1.is_empty() {
                correct_one_by_one(client, statement, fix, timezone);
            }
        }
        return;
    }
    for (statement, fix) in [
        (&CORRECT_KEY_DAYS, key_fix),
        (&CORRECT_SERVICE_DAYS, service_fix),
    ] {
        if !fix.1.is_empty() {
            statement.run(
                client,
                &[fix.0.into(), fix.1.into(), fix.2.into(), fix.3.into()],
            );
        }
    }
}

/// Adds a delta (or a day) into a stored per-key or service document; the ON
/// CONFLICT arm of the applier's upserts, and the roll-up of days into months
/// with `keep_users` false.
#[pg_extern(immutable, parallel_safe, name = "_rollup_add")]
fn rollup_add(stored: Jsonb, delta: Jsonb, keep_users: default!(bool, true)) -> Jsonb {
    match keydata::merge(stored.0, &delta.0, keep_users) {
        Ok(v) => Jsonb(v),
        Err(e) => errors::corrupt_rollup(&e),
    }
}

#[pg_extern(immutable, parallel_safe, name = "_rollup_correct_last")]
fn rollup_correct_last(
    stored: Jsonb,
    removed_last_at: Option<i64>,
    removed_last_failure_at: Option<i64>,
    detail_last_at: Option<i64>,
    detail_last_failure_at: Option<i64>,
) -> Jsonb {
    match keydata::correct_last(
        stored.0,
        removed_last_at,
        removed_last_failure_at,
        detail_last_at,
        detail_last_failure_at,
    ) {
        Ok(v) => Jsonb(v),
        Err(e) => errors::corrupt_rollup(&e),
    }
}

/// Whether a stored time (text, NULL for none) must be read from the detail
/// after calls up to `removed` (Unix microseconds) were removed.
#[pg_extern(immutable, parallel_safe, name = "_needs_detail")]
fn needs_detail(stored: Option<&str>, removed: Option<i64>) -> bool {
    let stored = stored.and_then(crate::logdata::parse_timestamp_micros);
    keydata::needs_detail(stored, removed)
}
