//! Applying pending calls: `usage_agg.apply_pending_deltas()` and the batches the
//! background applier (`worker`) runs.
//!
//! A batch takes up to N pending rows that no other session is applying (`FOR
//! UPDATE SKIP LOCKED`), deletes them, and folds them into `daily_logs` in the
//! same transaction, so each call is applied exactly once. A (user, day) whose
//! daily row an application corrupted is not applied: its calls go back into
//! `pending_deltas` (grouped, keeping when they were first appended), the day is
//! recorded in `usage_agg.fold_skipped` with a WARNING naming user, day and
//! field, and it is tried again after [`SKIPPED_RETRY`] (at once after
//! `rebuild_daily_logs` of the day, which folds its calls from the detail).
//! Every other (user, day) of the batch is applied.

use std::time::Duration;

use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::Uuid;
use rustc_hash::FxHashMap;

use crate::config;
use crate::errors;
use crate::fold::{self, Group, Key, Skipped, PENDING_GROUP_COLUMNS};
use crate::hours;
use crate::keys;
use crate::logdata;
use crate::pending;
use crate::plans::{kept_statement, Sql};

/// Rows one batch of the background applier takes at most.
pub const BATCH_ROWS: i32 = 20_000;
/// A skipped (user, day) is tried again after this.
pub const SKIPPED_RETRY: &str = "30 seconds";

kept_statement! {
    /// Takes up to $1 pending rows that no other session is applying and whose
    /// (user, day) is not waiting for a retry, grouped like a statement's rows
    /// (by hour in time zone $2 too), with when the oldest of each group was
    /// appended (Unix microseconds).
    TAKE_PENDING {
        what: "taking pending calls",
        sql: Sql::Built(|| format!(
            "WITH taken AS (
                 DELETE FROM usage_agg.pending_deltas d
                  WHERE d.ctid = ANY (ARRAY(
                        SELECT q.ctid FROM usage_agg.pending_deltas q
                         WHERE NOT EXISTS (SELECT 1 FROM usage_agg.fold_skipped s
                                            WHERE s.user_id = q.user_id AND s.day = q.day
                                              AND s.retry_at > pg_catalog.now())
                         LIMIT $1 FOR UPDATE OF q SKIP LOCKED))
              RETURNING d.*)
             SELECT {PENDING_GROUP_COLUMNS},
                    (extract(epoch FROM min(p.appended_at)) * 1000000)::int8,
                    count(*)::int8
               FROM taken p GROUP BY 1, 2, 3, 4, {hour}",
            hour = fold::hour_of_sql("p.last_at", "$2")
        )),
        args: [INT4OID, TEXTOID],
        mutating: true,
    }
}

kept_statement! {
    /// Records the (user, day)s a batch could not fold; `new` is true for those
    /// not recorded before.
    RECORD_SKIPPED {
        what: "recording skipped days",
        sql: Sql::Built(|| format!(
            "INSERT INTO usage_agg.fold_skipped AS s (user_id, day, field, error, first_seen, last_seen, retry_at)
             SELECT u.user_id, DATE '2000-01-01' + u.day, u.field, u.error,
                    pg_catalog.now(), pg_catalog.now(), pg_catalog.now() + INTERVAL '{SKIPPED_RETRY}'
               FROM ROWS FROM (pg_catalog.unnest($1::uuid[]), pg_catalog.unnest($2::int4[]),
                               pg_catalog.unnest($3::text[]), pg_catalog.unnest($4::text[]))
                    AS u(user_id, day, field, error)
             ON CONFLICT (user_id, day) DO UPDATE
                SET field = EXCLUDED.field, error = EXCLUDED.error,
                    last_seen = EXCLUDED.last_seen, retry_at = EXCLUDED.retry_at
             RETURNING (s.day - DATE '2000-01-01')::int4, s.user_id, s.first_seen = s.last_seen"
        )),
        args: [UUIDARRAYOID, INT4ARRAYOID, TEXTARRAYOID, TEXTARRAYOID],
        mutating: true,
    }
}

