//! Request routing (SPEC 3.2 to 3.8) and the completion of the operations it starts: glue
//! between the parts, which it changes only through their methods. Reads (SPEC 3.1) are not
//! routed here: the driver serves them from the shared map.
//!
//! Requests are split at region boundaries (a device-mapper core duty, SPEC 1.3), but
//! adjacent pieces that go the same way are issued as one operation, so a 1 MiB write over
//! hydrated regions is one destination write, not 256.

use super::{
    Action, CommitWaiter, CopyOrigin, Engine, Event, IoStatus, Mode, Op, OpId, Part, ReqId,
    ReqKind, ReqState, Request, Waiter, WriteData,
};
use crate::geometry::{RegionId, logical_block_bytes};

/// A piece ready to go to the destination at once, before merging.
#[derive(Debug, Clone, Copy)]
enum Ready {
    /// A write to a hydrated region.
    Direct(Part),
    /// A full-region write of unhydrated region `r`.
    Overwrite(Part, RegionId),
}

impl Engine {
    pub(super) fn submit(&mut self, req: ReqId, r: Request) {
        if self.mode() == Mode::Fail {
            // SPEC 3.0 step 1: every bio fails.
            self.emit(Action::Reply {
                req,
                status: IoStatus::Io,
            });
            return;
        }
        let range = match r {
            Request::Write { offset, len, .. }
            | Request::WriteZeroes { offset, len, .. }
            | Request::Discard { offset, len }
            | Request::Hydrate { offset, len }
            | Request::Fill { offset, len } => Some((offset, len)),
            Request::Flush => None,
        };
        let valid = match r {
            // A discard is advisory: only its range must lie in the device; what is not
            // aligned to the logical block size is ignored below (as dm-clone ignores what
            // does not cover whole regions), and QEMU passes unaligned heads and tails down.
            Request::Discard { offset, len } => self.geometry().contains_range(offset, len),
            _ => range.is_none_or(|(offset, len)| {
                self.geometry().is_valid_request(self.lbs(), offset, len)
            }),
        };
        if !valid {
            self.emit(Action::Reply {
                req,
                status: IoStatus::Invalid,
            });
            return;
        }
        let r = match r {
            Request::Discard { offset, len } => match self.aligned_inward(offset, len) {
                Some((offset, len)) => Request::Discard { offset, len },
                None => {
                    // No whole logical block: nothing to discard, and that is a success.
                    self.emit(Action::Reply {
                        req,
                        status: IoStatus::Ok,
                    });
                    return;
                }
            },
            r => r,
        };
        let kind = match r {
            Request::Write { .. } | Request::WriteZeroes { .. } => ReqKind::Write,
            Request::Flush => ReqKind::Flush,
            Request::Discard { offset, len } => ReqKind::Discard { offset, len },
            Request::Hydrate { .. } => ReqKind::Hydrate,
            Request::Fill { .. } => ReqKind::Fill,
        };
        // A duplicate id would corrupt the books: refuse it rather than trust it.
        if self.reqs.contains_key(&req) {
            self.emit(Action::Reply {
                req,
                status: IoStatus::Invalid,
            });
            return;
        }
        self.reqs.insert(
            req,
            ReqState {
                kind,
                pending: 1,
                status: IoStatus::Ok,
                hold_for_commit: false,
            },
        );
        match r {
            Request::Write { offset, len, fua } => {
                self.submit_write(req, offset, len, WriteData::Buffer { at: 0 }, fua)
            }
            Request::WriteZeroes { offset, len, fua } => {
                self.submit_write(req, offset, len, WriteData::Zeroes, fua)
            }
            Request::Flush => self.submit_flush(req),
            Request::Discard { .. } => self.dispatch_discard(req),
            Request::Hydrate { offset, len } => self.submit_hydrate(req, offset, len),
            Request::Fill { offset, len } => self.submit_fill(req, offset, len),
        }
        // Drop the submission's own reference.
        self.settle(req, 1, IoStatus::Ok);
    }

    fn lbs(&self) -> u64 {
        logical_block_bytes(u64::from(self.cfg.logical_block_size))
    }

    /// The whole logical blocks inside an in-device range, if there are any.
    fn aligned_inward(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let lbs = self.lbs();
        let start = offset.div_ceil(lbs) * lbs;
        let end = (offset + len) / lbs * lbs;
        (start < end).then(|| (start, end - start))
    }

