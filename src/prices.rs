//! Table prices: this backend's copy of `usage_agg.model_prices`, the trigger
//! that prices calls and fills `tokens_used` from the token kinds, and
//! `usage_agg.call_cost()`. The arithmetic is in `pricing`.
//!
//! The copy is read once and kept until the table's relcache entry is
//! invalidated (its `model_prices_changed` trigger announces every change, as
//! config's does), so a statement prices every row from the same rows, and a
//! price added in this transaction is seen by its next statement.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::str::FromStr;

use bigdecimal::BigDecimal;
use pgrx::datum::UnboxDatum;
use pgrx::heap_tuple::PgHeapTupleError;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::{AllocatedByPostgres, AnyNumeric, PgSqlErrorCode, WhoAllocated};
use rustc_hash::FxHashMap;

use crate::errors;
use crate::plans::{kept_statement, Sql};
use crate::pricing::{self, Kinds, Price};

kept_statement! {
    /// Every price row, prices as text (exact), and the table's OID.
    READ_PRICES {
        what: "reading usage_agg.model_prices",
        sql: Sql::Text("
            SELECT p.model, p.valid_from,
                   p.input_per_mtok::pg_catalog.text, p.output_per_mtok::pg_catalog.text,
                   p.cache_read_per_mtok::pg_catalog.text, p.cache_write_per_mtok::pg_catalog.text,
                   p.per_call::pg_catalog.text,
                   'usage_agg.model_prices'::pg_catalog.regclass::pg_catalog.oid
              FROM usage_agg.model_prices p
             ORDER BY p.model, p.valid_from"),
        args: [],
        mutating: false,
    }
}

/// Each model's rows, sorted by `valid_from`.
type PriceList = FxHashMap<String, Vec<Price>>;

thread_local! {
    static PRICES: RefCell<Option<Rc<PriceList>>> = const { RefCell::new(None) };
    static PRICES_OID: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
}

/// Drops the copy when `relid` is model_prices (or every relation).
pub fn relcache_invalidated(relid: pg_sys::Oid) {
    let watched = PRICES_OID.with(Cell::get);
    if relid == pg_sys::InvalidOid || (watched != pg_sys::InvalidOid && relid == watched) {
        PRICES.with(|p| p.replace(None));
        PRICES_OID.with(|o| o.set(pg_sys::InvalidOid));
    }
}

fn prices() -> Rc<PriceList> {
    crate::config::register_invalidation_callback();
    if let Some(cached) = PRICES.with(|p| p.borrow().clone()) {
        return cached;
    }
    let list = Rc::new(Spi::connect(read_prices));
    PRICES.with(|p| p.replace(Some(list.clone())));
    list
}

fn read_prices(client: &SpiClient<'_>) -> PriceList {
    let mut list = PriceList::default();
    let decimal = |text: Option<String>| -> Option<BigDecimal> {
        text.map(|t| {
            BigDecimal::from_str(&t)
                .unwrap_or_else(|e| errors::internal("reading usage_agg.model_prices", e))
        })
    };
    for row in READ_PRICES.run(client, &[]) {
        let get = |i: usize| -> Option<String> {
            row.get::<String>(i)
                .unwrap_or_else(|e| errors::internal("reading usage_agg.model_prices", e))
        };
        let model = get(1).unwrap_or_default();
        let valid_from: TimestampWithTimeZone = row
            .get(2)
            .unwrap_or_else(|e| errors::internal("reading usage_agg.model_prices", e))
            .unwrap_or_else(|| {
                errors::internal("reading usage_agg.model_prices", "valid_from is NULL")
            });
        let oid: Option<pg_sys::Oid> = row
            .get(8)
            .unwrap_or_else(|e| errors::internal("reading usage_agg.model_prices", e));
        PRICES_OID.with(|o| o.set(oid.unwrap_or(pg_sys::InvalidOid)));
        list.entry(model).or_default().push(Price {
            valid_from: valid_from.into(),
            input_per_mtok: decimal(get(3)),
            output_per_mtok: decimal(get(4)),
            cache_read_per_mtok: decimal(get(5)),
            cache_write_per_mtok: decimal(get(6)),
            per_call: decimal(get(7)),
        });
    }
    if PRICES_OID.with(Cell::get) == pg_sys::InvalidOid {
        // No rows: the OID still has to be watched.
        let oid = client
            .select(
                "SELECT 'usage_agg.model_prices'::pg_catalog.regclass::pg_catalog.oid",
                None,
                &[],
            )
            .and_then(|t| t.first().get_one::<pg_sys::Oid>())
            .unwrap_or_else(|e| errors::internal("reading usage_agg.model_prices", e));
        PRICES_OID.with(|o| o.set(oid.unwrap_or(pg_sys::InvalidOid)));
    }
    list
}

/// The cost of a call and the `valid_from` of the row that priced it; both
/// None when it cannot be priced.
fn price_call_at(
    model: Option<&str>,
    at: i64,
    tokens_used: Option<i32>,
    kinds: &Kinds,
) -> Option<(BigDecimal, i64)> {
    let list = prices();
    let price = pricing::price_at(list.get(model?)?, at)?;
    pricing::cost(price, tokens_used, kinds).map(|c| (c, price.valid_from))
}

fn to_numeric(value: &BigDecimal) -> AnyNumeric {
    AnyNumeric::from_str(&value.to_string())
        .unwrap_or_else(|e| errors::internal("converting a price to numeric", e))
}

fn to_timestamptz(at: i64) -> TimestampWithTimeZone {
    TimestampWithTimeZone::try_from(at)
        .unwrap_or_else(|e| errors::internal("converting a price's valid_from", e))
}

/// A sum of kinds too large for `tokens_used` (SQLSTATE 22003).
fn tokens_out_of_range(sum: i64) -> ! {
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
        format!("usage_agg: the token kinds of a call add up to {sum}, more than tokens_used (integer) holds"),
        "usage_agg::prices",
    )
    .set_detail("tokens_used is left NULL, so usage_agg sets it to input_tokens + output_tokens + cache_read_tokens + cache_write_tokens.")
    .set_hint("Check the counts; one call's tokens fit in an integer (at most 2147483647).")
    .report(PgLogLevel::ERROR);
    unreachable!()
}

