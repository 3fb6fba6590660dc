//! Executing one engine action on the devices.
//!
//! [`execute_data`] and [`execute_metadata`] are the only places where an engine [`Action`]
//! turns into device I/O, and both the threaded [`crate::Volume`] and the deterministic
//! simulator call them.

use std::io;

use clonebd_core::engine::{Action, IoStatus, Mode, SharedView, WriteData};
use clonebd_core::{AlignedBuf, BlockDev, Geometry, HydrationMap};

use crate::MetadataBackend;
use crate::export::IoError;

/// The data devices of a clone.
pub struct Devices<'a> {
    /// The source (only ever read).
    pub source: &'a dyn BlockDev,
    /// The destination.
    pub dest: &'a dyn BlockDev,
}

/// The buffer of the request an action belongs to.
#[derive(Debug)]
pub enum ReqBuf<'a> {
    /// No buffer (flush, discard, write-zeroes, hydrate, or an action of no request).
    None,
    /// A write request's data.
    Write(&'a [u8]),
}

/// Maps a device error to the status the engine understands (as [`IoError::of_io`]).
pub fn status_of(e: &io::Error) -> IoStatus {
    IoError::of_io(e).into()
}

fn st(r: io::Result<()>) -> IoStatus {
    match r {
        Ok(()) => IoStatus::Ok,
        Err(e) => status_of(&e),
    }
}

fn slice(len: u64, at: u64, total: usize) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(at).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    (end <= total).then_some(start..end)
}

/// Performs a data action (`WriteDest`, `Copy`, `DiscardDest`, `FlushDest`) and returns its
/// outcome. `scratch` is the copy buffer; copies are made as `copy` says, and what they did
/// is added to `copied`. Other actions are not I/O on the data devices and return `None`.
/// Reads are not actions: the driver routes them from the shared map ([`read_routed`]).
pub fn execute_data(
    devs: &Devices<'_>,
    action: &Action,
    buf: &mut ReqBuf<'_>,
    copy: CopyMode,
    scratch: &mut AlignedBuf,
) -> Option<(IoStatus, CopyDone)> {
    let mut done = CopyDone::default();
    let status = match *action {
        Action::WriteDest {
            offset,
            len,
            data,
            fua,
            ..
        } => {
            let r = match data {
                WriteData::Zeroes => st(devs.dest.write_zeroes(offset, len)),
                WriteData::Buffer { at } => match buf {
                    ReqBuf::Write(b) => match slice(len, at, b.len()) {
                        Some(r) => st(devs.dest.write_at(&b[r], offset)),
                        None => IoStatus::Invalid,
                    },
                    _ => IoStatus::Invalid,
                },
            };
            if r.is_ok() && fua {
                st(devs.dest.flush())
            } else {
                r
            }
        }
        Action::Copy { offset, len, .. } => {
            match try_copy_range(devs, offset, len, copy, scratch) {
                Ok(d) => {
                    done = d;
                    IoStatus::Ok
                }
                Err(f) => f.status(),
            }
        }
        Action::DiscardDest { offset, len, .. } => st(devs.dest.discard(offset, len)),
        Action::FlushDest { .. } => st(devs.dest.flush()),
        _ => return None,
    };
    Some((status, done))
}

/// Largest piece a copy is done in: bounds the buffer a copy needs (regions may be 1 GiB)
/// and is the unit in which the threaded driver spreads one large copy over several threads,
/// as the kernel's kcopyd splits a job into sub-jobs.
pub const COPY_CHUNK: u64 = 1 << 20;

/// The unit in which a sparse copy looks for zeros in what it read: runs of all-zero
/// 4 KiB blocks are zeroed on the destination (a hole punched in a file), the rest written,
/// so a destination file holds no more space than the source's data.
pub const ZERO_GRAIN: u64 = 4096;

/// The copy mode of production: sparse-aware, in pieces of [`COPY_CHUNK`].
pub const SPARSE_COPY: CopyMode = CopyMode {
    chunk: COPY_CHUNK,
    sparse: true,
};

/// Which device a copy failed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopySide {
    /// Reading the source.
    Source,
    /// Writing the destination.
    Destination,
}

/// Why a copy failed: on which device, where, and the system's error.
#[derive(Debug)]
pub struct CopyFailure {
    /// The device that failed.
    pub side: CopySide,
    /// The byte offset of the piece that failed.
    pub offset: u64,
    /// Its length.
    pub len: u64,
    /// The device's error.
    pub error: io::Error,
}

impl CopyFailure {
    /// The status the engine is told.
    pub fn status(&self) -> IoStatus {
        status_of(&self.error)
    }
}

impl std::fmt::Display for CopyFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.side {
            CopySide::Source => "reading the source",
            CopySide::Destination => "writing the destination",
        };
        write!(
            f,
            "{what} at byte {} ({} bytes): {}",
            self.offset,
            self.len,
            clonebd_core::errno::describe(&self.error)
        )
    }
}

