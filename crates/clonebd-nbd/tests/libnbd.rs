//! The server against libnbd's tools: nbdinfo and nbdcopy.
#![allow(clippy::unwrap_used)]

mod common;

use clonebd_nbd::ServerConfig;
use common::{FileBackend, TestServer, have, pattern, run, run_status, stdout};

const SIZE: u64 = 16 << 20;

#[test]
fn nbdinfo_reports_export_over_unix_and_tcp() {
    if !have("nbdinfo") {
        return;
    }
    let srv = TestServer::start(SIZE);
    for uri in [srv.unix_uri(), srv.tcp_uri()] {
        let out = stdout(&run("nbdinfo", &[&uri]));
        println!("{out}");
        for want in [
            "export-size: 16777216",
            "is_read_only: false",
            "can_multi_conn: true",
            "can_flush: true",
            "can_fua: true",
            "can_trim: true",
            "can_zero: true",
            "can_fast_zero: true",
            "can_cache: true",
            "block_size_minimum: 512",
            "block_size_preferred: 65536",
            "block_size_maximum: 33554432",
            "base:allocation",
            "clonebd:hydrated",
            "description: clonebd test export",
        ] {
            assert!(out.contains(want), "missing {want:?} in:\n{out}");
        }
    }
}

#[test]
fn nbdinfo_list_shows_the_export() {
    if !have("nbdinfo") {
        return;
    }
    let srv = TestServer::start(SIZE);
    let uri = format!("nbd+unix://?socket={}", srv.socket.display());
    let out = stdout(&run("nbdinfo", &["--list", &uri]));
    println!("{out}");
    assert!(out.contains("export=\"disk\""), "{out}");
    assert!(out.contains("description: clonebd test export"), "{out}");
}

#[test]
fn nbdinfo_map_shows_allocation() {
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let srv = TestServer::start(SIZE);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 1M 128k", &srv.unix_uri()],
    );
    let out = stdout(&run("nbdinfo", &["--map", &srv.unix_uri()]));
    println!("{out}");
    let lines: Vec<Vec<String>> = out
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    // offset, length, flags, description
    assert_eq!(lines[0][..3], ["0", "1048576", "3"]);
    assert_eq!(lines[1][..3], ["1048576", "131072", "0"]);
    assert_eq!(lines[2][..3], ["1179648", "15597568", "3"]);
    assert_eq!(lines.len(), 3);
}

#[test]
fn nbdinfo_map_clonebd_hydrated() {
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let srv = TestServer::start(SIZE);
    // Regions are 64 KiB; the first half start hydrated; a write hydrates its region.
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 12M 4k", &srv.unix_uri()],
    );
    let out = stdout(&run(
        "nbdinfo",
        &["--map=clonebd:hydrated", &srv.unix_uri()],
    ));
    println!("{out}");
    let lines: Vec<Vec<String>> = out
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    assert_eq!(lines[0][..3], ["0", "8388608", "1"]);
    assert_eq!(lines[1][..3], ["8388608", "4194304", "0"]);
    assert_eq!(lines[2][..3], ["12582912", "65536", "1"]);
    assert_eq!(lines[3][..3], ["12648448", "4128768", "0"]);
    assert_eq!(lines.len(), 4);
}

#[test]
fn nbdinfo_map_of_unadvertised_context_fails_cleanly() {
    if !have("nbdinfo") {
        return;
    }
    let srv = TestServer::start_with(SIZE, FileBackend::without_hydrated, ServerConfig::default());
    let out = run_status("nbdinfo", &["--map=clonebd:hydrated", &srv.unix_uri()]);
    println!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success());
    // The default context still maps.
    run("nbdinfo", &["--map", &srv.unix_uri()]);
}

#[test]
fn nbdcopy_both_ways_preserves_content() {
    if !have("nbdcopy") {
        return;
    }
    let srv = TestServer::start(SIZE);
    let src = srv.dir.path().join("src.img");
    let back = srv.dir.path().join("back.img");
    let data = pattern(SIZE as usize, 3);
    std::fs::write(&src, &data).unwrap();
    run("nbdcopy", &[src.to_str().unwrap(), &srv.unix_uri()]);
    assert!(
        srv.read_file(0, SIZE as usize) == data,
        "export differs after nbdcopy in"
    );
    std::fs::write(&back, b"").unwrap();
    run("nbdcopy", &[&srv.tcp_uri(), back.to_str().unwrap()]);
    assert!(
        std::fs::read(&back).unwrap() == data,
        "copy differs after nbdcopy out"
    );
    let stats = srv.server.stats();
    println!("{stats:?}");
    assert!(stats.total_connections >= 2);
    assert_eq!(stats.protocol_errors, 0);
}
