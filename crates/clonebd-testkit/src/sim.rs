//! The simulated disk: a byte image in memory with a volatile write cache (every sector
//! written since the last flush keeps each version, and a power cut keeps any one of them
//! or none), injected faults, a trace of operations, and holes: ranges set up as a sparse
//! file's, which [`BlockDev::known_zero`] reports, as `SEEK_DATA` does on a file.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use clonebd_core::{BlockDev, Caps, Extent};

use crate::Rng;

const SECTOR: u64 = 512;

/// An operation kind, for fault injection and traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultOp {
    /// `read_at`.
    Read,
    /// `write_at`, and `write_zeroes` (which writes zeros into the cache).
    Write,
    /// `flush`.
    Flush,
    /// `discard`.
    Discard,
}

/// What a traced operation was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceOp {
    /// A read of `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A write of `len` bytes at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A zeroing (`write_zeroes` or `punch_zeroes`) of `len` bytes at `offset`.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A flush.
    Flush,
    /// A discard.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
}

/// One traced operation: which disk, what, and whether it succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEvent {
    /// The disk's name.
    pub disk: String,
    /// The operation.
    pub op: TraceOp,
    /// Whether it succeeded.
    pub ok: bool,
}

/// A log of operations shared by several disks, in the order they happened.
#[derive(Debug, Clone, Default)]
pub struct Trace(Arc<Mutex<Vec<TraceEvent>>>);

impl Trace {
    /// An empty trace.
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything recorded so far.
    pub fn events(&self) -> Vec<TraceEvent> {
        lock(&self.0).clone()
    }

    /// Forgets everything recorded so far.
    pub fn clear(&self) {
        lock(&self.0).clear();
    }

    fn push(&self, ev: TraceEvent) {
        lock(&self.0).push(ev);
    }
}

/// How a power cut treats the unflushed writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutStyle {
    /// Every unflushed write is lost.
    LoseAll,
    /// Every unflushed write survives.
    KeepAll,
    /// Each sector written since the last flush ends up holding its durable content or the
    /// content of any one of the unflushed writes to it, chosen at random: writes may be torn
    /// at 512 B, reordered, and partly lost, as a volatile cache losing power allows.
    Random,
}

#[derive(Debug)]
struct Inner {
    /// What reads see.
    current: Vec<u8>,
    /// What survives a power cut for sure.
    durable: Vec<u8>,
    /// Unflushed writes, oldest first: for each sector, every version written since the flush.
    pending: BTreeMap<u64, Vec<[u8; SECTOR as usize]>>,
    /// Per sector: a hole (set up by [`SimDisk::make_hole`], not written since).
    holes: Vec<bool>,
    /// Per-op fault plans: fail the next `n` operations overlapping the range.
    faults: Vec<Fault>,
    caps: Caps,
    discard_zeroes: bool,
    flushes: u64,
    writes: u64,
}

#[derive(Debug, Clone)]
struct Fault {
    op: FaultOp,
    range: Option<(u64, u64)>,
    remaining: Option<u64>,
    kind: io::ErrorKind,
}

/// A disk in memory with a volatile write cache. Cloning gives another handle to the same
/// disk (so a test keeps one to cut power while the system under test uses the other).
#[derive(Debug, Clone)]
pub struct SimDisk {
    name: String,
    inner: Arc<Mutex<Inner>>,
    trace: Option<Trace>,
    logical_block_size: u32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in another test thread must not hide this test's result.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SimDisk {
    /// A zero-filled disk of `size` bytes (a multiple of 512).
    pub fn new(name: &str, size: u64) -> Self {
        Self::from_bytes(name, vec![0; size as usize])
    }

    /// A disk whose durable content is `bytes` (length a multiple of 512).
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Self {
        assert!(
            (bytes.len() as u64).is_multiple_of(SECTOR),
            "SimDisk size must be a multiple of 512"
        );
        Self {
            name: name.to_string(),
            inner: Arc::new(Mutex::new(Inner {
                holes: vec![false; bytes.len() / SECTOR as usize],
                current: bytes.clone(),
                durable: bytes,
                pending: BTreeMap::new(),
                faults: Vec::new(),
                caps: Caps {
                    discard: true,
                    write_zeroes: false,
                    volatile_cache: true,
                },
                discard_zeroes: true,
                flushes: 0,
                writes: 0,
            })),
            trace: None,
            logical_block_size: 512,
        }
    }

