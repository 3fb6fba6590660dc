//! Admission: which connections the server takes on, and how much payload memory their
//! requests may hold.
//!
//! **Connection slots** (`Slots`). A connection still in its handshake holds a *handshake
//! slot*; one in the transmission phase holds an *established slot*. The two are counted
//! apart: at most [`ServerConfig::max_handshakes`] handshakes at once, at most
//! [`ServerConfig::max_handshakes_per_peer`] of them from one IP address (unix-socket peers
//! have none and are counted only in the total), and at most
//! [`ServerConfig::max_connections`] established connections. A connection over a handshake
//! limit, or arriving while every established slot is taken, is closed at once; a handshake
//! that completes while every established slot is taken is closed then. Handshakes never
//! take established slots, so connections that open and send nothing can crowd out only
//! other handshakes (one peer at most its own share of them), and only until the handshake
//! deadline ([`ServerConfig::handshake_timeout`], enforced by the connection over the whole
//! negotiation) closes them.
//!
//! **Payload memory** ([`MemoryBudget`]). Every request that carries payload (write data
//! read from the socket, read data not yet sent) is charged its length twice: against its
//! connection's own bound ([`ServerConfig::max_inflight_bytes`] and
//! [`ServerConfig::max_inflight_requests`], see `ConnAdmission`) and against one budget
//! shared by every connection of the server (or of several servers given the same budget):
//! at most [`ServerConfig::memory_budget`] bytes in total and
//! [`ServerConfig::memory_budget_per_peer`] bytes for the connections of one IP address.
//! The charge is taken whole, before any of a write's payload is read, and given back when
//! the reply has been sent. A connection that cannot be charged stops reading its socket
//! (backpressure, never an error) until a release elsewhere lets it retry.
//!
//! **Why this cannot deadlock.** A connection waits for budget only between requests: it
//! never holds a partly received payload while it waits, so every byte charged belongs to a
//! request that has been read whole and needs nothing more from the budget to finish; its
//! charge comes back once its reply is sent. The budget and every peer's share are at least
//! the largest payload ([`MAX_PAYLOAD`], checked by [`MemoryBudget::new`]), so a request of
//! any admissible size fits once the requests already admitted have been answered: **a
//! single request up to the largest payload is always admissible when nothing else is held
//! (by its connection, and by the others)**, and no set of connections can wait on each
//! other. What the rule does not promise is that a client which never sends a write's
//! payload, or never reads its replies, gives its charge back; the per-peer share keeps one
//! such host from holding the whole budget, but several hosts together could, and every
//! other client would then wait for ever.
//!
//! **Payload deadline** (`PayloadDeadline`). That is what the payload deadline
//! ([`ServerConfig::payload_timeout`]) is for, in both directions and in both transmission
//! loops: a *transfer* is a write's payload still to be received once its charge is taken
//! (its header read), or one send of replies (a gathered batch) once it has started, and it
//! must be over within the deadline of its start, however its bytes trickle in or out (a
//! whole-transfer deadline, not "no progress for so long", so that a client moving a byte
//! now and then cannot stretch it). A transfer past its deadline closes its connection,
//! which gives back everything the connection held: a charge is held by a client that does
//! not send or does not read for at most the deadline, and then the clients waiting for
//! budget go on. The time a request spends waiting for budget, or in the backend, counts in
//! no transfer: it is not the client's doing.
//!
//! A *peer* is an IPv4 address, or an IPv6 /64 network (one host is usually given a whole
//! /64, so counting single IPv6 addresses would limit nothing).
//!
//! Limits that bite are logged with the peer, at most once per [`LOG_INTERVAL`] for each
//! kind of limit (`Throttle`), with the number of occurrences not logged in between.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clonebd_io::uring::Waker;

#[cfg(doc)]
use crate::config::ServerConfig;
use crate::config::ServerError;
use crate::proto::MAX_PAYLOAD;

