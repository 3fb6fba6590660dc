//! clonebd-io: the devices clonebd runs on, at the edge where the system is called.
//!
//! [`FileDevice`] serves regular files and block devices through the
//! [`clonebd_core::BlockDev`] trait: positional reads and writes (with `O_DIRECT` where the
//! device allows it and the request is aligned), `fdatasync`, discard (hole punching or
//! `BLKDISCARD`), zeroing (`FALLOC_FL_ZERO_RANGE` or `BLKZEROOUT`), and an exclusive
//! advisory lock so that one process owns a device at a time (SPEC 9, H2).
//!
//! [`identity`] tells which storage a path names and what it lies on, so that a clone's
//! source, destination and metadata never share any.
//!
//! [`uring`] submits many reads, writes and socket transfers with one system call: a safe
//! io_uring wrapper that owns the buffers of the operations in flight.
//!
//! [`limits`] raises the process's open-file limit for a daemon that holds many sockets.
//!
//! This is one of the two crates allowed `unsafe` (for `ioctl`, `fallocate` and io_uring);
//! each block says why it is sound.

#![deny(missing_docs)]

mod file;
pub mod identity;
pub mod limits;
pub mod uring;

pub use file::{AccessMode, FileDevice, OpenError, OpenOptions};
