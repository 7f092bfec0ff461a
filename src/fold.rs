//! The fold: statement-level triggers on `usage_agg.key_usage_logs` that keep
//! `usage_agg.daily_logs` exact.
//!
//! Each INSERT, UPDATE or DELETE statement (and COPY) fires once. Its transition
//! tables are grouped per (user, day, model, key) — inserted rows in Rust
//! (`grouping`), removed rows by one SQL query that also applies the retention
//! horizon — folded per (user, day) in Rust (`logdata`), and written with one
//! statement per kind of change: an upsert for additions, a locked correction for
//! removals. Plans are prepared once per backend and kept.
//!
//! In deferred mode (`config.fold_mode = 'deferred'`) a small INSERT statement only
//! appends its rows to `usage_agg.pending_deltas` (without SPI, see `pending`),
//! which takes no lock on `daily_logs` (one user's calls from many sessions then
//! never queue behind each other); `apply_pending_deltas()` folds them later with
//! the same upsert, and the readers add pending rows in, so their numbers stay
//! exact.

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::str::FromStr;

use bigdecimal::BigDecimal;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::{PgOid, Uuid};

use crate::errors;
use crate::grouping;
use crate::jsonb::Jsonb;
use crate::logdata::{self, Correction, DayDelta, GroupRow};
use crate::pending;

/// Names of the transition tables in `CREATE TRIGGER ... REFERENCING`.
pub const NEW_ROWS: &str = "usage_agg_new_rows";
pub const OLD_ROWS: &str = "usage_agg_old_rows";

/// Groups a transition table per (user, business day, model, key). The day is
/// computed from the row's own `created_at` in the configured time zone.
/// Rows removed (`skip_expired`) are counted only from the detail horizon on:
/// before it the retention cleanup deletes detail whose aggregates must stay.
/// `$1` is the business time zone (the backend's cached config). The key is
/// grouped as a uuid and printed once per group, not once per row.
fn grouping_query(table: &str, skip_expired: bool) -> String {
    let (horizon, filter) = if skip_expired {
        (
            "CROSS JOIN (SELECT usage_agg._day_start(h.detail_kept_from, $1) AS kept_from
                           FROM usage_agg.retention_horizon h) hz",
            "WHERE t.created_at >= hz.kept_from",
        )
    } else {
        ("", "")
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
                (extract(epoch FROM max(t.created_at)) * 1000000)::int8
           FROM {table} t
          {horizon}
          {filter}
          GROUP BY 1, 2, 3, t.shared_key_id"
    )
}

/// Additions: one upsert for all (user, day) groups of the statement, in key order.
const UPSERT_ADDITIONS: &str = "
    INSERT INTO usage_agg.daily_logs AS d (user_id, date, log_data, last_modified)
    SELECT u.user_id, DATE '2000-01-01' + u.day, u.delta, pg_catalog.now()
      FROM ROWS FROM (pg_catalog.unnest($1::uuid[]), pg_catalog.unnest($2::int4[]), pg_catalog.unnest($3::jsonb[]))
           WITH ORDINALITY AS u(user_id, day, delta, ord)
     ORDER BY u.ord
    ON CONFLICT (user_id, date) DO UPDATE
       SET log_data = usage_agg._fold_merge(d.log_data, EXCLUDED.log_data, d.user_id, d.date),
           last_modified = EXCLUDED.last_modified";

/// Corrections (rows removed by UPDATE or DELETE): lock the day rows first, so the
/// detail query below sees every row committed before the lock was granted.
const LOCK_DAYS: &str = "
    SELECT 1 FROM usage_agg.daily_logs d
      JOIN ROWS FROM (pg_catalog.unnest($1::uuid[]), pg_catalog.unnest($2::int4[])) AS u(user_id, day)
        ON d.user_id = u.user_id AND d.date = DATE '2000-01-01' + u.day
     ORDER BY d.user_id, d.date
       FOR UPDATE OF d";