/// What per-peer limits count a connection from `ip` under: the address itself for IPv4,
/// its /64 network for IPv6.
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
    }
}

/// The shortest time between two log lines about the same kind of limit.
pub const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// At most one log line per [`LOG_INTERVAL`]; counts what it holds back.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    last: Mutex<Option<Instant>>,
    held_back: AtomicU64,
}

impl Throttle {
    /// Whether to log now; if so, how many occurrences were not logged since the last line.
    pub(crate) fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        match *last {
            Some(t) if now.duration_since(t) < LOG_INTERVAL => {
                self.held_back.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.held_back.swap(0, Ordering::Relaxed))
            }
        }
    }
}

/// The throttles of the limits the server logs.
#[derive(Debug, Default)]
pub(crate) struct Throttles {
    pub(crate) refused: Throttle,
    pub(crate) deadline: Throttle,
    pub(crate) budget: Throttle,
    pub(crate) payload: Throttle,
}

/// Why a connection was not given a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `max_handshakes` handshakes are in progress.
    Handshakes,
    /// `max_handshakes_per_peer` handshakes from this address are in progress.
    PeerHandshakes,
    /// `max_connections` connections are established.
    Connections,
}

impl Refusal {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Self::Handshakes => "handshake limit reached",
            Self::PeerHandshakes => "per-peer handshake limit reached",
            Self::Connections => "connection limit reached",
        }
    }
}

#[derive(Debug, Default)]
struct SlotState {
    handshaking: usize,
    per_peer: HashMap<IpAddr, usize>,
    established: usize,
}

/// Handshake and established connection slots (see the module documentation).
#[derive(Debug)]
pub(crate) struct Slots {
    max_handshakes: usize,
    max_per_peer: usize,
    max_established: usize,
    state: Mutex<SlotState>,
}

impl Slots {
    pub(crate) fn new(max_handshakes: usize, max_per_peer: usize, max_established: usize) -> Self {
        Self {
            max_handshakes,
            max_per_peer,
            max_established,
            state: Mutex::new(SlotState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A handshake slot for a new connection from `peer`, or why not.
    pub(crate) fn begin(self: &Arc<Self>, peer: Option<IpAddr>) -> Result<HandshakeSlot, Refusal> {
        let mut s = self.lock();
        if s.established >= self.max_established {
            return Err(Refusal::Connections);
        }
        if s.handshaking >= self.max_handshakes {
            return Err(Refusal::Handshakes);
        }
        let key = peer.map(peer_key);
        if let Some(ip) = key {
            let n = s.per_peer.entry(ip).or_insert(0);
            if *n >= self.max_per_peer {
                return Err(Refusal::PeerHandshakes);
            }
            *n += 1;
        }
        s.handshaking += 1;
        Ok(HandshakeSlot {
            slots: Arc::clone(self),
            peer: key,
        })
    }

    /// Connections in their handshake, and established.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let s = self.lock();
        (s.handshaking, s.established)
    }

    fn end_handshake(&self, s: &mut SlotState, peer: Option<IpAddr>) {
        s.handshaking -= 1;
        if let Some(ip) = peer
            && let Some(n) = s.per_peer.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                s.per_peer.remove(&ip);
            }
        }
    }
}

/// A connection's place among the handshakes; given back when dropped.
#[derive(Debug)]
pub(crate) struct HandshakeSlot {
    slots: Arc<Slots>,
    peer: Option<IpAddr>,
}

impl HandshakeSlot {
    /// Trade the handshake slot for an established one, or why not (the handshake slot is
    /// given back either way).
    pub(crate) fn establish(self) -> Result<EstablishedSlot, Refusal> {
        let slots = Arc::clone(&self.slots);
        let mut s = slots.lock();
        slots.end_handshake(&mut s, self.peer);
        // The handshake slot is already given back: do not give it back again on drop.
        std::mem::forget(self);
        if s.established >= slots.max_established {
            return Err(Refusal::Connections);
        }
        s.established += 1;
        drop(s);
        Ok(EstablishedSlot { slots })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut s = self.slots.lock();
        self.slots.end_handshake(&mut s, self.peer);
    }
}

