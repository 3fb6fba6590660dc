//! The commit part (SPEC 5.4): the metadata mode, the open transaction's dirty set, the
//! commit rounds and who waits on them.
//!
//! A round swaps the dirty set, flushes the destination, writes the exact bits, and only
//! then are the flushes, FUA writes and held completions that waited answered (by the
//! engine, which routes them).
//!
//! A waiter is always attached to a round that *starts* after it arrived, so the round's
//! transaction includes every region marked before it: a completed flush covers every write
//! completed before the flush was submitted (ARCHITECTURE.md, durability rule 4). Rounds
//! never overlap.
//!
//! On failure (`metadata_operation_failed`): the mode goes read-only at once, so nothing
//! new is marked; the metadata transaction is aborted and the hydration map reloaded from
//! disk; if that fails too, the mode goes to fail. The reload may clear bits anywhere, so the
//! engine then restarts the hydrator's scan (`Hydrator::restart_scan`).

use std::sync::Arc;

use super::{Action, CommitWaiter, Event, Io, IoStatus, Mode, Op, OpId, SharedView, Tick};
use crate::bitmap::DirtySet;
use crate::geometry::RegionId;

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

/// What a step of a round came to.
#[derive(Debug)]
pub(super) enum Stepped {
    /// The round goes on.
    Continues,
    /// The round ended: answer its waiters with this status.
    Finished(Vec<CommitWaiter>, IoStatus),
    /// The round failed in the named metadata operation: fail the metadata
    /// (`metadata_operation_failed`), then answer its waiters with an error.
    Failed(Vec<CommitWaiter>, &'static str),
}

/// The commit part. See the module documentation.
#[derive(Debug)]
pub(super) struct Commit {
    view: Arc<SharedView>,
    mode: Mode,
    /// The open transaction.
    current: DirtySet,
    /// A commit failed: the transaction stays "changed".
    failed: bool,
    round: Option<Round>,
    next_round: Vec<CommitWaiter>,
    wanted: bool,
    last_commit: Tick,
    completion_reported: bool,
    abort_pending: bool,
}

impl Commit {
    pub(super) fn new(view: Arc<SharedView>, now: Tick) -> Self {
        let completion_reported = view.map().is_complete();
        Self {
            view,
            mode: Mode::ReadWrite,
            current: DirtySet::new(),
            failed: false,
            round: None,
            next_round: Vec::new(),
            wanted: false,
            last_commit: now,
            completion_reported,
            abort_pending: false,
        }
    }

    /// The metadata mode.
    pub(super) fn mode(&self) -> Mode {
        self.mode
    }

    /// Moves the mode forward (never back), publishes it and tells the operator.
    pub(super) fn set_mode(&mut self, mode: Mode, io: &mut Io) {
        if mode > self.mode {
            self.mode = mode;
            self.view.set_mode(mode);
            io.emit(Action::Event(Event::ModeChanged(mode)));
        }
    }

    /// Region `r` was newly marked: it joins the open transaction.
    pub(super) fn record(&mut self, r: RegionId) {
        self.current.insert(r);
    }

    /// The bits `mask` of map word `w` were newly marked.
    pub(super) fn record_bits(&mut self, w: u64, mask: u64) {
        self.current.insert_word_bits(w, mask);
    }

    /// Regions in the open transaction.
    pub(super) fn nr_dirty(&self) -> u64 {
        self.current.len()
    }

    /// Whether the metadata changed in the open or the committing transaction, or a failed
    /// commit left it so.
    pub(super) fn changed(&self) -> bool {
        !self.current.is_empty()
            || self.failed
            || self.round.as_ref().is_some_and(|r| r.nr_dirty > 0)
    }

    /// Whether no round is running.
    pub(super) fn is_idle(&self) -> bool {
        self.round.is_none()
    }

    /// `w` waits for the next round to start and end.
    pub(super) fn wait(&mut self, w: CommitWaiter) {
        self.next_round.push(w);
    }

    /// Asks for a round even with nobody waiting.
    pub(super) fn want(&mut self) {
        self.wanted = true;
    }

    /// The periodic commit's clock starts again at `now`.
    pub(super) fn restart_clock(&mut self, now: Tick) {
        self.last_commit = now;
    }

    /// When the periodic commit is due, if anything is to commit.
    pub(super) fn periodic_due(&self, interval: Tick) -> Option<Tick> {
        (!self.current.is_empty()).then(|| self.last_commit.saturating_add(interval))
    }

