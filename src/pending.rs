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

use crate::grouping;

/// The columns of pending_deltas, in order, as `sql/schema.sql` creates them:
/// (type, may be NULL).
const COLUMNS: [(pg_sys::Oid, bool); 9] = [
    (pg_sys::UUIDOID, false),        // user_id
    (pg_sys::DATEOID, false),        // day
    (pg_sys::TEXTOID, true),         // model_used
    (pg_sys::UUIDOID, true),         // shared_key_id
    (pg_sys::INT4OID, false),        // calls
    (pg_sys::INT4OID, false),        // successful
    (pg_sys::INT8OID, false),        // tokens
    (pg_sys::NUMERICOID, false),     // cost
    (pg_sys::TIMESTAMPTZOID, false), // last_at
];

/// An index of pending_deltas that `append_rows` maintains itself.
struct PlainIndex {
    relation: pg_sys::Relation,
    info: *mut pg_sys::IndexInfo,
}

/// Appends every row of this INSERT statement's NEW transition table to
/// pending_deltas, one row per call, as the SQL path would:
/// `(user_id, business day, model_used, shared_key_id, 1, success::int,
/// coalesce(tokens_used, 0), coalesce(cost_estimate, 0), created_at)`.
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
    let zero_cost = pg_sys::Datum::from(pg_sys::int64_to_numeric(0));
    let descriptor = (*relation).rd_att;
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
        ];
        let mut nulls = [false; 9];
        nulls[2] = row.model.is_none();
        nulls[3] = row.key.is_none();
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
    values: &[pg_sys::Datum; 9],
    nulls: &[bool; 9],
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
    pg_sys::index_insert(
        index.relation,
        key_values.as_mut_ptr(),
        key_nulls.as_mut_ptr(),
        &mut (*tuple).t_self,
        relation,
        pg_sys::IndexUniqueCheck::UNIQUE_CHECK_NO,
        false,
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
            let att = &*d.attrs.as_ptr().add(i);
            !att.attisdropped
                && att.atttypid == type_oid
                && att.attgenerated == 0
                && !(nullable && att.attnotnull)
        })
}
