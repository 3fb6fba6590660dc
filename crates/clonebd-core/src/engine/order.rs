//! The hydration order queue (clonebd only, SPEC D6): region ranges the background pass
//! copies before it scans.
//!
//! Ranges come from [`Control::HydrateFirst`](super::Control::HydrateFirst): the
//! `--hydrate-first` file at start (each at the back, in the file's order) and the
//! `hydrate_range` message while running (at the front). The queue is part of background
//! hydration, not of the hydrate requests (NBD CACHE, `PriorityRange`): its copies count
//! against `hydration_threshold` and the bandwidth limit, are batched up to
//! `hydration_batch_size` adjacent regions within a range, yield to foreground I/O as the
//! scan does, and wait while hydration is disabled. The pass takes its next region from the
//! queue's head range while there is one, skipping regions hydrated or in flight, and drops
//! a range once nothing in it is left to start; only an empty queue lets the scan go on
//! from its offset, which the queue never moves.

use super::{Engine, RegionId};

impl Engine {
    /// Queues the regions `[offset, offset+len)` touches (clipped to the clone).
    pub(super) fn queue_first(&mut self, offset: u64, len: u64, front: bool) {
        let g = self.geometry();
        let nr = g.nr_regions();
        let region = g.region_bytes();
        let first = offset / region;
        let end = offset.saturating_add(len).div_ceil(region).min(nr);
        if len == 0 || first >= end {
            return;
        }
        if front {
            self.first.push_front((first, end));
        } else {
            self.first.push_back((first, end));
        }
    }

    /// The next region of the order queue to copy, and the end of its range (a batch stays
    /// within it); ranges with nothing left to start are dropped. `None` once the queue is
    /// empty: the scan's turn.
    pub(super) fn next_queued(&mut self) -> Option<(RegionId, RegionId)> {
        while let Some(&(next, end)) = self.first.front() {
            match self.next_candidate(next, end) {
                Some(r) => {
                    if let Some(head) = self.first.front_mut() {
                        head.0 = r;
                    }
                    return Some((r, end));
                }
                None => {
                    self.first.pop_front();
                }
            }
        }
        None
    }

    /// Regions `[r, r+n)` of the queue's head range were started: it goes on after them.
    pub(super) fn queued_started(&mut self, r: RegionId, n: u64) {
        if let Some(head) = self.first.front_mut()
            && head.0 == r
        {
            head.0 = r + n;
            if head.0 >= head.1 {
                self.first.pop_front();
            }
        }
    }

    /// Regions still queued (counted whole, hydrated or not), for tests and invariants.
    #[cfg(test)]
    pub(super) fn queued_regions(&self) -> u64 {
        self.first.iter().map(|(next, end)| end - next).sum()
    }
}
