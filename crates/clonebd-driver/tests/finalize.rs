//! The finalized fast path (`Volume::finalize`, `Volume::start_finalized`) on the threaded
//! driver, with a real metadata store on traced simulated disks: finalize is refused while a
//! region is not hydrated; once finalized, reads, writes, FUA, flushes, discards and
//! hydrate requests go straight to the destination and never to the source or the
//! metadata; the volume drops its source; the metadata left behind is fully hydrated.

use std::sync::{Arc, Weak};

use clonebd_core::engine::Config;
use clonebd_core::{BlockDev, Caps, Geometry};
use clonebd_driver::{
    BlockExport, FinalizeError, Finalized, IoError, MonotonicClock, StoreBackend, Volume,
    VolumeOptions,
};
use clonebd_metadata::{MetadataStore, StoreOptions};
use clonebd_testkit::{Rng, SimDisk, Trace, TraceEvent, TraceOp};

const R: u64 = 4096;
const REGIONS: u64 = 16;

struct Clone {
    vol: Volume,
    src: Weak<dyn BlockDev>,
    dst: SimDisk,
    meta: SimDisk,
    trace: Trace,
    data: Vec<u8>,
    g: Geometry,
}

fn clone(passdown: bool) -> Clone {
    let g = Geometry::new(REGIONS * R / 512, R / 512).expect("geometry");
    let mut data = vec![0u8; g.target_bytes() as usize];
    Rng::new(7).fill(&mut data);
    let trace = Trace::new();
    let src = SimDisk::from_bytes("source", data.clone()).with_trace(&trace);
    let dst = SimDisk::new("dest", g.target_bytes()).with_trace(&trace);
    dst.set_caps(Caps {
        discard: true,
        write_zeroes: false,
        volatile_cache: true,
    });
    let meta = SimDisk::new("meta", 256 * 1024).with_trace(&trace);
    let (store, map) =
        MetadataStore::open(meta.clone(), g, StoreOptions::default()).expect("metadata");
    let mut cfg = Config::new(g);
    cfg.hydration_enabled = false;
    cfg.discard_passdown = passdown;
    let src: Arc<dyn BlockDev> = Arc::new(src);
    let weak = Arc::downgrade(&src);
    let vol = Volume::start(
        VolumeOptions {
            engine: cfg,
            copy_threads: 2,
            copy_chunk: clonebd_driver::exec::COPY_CHUNK,
            sparse: true,
        },
        src,
        Arc::new(dst.clone()),
        Box::new(StoreBackend::new(store)),
        map,
        Arc::new(MonotonicClock::new()),
    );
    Clone {
        vol,
        src: weak,
        dst,
        meta,
        trace,
        data,
        g,
    }
}

/// Hydrates the whole clone and finalizes it; the trace is cleared after.
fn finalized(passdown: bool) -> Clone {
    let c = clone(passdown);
    c.vol.hydrate(0, c.g.target_bytes()).expect("hydrate");
    assert_eq!(c.vol.finalize(), Ok(Finalized::Now));
    c.trace.clear();
    c
}

fn on(events: &[TraceEvent], disk: &str) -> Vec<TraceOp> {
    events
        .iter()
        .filter(|e| e.disk == disk)
        .map(|e| e.op)
        .collect()
}

#[test]
fn finalize_of_an_incomplete_clone_is_refused_with_the_count_left() {
    let c = clone(true);
    c.vol.hydrate(0, 3 * R).expect("hydrate three regions");
    assert_eq!(
        c.vol.finalize(),
        Err(FinalizeError::NotHydrated {
            remaining: REGIONS - 3,
            total: REGIONS
        })
    );
    assert!(!c.vol.is_finalized());
    assert!(c.src.upgrade().is_some(), "the source was dropped");
    // Still a clone: an unhydrated region reads from the source.
    let mut b = vec![0u8; R as usize];
    c.vol.read(5 * R, &mut b).expect("read");
    assert_eq!(b, c.data[5 * R as usize..6 * R as usize]);
}

#[test]
fn finalize_commits_detaches_the_source_and_leaves_full_metadata() {
    let c = clone(true);
    c.vol.hydrate(0, c.g.target_bytes()).expect("hydrate");
    assert!(c.vol.status().engine.nr_dirty > 0, "nothing left to commit");
    assert_eq!(c.vol.finalize(), Ok(Finalized::Now));
    assert!(c.vol.is_finalized() && c.vol.status().finalized);
    assert_eq!(c.vol.status().engine.nr_dirty, 0);
    assert!(
        c.src.upgrade().is_none(),
        "the volume still holds the source"
    );
    assert_eq!(c.vol.finalize(), Ok(Finalized::Already));
    assert!(c.vol.shutdown().is_ok());
    let (_, map) =
        MetadataStore::open(c.meta.clone(), c.g, StoreOptions { read_only: true }).expect("reopen");
    assert_eq!(map.nr_hydrated(), REGIONS);
    assert_eq!(c.dst.durable(), c.data, "the destination is not the source");
}

