//! The regions part: every region's hydration state and who waits on it, behind one
//! transition table.
//!
//! A region is in one of these states (the hydration bit of the shared map says `Hydrated`;
//! a record in flight says which kind of hydration is under way; neither is `Cold`):
//!
//! | state            | event                                   | next state         |
//! |------------------|-----------------------------------------|--------------------|
//! | `Cold`           | a copy starts (background, write, hydrate request) | `Copying(op)` |
//! | `Cold`           | a fill is taken (copy-on-read)          | `Filling(op)`      |
//! | `Cold`           | a full-region write is routed to it     | `OverwriteRouted`  |
//! | `OverwriteRouted`| the write is issued (merged with its neighbours) | `Overwriting(op)` |
//! | `Copying`, `Filling`, `Overwriting` | its operation succeeded, mode `rw` | `Hydrated` |
//! | `Copying`, `Filling`, `Overwriting` | its operation failed, or mode not `rw` | `Cold` |
//! | `Cold`           | a discard covers it wholly              | `Hydrated`         |
//! | `Hydrated`       | a metadata reload after a failed commit | as on disk         |
//!
//! The last two rows act on the map a word at a time (a discard may cover millions of
//! regions; it is refused while any of them is busy), the others through [`next`].
//!
//! While a region is busy (any state but `Cold` and `Hydrated`), writes, discards and hydrate
//! requests that need it wait on its record; leaving a busy state hands them back to the
//! caller, which routes them afresh or fails them. `OverwriteRouted` never outlives the step
//! that routed it: the request's write is issued before the engine takes its next input.
//! Every other transition is refused (a debug assertion, and the invariants report it).
//!
//! This part is the only writer of the hydration map's bits (the driver's reload after an
//! abort aside). Marks are reported to the caller, who records them in the open transaction.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{OpId, SharedView, Waiter};
use crate::bitmap::HydrationMap;
use crate::geometry::RegionId;

/// A hydration under way in a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Busy {
    /// Copied from the source by operation `op`.
    Copying(OpId),
    /// Written from a read's source data by operation `op` (copy-on-read).
    Filling(OpId),
    /// Routed a full-region write that is not issued yet (within one step).
    OverwriteRouted,
    /// Written wholly by a user request's operation `op`.
    Overwriting(OpId),
}

/// A region's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Not hydrated, nothing in flight: reads go to the source.
    Cold,
    /// A hydration is in flight.
    Busy(Busy),
    /// Hydrated: the destination owns the region.
    Hydrated,
}

/// What happens to a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Copy(OpId),
    Fill(OpId),
    RouteOverwrite,
    IssueOverwrite(OpId),
    Landed,
    Failed,
}

/// The transition table: the next state, or `None` for a transition that must not happen.
fn next(state: State, event: Event) -> Option<State> {
    use Busy::{Copying, Filling, OverwriteRouted, Overwriting};
    match (state, event) {
        (State::Cold, Event::Copy(op)) => Some(State::Busy(Copying(op))),
        (State::Cold, Event::Fill(op)) => Some(State::Busy(Filling(op))),
        (State::Cold, Event::RouteOverwrite) => Some(State::Busy(OverwriteRouted)),
        (State::Busy(OverwriteRouted), Event::IssueOverwrite(op)) => {
            Some(State::Busy(Overwriting(op)))
        }
        (State::Busy(Copying(_) | Filling(_) | Overwriting(_)), Event::Landed) => {
            Some(State::Hydrated)
        }
        (State::Busy(Copying(_) | Filling(_) | Overwriting(_)), Event::Failed) => Some(State::Cold),
        _ => None,
    }
}

/// A busy region's record: its hydration and who waits on it.
#[derive(Debug)]
struct Flight {
    busy: Busy,
    waiters: Vec<Waiter>,
}

/// The regions part. See the module documentation.
#[derive(Debug)]
pub(super) struct Regions {
    view: Arc<SharedView>,
    flights: BTreeMap<RegionId, Flight>,
}