/// How a copy is made ([`try_copy_range`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyMode {
    /// The largest piece read and written at once.
    pub chunk: u64,
    /// Sparse-aware: a piece the source knows to be a hole is not read, and blocks that read
    /// back all zeros are not written; either becomes a zeroing request on the destination
    /// (which then reads zeros whatever it held before, and a file stays sparse). The map
    /// and the commit rules are those of any copy: the zeroing is made durable by the same
    /// flush as a write.
    pub sparse: bool,
}

/// What a copy did: bytes copied, and bytes made zero without copying them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyDone {
    /// Read from the source and written to the destination.
    pub copied: u64,
    /// Holes or zeros of the source, zeroed on the destination instead.
    pub zeroed: u64,
    /// Of `zeroed`, the bytes the source reported as holes ([`BlockDev::known_zero`]), which
    /// were not even read.
    pub unread: u64,
}

impl CopyDone {
    /// Adds `other`'s counts.
    pub fn add(&mut self, other: CopyDone) {
        self.copied += other.copied;
        self.zeroed += other.zeroed;
        self.unread += other.unread;
    }
}

/// Whether every byte of `b` is zero (in blocks the compiler can vectorise).
fn is_zero(b: &[u8]) -> bool {
    b.chunks(64).all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// Makes `[offset, offset+len)` of the destination read as zeros: nothing to do in the runs
/// the destination already knows read as zeros ([`BlockDev::extent`]: a hole of a file, or
/// an unwritten extent reserved at start), [`BlockDev::punch_zeroes`] on the others. Skipping is as durable as punching: what a
/// file reports now is made durable by the destination's next flush (the same file's
/// `fdatasync`), which a commit round makes before it records the region (rule 1). A
/// block device knows nothing of its zeros, so it is always zeroed.
fn zero_dest(dest: &dyn BlockDev, offset: u64, len: u64) -> io::Result<()> {
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let e = dest.extent(at, end - at)?;
        // A device that answers with nothing is taken to know nothing.
        let n = if e.len == 0 {
            end - at
        } else {
            e.len.min(end - at)
        };
        if !e.zero || e.len == 0 {
            dest.punch_zeroes(at, n)?;
        }
        at += n;
    }
    Ok(())
}

/// As [`execute_data`] does for a copy, as `mode` says, saying why a copy failed.
///
/// Sparse, the source is asked what it knows of each piece ([`BlockDev::extent`]): a run of
/// holes is zeroed on the destination ([`BlockDev::punch_zeroes`]) unread. A run that may
/// hold data is read, and within it each run of all-zero [`ZERO_GRAIN`] blocks is zeroed the
/// same way and only the rest written. The zeroing is I/O like a write: durable after the
/// destination's next flush, which a commit round makes before it records the region
/// (rule 1).
pub fn try_copy_range(
    devs: &Devices<'_>,
    offset: u64,
    len: u64,
    mode: CopyMode,
    scratch: &mut AlignedBuf,
) -> Result<CopyDone, CopyFailure> {
    let chunk = mode.chunk.max(1);
    let mut done = CopyDone::default();
    let fail = |side, offset, len, error| CopyFailure {
        side,
        offset,
        len,
        error,
    };
    let mut at = offset;
    while at < offset + len {
        let mut n = chunk.min(offset + len - at);
        if mode.sparse {
            let e = devs
                .source
                .extent(at, n)
                .map_err(|e| fail(CopySide::Source, at, n, e))?;
            // A device that answers with nothing is taken to know nothing.
            n = if e.len == 0 { n } else { e.len.min(n) };
            if e.zero && e.len > 0 {
                zero_dest(devs.dest, at, n).map_err(|e| fail(CopySide::Destination, at, n, e))?;
                done.zeroed += n;
                done.unread += n;
                at += n;
                continue;
            }
        }
        scratch.resize(n as usize);
        devs.source
            .read_at(scratch, at)
            .map_err(|e| fail(CopySide::Source, at, n, e))?;
        let grain = if mode.sparse { ZERO_GRAIN } else { n };
        // Runs of blocks all zero or all not, each zeroed or written in one request.
        let zero_at =
            |p: u64| mode.sparse && is_zero(&scratch[p as usize..(p + grain).min(n) as usize]);
        let mut s = 0;
        let mut zero = zero_at(0);
        while s < n {
            let mut e = (s + grain).min(n);
            let mut next = zero;
            while e < n {
                next = zero_at(e);
                if next != zero {
                    break;
                }
                e = (e + grain).min(n);
            }
            if zero {
                zero_dest(devs.dest, at + s, e - s)
                    .map_err(|err| fail(CopySide::Destination, at + s, e - s, err))?;
                done.zeroed += e - s;
            } else {
                devs.dest
                    .write_at(&scratch[s as usize..e as usize], at + s)
                    .map_err(|err| fail(CopySide::Destination, at + s, e - s, err))?;
                done.copied += e - s;
            }
            s = e;
            zero = next;
        }
        at += n;
    }
    Ok(done)
}