/// The columns of a detail row that pricing reads.
struct Call {
    model: Option<String>,
    created_at: i64,
    tokens_used: Option<i32>,
    kinds: Kinds,
    cost: Option<AnyNumeric>,
    price_valid_from: Option<i64>,
}

fn read_call<A: WhoAllocated>(row: &PgHeapTuple<'_, A>) -> Call {
    fn get<'t, T, A: WhoAllocated>(
        row: &'t PgHeapTuple<'_, A>,
        column: &str,
        expected: &str,
    ) -> Option<T>
    where
        T: FromDatum + IntoDatum + UnboxDatum<As<'t> = T> + 't,
    {
        row.get_by_name::<T>(column).unwrap_or_else(|e| match e {
            pgrx::datum::TryFromDatumError::IncompatibleTypes { datum_type, .. } => {
                errors::changed_column(column, &datum_type, expected)
            }
            other => errors::internal("reading a row of usage_agg.key_usage_logs", other),
        })
    }
    let created_at: Option<TimestampWithTimeZone> =
        get(row, "created_at", "timestamp with time zone");
    Call {
        model: get(row, "model_used", "text"),
        created_at: created_at.map_or(0, Into::into),
        tokens_used: get(row, "tokens_used", "integer"),
        kinds: Kinds {
            input: get(row, "input_tokens", "integer"),
            output: get(row, "output_tokens", "integer"),
            cache_read: get(row, "cache_read_tokens", "integer"),
            cache_write: get(row, "cache_write_tokens", "integer"),
        },
        cost: get(row, "cost_estimate", "numeric"),
        price_valid_from: get::<TimestampWithTimeZone, _>(
            row,
            "price_valid_from",
            "timestamp with time zone",
        )
        .map(Into::into),
    }
}