    /// Makes `[offset, offset+len)` (sector-aligned) a hole, as in a sparse file: it reads
    /// as zeros, durably at once, and [`BlockDev::known_zero`] reports it until something
    /// is written there. For setting a disk up, not a simulated operation.
    pub fn make_hole(&self, offset: u64, len: u64) {
        assert!(
            offset.is_multiple_of(SECTOR) && len.is_multiple_of(SECTOR),
            "holes are whole sectors"
        );
        let mut g = lock(&self.inner);
        let r = offset as usize..(offset + len) as usize;
        g.current[r.clone()].fill(0);
        g.durable[r].fill(0);
        for s in offset / SECTOR..(offset + len) / SECTOR {
            g.pending.remove(&s);
            g.holes[s as usize] = true;
        }
    }

    /// Records every operation of this handle in `trace`.
    pub fn with_trace(mut self, trace: &Trace) -> Self {
        self.trace = Some(trace.clone());
        self
    }

    /// Sets the capabilities the disk reports. Without `discard`, discards fail as unsupported.
    pub fn set_caps(&self, caps: Caps) {
        lock(&self.inner).caps = caps;
    }

    /// Whether a discard zeroes the range (true) or leaves it as it was (false).
    pub fn set_discard_zeroes(&self, zeroes: bool) {
        lock(&self.inner).discard_zeroes = zeroes;
    }

    /// Reports `lbs` as the logical block size.
    pub fn with_logical_block_size(mut self, lbs: u32) -> Self {
        self.logical_block_size = lbs;
        self
    }

    /// Fails the next `count` operations of kind `op` (overlapping `range`, if given) with
    /// `kind`. `count` None fails them until [`SimDisk::clear_faults`].
    pub fn inject_fault(
        &self,
        op: FaultOp,
        range: Option<(u64, u64)>,
        count: Option<u64>,
        kind: io::ErrorKind,
    ) {
        lock(&self.inner).faults.push(Fault {
            op,
            range,
            remaining: count,
            kind,
        });
    }

    /// Removes every injected fault.
    pub fn clear_faults(&self) {
        lock(&self.inner).faults.clear();
    }

    /// What reads see now.
    pub fn snapshot(&self) -> Vec<u8> {
        lock(&self.inner).current.clone()
    }

    /// What is durable now.
    pub fn durable(&self) -> Vec<u8> {
        lock(&self.inner).durable.clone()
    }

    /// Whether some write is not yet durable.
    pub fn has_unflushed(&self) -> bool {
        !lock(&self.inner).pending.is_empty()
    }

    /// Number of successful flushes so far.
    pub fn flush_count(&self) -> u64 {
        lock(&self.inner).flushes
    }

    /// Number of successful writes so far.
    pub fn write_count(&self) -> u64 {
        lock(&self.inner).writes
    }

    /// Simulates a power cut: afterwards reads see the durable image plus what `style` (drawn
    /// from `rng`) kept of the unflushed writes, and that is the new durable image.
    pub fn power_cut(&self, rng: &mut Rng, style: CutStyle) {
        let mut g = lock(&self.inner);
        let pending = std::mem::take(&mut g.pending);
        for (sector, versions) in pending {
            let choice = match style {
                CutStyle::LoseAll => None,
                CutStyle::KeepAll => versions.last(),
                CutStyle::Random => {
                    let k = rng.below(versions.len() as u64 + 1);
                    if k == 0 {
                        None
                    } else {
                        versions.get(k as usize - 1)
                    }
                }
            };
            let o = (sector * SECTOR) as usize;
            let r = o..o + SECTOR as usize;
            if let Some(data) = choice {
                g.durable[r.clone()].copy_from_slice(data);
            }
            let Inner {
                current, durable, ..
            } = &mut *g;
            current[r.clone()].copy_from_slice(&durable[r]);
        }
    }

