//! Folding grouped calls into `usage_agg.daily_logs`: the writes shared by the
//! immediate fold (`trigger`) and the applier (`applier`).
//!
//! Groups arrive per (user, day, model, key) (see `grouping` and
//! [`collect_groups`]), are folded per (user, day) in Rust (`logdata`), and are
//! written with one statement per kind of change: an upsert for additions, a
//! locked correction for removals.
//!
//! An addition to a daily row whose owned fields an application corrupted can be
//! *tolerated*: the row is left as it is and the (user, day) is returned to the
//! caller, which keeps its calls pending instead of failing (see
//! [`write_groups`]). Corrections are never tolerated: they raise.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::str::FromStr;

use bigdecimal::BigDecimal;
use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiHeapTupleData, SpiTupleTable};
use pgrx::Uuid;
use rustc_hash::FxHashMap;

use crate::errors;
use crate::jsonb::Jsonb;
use crate::logdata::{self, Correction, CorruptField, DayDelta, GroupRow, Kinds, Presence};
use crate::plans::{kept_statement, Sql};

/// Names of the transition tables in `CREATE TRIGGER ... REFERENCING`.
pub const NEW_ROWS: &str = "usage_agg_new_rows";
pub const OLD_ROWS: &str = "usage_agg_old_rows";

/// A (user, business day): the day in days since 2000-01-01.
pub type Key = (Uuid, i32);

/// One group of calls: (user, day), totals, and whether they were removed.
pub type Group = (Key, GroupRow, bool);

/// The start of the business hour of timestamptz `column` in time zone
/// `timezone` (a parameter), as `usage_agg._hour_start` computes it; for
/// grouping by hour (see `hours`). Both are constants of this crate.
pub fn hour_of_sql(column: &str, timezone: &str) -> String {
    format!(
        "({column} - (({column} AT TIME ZONE {timezone}) - pg_catalog.date_trunc('hour', {column} AT TIME ZONE {timezone})))"
    )
}

/// Groups a transition table per (user, business day, model, key, hour). The
/// day and hour are computed from the row's own `created_at` in the configured
/// time zone.
/// Rows removed (`skip_expired`) are counted only from the detail horizon on
/// (`$2`, read by [`KEPT_FROM`] first): before it the retention cleanup deletes
/// detail whose aggregates must stay. The transition table is the query's
/// only table: on Citus a query that joins it with a Citus table (there
/// retention_horizon is a reference table) cannot be deparsed.
/// `$1` is the business time zone (the backend's cached config). The key is
/// grouped as a uuid and printed once per group, not once per row.
fn grouping_query(table: &str, skip_expired: bool, current_catalog: bool) -> String {
    let filter = if skip_expired {
        "WHERE t.created_at >= $2"
    } else {
        ""
    };
    // `table` is one of the two constants above, never user input.
    format!(
        "SELECT t.user_id,
                ((t.created_at AT TIME ZONE $1)::date - DATE '2000-01-01')::int4,
                t.model_used,
                t.shared_key_id::text,
                count(*)::int8,
                (count(*) FILTER (WHERE t.success))::int8,
                COALESCE(sum(t.tokens_used), 0)::int8,
                COALESCE(sum(t.cost_estimate), 0)::text,
                (extract(epoch FROM max(t.created_at)) * 1000000)::int8,
                (extract(epoch FROM max(t.created_at) FILTER (WHERE NOT t.success)) * 1000000)::int8,
                {kinds}
           FROM {table} t
          {filter}
          GROUP BY 1, 2, 3, t.shared_key_id, {hour}",
        hour = hour_of_sql("t.created_at", "$1"),
        // Before ALTER EXTENSION ... UPDATE to 0.4.0 the detail has no kinds.
        kinds = if current_catalog {
            "sum(t.input_tokens)::int8, sum(t.output_tokens)::int8,
                sum(t.cache_read_tokens)::int8, sum(t.cache_write_tokens)::int8,
                (count(*) FILTER (WHERE t.cost_estimate IS NULL))::int8"
        } else {
            "NULL::int8, NULL::int8, NULL::int8, NULL::int8, NULL::int8"
        }
    )
}

