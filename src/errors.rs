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

/// What an interrupted fold undid, for the explanation added to its error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Undone {
    /// A statement's own fold (corrections; inserts folded immediately).
    Statement,
    /// A batch of pending calls (`apply_pending_deltas`, the applier).
    Batch,
}

impl Undone {
    fn detail(self) -> &'static str {
        match self {
            Undone::Statement => {
                "usage_agg folds this statement's calls into usage_agg.daily_logs as part of the \
                 statement (corrections always; inserts under fold_mode immediate, or auto without \
                 a background applier). The statement was undone as a whole: none of its calls \
                 was recorded and every aggregate is as before."
            }
            Undone::Batch => {
                "The batch was rolled back: its calls stay in usage_agg.pending_deltas, where \
                 every reader counts them, and the next apply folds them."
            }
        }
    }

    fn hint(self) -> &'static str {
        match self {
            Undone::Statement => {
                "Retry the statement. Folding waits for the row locks of the daily rows it adds \
                 to; with the background applier (usage_agg in shared_preload_libraries, \
                 fold_mode auto) or fold_mode 'async', inserts never wait for them."
            }
            Undone::Batch => {
                "Applying waits for the row locks of the daily rows it adds to: give \
                 apply_pending_deltas() a statement_timeout and lock_timeout that allow for that, \
                 or leave the work to the background applier, which is not bound by either."
            }
        }
    }
}

/// Errors that come from the environment rather than from the data: timeouts,
/// a cancel, lock and resource limits, deadlocks. Retrying can succeed.
pub fn is_environment_error(code: PgSqlErrorCode) -> bool {
    use PgSqlErrorCode::*;
    matches!(
        code,
        ERRCODE_QUERY_CANCELED
            | ERRCODE_LOCK_NOT_AVAILABLE
            | ERRCODE_T_R_DEADLOCK_DETECTED
            | ERRCODE_T_R_SERIALIZATION_FAILURE
            | ERRCODE_INSUFFICIENT_RESOURCES
            | ERRCODE_DISK_FULL
            | ERRCODE_OUT_OF_MEMORY
            | ERRCODE_TOO_MANY_CONNECTIONS
            | ERRCODE_CONFIGURATION_LIMIT_EXCEEDED
    )
}

/// The detail of an environment error, followed by what usage_agg undid.
pub fn explained_detail(original: Option<&str>, undone: Undone) -> String {
    match original {
        Some(d) if !d.is_empty() => format!("{d} {}", undone.detail()),
        _ => undone.detail().to_string(),
    }
}

/// Runs `body`; an environment error it raises (see [`is_environment_error`])
/// is raised again with the same SQLSTATE and message, and a DETAIL and HINT
/// that say what was undone and what to do. Other errors pass unchanged.
/// (pgrx drops CONTEXT lines of errors that cross it, so the explanation goes
/// into the detail.)
pub fn explaining_environment_errors<R>(undone: Undone, body: impl FnOnce() -> R) -> R {
    PgTryBuilder::new(std::panic::AssertUnwindSafe(body))
        .catch_others(move |caught| match caught {
            pg_sys::panic::CaughtError::PostgresError(report)
                if is_environment_error(report.sql_error_code()) =>
            {
                ErrorReport::new(
                    report.sql_error_code(),
                    report.message().to_string(),
                    "usage_agg",
                )
                .set_detail(explained_detail(report.detail(), undone))
                .set_hint(report.hint().unwrap_or(undone.hint()).to_string())
                .report(PgLogLevel::ERROR);
                unreachable!()
            }
            other => other.rethrow(),
        })
        .execute()
}

#[cfg(test)]
mod plain_tests {
    use super::*;

    #[test]
    fn environment_errors_are_the_retryable_kinds() {
        assert!(is_environment_error(PgSqlErrorCode::ERRCODE_QUERY_CANCELED));
        assert!(is_environment_error(
            PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE
        ));
        assert!(is_environment_error(
            PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED
        ));
        assert!(!is_environment_error(
            PgSqlErrorCode::ERRCODE_DATA_CORRUPTED
        ));
        assert!(!is_environment_error(
            PgSqlErrorCode::ERRCODE_CHECK_VIOLATION
        ));
    }

    #[test]
    fn the_explanation_follows_the_original_detail() {
        assert_eq!(
            explained_detail(None, Undone::Batch),
            Undone::Batch.detail()
        );
        assert_eq!(
            explained_detail(Some(""), Undone::Batch),
            Undone::Batch.detail()
        );
        assert_eq!(
            explained_detail(Some("Process 12 waits."), Undone::Batch),
            format!("Process 12 waits. {}", Undone::Batch.detail())
        );
    }
}
