//! Fault injection on the whole stack (threaded driver, real metadata store, simulated disks
//! with injected faults), one test per fault: what fails, what keeps working, and which mode
//! the clone ends in (SPEC 3.8, 5.4, decision D4).

use std::io::ErrorKind;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clonebd_core::Geometry;
use clonebd_core::engine::{Config, Control, MS, Mode};
use clonebd_driver::{BlockExport, IoError, MonotonicClock, StoreBackend, Volume, VolumeOptions};
use clonebd_metadata::{MetadataStore, StoreOptions};
use clonebd_testkit::{FaultOp, Rng, SimDisk};

const R: u64 = 4096;

struct Clone {
    vol: Volume,
    src: SimDisk,
    dst: SimDisk,
    meta: SimDisk,
    data: Vec<u8>,
}

fn clone(regions: u64, tune: impl FnOnce(&mut Config)) -> Clone {
    let g = Geometry::new(regions * 8, 8).expect("geometry");
    let mut data = vec![0u8; g.target_bytes() as usize];
    Rng::new(regions).fill(&mut data);
    let src = SimDisk::from_bytes("source", data.clone());
    let dst = SimDisk::new("dest", g.target_bytes());
    let meta = SimDisk::new("meta", 256 * 1024);
    let (store, map) =
        MetadataStore::open(meta.clone(), g, StoreOptions::default()).expect("metadata");
    let mut cfg = Config::new(g);
    cfg.hydration_enabled = false;
    tune(&mut cfg);
    let vol = Volume::start(
        VolumeOptions {
            engine: cfg,
            copy_threads: 2,
            copy_chunk: clonebd_driver::exec::COPY_CHUNK,
            sparse: true,
        },
        Arc::new(src.clone()),
        Arc::new(dst.clone()),
        Box::new(StoreBackend::new(store)),
        map,
        Arc::new(MonotonicClock::new()),
    );
    Clone {
        vol,
        src,
        dst,
        meta,
        data,
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn source_read_error_fails_only_the_requests_that_need_it_and_hydration_retries() {
    let c = clone(64, |cfg| {
        cfg.retry_backoff_min = 20 * MS;
        cfg.hydration_threshold = 4;
    });
    // Region 0 hydrated beforehand: it no longer needs the source.
    c.vol
        .write(0, &[1u8; 4096], false)
        .expect("full-region write");
    // Every source read of region 5 fails for now.
    c.src
        .inject_fault(FaultOp::Read, Some((5 * R, R)), None, ErrorKind::Other);
    let mut b = vec![0u8; 512];
    assert_eq!(
        c.vol.read(5 * R, &mut b),
        Err(IoError::Io),
        "a read of region 5 needs the source"
    );
    assert_eq!(
        c.vol.write(5 * R + 512, &[2u8; 512], false),
        Err(IoError::Io),
        "its copy fails"
    );
    c.vol
        .read(0, &mut b)
        .expect("hydrated region 0 reads from the destination");
    c.vol
        .read(6 * R, &mut b)
        .expect("region 6 reads from the source");
    assert_eq!(b, c.data[(6 * R) as usize..(6 * R + 512) as usize]);
    // Background hydration: region 5 fails, is counted, and is retried with back-off while
    // the others hydrate.
    c.vol.control(Control::EnableHydration);
    wait_for("the other regions", Duration::from_secs(10), || {
        c.vol.status().engine.nr_hydrated == 63
    });
    wait_for("retries", Duration::from_secs(10), || {
        c.vol.status().engine.copy_errors >= 3
    });
    let errors_then = c.vol.status().engine.copy_errors;
    std::thread::sleep(Duration::from_millis(100));
    let errors_later = c.vol.status().engine.copy_errors;
    assert!(
        errors_later - errors_then < 5,
        "retries back off: {errors_then} -> {errors_later} in 100 ms"
    );
    assert_eq!(
        c.vol.status().engine.mode,
        Mode::ReadWrite,
        "a source error is not a metadata error"
    );
    // The source comes back: region 5 hydrates.
    c.src.clear_faults();
    wait_for("region 5", Duration::from_secs(60), || {
        c.vol.view().map().is_complete()
    });
    c.vol.read(5 * R, &mut b).expect("read");
    assert_eq!(b, c.data[(5 * R) as usize..(5 * R + 512) as usize]);
    assert!(c.vol.shutdown().is_ok());
}

#[test]
fn destination_write_error_fails_that_write_only() {
    let c = clone(16, |_| {});
    c.dst
        .inject_fault(FaultOp::Write, Some((3 * R, R)), Some(1), ErrorKind::Other);
    assert_eq!(c.vol.write(3 * R, &[3u8; 4096], false), Err(IoError::Io));
    assert!(
        !c.vol.view().map().is_hydrated(3),
        "a failed overwrite hydrates nothing"
    );
    c.vol
        .write(4 * R, &[4u8; 4096], false)
        .expect("another region");
    c.vol
        .write(3 * R, &[3u8; 4096], false)
        .expect("the same region, fault gone");
    c.vol.flush().expect("flush");
    assert_eq!(c.vol.status().engine.mode, Mode::ReadWrite);
    assert!(c.vol.shutdown().is_ok());
}

#[test]
fn failed_destination_flush_goes_read_only() {
    let c = clone(16, |_| {});
    c.vol.write(0, &[1u8; 4096], false).expect("write");
    c.dst
        .inject_fault(FaultOp::Flush, None, Some(1), ErrorKind::Other);
    assert_eq!(c.vol.flush(), Err(IoError::Io));
    assert_eq!(c.vol.status().engine.mode, Mode::ReadOnly);
    // Read-only: hydrated regions still read and write; unhydrated ones cannot be written;
    // every flush fails (the failed transaction stays "changed", SPEC 3.8).
    let mut b = vec![0u8; 512];
    c.vol.read(2 * R, &mut b).expect("reads still work");
    assert_eq!(c.vol.write(2 * R, &[9u8; 512], false), Err(IoError::Io));
    assert_eq!(c.vol.flush(), Err(IoError::Io));
    // The metadata holds the last committed state (nothing), untouched.
    let _ = c.vol.shutdown();
    let (_, map) = MetadataStore::open(
        c.meta.clone(),
        c.vol.geometry(),
        StoreOptions { read_only: true },
    )
    .expect("reopen");
    assert_eq!(map.nr_hydrated(), 0);
    assert!(clonebd_metadata::check(&c.meta).expect("check").is_clean());
}

#[test]
fn metadata_write_error_goes_read_only() {
    let c = clone(16, |_| {});
    c.vol.write(0, &[1u8; 4096], false).expect("write");
    c.meta
        .inject_fault(FaultOp::Write, None, Some(1), ErrorKind::Other);
    assert_eq!(c.vol.flush(), Err(IoError::Io));
    assert_eq!(c.vol.status().engine.mode, Mode::ReadOnly);
    // The reload put the bitmap back to the committed state: region 0 reads from the source.
    assert!(!c.vol.view().map().is_hydrated(0));
    let _ = c.vol.shutdown();
    assert!(clonebd_metadata::check(&c.meta).expect("check").is_clean());
}

#[test]
fn failed_abort_goes_fail_and_every_request_fails() {
    let c = clone(16, |_| {});
    c.vol.write(0, &[1u8; 4096], false).expect("write");
    // The commit's metadata write fails, then every metadata read (the abort re-reads the
    // superblock) fails too.
    c.meta
        .inject_fault(FaultOp::Write, None, Some(1), ErrorKind::Other);
    c.meta
        .inject_fault(FaultOp::Read, None, None, ErrorKind::Other);
    assert_eq!(c.vol.flush(), Err(IoError::Io));
    assert_eq!(c.vol.status().engine.mode, Mode::Fail);
    let mut b = vec![0u8; 512];
    assert_eq!(c.vol.read(0, &mut b), Err(IoError::Io));
    assert_eq!(c.vol.read(5 * R, &mut b), Err(IoError::Io));
    assert_eq!(c.vol.write(0, &[1u8; 512], false), Err(IoError::Io));
    assert_eq!(c.vol.flush(), Err(IoError::Io));
    let _ = c.vol.shutdown();
    c.meta.clear_faults();
    assert!(
        clonebd_metadata::check(&c.meta).expect("check").is_clean(),
        "what is on disk is intact"
    );
}