const APPLY_CORRECTIONS: &str = "
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
     WHERE d.user_id = u.user_id AND d.date = DATE '2000-01-01' + u.day";

/// Deferred mode: appends a small statement's rows to pending_deltas as they are.
const APPEND_PENDING: &str = "
    INSERT INTO usage_agg.pending_deltas
           (user_id, day, model_used, shared_key_id, calls, successful, tokens, cost, last_at)
    SELECT t.user_id, (t.created_at AT TIME ZONE $1)::date, t.model_used, t.shared_key_id,
           1, CASE WHEN t.success THEN 1 ELSE 0 END,
           COALESCE(t.tokens_used, 0), COALESCE(t.cost_estimate, 0), t.created_at
      FROM usage_agg_new_rows t";

/// The settings the fold needs. fold_mode is read through to_jsonb so that the
/// library also works against the catalog of an older version (no fold_mode
/// column) between installing it and ALTER EXTENSION ... UPDATE; the result is
/// cached only where the config_changed trigger announces changes.
const READ_CONFIG: &str = "
    SELECT c.timezone,
           (pg_catalog.to_jsonb(c) OPERATOR(pg_catalog.->>) 'fold_mode') = 'deferred',
           'usage_agg.config'::pg_catalog.regclass::pg_catalog.oid,
           pg_catalog.to_regprocedure('usage_agg._config_changed()') IS NOT NULL
      FROM usage_agg.config c";

/// Additions to a single (user, day) — every single-row INSERT, the common case:
/// the same upsert with scalar parameters (no arrays to build and unnest).
const UPSERT_ONE: &str = "
    INSERT INTO usage_agg.daily_logs AS d (user_id, date, log_data, last_modified)
    VALUES ($1, DATE '2000-01-01' + $2, $3, pg_catalog.now())
    ON CONFLICT (user_id, date) DO UPDATE
       SET log_data = usage_agg._fold_merge(d.log_data, EXCLUDED.log_data, d.user_id, d.date),
           last_modified = EXCLUDED.last_modified";

/// Statements with more rows than this fold at once even in deferred mode: a bulk
/// load is grouped per (user, day) into far fewer rows than it would append.
const DEFERRED_MAX_ROWS: i64 = 64;

/// The columns every group query returns, in [`GroupRow`] order (see
/// `collect_groups`).
const GROUP_COLUMNS: &str = "
    p.user_id, (p.day - DATE '2000-01-01')::int4, p.model_used, p.shared_key_id::text,
    sum(p.calls)::int8, sum(p.successful)::int8, sum(p.tokens)::int8, sum(p.cost)::text,
    (extract(epoch FROM max(p.last_at)) * 1000000)::int8";

/// Before a correction: takes the pending rows of the corrected (user, day)s, so
/// that they are folded together with it (a removal must never be applied before
/// the addition it removes). Waits for a concurrent apply_pending_deltas().
fn absorb_pending_sql() -> String {
    format!(
        "WITH taken AS (
             DELETE FROM usage_agg.pending_deltas d
              USING ROWS FROM (pg_catalog.unnest($1::uuid[]), pg_catalog.unnest($2::int4[])) AS k(user_id, day)
              WHERE d.user_id = k.user_id AND d.day = DATE '2000-01-01' + k.day
          RETURNING d.*)
         SELECT {GROUP_COLUMNS} FROM taken p GROUP BY 1, 2, 3, 4"
    )
}

/// apply_pending_deltas(): takes up to $1 pending rows no other session is
/// applying, grouped like a statement's rows.
fn take_pending_sql() -> String {
    format!(
        "WITH taken AS (
             DELETE FROM usage_agg.pending_deltas d
              WHERE d.ctid = ANY (ARRAY(SELECT q.ctid FROM usage_agg.pending_deltas q
                                         LIMIT $1 FOR UPDATE SKIP LOCKED))
          RETURNING d.*)
         SELECT {GROUP_COLUMNS} FROM taken p GROUP BY 1, 2, 3, 4"
    )
}

