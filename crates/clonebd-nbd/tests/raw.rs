//! Byte-level tests with a hand-written client: error replies that keep the connection alive,
//! payloads over the cap, extended headers, option handling, ordering, limits and shutdown.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use clonebd_nbd::ServerConfig;
use common::raw::*;
use common::{FileBackend, TestServer, pattern};

const SIZE: u64 = 4 << 20;

fn structured(srv: &TestServer) -> RawClient {
    let mut c = RawClient::connect(&srv.socket);
    c.negotiate(true, false, &["base:allocation", "clonebd:hydrated"]);
    c
}

fn no_data(_: u64) -> usize {
    0
}

#[test]
fn out_of_range_requests_get_errors_and_the_connection_continues() {
    let srv = TestServer::start(SIZE);
    let mut c = RawClient::connect(&srv.socket);
    let (size, _, _) = c.negotiate(false, false, &[]);
    assert_eq!(size, SIZE);
    // Read past the end: EINVAL, no data.
    c.request(0, CMD_READ, 1, SIZE - 512, 1024, &[]);
    assert_eq!(
        c.reply(no_data),
        RawReply {
            cookie: 1,
            error: EINVAL,
            ..Default::default()
        }
    );
    // Offset + length overflowing u64: EINVAL.
    c.request(0, CMD_TRIM, 2, u64::MAX - 511, 1024, &[]);
    assert_eq!(c.reply(no_data).error, EINVAL);
    // Write past the end: ENOSPC, and its payload is consumed.
    c.request(0, CMD_WRITE, 3, SIZE - 512, 1024, &[0xee; 1024]);
    assert_eq!(c.reply(no_data).error, ENOSPC);
    // Unaligned write: EINVAL, payload consumed.
    c.request(0, CMD_WRITE, 4, 100, 512, &[0xee; 512]);
    assert_eq!(c.reply(no_data).error, EINVAL);
    // A flag not valid for the command (NO_HOLE on a read): EINVAL.
    c.request(2, CMD_READ, 5, 0, 512, &[]);
    assert_eq!(c.reply(no_data).error, EINVAL);
    // Zero length read: EINVAL.
    c.request(0, CMD_READ, 6, 0, 0, &[]);
    assert_eq!(c.reply(no_data).error, EINVAL);
    // Unknown command: EINVAL.
    c.request(0, 42, 7, 0, 512, &[]);
    assert_eq!(c.reply(no_data).error, EINVAL);
    // Block status without a negotiated context: EINVAL.
    c.request(0, CMD_BLOCK_STATUS, 8, 0, 512, &[]);
    assert_eq!(c.reply(no_data).error, EINVAL);
    // The stream is still in step: a good write and read work.
    let data = pattern(4096, 1);
    c.request(0, CMD_WRITE, 9, 8192, 4096, &data);
    assert_eq!(
        c.reply(no_data),
        RawReply {
            cookie: 9,
            ..Default::default()
        }
    );
    c.request(0, CMD_READ, 10, 8192, 4096, &[]);
    let r = c.reply(|_| 4096);
    assert_eq!((r.cookie, r.error), (10, 0));
    assert_eq!(r.data, data);
    // Nothing written by the rejected requests.
    assert_eq!(srv.read_file(SIZE - 512, 512), vec![0; 512]);
    assert_eq!(srv.read_file(0, 1024), vec![0; 1024]);
    c.request(0, CMD_DISC, 11, 0, 0, &[]);
    assert!(c.closed());
    let stats = srv.server.stats();
    assert_eq!(stats.request_errors, 8);
    assert_eq!(stats.protocol_errors, 0);
}

#[test]
fn structured_errors_carry_a_message() {
    let srv = TestServer::start(SIZE);
    let mut c = structured(&srv);
    c.request(0, CMD_READ, 1, SIZE, 512, &[]);
    let r = c.reply(no_data);
    assert_eq!(r.error, EINVAL);
    let (ty, flags, p) = &r.chunks[0];
    assert_eq!((*ty, *flags), (0x8001, 1));
    let msg_len = u16::from_be_bytes([p[4], p[5]]) as usize;
    assert_eq!(p.len(), 6 + msg_len);
    assert!(msg_len > 0);
}