impl Regions {
    pub(super) fn new(view: Arc<SharedView>) -> Self {
        Self {
            view,
            flights: BTreeMap::new(),
        }
    }

    /// The hydration map (read only; marks go through this part).
    pub(super) fn map(&self) -> &HydrationMap {
        self.view.map()
    }

    /// Region `r`'s state.
    pub(super) fn state(&self, r: RegionId) -> State {
        if let Some(f) = self.flights.get(&r) {
            State::Busy(f.busy)
        } else if self.map().is_hydrated(r) {
            State::Hydrated
        } else {
            State::Cold
        }
    }

    /// Moves region `r` by `event`; returns its new state.
    fn step(&mut self, r: RegionId, event: Event) -> State {
        let from = self.state(r);
        let to = next(from, event);
        debug_assert!(to.is_some(), "region {r}: {event:?} in state {from:?}");
        let to = to.unwrap_or(from);
        match to {
            State::Busy(busy) => {
                self.flights
                    .entry(r)
                    .and_modify(|f| f.busy = busy)
                    .or_insert(Flight {
                        busy,
                        waiters: Vec::new(),
                    });
            }
            State::Cold | State::Hydrated => {
                self.flights.remove(&r);
            }
        }
        to
    }

    pub(super) fn is_hydrated(&self, r: RegionId) -> bool {
        self.map().is_hydrated(r)
    }

    /// Whether a hydration is in flight in region `r`.
    pub(super) fn is_busy(&self, r: RegionId) -> bool {
        self.flights.contains_key(&r)
    }

    /// Whether region `r` is cold: not hydrated, nothing in flight.
    pub(super) fn is_cold(&self, r: RegionId) -> bool {
        !self.is_hydrated(r) && !self.is_busy(r)
    }

    /// Regions with a hydration in flight.
    pub(super) fn nr_busy(&self) -> u64 {
        self.flights.len() as u64
    }

    /// The first busy region in `[first, first+n)`.
    pub(super) fn first_busy_in(&self, first: RegionId, n: u64) -> Option<RegionId> {
        self.flights.range(first..first + n).next().map(|(&r, _)| r)
    }

    /// Queues `w` behind region `r`'s hydration; gives it back if `r` is not busy.
    pub(super) fn wait(&mut self, r: RegionId, w: Waiter) -> Result<(), Waiter> {
        match self.flights.get_mut(&r) {
            Some(f) => {
                f.waiters.push(w);
                Ok(())
            }
            None => Err(w),
        }
    }

    /// How many cold regions from `r` (which must be cold) on, at most `room` and below
    /// `limit`, are adjacent.
    pub(super) fn cold_run(&self, r: RegionId, room: u64, limit: RegionId) -> u64 {
        let mut n = 1;
        while n < room && r + n < limit && self.is_cold(r + n) {
            n += 1;
        }
        n
    }

    /// The first cold region in `[from, to)`.
    pub(super) fn first_cold_in(&self, from: RegionId, to: RegionId) -> Option<RegionId> {
        let mut from = from;
        loop {
            let r = self.map().first_unhydrated_in(from, to)?;
            if !self.is_busy(r) {
                return Some(r);
            }
            // Skip the whole busy run at once.
            let mut x = r + 1;
            while self.is_busy(x) {
                x += 1;
            }
            from = x;
        }
    }

    /// Cold regions `[first, first+n)` are being copied by `op`.
    pub(super) fn start_copy(&mut self, first: RegionId, n: u64, op: OpId) {
        for r in first..first + n {
            self.step(r, Event::Copy(op));
        }
    }

    /// Cold regions `[first, first+n)` are being filled by `op`.
    pub(super) fn start_fill(&mut self, first: RegionId, n: u64, op: OpId) {
        for r in first..first + n {
            self.step(r, Event::Fill(op));
        }
    }

