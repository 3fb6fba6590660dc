//! The FUSE file export through the built binary: reads, writes (aligned, unaligned,
//! O_DIRECT, O_DSYNC), fsync, fallocate, refusals, NBD and FUSE on one clone at once, and
//! what a killed daemon leaves behind.
//!
//! Needs root and /dev/fuse (as CI has); skips with a reason otherwise.

mod fuse_support;

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use clonebd_core::AlignedBuf;
use fuse_support::{Daemon, Files, Loop, can_run, create_if_new, is_mounted, pattern, run};

const SIZE: usize = 8 << 20;

/// A source of `SIZE` pattern bytes, an empty destination, and the daemon's arguments.
fn setup(f: &Files, extra: &[&str]) -> (Vec<u8>, Vec<String>) {
    let src = pattern(7, SIZE);
    std::fs::write(f.path("src.img"), &src).expect("source");
    std::fs::File::create(f.path("dst.img"))
        .and_then(|d| d.set_len(SIZE as u64))
        .expect("dest");
    let mut args: Vec<String> = [
        "--source",
        &f.s("src.img"),
        "--dest",
        &f.s("dst.img"),
        "--metadata",
        &f.s("meta"),
        "--fuse",
        &f.s("clone.img"),
        "--control",
        &f.s("ctl"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    (src, args)
}

fn start(f: &Files, args: &[String], log: &str) -> Daemon {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start(&a, Some(&f.path("clone.img")), None, &f.path(log))
}

fn read_all(p: &Path) -> Vec<u8> {
    std::fs::read(p).expect("read the FUSE file")
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[test]
fn fuse_file_reads_writes_unaligned_and_fsyncs() {
    if !can_run("fuse_file_reads_writes_unaligned_and_fsyncs") {
        return;
    }
    let f = Files::new();
    let (mut model, args) = setup(&f, &["--no-hydration"]);
    let d = start(&f, &args, "log");
    let clone = f.path("clone.img");

    let meta = std::fs::metadata(&clone).expect("stat");
    assert!(meta.is_file());
    assert_eq!(meta.len(), SIZE as u64);
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), 0);
    assert!(read_all(&clone) == model, "the file is not the source");

    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&clone)
        .expect("open");
    // Unaligned writes, one inside a block, one across blocks and regions, one at the end.
    for (off, len, seed) in [
        (5usize, 3usize, 1u64),
        (4090, 9000, 2),
        (SIZE - 700, 700, 3),
    ] {
        let data = pattern(seed, len);
        file.write_all_at(&data, off as u64).expect("pwrite");
        model[off..off + len].copy_from_slice(&data);
    }
    // Aligned, and a read straight back.
    let data = pattern(4, 64 << 10);
    file.write_all_at(&data, 1 << 20).expect("pwrite");
    model[1 << 20..(1 << 20) + (64 << 10)].copy_from_slice(&data);
    file.sync_all().expect("fsync");
    let mut back = vec![0u8; 9000];
    file.read_exact_at(&mut back, 4090).expect("pread");
    assert!(back == model[4090..13090]);

    // Past the end: cut short, then EFBIG. A size change is refused.
    assert_eq!(
        file.write_at(&[1, 2, 3, 4], SIZE as u64 - 2)
            .expect("short"),
        2
    );
    model[SIZE - 2..].copy_from_slice(&[1, 2]);
    let e = file
        .write_at(&[1], SIZE as u64)
        .expect_err("write at the end");
    assert_eq!(errno_of(&e), libc::EFBIG, "{e}");
    let e = file.set_len(4096).expect_err("truncate");
    assert_eq!(errno_of(&e), libc::EPERM, "{e}");
    drop(file);

    // O_DIRECT and O_DSYNC.
    let direct = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
        .open(&clone)
        .expect("open O_DIRECT");
    let mut buf = AlignedBuf::new(8192);
    buf.copy_from_slice(&pattern(5, 8192));
    direct.write_all_at(&buf, 3 << 20).expect("direct write");
    model[3 << 20..(3 << 20) + 8192].copy_from_slice(&buf);
    let mut rb = AlignedBuf::new(SIZE);
    direct.read_exact_at(&mut rb, 0).expect("direct read");
    assert!(rb[..] == model[..], "O_DIRECT read differs");
    drop(direct);

    assert!(
        read_all(&clone) == model,
        "the file differs from what was written"
    );
    let st = d.stop();
    assert!(st.success(), "{st}");

    // Everything persisted: a new daemon serves the same bytes.
    let d = start(&f, &args, "log2");
    assert!(
        read_all(&clone) == model,
        "writes were lost across a restart"
    );
    assert!(d.stop().success());
}

