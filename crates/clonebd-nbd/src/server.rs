//! The threaded NBD server: accept loops, connection bookkeeping, shutdown and statistics.
//!
//! [`Server::serve_unix`] and [`Server::serve_tcp`] are blocking accept loops; run each on its
//! own thread. Every accepted connection gets a reader thread (handshake, then request
//! decoding) and a writer thread (reply frames, one gathered write each); requests run on a
//! worker pool shared by all connections. With [`ServerConfig::io_uring`] the connection's
//! thread does all of its socket I/O and the routed reads and writes through io_uring
//! instead, and has no writer thread.
//!
//! Admission (see [`crate::admission`]): a connection in its handshake holds one of
//! [`ServerConfig::max_handshakes`] handshake slots (and of
//! [`ServerConfig::max_handshakes_per_peer`] for its IP address) and must finish the
//! handshake within [`ServerConfig::handshake_timeout`]; only then does it take one of
//! [`ServerConfig::max_connections`] established slots. A connection holds at most
//! [`ServerConfig::max_inflight_bytes`] of payload and [`ServerConfig::max_inflight_requests`]
//! requests, and all connections together at most [`ServerConfig::memory_budget`] (one peer
//! address [`ServerConfig::memory_budget_per_peer`]); past any of these, a reader stops
//! reading until replies have gone out. A write's payload, and each send of replies, must be
//! over within [`ServerConfig::payload_timeout`] of its start, or the connection is closed
//! and gives back what it held.
//!
//! [`ShutdownHandle::shutdown`] stops the accept loops, stops every reader (requests already
//! read still run and their replies are sent), then closes the connections; the `serve_*`
//! calls return once their connections are closed. The accept loops wait on the listener and
//! on a [`StopSignal`] together ([`clonebd_io::socket`]), so they stop whatever became of
//! their address: a unix socket file removed or bound by another server does not matter.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Shutdown, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use clonebd_io::socket::{Acceptor, StopSignal};

use crate::admission::{
    ConnAdmission, Direction, HandshakeSlot, MemoryBudget, PayloadDeadline, Refusal, Slots,
    Throttles,
};
use crate::backend::Backend;
use crate::conn::{self, Job, Stream};
use crate::handshake::{ExportError, ExportInfo};
use crate::pool::{BufferPool, JobQueue};

/// Settings of a [`Server`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// The export's name; the default name `""` also selects it.
    pub export_name: String,
    /// A description shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// Worker threads running backend calls, shared by all connections (at least one). Each
    /// backend call occupies a worker until it returns, so this bounds how many requests run
    /// at once across all connections: size it to the queue depth expected, since a call may
    /// block (a write waiting for its region to hydrate, for instance).
    pub workers: usize,
    /// Connections in the transmission phase at once. While all are taken, new connections
    /// are closed as soon as accepted, and a handshake that completes is closed then.
    /// Connections still in their handshake do not count here.
    pub max_connections: usize,
    /// Connections in their handshake at once; more are closed as soon as accepted.
    pub max_handshakes: usize,
    /// Connections in their handshake at once from one IP address (TCP); more from that
    /// address are closed as soon as accepted.
    pub max_handshakes_per_peer: usize,
    /// Payload bytes one connection may hold in flight (write data read, read data not yet
    /// sent). A single request of up to 32 MiB is always within this bound when nothing
    /// else is in flight on its connection.
    pub max_inflight_bytes: usize,
    /// Requests one connection may have in flight.
    pub max_inflight_requests: usize,
    /// Payload bytes all connections together may hold in flight, counted as for
    /// `max_inflight_bytes` (at least 32 MiB). Past it, readers stop reading until replies
    /// have gone out.
    pub memory_budget: usize,
    /// Of `memory_budget`, what the connections from one IP address may hold (at least
    /// 32 MiB), so that one host cannot hold the whole budget.
    pub memory_budget_per_peer: usize,
    /// The deadline of the whole handshake, from accept to the start of transmission; a
    /// connection that has not finished its handshake by then is closed. `None`: no
    /// deadline.
    pub handshake_timeout: Option<Duration>,
    /// The payload deadline (see [`crate::admission`]): a write's payload must be received
    /// within this of its header (once admitted), and each send of replies must be taken by
    /// the client within this of its start; past it, the connection is closed and what it
    /// held is given back. `None`: no deadline (a client that stops mid-payload, or stops
    /// reading, then holds its share of the memory budget for as long as it stays connected).
    pub payload_timeout: Option<Duration>,
    /// Serve each connection through io_uring: its thread receives requests, submits the
    /// reads and writes the backend [routes](crate::Backend::route) many at a time, and sends
    /// the replies, with no reader, writer or worker thread in the way; other requests still
    /// run on the workers. Where io_uring cannot be set up, connections fall back to threads.
    /// Off: a reader and a writer thread per connection, every request on the workers.
    /// Connections over TLS are always served with threads.
    pub io_uring: bool,
    /// Require TLS (FORCEDTLS): before `NBD_OPT_STARTTLS` every option but `NBD_OPT_ABORT`
    /// is refused with `NBD_REP_ERR_TLS_REQD` and `NBD_OPT_EXPORT_NAME` closes the
    /// connection; after it, the hook runs the TLS handshake and the connection goes on
    /// over what it returns. `None`: no TLS (`NBD_OPT_STARTTLS` is unsupported).
    pub tls: Option<ServerTls>,
}