kept_statement! {
    /// Inserted rows grouped in SQL (when `grouping` cannot sum a cost exactly).
    GROUP_NEW {
        what: "reading the statement's rows",
        sql: Sql::Built(|| grouping_query(NEW_ROWS, false, true)),
        args: [TEXTOID],
        mutating: false,
    }
}

kept_statement! {
    /// GROUP_NEW against a catalog older than 0.4.0.
    GROUP_NEW_OLD_CATALOG {
        what: "reading the statement's rows",
        sql: Sql::Built(|| grouping_query(NEW_ROWS, false, false)),
        args: [TEXTOID],
        mutating: false,
    }
}

kept_statement! {
    /// Removed rows (UPDATE old side, DELETE) grouped in SQL.
    GROUP_OLD {
        what: "reading the statement's removed rows",
        sql: Sql::Built(|| grouping_query(OLD_ROWS, true, true)),
        args: [TEXTOID, TIMESTAMPTZOID],
        mutating: false,
    }
}

kept_statement! {
    /// GROUP_OLD against a catalog older than 0.4.0.
    GROUP_OLD_OLD_CATALOG {
        what: "reading the statement's removed rows",
        sql: Sql::Built(|| grouping_query(OLD_ROWS, true, false)),
        args: [TEXTOID, TIMESTAMPTZOID],
        mutating: false,
    }
}

