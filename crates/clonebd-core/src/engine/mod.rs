//! The sans-IO clone engine: dm-clone's region state machine, hydration and commit protocol.
//!
//! The engine performs no I/O, reads no clock, spawns no thread and never touches payload
//! bytes. A driver feeds it [`Input`]s (requests, completions of the operations it asked
//! for, control commands, the passing of time) with [`Engine::apply`], and drains the
//! [`Action`]s it wants performed with [`Engine::poll_action`]. Everything it decides is
//! therefore reproducible from the sequence of inputs, which is what the model-based and
//! power-cut tests exploit.
//!
//! What the engine owns (SPEC sections 3, 4 and 5):
//! - request routing: reads of unhydrated regions go to the source, writes to an unhydrated
//!   region wait for its copy, a full-region write skips the copy, discards fast-hydrate the
//!   regions they cover wholly;
//! - one record per region with a hydration in flight, with the writes, discards and
//!   hydrate requests waiting on it (so a region is never copied twice at once, no user write
//!   reaches it before its copy, and a discard never races a copy: H1);
//! - the dirty set of the open transaction and the commit rounds (swap, destination flush,
//!   metadata commit), flush and FUA semantics, the periodic commit;
//! - background hydration (a wrapping scan offset, threshold, batching, priority to
//!   foreground I/O with guaranteed progress, a bandwidth limit, back-off on failures),
//!   and the hydration order queue copied before the scan;
//! - the metadata modes `rw`, `ro`, `fail` and their I/O matrix.
//!
//! The in-core hydration map lives in a [`SharedView`] so export threads can route reads and
//! plain writes of hydrated regions without entering the engine (the driver's fast path);
//! only the engine sets bits in it.

mod commit;
mod fill;
mod hydrate;
mod invariants;
mod order;
mod requests;
mod window;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use crate::bitmap::{DirtySet, HydrationMap};
use crate::geometry::{Geometry, RegionId};

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
/// multiples of the clone's logical block size, inside the clone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `offset` into the request's buffer.
    Read {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
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
    /// Read `len` bytes of the source at `offset` into request `req`'s buffer at `at`.
    ReadSource {
        /// Operation id.
        op: OpId,
        /// The request whose buffer receives the data.
        req: ReqId,
        /// Byte offset on the source.
        offset: u64,
        /// Length.
        len: u64,
        /// Offset into the request's buffer.
        at: u64,
    },
    /// Read `len` bytes of the destination at `offset` into request `req`'s buffer at `at`.
    ReadDest {
        /// Operation id.
        op: OpId,
        /// The request whose buffer receives the data.
        req: ReqId,
        /// Byte offset on the destination.
        offset: u64,
        /// Length.
        len: u64,
        /// Offset into the request's buffer.
        at: u64,
    },
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
    /// Regions hydrated in the open (uncommitted) transaction.
    pub nr_dirty: u64,
    /// Requests in flight inside the engine.
    pub requests_in_flight: u64,
}

/// Why a region is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlightKind {
    /// Copied from the source (background, for a write, or for a hydrate request).
    Copy,
    /// Written wholly by a user request.
    Overwrite,
    /// Written from the source's data a read returned (copy-on-read, [`Request::Fill`]).
    Fill,
}

/// A region with a hydration in flight, and who waits on it.
#[derive(Debug)]
struct Flight {
    op: OpId,
    kind: FlightKind,
    waiters: Vec<Waiter>,
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
    Read,
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
    /// Reads for a read request.
    Read { req: ReqId },
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

/// Commit round phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing to commit; a flush was passed down.
    Plain,
    /// Flushing the destination before the metadata.
    FlushingDest,
    /// Writing the metadata.
    Writing,
}

#[derive(Debug)]
struct Round {
    phase: Phase,
    op: OpId,
    /// The transaction being committed (until it is handed to the metadata write).
    dirty: Option<DirtySet>,
    /// Regions in the transaction (for invariants and `changed`).
    nr_dirty: u64,
    waiters: Vec<CommitWaiter>,
}

