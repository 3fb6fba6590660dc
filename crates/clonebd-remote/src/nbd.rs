//! An export on an NBD server (qemu-nbd, nbdkit, nbd-server, another clonebd) as a
//! read-only block device.
//!
//! Opening connects once, with the handshake of [`clonebd_nbd::Client`] (structured replies
//! when the server offers them, `NBD_OPT_GO` with the block sizes), and takes the export's
//! size and transmission flags. Reads then go over [`MuxClient`] connections, each carrying
//! the reads of many threads at once: `--source-connections` of them when the server says
//! several connections see the same data (`NBD_FLAG_CAN_MULTI_CONN`) or the export is
//! read-only, else one; and fewer when the server does not greet the extra connections (a
//! qemu-nbd without `--shared` takes one client). A read larger than the server's maximum
//! payload is split, and one not aligned to its minimum block size is widened to it.
//!
//! Faults, all under `retry::request` (the same rules as HTTP): a connect and every
//! read have a timeout; a connection that breaks (reset, the server gone, a reply that does
//! not come in time, a protocol violation) is dropped, and the reads that were on it are sent
//! again on a new one, connected and negotiated afresh; an error the server answers with
//! (`EIO`, say) is retried too, except for those a retry cannot change (`EINVAL`, `ENOSPC`,
//! `EPERM`). A new connection must find the export as it was: of another size, or with
//! other transmission flags, the source is marked changed, and this read and every later
//! one fail.
//!
//! Every connection asks for the `base:allocation` metadata context. Where the server gives
//! it, [`BlockDev::extent`] is answered from `NBD_CMD_BLOCK_STATUS`: runs the server marks
//! `NBD_STATE_ZERO` are known zeros, which hydration zeroes on the destination without
//! reading them. One query asks for [`STATUS_SPAN`] at once, and its answer is kept for the
//! queries within it that follow (the copy threads ask piece after piece; the source does
//! not change while a clone lasts, its identity pinned). A server that refuses a query is
//! taken to know nothing there: the piece is read.
//!
//! With `nbds://`, every connection asks for TLS first (`NBD_OPT_STARTTLS`), verifies the
//! server's certificate for the URI's host (`localhost` on a unix socket), and runs the
//! rest through [`crate::tls::relay`].

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use clonebd_core::{BlockDev, Caps, Extent};
use clonebd_nbd::proto::opt;
use clonebd_nbd::proto::{
    CONTEXT_BASE_ALLOCATION, STATE_ZERO, errno, rep, transmission_flags as tf,
};
use clonebd_nbd::{ClientError, ClientOptions, MuxClient, StartTls};
use thiserror::Error;

use crate::SourceIdentity;
use crate::retry::{Failure, Policy, request};
use crate::stats::{SourceState, SourceStats};
use crate::uri::NbdAddr;

/// How an NBD source is reached.
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// Retries and the deadline of every read (`--source-timeout`).
    pub policy: Policy,
    /// Time limit of a connect and handshake.
    pub connect_timeout: Duration,
    /// Time limit of each read's reply.
    pub attempt_timeout: Duration,
    /// Connections, where the server allows several (`--source-connections`).
    pub connections: usize,
    /// Over TLS with this configuration (`nbds://`; [`crate::tls::config`]).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for NbdOptions {
    fn default() -> Self {
        Self {
            policy: Policy::default(),
            connect_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(30),
            connections: 4,
            tls: None,
        }
    }
}

/// How much one block status query asks about: runs beyond the piece asked for answer the
/// pieces after it without another round trip.
pub const STATUS_SPAN: u64 = 64 << 20;

/// How long a connection beyond the first may take to be greeted when the source is opened.
const EXTRA_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why an NBD source could not be opened or adopted.
#[derive(Debug, Error)]
#[error("source {uri}: {why}")]
pub struct NbdError {
    /// The URI.
    pub uri: String,
    /// What is wrong.
    pub why: String,
}

/// An NBD export, read-only.
#[derive(Debug)]
pub struct NbdSource {
    addr: NbdAddr,
    export: String,
    opts: NbdOptions,
    size: u64,
    flags: u16,
    max_read: usize,
    min_block: u64,
    conns: Vec<Slot>,
    next: AtomicUsize,
    stats: Arc<SourceStats>,
    /// The server gave `base:allocation` (on the first connection).
    zero_status: bool,
    /// The runs of the last block status answer: `(start, end, zero)`, in order.
    status: Mutex<Vec<(u64, u64, bool)>>,
}

/// One connection's place: the connection while it works, and a lock held by the one
/// read that connects it again, so that the others do not queue behind a connect (each has
/// its own deadline): they back off and try again.
#[derive(Debug, Default)]
struct Slot {
    conn: Mutex<Option<Arc<MuxClient>>>,
    /// Held while connecting.
    connecting: Mutex<()>,
    /// Why the last connect failed, for the reads that wait meanwhile.
    last: Mutex<Option<String>>,
}