/// Makes a connection secure, the server's side: given the socket once `NBD_REP_ACK` to
/// `NBD_OPT_STARTTLS` is sent, and the time left of the handshake's deadline (`None`: no
/// deadline), it runs the TLS handshake and returns a unix stream that carries the plaintext
/// (relaying it through TLS over the socket). An error of kind `TimedOut` or `WouldBlock`
/// counts as the handshake's deadline passing. The relay is to close the network socket
/// once the server closes the stream, and to bound its own sends to the network (the
/// payload deadline bounds only the server's sends into the stream). The server knows
/// nothing of TLS itself.
#[derive(Clone)]
pub struct ServerTls(
    pub Arc<dyn Fn(crate::client::Socket, Option<Duration>) -> io::Result<UnixStream> + Send + Sync>,
);

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls")
    }
}

impl PartialEq for ServerTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ServerTls {}

impl Default for ServerConfig {
    fn default() -> Self {
        let cpus = thread::available_parallelism().map_or(2, usize::from);
        Self {
            export_name: String::new(),
            description: String::new(),
            workers: (cpus * 4).clamp(16, 128),
            max_connections: 64,
            max_handshakes: 128,
            max_handshakes_per_peer: 16,
            max_inflight_bytes: 64 << 20,
            max_inflight_requests: 256,
            memory_budget: 256 << 20,
            memory_budget_per_peer: 128 << 20,
            handshake_timeout: Some(Duration::from_secs(10)),
            payload_timeout: Some(Duration::from_secs(30)),
            io_uring: true,
            tls: None,
        }
    }
}

/// Why a server cannot start or serve.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The backend describes an export that cannot be served.
    #[error("invalid export: {0}")]
    Export(#[from] ExportError),
    /// A setting is out of range.
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    /// A socket or thread operation failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// A snapshot of the server's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerStats {
    /// Connections currently open (handshake or transmission).
    pub active_connections: u64,
    /// Connections accepted since the server started.
    pub total_connections: u64,
    /// Connections closed without being served: over `max_handshakes`,
    /// `max_handshakes_per_peer` or `max_connections`.
    pub rejected_connections: u64,
    /// Connections closed because their handshake missed its deadline.
    pub handshake_timeouts: u64,
    /// Connections closed because a write's payload, or a send of replies, missed the
    /// payload deadline.
    pub payload_timeouts: u64,
    /// Times a connection stopped reading because the shared memory budget was spent.
    pub budget_waits: u64,
    /// Handshakes that reached the transmission phase.
    pub handshakes: u64,
    /// Requests taken in the transmission phase (disconnects excluded): rejected ones, and
    /// valid ones once admitted within the in-flight budget.
    pub requests: u64,
    /// Requests answered with an error.
    pub request_errors: u64,
    /// Connections closed for a protocol violation (bad magic, oversized payload, bad
    /// handshake).
    pub protocol_errors: u64,
    /// Payload bytes received in write requests.
    pub bytes_received: u64,
    /// Reply bytes sent.
    pub bytes_sent: u64,
}

