//! One connection: the handshake, then the transmission phase on one of its two drivers.
//!
//! The connection's thread drives the [`Handshake`] over the socket within the handshake's
//! deadline (each read and write is given only the time left, so a client that sends a byte
//! now and then cannot stretch it), then trades its handshake slot for an established one
//! (see [`crate::admission`]) and hands the socket to a driver of the
//! [`Transmission`](crate::transmission::Transmission) machine: [`ring`] (io_uring, on this
//! thread) with [`ServerConfig::io_uring`](crate::ServerConfig::io_uring) where io_uring can
//! be set up, else [`threads`] (this thread reads, a writer thread sends).
//!
//! With [`ServerConfig::tls`](crate::ServerConfig::tls) the handshake requires TLS: once
//! `NBD_OPT_STARTTLS` is acknowledged the socket goes to the [`ServerTls`] hook, which runs
//! the TLS handshake within the time left of the handshake's deadline and returns a unix
//! stream carrying the plaintext; the rest of the handshake and the transmission phase run
//! on that stream, always with threads (io_uring cannot run TLS on the socket). The hook's
//! relay ends when the connection closes its stream (sending TLS's close_notify first), and
//! must bound its own sends to the network.

use std::io::{self, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admission::HandshakeSlot;
use crate::client::Socket;
use crate::codec::TransmissionParams;
use crate::config::ServerTls;
use crate::exec::{ConnSetup, Job};
use crate::handshake::{Handshake, HandshakeError, Negotiated, Status};
use crate::pool::JobQueue;
use crate::shared::{Counters, Inner};
use crate::stream::{Stream, timed_out};
use crate::{ring, threads};

/// Serve one connection to its end: the handshake (holding `slot`, by `deadline`), then, in
/// an established slot, the transmission phase.
pub(crate) fn run(
    inner: &Arc<Inner>,
    jobs: &Arc<JobQueue<Job>>,
    id: u64,
    stream: Stream,
    slot: HandshakeSlot,
    peer: Option<IpAddr>,
    deadline: Option<Instant>,
) {
    let (read_half, mut write_half) = match stream.try_clone() {
        Ok(r) => (r, stream),
        Err(err) => {
            tracing::warn!(id, %err, "cannot clone connection socket");
            return;
        }
    };
    let mut reader = BufReader::with_capacity(64 * 1024, read_half);
    let result = handshake(inner, &mut reader, &mut write_half, deadline);
    serve_negotiated(inner, jobs, id, result, reader, write_half, slot, peer);
}

#[allow(clippy::too_many_arguments)]
fn serve_negotiated(
    inner: &Arc<Inner>,
    jobs: &Arc<JobQueue<Job>>,
    id: u64,
    result: Result<Option<(Negotiated, bool)>, HandshakeEnd>,
    reader: BufReader<Stream>,
    write_half: Stream,
    slot: HandshakeSlot,
    peer: Option<IpAddr>,
) {
    let (negotiated, over_tls) = match result {
        Ok(Some(n)) => n,
        Ok(None) => {
            tracing::debug!(id, "client ended the handshake");
            return;
        }
        Err(HandshakeEnd::Protocol(err)) => {
            Counters::add(&inner.counters.protocol_errors, 1);
            tracing::warn!(id, %err, "handshake failed");
            return;
        }
        Err(HandshakeEnd::Io(err)) => {
            tracing::debug!(id, %err, "connection lost during handshake");
            return;
        }
        Err(HandshakeEnd::Tls(err)) => {
            Counters::add(&inner.counters.protocol_errors, 1);
            tracing::warn!(id, %err, "TLS handshake failed");
            return;
        }
        Err(HandshakeEnd::Deadline) => {
            inner.handshake_expired(peer);
            return;
        }
    };
    let established = match slot.establish() {
        Ok(slot) => slot,
        Err(why) => {
            inner.refused(why, peer);
            return;
        }
    };
    Counters::add(&inner.counters.handshakes, 1);
    tracing::debug!(id, style = ?negotiated.style, contexts = negotiated.meta_contexts.len(), "transmission");
    // The socket's timeouts are shared by both halves: neither applies from here on.
    let _ = reader.get_ref().set_read_timeout(None);
    let _ = write_half.set_write_timeout(None);
    let setup = ConnSetup {
        inner: Arc::clone(inner),
        jobs: Arc::clone(jobs),
        peer,
        params: transmission_params(inner, &negotiated),
        contexts: negotiated.meta_contexts,
    };
    transmission(setup, id, reader, write_half, over_tls);
    drop(established);
}

enum HandshakeEnd {
    Protocol(HandshakeError),
    Io(io::Error),
    /// The TLS handshake failed (a certificate refused, not TLS at all).
    Tls(io::Error),
    /// The handshake's deadline passed.
    Deadline,
}

/// The time left before `deadline`, as a socket timeout (`None`: no deadline).
fn time_left(deadline: Option<Instant>) -> Result<Option<Duration>, HandshakeEnd> {
    let Some(d) = deadline else {
        return Ok(None);
    };
    let left = d.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(HandshakeEnd::Deadline);
    }
    Ok(Some(left))
}