/// The columns the trigger writes, applied to the row with one
/// `heap_modify_tuple` (pgrx's `set_by_name` forms a new tuple per column).
#[derive(Default)]
struct Edits(Vec<(&'static str, Option<pg_sys::Datum>)>);

impl Edits {
    fn set(&mut self, column: &'static str, value: Option<pg_sys::Datum>) {
        self.0.push((column, value));
    }

    /// The row with the edits applied (the row itself when there are none).
    fn apply<'a>(
        self,
        trigger: &'a PgTrigger<'a>,
        row: PgHeapTuple<'a, AllocatedByPostgres>,
    ) -> PgHeapTuple<'a, AllocatedByPostgres> {
        if self.0.is_empty() {
            return row;
        }
        let mut replace = Vec::with_capacity(self.0.len());
        for (column, value) in self.0 {
            let (attno, _) = row.get_attribute_by_name(column).unwrap_or_else(|| {
                errors::internal(
                    "setting a column of usage_agg.key_usage_logs",
                    format!("no column {column}"),
                )
            });
            replace.push((attno.get() - 1, value));
        }
        // SAFETY: tg_relation is the trigger's relation and `row` its new
        // tuple, both valid for this call; heap_modify_tuple copies the
        // values into a new tuple in the current (per-tuple) memory context,
        // which the executor reads before it is reset.
        unsafe {
            let tupdesc = (*trigger.trigger_data().tg_relation).rd_att;
            let natts = (*tupdesc).natts as usize;
            let mut values = vec![pg_sys::Datum::from(0usize); natts];
            let mut nulls = vec![false; natts];
            let mut replaced = vec![false; natts];
            for (i, value) in replace {
                values[i] = value.unwrap_or(pg_sys::Datum::from(0usize));
                nulls[i] = value.is_none();
                replaced[i] = true;
            }
            let tuple = pg_sys::heap_modify_tuple(
                row.into_pg(),
                tupdesc,
                values.as_mut_ptr(),
                nulls.as_mut_ptr(),
                replaced.as_mut_ptr(),
            );
            PgHeapTuple::from_heap_tuple(pgrx::PgTupleDesc::from_pg_unchecked(tupdesc), tuple)
        }
    }
}

/// `BEFORE INSERT` (only for rows without a cost, or with kinds and no
/// `tokens_used`: see the triggers' WHEN in sql/prices.sql) and `BEFORE
/// UPDATE` on key_usage_logs. Fills `tokens_used` from the kinds, prices a
/// call without a cost from the table, and keeps `price_valid_from` saying
/// which costs the table gave (see `pricing::cost_action`).
#[pg_trigger(sql = "
CREATE FUNCTION usage_agg._price_call() RETURNS trigger
    LANGUAGE c SECURITY DEFINER
    AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
COMMENT ON FUNCTION usage_agg._price_call() IS
    'Before a call is written: tokens_used from the token kinds when NULL, cost_estimate from usage_agg.model_prices when NULL';
