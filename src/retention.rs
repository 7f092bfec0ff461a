//! Retention: the Rust half of rolling `daily_logs` up into `monthly_logs`.
//! The cleanups themselves (batches, horizons, partitions) are SQL in
//! `sql/retention.sql`; this module adds the document merge they aggregate with.

use pgrx::prelude::*;

use crate::errors;
use crate::jsonb::Jsonb;
use crate::logdata;

/// The fields of `shared_service_usage` that usage_agg owns, for the SQL that
/// replaces or compares them (`_replace_owned`, `verify_daily_logs`).
#[pg_extern(immutable, parallel_safe, name = "_owned_service_fields")]
fn owned_service_fields() -> Vec<String> {
    logdata::OWNED_SERVICE_FIELDS
        .iter()
        .map(|f| f.to_string())
        .collect()
}

/// Adds one day's `log_data` into a month's (state function of the
/// `usage_agg._rollup(jsonb)` aggregate, and the ON CONFLICT arm of the roll-up).
#[pg_extern(immutable, parallel_safe, name = "_rollup_merge")]
fn rollup_merge(month: Jsonb, day: Jsonb) -> Jsonb {
    match logdata::rollup_documents(&month.0, &day.0) {
        Ok(v) => Jsonb(v),
        Err(e) => errors::corrupt_rollup(&e),
    }
}
