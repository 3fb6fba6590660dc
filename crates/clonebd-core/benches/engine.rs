//! Engine decisions per second: how fast the sans-IO engine turns requests and completions
//! into actions, with no I/O at all. Each iteration is one whole request or copy life cycle.

// criterion_group! generates undocumented items.
#![allow(missing_docs)]

use std::sync::Arc;

use clonebd_core::engine::{Action, Config, Control, Engine, Input, IoStatus, Request, SharedView};
use clonebd_core::{Geometry, HydrationMap};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const REGIONS: u64 = 1 << 24;

fn engine(hydration: bool) -> Engine {
    let g = Geometry::new(REGIONS * 8, 8).expect("geometry");
    let mut cfg = Config::new(g);
    cfg.hydration_enabled = false;
    // Measure the idle path: no foreground I/O holding background copies back.
    cfg.busy_window = 0;
    cfg.hydration_threshold = 64;
    cfg.hydration_batch_size = 1;
    cfg.commit_interval = u64::MAX / 4;
    let view = Arc::new(SharedView::new(HydrationMap::new(g.nr_regions())));
    let mut e = Engine::new(cfg, view, 0);
    e.apply(0, Input::Control(Control::Resume));
    while e.poll_action().is_some() {}
    if hydration {
        // The first copies stay queued for the benchmark to complete.
        e.apply(0, Input::Control(Control::EnableHydration));
    }
    e
}

/// Completes every operation the engine asks for until it only replies.
fn run(e: &mut Engine, now: u64) -> usize {
    let mut n = 0;
    while let Some(a) = e.poll_action() {
        n += 1;
        let op = match a {
            Action::WriteDest { op, .. }
            | Action::Copy { op, .. }
            | Action::FlushDest { op }
            | Action::CommitMetadata { op, .. }
            | Action::DiscardDest { op, .. } => op,
            _ => continue,
        };
        e.apply(now, Input::Completed(op, IoStatus::Ok));
    }
    n
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(1));

    let mut e = engine(false);
    let mut id = 0u64;
    g.bench_function("write_routing_1mib_hydrated", |b| {
        // 256 hydrated regions: a 1 MiB write becomes one destination write.
        e.apply(
            0,
            Input::Request(
                1_000_000,
                Request::Discard {
                    offset: 0,
                    len: 1 << 20,
                },
            ),
        );
        run(&mut e, 0);
        b.iter(|| {
            id += 1;
            e.apply(
                0,
                Input::Request(
                    id,
                    Request::Write {
                        offset: 0,
                        len: 1 << 20,
                        fua: false,
                    },
                ),
            );
            run(&mut e, 0)
        })
    });

    let mut e = engine(true);
    let mut now = 0u64;
    g.bench_function("background_copy", |b| {
        b.iter(|| {
            // One copy decision per iteration: complete the oldest copy in flight, which
            // lets the pass issue the next one.
            now += 1;
            if e.view().map().is_complete() {
                e = engine(true);
            }
            e.apply(now, Input::Tick);
            let a = e.poll_action();
            if let Some(Action::Copy { op, .. }) = a {
                e.apply(now, Input::Completed(op, IoStatus::Ok));
            }
            a.is_some()
        })
    });
    g.finish();
}

criterion_group!(engine_benches, benches);
criterion_main!(engine_benches);
