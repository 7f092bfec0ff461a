//! The fold: statement-level triggers on `usage_agg.key_usage_logs` that keep
//! `usage_agg.daily_logs` exact.
//!
//! Each INSERT, UPDATE or DELETE statement (and COPY) fires once. Its transition
//! tables are grouped per (user, day, model, key) by one SQL query, folded per
//! (user, day) in Rust (`logdata`), and written with one statement per kind of
//! change: an upsert for additions, a locked correction for removals. Plans are
//! prepared once per backend and kept.

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::str::FromStr;

use bigdecimal::BigDecimal;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::{JsonB, PgOid, Uuid};

use crate::errors;
use crate::logdata::{self, Correction, DayDelta, GroupRow};

/// Names of the transition tables in `CREATE TRIGGER ... REFERENCING`.
pub const NEW_ROWS: &str = "usage_agg_new_rows";
pub const OLD_ROWS: &str = "usage_agg_old_rows";

/// Groups a transition table per (user, business day, model, key). The day is
/// computed from the row's own `created_at` in the configured time zone.
/// Rows removed (`skip_expired`) are counted only from the detail horizon on:
/// before it the retention cleanup deletes detail whose aggregates must stay.
fn grouping_query(table: &str, skip_expired: bool) -> String {
    let filter = if skip_expired {
        "WHERE t.created_at >= tz.kept_from"
    } else {
        ""
    };
    // `table` is one of the two constants above, never user input.
    format!(
        "SELECT t.user_id,
                ((t.created_at AT TIME ZONE tz.name)::date - DATE '2000-01-01')::int4,
                t.model_used,
                t.shared_key_id::text,
                count(*)::int8,
                (count(*) FILTER (WHERE t.success))::int8,
                COALESCE(sum(t.tokens_used), 0)::int8,
                COALESCE(sum(t.cost_estimate), 0)::text,
                (extract(epoch FROM max(t.created_at)) * 1000000)::int8
           FROM {table} t
          CROSS JOIN (SELECT z.name,
                             usage_agg._day_start((SELECT h.detail_kept_from FROM usage_agg.retention_horizon h), z.name) AS kept_from
                        FROM (SELECT usage_agg._timezone() AS name) z) tz
          {filter}
          GROUP BY 1, 2, 3, 4"
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
                   AND k.created_at >= usage_agg._day_start(d.date, tz.name)
                   AND k.created_at <  usage_agg._day_start(d.date + 1, tz.name))),
           last_modified = pg_catalog.now()
      FROM ROWS FROM (pg_catalog.unnest($1::uuid[]), pg_catalog.unnest($2::int4[]),
                     pg_catalog.unnest($3::jsonb[]), pg_catalog.unnest($4::int8[]))
               AS u(user_id, day, delta, removed_last_at),
           (SELECT usage_agg._timezone() AS name) tz
     WHERE d.user_id = u.user_id AND d.date = DATE '2000-01-01' + u.day";

thread_local! {
    static GROUP_NEW: OnceCell<OwnedPreparedStatement> = const { OnceCell::new() };
    static GROUP_OLD: OnceCell<OwnedPreparedStatement> = const { OnceCell::new() };
    static UPSERT: OnceCell<OwnedPreparedStatement> = const { OnceCell::new() };
    static LOCK: OnceCell<OwnedPreparedStatement> = const { OnceCell::new() };
    static CORRECT: OnceCell<OwnedPreparedStatement> = const { OnceCell::new() };
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

type Key = (Uuid, i32);

/// Reads one grouped transition table into (key, row, removed) triples.
fn read_groups(
    client: &SpiClient<'_>,
    cell: &'static std::thread::LocalKey<OnceCell<OwnedPreparedStatement>>,
    table: &'static str,
    removed: bool,
    out: &mut Vec<(Key, GroupRow, bool)>,
) {
    with_plan(
        cell,
        client,
        &|| grouping_query(table, removed),
        &[],
        false,
        |plan| {
            let rows = client
                .select(plan, None, &[])
                .unwrap_or_else(|e| errors::internal("reading the statement's rows", e));
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
                    last_at_micros: get_i64(9),
                };
                out.push(((user, day), group, removed));
            }
        },
    );
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

        let mut rows = Vec::new();
        if has_old {
            read_groups(client, &GROUP_OLD, OLD_ROWS, true, &mut rows);
        }
        if has_new {
            read_groups(client, &GROUP_NEW, NEW_ROWS, false, &mut rows);
        }
        if rows.is_empty() {
            return;
        }
        let groups: BTreeMap<Key, DayDelta> = logdata::group_rows(rows);
        write_groups(client, groups);
    });
    Ok(None)
}

