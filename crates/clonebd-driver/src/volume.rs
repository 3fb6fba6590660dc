//! The threaded driver: one engine, many threads.
//!
//! Threads and who runs what:
//! - **request threads** (an export's workers) call [`Volume::read`], [`Volume::write`] and
//!   friends. Reads, and plain (non-FUA) writes whose regions are all hydrated, go straight
//!   to the device without entering the engine: this is the hot path, and it never waits for
//!   a lock held across I/O or for background copies. Everything else enters the engine;
//!   the request's thread then runs the I/O of its own request (it holds the buffer), and
//!   receives any of its I/O that another thread's completion released (a write queued behind
//!   a copy) through a per-request mailbox, until its reply arrives. With a
//!   [`ReadRecorder`] ([`Volume::record_reads`]) a read also notes its first cold regions,
//!   lock-free; the recorder's own thread writes them out.
//! - **copy threads** run background copies, so they proceed in parallel up to the
//!   threshold, and the destination writes of copy-on-read fills (the `fill` module).
//! - **the timer thread** delivers [`Input::Tick`] at the engine's deadlines (periodic
//!   commits, back-off, rate limit).
//!
//! Commit and abort actions run on whichever thread drained them; the engine never has two
//! rounds in flight, so they never run concurrently. The engine lock is held only while the
//! engine decides, never across I/O. Each time the engine is fed, the mean latency of the
//! reads and writes completed since (taken from the metrics, which timed them) goes in
//! first, so background copies yield to what clients see.
//!
//! **Finalized** ([`Volume::finalize`], or [`Volume::start_finalized`] for a clone that was
//! fully hydrated before it started): once every region is hydrated and committed, the
//! source is detached (the volume's last reference to it is dropped, so its descriptor or
//! connections close) and every request goes straight to the destination, as a dm-linear
//! table over it would: no engine, no hydration map, no foreground accounting. Reads read
//! the destination, writes write it (FUA adds a flush), a flush is the destination's
//! flush (`fdatasync`), discards are passed down if the clone passes discards down, and
//! hydrate requests succeed at once. The metadata stays open, committed and fully hydrated.

mod fill;

pub use fill::FillStats;

use crate::metrics::{IoMetrics, Op};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clonebd_core::engine::{
    Action, Config, Control, Engine, EngineStatus, Event, Input, IoStatus, Mode, ReqId, Request,
    SharedView, Tick,
};
use clonebd_core::geometry::logical_block_bytes;
use clonebd_core::ranges::ByteRange;
use clonebd_core::{AlignedBuf, BlockDev, Caps, Clock, Geometry, HydrationMap};
use crossbeam_channel::{Receiver, Sender, unbounded};

use crate::exec::{
    CopyDone, CopyMode, Devices, ReqBuf, execute_data, execute_metadata, fast_write_ok, op_of,
    owner_of, read_routed, try_copy_range,
};
use crate::export::{BlockExport, ExportCaps, IoError};
use crate::record::ReadRecorder;
use crate::{MetadataBackend, MetadataUsage};

/// The system's monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Settings of a [`Volume`].
#[derive(Debug, Clone, Copy)]
pub struct VolumeOptions {
    /// The engine's settings.
    pub engine: Config,
    /// Threads running background copies.
    pub copy_threads: usize,
    /// Largest piece a background copy reads and writes at once, and the unit in which a
    /// large copy is spread over the copy threads ([`COPY_CHUNK`](crate::exec::COPY_CHUNK) for local sources; larger
    /// for remote ones, where each read is a request with its own round trip and cost).
    pub copy_chunk: u64,
    /// Sparse-aware hydration ([`CopyMode::sparse`](crate::exec::CopyMode::sparse)).
    pub sparse: bool,
}

/// Everything a status report shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStatus {
    /// The engine's view.
    pub engine: EngineStatus,
    /// Metadata blocks.
    pub metadata: MetadataUsage,
    /// The clone's geometry.
    pub geometry: Geometry,
    /// Why the last failed copy failed (device, offset and the system's error), if one did.
    pub last_copy_error: Option<String>,
    /// Finalized: the source is detached and requests go straight to the destination.
    pub finalized: bool,
    /// What copies did: bytes read and written, and bytes zeroed instead (holes and zeros
    /// of the source, with sparse-aware hydration).
    pub copies: CopyDone,
    /// Copy-on-read ([`Volume::set_hydrate_on_read`]).
    pub fills: FillStats,
}

