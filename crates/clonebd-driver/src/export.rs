//! What every export serves: [`BlockExport`], the block device NBD, FUSE and ublk put in
//! front of their clients, implemented once, by [`Volume`](crate::Volume); and
//! [`IoError`], the one way its requests fail.
//!
//! An [`IoError`] has no success variant, so no export maps an impossible "failed with
//! success". Each protocol turns it into its own error in one place: FUSE and ublk through
//! [`IoError::errno`], the NBD export through its own mapping to the NBD error values.

use std::io;

use clonebd_core::engine::IoStatus;
use thiserror::Error;

/// Why a request failed: the engine's failure statuses, without its `Ok`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Error)]
pub enum IoError {
    /// A device failed, or the clone is in fail mode.
    #[error("input/output error")]
    Io,
    /// A device ran out of space.
    #[error("no space left on device")]
    NoSpace,
    /// Out of range, misaligned or empty.
    #[error("invalid request")]
    Invalid,
    /// Refused because the metadata is read-only.
    #[error("read-only")]
    ReadOnly,
    /// A device cannot do it.
    #[error("operation not supported")]
    NotSupported,
}

impl IoError {
    /// Every variant, in declaration order.
    pub const ALL: [IoError; 5] = [
        IoError::Io,
        IoError::NoSpace,
        IoError::Invalid,
        IoError::ReadOnly,
        IoError::NotSupported,
    ];

    /// `Ok(())` for [`IoStatus::Ok`], the error of any other status.
    pub fn check(s: IoStatus) -> Result<(), IoError> {
        match s {
            IoStatus::Ok => Ok(()),
            IoStatus::Io => Err(IoError::Io),
            IoStatus::NoSpace => Err(IoError::NoSpace),
            IoStatus::Invalid => Err(IoError::Invalid),
            IoStatus::ReadOnly => Err(IoError::ReadOnly),
            IoStatus::NotSupported => Err(IoError::NotSupported),
        }
    }

    /// What a device error means to a client.
    pub fn of_io(e: &io::Error) -> IoError {
        match e.kind() {
            io::ErrorKind::InvalidInput => IoError::Invalid,
            io::ErrorKind::Unsupported => IoError::NotSupported,
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
                IoError::ReadOnly
            }
            io::ErrorKind::StorageFull => IoError::NoSpace,
            _ => match e.raw_os_error() {
                Some(libc::ENOSPC | libc::EDQUOT) => IoError::NoSpace,
                _ => IoError::Io,
            },
        }
    }

    /// The (positive) errno a kernel interface reports it as: FUSE replies, ublk
    /// completions.
    pub fn errno(self) -> i32 {
        match self {
            IoError::Io => libc::EIO,
            IoError::NoSpace => libc::ENOSPC,
            IoError::Invalid => libc::EINVAL,
            IoError::ReadOnly => libc::EROFS,
            IoError::NotSupported => libc::EOPNOTSUPP,
        }
    }
}

impl From<IoError> for IoStatus {
    fn from(e: IoError) -> IoStatus {
        match e {
            IoError::Io => IoStatus::Io,
            IoError::NoSpace => IoStatus::NoSpace,
            IoError::Invalid => IoStatus::Invalid,
            IoError::ReadOnly => IoStatus::ReadOnly,
            IoError::NotSupported => IoStatus::NotSupported,
        }
    }
}

/// What a [`BlockExport`] can do, for an export to advertise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportCaps {
    /// The smallest unit of I/O, in bytes (a power of two, at least 512).
    pub logical_block_size: u32,
    /// The preferred unit of I/O and of discards, in bytes (a power of two).
    pub granularity: u64,
    /// [`flush`](BlockExport::flush) makes completed writes durable (a volatile cache).
    pub flush: bool,
    /// Writes with `fua` are durable when they complete.
    pub fua: bool,
    /// [`discard`](BlockExport::discard) is accepted.
    pub discard: bool,
    /// [`write_zeroes`](BlockExport::write_zeroes) is accepted.
    pub write_zeroes: bool,
}

/// A block device as an export serves it. Offsets and lengths are in bytes, multiples of
/// the logical block size and inside [`size_bytes`](BlockExport::size_bytes) (others fail
/// with [`IoError::Invalid`]); calls block, and come from many threads at once.
pub trait BlockExport: Send + Sync {
    /// Size in bytes.
    fn size_bytes(&self) -> u64;
    /// What it can do.
    fn caps(&self) -> ExportCaps;
    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError>;
    /// Writes `data` at `offset`; with `fua`, durable when it returns.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), IoError>;
    /// Makes every write completed before the call durable.
    fn flush(&self) -> Result<(), IoError>;
    /// Discards `[offset, offset+len)`: afterwards the range may read as anything.
    fn discard(&self, offset: u64, len: u64) -> Result<(), IoError>;
    /// Makes `[offset, offset+len)` read as zeros; with `fua`, durable when it returns.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), IoError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_own_errno_and_status() {
        let want = [
            (libc::EIO, IoStatus::Io),
            (libc::ENOSPC, IoStatus::NoSpace),
            (libc::EINVAL, IoStatus::Invalid),
            (libc::EROFS, IoStatus::ReadOnly),
            (libc::EOPNOTSUPP, IoStatus::NotSupported),
        ];
        for (e, (errno, status)) in IoError::ALL.into_iter().zip(want) {
            assert_eq!(e.errno(), errno, "{e:?}");
            assert_eq!(IoStatus::from(e), status, "{e:?}");
            assert_eq!(IoError::check(status), Err(e));
        }
        assert_eq!(IoError::check(IoStatus::Ok), Ok(()));
    }

    #[test]
    fn device_errors_keep_their_meaning() {
        let of = |code| IoError::of_io(&io::Error::from_raw_os_error(code));
        assert_eq!(of(libc::ENOSPC), IoError::NoSpace);
        assert_eq!(of(libc::EDQUOT), IoError::NoSpace);
        assert_eq!(of(libc::EROFS), IoError::ReadOnly);
        assert_eq!(of(libc::EACCES), IoError::ReadOnly);
        assert_eq!(of(libc::EINVAL), IoError::Invalid);
        assert_eq!(
            IoError::of_io(&io::ErrorKind::Unsupported.into()),
            IoError::NotSupported
        );
        assert_eq!(of(libc::EIO), IoError::Io);
        assert_eq!(of(libc::ENXIO), IoError::Io);
    }
}