#[test]
fn fuse_fallocate_punches_and_zeroes_ranges() {
    if !can_run("fuse_fallocate_punches_and_zeroes_ranges") {
        return;
    }
    let f = Files::new();
    let (mut model, args) = setup(&f, &["--no-hydration"]);
    let d = start(&f, &args, "log");
    let c = f.s("clone.img");
    // Unaligned punch across regions; an aligned zero range; a zero range inside a block.
    run("fallocate", &["-p", "-o", "1000", "-l", "20000", &c]);
    model[1000..21000].fill(0);
    run("fallocate", &["-z", "-o", "65536", "-l", "131072", &c]);
    model[65536..196608].fill(0);
    run("fallocate", &["-z", "-o", "300003", "-l", "7", &c]);
    model[300003..300010].fill(0);
    // Plain allocation inside the file is a no-op; growing it or collapsing is refused.
    run("fallocate", &["-o", "0", "-l", "4096", &c]);
    let grow = Command::new("fallocate")
        .args(["-o", "0", "-l", &(SIZE * 2).to_string(), &c])
        .output()
        .expect("fallocate");
    assert!(!grow.status.success(), "the file grew");
    let collapse = Command::new("fallocate")
        .args(["-c", "-o", "0", "-l", "4096", &c])
        .output()
        .expect("fallocate");
    assert!(!collapse.status.success(), "a collapse was accepted");
    assert!(
        read_all(&f.path("clone.img")) == model,
        "fallocate results differ"
    );
    assert!(d.stop().success());
}

#[test]
fn fuse_and_nbd_serve_one_clone_at_once() {
    if !can_run("fuse_and_nbd_serve_one_clone_at_once") {
        return;
    }
    let f = Files::new();
    let sock = f.s("nbd.sock");
    let (_, args) = setup(&f, &["--nbd-unix", &sock]);
    let d = start(&f, &args, "log");
    let uri = format!("nbd+unix:///clonebd?socket={sock}");
    let qemu_io = |cmd: &str| {
        let out = run("qemu-io", &["-f", "raw", "-c", cmd, &uri]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(!text.contains("failed"), "qemu-io {cmd}: {text}");
    };

    // FUSE → NBD: a write through the file, fsync'd, read back over NBD.
    let file = OpenOptions::new()
        .write(true)
        .open(f.path("clone.img"))
        .expect("open");
    file.write_all_at(&[0xab; 8192], 40960).expect("pwrite");
    file.write_all_at(&[0x5a; 100], 90003).expect("pwrite");
    file.sync_all().expect("fsync");
    drop(file);
    qemu_io("read -P 0xab 40960 8192");
    qemu_io("read -P 0x5a 90003 100");

    // NBD → FUSE: a write over NBD, read through a fresh open of the file.
    qemu_io("write -P 0xcd 1048576 65536");
    let file = std::fs::File::open(f.path("clone.img")).expect("open");
    let mut back = vec![0u8; 65536];
    file.read_exact_at(&mut back, 1 << 20).expect("pread");
    assert!(
        back.iter().all(|&b| b == 0xcd),
        "the NBD write is not seen through FUSE"
    );
    drop(file);
    assert!(d.stop().success());
}

/// Whether `stat` on `p` says "a FUSE mount whose server is gone".
fn is_dead(p: &Path) -> bool {
    std::fs::metadata(p)
        .err()
        .is_some_and(|e| errno_of(&e) == libc::ENOTCONN)
}

#[test]
fn stale_fuse_mount_is_cleaned_up_at_start() {
    if !can_run("stale_fuse_mount_is_cleaned_up_at_start") {
        return;
    }
    let f = Files::new();
    let clone = f.path("clone.img");
    let (src, args) = setup(&f, &["--no-hydration"]);
    start(&f, &args, "log").kill();
    assert!(
        is_dead(&clone),
        "a killed daemon did not leave a dead mount"
    );

    let d = start(&f, &args, "log2");
    assert!(
        d.log_text().contains("left by a daemon that died"),
        "{}",
        d.log_text()
    );
    assert!(
        read_all(&clone) == src,
        "the new mount does not serve the clone"
    );
    assert!(d.stop().success());
    assert!(!is_mounted(&clone));
}

#[test]
fn stale_fuse_mount_used_by_a_loop_device_is_refused_with_the_cleanup_commands() {
    if !can_run("stale_fuse_mount_used_by_a_loop_device_is_refused_with_the_cleanup_commands") {
        return;
    }
    let f = Files::new();
    let clone = f.path("clone.img");
    let (_, args) = setup(&f, &["--no-hydration"]);
    let d = start(&f, &args, "log");
    let lo = Loop::attach(&clone, false, false);
    d.kill();
    assert!(is_dead(&clone));

    let out = Command::new(env!("CARGO_BIN_EXE_clonebd"))
        .arg("run")
        .args(&args)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "started over a stale mount in use:\n{err}"
    );
    let abs = clone
        .canonicalize()
        .unwrap_or_else(|_| f.dir.path().canonicalize().expect("dir").join("clone.img"));
    for want in [
        format!("losetup -d {}", lo.dev),
        format!("umount -l {}", abs.display()),
    ] {
        assert!(
            err.contains(&want),
            "the error does not name `{want}`:\n{err}"
        );
    }
    // Following the advice clears the way.
    drop(lo);
    run("umount", &["-l", &abs.to_string_lossy()]);
    let d = start(&f, &args, "log2");
    assert!(d.stop().success());
}