/// A hydrate request's range still to be scheduled.
#[derive(Debug)]
struct PriorityRange {
    req: ReqId,
    next: RegionId,
    end: RegionId,
}

/// The clone engine. See the module documentation.
#[derive(Debug)]
pub struct Engine {
    cfg: Config,
    view: Arc<SharedView>,
    now: Tick,
    mode: Mode,
    // Tunables (messages change them).
    enabled: bool,
    threshold: u32,
    batch: u32,
    rate_limit: u64,
    discard_passdown: bool,
    suspended: bool,
    suspend_token: Option<u64>,
    // Requests and operations.
    reqs: HashMap<ReqId, ReqState>,
    ops: HashMap<OpId, Op>,
    next_op: OpId,
    inflight: BTreeMap<RegionId, Flight>,
    // Transactions.
    current: DirtySet,
    commit_failed: bool,
    round: Option<Round>,
    next_round: Vec<CommitWaiter>,
    want_commit: bool,
    last_commit: Tick,
    completion_reported: bool,
    abort_pending: bool,
    // Hydration.
    offset: RegionId,
    /// Every region below it is hydrated (the map only gains bits, except on a reload).
    scan_floor: RegionId,
    bg_regions: u64,
    bg_jobs: u64,
    priority: VecDeque<PriorityRange>,
    priority_jobs: u64,
    /// The hydration order queue: region ranges `[next, end)` the background pass copies
    /// before it scans (see `order.rs`).
    first: VecDeque<(RegionId, RegionId)>,
    consecutive_failures: u32,
    not_before: Tick,
    tokens: i128,
    tokens_at: Tick,
    busy_limited: bool,
    window: CopyWindow,
    // Counters.
    copy_errors: u64,
    bytes_hydrated: u64,
    regions_filled: u64,
    fills_refused: u64,
    outbox: VecDeque<Action>,
}

