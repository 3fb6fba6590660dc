//! The sans-IO clone engine: dm-clone's region state machine, hydration and commit protocol.
//!
//! The engine performs no I/O, reads no clock, spawns no thread and never touches payload
//! bytes. A driver feeds it [`Input`]s (requests, completions of the operations it asked
//! for, control commands, the passing of time) with [`Engine::apply`], and drains the
//! [`Action`]s it wants performed with [`Engine::poll_action`]. Everything it decides is
//! therefore reproducible from the sequence of inputs, which is what the model-based and
//! power-cut tests exploit.
//!
//! What the engine owns (SPEC sections 3, 4 and 5), part by part, each in its own file with
//! private state that the others change only through its methods:
//! - the regions (`regions.rs`): each region's state (cold, copying, filling, overwrite
//!   routed, overwriting, hydrated) behind one transition table, and the writes, discards and
//!   hydrate requests waiting on a busy region (so a region is never copied twice at once,
//!   no user write reaches it before its copy, and a discard never races a copy: H1); the
//!   only writer of the hydration map's bits;
//! - the hydrator (`hydrate.rs`, with `order.rs` and `window.rs`): background hydration (a
//!   wrapping scan offset, threshold, batching, priority to foreground I/O with guaranteed
//!   progress, a bandwidth limit, back-off on failures), the hydration order queue copied
//!   before the scan, and the queue of hydrate requests;
//! - the commit state (`commit.rs`): the metadata modes `rw`, `ro`, `fail`, the dirty set of
//!   the open transaction, the commit rounds (swap, destination flush, metadata commit) and
//!   who waits on them;
//! - the glue (this file, `requests.rs`, `fill.rs`): the requests in flight, routing (writes
//!   to an unhydrated region wait for its copy, a full-region write skips the copy, discards
//!   fast-hydrate the regions they cover wholly, fills hydrate from a read's data), flush
//!   and FUA semantics, the periodic commit, suspend, and the I/O matrix of the modes.
//!
//! Reads are not requests of the engine: they never wait (SPEC 3.1), so the driver routes
//! each run of regions lock-free from the shared map, hydrated runs from the destination and
//! the others from the source. The in-core hydration map lives in a [`SharedView`] so export
//! threads can route reads and plain writes of hydrated regions without entering the engine
//! (the driver's fast path); only the engine sets bits in it.

mod commit;
mod fill;
mod hydrate;
mod invariants;
mod order;
mod regions;
mod requests;
mod window;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use crate::bitmap::{DirtySet, HydrationMap};
use crate::geometry::{Geometry, RegionId};

use commit::Commit;
use hydrate::Hydrator;
use regions::Regions;

pub use invariants::Violation;
pub use window::{CopyWindow, HydrationPriority};

/// Monotonic time in nanoseconds, from the driver's clock.
pub type Tick = u64;
/// Identifies a request, chosen by the driver (unique among requests in flight).
pub type ReqId = u64;
/// Identifies an operation the engine asked for.
pub type OpId = u64;

/// Nanoseconds per millisecond.
pub const MS: Tick = 1_000_000;
/// Nanoseconds per second.
pub const SECOND: Tick = 1_000_000_000;

/// Outcome of a request or an operation. Each export maps it to its own error numbers once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoStatus {
    /// Success.
    Ok,
    /// An I/O error (EIO).
    Io,
    /// No space left (ENOSPC).
    NoSpace,
    /// An invalid request: out of range, misaligned or empty (EINVAL).
    Invalid,
    /// Refused because the metadata is read-only (EROFS/EPERM).
    ReadOnly,
    /// The operation is not supported (EOPNOTSUPP).
    NotSupported,
}

impl IoStatus {
    /// Whether this is [`IoStatus::Ok`].
    pub fn is_ok(self) -> bool {
        self == IoStatus::Ok
    }
}

