//! The background applier: with `usage_agg` in `shared_preload_libraries`, a
//! launcher starts one applier per database that has the extension, and each
//! applier folds its database's pending calls every `config.apply_interval`.
//!
//! - The launcher (a static background worker, restarted by the postmaster) reads
//!   `pg_database` every [`LAUNCHER_NAPTIME`] or when woken, and starts an applier
//!   for every connectable database that has none. An applier that finds no
//!   extension in its database exits and is not started there again for
//!   [`NO_EXTENSION_RETRY`]; `CREATE EXTENSION usage_agg` wakes the launcher at
//!   commit, so a new database is served at once.
//! - An applier (a dynamic background worker) runs [`applier::apply_batch`] in
//!   short transactions: at once again while batches come back full (a backlog),
//!   otherwise after `apply_interval`, or after as long as the batch took (at
//!   most half a second) when that is longer: under load it is then at most
//!   about half busy, and more calls share each daily row's rewrite. It exits on SIGTERM (the postmaster
//!   restarts it unless the server is shutting down), when the extension is
//!   dropped, and when its database is being dropped or renamed.
//! - Shared memory holds one [`Slot`] per served database: the applier's pid,
//!   its state and counters. The fold's `auto` mode reads it to decide whether
//!   inserts may leave their calls to an applier.

use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::lwlock::PgLwLock;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgAtomic};

use crate::applier::{self, Batch};

/// Databases one server can have appliers for.
pub const MAX_DATABASES: usize = 64;
/// How often the launcher looks for databases without an applier.
const LAUNCHER_NAPTIME: Duration = Duration::from_secs(10);
/// A database found without the extension is looked at again after this.
const NO_EXTENSION_RETRY_SECS: i64 = 60;
/// An applier waits at most this long between checks for DROP DATABASE,
/// whose wait for other sessions gives up after 5 seconds.
const MAX_SLEEP: Duration = Duration::from_millis(500);
/// Longest rest after a long batch (beyond apply_interval): bounds the lag
/// under load and the time to drain once the load stops.
const MAX_REST: Duration = Duration::from_millis(500);
/// Longest pause after repeated errors.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Seconds per bucket of the applied-calls history (12 buckets: one minute).
const BUCKET_SECS: i64 = 5;
const BUCKETS: usize = 12;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u32)]
pub enum State {
    Stopped = 0,
    Running = 1,
    /// The catalog is older than the library: waiting for ALTER EXTENSION UPDATE.
    WaitingForUpdate = 2,
    /// Its last batch failed; retrying after a pause.
    BackingOff = 3,
    NoExtension = 4,
}

impl State {
    fn from_u32(v: u32) -> State {
        match v {
            1 => State::Running,
            2 => State::WaitingForUpdate,
            3 => State::BackingOff,
            4 => State::NoExtension,
            _ => State::Stopped,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            State::Stopped => "stopped",
            State::Running => "running",
            State::WaitingForUpdate => "waiting for ALTER EXTENSION usage_agg UPDATE",
            State::BackingOff => "backing off after an error",
            State::NoExtension => "no extension",
        }
    }
}

/// One served database. Written by its applier (and the launcher, for
/// `retry_after`); read by anyone without a lock: each field is atomic, and a
/// reader that sees a mix of two updates sees counters at most one batch apart.
#[derive(Default)]
pub struct Slot {
    /// 0: free.
    dboid: AtomicU32,
    /// 0: no applier.
    pid: AtomicI32,
    state: AtomicU32,
    started_at: AtomicI64,
    last_run_at: AtomicI64,
    last_applied: AtomicI64,
    applied_total: AtomicU64,
    bucket_epoch: [AtomicI64; BUCKETS],
    bucket_calls: [AtomicU64; BUCKETS],
    errors: AtomicU64,
    last_error_at: AtomicI64,
    /// The launcher starts no applier here before this time.
    retry_after: AtomicI64,
}

pub struct Registry {
    /// The launcher's latch (a pointer into shared memory), 0 before it runs.
    launcher_latch: AtomicUsize,
    slots: [Slot; MAX_DATABASES],
}

impl Default for Registry {
    fn default() -> Registry {
        Registry {
            launcher_latch: AtomicUsize::new(0),
            slots: std::array::from_fn(|_| Slot::default()),
        }
    }
}