/// Why [`Volume::finalize`] (or [`Volume::start_finalized`]) refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FinalizeError {
    /// Some regions are not hydrated yet: their data is still only on the source.
    #[error("{remaining} of {total} regions are not hydrated yet")]
    NotHydrated {
        /// Regions not hydrated.
        remaining: u64,
        /// Regions in all.
        total: u64,
    },
    /// The metadata is read-only or failed, so the final commit cannot be made.
    #[error("the metadata is {mode}, so the final commit cannot be made")]
    Mode {
        /// `read-only` or `fail`.
        mode: &'static str,
    },
    /// The final commit failed.
    #[error("the final metadata commit failed: {error}")]
    Commit {
        /// Why.
        error: IoError,
    },
    /// The final commit left regions uncommitted.
    #[error("the final metadata commit left {dirty} regions not committed")]
    Uncommitted {
        /// Regions hydrated but still not committed after it.
        dirty: u64,
    },
    /// The volume is shutting down.
    #[error("the clone is shutting down")]
    Stopped,
}

/// What [`Volume::finalize`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finalized {
    /// The clone was finalized by this call.
    Now,
    /// It already was (an earlier call, or [`Volume::start_finalized`]).
    Already,
}

/// Stands in for the source once it is detached: a finalized volume never reads it, and a
/// read that got here anyway (a bug) fails instead of returning stale bytes.
struct DetachedSource {
    size: u64,
}

impl BlockDev for DetachedSource {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps::default()
    }

    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> std::io::Result<()> {
        Err(std::io::Error::other(
            "the source is detached: the clone is finalized",
        ))
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> std::io::Result<()> {
        Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
    }

    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Msg {
    Do(Action),
    Reply(IoStatus),
}

enum Job {
    Run(Action),
    /// One piece of a background copy spread over the copy threads.
    Piece(Arc<SplitCopy>, u64, u64),
    /// A read's data to hydrate its regions with (copy-on-read).
    Fill(fill::Fill),
    Stop,
}

/// A background copy executed in pieces on several threads; the thread that finishes the
/// last piece reports the copy's completion.
struct SplitCopy {
    op: u64,
    remaining: AtomicU64,
    failed: Mutex<IoStatus>,
}

struct Timer {
    deadline: Option<Tick>,
    stop: bool,
}

struct Shared {
    engine: Mutex<Engine>,
    view: Arc<SharedView>,
    /// The source. Readers hold the guard across their I/O, so [`Volume::finalize`], which
    /// replaces it with a [`DetachedSource`], returns only once no read of it is in flight.
    source: RwLock<Arc<dyn BlockDev>>,
    dest: Arc<dyn BlockDev>,
    /// Set once finalized: from then on requests go straight to `dest`.
    finalized: AtomicBool,
    /// Serialises [`Volume::finalize`] calls.
    finalizing: Mutex<()>,
    /// Whether discards are passed down to the destination (also once finalized).
    discard_passdown: bool,
    meta: Mutex<Box<dyn MetadataBackend>>,
    clock: Arc<dyn Clock>,
    mailboxes: Mutex<HashMap<ReqId, Sender<Msg>>>,
    tokens: Mutex<HashMap<u64, Sender<IoStatus>>>,
    subscribers: Mutex<Vec<Sender<Event>>>,
    next_id: AtomicU64,
    jobs: Sender<Job>,
    timer: Mutex<Timer>,
    timer_cv: Condvar,
    stopped: AtomicBool,
    geometry: Geometry,
    lbs: u64,
    /// Why the last background or foreground copy failed, for the log and the status.
    last_copy_error: Mutex<Option<String>>,
    /// Request and commit counters.
    metrics: IoMetrics,
    /// How copies are made ([`VolumeOptions::copy_chunk`], [`VolumeOptions::sparse`]).
    copy_mode: CopyMode,
    /// Notes first reads of cold regions, if asked ([`Volume::record_reads`]).
    recorder: OnceLock<Arc<ReadRecorder>>,
    /// Copy-on-read: the most bytes fills may hold (0: off), the bytes they hold now, and
    /// how many were dropped over the budget.
    fill_budget: AtomicU64,
    fill_pending: AtomicU64,
    fill_dropped: AtomicU64,
}

/// A plain write to hydrated regions, routed by the volume for a caller that submits the I/O
/// itself (through io_uring) instead of calling [`Volume::write`]: the request's `len` bytes
/// go to `file` at `offset`. The decision is the one that method makes, taken when the route
/// is made. The caller drops the route only once the write completed: until then the request
/// counts as foreground I/O in flight, which background hydration yields to.
#[derive(Debug)]
pub struct Routed {
    /// The destination's file, opened with `O_DIRECT`.
    pub file: Arc<File>,
    /// Byte offset on the destination (the same as in the clone).
    pub offset: u64,
    /// How many bytes.
    pub len: usize,
    /// Foreground accounting (hydration yields to it); none once finalized.
    _fg: Foreground,
}

/// A request served outside the engine, in flight until dropped.
struct Foreground {
    sh: Arc<Shared>,
    /// The request it counts as, once done.
    op: Op,
    bytes: u64,
    since: Instant,
    /// Whether it counts as foreground I/O that hydration yields to (not once finalized:
    /// there is no hydration left).
    yields: bool,
}

impl Foreground {
    fn start(sh: &Arc<Shared>, op: Op, bytes: u64, yields: bool) -> Self {
        if yields {
            sh.view.foreground_started(sh.clock.now());
        }
        Self {
            sh: Arc::clone(sh),
            op,
            bytes,
            since: Instant::now(),
            yields,
        }
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        if self.yields {
            self.sh.view.foreground_finished(self.sh.clock.now());
        }
        // A routed request's errors are the caller's to report; it is counted as done.
        self.sh
            .metrics
            .request(self.op, self.bytes, self.since.elapsed(), true);
    }
}

impl std::fmt::Debug for Foreground {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Foreground")
    }
}

