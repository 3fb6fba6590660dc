//! clonebd-nbd: an NBD server for clonebd exports.
//!
//! - [`proto`]: protocol constants and small enums;
//! - [`backend`]: the [`Backend`] trait an export implements, and [`NbdError`];
//! - [`handshake`]: the fixed newstyle handshake as a sans-IO state machine;
//! - [`codec`]: transmission-phase request decoding and reply encoding, sans-IO;
//! - [`server`]: the threaded server over unix and TCP sockets.
//!
//! The codec and the handshake perform no I/O and allocate nothing whose size a peer chooses
//! beyond fixed caps (32 MiB of payload, 64 KiB of option data), so they can be fuzzed alone.
//! The server reads each connection on its own thread, runs requests on a shared worker pool,
//! and writes replies from one writer thread per connection, so replies go out of order but
//! never interleave.

#![deny(missing_docs)]
#![forbid(unsafe_code)]
// Tests may unwrap: a panic there is a failed test, not a broken connection.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod backend;
pub mod codec;
pub mod handshake;
pub mod proto;
pub mod server;

mod conn;
mod pool;

pub use backend::{Backend, BackendFlags, BlockSizes, Extent, NbdError, ZeroFlags};
pub use handshake::{ExportInfo, Handshake, MetaContext, Negotiated};
pub use server::{Server, ServerConfig, ServerError, ServerStats, ShutdownHandle};
