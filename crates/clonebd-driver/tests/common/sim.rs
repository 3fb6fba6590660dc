//! A deterministic simulation of a whole clone: the engine, the driver's fast path and
//! action execution (the same `clonebd_driver::exec` functions the threaded driver runs),
//! simulated disks with volatile caches, injected faults and power cuts, and an oracle.
//!
//! One thread, no clock: every step is chosen by a [`SimOp`] (from a seeded RNG or from
//! proptest), so a failure replays from its seed or shrinks to a minimal sequence.
//!
//! The oracle tracks, for every 512-byte block, the values written to it in order: the
//! source's content first, then each submitted write, write-zeroes or discard. A client of
//! ours never has two overlapping mutations in flight (the generator ensures it), so each
//! block's history is linear. It checks:
//! - a read returns the last completed value, or the value of a mutation still in flight;
//! - after a power cut (and after the metadata goes read-only, which reloads the committed
//!   bitmap), each block reads as a value no older than the last one made durable by an
//!   acknowledged flush or FUA write: never older data, never source data under a durable
//!   write, never the destination's initial garbage (so a region wrongly recorded as hydrated
//!   is caught);
//! - the source is never written;
//! - copy-on-read: a fast-path read may offer the source's data of the cold regions it
//!   covered as fills, submitted at a later step (so writes, copies, commits and power cuts
//!   race them); a fill taken over a region a write owns would show as older data;
//! - the engine's invariants hold after every step.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;

use clonebd_core::engine::{
    Action, Config, Control, Engine, Input, IoStatus, MS, Mode, ReqId, Request, SharedView, Tick,
};
use clonebd_core::{AlignedBuf, BlockDev, Geometry, HydrationMap};
use clonebd_driver::MetadataBackend;
use clonebd_driver::exec::{
    CopyDone, Devices, ReqBuf, SPARSE_COPY, execute_data, execute_metadata, fast_write_ok,
    fill_runs, op_of, read_routed,
};
use clonebd_testkit::{CutStyle, FaultOp, Rng, SimDisk};

const BLOCK: u64 = 512;

/// Opens metadata on a (simulated) metadata disk.
pub trait MetaFactory {
    /// Opens (formatting if blank) and loads the committed hydration map.
    fn open(
        &self,
        disk: &SimDisk,
        g: Geometry,
    ) -> Result<(Box<dyn MetadataBackend>, HydrationMap), String>;
    /// Checks the metadata on the disk; `Err` lists the problems.
    fn check(&self, disk: &SimDisk, g: Geometry) -> Result<(), String>;
}

/// What a block may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Val {
    /// The source's content.
    Src,
    /// Zeros.
    Zero,
    /// Data of write number n.
    Data(u64),
    /// Anything (discarded: the destination returns zeros, garbage or stale data).
    Any,
}

#[derive(Debug, Clone)]
struct Hist {
    vals: Vec<Val>,
    /// Index of the last completed value.
    completed: usize,
    /// Index of the last durable value.
    durable: usize,
    /// A mutation is in flight (its value is `vals.last()`).
    inflight: bool,
    /// The oldest mutation that failed since the last completed one: the block may hold the
    /// value of any mutation from there on instead of `vals[completed]`.
    alt: Option<usize>,
}

impl Hist {
    fn fresh(v: Val) -> Self {
        Self {
            vals: vec![v],
            completed: 0,
            durable: 0,
            inflight: false,
            alt: None,
        }
    }
}

/// What a request in flight is, for the oracle.
#[derive(Debug)]
struct SimReq {
    kind: Kind,
    offset: u64,
    len: u64,
    buf: Vec<u8>,
    /// For flushes: each block's completed index when the flush was submitted.
    cover: Vec<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write { fua: bool },
    Zeroes { fua: bool },
    Flush,
    Discard,
    Hydrate,
    Fill,
}

