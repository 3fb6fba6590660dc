//! The server against qemu's NBD client (qemu-io, qemu-img).
#![allow(clippy::unwrap_used)]

mod common;

use common::{TestServer, have, pattern, run, run_status, stdout};
use std::sync::atomic::Ordering;

const SIZE: u64 = 64 << 20;

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    stdout(&run("qemu-io", &args))
}

#[test]
fn qemu_io_write_read_over_unix_and_tcp() {
    if !have("qemu-io") {
        return;
    }
    let srv = TestServer::start(SIZE);
    let out = qemu_io(
        &srv.unix_uri(),
        &["write -P 0xab 0 64k", "read -P 0xab 0 64k"],
    );
    assert!(out.contains("wrote 65536/65536"), "{out}");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(srv.read_file(0, 65536), vec![0xab; 65536]);
    let out = qemu_io(
        &srv.tcp_uri(),
        &["write -P 0xcd 1M 128k", "read -P 0xcd 1M 128k"],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(srv.read_file(1 << 20, 128 << 10), vec![0xcd; 128 << 10]);
}

#[test]
fn qemu_io_fua_discard_zero_flush_reach_the_backend() {
    if !have("qemu-io") {
        return;
    }
    let srv = TestServer::start(SIZE);
    srv.write_file(4 << 20, &[0x11; 1 << 20]);
    let out = qemu_io(
        &srv.unix_uri(),
        &[
            "write -f -P 0x22 0 64k",
            "discard 4M 256k",
            "write -z 4608k 64k",
            "flush",
            "read -P 0 4M 256k",
            "read -P 0 4608k 64k",
            "read -P 0x11 4672k 64k",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let calls = &srv.backend.calls;
    assert!(calls.fua_writes.load(Ordering::Relaxed) >= 1);
    assert!(calls.trims.load(Ordering::Relaxed) >= 1);
    assert!(calls.zeroes.load(Ordering::Relaxed) >= 1);
    assert!(calls.flushes.load(Ordering::Relaxed) >= 1);
    assert_eq!(srv.read_file(0, 65536), vec![0x22; 65536]);
    assert_eq!(srv.read_file(4 << 20, 256 << 10), vec![0; 256 << 10]);
    assert_eq!(srv.read_file(4608 << 10, 64 << 10), vec![0; 64 << 10]);
    assert_eq!(srv.read_file(4672 << 10, 64 << 10), vec![0x11; 64 << 10]);
}

#[test]
fn qemu_io_negotiates_extended_headers() {
    if !have("qemu-io") {
        return;
    }
    let srv = TestServer::start(SIZE);
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.log");
    let trace_arg = format!("enable=nbd_*,file={}", trace.display());
    let uri = srv.unix_uri();
    let out = run(
        "qemu-io",
        &[
            "-T",
            &trace_arg,
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "read -P 0x5a 0 1M",
            "-c",
            "map",
            &uri,
        ],
    );
    let out = stdout(&out);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let log = std::fs::read_to_string(&trace).unwrap();
    let has = |needle: &str| log.contains(needle);
    if !has("nbd_send_option_request") {
        clonebd_testkit::machine::skip("this qemu-io was built without a usable trace backend");
        return;
    }
    assert!(
        has("Received option reply 11 (extended headers), type 1 (ack)"),
        "{log}"
    );
    // Every reply came with an extended header: NONE chunks for success, 64-bit block status.
    assert!(has("type = 0 (none)"), "{log}");
    assert!(has("type = 6 (block status (64-bit))"), "{log}");
    // qemu traces any deviation from the protocol it notices.
    assert!(!has("compliance"), "{log}");
    assert!(!has("nbd_read_reply_entry_fail"), "{log}");
}

#[test]
fn qemu_io_large_writes_up_to_32_mib() {
    if !have("qemu-io") {
        return;
    }
    let srv = TestServer::start(SIZE);
    let data = pattern(32 << 20, 7);
    let src = srv.dir.path().join("src.img");
    std::fs::write(&src, &data).unwrap();
    let out = qemu_io(
        &srv.unix_uri(),
        &[
            "write -P 0x42 0 3M",
            "write -P 0x43 8M 32M",
            "read -P 0x43 8M 32M",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(srv.read_file(0, 3 << 20), vec![0x42; 3 << 20]);
    assert_eq!(srv.read_file(8 << 20, 32 << 20), vec![0x43; 32 << 20]);
}

#[test]
fn qemu_img_convert_and_compare_through_the_export() {
    if !have("qemu-img") {
        return;
    }
    let srv = TestServer::start(SIZE);
    let src = srv.dir.path().join("src.img");
    let mut data = pattern(SIZE as usize, 11);
    // Leave zero runs so that convert has holes to skip or zero.
    data[(8 << 20)..(24 << 20)].fill(0);
    std::fs::write(&src, &data).unwrap();
    let src = src.to_str().unwrap();
    let uri = srv.unix_uri();
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src, &uri],
    );
    let out = stdout(&run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, &uri],
    ));
    assert!(out.contains("Images are identical"), "{out}");
    assert!(
        srv.read_file(0, SIZE as usize) == data,
        "export differs from source"
    );
    // A changed byte is found through the export.
    srv.write_file(40 << 20, &[0xff]);
    let out = run_status(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, &srv.tcp_uri()],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    // And out of it, over TCP.
    let back = srv.dir.path().join("back.img");
    let back = back.to_str().unwrap();
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &srv.tcp_uri(), back],
    );
    let mut want = data.clone();
    want[40 << 20] = 0xff;
    assert!(
        std::fs::read(back).unwrap() == want,
        "converted copy differs"
    );
}

#[test]
fn several_qemu_io_clients_at_once() {
    if !have("qemu-io") {
        return;
    }
    let srv = TestServer::start(SIZE);
    let uris: Vec<String> = (0..6)
        .map(|i| {
            if i % 2 == 0 {
                srv.unix_uri()
            } else {
                srv.tcp_uri()
            }
        })
        .collect();
    let handles: Vec<_> = uris
        .into_iter()
        .enumerate()
        .map(|(i, uri)| {
            std::thread::spawn(move || {
                let off = i * (8 << 20);
                let w = format!("write -P {} {off} 4M", i + 1);
                let r = format!("read -P {} {off} 4M", i + 1);
                let out = stdout(&run("qemu-io", &["-f", "raw", "-c", &w, "-c", &r, &uri]));
                assert!(!out.contains("Pattern verification failed"), "{out}");
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for i in 0..6u8 {
        assert_eq!(
            srv.read_file(u64::from(i) * (8 << 20), 4 << 20),
            vec![i + 1; 4 << 20]
        );
    }
    assert!(srv.server.stats().total_connections >= 6);
}
