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
//! [`socket`] is how every listening socket (NBD over unix and TCP, the control socket) is
//! served and stopped: accept loops woken by an eventfd rather than by connecting to their
//! own address, and unix socket files replaced only when stale and removed only while ours.
//!
//! [`limits`] raises the process's open-file limit for a daemon that holds many sockets.
//!
//! This is one of the two crates allowed `unsafe` (for `ioctl`, `fallocate`, io_uring,
//! `eventfd`, `poll` and `setrlimit`); each block says why it is sound.

#![deny(missing_docs)]

mod file;
pub mod identity;
pub mod limits;
pub mod socket;
pub mod uring;

pub use file::{AccessMode, FileDevice, OpenError, OpenOptions};

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};

/// A new eventfd (close-on-exec, blocking, counter zero), as a `File` for its reads and
/// writes of eight bytes.
pub(crate) fn eventfd() -> std::io::Result<File> {
    // SAFETY: eventfd takes plain integers and returns a new descriptor or -1.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor just returned by eventfd and owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(raw) }))
}
