//! What every remote source's [`clonebd_core::BlockDev`] shares: it cannot discard, zero or
//! cache writes, a read must lie inside it, and a write is refused without anything sent.

use std::io;

use clonebd_core::Caps;

/// A remote source's capabilities: none of the writing ones.
pub(crate) const CAPS: Caps = Caps {
    discard: false,
    write_zeroes: false,
    volatile_cache: false,
};

/// A read of `len` bytes at `offset` of a source of `size` bytes must lie inside it.
pub(crate) fn check_read(offset: u64, len: usize, size: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("read at {offset}+{len} past the end of the source"),
        )),
    }
}

/// The error of any write to the source shown as `uri`.
pub(crate) fn refuse_write(uri: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("source {uri} is read-only"),
    )
}
