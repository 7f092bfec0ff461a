//! Pure folding logic for the per-key and service documents: `log_data` of
//! `key_daily_logs`, `key_monthly_logs`, `service_daily_logs` and
//! `service_monthly_logs`.
//!
//! A day's document (the layout README documents):
//! `{"total_calls", "successful_calls", "failed_calls", "tokens_used",
//! "estimated_cost", "users", "by_model": {model: {"calls", "failed", "tokens",
//! "cost"}}, "last_call_at", "last_failure_at"}`, with the sparse counters of
//! `logdata::KIND_FIELDS` (tokens by kind, unpriced calls) beside the totals
//! and in the model cells while they are not zero. A month's has no `users`
//! (distinct users over a month are not additive). The whole document belongs to
//! usage_agg; applications keep theirs in the user documents.
//!
//! Deltas come from grouped calls (`GroupRow`s) and from the user fold's
//! [`Presence`](crate::logdata::Presence) changes (users). Counters may go
//! negative inside a delta (corrections); a stored document may be briefly below
//! its detail while a correction's delta waits, which readers never see because
//! they add pending deltas in.

use std::collections::BTreeMap;

use bigdecimal::{BigDecimal, Zero};
use serde_json::{Map, Value};

use crate::logdata::{
    add_kinds, add_kinds_of, add_number, corrupt, decimal_json, format_micros, max_opt,
    parse_timestamp_micros, CorruptField, GroupRow, Kinds, KIND_FIELDS,
};

pub const TOTAL_CALLS: &str = "total_calls";
pub const SUCCESSFUL_CALLS: &str = "successful_calls";
pub const FAILED_CALLS: &str = "failed_calls";
pub const TOKENS_USED: &str = "tokens_used";
pub const ESTIMATED_COST: &str = "estimated_cost";
pub const USERS: &str = "users";
pub const BY_MODEL: &str = "by_model";
pub const LAST_CALL_AT: &str = "last_call_at";
pub const LAST_FAILURE_AT: &str = "last_failure_at";

const COUNTERS: [&str; 5] = [
    TOTAL_CALLS,
    SUCCESSFUL_CALLS,
    FAILED_CALLS,
    TOKENS_USED,
    USERS,
];
const CELL_FIELDS: [(&str, bool); 4] = [
    ("calls", true),
    ("failed", true),
    ("tokens", true),
    ("cost", false),
];

/// Calls, failures, tokens and cost of one model within a key's (or the
/// service's) day.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelCell {
    pub calls: i64,
    pub failed: i64,
    pub tokens: i64,
    pub cost: BigDecimal,
    pub kinds: Kinds,
}

impl ModelCell {
    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("calls".into(), Value::from(self.calls));
        m.insert("failed".into(), Value::from(self.failed));
        m.insert("tokens".into(), Value::from(self.tokens));
        m.insert("cost".into(), decimal_json(&self.cost));
        self.kinds.write(&mut m);
        Value::Object(m)
    }
}

/// The net change to one key's (or the service's) day.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RollupDelta {
    pub calls: i64,
    pub successful: i64,
    pub tokens: i64,
    pub cost: BigDecimal,
    pub kinds: Kinds,
    pub users: i64,
    pub by_model: BTreeMap<String, ModelCell>,
    /// Newest call (and failed call) added.
    pub added_last_at: Option<i64>,
    pub added_last_failure_at: Option<i64>,
    /// Newest call (and failed call) removed, or taken into a correction: when
    /// the stored time is not newer, the detail decides (see [`correct_last`]).
    pub removed_last_at: Option<i64>,
    pub removed_last_failure_at: Option<i64>,
}

