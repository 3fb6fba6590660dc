//! State shared by a server's accept loops, its connections and its shutdown handle
//! ([`Inner`]), and the counters behind [`ServerStats`](crate::ServerStats).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use clonebd_io::socket::StopSignal;

use crate::admission::{
    ConnAdmission, Direction, MemoryBudget, PayloadDeadline, Refusal, Slots, Throttles,
};
use crate::backend::Backend;
use crate::config::ServerConfig;
use crate::handshake::ExportInfo;
use crate::pool::BufferPool;
use crate::stream::Stream;

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
    pub(crate) counters: Counters,
    /// Given on shutdown; stops every accept loop.
    pub(crate) stop: Arc<StopSignal>,
    pub(crate) slots: Arc<Slots>,
    pub(crate) budget: Arc<MemoryBudget>,
    pub(crate) throttles: Throttles,
    /// Streams of open connections, to stop their readers on shutdown.
    pub(crate) connections: Mutex<HashMap<u64, Stream>>,
    pub(crate) next_id: AtomicU64,
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

    pub(crate) fn register(&self, id: u64, stream: Stream) {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, stream);
    }

    pub(crate) fn unregister(&self, id: u64) {
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