/// The metadata mode (SPEC 5.7). Transitions are one-way: `ReadWrite -> ReadOnly -> Fail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// Normal operation.
    ReadWrite = 0,
    /// After a metadata failure: nothing new is hydrated or committed.
    ReadOnly = 1,
    /// After a failed abort or reload: every I/O fails.
    Fail = 2,
}

impl Mode {
    fn from_u8(v: u8) -> Mode {
        match v {
            0 => Mode::ReadWrite,
            1 => Mode::ReadOnly,
            _ => Mode::Fail,
        }
    }
}

/// A request from a user of the clone. Offsets and lengths are in bytes and must be
/// multiples of the clone's logical block size, inside the clone
/// ([`Geometry::is_valid_request`]). Reads are not among them: they never wait, and the
/// driver routes them from the [`SharedView`]'s map without the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Write the request's buffer (`len` bytes) at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Forced unit access: complete only once durable, metadata included.
        fua: bool,
    },
    /// Make `[offset, offset+len)` read as zeros: a write of zeros.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Forced unit access.
        fua: bool,
    },
    /// Make every completed write durable (a PREFLUSH).
    Flush,
    /// Discard `[offset, offset+len)`: regions covered wholly are hydrated without a copy.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Hydrate every region `[offset, offset+len)` touches, now (NBD CACHE).
    Hydrate {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Copy-on-read: the request's buffer holds the source's data of `[offset, offset+len)`,
    /// read for a read of regions not hydrated. Each region the range covers wholly (the
    /// short last region too, when the range reaches the end) that is still not hydrated
    /// and has no hydration in flight is written from the buffer to the destination and
    /// then marked, exactly as a copy would be; every other region is left alone (and so is
    /// every region while suspended or outside mode `rw`). Answered once its writes
    /// completed, with the first failed write's status or `Ok`; a failed write leaves its
    /// regions as they were, and the writes waiting on them are routed afresh.
    Fill {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// A control command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// `enable_hydration`.
    EnableHydration,
    /// `disable_hydration`.
    DisableHydration,
    /// `hydration_threshold N`: regions of background copies in flight.
    SetHydrationThreshold(u32),
    /// `hydration_batch_size N`: adjacent regions copied as one I/O.
    SetHydrationBatchSize(u32),
    /// Limit background hydration to this many bytes per second (0: no limit).
    SetHydrationRateLimit(u64),
    /// Hydrate the regions `[offset, offset+len)` touches before the rest of the background
    /// pass (`--hydrate-first`, the `hydrate_range` message). The range joins the hydration
    /// order queue at its front or its back; the queue is background hydration, so it obeys
    /// the enable flag, the threshold, the batch size and the bandwidth limit. The part of
    /// a range past the clone's end is ignored.
    HydrateFirst {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Before every range already queued (otherwise after them).
        front: bool,
    },
    /// Commit now if anything changed (what a status request does); answered with
    /// [`Action::ControlDone`] carrying `token`.
    Commit {
        /// Echoed in the answer.
        token: u64,
    },
    /// Stop background hydration, wait for hydrations in flight, commit; answered with
    /// [`Action::ControlDone`].
    Suspend {
        /// Echoed in the answer.
        token: u64,
    },
    /// Undo a suspend.
    Resume,
}

/// Where the data of a destination write comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteData {
    /// The request's buffer, from byte `at` of it.
    Buffer {
        /// Offset into the request's buffer.
        at: u64,
    },
    /// Zeros (write-zeroes).
    Zeroes,
}