thread_local! {
    static GROUP_NEW: OnceCell<OwnedPreparedStatement> = const { OnceCell::new() };
    static GROUP_OLD: OnceCell<OwnedPreparedStatement> = const { OnceCell::new() };
    static UPSERT: OnceCell<OwnedPreparedStatement> = const { OnceCell::new() };
    static LOCK: OnceCell<OwnedPreparedStatement> = const { OnceCell::new() };
    static CORRECT: OnceCell<OwnedPreparedStatement> = const { OnceCell::new() };
    static APPEND: OnceCell<OwnedPreparedStatement> = const { OnceCell::new() };
    static CONFIG_PLAN: OnceCell<OwnedPreparedStatement> = const { OnceCell::new() };
    static UPSERT1: OnceCell<OwnedPreparedStatement> = const { OnceCell::new() };
    static ABSORB: OnceCell<OwnedPreparedStatement> = const { OnceCell::new() };
    static TAKE: OnceCell<OwnedPreparedStatement> = const { OnceCell::new() };
}

fn with_plan<R>(
    cell: &'static std::thread::LocalKey<OnceCell<OwnedPreparedStatement>>,
    client: &SpiClient<'_>,
    sql: &dyn Fn() -> String,
    args: &[PgOid],
    mutating: bool,
    f: impl FnOnce(&OwnedPreparedStatement) -> R,
) -> R {
    cell.with(|c| {
        let plan = c.get_or_init(|| {
            let sql = sql();
            let prepared = if mutating {
                client.prepare_mut(sql.as_str(), args)
            } else {
                client.prepare(sql.as_str(), args)
            };
            prepared
                .unwrap_or_else(|e| errors::internal("preparing the fold", e))
                .keep()
        });
        f(plan)
    })
}

/// Runs a kept statement (prepared on first use) with `args`; a failure is an
/// internal error saying what was being done.
#[allow(clippy::too_many_arguments)]
fn run_kept<'conn>(
    cell: &'static std::thread::LocalKey<OnceCell<OwnedPreparedStatement>>,
    client: &SpiClient<'conn>,
    sql: &dyn Fn() -> String,
    types: &[PgOid],
    mutating: bool,
    args: &[pgrx::datum::DatumWithOid<'_>],
    what: &str,
) -> pgrx::spi::SpiTupleTable<'conn> {
    with_plan(cell, client, sql, types, mutating, |plan| {
        client
            .select(plan, None, args)
            .unwrap_or_else(|e| errors::internal(what, e))
    })
}

type Key = (Uuid, i32);

/// Turns the rows of a group query (columns as in `GROUP_COLUMNS`) into
/// (key, row, removed) triples.
fn collect_groups(
    rows: pgrx::spi::SpiTupleTable<'_>,
    removed: bool,
    out: &mut Vec<(Key, GroupRow, bool)>,
) {
    for row in rows {
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
        let cost = BigDecimal::from_str(&cost_text)
            .unwrap_or_else(|e| errors::internal("reading a cost", e));
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
        };
        out.push(((user, day), group, removed));
    }
}

/// Reads one grouped transition table into (key, row, removed) triples.
fn read_groups(
    client: &SpiClient<'_>,
    cell: &'static std::thread::LocalKey<OnceCell<OwnedPreparedStatement>>,
    table: &'static str,
    removed: bool,
    timezone: &str,
    out: &mut Vec<(Key, GroupRow, bool)>,
) {
    let rows = run_kept(
        cell,
        client,
        &|| grouping_query(table, removed),
        &[PgOid::from(pg_sys::TEXTOID)],
        false,
        &[timezone.into()],
        "reading the statement's rows",
    );
    collect_groups(rows, removed, out);
}

/// This backend's copy of the settings in usage_agg.config. Dropped when the
/// table's relcache entry is invalidated, which the `config_changed` trigger
/// causes on every change (and which a sinval reset or DROP EXTENSION cause too).
#[derive(Clone)]
struct FoldConfig {
    timezone: String,
    deferred: bool,
    /// The catalog is 0.2.0 or later (config_changed, pending_deltas exist);
    /// false only between installing this library and ALTER EXTENSION UPDATE.
    current_catalog: bool,
}

