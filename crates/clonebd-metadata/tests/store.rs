//! The store's contract with the engine: exact bits (F1), recovery after a failed commit,
//! cost independent of the clone's size, the 4 161 600-block cap.

mod common;

use std::io;

use clonebd_core::{DirtySet, Geometry, HydrationMap};
use clonebd_metadata::{MetadataError, MetadataStore, StoreOptions, check};
use clonebd_testkit::{FaultOp, SimDisk, Trace, TraceOp};
use common::load;

#[test]
fn commit_writes_exactly_the_dirty_regions_not_their_in_core_words() {
    // F1: region 70 is hydrated in core after the dirty set was captured; it shares a word
    // with region 65, which is committed. Only 65 may reach the disk.
    let f = load("fresh-4k");
    let dev = SimDisk::from_bytes("meta", f.image.clone());
    let (mut store, map) =
        MetadataStore::open(dev.clone(), f.geometry(), StoreOptions::default()).expect("open");
    let mut dirty = DirtySet::new();
    map.set(65);
    dirty.insert(65);
    map.set(70);
    store.commit(&dirty).expect("commit");
    drop(store);
    let (_, on_disk) =
        MetadataStore::open(dev, f.geometry(), StoreOptions { read_only: true }).expect("reopen");
    assert!(on_disk.is_hydrated(65));
    assert!(!on_disk.is_hydrated(70));
    assert_eq!(on_disk.nr_hydrated(), 1);
}

#[test]
fn commits_leave_the_used_count_as_the_kernel_does() {
    let f = load("partial-4k");
    let dev = SimDisk::new("meta", f.metadata_bytes);
    let (mut store, _) =
        MetadataStore::open(dev.clone(), f.geometry(), StoreOptions::default()).expect("format");
    assert_eq!((store.nr_blocks_used(), store.nr_blocks_total()), (7, 2048));
    // Hundreds of commits wrap the allocation cursor around the 2048 blocks several times.
    for i in 0..700u64 {
        let mut d = DirtySet::new();
        d.insert((i * 4099) % 32_768);
        store.commit(&d).expect("commit");
        assert_eq!(store.nr_blocks_used(), 7, "after commit {i}");
    }
    assert!(check(&dev).expect("readable").is_clean());
}

#[test]
fn a_failed_commit_is_recovered_by_abort_and_reload() {
    let f = load("partial-4k");
    let dev = SimDisk::from_bytes("meta", f.image.clone());
    let (mut store, map) =
        MetadataStore::open(dev.clone(), f.geometry(), StoreOptions::default()).expect("open");
    let before = map.hydrated_ranges();
    // The engine marks regions in core, then the commit fails at the first flush.
    let mut d = DirtySet::new();
    for r in [3u64, 4, 4000, 32_000] {
        map.set(r);
        d.insert(r);
    }
    dev.inject_fault(FaultOp::Flush, None, Some(1), io::ErrorKind::Other);
    let err = store.commit(&d).expect_err("flush fails");
    assert!(matches!(err, MetadataError::Io { .. }), "{err:?}");
    assert!(matches!(
        store.commit(&d),
        Err(MetadataError::AbortRequired)
    ));
    assert!(matches!(
        store.reload_into(&map),
        Err(MetadataError::AbortRequired)
    ));
    store.abort().expect("abort");
    store.reload_into(&map).expect("reload");
    assert_eq!(
        map.hydrated_ranges(),
        before,
        "the in-core map is the committed one again"
    );
    // The engine goes read-only, as the kernel does: nothing more is written.
    store.set_read_only();
    let writes = dev.write_count();
    assert!(matches!(store.commit(&d), Err(MetadataError::ReadOnly)));
    assert_eq!(dev.write_count(), writes);
    assert!(check(&dev).expect("readable").is_clean());
    // A new store (a new table) may commit again.
    drop(store);
    let (mut store, map2) =
        MetadataStore::open(dev.clone(), f.geometry(), StoreOptions::default()).expect("reopen");
    assert_eq!(map2.hydrated_ranges(), before);
    store.commit(&d).expect("commit");
    assert!(check(&dev).expect("readable").is_clean());
}

#[test]
fn reload_into_replaces_every_word_and_checks_the_size() {
    let f = load("partial-64k-tail");
    let dev = SimDisk::from_bytes("meta", f.image.clone());
    let (mut store, _) =
        MetadataStore::open(dev, f.geometry(), StoreOptions { read_only: true }).expect("open");
    let map = HydrationMap::new(f.nr_regions);
    map.set(0);
    map.set(1599);
    store.reload_into(&map).expect("reload");
    assert_eq!(map.hydrated_ranges(), f.hydrated_ranges);
    let wrong = HydrationMap::new(f.nr_regions + 1);
    assert!(matches!(
        store.reload_into(&wrong),
        Err(MetadataError::MapSizeMismatch { .. })
    ));
}