/// Something the engine wants done. Every operation with an `op` must be answered with
/// [`Input::Completed`] exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write `len` bytes to the destination at `offset`.
    WriteDest {
        /// Operation id.
        op: OpId,
        /// The request the data belongs to.
        req: ReqId,
        /// Byte offset on the destination.
        offset: u64,
        /// Length.
        len: u64,
        /// The data.
        data: WriteData,
        /// Write with forced unit access.
        fua: bool,
    },
    /// Copy `[offset, offset+len)` from the source to the destination (a hydration).
    Copy {
        /// Operation id.
        op: OpId,
        /// Byte offset (the same on both devices).
        offset: u64,
        /// Length.
        len: u64,
        /// The request that needs this copy, if any (a background copy has none).
        owner: Option<ReqId>,
    },
    /// Discard `[offset, offset+len)` on the destination.
    DiscardDest {
        /// Operation id.
        op: OpId,
        /// The discard request.
        req: ReqId,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Flush the destination's volatile cache.
    FlushDest {
        /// Operation id.
        op: OpId,
    },
    /// Commit these regions to the metadata (set exactly these bits, write, flush,
    /// superblock, flush).
    CommitMetadata {
        /// Operation id.
        op: OpId,
        /// The regions hydrated in this transaction.
        dirty: DirtySet,
    },
    /// Abort the metadata transaction (reopen from the last committed superblock) and reload
    /// the hydration map from disk. Complete with `Ok`, or an error if either step failed.
    AbortMetadata {
        /// Operation id.
        op: OpId,
    },
    /// Complete request `req`.
    Reply {
        /// The request.
        req: ReqId,
        /// Its outcome.
        status: IoStatus,
    },
    /// Answer a [`Control::Commit`] or [`Control::Suspend`].
    ControlDone {
        /// The token given with the command.
        token: u64,
        /// Its outcome.
        status: IoStatus,
    },
    /// Something worth telling the operator.
    Event(Event),
}

/// Events raised for logs, metrics and `wait`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The metadata mode changed (the kernel logs `Switching to ... mode`).
    ModeChanged(Mode),
    /// A commit found every region hydrated (raised once).
    HydrationComplete,
    /// A copy of `n` regions from `first` failed.
    CopyFailed {
        /// First region.
        first: RegionId,
        /// Number of regions.
        n: u64,
        /// Whether it was a background copy (retried later with back-off).
        background: bool,
    },
    /// A metadata operation failed (SPEC 5.4 `metadata_operation_failed`).
    MetadataOperationFailed {
        /// The kernel's operation name.
        op: &'static str,
    },
}

/// Something that happened, fed to [`Engine::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A new request.
    Request(ReqId, Request),
    /// An operation the engine asked for completed.
    Completed(OpId, IoStatus),
    /// A control command.
    Control(Control),
    /// Time passed (the driver calls this at [`Engine::next_deadline`] at the latest).
    Tick,
    /// Client requests completed since the last report: `requests` of them, with a mean
    /// latency of `mean` nanoseconds. Background copies yield to a rising latency
    /// ([`HydrationPriority`]).
    ForegroundLatency {
        /// Mean latency of the requests, in nanoseconds.
        mean: Tick,
        /// How many requests.
        requests: u64,
    },
}

/// Engine settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// The clone's geometry.
    pub geometry: Geometry,
    /// The clone's logical block size in bytes (the larger of source's and destination's);
    /// request offsets and lengths must be multiples of it.
    pub logical_block_size: u32,
    /// Background hydration starts enabled (no `no_hydration`).
    pub hydration_enabled: bool,
    /// Pass discards down to the destination (no `no_discard_passdown`, and the destination
    /// can discard).
    pub discard_passdown: bool,
    /// Regions of background copies in flight at most (`hydration_threshold`).
    pub hydration_threshold: u32,
    /// Adjacent regions copied as one I/O (`hydration_batch_size`; 0 and 1 mean no batching).
    pub hydration_batch_size: u32,
    /// Background hydration bandwidth limit in bytes per second (0: none).
    pub hydration_rate_limit: u64,
    /// Commit at least this often while something changed (the kernel: 1 s).
    pub commit_interval: Tick,
    /// Foreground I/O within this window counts as "busy": background hydration then keeps
    /// in flight only what the copy window allows, instead of stopping (progress is
    /// guaranteed).
    pub busy_window: Tick,
    /// How background copies and client I/O trade while clients are active.
    pub hydration_priority: HydrationPriority,
    /// First back-off after a failed background copy; doubles per consecutive failure.
    pub retry_backoff_min: Tick,
    /// Longest back-off.
    pub retry_backoff_max: Tick,
    /// Largest single copy issued for a hydrate request, in bytes.
    pub priority_copy_bytes: u64,
    /// Copies in flight for hydrate requests at most.
    pub priority_copies_in_flight: u32,
}

