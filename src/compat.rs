//! What differs between the PostgreSQL versions usage_agg builds for.

use std::ffi::CStr;

use pgrx::pg_sys;

/// Timeouts of newer versions that the background applier turns off for its
/// session, like statement_timeout (see `worker`).
#[cfg(any(feature = "pg17", feature = "pg18"))]
pub const NEWER_TIMEOUTS_OFF: &[(&CStr, &CStr)] = &[(c"transaction_timeout", c"0")];
#[cfg(not(any(feature = "pg17", feature = "pg18")))]
pub const NEWER_TIMEOUTS_OFF: &[(&CStr, &CStr)] = &[];

/// The `i`th (0-based) attribute of a tuple descriptor, as PostgreSQL's
/// `TupleDescAttr` reads it: up to 17 the descriptor ends in the attribute
/// array; from 18 on it ends in `natts` compact attributes, followed by the
/// full ones.
///
/// # Safety
/// `descriptor` is a live tuple descriptor and `i < descriptor.natts`; the
/// returned reference lives as long as the descriptor.
#[inline]
pub unsafe fn attribute(
    descriptor: &pg_sys::TupleDescData,
    i: usize,
) -> &pg_sys::FormData_pg_attribute {
    debug_assert!(i < descriptor.natts as usize);
    #[cfg(not(feature = "pg18"))]
    {
        &*descriptor.attrs.as_ptr().add(i)
    }
    #[cfg(feature = "pg18")]
    {
        let full = descriptor
            .compact_attrs
            .as_ptr()
            .add(descriptor.natts as usize)
            .cast::<pg_sys::FormData_pg_attribute>();
        &*full.add(i)
    }
}

/// The numeric 0, as a datum in the current memory context.
///
/// # Safety
/// Called inside a transaction (it pallocs).
#[inline]
pub unsafe fn zero_numeric() -> pg_sys::Datum {
    #[cfg(not(feature = "pg13"))]
    {
        pg_sys::Datum::from(pg_sys::int64_to_numeric(0))
    }
    #[cfg(feature = "pg13")]
    {
        // int64_to_numeric is new in 14.
        use pgrx::IntoDatum;
        pgrx::AnyNumeric::from(0i64)
            .into_datum()
            .expect("a numeric is never NULL")
    }
}

/// `index_insert` for a row that changed no indexed value (a new row):
/// PostgreSQL 14 added the `indexUnchanged` hint.
///
/// # Safety
/// As `index_insert`: open relations, arrays of the index's width, the new
/// tuple's tid.
#[inline]
#[allow(clippy::too_many_arguments)]
pub unsafe fn index_insert_new_row(
    index: pg_sys::Relation,
    values: *mut pg_sys::Datum,
    nulls: *mut bool,
    tid: pg_sys::ItemPointer,
    heap: pg_sys::Relation,
    check: pg_sys::IndexUniqueCheck::Type,
    info: *mut pg_sys::IndexInfo,
) -> bool {
    #[cfg(not(feature = "pg13"))]
    {
        pg_sys::index_insert(index, values, nulls, tid, heap, check, false, info)
    }
    #[cfg(feature = "pg13")]
    {
        pg_sys::index_insert(index, values, nulls, tid, heap, check, info)
    }
}