/// One step of a simulation.
#[derive(Debug, Clone)]
pub enum SimOp {
    /// Submit a request of kind `k` (0..=7) at block `b` with `n` blocks (clipped, aligned).
    Submit { k: u8, b: u64, n: u64 },
    /// Complete the pending action at index `i % pending`.
    Complete { i: usize },
    /// Let time pass.
    Tick { dt: Tick },
    /// A control message (0..=4) with an argument.
    Control { c: u8, v: u32 },
    /// Fail the next operation of kind `op` (0..=4) on a device (0 source, 1 dest, 2 meta).
    Fault { dev: u8, op: u8 },
    /// Cut the power and reopen.
    Crash { style: u8 },
    /// Submit the copy-on-read fill offered by an earlier read, at index `i % offered`.
    Fill { i: usize },
}

/// Simulation settings.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    /// Clone length in sectors.
    pub target_sectors: u64,
    /// Region size in sectors.
    pub region_sectors: u64,
    /// Metadata disk size in bytes.
    pub meta_bytes: u64,
    /// Pass discards down.
    pub passdown: bool,
    /// Start with background hydration enabled, with this threshold and batch.
    pub hydration: Option<(u32, u32)>,
    /// Inject faults (otherwise `Fault` steps are ignored and any error fails the run).
    pub faults: bool,
}

/// A simulated clone.
pub struct Sim<'f> {
    pub rng: Rng,
    now: Tick,
    g: Geometry,
    cfg: SimConfig,
    factory: &'f dyn MetaFactory,
    source: SimDisk,
    dest: SimDisk,
    meta_disk: SimDisk,
    engine: Engine,
    view: Arc<SharedView>,
    meta: Box<dyn MetadataBackend>,
    pending: Vec<Action>,
    /// Fills offered by reads and not yet submitted: `(offset, the source's bytes)`.
    fills: Vec<(u64, Vec<u8>)>,
    reqs: HashMap<ReqId, SimReq>,
    next_id: u64,
    blocks: Vec<Hist>,
    src: Vec<u8>,
    scratch: AlignedBuf,
    /// The read-only transition was settled (drained and re-observed).
    ro_settled: bool,
    faults_enabled: bool,
    trace: bool,
    /// Counters, for reporting.
    pub stats: SimStats,
}

/// What a simulation did.
#[derive(Debug, Default, Clone, Copy)]
pub struct SimStats {
    pub requests: u64,
    pub replies_ok: u64,
    pub replies_err: u64,
    pub crashes: u64,
    pub ro_transitions: u64,
    pub reads_checked: u64,
    /// What copies did (bytes copied, zeroed, and zeroed unread).
    pub copies: CopyDone,
}

fn data_of(id: u64, block: u64) -> [u8; BLOCK as usize] {
    let mut r = Rng::new(id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ block);
    let mut b = [0u8; BLOCK as usize];
    r.fill(&mut b);
    // Make the write id visible in a dump.
    b[..8].copy_from_slice(&id.to_le_bytes());
    b
}

