//! What recording a request's metrics costs (a clock read before and after, three counter
//! adds and a histogram bucket), against the cheapest real request the volume serves: a
//! 4 KiB `pread` of a page-cached file. docs/PERFORMANCE.md, "Metrics", gives the ratio.

// criterion_group! generates undocumented items.
#![allow(missing_docs)]

use std::os::unix::fs::FileExt;
use std::time::Instant;

use clonebd_driver::metrics::{IoMetrics, Op};
use criterion::{Criterion, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let m = IoMetrics::default();
    c.bench_function("record one request", |b| {
        b.iter(|| {
            let t = Instant::now();
            m.request(Op::Read, 4096, t.elapsed(), true);
        });
    });
    c.bench_function("two clock reads alone", |b| {
        b.iter(|| {
            let t = Instant::now();
            std::hint::black_box(t.elapsed())
        });
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cached.img");
    std::fs::write(&path, vec![7u8; 1 << 20]).expect("file");
    let f = std::fs::File::open(&path).expect("open");
    let mut buf = vec![0u8; 4096];
    let mut at = 0u64;
    c.bench_function("4 KiB pread, page cache", |b| {
        b.iter(|| {
            f.read_exact_at(&mut buf, at).expect("pread");
            at = (at + 4096) % (1 << 20);
        });
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
