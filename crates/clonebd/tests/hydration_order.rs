//! The hydration order, against the real binary: `--hydrate-first FILE`, `--record-reads
//! FILE` replayed in the next clone, the `hydrate_range` message, and the files' errors.
//!
//! The order is observed as a client sees it, through the NBD meta context
//! `clonebd:hydrated` (`nbdinfo --map`), sampled while the clone hydrates one region at a
//! time (threshold 1, batch 1, a bandwidth limit of four regions a second): every sample
//! must hold exactly the first regions of the expected order, so a clone that scanned
//! from region 0, or took the ranges in another order, fails at its first sample.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::daemon::{CLONEBD, Daemon, Files, checksum, have, run, run_status};

const SIZE: u64 = 8 << 20;
const REGION: u64 = 64 << 10;
const NR: u64 = SIZE / REGION;
/// One region in flight, copied alone, four a second: the order is visible.
const SLOW: [&str; 6] = [
    "--hydration-threshold",
    "1",
    "--hydration-batch-size",
    "1",
    "--hydration-rate-limit",
    "256k",
];

/// The hydrated regions in a `clonebd:hydrated` map.
fn hydrated_regions(map: &[(u64, u64, u64)]) -> BTreeSet<u64> {
    map.iter()
        .filter(|run| run.2 & 1 == 1)
        .flat_map(|&(offset, len, _)| offset / REGION..(offset + len).div_ceil(REGION))
        .collect()
}