impl Config {
    /// The kernel's defaults for `geometry`: hydration enabled, passdown on, threshold 1,
    /// batch 1, no rate limit, commits every second.
    pub fn new(geometry: Geometry) -> Self {
        Self {
            geometry,
            logical_block_size: 512,
            hydration_enabled: true,
            discard_passdown: true,
            hydration_threshold: 1,
            hydration_batch_size: 1,
            hydration_rate_limit: 0,
            commit_interval: SECOND,
            busy_window: 5 * MS,
            hydration_priority: HydrationPriority::Balanced,
            retry_backoff_min: 100 * MS,
            retry_backoff_max: 30 * SECOND,
            priority_copy_bytes: 4 << 20,
            priority_copies_in_flight: 8,
        }
    }
}

/// State shared between the engine (the only writer) and the threads that serve I/O.
#[derive(Debug)]
pub struct SharedView {
    map: HydrationMap,
    mode: AtomicU8,
    fg_in_flight: AtomicU64,
    fg_last: AtomicU64,
}

impl SharedView {
    /// A view over `map`, in mode `rw`.
    pub fn new(map: HydrationMap) -> Self {
        Self {
            map,
            mode: AtomicU8::new(Mode::ReadWrite as u8),
            fg_in_flight: AtomicU64::new(0),
            fg_last: AtomicU64::new(0),
        }
    }

    /// The hydration map (read it freely; only the engine and a metadata reload change it).
    pub fn map(&self) -> &HydrationMap {
        &self.map
    }

    /// The current metadata mode.
    pub fn mode(&self) -> Mode {
        Mode::from_u8(self.mode.load(Ordering::Acquire))
    }

    fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::Release);
    }

    /// A request served outside the engine started (the driver's fast path), at `now`.
    pub fn foreground_started(&self, now: Tick) {
        self.fg_in_flight.fetch_add(1, Ordering::AcqRel);
        self.fg_last.fetch_max(now, Ordering::AcqRel);
    }

    /// A request served outside the engine finished, at `now`.
    pub fn foreground_finished(&self, now: Tick) {
        self.fg_in_flight.fetch_sub(1, Ordering::AcqRel);
        self.fg_last.fetch_max(now, Ordering::AcqRel);
    }

    fn foreground_busy(&self, now: Tick, window: Tick) -> bool {
        // `fg_last` is 0 until the first foreground request: no request is not a recent one.
        let last = self.fg_last.load(Ordering::Acquire);
        self.fg_in_flight.load(Ordering::Acquire) > 0
            || (last > 0 && now < last.saturating_add(window))
    }
}

/// A snapshot of the engine for status reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineStatus {
    /// The metadata mode.
    pub mode: Mode,
    /// Hydrated regions (in core, including uncommitted ones).
    pub nr_hydrated: u64,
    /// Number of regions.
    pub nr_regions: u64,
    /// Regions with a hydration (copy or overwrite) in flight.
    pub hydrating: u64,
    /// Background hydration is enabled.
    pub hydration_enabled: bool,
    /// Discards are passed down.
    pub discard_passdown: bool,
    /// Current `hydration_threshold`.
    pub hydration_threshold: u32,
    /// Current `hydration_batch_size`.
    pub hydration_batch_size: u32,
    /// Current bandwidth limit (0: none).
    pub hydration_rate_limit: u64,
    /// Whether the engine is suspended.
    pub suspended: bool,
    /// Failed copies so far (all kinds).
    pub copy_errors: u64,
    /// Bytes copied from the source by completed copies.
    pub bytes_hydrated: u64,
    /// Regions hydrated by fills (copy-on-read), of those [`EngineStatus::bytes_hydrated`]
    /// counts.
    pub regions_filled: u64,
    /// Regions offered by fills and left alone: already hydrated, in flight, suspended, or
    /// not in mode `rw`.
    pub fills_refused: u64,
    /// Regions in the hydration order queue (`--hydrate-first`, `hydrate_range`), counted
    /// whole: some may have been hydrated meanwhile by other means.
    pub regions_queued: u64,
    /// Regions hydrated in the open (uncommitted) transaction.
    pub nr_dirty: u64,
    /// Requests in flight inside the engine.
    pub requests_in_flight: u64,
}

