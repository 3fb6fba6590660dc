//! `clonebd check`, `clonebd dump` and `clonebd repair` as a user runs them, on the
//! kernel-written fixtures.

mod common;

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
    for cmd in ["check", "dump", "repair"] {
        let out = clonebd(&[cmd, "--help"]);
        assert_eq!(out.status.code(), Some(0));
        let s = text(&out.stdout);
        assert!(s.contains("Exit status:"), "{cmd}: {s}");
        assert!(s.contains("Examples:"), "{cmd}: {s}");
        assert!(s.contains("read-only"), "{cmd}: {s}");
    }
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf8")
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            text(&out.stdout),
            text(&out.stderr)
        )
    })
}

/// partial-4k's hydrated ranges (fixture.json).
const PARTIAL_4K: &str = "[[0,1],[5,16],[100,1],[1000,1000],[2001,2],[32767,1]]";

/// Damages `img` at `offset`, repairs it with `extra` options, and checks that META is
/// unchanged, NEW passes `clonebd check`, and `clonebd dump` of NEW shows `want`.
fn repair_damaged(img: &[u8], offset: usize, extra: &[&str], want: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut img = img.to_vec();
    img[offset] ^= 0x20;
    let meta = write_image(dir.path(), "damaged", &img);
    let new = dir.path().join("new.img");
    let mut args = vec!["repair", p(&meta), "--output", p(&new), "--json"];
    args.extend_from_slice(extra);
    let out = clonebd(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read(&meta).expect("read META"),
        img,
        "repair changed META"
    );
    let report = json(&out);
    let check = clonebd(&["check", p(&new)]);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check.stdout));
    let dumped = json(&clonebd(&["dump", "--json", p(&new)]));
    let want: serde_json::Value = serde_json::from_str(want).expect("want");
    assert_eq!(dumped["hydrated_ranges"], want, "{report:#}");
    assert_eq!(dumped["nr_hydrated"], report["nr_hydrated"]);
    report
}

#[test]
fn repair_of_a_damaged_superblock_with_the_geometry_given_loses_nothing() {
    let img = image("partial-4k");
    let r = repair_damaged(
        &img,
        300,
        &[
            "--unknown",
            "hydrated",
            "--region-size",
            "4k",
            "--size",
            "128m",
        ],
        PARTIAL_4K,
    );
    assert_eq!(r["superblock"], "damaged-roots-verified");
    assert_eq!(r["unknown_ranges"], serde_json::json!([]));
    assert_eq!(r["nr_hydrated_recovered"], 1021);
}

#[test]
fn repair_of_a_damaged_array_block_reports_its_regions_and_applies_the_choice() {
    let img = image("partial-4k");
    let (ablock0, _) = locations(&img);
    let at = ablock0 as usize * 4096 + 2000;
    let range = serde_json::json!([{
        "first_region": 0, "nr_regions": 32576, "offset_bytes": 0, "len_bytes": 133_431_296u64
    }]);
    let r = repair_damaged(&img, at, &["--unknown", "unhydrated"], "[[32767,1]]");
    assert_eq!(r["unknown_ranges"], range);
    assert_eq!(r["unknown_as"], "unhydrated");
    assert_eq!(r["damaged_blocks"][0]["block"], ablock0);
    let r = repair_damaged(
        &img,
        at,
        &["--unknown", "hydrated"],
        "[[0,32576],[32767,1]]",
    );
    assert_eq!(r["unknown_ranges"], range);
    assert_eq!(r["nr_hydrated"], 32577);
}

#[test]
fn repair_of_a_damaged_btree_node_finds_its_array_blocks_by_scanning() {
    let img = image("partial-4k");
    let root = u64::from_le_bytes(img[188..196].try_into().expect("8 bytes")) as usize;
    let r = repair_damaged(
        &img,
        root * 4096 + 100,
        &["--unknown", "hydrated"],
        PARTIAL_4K,
    );
    assert_eq!(r["array_blocks_from_scan"], 2);
    assert_eq!(r["damaged_blocks"][0]["kind"], "btree-node");
}