impl<'f> Sim<'f> {
    /// A new simulation; the destination starts full of garbage, the source of random data
    /// with holes and zeros.
    pub fn new(seed: u64, cfg: SimConfig, factory: &'f dyn MetaFactory) -> Result<Self, String> {
        let mut rng = Rng::new(seed);
        let g = Geometry::new(cfg.target_sectors, cfg.region_sectors).map_err(|e| e.to_string())?;
        let size = g.target_bytes() as usize;
        let mut src = vec![0u8; size];
        rng.fill(&mut src);
        // A sparse source, so that copies take every path of a sparse copy: regions that
        // are holes (known zero, never read), regions of written zeros (read, then zeroed),
        // regions half zeros (written and zeroed in runs), the rest data.
        let rb = g.region_bytes() as usize;
        let mut holes = Vec::new();
        for (i, region) in src.chunks_mut(rb).enumerate() {
            match rng.below(8) {
                0 | 1 => holes.push(i),
                2 => region.fill(0),
                3 => {
                    let half = region.len() / 2;
                    region[half..].fill(0);
                }
                _ => {}
            }
        }
        for &i in &holes {
            let end = ((i + 1) * rb).min(size);
            src[i * rb..end].fill(0);
        }
        let mut garbage = vec![0u8; size];
        rng.fill(&mut garbage);
        let source = SimDisk::from_bytes("source", src.clone());
        for &i in &holes {
            let end = ((i + 1) * rb).min(size);
            source.make_hole((i * rb) as u64, (end - i * rb) as u64);
        }
        let dest = SimDisk::from_bytes("dest", garbage);
        let meta_disk = SimDisk::new("meta", cfg.meta_bytes);
        let (meta, map) = factory.open(&meta_disk, g)?;
        let view = Arc::new(SharedView::new(map));
        let engine = Engine::new(Self::engine_config(g, cfg), Arc::clone(&view), 0);
        let nblocks = (g.target_bytes() / BLOCK) as usize;
        let mut s = Self {
            rng,
            now: 0,
            g,
            cfg,
            factory,
            source,
            dest,
            meta_disk,
            engine,
            view,
            meta,
            pending: Vec::new(),
            fills: Vec::new(),
            reqs: HashMap::new(),
            next_id: 1,
            blocks: vec![Hist::fresh(Val::Src); nblocks],
            src,
            scratch: AlignedBuf::new(0),
            ro_settled: false,
            faults_enabled: cfg.faults,
            trace: std::env::var_os("CLONEBD_SIM_TRACE").is_some(),
            stats: SimStats::default(),
        };
        s.input(Input::Control(Control::Resume))?;
        Ok(s)
    }

    fn engine_config(g: Geometry, cfg: SimConfig) -> Config {
        let mut c = Config::new(g);
        c.discard_passdown = cfg.passdown;
        match cfg.hydration {
            Some((t, b)) => {
                c.hydration_enabled = true;
                c.hydration_threshold = t;
                c.hydration_batch_size = b;
            }
            None => c.hydration_enabled = false,
        }
        c
    }

    /// A random step, weighted towards useful work.
    pub fn random_op(&mut self) -> SimOp {
        let nblocks = self.blocks.len() as u64;
        let rpb = self.g.region_bytes() / BLOCK;
        let r = &mut self.rng;
        match r.below(100) {
            0..=34 => {
                let k = r.below(8) as u8;
                let shape = r.below(4);
                let (b, n) = match shape {
                    // Whole regions (full-region overwrites, covered discards).
                    0 => {
                        let first = r.below(nblocks / rpb) * rpb;
                        (first, rpb * r.range(1, 3))
                    }
                    // Anywhere, small.
                    1 | 2 => (r.below(nblocks), r.range(1, rpb.max(2))),
                    // Larger, across regions.
                    _ => (r.below(nblocks), r.range(1, 4 * rpb)),
                };
                SimOp::Submit { k, b, n }
            }
            35..=39 => SimOp::Fill {
                i: r.below(1 << 16) as usize,
            },
            40..=79 => SimOp::Complete {
                i: r.below(1 << 16) as usize,
            },
            80..=89 => SimOp::Tick {
                dt: r.range(1, 1500) * MS,
            },
            90..=93 => SimOp::Control {
                c: r.below(5) as u8,
                v: r.below(9) as u32,
            },
            94..=97 => SimOp::Fault {
                dev: r.below(3) as u8,
                op: r.below(4) as u8,
            },
            _ => SimOp::Crash {
                style: r.below(3) as u8,
            },
        }
    }

    /// Runs one step, then settles a mode change if one happened.
    pub fn step(&mut self, op: SimOp) -> Result<(), String> {
        if self.trace {
            eprintln!(
                "t={}ms {op:?} pending={} mode={:?}",
                self.now / MS,
                self.pending.len(),
                self.engine.mode()
            );
        }
        self.step_inner(op)?;
        self.after_step()
    }