#[test]
fn fuse_file_already_served_is_refused() {
    if !can_run("fuse_file_already_served_is_refused") {
        return;
    }
    let f = Files::new();
    let (_, args) = setup(&f, &["--no-hydration"]);
    let d = start(&f, &args, "log");
    // A second clone (its own files) asking for the same FUSE file.
    let g = Files::new();
    let (_, mut other) = setup(&g, &["--no-hydration"]);
    let i = other.iter().position(|a| a == "--fuse").expect("--fuse") + 1;
    other[i] = f.s("clone.img");
    let out = Command::new(env!("CARGO_BIN_EXE_clonebd"))
        .arg("run")
        .args(create_if_new(&other))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(err.contains("already a mount point"), "{err}");
    assert!(d.stop().success());
}

#[test]
fn sigterm_with_a_loop_device_attached_detaches_the_file_and_exits() {
    if !can_run("sigterm_with_a_loop_device_attached_detaches_the_file_and_exits") {
        return;
    }
    let f = Files::new();
    let clone: PathBuf = f.path("clone.img");
    let (_, args) = setup(&f, &["--no-hydration"]);
    let d = start(&f, &args, "log");
    let lo = Loop::attach(&clone, false, false);
    let log = d.log.clone();
    let st = d.stop();
    assert!(st.success(), "{st}");
    assert!(!is_mounted(&clone), "the busy FUSE file is still mounted");
    let text = std::fs::read_to_string(log).expect("log");
    assert!(text.contains("busy at shutdown"), "{text}");
    drop(lo);
}

#[test]
fn ublk_without_kernel_or_build_support_fails_with_a_clear_error() {
    if Path::new("/dev/ublk-control").exists() && cfg!(feature = "ublk") {
        eprintln!(
            "ublk_without_kernel_or_build_support_fails_with_a_clear_error: skipped: this kernel has ublk"
        );
        return;
    }
    let f = Files::new();
    let (_, mut args) = setup(&f, &["--no-hydration", "--ublk"]);
    // No FUSE file: --ublk alone.
    let i = args.iter().position(|a| a == "--fuse").expect("--fuse");
    args.drain(i..i + 2);
    let out = Command::new(env!("CARGO_BIN_EXE_clonebd"))
        .arg("run")
        .args(create_if_new(&args))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "--ublk started:\n{err}");
    let want = if cfg!(feature = "ublk") {
        "the kernel lacks ublk"
    } else {
        "built without ublk support"
    };
    assert!(
        err.contains(want),
        "the error does not say `{want}`:\n{err}"
    );
    if cfg!(feature = "ublk") {
        assert!(err.contains("modprobe ublk_drv"), "{err}");
    }
}
