//! Pure folding logic for `daily_logs.log_data` (and `monthly_logs.log_data`).
//!
//! Nothing here touches Postgres: the trigger glue in `fold.rs` turns transition-table
//! rows into [`GroupRow`]s, this module turns them into per-day [`DayDelta`]s and
//! documents, and merges a delta document into a stored document.
//!
//! Money and every counter are exact decimals ([`BigDecimal`]); JSON numbers are kept
//! as their text (`serde_json` with `arbitrary_precision`), never as `f64`.

use std::collections::BTreeMap;
use std::str::FromStr;

use bigdecimal::{BigDecimal, Zero};
use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde_json::{Map, Number, Value};

pub const API_CALL_COUNT: &str = "api_call_count";
pub const SHARED_SERVICE_USAGE: &str = "shared_service_usage";
pub const LAST_API_CALL_AT: &str = "last_api_call_at";
pub const TOTAL_CALLS: &str = "total_calls";
pub const SUCCESSFUL_CALLS: &str = "successful_calls";
pub const FAILED_CALLS: &str = "failed_calls";
pub const TOKENS_USED: &str = "tokens_used";
pub const ESTIMATED_COST: &str = "estimated_cost";
pub const KEYS_USED: &str = "keys_used";
pub const BY_MODEL: &str = "by_model";
pub const BY_KEY: &str = "by_key";
pub const INPUT_TOKENS: &str = "input_tokens";
pub const OUTPUT_TOKENS: &str = "output_tokens";
pub const CACHE_READ_TOKENS: &str = "cache_read_tokens";
pub const CACHE_WRITE_TOKENS: &str = "cache_write_tokens";
pub const UNPRICED_CALLS: &str = "unpriced_calls";

/// The sparse counters (0.4.0): tokens of each kind and calls without a cost.
/// A document holds one only while it is not zero, so documents of calls that
/// report no kinds and carry costs look as before.
pub const KIND_FIELDS: [&str; 5] = [
    INPUT_TOKENS,
    OUTPUT_TOKENS,
    CACHE_READ_TOKENS,
    CACHE_WRITE_TOKENS,
    UNPRICED_CALLS,
];

/// The integer counters inside `shared_service_usage`, in layout order.
const SSU_COUNTERS: [&str; 4] = [TOTAL_CALLS, SUCCESSFUL_CALLS, FAILED_CALLS, TOKENS_USED];
/// Every field of `shared_service_usage` that usage_agg owns (the rest belong
/// to the application); SQL reads this list through `usage_agg._owned_service_fields()`.
pub const OWNED_SERVICE_FIELDS: [&str; 13] = [
    TOTAL_CALLS,
    SUCCESSFUL_CALLS,
    FAILED_CALLS,
    TOKENS_USED,
    ESTIMATED_COST,
    KEYS_USED,
    BY_MODEL,
    BY_KEY,
    INPUT_TOKENS,
    OUTPUT_TOKENS,
    CACHE_READ_TOKENS,
    CACHE_WRITE_TOKENS,
    UNPRICED_CALLS,
];

/// A stored document's owned field does not have the shape the fold needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptField {
    /// Path of the field, e.g. `shared_service_usage.by_model.gpt-4o.calls`.
    pub field: String,
    /// What was found there, as JSON text.
    pub found: String,
    /// What was expected.
    pub expected: &'static str,
}

impl std::fmt::Display for CorruptField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "field \"{}\" holds {} where {} was expected",
            self.field, self.found, self.expected
        )
    }
}

/// Tokens of each kind (NULL counts as 0) and calls without a cost, of a
/// group of calls; in documents under the names of [`KIND_FIELDS`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kinds {
    pub input: i64,
    pub output: i64,
    pub cache_read: i64,
    pub cache_write: i64,
    pub unpriced: i64,
}

impl Kinds {
    /// In the order of [`KIND_FIELDS`].
    pub fn values(&self) -> [i64; 5] {
        [
            self.input,
            self.output,
            self.cache_read,
            self.cache_write,
            self.unpriced,
        ]
    }

    pub fn from_values(v: [i64; 5]) -> Kinds {
        Kinds {
            input: v[0],
            output: v[1],
            cache_read: v[2],
            cache_write: v[3],
            unpriced: v[4],
        }
    }

    pub fn add(&mut self, other: &Kinds, sign: i64) {
        let mut v = self.values();
        for (a, b) in v.iter_mut().zip(other.values()) {
            *a += sign * b;
        }
        *self = Kinds::from_values(v);
    }

    pub fn is_zero(&self) -> bool {
        self.values().iter().all(|&v| v == 0)
    }

    /// Writes the counters that are not zero into `map`.
    pub fn write(&self, map: &mut Map<String, Value>) {
        for (field, v) in KIND_FIELDS.into_iter().zip(self.values()) {
            if v != 0 {
                map.insert(field.into(), Value::from(v));
            }
        }
    }

    /// Reads the counters of a document object (absent: 0).
    pub fn read(map: &Map<String, Value>, path: &str) -> Result<Kinds, CorruptField> {
        let mut v = [0i64; 5];
        for (slot, field) in v.iter_mut().zip(KIND_FIELDS) {
            *slot = read_counter(map.get(field), &format!("{path}{field}"))?;
        }
        Ok(Kinds::from_values(v))
    }
}

/// A sparse counter's value: absent or null is 0.
fn read_counter(value: Option<&Value>, path: &str) -> Result<i64, CorruptField> {
    match value {
        None | Some(Value::Null) => Ok(0),
        Some(v @ Value::Number(n)) => n.as_i64().ok_or_else(|| corrupt(path, v, "an integer")),
        Some(other) => Err(corrupt(path, other, "an integer")),
    }
}

