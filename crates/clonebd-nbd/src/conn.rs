//! One connection: the handshake, the request reader, the reply writer, and request execution.
//!
//! The reader thread drives the [`Handshake`] over the socket within the handshake's
//! deadline (each read and write is given only the time left, so a client that sends a byte
//! now and then cannot stretch it), then trades its handshake slot for an established one
//! (see [`crate::admission`]) and decodes requests with the codec. A request to execute is
//! admitted by the connection's [`ConnAdmission`] (its own in-flight bound, then the memory
//! budget shared by all connections; the reader waits for either before reading any
//! payload), its write payload is read into a pooled buffer within the payload deadline
//! (each read that waits on the socket given only the time left), and it is queued for the
//! worker pool. A rejected
//! request has its payload skipped and its error reply queued directly. A read or write that
//! arrives alone (nothing else in flight, nothing more buffered) runs on the reader thread
//! itself. Workers call the [`Backend`](crate::Backend) and write the reply frame themselves
//! when the socket's write half is free, else hand it to the connection's writer thread, which
//! gathers what queues up into one vectored write. Every frame (header and data) goes out in
//! one locked write, so frames never interleave, and must be taken by the client within the
//! payload deadline (the socket's send timeout; see `write_frames`); a write or a payload
//! past it closes the connection. The reader holds no lock while reading the socket; the
//! budget lock is taken only to count.
//!
//! With [`ServerConfig::io_uring`](crate::ServerConfig::io_uring) the transmission phase runs
//! in [`ring`] instead, on the same thread, and shares the request execution here.
//!
//! With [`ServerConfig::tls`](crate::ServerConfig::tls) the handshake requires TLS: once
//! `NBD_OPT_STARTTLS` is acknowledged the socket goes to the [`ServerTls`] hook, which runs
//! the TLS handshake within the time left of the handshake's deadline and returns a unix
//! stream carrying the plaintext; the rest of the handshake and the transmission phase run
//! on that stream, always with threads (io_uring cannot run TLS on the socket). The hook's
//! relay ends when the connection closes its stream (sending TLS's close_notify first), and
//! must bound its own sends to the network.

use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread;
use std::time::{Duration, Instant};

use crate::admission::{ConnAdmission, Direction, Expired, HandshakeSlot, Transfer, Wait};
use crate::backend::{Extent, NbdError, ZeroFlags};
use crate::client::Socket;
use crate::codec::{
    DecodeError, Disposition, ReplyHeader, ReplyTo, RequestHeader, TransmissionParams,
    encode_block_status, error_message,
};
use crate::handshake::{Handshake, HandshakeError, MetaContext, Negotiated, Status};
use crate::pool::{Buf, JobQueue};
use crate::proto::{Command, HeaderStyle, MAX_EXTENTS, command_flags as cf};
use crate::ring::{self, RingLink};
use crate::server::{Counters, Inner, ServerTls};

/// A connected socket of either family.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub(crate) fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
            Self::Unix(s) => Self::Unix(s.try_clone()?),
        })
    }

    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.shutdown(how),
            Self::Unix(s) => s.shutdown(how),
        }
    }

    /// The peer's IP address (IPv4-mapped addresses as IPv4); `None` for a unix socket.
    pub(crate) fn peer_ip(&self) -> Option<IpAddr> {
        match self {
            Self::Tcp(s) => s.peer_addr().ok().map(|a| a.ip().to_canonical()),
            Self::Unix(_) => None,
        }
    }

    pub(crate) fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_read_timeout(timeout),
            Self::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    pub(crate) fn set_write_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_write_timeout(timeout),
            Self::Unix(s) => s.set_write_timeout(timeout),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Tcp(s) => s.as_fd(),
            Self::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write_vectored(bufs),
            Self::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What follows a reply header on the wire.
