//! Serving a connection through io_uring: one thread per connection receives and decodes
//! requests, submits the reads and writes the backend [routes](crate::Backend::route), reaps
//! their completions and sends the replies, all through one io_uring instance
//! ([`clonebd_io::uring::Ring`]), so that many requests share each system call and no thread
//! blocks in a `pread` per request.
//!
//! Requests the backend does not route (flush, trim, write-zeroes, cache, block status, FUA
//! writes, writes to regions not hydrated, anything in fail mode) run as in the threaded mode:
//! on the worker pool, or on this thread for a lone read or write with nothing else in
//! flight. A worker hands its reply to this thread through the [`RingLink`] and wakes the ring
//! only if the thread is about to sleep. Only this thread writes to the socket, one gathered
//! send at a time, so frames never interleave. Requests are admitted here by the
//! connection's [`ConnAdmission`], the same check as the threaded mode's (its own in-flight
//! bound, then the memory budget shared by all connections): past either, decoding stops
//! (and with it reading the socket) until replies have gone out, or, for the shared budget,
//! until a release on any connection wakes the ring. The payload being received and the send
//! in flight each have a [`Transfer`] deadline (the rule is [`PayloadDeadline`]'s); the
//! thread's wait ends at the earlier one, and one that has passed closes the connection
//! (shutting the socket down ends the operation; its completion gives back its charge).
//!
//! **Flush ordering.** "`NBD_CMD_FLUSH` ... MUST NOT send a reply until all write requests
//! which the server has completed (that is, replied to) before receiving the flush are
//! written to permanent storage." A routed write is answered only after its last completion
//! was reaped here, that is, after the kernel finished the `O_DIRECT` write on the device: its
//! data is then in the device (or the device's volatile cache), exactly as after
//! [`Backend::write`](crate::Backend::write) returned on the threaded path. A flush reaches
//! the backend only after this thread decoded it, and the client can only rely on writes
//! whose replies it received before it sent the flush; each of those completed on the device
//! before its reply was sent, hence before the flush was received, so the backend's flush
//! (`fdatasync` of the destination, or a metadata commit that flushes it first) covers it.
//! The same holds across connections of a multi-connection export: the reply on one
//! connection still follows the completion. Writes still in flight when the flush arrives are
//! not covered, which the protocol allows (they have not been replied to). Nothing else is
//! reordered: the flush itself runs on the worker pool as before.

use std::collections::VecDeque;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use clonebd_io::uring::{Dir, Done, Inline, IoBuf, Ring, SendPart, SharedFd, Waker};

use crate::admission::{ConnAdmission, Direction, PayloadDeadline, Transfer, Wait};
use crate::backend::{NbdError, RouteKind};
use crate::codec::{DecodeError, ReplyHeader, RequestHeader};
use crate::config::ServerConfig;
use crate::exec::{Body, Conn, ConnSetup, Job, ReplyFrame, ReplySink, run_job};
use crate::pool::{ALIGN, Buf};
use crate::proto::{Command, command_flags as cf};
use crate::shared::Counters;
use crate::stream::Stream;
use crate::transmission::{Step, Transmission, runs_inline};

/// Bytes of socket input received at a time (write payloads that do not fit are received
/// straight into their own buffers).
const INPUT_BYTES: usize = 64 * 1024;
/// Most replies gathered into one send.
const SEND_BATCH: usize = 256;
/// Most pieces a routed request may have; one with more runs on the worker pool.
const MAX_SEGMENTS: usize = 16;
/// Completion-queue entries kept free for the connection's own operations: the input and a
/// payload receive, the reply send and the waker's read.
const RESERVED_COMPLETIONS: usize = 4;

/// Where worker threads leave the replies of a connection served through io_uring.
pub(crate) struct RingLink {
    done: Mutex<Vec<ReplyFrame>>,
    /// Set by the connection's thread before it waits: a worker that finds it set wakes the
    /// ring (one system call), otherwise the thread will find the reply before waiting.
    sleeping: AtomicBool,
    /// Also woken by releases of the shared memory budget when this connection waits for it.
    waker: Arc<Waker>,
}

