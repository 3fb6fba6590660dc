//! Sparse copies and rule 1, step by step on simulated disks with the real metadata store:
//! a region whose source is a hole (or reads as zeros) is zeroed on the destination, not
//! copied, and it is recorded hydrated only after that zeroing is durable. A power cut after
//! the zeroing was issued and before the destination's flush leaves the region unhydrated,
//! so the clone reads the source's zeros there, never the destination's old garbage; once the
//! flush and the commit are through, the destination itself holds the zeros.

use std::sync::Arc;

use clonebd_core::engine::{Action, Config, Control, Engine, Input, IoStatus, Request, SharedView};
use clonebd_core::{AlignedBuf, Geometry, HydrationMap};
use clonebd_driver::StoreBackend;
use clonebd_driver::exec::{
    CopyDone, Devices, ReqBuf, SPARSE_COPY, execute_data, execute_metadata, op_of, read_routed,
};
use clonebd_metadata::{MetadataStore, StoreOptions};
use clonebd_testkit::{CutStyle, Rng, SimDisk, Trace, TraceOp};

const REGION: u64 = 4096;

fn open_store(meta: &SimDisk, g: Geometry) -> (MetadataStore<SimDisk>, HydrationMap) {
    MetadataStore::open(meta.clone(), g, StoreOptions::default()).expect("open metadata")
}

fn drain(e: &mut Engine) -> Vec<Action> {
    std::iter::from_fn(|| e.poll_action()).collect()
}

/// 16 regions of 4 KiB. The source is random data except regions 2-4, a hole, and region 5,
/// written zeros; the destination is 0xee throughout, durably.
fn disks(trace: &Trace) -> (Geometry, SimDisk, SimDisk, SimDisk) {
    let g = Geometry::new(16 * 8, 8).expect("geometry");
    let mut b = vec![0u8; g.target_bytes() as usize];
    Rng::new(7).fill(&mut b);
    b[(5 * REGION) as usize..(6 * REGION) as usize].fill(0);
    let src = SimDisk::from_bytes("source", b);
    src.make_hole(2 * REGION, 3 * REGION);
    let dst = SimDisk::from_bytes("dest", vec![0xee; g.target_bytes() as usize]).with_trace(trace);
    let meta = SimDisk::new("meta", 256 * 1024);
    (g, src, dst, meta)
}

/// Hydrates regions 2-5 with a hydrate request, running every copy as production does, and
/// then sends a flush: returns the engine (its commit round waiting on the destination's
/// flush), the flush's action and what the copies did.
fn hydrate_then_flush(
    g: Geometry,
    devs: &Devices<'_>,
    view: &Arc<SharedView>,
) -> (Engine, Action, CopyDone) {
    let mut cfg = Config::new(g);
    cfg.hydration_enabled = false;
    let mut e = Engine::new(cfg, Arc::clone(view), 0);
    e.apply(0, Input::Control(Control::Resume));
    drain(&mut e);
    e.apply(
        0,
        Input::Request(
            1,
            Request::Hydrate {
                offset: 2 * REGION,
                len: 4 * REGION,
            },
        ),
    );
    let mut scratch = AlignedBuf::new(0);
    let mut done = CopyDone::default();
    let mut acts = drain(&mut e);
    while let Some(a) = acts.pop() {
        if let Some((st, d)) = execute_data(devs, &a, &mut ReqBuf::None, SPARSE_COPY, &mut scratch)
        {
            assert_eq!(st, IoStatus::Ok, "{a:?}");
            done.add(d);
            e.apply(0, Input::Completed(op_of(&a).expect("op"), st));
            acts.extend(drain(&mut e));
        }
    }
    assert!(
        view.map().is_range_hydrated(2, 4),
        "regions 2-5 hydrated in core"
    );
    e.apply(0, Input::Request(2, Request::Flush));
    let acts = drain(&mut e);
    let [flush @ Action::FlushDest { .. }] = &acts[..] else {
        panic!("the commit round starts with the destination's flush, and only that: {acts:?}")
    };
    (e, flush.clone(), done)
}

/// Runs the commit round's destination flush, then the metadata commit that follows it.
fn flush_and_commit(
    e: &mut Engine,
    flush: &Action,
    devs: &Devices<'_>,
    backend: &mut StoreBackend<SimDisk>,
    view: &SharedView,
) {
    let mut scratch = AlignedBuf::new(0);
    let (st, _) = execute_data(devs, flush, &mut ReqBuf::None, SPARSE_COPY, &mut scratch)
        .expect("a data action");
    assert_eq!(st, IoStatus::Ok);
    e.apply(0, Input::Completed(op_of(flush).expect("op"), st));
    let acts = drain(e);
    let commit = acts
        .iter()
        .find(|a| matches!(a, Action::CommitMetadata { .. }))
        .expect("the commit follows the flush");
    assert_eq!(
        execute_metadata(backend, view.map(), commit),
        Some(IoStatus::Ok)
    );
}