#[derive(Debug)]
pub(crate) enum Body {
    None,
    /// An error message for a structured error chunk.
    Message(&'static str),
    /// Read data.
    Pooled(Buf),
    /// Block status chunks, headers included.
    Owned(Vec<u8>),
}

/// One complete reply, written in one go.
#[derive(Debug)]
pub(crate) struct ReplyFrame {
    pub(crate) head: Option<ReplyHeader>,
    pub(crate) body: Body,
    /// In-flight budget the request took, given back once the frame is out.
    pub(crate) cost: usize,
    pub(crate) error: bool,
}

impl ReplyFrame {
    pub(crate) fn ok(head: ReplyHeader, cost: usize) -> Self {
        Self {
            head: Some(head),
            body: Body::None,
            cost,
            error: false,
        }
    }

    pub(crate) fn error(
        style: HeaderStyle,
        h: &RequestHeader,
        error: NbdError,
        cost: usize,
    ) -> Self {
        let message = error_message(message(error));
        let head = ReplyHeader::error(style, h.cookie, h.offset, error.to_wire(), message);
        let body = if style == HeaderStyle::Simple {
            Body::None
        } else {
            Body::Message(message)
        };
        Self {
            head: Some(head),
            body,
            cost,
            error: true,
        }
    }
}

/// A human-readable message for an error reply.
fn message(error: NbdError) -> &'static str {
    match error {
        NbdError::Io => "input/output error",
        NbdError::Permission => "operation not permitted on this export",
        NbdError::NoMemory => "out of memory",
        NbdError::Invalid => "invalid request for this export",
        NbdError::NoSpace => "no space left, or request beyond the end of the export",
        NbdError::Overflow => "request too large",
        NbdError::NotSupported => "operation not supported",
        NbdError::Shutdown => "server is shutting down",
    }
}

enum Outgoing {
    Reply(ReplyFrame),
    Close,
}

#[derive(Debug)]
struct Inflight {
    admission: ConnAdmission,
    /// Threads waiting on `room`; a release wakes them only if there are any, since every
    /// notification is a system call.
    waiting: usize,
}

/// State of one connection in the transmission phase, shared by its reader, its writer and the
/// workers running its requests. A connection served through io_uring (see [`ring`]) has no
/// reader or writer thread and uses only `inner`, `params`, `contexts` and `ring`; replies of
/// its worker jobs go to its thread through the [`RingLink`].
pub(crate) struct Conn {
    pub(crate) inner: Arc<Inner>,
    /// The peer's IP address (`None`: a unix socket).
    pub(crate) peer: Option<IpAddr>,
    pub(crate) params: TransmissionParams,
    contexts: Vec<MetaContext>,
    ring: Option<RingLink>,
    replies: Sender<Outgoing>,
    /// The socket's write half, locked for each write by the writer thread, the workers, and
    /// the reader when it runs a request itself (see [`Conn::admit`]).
    out: Mutex<Stream>,
    inflight: Mutex<Inflight>,
    room: Condvar,
    broken: AtomicBool,
}

