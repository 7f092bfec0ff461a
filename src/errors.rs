//! Errors a user can meet, each with a proper SQLSTATE, a detail and a hint.
//! Raising an `ErrorReport` aborts the statement, so nothing is half-written.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

use crate::logdata::{pg_days_to_iso, CorruptField};

/// The report of a stored `daily_logs` row whose owned fields an application
/// overwrote with something the fold cannot add to. `kept` says what became of
/// the calls when they were kept pending instead of failing the statement.
fn corrupt_row_report(
    err: &CorruptField,
    user_id: &pgrx::Uuid,
    pg_days: i32,
    kept: Option<&str>,
) -> ErrorReport {
    let day = pg_days_to_iso(pg_days);
    let outcome = kept.map_or(String::new(), |k| format!("; {k}"));
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
        format!(
            "usage_agg: daily_logs row of user {user_id} on {day} has a corrupted field \"{}\"{outcome}",
            err.field
        ),
        "usage_agg::fold",
    )
    .set_detail(format!("{err}."))
    .set_hint(format!(
        "Fields api_call_count, shared_service_usage and last_api_call_at belong to usage_agg. \
         Repair the row with: SELECT usage_agg.rebuild_daily_logs('{day}', '{day}');{}",
        if kept.is_some() {
            " usage_agg.fold_status and usage_agg.fold_skipped list the days waiting."
        } else {
            ""
        }
    ))
}

/// A corrupted `daily_logs` row (see [`corrupt_row_report`]): the statement fails.
pub fn corrupt_daily_row(err: &CorruptField, user_id: &pgrx::Uuid, pg_days: i32) -> ! {
    corrupt_row_report(err, user_id, pg_days, None).report(PgLogLevel::ERROR);
    unreachable!()
}

/// A `daily_logs` row being rolled up into `monthly_logs` whose owned fields an
/// application overwrote with something that cannot be added up.
pub fn corrupt_rollup(err: &CorruptField) -> ! {
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
        format!(
            "usage_agg: cannot roll a daily_logs row up into monthly_logs: corrupted field \"{}\"",
            err.field
        ),
        "usage_agg::retention",
    )
    .set_detail(format!("{err}."))
    .set_hint(
        "Find the row with usage_agg.verify_daily_logs(from, to) while its detail exists, \
         or correct its log_data by hand; nothing was rolled up or deleted.",
    )
    .report(PgLogLevel::ERROR);
    unreachable!()
}

/// A column of key_usage_logs whose type was changed: the fold reads the
/// columns in their binary form and refuses to guess.
pub fn changed_column(column: &str, found: &str, expected: &str) -> ! {
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
        format!("usage_agg: column key_usage_logs.{column} has type {found}, the fold needs {expected}"),
        "usage_agg::fold",
    )
    .set_detail(
        "The fold reads the columns of usage_agg.key_usage_logs in their binary form; \
         their types are fixed by usage_agg.",
    )
    .set_hint(format!(
        "Change it back: ALTER TABLE usage_agg.key_usage_logs ALTER COLUMN {column} TYPE {expected};"
    ))
    .report(PgLogLevel::ERROR);
    unreachable!()
}

/// Something that should not happen (an SPI failure). Reported as an internal
/// error with what was being done, never as a Rust panic.
pub fn internal(what: &str, cause: impl std::fmt::Display) -> ! {
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        format!("usage_agg: failed while {what}: {cause}"),
        "usage_agg",
    )
    .report(PgLogLevel::ERROR);
    unreachable!()
}

/// A bad argument to a public function (SQLSTATE 22023).
pub fn invalid_argument(message: String, detail: String, hint: String) -> ! {
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        message,
        "usage_agg",
    )
    .set_detail(detail)
    .set_hint(hint)
    .report(PgLogLevel::ERROR);
    unreachable!()
}

/// A (user, day) whose daily row could not be added to, logged as a WARNING
/// (server log and client) naming user, day and field; `what` says what became
/// of its calls. Nothing is lost: they wait in pending_deltas.
pub fn warn_kept_pending(skipped: &crate::fold::Skipped, what: &str) {
    corrupt_row_report(&skipped.error, &skipped.key.0, skipped.key.1, Some(what))
        .report(PgLogLevel::WARNING);
}

/// A function that needs the catalog of this library's version, called between
/// installing the library and ALTER EXTENSION ... UPDATE (SQLSTATE 55000).
pub fn old_catalog(function: &str) -> ! {
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!(
            "usage_agg: {function} needs the catalog of usage_agg {}",
            env!("CARGO_PKG_VERSION")
        ),
        "usage_agg",
    )
    .set_detail("The installed library is newer than the extension's catalog in this database.")
    .set_hint("Run ALTER EXTENSION usage_agg UPDATE; inserts keep being folded meanwhile.")
    .report(PgLogLevel::ERROR);
    unreachable!()
}

/// pgrx puts a Rust backtrace into the DETAIL of every error it reports when
/// `RUST_BACKTRACE` or `RUST_LIB_BACKTRACE` is set in the server's environment
/// (a `pg_ctl start` from a developer's shell): an error a user meets must read
/// the same in every environment. Called from `_PG_init`, before any error; the
/// postmaster's environment is inherited by every process it starts.
pub fn no_backtraces_in_details() {
    // A backend is single-threaded, and nothing reads the environment while the
    // library loads.
    std::env::remove_var("RUST_BACKTRACE");
    std::env::remove_var("RUST_LIB_BACKTRACE");
}