impl RollupDelta {
    /// Adds (`removed == false`) or subtracts one group of calls.
    pub fn apply(&mut self, row: &GroupRow, removed: bool) {
        let sign = if removed { -1 } else { 1 };
        let failed = row.calls - row.successful;
        self.calls += sign * row.calls;
        self.successful += sign * row.successful;
        self.tokens += sign * row.tokens;
        if removed {
            self.cost -= &row.cost;
        } else {
            self.cost += &row.cost;
        }
        self.kinds.add(&row.kinds, sign);
        if let Some(model) = &row.model {
            let cell = self.by_model.entry(model.clone()).or_default();
            cell.kinds.add(&row.kinds, sign);
            cell.calls += sign * row.calls;
            cell.failed += sign * failed;
            cell.tokens += sign * row.tokens;
            if removed {
                cell.cost -= &row.cost;
            } else {
                cell.cost += &row.cost;
            }
        }
        if removed || row.absorbed {
            self.removed_last_at = max_opt(self.removed_last_at, row.last_at_micros);
            self.removed_last_failure_at =
                max_opt(self.removed_last_failure_at, row.last_failure_micros);
        } else {
            self.added_last_at = max_opt(self.added_last_at, row.last_at_micros);
            self.added_last_failure_at =
                max_opt(self.added_last_failure_at, row.last_failure_micros);
        }
    }

    /// Adds another delta of the same day (pending deltas taken by the applier).
    pub fn add(&mut self, other: &RollupDelta) {
        self.calls += other.calls;
        self.successful += other.successful;
        self.tokens += other.tokens;
        self.cost += &other.cost;
        self.kinds.add(&other.kinds, 1);
        self.users += other.users;
        for (model, c) in &other.by_model {
            let cell = self.by_model.entry(model.clone()).or_default();
            cell.kinds.add(&c.kinds, 1);
            cell.calls += c.calls;
            cell.failed += c.failed;
            cell.tokens += c.tokens;
            cell.cost += &c.cost;
        }
        self.added_last_at = max_opt(self.added_last_at, other.added_last_at);
        self.added_last_failure_at =
            max_opt(self.added_last_failure_at, other.added_last_failure_at);
        self.removed_last_at = max_opt(self.removed_last_at, other.removed_last_at);
        self.removed_last_failure_at =
            max_opt(self.removed_last_failure_at, other.removed_last_failure_at);
    }

    pub fn has_removals(&self) -> bool {
        self.removed_last_at.is_some() || self.removed_last_failure_at.is_some()
    }

    /// Changes nothing (say an UPDATE of a column the fold ignores).
    pub fn is_noop(&self) -> bool {
        self.calls == 0
            && self.successful == 0
            && self.tokens == 0
            && self.cost.is_zero()
            && self.kinds.is_zero()
            && self.users == 0
            && self.by_model.values().all(|c| {
                c.calls == 0
                    && c.failed == 0
                    && c.tokens == 0
                    && c.cost.is_zero()
                    && c.kinds.is_zero()
            })
            && self.added_last_at.is_none()
            && self.added_last_failure_at.is_none()
    }

    /// The delta in the day layout (the removed times are passed separately).
    /// For additions only, exactly the document a new day row starts with.
    pub fn to_document(&self) -> Value {
        let mut doc = Map::new();
        doc.insert(TOTAL_CALLS.into(), Value::from(self.calls));
        doc.insert(SUCCESSFUL_CALLS.into(), Value::from(self.successful));
        doc.insert(
            FAILED_CALLS.into(),
            Value::from(self.calls - self.successful),
        );
        doc.insert(TOKENS_USED.into(), Value::from(self.tokens));
        doc.insert(ESTIMATED_COST.into(), decimal_json(&self.cost));
        self.kinds.write(&mut doc);
        doc.insert(USERS.into(), Value::from(self.users));
        doc.insert(
            BY_MODEL.into(),
            Value::Object(
                self.by_model
                    .iter()
                    .map(|(k, c)| (k.clone(), c.to_json()))
                    .collect(),
            ),
        );
        let time = |t: Option<i64>| t.map_or(Value::Null, |t| Value::String(format_micros(t)));
        doc.insert(LAST_CALL_AT.into(), time(self.added_last_at));
        doc.insert(LAST_FAILURE_AT.into(), time(self.added_last_failure_at));
        Value::Object(doc)
    }
}

