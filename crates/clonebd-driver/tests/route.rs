//! `Volume::route_write`: a write handed to a caller that submits it itself must be exactly a
//! write the fast path of `Volume::write` would take, and nothing else.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clonebd_core::engine::Config;
use clonebd_core::{AlignedBuf, Geometry};
use clonebd_driver::{BlockExport, MonotonicClock, StoreBackend, Volume, VolumeOptions};
use clonebd_io::{FileDevice, OpenOptions};
use clonebd_metadata::{MetadataStore, StoreOptions};

const SIZE: u64 = 4 << 20;
const REGION: u64 = 64 * 1024;

fn file(dir: &Path, name: &str, size: u64, byte: u8) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, vec![byte; size as usize]).expect("create file");
    p
}

fn volume(dir: &Path) -> (Volume, PathBuf) {
    let src = file(dir, "src", SIZE, 0x5a);
    let dst = file(dir, "dst", SIZE, 0);
    let meta = file(dir, "meta", 1 << 20, 0);
    let g = Geometry::new(SIZE / 512, REGION / 512).expect("geometry");
    let meta = FileDevice::open(&meta, OpenOptions::read_write()).expect("meta");
    let (store, map) = MetadataStore::open(meta, g, StoreOptions::default()).expect("metadata");
    let mut cfg = Config::new(g);
    cfg.hydration_enabled = false;
    let vol = Volume::start(
        VolumeOptions {
            engine: cfg,
            copy_threads: 2,
            copy_chunk: clonebd_driver::exec::COPY_CHUNK,
            sparse: true,
        },
        Arc::new(FileDevice::open(&src, OpenOptions::read_only()).expect("src")),
        Arc::new(FileDevice::open(&dst, OpenOptions::read_write()).expect("dst")),
        Box::new(StoreBackend::new(store)),
        map,
        Arc::new(MonotonicClock::new()),
    );
    (vol, dst)
}

#[test]
fn only_writes_to_hydrated_regions_are_routed_and_they_land_on_the_destination() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (vol, dstp) = volume(dir.path());
    // Nothing hydrated: every write must go through the engine (its region is copied first).
    assert!(vol.route_write(0, 4096, 4096).is_none());
    vol.hydrate(0, 2 * REGION).expect("hydrate");
    // A direct-I/O file is needed: without O_DIRECT support (tmpfs) nothing is routed.
    let Some(routed) = vol.route_write(4096, 8192, 4096) else {
        let dst = FileDevice::open(&dstp, OpenOptions::read_only()).expect("dst");
        assert!(
            dst.direct_file(0, 4096, 4096, false).is_none(),
            "routable but not routed"
        );
        return;
    };
    assert_eq!((routed.offset, routed.len), (4096, 8192));
    // The caller's write, through the file it was given.
    let mut data = AlignedBuf::new(8192);
    data.fill(0xc3);
    routed
        .file
        .write_all_at(&data, routed.offset)
        .expect("routed write");
    drop(routed);
    // Crossing into a region not hydrated, or not aligned for O_DIRECT: not routed.
    assert!(vol.route_write(2 * REGION - 4096, 8192, 4096).is_none());
    assert!(vol.route_write(512 * 3, 4096, 1).is_none());
    // Out of range: not routed (the normal path reports the error).
    assert!(vol.route_write(SIZE, 4096, 4096).is_none());
    let mut back = vec![0u8; 3 * 4096];
    vol.read(0, &mut back).expect("read");
    assert!(
        back[..4096].iter().all(|&b| b == 0x5a),
        "copied from the source"
    );
    assert!(back[4096..].iter().all(|&b| b == 0xc3), "the routed write");
    assert!(vol.shutdown().is_ok());
}