/// A running clone: the handle exports use. Cloning gives another handle to the same clone.
#[derive(Clone)]
pub struct Volume {
    sh: Arc<Shared>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("geometry", &self.sh.geometry)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicked thread must not take every other request down with it; the engine's own
    // state is only changed inside `apply`, which does not panic on valid input.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read_lock<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // As `lock`: the slot is only ever replaced whole, so a poisoned one is still valid.
    l.read().unwrap_or_else(|p| p.into_inner())
}

thread_local! {
    static SCRATCH: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::new(0));
    /// Each request thread's mailbox, reused from request to request: a request is
    /// registered under its id only while in flight, and nothing is sent to it after its
    /// reply, so the channel is empty between requests.
    static MAILBOX: (Sender<Msg>, Receiver<Msg>) = unbounded();
}

impl Volume {
    /// Starts a clone over `map` (the committed hydration state the metadata store loaded),
    /// resumes it (background hydration runs if enabled) and returns its handle.
    pub fn start(
        opts: VolumeOptions,
        source: Arc<dyn BlockDev>,
        dest: Arc<dyn BlockDev>,
        meta: Box<dyn MetadataBackend>,
        map: HydrationMap,
        clock: Arc<dyn Clock>,
    ) -> Volume {
        Self::start_ordered(opts, &[], source, dest, meta, map, clock)
    }

    /// As [`start`](Self::start), with the byte ranges `first` (`--hydrate-first`) queued,
    /// in this order, before background hydration starts: they are hydrated before the
    /// rest of the background pass ([`Control::HydrateFirst`]).
    pub fn start_ordered(
        opts: VolumeOptions,
        first: &[ByteRange],
        source: Arc<dyn BlockDev>,
        dest: Arc<dyn BlockDev>,
        meta: Box<dyn MetadataBackend>,
        map: HydrationMap,
        clock: Arc<dyn Clock>,
    ) -> Volume {
        let view = Arc::new(SharedView::new(map));
        let now = clock.now();
        let engine = Engine::new(opts.engine, Arc::clone(&view), now);
        let (jobs_tx, jobs_rx) = unbounded();
        let sh = Arc::new(Shared {
            engine: Mutex::new(engine),
            view,
            source: RwLock::new(source),
            dest,
            finalized: AtomicBool::new(false),
            finalizing: Mutex::new(()),
            discard_passdown: opts.engine.discard_passdown,
            meta: Mutex::new(meta),
            clock,
            mailboxes: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            subscribers: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            jobs: jobs_tx,
            timer: Mutex::new(Timer {
                deadline: None,
                stop: false,
            }),
            timer_cv: Condvar::new(),
            stopped: AtomicBool::new(false),
            geometry: opts.engine.geometry,
            lbs: logical_block_bytes(u64::from(opts.engine.logical_block_size)),
            last_copy_error: Mutex::new(None),
            metrics: IoMetrics::default(),
            copy_mode: CopyMode {
                chunk: opts
                    .copy_chunk
                    .max(u64::from(opts.engine.logical_block_size.max(512))),
                sparse: opts.sparse,
            },
            recorder: OnceLock::new(),
            fill_budget: AtomicU64::new(0),
            fill_pending: AtomicU64::new(0),
            fill_dropped: AtomicU64::new(0),
        });
        let mut threads = Vec::new();
        for i in 0..opts.copy_threads.max(1) {
            let sh2 = Arc::clone(&sh);
            let rx: Receiver<Job> = jobs_rx.clone();
            threads.push(spawn(&format!("clonebd-copy-{i}"), move || {
                copy_loop(&sh2, &rx)
            }));
        }
        let sh2 = Arc::clone(&sh);
        threads.push(spawn("clonebd-timer", move || timer_loop(&sh2)));
        for r in first {
            // Still suspended: nothing starts before the whole order is queued.
            let acts = sh.apply(Input::Control(Control::HydrateFirst {
                offset: r.offset,
                len: r.len,
                front: false,
            }));
            sh.dispatch(acts, None, &mut ReqBuf::None);
        }
        let acts = sh.apply(Input::Control(Control::Resume));
        sh.dispatch(acts, None, &mut ReqBuf::None);
        Volume {
            sh,
            threads: Arc::new(Mutex::new(threads)),
        }
    }