impl RollupDelta {
    /// A delta document (as [`RollupDelta::to_document`] wrote it) read back,
    /// with the removed times stored beside it.
    pub fn from_document(
        doc: &Value,
        removed_last_at: Option<i64>,
        removed_last_failure_at: Option<i64>,
    ) -> Result<RollupDelta, CorruptField> {
        let Value::Object(map) = doc else {
            return Err(corrupt("delta", doc, "a JSON object"));
        };
        let int = |m: &Map<String, Value>, field: &str, path: &str| -> Result<i64, CorruptField> {
            match m.get(field) {
                None | Some(Value::Null) => Ok(0),
                Some(v @ Value::Number(n)) => {
                    n.as_i64().ok_or_else(|| corrupt(path, v, "an integer"))
                }
                Some(v) => Err(corrupt(path, v, "an integer")),
            }
        };
        let money = |m: &Map<String, Value>, path: &str| -> Result<BigDecimal, CorruptField> {
            crate::logdata::read_decimal(m.get("cost").or(m.get(ESTIMATED_COST)), path, false)
        };
        let mut delta = RollupDelta {
            calls: int(map, TOTAL_CALLS, TOTAL_CALLS)?,
            successful: int(map, SUCCESSFUL_CALLS, SUCCESSFUL_CALLS)?,
            tokens: int(map, TOKENS_USED, TOKENS_USED)?,
            cost: money(map, ESTIMATED_COST)?,
            users: int(map, USERS, USERS)?,
            kinds: Kinds::read(map, "")?,
            added_last_at: read_time(map, LAST_CALL_AT)?,
            added_last_failure_at: read_time(map, LAST_FAILURE_AT)?,
            removed_last_at,
            removed_last_failure_at,
            ..RollupDelta::default()
        };
        if let Some(Value::Object(cells)) = map.get(BY_MODEL) {
            for (model, cell) in cells {
                let path = format!("{BY_MODEL}.{model}");
                let Value::Object(cell) = cell else {
                    return Err(corrupt(&path, cell, "a JSON object"));
                };
                delta.by_model.insert(
                    model.clone(),
                    ModelCell {
                        calls: int(cell, "calls", &path)?,
                        failed: int(cell, "failed", &path)?,
                        tokens: int(cell, "tokens", &path)?,
                        cost: money(cell, &path)?,
                        kinds: Kinds::read(cell, &format!("{path}."))?,
                    },
                );
            }
        }
        Ok(delta)
    }
}

/// Reads a stored time field (missing or null: none).
fn read_time(doc: &Map<String, Value>, field: &str) -> Result<Option<i64>, CorruptField> {
    match doc.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_timestamp_micros(s)
            .map(Some)
            .ok_or_else(|| corrupt(field, &Value::String(s.clone()), "a timestamp")),
        Some(other) => Err(corrupt(field, other, "a timestamp string")),
    }
}

fn write_time(doc: &mut Map<String, Value>, field: &str, t: Option<i64>) {
    doc.insert(
        field.into(),
        t.map_or(Value::Null, |t| Value::String(format_micros(t))),
    );
}