    fn check_fault(&self, g: &mut Inner, op: FaultOp, offset: u64, len: u64) -> io::Result<()> {
        for f in g.faults.iter_mut() {
            if f.op != op || f.remaining == Some(0) {
                continue;
            }
            let hit = match f.range {
                None => true,
                Some((o, l)) => offset < o + l && o < offset + len.max(1),
            };
            if hit {
                if let Some(n) = f.remaining.as_mut() {
                    *n -= 1;
                }
                return Err(io::Error::new(
                    f.kind,
                    format!("injected {op:?} fault on {}", self.name),
                ));
            }
        }
        Ok(())
    }

    fn record(&self, op: TraceOp, ok: bool) {
        if let Some(t) = &self.trace {
            t.push(TraceEvent {
                disk: self.name.clone(),
                op,
                ok,
            });
        }
    }

    fn bounds(g: &Inner, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= g.current.len() as u64 => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "I/O past the end of SimDisk",
            )),
        }
    }

    fn write_locked(g: &mut Inner, buf: &[u8], offset: u64) {
        let o = offset as usize;
        g.current[o..o + buf.len()].copy_from_slice(buf);
        // Record each touched sector's new content as a pending version.
        let first = offset / SECTOR;
        let last = (offset + buf.len() as u64).div_ceil(SECTOR);
        for s in first..last {
            g.holes[s as usize] = false;
            let so = (s * SECTOR) as usize;
            let mut v = [0u8; SECTOR as usize];
            v.copy_from_slice(&g.current[so..so + SECTOR as usize]);
            g.pending.entry(s).or_default().push(v);
        }
    }
}

impl BlockDev for SimDisk {
    fn size_bytes(&self) -> u64 {
        lock(&self.inner).current.len() as u64
    }

    fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    fn caps(&self) -> Caps {
        lock(&self.inner).caps
    }

