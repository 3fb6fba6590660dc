//! Sparse-aware hydration (the default): a sparse source's holes are not read and its zeros
//! are not written, yet the destination ends equal to the source whatever it held before,
//! and a destination file stays as sparse as the source (holes punched where it held
//! garbage); the same from qemu-nbd serving the source, whose holes come from NBD block
//! status (`base:allocation`); `status --json` counts the bytes copied, the bytes zeroed,
//! and of those the holes never read; `--no-sparse-hydration` copies every byte.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use common::daemon::{Daemon, Files, Rng, first_difference};
use common::servers::{Listen, need, qemu_nbd};

const MIB: u64 = 1 << 20;

/// The region size of these clones (`Daemon::start`'s).
const REGION: u64 = 64 << 10;

/// A 16 MiB source that is mostly a hole: random data in [0, 1 MiB) and [8 MiB, 8.5 MiB),
/// written zeros (allocated, not a hole) in [4 MiB, 5 MiB); a destination full of 0xee.
fn sparse_files() -> Files {
    let f = Files::new(16 * MIB, 51);
    write_sparse_source(&f.source);
    garbage(&f.dest);
    f
}

/// The source of [`sparse_files`] at `path`.
fn write_sparse_source(path: &Path) {
    let src = std::fs::File::create(path).expect("source");
    src.set_len(16 * MIB).expect("size");
    let mut data = vec![0u8; MIB as usize];
    Rng::new(52).fill(&mut data);
    src.write_all_at(&data, 0).expect("data");
    src.write_all_at(&data[..(MIB / 2) as usize], 8 * MIB)
        .expect("data");
    src.write_all_at(&vec![0u8; MIB as usize], 4 * MIB)
        .expect("zeros");
    src.sync_all().expect("sync");
}

/// Fills the destination with 0xee, every block allocated.
fn garbage(dest: &Path) {
    std::fs::write(dest, vec![0xeeu8; (16 * MIB) as usize]).expect("dest garbage");
}

/// Bytes of space a file holds.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// The destination equals the source byte for byte, and holds no more space than the
/// source's data plus one region for each of its 3 extents.
fn check_equal_and_sparse(dest: &Path, source: &Path) {
    let (d, s) = (
        std::fs::read(dest).expect("dest"),
        std::fs::read(source).expect("source"),
    );
    assert_eq!(
        first_difference(&d, &s),
        None,
        "the destination differs from the source (its 0xee garbage must read as zeros)"
    );
    let (da, sa) = (allocated(dest), allocated(source));
    assert!(
        da <= sa + 3 * REGION,
        "the destination holds {da} bytes of space, the source {sa}: holes were not punched"
    );
}

/// The counts a hydration of [`sparse_files`] makes: the data copied, the zeros zeroed, of
/// which the holes were never read.
fn check_counts(st: &serde_json::Value) {
    assert_eq!(st["bytes_copied"], 3 * MIB / 2, "{st}");
    assert_eq!(st["bytes_skipped_zero"], 29 * MIB / 2, "{st}");
    assert_eq!(st["bytes_skipped_hole"], 27 * MIB / 2, "{st}");
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
    check_equal_and_sparse(&f.dest, &f.source);
    check_counts(&st);
}

#[test]
fn a_fresh_destination_stays_as_sparse_as_the_source() {
    // The default reserves space at start: the source's data only, not its holes.
    let f = Files::new(16 * MIB, 53);
    write_sparse_source(&f.source);
    assert_eq!(
        allocated(&f.dest),
        0,
        "Files::new makes a sparse destination"
    );
    let st = hydrate(&f, &[]);
    check_equal_and_sparse(&f.dest, &f.source);
    check_counts(&st);
}

#[test]
fn an_nbd_source_s_holes_come_from_block_status_and_are_never_read() {
    if !need("qemu-nbd") {
        return;
    }
    let local = Files::new(16 * MIB, 0);
    write_sparse_source(&local.source);
    let at = Listen::Unix(local.path("qemu.sock"));
    let _q = qemu_nbd(&local.source, "sparse", &at);
    let f = local.with_remote_source(&at.uri("sparse"));
    garbage(&f.dest);
    let st = hydrate(&f, &[]);
    check_equal_and_sparse(&f.dest, &local.source);
    // qemu-nbd marks the holes NBD_STATE_ZERO: they are zeroed unread; the written zeros
    // are data to it, read and then zeroed.
    check_counts(&st);
}

#[test]
fn without_sparse_hydration_every_byte_is_copied() {
    let f = sparse_files();
    let st = hydrate(&f, &["--no-sparse-hydration"]);
    assert_eq!(first_difference(&f.dest_bytes(), &f.source_bytes()), None);
    assert_eq!(st["bytes_copied"], 16 * MIB, "{st}");
    assert_eq!(st["bytes_skipped_zero"], 0, "{st}");
    assert_eq!(st["bytes_skipped_hole"], 0, "{st}");
}