// SAFETY: Registry is plain atomics in a fixed-size array: no pointers into
// process memory (the latch is in shared memory), valid in every process.
unsafe impl PGRXSharedMemory for Registry {}

static REGISTRY: PgAtomic<Registry> = unsafe { PgAtomic::new(c"usage_agg_appliers") };
/// Serialises claiming a slot (two appliers must not take two slots for one
/// database).
static CLAIM_LOCK: PgLwLock<()> = unsafe { PgLwLock::new(c"usage_agg_applier_claims") };

/// Set in `_PG_init` when the library is preloaded (shared memory exists).
static mut PRELOADED: bool = false;

/// Whether shared memory and the launcher exist in this server.
pub fn preloaded() -> bool {
    // SAFETY: written once by the postmaster before any backend forks.
    unsafe { PRELOADED }
}

/// Called from `_PG_init` while shared_preload_libraries is being processed.
pub fn init_preloaded() {
    pgrx::pg_shmem_init!(REGISTRY);
    pgrx::pg_shmem_init!(CLAIM_LOCK);
    BackgroundWorkerBuilder::new("usage_agg launcher")
        .set_type("usage_agg launcher")
        .set_library("usage_agg")
        .set_function("usage_agg_launcher_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
    // SAFETY: the postmaster is single-threaded here; backends inherit it.
    unsafe { PRELOADED = true };
}

fn now() -> i64 {
    // SAFETY: a plain clock read.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

fn slots() -> &'static [Slot; MAX_DATABASES] {
    &REGISTRY.get().slots
}

fn slot_of(dboid: pg_sys::Oid) -> Option<&'static Slot> {
    let id = dboid.to_u32();
    slots()
        .iter()
        .find(|s| s.dboid.load(Ordering::Acquire) == id)
}

