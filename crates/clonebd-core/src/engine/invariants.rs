//! The engine's invariants, checked after every step by the model-based tests and the
//! simulations.

use thiserror::Error;

use super::{Engine, FlightKind, Op, Phase};

/// A broken engine invariant: always a bug.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("engine invariant violated: {0}")]
pub struct Violation(pub String);

impl Engine {
    /// Checks every invariant; returns the first violation found.
    pub fn check_invariants(&self) -> Result<(), Violation> {
        let map = self.view.map();
        let fail = |s: String| Err(Violation(s));
        // 1. A region in flight is not hydrated, and its operation exists and covers it.
        for (&r, f) in &self.inflight {
            if map.is_hydrated(r) {
                return fail(format!("region {r} is in flight but already hydrated"));
            }
            match (self.ops.get(&f.op), f.kind) {
                (Some(Op::Copy { first, n, .. }), FlightKind::Copy)
                | (Some(Op::Overwrite { first, n, .. }), FlightKind::Overwrite)
                | (Some(Op::Fill { first, n, .. }), FlightKind::Fill)
                    if (*first..*first + *n).contains(&r) => {}
                (None, FlightKind::Overwrite) if f.op == 0 => {
                    return fail(format!("overwrite of region {r} has no operation"));
                }
                (other, kind) => {
                    return fail(format!(
                        "region {r} in flight as {kind:?} with operation {:?}: {other:?}",
                        f.op
                    ));
                }
            }
        }
        // 2. Every region marked in the open or committing transaction is hydrated in core
        //    (until an abort reloads the map), and the two transactions are disjoint.
        if !self.abort_pending {
            if let Some(r) = self.current.regions().find(|&r| !map.is_hydrated(r)) {
                return fail(format!("region {r} is dirty but not hydrated"));
            }
            if let Some(d) = self.round.as_ref().and_then(|x| x.dirty.as_ref()) {
                if let Some(r) = d.regions().find(|&r| !map.is_hydrated(r)) {
                    return fail(format!("region {r} is committing but not hydrated"));
                }
                if let Some(r) = d.regions().find(|&r| self.current.contains(r)) {
                    return fail(format!("region {r} is in two transactions"));
                }
            }
        }
        // 3. Background accounting matches the flights.
        let bg: u64 = self
            .ops
            .values()
            .map(|o| match o {
                Op::Copy {
                    n,
                    origin: super::CopyOrigin::Background,
                    ..
                } => *n,
                _ => 0,
            })
            .sum();
        if bg != self.bg_regions {
            return fail(format!(
                "{} background regions counted, {bg} in flight",
                self.bg_regions
            ));
        }
        // 4. A round's operation is in flight and of the right kind.
        if let Some(round) = &self.round {
            match (round.phase, self.ops.get(&round.op)) {
                (Phase::Plain | Phase::FlushingDest, Some(Op::CommitFlush))
                | (Phase::Writing, Some(Op::CommitWrite)) => {}
                (p, o) => return fail(format!("round in {p:?} with operation {o:?}")),
            }
        }
        // 5. Nothing is hydrated past the end, and the published mode is the engine's.
        if map.nr_hydrated() > map.nr_regions() {
            return fail("more regions hydrated than exist".into());
        }
        if self.view.mode() != self.mode {
            return fail(format!(
                "view says {:?}, engine {:?}",
                self.view.mode(),
                self.mode
            ));
        }
        // 6. Every request waits for something.
        if let Some((id, _)) = self.reqs.iter().find(|(_, s)| s.pending == 0) {
            return fail(format!("request {id} is pending on nothing"));
        }
        Ok(())
    }
}
