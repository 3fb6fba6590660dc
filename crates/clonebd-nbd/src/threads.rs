//! The threaded transmission driver: a reader thread per connection drives the
//! [`Transmission`] machine over a buffered socket, a writer thread sends replies, and the
//! requests run on the worker pool (or on the reader for a lone one).
//!
//! A request to run is admitted by the connection's [`ConnAdmission`] (its own in-flight
//! bound, then the memory budget shared by all connections; the reader waits for either
//! before reading any payload), its write payload is read into a pooled buffer within the
//! payload deadline (each read that waits on the socket given only the time left), and it is
//! queued for the worker pool. A refused request's error reply is queued directly, and the
//! machine drops its payload. A read or write that arrives alone (nothing else in flight,
//! nothing more buffered) runs on the reader thread itself. Workers call the
//! [`Backend`](crate::Backend) and write the reply frame themselves when the socket's write
//! half is free, else hand it to the connection's writer thread, which gathers what queues
//! up into one vectored write. Every frame (header and data) goes out in one locked write,
//! so frames never interleave, and must be taken by the client within the payload deadline
//! (the socket's send timeout; see `write_frames`); a write or a payload past it closes the
//! connection. The reader holds no lock while reading the socket; the budget lock is taken
//! only to count.
//!
//! This driver serves every connection over TLS, and every connection when io_uring is
//! unavailable or turned off ([`ServerConfig::io_uring`](crate::ServerConfig::io_uring)).

use std::io::{self, BufRead, BufReader, IoSlice, Read, Write};
use std::net::{IpAddr, Shutdown};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread;
use std::time::{Duration, Instant};

use crate::admission::{ConnAdmission, Direction, Expired, Transfer, Wait};
use crate::backend::NbdError;
use crate::codec::DecodeError;
use crate::exec::{Body, Conn, ConnSetup, Job, ReplyFrame, ReplySink, run_job};
use crate::shared::{Counters, Inner};
use crate::stream::{Stream, timed_out};
use crate::transmission::{Step, Transmission, runs_inline};

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

/// The replies side of a connection served with threads, shared by its reader, its writer
/// and the workers running its requests: the socket's write half, what is in flight, and
/// whether the socket broke.
struct Replies {
    inner: Arc<Inner>,
    /// The peer's IP address (`None`: a unix socket).
    peer: Option<IpAddr>,
    replies: Sender<Outgoing>,
    /// The socket's write half, locked for each write by the writer thread, the workers, and
    /// the reader when it runs a request itself (see [`Replies::admit`]).
    out: Mutex<Stream>,
    inflight: Mutex<Inflight>,
    room: Condvar,
    broken: AtomicBool,
}

impl ReplySink for Replies {
    /// Write a reply from a worker: itself if the socket is free, else through the writer
    /// thread (which gathers what queues up into one system call). Writing here spares a
    /// thread hand-off per request.
    fn reply(&self, frame: ReplyFrame) {
        match self.out.try_lock() {
            Ok(out) => self.write_with(out, frame),
            Err(TryLockError::Poisoned(p)) => self.write_with(p.into_inner(), frame),
            Err(TryLockError::WouldBlock) => self.send(frame),
        }
    }
}