    /// Starts a clone that is already fully hydrated, finalized from the start: no source,
    /// every request straight to `dest` (see the module's doc). Refused, with nothing
    /// started, if `map` has a region not hydrated.
    pub fn start_finalized(
        opts: VolumeOptions,
        dest: Arc<dyn BlockDev>,
        meta: Box<dyn MetadataBackend>,
        map: HydrationMap,
        clock: Arc<dyn Clock>,
    ) -> Result<Volume, FinalizeError> {
        let total = map.nr_regions();
        let remaining = total - map.nr_hydrated();
        if remaining > 0 {
            return Err(FinalizeError::NotHydrated { remaining, total });
        }
        let source = Arc::new(DetachedSource {
            size: opts.engine.geometry.target_bytes(),
        });
        let vol = Volume::start(opts, source, dest, meta, map, clock);
        vol.sh.finalized.store(true, Ordering::Release);
        Ok(vol)
    }

    /// Finalizes the clone, as swapping a dm-clone table for dm-linear over the destination
    /// does, but live: every region must be hydrated; the metadata is committed (so it is
    /// left consistent and fully hydrated, and a kernel or clonebd can load it); then every
    /// request from now on goes straight to the destination, and the source is detached:
    /// this returns once no read of it is in flight and the volume's reference to it is
    /// dropped (a local source's descriptor, a remote one's connections, close unless
    /// someone else holds the device too). Requests in flight meanwhile complete normally.
    pub fn finalize(&self) -> Result<Finalized, FinalizeError> {
        let sh = &self.sh;
        let _one = lock(&sh.finalizing);
        if sh.finalized.load(Ordering::Acquire) {
            return Ok(Finalized::Already);
        }
        if sh.stopped.load(Ordering::Acquire) {
            return Err(FinalizeError::Stopped);
        }
        let total = sh.view.map().nr_regions();
        let remaining = total - sh.view.map().nr_hydrated();
        if remaining > 0 {
            return Err(FinalizeError::NotHydrated { remaining, total });
        }
        // Every region is marked in core, so the commit covers every mark there will ever
        // be: nothing marks a region again.
        let committed = self.commit();
        let engine = lock(&sh.engine).status();
        match engine.mode {
            Mode::ReadWrite => {}
            Mode::ReadOnly => return Err(FinalizeError::Mode { mode: "read-only" }),
            Mode::Fail => return Err(FinalizeError::Mode { mode: "fail" }),
        }
        if let Err(error) = committed {
            return Err(FinalizeError::Commit { error });
        }
        if engine.nr_dirty > 0 {
            return Err(FinalizeError::Uncommitted {
                dirty: engine.nr_dirty,
            });
        }
        // New requests take the direct path from here on; requests that already chose the
        // engine's finish there (every region is hydrated, so none of them reads the source).
        sh.finalized.store(true, Ordering::Release);
        let detached: Arc<dyn BlockDev> = Arc::new(DetachedSource {
            size: sh.geometry.target_bytes(),
        });
        let source = {
            // Waits for the reads that hold the source now.
            let mut slot = sh.source.write().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *slot, detached)
        };
        drop(source);
        tracing::info!(
            "finalized: the source is detached; requests go straight to the destination"
        );
        Ok(Finalized::Now)
    }

    /// Whether the clone is finalized (see [`finalize`](Self::finalize)).
    pub fn is_finalized(&self) -> bool {
        self.sh.finalized.load(Ordering::Acquire)
    }

    /// The clone's geometry.
    pub fn geometry(&self) -> Geometry {
        self.sh.geometry
    }

    /// The clone's size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.sh.geometry.target_bytes()
    }

    /// The clone's logical block size in bytes.
    pub fn logical_block_size(&self) -> u32 {
        u32::try_from(self.sh.lbs).unwrap_or(512)
    }

    /// The shared view: hydration map and mode.
    pub fn view(&self) -> &Arc<SharedView> {
        &self.sh.view
    }

    /// Whether the destination can discard (passdown possible).
    pub fn dest_can_discard(&self) -> bool {
        self.sh.dest.caps().discard
    }

    /// Routes a plain (not FUA) write of `len` bytes at `offset` from memory aligned to
    /// `mem_align` bytes, if [`write`](Self::write) would take its fast path: not in fail
    /// mode, every region it touches already hydrated (so the destination owns those bytes
    /// and nothing is to decide or record), or finalized. The write then goes to the
    /// destination alone. `None` otherwise: the write must take [`write`](Self::write).
    pub fn route_write(&self, offset: u64, len: u64, mem_align: usize) -> Option<Routed> {
        let sh = &self.sh;
        sh.check_range(offset, len).ok()?;
        let finalized = sh.finalized.load(Ordering::Acquire);
        if !finalized && !fast_write_ok(&sh.view, &sh.geometry, offset, len, false) {
            return None;
        }
        Some(Routed {
            file: sh.dest.direct_file(offset, len, mem_align, true)?,
            offset,
            len: usize::try_from(len).ok()?,
            _fg: Foreground::start(sh, Op::Write, len, !finalized),
        })
    }

    /// Hydrates every region `[offset, offset+len)` touches, and returns once they are.
    /// Once finalized every region is, and this returns at once.
    pub fn hydrate(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let sh = &self.sh;
        self.timed(Op::Cache, len, || {
            if sh.finalized.load(Ordering::Acquire) {
                return sh.check_range(offset, len);
            }
            sh.submit(Request::Hydrate { offset, len }, ReqBuf::None)
        })
    }

    /// Runs one client request, counting it in the metrics.
    fn timed(
        &self,
        op: Op,
        bytes: u64,
        f: impl FnOnce() -> Result<(), IoError>,
    ) -> Result<(), IoError> {
        let t = Instant::now();
        let r = f();
        self.sh.metrics.request(op, bytes, t.elapsed(), r.is_ok());
        r
    }

    /// From now on, notes the first read of each cold region in `recorder`
    /// (`--record-reads`). Set once: a second recorder is refused (returned).
    pub fn record_reads(&self, recorder: Arc<ReadRecorder>) -> Result<(), Arc<ReadRecorder>> {
        self.sh.recorder.set(recorder)
    }

    /// The volume's request and commit counters.
    pub fn metrics(&self) -> &IoMetrics {
        &self.sh.metrics
    }

    /// Applies a control command (hydration messages, rate limit).
    pub fn control(&self, c: Control) {
        if self.sh.stopped.load(Ordering::Acquire) {
            // After shutdown nothing may restart hydration: its threads are gone.
            return;
        }
        let acts = self.sh.apply(Input::Control(c));
        self.sh.dispatch(acts, None, &mut ReqBuf::None);
    }

    /// Commits the metadata if anything changed (what a dm-clone status request does first).
    pub fn commit(&self) -> Result<(), IoError> {
        IoError::check(self.sh.control_wait(|token| Control::Commit { token }))
    }

    /// The status: engine counters and metadata usage.
    pub fn status(&self) -> VolumeStatus {
        let engine = lock(&self.sh.engine).status();
        let metadata = lock(&self.sh.meta).usage();
        VolumeStatus {
            engine,
            metadata,
            geometry: self.sh.geometry,
            last_copy_error: lock(&self.sh.last_copy_error).clone(),
            finalized: self.is_finalized(),
            copies: self.sh.metrics.copies(),
            fills: self.sh.fill_stats(),
        }
    }

    /// Copy-on-read: with a `budget` above 0, a read of regions not hydrated also hydrates
    /// the regions it covers wholly, from the data it read (see the `fill` module), with at
    /// most `budget` bytes held by fills not yet written (more are dropped); 0 turns it off.
    pub fn set_hydrate_on_read(&self, budget: u64) {
        self.sh.fill_budget.store(budget, Ordering::Relaxed);
    }

    /// Events from now on (mode changes, hydration complete, copy failures).
    pub fn subscribe(&self) -> Receiver<Event> {
        let (tx, rx) = unbounded();
        lock(&self.sh.subscribers).push(tx);
        rx
    }

    /// The suspend sequence (SPEC 4.5, and H3: shutdown commits): stops background
    /// hydration, waits for hydrations in flight, commits, then stops the threads. Callers
    /// stop their exports first so no request is in flight. Returns the commit's outcome.
    pub fn shutdown(&self) -> Result<(), IoError> {
        self.sh.stopped.store(true, Ordering::Release);
        let status = self.sh.control_wait(|token| Control::Suspend { token });
        {
            let mut t = lock(&self.sh.timer);
            t.stop = true;
        }
        self.sh.timer_cv.notify_all();
        let threads = std::mem::take(&mut *lock(&self.threads));
        for _ in 0..threads.len() {
            let _ = self.sh.jobs.send(Job::Stop);
        }
        for t in threads {
            let _ = t.join();
        }
        IoError::check(status)
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    match std::thread::Builder::new().name(name.to_string()).spawn(f) {
        Ok(h) => h,
        // Without its threads the volume cannot work at all: nothing sensible to continue.
        Err(e) => panic!("cannot start thread {name}: {e}"),
    }
}