/// Performs a metadata action (`CommitMetadata`, `AbortMetadata`); `None` for others.
/// Failures are logged here with the error's text (the engine only sees the status).
pub fn execute_metadata(
    meta: &mut dyn MetadataBackend,
    map: &HydrationMap,
    action: &Action,
) -> Option<IoStatus> {
    match action {
        Action::CommitMetadata { dirty, .. } => Some(match meta.commit(dirty) {
            Ok(()) => IoStatus::Ok,
            Err(e) => {
                tracing::error!("metadata commit failed: {e}");
                IoStatus::Io
            }
        }),
        Action::AbortMetadata { .. } => Some(match meta.abort_and_reload(map) {
            Ok(()) => IoStatus::Ok,
            Err(e) => {
                tracing::error!("metadata abort/reload failed: {e}");
                IoStatus::Io
            }
        }),
        _ => None,
    }
}

/// The operation id of an action that must be completed, if any.
pub fn op_of(a: &Action) -> Option<u64> {
    match *a {
        Action::WriteDest { op, .. }
        | Action::Copy { op, .. }
        | Action::DiscardDest { op, .. }
        | Action::FlushDest { op }
        | Action::CommitMetadata { op, .. }
        | Action::AbortMetadata { op } => Some(op),
        _ => None,
    }
}

/// The request whose thread should run an action, if any.
pub fn owner_of(a: &Action) -> Option<u64> {
    match *a {
        Action::WriteDest { req, .. } | Action::DiscardDest { req, .. } => Some(req),
        Action::Copy { owner, .. } => owner,
        _ => None,
    }
}

/// Whether a write may skip the engine (the fast path): not FUA, not in fail mode, and every
/// region it touches already hydrated, so the destination owns those bytes.
pub fn fast_write_ok(view: &SharedView, g: &Geometry, offset: u64, len: u64, fua: bool) -> bool {
    if fua || view.mode() == Mode::Fail {
        return false;
    }
    let (first, n) = g.touched_regions(offset, len);
    view.map().is_range_hydrated(first, n)
}

/// The runs of whole regions `[offset, offset+len)` touches, each all hydrated or all not,
/// clipped to the range: `(start byte, end byte, hydrated)`, in order. Each region's state is
/// read from the map when its run is reached.
pub fn runs<'a>(
    map: &'a HydrationMap,
    g: &'a Geometry,
    offset: u64,
    len: u64,
) -> impl Iterator<Item = (u64, u64, bool)> + 'a {
    let end = offset + len;
    let last = if len == 0 {
        0
    } else {
        g.region_of_byte(end - 1) + 1
    };
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let r = g.region_of_byte(pos);
        let hydrated = map.is_hydrated(r);
        let run_end_region = if hydrated {
            map.first_unhydrated_in(r, last).unwrap_or(last)
        } else {
            map.first_hydrated_in(r, last).unwrap_or(last)
        };
        let run_end = g.region_start_byte(run_end_region).min(end);
        let run = (pos, run_end, hydrated);
        pos = run_end;
        Some(run)
    })
}

/// Reads `buf` at `offset`, each run of regions from the device that owns it: hydrated ones
/// from the destination, the others from the source (SPEC 3.1; reads never wait).
pub fn read_routed(
    view: &SharedView,
    g: &Geometry,
    devs: &Devices<'_>,
    offset: u64,
    buf: &mut [u8],
) -> IoStatus {
    if view.mode() == Mode::Fail {
        return IoStatus::Io;
    }
    for (pos, run_end, hydrated) in runs(view.map(), g, offset, buf.len() as u64) {
        let dev = if hydrated { devs.dest } else { devs.source };
        let (a, b) = ((pos - offset) as usize, (run_end - offset) as usize);
        if let Err(e) = dev.read_at(&mut buf[a..b], pos) {
            return status_of(&e);
        }
    }
    IoStatus::Ok
}

/// Copy-on-read: the runs of regions a read of `[offset, offset+len)` covers wholly (the
/// short last region too, when the read reaches the end) that are not hydrated now, as
/// `(start byte, end byte)`, in order: what the driver offers the engine as fills
/// ([`Request::Fill`](clonebd_core::engine::Request::Fill)) from the read's buffer. Called
/// after the read: in mode `rw` the map only gains bits, so a region not hydrated now was not
/// hydrated when the read routed it, and its bytes in the buffer came from the source (the
/// map loses bits only when a failed commit reloads it, after the engine left mode `rw`,
/// and the engine then takes no fill).
pub fn fill_runs<'a>(
    map: &'a HydrationMap,
    g: &'a Geometry,
    offset: u64,
    len: u64,
) -> impl Iterator<Item = (u64, u64)> + 'a {
    let rb = g.region_bytes();
    let end = offset.saturating_add(len).min(g.target_bytes());
    let start = offset.div_ceil(rb) * rb;
    let whole_end = if end == g.target_bytes() {
        end
    } else {
        end / rb * rb
    };
    let span = whole_end.saturating_sub(start);
    runs(map, g, start, span)
        .filter(|&(_, _, hydrated)| !hydrated)
        .map(|(s, e, _)| (s, e))
}