/// Locks `m`, taking a poisoned lock as is (the slot holds a connection or none).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl NbdSource {
    /// Connects to `export` at `addr` (shown as `uri`) and takes its size and flags.
    pub fn open(
        addr: NbdAddr,
        export: String,
        uri: String,
        opts: &NbdOptions,
    ) -> Result<NbdSource, NbdError> {
        let stats = Arc::new(SourceStats::new(uri.clone()));
        let mut src = NbdSource {
            addr,
            export,
            opts: opts.clone(),
            size: 0,
            flags: 0,
            max_read: 0,
            min_block: 1,
            conns: Vec::new(),
            next: AtomicUsize::new(0),
            stats,
            zero_status: false,
            status: Mutex::new(Vec::new()),
        };
        let first = request(&src.opts.policy, &src.stats, |left| src.connect(left))
            .map_err(|why| NbdError { uri, why })?;
        src.size = first.size();
        src.flags = first.transmission_flags();
        src.zero_status = first
            .meta_contexts()
            .iter()
            .any(|c| c.name == CONTEXT_BASE_ALLOCATION);
        // At most 4 MiB per request: large enough for any copy, small enough to share.
        // "the client MUST ... use lengths and offsets that are a multiple of the minimum
        // block size": reads that are not are widened to it (`read_at`).
        src.min_block = u64::from(first.block_sizes().minimum.max(1));
        let unit = src.min_block as usize;
        src.max_read = (first.max_read().min(4 << 20) / unit).max(1) * unit;
        let several = src.flags & (tf::CAN_MULTI_CONN | tf::READ_ONLY) != 0;
        let want = if several { opts.connections.max(1) } else { 1 };
        // All connections now: a server that takes fewer clients (qemu-nbd takes one unless
        // given --shared) leaves the extra ones without a greeting, and reads are then
        // spread over the ones it took, not sent to one it never answers.
        let mut conns = vec![Arc::new(first)];
        while conns.len() < want {
            match src.connect(EXTRA_CONNECT_TIMEOUT.min(opts.connect_timeout)) {
                Ok(c) => conns.push(Arc::new(c)),
                Err(f) => {
                    tracing::warn!(
                        source = src.stats.uri(),
                        "the server took {} of the {want} connections asked for (the next: {}); reads share those",
                        conns.len(),
                        f.describe()
                    );
                    break;
                }
            }
        }
        let n = conns.len();
        src.conns = conns
            .into_iter()
            .map(|c| Slot {
                conn: Mutex::new(Some(c)),
                connecting: Mutex::new(()),
                last: Mutex::new(None),
            })
            .collect();
        src.stats.set_state(SourceState::Connected);
        tracing::info!(
            source = src.stats.uri(),
            size = src.size,
            flags = format!("{:#x}", src.flags),
            connections = n,
            block_status = src.zero_status,
            "NBD source connected"
        );
        Ok(src)
    }

    /// The counters and state, for `status`.
    pub fn stats(&self) -> Arc<SourceStats> {
        Arc::clone(&self.stats)
    }

    /// Connections reads are spread over.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// The identity the export has: its size and name.
    pub fn identity(&self) -> SourceIdentity {
        let mut marks = std::collections::BTreeMap::new();
        marks.insert("export".to_string(), self.export.clone());
        SourceIdentity {
            uri: self.stats.uri().to_string(),
            size: self.size,
            marks,
        }
    }

    /// Goes on with the identity pinned when the clone began; refused, naming the
    /// difference, when the export is not that one.
    pub fn adopt(&self, pinned: &SourceIdentity) -> Result<(), NbdError> {
        match pinned.difference(&self.identity()) {
            None => Ok(()),
            Some(why) => {
                self.stats.failed(&why, SourceState::Changed);
                Err(NbdError {
                    uri: self.stats.uri().to_string(),
                    why: format!(
                        "changed since the clone began ({why}); refusing to mix its bytes with those copied before"
                    ),
                })
            }
        }
    }

    /// One connection, negotiated, checked against what the first one found.
    /// `left` is what the request has left of its deadline.
    fn connect(&self, left: Duration) -> Result<MuxClient, Failure> {
        let mut o = ClientOptions::new(&self.export).meta_context(CONTEXT_BASE_ALLOCATION);
        let t = self.opts.connect_timeout.min(left);
        o.timeout = Some(t);
        o.connect_timeout = Some(t);
        if let Some(config) = &self.opts.tls {
            // The name the certificate must carry: the host, or on a unix socket, localhost.
            let host = match &self.addr {
                NbdAddr::Tcp { host, .. } => host.clone(),
                NbdAddr::Unix(_) => "localhost".to_string(),
            };
            let config = Arc::clone(config);
            o.starttls = Some(StartTls(Arc::new(move |socket| {
                crate::tls::relay(socket, &config, &host, t)
            })));
        }
        let c = match &self.addr {
            NbdAddr::Unix(path) => o.connect_unix(path),
            NbdAddr::Tcp { host, port } => o.connect_tcp((host.as_str(), *port)),
        }
        .and_then(|c| MuxClient::new(c, Some(self.opts.attempt_timeout)))
        .map_err(|e| classify(&e, "connecting"))?;
        if self.size != 0 || self.flags != 0 {
            if c.size() != self.size {
                return Err(Failure::Changed(format!(
                    "its size was {} bytes and is {} bytes now",
                    self.size,
                    c.size()
                )));
            }
            if c.transmission_flags() != self.flags {
                return Err(Failure::Changed(format!(
                    "its transmission flags were {:#x} and are {:#x} now",
                    self.flags,
                    c.transmission_flags()
                )));
            }
        }
        Ok(c)
    }

    /// The connection in slot `i`, connected now if it is not (or no longer) working.
    fn conn(&self, i: usize, left: Duration) -> Result<Arc<MuxClient>, Failure> {
        let slot = &self.conns[i];
        let working = |c: &Option<Arc<MuxClient>>| {
            c.as_ref().filter(|c| c.broken().is_none()).map(Arc::clone)
        };
        if let Some(c) = working(&lock(&slot.conn)) {
            return Ok(c);
        }
        let _connecting = match slot.connecting.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                let why = match lock(&slot.last).as_deref() {
                    Some(last) => format!("{last} (another read is connecting again)"),
                    None => "another read is connecting again".to_string(),
                };
                return Err(Failure::Transient(why, None));
            }
        };
        // Made again by another read meanwhile?
        if let Some(c) = working(&lock(&slot.conn)) {
            return Ok(c);
        }
        *lock(&slot.conn) = None;
        match self.connect(left) {
            Ok(c) => {
                tracing::info!(
                    source = self.stats.uri(),
                    connection = i,
                    "NBD source reconnected"
                );
                let c = Arc::new(c);
                *lock(&slot.conn) = Some(Arc::clone(&c));
                *lock(&slot.last) = None;
                Ok(c)
            }
            Err(f) => {
                *lock(&slot.last) = Some(f.describe().to_string());
                Err(f)
            }
        }
    }

    /// One attempt at one read, with `left` of the request's deadline.
    fn attempt(&self, buf: &mut [u8], offset: u64, left: Duration) -> Result<(), Failure> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        let c = self.conn(i, left)?;
        c.read(offset, buf, self.opts.attempt_timeout.min(left))
            .map_err(|e| {
                if c.broken().is_some() {
                    let mut slot = lock(&self.conns[i].conn);
                    if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, &c)) {
                        *slot = None;
                    }
                }
                classify(&e, "reading")
            })
    }
}

