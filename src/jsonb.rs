//! `jsonb` to and from `serde_json::Value` without the text form.
//!
//! pgrx's `JsonB` converts through text both ways (`jsonb_out` + serde parse on
//! the way in, serde print + `jsonb_in` on the way out); the profile of the fold
//! showed `jsonb_in` alone at about a fifth of its time. `Jsonb` walks the binary
//! container with `JsonbIteratorNext` and builds the result with `pushJsonbValue`
//! instead. Numbers still pass as exact decimal text (`numeric_out` / `numeric_in`),
//! so money never goes through `f64`.

use std::ffi::{CStr, CString};
use std::str::FromStr;

use pgrx::callconv::{Arg, ArgAbi, BoxRet, FcInfo};
use pgrx::datum::Datum;
use pgrx::nullable::Nullable;
use pgrx::pg_sys;
use pgrx::pgrx_sql_entity_graph::metadata::{
    ArgumentError, ReturnsError, ReturnsRef, SqlMappingRef, SqlTranslatable,
};
use pgrx::{FromDatum, IntoDatum};
use serde_json::{Map, Number, Value};

use crate::errors;

/// A `jsonb` value, converted without its text form.
#[derive(Debug, Clone, PartialEq)]
pub struct Jsonb(pub Value);

impl FromDatum for Jsonb {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Jsonb> {
        if is_null {
            return None;
        }
        // SAFETY: a non-null datum of type jsonb; detoasting gives a readable copy
        // (or the datum itself) for the duration of this call.
        let jsonb = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()) as *mut pg_sys::Jsonb;
        Some(Jsonb(read_container(&mut (*jsonb).root)))
    }
}

impl IntoDatum for Jsonb {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(to_datum(&self.0))
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBOID
    }
}

unsafe impl SqlTranslatable for Jsonb {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(Jsonb);
    const TYPE_ORIGIN: pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin =
        pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin::External;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> = Ok(SqlMappingRef::literal("jsonb"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> =
        Ok(ReturnsRef::One(SqlMappingRef::literal("jsonb")));
}

// Argument and return conventions of #[pg_extern], as pgrx has them for JsonB.
unsafe impl<'fcx> ArgAbi<'fcx> for Jsonb {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        arg.unbox_arg_using_from_datum()
            .unwrap_or_else(|| panic!("argument {index} must not be null"))
    }

    unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
        arg.unbox_arg_using_from_datum().into()
    }
}

unsafe impl BoxRet for Jsonb {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
        match self.into_datum() {
            Some(datum) => fcinfo.return_raw_datum(datum),
            None => fcinfo.return_null(),
        }
    }
}

/// A container being read: an object waiting for its next key's value, or an array.
enum Frame {
    Object(Map<String, Value>, Option<String>),
    Array(Vec<Value>),
}

/// Reads a whole jsonb container (a raw scalar is a one-element array flagged
/// `rawScalar`, and comes back as the scalar).
///
/// SAFETY: `root` points to a valid jsonb container that outlives the call.
unsafe fn read_container(root: *mut pg_sys::JsonbContainer) -> Value {
    let mut it = pg_sys::JsonbIteratorInit(root);
    let mut value: pg_sys::JsonbValue = std::mem::zeroed();
    let mut stack: Vec<Frame> = Vec::new();
    let mut raw_scalar = false;
    loop {
        let token = pg_sys::JsonbIteratorNext(&mut it, &mut value, false);
        let finished = match token {
            pg_sys::JsonbIteratorToken::WJB_DONE => break,
            pg_sys::JsonbIteratorToken::WJB_BEGIN_OBJECT => {
                stack.push(Frame::Object(Map::new(), None));
                None
            }
            pg_sys::JsonbIteratorToken::WJB_BEGIN_ARRAY => {
                raw_scalar |= stack.is_empty() && value.val.array.rawScalar;
                stack.push(Frame::Array(Vec::new()));
                None
            }
            pg_sys::JsonbIteratorToken::WJB_KEY => {
                let key = match scalar(&value) {
                    Value::String(s) => s,
                    other => errors::internal("reading jsonb", format!("object key {other}")),
                };
                if let Some(Frame::Object(_, pending)) = stack.last_mut() {
                    *pending = Some(key);
                }
                None
            }
            pg_sys::JsonbIteratorToken::WJB_VALUE | pg_sys::JsonbIteratorToken::WJB_ELEM => {
                Some(scalar(&value))
            }
            pg_sys::JsonbIteratorToken::WJB_END_OBJECT
            | pg_sys::JsonbIteratorToken::WJB_END_ARRAY => match stack.pop() {
                Some(Frame::Object(map, _)) => Some(Value::Object(map)),
                Some(Frame::Array(items)) if raw_scalar && stack.is_empty() => {
                    return items.into_iter().next().unwrap_or(Value::Null);
                }
                Some(Frame::Array(items)) => Some(Value::Array(items)),
                None => errors::internal("reading jsonb", "unbalanced container"),
            },
            other => errors::internal("reading jsonb", format!("iterator token {other}")),
        };
        if let Some(done) = finished {
            match stack.last_mut() {
                Some(Frame::Object(map, pending)) => {
                    let key = pending.take().unwrap_or_default();
                    map.insert(key, done);
                }
                Some(Frame::Array(items)) => items.push(done),
                None => return done,
            }
        }
    }
    Value::Null
}