impl ReplySink for RingLink {
    fn reply(&self, frame: ReplyFrame) {
        self.push(frame);
    }
}

impl RingLink {
    fn new(waker: Waker) -> Self {
        Self {
            done: Mutex::new(Vec::new()),
            sleeping: AtomicBool::new(false),
            waker: Arc::new(waker),
        }
    }

    /// Hand a reply to the connection's thread.
    fn push(&self, frame: ReplyFrame) {
        self.done
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(frame);
        // Pairs with the store and the queue check in `Session::wait`: either that check sees
        // this frame, or this swap sees the flag.
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.waker.wake();
        }
    }
}

/// A request whose write payload is being received into its own buffer.
pub(crate) struct PendingWrite {
    header: RequestHeader,
    cost: usize,
}

/// A routed request in flight.
pub(crate) struct IoReq {
    header: RequestHeader,
    cost: usize,
    /// The backend's account of the request, dropped when its I/O is over.
    guard: Box<dyn Send>,
    error: fn(&io::Error) -> NbdError,
}

/// Replies in one send.
#[derive(Default)]
pub(crate) struct SendMeta {
    frames: usize,
    cost: usize,
    errors: u64,
}

/// What an operation on the ring is for.
pub(crate) enum Token {
    Input,
    Payload(PendingWrite),
    Io(IoReq),
    Send(SendMeta),
}

/// A ring for one connection and the waker its workers use.
pub(crate) fn new_ring(config: &ServerConfig) -> io::Result<(Ring<Token>, Waker)> {
    let entries = config
        .max_inflight_requests
        .clamp(64, 1024)
        .next_power_of_two();
    let mut ring = Ring::new(u32::try_from(entries).unwrap_or(1024))?;
    let waker = ring.waker()?;
    Ok((ring, waker))
}

/// Serve the transmission phase of `conn` until the client leaves, the socket breaks or a
/// protocol error ends it; every request taken is answered (or dropped with a broken socket)
/// before this returns. `leftover` is what the handshake's reader had already buffered.
pub(crate) fn serve(
    setup: ConnSetup,
    (ring, waker): (Ring<Token>, Waker),
    sock: Stream,
    leftover: &[u8],
) -> Result<(), DecodeError> {
    let link = Arc::new(RingLink::new(waker));
    let admission = setup.inner.conn_admission(setup.peer);
    let conn = &Arc::new(Conn::new(setup, Arc::clone(&link) as Arc<dyn ReplySink>));
    let sock = Arc::new(sock);
    let mut input = IoBuf::new(INPUT_BYTES.max(leftover.len()));
    input.as_mut_slice()[..leftover.len()].copy_from_slice(leftover);
    let mut s = Session {
        conn,
        link: &link,
        machine: Transmission::new(conn.params),
        pending: None,
        ring,
        stream: Arc::clone(&sock),
        sock,
        input: Some(input),
        head: 0,
        tail: leftover.len(),
        payload_busy: false,
        reading: true,
        broken: false,
        admission,
        deadline: conn.inner.payload_deadline(),
        receiving: None,
        replying: None,
        budget_wait: false,
        jobs: 0,
        outq: VecDeque::new(),
        sending: false,
        spare_parts: Vec::new(),
        spare_frames: Vec::new(),
        error: None,
    };
    s.run();
    match s.error.take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

struct Session<'a> {
    conn: &'a Arc<Conn>,
    link: &'a RingLink,
    /// The transmission phase's state.
    machine: Transmission,
    /// A request the machine gave that waits for admission.
    pending: Option<Step>,
    ring: Ring<Token>,
    sock: SharedFd,
    stream: Arc<Stream>,
    /// The input buffer, `None` while a receive into it is in flight; bytes `[head, tail)`
    /// are received and not yet decoded.
    input: Option<IoBuf>,
    head: usize,
    tail: usize,
    /// A write payload is being received into its own buffer.
    payload_busy: bool,
    /// Still taking requests.
    reading: bool,
    /// The socket failed: replies are dropped.
    broken: bool,
    /// Requests taken and not yet answered, and their payload bytes.
    admission: ConnAdmission,
    /// The payload deadline's rule.
    deadline: PayloadDeadline,
    /// The write payload being received (`payload_busy`) and its deadline.
    receiving: Option<Transfer>,
    /// The send in flight (`sending`) and its deadline.
    replying: Option<Transfer>,
    /// The request at the head of the input waits for the shared budget (counted once).
    budget_wait: bool,
    /// Requests on the worker pool whose reply has not come back through the link.
    jobs: usize,
    outq: VecDeque<ReplyFrame>,
    sending: bool,
    spare_parts: Vec<SendPart>,
    spare_frames: Vec<ReplyFrame>,
    error: Option<DecodeError>,
}