/// Adds a delta document (or a day, when rolling days up into a month: then
/// `keep_users` is false and the month has no `users`) into a stored document.
/// A model cell whose four numbers all reach zero is dropped.
pub fn merge(stored: Value, delta: &Value, keep_users: bool) -> Result<Value, CorruptField> {
    let mut out = match stored {
        Value::Object(map) => map,
        other => return Err(corrupt("log_data", &other, "a JSON object")),
    };
    let Value::Object(delta) = delta else {
        return Err(corrupt("log_data", delta, "a JSON object"));
    };
    for counter in COUNTERS {
        if counter == USERS && !keep_users {
            out.remove(USERS);
            continue;
        }
        add_number(&mut out, counter, counter, delta.get(counter), true)?;
    }
    add_number(
        &mut out,
        ESTIMATED_COST,
        ESTIMATED_COST,
        delta.get(ESTIMATED_COST),
        false,
    )?;
    add_kinds_of(&mut out, delta, "")?;

    let mut cells = match out.remove(BY_MODEL) {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(other) => return Err(corrupt(BY_MODEL, &other, "a JSON object")),
    };
    match delta.get(BY_MODEL) {
        None | Some(Value::Null) => {}
        Some(Value::Object(delta_cells)) => {
            for (model, delta_cell) in delta_cells {
                let path = format!("{BY_MODEL}.{model}");
                let mut cell = match cells.remove(model) {
                    None | Some(Value::Null) => Map::new(),
                    Some(Value::Object(m)) => m,
                    Some(other) => return Err(corrupt(&path, &other, "a JSON object")),
                };
                for (field, integer) in CELL_FIELDS {
                    add_number(
                        &mut cell,
                        field,
                        &format!("{path}.{field}"),
                        delta_cell.get(field),
                        integer,
                    )?;
                }
                add_kinds(&mut cell, Some(delta_cell), &format!("{path}."))?;
                if !cell_is_zero(&cell) {
                    cells.insert(model.clone(), Value::Object(cell));
                }
            }
        }
        Some(other) => return Err(corrupt(BY_MODEL, other, "a JSON object")),
    }
    out.insert(BY_MODEL.into(), Value::Object(cells));

    for field in [LAST_CALL_AT, LAST_FAILURE_AT] {
        let stored = read_time(&out, field)?;
        let added = read_time(delta, field)?;
        write_time(&mut out, field, max_opt(stored, added));
    }
    Ok(Value::Object(out))
}

fn cell_is_zero(cell: &Map<String, Value>) -> bool {
    // add_kinds removes the sparse counters that reach zero.
    let no_kinds = KIND_FIELDS.iter().all(|f| !cell.contains_key(*f));
    no_kinds
        && CELL_FIELDS.iter().all(|(f, _)| match cell.get(*f) {
            Some(Value::Number(n)) => n.as_i64().map_or_else(
                || {
                    n.to_string()
                        .parse::<BigDecimal>()
                        .is_ok_and(|d| d.is_zero())
                },
                |i| i == 0,
            ),
            None | Some(Value::Null) => true,
            _ => false,
        })
}

/// After calls were removed: a stored time that is not newer than every
/// removed one may have been one of them, and becomes the newest of the detail
/// (read after the removal, None when no call is left). A newer stored time
/// belongs to a call that was not removed and stands.
pub fn correct_last(
    stored: Value,
    removed_last_at: Option<i64>,
    removed_last_failure_at: Option<i64>,
    detail_last_at: Option<i64>,
    detail_last_failure_at: Option<i64>,
) -> Result<Value, CorruptField> {
    let mut out = match stored {
        Value::Object(map) => map,
        other => return Err(corrupt("log_data", &other, "a JSON object")),
    };
    for (field, removed, detail) in [
        (LAST_CALL_AT, removed_last_at, detail_last_at),
        (
            LAST_FAILURE_AT,
            removed_last_failure_at,
            detail_last_failure_at,
        ),
    ] {
        if let Some(removed) = removed {
            if needs_detail(read_time(&out, field)?, Some(removed)) {
                write_time(&mut out, field, detail);
            }
        }
    }
    Ok(Value::Object(out))
}

