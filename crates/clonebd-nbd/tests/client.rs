//! The blocking client against the crate's own server and against qemu-nbd: every command,
//! both reply styles, metadata contexts, and the errors a server gives.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clonebd_nbd::proto::{CONTEXT_CLONEBD_HYDRATED, errno, transmission_flags as tf};
use clonebd_nbd::{BlockSizes, Client, ClientError, ClientOptions, Extent, NbdError, ServerConfig};
use common::{FileBackend, TestServer, have, pattern, sizes};

const SIZE: u64 = 16 << 20;

fn server_error(r: Result<(), ClientError>) -> u32 {
    match r {
        Err(e) => e
            .nbd_value()
            .unwrap_or_else(|| panic!("not a server error: {e}")),
        Ok(()) => panic!("expected a server error"),
    }
}

/// Everything a client does, against one export; `region` is the preferred block size.
fn exercise(c: &mut Client, file: impl Fn(u64, usize) -> Vec<u8>) {
    let data = pattern(256 << 10, 1);
    c.write(0, &data, false).unwrap();
    let mut back = vec![0u8; data.len()];
    c.read(0, &mut back).unwrap();
    assert_eq!(back, data);
    let fua = pattern(4096, 2);
    c.write(1 << 20, &fua, true).unwrap();
    c.flush().unwrap();
    assert_eq!(file(1 << 20, 4096), fua);
    // Trim, then zero: whatever trim left, zeroes read back as zeros.
    c.trim(0, 128 << 10).unwrap();
    c.write_zeroes(0, 128 << 10).unwrap();
    let mut z = vec![1u8; 128 << 10];
    c.read(0, &mut z).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    assert_eq!(file(128 << 10, 128 << 10), data[128 << 10..]);
    c.cache(2 << 20, 1 << 20).unwrap();
    // Reads at the very end, and a 32 MiB read if the export is that large.
    let mut tail = vec![0u8; 512];
    c.read(c.size() - 512, &mut tail).unwrap();
    assert_eq!(tail, file(c.size() - 512, 512));
}

/// `write_past_end` is the error the server gives to a write past the end: the protocol says
/// `NBD_ENOSPC` (ours), qemu-nbd answers `NBD_EINVAL`.
fn errors(c: &mut Client, write_past_end: u32) {
    let size = c.size();
    let mut buf = vec![0u8; 4096];
    // "It SHOULD return NBD_EINVAL if it receives a read ... beyond the size of the device".
    assert_eq!(server_error(c.read(size, &mut buf)), errno::EINVAL);
    // "The server SHOULD return NBD_ENOSPC if it receives a write request including one or
    // more sectors beyond the size of the device".
    assert_eq!(
        server_error(c.write(size - 512, &buf, false)),
        write_past_end
    );
    // The connection goes on after an error.
    c.read(0, &mut buf).unwrap();
    let big = c.block_sizes().maximum as usize + 512;
    let mut huge = vec![0u8; big];
    assert!(matches!(
        c.read(0, &mut huge),
        Err(ClientError::TooLarge { .. })
    ));
    assert!(matches!(
        c.block_status("nope:nothing", 0, 512),
        Err(ClientError::NoContext(_))
    ));
    c.read(4096, &mut buf).unwrap();
}

#[test]
fn client_talks_to_our_server_over_unix_and_tcp() {
    let srv = TestServer::start(SIZE);
    let file = |o, l| srv.read_file(o, l);
    let mut c = Client::connect_unix(&srv.socket, "disk").unwrap();
    assert!(c.structured());
    assert_eq!(c.size(), SIZE);
    assert_eq!(c.block_sizes(), sizes());
    let flags = c.transmission_flags();
    for f in [
        tf::SEND_FLUSH,
        tf::SEND_FUA,
        tf::SEND_TRIM,
        tf::SEND_WRITE_ZEROES,
        tf::SEND_CACHE,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x}");
    }
    exercise(&mut c, file);
    errors(&mut c, errno::ENOSPC);
    c.disconnect().unwrap();
    let mut t = Client::connect_tcp(srv.tcp, "").unwrap();
    assert_eq!(t.size(), SIZE);
    exercise(&mut t, file);
    errors(&mut t, errno::ENOSPC);
    drop(t);
    let calls = &srv.backend.calls;
    assert!(calls.fua_writes.load(Ordering::Relaxed) >= 2);
    assert!(calls.flushes.load(Ordering::Relaxed) >= 2);
    assert!(calls.trims.load(Ordering::Relaxed) >= 2);
    assert!(calls.zeroes.load(Ordering::Relaxed) >= 2);
    assert!(calls.caches.load(Ordering::Relaxed) >= 2);
}

#[test]
fn client_with_simple_replies_reads_writes_and_reports_errors() {
    let srv = TestServer::start(SIZE);
    let mut opts = ClientOptions::new("disk");
    opts.structured = false;
    let mut c = opts.connect_unix(&srv.socket).unwrap();
    assert!(!c.structured());
    exercise(&mut c, |o, l| srv.read_file(o, l));
    errors(&mut c, errno::ENOSPC);
}