    fn after_step(&mut self) -> Result<(), String> {
        if self.engine.mode() == Mode::ReadOnly && !self.ro_settled {
            // The failed commit reloaded the committed bitmap: regions hydrated in the lost
            // transaction read from the source again. Let everything in flight finish, then
            // learn what each block now reads (it must still be no older than durable).
            self.drain()?;
            if self.engine.mode() == Mode::ReadOnly {
                self.collapse("after going read-only", false)?;
                self.ro_settled = true;
                self.stats.ro_transitions += 1;
            }
        }
        if self.engine.mode() == Mode::Fail {
            // Only a new start leaves fail mode.
            self.crash(CutStyle::Random)?;
        }
        Ok(())
    }

    fn step_inner(&mut self, op: SimOp) -> Result<(), String> {
        match op {
            SimOp::Submit { k, b, n } => self.submit(k, b, n),
            SimOp::Complete { i } => {
                if self.pending.is_empty() {
                    return Ok(());
                }
                let a = self.pending.swap_remove(i % self.pending.len());
                self.run(a)
            }
            SimOp::Tick { dt } => {
                self.now += dt;
                self.input(Input::Tick)
            }
            SimOp::Control { c, v } => {
                let ctl = match c {
                    0 => Control::EnableHydration,
                    1 => Control::DisableHydration,
                    2 => Control::SetHydrationThreshold(v),
                    3 => Control::SetHydrationBatchSize(v),
                    // The hydration order queue: three regions from region 4v, at the front
                    // for odd v (a range past the end is clipped).
                    4 => Control::HydrateFirst {
                        offset: u64::from(v) * 4 * self.g.region_bytes(),
                        len: 3 * self.g.region_bytes(),
                        front: v % 2 == 1,
                    },
                    _ => Control::Commit { token: 0 },
                };
                self.input(Input::Control(ctl))
            }
            SimOp::Fault { .. } if !self.faults_enabled => Ok(()),
            SimOp::Fault { dev, op } => {
                let d = match dev {
                    0 => &self.source,
                    1 => &self.dest,
                    _ => &self.meta_disk,
                };
                let fop = match op {
                    0 => FaultOp::Read,
                    1 => FaultOp::Write,
                    2 => FaultOp::Flush,
                    _ => FaultOp::Discard,
                };
                d.inject_fault(fop, None, Some(1), std::io::ErrorKind::Other);
                Ok(())
            }
            SimOp::Fill { i } => {
                if self.fills.is_empty() {
                    return Ok(());
                }
                let (offset, buf) = self.fills.swap_remove(i % self.fills.len());
                self.submit_fill(offset, buf)
            }
            SimOp::Crash { style } => {
                let style = match style {
                    0 => CutStyle::LoseAll,
                    1 => CutStyle::KeepAll,
                    _ => CutStyle::Random,
                };
                self.crash(style)
            }
        }
    }

    /// Completes everything pending (in a random order) so the clone is quiet.
    pub fn drain(&mut self) -> Result<(), String> {
        let mut guard = 0;
        while !self.pending.is_empty() {
            let i = self.rng.below(self.pending.len() as u64) as usize;
            let a = self.pending.swap_remove(i);
            self.run(a)?;
            guard += 1;
            if guard > 1_000_000 {
                return Err("drain does not terminate".into());
            }
        }
        Ok(())
    }

    /// Hydrates everything (enables hydration, lets time pass) and checks every block.
    pub fn finish(&mut self) -> Result<(), String> {
        self.dest.clear_faults();
        self.meta_disk.clear_faults();
        self.source.clear_faults();
        self.drain()?;
        self.after_step()?;
        if self.engine.mode() != Mode::ReadWrite {
            self.crash(CutStyle::KeepAll)?;
        }
        self.input(Input::Control(Control::EnableHydration))?;
        self.input(Input::Control(Control::SetHydrationThreshold(8)))?;
        for _ in 0..10_000 {
            self.drain()?;
            if self.view.map().is_complete() {
                break;
            }
            self.now += 200 * MS;
            self.input(Input::Tick)?;
        }
        if !self.view.map().is_complete() {
            return Err("hydration did not complete".into());
        }
        self.collapse("after full hydration", false)
    }