thread_local! {
    static MY_SLOT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Whether a running applier serves the current database: then the fold's
/// `auto` mode leaves inserts' calls to it. Cheap: a few atomic loads.
pub fn applier_serves_this_database() -> bool {
    if !preloaded() {
        return false;
    }
    // SAFETY: MyDatabaseId is set for the life of a connected backend.
    let me = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let slots = slots();
    let index = MY_SLOT.with(|c| match c.get() {
        Some(i) if slots[i].dboid.load(Ordering::Acquire) == me => Some(i),
        _ => {
            let found = slots
                .iter()
                .position(|s| s.dboid.load(Ordering::Acquire) == me);
            c.set(found);
            found
        }
    });
    index.is_some_and(|i| {
        let slot = &slots[i];
        slot.pid.load(Ordering::Acquire) != 0
            && State::from_u32(slot.state.load(Ordering::Acquire)) == State::Running
    })
}

/// What `usage_agg._applier_state()` reports for the current database.
pub struct Snapshot {
    pub preloaded: bool,
    pub pid: Option<i32>,
    pub state: State,
    pub started_at: Option<i64>,
    pub last_run_at: Option<i64>,
    pub last_applied: i64,
    pub applied_last_minute: i64,
    pub applied_total: i64,
    pub errors: i64,
    pub last_error_at: Option<i64>,
}

pub fn snapshot() -> Snapshot {
    let empty = Snapshot {
        preloaded: preloaded(),
        pid: None,
        state: State::Stopped,
        started_at: None,
        last_run_at: None,
        last_applied: 0,
        applied_last_minute: 0,
        applied_total: 0,
        errors: 0,
        last_error_at: None,
    };
    if !empty.preloaded {
        return empty;
    }
    // SAFETY: MyDatabaseId is set for the life of a connected backend.
    let Some(slot) = slot_of(unsafe { pg_sys::MyDatabaseId }) else {
        return empty;
    };
    let time = |v: &AtomicI64| Some(v.load(Ordering::Acquire)).filter(|&t| t != 0);
    let pid = slot.pid.load(Ordering::Acquire);
    let current = now() / 1_000_000 / BUCKET_SECS;
    let last_minute: u64 = (0..BUCKETS)
        .filter(|&i| current - slot.bucket_epoch[i].load(Ordering::Acquire) < BUCKETS as i64)
        .map(|i| slot.bucket_calls[i].load(Ordering::Acquire))
        .sum();
    Snapshot {
        pid: (pid != 0).then_some(pid),
        state: if pid == 0
            && State::from_u32(slot.state.load(Ordering::Acquire)) != State::NoExtension
        {
            State::Stopped
        } else {
            State::from_u32(slot.state.load(Ordering::Acquire))
        },
        started_at: time(&slot.started_at),
        last_run_at: time(&slot.last_run_at),
        last_applied: slot.last_applied.load(Ordering::Acquire),
        applied_last_minute: last_minute as i64,
        applied_total: slot.applied_total.load(Ordering::Acquire) as i64,
        errors: slot.errors.load(Ordering::Acquire) as i64,
        last_error_at: time(&slot.last_error_at),
        ..empty
    }
}

/// Asks the launcher to look for databases without an applier now, and forgets
/// that this database had no extension. Called at the commit of CREATE
/// EXTENSION and ALTER EXTENSION ... UPDATE.
pub fn wake_launcher_for_this_database() {
    if !preloaded() {
        return;
    }
    // SAFETY: MyDatabaseId is set for the life of a connected backend.
    if let Some(slot) = slot_of(unsafe { pg_sys::MyDatabaseId }) {
        slot.retry_after.store(0, Ordering::Release);
    }
    let latch = REGISTRY.get().launcher_latch.load(Ordering::Acquire);
    if latch != 0 {
        // SAFETY: the launcher's latch lives in shared memory (its PGPROC) for
        // as long as the server runs; setting another process's latch is how
        // PostgreSQL wakes it.
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
    }
}

// ---------------------------------------------------------------------------
// The launcher
// ---------------------------------------------------------------------------

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn usage_agg_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // No database: the launcher only reads the shared catalog pg_database.
    BackgroundWorker::connect_worker_to_spi(None, None);
    // SAFETY: MyProc is this process's PGPROC in shared memory.
    let latch = unsafe { &raw mut (*pg_sys::MyProc).procLatch } as usize;
    REGISTRY
        .get()
        .launcher_latch
        .store(latch, Ordering::Release);
    log!("usage_agg launcher started");
    let mut started: Vec<(u32, i64)> = Vec::new();
    loop {
        if BackgroundWorker::sigterm_received() {
            REGISTRY.get().launcher_latch.store(0, Ordering::Release);
            // Exit code 1: restarted by the postmaster, unless it is shutting down.
            // SAFETY: ends this process the way PostgreSQL does.
            unsafe { pg_sys::proc_exit(1) };
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reads postgresql.conf, as every process does on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let t = now();
        // Starts recorded here are forgotten once their applier runs or failed.
        started.retain(|&(_, at)| t - at < 10_000_000);
        let databases = connectable_databases();
        free_slots_of_dropped_databases(&databases);
        for dboid in databases {
            let id = dboid.to_u32();
            if started.iter().any(|&(d, _)| d == id) {
                continue;
            }
            if let Some(slot) = slot_of(dboid) {
                if slot.pid.load(Ordering::Acquire) != 0
                    || slot.retry_after.load(Ordering::Acquire) > t
                {
                    continue;
                }
            }
            if start_applier(dboid) {
                started.push((id, t));
            }
        }
        // Woken early by CREATE EXTENSION and by appliers starting or stopping.
        if !BackgroundWorker::wait_latch(Some(LAUNCHER_NAPTIME)) {
            // SIGTERM (wait_latch consumed the flag) or postmaster death.
            REGISTRY.get().launcher_latch.store(0, Ordering::Release);
            // SAFETY: ends this process the way PostgreSQL does.
            unsafe { pg_sys::proc_exit(1) };
        }
    }
}

/// Frees the slots of databases that are gone (or no longer connectable) and
/// have no applier, so that slots are not used up by dropped databases.
fn free_slots_of_dropped_databases(databases: &[pg_sys::Oid]) {
    let _guard = CLAIM_LOCK.exclusive();
    for slot in slots() {
        let id = slot.dboid.load(Ordering::Acquire);
        if id != 0
            && slot.pid.load(Ordering::Acquire) == 0
            && !databases.iter().any(|d| d.to_u32() == id)
        {
            slot.dboid.store(0, Ordering::Release);
        }
    }
}

/// The databases an applier may connect to (not templates, connections allowed).
fn connectable_databases() -> Vec<pg_sys::Oid> {
    let mut out = Vec::new();
    // SAFETY: a catalog heap scan inside its own transaction, as the autovacuum
    // launcher does; each tuple is read while the scan holds it.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        let relation = pg_sys::table_open(
            pg_sys::DatabaseRelationId,
            pg_sys::AccessShareLock as pg_sys::LOCKMODE,
        );
        let scan = pg_sys::table_beginscan_catalog(relation, 0, std::ptr::null_mut());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let header = (*tuple).t_data;
            let form = (header as *const u8).add((*header).t_hoff as usize)
                as *const pg_sys::FormData_pg_database;
            if (*form).datallowconn && !(*form).datistemplate {
                out.push((*form).oid);
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(relation, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        pg_sys::PopActiveSnapshot();
        pg_sys::CommitTransactionCommand();
    }
    out.truncate(MAX_DATABASES);
    out
}

fn start_applier(dboid: pg_sys::Oid) -> bool {
    let name = format!("usage_agg applier (database {})", dboid.to_u32());
    // SAFETY: MyProcPid is this process's pid.
    let me = unsafe { pg_sys::MyProcPid };
    let loaded = BackgroundWorkerBuilder::new(&name)
        .set_type("usage_agg applier")
        .set_library("usage_agg")
        .set_function("usage_agg_applier_main")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(1)))
        .set_argument(Some(pg_sys::Datum::from(dboid.to_u32())))
        .set_notify_pid(me)
        .load_dynamic();
    if loaded.is_err() {
        warning!(
            "usage_agg: could not start an applier for database {}: no free background worker slot",
            dboid.to_u32()
        );
    }
    loaded.is_ok()
}