/// Runs of a range as a server's `base:allocation` describes them: `(start, end, zero)`,
/// byte offsets, adjacent runs alike merged.
type ZeroRuns = Vec<(u64, u64, bool)>;

impl NbdSource {
    /// One attempt at one block status query: the runs of `[offset, offset+len)` the
    /// server describes, merged where alike; `None` when the server refuses to say.
    fn status_attempt(
        &self,
        offset: u64,
        len: u64,
        left: Duration,
    ) -> Result<Option<ZeroRuns>, Failure> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        let c = self.conn(i, left)?;
        let extents = match c.block_status(
            CONTEXT_BASE_ALLOCATION,
            offset,
            len,
            self.opts.attempt_timeout.min(left),
        ) {
            Ok(e) => e,
            // An answer, not a failure: the server cannot tell here (or on this connection).
            Err(ClientError::Server { .. } | ClientError::NoContext(_)) => return Ok(None),
            Err(e) => {
                if c.broken().is_some() {
                    let mut slot = lock(&self.conns[i].conn);
                    if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, &c)) {
                        *slot = None;
                    }
                }
                return Err(classify(&e, "asking for block status"));
            }
        };
        let end = offset + len;
        let mut runs: ZeroRuns = Vec::new();
        let mut at = offset;
        for e in extents {
            if at >= end {
                break;
            }
            // "the final extent MAY exceed the requested length": clipped.
            let stop = at.saturating_add(e.length).min(end);
            let zero = e.flags & STATE_ZERO != 0;
            match runs.last_mut() {
                Some(last) if last.2 == zero => last.1 = stop,
                _ => runs.push((at, stop, zero)),
            }
            at = stop;
        }
        Ok((!runs.is_empty()).then_some(runs))
    }
}

