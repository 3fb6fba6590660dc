//! Metadata benchmarks (docs/PERFORMANCE.md, "Metadata").
//!
//! - opening metadata with 2^28 regions (1 TiB of 4 KiB regions, half of them hydrated),
//!   which loads the whole bitmap;
//! - committing N dirty regions, N = 1, 1 000 and 1 000 000, spread at random over that
//!   map; and N = 1 and 1 000 on a map 256 times smaller, to show that the cost follows N
//!   and not the size of the map.
//!
//! Each is measured on a real file (`FileDevice`, every commit ending in two `fdatasync`s)
//! and, for the commits, on an in-memory device too (the CPU cost alone).
//!
//! Run with `cargo bench -p clonebd-metadata`.

// criterion's macros define undocumented functions.
#![allow(missing_docs)]

use std::io;
use std::sync::Mutex;
use std::time::Duration;

use clonebd_core::{BlockDev, DirtySet, Geometry};
use clonebd_io::{FileDevice, OpenOptions};
use clonebd_metadata::{MetadataStore, StoreOptions, required_metadata_bytes};
use clonebd_testkit::Rng;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};

/// A plain in-memory device: no cache model, no tracking; the CPU cost of the metadata code.
struct MemDev(Mutex<Vec<u8>>);

impl BlockDev for MemDev {
    fn size_bytes(&self) -> u64 {
        self.0.lock().map_or(0, |v| v.len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let v = self.0.lock().map_err(|_| io::Error::other("poisoned"))?;
        let o = offset as usize;
        buf.copy_from_slice(v.get(o..o + buf.len()).ok_or(io::ErrorKind::InvalidInput)?);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut v = self.0.lock().map_err(|_| io::Error::other("poisoned"))?;
        let o = offset as usize;
        v.get_mut(o..o + buf.len())
            .ok_or(io::ErrorKind::InvalidInput)?
            .copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

fn geometry(regions: u64) -> Geometry {
    Geometry::new(regions * 8, 8).expect("valid geometry")
}

fn device_size(g: &Geometry) -> u64 {
    (required_metadata_bytes(g) * 3 / 2).next_multiple_of(1 << 20)
}

/// Every other run of 64 words hydrated: half the regions, spread over the whole map.
fn half_hydrated(regions: u64) -> DirtySet {
    let mut d = DirtySet::new();
    for w in 0..regions.div_ceil(64) {
        if (w / 64) % 2 == 0 {
            d.insert_word_bits(w, u64::MAX);
        }
    }
    d
}

fn random_regions(n: u64, regions: u64, seed: u64) -> DirtySet {
    let mut rng = Rng::new(seed);
    let mut d = DirtySet::new();
    while d.len() < n {
        d.insert(rng.below(regions));
    }
    d
}

/// Creates the metadata file for `regions` regions, half hydrated.
fn create_file(path: &std::path::Path, regions: u64) {
    let g = geometry(regions);
    let f = std::fs::File::create(path).expect("create");
    f.set_len(device_size(&g)).expect("size");
    drop(f);
    let dev = FileDevice::open(path, OpenOptions::read_write()).expect("open");
    let (mut store, _) = MetadataStore::open(dev, g, StoreOptions::default()).expect("format");
    store.commit(&half_hydrated(regions)).expect("hydrate half");
}

fn mem_store(regions: u64) -> MetadataStore<MemDev> {
    let g = geometry(regions);
    let dev = MemDev(Mutex::new(vec![0; device_size(&g) as usize]));
    let (mut store, _) = MetadataStore::open(dev, g, StoreOptions::default()).expect("format");
    store.commit(&half_hydrated(regions)).expect("hydrate half");
    store
}

const BIG: u64 = 1 << 28;
const SMALL: u64 = 1 << 20;

fn open(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("meta-2e28.img");
    create_file(&path, BIG);
    let mut group = c.benchmark_group("metadata");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    group.bench_function("open 2^28 regions, half hydrated (file)", |b| {
        b.iter(|| {
            let dev = FileDevice::open(&path, OpenOptions::read_only()).expect("open file");
            let (store, map) =
                MetadataStore::open(dev, geometry(BIG), StoreOptions { read_only: true })
                    .expect("open metadata");
            assert_eq!(map.nr_hydrated(), BIG / 2);
            drop(store);
        });
    });
    group.finish();
}

fn commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut group = c.benchmark_group("metadata");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    for (regions, label, ns) in [
        (BIG, "2^28", &[1u64, 1_000, 1_000_000][..]),
        (SMALL, "2^20", &[1u64, 1_000][..]),
    ] {
        let path = dir.path().join(format!("meta-{label}.img"));
        create_file(&path, regions);
        let dev = FileDevice::open(&path, OpenOptions::read_write()).expect("open file");
        let (mut file_store, _) =
            MetadataStore::open(dev, geometry(regions), StoreOptions::default()).expect("open");
        let mut mem = mem_store(regions);
        for &n in ns {
            let dirty = random_regions(n, regions, n);
            group.bench_function(format!("commit {n} dirty regions of {label} (file)"), |b| {
                b.iter(|| file_store.commit(&dirty).expect("commit"));
            });
            group.bench_function(
                format!("commit {n} dirty regions of {label} (memory)"),
                |b| {
                    b.iter_batched(
                        || dirty.clone(),
                        |d| mem.commit(&d).expect("commit"),
                        BatchSize::LargeInput,
                    );
                },
            );
            assert_eq!(mem.nr_blocks_used(), file_store.nr_blocks_used());
        }
    }
    group.finish();
}

criterion_group!(benches, open, commit);
criterion_main!(benches);