// ---------------------------------------------------------------------------
// An applier
// ---------------------------------------------------------------------------

/// Releases the slot when the applier exits, however it exits.
unsafe extern "C-unwind" fn release_slot(_code: i32, arg: pg_sys::Datum) {
    let slot = &slots()[arg.value()];
    slot.pid.store(0, Ordering::Release);
    if State::from_u32(slot.state.load(Ordering::Acquire)) != State::NoExtension {
        slot.state.store(State::Stopped as u32, Ordering::Release);
    }
}

/// Takes the slot of `dboid` for this process; None when another live applier
/// has it.
fn claim_slot(dboid: pg_sys::Oid) -> Option<usize> {
    let _guard = CLAIM_LOCK.exclusive();
    let id = dboid.to_u32();
    // SAFETY: MyProcPid is this process's pid.
    let me = unsafe { pg_sys::MyProcPid };
    let slots = slots();
    let index = match slots
        .iter()
        .position(|s| s.dboid.load(Ordering::Acquire) == id)
    {
        Some(i) => {
            let holder = slots[i].pid.load(Ordering::Acquire);
            // SAFETY: kill(pid, 0) only asks whether the process exists.
            if holder != 0 && holder != me && unsafe { libc_kill(holder) } {
                return None;
            }
            i
        }
        None => {
            // A free slot, else one of a database without the extension.
            let free = slots
                .iter()
                .position(|s| s.dboid.load(Ordering::Acquire) == 0)
                .or_else(|| {
                    slots.iter().position(|s| {
                        s.pid.load(Ordering::Acquire) == 0
                            && State::from_u32(s.state.load(Ordering::Acquire))
                                == State::NoExtension
                    })
                })?;
            let slot = &slots[free];
            slot.last_run_at.store(0, Ordering::Release);
            slot.last_applied.store(0, Ordering::Release);
            slot.applied_total.store(0, Ordering::Release);
            slot.errors.store(0, Ordering::Release);
            slot.last_error_at.store(0, Ordering::Release);
            for calls in &slot.bucket_calls {
                calls.store(0, Ordering::Release);
            }
            slot.dboid.store(id, Ordering::Release);
            free
        }
    };
    let slot = &slots[index];
    slot.pid.store(me, Ordering::Release);
    slot.state.store(State::Running as u32, Ordering::Release);
    slot.started_at.store(now(), Ordering::Release);
    slot.retry_after.store(0, Ordering::Release);
    Some(index)
}

