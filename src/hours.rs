//! The hourly tier (`sql/hourly.sql`): `hourly_logs` per (user, business hour)
//! and `key_hourly_logs` per (shared key, business hour).
//!
//! The fold's groups are split by hour (see `grouping` and the SQL groupings in
//! `fold`), so each lies in one hour: its newest call's. Their calls are added
//! up per (user, hour) and (key, hour) here. A user's hours are written in the
//! transaction that writes the user's day rows, after them: whoever writes a
//! user's hour holds that user's day row, so these rows add no lock order of
//! their own. A key's hours are as hot as its day rows and are written the same
//! way: by applies only, from the calls they apply and from
//! `pending_key_hour_deltas`, which statements that fold their own calls append
//! to. The counters are plain sums, so deltas fold in any order.

use std::collections::BTreeMap;

use bigdecimal::BigDecimal;
use pgrx::spi::SpiClient;
use pgrx::Uuid;

use crate::fold::{Group, Skipped};
use crate::logdata::GroupRow;
use crate::plans::{kept_statement, Sql};

const MICROS_PER_HOUR: i64 = 3_600_000_000;

/// The start of the business hour of `at`, given `local`, the same instant's
/// wall-clock time in the business time zone (both in microseconds). An
/// instant, not a local time: the two 01:00s of a fall-back night differ.
/// `_hour_start` in `sql/hourly.sql` computes the same.
pub fn hour_start(at: i64, local: i64) -> i64 {
    at - local.rem_euclid(MICROS_PER_HOUR)
}

/// The net change to one hour's counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HourDelta {
    pub calls: i64,
    pub successful: i64,
    pub tokens: i64,
    pub cost: BigDecimal,
}

impl HourDelta {
    fn apply(&mut self, row: &GroupRow, removed: bool) {
        let sign = if removed { -1 } else { 1 };
        self.calls += sign * row.calls;
        self.successful += sign * row.successful;
        self.tokens += sign * row.tokens;
        if removed {
            self.cost -= &row.cost;
        } else {
            self.cost += &row.cost;
        }
    }

    fn add(&mut self, other: &HourDelta) {
        self.calls += other.calls;
        self.successful += other.successful;
        self.tokens += other.tokens;
        self.cost += &other.cost;
    }

    fn is_zero(&self) -> bool {
        self.calls == 0
            && self.successful == 0
            && self.tokens == 0
            && self.cost == BigDecimal::default()
    }
}

/// The hourly deltas of one statement or one apply; hours as the Unix
/// microseconds they start at.
#[derive(Debug, Default)]
pub struct Hours {
    pub users: BTreeMap<(Uuid, i64), HourDelta>,
    pub keys: BTreeMap<(String, i64), HourDelta>,
}

impl Hours {
    /// The hours of `groups`, leaving out the (user, day)s a write skipped
    /// (their calls stay pending). `hour_of` maps a call's time to the start of
    /// its business hour (Unix microseconds both).
    pub fn of(groups: &[Group], skipped: &[Skipped], mut hour_of: impl FnMut(i64) -> i64) -> Hours {
        let mut out = Hours::default();
        for ((user, day), row, removed) in groups {
            if skipped.iter().any(|s| s.key == (*user, *day)) {
                continue;
            }
            // Every group carries its newest call (see fold::group_of, grouping).
            let at = row
                .last_at_micros
                .expect("a group of calls knows its newest call");
            let hour = hour_of(at);
            out.users
                .entry((*user, hour))
                .or_default()
                .apply(row, *removed);
            if let Some(key) = &row.key {
                out.keys
                    .entry((key.clone(), hour))
                    .or_default()
                    .apply(row, *removed);
            }
        }
        out.users.retain(|_, d| !d.is_zero());
        out.keys.retain(|_, d| !d.is_zero());
        out
    }

    pub fn add_key(&mut self, key: String, hour: i64, delta: &HourDelta) {
        self.keys.entry((key, hour)).or_default().add(delta);
    }
}

/// The columns of an hourly upsert or append, in the order the statements
/// below take them.
struct Columns<K> {
    ids: Vec<K>,
    hours: Vec<i64>,
    calls: Vec<i64>,
    successful: Vec<i64>,
    tokens: Vec<i64>,
    costs: Vec<String>,
}

