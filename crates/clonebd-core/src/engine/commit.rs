//! Commit rounds (SPEC 5.4): swap the dirty set, flush the destination, write the exact
//! bits, and only then answer the flushes, FUA writes and held completions that waited.
//!
//! A waiter is always attached to a round that *starts* after it arrived, so the round's
//! transaction includes every region marked before it: a completed flush covers every write
//! completed before the flush was submitted (ARCHITECTURE.md, durability rule 4). Rounds
//! never overlap.
//!
//! On failure (`metadata_operation_failed`): the mode goes read-only at once, so nothing
//! new is marked; the metadata transaction is aborted and the hydration map reloaded from
//! disk; if that fails too, the mode goes to fail.

use super::{Action, CommitWaiter, Engine, Event, IoStatus, Mode, Op, OpId, Phase, Round};
use crate::bitmap::DirtySet;

impl Engine {
    /// Starts a commit round if one is wanted and none is running.
    pub(super) fn maybe_start_round(&mut self) {
        if self.round.is_some() || self.abort_pending {
            return;
        }
        if self.next_round.is_empty() && !self.want_commit {
            return;
        }
        self.want_commit = false;
        let waiters = std::mem::take(&mut self.next_round);
        if !self.current.is_empty() || self.commit_failed {
            if self.mode != Mode::ReadWrite {
                // A flush or FUA that needs a commit fails in ro and fail modes (SPEC 3.8).
                self.finish_waiters(waiters, IoStatus::Io);
                return;
            }
            // Pre-commit: from here on new marks go into the next transaction.
            let dirty = std::mem::take(&mut self.current);
            let op = self.new_op(Op::CommitFlush);
            self.round = Some(Round {
                phase: Phase::FlushingDest,
                op,
                nr_dirty: dirty.len(),
                dirty: Some(dirty),
                waiters,
            });
            self.emit(Action::FlushDest { op });
        } else if waiters.iter().any(|w| matches!(w, CommitWaiter::Flush(_))) {
            // Another round got there first: the flush goes to the destination as usual.
            let op = self.new_op(Op::CommitFlush);
            self.round = Some(Round {
                phase: Phase::Plain,
                op,
                nr_dirty: 0,
                dirty: None,
                waiters,
            });
            self.emit(Action::FlushDest { op });
        } else {
            self.finish_waiters(waiters, IoStatus::Ok);
        }
    }

    /// A step of the running round completed.
    pub(super) fn complete_round_step(&mut self, op: OpId, status: IoStatus) {
        let Some(mut round) = self.round.take() else {
            return;
        };
        if round.op != op {
            self.round = Some(round);
            return;
        }
        match (round.phase, status.is_ok()) {
            (Phase::Plain, _) => self.finish_waiters(round.waiters, status),
            (Phase::FlushingDest, true) => {
                let dirty = round.dirty.take().unwrap_or_default();
                let op = self.new_op(Op::CommitWrite);
                round.phase = Phase::Writing;
                round.op = op;
                self.round = Some(round);
                self.emit(Action::CommitMetadata { op, dirty });
            }
            (Phase::FlushingDest, false) => {
                self.metadata_operation_failed("flush destination device");
                self.finish_waiters(round.waiters, IoStatus::Io);
            }
            (Phase::Writing, true) => {
                self.last_commit = self.now;
                if self.view.map().is_complete() && !self.completion_reported {
                    // SPEC 2.4 (b): an event after the commit that finds hydration complete.
                    self.completion_reported = true;
                    self.emit(Action::Event(Event::HydrationComplete));
                }
                self.finish_waiters(round.waiters, IoStatus::Ok);
            }
            (Phase::Writing, false) => {
                self.metadata_operation_failed("dm_clone_metadata_commit");
                self.finish_waiters(round.waiters, IoStatus::Io);
            }
        }
        self.maybe_start_round();
    }

    /// Answers everyone who waited for a round.
    fn finish_waiters(&mut self, waiters: Vec<CommitWaiter>, status: IoStatus) {
        for w in waiters {
            match w {
                CommitWaiter::Flush(req) | CommitWaiter::HeldReply(req) => {
                    self.settle(req, 1, status)
                }
                CommitWaiter::FuaWrite(part) => {
                    if status.is_ok() {
                        self.issue_after_commit(part);
                    } else {
                        self.settle(part.req, 1, status);
                    }
                }
                CommitWaiter::Token(token) => self.emit(Action::ControlDone { token, status }),
            }
        }
    }

    /// SPEC 5.4 `metadata_operation_failed`: log, go read-only, abort and reload.
    fn metadata_operation_failed(&mut self, op: &'static str) {
        self.emit(Action::Event(Event::MetadataOperationFailed { op }));
        // After a failed commit the transaction stays "changed", so every later flush and
        // FUA fails too (SPEC 3.8).
        self.commit_failed = true;
        self.set_mode(Mode::ReadOnly);
        self.fail_priority(IoStatus::Io);
        let op = self.new_op(Op::Abort);
        self.abort_pending = true;
        self.emit(Action::AbortMetadata { op });
    }

    /// The abort and reload finished.
    pub(super) fn complete_abort(&mut self, status: IoStatus) {
        self.abort_pending = false;
        // The map now holds the committed state: the open transaction's marks are gone.
        self.current = DirtySet::new();
        // The reload may have cleared bits anywhere.
        self.scan_floor = 0;
        if !status.is_ok() {
            self.set_mode(Mode::Fail);
        }
        self.maybe_start_round();
    }
}
