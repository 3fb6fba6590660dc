//! fio's nbd engine (libnbd underneath) with deep queues and verification.
#![allow(clippy::unwrap_used)]

mod common;

use clonebd_nbd::ServerConfig;
use std::sync::atomic::Ordering;

use common::{TestServer, have, run, stdout};

/// Random writes at queue depth 32, then a verifying read pass; the backend delays reads of odd
/// 64 KiB granules so that replies come back out of order.
#[test]
fn fio_nbd_randwrite_verify_crc32c_iodepth_32() {
    randwrite_verify(ServerConfig::default());
}

/// The same with each connection served by a reader and a writer thread instead of io_uring.
#[test]
fn fio_nbd_randwrite_verify_crc32c_iodepth_32_threaded() {
    randwrite_verify(ServerConfig {
        io_uring: false,
        ..ServerConfig::default()
    });
}

/// The same with reads and writes routed: the server submits them through io_uring itself,
/// reads that cross a granule in two pieces.
#[test]
fn fio_nbd_randwrite_verify_crc32c_iodepth_32_routed() {
    let srv = randwrite_verify_with(ServerConfig::default(), true);
    if let Some(srv) = srv {
        assert!(srv.backend.routed.load(Ordering::Relaxed) > 100);
    }
}

fn randwrite_verify(config: ServerConfig) {
    randwrite_verify_with(config, false);
}

fn randwrite_verify_with(config: ServerConfig, route: bool) -> Option<TestServer> {
    if !have("fio") {
        return None;
    }
    let srv = TestServer::start_with(
        64 << 20,
        |mut b| {
            b.jitter = Some(std::time::Duration::from_millis(1));
            b.route = route;
            b
        },
        config,
    );
    let uri = srv.unix_uri();
    let out = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bsrange=4k-256k",
            "--bs_unaligned=0",
            "--iodepth=32",
            "--size=48m",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--randrepeat=0",
            "--output-format=terse",
        ],
    );
    let text = stdout(&out);
    assert!(!text.contains("verify:"), "{text}");
    let stats = srv.server.stats();
    println!("{stats:?}");
    assert!(stats.requests > 100);
    assert_eq!(stats.request_errors, 0);
    assert_eq!(stats.protocol_errors, 0);
    Some(srv)
}

/// Mixed reads and writes over TCP from two jobs at once.
#[test]
fn fio_nbd_mixed_two_jobs_over_tcp() {
    if !have("fio") {
        return;
    }
    let srv = TestServer::start(64 << 20);
    let uri = srv.tcp_uri();
    run(
        "fio",
        &[
            "--name=mixed",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=32",
            "--numjobs=2",
            "--size=16m",
            "--io_size=64m",
            "--output-format=terse",
        ],
    );
    let stats = srv.server.stats();
    assert!(stats.total_connections >= 2);
    assert_eq!(stats.request_errors, 0);
}
