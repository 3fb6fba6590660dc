//! The contract between the NBD server and whatever serves the bytes behind an export.
//!
//! A [`Backend`] is synchronous and shared: worker threads call it concurrently, many calls at
//! once, and it must be safe for that ([`Send`] + [`Sync`]). The server checks every request
//! against the export's size, block sizes and flags before calling the backend, so a backend
//! sees only in-range, aligned requests for operations it advertised. Failures are reported as
//! [`NbdError`], whose variants are exactly the error values the protocol can carry;
//! [`NbdError::to_wire`] is the single place where they become numbers.
//!
//! A backend over files may also [`route`](Backend::route) reads and plain writes: tell the
//! server which files and offsets a request's bytes go to, so that the server submits the I/O
//! itself, many requests per system call (io_uring), instead of calling the backend on a
//! worker thread.

use std::io;

pub use clonebd_io::uring::Segment;

use crate::proto::errno;

/// An error a backend reports, one variant per NBD error value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum NbdError {
    /// `NBD_EIO`: the device failed.
    #[error("input/output error")]
    Io,
    /// `NBD_EPERM`: the operation is forbidden (for example a write to a read-only export).
    #[error("operation not permitted")]
    Permission,
    /// `NBD_ENOMEM`: the server could not allocate what the request needs.
    #[error("cannot allocate memory")]
    NoMemory,
    /// `NBD_EINVAL`: the request is malformed for this export.
    #[error("invalid argument")]
    Invalid,
    /// `NBD_ENOSPC`: no space is left, or the request reaches past the end of the export.
    #[error("no space left on device")]
    NoSpace,
    /// `NBD_EOVERFLOW`: the request is larger than the server will handle at once.
    #[error("value too large")]
    Overflow,
    /// `NBD_ENOTSUP`: in particular, a fast zero that cannot be fast.
    #[error("operation not supported")]
    NotSupported,
    /// `NBD_ESHUTDOWN`: the server is shutting down.
    #[error("server is shutting down")]
    Shutdown,
}

impl NbdError {
    /// The NBD error value sent on the wire. This is the only mapping from errors to numbers.
    pub fn to_wire(self) -> u32 {
        match self {
            Self::Io => errno::EIO,
            Self::Permission => errno::EPERM,
            Self::NoMemory => errno::ENOMEM,
            Self::Invalid => errno::EINVAL,
            Self::NoSpace => errno::ENOSPC,
            Self::Overflow => errno::EOVERFLOW,
            Self::NotSupported => errno::ENOTSUP,
            Self::Shutdown => errno::ESHUTDOWN,
        }
    }

    /// The error for a wire value. "The client SHOULD treat an unexpected error value as if it
    /// had been `NBD_EINVAL`"; zero is not an error and also maps to `Invalid`.
    pub fn from_wire(value: u32) -> Self {
        match value {
            errno::EIO => Self::Io,
            errno::EPERM => Self::Permission,
            errno::ENOMEM => Self::NoMemory,
            errno::ENOSPC => Self::NoSpace,
            errno::EOVERFLOW => Self::Overflow,
            errno::ENOTSUP => Self::NotSupported,
            errno::ESHUTDOWN => Self::Shutdown,
            _ => Self::Invalid,
        }
    }

    /// The error for an operating system error, for backends built on files and devices.
    ///
    /// "It also SHOULD map the `EDQUOT` and `EFBIG` errors to `NBD_ENOSPC`."
    pub fn from_io(err: &io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::EPERM | libc::EACCES | libc::EROFS) => Self::Permission,
            Some(libc::ENOMEM) => Self::NoMemory,
            Some(libc::EINVAL) => Self::Invalid,
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => Self::NoSpace,
            Some(libc::EOVERFLOW) => Self::Overflow,
            Some(libc::EOPNOTSUPP) => Self::NotSupported,
            Some(libc::ESHUTDOWN) => Self::Shutdown,
            _ => Self::Io,
        }
    }
}

/// The size constraints of an export, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockSizes {
    /// Smallest addressable length and alignment: a power of two, at most 65,536. For a clone
    /// this is the logical block size of the devices.
    pub minimum: u32,
    /// Size at which aligned requests are efficient: a power of two at least
    /// `max(minimum, 512)`. For a clone this is the region size.
    pub preferred: u32,
    /// Largest payload the backend wants in one request; the server advertises
    /// `min(maximum, 32 MiB)` and never less than `preferred`.
    pub maximum: u32,
}