impl Engine {
    /// A new engine over `view` (whose map holds the committed hydration state), at time
    /// `now`. Like a freshly constructed dm-clone target, it starts **suspended**: nothing
    /// hydrates in the background and no periodic commit runs until [`Control::Resume`].
    pub fn new(cfg: Config, view: Arc<SharedView>, now: Tick) -> Self {
        let completion_reported = view.map().is_complete();
        Self {
            enabled: cfg.hydration_enabled,
            threshold: cfg.hydration_threshold,
            batch: cfg.hydration_batch_size,
            rate_limit: cfg.hydration_rate_limit,
            discard_passdown: cfg.discard_passdown,
            cfg,
            view,
            now,
            mode: Mode::ReadWrite,
            suspended: true,
            suspend_token: None,
            reqs: HashMap::new(),
            ops: HashMap::new(),
            next_op: 1,
            inflight: BTreeMap::new(),
            current: DirtySet::new(),
            commit_failed: false,
            round: None,
            next_round: Vec::new(),
            want_commit: false,
            last_commit: now,
            completion_reported,
            abort_pending: false,
            offset: 0,
            scan_floor: 0,
            bg_regions: 0,
            bg_jobs: 0,
            priority: VecDeque::new(),
            priority_jobs: 0,
            first: VecDeque::new(),
            consecutive_failures: 0,
            not_before: 0,
            tokens: 0,
            tokens_at: now,
            busy_limited: false,
            window: CopyWindow::new(cfg.hydration_priority),
            copy_errors: 0,
            bytes_hydrated: 0,
            regions_filled: 0,
            fills_refused: 0,
            outbox: VecDeque::new(),
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
        self.mode
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
                self.window.observe(self.now, mean, requests);
            }
        }
        self.tick();
    }

    /// The next action to perform, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.outbox.pop_front()
    }

    /// When the engine next needs a [`Input::Tick`], if ever.
    pub fn next_deadline(&self) -> Option<Tick> {
        let mut d: Option<Tick> = None;
        let mut at = |t: Tick| d = Some(d.map_or(t, |x: Tick| x.min(t)));
        if !self.suspended && !self.current.is_empty() && self.mode == Mode::ReadWrite {
            at(self.last_commit.saturating_add(self.cfg.commit_interval));
        }
        if self.hydration_wanted() {
            if self.not_before > self.now {
                at(self.not_before);
            }
            if let Some(t) = self.rate_limit_deadline() {
                at(t);
            }
            if self.busy_limited {
                at(self.now.saturating_add(self.cfg.busy_window));
            }
        }
        d
    }

    /// A snapshot for status reports.
    pub fn status(&self) -> EngineStatus {
        let map = self.view.map();
        EngineStatus {
            mode: self.mode,
            nr_hydrated: map.nr_hydrated(),
            nr_regions: map.nr_regions(),
            hydrating: self.inflight.len() as u64,
            hydration_enabled: self.enabled,
            discard_passdown: self.discard_passdown,
            hydration_threshold: self.threshold,
            hydration_batch_size: self.batch,
            hydration_rate_limit: self.rate_limit,
            suspended: self.suspended,
            copy_errors: self.copy_errors,
            bytes_hydrated: self.bytes_hydrated,
            regions_filled: self.regions_filled,
            fills_refused: self.fills_refused,
            nr_dirty: self.current.len(),
            requests_in_flight: self.reqs.len() as u64,
        }
    }

    /// Whether nothing is in flight: no request, no operation, no commit round.
    pub fn is_idle(&self) -> bool {
        self.reqs.is_empty() && self.ops.is_empty() && self.round.is_none()
    }

    /// Whether the metadata changed in the open or the committing transaction (the kernel's
    /// `dm_clone_changed_this_transaction`), or a failed commit left it so.
    pub fn changed(&self) -> bool {
        !self.current.is_empty()
            || self.commit_failed
            || self.round.as_ref().is_some_and(|r| r.nr_dirty > 0)
    }

    // ----- internals shared by the submodules -----

    fn geometry(&self) -> &Geometry {
        &self.cfg.geometry
    }

    fn new_op(&mut self, op: Op) -> OpId {
        let id = self.next_op;
        self.next_op += 1;
        self.ops.insert(id, op);
        id
    }

    fn emit(&mut self, a: Action) {
        self.outbox.push_back(a);
    }

    fn set_mode(&mut self, mode: Mode) {
        if mode > self.mode {
            self.mode = mode;
            self.view.set_mode(mode);
            self.emit(Action::Event(Event::ModeChanged(mode)));
        }
    }

    /// Marks region `r` hydrated in core and in the open transaction.
    fn mark(&mut self, r: RegionId) {
        if self.view.map().set(r) {
            self.current.insert(r);
        }
    }

    fn control(&mut self, c: Control) {
        match c {
            Control::EnableHydration => self.enabled = true,
            Control::DisableHydration => self.enabled = false,
            Control::SetHydrationThreshold(n) => self.threshold = n,
            Control::SetHydrationBatchSize(n) => self.batch = n,
            Control::SetHydrationRateLimit(n) => {
                self.rate_limit = n;
                self.tokens = 0;
                self.tokens_at = self.now;
            }
            Control::HydrateFirst { offset, len, front } => {
                self.queue_first(offset, len, front);
            }
            Control::Commit { token } => {
                if self.suspended {
                    self.emit(Action::ControlDone {
                        token,
                        status: IoStatus::Ok,
                    });
                } else {
                    self.next_round.push(CommitWaiter::Token(token));
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
                    self.last_commit = self.now;
                }
            }
        }
    }

    /// Runs after every input: periodic commits, suspend completion, hydration.
    fn tick(&mut self) {
        if let Some(token) = self.suspend_token
            && self.inflight.is_empty()
            && self.reqs.is_empty()
            && self.round.is_none()
        {
            // Requests and hydrations drained (SPEC 4.5 step 3; the device-mapper core drains
            // user I/O before that): commit (step 5) and answer.
            self.suspend_token = None;
            self.next_round.push(CommitWaiter::Token(token));
            self.want_commit = true;
        }
        if !self.suspended
            && !self.current.is_empty()
            && self.now >= self.last_commit.saturating_add(self.cfg.commit_interval)
        {
            self.want_commit = true;
        }
        self.maybe_start_round();
        self.run_hydration();
    }
}

#[cfg(test)]
mod tests;
