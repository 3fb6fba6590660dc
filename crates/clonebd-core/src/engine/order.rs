//! The hydration order queue (clonebd only, SPEC D6): region ranges the background pass
//! copies before it scans. Owned by the hydrator.
//!
//! Ranges come from [`Control::HydrateFirst`](super::Control::HydrateFirst): the
//! `--hydrate-first` file at start (each at the back, in the file's order) and the
//! `hydrate_range` message while running (at the front). The queue is part of background
//! hydration, not of the hydrate requests (NBD CACHE): its copies count against
//! `hydration_threshold` and the bandwidth limit, are batched up to `hydration_batch_size`
//! adjacent regions within a range, yield to foreground I/O as the scan does, and wait while
//! hydration is disabled. The pass takes its next region from the queue's head range while
//! there is one, skipping regions that are not cold, and drops a range once nothing in it is
//! left to start; only an empty queue lets the scan go on from its offset, which the queue
//! never moves.

use std::collections::VecDeque;

use super::regions::Regions;
use crate::geometry::{Geometry, RegionId};

/// Region ranges `[next, end)`, head first.
#[derive(Debug, Default)]
pub(super) struct OrderQueue {
    ranges: VecDeque<(RegionId, RegionId)>,
}

impl OrderQueue {
    /// Queues the regions `[offset, offset+len)` touches (clipped to the clone).
    pub(super) fn push(&mut self, g: &Geometry, offset: u64, len: u64, front: bool) {
        let nr = g.nr_regions();
        let region = g.region_bytes();
        let first = offset / region;
        let end = offset.saturating_add(len).div_ceil(region).min(nr);
        if len == 0 || first >= end {
            return;
        }
        if front {
            self.ranges.push_front((first, end));
        } else {
            self.ranges.push_back((first, end));
        }
    }

    /// The next region of the queue to copy, and the end of its range (a batch stays within
    /// it); ranges with nothing left to start are dropped. `None` once the queue is empty:
    /// the scan's turn.
    pub(super) fn next(&mut self, regions: &Regions) -> Option<(RegionId, RegionId)> {
        while let Some(&(next, end)) = self.ranges.front() {
            match regions.first_cold_in(next, end) {
                Some(r) => {
                    if let Some(head) = self.ranges.front_mut() {
                        head.0 = r;
                    }
                    return Some((r, end));
                }
                None => {
                    self.ranges.pop_front();
                }
            }
        }
        None
    }

    /// Regions `[r, r+n)` of the head range were started: it goes on after them.
    pub(super) fn started(&mut self, r: RegionId, n: u64) {
        if let Some(head) = self.ranges.front_mut()
            && head.0 == r
        {
            head.0 = r + n;
            if head.0 >= head.1 {
                self.ranges.pop_front();
            }
        }
    }

    /// Regions still queued (counted whole, hydrated or not).
    pub(super) fn regions(&self) -> u64 {
        self.ranges.iter().map(|(next, end)| end - next).sum()
    }
}