fn write_groups(client: &mut SpiClient<'_>, groups: BTreeMap<Key, DayDelta>) {
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
            fix_docs.push(JsonB(delta.to_document()));
        } else {
            add_users.push(user);
            add_days.push(day);
            add_docs.push(JsonB(delta.to_document()));
        }
    }

    if !fix_users.is_empty() {
        let users = fix_users.clone();
        let days = fix_days.clone();
        with_plan(
            &LOCK,
            client,
            &|| LOCK_DAYS.to_string(),
            &[
                PgOid::from(pg_sys::UUIDARRAYOID),
                PgOid::from(pg_sys::INT4ARRAYOID),
            ],
            true,
            |plan| {
                client
                    .select(plan, None, &[users.into(), days.into()])
                    .unwrap_or_else(|e| errors::internal("locking daily rows", e));
            },
        );
        with_plan(
            &CORRECT,
            client,
            &|| APPLY_CORRECTIONS.to_string(),
            &[
                PgOid::from(pg_sys::UUIDARRAYOID),
                PgOid::from(pg_sys::INT4ARRAYOID),
                PgOid::from(pg_sys::JSONBARRAYOID),
                PgOid::from(pg_sys::INT8ARRAYOID),
            ],
            true,
            |plan| {
                client
                    .select(
                        plan,
                        None,
                        &[
                            fix_users.into(),
                            fix_days.into(),
                            fix_docs.into(),
                            fix_removed.into(),
                        ],
                    )
                    .unwrap_or_else(|e| errors::internal("correcting daily rows", e));
            },
        );
    }

    if !add_users.is_empty() {
        with_plan(
            &UPSERT,
            client,
            &|| UPSERT_ADDITIONS.to_string(),
            &[
                PgOid::from(pg_sys::UUIDARRAYOID),
                PgOid::from(pg_sys::INT4ARRAYOID),
                PgOid::from(pg_sys::JSONBARRAYOID),
            ],
            true,
            |plan| {
                client
                    .select(
                        plan,
                        None,
                        &[add_users.into(), add_days.into(), add_docs.into()],
                    )
                    .unwrap_or_else(|e| errors::internal("writing daily rows", e));
            },
        );
    }
}

/// Adds a delta document to a stored `log_data` (the ON CONFLICT arm of the fold).
#[pg_extern(immutable, parallel_safe, name = "_fold_merge")]
fn fold_merge(stored: JsonB, delta: JsonB, user_id: Uuid, day: pgrx::datum::Date) -> JsonB {
    match logdata::merge_documents(&stored.0, &delta.0, None) {
        Ok(v) => JsonB(v),
        Err(e) => errors::corrupt_daily_row(&e, &user_id, day.to_pg_epoch_days()),
    }
}

/// Applies a delta with removals, correcting `last_api_call_at` from the detail.
#[pg_extern(immutable, parallel_safe, name = "_fold_correct")]
fn fold_correct(
    stored: JsonB,
    delta: JsonB,
    user_id: Uuid,
    day: pgrx::datum::Date,
    removed_last_at: i64,
    detail_last_at: Option<i64>,
) -> JsonB {
    let correction = Correction {
        removed_last_at,
        detail_last_at,
    };
    match logdata::merge_documents(&stored.0, &delta.0, Some(correction)) {
        Ok(v) => JsonB(v),
        Err(e) => errors::corrupt_daily_row(&e, &user_id, day.to_pg_epoch_days()),
    }
}
