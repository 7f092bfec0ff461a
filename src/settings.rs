//! Server settings (GUCs) of usage_agg: each a static plus its accessor,
//! registered once in `_PG_init`.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// `usage_agg.per_key_aggregates`: whether folds maintain the per-key and
/// service aggregates. On by default; off exists to measure their cost
/// (bench/), and leaves those rows behind the detail until a
/// `rebuild_daily_logs()` of the days written meanwhile.
static PER_KEY_AGGREGATES: GucSetting<bool> = GucSetting::<bool>::new(true);

/// `usage_agg.hourly_aggregates`: whether folds maintain the hourly tier
/// (hourly_logs, key_hourly_logs). On by default; off exists to measure its
/// cost, like per_key_aggregates.
static HOURLY_AGGREGATES: GucSetting<bool> = GucSetting::<bool>::new(true);

pub fn init() {
    GucRegistry::define_bool_guc(
        c"usage_agg.per_key_aggregates",
        c"Maintain the per-key and service aggregates (key_daily_logs, service_daily_logs).",
        c"Off only to measure what they cost: while off, those rows fall behind the detail; rebuild_daily_logs() of the days written meanwhile repairs them.",
        &PER_KEY_AGGREGATES,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"usage_agg.hourly_aggregates",
        c"Maintain the hourly tier (hourly_logs, key_hourly_logs).",
        c"Off only to measure what it costs: while off, those rows fall behind the detail; rebuild_daily_logs() of the days written meanwhile repairs them.",
        &HOURLY_AGGREGATES,
        GucContext::Suset,
        GucFlags::default(),
    );
}

pub fn per_key_aggregates() -> bool {
    PER_KEY_AGGREGATES.get()
}

pub fn hourly_aggregates() -> bool {
    HOURLY_AGGREGATES.get()
}