impl Replies {
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

/// How long a reader waiting for the shared budget sleeps before it looks again at shutdown
/// and at its socket (a release wakes it sooner).
const BUDGET_RECHECK: Duration = Duration::from_millis(500);

/// Serve the transmission phase of a connection with threads until the client leaves, the
/// socket breaks or a protocol error ends it; every request taken is answered (or dropped
/// with a broken socket) before this returns.
pub(crate) fn serve(
    setup: ConnSetup,
    id: u64,
    mut reader: BufReader<Stream>,
    write_half: Stream,
) -> Result<(), DecodeError> {
    let inner = Arc::clone(&setup.inner);
    let (tx, rx) = mpsc::channel();
    let replies = Arc::new(Replies {
        inner: Arc::clone(&inner),
        peer: setup.peer,
        replies: tx,
        out: Mutex::new(write_half),
        inflight: Mutex::new(Inflight {
            admission: inner.conn_admission(setup.peer),
            waiting: 0,
        }),
        room: Condvar::new(),
        broken: AtomicBool::new(false),
    });
    let conn = Arc::new(Conn::new(setup, Arc::clone(&replies) as Arc<dyn ReplySink>));
    // Every reply write is bounded by the payload deadline (see `write_frames`).
    let send_timeout = replies
        .out
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .set_write_timeout(inner.payload_deadline().timeout());
    if let Err(err) = send_timeout {
        tracing::warn!(id, %err, "cannot set the socket's send timeout; closing connection");
        return Ok(());
    }
    let writer = thread::Builder::new()
        .name(format!("nbd-write-{id}"))
        .spawn({
            let replies = Arc::clone(&replies);
            move || write_loop(&replies, &rx)
        });
    let writer = match writer {
        Ok(w) => w,
        Err(err) => {
            tracing::warn!(id, %err, "cannot start the writer thread");
            return Ok(());
        }
    };
    let result = read_loop(&conn, &replies, &mut reader);
    // "The server MUST handle all outstanding requests ... and close the TCP session."
    replies.wait_idle();
    let _ = replies.replies.send(Outgoing::Close);
    let _ = writer.join();
    result
}

/// Drive the machine over the socket until the client disconnects, the stream breaks or a
/// protocol error makes the stream unusable.
fn read_loop(
    conn: &Arc<Conn>,
    replies: &Replies,
    reader: &mut BufReader<Stream>,
) -> Result<(), DecodeError> {
    let inner = &conn.inner;
    let style = conn.params.style;
    let mut machine = Transmission::new(conn.params);
    // The socket has a receive timeout, left by the last payload read.
    let mut timed = false;
    loop {
        if replies.broken.load(Ordering::Acquire) {
            return Ok(());
        }
        let (used, step) = machine.feed(reader.buffer());
        reader.consume(used);
        match step {
            Step::Need(_) | Step::Skip(_) => {
                // Between requests a client may be idle as long as it likes, and nothing is
                // charged for a refused payload: no deadline.
                if timed {
                    if reader.get_ref().set_read_timeout(None).is_err() {
                        return Ok(());
                    }
                    timed = false;
                }
                // The machine took all that was buffered: this reads the socket.
                match reader.fill_buf() {
                    Ok([]) => return Ok(()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Ok(()),
                }
            }
            Step::Close { reply, error } => {
                if let Some((h, e)) = reply {
                    replies.admit_final();
                    replies.send(ReplyFrame::error(style, &h, e, 0));
                }
                return error.map_or(Ok(()), Err);
            }
            Step::Reply { header, error } => {
                Counters::add(&inner.counters.requests, 1);
                if replies.admit(0).is_none() {
                    return Ok(());
                }
                replies.send(ReplyFrame::error(style, &header, error, 0));
            }
            Step::Run {
                header: h,
                cost,
                payload,
            } => {
                // Past either bound the reader waits here, before reading any payload.
                let Some(alone) = replies.admit(cost) else {
                    return Ok(());
                };
                Counters::add(&inner.counters.requests, 1);
                let mut data = None;
                if payload > 0 {
                    // The payload deadline runs from here, the charge taken.
                    let transfer = inner.payload_deadline().start(Instant::now());
                    let mut buf = inner.buffers.get(payload);
                    let read = read_payload(reader, buf.as_mut_slice(), transfer, &mut timed);
                    if let Err(end) = read {
                        // Given back at once, so that connections waiting for it go on.
                        replies.release(cost);
                        if matches!(end, PayloadEnd::Expired) {
                            inner.payload_expired(conn.peer, Direction::Payload);
                        }
                        return Ok(());
                    }
                    Counters::add(&inner.counters.bytes_received, payload as u64);
                    data = Some(buf);
                }
                let job = Job {
                    conn: Arc::clone(conn),
                    header: h,
                    payload: data,
                    cost,
                };
                if runs_inline(&h, alone, !reader.buffer().is_empty()) {
                    replies.write_now(run_job(&job));
                    continue;
                }
                if let Err(job) = conn.push(job) {
                    replies.send(ReplyFrame::error(
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

fn write_loop(conn: &Replies, rx: &Receiver<Outgoing>) {
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