/// A write request's piece within one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Part {
    req: ReqId,
    offset: u64,
    len: u64,
    data: WriteData,
    fua: bool,
}

/// Something waiting for a region's hydration to finish.
#[derive(Debug, Clone, Copy)]
enum Waiter {
    /// A write piece, re-dispatched once the region is settled.
    Write(Part),
    /// A discard deferred because a hydration was in flight in its range (H1).
    Discard(ReqId),
    /// A hydrate request.
    Hydrate(ReqId),
}

/// What a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReqKind {
    Write,
    Flush,
    Discard { offset: u64, len: u64 },
    Hydrate,
    Fill,
}

#[derive(Debug)]
struct ReqState {
    kind: ReqKind,
    /// Outstanding pieces: operations, waits and commit rounds.
    pending: u64,
    /// First error seen.
    status: IoStatus,
    /// A FUA overwrite completed: the reply waits for the next commit.
    hold_for_commit: bool,
}

/// An operation in flight.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// Destination writes of a request covering `parts` pieces, none of which hydrates.
    Write { req: ReqId, parts: u64 },
    /// Destination writes that hydrate regions `[first, first+n)` (full-region writes).
    Overwrite {
        req: ReqId,
        first: RegionId,
        n: u64,
        fua: bool,
    },
    /// The destination write of a fill (copy-on-read) of regions `[first, first+n)`.
    Fill { req: ReqId, first: RegionId, n: u64 },
    /// A copy of regions `[first, first+n)`.
    Copy {
        first: RegionId,
        n: u64,
        origin: CopyOrigin,
    },
    /// A discard passed down.
    Discard { req: ReqId },
    /// A flush passed down with nothing to commit.
    PlainFlush { req: ReqId },
    /// The destination flush of a commit round.
    CommitFlush,
    /// The metadata write of a commit round.
    CommitWrite,
    /// An abort and reload after a failed commit.
    Abort,
}

/// Who started a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyOrigin {
    Background,
    Write,
    Priority,
}

/// Someone waiting for the next commit round.
#[derive(Debug, Clone, Copy)]
enum CommitWaiter {
    /// A flush request.
    Flush(ReqId),
    /// A FUA write piece to send once the metadata is committed.
    FuaWrite(Part),
    /// A request whose reply is held until the commit (FUA overwrite).
    HeldReply(ReqId),
    /// A control command.
    Token(u64),
}

/// The operations in flight and the actions not yet polled: every part issues its
/// operations here.
#[derive(Debug)]
struct Io {
    ops: HashMap<OpId, Op>,
    next_op: OpId,
    outbox: VecDeque<Action>,
}

impl Io {
    fn new() -> Self {
        Self {
            ops: HashMap::new(),
            next_op: 1,
            outbox: VecDeque::new(),
        }
    }

    /// Records a new operation in flight and returns its id.
    fn start(&mut self, op: Op) -> OpId {
        let id = self.next_op;
        self.next_op += 1;
        self.ops.insert(id, op);
        id
    }

    /// The operation `op` completed: forgets it.
    fn finish(&mut self, op: OpId) -> Option<Op> {
        self.ops.remove(&op)
    }