kept_statement! {
    /// The first day whose detail still exists, and its first instant (in
    /// time zone $1).
    KEPT_FROM {
        what: "reading usage_agg.retention_horizon",
        sql: Sql::Text("
            SELECT h.detail_kept_from, usage_agg._day_start(h.detail_kept_from, $1)
              FROM usage_agg.retention_horizon h"),
        args: [TEXTOID],
        mutating: false,
    }
}

kept_statement! {
    /// Additions: one upsert for all (user, day) groups, in key order.
    UPSERT_ADDITIONS {
        what: "writing daily rows",
        sql: Sql::Text("
            INSERT INTO usage_agg.daily_logs AS d (user_id, date, log_data, last_modified)
            SELECT u.user_id, DATE '2000-01-01' + u.day, u.delta, pg_catalog.now()
              FROM ROWS FROM (pg_catalog.unnest($1::uuid[]), pg_catalog.unnest($2::int4[]), pg_catalog.unnest($3::jsonb[]))
                   WITH ORDINALITY AS u(user_id, day, delta, ord)
             ORDER BY u.ord
            ON CONFLICT (user_id, date) DO UPDATE
               SET log_data = COALESCE(usage_agg._fold_merge(d.log_data, EXCLUDED.log_data, d.user_id, d.date), d.log_data),
                   last_modified = EXCLUDED.last_modified"),
        args: [UUIDARRAYOID, INT4ARRAYOID, JSONBARRAYOID],
        mutating: true,
    }
}

kept_statement! {
    /// Additions to a single (user, day), the common case: the same upsert with
    /// scalar parameters (no arrays to build and unnest).
    UPSERT_ONE {
        what: "writing a daily row",
        sql: Sql::Text("
            INSERT INTO usage_agg.daily_logs AS d (user_id, date, log_data, last_modified)
            VALUES ($1, DATE '2000-01-01' + $2, $3, pg_catalog.now())
            ON CONFLICT (user_id, date) DO UPDATE
               SET log_data = COALESCE(usage_agg._fold_merge(d.log_data, EXCLUDED.log_data, d.user_id, d.date), d.log_data),
                   last_modified = EXCLUDED.last_modified"),
        args: [UUIDOID, INT4OID, JSONBOID],
        mutating: true,
    }
}

kept_statement! {
    /// Corrections: a day whose calls were all still pending has no daily row
    /// yet; give it an empty one, so that the correction (which may carry
    /// absorbed pending calls) has a row to correct.
    ENSURE_DAYS {
        what: "creating daily rows for a correction",
        sql: Sql::Text("
            INSERT INTO usage_agg.daily_logs AS d (user_id, date, log_data, last_modified)
            SELECT u.user_id, DATE '2000-01-01' + u.day, usage_agg._empty_log_data(), pg_catalog.now()
              FROM ROWS FROM (pg_catalog.unnest($1::uuid[]), pg_catalog.unnest($2::int4[])) AS u(user_id, day)
             ORDER BY 1, 2
            ON CONFLICT (user_id, date) DO NOTHING"),
        args: [UUIDARRAYOID, INT4ARRAYOID],
        mutating: true,
    }
}

kept_statement! {
    /// Corrections: lock the day rows first, so that the detail query of
    /// APPLY_CORRECTIONS sees every row committed before the lock was granted.
    LOCK_DAYS {
        what: "locking daily rows",
        sql: Sql::Text("
            SELECT 1 FROM usage_agg.daily_logs d
              JOIN ROWS FROM (pg_catalog.unnest($1::uuid[]), pg_catalog.unnest($2::int4[])) AS u(user_id, day)
                ON d.user_id = u.user_id AND d.date = DATE '2000-01-01' + u.day
             ORDER BY d.user_id, d.date
               FOR UPDATE OF d"),
        args: [UUIDARRAYOID, INT4ARRAYOID],
        mutating: true,
    }
}

kept_statement! {
    APPLY_CORRECTIONS {
        what: "correcting daily rows",
        sql: Sql::Text("
            UPDATE usage_agg.daily_logs d
               SET log_data = usage_agg._fold_correct(
                       d.log_data, u.delta, d.user_id, d.date, u.removed_last_at,
                       (SELECT (extract(epoch FROM max(k.created_at)) * 1000000)::int8
                          FROM usage_agg.key_usage_logs k
                         WHERE k.user_id = d.user_id
                           AND k.created_at >= usage_agg._day_start(d.date, $5)
                           AND k.created_at <  usage_agg._day_start(d.date + 1, $5))),
                   last_modified = pg_catalog.now()
              FROM ROWS FROM (pg_catalog.unnest($1::uuid[]), pg_catalog.unnest($2::int4[]),
                             pg_catalog.unnest($3::jsonb[]), pg_catalog.unnest($4::int8[]))
                       AS u(user_id, day, delta, removed_last_at)
             WHERE d.user_id = u.user_id AND d.date = DATE '2000-01-01' + u.day"),
        args: [UUIDARRAYOID, INT4ARRAYOID, JSONBARRAYOID, INT8ARRAYOID, TEXTOID],
        mutating: true,
    }
}

// On Citus a correction is folded in the trigger on the shard, where only a
// query on one user's colocated shards can run (Citus executes it here, on the
// shard's node): ENSURE_DAYS, LOCK_DAYS and APPLY_CORRECTIONS for one (user,
// day) at a time.
kept_statement! {
    ENSURE_DAY {
        what: "creating a daily row for a correction",
        sql: Sql::Text("
            INSERT INTO usage_agg.daily_logs AS d (user_id, date, log_data, last_modified)
            VALUES ($1, DATE '2000-01-01' + $2, usage_agg._empty_log_data(), pg_catalog.now())
            ON CONFLICT (user_id, date) DO NOTHING"),
        args: [UUIDOID, INT4OID],
        mutating: true,
    }
}

kept_statement! {
    LOCK_DAY {
        what: "locking a daily row",
        sql: Sql::Text("
            SELECT 1 FROM usage_agg.daily_logs d
             WHERE d.user_id = $1 AND d.date = DATE '2000-01-01' + $2
               FOR UPDATE OF d"),
        args: [UUIDOID, INT4OID],
        mutating: true,
    }
}

kept_statement! {
    APPLY_CORRECTION {
        what: "correcting a daily row",
        sql: Sql::Text("
            UPDATE usage_agg.daily_logs d
               SET log_data = usage_agg._fold_correct(
                       d.log_data, $3, d.user_id, d.date, $4,
                       (SELECT (extract(epoch FROM max(k.created_at)) * 1000000)::int8
                          FROM usage_agg.key_usage_logs k
                         WHERE k.user_id = $1
                           AND k.created_at >= usage_agg._day_start(DATE '2000-01-01' + $2, $5)
                           AND k.created_at <  usage_agg._day_start(DATE '2000-01-01' + $2 + 1, $5))),
                   last_modified = pg_catalog.now()
             WHERE d.user_id = $1 AND d.date = DATE '2000-01-01' + $2"),
        args: [UUIDOID, INT4OID, JSONBOID, INT8OID, TEXTOID],
        mutating: true,
    }
}

/// How many columns [`PENDING_GROUP_COLUMNS`] has (a query's own columns follow).
pub const PENDING_GROUP_WIDTH: usize = 15;

/// The columns every query over pending_deltas returns, in [`GroupRow`] order
/// (see [`collect_groups`]).
pub const PENDING_GROUP_COLUMNS: &str = "
    p.user_id, (p.day - DATE '2000-01-01')::int4, p.model_used, p.shared_key_id::text,
    sum(p.calls)::int8, sum(p.successful)::int8, sum(p.tokens)::int8, sum(p.cost)::text,
    (extract(epoch FROM max(p.last_at)) * 1000000)::int8,
    (extract(epoch FROM max(p.last_failure_at)) * 1000000)::int8,
    sum(p.input_tokens)::int8, sum(p.output_tokens)::int8, sum(p.cache_read_tokens)::int8,
    sum(p.cache_write_tokens)::int8, sum(p.unpriced)::int8";

/// The pending calls of the corrected (user, day)s, deleted and grouped (by
/// hour too, in time zone $3); before 0.4.0's catalog the columns it added
/// are read as NULL.
fn absorb_query(current_catalog: bool) -> String {
    let mut columns = PENDING_GROUP_COLUMNS.to_string();
    if !current_catalog {
        columns = columns.replace("max(p.last_failure_at)", "NULL::timestamptz");
        for column in [
            "sum(p.input_tokens)",
            "sum(p.output_tokens)",
            "sum(p.cache_read_tokens)",
            "sum(p.cache_write_tokens)",
            "sum(p.unpriced)",
        ] {
            columns = columns.replace(column, "NULL::int8");
        }
    }
    let hour = hour_of_sql("p.last_at", "$3");
    format!(
        "WITH taken AS (
             DELETE FROM usage_agg.pending_deltas d
              USING ROWS FROM (pg_catalog.unnest($1::uuid[]), pg_catalog.unnest($2::int4[])) AS k(user_id, day)
              WHERE d.user_id = k.user_id AND d.day = DATE '2000-01-01' + k.day
          RETURNING d.*)
         SELECT {columns} FROM taken p GROUP BY 1, 2, 3, 4, {hour}"
    )
}

kept_statement! {
    /// Before a correction: takes the pending calls of the corrected (user,
    /// day)s, so that they are folded together with it (a removal must never be
    /// applied before the addition it removes). Waits for a concurrent apply.
    ABSORB_PENDING {
        what: "taking pending calls",
        sql: Sql::Built(|| absorb_query(true)),
        args: [UUIDARRAYOID, INT4ARRAYOID, TEXTOID],
        mutating: true,
    }
}

kept_statement! {
    /// ABSORB_PENDING against a catalog older than 0.4.0 (no last_failure_at),
    /// between installing this library and ALTER EXTENSION ... UPDATE.
    ABSORB_PENDING_OLD_CATALOG {
        what: "taking pending calls",
        sql: Sql::Built(|| absorb_query(false)),
        args: [UUIDARRAYOID, INT4ARRAYOID, TEXTOID],
        mutating: true,
    }
}

/// Turns the rows of a group query (columns as in [`PENDING_GROUP_COLUMNS`])
/// into groups.
pub fn collect_groups(rows: SpiTupleTable<'_>, removed: bool, out: &mut Vec<Group>) {
    out.extend(rows.map(|row| group_of(&row, removed)));
}

/// One row of a group query (columns as in [`PENDING_GROUP_COLUMNS`]).
pub fn group_of(row: &SpiHeapTupleData<'_>, removed: bool) -> Group {
    let get_i64 = |i: usize| -> i64 {
        row.get::<i64>(i)
            .unwrap_or_else(|e| errors::internal("reading a group", e))
            .unwrap_or(0)
    };
    let user: Uuid = row
        .get::<Uuid>(1)
        .unwrap_or_else(|e| errors::internal("reading a group", e))
        .unwrap_or_else(|| errors::internal("reading a group", "user_id is NULL"));
    let day: i32 = row
        .get::<i32>(2)
        .unwrap_or_else(|e| errors::internal("reading a group", e))
        .unwrap_or_else(|| errors::internal("reading a group", "day is NULL"));
    let cost_text: String = row
        .get::<String>(8)
        .unwrap_or_else(|e| errors::internal("reading a group", e))
        .unwrap_or_else(|| "0".to_string());
    let cost =
        BigDecimal::from_str(&cost_text).unwrap_or_else(|e| errors::internal("reading a cost", e));
    let group = GroupRow {
        model: row
            .get::<String>(3)
            .unwrap_or_else(|e| errors::internal("reading a group", e)),
        key: row
            .get::<String>(4)
            .unwrap_or_else(|e| errors::internal("reading a group", e)),
        calls: get_i64(5),
        successful: get_i64(6),
        tokens: get_i64(7),
        cost,
        last_at_micros: Some(get_i64(9)),
        last_failure_micros: row
            .get::<i64>(10)
            .unwrap_or_else(|e| errors::internal("reading a group", e)),
        kinds: Kinds::from_values([
            get_i64(11),
            get_i64(12),
            get_i64(13),
            get_i64(14),
            get_i64(15),
        ]),
        absorbed: false,
    };
    ((user, day), group, removed)
}

/// Reads a transition table grouped in SQL.
pub fn read_groups_in_sql(
    client: &SpiClient<'_>,
    removed: bool,
    current_catalog: bool,
    timezone: &str,
    out: &mut Vec<Group>,
) {
    let statement = match (removed, current_catalog) {
        (true, true) => &GROUP_OLD,
        (true, false) => &GROUP_OLD_OLD_CATALOG,
        (false, true) => &GROUP_NEW,
        (false, false) => &GROUP_NEW_OLD_CATALOG,
    };
    let rows = if removed {
        let kept_from = KEPT_FROM
            .run(client, &[timezone.into()])
            .first()
            .get::<pgrx::datum::TimestampWithTimeZone>(2)
            .unwrap_or_else(|e| errors::internal("reading usage_agg.retention_horizon", e))
            .unwrap_or_else(|| errors::internal("reading usage_agg.retention_horizon", "no row"));
        statement.run(client, &[timezone.into(), kept_from.into()])
    } else {
        statement.run(client, &[timezone.into()])
    };
    collect_groups(rows, removed, out);
}

/// Adds the pending calls of every (user, day) this statement removes rows from.
pub fn absorb_pending(
    client: &SpiClient<'_>,
    rows: &mut Vec<Group>,
    current_catalog: bool,
    timezone: &str,
) {
    let mut keys: Vec<Key> = rows
        .iter()
        .filter(|(_, _, removed)| *removed)
        .map(|(k, _, _)| *k)
        .collect();
    keys.sort();
    keys.dedup();
    if keys.is_empty() {
        return;
    }
    let users: Vec<Uuid> = keys.iter().map(|k| k.0).collect();
    let days: Vec<i32> = keys.iter().map(|k| k.1).collect();
    let statement = if current_catalog {
        &ABSORB_PENDING
    } else {
        &ABSORB_PENDING_OLD_CATALOG
    };
    let taken = statement.run(client, &[users.into(), days.into(), timezone.into()]);
    let mut absorbed = Vec::new();
    collect_groups(taken, false, &mut absorbed);
    // These calls may be among the removed ones: last_api_call_at is recomputed
    // from the detail by the correction, not taken from them.
    rows.extend(absorbed.into_iter().map(|(k, mut g, r)| {
        g.absorbed = true;
        (k, g, r)
    }));
}

/// A (user, day) whose stored daily row could not be added to.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub key: Key,
    pub error: CorruptField,
}

thread_local! {
    /// While set, `_fold_merge` leaves a corrupted row as it is and records it
    /// in SKIPPED instead of raising.
    static TOLERANT: Cell<bool> = const { Cell::new(false) };
    static SKIPPED: RefCell<Vec<Skipped>> = const { RefCell::new(Vec::new()) };
    /// While set, `_fold_merge` and `_fold_correct` record in OBSERVED what each
    /// (user, day) they rewrite said before and after (see [`UserChange`]).
    static OBSERVING: Cell<bool> = const { Cell::new(false) };
    static OBSERVED: RefCell<FxHashMap<Key, (Presence, Presence)>> =
        RefCell::new(FxHashMap::default());
}

/// Ends observing when the write ends, also by an error.
struct Observing;

impl Observing {
    fn begin() -> Observing {
        OBSERVED.with(|o| o.borrow_mut().clear());
        OBSERVING.with(|t| t.set(true));
        Observing
    }
}

impl Drop for Observing {
    fn drop(&mut self) {
        OBSERVING.with(|t| t.set(false));
    }
}

fn observe(
    key: Key,
    before: impl FnOnce() -> Presence,
    after: &serde_json::Value,
    delta: &serde_json::Value,
) {
    if OBSERVING.with(Cell::get) {
        let before = before();
        let after = Presence::within(after, delta);
        OBSERVED.with(|o| {
            o.borrow_mut()
                .entry(key)
                .and_modify(|e| e.1 = after.clone())
                .or_insert_with(|| (before, after));
        });
    }
}

/// How one write changed a user's day for the per-key and service aggregates:
/// +1/-1 to the day's active users, and +1/-1 to the users of keys.
#[derive(Debug, Clone)]
pub struct UserChange {
    pub key: Key,
    pub active: i64,
    pub keys: Vec<(String, i64)>,
}

/// What [`write_groups`] did.
pub struct Written {
    /// (user, day)s left as they were (tolerant writes only).
    pub skipped: Vec<Skipped>,
    /// Users who joined or left a key's (or the service's) day.
    pub changes: Vec<UserChange>,
}

/// Resets the tolerant mode when the write ends, also by an error.
struct TolerantWrite;

impl TolerantWrite {
    fn begin() -> TolerantWrite {
        SKIPPED.with(|s| s.borrow_mut().clear());
        TOLERANT.with(|t| t.set(true));
        TolerantWrite
    }
}

impl Drop for TolerantWrite {
    fn drop(&mut self) {
        TOLERANT.with(|t| t.set(false));
    }
}

/// Writes the grouped changes of one statement (or one apply). With `tolerant`,
/// additions to corrupted daily rows are left out and returned (the caller keeps
/// those calls pending); otherwise such a row raises SQLSTATE XX001.
pub fn write_groups(
    client: &mut SpiClient<'_>,
    groups: BTreeMap<Key, DayDelta>,
    timezone: &str,
    tolerant: bool,
) -> Written {
    let added_costs = added_costs(&groups);
    lock_cost_months(client, &added_costs);
    // Who joined or left a key's day matters to the per-key aggregates only.
    if !crate::settings::per_key_aggregates() {
        let skipped = write_day_rows(client, groups, timezone, tolerant);
        check_cost_alerts(client, added_costs, &skipped);
        return Written {
            skipped,
            changes: Vec::new(),
        };
    }
    let observing = Observing::begin();
    // A day row the upsert creates is not seen by _fold_merge: it starts as
    // its delta.
    let mut fresh: Vec<(Key, Presence)> = groups
        .iter()
        .filter(|(_, d)| !d.has_removals())
        .map(|(k, d)| (*k, d.presence()))
        .collect();
    let skipped = write_day_rows(client, groups, timezone, tolerant);
    drop(observing);
    check_cost_alerts(client, added_costs, &skipped);
    let observed = OBSERVED.with(|o| std::mem::take(&mut *o.borrow_mut()));
    fresh.retain(|(k, _)| !observed.contains_key(k) && !skipped.iter().any(|s| &s.key == k));
    let mut changes = Vec::new();
    let before_nothing = Presence::default();
    for (key, (before, after)) in observed
        .iter()
        .map(|(k, (b, a))| (*k, (b, a)))
        .chain(fresh.iter().map(|(k, a)| (*k, (&before_nothing, a))))
    {
        let (active, keys) = after.changes_from(before);
        if active != 0 || !keys.is_empty() {
            changes.push(UserChange { key, active, keys });
        }
    }
    Written { skipped, changes }
}

kept_statement! {
    /// The daily cost limit and monthly budget alerts of the costs a write
    /// added (`_cost_alerts` reads the days as now written).
    COST_ALERTS {
        what: "checking cost alerts",
        sql: Sql::Text("
            SELECT usage_agg._cost_alerts(
                       $1,
                       ARRAY(SELECT DATE '2000-01-01' OPERATOR(pg_catalog.+) x.day
                               FROM pg_catalog.unnest($2) WITH ORDINALITY AS x(day, ord) ORDER BY x.ord),
                       $3::pg_catalog.numeric[])"),
        args: [UUIDARRAYOID, INT4ARRAYOID, TEXTARRAYOID],
        mutating: true,
    }
}

kept_statement! {
    /// Serialises the writers of the users' business months (before the day
    /// rows are locked; see `_lock_cost_months`).
    LOCK_COST_MONTHS {
        what: "locking the months a write adds cost to",
        sql: Sql::Text("
            SELECT usage_agg._lock_cost_months(
                       $1,
                       ARRAY(SELECT DATE '2000-01-01' OPERATOR(pg_catalog.+) x.day
                               FROM pg_catalog.unnest($2) WITH ORDINALITY AS x(day, ord) ORDER BY x.ord))"),
        args: [UUIDARRAYOID, INT4ARRAYOID],
        mutating: true,
    }
}

/// Waits for the other writers of the months `added` adds cost to, so that
/// the month total `_cost_alerts` reads afterwards includes theirs (two
/// sessions adding to different days of one month would otherwise each miss
/// the other's uncommitted days and neither see a budget crossed).
fn lock_cost_months(client: &mut SpiClient<'_>, added: &[(Key, String)]) {
    if added.is_empty() {
        return;
    }
    let users: Vec<Uuid> = added.iter().map(|((u, _), _)| *u).collect();
    let days: Vec<i32> = added.iter().map(|((_, d), _)| *d).collect();
    LOCK_COST_MONTHS.run(client, &[users.into(), days.into()]);
}

/// The (user, day)s to which a write adds cost, with the amount as exact
/// decimal text; empty while no plan or user has a cost limit.
fn added_costs(groups: &BTreeMap<Key, DayDelta>) -> Vec<(Key, String)> {
    if !crate::config::cached().is_some_and(|c| c.cost_limits) {
        return Vec::new();
    }
    let zero = bigdecimal::BigDecimal::default();
    groups
        .iter()
        .filter(|(_, d)| d.cost > zero)
        .map(|(k, d)| (*k, d.cost.to_string()))
        .collect()
}

/// Records the cost alerts that the written additions crossed (in the
/// transaction that folds them, so a rolled-back fold alerts nothing).
fn check_cost_alerts(client: &mut SpiClient<'_>, added: Vec<(Key, String)>, skipped: &[Skipped]) {
    let added: Vec<_> = added
        .into_iter()
        .filter(|(k, _)| !skipped.iter().any(|s| &s.key == k))
        .collect();
    if added.is_empty() {
        return;
    }
    let users: Vec<Uuid> = added.iter().map(|((u, _), _)| *u).collect();
    let days: Vec<i32> = added.iter().map(|((_, d), _)| *d).collect();
    let costs: Vec<String> = added.into_iter().map(|(_, c)| c).collect();
    COST_ALERTS.run(client, &[users.into(), days.into(), costs.into()]);
}

fn write_day_rows(
    client: &mut SpiClient<'_>,
    groups: BTreeMap<Key, DayDelta>,
    timezone: &str,
    tolerant: bool,
) -> Vec<Skipped> {
    let mut add_users = Vec::new();
    let mut add_days = Vec::new();
    let mut add_docs = Vec::new();
    let mut fix_users = Vec::new();
    let mut fix_days = Vec::new();
    let mut fix_docs = Vec::new();
    let mut fix_removed = Vec::new();

    for ((user, day), delta) in groups {
        if delta.has_removals() {
            if delta.is_noop() {
                continue;
            }
            fix_users.push(user);
            fix_days.push(day);
            fix_removed.push(delta.removed_last_at.unwrap_or(0));
            fix_docs.push(Jsonb(delta.to_document()));
        } else {
            add_users.push(user);
            add_days.push(day);
            add_docs.push(Jsonb(delta.to_document()));
        }
    }

    if !fix_users.is_empty() && citus_loaded() {
        for (user, day) in fix_users.iter().zip(&fix_days) {
            ENSURE_DAY.run(client, &[(*user).into(), (*day).into()]);
        }
        // In key order, as LOCK_DAYS does (groups is sorted).
        for (user, day) in fix_users.iter().zip(&fix_days) {
            LOCK_DAY.run(client, &[(*user).into(), (*day).into()]);
        }
        for (((user, day), doc), removed) in fix_users
            .into_iter()
            .zip(fix_days)
            .zip(fix_docs)
            .zip(fix_removed)
        {
            APPLY_CORRECTION.run(
                client,
                &[
                    user.into(),
                    day.into(),
                    doc.into(),
                    removed.into(),
                    timezone.into(),
                ],
            );
        }
    } else if !fix_users.is_empty() {
        ENSURE_DAYS.run(client, &[fix_users.clone().into(), fix_days.clone().into()]);
        LOCK_DAYS.run(client, &[fix_users.clone().into(), fix_days.clone().into()]);
        APPLY_CORRECTIONS.run(
            client,
            &[
                fix_users.into(),
                fix_days.into(),
                fix_docs.into(),
                fix_removed.into(),
                timezone.into(),
            ],
        );
    }

    if add_users.is_empty() {
        return Vec::new();
    }
    let guard = tolerant.then(TolerantWrite::begin);
    if add_users.len() == 1 {
        UPSERT_ONE.run(
            client,
            &[
                add_users[0].into(),
                add_days[0].into(),
                add_docs.remove(0).into(),
            ],
        );
    } else if citus_loaded() {
        // Citus runs a multi-row INSERT ... SELECT into a distributed table on
        // its shards through connections of its own, so the ON CONFLICT arm's
        // _fold_merge would observe (and skip) in another backend. A single
        // row to a shard on this node runs here (Citus's local execution).
        for ((user, day), doc) in add_users.into_iter().zip(add_days).zip(add_docs) {
            UPSERT_ONE.run(client, &[user.into(), day.into(), doc.into()]);
        }
    } else {
        UPSERT_ADDITIONS.run(
            client,
            &[add_users.into(), add_days.into(), add_docs.into()],
        );
    }
    drop(guard);
    if tolerant {
        SKIPPED.with(|s| std::mem::take(&mut *s.borrow_mut()))
    } else {
        Vec::new()
    }
}

/// Whether Citus is installed in this database (an index lookup in
/// pg_extension; only multi-row writes ask).
pub fn citus_loaded() -> bool {
    // SAFETY: a catalog lookup by name, inside a transaction (the fold's).
    unsafe { pg_sys::get_extension_oid(c"citus".as_ptr(), true) != pg_sys::InvalidOid }
}

/// Adds a delta document to a stored `log_data` (the ON CONFLICT arm of the
/// fold). NULL, in a tolerant write, when the stored row cannot be added to: the
/// upsert then keeps the row as it is (`COALESCE(..., d.log_data)`).
#[pg_extern(immutable, parallel_safe, name = "_fold_merge")]
fn fold_merge(stored: Jsonb, delta: Jsonb, user_id: Uuid, day: pgrx::datum::Date) -> Option<Jsonb> {
    let key = (user_id, day.to_pg_epoch_days());
    let before = OBSERVING
        .with(Cell::get)
        .then(|| Presence::within(&stored.0, &delta.0));
    match logdata::merge_into(stored.0, &delta.0, None) {
        Ok(v) => {
            observe(key, || before.unwrap_or_default(), &v, &delta.0);
            Some(Jsonb(v))
        }
        Err(error) if TOLERANT.with(Cell::get) => {
            SKIPPED.with(|s| {
                s.borrow_mut().push(Skipped {
                    key: (user_id, day.to_pg_epoch_days()),
                    error,
                })
            });
            None
        }
        Err(e) => errors::corrupt_daily_row(&e, &user_id, day.to_pg_epoch_days()),
    }
}

/// Applies a delta with removals, correcting `last_api_call_at` from the detail.
#[pg_extern(immutable, parallel_safe, name = "_fold_correct")]
fn fold_correct(
    stored: Jsonb,
    delta: Jsonb,
    user_id: Uuid,
    day: pgrx::datum::Date,
    removed_last_at: i64,
    detail_last_at: Option<i64>,
) -> Jsonb {
    let correction = Correction {
        removed_last_at,
        detail_last_at,
    };
    let key = (user_id, day.to_pg_epoch_days());
    let before = OBSERVING
        .with(Cell::get)
        .then(|| Presence::within(&stored.0, &delta.0));
    match logdata::merge_into(stored.0, &delta.0, Some(correction)) {
        Ok(v) => {
            observe(key, || before.unwrap_or_default(), &v, &delta.0);
            Jsonb(v)
        }
        Err(e) => errors::corrupt_daily_row(&e, &user_id, day.to_pg_epoch_days()),
    }
}
