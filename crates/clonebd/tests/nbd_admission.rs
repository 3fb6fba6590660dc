//! NBD admission against the real `clonebd run` over TCP: connections that never finish
//! their handshake cannot lock real clients out and are closed by the handshake deadline,
//! and clients that send a write's header and never all of its payload cannot make the
//! daemon hold more memory than its budget, while other clients go on being served.
//!
//! Distinct peers are distinct loopback addresses (127.0.0.2, 127.0.0.3, ...); the real
//! clients connect from 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use clonebd_nbd::proto::Command;
use clonebd_nbd::{Client, ClientOptions};
use common::daemon::{Daemon, Files, have, run};
use common::peers::{connect_from, loopback, proc_status_kib};

const SIZE: u64 = 16 << 20;
const MIB: u64 = 1 << 20;

/// The daemon's NBD connections open now (handshaking or established), from `status`.
fn open_connections(d: &Daemon) -> u64 {
    let out = d.ctl_ok("status", &["--json", "--noflush"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    v["connections"].as_u64().expect("connections in status")
}

/// Poll until `open_connections` is `want` (it lags the test's connects by the accept
/// loop's work); returns the last value seen.
fn wait_open(d: &Daemon, want: u64) -> u64 {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let n = open_connections(d);
        if n == want || Instant::now() > until {
            return n;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A connection that stops in its handshake: read the greeting, send the client flags and
/// the first half of an option header. `false` if the server closed it first (over a
/// limit).
fn stall_mid_handshake(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    if s.read_exact(&mut greeting).is_err() {
        return false;
    }
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    // NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES, then 8 of the option header's 16.
    let mut out = 3u32.to_be_bytes().to_vec();
    out.extend_from_slice(b"IHAVEOPT");
    s.write_all(&out).is_ok()
}

/// Wait for the server to close `s` (end of file or reset), at most until `by`; returns
/// whether it did.
fn closed_by(s: &mut TcpStream, by: Instant) -> bool {
    let mut b = [0u8; 64];
    loop {
        let left = by.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut b) {
            Ok(0) => return true,
            // The greeting of a connection that was served until its deadline.
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// 500 connections that send nothing and 200 that stall mid-handshake, from seven peers, do
/// not keep nbdinfo, qemu-img and qemu-io from connecting; each peer holds at most its 16
/// handshake places (the rest are closed at once), those held are closed by the 6 s
/// deadline, and the limits are logged a few times, not 700.
#[test]
fn stalled_handshakes_do_not_lock_out_clients_and_expire_at_the_deadline() {
    if !(have("nbdinfo") && have("qemu-img") && have("qemu-io")) {
        return;
    }
    let deadline = Duration::from_secs(6);
    let margin = Duration::from_secs(4);
    let files = Files::new(SIZE, 7);
    let d = Daemon::start(&files, &["--no-hydration", "--nbd-handshake-timeout", "6"]);
    // 700 sockets here as well as in the daemon.
    clonebd_io::limits::raise_nofile_limit().unwrap();

    let mut held: Vec<(TcpStream, Instant)> = Vec::new();
    for peer in 2..=6 {
        for _ in 0..100 {
            let s = connect_from(loopback(peer), d.tcp).expect("connect");
            held.push((s, Instant::now()));
        }
    }
    let mut stalled = 0;
    for peer in 7..=8 {
        for _ in 0..100 {
            let mut s = connect_from(loopback(peer), d.tcp).expect("connect");
            let at = Instant::now();
            stalled += u64::from(stall_mid_handshake(&mut s));
            held.push((s, at));
        }
    }
    // Seven peers, 16 handshake places each (the default), all within the 128 in total.
    assert_eq!(stalled, 2 * 16, "stalled handshakes given a place");
    assert_eq!(wait_open(&d, 7 * 16), 7 * 16, "handshakes held");

    // Real clients, from 127.0.0.1, while those are held.
    let uri = d.tcp_uri();
    let info = run("nbdinfo", &["--json", &uri]);
    let v: serde_json::Value = serde_json::from_str(&info).expect("nbdinfo JSON");
    assert_eq!(v["exports"][0]["export-size"].as_u64(), Some(SIZE));
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            files.source.to_str().unwrap(),
            &uri,
        ],
    );
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1M 64k",
            "-c",
            "read -P 0x5a 1M 64k",
            &uri,
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    assert_eq!(
        open_connections(&d),
        7 * 16,
        "the stalled handshakes were still held while the clients ran (this machine took \
         longer than the 6 s deadline for them)"
    );

    // Every connection is closed by its deadline: the held ones at it, the others at once.
    for (i, (s, at)) in held.iter_mut().enumerate() {
        assert!(
            closed_by(s, *at + deadline + margin),
            "connection {i} still open {:?} after it connected",
            at.elapsed()
        );
    }
    assert_eq!(wait_open(&d, 0), 0);
    let log = d.log_text();
    let lines = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    let refused = lines("per-peer handshake limit reached");
    let expired = lines("handshake deadline passed");
    assert!(refused >= 1 && expired >= 1, "limits not logged:\n{log}");
    // 588 refusals and 112 expiries, in a few lines (one per 5 s per kind).
    assert!(
        refused <= 6 && expired <= 6,
        "limits logged too often:\n{log}"
    );
    assert!(
        log.contains("peer=127.0.0."),
        "log lines name the peer:\n{log}"
    );
    assert!(d.terminate().success());
}

/// Write `len` bytes through a fresh client from 127.0.0.1 and read them back.
fn normal_client_round_trip(c: &mut Client, offset: u64, len: usize, byte: u8) {
    let data = vec![byte; len];
    c.write(offset, &data, false).expect("write");
    c.flush().expect("flush");
    let mut back = vec![0u8; len];
    c.read(offset, &mut back).expect("read");
    assert!(back == data, "read back differs at {offset}");
}

/// 64 clients from three peers each send the header of a 32 MiB write and 24 MiB of its
/// payload, and never the rest. Without a shared bound the daemon would hold 64 x 24 MiB
/// (1.5 GiB); with each peer limited to 128 MiB of a 512 MiB budget it holds at most 12 of
/// them, its peak RSS stays under the budget plus 200 MiB, and clients over TCP and the unix
/// socket are served meanwhile.
#[test]
fn stalled_write_payloads_stay_within_the_memory_budget() {
    stalled_writes(&[]);
}

/// As above with a reader and a writer thread per connection.
#[test]
fn stalled_write_payloads_stay_within_the_memory_budget_with_threads() {
    stalled_writes(&["--no-nbd-io-uring"]);
}

fn stalled_writes(extra: &[&str]) {
    let budget = 512 * MIB;
    // Room for two 32 MiB writes.
    let files = Files::new(64 * MIB, 8);
    let mut args = vec![
        "--no-hydration",
        "--nbd-memory-budget",
        "512m",
        "--nbd-max-connections",
        "80",
        "--nbd-max-handshakes-per-peer",
        "64",
    ];
    args.extend_from_slice(extra);
    let d = Daemon::start(&files, &args);
    let baseline = proc_status_kib(d.pid(), "VmRSS") * 1024;

    let partial = vec![0xa5u8; 24 << 20];
    let partial = std::sync::Arc::new(partial);
    let tcp = d.tcp;
    let attackers: Vec<_> = (0..64u8)
        .map(|i| {
            let partial = std::sync::Arc::clone(&partial);
            thread::spawn(move || {
                let peer = loopback(2 + i % 3);
                let s = connect_from(peer, tcp).expect("connect");
                let opts = ClientOptions {
                    // A send the server does not take gives up; the socket stays open.
                    timeout: Some(Duration::from_secs(3)),
                    ..ClientOptions::new("clonebd")
                };
                let mut c = opts.handshake_tcp(s).expect("handshake");
                let offset = u64::from(i % 2) * (32 << 20);
                let _ = c.send(Command::Write, 0, offset, 32 << 20, &partial);
                c
            })
        })
        .collect();
    let attackers: Vec<Client> = attackers.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(attackers.len(), 64);
    // Let the daemon take in what it admitted.
    thread::sleep(Duration::from_secs(2));

    // Normal clients still work: over TCP from 127.0.0.1, and over the unix socket.
    let mut c = Client::connect_tcp(d.tcp, "clonebd").expect("TCP client");
    normal_client_round_trip(&mut c, 0, MIB as usize, 0x11);
    normal_client_round_trip(&mut c, 4 * MIB, 4 * MIB as usize, 0x22);
    let mut u = Client::connect_unix(&d.socket, "clonebd").expect("unix client");
    normal_client_round_trip(&mut u, 8 * MIB, 2 * MIB as usize, 0x33);
    if have("qemu-io") {
        let out = run(
            "qemu-io",
            &["-f", "raw", "-c", "read -P 0x22 4M 4M", &d.tcp_uri()],
        );
        assert!(!out.contains("failed"), "{out}");
    }

    let rss = proc_status_kib(d.pid(), "VmRSS") * 1024;
    let peak = proc_status_kib(d.pid(), "VmHWM") * 1024;
    println!(
        "daemon memory: baseline RSS {} MiB, RSS with 64 stalled writes {} MiB, peak {} MiB \
         (budget {} MiB)",
        baseline / MIB,
        rss / MIB,
        peak / MIB,
        budget / MIB
    );
    assert!(
        peak < budget + 200 * MIB,
        "peak RSS {} MiB is past the budget {} MiB + 200 MiB",
        peak / MIB,
        budget / MIB
    );
    let log = d.log_text();
    assert!(
        log.contains("memory budget spent") && log.contains("peer=127.0.0."),
        "the budget did not bite, or was not logged with the peer:\n{log}"
    );
    // Shutdown ends connections waiting for budget and those stalled mid-payload alike.
    assert!(d.terminate().success());
    drop(attackers);
}

/// The payload deadline of the lockout tests, in seconds.
const PAYLOAD_TIMEOUT: u64 = 3;

/// A daemon whose 64 MiB budget two stalled 32 MiB writes (one peer at most one) fill, with
/// a payload deadline of [`PAYLOAD_TIMEOUT`].
fn small_budget_daemon(files: &Files, extra: &[&str]) -> Daemon {
    let timeout = PAYLOAD_TIMEOUT.to_string();
    let mut args = vec![
        "--no-hydration",
        "--nbd-memory-budget",
        "64m",
        "--nbd-memory-budget-per-peer",
        "32m",
        "--nbd-payload-timeout",
        &timeout,
    ];
    args.extend_from_slice(extra);
    Daemon::start(files, &args)
}

/// A client from `peer` past its handshake, and a second handle on its socket to watch for
/// the server closing it.
fn client_from(d: &Daemon, peer: u8) -> (Client, std::net::TcpStream) {
    let s = connect_from(loopback(peer), d.tcp).expect("connect");
    let probe = s.try_clone().expect("clone socket");
    let opts = ClientOptions {
        timeout: Some(Duration::from_secs(60)),
        ..ClientOptions::new("clonebd")
    };
    (opts.handshake_tcp(s).expect("handshake"), probe)
}

/// Normal clients from 127.0.0.1: ours (a write, a flush and a read back), then qemu-io's
/// write and read where it is installed.
fn normal_clients(d: &Daemon) {
    let opts = ClientOptions {
        timeout: Some(Duration::from_secs(60)),
        ..ClientOptions::new("clonebd")
    };
    let mut c = opts.connect_tcp(d.tcp).expect("TCP client");
    normal_client_round_trip(&mut c, 8 * MIB, MIB as usize, 0x44);
    if have("qemu-io") {
        let out = run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x5a 1M 64k",
                "-c",
                "read -P 0x5a 1M 64k",
                &d.tcp_uri(),
            ],
        );
        assert!(!out.contains("failed"), "{out}");
    }
}

/// Poll the daemon's log until it contains `what`, at most until `by`.
fn logged_by(d: &Daemon, what: &str, by: Instant) -> bool {
    loop {
        if d.log_text().contains(what) {
            return true;
        }
        if Instant::now() > by {
            return false;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Four clients from four peers each send the header of a 32 MiB write and 1 MiB of its
/// payload, and stall. Together they want twice the 64 MiB budget: two are charged, two
/// wait for budget, and without a deadline every other client would wait behind them for
/// ever. With a 3 s payload deadline the two charged are closed at it, the two that then
/// get the budget 3 s later, and the normal clients, which waited, are served by then
/// (two rounds of the deadline, plus a margin); every stalled connection sees the end of
/// its stream, and the daemon logs the expiry with the peer.
#[test]
fn stalled_write_payloads_are_closed_at_the_payload_deadline() {
    stalled_payloads_expire(&[]);
}

/// As above with a reader and a writer thread per connection.
#[test]
fn stalled_write_payloads_are_closed_at_the_payload_deadline_with_threads() {
    stalled_payloads_expire(&["--no-nbd-io-uring"]);
}

fn stalled_payloads_expire(extra: &[&str]) {
    let files = Files::new(64 * MIB, 9);
    let d = small_budget_daemon(&files, extra);
    let deadline = Duration::from_secs(PAYLOAD_TIMEOUT);
    let margin = Duration::from_secs(8);
    // Two rounds of stalled writers fit the budget in turn.
    let by = Instant::now() + 2 * deadline + margin;

    let part = vec![0xa5u8; MIB as usize];
    let mut stalled = Vec::new();
    for (i, peer) in (2..=5u8).enumerate() {
        let (mut c, probe) = client_from(&d, peer);
        let offset = (i as u64 % 2) * (32 * MIB);
        c.send(Command::Write, 0, offset, 32 * MIB, &part)
            .expect("send a write's header and part of its payload");
        stalled.push((c, probe, peer));
    }

    normal_clients(&d);
    assert!(
        Instant::now() < by,
        "the normal clients were served only {:?} after the writes stalled (deadline \
         {deadline:?}, two rounds)",
        by.elapsed() + 2 * deadline + margin
    );
    for (_, probe, peer) in &mut stalled {
        assert!(
            closed_by(probe, by),
            "the stalled write from 127.0.0.{peer} was not closed"
        );
    }
    let log = d.log_text();
    assert!(
        log.contains("write payload not received within the payload deadline")
            && log.contains("peer=127.0.0."),
        "the payload deadline was not logged with the peer:\n{log}"
    );
    assert!(d.terminate().success());
}

/// Two clients from two peers each send 48 reads of 1 MiB and never read a reply: the
/// replies fill their sockets, and what is not sent stays charged, 32 MiB per peer, the
/// whole 64 MiB budget. The daemon's send that makes no headway is cut at the 3 s payload
/// deadline, the connections are closed (the expiry logged with the peer), their charges
/// go back, and normal clients that waited for the budget are served.
#[test]
fn clients_that_do_not_read_their_replies_are_closed_at_the_payload_deadline() {
    unread_replies_expire(&[]);
}

/// As above with a reader and a writer thread per connection.
#[test]
fn clients_that_do_not_read_their_replies_are_closed_at_the_payload_deadline_with_threads() {
    unread_replies_expire(&["--no-nbd-io-uring"]);
}

fn unread_replies_expire(extra: &[&str]) {
    let files = Files::new(64 * MIB, 10);
    let d = small_budget_daemon(&files, extra);
    let deadline = Duration::from_secs(PAYLOAD_TIMEOUT);
    let margin = Duration::from_secs(8);
    let by = Instant::now() + deadline + margin;

    let mut readers = Vec::new();
    for peer in [2u8, 3] {
        let (mut c, probe) = client_from(&d, peer);
        for i in 0..48 {
            c.send(Command::Read, 0, i * MIB, MIB, &[])
                .expect("send a read request");
        }
        readers.push((c, probe, peer));
    }

    normal_clients(&d);
    assert!(
        Instant::now() < by,
        "the normal clients were served only {:?} after the reads were sent (deadline \
         {deadline:?})",
        by.elapsed() + deadline + margin
    );
    // Reading the replies now would let the sends go on: first wait for the expiry.
    assert!(
        logged_by(
            &d,
            "replies not taken by the client within the payload deadline",
            by
        ),
        "no reply send was cut at the payload deadline:\n{}",
        d.log_text()
    );
    for (_, probe, peer) in &mut readers {
        // What the sockets held is read first, then the end of the stream (or a reset).
        assert!(
            closed_by(probe, by + margin),
            "the connection from 127.0.0.{peer} that did not read was not closed"
        );
    }
    let log = d.log_text();
    assert!(log.contains("peer=127.0.0."), "peer not logged:\n{log}");
    assert!(d.terminate().success());
}