#[test]
fn repair_of_a_damaged_space_map_loses_nothing() {
    let img = image("partial-4k");
    let (_, bitmap0) = locations(&img);
    let r = repair_damaged(
        &img,
        bitmap0 as usize * 4096 + 3000,
        &["--unknown", "unhydrated"],
        PARTIAL_4K,
    );
    assert_eq!(r["damaged_blocks"][0]["kind"], "space-map-bitmap");
}

#[test]
fn repair_prints_a_human_report_listing_unknown_ranges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut img = image("partial-4k");
    let (ablock0, _) = locations(&img);
    img[ablock0 as usize * 4096 + 2000] ^= 1;
    let meta = write_image(dir.path(), "m", &img);
    let new = dir.path().join("new.img");
    let out = clonebd(&["repair", p(&meta), "-o", p(&new), "--unknown", "unhydrated"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    for line in [
        "unknown:         32576 regions in 1 range, written as unhydrated",
        "  regions 0..=32575 (32576), bytes 0..133431296 (133431296 bytes)",
        &format!("array block checksum mismatch at block {ablock0}"),
        "written:         1/32768 regions hydrated",
    ] {
        assert!(s.contains(line), "missing {line:?} in:\n{s}");
    }
}

#[test]
fn repair_without_unknown_is_refused_and_creates_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let meta = write_image(dir.path(), "m", &image("partial-4k"));
    let new = dir.path().join("new.img");
    let out = clonebd(&["repair", p(&meta), "--output", p(&new)]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("--unknown hydrated|unhydrated is required")
            && err.contains("no safe default"),
        "{err}"
    );
    assert!(!new.exists());
    let out = clonebd(&[
        "repair",
        p(&meta),
        "--output",
        p(&new),
        "--unknown",
        "maybe",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!new.exists());
}

#[test]
fn repair_refuses_an_existing_output_or_meta_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image("partial-4k");
    let meta = write_image(dir.path(), "m", &img);
    let new = dir.path().join("new.img");
    std::fs::write(&new, b"keep me").expect("write");
    let out = clonebd(&["repair", p(&meta), "-o", p(&new), "--unknown", "hydrated"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("already exists"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read(&new).expect("read"), b"keep me");
    let link = dir.path().join("link.img");
    std::fs::hard_link(&meta, &link).expect("link");
    for same in [&meta, &link] {
        let out = clonebd(&["repair", p(&meta), "-o", p(same), "--unknown", "hydrated"]);
        assert_eq!(out.status.code(), Some(2));
        assert!(
            text(&out.stderr).contains("is META itself"),
            "{}",
            text(&out.stderr)
        );
    }
    assert_eq!(std::fs::read(&meta).expect("read"), img);
}

#[test]
fn repair_of_a_damaged_superblock_names_the_missing_geometry_options() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut img = image("partial-4k");
    img[300] ^= 1;
    let meta = write_image(dir.path(), "m", &img);
    let new = dir.path().join("new.img");
    let base = ["repair", p(&meta), "-o", p(&new), "--unknown", "hydrated"];
    for (extra, missing) in [
        (&[][..], "give --region-size and --size (or --nr-regions)"),
        (
            &["--region-size", "4k"][..],
            "give --size (or --nr-regions)",
        ),
        (&["--size", "128m"][..], "give --region-size"),
    ] {
        let out = clonebd(&[&base[..], extra].concat());
        assert_eq!(out.status.code(), Some(2));
        let err = text(&out.stderr);
        assert!(err.contains(missing), "{err}");
        assert!(err.contains(&format!("metadata {}: ", p(&meta))), "{err}");
        assert!(!new.exists());
    }
    let out = clonebd(
        &[
            &base[..],
            &["--region-size", "4k", "--nr-regions", "32768"][..],
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(clonebd(&["check", p(&new)]).status.code(), Some(0));
}

#[test]
fn repaired_metadata_is_served_by_clonebd_run() {
    use common::daemon::{Daemon, Files};
    // partial-64k-tail: 204824 sectors in 64 KiB regions, 12 hydrated.
    let files = Files::new(204_824 * 512, 7);
    let mut img = image("partial-64k-tail");
    img[300] ^= 1;
    let damaged = write_image(files.dir.path(), "damaged", &img);
    let out = clonebd(&[
        "repair",
        p(&damaged),
        "-o",
        p(&files.meta),
        "--unknown",
        "unhydrated",
        "--region-size",
        "64k",
        "--size",
        &(204_824u64 * 512).to_string(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let d = Daemon::start(&files, &["--no-hydration"]);
    let status: serde_json::Value =
        serde_json::from_str(&d.ctl_ok("status", &["--json"])).expect("status json");
    assert_eq!(status["nr_hydrated"], 12, "{status}");
    assert_eq!(status["nr_regions"], 1601, "{status}");
    // Reads follow the repaired map: hydrated regions from the (zeroed) destination, the
    // rest from the (random) source.
    if common::daemon::have("nbdcopy") {
        let copy = files.path("read.img");
        common::daemon::run("nbdcopy", &[&d.unix_uri(), p(&copy)]);
        let mut want = files.source_bytes();
        for r in [7u64, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 1600] {
            let start = (r * 65_536) as usize;
            let end = (start + 65_536).min(want.len());
            want[start..end].fill(0);
        }
        let got = std::fs::read(&copy).expect("read copy");
        assert!(got == want, "the export does not follow the repaired map");
    }
    assert!(d.terminate().success());
}

#[test]
fn metadata_written_by_clonebd_run_is_repaired_and_served_again() {
    use common::daemon::{Daemon, Files};
    // 8 MiB in 64 KiB regions: 128 regions, one array block; hydrated in full, then that
    // block is damaged, so all 128 regions are unknown, and the operator (who saw the
    // clone complete) declares them hydrated.
    let files = Files::new(8 << 20, 11);
    let d = Daemon::start(&files, &[]);
    d.ctl_ok("wait", &[]);
    assert!(d.terminate().success());
    let mut img = std::fs::read(&files.meta).expect("read metadata");
    let (ablock0, _) = locations(&img);
    img[ablock0 as usize * 4096 + 2000] ^= 1;
    let damaged = write_image(files.dir.path(), "damaged", &img);
    std::fs::remove_file(&files.meta).expect("remove metadata");
    let out = clonebd(&[
        "repair",
        p(&damaged),
        "-o",
        p(&files.meta),
        "--unknown",
        "hydrated",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let r = json(&out);
    assert_eq!(r["nr_unknown"], 128, "{r:#}");
    assert_eq!(r["nr_hydrated"], 128, "{r:#}");
    assert_eq!(
        std::fs::read(&damaged).expect("read"),
        img,
        "repair changed META"
    );
    let d = Daemon::start(&files, &["--no-hydration"]);
    let status: serde_json::Value =
        serde_json::from_str(&d.ctl_ok("status", &["--json"])).expect("status json");
    assert_eq!(status["nr_hydrated"], 128, "{status}");
    if common::daemon::have("nbdcopy") {
        let copy = files.path("read.img");
        common::daemon::run("nbdcopy", &[&d.unix_uri(), p(&copy)]);
        let got = std::fs::read(&copy).expect("read copy");
        assert!(
            got == files.source_bytes(),
            "the clone does not read as its source"
        );
    }
    assert!(d.terminate().success());
}

#[test]
fn repair_refuses_the_metadata_of_a_running_clone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let meta = write_image(dir.path(), "held", &image("partial-4k"));
    let _held =
        clonebd_io::FileDevice::open(&meta, clonebd_io::OpenOptions::read_write().exclusive(true))
            .expect("exclusive open");
    let new = dir.path().join("new.img");
    let out = clonebd(&["repair", p(&meta), "-o", p(&new), "--unknown", "hydrated"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("metadata {}: in use", p(&meta))),
        "{err}"
    );
    assert!(!new.exists());
}