#[test]
fn payload_over_the_cap_is_refused_without_reading_it() {
    let srv = TestServer::start(SIZE);
    let mut c = RawClient::connect(&srv.socket);
    c.negotiate(false, false, &[]);
    // Declare a 4 GiB - 1 write and send none of it: the server must answer and close at once
    // rather than wait for (or allocate) the declared payload.
    let start = Instant::now();
    c.request(0, CMD_WRITE, 1, 0, u64::from(u32::MAX), &[]);
    let r = c.reply(no_data);
    assert_eq!((r.cookie, r.error), (1, EINVAL));
    assert!(c.closed());
    assert!(start.elapsed() < Duration::from_secs(5));
    // A payload just over 32 MiB, sent in full, gets the same treatment.
    let mut c = RawClient::connect(&srv.socket);
    c.negotiate(true, false, &[]);
    c.request(0, CMD_WRITE, 2, 0, (32 << 20) + 512, &[]);
    let r = c.reply(no_data);
    assert_eq!((r.cookie, r.error), (2, EINVAL));
    assert!(c.closed());
    assert_eq!(srv.server.stats().protocol_errors, 2);
    // Other connections are unaffected.
    let mut c = RawClient::connect(&srv.socket);
    c.negotiate(false, false, &[]);
    c.request(0, CMD_READ, 3, 0, 512, &[]);
    assert_eq!(c.reply(|_| 512).error, 0);
}

#[test]
fn write_of_exactly_32_mib_is_accepted() {
    let srv = TestServer::start(40 << 20);
    let mut c = RawClient::connect(&srv.socket);
    c.negotiate(false, false, &[]);
    let data = pattern(32 << 20, 5);
    c.request(1, CMD_WRITE, 1, 4 << 20, 32 << 20, &data);
    assert_eq!(c.reply(no_data).error, 0);
    assert!(srv.read_file(4 << 20, 32 << 20) == data);
}

#[test]
fn bad_request_magic_closes_only_that_connection() {
    let srv = TestServer::start(SIZE);
    let mut good = RawClient::connect(&srv.socket);
    good.negotiate(false, false, &[]);
    let mut bad = RawClient::connect(&srv.socket);
    bad.negotiate(false, false, &[]);
    bad.stream.write_all(&[0xde; 28]).unwrap();
    assert!(bad.closed());
    good.request(0, CMD_READ, 1, 0, 512, &[]);
    assert_eq!(good.reply(|_| 512).error, 0);
    assert_eq!(srv.server.stats().protocol_errors, 1);
}

#[test]
fn extended_headers_round_trip() {
    let srv = TestServer::start(SIZE);
    let mut c = RawClient::connect(&srv.socket);
    let (_, _, ids) = c.negotiate(false, true, &["base:allocation", "clonebd:hydrated"]);
    assert_eq!(ids.len(), 2);
    let data = pattern(65536, 9);
    c.request(0, CMD_WRITE, 1, 65536, 65536, &data);
    let r = c.reply(no_data);
    // Success is a NONE chunk with DONE, echoing the request's offset.
    assert_eq!(r.chunks, vec![(0, 1, vec![])]);
    assert_eq!(r.header_offsets, vec![65536]);
    c.request(0, CMD_READ, 2, 65536, 65536, &[]);
    let r = c.reply(no_data);
    assert_eq!(r.data, data);
    assert_eq!(r.chunks[0].0, 1);
    assert_eq!(r.header_offsets, vec![65536]);
    // Block status: one BLOCK_STATUS_EXT chunk per context, the last one DONE.
    c.request(0, CMD_BLOCK_STATUS, 3, 0, SIZE, &[]);
    let r = c.reply(no_data);
    assert_eq!(r.chunks.len(), 2);
    let (id0, ext0) = extents(r.chunks[0].0, &r.chunks[0].2);
    let (id1, ext1) = extents(r.chunks[1].0, &r.chunks[1].2);
    assert_eq!(r.chunks[1].1, 1);
    let alloc = if id0 == ids[0].0 { &ext0 } else { &ext1 };
    let hydr = if id1 == ids[1].0 { &ext1 } else { &ext0 };
    assert_eq!(alloc, &vec![(65536, 3), (65536, 0), (SIZE - 131072, 3)]);
    assert_eq!(hydr, &vec![(SIZE / 2, 1), (SIZE / 2, 0)]);
    // A 64-bit trim length (above 4 GiB) is checked against the export, not truncated.
    c.request(0, CMD_TRIM, 4, 0, 1 << 33, &[]);
    assert_eq!(c.reply(no_data).error, EINVAL);
    // A payload on a command that takes none (NBD_CMD_FLAG_PAYLOAD_LEN) is skipped and
    // refused; the next request still parses.
    c.request(1 << 5, CMD_BLOCK_STATUS, 5, 0, 16, &[7; 16]);
    assert_eq!(c.reply(no_data).error, EINVAL);
    c.request(0, CMD_FLUSH, 6, 0, 0, &[]);
    assert_eq!(c.reply(no_data).chunks, vec![(0, 1, vec![])]);
}

