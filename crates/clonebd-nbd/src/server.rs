//! The threaded NBD server: accept loops, connection bookkeeping, shutdown and statistics.
//!
//! [`Server::serve_unix`] and [`Server::serve_tcp`] are blocking accept loops; run each on its
//! own thread. Every accepted connection gets a reader thread (handshake, then request
//! decoding) and a writer thread (reply frames, one gathered write each); requests run on a
//! worker pool shared by all connections. With [`ServerConfig::io_uring`] the connection's
//! thread does all of its socket I/O and the routed reads and writes through io_uring
//! instead, and has no writer thread. A connection holds at most
//! [`ServerConfig::max_inflight_bytes`] of payload and [`ServerConfig::max_inflight_requests`]
//! requests; past either, its reader stops reading until replies have gone out.
//!
//! [`ShutdownHandle::shutdown`] stops the accept loops, stops every reader (requests already
//! read still run and their replies are sent), then closes the connections; the `serve_*`
//! calls return once their connections are closed. The accept loops wait on the listener and
//! on a [`StopSignal`] together ([`clonebd_io::socket`]), so they stop whatever became of
//! their address: a unix socket file removed or bound by another server does not matter.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, TcpListener};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use clonebd_io::socket::{Acceptor, StopSignal};

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
    /// Connections served at once; more are closed as soon as accepted.
    pub max_connections: usize,
    /// Payload bytes one connection may hold in flight (write data read, read data not yet
    /// sent). A single request of up to 32 MiB is always admitted when nothing else is in
    /// flight.
    pub max_inflight_bytes: usize,
    /// Requests one connection may have in flight.
    pub max_inflight_requests: usize,
    /// How long the handshake may wait for each piece of client input.
    pub handshake_timeout: Option<Duration>,
    /// Serve each connection through io_uring: its thread receives requests, submits the
    /// reads and writes the backend [routes](crate::Backend::route) many at a time, and sends
    /// the replies, with no reader, writer or worker thread in the way; other requests still
    /// run on the workers. Where io_uring cannot be set up, connections fall back to threads.
    /// Off: a reader and a writer thread per connection, every request on the workers.
    pub io_uring: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let cpus = thread::available_parallelism().map_or(2, usize::from);
        Self {
            export_name: String::new(),
            description: String::new(),
            workers: (cpus * 4).clamp(16, 128),
            max_connections: 64,
            max_inflight_bytes: 64 << 20,
            max_inflight_requests: 256,
            handshake_timeout: Some(Duration::from_secs(30)),
            io_uring: true,
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
    /// Connections closed at once because `max_connections` were open.
    pub rejected_connections: u64,
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
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down()
    }
}

impl Server {
    /// A server for the export `backend` serves.
    pub fn new(backend: Arc<dyn Backend>, config: ServerConfig) -> Result<Self, ServerError> {
        if config.workers == 0 {
            return Err(ServerError::Config("workers must be at least 1"));
        }
        if config.max_connections == 0 || config.max_inflight_requests == 0 {
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
        let inner = Arc::new(Inner {
            backend,
            export,
            config,
            buffers: Arc::new(BufferPool::default()),
            jobs,
            counters: Counters::default(),
            stop,
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
            let active = inner.counters.active_connections.load(Ordering::Relaxed);
            if active >= inner.config.max_connections as u64 {
                Counters::add(&inner.counters.rejected_connections, 1);
                tracing::warn!(active, "connection limit reached; closing new connection");
                continue;
            }
            match self.spawn_connection(stream) {
                Ok(handle) => threads.push(handle),
                Err(err) => tracing::warn!(%err, "cannot start a connection thread"),
            }
        }
        for t in threads {
            let _ = t.join();
        }
        Ok(())
    }

    fn spawn_connection(&self, stream: Stream) -> io::Result<JoinHandle<()>> {
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
                    conn::run(&inner, id, stream);
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