impl Conn {
    /// Wait until the request is admitted (see [`ConnAdmission::try_admit`]), then take its
    /// share. Returns whether nothing else was in flight: then every earlier reply has been
    /// written, and the writer thread is idle. `None`: the connection is closing (shutdown,
    /// or a broken socket) while it waited for the shared budget.
    fn admit(&self, cost: usize) -> Option<bool> {
        let mut f = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        let mut counted = false;
        loop {
            match f.admission.try_admit(cost, None) {
                Ok(alone) => return Some(alone),
                Err(Wait::Connection) => {
                    // Our own replies release this: they always go out (or fail).
                    f.waiting += 1;
                    f = self.room.wait(f).unwrap_or_else(PoisonError::into_inner);
                    f.waiting -= 1;
                }
                Err(Wait::Budget(seen)) => {
                    // Other connections release this, maybe never: look at shutdown and at
                    // the socket now and then. Nothing of this request is read yet.
                    let budget = Arc::clone(f.admission.budget());
                    drop(f);
                    if !counted {
                        self.inner.budget_wait(self.peer, cost);
                        counted = true;
                    }
                    if self.inner.shutting_down() || self.broken.load(Ordering::Acquire) {
                        return None;
                    }
                    budget.wait_budget(seen, BUDGET_RECHECK);
                    f = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
    }

    /// Count an error reply sent before the connection closes, whatever the bounds.
    fn admit_final(&self) {
        self.inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admission
            .take_free();
    }

    fn release(&self, cost: usize) {
        let mut f = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        f.admission.release(1, cost);
        let wake = f.waiting > 0;
        drop(f);
        if wake {
            self.room.notify_all();
        }
    }

    fn wait_idle(&self) {
        let mut f = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        while f.admission.count() > 0 {
            f.waiting += 1;
            f = self.room.wait(f).unwrap_or_else(PoisonError::into_inner);
            f.waiting -= 1;
        }
    }

    /// Write a reply from the calling thread and give back its budget.
    fn write_now(&self, frame: ReplyFrame) {
        let out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        self.write_with(out, frame);
    }

    /// Write a reply from a worker: itself if the socket is free, else through the writer
    /// thread (which gathers what queues up into one system call). Writing here spares a
    /// thread hand-off per request.
    fn reply(&self, frame: ReplyFrame) {
        if let Some(link) = &self.ring {
            link.push(frame);
            return;
        }
        match self.out.try_lock() {
            Ok(out) => self.write_with(out, frame),
            Err(TryLockError::Poisoned(p)) => self.write_with(p.into_inner(), frame),
            Err(TryLockError::WouldBlock) => self.send(frame),
        }
    }

    fn write_with(&self, mut out: MutexGuard<'_, Stream>, frame: ReplyFrame) {
        let counters = &self.inner.counters;
        if !self.broken.load(Ordering::Acquire) {
            let written = write_frames(&self.inner, &mut out, std::slice::from_ref(&frame));
            self.written(&mut out, written);
        }
        drop(out);
        if frame.error {
            Counters::add(&counters.request_errors, 1);
        }
        self.release(frame.cost);
    }

    /// Count what a reply write sent, or break the connection if it failed (a write past
    /// the payload deadline counted as such).
    fn written(&self, out: &mut Stream, written: io::Result<usize>) {
        match written {
            Ok(n) => Counters::add(&self.inner.counters.bytes_sent, n as u64),
            Err(err) => {
                if timed_out(&err) {
                    self.inner.payload_expired(self.peer, Direction::Replies);
                } else {
                    tracing::debug!(%err, "reply write failed; closing connection");
                }
                self.broken.store(true, Ordering::Release);
                // Wake the reader; replies still in flight are dropped.
                let _ = out.shutdown(Shutdown::Both);
            }
        }
    }

    fn send(&self, frame: ReplyFrame) {
        let cost = frame.cost;
        if self.replies.send(Outgoing::Reply(frame)).is_err() {
            // The writer is gone (it only leaves after `Close`): nothing will release this.
            self.release(cost);
        }
    }
}

/// A request for the worker pool.
pub(crate) struct Job {
    pub(crate) conn: Arc<Conn>,
    pub(crate) header: RequestHeader,
    pub(crate) payload: Option<Buf>,
    pub(crate) cost: usize,
}

/// A worker thread: run jobs until the queue closes.
pub(crate) fn worker(jobs: &JobQueue<Job>) {
    while let Some(job) = jobs.pop() {
        let frame = run_job(&job);
        job.conn.reply(frame);
    }
}

/// Run a request, answering `NBD_EIO` if the backend panics.
pub(crate) fn run_job(job: &Job) -> ReplyFrame {
    catch_unwind(AssertUnwindSafe(|| execute(job))).unwrap_or_else(|_| {
        tracing::error!("backend panicked; answering EIO");
        ReplyFrame::error(job.conn.params.style, &job.header, NbdError::Io, job.cost)
    })
}

fn execute(job: &Job) -> ReplyFrame {
    let conn = &job.conn;
    let h = &job.header;
    let style = conn.params.style;
    let backend = conn.inner.backend.as_ref();
    let fua = h.flags & cf::FUA != 0;
    let done = || ReplyFrame::ok(ReplyHeader::done(style, h.cookie, h.offset), job.cost);
    let result = match h.command {
        Command::Read => {
            // Lengths were checked against the 32 MiB cap.
            let mut buf = conn.inner.buffers.get(h.length as usize);
            backend
                .read(h.offset, buf.as_mut_slice())
                .map(|()| ReplyFrame {
                    head: Some(ReplyHeader::read_data(style, h.cookie, h.offset, h.length)),
                    body: Body::Pooled(buf),
                    cost: job.cost,
                    error: false,
                })
        }
        Command::Write => {
            let data = job.payload.as_ref().map_or(&[][..], Buf::as_slice);
            backend.write(h.offset, data, fua).map(|()| done())
        }
        Command::Flush => backend.flush().map(|()| done()),
        Command::Trim => backend.trim(h.offset, h.length, fua).map(|()| done()),
        Command::WriteZeroes => {
            let flags = ZeroFlags {
                fua,
                no_hole: h.flags & cf::NO_HOLE != 0,
                fast_zero: h.flags & cf::FAST_ZERO != 0,
            };
            backend
                .write_zeroes(h.offset, h.length, flags)
                .map(|()| done())
        }
        Command::Cache => backend.cache(h.offset, h.length).map(|()| done()),
        Command::BlockStatus => block_status(conn, h, job.cost),
        Command::Disc | Command::Unknown(_) => Err(NbdError::Invalid),
    };
    result.unwrap_or_else(|e| ReplyFrame::error(style, h, e, job.cost))
}

/// Keep the extents a reply may carry: nonzero, covering at most `limit` bytes, one only with
/// `NBD_CMD_FLAG_REQ_ONE` ("every reply chunk MUST contain exactly one descriptor, and that
/// descriptor MUST NOT exceed the *length* of the original request").
fn clip_extents(extents: &mut Vec<Extent>, limit: u64, req_one: bool) -> Result<(), NbdError> {
    if extents.is_empty() || extents.iter().any(|e| e.length == 0) {
        tracing::error!("backend returned an empty block status or a zero-length extent");
        return Err(NbdError::Io);
    }
    let max = if req_one { 1 } else { MAX_EXTENTS };
    let mut covered = 0u64;
    let mut keep = 0;
    for e in extents.iter_mut().take(max) {
        keep += 1;
        if e.length >= limit - covered {
            e.length = limit - covered;
            break;
        }
        covered += e.length;
    }
    extents.truncate(keep);
    Ok(())
}

/// "the server MUST use a structured reply, containing exactly one chunk of type
/// `NBD_REPLY_TYPE_BLOCK_STATUS` per selected context id".
fn block_status(conn: &Conn, h: &RequestHeader, cost: usize) -> Result<ReplyFrame, NbdError> {
    let p = &conn.params;
    // Checked: offset + length <= size and length > 0.
    let limit = h.length.min(p.size - h.offset);
    let req_one = h.flags & cf::REQ_ONE != 0;
    let mut body = Vec::new();
    let last = conn.contexts.len().saturating_sub(1);
    for (i, ctx) in conn.contexts.iter().enumerate() {
        let mut extents = conn
            .inner
            .backend
            .block_status(&ctx.name, h.offset, limit)?;
        clip_extents(&mut extents, limit, req_one)?;
        let to = ReplyTo {
            style: p.style,
            cookie: h.cookie,
            offset: h.offset,
        };
        encode_block_status(to, ctx.id, &extents, i == last, p.min_block, &mut body);
    }
    Ok(ReplyFrame {
        head: None,
        body: Body::Owned(body),
        cost,
        error: false,
    })
}

/// How long a reader waiting for the shared budget sleeps before it looks again at shutdown
/// and at its socket (a release wakes it sooner).
const BUDGET_RECHECK: Duration = Duration::from_millis(500);

/// Serve one connection to its end: the handshake (holding `slot`, by `deadline`), then, in
/// an established slot, the transmission phase.
pub(crate) fn run(
    inner: &Arc<Inner>,
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
    serve_negotiated(inner, id, result, reader, write_half, slot, peer);
}

fn serve_negotiated(
    inner: &Arc<Inner>,
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
    transmission(inner, id, negotiated, reader, write_half, peer, over_tls);
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

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
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

fn transmission(
    inner: &Arc<Inner>,
    id: u64,
    n: Negotiated,
    mut reader: BufReader<Stream>,
    write_half: Stream,
    peer: Option<IpAddr>,
    over_tls: bool,
) {
    let export = &inner.export;
    let params = TransmissionParams {
        style: n.style,
        size: export.size,
        min_block: export.block_sizes.minimum,
        max_payload: export.block_sizes.maximum,
        transmission_flags: n.transmission_flags,
        has_meta_contexts: !n.meta_contexts.is_empty(),
    };
    let closer = write_half.try_clone().ok();
    let (tx, rx) = mpsc::channel();
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
    let (uring, link) = match uring {
        Some((r, waker)) => (Some(r), Some(RingLink::new(waker))),
        None => (None, None),
    };
    let conn = Arc::new(Conn {
        inner: Arc::clone(inner),
        peer,
        params,
        contexts: n.meta_contexts,
        ring: link,
        replies: tx,
        out: Mutex::new(write_half),
        inflight: Mutex::new(Inflight {
            admission: inner.conn_admission(peer),
            waiting: 0,
        }),
        room: Condvar::new(),
        broken: AtomicBool::new(false),
    });
    if let (Some(uring), Some(link)) = (uring, &conn.ring) {
        drop(rx);
        let leftover = reader.buffer().to_vec();
        let sock = Arc::new(reader.into_inner());
        let admission = inner.conn_admission(peer);
        if let Err(err) = ring::serve(&conn, link, uring, sock, &leftover, admission) {
            Counters::add(&inner.counters.protocol_errors, 1);
            tracing::warn!(id, %err, "closing connection after a protocol error");
        }
        if let Some(s) = closer {
            let _ = s.shutdown(Shutdown::Both);
        }
        tracing::debug!(id, "connection closed");
        return;
    }
    // Every reply write is bounded by the payload deadline (see `write_frames`).
    let send_timeout = conn
        .out
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .set_write_timeout(inner.payload_deadline().timeout());
    if let Err(err) = send_timeout {
        tracing::warn!(id, %err, "cannot set the socket's send timeout; closing connection");
        return;
    }
    let writer = thread::Builder::new()
        .name(format!("nbd-write-{id}"))
        .spawn({
            let conn = Arc::clone(&conn);
            move || write_loop(&conn, &rx)
        });
    let writer = match writer {
        Ok(w) => w,
        Err(err) => {
            tracing::warn!(id, %err, "cannot start the writer thread");
            return;
        }
    };
    if let Err(err) = read_loop(&conn, &mut reader) {
        Counters::add(&inner.counters.protocol_errors, 1);
        tracing::warn!(id, %err, "closing connection after a protocol error");
    }
    // "The server MUST handle all outstanding requests ... and close the TCP session."
    conn.wait_idle();
    let _ = conn.replies.send(Outgoing::Close);
    let _ = writer.join();
    if let Some(s) = closer {
        let _ = s.shutdown(Shutdown::Both);
    }
    tracing::debug!(id, "connection closed");
}

/// Read and dispatch requests until the client disconnects, the stream breaks or a protocol
/// error makes the stream unusable.
fn read_loop(conn: &Arc<Conn>, reader: &mut BufReader<Stream>) -> Result<(), DecodeError> {
    let inner = &conn.inner;
    let style = conn.params.style;
    let mut header_buf = [0u8; 32];
    let header = &mut header_buf[..style.request_len()];
    // The socket has a receive timeout, left by the last payload read.
    let mut timed = false;
    loop {
        if conn.broken.load(Ordering::Acquire) {
            return Ok(());
        }
        // Between requests a client may be idle as long as it likes.
        if timed && reader.buffer().len() < header.len() {
            if reader.get_ref().set_read_timeout(None).is_err() {
                return Ok(());
            }
            timed = false;
        }
        if reader.read_exact(header).is_err() {
            return Ok(());
        }
        let h = RequestHeader::parse(style, header)?;
        let disposition = match conn.params.check(&h) {
            Ok(d) => d,
            Err(DecodeError::PayloadTooLarge(h)) => {
                // Answer, so the client learns why, then close: the payload is not read.
                conn.admit_final();
                conn.send(ReplyFrame::error(style, &h, NbdError::Invalid, 0));
                return Err(DecodeError::PayloadTooLarge(h));
            }
            Err(err) => return Err(err),
        };
        match disposition {
            Disposition::Disconnect => return Ok(()),
            Disposition::Reject { error, skip } => {
                Counters::add(&inner.counters.requests, 1);
                // Nothing is charged for it: no deadline.
                if timed {
                    if reader.get_ref().set_read_timeout(None).is_err() {
                        return Ok(());
                    }
                    timed = false;
                }
                // Keep the stream in step: drop exactly the declared payload.
                let skipped = io::copy(&mut reader.by_ref().take(u64::from(skip)), &mut io::sink());
                if !matches!(skipped, Ok(n) if n == u64::from(skip)) {
                    return Ok(());
                }
                if conn.admit(0).is_none() {
                    return Ok(());
                }
                conn.send(ReplyFrame::error(style, &h, error, 0));
            }
            Disposition::Execute => {
                let cost = match h.command {
                    // Lengths of reads and writes were checked against the 32 MiB cap.
                    Command::Read | Command::Write => h.length as usize,
                    _ => 0,
                };
                // Past either bound the reader waits here, before reading any payload.
                let Some(alone) = conn.admit(cost) else {
                    return Ok(());
                };
                Counters::add(&inner.counters.requests, 1);
                let mut payload = None;
                if h.command == Command::Write {
                    // The payload deadline runs from here, the charge taken.
                    let transfer = inner.payload_deadline().start(Instant::now());
                    let mut buf = inner.buffers.get(cost);
                    let read = read_payload(reader, buf.as_mut_slice(), transfer, &mut timed);
                    if let Err(end) = read {
                        // Given back at once, so that connections waiting for it go on.
                        conn.release(cost);
                        if matches!(end, PayloadEnd::Expired) {
                            inner.payload_expired(conn.peer, Direction::Payload);
                        }
                        return Ok(());
                    }
                    Counters::add(&inner.counters.bytes_received, cost as u64);
                    payload = Some(buf);
                }
                let job = Job {
                    conn: Arc::clone(conn),
                    header: h,
                    payload,
                    cost,
                };
                // A read or write with nothing else in flight and no next request already
                // received: the client is waiting for this one reply. Run it here and answer
                // it from here, sparing two thread hand-offs (to a worker, then to the writer)
                // on the latency path. A client that keeps several requests in flight still
                // gets the worker pool, and so do flushes, which may wait for a commit.
                let quick = matches!(h.command, Command::Read | Command::Write);
                if quick && alone && reader.buffer().is_empty() {
                    conn.write_now(run_job(&job));
                    continue;
                }
                if let Err(job) = inner.jobs.push(job) {
                    conn.send(ReplyFrame::error(
                        style,
                        &job.header,
                        NbdError::Shutdown,
                        cost,
                    ));
                }
            }
        }
    }
}

/// Why a write's payload was not received whole.
enum PayloadEnd {
    /// The stream ended or failed.
    Lost,
    /// The payload deadline passed.
    Expired,
}

/// Fill `buf` with a write's payload within `transfer`'s deadline: each read that has to
/// wait for the socket may wait only for the time left (the receive timeout is set then,
/// and `timed` records it), so a client that sends a byte now and then cannot stretch it.
fn read_payload(
    reader: &mut BufReader<Stream>,
    buf: &mut [u8],
    transfer: Transfer,
    timed: &mut bool,
) -> Result<(), PayloadEnd> {
    let mut filled = 0;
    while filled < buf.len() {
        if reader.buffer().is_empty() {
            match transfer.left(Instant::now()) {
                Ok(None) => {}
                Ok(left) => {
                    reader
                        .get_ref()
                        .set_read_timeout(left)
                        .map_err(|_| PayloadEnd::Lost)?;
                    *timed = true;
                }
                Err(Expired) => return Err(PayloadEnd::Expired),
            }
        }
        match reader.read(&mut buf[filled..]) {
            Ok(0) => return Err(PayloadEnd::Lost),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => return Err(PayloadEnd::Expired),
            Err(_) => return Err(PayloadEnd::Lost),
        }
    }
    Ok(())
}

/// Frames gathered into one vectored write.
const BATCH: usize = 16;

fn write_loop(conn: &Conn, rx: &Receiver<Outgoing>) {
    let counters = &conn.inner.counters;
    let mut batch: Vec<ReplyFrame> = Vec::with_capacity(BATCH);
    let mut closing = false;
    while !closing {
        match rx.recv() {
            Ok(Outgoing::Reply(frame)) => batch.push(frame),
            Ok(Outgoing::Close) | Err(_) => break,
        }
        // Take whatever else is ready so that several replies share one system call.
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(Outgoing::Reply(frame)) => batch.push(frame),
                Ok(Outgoing::Close) => {
                    closing = true;
                    break;
                }
                Err(_) => break,
            }
        }
        if !conn.broken.load(Ordering::Acquire) {
            let mut stream = conn.out.lock().unwrap_or_else(PoisonError::into_inner);
            let written = write_frames(&conn.inner, &mut stream, &batch);
            conn.written(&mut stream, written);
        }
        for frame in batch.drain(..) {
            if frame.error {
                Counters::add(&counters.request_errors, 1);
            }
            conn.release(frame.cost);
        }
    }
}

/// Write the frames with as few `writev` calls as the socket allows, within the payload
/// deadline (one transfer): the socket's send timeout is the whole deadline (set once for
/// the connection), which bounds the first call; only when the socket takes part of the
/// frames is it cut to the time left, and set back after. A write past the deadline fails
/// as timed out.
fn write_frames(inner: &Inner, stream: &mut Stream, frames: &[ReplyFrame]) -> io::Result<usize> {
    let mut slices: [IoSlice<'_>; 2 * BATCH] = std::array::from_fn(|_| IoSlice::new(&[]));
    let mut n = 0;
    for frame in frames {
        if let Some(head) = &frame.head {
            slices[n] = IoSlice::new(head.as_bytes());
            n += 1;
        }
        let body: &[u8] = match &frame.body {
            Body::None => &[],
            Body::Message(m) => m.as_bytes(),
            Body::Pooled(buf) => buf.as_slice(),
            Body::Owned(v) => v,
        };
        if !body.is_empty() {
            slices[n] = IoSlice::new(body);
            n += 1;
        }
    }
    let total: usize = slices[..n].iter().map(|s| s.len()).sum();
    let deadline = inner.payload_deadline();
    let transfer = deadline.start(Instant::now());
    let mut cut = false;
    let mut remaining = &mut slices[..n];
    let result = loop {
        if remaining.is_empty() {
            break Ok(total);
        }
        match stream.write_vectored(remaining) {
            Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => {
                IoSlice::advance_slices(&mut remaining, written);
                if remaining.is_empty() {
                    continue;
                }
                // The socket is full: the rest gets only the time left.
                match transfer.left(Instant::now()) {
                    Ok(None) => {}
                    Ok(left) => {
                        if let Err(err) = stream.set_write_timeout(left) {
                            break Err(err);
                        }
                        cut = true;
                    }
                    Err(Expired) => break Err(io::ErrorKind::TimedOut.into()),
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => break Err(err),
        }
    };
    if cut && result.is_ok() {
        stream.set_write_timeout(deadline.timeout())?;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(length: u64) -> Extent {
        Extent { length, flags: 0 }
    }

    #[test]
    fn clip_extents_cuts_at_limit() {
        let mut v = vec![e(512), e(1024), e(4096)];
        clip_extents(&mut v, 1024, false).unwrap();
        assert_eq!(v, vec![e(512), e(512)]);
    }

    #[test]
    fn clip_extents_req_one_keeps_first_within_request() {
        let mut v = vec![e(8192), e(512)];
        clip_extents(&mut v, 4096, true).unwrap();
        assert_eq!(v, vec![e(4096)]);
    }

    #[test]
    fn clip_extents_refuses_empty_and_zero_length() {
        assert_eq!(clip_extents(&mut vec![], 512, false), Err(NbdError::Io));
        assert_eq!(clip_extents(&mut vec![e(0)], 512, false), Err(NbdError::Io));
    }
}