/// What an export supports; each flag turns on the matching transmission flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BackendFlags {
    /// Writes, trims and zeroing are refused with `NBD_EPERM`.
    pub read_only: bool,
    /// [`Backend::flush`] makes completed writes durable (`NBD_FLAG_SEND_FLUSH`).
    pub flush: bool,
    /// `fua` arguments are honoured (`NBD_FLAG_SEND_FUA`).
    pub fua: bool,
    /// [`Backend::trim`] is implemented (`NBD_FLAG_SEND_TRIM`).
    pub trim: bool,
    /// [`Backend::write_zeroes`] is implemented (`NBD_FLAG_SEND_WRITE_ZEROES`).
    pub write_zeroes: bool,
    /// [`Backend::write_zeroes`] understands `fast_zero` (`NBD_FLAG_SEND_FAST_ZERO`).
    pub fast_zero: bool,
    /// [`Backend::cache`] is implemented (`NBD_FLAG_SEND_CACHE`).
    pub cache: bool,
    /// A flush on one connection covers writes completed on every connection
    /// (`NBD_FLAG_CAN_MULTI_CONN`).
    pub multi_conn: bool,
}

/// Flags of a write-zeroes request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ZeroFlags {
    /// Durable before the reply (`NBD_CMD_FLAG_FUA`).
    pub fua: bool,
    /// The range must stay allocated (`NBD_CMD_FLAG_NO_HOLE`).
    pub no_hole: bool,
    /// Fail at once with [`NbdError::NotSupported`] unless zeroing is faster than writing
    /// (`NBD_CMD_FLAG_FAST_ZERO`); the content must then be left unchanged.
    pub fast_zero: bool,
}

/// One run of bytes with the same status in a metadata context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    /// Length in bytes; must be nonzero.
    pub length: u64,
    /// Status flags as the context defines them.
    pub flags: u32,
}

/// Which request a [`Route`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteKind {
    /// A read.
    Read,
    /// A write without `fua`.
    Write,
}

/// Where the bytes of a read or a write go, for the server to transfer them itself.
pub struct Route {
    /// The pieces: bytes `[at, at + len)` of the request's payload buffer are read from, or
    /// written to, a file at an offset. Together they cover the request once.
    pub segments: Vec<Segment>,
    /// Held until every segment completed, then dropped: the backend's own account of a
    /// request in flight.
    pub guard: Box<dyn Send>,
    /// The error the client gets when a segment fails.
    pub error: fn(&io::Error) -> NbdError,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("segments", &self.segments)
            .finish_non_exhaustive()
    }
}

/// What the NBD server needs from an export.
///
/// Calls come from worker threads, several at once, and must not assume any order between
/// requests except the one the protocol gives: a [`flush`](Backend::flush) must cover every
/// write that completed (returned) before it was called, on any connection when
/// [`BackendFlags::multi_conn`] is set.
pub trait Backend: Send + Sync + 'static {
    /// Size of the export in bytes; fixed for the life of a connection.
    fn size(&self) -> u64;
    /// Size constraints of the export.
    fn block_sizes(&self) -> BlockSizes;
    /// Operations the export supports.
    fn flags(&self) -> BackendFlags;
    /// Fill `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError>;
    /// Write `data` at `offset`; durable before returning when `fua` is set.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError>;
    /// Make every completed write durable.
    fn flush(&self) -> Result<(), NbdError>;
    /// Discard `len` bytes at `offset` (a hint: the content afterwards is unspecified).
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), NbdError>;
    /// Make `len` bytes at `offset` read back as zero.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), NbdError>;
    /// Prepare `len` bytes at `offset` for faster access later.
    fn cache(&self, offset: u64, len: u64) -> Result<(), NbdError>;
    /// Names of the metadata contexts the export can report, e.g. `base:allocation`.
    fn meta_contexts(&self) -> Vec<String>;
    /// Status of the range in `context`: consecutive extents starting at `offset` that cover a
    /// prefix of `len` bytes (at least one extent, each nonzero).
    fn block_status(&self, context: &str, offset: u64, len: u64) -> Result<Vec<Extent>, NbdError>;

    /// Where a read, or a write without `fua`, of `len` bytes at `offset` goes, for a payload
    /// buffer aligned to `mem_align` bytes: the server then transfers the bytes itself and
    /// answers once every segment completed, as if [`read`](Backend::read) or
    /// [`write`](Backend::write) had returned then. A routed write counts as completed (for a
    /// later [`flush`](Backend::flush)) once its segments completed. `None` (the default): the
    /// server calls `read` or `write`.
    fn route(&self, kind: RouteKind, offset: u64, len: u64, mem_align: usize) -> Option<Route> {
        let _ = (kind, offset, len, mem_align);
        None
    }
}
