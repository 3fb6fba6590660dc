//! The clonebd daemon and its tools, as a library the `clonebd` binary runs.
//!
//! - [`daemon`]: `clonebd run`: open, serve, shut down cleanly;
//! - [`demo`]: `clonebd demo`: a clone's whole life with real I/O, verified;
//! - [`export_nbd`]: the clone as an NBD export;
//! - [`control`]: the control socket protocol, server and client;
//! - [`metrics`]: the Prometheus endpoint (`--metrics`);
//! - [`order`]: the files of the hydration order (`--hydrate-first`, `--record-reads`);
//! - [`notify`]: systemd's readiness, status and watchdog notifications;
//! - [`pin`]: a remote source's identity, pinned with the clone;
//! - [`source`]: opening the source, local or remote, read-only;
//! - [`status`]: the dm-clone status line and the JSON status;
//! - [`units`]: sizes as people write them.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod control;
pub mod daemon;
pub mod demo;
pub mod export_nbd;
pub mod metrics;
pub mod notify;
pub mod order;
pub mod pin;
pub mod source;
pub mod status;
pub mod units;