#[test]
fn commit_cost_follows_the_dirty_regions_not_the_clone_size() {
    // 2^24 regions (a 2 MiB bitmap in 516 array blocks): committing one region reads and
    // writes a handful of blocks, not the bitmap.
    let f = load("multilevel-4k");
    let trace = Trace::new();
    let dev = SimDisk::from_bytes("meta", f.image.clone()).with_trace(&trace);
    let (mut store, _) =
        MetadataStore::open(dev.clone(), f.geometry(), StoreOptions::default()).expect("open");
    trace.clear();
    let mut d = DirtySet::new();
    d.insert(12_345_678);
    store.commit(&d).expect("commit");
    let ev = trace.events();
    let bytes = |want_write: bool| -> u64 {
        ev.iter()
            .map(|e| match e.op {
                TraceOp::Read { len, .. } if !want_write => len,
                TraceOp::Write { len, .. } if want_write => len,
                _ => 0,
            })
            .sum()
    };
    // Array block, bitmap, root and leaf (btree path), index, superblock.
    assert!(bytes(true) <= 6 * 4096, "wrote {} bytes", bytes(true));
    assert!(bytes(false) <= 8 * 4096, "read {} bytes", bytes(false));
    let flushes: Vec<usize> = ev
        .iter()
        .enumerate()
        .filter(|(_, e)| e.op == TraceOp::Flush)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(flushes.len(), 2);
    // The superblock is written after the first flush and before the second, and is the
    // only write there.
    let sb_writes: Vec<usize> = ev
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.op, TraceOp::Write { offset: 0, .. }))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(sb_writes.len(), 1);
    assert!(flushes[0] < sb_writes[0] && sb_writes[0] < flushes[1]);
    assert_eq!(flushes[1], ev.len() - 1);
}

#[test]
fn a_metadata_device_over_16_gib_uses_4161600_blocks_and_warns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("big-meta.img");
    let file = std::fs::File::create(&path).expect("create");
    file.set_len(17 << 30).expect("sparse 17 GiB");
    drop(file);
    let g = Geometry::new(1 << 24, 8).expect("valid");
    let dev = clonebd_io::FileDevice::open(&path, clonebd_io::OpenOptions::read_write())
        .expect("open file");
    let (mut store, _) = MetadataStore::open(dev, g, StoreOptions::default()).expect("format");
    assert_eq!(store.nr_blocks_total(), 4_161_600);
    // 2^21 regions: 32 768 words in 65 array blocks. Superblock, index, reference-count
    // root, 255 bitmaps, btree root, array blocks.
    assert_eq!(store.nr_blocks_used(), 3 + 255 + 1 + 65);
    assert_eq!(
        store.size_warning("meta").as_deref(),
        Some(
            "Metadata device meta is larger than 33292800 sectors: excess space will not be used."
        )
    );
    let mut d = DirtySet::new();
    d.insert(1);
    store.commit(&d).expect("commit");
    drop(store);
    let dev = clonebd_io::FileDevice::open(&path, clonebd_io::OpenOptions::read_only())
        .expect("open file");
    let report = check(&dev).expect("readable");
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.metadata_blocks_total, 4_161_600);
}

/// 2^31 regions, the kernel's maximum (8 TiB of 4 KiB regions): a 256 MiB bitmap in
/// 65 923 array blocks. Heavy (about 800 MiB written, 1 GiB of memory), so not in the
/// default run: `cargo test --release -p clonebd-metadata --test store -- --ignored`.
#[test]
#[ignore]
fn two_to_the_31_regions_format_fill_and_reopen() {
    let g = Geometry::new(8 << 31, 8).expect("2^31 regions");
    assert_eq!(g.nr_regions(), 1 << 31);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("meta-2e31.img");
    let size = clonebd_metadata::required_metadata_bytes(&g).next_multiple_of(1 << 20);
    let file = std::fs::File::create(&path).expect("create");
    file.set_len(size).expect("size");
    drop(file);
    let open = || {
        clonebd_io::FileDevice::open(&path, clonebd_io::OpenOptions::read_write())
            .expect("open file")
    };
    let (mut store, map) = MetadataStore::open(open(), g, StoreOptions::default()).expect("format");
    let used = store.nr_blocks_used();
    let mut d = DirtySet::new();
    for r in [0, (1 << 30) + 17, (1 << 31) - 1] {
        d.insert(r);
    }
    store.commit(&d).expect("commit");
    // Everything hydrated (a whole-device discard), in one transaction.
    let mut all = DirtySet::new();
    for w in 0..map.nr_words() {
        all.insert_word_bits(w, u64::MAX);
    }
    store.commit(&all).expect("commit all");
    assert_eq!(store.nr_blocks_used(), used);
    drop(store);
    let (_, map) = MetadataStore::open(open(), g, StoreOptions { read_only: true }).expect("open");
    assert_eq!(map.nr_hydrated(), 1 << 31);
    assert!(map.is_complete());
    let report = check(&open()).expect("readable");
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.nr_hydrated, 1 << 31);
}