    fn input(&mut self, i: Input) -> Result<(), String> {
        self.engine.apply(self.now, i);
        self.engine.check_invariants().map_err(|v| v.to_string())?;
        let mut replies = Vec::new();
        while let Some(a) = self.engine.poll_action() {
            match a {
                Action::Reply { req, status } => replies.push((req, status)),
                Action::ControlDone { .. } | Action::Event(_) => {}
                a => self.pending.push(a),
            }
        }
        for (req, st) in replies {
            self.on_reply(req, st)?;
        }
        Ok(())
    }

    fn run(&mut self, a: Action) -> Result<(), String> {
        let Some(op) = op_of(&a) else { return Ok(()) };
        if self.trace {
            eprintln!("    run {a:?}");
        }
        let owner = clonebd_driver::exec::owner_of(&a);
        let devs = Devices {
            source: &self.source,
            dest: &self.dest,
        };
        let status = match owner.and_then(|r| self.reqs.get_mut(&r)) {
            Some(req) => {
                let mut buf = match req.kind {
                    Kind::Write { .. } | Kind::Fill => ReqBuf::Write(&req.buf),
                    _ => ReqBuf::None,
                };
                execute_data(&devs, &a, &mut buf, SPARSE_COPY, &mut self.scratch)
            }
            None => execute_data(&devs, &a, &mut ReqBuf::None, SPARSE_COPY, &mut self.scratch),
        };
        let status = match status {
            Some((s, done)) => {
                self.stats.copies.add(done);
                s
            }
            None => {
                execute_metadata(&mut *self.meta, self.view.map(), &a).unwrap_or(IoStatus::Invalid)
            }
        };
        self.input(Input::Completed(op, status))
    }

    fn block_range(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        (offset / BLOCK) as usize..((offset + len) / BLOCK) as usize
    }