/// Whether process `pid` exists.
unsafe fn libc_kill(pid: i32) -> bool {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    kill(pid, 0) == 0
}

/// True while DROP DATABASE (or ALTER DATABASE RENAME) holds its exclusive lock
/// on `dboid`: the applier must then leave, or the drop fails after 5 seconds.
fn database_is_being_dropped(dboid: pg_sys::Oid) -> bool {
    let tag = pg_sys::LOCKTAG {
        locktag_field1: 0, // shared object: no database
        locktag_field2: pg_sys::DatabaseRelationId.to_u32(),
        locktag_field3: dboid.to_u32(),
        locktag_field4: 0,
        locktag_type: pg_sys::LockTagType::LOCKTAG_OBJECT as u8,
        locktag_lockmethodid: pg_sys::DEFAULT_LOCKMETHOD as u8,
    };
    let mode = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
    // SAFETY: a session lock tried without waiting and released at once.
    unsafe {
        let result = pg_sys::LockAcquire(&tag, mode, true, true);
        if result == pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL {
            return true;
        }
        pg_sys::LockRelease(&tag, mode, true);
    }
    false
}

fn record_batch(slot: &Slot, batch: &Batch) {
    let t = now();
    slot.last_run_at.store(t, Ordering::Release);
    slot.last_applied.store(batch.applied, Ordering::Release);
    slot.applied_total
        .fetch_add(batch.applied.max(0) as u64, Ordering::AcqRel);
    let epoch = t / 1_000_000 / BUCKET_SECS;
    let i = epoch.rem_euclid(BUCKETS as i64) as usize;
    if slot.bucket_epoch[i].swap(epoch, Ordering::AcqRel) != epoch {
        slot.bucket_calls[i].store(0, Ordering::Release);
    }
    slot.bucket_calls[i].fetch_add(batch.applied.max(0) as u64, Ordering::AcqRel);
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn usage_agg_applier_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let dboid = pg_sys::Oid::from(arg.value() as u32);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(dboid), None);
    let Some(index) = claim_slot(dboid) else {
        return; // another applier serves this database
    };
    // SAFETY: registers a plain function, called once at exit.
    unsafe { pg_sys::before_shmem_exit(Some(release_slot), pg_sys::Datum::from(index)) };
    let slot = &slots()[index];
    // Every name the applier uses is qualified; pin the path all the same.
    // Its commits need not wait for the WAL flush: a batch lost in a crash was
    // never committed, so its pending rows are still there and fold again
    // (each batch deletes its pending rows and writes their sums in one
    // transaction). Waiting would add an fsync per batch to the inserts'.
    // Timeouts and limits an administrator set for the database or the role
    // (ALTER DATABASE/ROLE ... SET) are meant for applications: under them a
    // batch would fail and be retried forever. Batches are bounded
    // (BATCH_ROWS) and short; a lock wait ends when the lock holder does.
    let pinned: &[(&std::ffi::CStr, &std::ffi::CStr)] = &[
        (c"search_path", c"pg_catalog, pg_temp"),
        (c"synchronous_commit", c"off"),
        (c"statement_timeout", c"0"),
        (c"lock_timeout", c"0"),
        (c"idle_in_transaction_session_timeout", c"0"),
        (c"temp_file_limit", c"-1"),
        (c"default_transaction_isolation", c"read committed"),
    ];
    for &(name, value) in pinned.iter().chain(crate::compat::NEWER_TIMEOUTS_OFF) {
        // SAFETY: sets a GUC of this session from constant strings.
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            );
        }
    }

    let mut failures: u32 = 0;
    loop {
        if BackgroundWorker::sigterm_received() {
            // Exit code 1: restarted by the postmaster, unless it is shutting down.
            // SAFETY: ends this process the way PostgreSQL does.
            unsafe { pg_sys::proc_exit(1) };
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reads postgresql.conf, as every process does on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        if database_is_being_dropped(dboid) {
            log!(
                "usage_agg applier: database {} is being dropped or renamed; exiting",
                dboid.to_u32()
            );
            return;
        }
        let started = std::time::Instant::now();
        let pause = match applier::run_batch_in_transaction() {
            Ok(Batch {
                outcome: applier::Outcome::NoExtension,
                ..
            }) => {
                slot.state
                    .store(State::NoExtension as u32, Ordering::Release);
                slot.retry_after.store(
                    now() + NO_EXTENSION_RETRY_SECS * 1_000_000,
                    Ordering::Release,
                );
                return;
            }
            Ok(Batch {
                outcome: applier::Outcome::OldCatalog,
                ..
            }) => {
                slot.state
                    .store(State::WaitingForUpdate as u32, Ordering::Release);
                Duration::from_secs(5)
            }
            Ok(batch) => {
                failures = 0;
                slot.state.store(State::Running as u32, Ordering::Release);
                record_batch(slot, &batch);
                if batch.full {
                    Duration::ZERO // a backlog: the next batch at once
                } else {
                    // Under load a batch takes longer than the interval: resting
                    // as long as it took (up to MAX_REST) keeps the applier at
                    // most about half busy and lets more calls of one (user,
                    // day) share a rewrite.
                    batch.interval.max(started.elapsed().min(MAX_REST))
                }
            }
            Err(message) => {
                failures = failures.saturating_add(1);
                slot.state
                    .store(State::BackingOff as u32, Ordering::Release);
                slot.errors.fetch_add(1, Ordering::AcqRel);
                slot.last_error_at.store(now(), Ordering::Release);
                let pause = Duration::from_millis(500)
                    .saturating_mul(1 << failures.min(7))
                    .min(MAX_BACKOFF);
                warning!(
                    "usage_agg applier: applying pending calls failed: {message}; the batch was rolled back and its calls stay pending; retrying in {} ms",
                    pause.as_millis()
                );
                pause
            }
        };
        sleep(pause, dboid);
    }
}

