//! This backend's copy of `usage_agg.config`, as the fold needs it.
//!
//! Read once and kept until the table's relcache entry is invalidated, which the
//! `config_changed` trigger causes on every change (and which a sinval reset or
//! DROP EXTENSION cause too), so every session buckets calls by the same row.

use std::cell::{Cell, RefCell};

use pgrx::pg_sys;
use pgrx::spi::{SpiClient, SpiTupleTable};

use crate::errors;
use crate::plans::{kept_statement, Sql};

/// `config.fold_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FoldMode {
    /// Asynchronous while a background applier serves this database, immediate
    /// otherwise (the default from 0.3.0 on).
    Auto,
    /// Inserts only append to pending_deltas; an applier or a scheduled
    /// `apply_pending_deltas()` folds them (`'deferred'` before 0.3.0).
    Async,
    /// Every statement updates its aggregates in the inserting transaction.
    Immediate,
}

impl FoldMode {
    /// The stored text; NULL (a 0.1.0 catalog, which has no fold_mode) is
    /// immediate, as that version was.
    pub fn parse(text: Option<&str>) -> FoldMode {
        match text {
            Some("auto") => FoldMode::Auto,
            Some("async") | Some("deferred") => FoldMode::Async,
            _ => FoldMode::Immediate,
        }
    }
}

#[derive(Clone)]
pub struct FoldConfig {
    pub timezone: String,
    pub mode: FoldMode,
    /// The catalog has everything this library writes (0.4.0 or later: the
    /// per-key tables, pending_deltas.last_failure_at); false only between
    /// installing this library and ALTER EXTENSION ... UPDATE.
    pub current_catalog: bool,
    /// pending_deltas exists (0.2.0 or later): corrections take its calls.
    pub has_pending_table: bool,
    /// `config.apply_interval` in milliseconds (1000 before 0.3.0).
    pub apply_interval_ms: i64,
    /// Some plan or user has a daily cost limit or a monthly budget: the fold
    /// checks the cost alerts of what it adds (current catalog only).
    pub cost_limits: bool,
    /// `config.alert_thresholds` (percent), exact (none before 0.4.0).
    pub alert_thresholds: Vec<bigdecimal::BigDecimal>,
}

