//! Wrong arguments never destroy data: the three roles never overlap, new metadata is made
//! only on purpose, sizes are exact or refused, unaligned discards are ignored, and every
//! start-up error names the role and path once with its cause. Each refusal is checked by
//! its exact message, and every file is checked byte for byte unchanged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::daemon::{CLONEBD, Daemon, Files, checksum, clonebd, have, run, run_status};
use common::loops::{Loop, can_use_loop_devices};

/// Runs `clonebd run ARGS` (it must fail) and returns its error line, without "clonebd: ".
fn refused(args: &[&str]) -> String {
    let out = clonebd(&[&["run"], args].concat());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "clonebd run {args:?} started:\n{err}"
    );
    err.lines()
        .rev()
        .find_map(|l| l.strip_prefix("clonebd: "))
        .unwrap_or_else(|| panic!("no error line in:\n{err}"))
        .to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Checksums of files, to see that a refusal changed none of them.
fn sums(paths: &[&Path]) -> Vec<(PathBuf, Option<u64>)> {
    paths
        .iter()
        .map(|p| (p.to_path_buf(), p.exists().then(|| checksum(p))))
        .collect()
}

const ADVICE: &str =
    "Give the source, the destination and the metadata three different files or devices";

#[test]
fn the_same_file_in_two_roles_is_refused_and_nothing_changes() {
    let f = Files::new(1 << 20, 1);
    let (src, dst) = (s(&f.source), s(&f.dest));
    let before = sums(&[&f.source, &f.dest]);

    // The same path as source and destination.
    let err = refused(&[
        "--source",
        src,
        "--dest",
        src,
        "--metadata",
        s(&f.meta),
        "--create",
    ]);
    assert_eq!(
        err,
        format!(
            "source {src} and destination {src} are the same file: the source would be written. {ADVICE}"
        )
    );
    // A symbolic link to the source as the destination.
    let link = f.path("link.img");
    std::os::unix::fs::symlink(&f.source, &link).expect("symlink");
    let err = refused(&[
        "--source",
        src,
        "--dest",
        s(&link),
        "--metadata",
        s(&f.meta),
        "--create",
    ]);
    assert_eq!(
        err,
        format!(
            "source {src} and destination {} are the same file: the source would be written. {ADVICE}",
            link.display()
        )
    );
    // A hard link to the destination as the metadata.
    let hard = f.path("hard.meta");
    std::fs::hard_link(&f.dest, &hard).expect("hard link");
    let err = refused(&["--source", src, "--dest", dst, "--metadata", s(&hard)]);
    assert_eq!(
        err,
        format!(
            "destination {dst} and metadata {} are the same file: the metadata and the clone's data would overwrite each other. {ADVICE}",
            hard.display()
        )
    );
    // The source as the metadata, on an image whose first 4 KiB are zero (it would be
    // formatted as metadata).
    let zeroed = f.path("zeroed.img");
    std::fs::write(&zeroed, vec![0u8; 1 << 20]).expect("zeroed source");
    let zsum = checksum(&zeroed);
    let err = refused(&[
        "--source",
        s(&zeroed),
        "--dest",
        dst,
        "--metadata",
        s(&zeroed),
    ]);
    assert_eq!(
        err,
        format!(
            "source {z} and metadata {z} are the same file: the source would be formatted as metadata. {ADVICE}",
            z = zeroed.display()
        )
    );
    // And with the kernel's table language.
    let table = format!("{} {dst} {src} 8", hard.display());
    let err = refused(&["--table", &table]);
    assert!(
        err.starts_with(&format!("destination {dst} and metadata")),
        "{err}"
    );

    assert_eq!(
        sums(&[&f.source, &f.dest]),
        before,
        "a refused start changed a file"
    );
    assert_eq!(checksum(&zeroed), zsum);
    assert!(!f.meta.exists(), "a refused start created the metadata");
}