/// Counters updated by connections.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) active_connections: AtomicU64,
    pub(crate) total_connections: AtomicU64,
    pub(crate) rejected_connections: AtomicU64,
    pub(crate) handshake_timeouts: AtomicU64,
    pub(crate) payload_timeouts: AtomicU64,
    pub(crate) budget_waits: AtomicU64,
    pub(crate) handshakes: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) request_errors: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// State shared by the accept loops, the connections and the shutdown handle.
pub(crate) struct Inner {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) export: ExportInfo,
    pub(crate) config: ServerConfig,
    pub(crate) buffers: Arc<BufferPool>,
    pub(crate) jobs: Arc<JobQueue<Job>>,
    pub(crate) counters: Counters,
    /// Given on shutdown; stops every accept loop.
    stop: Arc<StopSignal>,
    pub(crate) slots: Arc<Slots>,
    pub(crate) budget: Arc<MemoryBudget>,
    pub(crate) throttles: Throttles,
    /// Streams of open connections, to stop their readers on shutdown.
    connections: Mutex<HashMap<u64, Stream>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("export", &self.export)
            .finish_non_exhaustive()
    }
}

impl Inner {
    pub(crate) fn shutting_down(&self) -> bool {
        self.stop.is_stopped()
    }

    /// The admission check of a new connection's requests.
    pub(crate) fn conn_admission(&self, peer: Option<IpAddr>) -> ConnAdmission {
        ConnAdmission::new(
            Arc::clone(&self.budget),
            peer,
            self.config.max_inflight_requests,
            self.config.max_inflight_bytes,
        )
    }

    /// Count and log (rate-limited) a connection that stops reading for want of budget.
    pub(crate) fn budget_wait(&self, peer: Option<IpAddr>, cost: usize) {
        Counters::add(&self.counters.budget_waits, 1);
        if let Some(held_back) = self.throttles.budget.allow() {
            tracing::warn!(
                peer = %PeerName(peer),
                cost,
                used = self.budget.used(),
                budget = self.budget.limit(),
                waits_since_last_report = held_back,
                "memory budget spent; connection waits for replies to go out"
            );
        }
    }

    /// Count and log (rate-limited) a handshake closed at its deadline.
    pub(crate) fn handshake_expired(&self, peer: Option<IpAddr>) {
        Counters::add(&self.counters.handshake_timeouts, 1);
        if let Some(held_back) = self.throttles.deadline.allow() {
            tracing::warn!(
                peer = %PeerName(peer),
                deadline = ?self.config.handshake_timeout,
                expired_since_last_report = held_back,
                "handshake deadline passed; closing connection"
            );
        }
    }

    /// The payload deadline's rule, for a connection's transmission loop.
    pub(crate) fn payload_deadline(&self) -> PayloadDeadline {
        PayloadDeadline::new(self.config.payload_timeout)
    }

    /// Count and log (rate-limited) a connection closed because a transfer missed the
    /// payload deadline.
    pub(crate) fn payload_expired(&self, peer: Option<IpAddr>, dir: Direction) {
        Counters::add(&self.counters.payload_timeouts, 1);
        if let Some(held_back) = self.throttles.payload.allow() {
            tracing::warn!(
                peer = %PeerName(peer),
                deadline = ?self.config.payload_timeout,
                used = self.budget.used(),
                budget = self.budget.limit(),
                expired_since_last_report = held_back,
                "{}; closing connection",
                dir.describe()
            );
        }
    }