/// Adds the sparse counters of `delta` into `map` (both document objects; a
/// delta that is not an object adds nothing). A counter that reaches 0 is
/// removed. `path` prefixes the field names in errors (empty or ending in `.`).
pub(crate) fn add_kinds(
    map: &mut Map<String, Value>,
    delta: Option<&Value>,
    path: &str,
) -> Result<(), CorruptField> {
    match delta {
        Some(Value::Object(delta)) => add_kinds_of(map, delta, path),
        _ => Ok(()),
    }
}

/// [`add_kinds`] from a delta object.
pub(crate) fn add_kinds_of(
    map: &mut Map<String, Value>,
    delta: &Map<String, Value>,
    path: &str,
) -> Result<(), CorruptField> {
    for field in KIND_FIELDS {
        let add = read_counter(delta.get(field), &format!("{path}{field}"))?;
        if add == 0 {
            continue;
        }
        let sum = read_counter(map.get(field), &format!("{path}{field}"))?
            .checked_add(add)
            .ok_or_else(|| {
                corrupt(
                    &format!("{path}{field}"),
                    &Value::from(add),
                    "a smaller integer",
                )
            })?;
        if sum == 0 {
            map.remove(field);
        } else {
            map.insert(field.into(), Value::from(sum));
        }
    }
    Ok(())
}

/// Calls, tokens and cost of one model or one key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub calls: i64,
    pub tokens: i64,
    pub cost: BigDecimal,
    pub kinds: Kinds,
}

impl Totals {
    fn add(&mut self, other: &Totals, sign: i64) {
        self.calls += sign * other.calls;
        self.tokens += sign * other.tokens;
        if sign >= 0 {
            self.cost += &other.cost;
        } else {
            self.cost -= &other.cost;
        }
        self.kinds.add(&other.kinds, sign);
    }

    fn is_zero(&self) -> bool {
        self.calls == 0 && self.tokens == 0 && self.cost.is_zero() && self.kinds.is_zero()
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("calls".into(), Value::from(self.calls));
        m.insert("tokens".into(), Value::from(self.tokens));
        m.insert("cost".into(), decimal_json(&self.cost));
        self.kinds.write(&mut m);
        Value::Object(m)
    }
}

/// One row of the fold's grouped transition-table query: the calls of one
/// (user, day, model, key) combination in one statement.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupRow {
    pub model: Option<String>,
    pub key: Option<String>,
    pub calls: i64,
    pub successful: i64,
    pub tokens: i64,
    pub cost: BigDecimal,
    /// Tokens by kind and calls without a cost.
    pub kinds: Kinds,
    /// Newest `created_at` among these calls, microseconds since the Unix epoch;
    /// `None` when the caller recomputes `last_api_call_at` from the detail anyway
    /// (pending calls taken into a correction).
    pub last_at_micros: Option<i64>,
    /// Newest `created_at` among the failed calls, as `last_at_micros`.
    pub last_failure_micros: Option<i64>,
    /// Pending calls taken into a correction: they may be among the removed
    /// calls, so their times only tell the per-key fold to look at the detail.
    pub absorbed: bool,
}

/// The net change one statement makes to one (user, day).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DayDelta {
    pub calls: i64,
    pub successful: i64,
    pub failed: i64,
    pub tokens: i64,
    pub cost: BigDecimal,
    pub kinds: Kinds,
    pub by_model: BTreeMap<String, Totals>,
    pub by_key: BTreeMap<String, Totals>,
    /// Newest `created_at` among added rows.
    pub added_last_at: Option<i64>,
    /// Newest `created_at` among removed rows (UPDATE old side, DELETE).
    pub removed_last_at: Option<i64>,
}

impl DayDelta {
    /// Adds (`removed == false`) or subtracts (`removed == true`) one group row.
    pub fn apply(&mut self, row: &GroupRow, removed: bool) {
        let sign = if removed { -1 } else { 1 };
        let cell = Totals {
            calls: row.calls,
            tokens: row.tokens,
            cost: row.cost.clone(),
            kinds: row.kinds,
        };
        self.kinds.add(&row.kinds, sign);
        self.calls += sign * row.calls;
        self.successful += sign * row.successful;
        self.failed += sign * (row.calls - row.successful);
        self.tokens += sign * row.tokens;
        if removed {
            self.cost -= &row.cost;
        } else {
            self.cost += &row.cost;
        }
        if let Some(model) = &row.model {
            self.by_model
                .entry(model.clone())
                .or_default()
                .add(&cell, sign);
        }
        if let Some(key) = &row.key {
            self.by_key.entry(key.clone()).or_default().add(&cell, sign);
        }
        let slot = if removed {
            &mut self.removed_last_at
        } else {
            &mut self.added_last_at
        };
        // Absorbed calls: last_api_call_at is recomputed from the detail.
        if !row.absorbed {
            *slot = max_opt(*slot, row.last_at_micros);
        }
    }

    /// True when rows were removed: the stored document must then be corrected,
    /// not just added to.
    pub fn has_removals(&self) -> bool {
        self.removed_last_at.is_some()
    }

    /// True when applying this delta changes nothing (an UPDATE that touched only
    /// columns the fold ignores, within the same day).
    pub fn is_noop(&self) -> bool {
        self.calls == 0
            && self.successful == 0
            && self.failed == 0
            && self.tokens == 0
            && self.cost.is_zero()
            && self.kinds.is_zero()
            && self.by_model.values().all(Totals::is_zero)
            && self.by_key.values().all(Totals::is_zero)
            && self.added_last_at == self.removed_last_at
    }

    /// What a new day row made of this delta says (see [`Presence`]).
    pub fn presence(&self) -> Presence {
        Presence {
            active: self.calls > 0,
            // BTreeMap order: sorted.
            keys: self
                .by_key
                .iter()
                .filter(|(_, c)| c.calls > 0)
                .map(|(k, _)| k.clone())
                .collect(),
        }
    }