#[test]
fn compact_block_status_req_one_and_context_ids() {
    let srv = TestServer::start(SIZE);
    let mut c = RawClient::connect(&srv.socket);
    let (_, _, ids) = c.negotiate(true, false, &["clonebd:hydrated"]);
    assert_eq!(ids.len(), 1);
    c.request(1 << 3, CMD_BLOCK_STATUS, 1, 4096, 8192, &[]);
    let r = c.reply(no_data);
    assert_eq!(r.chunks.len(), 1);
    let (ty, flags, p) = &r.chunks[0];
    assert_eq!((*ty, *flags), (5, 1));
    assert_eq!(extents(*ty, p), (ids[0].0, vec![(8192, 1)]));
}

#[test]
fn unknown_options_get_err_unsup_and_negotiation_goes_on() {
    let srv = TestServer::start(SIZE);
    let mut c = RawClient::connect(&srv.socket);
    for (option, len) in [
        (4u32, 0usize),
        (12, 3),
        (0x7fff_ffff, 10),
        (1000, 200 * 1024),
    ] {
        c.send_option(option, &vec![1u8; len]);
        let (o, ty, _) = c.option_reply();
        assert_eq!((o, ty), (option, REP_ERR_UNSUP));
    }
    // STARTTLS is not supported either.
    c.send_option(5, &[]);
    assert_eq!(c.option_reply().1, REP_ERR_UNSUP);
    // An unknown export name is refused, and a known one accepted.
    let mut go = 4u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"nope");
    go.extend_from_slice(&0u16.to_be_bytes());
    c.send_option(OPT_GO, &go);
    assert_eq!(c.option_reply().1, REP_ERR_UNKNOWN);
    let (size, flags, _) = c.negotiate(false, false, &[]);
    assert_eq!(size, SIZE);
    assert_eq!(flags & 1, 1);
}

#[test]
fn list_and_abort() {
    let srv = TestServer::start(SIZE);
    let mut c = RawClient::connect(&srv.socket);
    c.send_option(OPT_LIST, &[]);
    let replies = c.option_replies();
    assert_eq!(replies.len(), 2);
    assert_eq!(replies[0].1, 2);
    assert_eq!(&replies[0].2[4..8], b"disk");
    c.send_option(OPT_ABORT, &[]);
    assert_eq!(c.option_reply().1, REP_ACK);
    assert!(c.closed());
}

#[test]
fn export_name_without_zeroes_enters_transmission() {
    let srv = TestServer::start(SIZE);
    let mut c = RawClient::connect(&srv.socket);
    c.send_option(OPT_EXPORT_NAME, b"");
    let mut b = [0u8; 10];
    std::io::Read::read_exact(&mut c.stream, &mut b).unwrap();
    assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), SIZE);
    c.request(0, CMD_READ, 1, 0, 512, &[]);
    assert_eq!(c.reply(|_| 512).error, 0);
}

