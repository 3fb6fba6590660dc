//! clonebd-nbd: an NBD server for clonebd exports.
//!
//! - [`proto`]: protocol constants and small enums;
//! - [`backend`]: the [`Backend`] trait an export implements, and [`NbdError`];
//! - [`handshake`]: the fixed newstyle handshake as a sans-IO state machine;
//! - [`codec`]: transmission-phase request decoding and reply encoding, sans-IO;
//! - [`transmission`]: the transmission phase as a sans-IO state machine over the codec,
//!   which both of the server's drivers run (threads, and io_uring);
//! - [`server`]: the server over unix and TCP sockets;
//! - [`admission`]: handshake and connection slots, and the payload memory budget shared by
//!   connections;
//! - [`client`]: a blocking client over the same codec, one request at a time;
//! - [`mux`]: the same client's connection shared by many threads, replies in any order.
//!
//! The codec, the handshake and the transmission machine perform no I/O and allocate nothing whose size a peer chooses
//! beyond fixed caps (32 MiB of payload, 64 KiB of option data), so they can be fuzzed alone.
//! The server reads each connection on its own thread, runs requests on a shared worker pool,
//! and writes replies from one writer thread per connection, so replies go out of order but
//! never interleave. With [`ServerConfig::io_uring`] (the default) a connection's thread
//! instead does its socket I/O, and the reads and writes its backend routes, through one
//! io_uring instance, and only the other requests go to the worker pool.

//! Protocol choices, where the protocol leaves room:
//!
//! - Requests past the end of the export get `NBD_ENOSPC` for writes and write-zeroes and
//!   `NBD_EINVAL` otherwise, as the protocol recommends; unaligned requests, zero lengths,
//!   flags not valid for the command and commands not advertised get `NBD_EINVAL`. The
//!   connection goes on, with any write payload consumed.
//! - A write payload above 32 MiB is answered with `NBD_EINVAL` and the connection closed
//!   without reading it.
//! - `NBD_INFO_BLOCK_SIZE` is always sent and always enforced.
//! - Reads are answered in one chunk (so `NBD_FLAG_SEND_DF` is advertised with structured
//!   replies); errors go in `NBD_REPLY_TYPE_ERROR` chunks when structured replies are in use.
//! - With extended headers every reply uses the extended header (success is
//!   `NBD_REPLY_TYPE_NONE`), its offset field echoes the request's, block status uses
//!   `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`, and a payload on any command but a write
//!   (`NBD_CMD_FLAG_PAYLOAD_LEN`) is skipped and refused with `NBD_EINVAL`.

#![deny(missing_docs)]
#![forbid(unsafe_code)]
// Tests may unwrap: a panic there is a failed test, not a broken connection.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod admission;
pub mod backend;
pub mod client;
pub mod codec;
pub mod handshake;
pub mod mux;
pub mod proto;
pub mod server;
pub mod transmission;

mod config;
mod conn;
mod exec;
mod pool;
mod ring;
mod shared;
mod stream;
mod threads;

pub use admission::MemoryBudget;
pub use backend::{
    Backend, BackendFlags, BlockSizes, Extent, NbdError, Route, RouteKind, Segment, ZeroFlags,
};
pub use client::{Client, ClientError, ClientOptions, Socket, StartTls};
pub use handshake::{ExportInfo, Handshake, MetaContext, Negotiated};
pub use mux::MuxClient;
pub use server::{Server, ServerConfig, ServerError, ServerStats, ServerTls, ShutdownHandle};