/// Samples the map until `first` and `scan_after` more regions are hydrated; every sample
/// must be exactly a prefix of the order: `first`, then the scan from region 0 over the
/// regions not in `first`.
fn assert_hydrates_in_order(d: &Daemon, first: &[u64], scan_after: usize) {
    let mut order: Vec<u64> = first.to_vec();
    order.extend((0..NR).filter(|r| !first.contains(r)));
    let want = first.len() + scan_after;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut samples = 0;
    loop {
        let got = hydrated_regions(&d.hydrated_map());
        let prefix: BTreeSet<u64> = order[..got.len().min(order.len())]
            .iter()
            .copied()
            .collect();
        assert_eq!(
            got,
            prefix,
            "after {samples} samples: {} regions hydrated, not the first of the order {:?}...",
            got.len(),
            &order[..want]
        );
        samples += 1;
        if got.len() >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {} regions hydrated",
            got.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `--hydrate-first` ranges (with suffixes, comments, a range that starts inside a
/// region and one already listed) are hydrated first, in the file's order, then the scan.
#[test]
fn hydrate_first_ranges_are_hydrated_before_any_other_region() {
    if !have("nbdinfo") {
        return;
    }
    let files = Files::new(SIZE, 11);
    let order = files.path("order.txt");
    std::fs::write(
        &order,
        "# what the boot reads first\n6m 128k\n\n  2m 64k   # the kernel\n6208k 4k\n1m 1\n",
    )
    .unwrap();
    let mut args = vec!["--hydrate-first", order.to_str().unwrap()];
    args.extend(SLOW);
    let sum = checksum(&files.source);
    let d = Daemon::start(&files, &args);
    // 6m is region 96; 6208k lies in region 97, already listed; 1m is region 16.
    assert_hydrates_in_order(&d, &[96, 97, 32, 16], 3);
    assert!(d.terminate().success());
    assert_eq!(checksum(&files.source), sum, "the source is never written");
    let (source, dest) = (files.source_bytes(), files.dest_bytes());
    for r in [96u64, 97, 32, 16, 0, 1, 2] {
        let (a, b) = ((r * REGION) as usize, ((r + 1) * REGION) as usize);
        assert!(
            source[a..b] == dest[a..b],
            "region {r} holds the source's data"
        );
    }
}

/// The first run records which regions the client reads, in order (each region once,
/// adjacent regions as one range); a fresh clone of the same image given that file with
/// `--hydrate-first` hydrates them first.
#[test]
fn recorded_reads_are_replayed_first_by_the_next_clone() {
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let files = Files::new(SIZE, 12);
    let record = files.path("reads.txt");
    let rec = record.to_str().unwrap();
    let d = Daemon::start(&files, &["--no-hydration", "--record-reads", rec]);
    // A region read twice, one read across two regions, one inside a region.
    let reads = ["5m 4k", "1m 128k", "5m 64k", "7m 64k", "3m 512"];
    let mut args = vec!["-f", "raw"];
    let cmds: Vec<String> = reads.iter().map(|r| format!("read {r}")).collect();
    for c in &cmds {
        args.extend(["-c", c.as_str()]);
    }
    let uri = d.unix_uri();
    args.push(&uri);
    run("qemu-io", &args);
    assert!(d.terminate().success());
    let text = std::fs::read_to_string(&record).unwrap();
    assert_eq!(
        text, "5242880 65536\n1048576 131072\n7340032 65536\n3145728 65536\n",
        "the record of the reads"
    );

    // The next clone of the same image, from scratch.
    let next = Files::new(SIZE, 12);
    assert_eq!(next.source_bytes(), files.source_bytes());
    let mut args = vec!["--hydrate-first", rec];
    args.extend(SLOW);
    let d = Daemon::start(&next, &args);
    assert_hydrates_in_order(&d, &[80, 16, 17, 112, 48], 2);
}

/// `hydrate_range` queues its range at the front of the order while running, after the
/// file's ranges were queued; it waits for hydration to be enabled, as the file's do; a bad
/// or out-of-range message is refused.
#[test]
fn hydrate_range_message_goes_to_the_front_of_the_order() {
    if !have("nbdinfo") {
        return;
    }
    let files = Files::new(SIZE, 13);
    let order = files.path("order.txt");
    std::fs::write(&order, "6m 64k\n").unwrap();
    let mut args = vec!["--no-hydration", "--hydrate-first", order.to_str().unwrap()];
    args.extend(SLOW);
    let d = Daemon::start(&files, &args);
    assert_eq!(d.ctl_ok("message", &["hydrate_range", "2m", "128k"]), "");
    for (words, why) in [
        (
            ["hydrate_range", "8m", "1"],
            "past the clone's end (8388608 bytes)",
        ),
        (["hydrate_range", "1x", "4k"], "invalid size `1x'"),
    ] {
        let out = d.ctl("message", &words);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(why),
            "{words:?}: {err}"
        );
    }
    // Disabled: the queue waits, and status counts what it holds (1 region from the file,
    // 2 from the message).
    std::thread::sleep(Duration::from_millis(500));
    assert!(hydrated_regions(&d.hydrated_map()).is_empty());
    assert_eq!(d.status_json()["regions_queued"], 3);
    d.ctl_ok("message", &["enable_hydration"]);
    assert_hydrates_in_order(&d, &[32, 33, 96], 2);
    let st = d.wait_complete(Duration::from_secs(60));
    assert_eq!(st["regions_queued"], 0, "{st}");
}

/// `clonebd run` of `files` in 64 KiB regions with `extra`, which must refuse to start:
/// returns what it printed on stderr. Under `timeout`: a start that wrongly went on would
/// otherwise serve forever.
fn refused_start(files: &Files, extra: &[&str]) -> String {
    let mut args = vec![
        "run",
        "--source",
        files.source.to_str().unwrap(),
        "--dest",
        files.dest.to_str().unwrap(),
        "--metadata",
        files.meta.to_str().unwrap(),
        "--region-size",
        "64k",
    ];
    args.extend_from_slice(extra);
    let out = run_status(CLONEBD, &args);
    assert!(!out.status.success(), "started with {extra:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A malformed line or a range past the end, in either file, stops the start naming the
/// file and the line, before anything is opened for writing: no metadata is created, and
/// the record file is left as it was.
#[test]
fn malformed_order_files_are_refused_with_their_line_numbers() {
    let files = Files::new(SIZE, 14);
    let order = files.path("order.txt");
    let record = files.path("reads.txt");
    let start = |flag: &str, path: &std::path::Path| {
        let err = refused_start(&files, &["--create", flag, path.to_str().unwrap()]);
        assert!(!files.meta.exists(), "{flag}: metadata was created");
        err
    };
    let cases = [
        (
            "--hydrate-first",
            &order,
            "0 64k\n# fine so far\n1m\n",
            "line 3: expected OFFSET LENGTH (two sizes, e.g. `1g 64m`), found 1 words",
        ),
        (
            "--hydrate-first",
            &order,
            "0 64k\n4m 1q\n",
            "line 2: invalid size `1q'",
        ),
        (
            "--hydrate-first",
            &order,
            "0 64k\n\n\n8m 64k\n",
            "line 4: the range 8388608 +65536 ends past the clone's end (8388608 bytes)",
        ),
        (
            "--record-reads",
            &record,
            "0 65536\n8323072 131072\n",
            "line 2: the range 8323072 +131072 ends past the clone's end (8388608 bytes)",
        ),
    ];
    for (flag, path, text, why) in cases {
        std::fs::write(path, text).unwrap();
        let err = start(flag, path);
        let role = flag.trim_start_matches("--");
        let want = format!("{role} file {}: {why}", path.display());
        assert!(
            err.contains(&want),
            "{flag} {text:?}:\n{err}\nwanted: {want}"
        );
        assert_eq!(std::fs::read_to_string(path).unwrap(), text);
    }
    // A --hydrate-first file that is missing is refused too.
    let err = start("--hydrate-first", &files.path("missing.txt"));
    assert!(err.contains("missing.txt: cannot read it: "), "{err}");
}

/// The record file is appended to, so it may not be any of the clone's storage; and a start
/// that fails after creating it leaves no empty record file behind.
#[test]
fn the_record_file_is_never_the_clone_s_storage_nor_left_by_a_failed_start() {
    let files = Files::new(SIZE, 15);
    let run = |record: &std::path::Path, create: bool| {
        let mut args = vec!["--record-reads", record.to_str().unwrap()];
        if create {
            args.push("--create");
        }
        refused_start(&files, &args)
    };
    let dest_before = files.dest_bytes();
    let source_before = files.source_bytes();
    for (path, role) in [(&files.dest, "destination"), (&files.source, "source")] {
        let err = run(path, true);
        assert!(
            err.contains(&format!("{role} {}", path.display()))
                && err.contains("record-reads file")
                && err.contains("the reads recorded would be appended to it"),
            "{err}"
        );
    }
    assert!(!files.meta.exists(), "metadata was created");
    assert_eq!(
        files.dest_bytes(),
        dest_before,
        "the destination was written"
    );
    assert_eq!(
        files.source_bytes(),
        source_before,
        "the source was written"
    );
    // Without --create the metadata is missing: the start fails after the record file was
    // opened, and the file it created goes again.
    let record = files.path("new-reads.txt");
    let err = run(&record, false);
    assert!(
        err.contains("not found. To start a new clone, add --create"),
        "{err}"
    );
    assert!(!record.exists(), "a failed start left {record:?}");
}