#[test]
fn replies_come_out_of_order() {
    let srv = TestServer::start_with(
        SIZE,
        |mut b| {
            b.jitter = Some(Duration::from_millis(300));
            b
        },
        ServerConfig::default(),
    );
    let mut c = structured(&srv);
    // Granule 1 (offset 64 KiB) is slow, granule 0 fast: the second reply overtakes the first.
    // Both in one write: a lone request with nothing behind it may be run inline by the
    // reader, which would read the second only after the first's delay.
    let mut both = c.request_bytes(0, CMD_READ, 1, 65536, 4096, &[]);
    both.extend(c.request_bytes(0, CMD_READ, 2, 0, 4096, &[]));
    c.send(&both);
    assert_eq!(c.reply(no_data).cookie, 2);
    assert_eq!(c.reply(no_data).cookie, 1);
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let backend = std::sync::Arc::new(FileBackend::create(
        &dir.path().join("ro.img"),
        SIZE,
        common::sizes(),
        true,
    ));
    let srv = TestServer::serve(dir, backend, ServerConfig::default());
    let mut c = RawClient::connect(&srv.socket);
    let (_, flags, _) = c.negotiate(false, false, &[]);
    assert_eq!(flags & 2, 2, "READ_ONLY");
    assert_eq!(flags & (1 << 5), 0, "no SEND_TRIM");
    c.request(0, CMD_WRITE, 1, 0, 512, &[1; 512]);
    assert_eq!(c.reply(no_data).error, EPERM);
    c.request(0, CMD_WRITE_ZEROES, 2, 0, 512, &[]);
    assert_eq!(c.reply(no_data).error, EINVAL);
    c.request(0, CMD_READ, 3, 0, 512, &[]);
    assert_eq!(c.reply(|_| 512).error, 0);
}

