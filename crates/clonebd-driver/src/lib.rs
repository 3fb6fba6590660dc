//! clonebd-driver: the engine, run on devices.
//!
//! - [`Volume`] runs a [`clonebd_core::engine::Engine`] with threads: request threads execute
//!   their own I/O, a pool runs background copies, a timer thread delivers deadlines. Reads,
//!   and plain writes to hydrated regions, take a lock-free fast path straight to the device.
//!   Once finalized ([`Volume::finalize`]) the source is detached and every request goes
//!   straight to the destination.
//! - [`exec`] performs one engine action on the devices; the threaded driver and the
//!   deterministic simulator share it, so what is simulated is what runs.
//! - [`export`]: [`BlockExport`], what NBD, FUSE and ublk serve, implemented once by
//!   [`Volume`], and [`IoError`], the one error of its requests, with its errno.
//! - [`MetadataBackend`] is the seam to the metadata store; its failures are
//!   [`BackendError`]s.
//! - [`metrics`]: lock-free counters and latency histograms of requests and commits.
//! - [`record`]: the order in which clients first read cold regions, written to a file
//!   off the read path (`--record-reads`).

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod exec;
pub mod export;
mod meta;
pub mod metrics;
pub mod record;
mod volume;

pub use export::{BlockExport, ExportCaps, IoError};
pub use meta::{BackendError, MetadataBackend, MetadataUsage, StoreBackend};
pub use volume::{
    FillStats, FinalizeError, Finalized, MonotonicClock, Routed, Volume, VolumeOptions,
    VolumeStatus,
};
