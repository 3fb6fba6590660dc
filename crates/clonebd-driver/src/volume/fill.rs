//! Copy-on-read (`--hydrate-on-read`): a read of regions not hydrated also hydrates them.
//!
//! The read itself is unchanged: it reads the source and returns. Afterwards
//! [`Shared::offer_fills`] copies the bytes of each run of regions the read covered wholly
//! and that are still not hydrated ([`fill_runs`]) into a buffer of its own and queues it for
//! the copy threads; it never waits for the destination, and never reads the source again.
//! A copy thread submits the buffer to the engine as a [`Request::Fill`], which takes the
//! regions still cold with nothing in flight (a write that got there first wins) and has
//! their destination write executed like any other (`execute_data`), on that thread; the
//! regions are marked once it completed and committed by the same rounds as a copy's.
//!
//! Regions a read covers only partly are left cold: hydrating them would read the source a
//! second time. The bytes held by fills not yet written are bounded by a budget; a fill that
//! would go over it is dropped (counted), never waited for, so reads never slow down for it.

use std::sync::atomic::Ordering;

use clonebd_core::AlignedBuf;
use clonebd_core::engine::Request;

use super::{Job, Shared, lock};
use crate::exec::{ReqBuf, fill_runs};

/// A fill queued for the copy threads.
pub(super) struct Fill {
    offset: u64,
    data: AlignedBuf,
}

/// Fill counters, for the status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FillStats {
    /// The budget in bytes (0: copy-on-read is off).
    pub budget: u64,
    /// Bytes held by fills queued or being written now.
    pub pending_bytes: u64,
    /// Fills dropped because they would have gone over the budget.
    pub dropped: u64,
}

impl Shared {
    /// After a successful read of `buf` at `offset` (not finalized): offers the source's
    /// data of the cold regions it covered wholly as fills, if copy-on-read is on.
    pub(super) fn offer_fills(&self, offset: u64, buf: &[u8]) {
        let budget = self.fill_budget.load(Ordering::Relaxed);
        if budget == 0 || self.stopped.load(Ordering::Acquire) {
            return;
        }
        for (s, e) in fill_runs(self.view.map(), &self.geometry, offset, buf.len() as u64) {
            let len = e - s;
            let held = self.fill_pending.fetch_add(len, Ordering::AcqRel);
            if held.saturating_add(len) > budget {
                self.fill_pending.fetch_sub(len, Ordering::AcqRel);
                self.fill_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let (a, b) = ((s - offset) as usize, (e - offset) as usize);
            let mut data = AlignedBuf::new(b - a);
            data.copy_from_slice(&buf[a..b]);
            if self.jobs.send(Job::Fill(Fill { offset: s, data })).is_err() {
                // The copy threads are gone (shutdown): nothing will write it.
                self.fill_pending.fetch_sub(len, Ordering::AcqRel);
            }
        }
    }

    /// Runs a fill on this (copy) thread: the engine decides what it takes, and its
    /// destination writes run here.
    pub(super) fn run_fill(&self, fill: Fill) {
        let len = fill.data.len() as u64;
        let r = self.submit(
            Request::Fill {
                offset: fill.offset,
                len,
            },
            ReqBuf::Write(&fill.data),
        );
        if let Err(st) = r {
            // Nobody waits for a fill: the failure is the log's and the status's (the
            // engine counted it as a failed copy; its regions stay cold).
            let what = format!(
                "copy-on-read: writing the destination at byte {} ({len} bytes) failed: {st:?}",
                fill.offset
            );
            tracing::error!("{what}");
            *lock(&self.last_copy_error) = Some(what);
        }
        self.fill_pending.fetch_sub(len, Ordering::AcqRel);
    }

    /// The fill counters now.
    pub(super) fn fill_stats(&self) -> FillStats {
        FillStats {
            budget: self.fill_budget.load(Ordering::Relaxed),
            pending_bytes: self.fill_pending.load(Ordering::Acquire),
            dropped: self.fill_dropped.load(Ordering::Relaxed),
        }
    }
}