/// Fill `buf` from the socket by `deadline`: each read may wait only for the time left.
fn read_by(
    reader: &mut BufReader<Stream>,
    buf: &mut [u8],
    deadline: Option<Instant>,
) -> Result<(), HandshakeEnd> {
    let mut filled = 0;
    while filled < buf.len() {
        if reader.buffer().is_empty() {
            let left = time_left(deadline)?;
            reader
                .get_ref()
                .set_read_timeout(left)
                .map_err(HandshakeEnd::Io)?;
        }
        match reader.read(&mut buf[filled..]) {
            Ok(0) => return Err(HandshakeEnd::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => return Err(HandshakeEnd::Deadline),
            Err(e) => return Err(HandshakeEnd::Io(e)),
        }
    }
    Ok(())
}

/// Write `data` to the socket by `deadline` (a client that does not read its replies cannot
/// hold the handshake open either).
fn write_by(
    writer: &mut Stream,
    data: &[u8],
    deadline: Option<Instant>,
) -> Result<(), HandshakeEnd> {
    let mut sent = 0;
    while sent < data.len() {
        writer
            .set_write_timeout(time_left(deadline)?)
            .map_err(HandshakeEnd::Io)?;
        match writer.write(&data[sent..]) {
            Ok(0) => return Err(HandshakeEnd::Io(io::ErrorKind::WriteZero.into())),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => return Err(HandshakeEnd::Deadline),
            Err(e) => return Err(HandshakeEnd::Io(e)),
        }
    }
    Ok(())
}

/// The handshake; the negotiated connection, and whether it runs over TLS (the streams are
/// then the plaintext ends of the TLS relay).
fn handshake(
    inner: &Inner,
    reader: &mut BufReader<Stream>,
    writer: &mut Stream,
    deadline: Option<Instant>,
) -> Result<Option<(Negotiated, bool)>, HandshakeEnd> {
    let mut hs = match &inner.config.tls {
        Some(_) => Handshake::with_tls(inner.export.clone()),
        None => Handshake::new(inner.export.clone()),
    };
    let mut buf = Vec::new();
    loop {
        if !hs.output().is_empty() {
            write_by(writer, hs.output(), deadline)?;
            hs.consume_output(hs.output().len());
        }
        match hs.status() {
            Status::Negotiating => {}
            Status::StartTls => {
                let Some(tls) = &inner.config.tls else {
                    // The machine asks for TLS only when made with it.
                    return Err(HandshakeEnd::Protocol(HandshakeError::Finished));
                };
                start_tls(tls, reader, writer, deadline)?;
                hs.tls_started();
                continue;
            }
            Status::Transmission(n) => return Ok(Some((n.clone(), hs.tls_active()))),
            Status::Aborted => return Ok(None),
            Status::Failed(err) => return Err(HandshakeEnd::Protocol(err.clone())),
        }
        // `wanted` is at most 64 KiB.
        buf.resize(hs.wanted(), 0);
        read_by(reader, &mut buf, deadline)?;
        if let Err(err) = hs.feed(&buf) {
            return Err(HandshakeEnd::Protocol(err));
        }
    }
}

/// Hands the socket to the TLS hook (once `NBD_REP_ACK` to `NBD_OPT_STARTTLS` is out) and
/// puts the plaintext stream it returns in place of both halves.
fn start_tls(
    tls: &ServerTls,
    reader: &mut BufReader<Stream>,
    writer: &mut Stream,
    deadline: Option<Instant>,
) -> Result<(), HandshakeEnd> {
    // "After an `NBD_REP_ACK` reply has been sent ... all further data MUST be sent and
    // received over TLS": a client that sent more before reading the reply has sent it in
    // the clear, or sent TLS before it was agreed.
    if !reader.buffer().is_empty() {
        return Err(HandshakeEnd::Tls(io::Error::new(
            io::ErrorKind::InvalidData,
            "client sent data before the reply to NBD_OPT_STARTTLS",
        )));
    }
    let left = time_left(deadline)?;
    let socket = match writer.try_clone().map_err(HandshakeEnd::Io)? {
        Stream::Tcp(s) => Socket::Tcp(s),
        Stream::Unix(s) => Socket::Unix(s),
    };
    let plain = match (tls.0)(socket, left) {
        Ok(plain) => plain,
        Err(e) if timed_out(&e) => return Err(HandshakeEnd::Deadline),
        Err(e) => return Err(HandshakeEnd::Tls(e)),
    };
    let read_half = plain.try_clone().map_err(HandshakeEnd::Io)?;
    *reader = BufReader::with_capacity(64 * 1024, Stream::Unix(read_half));
    *writer = Stream::Unix(plain);
    Ok(())
}

/// What the connection's requests are checked against.
fn transmission_params(inner: &Inner, n: &Negotiated) -> TransmissionParams {
    let export = &inner.export;
    TransmissionParams {
        style: n.style,
        size: export.size,
        min_block: export.block_sizes.minimum,
        max_payload: export.block_sizes.maximum,
        transmission_flags: n.transmission_flags,
        has_meta_contexts: !n.meta_contexts.is_empty(),
    }
}

/// The transmission phase, on the io_uring driver where it can run, else with threads.
fn transmission(
    setup: ConnSetup,
    id: u64,
    reader: BufReader<Stream>,
    write_half: Stream,
    over_tls: bool,
) {
    let inner = Arc::clone(&setup.inner);
    let closer = write_half.try_clone().ok();
    // Over TLS the socket carries records, not requests: io_uring cannot serve it.
    let uring = if inner.config.io_uring && !over_tls {
        match ring::new_ring(&inner.config) {
            Ok(r) => Some(r),
            Err(err) => {
                tracing::debug!(id, %err, "io_uring unavailable; serving with threads");
                None
            }
        }
    } else {
        None
    };
    let result = match uring {
        Some(uring) => {
            drop(write_half);
            let leftover = reader.buffer().to_vec();
            ring::serve(setup, uring, reader.into_inner(), &leftover)
        }
        None => threads::serve(setup, id, reader, write_half),
    };
    if let Err(err) = result {
        Counters::add(&inner.counters.protocol_errors, 1);
        tracing::warn!(id, %err, "closing connection after a protocol error");
    }
    if let Some(s) = closer {
        let _ = s.shutdown(Shutdown::Both);
    }
    tracing::debug!(id, "connection closed");
}