")]
fn price_call<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgHeapTupleError> {
    let Some(new) = trigger.new() else {
        return Ok(None);
    };
    let call = read_call(&new);
    let old = trigger.old().map(|old| read_call(&old));
    let mut edits = Edits::default();

    let tokens_used = match &old {
        None => pricing::derived_tokens_used(call.tokens_used, &call.kinds),
        Some(old) => {
            pricing::updated_tokens_used(old.tokens_used, &old.kinds, call.tokens_used, &call.kinds)
        }
    }
    .unwrap_or_else(|sum| tokens_out_of_range(sum));
    if let Some(t) = tokens_used {
        edits.set("tokens_used", Some(pg_sys::Datum::from(t)));
    }
    let tokens_used = tokens_used.or(call.tokens_used);

    let action = pricing::cost_action(
        call.cost.is_none(),
        call.price_valid_from.is_some(),
        old.as_ref().map(|old| pricing::Changes {
            cost: old.cost != call.cost,
            price_valid_from: old.price_valid_from != call.price_valid_from,
            inputs: old.model != call.model
                || old.created_at != call.created_at
                || old.tokens_used != tokens_used
                || old.kinds != call.kinds,
        }),
    );
    match action {
        pricing::CostAction::Keep => {}
        pricing::CostAction::ClearSource => edits.set("price_valid_from", None),
        pricing::CostAction::Price => {
            match price_call_at(
                call.model.as_deref(),
                call.created_at,
                tokens_used,
                &call.kinds,
            ) {
                Some((cost, valid_from)) => {
                    edits.set("cost_estimate", to_numeric(&cost).into_datum());
                    // A timestamptz datum is its microseconds.
                    edits.set("price_valid_from", Some(pg_sys::Datum::from(valid_from)));
                }
                None => {
                    edits.set("cost_estimate", None);
                    edits.set("price_valid_from", None);
                }
            }
        }
    }
    Ok(Some(edits.apply(trigger, new)))
}

/// A negative count given to call_cost (SQLSTATE 22023).
fn negative_count(name: &str, value: i32) -> ! {
    errors::invalid_argument(
        format!("usage_agg: {name} must not be negative, got {value}"),
        "Token counts are counts of tokens of one call.".into(),
        "Pass NULL for a kind the provider did not report.".into(),
    )
}

/// What a call would cost at `at` from usage_agg.model_prices, and the
/// `valid_from` of the price row that prices it (both NULL when it cannot be
/// priced). The trigger prices inserted calls the same way.
#[pg_extern(stable, parallel_restricted, name = "call_cost")]
#[allow(clippy::too_many_arguments)]
fn call_cost(
    model: Option<&str>,
    at: Option<TimestampWithTimeZone>,
    tokens_used: default!(Option<i32>, "NULL"),
    input_tokens: default!(Option<i32>, "NULL"),
    output_tokens: default!(Option<i32>, "NULL"),
    cache_read_tokens: default!(Option<i32>, "NULL"),
    cache_write_tokens: default!(Option<i32>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(cost, Option<AnyNumeric>),
        name!(price_valid_from, Option<TimestampWithTimeZone>),
    ),
> {
    let kinds = Kinds {
        input: input_tokens,
        output: output_tokens,
        cache_read: cache_read_tokens,
        cache_write: cache_write_tokens,
    };
    for (name, value) in [
        ("tokens_used", tokens_used),
        ("input_tokens", input_tokens),
        ("output_tokens", output_tokens),
        ("cache_read_tokens", cache_read_tokens),
        ("cache_write_tokens", cache_write_tokens),
    ] {
        if let Some(v) = value.filter(|v| *v < 0) {
            negative_count(name, v);
        }
    }
    if let Some(t) = tokens_used.filter(|&t| kinds.any() && i64::from(t) != kinds.sum()) {
        errors::invalid_argument(
            format!("usage_agg: tokens_used {t} is not the sum of the token kinds ({})", kinds.sum()),
            "tokens_used is input_tokens + output_tokens + cache_read_tokens + cache_write_tokens when kinds are given.".into(),
            "Pass tokens_used NULL to have it computed from the kinds.".into(),
        );
    }
    let tokens_used = pricing::derived_tokens_used(tokens_used, &kinds)
        .unwrap_or_else(|sum| tokens_out_of_range(sum))
        .or(tokens_used);
    let priced = at.and_then(|at| price_call_at(model, at.into(), tokens_used, &kinds));
    TableIterator::once(match priced {
        Some((cost, valid_from)) => (Some(to_numeric(&cost)), Some(to_timestamptz(valid_from))),
        None => (None, None),
    })
}