fn copy_loop(sh: &Shared, rx: &Receiver<Job>) {
    loop {
        match rx.recv() {
            Ok(Job::Run(action)) => sh.run_job(&action),
            Ok(Job::Piece(split, offset, len)) => sh.run_piece(&split, offset, len),
            Ok(Job::Fill(f)) => sh.run_fill(f),
            Ok(Job::Stop) | Err(_) => return,
        }
    }
}

fn timer_loop(sh: &Shared) {
    loop {
        {
            let mut t = lock(&sh.timer);
            loop {
                if t.stop {
                    return;
                }
                let now = sh.clock.now();
                match t.deadline {
                    Some(d) if d <= now => {
                        t.deadline = None;
                        break;
                    }
                    Some(d) => {
                        let wait = Duration::from_nanos(d - now).min(Duration::from_secs(1));
                        t = sh
                            .timer_cv
                            .wait_timeout(t, wait)
                            .map(|(g, _)| g)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                    None => {
                        t = sh
                            .timer_cv
                            .wait_timeout(t, Duration::from_secs(1))
                            .map(|(g, _)| g)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                }
            }
        }
        let acts = sh.apply(Input::Tick);
        sh.dispatch(acts, None, &mut ReqBuf::None);
    }
}

/// The one forwarding from an export to the clone: NBD, FUSE and ublk all call these.
impl BlockExport for Volume {
    fn size_bytes(&self) -> u64 {
        self.size_bytes()
    }

    fn caps(&self) -> ExportCaps {
        ExportCaps {
            logical_block_size: self.logical_block_size(),
            granularity: self.sh.geometry.region_bytes(),
            flush: true,
            fua: true,
            // Discard is always accepted, as the kernel target does (SPEC 1.3).
            discard: true,
            write_zeroes: true,
        }
    }

    /// Reads `buf.len()` bytes at `offset`. Never waits for hydration: unhydrated regions are
    /// read from the source.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let sh = &self.sh;
        let len = buf.len() as u64;
        self.timed(Op::Read, len, || {
            sh.check_range(offset, len)?;
            if sh.finalized.load(Ordering::Acquire) {
                return sh.dest.read_at(buf, offset).map_err(|e| IoError::of_io(&e));
            }
            sh.view.foreground_started(sh.clock.now());
            sh.note_read(offset, len);
            let source = read_lock(&sh.source);
            let devs = Devices {
                source: &**source,
                dest: &*sh.dest,
            };
            let r = read_routed(&sh.view, &sh.geometry, &devs, offset, buf);
            drop(source);
            sh.view.foreground_finished(sh.clock.now());
            IoError::check(r)?;
            sh.offer_fills(offset, buf);
            Ok(())
        })
    }

    /// Writes `data` at `offset`; with `fua`, completes only once the data and the metadata
    /// recording its region are durable.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), IoError> {
        let sh = &self.sh;
        let len = data.len() as u64;
        self.timed(Op::Write, len, || {
            sh.check_range(offset, len)?;
            if sh.finalized.load(Ordering::Acquire) {
                sh.dest
                    .write_at(data, offset)
                    .map_err(|e| IoError::of_io(&e))?;
                return if fua { sh.flush_dest() } else { Ok(()) };
            }
            if fast_write_ok(&sh.view, &sh.geometry, offset, len, fua) {
                // Hot path: a hydrated region is the destination's, nothing to decide.
                sh.view.foreground_started(sh.clock.now());
                let r = sh
                    .dest
                    .write_at(data, offset)
                    .map_err(|e| IoError::of_io(&e));
                sh.view.foreground_finished(sh.clock.now());
                return r;
            }
            sh.submit(Request::Write { offset, len, fua }, ReqBuf::Write(data))
        })
    }

    /// Flushes: every write completed before this call is durable, and so is the metadata
    /// that routes it.
    fn flush(&self) -> Result<(), IoError> {
        self.timed(Op::Flush, 0, || {
            if self.sh.finalized.load(Ordering::Acquire) {
                // Finalized, nothing is ever marked again: the destination's flush is all.
                return self.sh.flush_dest();
            }
            self.sh.submit(Request::Flush, ReqBuf::None)
        })
    }

    /// Discards `[offset, offset+len)`. Once finalized, the whole range is passed down to
    /// the destination (as dm-linear does) if the clone passes discards down, and otherwise
    /// it completes at once.
    fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let sh = &self.sh;
        self.timed(Op::Discard, len, || {
            if sh.finalized.load(Ordering::Acquire) {
                sh.check_range(offset, len)?;
                if !sh.discard_passdown {
                    return Ok(());
                }
                return sh.dest.discard(offset, len).map_err(|e| IoError::of_io(&e));
            }
            sh.submit(Request::Discard { offset, len }, ReqBuf::None)
        })
    }

    /// Makes `[offset, offset+len)` read as zeros.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), IoError> {
        let sh = &self.sh;
        self.timed(Op::WriteZeroes, len, || {
            if sh.finalized.load(Ordering::Acquire) {
                sh.check_range(offset, len)?;
                sh.dest
                    .write_zeroes(offset, len)
                    .map_err(|e| IoError::of_io(&e))?;
                return if fua { sh.flush_dest() } else { Ok(()) };
            }
            sh.submit(Request::WriteZeroes { offset, len, fua }, ReqBuf::None)
        })
    }
}

