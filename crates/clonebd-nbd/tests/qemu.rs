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
    let log = std::fs::read_to_string(&trace).unwrap_or_default();
    println!("{}", &log[..log.len().min(6000)]);
    let _ = run_status;
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
