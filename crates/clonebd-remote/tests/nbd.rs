//! `NbdSource` against a real qemu-nbd on a unix socket: reads from many threads are right,
//! writes are refused, a server restarted under the source is reconnected to, one that went
//! away fails reads within the deadline, and one that comes back with another size marks the
//! source changed for good; against nbdkit, reads not aligned to the server's minimum block
//! size are widened to it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clonebd_core::BlockDev;
use clonebd_remote::SourceState;
use clonebd_remote::nbd::{NbdOptions, NbdSource};
use clonebd_remote::retry::Policy;
use clonebd_remote::uri::{NbdAddr, SourceUri};

fn have(program: &str) -> bool {
    clonebd_testkit::machine::have(program, "apt-get install qemu-utils")
}

/// qemu-nbd serving `image` read-only as `g` on `socket`; killed on drop.
struct Qemu(Child);

impl Qemu {
    fn start(image: &Path, socket: &Path) -> Self {
        let _ = std::fs::remove_file(socket);
        let child = Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "-r",
                "--persistent",
                "--shared=0",
                "-x",
                "g",
                "-k",
            ])
            .arg(socket)
            .arg(image)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(Instant::now() < deadline, "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self(child)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn open(socket: &Path, deadline: Duration) -> NbdSource {
    open_export(socket, "g", deadline)
}

fn open_export(socket: &Path, export: &str, deadline: Duration) -> NbdSource {
    let word = format!("nbd+unix:///{export}?socket={}", socket.display());
    let SourceUri::Nbd { addr, export, .. } = SourceUri::parse(&word).unwrap() else {
        panic!("not an NBD URI");
    };
    assert_eq!(addr, NbdAddr::Unix(PathBuf::from(socket)));
    let opts = NbdOptions {
        policy: Policy {
            deadline,
            base: Duration::from_millis(10),
            max: Duration::from_millis(200),
        },
        connections: 3,
        ..NbdOptions::default()
    };
    NbdSource::open(addr, export, word, &opts).unwrap()
}

#[test]
fn nbd_source_reads_right_refuses_writes_and_survives_a_restart() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("src.img");
    let socket = dir.path().join("q.sock");
    let data = Arc::new(bytes(8 << 20, 5));
    std::fs::write(&image, &*data).unwrap();
    let q = Qemu::start(&image, &socket);
    let src = Arc::new(open(&socket, Duration::from_secs(20)));
    assert_eq!(src.size_bytes(), 8 << 20);
    assert_eq!(src.connections(), 3);
    assert_eq!(
        src.identity().marks.get("export").map(String::as_str),
        Some("g")
    );
    let read_all = |src: &Arc<NbdSource>| {
        let threads: Vec<_> = (0..6u64)
            .map(|t| {
                let (src, data) = (Arc::clone(src), Arc::clone(&data));
                std::thread::spawn(move || {
                    for i in 0..32u64 {
                        let off = ((t * 32 + i) * 40_960) % ((8 << 20) - (1 << 20));
                        let len = 512 * (1 + (i * 37 + t) % 2048) as usize;
                        let mut buf = vec![0u8; len];
                        src.read_at(&mut buf, off).unwrap();
                        let at = off as usize;
                        assert!(buf == data[at..at + len], "bytes at {off}+{len}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    };
    read_all(&src);
    let e = src.write_at(&[0u8; 512], 0).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
    // Restarted: every connection breaks, and is made again.
    drop(q);
    let _q = Qemu::start(&image, &socket);
    read_all(&src);
    assert_eq!(src.stats().state(), SourceState::Connected);
}

#[test]
fn nbd_source_fails_reads_within_the_deadline_and_detects_another_size() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("src.img");
    let socket = dir.path().join("q.sock");
    std::fs::write(&image, bytes(4 << 20, 6)).unwrap();
    let q = Qemu::start(&image, &socket);
    let src = open(&socket, Duration::from_secs(2));
    let mut buf = vec![0u8; 4096];
    src.read_at(&mut buf, 0).unwrap();
    drop(q);
    // Gone: the read gives up (the deadline is 2 s; this only checks that it returns).
    let e = src.read_at(&mut buf, 4096).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("unreachable"), "{msg}");
    assert!(msg.starts_with(&format!("source nbd+unix:///g?socket={}", socket.display())));
    assert_eq!(src.stats().state(), SourceState::Failed);
    // Back with another size: changed, and it stays so.
    std::fs::write(&image, bytes(5 << 20, 6)).unwrap();
    let _q = Qemu::start(&image, &socket);
    let e = src.read_at(&mut buf, 0).unwrap_err().to_string();
    assert!(
        e.contains(
            "changed since the clone began (its size was 4194304 bytes and is 5242880 bytes now)"
        ),
        "{e}"
    );
    assert_eq!(src.stats().state(), SourceState::Changed);
    let e = src.read_at(&mut buf, 0).unwrap_err().to_string();
    assert!(e.contains("no more reads are made from it"), "{e}");
}

/// nbdkit on `socket` with `words` after its own options; killed on drop.
struct Nbdkit(Child);

impl Nbdkit {
    fn start(socket: &Path, words: &[&str]) -> Self {
        let mut child = Command::new("nbdkit")
            .args(["-f", "-r", "-U"])
            .arg(socket)
            .args(words)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(child.try_wait().unwrap().is_none(), "nbdkit exited");
            assert!(Instant::now() < deadline, "nbdkit did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self(child)
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn nbd_source_widens_reads_to_the_servers_minimum_block_size() {
    if !have("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("src.img");
    let socket = dir.path().join("k.sock");
    let data = bytes(1 << 20, 8);
    std::fs::write(&image, &data).unwrap();
    // The filter refuses any request not aligned to 4096 bytes with EINVAL.
    let file = format!("file={}", image.display());
    let _k = Nbdkit::start(
        &socket,
        &[
            "--filter=blocksize-policy",
            "file",
            &file,
            "blocksize-minimum=4096",
            "blocksize-error-policy=error",
        ],
    );
    let src = open_export(&socket, "", Duration::from_secs(10));
    for (off, len) in [
        (512u64, 512usize),
        (1000, 3000),
        (4096, 8192),
        ((1 << 20) - 512, 512),
    ] {
        let mut buf = vec![0u8; len];
        src.read_at(&mut buf, off).unwrap();
        assert!(buf == data[off as usize..off as usize + len], "{off}+{len}");
    }
}