    /// The run of whole holes ([`SimDisk::make_hole`]) or of other sectors from `offset`.
    fn extent(&self, offset: u64, len: u64) -> io::Result<Extent> {
        let g = lock(&self.inner);
        Self::bounds(&g, offset, len)?;
        let end = offset + len;
        if len == 0 {
            return Ok(Extent { len, zero: false });
        }
        // A partial sector counts as a hole only if the whole sector is one.
        let hole = |s: u64| g.holes[s as usize];
        let first = offset / SECTOR;
        let zero = hole(first);
        let mut s = first + 1;
        while s * SECTOR < end && hole(s) == zero {
            s += 1;
        }
        Ok(Extent {
            len: (s * SECTOR).min(end) - offset,
            zero,
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut g = lock(&self.inner);
        let len = buf.len() as u64;
        let r = Self::bounds(&g, offset, len)
            .and_then(|()| self.check_fault(&mut g, FaultOp::Read, offset, len));
        if r.is_ok() {
            let o = offset as usize;
            buf.copy_from_slice(&g.current[o..o + buf.len()]);
        }
        drop(g);
        self.record(TraceOp::Read { offset, len }, r.is_ok());
        r
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut g = lock(&self.inner);
        let len = buf.len() as u64;
        let r = Self::bounds(&g, offset, len)
            .and_then(|()| self.check_fault(&mut g, FaultOp::Write, offset, len));
        if r.is_ok() {
            Self::write_locked(&mut g, buf, offset);
            g.writes += 1;
        }
        drop(g);
        self.record(TraceOp::Write { offset, len }, r.is_ok());
        r
    }

    /// Zeros written into the cache, as a write of zeros is (faults as [`FaultOp::Write`]).
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut g = lock(&self.inner);
        let r = Self::bounds(&g, offset, len)
            .and_then(|()| self.check_fault(&mut g, FaultOp::Write, offset, len));
        if r.is_ok() {
            Self::write_locked(&mut g, &vec![0u8; len as usize], offset);
            g.writes += 1;
        }
        drop(g);
        self.record(TraceOp::WriteZeroes { offset, len }, r.is_ok());
        r
    }

    fn flush(&self) -> io::Result<()> {
        let mut g = lock(&self.inner);
        let r = self.check_fault(&mut g, FaultOp::Flush, 0, 0);
        if r.is_ok() {
            let pending = std::mem::take(&mut g.pending);
            let Inner {
                current, durable, ..
            } = &mut *g;
            for sector in pending.keys() {
                let o = (sector * SECTOR) as usize;
                let r = o..o + SECTOR as usize;
                durable[r.clone()].copy_from_slice(&current[r]);
            }
            g.flushes += 1;
        }
        drop(g);
        self.record(TraceOp::Flush, r.is_ok());
        r
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut g = lock(&self.inner);
        let r = if !g.caps.discard {
            Err(io::Error::from(io::ErrorKind::Unsupported))
        } else {
            Self::bounds(&g, offset, len)
                .and_then(|()| self.check_fault(&mut g, FaultOp::Discard, offset, len))
        };
        if r.is_ok() && g.discard_zeroes {
            let zeros = vec![0u8; len as usize];
            Self::write_locked(&mut g, &zeros, offset);
        }
        drop(g);
        self.record(TraceOp::Discard { offset, len }, r.is_ok());
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unflushed_writes_are_lost_on_cut_and_flushed_ones_kept() {
        let d = SimDisk::new("d", 4096);
        d.write_at(&[1; 512], 0).expect("write");
        d.flush().expect("flush");
        d.write_at(&[2; 512], 512).expect("write");
        d.power_cut(&mut Rng::new(1), CutStyle::LoseAll);
        let s = d.snapshot();
        assert_eq!(s[0], 1);
        assert_eq!(s[512], 0);
    }

    #[test]
    fn random_cut_tears_at_sector_granularity() {
        // Over many seeds, a 4 KiB unflushed write must come back torn at least once, and every
        // sector must hold either the old or the new content, never a mix inside a sector.
        let mut torn = false;
        for seed in 0..200 {
            let d = SimDisk::new("d", 4096);
            d.write_at(&[7; 4096], 0).expect("write");
            d.power_cut(&mut Rng::new(seed), CutStyle::Random);
            let s = d.snapshot();
            let kept: Vec<bool> = s
                .chunks(512)
                .map(|c| {
                    assert!(c.iter().all(|&b| b == c[0]), "sector mixed inside");
                    c[0] == 7
                })
                .collect();
            torn |= kept.iter().any(|&k| k) && kept.iter().any(|&k| !k);
        }
        assert!(torn);
    }

    #[test]
    fn injected_fault_fails_only_matching_ops() {
        let d = SimDisk::new("d", 8192);
        d.inject_fault(
            FaultOp::Write,
            Some((4096, 4096)),
            Some(1),
            io::ErrorKind::Other,
        );
        assert!(d.write_at(&[1; 512], 0).is_ok());
        assert!(d.write_at(&[1; 512], 4096).is_err());
        assert!(d.write_at(&[1; 512], 4096).is_ok());
    }

    #[test]
    fn trace_records_order_across_disks() {
        let t = Trace::new();
        let a = SimDisk::new("a", 4096).with_trace(&t);
        let b = SimDisk::new("b", 4096).with_trace(&t);
        a.flush().expect("flush");
        b.write_at(&[0; 512], 0).expect("write");
        let ev = t.events();
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].disk, "a");
        assert_eq!(
            ev[1].op,
            TraceOp::Write {
                offset: 0,
                len: 512
            }
        );
    }

    #[test]
    fn holes_are_known_zero_until_written_and_zeroing_is_volatile() {
        let d = SimDisk::from_bytes("d", vec![9; 8192]);
        d.make_hole(4096, 4096);
        assert!(d.known_zero(4096, 4096).expect("in range"));
        assert!(
            !d.known_zero(0, 8192).expect("in range"),
            "data before the hole"
        );
        assert!(d.snapshot()[4096..].iter().all(|&b| b == 0));
        d.write_at(&[1; 512], 6144).expect("write");
        assert!(
            !d.known_zero(4096, 4096).expect("in range"),
            "written since"
        );
        d.flush().expect("flush");
        d.write_zeroes(0, 4096).expect("zero");
        assert!(d.snapshot()[..4096].iter().all(|&b| b == 0));
        d.power_cut(&mut Rng::new(1), CutStyle::LoseAll);
        assert!(
            d.snapshot()[..4096].iter().all(|&b| b == 9),
            "unflushed zeroing lost"
        );
    }
}
