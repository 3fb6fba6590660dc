//! `clonebd check` and `clonebd dump` as a user runs them, on the kernel-written fixtures.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const FIXTURES: [&str; 5] = [
    "fresh-4k",
    "partial-4k",
    "full-4k",
    "partial-64k-tail",
    "multilevel-4k",
];

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/kernel-metadata")
        .join(name)
}

fn image(name: &str) -> Vec<u8> {
    let gz = std::fs::read(fixture_dir(name).join("meta.img.gz")).expect("read fixture");
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut out)
        .expect("gunzip");
    out
}

fn write_image(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(format!("{name}.img"));
    std::fs::write(&p, bytes).expect("write image");
    p
}

fn clonebd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clonebd"))
        .args(args)
        .output()
        .expect("run clonebd")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Block `b`'s location in partial-4k: superblock 0, btree root 29 -> array blocks 27 and
/// 19, space map index 30 -> bitmap 28 (decoded from the image, not assumed).
fn locations(img: &[u8]) -> (u64, u64) {
    let u64_at = |off: usize| u64::from_le_bytes(img[off..off + 8].try_into().expect("8 bytes"));
    let bitset_root = u64_at(188) as usize;
    let index = u64_at(44 + 16) as usize;
    // First value of the root leaf: keys start at 32, values after 252 keys.
    let ablock0 = u64_at(bitset_root * 4096 + 32 + 8 * 252);
    let bitmap0 = u64_at(index * 4096 + 16);
    (ablock0, bitmap0)
}

#[test]
fn check_accepts_every_kernel_fixture() {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in FIXTURES {
        let p = write_image(dir.path(), name, &image(name));
        let out = clonebd(&["check", p.to_str().expect("utf8")]);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains(": clean:"),
            "{name}: {}",
            text(&out.stdout)
        );
        let quiet = clonebd(&["check", "--quiet", p.to_str().expect("utf8")]);
        assert_eq!(quiet.status.code(), Some(0));
        assert!(quiet.stdout.is_empty());
    }
}

fn check_damaged(offset: usize, expect: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut img = image("partial-4k");
    img[offset] ^= 0x20;
    let p = write_image(dir.path(), "damaged", &img);
    let out = clonebd(&["check", p.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains(expect), "expected {expect:?} in:\n{stdout}");
    assert!(
        text(&out.stderr).contains("problem"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read(&p).expect("read back"),
        img,
        "check changed the file"
    );
}

#[test]
fn check_names_a_damaged_superblock_checksum_and_leaves_the_file_alone() {
    check_damaged(
        190,
        "superblock (block 0): Superblock check failed: checksum",
    );
}

#[test]
fn check_names_a_damaged_array_block_and_leaves_the_file_alone() {
    let (ablock0, _) = locations(&image("partial-4k"));
    check_damaged(
        ablock0 as usize * 4096 + 2000,
        &format!("array block checksum mismatch at block {ablock0}"),
    );
}

#[test]
fn check_names_a_damaged_space_map_bitmap_and_leaves_the_file_alone() {
    let (_, bitmap0) = locations(&image("partial-4k"));
    check_damaged(
        bitmap0 as usize * 4096 + 3000,
        &format!("space map bitmap checksum mismatch at block {bitmap0}"),
    );
}

#[test]
fn check_reports_a_blank_device_as_a_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = write_image(dir.path(), "blank", &vec![0u8; 1 << 20]);
    let out = clonebd(&["check", p.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("all zeros"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn check_of_a_missing_file_or_without_arguments_exits_2() {
    let out = clonebd(&["check", "/nonexistent/meta.img"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("/nonexistent/meta.img"),
        "{}",
        text(&out.stderr)
    );
    let out = clonebd(&["check"]);
    assert_eq!(out.status.code(), Some(2));
    let out = clonebd(&["dump"]);
    assert_eq!(out.status.code(), Some(2));
    let out = clonebd(&["dump", "/nonexistent/meta.img"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn check_reads_metadata_held_exclusively_by_a_running_clone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = write_image(dir.path(), "held", &image("partial-64k-tail"));
    let _held =
        clonebd_io::FileDevice::open(&p, clonebd_io::OpenOptions::read_write().exclusive(true))
            .expect("exclusive open");
    let out = clonebd(&["check", p.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = clonebd(&["dump", p.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn dump_json_carries_fixture_json_fields() {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in FIXTURES {
        let p = write_image(dir.path(), name, &image(name));
        let out = clonebd(&["dump", "--json", p.to_str().expect("utf8")]);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", text(&out.stderr));
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let want: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fixture_dir(name).join("fixture.json")).expect("fixture.json"),
        )
        .expect("parse");
        for key in [
            "target_sectors",
            "region_sectors",
            "nr_regions",
            "nr_hydrated",
            "hydrated_ranges",
        ] {
            assert_eq!(got[key], want[key], "{name}: {key}");
        }
        // "0 262144 clone 8 7/2048 ..." -> the metadata block counts.
        let status = want["status_line"].as_str().expect("status");
        let md = status.split(' ').nth(4).expect("md field");
        assert_eq!(
            format!(
                "{}/{}",
                got["metadata_blocks_used"], got["metadata_blocks_total"]
            ),
            md,
            "{name}"
        );
    }
}

#[test]
fn dump_prints_a_human_summary_by_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = write_image(dir.path(), "p", &image("partial-64k-tail"));
    let out = clonebd(&["dump", p.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(0));
    let s = text(&out.stdout);
    for line in [
        "length:           204824 sectors",
        "region size:      128 sectors",
        "regions:          1601",
        "hydrated:         12/1601",
        "metadata blocks:  6/1024 used",
        "  50..=59 (10)",
        "  1600",
    ] {
        assert!(s.contains(line), "missing {line:?} in:\n{s}");
    }
}

#[test]
fn dump_refuses_invalid_metadata_with_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut img = image("fresh-4k");
    img[40] = 2; // version 2 (and a bad checksum: the checksum is reported first)
    let p = write_image(dir.path(), "bad", &img);
    let out = clonebd(&["dump", p.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("Superblock check failed"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn help_texts_document_exit_status_and_examples() {
    for cmd in ["check", "dump"] {
        let out = clonebd(&[cmd, "--help"]);
        assert_eq!(out.status.code(), Some(0));
        let s = text(&out.stdout);
        assert!(s.contains("Exit status:"), "{cmd}: {s}");
        assert!(s.contains("Examples:"), "{cmd}: {s}");
        assert!(s.contains("read-only"), "{cmd}: {s}");
    }
}
