//! Copy-on-read: fills ([`Request::Fill`](super::Request::Fill)).
//!
//! A read of regions not hydrated returns the source's data to its client; with
//! copy-on-read the driver then offers that data back as a fill, so the regions the read
//! covered wholly are hydrated without reading the source again. A fill is an offer, not a
//! demand, and the engine takes only what is safe to take:
//!
//! - a region already hydrated, or with a hydration in flight (a copy, a full-region write,
//!   another fill), is left alone: whatever got there first owns it, so a write that raced
//!   the read wins and the read's (older) view of the region is dropped;
//! - an accepted region is in flight exactly as under a copy: writes, discards and hydrate
//!   requests arriving meanwhile wait on its record (rule 5), background hydration skips it;
//! - it is marked only once its destination write completed, and committed by the same
//!   rounds as any copy, so its bit reaches disk only after a flush made the data durable
//!   (rule 1);
//! - outside mode `rw`, and while suspended, nothing is taken.
//!
//! A failed fill write is an error for no one but the fill: its regions stay as they were,
//! and the writes that waited on them are routed afresh (they start a copy), as after a
//! failed full-region write. Nothing here reads the source or touches the bytes.

use super::Action;
use super::{Engine, IoStatus, Mode, Op, ReqId, WriteData};
use crate::geometry::RegionId;

impl Engine {
    /// The regions `[offset, offset+len)` covers wholly, the short last region included
    /// when the range reaches the end of the device: `(first, count)`.
    fn filled_regions(&self, offset: u64, len: u64) -> (RegionId, u64) {
        let g = self.geometry();
        let rb = g.region_bytes();
        let end = offset.saturating_add(len).min(g.target_bytes());
        let first = offset.div_ceil(rb);
        let last_excl = if end == g.target_bytes() {
            g.nr_regions()
        } else {
            end / rb
        };
        (first, last_excl.saturating_sub(first))
    }

    /// Takes the regions of a fill that are still cold and idle, each run of them one
    /// destination write from the request's buffer.
    pub(super) fn submit_fill(&mut self, req: ReqId, offset: u64, len: u64) {
        let (first, n) = self.filled_regions(offset, len);
        let end = first + n;
        let mut r = first;
        while r < end {
            // Suspended (shutdown) nothing new starts hydrating, as for background copies.
            let free = |e: &Engine, r: RegionId| {
                e.mode() == Mode::ReadWrite && !e.suspended && e.regions.is_cold(r)
            };
            if !free(self, r) {
                self.counters.fills_refused += 1;
                r += 1;
                continue;
            }
            let mut k = 1;
            while r + k < end && free(self, r + k) {
                k += 1;
            }
            let op = self.io.start(Op::Fill {
                req,
                first: r,
                n: k,
            });
            self.regions.start_fill(r, k, op);
            let (s, e) = self.geometry().regions_byte_range(r, k);
            self.hold(req, 1);
            self.emit(Action::WriteDest {
                op,
                req,
                offset: s,
                len: e - s,
                data: WriteData::Buffer { at: s - offset },
                fua: false,
            });
            r += k;
        }
    }

    /// A fill's destination write completed: mark its regions if it succeeded (and the
    /// metadata still takes marks), then release what waited on them.
    pub(super) fn complete_fill(&mut self, req: ReqId, first: RegionId, n: u64, status: IoStatus) {
        let ok = status.is_ok() && self.mode() == Mode::ReadWrite;
        let released = self.land(first, n, ok);
        if ok {
            let (s, e) = self.geometry().regions_byte_range(first, n);
            self.counters.bytes_hydrated += e - s;
            self.counters.regions_filled += n;
        } else if !status.is_ok() {
            self.counters.copy_errors += 1;
        }
        // The fill's answer carries the write's failure, for the driver's log; nobody else
        // is affected by it.
        self.settle(req, 1, status);
        // Not hydrated after all: writes that waited are routed afresh, as after a failed
        // full-region write (they start a copy, or fail outside mode `rw`).
        self.release(released, None);
    }
}