/// The run of `runs` holding `offset`, clipped to `end`.
fn run_at(runs: &[(u64, u64, bool)], offset: u64, end: u64) -> Option<Extent> {
    runs.iter()
        .find(|&&(s, e, _)| s <= offset && offset < e)
        .map(|&(_, e, zero)| Extent {
            len: e.min(end) - offset,
            zero,
        })
}

/// What a failed connect or read means for retrying.
fn classify(e: &ClientError, doing: &str) -> Failure {
    match e {
        ClientError::Server { value, .. }
            if matches!(*value, errno::EINVAL | errno::ENOSPC | errno::EPERM) =>
        {
            Failure::Fatal(format!("the server refused the read: {e}"))
        }
        ClientError::Server { .. } => {
            Failure::Transient(format!("the server answered the read with {e}"), None)
        }
        ClientError::Io(io) if let Some(f) = Failure::of_tls(io) => f,
        // A socket timeout reads as EAGAIN: say what it is.
        ClientError::Io(io)
            if matches!(
                io.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Failure::Transient(format!("{doing}: no answer in time"), None)
        }
        ClientError::Io(io) => Failure::Transient(
            format!("{doing}: {}", clonebd_core::errno::describe(io)),
            None,
        ),
        ClientError::Broken => Failure::Transient(
            format!("{doing}: the connection broke; the read is sent again"),
            None,
        ),
        ClientError::OptionRefused { reply, .. } if *reply == rep::ERR_UNKNOWN => {
            Failure::Fatal("the server has no export of that name".to_string())
        }
        ClientError::OptionRefused { reply, .. } if *reply == rep::ERR_TLS_REQD => {
            Failure::Fatal("the server requires TLS: use nbds:// (or nbds+unix://)".to_string())
        }
        ClientError::OptionRefused { option, .. } if *option == opt::STARTTLS => {
            Failure::Fatal("the server does not offer TLS".to_string())
        }
        ClientError::NotNewstyle { .. } | ClientError::OptionRefused { .. } => {
            Failure::Fatal(format!("{doing}: {e}"))
        }
        // A server that breaks the protocol may have been interrupted mid-reply.
        other => Failure::Transient(format!("{doing}: {other}"), None),
    }
}

impl NbdSource {
    /// Reads `buf` at `offset`, both aligned to the server's minimum block size, in pieces
    /// of at most its maximum payload.
    fn read_aligned(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut at = offset;
        for piece in buf.chunks_mut(self.max_read) {
            request(&self.opts.policy, &self.stats, |left| {
                self.attempt(piece, at, left)
            })
            .map_err(|why| io::Error::other(format!("source {}: {why}", self.stats.uri())))?;
            at += piece.len() as u64;
        }
        Ok(())
    }
}

impl BlockDev for NbdSource {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        crate::readonly::CAPS
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        crate::readonly::check_read(offset, buf.len(), self.size)?;
        let end = offset + buf.len() as u64;
        let min = self.min_block;
        if offset.is_multiple_of(min) && (end.is_multiple_of(min) || end == self.size) {
            return self.read_aligned(buf, offset);
        }
        let start = offset / min * min;
        let stop = end.div_ceil(min).saturating_mul(min).min(self.size);
        let mut wide = vec![0u8; (stop - start) as usize];
        self.read_aligned(&mut wide, start)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&wide[skip..skip + buf.len()]);
        Ok(())
    }

    /// From `NBD_CMD_BLOCK_STATUS` in `base:allocation`, where the server gave it: a run it
    /// marks `NBD_STATE_ZERO` reads as zeros. Otherwise, or at an offset not aligned to the
    /// server's minimum block size, all may hold data.
    fn extent(&self, offset: u64, len: u64) -> io::Result<Extent> {
        let unknown = Extent { len, zero: false };
        if !self.zero_status || len == 0 || !offset.is_multiple_of(self.min_block) {
            return Ok(unknown);
        }
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("block status at {offset}+{len} past the end of the source"),
                )
            })?;
        if let Some(e) = run_at(&lock(&self.status), offset, end) {
            return Ok(e);
        }
        // Ask for a span, aligned to the minimum block size unless it reaches the end.
        let span = STATUS_SPAN.max(len).min(self.size - offset);
        let span = if offset + span == self.size {
            span
        } else {
            (span / self.min_block * self.min_block).max(self.min_block)
        };
        let runs = request(&self.opts.policy, &self.stats, |left| {
            self.status_attempt(offset, span, left)
        })
        .map_err(|why| io::Error::other(format!("source {}: {why}", self.stats.uri())))?;
        let Some(runs) = runs else {
            return Ok(unknown);
        };
        let e = run_at(&runs, offset, end).unwrap_or(unknown);
        *lock(&self.status) = runs;
        Ok(e)
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(crate::readonly::refuse_write(self.stats.uri()))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64) -> io::Result<()> {
        self.write_at(&[], 0)
    }
}
