//! `clonebd finalize` and a start without `--source`, on the real binary with real clients:
//! finalize under fio's verify load over NBD (the I/O goes on without an error, the source's
//! descriptor is closed and the source can be renamed away); a restart without the source
//! serves the same data, finalized; an incomplete clone is refused both ways, with the
//! messages the user sees. A finalized clone of an HTTP image serves with the web server
//! gone, and shows its source detached.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::daemon::{Daemon, Files, clonebd, have, run, run_status};
use common::servers::{need, nginx};

const SIZE: u64 = 32 << 20;
const REGION: u64 = 64 << 10;

/// The files the process `pid` has open (the targets of /proc/PID/fd).
fn open_files(pid: i32) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .collect()
}

fn status_json(d: &Daemon) -> serde_json::Value {
    serde_json::from_str(&d.ctl_ok("status", &["--json"])).expect("status JSON")
}

/// fio over NBD, one write-then-verify pass over the first half of the export after another,
/// until `stop` is set: every pass writes every block of it once in random order with a
/// crc32c header and then reads all of them back and verifies them. (The second half is
/// left to background hydration, so that finalize has something to wait for.) Returns each pass's exit status and,
/// for a failed one, its output.
fn fio_passes(uri: String, stop: Arc<AtomicBool>) -> Vec<Result<(), String>> {
    let mut passes = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let out = run_status(
            "fio",
            &[
                "--name=finalize",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                &format!("--size={}", SIZE / 2),
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--randrepeat=0",
                "--output-format=terse",
                // No verify state file left in the working directory.
                "--verify_state_save=0",
            ],
        );
        passes.push(if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{}\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        });
    }
    passes
}

#[test]
fn finalize_under_fio_verify_load_detaches_the_source_without_an_error() {
    if !have("fio") {
        return;
    }
    let files = Files::new(SIZE, 11);
    // Slow enough that finalize has to wait while fio runs.
    let d = Daemon::start(&files, &["--hydration-rate-limit", "4m"]);
    let source = files.source.canonicalize().expect("source path");
    assert!(
        open_files(d.pid()).contains(&source),
        "the daemon does not hold the source open"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (uri, stop) = (d.unix_uri(), Arc::clone(&stop));
        std::thread::spawn(move || fio_passes(uri, stop))
    };
    std::thread::sleep(Duration::from_millis(500));
    let before = status_json(&d);
    assert_eq!(before["finalized"], false);
    assert_eq!(before["source_detached"], false);

    let t0 = Instant::now();
    let out = d.ctl_ok("finalize", &["--no-progress", "--timeout", "120"]);
    // The half fio does not write hydrates at the limited rate: finalize waited for it.
    assert!(
        t0.elapsed() > Duration::from_secs(1),
        "finalize did not wait: {:?}",
        t0.elapsed()
    );
    assert!(out.starts_with("finalized: "), "{out}");
    // The source's descriptor is closed once finalize has returned.
    assert!(
        !open_files(d.pid()).contains(&source),
        "the source is still open: {:?}",
        open_files(d.pid())
    );
    let moved = files.path("source-moved-away.img");
    std::fs::rename(&files.source, &moved).expect("rename the source away");

    // At least two whole passes after finalize: every block written and verified again.
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::Release);
    let passes = load.join().expect("fio thread");
    let failed: Vec<&String> = passes.iter().filter_map(|p| p.as_ref().err()).collect();
    assert!(failed.is_empty(), "fio failed:\n{}", failed[0]);
    assert!(passes.len() >= 2, "only {} fio passes", passes.len());
    assert!(t.elapsed() >= Duration::from_secs(4));

    let after = status_json(&d);
    assert_eq!(after["finalized"], true, "{after}");
    assert_eq!(after["source_detached"], true, "{after}");
    assert_eq!(after["nr_hydrated"], after["nr_regions"]);
    assert_eq!(after["dirty_regions"], 0);
    // Nothing to hydrate any more: messages are refused, finalize again is a no-op.
    let msg = d.ctl("message", &["enable_hydration"]);
    assert!(!msg.status.success());
    assert!(
        String::from_utf8_lossy(&msg.stderr).contains("refused, the clone is finalized"),
        "{}",
        String::from_utf8_lossy(&msg.stderr)
    );
    let again = d.ctl_ok("finalize", &["--no-wait"]);
    assert!(again.starts_with("already finalized"), "{again}");
    assert!(!open_files(d.pid()).contains(&moved));
    assert!(d.terminate().success());
}