/// An established connection's slot; given back when dropped.
#[derive(Debug)]
pub(crate) struct EstablishedSlot {
    slots: Arc<Slots>,
}

impl Drop for EstablishedSlot {
    fn drop(&mut self) {
        self.slots.lock().established -= 1;
    }
}

#[derive(Debug, Default)]
struct BudgetState {
    used: usize,
    per_peer: HashMap<IpAddr, usize>,
    /// Bumped by every release, so that a waiting thread knows when to look again.
    releases: u64,
    /// Threads blocked in [`MemoryBudget::wait_budget`].
    sleepers: usize,
    /// Rings of connections that were refused, woken (and forgotten) by the next release.
    rings: Vec<Arc<Waker>>,
}

/// Payload memory shared by connections: a total and a share per peer address (see the
/// module documentation for the rule that keeps it free of deadlock).
///
/// A [`Server`](crate::Server) makes its own from its configuration; give several servers
/// the same one with [`Server::with_budget`](crate::Server::with_budget) to bound them
/// together.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: usize,
    per_peer: usize,
    state: Mutex<BudgetState>,
    released: Condvar,
}

impl MemoryBudget {
    /// A budget of `limit` bytes, of which the connections of one peer address may hold
    /// `per_peer`. Both must be at least the largest payload (32 MiB), so that any request
    /// fits once the others are answered.
    pub fn new(limit: usize, per_peer: usize) -> Result<Self, ServerError> {
        if limit < MAX_PAYLOAD as usize || per_peer < MAX_PAYLOAD as usize {
            return Err(ServerError::Config(
                "the memory budget and its per-peer share must be at least 32 MiB",
            ));
        }
        Ok(Self {
            limit,
            per_peer: per_peer.min(limit),
            state: Mutex::new(BudgetState::default()),
            released: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.lock().used
    }

    /// The total, in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Charge `cost` bytes to `peer` if they fit. If not, returns the release count to wait
    /// past (see [`wait_budget`](Self::wait_budget)), and `ring`, if given, is woken by
    /// the next release.
    fn try_take(
        &self,
        peer: Option<IpAddr>,
        cost: usize,
        ring: Option<&Arc<Waker>>,
    ) -> Result<(), u64> {
        if cost == 0 {
            return Ok(());
        }
        let mut s = self.lock();
        let peer_used = peer
            .and_then(|ip| s.per_peer.get(&ip).copied())
            .unwrap_or(0);
        let fits =
            s.used + cost <= self.limit && (peer.is_none() || peer_used + cost <= self.per_peer);
        if !fits {
            if let Some(w) = ring
                && !s.rings.iter().any(|r| Arc::ptr_eq(r, w))
            {
                s.rings.push(Arc::clone(w));
            }
            return Err(s.releases);
        }
        s.used += cost;
        if let Some(ip) = peer {
            *s.per_peer.entry(ip).or_insert(0) += cost;
        }
        Ok(())
    }

    /// Give back `cost` bytes charged to `peer`, and wake whoever waits.
    fn release(&self, peer: Option<IpAddr>, cost: usize) {
        if cost == 0 {
            return;
        }
        let mut s = self.lock();
        s.used -= cost;
        if let Some(ip) = peer
            && let Some(n) = s.per_peer.get_mut(&ip)
        {
            *n -= cost;
            if *n == 0 {
                s.per_peer.remove(&ip);
            }
        }
        s.releases = s.releases.wrapping_add(1);
        let sleepers = s.sleepers > 0;
        let rings = std::mem::take(&mut s.rings);
        drop(s);
        if sleepers {
            self.released.notify_all();
        }
        // An eventfd write: a ring that is not asleep yet finds it when it next waits.
        for w in rings {
            w.wake();
        }
    }

    /// Block until a release after the one counted `seen` (from [`Wait::Budget`]), or until
    /// `patience` has passed.
    pub(crate) fn wait_budget(&self, seen: u64, patience: Duration) {
        let until = Instant::now() + patience;
        let mut s = self.lock();
        while s.releases == seen {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            s.sleepers += 1;
            s = self
                .released
                .wait_timeout(s, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            s.sleepers -= 1;
        }
    }

    /// Wake every waiter as a release would (at shutdown, so that they see it).
    pub(crate) fn wake_all(&self) {
        let mut s = self.lock();
        s.releases = s.releases.wrapping_add(1);
        let rings = std::mem::take(&mut s.rings);
        drop(s);
        self.released.notify_all();
        for w in rings {
            w.wake();
        }
    }
}

/// The rule of the payload deadline (see the module documentation), which both
/// transmission loops consult: when a transfer starting now must be over, and how long the
/// next socket operation of a transfer may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PayloadDeadline {
    timeout: Option<Duration>,
}

/// A transfer's deadline has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Expired;

/// Which way a transfer that missed its deadline was going, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// A write's payload, from the client.
    Payload,
    /// Replies, to the client.
    Replies,
}

impl Direction {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Self::Payload => "write payload not received within the payload deadline",
            Self::Replies => "replies not taken by the client within the payload deadline",
        }
    }
}