    /// Adds `n` pieces the request must wait for.
    pub(super) fn hold(&mut self, req: ReqId, n: u64) {
        if let Some(s) = self.reqs.get_mut(&req) {
            s.pending += n;
        }
    }

    /// Settles `n` pieces of `req` with `status`, and replies once nothing is pending.
    pub(super) fn settle(&mut self, req: ReqId, n: u64, status: IoStatus) {
        let Some(s) = self.reqs.get_mut(&req) else {
            return;
        };
        if !status.is_ok() && s.status.is_ok() {
            s.status = status;
        }
        s.pending = s.pending.saturating_sub(n);
        if s.pending > 0 {
            return;
        }
        if s.hold_for_commit && s.status.is_ok() {
            // SPEC 3.5: a FUA overwrite completes only after a metadata commit.
            s.hold_for_commit = false;
            s.pending = 1;
            if self.commit.mode() != Mode::ReadWrite {
                s.pending = 0;
                s.status = IoStatus::Io;
            } else {
                self.commit.wait(CommitWaiter::HeldReply(req));
                return;
            }
        }
        let status = s.status;
        self.reqs.remove(&req);
        self.emit(Action::Reply { req, status });
    }

    // ----- writes -----

    fn submit_write(&mut self, req: ReqId, offset: u64, len: u64, data: WriteData, fua: bool) {
        let g = *self.geometry();
        let mut ready = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let r = g.region_of_byte(pos);
            let piece_end = (g.region_start_byte(r) + g.region_len_bytes(r)).min(end);
            let at = pos - offset;
            let part = Part {
                req,
                offset: pos,
                len: piece_end - pos,
                data: match data {
                    WriteData::Buffer { .. } => WriteData::Buffer { at },
                    WriteData::Zeroes => WriteData::Zeroes,
                },
                fua,
            };
            self.dispatch_part(part, &mut ready);
            pos = piece_end;
        }
        self.issue_ready(ready);
    }

    /// Routes one write piece (one region) per SPEC 3.2 and 3.3.
    fn dispatch_part(&mut self, part: Part, ready: &mut Vec<Ready>) {
        let g = *self.geometry();
        let r = g.region_of_byte(part.offset);
        if self.mode() == Mode::Fail {
            self.fail_part(part, IoStatus::Io);
        } else if self.regions.is_hydrated(r) {
            if part.fua && self.changed() {
                // SPEC 3.3: commit first, then write with FUA.
                self.hold(part.req, 1);
                if self.mode() != Mode::ReadWrite {
                    self.settle(part.req, 1, IoStatus::Io);
                } else {
                    self.commit.wait(CommitWaiter::FuaWrite(part));
                }
            } else {
                self.hold(part.req, 1);
                ready.push(Ready::Direct(part));
            }
        } else if self.regions.is_busy(r) {
            // Queue behind the region's hydration (SPEC 3.2 step 1).
            let queued = self.regions.wait(r, Waiter::Write(part));
            debug_assert!(queued.is_ok(), "the region is busy");
            self.hold(part.req, 1);
        } else if self.mode() != Mode::ReadWrite {
            self.fail_part(part, IoStatus::Io);
        } else if part.len == g.region_bytes() {
            // A full-region write hydrates the region without a copy. The short last region
            // can never match, as its length is below the region size (SPEC 3.7).
            self.hold(part.req, 1);
            self.regions.route_overwrite(r);
            ready.push(Ready::Overwrite(part, r));
        } else {
            self.hold(part.req, 1);
            self.start_copy(r, 1, CopyOrigin::Write, Some(part.req));
            let queued = self.regions.wait(r, Waiter::Write(part));
            debug_assert!(queued.is_ok(), "the region is busy");
        }
    }

    fn fail_part(&mut self, part: Part, status: IoStatus) {
        self.hold(part.req, 1);
        self.settle(part.req, 1, status);
    }

    /// Issues ready pieces, merging adjacent ones of the same kind into one operation.
    fn issue_ready(&mut self, ready: Vec<Ready>) {
        let mut i = 0;
        while i < ready.len() {
            let mut j = i + 1;
            let same = |a: &Ready, b: &Ready| match (a, b) {
                (Ready::Direct(x), Ready::Direct(y)) => {
                    x.req == y.req && x.fua == y.fua && x.offset + x.len == y.offset
                }
                (Ready::Overwrite(x, rx), Ready::Overwrite(y, ry)) => {
                    x.req == y.req && x.fua == y.fua && rx + 1 == *ry
                }
                _ => false,
            };
            while j < ready.len() && same(&ready[j - 1], &ready[j]) {
                j += 1;
            }
            let group = &ready[i..j];
            let (first, last) = match (group[0], group[group.len() - 1]) {
                (Ready::Direct(a), Ready::Direct(b))
                | (Ready::Overwrite(a, _), Ready::Overwrite(b, _)) => (a, b),
                _ => unreachable!("groups hold one kind"),
            };
            let n = group.len() as u64;
            let op = match group[0] {
                Ready::Direct(p) => self.io.start(Op::Write {
                    req: p.req,
                    parts: n,
                }),
                Ready::Overwrite(p, r) => {
                    let op = self.io.start(Op::Overwrite {
                        req: p.req,
                        first: r,
                        n,
                        fua: p.fua,
                    });
                    self.regions.issue_overwrite(r, n, op);
                    op
                }
            };
            self.emit(Action::WriteDest {
                op,
                req: first.req,
                offset: first.offset,
                len: last.offset + last.len - first.offset,
                data: first.data,
                fua: first.fua,
            });
            i = j;
        }
    }

    /// Issues a FUA write piece after its commit round (SPEC 3.3).
    pub(super) fn issue_after_commit(&mut self, part: Part) {
        let op = self.io.start(Op::Write {
            req: part.req,
            parts: 1,
        });
        self.emit(Action::WriteDest {
            op,
            req: part.req,
            offset: part.offset,
            len: part.len,
            data: part.data,
            fua: true,
        });
    }

    // ----- flush -----

    fn submit_flush(&mut self, req: ReqId) {
        self.hold(req, 1);
        if self.changed() {
            // SPEC 3.4: wait for a commit, whose destination flush stands in for this one.
            self.commit.wait(CommitWaiter::Flush(req));
        } else {
            // Nothing changed: pass the flush to the destination only.
            let op = self.io.start(Op::PlainFlush { req });
            self.emit(Action::FlushDest { op });
        }
    }

    // ----- discard -----

    /// Routes a discard per SPEC 3.6, deferring it while a hydration is in flight in its
    /// range (H1).
    pub(super) fn dispatch_discard(&mut self, req: ReqId) {
        let Some(ReqKind::Discard { offset, len }) = self.reqs.get(&req).map(|s| s.kind) else {
            return;
        };
        let (rs, n) = self.geometry().covered_regions(offset, len);
        if n == 0 {
            // F4: nothing wholly covered, nothing passed down.
            return;
        }
        if self.mode() == Mode::Fail {
            self.hold(req, 1);
            self.settle(req, 1, IoStatus::Io);
            return;
        }
        if self.regions.map().is_range_hydrated(rs, n) {
            self.pass_down(req, rs, n);
            return;
        }
        if self.mode() != Mode::ReadWrite {
            // SPEC 3.6 step 4: ignored, reported as success.
            return;
        }
        if let Some(r) = self.regions.first_busy_in(rs, n) {
            // H1: marking now would let new writes race the copy's destination write.
            self.hold(req, 1);
            let queued = self.regions.wait(r, Waiter::Discard(req));
            debug_assert!(queued.is_ok(), "the region is busy");
            return;
        }
        let commit = &mut self.commit;
        self.regions
            .discard(rs, n, |w, bits| commit.record_bits(w, bits));
        self.pass_down(req, rs, n);
    }

    fn pass_down(&mut self, req: ReqId, rs: RegionId, n: u64) {
        if !self.discard_passdown {
            return;
        }
        let (start, end) = self.geometry().regions_byte_range(rs, n);
        let op = self.io.start(Op::Discard { req });
        self.hold(req, 1);
        self.emit(Action::DiscardDest {
            op,
            req,
            offset: start,
            len: end - start,
        });
    }

    // ----- hydrate -----

    fn submit_hydrate(&mut self, req: ReqId, offset: u64, len: u64) {
        if self.mode() != Mode::ReadWrite {
            self.hold(req, 1);
            self.settle(req, 1, IoStatus::ReadOnly);
            return;
        }
        let (first, n) = self.geometry().touched_regions(offset, len);
        self.hold(req, 1);
        self.hydrator.queue_request(req, first, first + n);
    }

    // ----- completions -----

    pub(super) fn complete(&mut self, op: OpId, status: IoStatus) {
        let Some(o) = self.io.finish(op) else {
            return;
        };
        match o {
            Op::Write { req, parts } => self.settle(req, parts, status),
            Op::Overwrite { req, first, n, fua } => {
                self.complete_overwrite(req, first, n, fua, status)
            }
            Op::Copy { first, n, origin } => self.complete_copy(first, n, origin, status),
            Op::Fill { req, first, n } => self.complete_fill(req, first, n, status),
            Op::Discard { req } => self.settle(req, 1, status),
            Op::PlainFlush { req } => self.settle(req, 1, status),
            Op::CommitFlush | Op::CommitWrite => self.complete_round_step(op, status),
            Op::Abort => self.complete_abort(status),
        }
    }

    fn complete_overwrite(
        &mut self,
        req: ReqId,
        first: RegionId,
        n: u64,
        fua: bool,
        status: IoStatus,
    ) {
        let ok = status.is_ok() && self.mode() == Mode::ReadWrite;
        let released = self.land(first, n, ok);
        if ok
            && fua
            && let Some(s) = self.reqs.get_mut(&req)
        {
            s.hold_for_commit = true;
        }
        let st = if ok {
            IoStatus::Ok
        } else if status.is_ok() {
            // Written, but the metadata cannot record it (SPEC 3.8, ro).
            IoStatus::Io
        } else {
            status
        };
        self.settle(req, n, st);
        // H4, fixed: writes queued behind a failed overwrite are routed afresh (they start
        // a copy) instead of inheriting its error.
        self.release(released, None);
    }

    fn complete_copy(&mut self, first: RegionId, n: u64, origin: CopyOrigin, status: IoStatus) {
        self.hydrator.copy_done(origin, n, status.is_ok(), self.now);
        let ok = status.is_ok() && self.mode() == Mode::ReadWrite;
        let released = self.land(first, n, ok);
        if status.is_ok() {
            let (s, e) = self.geometry().regions_byte_range(first, n);
            self.counters.bytes_hydrated += e - s;
        } else {
            self.counters.copy_errors += 1;
            let background = origin == CopyOrigin::Background;
            self.emit(Action::Event(Event::CopyFailed {
                first,
                n,
                background,
            }));
        }
        // On failure the waiting writes fail with EIO (SPEC 3.2); hydrate requests too.
        let fail = if ok { None } else { Some(IoStatus::Io) };
        self.release(released, fail);
    }

    /// Ends the hydration of regions `[first, first+n)`: hydrated when `ok` (and marked in
    /// the open transaction), cold again otherwise; returns who waited on them.
    pub(super) fn land(&mut self, first: RegionId, n: u64, ok: bool) -> Vec<Waiter> {
        let commit = &mut self.commit;
        self.regions.land(first, n, ok, |r| commit.record(r))
    }

    /// Settles or re-routes what waited on a region. With `fail`, writes and hydrate requests
    /// fail with that status; otherwise they are dispatched again (now hydrated, they go to
    /// the destination; after a failed overwrite, they start a copy).
    pub(super) fn release(&mut self, waiters: Vec<Waiter>, fail: Option<IoStatus>) {
        let mut ready = Vec::new();
        for w in waiters {
            match w {
                Waiter::Write(part) => match fail {
                    Some(st) => self.settle(part.req, 1, st),
                    None => {
                        self.dispatch_part(part, &mut ready);
                        self.settle(part.req, 1, IoStatus::Ok);
                    }
                },
                Waiter::Discard(req) => {
                    self.dispatch_discard(req);
                    self.settle(req, 1, IoStatus::Ok);
                }
                Waiter::Hydrate(req) => self.settle(req, 1, fail.unwrap_or(IoStatus::Ok)),
            }
        }
        self.issue_ready(ready);
    }

    /// Starts a copy of the cold regions `[first, first+n)`.
    pub(super) fn start_copy(
        &mut self,
        first: RegionId,
        n: u64,
        origin: CopyOrigin,
        owner: Option<ReqId>,
    ) -> OpId {
        let op = self.io.start(Op::Copy { first, n, origin });
        self.regions.start_copy(first, n, op);
        let (offset, end) = self.geometry().regions_byte_range(first, n);
        self.emit(Action::Copy {
            op,
            offset,
            len: end - offset,
            owner,
        });
        op
    }
}