thread_local! {
    static CONFIG: RefCell<Option<FoldConfig>> = const { RefCell::new(None) };
    static CONFIG_OID: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

unsafe extern "C-unwind" fn config_invalidated(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let ours = CONFIG_OID.with(Cell::get);
    if relid == pg_sys::InvalidOid || relid == ours {
        CONFIG.with(|c| c.replace(None));
        CONFIG_OID.with(|o| o.set(pg_sys::InvalidOid));
    }
}

/// The settings, when this backend has them cached (no SPI needed).
fn cached_config() -> Option<FoldConfig> {
    CONFIG.with(|c| c.borrow().clone())
}

fn fold_config(client: &SpiClient<'_>) -> FoldConfig {
    if !CALLBACK_REGISTERED.with(Cell::get) {
        // SAFETY: registers a plain function for the life of the backend.
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(Some(config_invalidated), pg_sys::Datum::from(0))
        };
        CALLBACK_REGISTERED.with(|r| r.set(true));
    }
    if let Some(cached) = cached_config() {
        return cached;
    }
    let row = run_kept(
        &CONFIG_PLAN,
        client,
        &|| READ_CONFIG.to_string(),
        &[],
        false,
        &[],
        "reading usage_agg.config",
    )
    .first();
    let config = FoldConfig {
        timezone: config_column::<String>(&row, 1).unwrap_or_else(|| "UTC".to_string()),
        deferred: config_column::<bool>(&row, 2).unwrap_or(false),
        current_catalog: config_column::<bool>(&row, 4).unwrap_or(false),
    };
    let oid = config_column::<pg_sys::Oid>(&row, 3).unwrap_or(pg_sys::InvalidOid);
    // Cached only where the config_changed trigger announces changes.
    if config.current_catalog {
        CONFIG_OID.with(|o| o.set(oid));
        CONFIG.with(|c| c.replace(Some(config.clone())));
    }
    config
}

fn config_column<T: pgrx::FromDatum + pgrx::IntoDatum>(
    row: &pgrx::spi::SpiTupleTable<'_>,
    ordinal: usize,
) -> Option<T> {
    row.get::<T>(ordinal)
        .unwrap_or_else(|e| errors::internal("reading usage_agg.config", e))
}

/// Number of rows in the statement's NEW transition table (0 without one).
fn new_row_count(trigger: &PgTrigger<'_>) -> i64 {
    let store = trigger.trigger_data().tg_newtable;
    if store.is_null() {
        return 0;
    }
    // SAFETY: tg_newtable is the live transition tuplestore of this trigger call.
    unsafe { pg_sys::tuplestore_tuple_count(store) }
}

/// The trigger function. Created by hand in `sql/fold.sql` (it pins its
/// search_path) and attached to `key_usage_logs` for INSERT, UPDATE and DELETE.
#[pg_trigger(sql = "
CREATE FUNCTION usage_agg.fold_key_usage_logs() RETURNS trigger
    LANGUAGE c
    SET search_path = pg_catalog, pg_temp
    AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
COMMENT ON FUNCTION usage_agg.fold_key_usage_logs() IS
    'usage_agg fold: keeps usage_agg.daily_logs equal to a GROUP BY over usage_agg.key_usage_logs';