    /// The delta as a document in the `log_data` layout. For a pure addition this is
    /// exactly the document a new (user, day) row starts with.
    pub fn to_document(&self) -> Value {
        let mut ssu = Map::new();
        ssu.insert(TOTAL_CALLS.into(), Value::from(self.calls));
        ssu.insert(SUCCESSFUL_CALLS.into(), Value::from(self.successful));
        ssu.insert(FAILED_CALLS.into(), Value::from(self.failed));
        ssu.insert(TOKENS_USED.into(), Value::from(self.tokens));
        ssu.insert(ESTIMATED_COST.into(), decimal_json(&self.cost));
        self.kinds.write(&mut ssu);
        let keys: Vec<Value> = self
            .by_key
            .iter()
            .filter(|(_, c)| c.calls > 0)
            .map(|(k, _)| Value::String(k.clone()))
            .collect();
        ssu.insert(KEYS_USED.into(), Value::Array(keys));
        ssu.insert(BY_MODEL.into(), cells_json(&self.by_model));
        ssu.insert(BY_KEY.into(), cells_json(&self.by_key));

        let mut doc = Map::new();
        doc.insert(API_CALL_COUNT.into(), Value::from(self.calls));
        doc.insert(SHARED_SERVICE_USAGE.into(), Value::Object(ssu));
        doc.insert(
            LAST_API_CALL_AT.into(),
            self.added_last_at
                .map_or(Value::Null, |t| Value::String(format_micros(t))),
        );
        Value::Object(doc)
    }
}

fn cells_json(cells: &BTreeMap<String, Totals>) -> Value {
    Value::Object(
        cells
            .iter()
            .map(|(k, c)| (k.clone(), c.to_json()))
            .collect(),
    )
}

/// Groups the rows of one statement per (user, day). `K` is whatever identifies a
/// (user, day) in the caller; the map is ordered so that rows are locked in a fixed
/// order and concurrent statements cannot deadlock each other. The rows are
/// borrowed: callers keep them (to record the ones that could not be folded).
pub fn group_rows<'r, K: Ord + Copy + 'r>(
    rows: impl IntoIterator<Item = &'r (K, GroupRow, bool)>,
) -> BTreeMap<K, DayDelta> {
    let mut out: BTreeMap<K, DayDelta> = BTreeMap::new();
    for (k, row, removed) in rows {
        out.entry(*k).or_default().apply(row, *removed);
    }
    out
}

/// How `last_api_call_at` is to be corrected when rows were removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Correction {
    /// Newest removed `created_at`.
    pub removed_last_at: i64,
    /// Newest `created_at` of the day's detail rows, read after the row lock was
    /// taken (None: no detail left).
    pub detail_last_at: Option<i64>,
}

/// Merges a delta document (as built by [`DayDelta::to_document`], possibly with
/// negative numbers) into a stored document. Keys the fold does not own are kept
/// untouched, at the top level and inside `shared_service_usage`.
pub fn merge_documents(
    stored: &Value,
    delta: &Value,
    correction: Option<Correction>,
) -> Result<Value, CorruptField> {
    merge_into(stored.clone(), delta, correction)
}

/// [`merge_documents`] taking the stored document by value: the fold owns the
/// document it read, and rebuilding it in place saves copying every map.
pub fn merge_into(
    stored: Value,
    delta: &Value,
    correction: Option<Correction>,
) -> Result<Value, CorruptField> {
    let mut out = match stored {
        Value::Object(map) => map,
        other => return Err(corrupt("log_data", &other, "a JSON object")),
    };

    add_number(
        &mut out,
        API_CALL_COUNT,
        API_CALL_COUNT,
        get(delta, &[API_CALL_COUNT]),
        true,
    )?;

    let mut ssu = match out.remove(SHARED_SERVICE_USAGE) {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(other) => return Err(corrupt(SHARED_SERVICE_USAGE, &other, "a JSON object")),
    };
    for counter in SSU_COUNTERS {
        let path = format!("{SHARED_SERVICE_USAGE}.{counter}");
        add_number(
            &mut ssu,
            counter,
            &path,
            get(delta, &[SHARED_SERVICE_USAGE, counter]),
            true,
        )?;
    }
    let path = format!("{SHARED_SERVICE_USAGE}.{ESTIMATED_COST}");
    add_number(
        &mut ssu,
        ESTIMATED_COST,
        &path,
        get(delta, &[SHARED_SERVICE_USAGE, ESTIMATED_COST]),
        false,
    )?;
    add_kinds(
        &mut ssu,
        get(delta, &[SHARED_SERVICE_USAGE]),
        &format!("{SHARED_SERVICE_USAGE}."),
    )?;

    merge_cells(
        &mut ssu,
        BY_MODEL,
        get(delta, &[SHARED_SERVICE_USAGE, BY_MODEL]),
    )?;
    let removed_keys = merge_cells(
        &mut ssu,
        BY_KEY,
        get(delta, &[SHARED_SERVICE_USAGE, BY_KEY]),
    )?;
    merge_keys_used(
        &mut ssu,
        get(delta, &[SHARED_SERVICE_USAGE, BY_KEY]),
        &removed_keys,
    )?;
    out.insert(SHARED_SERVICE_USAGE.into(), Value::Object(ssu));

    let stored_last =
        match out.get(LAST_API_CALL_AT) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(parse_timestamp_micros(s).ok_or_else(|| {
                corrupt(LAST_API_CALL_AT, &Value::String(s.clone()), "a timestamp")
            })?),
            Some(other) => return Err(corrupt(LAST_API_CALL_AT, other, "a timestamp string")),
        };
    let added_last = match get(delta, &[LAST_API_CALL_AT]) {
        Some(Value::String(s)) => parse_timestamp_micros(s),
        _ => None,
    };
    let new_last = match correction {
        None => max_opt(stored_last, added_last),
        Some(c) => {
            // The stored value still stands if it is newer than every removed row:
            // it then belongs to a row that was not removed (possibly one committed by
            // a concurrent session after this statement's snapshot).
            let kept = stored_last.filter(|&t| t > c.removed_last_at);
            max_opt(max_opt(kept, c.detail_last_at), added_last)
        }
    };
    out.insert(
        LAST_API_CALL_AT.into(),
        new_last.map_or(Value::Null, |t| Value::String(format_micros(t))),
    );
    Ok(Value::Object(out))
}