impl PayloadDeadline {
    /// Transfers must be over within `timeout` of their start (`None`: no deadline).
    pub(crate) fn new(timeout: Option<Duration>) -> Self {
        Self {
            timeout: timeout.filter(|t| !t.is_zero()),
        }
    }

    /// The deadline of a transfer that starts at `now` (`None`: none).
    pub(crate) fn start(self, now: Instant) -> Transfer {
        Transfer {
            until: self.timeout.map(|t| now + t),
        }
    }

    /// The longest one socket operation may wait: the whole deadline (for the first
    /// operation of a transfer, which starts it).
    pub(crate) fn timeout(self) -> Option<Duration> {
        self.timeout
    }
}

/// One transfer in progress and when it must be over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transfer {
    until: Option<Instant>,
}

impl Transfer {
    /// The time left at `now`, as a socket timeout (`Ok(None)`: no deadline).
    pub(crate) fn left(self, now: Instant) -> Result<Option<Duration>, Expired> {
        let Some(until) = self.until else {
            return Ok(None);
        };
        let left = until.saturating_duration_since(now);
        if left.is_zero() {
            return Err(Expired);
        }
        Ok(Some(left))
    }

    /// Whether the deadline has passed at `now`.
    pub(crate) fn expired(self, now: Instant) -> bool {
        self.left(now).is_err()
    }

    /// The earliest deadline of the transfers in progress, for a wait that must wake to
    /// look at them (`None`: nothing to wake for).
    pub(crate) fn earliest(transfers: impl IntoIterator<Item = Option<Self>>) -> Option<Instant> {
        transfers
            .into_iter()
            .flatten()
            .filter_map(|t| t.until)
            .min()
    }
}

/// Why a request was not admitted yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// The connection's own bound: wait for its replies to go out.
    Connection,
    /// The shared budget: wait for a release (the value to pass to
    /// [`MemoryBudget::wait_budget`]).
    Budget(u64),
}

/// The one admission check of a connection's requests, used by both transmission loops:
/// the connection's own bound (requests and payload bytes in flight) and then the shared
/// [`MemoryBudget`]. Whatever is still charged when it is dropped is given back.
#[derive(Debug)]
pub(crate) struct ConnAdmission {
    budget: Arc<MemoryBudget>,
    peer: Option<IpAddr>,
    max_requests: usize,
    max_bytes: usize,
    count: usize,
    bytes: usize,
}

impl ConnAdmission {
    pub(crate) fn new(
        budget: Arc<MemoryBudget>,
        peer: Option<IpAddr>,
        max_requests: usize,
        max_bytes: usize,
    ) -> Self {
        Self {
            budget,
            peer: peer.map(peer_key),
            max_requests,
            max_bytes,
            count: 0,
            bytes: 0,
        }
    }

