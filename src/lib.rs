//! usage_agg: AI/LLM API usage accounting inside PostgreSQL.
//!
//! - `trigger`: the statement-level trigger on `key_usage_logs`: records a
//!   statement's calls as pending or folds them now (the fold mode).
//! - `fold`: writing grouped calls into `daily_logs` (upserts, corrections).
//! - `applier`: `apply_pending_deltas()` and the batches of the background applier.
//! - `worker`: the launcher and per-database applier processes, their shared memory.
//! - `config`: the backend's cached copy of `usage_agg.config`.
//! - `plans`: prepared statements kept per backend, each described once.
//! - `pending`: appends to `pending_deltas` (row by row without SPI, or grouped).
//! - `grouping`: a statement's inserted rows grouped per (user, day, model, key).
//! - `logdata`: pure folding of usage into the `log_data` JSON layout.
//! - `quotas`: consume_quota's common case in one kept statement.
//! - `keys`: the per-key and service aggregates (written by applies only).
//! - `keydata`: pure folding of their documents.
//! - `retention`: the roll-up merge of daily into monthly documents.
//! - `decimal`: exact sums of `numeric` values in their binary form.
//! - `jsonb`: binary jsonb to and from serde values (no text round trip).
//! - `errors`: user-facing errors with SQLSTATEs.
//! - `settings`: server settings (GUCs).
//!
//! Hand-written SQL lives in `sql/` and is pulled in below in dependency order.

use pgrx::prelude::*;

mod applier;
mod compat;
mod config;
mod decimal;
mod errors;
mod fold;
mod grouping;
mod hours;
mod jsonb;
mod keydata;
mod keys;
mod logdata;
mod pending;
mod plans;
mod prices;
mod pricing;
mod quotas;
mod retention;
mod settings;
mod trigger;
mod worker;

::pgrx::pg_module_magic!(name, version);

/// With `usage_agg` in `shared_preload_libraries`, sets up the shared memory of
/// the appliers and registers their launcher; loaded later (by a backend), the
/// `auto` fold mode folds immediately. Either way, errors carry no Rust
/// backtraces.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    errors::no_backtraces_in_details();
    settings::init();
    // SAFETY: a flag the postmaster sets while loading preload libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        worker::init_preloaded();
    }
}

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!(
    "../sql/fold.sql",
    name = "fold_triggers",
    requires = ["schema", trigger::fold_key_usage_logs, config_changed]
);
extension_sql_file!(
    "../sql/verify.sql",
    name = "verify",
    requires = ["schema", retention::owned_service_fields]
);
extension_sql_file!("../sql/quotas.sql", name = "quotas", requires = ["schema"]);
extension_sql_file!(
    "../sql/budgets.sql",
    name = "budgets",
    requires = ["schema", "quotas", config_changed]
);
extension_sql_file!(
    "../sql/keys.sql",
    name = "keys",
    requires = ["schema", "verify", keys::rollup_add]
);
extension_sql_file!(
    "../sql/hourly.sql",
    name = "hourly",
    requires = ["schema", "quotas", "verify", "keys"]
);
extension_sql_file!(
    "../sql/prices.sql",
    name = "prices",
    requires = [
        "schema",
        config_changed,
        prices::price_call,
        prices::call_cost
    ]
);
extension_sql_file!(
    "../sql/retention.sql",
    name = "retention",
    requires = [
        "schema",
        "quotas",
        "keys",
        "hourly",
        "prices",
        retention::rollup_merge,
        applier::apply_pending_deltas,
        worker::applier_state
    ]
);
extension_sql_file!(
    "../sql/reads.sql",
    name = "reads",
    requires = ["schema", "quotas", "budgets", "retention"]
);
extension_sql_file!(
    "../sql/import.sql",
    name = "import",
    requires = ["schema", "verify", applier::apply_pending_deltas]
);
extension_sql_file!(
    "../sql/applier.sql",
    name = "applier",
    requires = [
        "schema",
        "retention",
        worker::applier_state,
        worker::wake_applier
    ]
);
extension_sql_file!(
    "../sql/citus.sql",
    name = "citus",
    requires = [
        "schema",
        "quotas",
        "budgets",
        "keys",
        "hourly",
        "prices",
        "retention"
    ]
);
extension_sql_file!("../sql/security.sql", name = "security", finalize);

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
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, std::convert::Infallible> {
    // SAFETY: tg_relation is the table the trigger fired on, open for the
    // trigger's duration; rd_rel is its pg_class row.
    unsafe {
        let relation = trigger.trigger_data().tg_relation;
        let relid = (*relation).rd_id;
        pg_sys::CacheInvalidateRelcacheByRelid(relid);
        // On Citus the trigger fires on a node's shard of the table
        // (config_102008): the caches watch the table's own name, so announce
        // that one too.
        let name = std::ffi::CStr::from_ptr((*(*relation).rd_rel).relname.data.as_ptr());
        if let Some(base) = name.to_str().ok().and_then(citus_shard_base_name) {
            let base = std::ffi::CString::new(base).expect("a relation name has no NUL");
            let logical =
                pg_sys::get_relname_relid(base.as_ptr(), (*(*relation).rd_rel).relnamespace);
            if logical != pg_sys::InvalidOid {
                pg_sys::CacheInvalidateRelcacheByRelid(logical);
            }
        }
    }
    Ok(None)
}

/// The table a Citus shard belongs to: `config_102008` is a shard of `config`
/// (Citus names shards `<table>_<shard id>`). None for other names.
pub fn citus_shard_base_name(name: &str) -> Option<&str> {
    let (base, shard_id) = name.rsplit_once('_')?;
    (!base.is_empty() && !shard_id.is_empty() && shard_id.bytes().all(|b| b.is_ascii_digit()))
        .then_some(base)
}

#[cfg(test)]
mod citus_names {
    use super::citus_shard_base_name;

    #[test]
    fn a_shard_name_gives_its_table() {
        assert_eq!(citus_shard_base_name("config_102008"), Some("config"));
        assert_eq!(
            citus_shard_base_name("quota_plans_102010"),
            Some("quota_plans")
        );
        assert_eq!(citus_shard_base_name("quota_plans"), None);
        assert_eq!(citus_shard_base_name("user_limits"), None);
        assert_eq!(citus_shard_base_name("_102008"), None);
        assert_eq!(citus_shard_base_name("config_"), None);
        assert_eq!(citus_shard_base_name("config_10a"), None);
    }
}

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