    /// Count and log (rate-limited) a connection closed without being served.
    pub(crate) fn refused(&self, why: Refusal, peer: Option<IpAddr>) {
        Counters::add(&self.counters.rejected_connections, 1);
        if let Some(held_back) = self.throttles.refused.allow() {
            let (handshaking, established) = self.slots.counts();
            tracing::warn!(
                peer = %PeerName(peer),
                handshaking,
                established,
                refused_since_last_report = held_back,
                "{}; closing connection",
                why.describe()
            );
        }
    }

    fn register(&self, id: u64, stream: Stream) {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, stream);
    }

    fn unregister(&self, id: u64) {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }
}

/// A peer as logs show it: its IP address, or `local` for a unix socket.
struct PeerName(Option<IpAddr>);

impl std::fmt::Display for PeerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(ip) => ip.fmt(f),
            None => f.write_str("local"),
        }
    }
}

/// An NBD server for one export.
#[derive(Debug)]
pub struct Server {
    inner: Arc<Inner>,
    workers: Vec<JoinHandle<()>>,
}

/// Stops a [`Server`]; cheap to clone and usable from any thread.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    inner: Arc<Inner>,
}

impl ShutdownHandle {
    /// Stop accepting connections, stop reading requests, let the requests already read finish
    /// and their replies go out, then close every connection. Returns at once; the `serve_*`
    /// calls return when their connections are closed.
    pub fn shutdown(&self) {
        if !self.inner.stop.stop() {
            return;
        }
        let conns = self
            .inner
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for stream in conns.values() {
            // Readers see end of file; writers keep going until the replies are out.
            let _ = stream.shutdown(Shutdown::Read);
        }
        drop(conns);
        // Readers waiting for the memory budget look at the flag.
        self.inner.budget.wake_all();
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down()
    }
}

impl Server {
    /// A server for the export `backend` serves, with its own memory budget of
    /// [`ServerConfig::memory_budget`].
    pub fn new(backend: Arc<dyn Backend>, config: ServerConfig) -> Result<Self, ServerError> {
        let budget = Arc::new(MemoryBudget::new(
            config.memory_budget,
            config.memory_budget_per_peer,
        )?);
        Self::with_budget(backend, config, budget)
    }