#[test]
fn finalized_reads_and_writes_go_to_the_destination_alone() {
    let c = finalized(true);
    let new = vec![0xa5u8; 2 * R as usize];
    c.vol.write(R, &new, false).expect("write");
    let mut b = vec![0u8; 4 * R as usize];
    c.vol.read(0, &mut b).expect("read");
    assert_eq!(&b[..R as usize], &c.data[..R as usize]);
    assert_eq!(&b[R as usize..3 * R as usize], &new[..]);
    let ev = c.trace.events();
    assert_eq!(
        on(&ev, "dest"),
        vec![
            TraceOp::Write {
                offset: R,
                len: 2 * R
            },
            TraceOp::Read {
                offset: 0,
                len: 4 * R
            }
        ]
    );
    assert!(on(&ev, "source").is_empty() && on(&ev, "meta").is_empty());
}

#[test]
fn finalized_flush_and_fua_flush_the_destination_without_a_commit() {
    let c = finalized(true);
    c.vol
        .write(0, &vec![1u8; R as usize], true)
        .expect("FUA write");
    assert!(!c.dst.has_unflushed(), "a FUA write left data unflushed");
    c.vol
        .write(R, &vec![2u8; R as usize], false)
        .expect("write");
    assert!(c.dst.has_unflushed());
    c.vol.flush().expect("flush");
    assert!(!c.dst.has_unflushed(), "a flush left data unflushed");
    let ev = c.trace.events();
    assert_eq!(
        on(&ev, "dest"),
        vec![
            TraceOp::Write { offset: 0, len: R },
            TraceOp::Flush,
            TraceOp::Write { offset: R, len: R },
            TraceOp::Flush
        ]
    );
    assert!(on(&ev, "meta").is_empty(), "a flush committed metadata");
}

#[test]
fn finalized_discards_pass_down_whole_unless_passdown_is_off() {
    let c = finalized(true);
    // Not region-aligned: once finalized the range goes down as it is (dm-linear).
    c.vol.discard(512, 3 * R).expect("discard");
    c.vol
        .hydrate(0, c.g.target_bytes())
        .expect("hydrate is a no-op");
    assert_eq!(
        on(&c.trace.events(), "dest"),
        vec![TraceOp::Discard {
            offset: 512,
            len: 3 * R
        }]
    );
    assert_eq!(
        c.vol.discard(0, c.g.target_bytes() + R),
        Err(IoError::Invalid)
    );
    let off = finalized(false);
    off.vol.discard(0, 4 * R).expect("discard without passdown");
    assert!(off.trace.events().is_empty(), "a discard reached a device");
}

#[test]
fn start_finalized_needs_full_metadata_and_serves_the_destination() {
    let c = finalized(true);
    assert!(c.vol.shutdown().is_ok());
    drop(c.vol);
    let (store, map) =
        MetadataStore::open(c.meta.clone(), c.g, StoreOptions::default()).expect("reopen");
    let mut cfg = Config::new(c.g);
    cfg.discard_passdown = true;
    let opts = VolumeOptions {
        engine: cfg,
        copy_threads: 1,
        copy_chunk: clonebd_driver::exec::COPY_CHUNK,
        sparse: true,
    };
    let vol = Volume::start_finalized(
        opts,
        Arc::new(c.dst.clone()),
        Box::new(StoreBackend::new(store)),
        map,
        Arc::new(MonotonicClock::new()),
    )
    .expect("start finalized");
    assert!(vol.is_finalized());
    let mut b = vec![0u8; c.data.len()];
    vol.read(0, &mut b).expect("read");
    assert_eq!(b, c.data);
    assert!(vol.shutdown().is_ok());

    let fresh = SimDisk::new("meta2", 256 * 1024);
    let (store, map) = MetadataStore::open(fresh, c.g, StoreOptions::default()).expect("format");
    let refused = Volume::start_finalized(
        opts,
        Arc::new(c.dst.clone()),
        Box::new(StoreBackend::new(store)),
        map,
        Arc::new(MonotonicClock::new()),
    )
    .expect_err("started without a source on empty metadata");
    assert_eq!(
        refused,
        FinalizeError::NotHydrated {
            remaining: REGIONS,
            total: REGIONS
        }
    );
}