/// What a user's day document says about the per-key and service aggregates:
/// whether the day has calls, and which keys it used. Comparing it before and
/// after a fold tells them whether the user was added to (or removed from) a
/// key's users of the day, or the day's active users.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Presence {
    pub active: bool,
    /// Keys with calls, sorted.
    pub keys: Vec<String>,
}

impl Presence {
    /// Read leniently: a field that is not what the fold writes counts as absent
    /// (the fold itself raises on such a document before this is asked).
    #[cfg(test)]
    pub fn of(doc: &Value) -> Presence {
        Presence::among(doc, None)
    }

    /// [`Presence::of`] for the keys a delta document names only: folding that
    /// delta can change no other key, and a user's day may list many keys.
    pub fn within(doc: &Value, delta: &Value) -> Presence {
        let names: Vec<&str> = match get(delta, &[SHARED_SERVICE_USAGE, BY_KEY]) {
            Some(Value::Object(cells)) => cells.keys().map(String::as_str).collect(),
            _ => Vec::new(),
        };
        Presence::among(doc, Some(&names))
    }

    fn among(doc: &Value, names: Option<&[&str]>) -> Presence {
        let positive = |v: Option<&Value>| match v {
            Some(Value::Number(n)) => n.as_i64().map_or_else(
                || BigDecimal::from_str(&n.to_string()).is_ok_and(|d| d > BigDecimal::zero()),
                |i| i > 0,
            ),
            _ => false,
        };
        let mut keys: Vec<String> = match get(doc, &[SHARED_SERVICE_USAGE, BY_KEY]) {
            Some(Value::Object(cells)) => match names {
                None => cells
                    .iter()
                    .filter(|(_, c)| positive(c.get("calls")))
                    .map(|(k, _)| k.clone())
                    .collect(),
                Some(names) => names
                    .iter()
                    .filter(|n| cells.get(**n).is_some_and(|c| positive(c.get("calls"))))
                    .map(|n| n.to_string())
                    .collect(),
            },
            _ => Vec::new(),
        };
        keys.sort();
        Presence {
            active: positive(doc.get(API_CALL_COUNT)),
            keys,
        }
    }

    /// (+1 or -1 for the day's active users, and per key +1 or -1): what
    /// changed from `before` to `self`.
    pub fn changes_from(&self, before: &Presence) -> (i64, Vec<(String, i64)>) {
        let active = i64::from(self.active) - i64::from(before.active);
        let mut keys = Vec::new();
        for k in &self.keys {
            if before.keys.binary_search(k).is_err() {
                keys.push((k.clone(), 1));
            }
        }
        for k in &before.keys {
            if self.keys.binary_search(k).is_err() {
                keys.push((k.clone(), -1));
            }
        }
        (active, keys)
    }
}

/// Whether a top-level `log_data` key belongs to usage_agg.
fn is_owned_key(key: &str) -> bool {
    matches!(
        key,
        API_CALL_COUNT | SHARED_SERVICE_USAGE | LAST_API_CALL_AT
    )
}

