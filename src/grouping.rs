//! Groups a statement's inserted rows per (user, day, model, key, hour) in
//! Rust, reading the transition table directly (the hour only while the hourly
//! tier is maintained: see `hours`).
//!
//! A SQL `GROUP BY` over the transition table was the largest part of a bulk
//! load's fold (about 0.8 s of 1.6 s for 1,000,000 rows: a hash aggregate with a
//! text key, five aggregates and a time-zone conversion per row). This pass reads
//! each tuple once, converts a timestamp to its business day once per run of
//! equal timestamps (rows of one statement defaulting to `now()` share it), keys
//! the groups by bytes, and sums money exactly in binary (`decimal`). When a
//! value cannot be summed that way it gives up, and the caller runs the SQL
//! grouping instead.

use std::collections::hash_map::Entry;

use pgrx::prelude::*;
use pgrx::Uuid;
use rustc_hash::FxHashMap;

use crate::decimal;
use crate::errors;
use crate::logdata::{GroupRow, Kinds};

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;
const MICROS_PER_DAY: i64 = 86_400_000_000;
const NO_MODEL: u32 = u32::MAX;

/// One group of the statement: ((user, day), totals, removed = false).
pub type Grouped = ((Uuid, i32), GroupRow, bool);

#[derive(Hash, PartialEq, Eq)]
struct GroupKey {
    user: [u8; 16],
    day: i32,
    /// The start of the business hour (PostgreSQL microseconds), or 0.
    hour: i64,
    model: u32,
    key: Option<[u8; 16]>,
}

#[derive(Default)]
struct Totals {
    calls: i64,
    successful: i64,
    tokens: i64,
    cost: decimal::Sum,
    kinds: [i64; 5],
    last_at: i64,
    last_failure: i64,
}

/// The attribute numbers (1-based) of the columns the fold reads.
struct Columns {
    user: i32,
    created_at: i32,
    model: i32,
    key: i32,
    tokens: i32,
    cost: i32,
    success: i32,
    /// input, output, cache_read and cache_write tokens; 0 where the table has
    /// no such column (a catalog older than 0.4.0).
    kinds: [i32; 4],
    last: i32,
}

/// Finds the columns by name and checks their types: the values are read in
/// their binary form, so a column whose type was changed (say tokens_used to
/// bigint) is refused with an error instead of being misread.
///
/// SAFETY: `tupdesc` is the descriptor of key_usage_logs.
unsafe fn columns(tupdesc: pg_sys::TupleDesc) -> Columns {
    let natts = (*tupdesc).natts;
    // (name, accepted types, the type to name in the error)
    let find_optional = |name: &str, types: &[pg_sys::Oid], expected: &str| -> Option<i32> {
        for i in 0..natts {
            let att = crate::compat::attribute(&*tupdesc, i as usize);
            if !att.attisdropped {
                let att_name = std::ffi::CStr::from_ptr(att.attname.data.as_ptr());
                if att_name.to_bytes() == name.as_bytes() {
                    if !types.contains(&att.atttypid) {
                        let found = std::ffi::CStr::from_ptr(pg_sys::format_type_be(att.atttypid));
                        errors::changed_column(name, &found.to_string_lossy(), expected);
                    }
                    return Some(i + 1);
                }
            }
        }
        None
    };
    let find = |name: &str, types: &[pg_sys::Oid], expected: &str| -> i32 {
        find_optional(name, types, expected).unwrap_or_else(|| {
            errors::internal("reading the statement's rows", format!("no column {name}"))
        })
    };
    let kind = |name: &str| find_optional(name, &[pg_sys::INT4OID], "integer").unwrap_or(0);
    let c = Columns {
        user: find("user_id", &[pg_sys::UUIDOID], "uuid"),
        created_at: find("created_at", &[pg_sys::TIMESTAMPTZOID], "timestamptz"),
        // varchar is stored as text is.
        model: find("model_used", &[pg_sys::TEXTOID, pg_sys::VARCHAROID], "text"),
        key: find("shared_key_id", &[pg_sys::UUIDOID], "uuid"),
        tokens: find("tokens_used", &[pg_sys::INT4OID], "integer"),
        cost: find("cost_estimate", &[pg_sys::NUMERICOID], "numeric"),
        success: find("success", &[pg_sys::BOOLOID], "boolean"),
        kinds: [
            kind("input_tokens"),
            kind("output_tokens"),
            kind("cache_read_tokens"),
            kind("cache_write_tokens"),
        ],
        last: 0,
    };
    let last = [
        c.user,
        c.created_at,
        c.model,
        c.key,
        c.tokens,
        c.cost,
        c.success,
    ]
    .into_iter()
    .chain(c.kinds)
    .max()
    .unwrap_or(natts);
    Columns { last, ..c }
}

