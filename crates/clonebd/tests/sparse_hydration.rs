//! Sparse-aware hydration (the default): a sparse source's holes are not read and its zeros
//! are not written, yet the destination ends equal to the source whatever it held before;
//! `status --json` counts the bytes copied and the bytes zeroed; `--no-sparse-hydration`
//! copies every byte.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::daemon::{Daemon, Files, Rng, first_difference};

const MIB: u64 = 1 << 20;

/// A 16 MiB source that is mostly a hole: random data in [0, 1 MiB) and [8 MiB, 8.5 MiB),
/// written zeros (allocated, not a hole) in [4 MiB, 5 MiB); a destination full of 0xee.
fn sparse_files() -> Files {
    let f = Files::new(16 * MIB, 51);
    let src = std::fs::File::create(&f.source).expect("source");
    src.set_len(16 * MIB).expect("size");
    let mut data = vec![0u8; MIB as usize];
    Rng::new(52).fill(&mut data);
    src.write_all_at(&data, 0).expect("data");
    src.write_all_at(&data[..(MIB / 2) as usize], 8 * MIB)
        .expect("data");
    src.write_all_at(&vec![0u8; MIB as usize], 4 * MIB)
        .expect("zeros");
    src.sync_all().expect("sync");
    std::fs::write(&f.dest, vec![0xeeu8; (16 * MIB) as usize]).expect("dest garbage");
    f
}

fn hydrate(f: &Files, extra: &[&str]) -> serde_json::Value {
    let d = Daemon::start(f, extra);
    let st = d.wait_complete(Duration::from_secs(60));
    assert!(d.terminate().success());
    st
}

#[test]
fn holes_and_zeros_are_zeroed_not_copied_and_the_clone_equals_the_source() {
    let f = sparse_files();
    let st = hydrate(&f, &[]);
    assert_eq!(
        first_difference(&f.dest_bytes(), &f.source_bytes()),
        None,
        "the destination differs from the source (its 0xee garbage must read as zeros)"
    );
    // 64 KiB regions, 1 MiB copies: the copies holding data are [0, 1 MiB) and
    // [8 MiB, 9 MiB); the hole and the written zeros are zeroed.
    assert_eq!(st["bytes_copied"], 2 * MIB, "{st}");
    assert_eq!(st["bytes_skipped_zero"], 14 * MIB, "{st}");
}

#[test]
fn without_sparse_hydration_every_byte_is_copied() {
    let f = sparse_files();
    let st = hydrate(&f, &["--no-sparse-hydration"]);
    assert_eq!(first_difference(&f.dest_bytes(), &f.source_bytes()), None);
    assert_eq!(st["bytes_copied"], 16 * MIB, "{st}");
    assert_eq!(st["bytes_skipped_zero"], 0, "{st}");
}