/// Adds one day's document into its month's document (the roll-up of
/// `daily_logs` into `monthly_logs`). Owned fields add up as in the fold. Top-level
/// application keys (`conversation_count`, ...) are summed when both sides are
/// numbers, copied when the month lacks them, and otherwise take the day's value,
/// so days must be rolled in date order.
pub fn rollup_documents(month: &Value, day: &Value) -> Result<Value, CorruptField> {
    let Value::Object(day_map) = day else {
        return Err(corrupt("log_data", day, "a JSON object"));
    };
    let Value::Object(mut out) = merge_documents(month, day, None)? else {
        unreachable!("merge_documents returns an object");
    };
    for (key, value) in day_map {
        if is_owned_key(key) {
            continue;
        }
        let summed = match (out.get(key), value) {
            (Some(Value::Number(a)), Value::Number(b)) => {
                match (
                    BigDecimal::from_str(&a.to_string()),
                    BigDecimal::from_str(&b.to_string()),
                ) {
                    (Ok(x), Ok(y)) => {
                        let integers = x.is_integer() && y.is_integer();
                        let sum = x + y;
                        Some(if integers {
                            integer_json(&sum)
                        } else {
                            decimal_json(&sum)
                        })
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        out.insert(key.clone(), summed.unwrap_or_else(|| value.clone()));
    }
    Ok(Value::Object(out))
}

pub(crate) fn max_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

fn get<'v>(doc: &'v Value, path: &[&str]) -> Option<&'v Value> {
    let mut cur = doc;
    for p in path {
        cur = cur.get(p)?;
    }
    Some(cur)
}

pub(crate) fn corrupt(field: &str, found: &Value, expected: &'static str) -> CorruptField {
    let mut found = found.to_string();
    if found.len() > 200 {
        let mut cut = 200;
        while !found.is_char_boundary(cut) {
            cut -= 1;
        }
        found.truncate(cut);
        found.push_str("...");
    }
    CorruptField {
        field: field.to_string(),
        found,
        expected,
    }
}

/// Reads an exact decimal from a stored field (missing or null counts as zero).
pub(crate) fn read_decimal(
    value: Option<&Value>,
    path: &str,
    integer: bool,
) -> Result<BigDecimal, CorruptField> {
    let expected = if integer { "an integer" } else { "a number" };
    match value {
        None | Some(Value::Null) => Ok(BigDecimal::zero()),
        Some(Value::Number(n)) => {
            let d = BigDecimal::from_str(&n.to_string())
                .map_err(|_| corrupt(path, value.unwrap(), expected))?;
            if integer && !d.is_integer() {
                return Err(corrupt(path, value.unwrap(), expected));
            }
            Ok(d)
        }
        Some(other) => Err(corrupt(path, other, expected)),
    }
}

pub(crate) fn add_number(
    map: &mut Map<String, Value>,
    key: &str,
    path: &str,
    delta: Option<&Value>,
    integer: bool,
) -> Result<(), CorruptField> {
    // Counters are integers that fit in i64 almost always: add them without
    // BigDecimal (which allocates), and fall back to it for anything else.
    if integer {
        let as_i64 = |v: Option<&Value>| match v {
            None | Some(Value::Null) => Some(0),
            Some(Value::Number(n)) => n.as_i64(),
            Some(_) => None,
        };
        if let (Some(a), Some(b)) = (as_i64(map.get(key)), as_i64(delta)) {
            if let Some(sum) = a.checked_add(b) {
                map.insert(key.to_string(), Value::from(sum));
                return Ok(());
            }
        }
    }
    let current = read_decimal(map.get(key), path, integer)?;
    let add = read_decimal(delta, path, integer)?;
    let sum = current + add;
    let value = if integer {
        integer_json(&sum)
    } else {
        decimal_json(&sum)
    };
    map.insert(key.to_string(), value);
    Ok(())
}

/// Merges `by_model` or `by_key`. Returns the names of cells that dropped to zero
/// calls and were removed.
fn merge_cells(
    ssu: &mut Map<String, Value>,
    name: &str,
    delta: Option<&Value>,
) -> Result<Vec<String>, CorruptField> {
    let path = format!("{SHARED_SERVICE_USAGE}.{name}");
    let mut cells = match ssu.remove(name) {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(other) => return Err(corrupt(&path, &other, "a JSON object")),
    };
    let mut removed = Vec::new();
    if let Some(Value::Object(delta_cells)) = delta {
        for (cell_name, delta_cell) in delta_cells {
            let cell_path = format!("{path}.{cell_name}");
            let mut cell = match cells.remove(cell_name) {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(m)) => m,
                Some(other) => return Err(corrupt(&cell_path, &other, "a JSON object")),
            };
            for (field, integer) in [("calls", true), ("tokens", true), ("cost", false)] {
                add_number(
                    &mut cell,
                    field,
                    &format!("{cell_path}.{field}"),
                    delta_cell.get(field),
                    integer,
                )?;
            }
            add_kinds(&mut cell, Some(delta_cell), &format!("{cell_path}."))?;
            let no_calls = match cell.get("calls").and_then(Value::as_i64) {
                Some(calls) => calls <= 0,
                None => read_decimal(cell.get("calls"), &cell_path, true)? <= BigDecimal::zero(),
            };
            if no_calls {
                removed.push(cell_name.clone());
            } else {
                cells.insert(cell_name.clone(), Value::Object(cell));
            }
        }
    }
    ssu.insert(name.to_string(), Value::Object(cells));
    Ok(removed)
}

/// Appends keys the delta added and drops keys whose `by_key` cell went away,
/// keeping the stored order (first use first).
fn merge_keys_used(
    ssu: &mut Map<String, Value>,
    delta_by_key: Option<&Value>,
    removed_keys: &[String],
) -> Result<(), CorruptField> {
    let path = format!("{SHARED_SERVICE_USAGE}.{KEYS_USED}");
    let mut keys: Vec<Value> = match ssu.remove(KEYS_USED) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(other) => return Err(corrupt(&path, &other, "a JSON array")),
    };
    keys.retain(|k| !matches!(k, Value::String(s) if removed_keys.contains(s)));
    let still_present =
        |name: &str| matches!(ssu.get(BY_KEY), Some(Value::Object(m)) if m.contains_key(name));
    if let Some(Value::Object(delta_cells)) = delta_by_key {
        for name in delta_cells.keys() {
            let listed = keys
                .iter()
                .any(|k| matches!(k, Value::String(s) if s == name));
            if !listed && still_present(name) {
                keys.push(Value::String(name.clone()));
            }
        }
    }
    ssu.insert(KEYS_USED.into(), Value::Array(keys));
    Ok(())
}

/// A JSON number holding `d` exactly, in plain (non-exponent) notation.
pub fn decimal_json(d: &BigDecimal) -> Value {
    let text = d.to_plain_string();
    Value::Number(Number::from_str(&text).expect("a plain decimal is a valid JSON number"))
}

fn integer_json(d: &BigDecimal) -> Value {
    decimal_json(&d.with_scale(0))
}

/// `2026-01-15T11:45:00Z`, with `.ffffff` only when the microseconds are not zero.
/// The SQL function `usage_agg._iso_utc()` produces the same text.
pub fn format_micros(micros: i64) -> String {
    let dt = DateTime::<Utc>::from_timestamp_micros(micros).expect("timestamp in range");
    if micros.rem_euclid(1_000_000) == 0 {
        dt.to_rfc3339_opts(SecondsFormat::Secs, true)
    } else {
        dt.to_rfc3339_opts(SecondsFormat::Micros, true)
    }
}

/// A Postgres date (days since 2000-01-01) as `YYYY-MM-DD`.
pub fn pg_days_to_iso(pg_days: i32) -> String {
    let epoch = chrono::NaiveDate::from_ymd_opt(2000, 1, 1).expect("valid date");
    epoch
        .checked_add_signed(chrono::Duration::days(i64::from(pg_days)))
        .map_or_else(
            || format!("day {pg_days}"),
            |d| d.format("%Y-%m-%d").to_string(),
        )
}