/// The bytes of an inline varlena, or None when it is compressed or stored
/// out of line (then the caller detoasts).
///
/// SAFETY: `ptr` points to a varlena.
unsafe fn inline_bytes<'a>(ptr: *const pg_sys::varlena) -> Option<&'a [u8]> {
    let inline = pgrx::varlena::varatt_is_4b_u(ptr)
        || (pgrx::varlena::varatt_is_1b(ptr) && !pgrx::varlena::varatt_is_1b_e(ptr));
    inline.then(|| {
        std::slice::from_raw_parts(
            pgrx::varlena::vardata_any(ptr) as *const u8,
            pgrx::varlena::varsize_any_exhdr(ptr),
        )
    })
}

/// SAFETY: `datum` is a varlena datum; the bytes live as long as the current
/// memory context (a detoasted copy) or the tuple.
unsafe fn varlena_bytes<'a>(datum: pg_sys::Datum) -> &'a [u8] {
    let ptr = datum.cast_mut_ptr::<pg_sys::varlena>();
    match inline_bytes(ptr) {
        Some(bytes) => bytes,
        None => {
            let plain = pg_sys::pg_detoast_datum_packed(ptr);
            inline_bytes(plain).unwrap_or(&[])
        }
    }
}

/// Business days and hours of a statement's rows: converted once per run of
/// equal timestamps (rows of one statement defaulting to `now()` share it).
pub struct BusinessDays {
    timezone: pg_sys::Datum,
    last_at: i64,
    last_day: i32,
    last_hour: i64,
}

impl BusinessDays {
    pub fn new(timezone: &str) -> BusinessDays {
        let timezone = timezone
            .into_datum()
            .unwrap_or_else(|| errors::internal("reading the statement's rows", "time zone"));
        BusinessDays {
            timezone,
            last_at: i64::MIN,
            last_day: 0,
            last_hour: 0,
        }
    }

    fn convert(&mut self, at: i64) {
        if at != self.last_at {
            let local = local_time(at, self.timezone);
            self.last_day = i32::try_from(local.div_euclid(MICROS_PER_DAY))
                .unwrap_or_else(|e| errors::internal("computing the business day", e));
            self.last_hour = crate::hours::hour_start(at, local);
            self.last_at = at;
        }
    }

    /// The business day of `at` (PostgreSQL microseconds), as
    /// `(created_at AT TIME ZONE timezone)::date` computes it.
    pub fn of(&mut self, at: i64) -> i32 {
        self.convert(at);
        self.last_day
    }

    /// The start of the business hour of `at` (PostgreSQL microseconds both).
    pub fn hour_of(&mut self, at: i64) -> i64 {
        self.convert(at);
        self.last_hour
    }
}

/// The wall-clock time in `timezone` of a timestamptz (PostgreSQL
/// microseconds both), as `created_at AT TIME ZONE timezone` computes it.
fn local_time(at: i64, timezone: pg_sys::Datum) -> i64 {
    // SAFETY: timestamptz_zone(text, timestamptz) is a plain builtin; an error
    // (a timestamp out of range) is raised as a PostgreSQL error.
    let local = unsafe {
        pgrx::direct_function_call_as_datum(
            pg_sys::timestamptz_zone,
            &[Some(timezone), Some(pg_sys::Datum::from(at))],
        )
    }
    .unwrap_or_else(|| errors::internal("converting to the business time zone", at));
    local.value() as i64
}

/// One inserted row, as the fold reads it. `model` and `cost` point into the
/// tuple and are valid only during the callback of [`scan_new_rows`].
pub struct Row {
    pub user: [u8; 16],
    /// created_at (PostgreSQL microseconds since 2000-01-01).
    pub at: i64,
    /// model_used, a text datum.
    pub model: Option<pg_sys::Datum>,
    pub key: Option<[u8; 16]>,
    pub tokens: Option<i32>,
    /// cost_estimate, a numeric datum.
    pub cost: Option<pg_sys::Datum>,
    pub success: bool,
    /// input, output, cache_read and cache_write tokens (None: not reported).
    pub kinds: [Option<i32>; 4],
}

impl Row {
    /// The bytes of model_used (detoasted when needed), valid during the callback.
    pub fn model_bytes(&self) -> Option<&[u8]> {
        // SAFETY: `model` is a text datum of the current tuple (see scan_new_rows).
        self.model.map(|d| unsafe { varlena_bytes(d) })
    }
}

