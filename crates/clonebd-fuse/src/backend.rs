//! What the file is made of: [`BlockBackend`], a block device addressed in logical blocks,
//! implemented by the clone's [`Volume`], and the one mapping from the engine's
//! [`IoStatus`] to the errno a FUSE reply carries.

use clonebd_core::engine::IoStatus;
use clonebd_driver::Volume;
use fuser::Errno;

/// A block device the FUSE file exposes. Offsets and lengths handed to it are multiples of
/// [`logical_block_size`](BlockBackend::logical_block_size) and inside
/// [`size_bytes`](BlockBackend::size_bytes); calls block and may come from many threads.
pub trait BlockBackend: Send + Sync + 'static {
    /// Size in bytes.
    fn size_bytes(&self) -> u64;
    /// The smallest unit of I/O, in bytes (a power of two, at least 512).
    fn logical_block_size(&self) -> u32;
    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoStatus>;
    /// Writes `data` at `offset`; with `fua`, durable when it returns.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), IoStatus>;
    /// Makes every write completed before the call durable.
    fn flush(&self) -> Result<(), IoStatus>;
    /// Discards `[offset, offset+len)`: afterwards the range reads as anything.
    fn discard(&self, offset: u64, len: u64) -> Result<(), IoStatus>;
    /// Makes `[offset, offset+len)` read as zeros.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), IoStatus>;
}

impl BlockBackend for Volume {
    fn size_bytes(&self) -> u64 {
        Volume::size_bytes(self)
    }

    fn logical_block_size(&self) -> u32 {
        Volume::logical_block_size(self)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoStatus> {
        Volume::read(self, offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), IoStatus> {
        Volume::write(self, offset, data, fua)
    }

    fn flush(&self) -> Result<(), IoStatus> {
        Volume::flush(self)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), IoStatus> {
        Volume::discard(self, offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), IoStatus> {
        Volume::write_zeroes(self, offset, len, fua)
    }
}

/// The one mapping from engine statuses to the errno of a FUSE reply.
pub fn errno_of(s: IoStatus) -> Errno {
    match s {
        // `Ok` never reaches here as an error; treat a confused caller as an I/O error.
        IoStatus::Ok | IoStatus::Io => Errno::EIO,
        IoStatus::NoSpace => Errno::ENOSPC,
        IoStatus::Invalid => Errno::EINVAL,
        IoStatus::ReadOnly => Errno::EROFS,
        IoStatus::NotSupported => Errno::EOPNOTSUPP,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_of_each_status_is_distinct_and_meaningful() {
        assert_eq!(errno_of(IoStatus::Io).code(), libc::EIO);
        assert_eq!(errno_of(IoStatus::NoSpace).code(), libc::ENOSPC);
        assert_eq!(errno_of(IoStatus::Invalid).code(), libc::EINVAL);
        assert_eq!(errno_of(IoStatus::ReadOnly).code(), libc::EROFS);
        assert_eq!(errno_of(IoStatus::NotSupported).code(), libc::EOPNOTSUPP);
    }
}
