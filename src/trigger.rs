//! The trigger on `usage_agg.key_usage_logs`: decides, per statement, whether
//! its calls are folded now or recorded for the applier.
//!
//! Each INSERT, UPDATE or DELETE statement (and COPY) fires once with its
//! transition tables.
//! - Asynchronous (mode `async`, or `auto` while an applier serves this
//!   database): an INSERT only records its calls in `pending_deltas`, row by row
//!   for small statements (without SPI, see `pending`), grouped per (user, day,
//!   model, key) for bulk ones. Nothing about the aggregates can make it fail.
//! - Immediate (mode `immediate`, or `auto` with no applier): the statement's
//!   rows are grouped and written into `daily_logs` (see `fold`). Under `auto`,
//!   a daily row that cannot be added to is left alone and its calls are
//!   recorded as pending instead, with a WARNING.
//! - UPDATE and DELETE (corrections) are folded at once in every mode, together
//!   with the pending calls of the days they touch.

use std::collections::BTreeMap;
use std::convert::Infallible;

use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use rustc_hash::FxHashMap;

use crate::config::{self, FoldConfig, FoldMode};
use crate::errors;
use crate::fold::{self, Group, Key};
use crate::grouping;
use crate::hours;
use crate::keys;
use crate::logdata::{self, DayDelta};
use crate::pending;
use crate::worker;

/// Statements with more rows than this are grouped before they are recorded:
/// a bulk load is far fewer (user, day, model, key) groups than rows.
const ROW_BY_ROW_MAX: i64 = 64;

/// How this statement's additions are handled.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    /// Recorded in pending_deltas for the applier.
    Pending,
    /// Folded now; a corrupted daily row raises.
    Fold,
    /// Folded now; a corrupted daily row keeps its calls pending (auto mode).
    FoldTolerant,
}

fn path_for(config: &FoldConfig) -> Path {
    if !config.current_catalog {
        // Between installing this library and ALTER EXTENSION ... UPDATE the
        // pending table has the old columns: fold now.
        return Path::Fold;
    }
    match config.mode {
        FoldMode::Immediate => Path::Fold,
        FoldMode::Async => Path::Pending,
        FoldMode::Auto if worker::applier_serves_this_database() => Path::Pending,
        FoldMode::Auto => Path::FoldTolerant,
    }
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
    let config = config::cached().unwrap_or_else(|| Spi::connect(config::read));
    let path = if has_old {
        Path::Fold
    } else {
        path_for(&config)
    };
    let row_by_row = path == Path::Pending && new_rows <= ROW_BY_ROW_MAX;
    // The common case needs no SPI at all (see `pending`).
    // SAFETY: an INSERT statement's trigger call, with its NEW transition table.
    if row_by_row && unsafe { pending::append_rows(trigger.trigger_data(), &config.timezone) } {
        return Ok(None);
    }

    let work = || {
        Spi::connect_mut(|client| {
            // Make the transition tables visible to SPI queries by name.
            // SAFETY: the TriggerData of this call, alive until it returns.
            let rc = unsafe {
                pg_sys::SPI_register_trigger_data(trigger.trigger_data()
                    as *const pg_sys::TriggerData
                    as *mut pg_sys::TriggerData)
            };
            if rc < 0 {
                errors::internal("registering transition tables", rc);
            }
            if row_by_row {
                // pending_deltas was changed (see `pending`): append through INSERT.
                pending::APPEND_ROWS_SQL.run(client, &[config.timezone.as_str().into()]);
                return;
            }

            let mut rows = Vec::new();
            if has_old {
                fold::read_groups_in_sql(
                    client,
                    true,
                    config.current_catalog,
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
                        config.current_catalog,
                    )
                };
                match grouped {
                    Some(groups) => rows.extend(groups),
                    None => fold::read_groups_in_sql(
                        client,
                        false,
                        config.current_catalog,
                        &config.timezone,
                        &mut rows,
                    ),
                }
            }
            if rows.is_empty() {
                return;
            }
            match path {
                Path::Pending => pending::append_groups(client, &rows, &FxHashMap::default()),
                Path::Fold | Path::FoldTolerant => {
                    if has_old && config.has_pending_table {
                        fold::absorb_pending(
                            client,
                            &mut rows,
                            config.current_catalog,
                            &config.timezone,
                        );
                    }
                    fold_now(client, rows, &config, path == Path::FoldTolerant);
                }
            }
        })
    };
    if path == Path::Pending {
        work();
    } else {
        // A timeout or a lock wait that gives up while folding undoes the
        // whole statement: its error says so.
        errors::explaining_environment_errors(errors::Undone::Statement, work);
    }
    Ok(None)
}

/// Folds a statement's groups into daily_logs, and records their per-key and
/// service deltas for the next apply (see `keys`). Tolerant: the calls of a
/// (user, day) whose daily row is corrupted are recorded as pending instead.
fn fold_now(client: &mut SpiClient<'_>, rows: Vec<Group>, config: &FoldConfig, tolerant: bool) {
    let groups: BTreeMap<Key, DayDelta> = logdata::group_rows(&rows);
    let written = fold::write_groups(client, groups, &config.timezone, tolerant);
    // Before ALTER EXTENSION ... UPDATE to 0.4.0 there are no per-key tables.
    if config.current_catalog && crate::settings::per_key_aggregates() {
        keys::append_pending(client, &keys::Rollups::of(&rows, &written));
    }
    if config.current_catalog {
        hours::write_folded(client, &rows, &written.skipped, &config.timezone);
    }
    let skipped = written.skipped;
    if skipped.is_empty() {
        return;
    }
    for s in &skipped {
        errors::warn_kept_pending(s, "the call was recorded and waits in pending_deltas");
    }
    let skipped_keys: Vec<Key> = skipped.iter().map(|s| s.key).collect();
    let pending: Vec<Group> = rows
        .into_iter()
        .filter(|(k, _, _)| skipped_keys.contains(k))
        .collect();
    pending::append_groups(client, &pending, &FxHashMap::default());
}