    /// Starts a round if one is wanted and none is running. Returns waiters to answer at
    /// once, with their status, when no round is needed or possible.
    pub(super) fn start_round(&mut self, io: &mut Io) -> Option<(Vec<CommitWaiter>, IoStatus)> {
        if self.round.is_some() || self.abort_pending {
            return None;
        }
        if self.next_round.is_empty() && !self.wanted {
            return None;
        }
        self.wanted = false;
        let waiters = std::mem::take(&mut self.next_round);
        if !self.current.is_empty() || self.failed {
            if self.mode != Mode::ReadWrite {
                // A flush or FUA that needs a commit fails in ro and fail modes (SPEC 3.8).
                return Some((waiters, IoStatus::Io));
            }
            // Pre-commit: from here on new marks go into the next transaction.
            let dirty = std::mem::take(&mut self.current);
            let op = io.start(Op::CommitFlush);
            self.round = Some(Round {
                phase: Phase::FlushingDest,
                op,
                nr_dirty: dirty.len(),
                dirty: Some(dirty),
                waiters,
            });
            io.emit(Action::FlushDest { op });
            None
        } else if waiters.iter().any(|w| matches!(w, CommitWaiter::Flush(_))) {
            // Another round got there first: the flush goes to the destination as usual.
            let op = io.start(Op::CommitFlush);
            self.round = Some(Round {
                phase: Phase::Plain,
                op,
                nr_dirty: 0,
                dirty: None,
                waiters,
            });
            io.emit(Action::FlushDest { op });
            None
        } else {
            Some((waiters, IoStatus::Ok))
        }
    }

    /// A step `op` of the running round completed at `now`; `None` if `op` is not the
    /// running round's.
    pub(super) fn step(
        &mut self,
        op: OpId,
        status: IoStatus,
        now: Tick,
        io: &mut Io,
    ) -> Option<Stepped> {
        let mut round = self.round.take()?;
        if round.op != op {
            self.round = Some(round);
            return None;
        }
        Some(match (round.phase, status.is_ok()) {
            (Phase::Plain, _) => Stepped::Finished(round.waiters, status),
            (Phase::FlushingDest, true) => {
                let dirty = round.dirty.take().unwrap_or_default();
                let op = io.start(Op::CommitWrite);
                round.phase = Phase::Writing;
                round.op = op;
                self.round = Some(round);
                io.emit(Action::CommitMetadata { op, dirty });
                Stepped::Continues
            }
            (Phase::FlushingDest, false) => {
                Stepped::Failed(round.waiters, "flush destination device")
            }
            (Phase::Writing, true) => {
                self.last_commit = now;
                if self.view.map().is_complete() && !self.completion_reported {
                    // SPEC 2.4 (b): an event after the commit that finds hydration complete.
                    self.completion_reported = true;
                    io.emit(Action::Event(Event::HydrationComplete));
                }
                Stepped::Finished(round.waiters, IoStatus::Ok)
            }
            (Phase::Writing, false) => Stepped::Failed(round.waiters, "dm_clone_metadata_commit"),
        })
    }

    /// SPEC 5.4 `metadata_operation_failed`, first half: log and go read-only.
    pub(super) fn operation_failed(&mut self, name: &'static str, io: &mut Io) {
        io.emit(Action::Event(Event::MetadataOperationFailed { op: name }));
        // After a failed commit the transaction stays "changed", so every later flush and
        // FUA fails too (SPEC 3.8).
        self.failed = true;
        self.set_mode(Mode::ReadOnly, io);
    }

    /// SPEC 5.4 `metadata_operation_failed`, second half: abort and reload.
    pub(super) fn abort(&mut self, io: &mut Io) {
        let op = io.start(Op::Abort);
        self.abort_pending = true;
        io.emit(Action::AbortMetadata { op });
    }

    /// The abort and reload finished.
    pub(super) fn abort_done(&mut self, status: IoStatus, io: &mut Io) {
        self.abort_pending = false;
        // The map now holds the committed state: the open transaction's marks are gone.
        self.current = DirtySet::new();
        if !status.is_ok() {
            self.set_mode(Mode::Fail, io);
        }
    }

    /// Checks the part's invariants against the operations in flight.
    pub(super) fn check(&self, io: &Io) -> Result<(), String> {
        let map = self.view.map();
        // Every region marked in the open or committing transaction is hydrated in core
        // (until an abort reloads the map), and the two transactions are disjoint.
        if !self.abort_pending {
            if let Some(r) = self.current.regions().find(|&r| !map.is_hydrated(r)) {
                return Err(format!("region {r} is dirty but not hydrated"));
            }
            if let Some(d) = self.round.as_ref().and_then(|x| x.dirty.as_ref()) {
                if let Some(r) = d.regions().find(|&r| !map.is_hydrated(r)) {
                    return Err(format!("region {r} is committing but not hydrated"));
                }
                if let Some(r) = d.regions().find(|&r| self.current.contains(r)) {
                    return Err(format!("region {r} is in two transactions"));
                }
            }
        }
        // A round's operation is in flight and of the right kind.
        if let Some(round) = &self.round {
            match (round.phase, io.get(round.op)) {
                (Phase::Plain | Phase::FlushingDest, Some(Op::CommitFlush))
                | (Phase::Writing, Some(Op::CommitWrite)) => {}
                (p, o) => return Err(format!("round in {p:?} with operation {o:?}")),
            }
        }
        // The published mode is this part's.
        if self.view.mode() != self.mode {
            return Err(format!(
                "view says {:?}, engine {:?}",
                self.view.mode(),
                self.mode
            ));
        }
        Ok(())
    }
}
