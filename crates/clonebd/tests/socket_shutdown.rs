//! SIGTERM stops `clonebd run` within seconds, with the shutdown commit done (H3), whatever
//! became of its socket files: removed (`rm`, a tmpfiles cleanup) or taken by another server.
//! On exit it removes its own socket files, and only those.
//!
//! The write each test makes is unflushed at SIGTERM: qemu-io runs with a writeback cache (so
//! the write carries no FUA) and keeps the connection open, since it flushes only when it
//! closes the image. Reading the write back after a restart on the same metadata then shows
//! it was committed at shutdown (or by a periodic commit, if one fell in the few
//! milliseconds between the write and the signal). The daemon runs with `--no-hydration`, so
//! hydration marks nothing on its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, Files, have, run};

const SIZE: u64 = 4 << 20;
/// How long SIGTERM may take to stop the daemon.
const STOP_WITHIN: Duration = Duration::from_secs(5);

/// qemu-io connected to the daemon's NBD socket, its write done and its connection open.
struct OpenWriter {
    child: Child,
}

impl OpenWriter {
    /// Writes 64 KiB of 0x5a at offset 0 (one whole region) and keeps the connection open, so
    /// no flush has been sent.
    fn write(d: &Daemon) -> Self {
        let mut child = Command::new("qemu-io")
            .args(["-f", "raw", "-t", "writeback", &d.unix_uri()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn qemu-io");
        let stdout = child.stdout.take().expect("stdout");
        child
            .stdin
            .as_mut()
            .expect("stdin")
            .write_all(b"write -P 0x5a 0 64k\n")
            .expect("send the write to qemu-io");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut seen = String::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                seen.push_str(&line);
                seen.push('\n');
                if line.contains("wrote 65536/65536 bytes at offset 0") {
                    let _ = tx.send(Ok(()));
                    return;
                }
            }
            let _ = tx.send(Err(seen));
        });
        let mut w = Self { child };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(())) => w,
            Ok(Err(out)) => {
                w.close();
                panic!(
                    "qemu-io did not write:\n{out}\ndaemon log:\n{}",
                    d.log_text()
                )
            }
            Err(_) => {
                w.close();
                panic!("qemu-io wrote nothing in 60 s:\n{}", d.log_text())
            }
        }
    }

    /// Ends qemu-io (its closing flush fails once the daemon is gone; that is expected).
    fn close(&mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OpenWriter {
    fn drop(&mut self) {
        self.close();
    }
}

/// SIGTERM; the daemon must exit 0 within [`STOP_WITHIN`]. Returns its log.
fn stop_promptly(d: Daemon) -> String {
    let log = d.log.clone();
    let start = Instant::now();
    let status = d
        .terminate_within(STOP_WITHIN)
        .unwrap_or_else(|log| panic!("still running {STOP_WITHIN:?} after SIGTERM:\n{log}"));
    let log = std::fs::read_to_string(log).unwrap_or_default();
    assert!(status.success(), "exit {status} after SIGTERM:\n{log}");
    assert!(start.elapsed() < STOP_WITHIN);
    log
}

/// Starts the clone again on the same metadata and reads the write back.
fn write_was_committed(files: &Files) {
    let d = Daemon::start(files, &["--no-hydration"]);
    let out = run(
        "qemu-io",
        &["-f", "raw", &d.unix_uri(), "-c", "read -P 0x5a 0 64k"],
    );
    assert!(
        out.contains("read 65536/65536 bytes at offset 0") && !out.contains("failed"),
        "the write before SIGTERM was not committed:\n{out}"
    );
    assert!(d.terminate().success());
}

/// The inode at `path`, if a socket is there.
fn socket_inode(path: &Path) -> Option<u64> {
    std::fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.file_type().is_socket())
        .map(|m| m.ino())
}

#[test]
fn sigterm_with_the_nbd_socket_file_removed_stops_and_commits() {
    if !have("qemu-io") {
        return;
    }
    let files = Files::new(SIZE, 1);
    let d = Daemon::start(&files, &["--no-hydration"]);
    let mut writer = OpenWriter::write(&d);
    std::fs::remove_file(&d.socket).expect("remove the NBD socket file");
    let control = d.control.clone();
    stop_promptly(d);
    writer.close();
    assert!(!control.exists(), "the control socket file is left behind");
    write_was_committed(&files);
}

#[test]
fn sigterm_with_the_control_socket_file_removed_stops_and_commits() {
    if !have("qemu-io") {
        return;
    }
    let files = Files::new(SIZE, 2);
    let d = Daemon::start(&files, &["--no-hydration"]);
    let mut writer = OpenWriter::write(&d);
    std::fs::remove_file(&d.control).expect("remove the control socket file");
    let socket = d.socket.clone();
    stop_promptly(d);
    writer.close();
    assert!(!socket.exists(), "the NBD socket file is left behind");
    write_was_committed(&files);
}

#[test]
fn sigterm_with_the_nbd_path_taken_by_another_server_leaves_its_socket() {
    if !have("qemu-io") {
        return;
    }
    let files = Files::new(SIZE, 3);
    let d = Daemon::start(&files, &["--no-hydration"]);
    let mut writer = OpenWriter::write(&d);
    std::fs::remove_file(&d.socket).expect("remove the NBD socket file");
    let other = UnixListener::bind(&d.socket).expect("another server binds the path");
    let (socket, theirs) = (d.socket.clone(), socket_inode(&d.socket));
    let log = stop_promptly(d);
    writer.close();
    assert_eq!(
        socket_inode(&socket),
        theirs,
        "the other server's socket file was removed or replaced"
    );
    let _client = UnixStream::connect(&socket).expect("the other server still answers");
    other
        .accept()
        .expect("the connection reached the other server");
    assert!(
        log.contains(&format!(
            "NBD socket {}: another socket took the path; left it in place",
            socket.display()
        )),
        "{log}"
    );
}

#[test]
fn sigterm_removes_both_socket_files() {
    if !have("qemu-io") {
        return;
    }
    let files = Files::new(SIZE, 4);
    let d = Daemon::start(&files, &["--no-hydration"]);
    let mut writer = OpenWriter::write(&d);
    let (socket, control) = (d.socket.clone(), d.control.clone());
    assert!(socket_inode(&socket).is_some() && socket_inode(&control).is_some());
    stop_promptly(d);
    writer.close();
    assert!(!socket.exists(), "the NBD socket file is left behind");
    assert!(!control.exists(), "the control socket file is left behind");
    write_was_committed(&files);
}