#[test]
fn a_hydrated_clone_restarts_without_its_source_and_serves_the_same_data() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let files = Files::new(4 << 20, 12);
    let expected = files.source_bytes();
    let d = Daemon::start(&files, &[]);
    d.ctl_ok("finalize", &["--no-progress"]);
    let line = d.ctl_ok("status", &[]);
    assert!(d.terminate().success());
    // The metadata finalize left is consistent: what the kernel or clonebd loads.
    let check = clonebd(&["check", path(&files.meta)]);
    assert!(
        check.status.success(),
        "clonebd check: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    // Without the source nothing can read it: move it away.
    let moved = files.path("gone.img");
    std::fs::rename(&files.source, &moved).expect("rename");

    let d = Daemon::start_without_source(&files, &[]);
    let s = status_json(&d);
    assert_eq!(s["finalized"], true, "{s}");
    assert_eq!(s["source_detached"], true, "{s}");
    assert_eq!(d.ctl_ok("status", &[]), line, "the status line changed");
    let table = d.ctl_ok("table", &[]);
    assert!(table.contains(" - 128 "), "{table}");
    let img = files.path("expected.img");
    std::fs::write(&img, &expected).expect("expected image");
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            path(&img),
            &d.unix_uri(),
        ],
    );
    assert!(out.contains("Images are identical"), "{out}");
    // Writes (with a flush) reach the destination and read back.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x6b 65024 131072",
            "-c",
            "flush",
            "-c",
            "read -P 0x6b 65024 131072",
            &d.unix_uri(),
        ],
    );
    assert!(d.terminate().success());
    let dest = files.dest_bytes();
    assert!(dest[65024..65024 + 131072].iter().all(|&b| b == 0x6b));
    assert_eq!(dest[..65024], expected[..65024]);
    assert_eq!(dest[65024 + 131072..], expected[65024 + 131072..]);
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn an_incomplete_clone_is_refused_without_its_source_and_by_finalize_no_wait() {
    if !have("qemu-io") {
        return;
    }
    let files = Files::new(4 << 20, 13);
    let total = (4 << 20) / REGION;
    let d = Daemon::start(&files, &["--no-hydration"]);
    // One whole region hydrated by a write that covers it.
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 0 65536", &d.unix_uri()],
    );
    let out = d.ctl("finalize", &["--no-wait"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "cannot finalize: {} of {total} regions are not hydrated yet (without --no-wait, finalize waits for them)\n",
            total - 1
        )
    );
    assert_eq!(status_json(&d)["finalized"], false);
    // Waiting for a clone that cannot hydrate gives up after --timeout, and says why.
    let out = d.ctl(
        "finalize",
        &["--no-progress", "--timeout", "0.3", "--interval", "50"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("background hydration is off"), "{err}");
    assert!(
        err.contains(&format!(
            "timed out after 0.3 s: 1/{total} regions hydrated"
        )),
        "{err}"
    );
    assert!(d.terminate().success());

    let meta = path(&files.meta);
    let dest = path(&files.dest);
    let want = format!(
        "clonebd: metadata {meta}: {} of {total} regions are not hydrated, so the clone still needs its source: give --source (or the table's source device) to go on hydrating it\n",
        total - 1
    );
    let flags = clonebd(&["run", "--dest", dest, "--metadata", meta]);
    assert_eq!(flags.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&flags.stderr).lines().last(),
        want.lines().last()
    );
    let table = clonebd(&["run", "--table", &format!("{meta} {dest} - 128")]);
    assert_eq!(table.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&table.stderr).lines().last(),
        want.lines().last()
    );
    // Zeroed metadata is refused as it is, not formatted, whichever form gives the length.
    let zeroed = files.path("zeroed.meta");
    std::fs::write(&zeroed, vec![0u8; 1 << 20]).expect("zeroed metadata");
    let z = path(&zeroed);
    let out = clonebd(&["run", "--table", &format!("0 8192 clone {z} {dest} - 128")]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).lines().last(),
        Some(format!("clonebd: metadata {z}: it is not formatted (all zeros), so there is no hydrated clone to serve without a source: give --source").as_str())
    );
    assert!(
        std::fs::read(&zeroed)
            .expect("read")
            .iter()
            .all(|&b| b == 0)
    );
    // A new clone needs its source.
    let create = clonebd(&[
        "run",
        "--create",
        "--dest",
        dest,
        "--metadata",
        path(&files.path("new.meta")),
    ]);
    assert_eq!(create.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&create.stderr)
            .contains("--create starts a new clone, which needs --source"),
        "{}",
        String::from_utf8_lossy(&create.stderr)
    );
    // Nothing was changed by the refusals: the clone goes on with its source.
    let d = Daemon::start(&files, &["--no-hydration"]);
    assert_eq!(status_json(&d)["nr_hydrated"], 1);
    assert!(d.terminate().success());
}

#[test]
fn a_finalized_remote_clone_serves_without_its_server_and_shows_the_source_detached() {
    if !need("nginx") {
        return;
    }
    let image = Files::new(4 << 20, 14);
    let web = nginx(image.dir.path(), "");
    let url = format!("http://127.0.0.1:{}/source.img", web.port);
    let g = Files::new(image.size, 0);
    let files = Files {
        source: PathBuf::from(&url),
        ..g
    };
    let d = Daemon::start(&files, &[]);
    d.ctl_ok("finalize", &["--no-progress"]);
    // The web server is no longer needed.
    drop(web);
    let s = status_json(&d);
    assert_eq!(s["finalized"], true, "{s}");
    assert_eq!(s["source"]["state"], "detached", "{s}");
    let img = files.path("expected.img");
    std::fs::write(&img, image.source_bytes()).expect("expected image");
    if have("qemu-img") {
        let out = run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                path(&img),
                &d.unix_uri(),
            ],
        );
        assert!(out.contains("Images are identical"), "{out}");
    }
    assert!(d.terminate().success());
}