    /// A server whose connections draw on `budget`, which other servers may share (the
    /// budget fields of `config` are then not used).
    pub fn with_budget(
        backend: Arc<dyn Backend>,
        config: ServerConfig,
        budget: Arc<MemoryBudget>,
    ) -> Result<Self, ServerError> {
        if config.workers == 0 {
            return Err(ServerError::Config("workers must be at least 1"));
        }
        if config.max_connections == 0
            || config.max_inflight_requests == 0
            || config.max_handshakes == 0
            || config.max_handshakes_per_peer == 0
        {
            return Err(ServerError::Config(
                "connection and request limits must be at least 1",
            ));
        }
        let export =
            ExportInfo::from_backend(&config.export_name, &config.description, backend.as_ref())?;
        let stop = Arc::new(StopSignal::new()?);
        let jobs = Arc::new(JobQueue::new());
        let mut workers = Vec::with_capacity(config.workers);
        for i in 0..config.workers {
            let queue = Arc::clone(&jobs);
            let spawned = thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .spawn(move || conn::worker(&queue));
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(err) => {
                    jobs.close();
                    return Err(ServerError::Io(err));
                }
            }
        }
        let slots = Arc::new(Slots::new(
            config.max_handshakes,
            config.max_handshakes_per_peer,
            config.max_connections,
        ));
        let inner = Arc::new(Inner {
            backend,
            export,
            config,
            buffers: Arc::new(BufferPool::default()),
            jobs,
            counters: Counters::default(),
            stop,
            slots,
            budget,
            throttles: Throttles::default(),
            connections: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        });
        Ok(Self { inner, workers })
    }

    /// The export as advertised (block sizes after clamping).
    pub fn export(&self) -> &ExportInfo {
        &self.inner.export
    }

    /// A handle that stops the server.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            inner: Arc::clone(&self.inner),
        }
    }

    /// The server's counters.
    pub fn stats(&self) -> ServerStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServerStats {
            active_connections: get(&c.active_connections),
            total_connections: get(&c.total_connections),
            rejected_connections: get(&c.rejected_connections),
            handshake_timeouts: get(&c.handshake_timeouts),
            payload_timeouts: get(&c.payload_timeouts),
            budget_waits: get(&c.budget_waits),
            handshakes: get(&c.handshakes),
            requests: get(&c.requests),
            request_errors: get(&c.request_errors),
            protocol_errors: get(&c.protocol_errors),
            bytes_received: get(&c.bytes_received),
            bytes_sent: get(&c.bytes_sent),
        }
    }

    /// Accept and serve connections on a unix socket until shutdown.
    pub fn serve_unix(&self, listener: UnixListener) -> Result<(), ServerError> {
        let acceptor = Acceptor::new(listener, Arc::clone(&self.inner.stop))?;
        self.accept_loop(|| Ok(acceptor.accept()?.map(Stream::Unix)))
    }

    /// Accept and serve connections on a TCP socket until shutdown. Accepted sockets get
    /// `TCP_NODELAY`.
    pub fn serve_tcp(&self, listener: TcpListener) -> Result<(), ServerError> {
        let acceptor = Acceptor::new(listener, Arc::clone(&self.inner.stop))?;
        self.accept_loop(|| {
            let Some(s) = acceptor.accept()? else {
                return Ok(None);
            };
            // "both the client and server SHOULD disable Nagle's algorithm".
            s.set_nodelay(true)?;
            Ok(Some(Stream::Tcp(s)))
        })
    }

    /// Serves connections from `accept` until it returns `None` (shutdown), then waits for
    /// them to close.
    fn accept_loop(
        &self,
        mut accept: impl FnMut() -> io::Result<Option<Stream>>,
    ) -> Result<(), ServerError> {
        let inner = &self.inner;
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        loop {
            let stream = match accept() {
                Ok(Some(stream)) => stream,
                Ok(None) => break,
                Err(err) => {
                    tracing::warn!(%err, "accept failed");
                    // Out of descriptors and the like: back off rather than spin.
                    thread::sleep(Duration::from_millis(20));
                    continue;
                }
            };
            if inner.shutting_down() {
                break;
            }
            threads.retain(|t| !t.is_finished());
            Counters::add(&inner.counters.total_connections, 1);
            let peer = stream.peer_ip();
            let slot = match inner.slots.begin(peer) {
                Ok(slot) => slot,
                Err(why) => {
                    inner.refused(why, peer);
                    continue;
                }
            };
            match self.spawn_connection(stream, slot, peer) {
                Ok(handle) => threads.push(handle),
                Err(err) => tracing::warn!(%err, "cannot start a connection thread"),
            }
        }
        for t in threads {
            let _ = t.join();
        }
        Ok(())
    }

    fn spawn_connection(
        &self,
        stream: Stream,
        slot: HandshakeSlot,
        peer: Option<IpAddr>,
    ) -> io::Result<JoinHandle<()>> {
        // The deadline counts from here: time spent waiting for a thread is the client's.
        let deadline = self
            .inner
            .config
            .handshake_timeout
            .map(|t| std::time::Instant::now() + t);
        let inner = Arc::clone(&self.inner);
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        inner.register(id, stream.try_clone()?);
        inner
            .counters
            .active_connections
            .fetch_add(1, Ordering::Relaxed);
        let spawned = thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn({
                let inner = Arc::clone(&inner);
                move || {
                    conn::run(&inner, id, stream, slot, peer, deadline);
                    inner.unregister(id);
                    inner
                        .counters
                        .active_connections
                        .fetch_sub(1, Ordering::Relaxed);
                }
            });
        if spawned.is_err() {
            inner.unregister(id);
            inner
                .counters
                .active_connections
                .fetch_sub(1, Ordering::Relaxed);
        }
        // A shutdown that raced with registration must still stop this reader.
        if inner.shutting_down()
            && let Some(s) = inner
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&id)
        {
            let _ = s.shutdown(Shutdown::Read);
        }
        spawned
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.inner.jobs.close();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
