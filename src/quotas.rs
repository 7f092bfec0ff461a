//! `consume_quota` and `try_consume_quota`: the common case of the quota step
//! in two kept statements, everything else in the PL/pgSQL `_consume`.
//!
//! The common case is a user who has a quota row, asks for what is left this
//! month, and sends a new (or no) request_id. One statement locks, checks and
//! deducts (`UPDATE ... WHERE amount <= monthly_quota - monthly_used
//! RETURNING`, which READ COMMITTED rechecks on the latest row version when it
//! had to wait for the lock); a second one logs the call. The clock is read
//! once, in the UPDATE's SET, so after the row lock is granted; the log row's
//! `created_at` is that reading, and the call is logged only while it is before
//! `quota_reset_at`. Two plain statements cost less than one with CTEs: under
//! perf, the executor start-up of the CTE plan was a seventh of the time.
//!
//! Any other case (a new user, a month that has ended, a replayed request_id,
//! an exceeded quota, a bad argument) goes to `_consume`, called through fmgr
//! rather than through pgrx: `QUOTA_EXCEEDED` must reach the client with
//! SQLSTATE UAQ01, its DETAIL and HINT, and pgrx 0.18 turns every SQLSTATE it
//! does not know into XX000 when it catches an error. A call that deducted but
//! could not log (the month ended, the request_id is known) gives the amount
//! back first, under the lock it still holds.
//!
//! Every name in the statements is schema-qualified, operators included: these
//! functions run as the extension's owner with the caller's search_path.

use std::mem::size_of;

use bigdecimal::BigDecimal;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::errors;
use crate::plans::{kept_statement, Sql};

/// Largest amount one call may consume (checked again by `_consume`).
const MAX_AMOUNT: i32 = 1_000_000;

kept_statement!(
    /// The common case, first half: lock, check and deduct. Returns the new
    /// quota state, what the log row and the alert check need, and whether the
    /// step is still inside the quota month (the clock, read in the SET after
    /// the row lock, before `quota_reset_at`); no row when nothing was deducted.
    /// `remaining` is `usage_agg._remaining(q)` written out: a function call
    /// here would be paid on every call of the hot path.
    DEDUCT {
        what: "consuming quota",
        sql: Sql::Text(
            "UPDATE usage_agg.quotas t
                SET monthly_used = (t.monthly_used OPERATOR(pg_catalog.+) $2),
                    total_used = (t.total_used OPERATOR(pg_catalog.+) $2),
                    updated_at = pg_catalog.clock_timestamp()
              WHERE (t.user_id OPERATOR(pg_catalog.=) $1)
                AND ($2 OPERATOR(pg_catalog.<=) (t.monthly_quota OPERATOR(pg_catalog.-) t.monthly_used))
                AND (COALESCE(pg_catalog.length($3), 0) OPERATOR(pg_catalog.<=) 1000)
                AND (COALESCE(pg_catalog.length($4), 0) OPERATOR(pg_catalog.<=) 1000)
             RETURNING ROW(t.user_id, t.membership_level, t.monthly_quota, t.monthly_used,
                           GREATEST((t.monthly_quota OPERATOR(pg_catalog.-) t.monthly_used), 0),
                           t.quota_reset_at, t.total_used, true, false)::usage_agg.quota_state,
                       (t.updated_at OPERATOR(pg_catalog.<) t.quota_reset_at),
                       t.membership_level, t.updated_at, t.monthly_used, t.monthly_quota, t.quota_reset_at"
        ),
        args: [UUIDOID, INT4OID, TEXTOID, TEXTOID, INT4OID],
        mutating: true,
    }
);

/// The log row of a deduction ($6 the plan, $7 the instant of the step).
macro_rules! log_sql {
    () => {
        "INSERT INTO usage_agg.quota_usage_logs
             (user_id, session_id, membership_level, amount, tokens_used, request_id, created_at)
         VALUES ($1, $3, $6, $2, COALESCE($5, 0), $4, $7)"
    };
}

