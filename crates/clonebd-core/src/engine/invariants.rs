//! The engine's invariants, checked after every step by the model-based tests and the
//! simulations. Each part checks its own state; this adds what ties the parts together.

use thiserror::Error;

use super::regions::Busy;
use super::{CopyOrigin, Engine, Op};

/// A broken engine invariant: always a bug.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("engine invariant violated: {0}")]
pub struct Violation(pub String);

impl Engine {
    /// Checks every invariant; returns the first violation found.
    pub fn check_invariants(&self) -> Result<(), Violation> {
        self.check_parts().map_err(Violation)
    }

    fn check_parts(&self) -> Result<(), String> {
        let map = self.view.map();
        // 1. A busy region is not hydrated, and its operation exists, is of its kind and
        //    covers it.
        self.regions.check(|op, r, busy| {
            matches!(
                (self.io.get(op), busy),
                (Some(Op::Copy { first, n, .. }), Busy::Copying(_))
                    | (Some(Op::Overwrite { first, n, .. }), Busy::Overwriting(_))
                    | (Some(Op::Fill { first, n, .. }), Busy::Filling(_))
                    if (*first..*first + *n).contains(&r)
            )
        })?;
        // 2. The transactions hold only hydrated regions, a round's operation is in flight
        //    and of the right kind, and the published mode is the engine's.
        self.commit.check(&self.io)?;
        // 3. Background accounting matches the copies in flight.
        let bg: u64 = self
            .io
            .ops
            .values()
            .map(|o| match o {
                Op::Copy {
                    n,
                    origin: CopyOrigin::Background,
                    ..
                } => *n,
                _ => 0,
            })
            .sum();
        if bg != self.hydrator.background_regions() {
            return Err(format!(
                "{} background regions counted, {bg} in flight",
                self.hydrator.background_regions()
            ));
        }
        // 4. Nothing is hydrated past the end.
        if map.nr_hydrated() > map.nr_regions() {
            return Err("more regions hydrated than exist".into());
        }
        // 5. Every request waits for something.
        if let Some((id, _)) = self.reqs.iter().find(|(_, s)| s.pending == 0) {
            return Err(format!("request {id} is pending on nothing"));
        }
        Ok(())
    }
}