impl<K: Clone> Columns<K> {
    fn of(map: &BTreeMap<(K, i64), HourDelta>) -> Columns<K> {
        let n = map.len();
        let mut c = Columns {
            ids: Vec::with_capacity(n),
            hours: Vec::with_capacity(n),
            calls: Vec::with_capacity(n),
            successful: Vec::with_capacity(n),
            tokens: Vec::with_capacity(n),
            costs: Vec::with_capacity(n),
        };
        for ((id, hour), d) in map {
            c.ids.push(id.clone());
            c.hours.push(*hour);
            c.calls.push(d.calls);
            c.successful.push(d.successful);
            c.tokens.push(d.tokens);
            c.costs.push(d.cost.to_string());
        }
        c
    }
}

/// The rows of an hourly statement: ids (an array of `id_array`), hours (Unix
/// microseconds), counters; the columns of [`Columns`].
fn hour_rows(id_array: &str) -> String {
    // `id_array` is a constant of this module.
    format!(
        "ROWS FROM (pg_catalog.unnest($1::{id_array}), pg_catalog.unnest($2::int8[]),
                    pg_catalog.unnest($3::int8[]), pg_catalog.unnest($4::int8[]),
                    pg_catalog.unnest($5::int8[]), pg_catalog.unnest($6::text[]))
         WITH ORDINALITY AS u(id, hour, calls, ok, tokens, cost, ord)"
    )
}

/// The ON CONFLICT arm of every hourly upsert (the stored row is `h`).
const ADD_COUNTERS: &str = "SET calls = h.calls + EXCLUDED.calls,
                successful = h.successful + EXCLUDED.successful,
                tokens = h.tokens + EXCLUDED.tokens,
                cost = h.cost + EXCLUDED.cost,
                last_modified = EXCLUDED.last_modified";

/// The start of hour `u.hour` (Unix microseconds) as a timestamptz.
const HOUR_VALUE: &str = "TIMESTAMPTZ 'epoch' + u.hour * INTERVAL '1 microsecond'";

fn upsert_query(table: &str, id_column: &str, id_array: &str) -> String {
    // `table`, `id_column` and `id_array` are constants of this module.
    format!(
        "INSERT INTO usage_agg.{table} AS h ({id_column}, hour, calls, successful, tokens, cost, last_modified)
         SELECT u.id::uuid, {HOUR_VALUE}, u.calls, u.ok, u.tokens, u.cost::numeric, pg_catalog.now()
           FROM {rows}
          ORDER BY u.ord
         ON CONFLICT ({id_column}, hour) DO UPDATE {ADD_COUNTERS}",
        rows = hour_rows(id_array)
    )
}

kept_statement! {
    /// A user's hours, in (user, hour) order.
    UPSERT_USER_HOURS {
        what: "writing hourly rows",
        sql: Sql::Built(|| upsert_query("hourly_logs", "user_id", "uuid[]")),
        args: [UUIDARRAYOID, INT8ARRAYOID, INT8ARRAYOID, INT8ARRAYOID, INT8ARRAYOID, TEXTARRAYOID],
        mutating: true,
    }
}

kept_statement! {
    /// One user hour, the common case (no arrays to build and unnest).
    UPSERT_USER_HOUR {
        what: "writing an hourly row",
        sql: Sql::Built(|| format!(
            "INSERT INTO usage_agg.hourly_logs AS h (user_id, hour, calls, successful, tokens, cost, last_modified)
             VALUES ($1, TIMESTAMPTZ 'epoch' + $2 * INTERVAL '1 microsecond', $3, $4, $5, $6::numeric, pg_catalog.now())
             ON CONFLICT (user_id, hour) DO UPDATE {ADD_COUNTERS}"
        )),
        args: [UUIDOID, INT8OID, INT8OID, INT8OID, INT8OID, TEXTOID],
        mutating: true,
    }
}

kept_statement! {
    /// A key's hours (applies only), in (key, hour) order.
    UPSERT_KEY_HOURS {
        what: "writing per-key hourly rows",
        sql: Sql::Built(|| upsert_query("key_hourly_logs", "shared_key_id", "text[]")),
        args: [TEXTARRAYOID, INT8ARRAYOID, INT8ARRAYOID, INT8ARRAYOID, INT8ARRAYOID, TEXTARRAYOID],
        mutating: true,
    }
}

kept_statement! {
    /// A statement's per-key hourly deltas, for the next apply.
    APPEND_KEY_HOUR_PENDING {
        what: "appending per-key hourly deltas",
        sql: Sql::Built(|| format!(
            "INSERT INTO usage_agg.pending_key_hour_deltas (shared_key_id, hour, calls, successful, tokens, cost)
             SELECT u.id::uuid, {HOUR_VALUE}, u.calls, u.ok, u.tokens, u.cost::numeric
               FROM {}",
            hour_rows("text[]")
        )),
        args: [TEXTARRAYOID, INT8ARRAYOID, INT8ARRAYOID, INT8ARRAYOID, INT8ARRAYOID, TEXTARRAYOID],
        mutating: true,
    }
}