kept_statement!(
    /// The common case, second half, without a request_id (nothing can
    /// conflict: no speculative insertion, which costs a WAL record and time
    /// under the row lock).
    LOG {
        what: "logging a quota deduction",
        sql: Sql::Text(log_sql!()),
        args: [UUIDOID, INT4OID, TEXTOID, TEXTOID, INT4OID, TEXTOID, TIMESTAMPTZOID],
        mutating: true,
    }
);

kept_statement!(
    /// The same with a request_id: a known one logs nothing (no row back).
    LOG_WITH_REQUEST_ID {
        what: "logging a quota deduction",
        sql: Sql::Text(concat!(
            log_sql!(),
            " ON CONFLICT ON CONSTRAINT quota_usage_logs_request_id_key DO NOTHING RETURNING 1"
        )),
        args: [UUIDOID, INT4OID, TEXTOID, TEXTOID, INT4OID, TEXTOID, TIMESTAMPTZOID],
        mutating: true,
    }
);

kept_statement!(
    /// The alerts of a step that crossed a threshold of the monthly quota.
    QUOTA_ALERTS {
        what: "recording quota alerts",
        sql: Sql::Text("SELECT usage_agg._quota_alerts($1, $2, $3, $4, $5, $6)"),
        args: [UUIDOID, INT4OID, INT4OID, INT4OID, TIMESTAMPTZOID, TIMESTAMPTZOID],
        mutating: true,
    }
);

kept_statement!(
    /// Gives back what `DEDUCT` deducted when the call could not be logged.
    GIVE_BACK {
        what: "giving back an unlogged quota deduction",
        sql: Sql::Text(
            "UPDATE usage_agg.quotas t
                SET monthly_used = (t.monthly_used OPERATOR(pg_catalog.-) $2),
                    total_used = (t.total_used OPERATOR(pg_catalog.-) $2)
              WHERE (t.user_id OPERATOR(pg_catalog.=) $1)"
        ),
        args: [UUIDOID, INT4OID],
        mutating: true,
    }
);

kept_statement!(
    /// The full step, looked up on every slow call (an OID kept across calls
    /// would outlive a DROP EXTENSION in the same session).
    CONSUME_OID {
        what: "looking up usage_agg._consume",
        sql: Sql::Text(
            "SELECT pg_catalog.to_regprocedure('usage_agg._consume(pg_catalog.uuid, pg_catalog.int4, \
             pg_catalog.text, pg_catalog.text, pg_catalog.int4, pg_catalog.bool)')::pg_catalog.oid"
        ),
        args: [],
        mutating: false,
    }
);

/// The result of the quota functions: a `usage_agg.quota_state` datum made by
/// a statement or by `_consume`, returned as is.
pub struct QuotaState(pg_sys::Datum);

unsafe impl pgrx::pgrx_sql_entity_graph::metadata::SqlTranslatable for QuotaState {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(QuotaState);
    const TYPE_ORIGIN: pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin =
        pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin::External;
    const ARGUMENT_SQL: Result<
        pgrx::pgrx_sql_entity_graph::metadata::SqlMappingRef,
        pgrx::pgrx_sql_entity_graph::metadata::ArgumentError,
    > = Ok(pgrx::pgrx_sql_entity_graph::metadata::SqlMappingRef::literal("usage_agg.quota_state"));
    const RETURN_SQL: Result<
        pgrx::pgrx_sql_entity_graph::metadata::ReturnsRef,
        pgrx::pgrx_sql_entity_graph::metadata::ReturnsError,
    > = Ok(pgrx::pgrx_sql_entity_graph::metadata::ReturnsRef::One(
        pgrx::pgrx_sql_entity_graph::metadata::SqlMappingRef::literal("usage_agg.quota_state"),
    ));
}