")]
fn fold_key_usage_logs<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, Infallible> {
    let has_new = trigger.new_transition_table_name().ok().flatten().is_some();
    let has_old = trigger.old_transition_table_name().ok().flatten().is_some();
    let new_rows = if has_new { new_row_count(trigger) } else { 0 };
    if !has_old && new_rows == 0 {
        return Ok(None);
    }
    let config = cached_config().unwrap_or_else(|| Spi::connect(fold_config));
    let deferred_append = config.deferred && !has_old && new_rows <= DEFERRED_MAX_ROWS;
    // Deferred mode's common case needs no SPI at all (see `pending`).
    // SAFETY: an INSERT statement's trigger call, with its NEW transition table.
    if deferred_append && unsafe { pending::append_rows(trigger.trigger_data(), &config.timezone) }
    {
        return Ok(None);
    }

    Spi::connect_mut(|client| {
        // Make the transition tables visible to SPI queries by name.
        let rc = unsafe {
            pg_sys::SPI_register_trigger_data(
                trigger.trigger_data() as *const pg_sys::TriggerData as *mut pg_sys::TriggerData
            )
        };
        if rc < 0 {
            errors::internal("registering transition tables", rc);
        }

        if deferred_append {
            // pending_deltas was changed (see `pending`): append through INSERT.
            run_kept(
                &APPEND,
                client,
                &|| APPEND_PENDING.to_string(),
                &[PgOid::from(pg_sys::TEXTOID)],
                true,
                &[config.timezone.as_str().into()],
                "appending to pending_deltas",
            );
            return;
        }

        let mut rows = Vec::new();
        if has_old {
            read_groups(
                client,
                &GROUP_OLD,
                OLD_ROWS,
                true,
                &config.timezone,
                &mut rows,
            );
        }
        if has_new {
            // SAFETY: tg_newtable and tg_relation belong to this trigger call.
            let grouped = unsafe {
                let data = trigger.trigger_data();
                grouping::group_new_rows(
                    data.tg_newtable,
                    (*data.tg_relation).rd_att,
                    &config.timezone,
                )
            };
            match grouped {
                Some(groups) => rows.extend(groups),
                None => read_groups(
                    client,
                    &GROUP_NEW,
                    NEW_ROWS,
                    false,
                    &config.timezone,
                    &mut rows,
                ),
            }
        }
        if rows.is_empty() {
            return;
        }
        if has_old {
            absorb_pending(client, &config, &mut rows);
        }
        let groups: BTreeMap<Key, DayDelta> = logdata::group_rows(rows);
        write_groups(client, groups, &config.timezone);
    });
    Ok(None)
}

/// Adds the pending rows of every (user, day) this statement removes rows from.
fn absorb_pending(
    client: &SpiClient<'_>,
    config: &FoldConfig,
    rows: &mut Vec<(Key, GroupRow, bool)>,
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
    if !config.current_catalog {
        return;
    }
    let users: Vec<Uuid> = keys.iter().map(|k| k.0).collect();
    let days: Vec<i32> = keys.iter().map(|k| k.1).collect();
    let taken = run_kept(
        &ABSORB,
        client,
        &absorb_pending_sql,
        &[
            PgOid::from(pg_sys::UUIDARRAYOID),
            PgOid::from(pg_sys::INT4ARRAYOID),
        ],
        true,
        &[users.into(), days.into()],
        "taking pending rows",
    );
    let mut absorbed = Vec::new();
    collect_groups(taken, false, &mut absorbed);
    // These calls may be among the removed ones: last_api_call_at is recomputed
    // from the detail by the correction, not taken from them.
    rows.extend(absorbed.into_iter().map(|(k, mut g, r)| {
        g.last_at_micros = None;
        (k, g, r)
    }));
}

/// Folds up to `max_rows` rows of `usage_agg.pending_deltas` into `daily_logs`
/// (deferred mode) and returns how many it applied. Sessions running it at once
/// take different rows; each row is applied exactly once, in the transaction that
/// deletes it.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn apply_pending_deltas(max_rows: default!(i32, 1000000)) -> i64 {
    if max_rows <= 0 {
        errors::invalid_argument(
            "usage_agg: apply_pending_deltas needs a positive max_rows".to_string(),
            format!("max_rows = {max_rows}"),
            "Leave it out to apply up to 1,000,000 rows.".to_string(),
        );
    }
    Spi::connect_mut(|client| {
        let mut rows = Vec::new();
        let taken = run_kept(
            &TAKE,
            client,
            &take_pending_sql,
            &[PgOid::from(pg_sys::INT4OID)],
            true,
            &[max_rows.into()],
            "taking pending rows",
        );
        collect_groups(taken, false, &mut rows);
        let applied: i64 = rows.iter().map(|(_, g, _)| g.calls).sum();
        if !rows.is_empty() {
            let config = fold_config(client);
            write_groups(client, logdata::group_rows(rows), &config.timezone);
        }
        applied
    })
}