    /// Cold region `r` is routed a full-region write, issued later in the same step.
    pub(super) fn route_overwrite(&mut self, r: RegionId) {
        self.step(r, Event::RouteOverwrite);
    }

    /// The routed full-region writes of `[first, first+n)` are issued as `op`.
    pub(super) fn issue_overwrite(&mut self, first: RegionId, n: u64, op: OpId) {
        for r in first..first + n {
            self.step(r, Event::IssueOverwrite(op));
        }
    }

    /// The hydration of `[first, first+n)` ended: with `ok` the regions are hydrated
    /// (`marked` is told of each newly set bit), otherwise cold again. Returns who waited.
    pub(super) fn land(
        &mut self,
        first: RegionId,
        n: u64,
        ok: bool,
        mut marked: impl FnMut(RegionId),
    ) -> Vec<Waiter> {
        let mut released = Vec::new();
        for r in first..first + n {
            if let Some(f) = self.flights.get_mut(&r) {
                released.append(&mut f.waiters);
                self.step(r, if ok { Event::Landed } else { Event::Failed });
            }
            if ok && self.view.map().set(r) {
                marked(r);
            }
        }
        released
    }

    /// Every cold region of `[rs, rs+n)` (none busy) is hydrated by a discard (the kernel's
    /// `cond_set_range`); `marked` is told of each word's newly set bits.
    pub(super) fn discard(&mut self, rs: RegionId, n: u64, mut marked: impl FnMut(u64, u64)) {
        debug_assert!(self.first_busy_in(rs, n).is_none());
        let end = rs + n;
        let map = self.view.map();
        let mut w = rs / 64;
        while w * 64 < end {
            let lo = (w * 64).max(rs) - w * 64;
            let hi = ((w + 1) * 64).min(end) - w * 64;
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let new = mask & !map.word(w);
            if new != 0 {
                map.set_word_bits(w, new);
                marked(w, new);
            }
            w += 1;
        }
    }

    /// Checks the part's invariants: a busy region is not hydrated, and no routed overwrite
    /// outlives its step. `op_covers(op, r, busy)` says whether `op` is an operation of the
    /// right kind covering `r`.
    pub(super) fn check(
        &self,
        op_covers: impl Fn(OpId, RegionId, Busy) -> bool,
    ) -> Result<(), String> {
        for (&r, f) in &self.flights {
            if self.map().is_hydrated(r) {
                return Err(format!("region {r} is in flight but already hydrated"));
            }
            match f.busy {
                Busy::OverwriteRouted => {
                    return Err(format!("overwrite of region {r} has no operation"));
                }
                Busy::Copying(op) | Busy::Filling(op) | Busy::Overwriting(op) => {
                    if !op_covers(op, r, f.busy) {
                        return Err(format!(
                            "region {r} in flight as {:?} without its operation",
                            f.busy
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod table {
    use super::*;

    #[test]
    fn only_listed_transitions_exist() {
        let op = 7;
        let busy = [Busy::Copying(op), Busy::Filling(op), Busy::Overwriting(op)];
        for b in busy {
            assert_eq!(next(State::Busy(b), Event::Landed), Some(State::Hydrated));
            assert_eq!(next(State::Busy(b), Event::Failed), Some(State::Cold));
            assert_eq!(next(State::Busy(b), Event::Copy(op)), None);
        }
        assert_eq!(
            next(State::Busy(Busy::OverwriteRouted), Event::Landed),
            None
        );
        assert_eq!(next(State::Hydrated, Event::Copy(op)), None);
        assert_eq!(next(State::Hydrated, Event::Fill(op)), None);
        assert_eq!(next(State::Hydrated, Event::RouteOverwrite), None);
        assert_eq!(next(State::Cold, Event::Landed), None);
        assert_eq!(
            next(State::Cold, Event::RouteOverwrite),
            Some(State::Busy(Busy::OverwriteRouted))
        );
    }
}