impl Session<'_> {
    fn run(&mut self) {
        let mut dones = Vec::new();
        loop {
            self.check_deadlines();
            self.pump();
            self.take_replies();
            self.flush_replies();
            if !self.reading && self.admission.count() == 0 && !self.sending && self.outq.is_empty()
            {
                return;
            }
            if let Err(err) = self.wait(&mut dones) {
                // The ring is unusable: drop the connection. What is in flight is waited for
                // (or its memory kept) when the ring is dropped.
                tracing::warn!(%err, "io_uring wait failed; closing connection");
                self.break_socket();
                // Requests on the workers still use the backend: wait for them, so that
                // nothing of this connection runs once it counts as closed.
                while self.jobs > 0 {
                    self.take_replies();
                    if self.jobs > 0 {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
                return;
            }
            for d in dones.drain(..) {
                self.on_done(d);
            }
        }
    }

    fn wait(&mut self, dones: &mut Vec<Done<Token>>) -> io::Result<()> {
        self.link.sleeping.store(true, Ordering::SeqCst);
        let idle = self
            .link
            .done
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty();
        let r = if idle {
            // Wake at the next deadline to look at it, whatever else happens.
            let now = Instant::now();
            let timeout = Transfer::earliest([self.receiving, self.replying])
                .map(|t| t.saturating_duration_since(now));
            self.ring.wait_timeout(dones, timeout)
        } else {
            self.ring.poll(dones)
        };
        self.link.sleeping.store(false, Ordering::SeqCst);
        r
    }

    /// Close the connection if the payload being received, or the send in flight, missed
    /// its deadline: shutting the socket down ends that operation, and its completion gives
    /// back what it held.
    fn check_deadlines(&mut self) {
        if self.receiving.is_none() && self.replying.is_none() {
            return;
        }
        let now = Instant::now();
        let expired = if self.receiving.is_some_and(|t| t.expired(now)) {
            Direction::Payload
        } else if self.replying.is_some_and(|t| t.expired(now)) {
            Direction::Replies
        } else {
            return;
        };
        self.receiving = None;
        self.replying = None;
        self.conn.inner.payload_expired(self.conn.peer, expired);
        self.break_socket();
    }

    fn counters(&self) -> &Counters {
        &self.conn.inner.counters
    }

    /// Drive the machine over what is buffered and start the requests it gives, within the
    /// budget; receive more when it needs more.
    fn pump(&mut self) {
        let style = self.conn.params.style;
        loop {
            if !self.reading || self.broken || self.payload_busy {
                return;
            }
            let Some(input) = self.input.as_ref() else {
                return;
            };
            let step = match self.pending.take() {
                Some(step) => step,
                None => {
                    let (used, step) = self.machine.feed(&input.as_slice()[self.head..self.tail]);
                    self.head += used;
                    step
                }
            };
            let (header, cost) = match step {
                Step::Need(_) | Step::Skip(_) => {
                    self.arm_input();
                    return;
                }
                Step::Close { reply, error } => {
                    if let Some((h, e)) = reply {
                        self.admission.take_free();
                        self.queue(ReplyFrame::error(style, &h, e, 0));
                    }
                    return self.stop(error);
                }
                Step::Reply { header, .. } => (header, 0),
                Step::Run { header, cost, .. } => (header, cost),
            };
            match self.admission.try_admit(cost, Some(&self.link.waker)) {
                Ok(_) => self.budget_wait = false,
                // Past the connection's bound: wait for its replies to go out.
                Err(Wait::Connection) => {
                    self.pending = Some(step);
                    return;
                }
                // Past the shared budget: the next release anywhere wakes the ring (or
                // shutdown does, which ends reading here).
                Err(Wait::Budget(_)) => {
                    self.pending = Some(step);
                    if !self.budget_wait {
                        self.budget_wait = true;
                        self.conn.inner.budget_wait(self.conn.peer, cost);
                    }
                    if self.conn.inner.shutting_down() {
                        self.stop(None);
                    }
                    return;
                }
            }
            Counters::add(&self.counters().requests, 1);
            match step {
                Step::Reply { error, .. } => {
                    self.queue(ReplyFrame::error(style, &header, error, 0));
                }
                Step::Run { payload, .. } if payload > 0 => {
                    let mut buf = self.conn.inner.buffers.get(payload);
                    let have = payload.min(self.tail - self.head);
                    if let Some(input) = &self.input {
                        buf.as_mut_slice()[..have]
                            .copy_from_slice(&input.as_slice()[self.head..][..have]);
                    }
                    self.head += have;
                    if have < payload {
                        // The payload deadline runs from here, the charge taken.
                        self.receiving = Some(self.deadline.start(Instant::now()));
                        self.receive_payload(header, buf.into_io(), have, cost);
                        return;
                    }
                    Counters::add(&self.counters().bytes_received, payload as u64);
                    self.dispatch(header, Some(buf), cost);
                }
                _ => self.dispatch(header, None, cost),
            }
        }
    }

    /// Receive more input after what is buffered.
    fn arm_input(&mut self) {
        let Some(mut input) = self.input.take() else {
            return;
        };
        if self.head > 0 {
            input.as_mut_slice().copy_within(self.head..self.tail, 0);
            self.tail -= self.head;
            self.head = 0;
        }
        if let Err(r) = self
            .ring
            .recv(Arc::clone(&self.sock), input, self.tail, Token::Input)
        {
            tracing::warn!(error = %r.error, "cannot receive; closing connection");
            self.input = Some(r.buf);
            self.stop(None);
        }
    }

    fn receive_payload(&mut self, header: RequestHeader, buf: IoBuf, filled: usize, cost: usize) {
        let token = Token::Payload(PendingWrite { header, cost });
        match self.ring.recv(Arc::clone(&self.sock), buf, filled, token) {
            Ok(()) => self.payload_busy = true,
            Err(r) => {
                tracing::warn!(error = %r.error, "cannot receive; closing connection");
                self.receiving = None;
                self.conn.inner.buffers.put(r.buf);
                self.release(1, cost);
                self.stop(None);
            }
        }
    }

    /// Start a request: routed to the ring if the backend routes it, else as the threaded
    /// mode runs it.
    fn dispatch(&mut self, h: RequestHeader, payload: Option<Buf>, cost: usize) {
        let inner = &self.conn.inner;
        let style = self.conn.params.style;
        let kind = match h.command {
            Command::Read => Some(RouteKind::Read),
            Command::Write if h.flags & cf::FUA == 0 => Some(RouteKind::Write),
            _ => None,
        };
        // A route with too many pieces, or more than the completion queue has room for, is
        // dropped (which ends the backend's account of it) and the request runs as threaded.
        let route = kind
            .and_then(|k| Some((k, inner.backend.route(k, h.offset, h.length, ALIGN)?)))
            .filter(|(_, r)| {
                let n = r.segments.len();
                n <= MAX_SEGMENTS && n + RESERVED_COMPLETIONS <= self.ring.room()
            });
        let mut payload = payload;
        if let Some((kind, route)) = route {
            let io = match kind {
                RouteKind::Read => Some((Dir::Read, inner.buffers.get(cost).into_io())),
                RouteKind::Write => payload.take().map(|b| (Dir::Write, b.into_io())),
            };
            if let Some((dir, io)) = io {
                let req = IoReq {
                    header: h,
                    cost,
                    guard: route.guard,
                    error: route.error,
                };
                if let Err(r) = self
                    .ring
                    .read_write(dir, io, route.segments, Token::Io(req))
                {
                    let r = *r;
                    tracing::error!(error = %r.error, "backend gave an unusable route");
                    inner.buffers.put(r.buf);
                    self.queue(ReplyFrame::error(style, &h, NbdError::Io, cost));
                }
                return;
            }
        }
        let job = Job {
            conn: Arc::clone(self.conn),
            header: h,
            payload,
            cost,
        };
        // The threaded driver's rule: a lone read or write runs here, others on the pool.
        if runs_inline(&h, self.admission.count() == 1, self.head != self.tail) {
            let frame = run_job(&job);
            self.queue(frame);
            return;
        }
        match self.conn.push(job) {
            Ok(()) => self.jobs += 1,
            Err(job) => self.queue(ReplyFrame::error(
                style,
                &job.header,
                NbdError::Shutdown,
                cost,
            )),
        }
    }

    fn on_done(&mut self, d: Done<Token>) {
        let buffers = Arc::clone(&self.conn.inner.buffers);
        match d {
            Done::Woken => {}
            Done::Recv {
                user: Token::Input,
                buf,
                result,
                ..
            } => {
                self.input = Some(buf);
                match result {
                    Ok(0) => self.stop(None),
                    Ok(n) => self.tail += n,
                    Err(e) if retryable(&e) => {}
                    Err(e) => {
                        tracing::debug!(%e, "receive failed; closing connection");
                        self.stop(None);
                    }
                }
            }
            Done::Recv {
                user: Token::Payload(p),
                buf,
                at,
                result,
            } => {
                self.payload_busy = false;
                if self.broken {
                    // Closed (at the deadline, say): what the payload held goes back now.
                    self.receiving = None;
                    buffers.put(buf);
                    self.release(1, p.cost);
                    return;
                }
                match result {
                    Ok(n) if n > 0 => {
                        let filled = at + n;
                        if filled < p.cost {
                            self.receive_payload(p.header, buf, filled, p.cost);
                        } else {
                            self.receiving = None;
                            Counters::add(&self.counters().bytes_received, p.cost as u64);
                            self.dispatch(p.header, Some(buffers.wrap(buf)), p.cost);
                        }
                    }
                    Err(e) if retryable(&e) => self.receive_payload(p.header, buf, at, p.cost),
                    _ => {
                        self.receiving = None;
                        buffers.put(buf);
                        self.release(1, p.cost);
                        self.stop(None);
                    }
                }
            }
            Done::ReadWrite {
                user: Token::Io(req),
                buf,
                result,
            } => {
                let IoReq {
                    header: h,
                    cost,
                    guard,
                    error,
                } = req;
                drop(guard);
                let style = self.conn.params.style;
                let frame = match result {
                    Ok(()) if h.command == Command::Read => ReplyFrame {
                        head: Some(ReplyHeader::read_data(style, h.cookie, h.offset, h.length)),
                        body: Body::Pooled(buffers.wrap(buf)),
                        cost,
                        error: false,
                    },
                    Ok(()) => {
                        buffers.put(buf);
                        ReplyFrame::ok(ReplyHeader::done(style, h.cookie, h.offset), cost)
                    }
                    Err(e) => {
                        buffers.put(buf);
                        tracing::debug!(%e, offset = h.offset, "routed I/O failed");
                        ReplyFrame::error(style, &h, error(&e), cost)
                    }
                };
                self.queue(frame);
            }
            Done::Send {
                user: Token::Send(meta),
                mut parts,
                result,
            } => {
                self.sending = false;
                self.replying = None;
                for p in parts.drain(..) {
                    if let SendPart::Buf(b) = p {
                        buffers.put(b);
                    }
                }
                self.spare_parts = parts;
                match result {
                    Ok(n) => Counters::add(&self.counters().bytes_sent, n as u64),
                    Err(err) => {
                        tracing::debug!(%err, "reply send failed; closing connection");
                        self.break_socket();
                    }
                }
                Counters::add(&self.counters().request_errors, meta.errors);
                self.release(meta.frames, meta.cost);
            }
            _ => tracing::error!("completion of an unexpected kind (server bug)"),
        }
    }

    /// Collect the replies workers left.
    fn take_replies(&mut self) {
        let mut frames = std::mem::take(&mut self.spare_frames);
        std::mem::swap(
            &mut frames,
            &mut *self
                .link
                .done
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        self.jobs = self.jobs.saturating_sub(frames.len());
        for f in frames.drain(..) {
            self.queue(f);
        }
        self.spare_frames = frames;
    }

    fn queue(&mut self, frame: ReplyFrame) {
        if self.broken {
            if frame.error {
                Counters::add(&self.counters().request_errors, 1);
            }
            self.release(1, frame.cost);
        } else {
            self.outq.push_back(frame);
        }
    }

    /// Send what is queued, if no send is in flight.
    fn flush_replies(&mut self) {
        if self.sending || self.broken || self.outq.is_empty() {
            return;
        }
        let n = self.outq.len().min(SEND_BATCH);
        let mut parts = std::mem::take(&mut self.spare_parts);
        let mut meta = SendMeta::default();
        for frame in self.outq.drain(..n) {
            meta.frames += 1;
            meta.cost += frame.cost;
            meta.errors += u64::from(frame.error);
            if let Some(head) = &frame.head {
                let b = head.as_bytes();
                parts.push(
                    Inline::new(b).map_or_else(|| SendPart::Owned(b.to_vec()), SendPart::Inline),
                );
            }
            match frame.body {
                Body::None => {}
                Body::Message(m) => parts.push(SendPart::Static(m.as_bytes())),
                Body::Pooled(buf) => parts.push(SendPart::Buf(buf.into_io())),
                Body::Owned(v) => parts.push(SendPart::Owned(v)),
            }
        }
        match self
            .ring
            .send(Arc::clone(&self.sock), parts, Token::Send(meta))
        {
            Ok(()) => {
                self.sending = true;
                self.replying = Some(self.deadline.start(Instant::now()));
            }
            Err((parts, user, err)) => {
                tracing::warn!(%err, "cannot send replies; closing connection");
                for p in parts {
                    if let SendPart::Buf(b) = p {
                        self.conn.inner.buffers.put(b);
                    }
                }
                self.break_socket();
                if let Token::Send(meta) = user {
                    self.release(meta.frames, meta.cost);
                }
            }
        }
    }

    fn release(&mut self, frames: usize, cost: usize) {
        self.admission.release(frames, cost);
    }

    /// Take no more requests; `error` ends the connection as a protocol error.
    fn stop(&mut self, error: Option<DecodeError>) {
        self.reading = false;
        if self.error.is_none() {
            self.error = error;
        }
    }

    /// The socket failed: stop, drop the replies waiting, and make the socket's operations in
    /// flight end.
    fn break_socket(&mut self) {
        self.broken = true;
        self.reading = false;
        let _ = self.stream.shutdown(Shutdown::Both);
        while let Some(frame) = self.outq.pop_front() {
            if frame.error {
                Counters::add(&self.counters().request_errors, 1);
            }
            self.release(1, frame.cost);
        }
    }
}

fn retryable(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN))
}
