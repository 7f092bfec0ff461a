//! Deferred mode's append: a small statement's rows go into
//! `usage_agg.pending_deltas` by `heap_insert` and `index_insert`, without SPI.
//!
//! In a profile of single-row inserts in deferred mode, the fold's own work was
//! about 1% of CPU; the rest of its cost was running one prepared
//! `INSERT INTO pending_deltas` through SPI, and half of that was executor start
//! and end (plan tree, result relation, projection, permission checks) for one
//! row. Writing the tuple and its index entries directly skips that part.
//!
//! The executor also enforces what may have been added to the table since the
//! extension created it: triggers, row-level security, CHECK constraints, NOT
//! NULL on a nullable column, unique or partial or expression indexes, generated
//! columns, another table access method. [`append_rows`] writes only when the
//! table has none of these and its columns are exactly the extension's;
//! otherwise it writes nothing and the caller appends through SPI as before.

use pgrx::pg_sys;
use pgrx::spi::SpiClient;
use rustc_hash::FxHashMap;

use crate::errors;
use crate::fold::{Group, Key};
use crate::grouping;
use crate::logdata;
use crate::plans::{kept_statement, Sql};

/// The columns of pending_deltas, in order, as `sql/schema.sql` creates them:
/// (type, may be NULL).
const COLUMNS: [(pg_sys::Oid, bool); 16] = [
    (pg_sys::UUIDOID, false),        // user_id
    (pg_sys::DATEOID, false),        // day
    (pg_sys::TEXTOID, true),         // model_used
    (pg_sys::UUIDOID, true),         // shared_key_id
    (pg_sys::INT4OID, false),        // calls
    (pg_sys::INT4OID, false),        // successful
    (pg_sys::INT8OID, false),        // tokens
    (pg_sys::NUMERICOID, false),     // cost
    (pg_sys::TIMESTAMPTZOID, false), // last_at
    (pg_sys::TIMESTAMPTZOID, false), // appended_at
    (pg_sys::TIMESTAMPTZOID, true),  // last_failure_at
    (pg_sys::INT8OID, true),         // input_tokens
    (pg_sys::INT8OID, true),         // output_tokens
    (pg_sys::INT8OID, true),         // cache_read_tokens
    (pg_sys::INT8OID, true),         // cache_write_tokens
    (pg_sys::INT4OID, true),         // unpriced
];

/// An index of pending_deltas that `append_rows` maintains itself.
struct PlainIndex {
    relation: pg_sys::Relation,
    info: *mut pg_sys::IndexInfo,
}

