//! Prepared statements kept for the life of a backend.
//!
//! Each statement the fold and the applier run is described once, by the
//! [`kept_statement!`] macro: its SQL, its argument types, whether it writes, and
//! the per-backend cell that holds its plan, side by side. The plan is prepared
//! on first use and kept (`SPI_keepplan`); PostgreSQL's plan cache re-plans it
//! when a table it reads changes.

use std::cell::OnceCell;
use std::thread::LocalKey;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};
use pgrx::PgOid;

use crate::errors;

/// The SQL of a kept statement: a constant, or built once from constants.
pub enum Sql {
    Text(&'static str),
    Built(fn() -> String),
}

/// One prepared statement: what it is for (named in errors), its SQL, argument
/// types and mutability, and the cell of its plan.
pub struct KeptStatement {
    pub what: &'static str,
    pub sql: Sql,
    pub args: &'static [pg_sys::Oid],
    pub mutating: bool,
    pub cell: &'static LocalKey<OnceCell<OwnedPreparedStatement>>,
}

/// Declares a `static NAME: KeptStatement` with a plan cell of its own.
macro_rules! kept_statement {
    ($(#[$doc:meta])* $name:ident {
        what: $what:expr,
        sql: $sql:expr,
        args: [$($arg:ident),* $(,)?],
        mutating: $mutating:expr $(,)?
    }) => {
        $(#[$doc])*
        pub static $name: $crate::plans::KeptStatement = {
            ::std::thread_local! {
                static CELL: ::std::cell::OnceCell<::pgrx::spi::OwnedPreparedStatement> =
                    const { ::std::cell::OnceCell::new() };
            }
            $crate::plans::KeptStatement {
                what: $what,
                sql: $sql,
                args: &[$(::pgrx::pg_sys::$arg),*],
                mutating: $mutating,
                cell: &CELL,
            }
        };
    };
}
pub(crate) use kept_statement;

impl KeptStatement {
    /// Runs the statement with `args` (prepared on first use); a failure is an
    /// internal error naming what was being done.
    pub fn run<'conn>(
        &'static self,
        client: &SpiClient<'conn>,
        args: &[DatumWithOid<'_>],
    ) -> SpiTupleTable<'conn> {
        self.cell.with(|cell| {
            let plan = cell.get_or_init(|| self.prepare(client));
            client
                .select(plan, None, args)
                .unwrap_or_else(|e| errors::internal(self.what, e))
        })
    }

    fn prepare(&self, client: &SpiClient<'_>) -> OwnedPreparedStatement {
        let built;
        let sql = match self.sql {
            Sql::Text(text) => text,
            Sql::Built(build) => {
                built = build();
                built.as_str()
            }
        };
        let types: Vec<PgOid> = self.args.iter().map(|&oid| PgOid::from(oid)).collect();
        let prepared = if self.mutating {
            client.prepare_mut(sql, &types)
        } else {
            client.prepare(sql, &types)
        };
        prepared
            .unwrap_or_else(|e| errors::internal(self.what, e))
            .keep()
    }
}