    fn submit(&mut self, k: u8, b: u64, n: u64) -> Result<(), String> {
        let nblocks = self.blocks.len() as u64;
        let b = b % nblocks;
        let n = n.clamp(1, nblocks - b);
        let (offset, len) = (b * BLOCK, n * BLOCK);
        let kind = match k {
            0 | 1 => Kind::Read,
            2 | 3 => Kind::Write { fua: false },
            4 => Kind::Write { fua: true },
            5 => Kind::Flush,
            6 => {
                if self.rng.chance(1, 2) {
                    Kind::Discard
                } else {
                    Kind::Zeroes {
                        fua: self.rng.chance(1, 3),
                    }
                }
            }
            _ => Kind::Hydrate,
        };
        let mutates = matches!(
            kind,
            Kind::Write { .. } | Kind::Zeroes { .. } | Kind::Discard
        );
        if mutates
            && self.blocks[self.block_range(offset, len)]
                .iter()
                .any(|h| h.inflight)
        {
            // A sane client never has two overlapping writes in flight.
            return Ok(());
        }
        self.stats.requests += 1;
        let id = self.next_id;
        self.next_id += 1;
        match kind {
            Kind::Read => {
                // Reads never enter the engine: the driver routes them from the shared map.
                let mut buf = vec![0u8; len as usize];
                let devs = Devices {
                    source: &self.source,
                    dest: &self.dest,
                };
                let st = read_routed(&self.view, &self.g, &devs, offset, &mut buf);
                if st.is_ok() {
                    self.check_read(offset, &buf, "fast-path read")?;
                    if self.engine.mode() == Mode::ReadWrite {
                        self.offer_fills(offset, &buf);
                    }
                } else {
                    self.note_error(st)?;
                }
                Ok(())
            }
            Kind::Write { fua } => {
                let mut buf = Vec::with_capacity(len as usize);
                for blk in b..b + n {
                    buf.extend_from_slice(&data_of(id, blk));
                }
                for blk in self.block_range(offset, len) {
                    let h = &mut self.blocks[blk];
                    h.vals.push(Val::Data(id));
                    h.inflight = true;
                }
                if fast_write_ok(&self.view, &self.g, offset, len, fua) {
                    // The driver's fast path: straight to the destination.
                    let st = match self.dest.write_at(&buf, offset) {
                        Ok(()) => IoStatus::Ok,
                        Err(e) => clonebd_driver::exec::status_of(&e),
                    };
                    self.reqs.insert(
                        id,
                        SimReq {
                            kind,
                            offset,
                            len,
                            buf: vec![],
                            cover: vec![],
                        },
                    );
                    return self.on_reply(id, st);
                }
                self.reqs.insert(
                    id,
                    SimReq {
                        kind,
                        offset,
                        len,
                        buf,
                        cover: vec![],
                    },
                );
                self.input(Input::Request(id, Request::Write { offset, len, fua }))
            }
            Kind::Zeroes { fua } => {
                for blk in self.block_range(offset, len) {
                    let h = &mut self.blocks[blk];
                    h.vals.push(Val::Zero);
                    h.inflight = true;
                }
                self.reqs.insert(
                    id,
                    SimReq {
                        kind,
                        offset,
                        len,
                        buf: vec![],
                        cover: vec![],
                    },
                );
                self.input(Input::Request(
                    id,
                    Request::WriteZeroes { offset, len, fua },
                ))
            }
            Kind::Discard => {
                // Only wholly covered regions change (SPEC 3.6).
                let (rs, nr) = self.g.covered_regions(offset, len);
                let (s, e) = if nr > 0 {
                    self.g.regions_byte_range(rs, nr)
                } else {
                    (0, 0)
                };
                if nr > 0 {
                    for blk in self.block_range(s, e - s) {
                        let h = &mut self.blocks[blk];
                        h.vals.push(Val::Any);
                        h.inflight = true;
                    }
                }
                self.reqs.insert(
                    id,
                    SimReq {
                        kind,
                        offset: s,
                        len: e - s,
                        buf: vec![],
                        cover: vec![],
                    },
                );
                self.input(Input::Request(id, Request::Discard { offset, len }))
            }
            Kind::Flush => {
                let cover = self.blocks.iter().map(|h| h.completed).collect();
                self.reqs.insert(
                    id,
                    SimReq {
                        kind,
                        offset: 0,
                        len: 0,
                        buf: vec![],
                        cover,
                    },
                );
                self.input(Input::Request(id, Request::Flush))
            }
            Kind::Hydrate => {
                self.reqs.insert(
                    id,
                    SimReq {
                        kind,
                        offset,
                        len,
                        buf: vec![],
                        cover: vec![],
                    },
                );
                self.input(Input::Request(id, Request::Hydrate { offset, len }))
            }
            // Fills come from reads (`offer_fills`), never from a request kind.
            Kind::Fill => Ok(()),
        }
    }

    /// Copy-on-read, as the driver does after a read: the source's bytes of the cold regions
    /// the read covered wholly, one fill per run, kept to be submitted by a later step.
    fn offer_fills(&mut self, offset: u64, buf: &[u8]) {
        let runs: Vec<_> = fill_runs(self.view.map(), &self.g, offset, buf.len() as u64).collect();
        for (s, e) in runs {
            let (a, b) = ((s - offset) as usize, (e - offset) as usize);
            self.fills.push((s, buf[a..b].to_vec()));
        }
    }

    fn submit_fill(&mut self, offset: u64, buf: Vec<u8>) -> Result<(), String> {
        self.stats.requests += 1;
        let id = self.next_id;
        self.next_id += 1;
        let len = buf.len() as u64;
        self.reqs.insert(
            id,
            SimReq {
                kind: Kind::Fill,
                offset,
                len,
                buf,
                cover: vec![],
            },
        );
        self.input(Input::Request(id, Request::Fill { offset, len }))
    }

    /// An error is fine only where faults are injected or the mode is not read-write.
    fn note_error(&mut self, st: IoStatus) -> Result<(), String> {
        self.stats.replies_err += 1;
        if self.faults_enabled || self.engine.mode() != Mode::ReadWrite {
            Ok(())
        } else {
            Err(format!("unexpected error {st:?} with no fault injected"))
        }
    }