#[test]
fn client_reads_clonebd_hydrated_extents() {
    let srv = TestServer::start(SIZE);
    let mut c = ClientOptions::new("disk")
        .meta_context(CONTEXT_CLONEBD_HYDRATED)
        .meta_context("base:allocation")
        .connect_unix(&srv.socket)
        .unwrap();
    let names: Vec<_> = c.meta_contexts().iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["base:allocation", CONTEXT_CLONEBD_HYDRATED]);
    // The test backend starts with the first half of the regions hydrated.
    let ext = c.block_status(CONTEXT_CLONEBD_HYDRATED, 0, SIZE).unwrap();
    let half = SIZE / 2;
    let want = [
        Extent {
            length: half,
            flags: 1,
        },
        Extent {
            length: half,
            flags: 0,
        },
    ];
    assert_eq!(ext, want);
    c.write(half, &[7; 512], false).unwrap();
    let ext = c
        .block_status(CONTEXT_CLONEBD_HYDRATED, half, 1 << 20)
        .unwrap();
    assert_eq!(
        ext[0],
        Extent {
            length: 64 << 10,
            flags: 1
        }
    );
    let alloc = c.block_status("base:allocation", 0, 1 << 20).unwrap();
    assert!(!alloc.is_empty());
}

#[test]
fn client_refuses_unknown_exports_and_sees_read_only_exports_refuse_writes() {
    let srv = TestServer::start(SIZE);
    match Client::connect_unix(&srv.socket, "other") {
        Err(ClientError::OptionRefused { reply, .. }) => {
            assert_eq!(reply, clonebd_nbd::proto::rep::ERR_UNKNOWN)
        }
        other => panic!("{other:?}"),
    }
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FileBackend::create(
        &dir.path().join("ro.img"),
        SIZE,
        sizes(),
        true,
    ));
    let ro = TestServer::serve(dir, backend, ServerConfig::default());
    let mut c = Client::connect_unix(&ro.socket, "disk").unwrap();
    assert_ne!(c.transmission_flags() & tf::READ_ONLY, 0);
    let e = c.write(0, &[1; 512], false).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Server {
                error: NbdError::Permission,
                value: 1,
                ..
            }
        ),
        "{e}"
    );
    assert!(matches!(c.trim(0, 512), Err(ClientError::NotSupported(_))));
}

#[test]
fn backend_sees_4k_aligned_buffers_for_reads_and_writes() {
    let srv = TestServer::start(64 << 20);
    let mut c = Client::connect_unix(&srv.socket, "disk").unwrap();
    for (i, len) in [512usize, 4096, 8192, 65536, 1 << 20, 32 << 20]
        .into_iter()
        .enumerate()
    {
        let data = pattern(len, i as u64);
        c.write(0, &data, false).unwrap();
        let mut back = vec![0u8; len];
        c.read(0, &mut back).unwrap();
        assert_eq!(back, data);
    }
    let calls = &srv.backend.calls;
    assert!(calls.reads.load(Ordering::Relaxed) >= 6);
    assert_eq!(calls.unaligned_buffers.load(Ordering::Relaxed), 0);
}

/// qemu-nbd serving a file on a unix socket; killed on drop.
struct QemuNbd {
    child: Child,
    socket: PathBuf,
}

impl QemuNbd {
    fn start(dir: &Path, image: &Path) -> Self {
        let socket = dir.join("qemu.sock");
        let child = Command::new("qemu-nbd")
            .args([
                "-k",
                socket.to_str().unwrap(),
                "-f",
                "raw",
                "--persistent",
                "--shared=4",
            ])
            .args(["-x", "disk", "--cache=writeback", "--discard=unmap"])
            .arg(image)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, socket }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn client_talks_to_qemu_nbd_with_both_reply_styles() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("q.img");
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(SIZE).unwrap();
    drop(f);
    let q = QemuNbd::start(dir.path(), &image);
    let file = |o: u64, l: usize| {
        let mut b = vec![0u8; l];
        std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&image).unwrap(), &mut b, o)
            .unwrap();
        b
    };
    let mut c = ClientOptions::new("disk")
        .meta_context("base:allocation")
        .connect_unix(&q.socket)
        .unwrap();
    assert!(c.structured());
    assert_eq!(c.size(), SIZE);
    let BlockSizes {
        minimum, maximum, ..
    } = c.block_sizes();
    assert!(minimum >= 1 && maximum >= 1 << 20, "{:?}", c.block_sizes());
    exercise(&mut c, file);
    errors(&mut c, errno::EINVAL);
    // After the trim and zeroing above, the first 128 KiB are unallocated or zero, and the
    // 128 KiB after hold data.
    let ext = c.block_status("base:allocation", 0, 256 << 10).unwrap();
    assert!(ext[0].flags & 2 != 0, "{ext:?}");
    let covered: u64 = ext.iter().map(|e| e.length).sum();
    assert!(covered > 0 && covered <= 256 << 10, "{ext:?}");
    c.disconnect().unwrap();
    let mut opts = ClientOptions::new("disk");
    opts.structured = false;
    let mut s = opts.connect_unix(&q.socket).unwrap();
    assert!(!s.structured());
    exercise(&mut s, file);
    errors(&mut s, errno::EINVAL);
    assert!(matches!(
        Client::connect_unix(&q.socket, "nonexistent"),
        Err(ClientError::OptionRefused { .. })
    ));
}