/// Parses RFC 3339 and the text forms Postgres itself prints for timestamptz.
pub fn parse_timestamp_micros(s: &str) -> Option<i64> {
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(dt.timestamp_micros());
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
        if let Ok(dt) = DateTime::parse_from_str(s, fmt) {
            return Some(dt.timestamp_micros());
        }
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(dt) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(dt.and_utc().timestamp_micros());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dec(s: &str) -> BigDecimal {
        BigDecimal::from_str(s).unwrap()
    }

    fn row(
        model: Option<&str>,
        key: Option<&str>,
        calls: i64,
        ok: i64,
        tokens: i64,
        cost: &str,
        at: i64,
    ) -> GroupRow {
        GroupRow {
            model: model.map(String::from),
            key: key.map(String::from),
            calls,
            successful: ok,
            tokens,
            cost: dec(cost),
            last_at_micros: Some(at),
            last_failure_micros: (ok < calls).then_some(at),
            absorbed: false,
            kinds: Kinds::default(),
        }
    }

    const T0: i64 = 1_768_477_500_000_000; // 2026-01-15T11:45:00Z

    #[test]
    fn first_call_of_the_day_gives_the_full_layout() {
        let mut d = DayDelta::default();
        d.apply(
            &row(Some("gpt-4o"), Some("k1"), 1, 1, 900, "0.01", T0),
            false,
        );
        assert_eq!(
            d.to_document(),
            json!({
                "api_call_count": 1,
                "shared_service_usage": {
                    "total_calls": 1, "successful_calls": 1, "failed_calls": 0,
                    "tokens_used": 900, "estimated_cost": 0.01,
                    "keys_used": ["k1"],
                    "by_model": {"gpt-4o": {"calls": 1, "tokens": 900, "cost": 0.01}},
                    "by_key": {"k1": {"calls": 1, "tokens": 900, "cost": 0.01}}
                },
                "last_api_call_at": "2026-01-15T11:45:00Z"
            })
        );
    }

    #[test]
    fn kinds_and_unpriced_calls_are_sparse_and_follow_corrections() {
        let kinds = |i, o, cr, cw, u| Kinds::from_values([i, o, cr, cw, u]);
        let mut d = DayDelta::default();
        d.apply(
            &GroupRow {
                kinds: kinds(100, 40, 0, 0, 0),
                ..row(Some("m1"), Some("k1"), 1, 1, 140, "0.01", T0)
            },
            false,
        );
        d.apply(
            &GroupRow {
                kinds: kinds(0, 5, 1000, 0, 1),
                ..row(Some("m2"), None, 1, 1, 1005, "0", T0)
            },
            false,
        );
        let doc = d.to_document();
        assert_eq!(
            doc["shared_service_usage"],
            json!({
                "total_calls": 2, "successful_calls": 2, "failed_calls": 0,
                "tokens_used": 1145, "estimated_cost": 0.01,
                "input_tokens": 100, "output_tokens": 45, "cache_read_tokens": 1000,
                "unpriced_calls": 1,
                "keys_used": ["k1"],
                "by_model": {
                    "m1": {"calls": 1, "tokens": 140, "cost": 0.01,
                           "input_tokens": 100, "output_tokens": 40},
                    "m2": {"calls": 1, "tokens": 1005, "cost": 0,
                           "output_tokens": 5, "cache_read_tokens": 1000, "unpriced_calls": 1}
                },
                "by_key": {"k1": {"calls": 1, "tokens": 140, "cost": 0.01,
                                  "input_tokens": 100, "output_tokens": 40}}
            })
        );
        // Twice, then the unpriced call removed again: its counters go away.
        let stored = merge_documents(&doc, &doc, None).unwrap();
        assert_eq!(stored["shared_service_usage"]["unpriced_calls"], json!(2));
        assert_eq!(
            stored["shared_service_usage"]["by_model"]["m1"]["input_tokens"],
            json!(200)
        );
        let mut del = DayDelta::default();
        for _ in 0..2 {
            del.apply(
                &GroupRow {
                    kinds: kinds(0, 5, 1000, 0, 1),
                    ..row(Some("m2"), None, 1, 1, 1005, "0", T0)
                },
                true,
            );
        }
        let fixed = merge_documents(
            &stored,
            &del.to_document(),
            Some(Correction {
                removed_last_at: T0,
                detail_last_at: Some(T0),
            }),
        )
        .unwrap();
        let ssu = &fixed["shared_service_usage"];
        assert_eq!(ssu.get("unpriced_calls"), None);
        assert_eq!(ssu.get("cache_read_tokens"), None);
        assert_eq!(ssu["output_tokens"], json!(80));
        assert_eq!(ssu["by_model"].get("m2"), None);
        // Rolled up into a month, the counters add up like the others.
        let month = rollup_documents(&json!({}), &doc).unwrap();
        let month = rollup_documents(&month, &doc).unwrap();
        assert_eq!(
            month["shared_service_usage"]["cache_read_tokens"],
            json!(2000)
        );
        // A counter that is not an integer is reported with its path.
        let bad = json!({"shared_service_usage": {"by_model": {"m2": {"calls": 1, "unpriced_calls": "x"}}}});
        let err = merge_documents(&bad, &doc, None).unwrap_err();
        assert_eq!(err.field, "shared_service_usage.by_model.m2.unpriced_calls");
    }

    #[test]
    fn merge_adds_counters_and_keeps_application_keys() {
        let stored = json!({
            "conversation_count": 7,
            "api_call_count": 2,
            "shared_service_usage": {
                "total_calls": 2, "successful_calls": 1, "failed_calls": 1,
                "tokens_used": 100, "estimated_cost": 0.10,
                "keys_used": ["k1"], "custom": "kept",
                "by_model": {"m1": {"calls": 2, "tokens": 100, "cost": 0.10}},
                "by_key": {"k1": {"calls": 2, "tokens": 100, "cost": 0.10}}
            },
            "last_api_call_at": "2026-01-15T11:45:00Z"
        });
        let mut d = DayDelta::default();
        d.apply(
            &row(Some("m2"), Some("k2"), 3, 3, 30, "0.05", T0 - 1),
            false,
        );
        let merged = merge_documents(&stored, &d.to_document(), None).unwrap();
        assert_eq!(merged["conversation_count"], json!(7));
        assert_eq!(merged["api_call_count"], json!(5));
        let ssu = &merged["shared_service_usage"];
        assert_eq!(ssu["custom"], json!("kept"));
        assert_eq!(ssu["total_calls"], json!(5));
        assert_eq!(ssu["successful_calls"], json!(4));
        assert_eq!(ssu["failed_calls"], json!(1));
        assert_eq!(ssu["tokens_used"], json!(130));
        assert_eq!(ssu["estimated_cost"].to_string(), "0.15");
        assert_eq!(ssu["keys_used"], json!(["k1", "k2"]));
        assert_eq!(ssu["by_model"]["m2"]["calls"], json!(3));
        assert_eq!(ssu["by_model"]["m1"]["calls"], json!(2));
        // An older call does not move last_api_call_at back.
        assert_eq!(merged["last_api_call_at"], json!("2026-01-15T11:45:00Z"));
    }

    #[test]
    fn money_is_exact_over_a_thousand_additions() {
        let mut stored = json!({});
        for _ in 0..1000 {
            let mut d = DayDelta::default();
            d.apply(&row(None, None, 1, 1, 0, "0.1", T0), false);
            stored = merge_documents(&stored, &d.to_document(), None).unwrap();
        }
        assert_eq!(
            stored["shared_service_usage"]["estimated_cost"].to_string(),
            "100.0"
        );
        assert_eq!(stored["api_call_count"], json!(1000));
    }

    #[test]
    fn large_costs_stay_in_plain_notation() {
        let mut d = DayDelta::default();
        d.apply(
            &row(None, None, 1, 1, 0, "12345678901234567890.123456789", T0),
            false,
        );
        d.apply(&row(None, None, 1, 1, 0, "0.000000001", T0), false);
        assert_eq!(
            d.to_document()["shared_service_usage"]["estimated_cost"].to_string(),
            "12345678901234567890.123456790"
        );
    }

    #[test]
    fn removal_drops_empty_cells_and_keys_and_corrects_last_call() {
        let mut add = DayDelta::default();
        add.apply(&row(Some("m1"), Some("k1"), 1, 1, 10, "0.5", T0), false);
        add.apply(
            &row(Some("m2"), Some("k2"), 1, 0, 20, "0.25", T0 + 60_000_000),
            false,
        );
        let stored =
            merge_documents(&json!({"upload_count": 1}), &add.to_document(), None).unwrap();

        let mut del = DayDelta::default();
        del.apply(
            &row(Some("m2"), Some("k2"), 1, 0, 20, "0.25", T0 + 60_000_000),
            true,
        );
        assert!(del.has_removals());
        let corrected = merge_documents(
            &stored,
            &del.to_document(),
            Some(Correction {
                removed_last_at: T0 + 60_000_000,
                detail_last_at: Some(T0),
            }),
        )
        .unwrap();
        // 0.5 + 0.25 - 0.25 keeps numeric's scale, as sum() over the detail does.
        let expected: Value = serde_json::from_str(
            r#"{
                "upload_count": 1,
                "api_call_count": 1,
                "shared_service_usage": {
                    "total_calls": 1, "successful_calls": 1, "failed_calls": 0,
                    "tokens_used": 10, "estimated_cost": 0.50,
                    "keys_used": ["k1"],
                    "by_model": {"m1": {"calls": 1, "tokens": 10, "cost": 0.5}},
                    "by_key": {"k1": {"calls": 1, "tokens": 10, "cost": 0.5}}
                },
                "last_api_call_at": "2026-01-15T11:45:00Z"
            }"#,
        )
        .unwrap();
        assert_eq!(corrected, expected);
        assert_eq!(
            corrected["shared_service_usage"]["estimated_cost"].to_string(),
            "0.50"
        );
    }

    #[test]
    fn correction_keeps_a_newer_stored_last_call() {
        let stored = json!({"last_api_call_at": "2026-01-15T12:00:00Z"});
        let mut del = DayDelta::default();
        del.apply(&row(None, None, 1, 1, 0, "0", T0), true);
        let out = merge_documents(
            &stored,
            &del.to_document(),
            Some(Correction {
                removed_last_at: T0,
                detail_last_at: None,
            }),
        )
        .unwrap();
        assert_eq!(out["last_api_call_at"], json!("2026-01-15T12:00:00Z"));
    }

    #[test]
    fn update_of_an_ignored_column_is_a_noop() {
        let r = row(Some("m"), Some("k"), 1, 1, 5, "0.2", T0);
        let grouped = group_rows(&vec![(1, r.clone(), true), (1, r, false)]);
        assert!(grouped[&1].is_noop());
        let mut moved = DayDelta::default();
        moved.apply(&row(Some("m"), None, 1, 1, 5, "0.2", T0), true);
        moved.apply(&row(Some("m"), None, 1, 1, 5, "0.3", T0), false);
        assert!(!moved.is_noop());
    }

    #[test]
    fn corrupted_owned_fields_are_reported_with_their_path() {
        let d = DayDelta::default().to_document();
        let err = merge_documents(&json!({"api_call_count": "abc"}), &d, None).unwrap_err();
        assert_eq!(err.field, "api_call_count");
        assert_eq!(err.found, "\"abc\"");
        let err = merge_documents(&json!({"api_call_count": 1.5}), &d, None).unwrap_err();
        assert_eq!(err.expected, "an integer");
        let err = merge_documents(&json!([1]), &d, None).unwrap_err();
        assert_eq!(err.field, "log_data");
        let err = merge_documents(&json!({"shared_service_usage": {"keys_used": 3}}), &d, None)
            .unwrap_err();
        assert_eq!(err.field, "shared_service_usage.keys_used");
        let err = merge_documents(&json!({"last_api_call_at": "yesterday"}), &d, None).unwrap_err();
        assert_eq!(err.field, "last_api_call_at");
    }

    #[test]
    fn rollup_adds_days_into_a_month_and_sums_application_counters() {
        let day1 = json!({
            "api_call_count": 2,
            "shared_service_usage": {"total_calls": 2, "successful_calls": 1, "failed_calls": 1,
                "tokens_used": 30, "estimated_cost": 0.10, "keys_used": ["k1"],
                "by_model": {"m": {"calls": 2, "tokens": 30, "cost": 0.10}},
                "by_key": {"k1": {"calls": 2, "tokens": 30, "cost": 0.10}}},
            "last_api_call_at": "2026-01-01T10:00:00Z",
            "conversation_count": 3, "theme": "dark"
        });
        let day2 = json!({
            "api_call_count": 1,
            "shared_service_usage": {"total_calls": 1, "successful_calls": 1, "failed_calls": 0,
                "tokens_used": 5, "estimated_cost": 0.20, "keys_used": ["k2"],
                "by_model": {"m": {"calls": 1, "tokens": 5, "cost": 0.20}},
                "by_key": {"k2": {"calls": 1, "tokens": 5, "cost": 0.20}}},
            "last_api_call_at": "2026-01-02T09:00:00Z",
            "conversation_count": 4, "upload_count": 1, "theme": "light"
        });
        let month = rollup_documents(&json!({}), &day1).unwrap();
        let month = rollup_documents(&month, &day2).unwrap();
        assert_eq!(
            month,
            json!({
                "api_call_count": 3,
                "shared_service_usage": {"total_calls": 3, "successful_calls": 2, "failed_calls": 1,
                    "tokens_used": 35, "estimated_cost": 0.30, "keys_used": ["k1", "k2"],
                    "by_model": {"m": {"calls": 3, "tokens": 35, "cost": 0.30}},
                    "by_key": {"k1": {"calls": 2, "tokens": 30, "cost": 0.10},
                               "k2": {"calls": 1, "tokens": 5, "cost": 0.20}}},
                "last_api_call_at": "2026-01-02T09:00:00Z",
                "conversation_count": 7, "theme": "light", "upload_count": 1
            })
        );
        // Written as text, costs keep their digits: 0.10 + 0.20 is 0.30, not 0.3.
        let day: Value = serde_json::from_str(
            r#"{"shared_service_usage": {"estimated_cost": 0.10, "total_calls": 1}}"#,
        )
        .unwrap();
        let twice = rollup_documents(&day, &day).unwrap();
        assert_eq!(
            twice["shared_service_usage"]["estimated_cost"].to_string(),
            "0.20"
        );
    }

    #[test]
    fn rollup_rejects_a_day_that_is_not_an_object() {
        let err = rollup_documents(&json!({}), &json!([1])).unwrap_err();
        assert_eq!(err.field, "log_data");
    }

    #[test]
    fn presence_changes_name_the_keys_gained_and_lost() {
        let before = Presence::of(&json!({
            "api_call_count": 2,
            "shared_service_usage": {"by_key": {"k1": {"calls": 1}, "k2": {"calls": 1}}}
        }));
        assert_eq!(before.keys, vec!["k1".to_string(), "k2".to_string()]);
        let after = Presence::of(&json!({
            "api_call_count": 2,
            "shared_service_usage": {"by_key": {"k2": {"calls": 1}, "k3": {"calls": 1}}}
        }));
        assert_eq!(
            after.changes_from(&before),
            (0, vec![("k3".to_string(), 1), ("k1".to_string(), -1)])
        );
        let empty = Presence::of(&json!({"api_call_count": 0}));
        assert_eq!(empty.changes_from(&after).0, -1);
        assert_eq!(after.changes_from(&Presence::default()).0, 1);
        // Not what the fold writes: absent.
        assert_eq!(Presence::of(&json!([1])), Presence::default());
        // Only the keys a delta names.
        let delta =
            json!({"shared_service_usage": {"by_key": {"k2": {"calls": 1}, "k9": {"calls": 1}}}});
        let doc = json!({"api_call_count": 2,
                         "shared_service_usage": {"by_key": {"k1": {"calls": 1}, "k2": {"calls": 1}}}});
        assert_eq!(
            Presence::within(&doc, &delta),
            Presence {
                active: true,
                keys: vec!["k2".to_string()]
            }
        );
    }

    #[test]
    fn pg_days_format_as_iso_dates() {
        assert_eq!(pg_days_to_iso(0), "2000-01-01");
        assert_eq!(pg_days_to_iso(9820), "2026-11-20");
        assert_eq!(pg_days_to_iso(-1), "1999-12-31");
    }

    #[test]
    fn timestamps_round_trip_in_the_canonical_form() {
        assert_eq!(format_micros(T0), "2026-01-15T11:45:00Z");
        assert_eq!(format_micros(T0 + 5), "2026-01-15T11:45:00.000005Z");
        assert_eq!(parse_timestamp_micros("2026-01-15T11:45:00Z"), Some(T0));
        assert_eq!(parse_timestamp_micros("2026-01-15 19:45:00+08"), Some(T0));
        assert_eq!(
            parse_timestamp_micros("2026-01-15T11:45:00.000005+00:00"),
            Some(T0 + 5)
        );
        assert_eq!(parse_timestamp_micros("nope"), None);
    }
}