/// Sleeps `pause` on the latch, waking every MAX_SLEEP to check for DROP
/// DATABASE and SIGTERM.
fn sleep(pause: Duration, dboid: pg_sys::Oid) {
    if pause.is_zero() {
        return;
    }
    let mut left = pause;
    while !left.is_zero() {
        let step = left.min(MAX_SLEEP);
        if !BackgroundWorker::wait_latch(Some(step)) {
            // SIGTERM or postmaster death: exit code 1 as above.
            // SAFETY: ends this process the way PostgreSQL does.
            unsafe { pg_sys::proc_exit(1) };
        }
        if database_is_being_dropped(dboid) {
            return;
        }
        left = left.saturating_sub(step);
    }
}

/// `usage_agg._wake_applier()`: wakes the launcher when the transaction that
/// called it commits (CREATE EXTENSION and ALTER EXTENSION ... UPDATE do).
#[pg_extern(volatile, parallel_unsafe, name = "_wake_applier")]
fn wake_applier() {
    if preloaded() {
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, || {
            wake_launcher_for_this_database()
        });
    }
}

type Timestamp = Option<pgrx::datum::TimestampWithTimeZone>;

/// `usage_agg._applier_state()`: the state of this database's applier. (pgrx
/// needs the row type spelled out here.)
#[pg_extern(volatile, parallel_safe, name = "_applier_state")]
#[allow(clippy::type_complexity)]
fn applier_state() -> TableIterator<
    'static,
    (
        name!(preloaded, bool),
        name!(running, bool),
        name!(pid, Option<i32>),
        name!(state, String),
        name!(started_at, Timestamp),
        name!(last_run_at, Timestamp),
        name!(last_applied, i64),
        name!(applied_last_minute, i64),
        name!(applied_total, i64),
        name!(errors, i64),
        name!(last_error_at, Timestamp),
    ),
> {
    let s = snapshot();
    let ts = |t: Option<i64>| t.and_then(|t| pgrx::datum::TimestampWithTimeZone::try_from(t).ok());
    TableIterator::once((
        s.preloaded,
        s.pid.is_some() && s.state == State::Running,
        s.pid,
        s.state.name().to_string(),
        ts(s.started_at),
        ts(s.last_run_at),
        s.last_applied,
        s.applied_last_minute,
        s.applied_total,
        s.errors,
        ts(s.last_error_at),
    ))
}