kept_statement! {
    /// The settings the fold needs. fold_mode is read through to_jsonb so that
    /// the library also works against the catalog of an older version (no
    /// fold_mode column) between installing it and ALTER EXTENSION ... UPDATE.
    READ_CONFIG {
        what: "reading usage_agg.config",
        sql: Sql::Text("
            SELECT c.timezone,
                   pg_catalog.to_jsonb(c) OPERATOR(pg_catalog.->>) 'fold_mode',
                   'usage_agg.config'::pg_catalog.regclass::pg_catalog.oid,
                   pg_catalog.to_regclass('usage_agg.pending_key_deltas') IS NOT NULL,
                   COALESCE((pg_catalog.date_part('epoch',
                       (pg_catalog.to_jsonb(c) OPERATOR(pg_catalog.->>) 'apply_interval')::pg_catalog.interval)
                       OPERATOR(pg_catalog.*) 1000)::pg_catalog.int8, 1000),
                   pg_catalog.to_regclass('usage_agg.pending_deltas') IS NOT NULL,
                   (pg_catalog.to_jsonb(c) OPERATOR(pg_catalog.->) 'alert_thresholds')::pg_catalog.text
              FROM usage_agg.config c"),
        args: [],
        mutating: false,
    }
}

kept_statement! {
    /// Whether cost alerts need checking, and the tables whose changes drop the
    /// cached answer (their triggers announce every change, as config's does).
    READ_COST_LIMITS {
        what: "reading usage_agg.quota_plans and usage_agg.user_limits",
        sql: Sql::Text("
            SELECT usage_agg._cost_limits_in_use(),
                   'usage_agg.quota_plans'::pg_catalog.regclass::pg_catalog.oid,
                   'usage_agg.user_limits'::pg_catalog.regclass::pg_catalog.oid"),
        args: [],
        mutating: false,
    }
}

thread_local! {
    static CONFIG: RefCell<Option<FoldConfig>> = const { RefCell::new(None) };
    /// config, quota_plans and user_limits: a relcache invalidation of any of
    /// them drops the cached copy.
    static WATCHED_OIDS: Cell<[pg_sys::Oid; 3]> = const { Cell::new([pg_sys::InvalidOid; 3]) };
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

unsafe extern "C-unwind" fn config_invalidated(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    crate::prices::relcache_invalidated(relid);
    let watched = WATCHED_OIDS.with(Cell::get);
    if relid == pg_sys::InvalidOid || watched.contains(&relid) {
        CONFIG.with(|c| c.replace(None));
        WATCHED_OIDS.with(|o| o.set([pg_sys::InvalidOid; 3]));
    }
}

/// The settings, when this backend has them cached (no SPI needed).
pub fn cached() -> Option<FoldConfig> {
    CONFIG.with(|c| c.borrow().clone())
}

/// The settings, read through `client` when not cached.
pub fn read(client: &SpiClient<'_>) -> FoldConfig {
    register_invalidation_callback();
    if let Some(cached) = cached() {
        return cached;
    }
    let row = READ_CONFIG.run(client, &[]).first();
    let mode: Option<String> = column(&row, 2);
    let mut config = FoldConfig {
        timezone: column::<String>(&row, 1).unwrap_or_else(|| "UTC".to_string()),
        mode: FoldMode::parse(mode.as_deref()),
        current_catalog: column::<bool>(&row, 4).unwrap_or(false),
        apply_interval_ms: column::<i64>(&row, 5).unwrap_or(1000),
        has_pending_table: column::<bool>(&row, 6).unwrap_or(false),
        cost_limits: false,
        alert_thresholds: parse_thresholds(column::<String>(&row, 7).as_deref())
            .unwrap_or_else(|e| errors::internal("reading config.alert_thresholds", e)),
    };
    let config_oid = column::<pg_sys::Oid>(&row, 3).unwrap_or(pg_sys::InvalidOid);
    // Cached only where the config_changed triggers announce changes.
    if config.current_catalog {
        let limits = READ_COST_LIMITS.run(client, &[]).first();
        config.cost_limits = column::<bool>(&limits, 1).unwrap_or(false);
        let plans_oid = column::<pg_sys::Oid>(&limits, 2).unwrap_or(pg_sys::InvalidOid);
        let user_limits_oid = column::<pg_sys::Oid>(&limits, 3).unwrap_or(pg_sys::InvalidOid);
        WATCHED_OIDS.with(|o| o.set([config_oid, plans_oid, user_limits_oid]));
        CONFIG.with(|c| c.replace(Some(config.clone())));
    }
    config
}

/// Registers, once per backend, the relcache callback that drops this
/// module's copy and the price list (`prices`) when their tables change.
pub fn register_invalidation_callback() {
    if !CALLBACK_REGISTERED.with(Cell::get) {
        // SAFETY: registers a plain function for the life of the backend.
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(Some(config_invalidated), pg_sys::Datum::from(0))
        };
        CALLBACK_REGISTERED.with(|r| r.set(true));
    }
}

/// The thresholds from their jsonb text (`[80, 100]`); numbers keep their
/// exact decimal text.
fn parse_thresholds(json: Option<&str>) -> Result<Vec<bigdecimal::BigDecimal>, String> {
    let Some(json) = json else {
        return Ok(Vec::new());
    };
    let numbers: Vec<serde_json::Number> = serde_json::from_str(json).map_err(|e| e.to_string())?;
    numbers
        .iter()
        .map(|n| {
            n.to_string()
                .parse()
                .map_err(|e: bigdecimal::ParseBigDecimalError| e.to_string())
        })
        .collect()
}

fn column<T: pgrx::FromDatum + pgrx::IntoDatum>(
    row: &SpiTupleTable<'_>,
    ordinal: usize,
) -> Option<T> {
    row.get::<T>(ordinal)
        .unwrap_or_else(|e| errors::internal("reading usage_agg.config", e))
}

#[cfg(test)]
mod tests {
    use super::{parse_thresholds, FoldMode};

    #[test]
    fn thresholds_keep_their_decimals() {
        let t = parse_thresholds(Some("[80, 100, 87.50]")).unwrap();
        assert_eq!(
            t.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            vec!["80", "100", "87.50"]
        );
        assert!(parse_thresholds(Some("[]")).unwrap().is_empty());
        assert!(parse_thresholds(None).unwrap().is_empty());
        assert!(parse_thresholds(Some("[\"x\"]")).is_err());
    }

    #[test]
    fn fold_modes_parse_with_the_old_name_accepted() {
        assert_eq!(FoldMode::parse(Some("auto")), FoldMode::Auto);
        assert_eq!(FoldMode::parse(Some("async")), FoldMode::Async);
        assert_eq!(FoldMode::parse(Some("deferred")), FoldMode::Async);
        assert_eq!(FoldMode::parse(Some("immediate")), FoldMode::Immediate);
        assert_eq!(FoldMode::parse(None), FoldMode::Immediate);
    }
}