unsafe impl pgrx::callconv::BoxRet for QuotaState {
    unsafe fn box_into<'fcx>(
        self,
        fcinfo: &mut pgrx::callconv::FcInfo<'fcx>,
    ) -> pgrx::datum::Datum<'fcx> {
        fcinfo.return_raw_datum(self.0)
    }
}

#[pg_extern(sql = "
CREATE FUNCTION usage_agg.consume_quota(user_id uuid, amount integer DEFAULT 1, session_id text DEFAULT NULL,
                                        request_id text DEFAULT NULL, tokens_used integer DEFAULT 0)
    RETURNS usage_agg.quota_state
    LANGUAGE c VOLATILE SECURITY DEFINER
    AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
COMMENT ON FUNCTION usage_agg.consume_quota(uuid, integer, text, text, integer) IS
    'Atomically deducts amount from the user''s monthly quota and logs it; raises SQLSTATE UAQ01 (QUOTA_EXCEEDED) when it would be exceeded';
", requires = ["quotas"])]
fn consume_quota(fcinfo: pg_sys::FunctionCallInfo) -> QuotaState {
    // SAFETY: this call's own fcinfo, with the five arguments declared above.
    unsafe { step(fcinfo, true) }
}

#[pg_extern(sql = "
CREATE FUNCTION usage_agg.try_consume_quota(user_id uuid, amount integer DEFAULT 1, session_id text DEFAULT NULL,
                                            request_id text DEFAULT NULL, tokens_used integer DEFAULT 0)
    RETURNS usage_agg.quota_state
    LANGUAGE c VOLATILE SECURITY DEFINER
    AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
COMMENT ON FUNCTION usage_agg.try_consume_quota(uuid, integer, text, text, integer) IS
    'Like consume_quota, but returns allowed = false instead of raising when the quota would be exceeded';
", requires = ["quotas"])]
fn try_consume_quota(fcinfo: pg_sys::FunctionCallInfo) -> QuotaState {
    // SAFETY: as in consume_quota.
    unsafe { step(fcinfo, false) }
}

/// What the common case did.
enum Outcome {
    /// Deducted and logged: the new state, copied out of SPI.
    Done(pg_sys::Datum),
    /// Nothing done (or given back): `_consume`, of this OID, decides.
    Full(pg_sys::Oid),
}

/// Whether the integer arguments allow the common case (the text lengths are
/// checked by the statement; `_consume` reports every bad argument).
fn common_case_arguments(amount: Option<i32>, tokens_used: Option<i32>) -> bool {
    matches!(amount, Some(a) if (1..=MAX_AMOUNT).contains(&a)) && tokens_used.unwrap_or(0) >= 0
}