impl Shared {
    fn check_range(&self, offset: u64, len: u64) -> Result<(), IoError> {
        if self.geometry.is_valid_request(self.lbs, offset, len) {
            Ok(())
        } else {
            Err(IoError::Invalid)
        }
    }

    /// A read of `[offset, offset+len)` not finalized: tells the recorder, if there is one.
    fn note_read(&self, offset: u64, len: u64) {
        if let Some(r) = self.recorder.get() {
            r.note(self.view.map(), offset, len);
        }
    }

    fn flush_dest(&self) -> Result<(), IoError> {
        self.dest.flush().map_err(|e| IoError::of_io(&e))
    }

    /// Feeds the engine and returns what it wants done; re-arms the timer if needed. The
    /// foreground latency measured since the last call goes in first, so the copy window
    /// decides on it.
    fn apply(&self, input: Input) -> Vec<Action> {
        let now = self.clock.now();
        let (mean, requests) = self.metrics.take_foreground_latency();
        let mut e = lock(&self.engine);
        if requests > 0 {
            e.apply(now, Input::ForegroundLatency { mean, requests });
        }
        e.apply(now, input);
        let mut out = Vec::new();
        while let Some(a) = e.poll_action() {
            out.push(a);
        }
        let deadline = e.next_deadline();
        drop(e);
        if let Some(d) = deadline {
            let mut t = lock(&self.timer);
            if t.deadline.is_none_or(|x| d < x) {
                t.deadline = Some(d);
                drop(t);
                self.timer_cv.notify_one();
            }
        }
        out
    }

