//! Model-based tests of the engine and the data path: random interleavings of every request
//! kind, completions in any order, background steps, injected I/O errors and crash-and-reopen,
//! checked against the oracle in `common::sim` after every step (see that module), with the
//! engine's invariants checked after every input.

mod common;

use common::AtomicMetaModel;
use common::sim::{Sim, SimConfig, SimOp};
use proptest::prelude::*;

fn config(faults: bool, hydration: bool, passdown: bool, tail: bool) -> SimConfig {
    SimConfig {
        // 24 regions of 4 KiB, plus a short tail region of 2 KiB when asked.
        target_sectors: 24 * 8 + if tail { 4 } else { 0 },
        region_sectors: 8,
        meta_bytes: 64 * 1024,
        passdown,
        hydration: hydration.then_some((4, 2)),
        faults,
    }
}

fn op_strategy() -> impl Strategy<Value = SimOp> {
    prop_oneof![
        4 => (0u8..8, 0u64..200, 1u64..40).prop_map(|(k, b, n)| SimOp::Submit { k, b, n }),
        5 => any::<usize>().prop_map(|i| SimOp::Complete { i }),
        1 => (1u64..2000).prop_map(|ms| SimOp::Tick { dt: ms * 1_000_000 }),
        1 => (0u8..6, 0u32..7).prop_map(|(c, v)| SimOp::Control { c, v }),
        1 => (0u8..3, 0u8..4).prop_map(|(dev, op)| SimOp::Fault { dev, op }),
        1 => (0u8..3).prop_map(|style| SimOp::Crash { style }),
        3 => any::<usize>().prop_map(|i| SimOp::Fill { i }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_model_under_any_interleaving(
        ops in proptest::collection::vec(op_strategy(), 1..300),
        faults in any::<bool>(),
        hydration in any::<bool>(),
        passdown in any::<bool>(),
        tail in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let model = AtomicMetaModel::default();
        let mut sim = Sim::new(seed, config(faults, hydration, passdown, tail), &model)
            .map_err(TestCaseError::fail)?;
        for op in ops {
            sim.step(op).map_err(TestCaseError::fail)?;
        }
        sim.finish().map_err(TestCaseError::fail)?;
    }
}

/// The model's source is sparse (see `Sim::new`): hydrating it all runs copies through every
/// path of a sparse copy, and the oracle finds the destination equal to the source.
#[test]
fn model_hydration_zeroes_holes_unread_and_zeros_after_reading() {
    let mut c = clonebd_driver::exec::CopyDone::default();
    for seed in 0..8 {
        let model = AtomicMetaModel::default();
        let mut sim =
            Sim::new(seed, config(false, true, true, seed % 2 == 1), &model).expect("start");
        sim.finish()
            .expect("hydrated, every block as the model says");
        c.add(sim.stats.copies);
    }
    assert!(
        c.unread > 0 && c.zeroed > c.unread && c.copied > 0,
        "copies did not take every sparse path: {c:?}"
    );
}