/// # Safety
/// `fcinfo` is the call of one of the two functions above (five arguments:
/// uuid, integer, text, text, integer). Nothing with a destructor may be alive
/// in this frame when `_consume` runs (see [`call_consume`]).
unsafe fn step(fcinfo: pg_sys::FunctionCallInfo, raise: bool) -> QuotaState {
    let arg = |i: usize| -> Option<pg_sys::Datum> {
        // SAFETY: i < 5, the number of arguments of the call.
        unsafe { (!pgrx::pg_arg_is_null(fcinfo, i)).then(|| pgrx::pg_getarg_datum_raw(fcinfo, i)) }
    };
    let int_arg = |i: usize| arg(i).map(|d| d.value() as i32).unwrap_or(0);
    let outcome = if arg(0).is_some()
        && common_case_arguments(arg(1).map(|_| int_arg(1)), arg(4).map(|_| int_arg(4)))
    {
        Spi::connect_mut(|client| {
            let types = [
                pg_sys::UUIDOID,
                pg_sys::INT4OID,
                pg_sys::TEXTOID,
                pg_sys::TEXTOID,
                pg_sys::INT4OID,
            ];
            let args: Vec<DatumWithOid> = (0..5).map(|i| with_oid(arg(i), types[i])).collect();
            let deducted = DEDUCT.run(client, &args);
            if !deducted.is_empty() {
                let row = deducted.first();
                let datum = |i: usize| {
                    row.get_datum_by_ordinal(i)
                        .unwrap_or_else(|e| errors::internal(DEDUCT.what, e))
                };
                let int = |i: usize| {
                    row.get::<i32>(i)
                        .unwrap_or_else(|e| errors::internal(DEDUCT.what, e))
                        .unwrap_or(0)
                };
                let in_month = row
                    .get::<bool>(2)
                    .unwrap_or_else(|e| errors::internal(DEDUCT.what, e))
                    .unwrap_or(false);
                if in_month {
                    let mut log_args: Vec<DatumWithOid> =
                        (0..5).map(|i| with_oid(arg(i), types[i])).collect();
                    log_args.push(with_oid(datum(3), pg_sys::TEXTOID));
                    log_args.push(with_oid(datum(4), pg_sys::TIMESTAMPTZOID));
                    let logged = if arg(3).is_some() {
                        !LOG_WITH_REQUEST_ID.run(client, &log_args).is_empty()
                    } else {
                        LOG.run(client, &log_args);
                        true
                    };
                    if logged {
                        let (used, quota) = (int(5), int(6));
                        let amount = int_arg(1);
                        let thresholds = crate::config::read(client).alert_thresholds;
                        if crossed(
                            &thresholds,
                            i64::from(used - amount),
                            i64::from(used),
                            i64::from(quota),
                        ) {
                            QUOTA_ALERTS.run(
                                client,
                                &[
                                    with_oid(arg(0), pg_sys::UUIDOID),
                                    (used - amount).into(),
                                    used.into(),
                                    quota.into(),
                                    with_oid(datum(7), pg_sys::TIMESTAMPTZOID),
                                    with_oid(datum(4), pg_sys::TIMESTAMPTZOID),
                                ],
                            );
                        }
                        let state = datum(1)
                            .unwrap_or_else(|| errors::internal(DEDUCT.what, "a NULL quota state"));
                        // SAFETY: a composite (varlena) datum of this SPI result;
                        // the copy lives in the function's call context.
                        return Outcome::Done(unsafe {
                            pg_sys::SPI_datumTransfer(state, false, -1)
                        });
                    }
                }
                GIVE_BACK.run(client, &args[..2]);
            }
            Outcome::Full(consume_oid(client))
        })
    } else {
        Spi::connect(|client| Outcome::Full(consume_oid(client)))
    };
    match outcome {
        Outcome::Done(state) => QuotaState(state),
        // SAFETY: fcinfo as promised by the caller; nothing owning is alive here.
        Outcome::Full(oid) => QuotaState(unsafe { call_consume(fcinfo, oid, raise) }),
    }
}

/// A datum of a call argument or of an SPI result, alive for the call, as an
/// SPI argument of type `oid`.
fn with_oid(datum: Option<pg_sys::Datum>, oid: pg_sys::Oid) -> DatumWithOid<'static> {
    match datum {
        // SAFETY: the datum is of type `oid` and outlives the statements it is
        // passed to (they run within this call).
        Some(d) => unsafe { DatumWithOid::new(d, oid) },
        None => DatumWithOid::null_oid(oid),
    }
}

/// Whether a step from `before` to `after` (of `limit`) crossed one of the
/// thresholds (percent): before * 100 < threshold * limit <= after * 100,
/// exactly (thresholds may have decimals).
pub fn crossed(thresholds: &[BigDecimal], before: i64, after: i64, limit: i64) -> bool {
    if limit <= 0 || after <= before {
        return false;
    }
    let hundred = BigDecimal::from(100);
    let (before, after, limit) = (
        BigDecimal::from(before) * &hundred,
        BigDecimal::from(after) * &hundred,
        BigDecimal::from(limit),
    );
    thresholds.iter().any(|t| {
        let mark = t * &limit;
        before < mark && mark <= after
    })
}

