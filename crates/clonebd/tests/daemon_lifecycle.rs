//! The daemon's life cycle: start-up failures release everything they took (F9), a second
//! daemon on the same metadata is refused (H2), and a clean stop commits (H3).

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use clonebd::daemon::{CloneSpec, Daemon, DaemonError, RunOptions};
use clonebd_driver::BlockExport;

fn files(dir: &Path, size: u64) {
    let src: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
    std::fs::write(dir.join("src"), src).expect("source");
    std::fs::File::create(dir.join("dst"))
        .and_then(|f| f.set_len(size))
        .expect("dest");
}

fn options(dir: &Path, control: &Path) -> RunOptions {
    RunOptions {
        spec: CloneSpec::Flags {
            source: dir.join("src"),
            dest: dir.join("dst"),
            metadata: dir.join("meta"),
            region_bytes: 4096,
            no_hydration: true,
            no_discard_passdown: false,
            hydration_threshold: 1,
            hydration_batch_size: 1,
        },
        size_bytes: None,
        // A new clone the first time, the same clone after.
        create_metadata: !dir.join("meta").exists(),
        nbd_unix: Some(dir.join("nbd.sock")),
        nbd_tcp: None,
        control: Some(control.to_path_buf()),
        metrics: None,
        sparse_hydration: true,
        direct_io: false,
        preallocate: true,
        copy_threads: 2,
        hydration_rate_limit: 0,
        hydrate_on_read: 0,
        hydration_priority: clonebd_core::engine::HydrationPriority::default(),
        nbd_workers: Some(2),
        nbd_io_uring: true,
        nbd_limits: clonebd::daemon::NbdLimits::default(),
        fuse: None,
        ublk: false,
        source: clonebd::source::SourceOptions::default(),
        source_pin: None,
        nbd_tls: None,
        order: Default::default(),
    }
}

/// The tests count the process's threads: run them one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn threads() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
                .map(|s| s.trim().to_string())
                .filter(|s| s.starts_with("clonebd"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn f9_failed_start_releases_locks_threads_and_sockets() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    files(dir.path(), 1 << 20);
    let before = threads();
    // The control socket's directory does not exist: start fails after the volume and the
    // NBD listener were set up.
    let bad = options(dir.path(), &dir.path().join("missing/ctl"));
    let err = Daemon::start(&bad).expect_err("must fail");
    assert!(matches!(err, DaemonError::Control(_)), "{err}");
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(
        threads(),
        before,
        "threads left running after a failed start"
    );
    assert!(
        !dir.path().join("nbd.sock").exists(),
        "NBD socket left behind"
    );
    // The metadata and destination locks were released: a new start succeeds.
    let good = options(dir.path(), &dir.path().join("ctl"));
    let d = Daemon::start(&good).expect("second start");
    d.shutdown().expect("shutdown");
    assert_eq!(threads(), before, "threads left running after shutdown");
}

#[test]
fn h2_second_daemon_on_the_same_metadata_is_refused() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    files(dir.path(), 1 << 20);
    let first = Daemon::start(&options(dir.path(), &dir.path().join("ctl"))).expect("first");
    let mut second = options(dir.path(), &dir.path().join("ctl2"));
    second.nbd_unix = Some(dir.path().join("nbd2.sock"));
    let err = Daemon::start(&second)
        .expect_err("second must fail")
        .to_string();
    let meta = dir.path().join("meta").display().to_string();
    assert!(
        err == format!(
            "metadata {meta}: in use by another process (it is locked: is another clonebd running on it?)"
        ),
        "{err}"
    );
    first.shutdown().expect("shutdown");
}

#[test]
fn h3_stop_commits_writes_made_without_a_flush() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    files(dir.path(), 1 << 20);
    let d = Daemon::start(&options(dir.path(), &dir.path().join("ctl"))).expect("start");
    d.volume().write(8192, &[9u8; 4096], false).expect("write");
    d.volume()
        .write(40960 + 512, &[8u8; 512], false)
        .expect("write");
    d.shutdown().expect("shutdown");
    let meta = clonebd_io::FileDevice::open(
        dir.path().join("meta"),
        clonebd_io::OpenOptions::read_only(),
    )
    .expect("meta");
    let report = clonebd_metadata::dump(&meta).expect("dump");
    assert_eq!(report.hydrated_ranges, vec![[2, 1], [10, 1]]);
}