kept_statement! {
    ANY_SKIPPED {
        what: "reading usage_agg.fold_skipped",
        sql: Sql::Text("SELECT EXISTS (SELECT 1 FROM usage_agg.fold_skipped)"),
        args: [],
        mutating: false,
    }
}

kept_statement! {
    /// Days retried and folded are no longer skipped.
    CLEAR_SKIPPED {
        what: "clearing skipped days",
        sql: Sql::Text("
            DELETE FROM usage_agg.fold_skipped s
             USING ROWS FROM (pg_catalog.unnest($1::uuid[]), pg_catalog.unnest($2::int4[])) AS u(user_id, day)
             WHERE s.user_id = u.user_id AND s.day = DATE '2000-01-01' + u.day"),
        args: [UUIDARRAYOID, INT4ARRAYOID],
        mutating: true,
    }
}

/// What one batch did.
pub struct Batch {
    pub outcome: Outcome,
    /// Calls folded into daily_logs.
    pub applied: i64,
    /// The batch took as many rows as it could: more are probably waiting.
    pub full: bool,
    /// `config.apply_interval`.
    pub interval: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Outcome {
    Applied,
    /// The extension is not installed in this database.
    NoExtension,
    /// The catalog is older than this library (before ALTER EXTENSION UPDATE).
    OldCatalog,
}

/// Takes and folds up to `max_rows` pending rows. Returns (calls applied,
/// rows taken).
pub fn apply_batch(client: &mut SpiClient<'_>, max_rows: i32, timezone: &str) -> (i64, i64) {
    let taken = TAKE_PENDING.run(client, &[max_rows.into(), timezone.into()]);
    let mut rows: Vec<Group> = Vec::new();
    let mut first_appended: FxHashMap<Key, i64> = FxHashMap::default();
    let mut taken_rows = 0i64;
    for row in taken {
        let group = fold::group_of(&row, false);
        let appended = row
            .get::<i64>(fold::PENDING_GROUP_WIDTH + 1)
            .unwrap_or_else(|e| errors::internal("taking pending calls", e))
            .unwrap_or(0);
        taken_rows += row
            .get::<i64>(fold::PENDING_GROUP_WIDTH + 2)
            .unwrap_or_else(|e| errors::internal("taking pending calls", e))
            .unwrap_or(0);
        first_appended
            .entry(group.0)
            .and_modify(|t| *t = (*t).min(appended))
            .or_insert(appended);
        rows.push(group);
    }
    let taken_calls: i64 = rows.iter().map(|(_, g, _)| g.calls).sum();
    let deltas = logdata::group_rows(&rows);
    let applied_keys: Vec<Key> = deltas.keys().copied().collect();
    let written = fold::write_groups(client, deltas, timezone, true);
    // The per-key and service rows: these calls, and the deltas statements
    // that folded their own calls left for an apply.
    if crate::settings::per_key_aggregates() {
        let mut rollups = keys::Rollups::of(&rows, &written);
        keys::take_pending(client, &mut rollups, max_rows);
        keys::write(client, rollups, timezone);
    }
    hours::write_applied(client, &rows, &written.skipped, timezone, max_rows);
    if rows.is_empty() {
        return (0, 0);
    }
    let skipped = written.skipped;

    let retried = ANY_SKIPPED
        .run(client, &[])
        .first()
        .get::<bool>(1)
        .unwrap_or_else(|e| errors::internal("reading usage_agg.fold_skipped", e))
        .unwrap_or(false);
    let is_skipped = |k: &Key| skipped.iter().any(|s| &s.key == k);
    if retried {
        let (users, days): (Vec<Uuid>, Vec<i32>) = applied_keys
            .iter()
            .filter(|k| !is_skipped(k))
            .map(|&(u, d)| (u, d))
            .unzip();
        if !users.is_empty() {
            CLEAR_SKIPPED.run(client, &[users.into(), days.into()]);
        }
    }
    if skipped.is_empty() {
        return (taken_calls, taken_rows);
    }
    // Calls of days that could not be folded wait again, grouped.
    let back: Vec<Group> = rows.into_iter().filter(|(k, _, _)| is_skipped(k)).collect();
    let not_applied: i64 = back.iter().map(|(_, g, _)| g.calls).sum();
    pending::append_groups(client, &back, &first_appended);
    record_skipped(client, &skipped);
    (taken_calls - not_applied, taken_rows)
}

fn record_skipped(client: &SpiClient<'_>, skipped: &[Skipped]) {
    let users: Vec<Uuid> = skipped.iter().map(|s| s.key.0).collect();
    let days: Vec<i32> = skipped.iter().map(|s| s.key.1).collect();
    let fields: Vec<String> = skipped.iter().map(|s| s.error.field.clone()).collect();
    let messages: Vec<String> = skipped.iter().map(|s| s.error.to_string()).collect();
    let recorded = RECORD_SKIPPED.run(
        client,
        &[users.into(), days.into(), fields.into(), messages.into()],
    );
    for row in recorded {
        let new = row.get::<bool>(3).ok().flatten().unwrap_or(false);
        let day = row.get::<i32>(1).ok().flatten();
        let user = row.get::<Uuid>(2).ok().flatten();
        if let (true, Some(day), Some(user)) = (new, day, user) {
            if let Some(s) = skipped.iter().find(|s| s.key == (user, day)) {
                errors::warn_kept_pending(
                    s,
                    "its calls wait in pending_deltas; every other day was applied",
                );
            }
        }
    }
}

/// One batch of the background applier in a transaction of its own. An error
/// is caught, the transaction rolled back, and its message returned.
pub fn run_batch_in_transaction() -> Result<Batch, String> {
    // SAFETY: a background worker outside any transaction starts one, as
    // pgrx's BackgroundWorker::transaction does.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let result = PgTryBuilder::new(|| Ok(batch_in_current_transaction()))
        .catch_others(|e| {
            Err(match e {
                pg_sys::panic::CaughtError::PostgresError(r)
                | pg_sys::panic::CaughtError::ErrorReport(r)
                | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => {
                    r.message().to_string()
                }
            })
        })
        .execute();
    // SAFETY: ends the transaction started above: committed when the batch
    // succeeded; rolled back (which also releases its locks, snapshot and
    // memory) when it raised.
    unsafe {
        if result.is_ok() {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        } else {
            pg_sys::AbortCurrentTransaction();
        }
    }
    result
}

fn batch_in_current_transaction() -> Batch {
    let mut batch = Batch {
        outcome: Outcome::Applied,
        applied: 0,
        full: false,
        interval: Duration::from_secs(1),
    };
    // SAFETY: a catalog lookup inside the transaction.
    let installed =
        unsafe { pg_sys::get_extension_oid(c"usage_agg".as_ptr(), true) } != pg_sys::InvalidOid;
    if !installed {
        batch.outcome = Outcome::NoExtension;
        return batch;
    }
    Spi::connect_mut(|client| {
        let config = config::read(client);
        batch.interval = Duration::from_millis(config.apply_interval_ms.max(1) as u64);
        if !config.current_catalog {
            batch.outcome = Outcome::OldCatalog;
            return;
        }
        let (applied, taken) = apply_batch(client, BATCH_ROWS, &config.timezone);
        batch.applied = applied;
        batch.full = taken >= i64::from(BATCH_ROWS);
    });
    batch
}

/// Folds up to `max_rows` rows of `usage_agg.pending_deltas` into `daily_logs`
/// and returns how many calls it applied. Sessions running it at once take
/// different rows; each row is applied exactly once, in the transaction that
/// deletes it. A day whose daily row is corrupted is skipped (see the module).
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
    errors::explaining_environment_errors(errors::Undone::Batch, || {
        Spi::connect_mut(|client| {
            let config = config::read(client);
            if !config.current_catalog {
                errors::old_catalog("apply_pending_deltas");
            }
            apply_batch(client, max_rows, &config.timezone).0
        })
    })
}