fn consume_oid(client: &pgrx::spi::SpiClient<'_>) -> pg_sys::Oid {
    CONSUME_OID
        .run(client, &[])
        .first()
        .get_one::<pg_sys::Oid>()
        .unwrap_or_else(|e| errors::internal(CONSUME_OID.what, e))
        .filter(|oid| *oid != pg_sys::InvalidOid)
        .unwrap_or_else(|| errors::internal(CONSUME_OID.what, "the function is missing"))
}

/// Calls `usage_agg._consume(user_id, amount, session_id, request_id,
/// tokens_used, raise)` with this call's arguments, through fmgr directly.
///
/// # Safety
/// `fcinfo` holds the five arguments above and `oid` is `_consume`'s. The call
/// is not wrapped by pgrx: an error it raises longjmps from here to
/// PostgreSQL's handler with its SQLSTATE, DETAIL and HINT intact. That is
/// sound only because neither this frame nor its callers up to pgrx's entry
/// wrapper hold a value with a destructor at this point.
unsafe fn call_consume(
    fcinfo: pg_sys::FunctionCallInfo,
    oid: pg_sys::Oid,
    raise: bool,
) -> pg_sys::Datum {
    const NARGS: usize = 6;
    let mut flinfo: pg_sys::FmgrInfo = std::mem::zeroed();
    pg_sys::fmgr_info(oid, &mut flinfo);
    // LOCAL_FCINFO(call, 6): the header and six argument slots, zeroed.
    let size =
        size_of::<pg_sys::FunctionCallInfoBaseData>() + NARGS * size_of::<pg_sys::NullableDatum>();
    let call = pg_sys::palloc0(size) as pg_sys::FunctionCallInfo;
    (*call).flinfo = &mut flinfo;
    (*call).nargs = NARGS as i16;
    (*call).fncollation = (*fcinfo).fncollation;
    let args = (*call).args.as_mut_slice(NARGS);
    args[..5].copy_from_slice((*fcinfo).args.as_slice(5));
    args[5] = pg_sys::NullableDatum {
        value: pg_sys::Datum::from(raise),
        isnull: false,
    };
    let entry = flinfo
        .fn_addr
        .unwrap_or_else(|| errors::internal("calling usage_agg._consume", "no entry point"));
    let result = entry(call);
    if (*call).isnull {
        errors::internal("calling usage_agg._consume", "it returned NULL");
    }
    result
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use bigdecimal::BigDecimal;

    use super::{common_case_arguments, crossed};

    #[test]
    fn a_threshold_is_crossed_once_by_the_step_that_reaches_it() {
        let t: Vec<BigDecimal> = ["80", "100"]
            .iter()
            .map(|s| BigDecimal::from_str(s).unwrap())
            .collect();
        assert!(crossed(&t, 79, 80, 100));
        assert!(!crossed(&t, 80, 81, 100));
        assert!(crossed(&t, 99, 100, 100));
        assert!(crossed(&t, 0, 100, 100));
        assert!(!crossed(&t, 10, 20, 100));
        assert!(!crossed(&t, 5, 5, 100));
        assert!(!crossed(&t, 0, 1, 0));
        assert!(!crossed(&[], 0, 100, 100));
        // 87.5% of 8 is 7 exactly.
        let t = vec![BigDecimal::from_str("87.5").unwrap()];
        assert!(crossed(&t, 6, 7, 8));
        assert!(!crossed(&t, 7, 8, 8));
    }

    #[test]
    fn only_plain_arguments_take_the_common_case() {
        assert!(common_case_arguments(Some(1), Some(0)));
        assert!(common_case_arguments(Some(1_000_000), None));
        assert!(!common_case_arguments(None, Some(0)));
        assert!(!common_case_arguments(Some(0), Some(0)));
        assert!(!common_case_arguments(Some(1_000_001), Some(0)));
        assert!(!common_case_arguments(Some(5), Some(-1)));
    }
}