    fn get(&self, op: OpId) -> Option<&Op> {
        self.ops.get(&op)
    }

    fn emit(&mut self, a: Action) {
        self.outbox.push_back(a);
    }
}

/// Counters for status reports.
#[derive(Debug, Default)]
struct Counters {
    copy_errors: u64,
    bytes_hydrated: u64,
    regions_filled: u64,
    fills_refused: u64,
}

/// The clone engine. See the module documentation.
///
/// A composition of owned parts, each with its own state behind its own methods: the
/// regions (each region's state and waiters, one transition table), the hydrator (scan,
/// queues, limits, copy window) and the commit state (mode, dirty set, rounds, waiters),
/// plus the requests in flight and the glue that routes inputs between them.
#[derive(Debug)]
pub struct Engine {
    cfg: Config,
    view: Arc<SharedView>,
    now: Tick,
    io: Io,
    reqs: HashMap<ReqId, ReqState>,
    regions: Regions,
    hydrator: Hydrator,
    commit: Commit,
    discard_passdown: bool,
    suspended: bool,
    suspend_token: Option<u64>,
    counters: Counters,
}

impl Engine {
    /// A new engine over `view` (whose map holds the committed hydration state), at time
    /// `now`. Like a freshly constructed dm-clone target, it starts **suspended**: nothing
    /// hydrates in the background and no periodic commit runs until [`Control::Resume`].
    pub fn new(cfg: Config, view: Arc<SharedView>, now: Tick) -> Self {
        Self {
            regions: Regions::new(Arc::clone(&view)),
            hydrator: Hydrator::new(&cfg, now),
            commit: Commit::new(Arc::clone(&view), now),
            discard_passdown: cfg.discard_passdown,
            cfg,
            view,
            now,
            io: Io::new(),
            reqs: HashMap::new(),
            suspended: true,
            suspend_token: None,
            counters: Counters::default(),
        }
    }

    /// The shared view (hydration map and mode) for the fast path.
    pub fn view(&self) -> &Arc<SharedView> {
        &self.view
    }