    fn on_reply(&mut self, id: ReqId, st: IoStatus) -> Result<(), String> {
        if self.trace {
            eprintln!("    reply {id} {st:?}");
        }
        let Some(req) = self.reqs.remove(&id) else {
            return Err(format!("reply for unknown request {id}"));
        };
        if st.is_ok() {
            self.stats.replies_ok += 1;
        } else if !(req.kind == Kind::Hydrate && st == IoStatus::ReadOnly) {
            self.note_error(st)?;
        }
        match req.kind {
            Kind::Read => {
                return Err(format!(
                    "reply for read {id}, which never enters the engine"
                ));
            }
            Kind::Write { fua } | Kind::Zeroes { fua } => {
                self.settle_mutation(req.offset, req.len, st, fua)
            }
            Kind::Discard => self.settle_mutation(req.offset, req.len, st, false),
            Kind::Flush => {
                if st.is_ok() {
                    for (h, &c) in self.blocks.iter_mut().zip(&req.cover) {
                        h.durable = h.durable.max(c);
                    }
                }
            }
            Kind::Hydrate | Kind::Fill => {}
        }
        Ok(())
    }

    fn settle_mutation(&mut self, offset: u64, len: u64, st: IoStatus, fua: bool) {
        if len == 0 {
            return;
        }
        for blk in self.block_range(offset, len) {
            let h = &mut self.blocks[blk];
            h.inflight = false;
            let last = h.vals.len() - 1;
            if st.is_ok() {
                h.completed = last;
                h.alt = None;
                if fua {
                    h.durable = last;
                }
            } else {
                // Failed: the block holds the old value or (partly written) the new one, or
                // that of an earlier failed write.
                h.alt.get_or_insert(last);
            }
        }
    }

    fn expected(&self, v: Val, blk: usize) -> Option<Vec<u8>> {
        let o = blk * BLOCK as usize;
        match v {
            Val::Src => Some(self.src[o..o + BLOCK as usize].to_vec()),
            Val::Zero => Some(vec![0; BLOCK as usize]),
            Val::Data(id) => Some(data_of(id, blk as u64).to_vec()),
            Val::Any => None,
        }
    }

    fn describe(&self, got: &[u8], blk: usize) -> String {
        let o = blk * BLOCK as usize;
        if got == &self.src[o..o + BLOCK as usize] {
            "source data".into()
        } else if got.iter().all(|&x| x == 0) {
            "zeros".into()
        } else {
            let id = u64::from_le_bytes(got[..8].try_into().unwrap_or([0; 8]));
            if got == data_of(id, blk as u64) {
                format!("write {id}")
            } else {
                "other data (garbage?)".into()
            }
        }
    }

    fn matches_any(&self, got: &[u8], blk: usize, allowed: &[Val]) -> bool {
        allowed.iter().any(|&v| match self.expected(v, blk) {
            None => true,
            Some(e) => e == got,
        })
    }

    fn check_read(&mut self, offset: u64, buf: &[u8], what: &str) -> Result<(), String> {
        if self.engine.mode() != Mode::ReadWrite && !self.ro_settled {
            // Between a failed commit and its settling, routing changes under us.
            return Ok(());
        }
        self.stats.reads_checked += 1;
        for (i, blk) in self.block_range(offset, buf.len() as u64).enumerate() {
            let got = &buf[i * BLOCK as usize..(i + 1) * BLOCK as usize];
            let h = &self.blocks[blk];
            let mut allowed = vec![h.vals[h.completed]];
            if let Some(a) = h.alt {
                allowed.extend_from_slice(&h.vals[a..]);
            }
            if h.inflight {
                allowed.push(*h.vals.last().unwrap_or(&Val::Any));
                // An in-flight failed-write history keeps both.
            }
            if !self.matches_any(got, blk, &allowed) {
                return Err(format!(
                    "{what}: block {blk} (region {}) read {} but allowed {:?} (mode {:?})",
                    blk as u64 * BLOCK / self.g.region_bytes(),
                    self.describe(got, blk),
                    allowed,
                    self.engine.mode()
                ));
            }
        }
        Ok(())
    }