/// An MBR with one partition from sector 2048 to the end, written by hand (no partitioning
/// tool needed).
fn write_mbr(path: &Path, size: u64) {
    let mut mbr = [0u8; 512];
    let start: u32 = 2048;
    let sectors = u32::try_from(size / 512).expect("small image") - start;
    let e = &mut mbr[446..462];
    e[4] = 0x83; // Linux
    e[8..12].copy_from_slice(&start.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image");
    std::os::unix::fs::FileExt::write_all_at(&f, &mbr, 0).expect("write MBR");
}

#[test]
fn loop_devices_and_partitions_over_another_role_are_refused() {
    if !can_use_loop_devices() {
        return;
    }
    let f = Files::new(4 << 20, 2);
    let src = s(&f.source);

    // A loop device over the source file as the destination.
    let lo = Loop::attach(&f.source, false);
    let before = sums(&[&f.source, &f.dest]);
    let err = refused(&[
        "--source",
        src,
        "--dest",
        &lo.0,
        "--metadata",
        s(&f.meta),
        "--create",
    ]);
    assert_eq!(
        err,
        format!(
            "destination {} is a loop device over source {src}: the source would be written. {ADVICE}",
            lo.0
        )
    );
    // The same loop device as the source, the file as the destination.
    let err = refused(&[
        "--source",
        &lo.0,
        "--dest",
        src,
        "--metadata",
        s(&f.meta),
        "--create",
    ]);
    assert_eq!(
        err,
        format!(
            "source {} is a loop device over destination {src}: the source would be written. {ADVICE}",
            lo.0
        )
    );
    drop(lo);

    // A partition of the destination's disk as the source.
    let disk = f.path("disk.img");
    std::fs::File::create(&disk)
        .and_then(|d| d.set_len(8 << 20))
        .expect("disk image");
    write_mbr(&disk, 8 << 20);
    let lo = Loop::attach(&disk, true);
    let part = format!("{}p1", lo.0);
    // Kernels built without MS-DOS partition support do not scan the table: add the
    // partition from user space (BLKPG) then.
    std::thread::sleep(std::time::Duration::from_millis(200));
    if !Path::new(&part).exists() {
        run("partx", &["-a", &lo.0]);
    }
    // The partition's node appears a moment after.
    for _ in 0..100 {
        if Path::new(&part).exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(Path::new(&part).exists(), "{part} did not appear");
    let disk_sum = checksum(&disk);
    let err = refused(&[
        "--source",
        &part,
        "--dest",
        &lo.0,
        "--metadata",
        s(&f.meta),
        "--create",
        "--size",
        "1m",
    ]);
    assert_eq!(
        err,
        format!(
            "source {part} is a partition of destination {}: the source would be written. {ADVICE}",
            lo.0
        )
    );
    // And the other way round: the whole disk as the source, a partition as the destination.
    let err = refused(&[
        "--source",
        &lo.0,
        "--dest",
        &part,
        "--metadata",
        s(&f.meta),
        "--create",
        "--size",
        "1m",
    ]);
    assert_eq!(
        err,
        format!(
            "destination {part} is a partition of source {}: the source would be written. {ADVICE}",
            lo.0
        )
    );
    drop(lo);
    assert_eq!(checksum(&disk), disk_sum, "the disk image changed");
    assert_eq!(
        sums(&[&f.source, &f.dest]),
        before,
        "a refused start changed a file"
    );
    assert!(!f.meta.exists(), "a refused start created the metadata");
}

#[test]
fn metadata_is_created_only_with_create_and_create_never_reuses_a_file() {
    let f = Files::new(1 << 20, 3);
    let (src, dst, meta) = (s(&f.source), s(&f.dest), s(&f.meta));
    let typo = f.path("typo-meta.img");
    let err = refused(&["--source", src, "--dest", dst, "--metadata", s(&typo)]);
    assert_eq!(
        err,
        format!(
            "metadata {}: not found. To start a new clone, add --create (clonebd creates and formats it), or give a zeroed file or device, as the kernel's dm-clone expects; to go on with a clone, give the metadata it was started with",
            typo.display()
        )
    );
    assert!(!typo.exists(), "a refused start created the metadata");

    // --create makes it (the common helper adds --create for a missing file).
    let d = Daemon::start(&f, &["--no-hydration"]);
    assert!(d.terminate().success());
    assert!(f.meta.exists());
    let meta_sum = checksum(&f.meta);

    let err = refused(&[
        "--source",
        src,
        "--dest",
        dst,
        "--metadata",
        meta,
        "--create",
    ]);
    assert_eq!(
        err,
        format!(
            "metadata {meta}: already exists, and --create only makes new metadata. Drop --create to go on with the clone it holds (a zeroed file or device is formatted)"
        )
    );
    assert_eq!(
        checksum(&f.meta),
        meta_sum,
        "a refused --create changed the metadata"
    );

    // A zeroed file is formatted without --create, as the kernel does.
    let zeroed = f.path("zeroed.meta");
    std::fs::write(&zeroed, vec![0u8; 4 << 20]).expect("zeroed metadata");
    let out = Command::new(CLONEBD)
        .args(["dump", s(&zeroed)])
        .output()
        .expect("dump");
    assert!(!out.status.success(), "a zeroed file is not metadata yet");
    let g = Files {
        meta: zeroed.clone(),
        ..Files::new(1 << 20, 4)
    };
    let d = Daemon::start(&g, &["--no-hydration"]);
    assert!(d.terminate().success());
    let out = clonebd(&["check", s(&zeroed)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn sizes_that_are_not_whole_sectors_are_refused_never_cut() {
    let f = Files::new(1 << 20, 5);
    let odd = f.path("odd.img");
    std::fs::write(&odd, vec![7u8; 1_000_001]).expect("odd source");
    let (o, dst, meta) = (s(&odd), s(&f.dest), s(&f.meta));
    let err = refused(&["--source", o, "--dest", dst, "--metadata", meta, "--create"]);
    assert_eq!(
        err,
        format!(
            "source {o}: its size, 1000001 bytes, is not a multiple of 512 bytes, and a clone is a whole number of sectors: give --size 999936 to clone its first 999936 bytes, or extend the source to 1000448 bytes"
        )
    );
    let err = refused(&[
        "--source",
        o,
        "--dest",
        dst,
        "--metadata",
        meta,
        "--create",
        "--size",
        "1000001",
    ]);
    assert_eq!(
        err,
        "--size 1000001: not a multiple of 512 bytes (a clone is a whole number of sectors); the nearest sizes that work: 999936"
    );
    let err = refused(&[
        "--source",
        s(&f.source),
        "--dest",
        dst,
        "--metadata",
        meta,
        "--create",
        "--size",
        "1000001",
    ]);
    assert_eq!(
        err,
        "--size 1000001: not a multiple of 512 bytes (a clone is a whole number of sectors); the nearest sizes that work: 999936 or 1000448"
    );
    // The table language without a length takes the source's size: the same check.
    let err = refused(&["--table", &format!("{meta} {dst} {o} 8")]);
    assert!(
        err.starts_with(&format!("source {o}: its size, 1000001 bytes")),
        "{err}"
    );
    assert!(!f.meta.exists(), "a refused start created the metadata");

    // A prefix asked for on purpose is served.
    let g = Files {
        source: odd.clone(),
        ..Files::new(1 << 20, 6)
    };
    let d = Daemon::start(&g, &["--no-hydration", "--size", "999936"]);
    let status = d.ctl_ok("status", &["--json"]);
    assert!(status.contains("\"target_sectors\": 1953"), "{status}");
    assert!(d.terminate().success());
}

#[test]
fn every_start_up_error_names_its_role_and_path_once() {
    let f = Files::new(1 << 20, 7);
    let (src, dst, meta) = (s(&f.source), s(&f.dest), s(&f.meta));
    let err = refused(&[
        "--source",
        "nosuch.img",
        "--dest",
        dst,
        "--metadata",
        meta,
        "--create",
    ]);
    assert_eq!(err, "source nosuch.img: No such file or directory (ENOENT)");
    let err = refused(&[
        "--source",
        src,
        "--dest",
        "nosuch-dest.img",
        "--metadata",
        meta,
        "--create",
    ]);
    assert_eq!(
        err,
        "destination nosuch-dest.img: No such file or directory (ENOENT)"
    );
    assert!(
        !f.meta.exists(),
        "a failed start left the metadata it created"
    );

    let small = f.path("small.meta");
    std::fs::write(&small, vec![0u8; 4096]).expect("small metadata");
    let err = refused(&["--source", src, "--dest", dst, "--metadata", s(&small)]);
    assert_eq!(
        err,
        format!(
            "metadata {m}: metadata device too small: it has 4096 bytes, but 256 regions need at least 40960 bytes (1 MiB) of metadata; for a new clone, make it large enough (truncate -s 40960 {m})",
            m = small.display()
        )
    );
    let ctl = f.path("missing-dir/ctl");
    let err = refused(&[
        "--source",
        src,
        "--dest",
        dst,
        "--metadata",
        meta,
        "--create",
        "--control",
        s(&ctl),
    ]);
    assert_eq!(
        err,
        format!(
            "control socket {}: cannot create it: No such file or directory (ENOENT)",
            ctl.display()
        )
    );
    let out = clonebd(&["status", "--control", s(&ctl)]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        err.trim_end(),
        format!(
            "clonebd: control socket {c}: cannot reach clonebd: No such file or directory (ENOENT) (is `clonebd run --control {c}` running?)",
            c = ctl.display()
        )
    );
}

#[test]
fn socket_paths_a_server_answers_on_or_that_are_not_sockets_are_refused_stale_ones_replaced() {
    let f = Files::new(1 << 20, 11);
    let (nbd, ctl) = (f.path("nbd.sock"), f.path("ctl.sock"));
    // The first start creates the metadata (and fails later, at a socket); the others reuse it.
    let start = |f: &Files| {
        let mut a = vec![
            "--source",
            s(&f.source),
            "--dest",
            s(&f.dest),
            "--metadata",
            s(&f.meta),
            // As the daemon of the last step has it.
            "--region-size",
            "64k",
            "--nbd-unix",
            s(&nbd),
            "--control",
            s(&ctl),
        ];
        if !f.meta.exists() {
            a.push("--create");
        }
        refused(&a)
    };
    let ino = |p: &Path| std::fs::symlink_metadata(p).expect("stat").ino();

    // Another server answers on the NBD path: refused, and its socket stays.
    let live = UnixListener::bind(&nbd).expect("bind");
    let theirs = ino(&nbd);
    assert_eq!(
        start(&f),
        format!(
            "NBD socket {}: in use: a server answers on it",
            nbd.display()
        )
    );
    assert_eq!(ino(&nbd), theirs, "the other server's socket was replaced");
    assert!(!ctl.exists());
    drop(live);

    // Another server answers on the control path: refused, and the NBD socket the daemon
    // had made in place of the stale one is removed again.
    let live = UnixListener::bind(&ctl).expect("bind");
    let theirs = ino(&ctl);
    assert_eq!(
        start(&f),
        format!(
            "control socket {}: in use: a server answers on it",
            ctl.display()
        )
    );
    assert_eq!(ino(&ctl), theirs, "the other server's socket was replaced");
    assert!(!nbd.exists(), "NBD socket left behind by a failed start");
    drop(live);

    // A regular file at a socket path is never removed.
    std::fs::write(&nbd, b"not a socket").expect("write");
    assert_eq!(
        start(&f),
        format!(
            "NBD socket {}: exists and is not a socket; not replacing it",
            nbd.display()
        )
    );
    assert_eq!(std::fs::read(&nbd).expect("read"), b"not a socket");
    std::fs::remove_file(&nbd).expect("remove");

    // Socket files left by servers that died (nobody answers): both replaced.
    drop(UnixListener::bind(&nbd).expect("bind"));
    assert!(
        nbd.exists() && ctl.exists(),
        "stale socket files to replace"
    );
    let d = Daemon::start(&f, &["--no-hydration"]);
    assert!(d.terminate().success());
    assert!(!nbd.exists() && !ctl.exists(), "socket files left behind");
}

#[test]
fn a_failed_copy_logs_and_reports_its_cause() {
    // A destination on a file system too small for the clone: hydration runs out of space.
    if !can_use_loop_devices() {
        return;
    }
    let f = Files::new(8 << 20, 8);
    let mnt = f.path("small-fs");
    std::fs::create_dir(&mnt).expect("mount point");
    run("mount", &["-t", "tmpfs", "-o", "size=2m", "tmpfs", s(&mnt)]);
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let dest = mnt.join("dest.img");
    std::fs::File::create(&dest)
        .and_then(|d| d.set_len(8 << 20))
        .expect("sparse destination");
    let g = Files {
        dest: dest.clone(),
        ..Files::new(8 << 20, 8)
    };
    let d = Daemon::start(&g, &["--no-preallocate"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        let st = d.ctl_ok("status", &["--json", "--noflush"]);
        if st.contains("No space left on device (ENOSPC)") {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no ENOSPC reported:\n{st}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(
        status.contains("\"last_copy_error\": \"writing the destination at byte "),
        "{status}"
    );
    let log = d.log_text();
    assert!(
        log.lines().any(
            |l| l.contains("hydration failed: writing the destination at byte ")
                && l.contains("No space left on device (ENOSPC)")
        ),
        "{log}"
    );
    assert!(d.terminate().success());
}

#[test]
fn unaligned_discards_succeed_and_change_nothing_whole_regions_still_discard() {
    if !have("qemu-io") {
        return;
    }
    // 4 KiB regions, nothing hydrated.
    let f = Files::new(4 << 20, 9);
    let d = Daemon::start_with_region(&f, "4k", &["--no-hydration"]);
    let uri = d.unix_uri();
    let hydrated = |d: &Daemon| -> u64 {
        let st = d.ctl_ok("status", &["--json", "--noflush"]);
        let v: serde_json::Value = serde_json::from_str(&st).expect("json");
        v["nr_hydrated"].as_u64().expect("nr_hydrated")
    };
    // The example: not 512-aligned, inside one region.
    let out = run_status(
        "qemu-io",
        &["-f", "raw", &uri, "-c", "discard 2621540 1000"],
    );
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Unaligned, and spanning a region boundary without covering a whole region.
    let out = run_status("qemu-io", &["-f", "raw", &uri, "-c", "discard 6000 4000"]);
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        hydrated(&d),
        0,
        "a discard of no whole region hydrated something"
    );
    // Unaligned ends around three whole regions [8192, 20480): those three are hydrated.
    let out = run("qemu-io", &["-f", "raw", &uri, "-c", "discard 8000 12700"]);
    assert!(!out.contains("failed"), "{out}");
    assert_eq!(hydrated(&d), 3, "whole regions in a discard are hydrated");
    assert!(d.terminate().success());
}
