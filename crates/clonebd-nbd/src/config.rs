//! The server's settings ([`ServerConfig`]), its TLS hook ([`ServerTls`]) and why it cannot
//! start ([`ServerError`]): what the server, admission and each connection read, kept apart
//! from the server itself so that they depend on it in one direction only. Re-exported from
//! [`crate::server`].

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::handshake::ExportError;
#[cfg(doc)]
use crate::server::Server;

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