    /// With nothing in flight: every block must read as a value no older than its durable
    /// one. With `fresh` (after a power cut, when everything on the disks is durable) that
    /// value becomes the block's only history; otherwise it becomes the completed value and
    /// the history is kept, since unflushed data may still be lost later.
    fn collapse(&mut self, why: &str, fresh: bool) -> Result<(), String> {
        // Pending one-shot faults would fail the observation itself, not the clone.
        for d in [&self.source, &self.dest, &self.meta_disk] {
            d.clear_faults();
        }
        let size = self.g.target_bytes();
        let mut buf = vec![0u8; size as usize];
        let devs = Devices {
            source: &self.source,
            dest: &self.dest,
        };
        let st = read_routed(&self.view, &self.g, &devs, 0, &mut buf);
        if !st.is_ok() {
            return Err(format!("{why}: reading the clone failed: {st:?}"));
        }
        for blk in 0..self.blocks.len() {
            let got = &buf[blk * BLOCK as usize..(blk + 1) * BLOCK as usize];
            let h = &self.blocks[blk];
            let allowed: Vec<Val> = h.vals[h.durable..].to_vec();
            if !self.matches_any(got, blk, &allowed) {
                return Err(format!(
                    "{why}: block {blk} (region {}) reads {} but must be one of {:?} (history {:?}, durable {})",
                    blk as u64 * BLOCK / self.g.region_bytes(),
                    self.describe(got, blk),
                    allowed,
                    h.vals,
                    h.durable
                ));
            }
        }
        // Learn what each block now holds (the newest matching value; a discarded block keeps
        // "anything" until its next write).
        for blk in 0..self.blocks.len() {
            let got = buf[blk * BLOCK as usize..(blk + 1) * BLOCK as usize].to_vec();
            let h = &self.blocks[blk];
            let idx = (h.durable..h.vals.len())
                .rev()
                .find(|&i| self.expected(h.vals[i], blk).is_none_or(|e| e == got))
                .unwrap_or(h.durable);
            let v = h.vals[idx];
            if fresh {
                self.blocks[blk] = Hist::fresh(v);
            } else {
                let h = &mut self.blocks[blk];
                h.completed = idx;
                h.alt = None;
            }
        }
        Ok(())
    }

    /// Cuts the power on the destination and metadata disks and reopens everything.
    pub fn crash(&mut self, style: CutStyle) -> Result<(), String> {
        self.stats.crashes += 1;
        self.pending.clear();
        self.fills.clear();
        self.reqs.clear();
        for h in &mut self.blocks {
            // Whatever was in flight may or may not have landed: its value stays in the
            // history, which is what a crash may show.
            h.inflight = false;
            h.alt = None;
        }
        self.dest.power_cut(&mut self.rng, style);
        self.meta_disk.power_cut(&mut self.rng, style);
        self.dest.clear_faults();
        self.meta_disk.clear_faults();
        self.source.clear_faults();
        if self.source.write_count() != 0 || self.source.snapshot() != self.src {
            return Err("the source was written".into());
        }
        self.factory
            .check(&self.meta_disk, self.g)
            .map_err(|e| format!("metadata check after crash: {e}"))?;
        let (meta, map) = self
            .factory
            .open(&self.meta_disk, self.g)
            .map_err(|e| format!("reopen after crash: {e}"))?;
        self.meta = meta;
        self.view = Arc::new(SharedView::new(map));
        self.engine = Engine::new(
            Self::engine_config(self.g, self.cfg),
            Arc::clone(&self.view),
            self.now,
        );
        self.ro_settled = false;
        self.input(Input::Control(Control::Resume))?;
        self.collapse("after power cut", true)
    }
}