/// Appends every row of this INSERT statement's NEW transition table to
/// pending_deltas, one row per call, as the SQL path would:
/// `(user_id, business day, model_used, shared_key_id, 1, success::int,
/// coalesce(tokens_used, 0), coalesce(cost_estimate, 0), created_at, now(),
/// created_at when the call failed, the four kinds, 1 when cost_estimate is
/// NULL)`; NULL stands for 0 in the last five (and costs no space).
/// Returns false, having written nothing, when pending_deltas is not the plain
/// table this writes correctly (see the module comment).
///
/// SAFETY: `data` is the TriggerData of a running AFTER ... FOR EACH STATEMENT
/// trigger on key_usage_logs with a NEW transition table.
pub unsafe fn append_rows(data: &pg_sys::TriggerData, timezone: &str) -> bool {
    let Some(relid) = pending_deltas_oid() else {
        return false;
    };
    // The same lock INSERT takes; kept until the end of the transaction. Checked
    // after locking, so that no ALTER TABLE can change the table in between.
    let relation = pg_sys::table_open(relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
    let Some(indexes) = plain_indexes(relation) else {
        pg_sys::table_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
        return false;
    };

    let mut days = grouping::BusinessDays::new(timezone);
    let zero_cost = crate::compat::zero_numeric();
    let descriptor = (*relation).rd_att;
    // appended_at: now(), the start of this transaction, as the column default.
    let appended_at = pg_sys::Datum::from(pg_sys::GetCurrentTransactionStartTimestamp());
    grouping::scan_new_rows(data.tg_newtable, (*data.tg_relation).rd_att, |row| {
        // uuid datums are pointers to their 16 bytes; heap_form_tuple copies.
        let mut values = [
            pg_sys::Datum::from(row.user.as_ptr()),
            pg_sys::Datum::from(days.of(row.at)),
            row.model.unwrap_or(pg_sys::Datum::from(0usize)),
            row.key.as_ref().map_or(pg_sys::Datum::from(0usize), |k| {
                pg_sys::Datum::from(k.as_ptr())
            }),
            pg_sys::Datum::from(1i32),
            pg_sys::Datum::from(i32::from(row.success)),
            pg_sys::Datum::from(i64::from(row.tokens.unwrap_or(0))),
            row.cost.unwrap_or(zero_cost),
            pg_sys::Datum::from(row.at),
            appended_at,
            pg_sys::Datum::from(row.at),
            pg_sys::Datum::from(i64::from(row.kinds[0].unwrap_or(0))),
            pg_sys::Datum::from(i64::from(row.kinds[1].unwrap_or(0))),
            pg_sys::Datum::from(i64::from(row.kinds[2].unwrap_or(0))),
            pg_sys::Datum::from(i64::from(row.kinds[3].unwrap_or(0))),
            pg_sys::Datum::from(1i32),
        ];
        let mut nulls = [false; COLUMNS.len()];
        nulls[2] = row.model.is_none();
        nulls[3] = row.key.is_none();
        nulls[10] = row.success;
        for (i, kind) in row.kinds.iter().enumerate() {
            nulls[11 + i] = kind.is_none_or(|n| n == 0);
        }
        nulls[15] = row.cost.is_some();
        let tuple = pg_sys::heap_form_tuple(descriptor, values.as_mut_ptr(), nulls.as_mut_ptr());
        // WAL, TOAST, visibility and the statistics counters, as INSERT does.
        pg_sys::simple_heap_insert(relation, tuple);
        for index in &indexes {
            insert_index_entry(index, relation, tuple, &values, &nulls);
        }
        pg_sys::heap_freetuple(tuple);
        true
    });

    for index in indexes {
        pg_sys::index_close(index.relation, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
    pg_sys::table_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
    true
}

/// SAFETY: `tuple` was just inserted into `relation`; `values`/`nulls` are its
/// columns.
unsafe fn insert_index_entry(
    index: &PlainIndex,
    relation: pg_sys::Relation,
    tuple: pg_sys::HeapTuple,
    values: &[pg_sys::Datum; COLUMNS.len()],
    nulls: &[bool; COLUMNS.len()],
) {
    let info = &*index.info;
    // Not ready: CREATE INDEX CONCURRENTLY has not reached this index yet.
    if !info.ii_ReadyForInserts {
        return;
    }
    let columns = info.ii_NumIndexAttrs as usize;
    let mut key_values = [pg_sys::Datum::from(0usize); pg_sys::INDEX_MAX_KEYS as usize];
    let mut key_nulls = [false; pg_sys::INDEX_MAX_KEYS as usize];
    for (i, attnum) in info.ii_IndexAttrNumbers[..columns].iter().enumerate() {
        // plain_indexes admits plain columns only (1-based, never 0).
        let column = (*attnum - 1) as usize;
        key_values[i] = values[column];
        key_nulls[i] = nulls[column];
    }
    crate::compat::index_insert_new_row(
        index.relation,
        key_values.as_mut_ptr(),
        key_nulls.as_mut_ptr(),
        &mut (*tuple).t_self,
        relation,
        pg_sys::IndexUniqueCheck::UNIQUE_CHECK_NO,
        index.info,
    );
}

/// usage_agg.pending_deltas, or None when there is no such table.
unsafe fn pending_deltas_oid() -> Option<pg_sys::Oid> {
    let schema = pg_sys::get_namespace_oid(c"usage_agg".as_ptr(), true);
    if schema == pg_sys::InvalidOid {
        return None;
    }
    let relid = pg_sys::get_relname_relid(c"pending_deltas".as_ptr(), schema);
    (relid != pg_sys::InvalidOid).then_some(relid)
}

/// The indexes of `relation` opened for insertion, when the table is exactly
/// what append_rows writes correctly; None otherwise (nothing left open).
///
/// SAFETY: `relation` is open and locked.
unsafe fn plain_indexes(relation: pg_sys::Relation) -> Option<Vec<PlainIndex>> {
    let form = &*(*relation).rd_rel;
    if form.relkind != pg_sys::RELKIND_RELATION as std::ffi::c_char
        || form.relam != pg_sys::HEAP_TABLE_AM_OID
        || form.relrowsecurity
        || !(*relation).trigdesc.is_null()
        || !columns_as_created((*relation).rd_att)
    {
        return None;
    }
    let list = pg_sys::RelationGetIndexList(relation);
    let mut indexes = Vec::new();
    let mut plain = true;
    if !list.is_null() {
        let list_ref = &*list;
        for i in 0..list_ref.length as usize {
            let oid = (*list_ref.elements.add(i)).oid_value;
            let index = pg_sys::index_open(oid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
            let info = pg_sys::BuildIndexInfo(index);
            indexes.push(PlainIndex {
                relation: index,
                info,
            });
            let info = &*info;
            let columns = &info.ii_IndexAttrNumbers[..info.ii_NumIndexAttrs as usize];
            if info.ii_Unique
                || !info.ii_Expressions.is_null()
                || !info.ii_Predicate.is_null()
                || !info.ii_ExclusionOps.is_null()
                || columns
                    .iter()
                    .any(|&a| a <= 0 || a as usize > COLUMNS.len())
            {
                plain = false;
                break;
            }
        }
        pg_sys::list_free(list);
    }
    if plain {
        return Some(indexes);
    }
    for index in indexes {
        pg_sys::index_close(index.relation, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
    }
    None
}

/// The columns are pending_deltas' own: same types in the same order, none
/// dropped or generated, no CHECK constraint, NOT NULL nowhere a NULL is written.
///
/// SAFETY: `descriptor` is a live tuple descriptor.
unsafe fn columns_as_created(descriptor: pg_sys::TupleDesc) -> bool {
    let d = &*descriptor;
    if d.natts as usize != COLUMNS.len() {
        return false;
    }
    if let Some(constr) = d.constr.as_ref() {
        if constr.num_check != 0 || constr.has_generated_stored {
            return false;
        }
    }
    COLUMNS
        .iter()
        .enumerate()
        .all(|(i, &(type_oid, nullable))| {
            let att = crate::compat::attribute(d, i);
            !att.attisdropped
                && att.atttypid == type_oid
                && att.attgenerated == 0
                && !(nullable && att.attnotnull)
        })
}

kept_statement! {
    /// Appends grouped calls (a bulk statement's groups, or calls the applier
    /// could not fold) to pending_deltas: one row per (user, day, model, key).
    /// Times are passed in the canonical text of `logdata::format_micros`.
    APPEND_GROUPS {
        what: "appending grouped calls to pending_deltas",
        sql: Sql::Text("
            INSERT INTO usage_agg.pending_deltas
                   (user_id, day, model_used, shared_key_id, calls, successful, tokens, cost, last_at, appended_at,
                    last_failure_at, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, unpriced)
            SELECT u.user_id, DATE '2000-01-01' + u.day, u.model, u.key::uuid, u.calls, u.ok, u.tokens,
                   u.cost::numeric, u.last_at::timestamptz, COALESCE(u.appended_at::timestamptz, pg_catalog.now()),
                   u.last_failure_at::timestamptz, NULLIF(x.k[1], 0), NULLIF(x.k[2], 0), NULLIF(x.k[3], 0),
                   NULLIF(x.k[4], 0), NULLIF(x.k[5], 0)::int4
              FROM ROWS FROM (pg_catalog.unnest($1::uuid[]), pg_catalog.unnest($2::int4[]),
                              pg_catalog.unnest($3::text[]), pg_catalog.unnest($4::text[]),
                              pg_catalog.unnest($5::int4[]), pg_catalog.unnest($6::int4[]),
                              pg_catalog.unnest($7::int8[]), pg_catalog.unnest($8::text[]),
                              pg_catalog.unnest($9::text[]), pg_catalog.unnest($10::text[]),
                              pg_catalog.unnest($11::text[]), pg_catalog.unnest($12::text[]))
                   AS u(user_id, day, model, key, calls, ok, tokens, cost, last_at, appended_at, last_failure_at,
                        kinds),
                   LATERAL (SELECT u.kinds::int8[] AS k) x"),
        args: [UUIDARRAYOID, INT4ARRAYOID, TEXTARRAYOID, TEXTARRAYOID, INT4ARRAYOID,
               INT4ARRAYOID, INT8ARRAYOID, TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID,
               TEXTARRAYOID],
        mutating: true,
    }
}

kept_statement! {
    /// Deferred appends through INSERT, where `append_rows` cannot write
    /// pending_deltas directly (triggers, constraints or indexes were added).
    APPEND_ROWS_SQL {
        what: "appending to pending_deltas",
        sql: Sql::Text("
            INSERT INTO usage_agg.pending_deltas
                   (user_id, day, model_used, shared_key_id, calls, successful, tokens, cost, last_at,
                    last_failure_at, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, unpriced)
            SELECT t.user_id, (t.created_at AT TIME ZONE $1)::date, t.model_used, t.shared_key_id,
                   1, CASE WHEN t.success THEN 1 ELSE 0 END,
                   COALESCE(t.tokens_used, 0), COALESCE(t.cost_estimate, 0), t.created_at,
                   CASE WHEN t.success THEN NULL ELSE t.created_at END,
                   NULLIF(t.input_tokens, 0), NULLIF(t.output_tokens, 0), NULLIF(t.cache_read_tokens, 0),
                   NULLIF(t.cache_write_tokens, 0), CASE WHEN t.cost_estimate IS NULL THEN 1 END
              FROM usage_agg_new_rows t"),
        args: [TEXTOID],
        mutating: true,
    }
}

/// Appends `groups` (additions only) to pending_deltas. `appended_at` gives, per
/// (user, day), when its calls were first appended (Unix microseconds); others
/// get now().
pub fn append_groups(client: &SpiClient<'_>, groups: &[Group], appended_at: &FxHashMap<Key, i64>) {
    if groups.is_empty() {
        return;
    }
    let n = groups.len();
    let (mut users, mut days, mut models, mut keys) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut last_failure = Vec::with_capacity(n);
    // The five sparse counters of a group as one array literal ("{1,2,0,0,0}").
    let mut kinds = Vec::with_capacity(n);
    let (mut calls, mut ok, mut tokens, mut costs, mut last_at, mut first_appended) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (key, row, removed) in groups {
        debug_assert!(!removed, "only additions are appended");
        let narrow = |v: i64| {
            i32::try_from(v).unwrap_or_else(|_| {
                errors::internal("appending grouped calls", "count out of range")
            })
        };
        users.push(key.0);
        days.push(key.1);
        models.push(row.model.clone());
        keys.push(row.key.clone());
        calls.push(narrow(row.calls));
        ok.push(narrow(row.successful));
        tokens.push(row.tokens);
        costs.push(row.cost.to_string());
        last_at.push(row.last_at_micros.map(logdata::format_micros));
        last_failure.push(row.last_failure_micros.map(logdata::format_micros));
        let v = row.kinds.values();
        kinds.push(format!("{{{},{},{},{},{}}}", v[0], v[1], v[2], v[3], v[4]));
        first_appended.push(appended_at.get(key).map(|&t| logdata::format_micros(t)));
    }
    APPEND_GROUPS.run(
        client,
        &[
            users.into(),
            days.into(),
            models.into(),
            keys.into(),
            calls.into(),
            ok.into(),
            tokens.into(),
            costs.into(),
            last_at.into(),
            first_appended.into(),
            last_failure.into(),
            kinds.into(),
        ],
    );
}