#[test]
fn zeroed_region_is_not_recorded_hydrated_before_its_zeroing_is_durable() {
    let trace = Trace::new();
    let (g, src, dst, meta) = disks(&trace);
    let (store, map) = open_store(&meta, g);
    let view = Arc::new(SharedView::new(map));
    let devs = Devices {
        source: &src,
        dest: &dst,
    };
    let (e, _flush, done) = hydrate_then_flush(g, &devs, &view);
    assert_eq!(
        done,
        CopyDone {
            copied: 0,
            zeroed: 4 * REGION,
            unread: 3 * REGION
        },
        "the hole is zeroed unread, the written zeros after reading them"
    );
    let ev = trace.events();
    assert!(
        ev.iter()
            .any(|t| matches!(t.op, TraceOp::WriteZeroes { .. })),
        "the destination was zeroed: {ev:?}"
    );
    assert!(
        !ev.iter().any(|t| matches!(t.op, TraceOp::Write { .. })),
        "nothing was copied: {ev:?}"
    );
    assert!(dst.has_unflushed(), "the zeroing is in the volatile cache");
    // The power goes before the destination's flush ran.
    drop(e);
    drop(store);
    dst.power_cut(&mut Rng::new(1), CutStyle::LoseAll);
    meta.power_cut(&mut Rng::new(1), CutStyle::Random);
    let (_, map) = open_store(&meta, g);
    for r in 2..6 {
        assert!(
            !map.is_hydrated(r),
            "region {r} recorded hydrated though its zeroing never became durable"
        );
    }
    assert!(
        dst.snapshot()[(2 * REGION) as usize..(6 * REGION) as usize]
            .iter()
            .all(|&b| b == 0xee),
        "the zeroing was lost with the cache"
    );
    // So the clone reads the source there: zeros, not the destination's garbage.
    let view = SharedView::new(map);
    let mut buf = vec![1u8; (4 * REGION) as usize];
    assert_eq!(
        read_routed(&view, &g, &devs, 2 * REGION, &mut buf),
        IoStatus::Ok
    );
    assert!(buf.iter().all(|&b| b == 0), "the clone reads zeros");
}

#[test]
fn zeroed_region_committed_after_the_flush_survives_a_power_cut_as_zeros() {
    let trace = Trace::new();
    let (g, src, dst, meta) = disks(&trace);
    let (store, map) = open_store(&meta, g);
    let mut backend = StoreBackend::new(store);
    let view = Arc::new(SharedView::new(map));
    let devs = Devices {
        source: &src,
        dest: &dst,
    };
    let (mut e, flush, _) = hydrate_then_flush(g, &devs, &view);
    flush_and_commit(&mut e, &flush, &devs, &mut backend, &view);
    drop(backend);
    dst.power_cut(&mut Rng::new(2), CutStyle::Random);
    meta.power_cut(&mut Rng::new(2), CutStyle::Random);
    let (_, map) = open_store(&meta, g);
    assert!(map.is_range_hydrated(2, 4), "regions 2-5 committed");
    let d = dst.snapshot();
    assert!(
        d[(2 * REGION) as usize..(6 * REGION) as usize]
            .iter()
            .all(|&b| b == 0),
        "a committed region's destination reads zeros, not its old garbage"
    );
    assert!(
        d[..(2 * REGION) as usize].iter().all(|&b| b == 0xee),
        "regions not hydrated are untouched"
    );
}

/// Where the destination already knows it reads zeros (a hole, or space reserved at start),
/// a zero run of the source needs no zeroing at all; where it may hold data, it is zeroed.
/// Either way the region is committed only after the destination's flush, and reads zeros.
#[test]
fn zeros_over_a_destination_hole_are_not_zeroed_again() {
    let trace = Trace::new();
    let (g, src, dst, meta) = disks(&trace);
    // Regions 2-3 of the destination are a hole; 4-5 keep their 0xee.
    dst.make_hole(2 * REGION, 2 * REGION);
    let (store, map) = open_store(&meta, g);
    let mut backend = StoreBackend::new(store);
    let view = Arc::new(SharedView::new(map));
    let devs = Devices {
        source: &src,
        dest: &dst,
    };
    let (mut e, flush, done) = hydrate_then_flush(g, &devs, &view);
    assert_eq!(
        done.zeroed,
        4 * REGION,
        "zeros are counted as zeroed: {done:?}"
    );
    let zeroed: Vec<(u64, u64)> = trace
        .events()
        .iter()
        .filter_map(|t| match t.op {
            TraceOp::WriteZeroes { offset, len } => Some((offset, len)),
            _ => None,
        })
        .collect();
    assert_eq!(
        zeroed,
        vec![(4 * REGION, REGION), (5 * REGION, REGION)],
        "only the regions that held garbage are zeroed"
    );
    flush_and_commit(&mut e, &flush, &devs, &mut backend, &view);
    drop(backend);
    dst.power_cut(&mut Rng::new(3), CutStyle::Random);
    meta.power_cut(&mut Rng::new(3), CutStyle::Random);
    let (_, map) = open_store(&meta, g);
    assert!(map.is_range_hydrated(2, 4), "regions 2-5 committed");
    assert!(
        dst.snapshot()[(2 * REGION) as usize..(6 * REGION) as usize]
            .iter()
            .all(|&b| b == 0),
        "the destination reads zeros in every committed region"
    );
}