    /// Requests taken and not yet answered.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// Take a request of `cost` payload bytes if both bounds allow it; returns whether
    /// nothing else was in flight on this connection. A request is always within the
    /// connection's bound when nothing else is in flight on it. `ring` is woken by the next
    /// release of the shared budget if that refused.
    pub(crate) fn try_admit(
        &mut self,
        cost: usize,
        ring: Option<&Arc<Waker>>,
    ) -> Result<bool, Wait> {
        if self.count > 0 && (self.count >= self.max_requests || self.bytes + cost > self.max_bytes)
        {
            return Err(Wait::Connection);
        }
        self.budget
            .try_take(self.peer, cost, ring)
            .map_err(Wait::Budget)?;
        let alone = self.count == 0;
        self.count += 1;
        self.bytes += cost;
        Ok(alone)
    }

    /// Count a request that carries no payload and is answered whatever the bounds (an
    /// error reply before the connection closes).
    pub(crate) fn take_free(&mut self) {
        self.count += 1;
    }

    /// `frames` requests holding `cost` bytes between them were answered.
    pub(crate) fn release(&mut self, frames: usize, cost: usize) {
        self.count -= frames;
        self.bytes -= cost;
        self.budget.release(self.peer, cost);
    }

    /// The shared budget this connection draws on, to wait on it without holding the
    /// connection's lock.
    pub(crate) fn budget(&self) -> &Arc<MemoryBudget> {
        &self.budget
    }
}

