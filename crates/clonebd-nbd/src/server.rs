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
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use clonebd_io::socket::{Acceptor, StopSignal};

use crate::admission::{HandshakeSlot, MemoryBudget, Slots, Throttles};
use crate::backend::Backend;
pub use crate::config::{ServerConfig, ServerError, ServerTls};
use crate::conn;
use crate::exec::{self, Job};
use crate::handshake::ExportInfo;
use crate::pool::{BufferPool, JobQueue};
use crate::shared::{Counters, Inner};
use crate::stream::Stream;

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

/// An NBD server for one export.
pub struct Server {
    inner: Arc<Inner>,
    /// The worker pool's queue, shared by all connections.
    jobs: Arc<JobQueue<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("inner", &self.inner)
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
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
                .spawn(move || exec::worker(&queue));
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
            counters: Counters::default(),
            stop,
            slots,
            budget,
            throttles: Throttles::default(),
            connections: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        });
        Ok(Self {
            inner,
            jobs,
            workers,
        })
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
        let jobs = Arc::clone(&self.jobs);
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
                    conn::run(&inner, &jobs, id, stream, slot, peer, deadline);
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
        self.jobs.close();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