kept_statement! {
    /// Takes up to $1 pending per-key hourly deltas that no other apply is
    /// taking, summed per (key, hour).
    TAKE_KEY_HOUR_PENDING {
        what: "taking pending per-key hourly deltas",
        sql: Sql::Text("
            WITH taken AS (
                DELETE FROM usage_agg.pending_key_hour_deltas d
                 WHERE d.ctid = ANY (ARRAY(
                       SELECT q.ctid FROM usage_agg.pending_key_hour_deltas q
                        LIMIT $1 FOR UPDATE OF q SKIP LOCKED))
             RETURNING d.*)
            SELECT t.shared_key_id::text, (extract(epoch FROM t.hour) * 1000000)::int8,
                   sum(t.calls)::int8, sum(t.successful)::int8, sum(t.tokens)::int8, sum(t.cost)::text
              FROM taken t GROUP BY 1, 2"),
        args: [INT4OID],
        mutating: true,
    }
}

fn write_user_hours(client: &SpiClient<'_>, hours: &Hours) {
    if hours.users.len() == 1 {
        let ((user, hour), d) = hours.users.iter().next().expect("one hour");
        UPSERT_USER_HOUR.run(
            client,
            &[
                (*user).into(),
                (*hour).into(),
                d.calls.into(),
                d.successful.into(),
                d.tokens.into(),
                d.cost.to_string().into(),
            ],
        );
    } else {
        run_hours(client, &UPSERT_USER_HOURS, &hours.users);
    }
}

/// Runs an hourly statement over `map`'s rows (nothing when empty).
fn run_hours<K: Clone>(
    client: &SpiClient<'_>,
    statement: &'static crate::plans::KeptStatement,
    map: &BTreeMap<(K, i64), HourDelta>,
) where
    Vec<K>: pgrx::IntoDatum,
{
    if map.is_empty() {
        return;
    }
    let c = Columns::of(map);
    statement.run(
        client,
        &[
            c.ids.into(),
            c.hours.into(),
            c.calls.into(),
            c.successful.into(),
            c.tokens.into(),
            c.costs.into(),
        ],
    );
}

/// Whether folds maintain the hourly tier (and its per-key half).
fn enabled() -> (bool, bool) {
    let hourly = crate::settings::hourly_aggregates();
    (hourly, hourly && crate::settings::per_key_aggregates())
}

/// The start of the business hour (Unix microseconds) of each call time.
fn clock(timezone: &str) -> impl FnMut(i64) -> i64 {
    use crate::grouping::{BusinessDays, PG_EPOCH_OFFSET_MICROS};
    let mut days = BusinessDays::new(timezone);
    move |at| days.hour_of(at - PG_EPOCH_OFFSET_MICROS) + PG_EPOCH_OFFSET_MICROS
}

/// A statement that folded its own calls: the users' hours now, the keys'
/// hours for the next apply.
pub fn write_folded(client: &SpiClient<'_>, groups: &[Group], skipped: &[Skipped], timezone: &str) {
    let (hourly, per_key) = enabled();
    if !hourly {
        return;
    }
    let hours = Hours::of(groups, skipped, clock(timezone));
    write_user_hours(client, &hours);
    if per_key {
        run_hours(client, &APPEND_KEY_HOUR_PENDING, &hours.keys);
    }
}

/// An apply: the users' and keys' hours of the calls it applied, and up to
/// `max_rows` per-key hourly deltas statements left for it.
pub fn write_applied(
    client: &SpiClient<'_>,
    groups: &[Group],
    skipped: &[Skipped],
    timezone: &str,
    max_rows: i32,
) {
    let (hourly, per_key) = enabled();
    if !hourly {
        return;
    }
    let mut hours = Hours::of(groups, skipped, clock(timezone));
    write_user_hours(client, &hours);
    if !per_key {
        return;
    }
    for row in TAKE_KEY_HOUR_PENDING.run(client, &[max_rows.into()]) {
        let fail = |e: String| -> ! {
            crate::errors::internal("reading pending per-key hourly deltas", e)
        };
        let int = |i: usize| -> i64 {
            row.get::<i64>(i)
                .unwrap_or_else(|e| fail(e.to_string()))
                .unwrap_or_else(|| fail(format!("column {i} is NULL")))
        };
        let key = row
            .get::<String>(1)
            .unwrap_or_else(|e| fail(e.to_string()))
            .unwrap_or_else(|| fail("shared_key_id is NULL".into()));
        let cost: String = row
            .get::<String>(6)
            .unwrap_or_else(|e| fail(e.to_string()))
            .unwrap_or_else(|| "0".into());
        let delta = HourDelta {
            calls: int(3),
            successful: int(4),
            tokens: int(5),
            cost: cost
                .parse()
                .unwrap_or_else(|e: bigdecimal::ParseBigDecimalError| fail(e.to_string())),
        };
        hours.add_key(key, int(2), &delta);
    }
    hours.keys.retain(|_, d| !d.is_zero());
    run_hours(client, &UPSERT_KEY_HOURS, &hours.keys);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logdata::GroupRow;
    use std::str::FromStr;

    const HOUR: i64 = MICROS_PER_HOUR;

    fn row(key: Option<&str>, calls: i64, ok: i64, tokens: i64, cost: &str, at: i64) -> GroupRow {
        GroupRow {
            model: None,
            key: key.map(str::to_string),
            calls,
            successful: ok,
            tokens,
            cost: BigDecimal::from_str(cost).unwrap(),
            last_at_micros: Some(at),
            last_failure_micros: None,
            absorbed: false,
            kinds: Default::default(),
        }
    }

    #[test]
    fn hour_start_keeps_both_fall_back_hours_apart() {
        // America/New_York, 2026-11-01: 05:30Z is 01:30 EDT (-4), 06:30Z is 01:30 EST (-5).
        let first = 5 * HOUR + HOUR / 2;
        let second = 6 * HOUR + HOUR / 2;
        let local = |at: i64, offset_hours: i64| at + offset_hours * HOUR;
        assert_eq!(hour_start(first, local(first, -4)), 5 * HOUR);
        assert_eq!(hour_start(second, local(second, -5)), 6 * HOUR);
    }

    #[test]
    fn hour_start_follows_half_hour_zones_and_times_before_the_epoch() {
        // Asia/Kolkata (+05:30): 08:45Z is 14:15 local; that hour began at 08:30Z.
        let at = 8 * HOUR + 45 * 60_000_000;
        assert_eq!(
            hour_start(at, at + 5 * HOUR + HOUR / 2),
            8 * HOUR + HOUR / 2
        );
        // Negative times round down, not towards zero.
        assert_eq!(hour_start(-1, -1), -HOUR);
    }

    #[test]
    fn groups_add_up_per_user_hour_and_key_hour_with_removals_subtracted() {
        let user = Uuid::from_bytes([1; 16]);
        let other = Uuid::from_bytes([2; 16]);
        let key = "00000000-0000-0000-0000-00000000000a";
        let groups: Vec<Group> = vec![
            ((user, 0), row(Some(key), 3, 2, 30, "0.30", 10), false),
            ((user, 0), row(None, 1, 1, 5, "0.05", HOUR + 1), false),
            ((user, 0), row(Some(key), 1, 0, 10, "0.10", 20), true),
            ((other, 0), row(Some(key), 2, 2, 4, "1", 30), false),
        ];
        let hours = Hours::of(&groups, &[], |at| at - at.rem_euclid(HOUR));
        let delta = |calls, successful, tokens, cost: &str| HourDelta {
            calls,
            successful,
            tokens,
            cost: BigDecimal::from_str(cost).unwrap(),
        };
        assert_eq!(hours.users.len(), 3);
        assert_eq!(hours.users[&(user, 0)], delta(2, 2, 20, "0.20"));
        assert_eq!(hours.users[&(user, HOUR)], delta(1, 1, 5, "0.05"));
        assert_eq!(hours.users[&(other, 0)], delta(2, 2, 4, "1"));
        assert_eq!(hours.keys.len(), 1);
        assert_eq!(hours.keys[&(key.to_string(), 0)], delta(4, 4, 24, "1.20"));
    }

    #[test]
    fn a_call_moved_within_its_hour_leaves_nothing_to_write() {
        let user = Uuid::from_bytes([1; 16]);
        let groups: Vec<Group> = vec![
            ((user, 0), row(None, 1, 1, 7, "0.7", 10), true),
            ((user, 0), row(None, 1, 1, 7, "0.70", 20), false),
        ];
        let hours = Hours::of(&groups, &[], |at| at - at.rem_euclid(HOUR));
        assert!(hours.users.is_empty());
    }
}
