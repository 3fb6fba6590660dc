//! The multiplexed client: many threads' reads on one connection, replies matched by cookie
//! whatever their order, against nbdkit (holding one offset's reads back so that a later
//! reply overtakes them) and a real qemu-nbd in both reply styles; a reply that never comes
//! (the crate's own server, its reads held by a gate) breaks the connection for every read
//! waiting on it.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clonebd_nbd::proto::errno;
use clonebd_nbd::{ClientError, ClientOptions, MuxClient, ServerConfig};
use common::{Gate, TestServer, have, pattern};

const SIZE: u64 = 16 << 20;
const LONG: Duration = Duration::from_secs(30);

/// nbdkit's eval plugin serving `image` on a unix socket, in parallel, holding back reads at
/// offset 65536 for 400 ms; killed on drop.
fn nbdkit_slow_at_64k(dir: &Path, image: &Path) -> Server {
    let socket = dir.join("nbdkit.sock");
    let img = image.display();
    let child = Command::new("nbdkit")
        .args(["-f", "-U", socket.to_str().unwrap(), "eval"])
        .arg(format!("get_size=stat -c %s {img}"))
        .arg("thread_model=echo parallel")
        .arg(format!(
            "pread=if [ $4 -eq 65536 ]; then sleep 0.4; fi; dd if={img} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none"
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Server::wait(child, socket)
}

#[test]
fn mux_replies_out_of_order_reach_their_callers() {
    if !have("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("src.img");
    let data = pattern(1 << 20, 7);
    std::fs::write(&image, &data).unwrap();
    let server = nbdkit_slow_at_64k(dir.path(), &image);
    let c = Arc::new(
        MuxClient::new(
            ClientOptions::new("").connect_unix(&server.socket).unwrap(),
            Some(LONG),
        )
        .unwrap(),
    );
    let slow_done = Arc::new(AtomicBool::new(false));
    let slow = {
        let (c, done) = (Arc::clone(&c), Arc::clone(&slow_done));
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            c.read(65536, &mut buf, LONG).unwrap();
            done.store(true, Ordering::SeqCst);
            buf
        })
    };
    // Wait until the slow read is surely on the wire, then overtake it.
    std::thread::sleep(Duration::from_millis(100));
    let mut fast = vec![0u8; 8192];
    c.read(3 * 65536, &mut fast, LONG).unwrap();
    assert!(
        !slow_done.load(Ordering::SeqCst),
        "the later read was not answered first"
    );
    assert_eq!(fast, data[3 * 65536..3 * 65536 + 8192]);
    let slow = slow.join().unwrap();
    assert_eq!(slow, data[65536..65536 + 4096]);
    assert!(c.broken().is_none());
}

/// A server process on a unix socket; killed on drop.
struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    fn wait(child: Child, socket: PathBuf) -> Self {
        let s = Self { child, socket };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !s.socket.exists() {
            assert!(Instant::now() < deadline, "the server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// qemu-nbd serving `image` read-only on a unix socket.
fn qemu_nbd(dir: &Path, image: &Path) -> Server {
    let socket = dir.join("qemu-ro.sock");
    let child = Command::new("qemu-nbd")
        .args(["-k", socket.to_str().unwrap(), "-f", "raw", "-r"])
        .args(["--persistent", "--shared=8", "-x", "img"])
        .arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Server::wait(child, socket)
}

#[test]
fn mux_many_threads_read_right_from_qemu_nbd_in_both_reply_styles() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("src.img");
    let data = Arc::new(pattern(SIZE as usize, 3));
    std::fs::write(&image, &*data).unwrap();
    let q = qemu_nbd(dir.path(), &image);
    for structured in [true, false] {
        let mut opts = ClientOptions::new("img");
        opts.structured = structured;
        let client = opts.connect_unix(&q.socket).unwrap();
        assert_eq!(client.structured(), structured);
        let c = Arc::new(MuxClient::new(client, Some(LONG)).unwrap());
        assert_eq!(c.size(), SIZE);
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let (c, data) = (Arc::clone(&c), Arc::clone(&data));
                std::thread::spawn(move || {
                    let mut x = t * 7919 + 1;
                    for _ in 0..150 {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let len = 512 * (1 + (x >> 33) % 512) as usize;
                        let off = 512 * ((x >> 11) % ((SIZE - len as u64) / 512));
                        let mut buf = vec![0u8; len];
                        c.read(off, &mut buf, LONG).unwrap();
                        let at = off as usize;
                        assert!(buf == data[at..at + len], "bytes at {off}+{len}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // A server error fails only its own read; the connection goes on.
        let mut buf = vec![0u8; 4096];
        let e = c.read(SIZE, &mut buf, LONG).unwrap_err();
        assert_eq!(e.nbd_value(), Some(errno::EINVAL), "{e}");
        c.read(SIZE - 4096, &mut buf, LONG).unwrap();
        assert_eq!(buf, data[(SIZE - 4096) as usize..]);
        assert!(c.broken().is_none());
    }
}

#[test]
fn mux_a_reply_that_never_comes_breaks_the_connection_for_every_waiting_read() {
    let gate = Arc::new(Gate::default());
    let g = Arc::clone(&gate);
    let server = TestServer::start_with(
        SIZE,
        move |mut b| {
            b.gate = Some(g);
            b
        },
        ServerConfig::default(),
    );
    let c = Arc::new(
        MuxClient::new(
            ClientOptions::new("disk")
                .connect_unix(&server.socket)
                .unwrap(),
            Some(LONG),
        )
        .unwrap(),
    );
    let waiting = {
        let c = Arc::clone(&c);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            c.read(0, &mut buf, LONG)
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let mut buf = vec![0u8; 4096];
    let e = c
        .read(8192, &mut buf, Duration::from_millis(300))
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut),
        "{e}"
    );
    let other = waiting.join().unwrap();
    assert!(matches!(other, Err(ClientError::Broken)), "{other:?}");
    assert!(c.broken().is_some());
    assert!(matches!(
        c.read(0, &mut buf, LONG),
        Err(ClientError::Broken)
    ));
    gate.open();
}