/// Calls `f` for each row of `store` (the NEW transition table of
/// key_usage_logs, described by `tupdesc`) until it returns false.
///
/// SAFETY: `store` and `tupdesc` belong to the running trigger call.
pub unsafe fn scan_new_rows(
    store: *mut pg_sys::Tuplestorestate,
    tupdesc: pg_sys::TupleDesc,
    mut f: impl FnMut(&Row) -> bool,
) {
    // The slot and read pointer are private to this function; each tuple's
    // values are used before the next one is fetched; the slot is dropped before
    // returning (an error raised in between ends the transaction anyway).
    let cols = columns(tupdesc);
    let reader = pg_sys::tuplestore_alloc_read_pointer(store, 0);
    pg_sys::tuplestore_select_read_pointer(store, reader);
    pg_sys::tuplestore_rescan(store);
    let slot = pg_sys::MakeSingleTupleTableSlot(tupdesc, &pg_sys::TTSOpsMinimalTuple);
    while pg_sys::tuplestore_gettupleslot(store, true, false, slot) {
        pg_sys::slot_getsomeattrs_int(slot, cols.last);
        let values = (*slot).tts_values;
        let nulls = (*slot).tts_isnull;
        let value = |att: i32| -> Option<pg_sys::Datum> {
            let i = (att - 1) as usize;
            (!*nulls.add(i)).then(|| *values.add(i))
        };
        let uuid_bytes =
            |d: pg_sys::Datum| -> [u8; 16] { *(d.cast_mut_ptr::<u8>() as *const [u8; 16]) };
        let Some(user) = value(cols.user).map(uuid_bytes) else {
            errors::internal("reading the statement's rows", "user_id is NULL");
        };
        let Some(at) = value(cols.created_at).map(|d| d.value() as i64) else {
            errors::internal("reading the statement's rows", "created_at is NULL");
        };
        let row = Row {
            user,
            at,
            model: value(cols.model),
            key: value(cols.key).map(uuid_bytes),
            tokens: value(cols.tokens).map(|d| d.value() as i32),
            cost: value(cols.cost),
            success: value(cols.success).is_some_and(|d| d.value() != 0),
            kinds: cols.kinds.map(|att| {
                if att == 0 {
                    None
                } else {
                    value(att).map(|d| d.value() as i32)
                }
            }),
        };
        if !f(&row) {
            break;
        }
    }
    pg_sys::ExecDropSingleTupleTableSlot(slot);
}

/// Groups the rows of `store` (the NEW transition table of key_usage_logs,
/// described by `tupdesc`). None: a cost could not be summed exactly here or a
/// model name is not UTF-8; group in SQL instead. `count_unpriced`: count the
/// calls without a cost (not against a catalog older than 0.4.0, whose update
/// counts them from the detail).
pub fn group_new_rows(
    store: *mut pg_sys::Tuplestorestate,
    tupdesc: pg_sys::TupleDesc,
    timezone: &str,
    count_unpriced: bool,
) -> Option<Vec<Grouped>> {
    let mut days = BusinessDays::new(timezone);
    let mut models: FxHashMap<Vec<u8>, u32> = FxHashMap::default();
    let mut model_names: Vec<Vec<u8>> = Vec::new();
    let mut groups: FxHashMap<GroupKey, Totals> = FxHashMap::default();
    let mut complete = true;
    let by_hour = crate::settings::hourly_aggregates();

    // SAFETY: the caller passes this trigger call's transition table; the cost
    // datum is decoded inside the callback, while its tuple is current.
    unsafe {
        scan_new_rows(store, tupdesc, |row| {
            let model = match row.model_bytes() {
                None => NO_MODEL,
                Some(bytes) => match models.get(bytes) {
                    Some(&id) => id,
                    None => {
                        let id = model_names.len() as u32;
                        models.insert(bytes.to_vec(), id);
                        model_names.push(bytes.to_vec());
                        id
                    }
                },
            };
            let totals = match groups.entry(GroupKey {
                user: row.user,
                day: days.of(row.at),
                hour: if by_hour { days.hour_of(row.at) } else { 0 },
                model,
                key: row.key,
            }) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => e.insert(Totals {
                    last_at: i64::MIN,
                    last_failure: i64::MIN,
                    ..Totals::default()
                }),
            };
            totals.calls += 1;
            totals.successful += i64::from(row.success);
            totals.tokens += i64::from(row.tokens.unwrap_or(0));
            for (sum, n) in totals.kinds.iter_mut().zip(row.kinds) {
                *sum += i64::from(n.unwrap_or(0));
            }
            if count_unpriced && row.cost.is_none() {
                totals.kinds[4] += 1;
            }
            if let Some(d) = row.cost {
                let added = decimal::decode(varlena_bytes(d)).and_then(|v| totals.cost.add(v));
                if added.is_none() {
                    complete = false;
                    return false;
                }
            }
            totals.last_at = totals.last_at.max(row.at);
            if !row.success {
                totals.last_failure = totals.last_failure.max(row.at);
            }
            true
        });
    }
    if !complete {
        return None;
    }

    let mut model_text = Vec::with_capacity(model_names.len());
    for name in model_names {
        model_text.push(String::from_utf8(name).ok()?);
    }
    Some(
        groups
            .into_iter()
            .map(|(k, t)| {
                let row = GroupRow {
                    model: (k.model != NO_MODEL).then(|| model_text[k.model as usize].clone()),
                    key: k.key.map(|b| Uuid::from_bytes(b).to_string()),
                    calls: t.calls,
                    successful: t.successful,
                    tokens: t.tokens,
                    cost: t.cost.to_bigdecimal(),
                    kinds: Kinds::from_values(t.kinds),
                    last_at_micros: Some(t.last_at + PG_EPOCH_OFFSET_MICROS),
                    last_failure_micros: (t.last_failure != i64::MIN)
                        .then(|| t.last_failure + PG_EPOCH_OFFSET_MICROS),
                    absorbed: false,
                };
                ((Uuid::from_bytes(k.user), k.day), row, false)
            })
            .collect(),
    )
}