/// A scalar JsonbValue as a serde value.
///
/// SAFETY: `value` was filled by JsonbIteratorNext for a scalar token.
unsafe fn scalar(value: &pg_sys::JsonbValue) -> Value {
    match value.type_ {
        pg_sys::jbvType::jbvNull => Value::Null,
        pg_sys::jbvType::jbvBool => Value::Bool(value.val.boolean),
        pg_sys::jbvType::jbvString => {
            let s = value.val.string;
            let bytes = std::slice::from_raw_parts(s.val as *const u8, s.len as usize);
            Value::String(String::from_utf8_lossy(bytes).into_owned())
        }
        pg_sys::jbvType::jbvNumeric => {
            let text: &CStr = pgrx::direct_function_call(
                pg_sys::numeric_out,
                &[Some(pg_sys::Datum::from(value.val.numeric))],
            )
            .unwrap_or_else(|| errors::internal("reading jsonb", "numeric_out"));
            let text = text
                .to_str()
                .unwrap_or_else(|e| errors::internal("reading a jsonb number", e));
            let number = Number::from_str(text)
                .unwrap_or_else(|e| errors::internal("reading a jsonb number", e));
            Value::Number(number)
        }
        other => errors::internal("reading jsonb", format!("value type {other}")),
    }
}

/// Builds a jsonb datum (palloc'd in the current memory context).
fn to_datum(value: &Value) -> pg_sys::Datum {
    if !matches!(value, Value::Object(_) | Value::Array(_)) {
        // A bare scalar: rare here, let jsonb_in build the raw-scalar form.
        let text = CString::new(value.to_string())
            .unwrap_or_else(|e| errors::internal("writing jsonb", e));
        // SAFETY: jsonb_in takes a NUL-terminated string.
        return unsafe {
            pgrx::direct_function_call_as_datum(pg_sys::jsonb_in, &[Some(text.as_ptr().into())])
        }
        .unwrap_or_else(|| errors::internal("writing jsonb", "jsonb_in"));
    }
    // Strings and keys are pointed to, not copied, until JsonbValueToJsonb copies
    // them: `value` is borrowed for the whole build.
    let mut state: *mut pg_sys::JsonbParseState = std::ptr::null_mut();
    // SAFETY: pushJsonbValue/JsonbValueToJsonb with a parse state owned here.
    unsafe {
        let result = push(&mut state, value);
        pg_sys::Datum::from(pg_sys::JsonbValueToJsonb(result))
    }
}

/// Pushes a container; returns the finished value when it is the outermost one.
///
/// SAFETY: `state` is a parse state built only by this function.
unsafe fn push(state: &mut *mut pg_sys::JsonbParseState, value: &Value) -> *mut pg_sys::JsonbValue {
    match value {
        Value::Object(map) => {
            pg_sys::pushJsonbValue(
                state,
                pg_sys::JsonbIteratorToken::WJB_BEGIN_OBJECT,
                std::ptr::null_mut(),
            );
            for (key, item) in map {
                let mut k = string_value(key);
                pg_sys::pushJsonbValue(state, pg_sys::JsonbIteratorToken::WJB_KEY, &mut k);
                push_item(state, item, pg_sys::JsonbIteratorToken::WJB_VALUE);
            }
            pg_sys::pushJsonbValue(
                state,
                pg_sys::JsonbIteratorToken::WJB_END_OBJECT,
                std::ptr::null_mut(),
            )
        }
        Value::Array(items) => {
            pg_sys::pushJsonbValue(
                state,
                pg_sys::JsonbIteratorToken::WJB_BEGIN_ARRAY,
                std::ptr::null_mut(),
            );
            for item in items {
                push_item(state, item, pg_sys::JsonbIteratorToken::WJB_ELEM);
            }
            pg_sys::pushJsonbValue(
                state,
                pg_sys::JsonbIteratorToken::WJB_END_ARRAY,
                std::ptr::null_mut(),
            )
        }
        _ => errors::internal("writing jsonb", "a scalar is not a container"),
    }
}

/// SAFETY: as `push`.
unsafe fn push_item(
    state: &mut *mut pg_sys::JsonbParseState,
    item: &Value,
    token: pg_sys::JsonbIteratorToken::Type,
) {
    let mut scalar: pg_sys::JsonbValue = std::mem::zeroed();
    match item {
        Value::Object(_) | Value::Array(_) => {
            push(state, item);
            return;
        }
        Value::Null => scalar.type_ = pg_sys::jbvType::jbvNull,
        Value::Bool(b) => {
            scalar.type_ = pg_sys::jbvType::jbvBool;
            scalar.val.boolean = *b;
        }
        Value::String(s) => scalar = string_value(s),
        Value::Number(n) => {
            let text = CString::new(n.to_string())
                .unwrap_or_else(|e| errors::internal("writing jsonb", e));
            let numeric = pgrx::direct_function_call_as_datum(
                pg_sys::numeric_in,
                &[
                    Some(text.as_ptr().into()),
                    pg_sys::InvalidOid.into_datum(),
                    (-1i32).into_datum(),
                ],
            )
            .unwrap_or_else(|| errors::internal("writing jsonb", "numeric_in"));
            scalar.type_ = pg_sys::jbvType::jbvNumeric;
            scalar.val.numeric = numeric.cast_mut_ptr();
        }
    }
    pg_sys::pushJsonbValue(state, token, &mut scalar);
}

/// A string JsonbValue pointing into `s` (not copied; see `to_datum`).
fn string_value(s: &str) -> pg_sys::JsonbValue {
    // SAFETY: an all-zero JsonbValue is a valid starting point for any variant.
    let mut v: pg_sys::JsonbValue = unsafe { std::mem::zeroed() };
    v.type_ = pg_sys::jbvType::jbvString;
    v.val.string = pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_1 {
        len: i32::try_from(s.len()).unwrap_or_else(|e| errors::internal("writing jsonb", e)),
        val: s.as_ptr() as *mut std::ffi::c_char,
    };
    v
}