impl Drop for ConnAdmission {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.release(self.peer, self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;
    const A: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)));
    const B: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)));

    fn budget(limit: usize, per_peer: usize) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget::new(limit * MIB, per_peer * MIB).unwrap())
    }

    fn conn(b: &Arc<MemoryBudget>, peer: Option<IpAddr>) -> ConnAdmission {
        ConnAdmission::new(Arc::clone(b), peer, 256, 64 * MIB)
    }

    #[test]
    fn budget_smaller_than_the_largest_payload_is_refused() {
        assert!(MemoryBudget::new(31 * MIB, 64 * MIB).is_err());
        assert!(MemoryBudget::new(64 * MIB, 31 * MIB).is_err());
        assert!(MemoryBudget::new(32 * MIB, 32 * MIB).is_ok());
    }

    #[test]
    fn shared_budget_refuses_past_the_total_across_connections_and_peers() {
        let b = budget(64, 64);
        let mut c1 = conn(&b, A);
        let mut c2 = conn(&b, B);
        let mut c3 = conn(&b, None);
        assert_eq!(c1.try_admit(32 * MIB, None), Ok(true));
        assert_eq!(c2.try_admit(32 * MIB, None), Ok(true));
        assert!(matches!(c3.try_admit(MIB, None), Err(Wait::Budget(_))));
        assert_eq!(b.used(), 64 * MIB);
        // Requests without payload never wait for the budget.
        assert_eq!(c3.try_admit(0, None), Ok(true));
        c1.release(1, 32 * MIB);
        assert_eq!(c3.try_admit(MIB, None), Ok(false));
        assert_eq!(b.used(), 33 * MIB);
    }

    #[test]
    fn one_peer_cannot_take_more_than_its_share() {
        let b = budget(256, 64);
        let mut a1 = conn(&b, A);
        let mut a2 = conn(&b, A);
        let mut a3 = conn(&b, A);
        let mut other = conn(&b, B);
        let mut local = conn(&b, None);
        assert!(a1.try_admit(32 * MIB, None).is_ok());
        assert!(a2.try_admit(32 * MIB, None).is_ok());
        assert!(matches!(a3.try_admit(4096, None), Err(Wait::Budget(_))));
        assert!(other.try_admit(32 * MIB, None).is_ok());
        assert!(local.try_admit(32 * MIB, None).is_ok());
        // The share comes back with the release.
        a2.release(1, 32 * MIB);
        assert!(a3.try_admit(32 * MIB, None).is_ok());
    }

    #[test]
    fn a_lone_request_of_the_largest_payload_fits_once_others_are_answered() {
        let b = budget(32, 32);
        let mut c1 = conn(&b, A);
        let mut c2 = conn(&b, A);
        assert!(c1.try_admit(16 * MIB, None).is_ok());
        assert!(c1.try_admit(16 * MIB, None).is_ok());
        assert!(matches!(c2.try_admit(32 * MIB, None), Err(Wait::Budget(_))));
        c1.release(1, 16 * MIB);
        assert!(matches!(c2.try_admit(32 * MIB, None), Err(Wait::Budget(_))));
        c1.release(1, 16 * MIB);
        assert_eq!(c2.try_admit(32 * MIB, None), Ok(true));
    }

    #[test]
    fn connection_bound_applies_before_the_budget_and_not_to_a_lone_request() {
        let b = budget(256, 256);
        let mut c = ConnAdmission::new(Arc::clone(&b), A, 2, MIB);
        // Over the connection's byte bound, but alone: admitted.
        assert_eq!(c.try_admit(8 * MIB, None), Ok(true));
        assert_eq!(c.try_admit(4096, None), Err(Wait::Connection));
        c.release(1, 8 * MIB);
        assert!(c.try_admit(4096, None).is_ok());
        assert!(c.try_admit(4096, None).is_ok());
        assert_eq!(c.try_admit(0, None), Err(Wait::Connection));
        assert_eq!(b.used(), 8192);
    }

    #[test]
    fn dropping_a_connection_gives_back_what_it_held() {
        let b = budget(64, 64);
        let mut c = conn(&b, A);
        assert!(c.try_admit(32 * MIB, None).is_ok());
        assert!(c.try_admit(MIB, None).is_ok());
        drop(c);
        assert_eq!(b.used(), 0);
        // The peer's share came back too.
        let mut d = conn(&b, A);
        assert!(d.try_admit(64 * MIB, None).is_ok());
    }

    #[test]
    fn a_waiting_thread_is_woken_by_a_release_on_another_connection() {
        let b = budget(32, 32);
        let mut holder = conn(&b, A);
        assert!(holder.try_admit(32 * MIB, None).is_ok());
        let mut waiter = conn(&b, B);
        let Err(Wait::Budget(seen)) = waiter.try_admit(MIB, None) else {
            panic!("admitted past the budget");
        };
        let t = std::thread::spawn(move || {
            b.wait_budget(seen, Duration::from_secs(60));
            waiter.try_admit(MIB, None)
        });
        holder.release(1, 32 * MIB);
        assert_eq!(t.join().unwrap(), Ok(true));
    }

    #[test]
    fn handshakes_are_limited_in_total_and_per_peer_and_given_back() {
        let slots = Arc::new(Slots::new(3, 2, 10));
        let a1 = slots.begin(A).unwrap();
        let _a2 = slots.begin(A).unwrap();
        assert_eq!(slots.begin(A).unwrap_err(), Refusal::PeerHandshakes);
        let _b1 = slots.begin(B).unwrap();
        assert_eq!(slots.begin(B).unwrap_err(), Refusal::Handshakes);
        assert_eq!(slots.begin(None).unwrap_err(), Refusal::Handshakes);
        drop(a1);
        assert_eq!(slots.counts(), (2, 0));
        let _a3 = slots.begin(A).unwrap();
        assert_eq!(slots.begin(A).unwrap_err(), Refusal::Handshakes);
        assert_eq!(slots.counts(), (3, 0));
    }

    #[test]
    fn established_connections_do_not_count_as_handshakes() {
        let slots = Arc::new(Slots::new(1, 1, 2));
        let e1 = slots.begin(A).unwrap().establish().unwrap();
        let _e2 = slots.begin(A).unwrap().establish().unwrap();
        assert_eq!(slots.counts(), (0, 2));
        // Every established slot is taken: new connections are closed at once, and a
        // handshake that finishes then is refused.
        assert_eq!(slots.begin(B).unwrap_err(), Refusal::Connections);
        drop(e1);
        let h = slots.begin(B).unwrap();
        assert_eq!(slots.begin(None).unwrap_err(), Refusal::Handshakes);
        assert_eq!(slots.counts(), (1, 1));
        let e5 = h.establish().unwrap();
        assert_eq!(slots.counts(), (0, 2));
        drop(e5);
        assert_eq!(slots.counts(), (0, 1));
    }

    #[test]
    fn handshake_that_finishes_when_connections_are_full_is_refused() {
        let slots = Arc::new(Slots::new(4, 4, 1));
        let h1 = slots.begin(A).unwrap();
        let h2 = slots.begin(A).unwrap();
        let _e1 = h1.establish().unwrap();
        assert_eq!(h2.establish().unwrap_err(), Refusal::Connections);
        assert_eq!(slots.counts(), (0, 1));
    }

    #[test]
    fn ipv6_peers_are_counted_by_their_64_network() {
        let slots = Arc::new(Slots::new(8, 1, 8));
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let _h = slots.begin(ip("2001:db8:1:2::1")).unwrap();
        assert_eq!(
            slots.begin(ip("2001:db8:1:2:ffff::9")).unwrap_err(),
            Refusal::PeerHandshakes
        );
        assert!(slots.begin(ip("2001:db8:1:3::1")).is_ok());
    }

    #[test]
    fn a_transfer_must_be_over_within_the_deadline_of_its_start() {
        let t0 = Instant::now();
        let d = PayloadDeadline::new(Some(Duration::from_secs(3)));
        assert_eq!(d.timeout(), Some(Duration::from_secs(3)));
        let t = d.start(t0);
        assert_eq!(t.left(t0), Ok(Some(Duration::from_secs(3))));
        // Progress does not move it: the time left only shrinks.
        assert_eq!(
            t.left(t0 + Duration::from_secs(2)),
            Ok(Some(Duration::from_secs(1)))
        );
        assert!(!t.expired(t0 + Duration::from_millis(2999)));
        assert_eq!(t.left(t0 + Duration::from_secs(3)), Err(Expired));
        assert!(t.expired(t0 + Duration::from_secs(60)));
        // A transfer started later has its own deadline.
        let later = d.start(t0 + Duration::from_secs(10));
        assert!(!later.expired(t0 + Duration::from_secs(12)));
    }

    #[test]
    fn no_payload_deadline_never_expires() {
        let t0 = Instant::now();
        for d in [
            PayloadDeadline::new(None),
            PayloadDeadline::new(Some(Duration::ZERO)),
        ] {
            assert_eq!(d.timeout(), None);
            let t = d.start(t0);
            assert_eq!(t.left(t0 + Duration::from_secs(1 << 20)), Ok(None));
            assert_eq!(Transfer::earliest([Some(t), None]), None);
        }
    }

    #[test]
    fn the_earliest_deadline_is_the_one_to_wake_for() {
        let t0 = Instant::now();
        let d = PayloadDeadline::new(Some(Duration::from_secs(5)));
        let a = d.start(t0 + Duration::from_secs(2));
        let b = d.start(t0);
        assert_eq!(Transfer::earliest([None, None]), None);
        assert_eq!(
            Transfer::earliest([Some(a), None]),
            Some(t0 + Duration::from_secs(7))
        );
        assert_eq!(
            Transfer::earliest([Some(a), Some(b)]),
            Some(t0 + Duration::from_secs(5))
        );
    }

    #[test]
    fn throttle_logs_once_per_interval_and_counts_the_rest() {
        let t = Throttle::default();
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        *t.last.lock().unwrap() = Some(Instant::now() - LOG_INTERVAL);
        assert_eq!(t.allow(), Some(2));
    }
}
