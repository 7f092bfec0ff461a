//! usage_agg: AI/LLM API usage accounting inside PostgreSQL.
//!
//! - `logdata`: pure folding of usage into the `log_data` JSON layout.
//! - `fold`: the statement-level triggers that keep `daily_logs` exact.
//! - `retention`: the roll-up merge of daily into monthly documents.
//! - `grouping`: a statement's inserted rows grouped per (user, day, model, key).
//! - `decimal`: exact sums of `numeric` values in their binary form.
//! - `errors`: user-facing errors with SQLSTATEs.
//! - `jsonb`: binary jsonb to and from serde values (no text round trip).
//! - `pending`: deferred mode's append to `pending_deltas` without SPI.
//!
//! Hand-written SQL lives in `sql/` and is pulled in below in dependency order.

use pgrx::prelude::*;

mod decimal;
mod errors;
mod fold;
mod grouping;
mod jsonb;
pub mod logdata;
mod pending;
mod retention;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!(
    "../sql/fold.sql",
    name = "fold_triggers",
    requires = ["schema", fold::fold_key_usage_logs, fold::config_changed]
);
extension_sql_file!("../sql/verify.sql", name = "verify", requires = ["schema"]);
extension_sql_file!("../sql/quotas.sql", name = "quotas", requires = ["schema"]);
extension_sql_file!(
    "../sql/retention.sql",
    name = "retention",
    requires = ["schema", "quotas", retention::rollup_merge]
);
extension_sql_file!(
    "../sql/reads.sql",
    name = "reads",
    requires = ["schema", "quotas", "retention"]
);
extension_sql_file!(
    "../sql/import.sql",
    name = "import",
    requires = ["schema", "verify", fold::apply_pending_deltas]
);
extension_sql_file!("../sql/security.sql", name = "security", finalize);

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