fn write_groups(client: &mut SpiClient<'_>, groups: BTreeMap<Key, DayDelta>, timezone: &str) {
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

    if !fix_users.is_empty() {
        run_kept(
            &LOCK,
            client,
            &|| LOCK_DAYS.to_string(),
            &[
                PgOid::from(pg_sys::UUIDARRAYOID),
                PgOid::from(pg_sys::INT4ARRAYOID),
            ],
            true,
            &[fix_users.clone().into(), fix_days.clone().into()],
            "locking daily rows",
        );
        run_kept(
            &CORRECT,
            client,
            &|| APPLY_CORRECTIONS.to_string(),
            &[
                PgOid::from(pg_sys::UUIDARRAYOID),
                PgOid::from(pg_sys::INT4ARRAYOID),
                PgOid::from(pg_sys::JSONBARRAYOID),
                PgOid::from(pg_sys::INT8ARRAYOID),
                PgOid::from(pg_sys::TEXTOID),
            ],
            true,
            &[
                fix_users.into(),
                fix_days.into(),
                fix_docs.into(),
                fix_removed.into(),
                timezone.into(),
            ],
            "correcting daily rows",
        );
    }

    if add_users.len() == 1 {
        run_kept(
            &UPSERT1,
            client,
            &|| UPSERT_ONE.to_string(),
            &[
                PgOid::from(pg_sys::UUIDOID),
                PgOid::from(pg_sys::INT4OID),
                PgOid::from(pg_sys::JSONBOID),
            ],
            true,
            &[
                add_users[0].into(),
                add_days[0].into(),
                add_docs.remove(0).into(),
            ],
            "writing a daily row",
        );
    } else if !add_users.is_empty() {
        run_kept(
            &UPSERT,
            client,
            &|| UPSERT_ADDITIONS.to_string(),
            &[
                PgOid::from(pg_sys::UUIDARRAYOID),
                PgOid::from(pg_sys::INT4ARRAYOID),
                PgOid::from(pg_sys::JSONBARRAYOID),
            ],
            true,
            &[add_users.into(), add_days.into(), add_docs.into()],
            "writing daily rows",
        );
    }
}

/// Adds a delta document to a stored `log_data` (the ON CONFLICT arm of the fold).
#[pg_extern(immutable, parallel_safe, name = "_fold_merge")]
fn fold_merge(stored: Jsonb, delta: Jsonb, user_id: Uuid, day: pgrx::datum::Date) -> Jsonb {
    match logdata::merge_into(stored.0, &delta.0, None) {
        Ok(v) => Jsonb(v),
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
    match logdata::merge_into(stored.0, &delta.0, Some(correction)) {
        Ok(v) => Jsonb(v),
        Err(e) => errors::corrupt_daily_row(&e, &user_id, day.to_pg_epoch_days()),
    }
}

/// Announces a change of usage_agg.config to every backend (a relcache
/// invalidation of the table), so that their cached copies are dropped.
#[pg_trigger(sql = "
CREATE FUNCTION usage_agg._config_changed() RETURNS trigger
    LANGUAGE c
    SET search_path = pg_catalog, pg_temp
    AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
")]
fn config_changed<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, Infallible> {
    // SAFETY: tg_relation is the table the trigger fired on.
    unsafe {
        let relid = (*trigger.trigger_data().tg_relation).rd_id;
        pg_sys::CacheInvalidateRelcacheByRelid(relid);
    }
    Ok(None)
}