/// Whether the stored time must be read again from the detail.
pub fn needs_detail(stored: Option<i64>, removed: Option<i64>) -> bool {
    match (stored, removed) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(s), Some(r)) => s <= r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::str::FromStr;

    const T0: i64 = 1_768_477_500_000_000; // 2026-01-15T11:45:00Z

    fn row(model: Option<&str>, calls: i64, ok: i64, tokens: i64, cost: &str, at: i64) -> GroupRow {
        GroupRow {
            model: model.map(String::from),
            key: Some("k".into()),
            calls,
            successful: ok,
            tokens,
            cost: BigDecimal::from_str(cost).unwrap(),
            last_at_micros: Some(at),
            last_failure_micros: (ok < calls).then_some(at),
            absorbed: false,
            kinds: Default::default(),
        }
    }

    #[test]
    fn kinds_and_unpriced_calls_are_sparse_in_key_documents() {
        let mut d = RollupDelta::default();
        d.apply(
            &GroupRow {
                kinds: Kinds::from_values([100, 20, 0, 0, 1]),
                ..row(Some("m"), 1, 1, 120, "0", T0)
            },
            false,
        );
        let doc = d.to_document();
        assert_eq!(doc["input_tokens"], json!(100));
        assert_eq!(doc.get("cache_read_tokens"), None);
        assert_eq!(
            doc["by_model"]["m"],
            json!({"calls": 1, "failed": 0, "tokens": 120, "cost": 0,
                   "input_tokens": 100, "output_tokens": 20, "unpriced_calls": 1})
        );
        // A pending delta read back is the same delta.
        let read = RollupDelta::from_document(&doc, None, None).unwrap();
        assert_eq!(read.kinds, d.kinds);
        assert_eq!(read.by_model["m"].kinds, d.by_model["m"].kinds);
        // Removed again: the counters and the cell go away.
        let stored = merge(json!({}), &doc, true).unwrap();
        let mut undo = RollupDelta::default();
        undo.apply(
            &GroupRow {
                kinds: Kinds::from_values([100, 20, 0, 0, 1]),
                ..row(Some("m"), 1, 1, 120, "0", T0)
            },
            true,
        );
        let back = merge(stored, &undo.to_document(), true).unwrap();
        assert_eq!(back.get("unpriced_calls"), None);
        assert_eq!(back["by_model"], json!({}));
    }

    #[test]
    fn first_calls_give_the_day_layout() {
        let mut d = RollupDelta::default();
        d.apply(&row(Some("gpt-4o"), 2, 1, 300, "0.02", T0), false);
        d.users = 1;
        assert_eq!(
            d.to_document(),
            json!({
                "total_calls": 2, "successful_calls": 1, "failed_calls": 1,
                "tokens_used": 300, "estimated_cost": 0.02, "users": 1,
                "by_model": {"gpt-4o": {"calls": 2, "failed": 1, "tokens": 300, "cost": 0.02}},
                "last_call_at": "2026-01-15T11:45:00Z",
                "last_failure_at": "2026-01-15T11:45:00Z"
            })
        );
    }

    #[test]
    fn merging_adds_and_drops_models_that_reach_zero() {
        let mut first = RollupDelta::default();
        first.apply(&row(Some("a"), 1, 1, 10, "0.10", T0), false);
        first.apply(&row(Some("b"), 1, 0, 5, "0.05", T0 + 1), false);
        first.users = 1;
        let stored = merge(json!({}), &first.to_document(), true).unwrap();

        let mut fix = RollupDelta::default();
        fix.apply(&row(Some("b"), 1, 0, 5, "0.05", T0 + 1), true);
        fix.users = -1;
        assert!(fix.has_removals());
        let merged = merge(stored, &fix.to_document(), true).unwrap();
        assert_eq!(merged["total_calls"], json!(1));
        assert_eq!(merged["failed_calls"], json!(0));
        assert_eq!(merged["users"], json!(0));
        assert_eq!(merged["estimated_cost"].to_string(), "0.10");
        assert_eq!(
            merged["by_model"].to_string(),
            r#"{"a":{"calls":1,"failed":0,"tokens":10,"cost":0.10}}"#
        );
        // Removals do not move the times here: correct_last does, from the detail.
        assert_eq!(
            merged["last_failure_at"],
            json!("2026-01-15T11:45:00.000001Z")
        );
        let corrected = correct_last(
            merged,
            fix.removed_last_at,
            fix.removed_last_failure_at,
            Some(T0),
            None,
        )
        .unwrap();
        assert_eq!(corrected["last_call_at"], json!("2026-01-15T11:45:00Z"));
        assert_eq!(corrected["last_failure_at"], Value::Null);
    }

    #[test]
    fn a_newer_stored_time_stands_after_a_removal() {
        let stored = json!({"last_call_at": "2026-01-15T12:00:00Z"});
        let out = correct_last(stored, Some(T0), None, None, None).unwrap();
        assert_eq!(out["last_call_at"], json!("2026-01-15T12:00:00Z"));
        assert!(needs_detail(None, Some(T0)));
        assert!(needs_detail(Some(T0), Some(T0)));
        assert!(!needs_detail(Some(T0 + 1), Some(T0)));
        assert!(!needs_detail(None, None));
    }

    #[test]
    fn absorbed_calls_send_the_times_to_the_detail() {
        let mut d = RollupDelta::default();
        let mut absorbed = row(None, 1, 1, 0, "0", T0);
        absorbed.absorbed = true;
        d.apply(&absorbed, false);
        assert_eq!(d.calls, 1);
        assert_eq!(d.added_last_at, None);
        assert_eq!(d.removed_last_at, Some(T0));
    }

    #[test]
    fn months_have_no_users_and_keep_exact_money() {
        let day: Value = serde_json::from_str(
            r#"{"total_calls": 1, "successful_calls": 1, "failed_calls": 0, "tokens_used": 1,
                "estimated_cost": 0.10, "users": 3, "by_model": {}, "last_call_at": null,
                "last_failure_at": null}"#,
        )
        .unwrap();
        let month = merge(json!({}), &day, false).unwrap();
        let month = merge(month, &day, false).unwrap();
        assert!(month.get("users").is_none());
        assert_eq!(month["estimated_cost"].to_string(), "0.20");
        assert_eq!(month["total_calls"], json!(2));
    }

    #[test]
    fn deltas_add_up() {
        let mut a = RollupDelta::default();
        a.apply(&row(Some("m"), 1, 1, 1, "1", T0), false);
        let mut b = RollupDelta::default();
        b.apply(&row(Some("m"), 1, 1, 1, "1", T0), true);
        b.users = -1;
        a.add(&b);
        assert_eq!(a.calls, 0);
        assert_eq!(a.users, -1);
        assert_eq!(a.by_model["m"].calls, 0);
        assert!(!a.is_noop());
        a.users = 0;
        a.added_last_at = None;
        assert!(a.is_noop());
    }

    #[test]
    fn a_delta_document_reads_back_as_the_delta() {
        let mut d = RollupDelta::default();
        d.apply(&row(Some("m"), 3, 1, 7, "0.000000001", T0), false);
        d.apply(&row(None, 1, 1, 1, "2", T0 + 5), true);
        d.users = 2;
        let back = RollupDelta::from_document(&d.to_document(), d.removed_last_at, None).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn corrupted_fields_are_named() {
        let err = merge(
            json!({"total_calls": "x"}),
            &RollupDelta::default().to_document(),
            true,
        )
        .unwrap_err();
        assert_eq!(err.field, "total_calls");
        let err = merge(
            json!({"by_model": 1}),
            &RollupDelta::default().to_document(),
            true,
        )
        .unwrap_err();
        assert_eq!(err.field, "by_model");
        let err = merge(
            json!({"last_call_at": "soon"}),
            &RollupDelta::default().to_document(),
            true,
        )
        .unwrap_err();
        assert_eq!(err.field, "last_call_at");
    }
}