    /// Submits a request from the calling thread and runs it to its reply.
    fn submit(&self, req: Request, mut buf: ReqBuf<'_>) -> Result<(), IoError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let rx = MAILBOX.with(|(tx, rx)| {
            lock(&self.mailboxes).insert(id, tx.clone());
            rx.clone()
        });
        let acts = self.apply(Input::Request(id, req));
        let mut status = self.dispatch(acts, Some(id), &mut buf);
        while status.is_none() {
            status = match rx.recv() {
                Ok(Msg::Do(a)) => self.dispatch(vec![a], Some(id), &mut buf),
                Ok(Msg::Reply(s)) => Some(s),
                Err(_) => Some(IoStatus::Io),
            };
        }
        lock(&self.mailboxes).remove(&id);
        IoError::check(status.unwrap_or(IoStatus::Io))
    }

    fn control_wait(&self, make: impl FnOnce(u64) -> Control) -> IoStatus {
        let token = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = unbounded();
        lock(&self.tokens).insert(token, tx);
        let acts = self.apply(Input::Control(make(token)));
        self.dispatch(acts, None, &mut ReqBuf::None);
        rx.recv().unwrap_or(IoStatus::Io)
    }

    /// Runs a background copy on this (copy) thread and dispatches what its completion
    /// produces.
    fn run_job(&self, a: &Action) {
        if let Action::Copy {
            op, offset, len, ..
        } = *a
            && len > self.copy_mode.chunk
        {
            // Spread the pieces over the copy threads (this one takes the first).
            let chunk = self.copy_mode.chunk;
            let pieces = len.div_ceil(chunk);
            let split = Arc::new(SplitCopy {
                op,
                remaining: AtomicU64::new(pieces),
                failed: Mutex::new(IoStatus::Ok),
            });
            for i in 1..pieces {
                let o = i * chunk;
                let _ = self.jobs.send(Job::Piece(
                    Arc::clone(&split),
                    offset + o,
                    chunk.min(len - o),
                ));
            }
            self.run_piece(&split, offset, chunk);
            return;
        }
        if let Some(op) = op_of(a) {
            let status = self.execute(a, &mut ReqBuf::None);
            let acts = self.apply(Input::Completed(op, status));
            self.dispatch(acts, None, &mut ReqBuf::None);
        }
    }

    fn run_piece(&self, split: &SplitCopy, offset: u64, len: u64) {
        let source = read_lock(&self.source);
        let devs = Devices {
            source: &**source,
            dest: &*self.dest,
        };
        let st = self.copy(&devs, offset, len);
        drop(source);
        if !st.is_ok() {
            let mut f = lock(&split.failed);
            if f.is_ok() {
                *f = st;
            }
        }
        if split.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let status = *lock(&split.failed);
            let acts = self.apply(Input::Completed(split.op, status));
            self.dispatch(acts, None, &mut ReqBuf::None);
        }
    }

    /// Routes actions: this request's I/O runs here, another request's goes to its mailbox,
    /// background copies go to the copy threads, commits run here. Returns this request's
    /// reply if it came.
    fn dispatch(
        &self,
        acts: Vec<Action>,
        me: Option<ReqId>,
        buf: &mut ReqBuf<'_>,
    ) -> Option<IoStatus> {
        let mut q: VecDeque<Action> = acts.into();
        let mut mine = None;
        while let Some(a) = q.pop_front() {
            match a {
                Action::Reply { req, status } => {
                    if Some(req) == me {
                        mine = Some(status);
                    } else {
                        self.send(req, Msg::Reply(status));
                    }
                }
                Action::ControlDone { token, status } => {
                    if let Some(tx) = lock(&self.tokens).remove(&token) {
                        let _ = tx.send(status);
                    }
                }
                Action::Event(ev) => self.on_event(ev),
                a => {
                    let owner = owner_of(&a);
                    let background_copy = matches!(a, Action::Copy { owner: None, .. });
                    if owner.is_some() && owner != me {
                        if let Some(r) = owner {
                            self.send(r, Msg::Do(a));
                        }
                    } else if background_copy {
                        let _ = self.jobs.send(Job::Run(a));
                    } else if let Some(op) = op_of(&a) {
                        let status = self.execute(&a, buf);
                        q.extend(self.apply(Input::Completed(op, status)));
                    }
                }
            }
        }
        mine
    }

    /// Copies a range, recording why it failed.
    fn copy(&self, devs: &Devices<'_>, offset: u64, len: u64) -> IoStatus {
        match SCRATCH
            .with(|s| try_copy_range(devs, offset, len, self.copy_mode, &mut s.borrow_mut()))
        {
            Ok(done) => {
                self.metrics.copy(done);
                IoStatus::Ok
            }
            Err(f) => {
                let status = f.status();
                *lock(&self.last_copy_error) = Some(f.to_string());
                status
            }
        }
    }

    fn execute(&self, a: &Action, buf: &mut ReqBuf<'_>) -> IoStatus {
        let data = {
            // Held for this action's I/O only: a thread never takes it twice.
            let source = read_lock(&self.source);
            let devs = Devices {
                source: &**source,
                dest: &*self.dest,
            };
            if let Action::Copy { offset, len, .. } = *a {
                return self.copy(&devs, offset, len);
            }
            SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                execute_data(&devs, a, buf, self.copy_mode, &mut s)
            })
        };
        if let Some((st, _)) = data {
            return st;
        }
        let mut meta = lock(&self.meta);
        let t = Instant::now();
        let st = execute_metadata(&mut **meta, self.view.map(), a).unwrap_or(IoStatus::Invalid);
        if matches!(a, Action::CommitMetadata { .. }) {
            self.metrics.commit(t.elapsed(), st == IoStatus::Ok);
        }
        st
    }

    fn send(&self, req: ReqId, m: Msg) {
        match lock(&self.mailboxes).get(&req) {
            Some(tx) => {
                let _ = tx.send(m);
            }
            None => tracing::error!(req, "no mailbox for request (engine bug)"),
        }
    }

    fn on_event(&self, ev: Event) {
        match &ev {
            Event::ModeChanged(m) => {
                let name = match m {
                    Mode::ReadWrite => "read-write",
                    Mode::ReadOnly => "read-only",
                    Mode::Fail => "fail",
                };
                tracing::warn!("Switching to {name} mode");
            }
            Event::HydrationComplete => tracing::info!("hydration complete"),
            Event::CopyFailed {
                first,
                n,
                background,
            } => {
                let cause = lock(&self.last_copy_error).clone().unwrap_or_default();
                tracing::error!(first, n, background, "hydration failed: {cause}");
            }
            Event::MetadataOperationFailed { op } => {
                tracing::error!("Metadata operation `{op}' failed");
            }
        }
        lock(&self.subscribers).retain(|s| s.send(ev.clone()).is_ok());
    }
}