    /// The engine's configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.commit.mode()
    }

    /// Feeds one input at time `now` (which must not go backwards).
    pub fn apply(&mut self, now: Tick, input: Input) {
        self.now = self.now.max(now);
        match input {
            Input::Request(req, r) => self.submit(req, r),
            Input::Completed(op, status) => self.complete(op, status),
            Input::Control(c) => self.control(c),
            Input::Tick => {}
            Input::ForegroundLatency { mean, requests } => {
                self.hydrator.observe(self.now, mean, requests);
            }
        }
        self.tick();
    }

    /// The next action to perform, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.io.outbox.pop_front()
    }

    /// When the engine next needs a [`Input::Tick`], if ever.
    pub fn next_deadline(&self) -> Option<Tick> {
        let mut d: Option<Tick> = None;
        let mut at = |t: Tick| d = Some(d.map_or(t, |x: Tick| x.min(t)));
        if !self.suspended
            && self.commit.mode() == Mode::ReadWrite
            && let Some(t) = self.commit.periodic_due(self.cfg.commit_interval)
        {
            at(t);
        }
        self.hydrator.deadlines(
            self.now,
            self.hydration_open(),
            self.cfg.busy_window,
            &mut at,
        );
        d
    }

    /// A snapshot for status reports.
    pub fn status(&self) -> EngineStatus {
        let map = self.view.map();
        EngineStatus {
            mode: self.commit.mode(),
            nr_hydrated: map.nr_hydrated(),
            nr_regions: map.nr_regions(),
            hydrating: self.regions.nr_busy(),
            hydration_enabled: self.hydrator.enabled(),
            discard_passdown: self.discard_passdown,
            hydration_threshold: self.hydrator.threshold(),
            hydration_batch_size: self.hydrator.batch(),
            hydration_rate_limit: self.hydrator.rate_limit(),
            suspended: self.suspended,
            copy_errors: self.counters.copy_errors,
            bytes_hydrated: self.counters.bytes_hydrated,
            regions_filled: self.counters.regions_filled,
            fills_refused: self.counters.fills_refused,
            regions_queued: self.hydrator.queued_regions(),
            nr_dirty: self.commit.nr_dirty(),
            requests_in_flight: self.reqs.len() as u64,
        }
    }

    /// Whether nothing is in flight: no request, no operation, no commit round.
    pub fn is_idle(&self) -> bool {
        self.reqs.is_empty() && self.io.ops.is_empty() && self.commit.is_idle()
    }

    /// Whether the metadata changed in the open or the committing transaction (the kernel's
    /// `dm_clone_changed_this_transaction`), or a failed commit left it so.
    pub fn changed(&self) -> bool {
        self.commit.changed()
    }

    /// Regions still in the hydration order queue.
    #[cfg(test)]
    fn queued_regions(&self) -> u64 {
        self.hydrator.queued_regions()
    }

    // ----- glue between the parts -----

    fn geometry(&self) -> &Geometry {
        &self.cfg.geometry
    }

    fn emit(&mut self, a: Action) {
        self.io.emit(a);
    }

    /// Whether the engine lets background hydration run: mode `rw`, not suspended, and
    /// something left to hydrate.
    fn hydration_open(&self) -> bool {
        self.commit.mode() == Mode::ReadWrite && !self.suspended && !self.view.map().is_complete()
    }

    fn control(&mut self, c: Control) {
        match c {
            Control::EnableHydration => self.hydrator.set_enabled(true),
            Control::DisableHydration => self.hydrator.set_enabled(false),
            Control::SetHydrationThreshold(n) => self.hydrator.set_threshold(n),
            Control::SetHydrationBatchSize(n) => self.hydrator.set_batch(n),
            Control::SetHydrationRateLimit(n) => self.hydrator.set_rate_limit(n, self.now),
            Control::HydrateFirst { offset, len, front } => {
                let g = self.cfg.geometry;
                self.hydrator.queue_first(&g, offset, len, front);
            }
            Control::Commit { token } => {
                if self.suspended {
                    self.emit(Action::ControlDone {
                        token,
                        status: IoStatus::Ok,
                    });
                } else {
                    self.commit.wait(CommitWaiter::Token(token));
                }
            }
            Control::Suspend { token } => {
                self.suspended = true;
                self.suspend_token = Some(token);
            }
            Control::Resume => {
                // A suspend in progress is finished first: a racing resume must not leave
                // its caller waiting for an answer that never comes.
                if self.suspend_token.is_none() {
                    self.suspended = false;
                    self.commit.restart_clock(self.now);
                }
            }
        }
    }

    /// Runs after every input: periodic commits, suspend completion, hydration.
    fn tick(&mut self) {
        if let Some(token) = self.suspend_token
            && self.regions.nr_busy() == 0
            && self.reqs.is_empty()
            && self.commit.is_idle()
        {
            // Requests and hydrations drained (SPEC 4.5 step 3; the device-mapper core drains
            // user I/O before that): commit (step 5) and answer.
            self.suspend_token = None;
            self.commit.wait(CommitWaiter::Token(token));
            self.commit.want();
        }
        if !self.suspended
            && self
                .commit
                .periodic_due(self.cfg.commit_interval)
                .is_some_and(|t| self.now >= t)
        {
            self.commit.want();
        }
        self.maybe_start_round();
        self.run_hydration();
    }

    // ----- commit glue -----

    /// Starts a commit round if one is wanted, or answers its waiters if none is needed.
    fn maybe_start_round(&mut self) {
        if let Some((waiters, status)) = self.commit.start_round(&mut self.io) {
            self.finish_waiters(waiters, status);
        }
    }

    /// A step of the running round completed.
    fn complete_round_step(&mut self, op: OpId, status: IoStatus) {
        match self.commit.step(op, status, self.now, &mut self.io) {
            None => return,
            Some(commit::Stepped::Continues) => {}
            Some(commit::Stepped::Finished(waiters, status)) => {
                self.finish_waiters(waiters, status)
            }
            Some(commit::Stepped::Failed(waiters, name)) => {
                self.metadata_operation_failed(name);
                self.finish_waiters(waiters, IoStatus::Io);
            }
        }
        self.maybe_start_round();
    }

    /// Answers everyone who waited for a round.
    fn finish_waiters(&mut self, waiters: Vec<CommitWaiter>, status: IoStatus) {
        for w in waiters {
            match w {
                CommitWaiter::Flush(req) | CommitWaiter::HeldReply(req) => {
                    self.settle(req, 1, status)
                }
                CommitWaiter::FuaWrite(part) => {
                    if status.is_ok() {
                        self.issue_after_commit(part);
                    } else {
                        self.settle(part.req, 1, status);
                    }
                }
                CommitWaiter::Token(token) => self.emit(Action::ControlDone { token, status }),
            }
        }
    }

    /// SPEC 5.4 `metadata_operation_failed`: log, go read-only, fail the hydrate requests
    /// not yet scheduled, abort and reload.
    fn metadata_operation_failed(&mut self, name: &'static str) {
        self.commit.operation_failed(name, &mut self.io);
        self.fail_priority(IoStatus::Io);
        self.commit.abort(&mut self.io);
    }

    /// The abort and reload finished.
    fn complete_abort(&mut self, status: IoStatus) {
        self.commit.abort_done(status, &mut self.io);
        // The reload may have cleared bits anywhere.
        self.hydrator.restart_scan();
        self.maybe_start_round();
    }

    // ----- hydration glue -----

    /// Runs the hydrate requests and the background pass.
    fn run_hydration(&mut self) {
        self.run_priority();
        let busy =
            !self.reqs.is_empty() || self.view.foreground_busy(self.now, self.cfg.busy_window);
        let open = self.hydration_open();
        let Some(mut pass) = self.hydrator.begin_pass(self.now, open, busy) else {
            return;
        };
        let g = self.cfg.geometry;
        while let Some((first, n)) = self.hydrator.next_background(&mut pass, &self.regions, &g) {
            self.start_copy(first, n, CopyOrigin::Background, None);
        }
    }

    /// Schedules copies for hydrate requests, in arrival order.
    fn run_priority(&mut self) {
        if self.commit.mode() != Mode::ReadWrite {
            self.fail_priority(IoStatus::ReadOnly);
            return;
        }
        let g = self.cfg.geometry;
        let per_copy = self.hydrator.request_copy_regions(&g);
        while let Some((req, mut next, end)) = self.hydrator.next_request() {
            // Skip hydrated regions; wait on regions already in flight.
            while next < end {
                if self.regions.is_hydrated(next) {
                    next += 1;
                } else if self.regions.wait(next, Waiter::Hydrate(req)).is_ok() {
                    self.hold(req, 1);
                    next += 1;
                } else {
                    break;
                }
            }
            if next >= end {
                self.hydrator.request_scheduled();
                self.settle(req, 1, IoStatus::Ok);
                continue;
            }
            let n = self.regions.cold_run(next, per_copy, end);
            self.start_copy(next, n, CopyOrigin::Priority, None);
            self.hydrator.request_copy_started(next + n);
            for r in next..next + n {
                let queued = self.regions.wait(r, Waiter::Hydrate(req));
                debug_assert!(queued.is_ok(), "the region is busy");
            }
            self.hold(req, n);
        }
    }

    /// Fails every hydrate request not yet fully scheduled.
    fn fail_priority(&mut self, status: IoStatus) {
        for req in self.hydrator.take_requests() {
            self.settle(req, 1, status);
        }
    }
}

#[cfg(test)]
mod tests;