#[test]
fn connection_limit_closes_extra_connections() {
    let config = ServerConfig {
        max_connections: 1,
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(SIZE, |b| b, config);
    let mut first = RawClient::connect(&srv.socket);
    first.negotiate(false, false, &[]);
    // The server takes the established slot just after its last handshake reply is out:
    // connecting before that would find the slot free.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while srv.server.stats().handshakes == 0 {
        assert!(
            std::time::Instant::now() < until,
            "first handshake never counted"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut extra = std::os::unix::net::UnixStream::connect(&srv.socket).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(
        std::io::Read::read(&mut extra, &mut b),
        Ok(0) | Err(_)
    ));
    assert_eq!(srv.server.stats().rejected_connections, 1);
    first.request(0, CMD_READ, 1, 0, 512, &[]);
    assert_eq!(first.reply(|_| 512).error, 0);
}

#[test]
fn small_inflight_budget_still_serves_a_deep_pipeline() {
    let config = ServerConfig {
        max_inflight_bytes: 64 * 1024,
        max_inflight_requests: 2,
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(SIZE, |b| b, config);
    let mut c = structured(&srv);
    let data = pattern(128 * 1024, 4);
    for i in 0..32u64 {
        c.request(0, CMD_WRITE, i, i * 131072 % SIZE, 131072, &data);
    }
    for _ in 0..32 {
        assert_eq!(c.reply(no_data).error, 0);
    }
    assert!(srv.read_file(131072, 131072) == data);
}

/// Opens the gate when dropped, so a failing test does not leave the server waiting.
struct OpenOnDrop(std::sync::Arc<common::Gate>);

impl OpenOnDrop {
    fn open(&self) {
        self.0.open();
    }
}

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// Start a server whose reads wait at a gate, with the given in-flight limits.
fn gated(max_bytes: usize, max_requests: usize) -> (TestServer, OpenOnDrop) {
    let gate = std::sync::Arc::new(common::Gate::default());
    let config = ServerConfig {
        max_inflight_bytes: max_bytes,
        max_inflight_requests: max_requests,
        ..ServerConfig::default()
    };
    let g = gate.clone();
    let srv = TestServer::start_with(
        SIZE,
        move |mut b| {
            b.gate = Some(g);
            b
        },
        config,
    );
    (srv, OpenOnDrop(gate))
}

#[test]
fn reader_stops_at_the_inflight_request_limit() {
    let (srv, gate) = gated(64 << 20, 2);
    let mut c = structured(&srv);
    for i in 0..6 {
        c.request(0, CMD_READ, i, i * 4096, 4096, &[]);
    }
    std::thread::sleep(Duration::from_millis(300));
    // Two requests reached the backend; the rest wait unread in the socket.
    assert_eq!(
        srv.backend
            .calls
            .reads
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    assert_eq!(srv.server.stats().requests, 2);
    gate.open();
    for _ in 0..6 {
        assert_eq!(c.reply(no_data).error, 0);
    }
    assert_eq!(srv.server.stats().requests, 6);
}

#[test]
fn reader_stops_at_the_inflight_byte_limit() {
    let (srv, gate) = gated(128 * 1024, 256);
    let mut c = structured(&srv);
    for i in 0..4 {
        c.request(0, CMD_READ, i, i * 65536, 65536, &[]);
    }
    std::thread::sleep(Duration::from_millis(300));
    // 128 KiB admits two 64 KiB reads; the third waits for a reply to go out.
    assert_eq!(
        srv.backend
            .calls
            .reads
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    gate.open();
    for _ in 0..4 {
        assert_eq!(c.reply(no_data).error, 0);
    }
}

#[test]
fn shutdown_finishes_requests_in_flight_then_closes() {
    let mut srv = TestServer::start_with(
        SIZE,
        |mut b| {
            b.jitter = Some(Duration::from_millis(300));
            b
        },
        ServerConfig::default(),
    );
    let mut c = structured(&srv);
    c.request(0, CMD_READ, 1, 65536, 4096, &[]);
    // Let the server read the request before shutting down.
    std::thread::sleep(Duration::from_millis(100));
    let stopper = {
        let handle = srv.server.shutdown_handle();
        std::thread::spawn(move || handle.shutdown())
    };
    let r = c.reply(no_data);
    assert_eq!((r.cookie, r.error, r.data.len()), (1, 0, 4096));
    assert!(c.closed());
    stopper.join().unwrap();
    srv.stop();
    assert_eq!(srv.server.stats().active_connections, 0);
    assert!(std::os::unix::net::UnixStream::connect(&srv.socket).is_err());
}

#[test]
fn shutdown_stops_both_accept_loops_when_the_unix_path_is_gone_or_taken() {
    let mut srv = TestServer::start(SIZE);
    // Someone removed our socket file and bound their own at the path: connecting there no
    // longer reaches us, and shutdown must not depend on it.
    std::fs::remove_file(&srv.socket).unwrap();
    let theirs = std::os::unix::net::UnixListener::bind(&srv.socket).unwrap();
    theirs.set_nonblocking(true).unwrap();
    let start = Instant::now();
    let stopper = std::thread::spawn(move || {
        srv.stop();
        srv
    });
    while !stopper.is_finished() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "serve_unix and serve_tcp still running 10 s after shutdown"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let srv = stopper.join().unwrap();
    assert!(
        theirs.accept().is_err(),
        "shutdown connected to the other server's socket"
    );
    assert!(
        std::net::TcpStream::connect(srv.tcp).is_err(),
        "TCP listener still open"
    );
}

/// A 32 MiB write whose payload stops after 1 MiB holds the whole 32 MiB budget; another
/// connection's write waits for it. At the payload deadline the stalled connection is
/// closed and counted, its charge goes back, and the waiting write is answered.
fn stalled_payload_is_closed_at_its_deadline(io_uring: bool) {
    let config = ServerConfig {
        memory_budget: 32 << 20,
        memory_budget_per_peer: 32 << 20,
        payload_timeout: Some(Duration::from_millis(500)),
        io_uring,
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(64 << 20, |b| b, config);
    let mut stalled = RawClient::connect(&srv.socket);
    stalled.negotiate(false, false, &[]);
    let mut header = Vec::new();
    header.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&CMD_WRITE.to_be_bytes());
    header.extend_from_slice(&1u64.to_be_bytes());
    header.extend_from_slice(&0u64.to_be_bytes());
    header.extend_from_slice(&(32u32 << 20).to_be_bytes());
    header.extend_from_slice(&vec![0x5a; 1 << 20]);
    stalled.stream.write_all(&header).unwrap();

    let mut waiting = RawClient::connect(&srv.socket);
    waiting.negotiate(false, false, &[]);
    let data = pattern(4096, 7);
    // Without the deadline this waits for ever (and the read timeout fails the test).
    waiting.request(0, CMD_WRITE, 2, 40 << 20, 4096, &data);
    assert_eq!(waiting.reply(no_data).error, 0);
    assert!(stalled.closed(), "the stalled connection is still open");
    assert_eq!(srv.server.stats().payload_timeouts, 1);
    assert!(srv.read_file(40 << 20, 4096) == data);
}

#[test]
fn stalled_payload_is_closed_at_its_deadline_on_io_uring() {
    stalled_payload_is_closed_at_its_deadline(true);
}

#[test]
fn stalled_payload_is_closed_at_its_deadline_with_threads() {
    stalled_payload_is_closed_at_its_deadline(false);
}

/// A request header as `RawClient::request` sends it, for streams built ahead of sending.
fn request_bytes(
    extended: bool,
    flags: u16,
    ty: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    let magic: u32 = if extended { 0x21e4_1c71 } else { 0x2560_9513 };
    b.extend_from_slice(&magic.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&ty.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    if extended {
        b.extend_from_slice(&len.to_be_bytes());
    } else {
        b.extend_from_slice(&(len as u32).to_be_bytes());
    }
    b
}

/// The replies one driver gives to refused requests whose payloads (256 KiB, more than the
/// io_uring driver's input buffer) arrive in small pieces and are made of valid write
/// requests to a marked offset, followed by a good write and a read. Any driver that read a
/// header from inside a refused payload would run those writes or lose the next request.
fn refused_payloads_in_pieces(io_uring: bool, extended: bool) -> Vec<RawReply> {
    const MARKED: u64 = 1 << 20;
    let config = ServerConfig {
        io_uring,
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(SIZE, |b| b, config);
    let mut c = RawClient::connect(&srv.socket);
    c.negotiate(true, extended, &["base:allocation"]);
    let mut decoy = Vec::new();
    while decoy.len() < 256 << 10 {
        decoy.extend(request_bytes(extended, 0, CMD_WRITE, 99, MARKED, 512));
        decoy.extend_from_slice(&[0xab; 512]);
    }
    decoy.truncate(256 << 10);
    // An unaligned write: EINVAL, its payload dropped.
    let mut stream = request_bytes(extended, 0, CMD_WRITE, 1, 100, decoy.len() as u64);
    stream.extend_from_slice(&decoy);
    if extended {
        // A payload on a block status (NBD_CMD_FLAG_PAYLOAD_LEN, not advertised): EINVAL,
        // the payload dropped.
        stream.extend(request_bytes(true, 1 << 5, CMD_BLOCK_STATUS, 2, 0, 4096));
        stream.extend_from_slice(&decoy[..4096]);
    }
    let data = pattern(4096, 3);
    stream.extend(request_bytes(extended, 0, CMD_WRITE, 3, 8192, 4096));
    stream.extend_from_slice(&data);
    // Pieces that cut headers and payloads at odd places, each sent on its own.
    for piece in stream.chunks(997) {
        c.stream.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_micros(200));
    }
    let mut replies: Vec<RawReply> = (0..if extended { 3 } else { 2 })
        .map(|_| c.reply(no_data))
        .collect();
    replies.sort_by_key(|r| r.cookie);
    c.request(0, CMD_READ, 4, 8192, 4096, &[]);
    let read = c.reply(|_| 4096);
    assert_eq!((read.cookie, read.error), (4, 0));
    assert_eq!(read.data, data);
    replies.push(read);
    assert_eq!(
        srv.read_file(MARKED, 512),
        vec![0; 512],
        "a decoy write ran"
    );
    c.request(0, CMD_DISC, 5, 0, 0, &[]);
    assert!(c.closed());
    assert_eq!(srv.server.stats().protocol_errors, 0);
    replies
}

#[test]
fn a_request_refused_mid_stream_leaves_both_drivers_at_the_same_next_header() {
    for extended in [false, true] {
        let uring = refused_payloads_in_pieces(true, extended);
        let threads = refused_payloads_in_pieces(false, extended);
        let cookies: Vec<u64> = uring.iter().map(|r| r.cookie).collect();
        let errors: Vec<u32> = uring.iter().map(|r| r.error).collect();
        if extended {
            assert_eq!(cookies, [1, 2, 3, 4]);
            assert_eq!(errors, [EINVAL, EINVAL, 0, 0]);
        } else {
            assert_eq!(cookies, [1, 3, 4]);
            assert_eq!(errors, [EINVAL, 0, 0]);
        }
        assert_eq!(uring, threads, "extended headers: {extended}");
    }
}
