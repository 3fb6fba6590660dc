//! Read routing (SPEC 3.1) on the driver's path, the only one reads take: each run of
//! regions is read from the device that owns it, hydrated regions from the destination and
//! the others from the source, without waiting and without hydrating anything.

use std::sync::Arc;

use clonebd_core::engine::{
    Action, Config, Control, Engine, Input, IoStatus, Mode, Request, SharedView,
};
use clonebd_core::{Geometry, HydrationMap};
use clonebd_driver::exec::{Devices, op_of, read_routed};
use clonebd_testkit::{SimDisk, Trace, TraceOp};

const RB: u64 = 4096;

/// 16 regions of 4 KiB: the source reads 0x5a, the destination 0xd0, and both are traced.
fn setup(trace: &Trace) -> (Geometry, SimDisk, SimDisk) {
    let g = Geometry::new(16 * 8, 8).expect("geometry");
    let size = g.target_bytes() as usize;
    let src = SimDisk::from_bytes("source", vec![0x5a; size]).with_trace(trace);
    let dst = SimDisk::from_bytes("dest", vec![0xd0; size]).with_trace(trace);
    (g, src, dst)
}

/// The reads the trace saw, as `(disk, offset, len)`.
fn reads(trace: &Trace) -> Vec<(String, u64, u64)> {
    trace
        .events()
        .into_iter()
        .filter_map(|e| match e.op {
            TraceOp::Read { offset, len } => Some((e.disk, offset, len)),
            _ => None,
        })
        .collect()
}

#[test]
fn read_of_unhydrated_region_goes_to_source() {
    let trace = Trace::new();
    let (g, src, dst) = setup(&trace);
    let view = SharedView::new(HydrationMap::new(g.nr_regions()));
    let devs = Devices {
        source: &src,
        dest: &dst,
    };
    let mut buf = vec![0u8; 512];
    assert_eq!(read_routed(&view, &g, &devs, RB, &mut buf), IoStatus::Ok);
    assert!(buf.iter().all(|&b| b == 0x5a));
    assert_eq!(reads(&trace), vec![("source".to_string(), RB, 512)]);
    assert!(!view.map().is_hydrated(1), "reads never hydrate");
}

#[test]
fn read_across_hydrated_and_unhydrated_regions_is_split_into_runs() {
    let trace = Trace::new();
    let (g, src, dst) = setup(&trace);
    let view = SharedView::new(HydrationMap::new(g.nr_regions()));
    view.map().set(1);
    view.map().set(2);
    let devs = Devices {
        source: &src,
        dest: &dst,
    };
    let mut buf = vec![0u8; (4 * RB) as usize];
    assert_eq!(read_routed(&view, &g, &devs, 0, &mut buf), IoStatus::Ok);
    assert_eq!(
        reads(&trace),
        vec![
            ("source".to_string(), 0, RB),
            ("dest".to_string(), RB, 2 * RB),
            ("source".to_string(), 3 * RB, RB),
        ]
    );
    let at = |r: u64| buf[(r * RB) as usize];
    assert_eq!([at(0), at(1), at(2), at(3)], [0x5a, 0xd0, 0xd0, 0x5a]);
}

#[test]
fn reads_fail_in_fail_mode() {
    let trace = Trace::new();
    let (g, src, dst) = setup(&trace);
    // Only the engine moves the mode; an engine that failed its abort publishes `fail`.
    let e = fail_mode_engine(g);
    assert_eq!(e.view().mode(), Mode::Fail);
    let devs = Devices {
        source: &src,
        dest: &dst,
    };
    let mut buf = vec![0u8; 512];
    assert_eq!(read_routed(e.view(), &g, &devs, 0, &mut buf), IoStatus::Io);
    assert!(reads(&trace).is_empty());
}

/// An engine whose commit failed and whose abort failed too: mode `fail`.
fn fail_mode_engine(g: Geometry) -> Engine {
    let view = Arc::new(SharedView::new(HydrationMap::new(g.nr_regions())));
    let mut cfg = Config::new(g);
    cfg.hydration_enabled = false;
    let mut e = Engine::new(cfg, view, 0);
    e.apply(0, Input::Control(Control::Resume));
    e.apply(
        0,
        Input::Request(1, Request::Discard { offset: 0, len: RB }),
    );
    e.apply(0, Input::Request(2, Request::Flush));
    while let Some(a) = e.poll_action() {
        let status = match a {
            Action::CommitMetadata { .. } | Action::AbortMetadata { .. } => IoStatus::Io,
            _ => IoStatus::Ok,
        };
        if let Some(op) = op_of(&a) {
            e.apply(0, Input::Completed(op, status));
        }
    }
    e
}
