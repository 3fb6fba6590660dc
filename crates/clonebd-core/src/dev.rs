//! The block-device seam: the one small trait every device implements, real or simulated.
//!
//! Devices are byte-addressed and positional, and take `&self` so that many threads may have
//! I/O in flight on one device at once (as `pread`/`pwrite` allow). Implementations live at
//! the edges: files and block devices in `clonebd-io`, simulated disks with volatile caches
//! and injected faults in `clonebd-testkit`. Nothing in this crate calls these methods.

use std::fs::File;
use std::io;
use std::sync::Arc;

/// What a device can do beyond reads, writes and flushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caps {
    /// `discard` releases space (and reads back as zeros or stale data afterwards).
    pub discard: bool,
    /// `write_zeroes` is cheaper than writing a buffer of zeros (e.g. `FALLOC_FL_ZERO_RANGE`).
    pub write_zeroes: bool,
    /// The device has a volatile write cache, so `flush` matters.
    pub volatile_cache: bool,
}

/// A run of a device's bytes: [`BlockDev::extent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Its length in bytes.
    pub len: u64,
    /// Known to read as zeros (a hole); otherwise it may hold data.
    pub zero: bool,
}

/// A positional block device.
pub trait BlockDev: Send + Sync {
    /// Size in bytes.
    fn size_bytes(&self) -> u64;

    /// Logical block size in bytes: the smallest unit of I/O the device accepts.
    fn logical_block_size(&self) -> u32 {
        512
    }

    /// Optional capabilities.
    fn caps(&self) -> Caps {
        Caps::default()
    }

    /// The open file through which `len` bytes at `offset`, from or into memory aligned to
    /// `mem_align` bytes, may be read (or, with `write`, written) by a caller that submits the
    /// I/O itself, e.g. through io_uring, instead of calling [`read_at`](Self::read_at) or
    /// [`write_at`](Self::write_at). The caller transfers exactly that range, and holds the
    /// `Arc` until the I/O completed. `None` (the default) when the device cannot be driven
    /// that way, or not for this range: then use the methods.
    fn direct_file(
        &self,
        offset: u64,
        len: u64,
        mem_align: usize,
        write: bool,
    ) -> Option<Arc<File>> {
        let _ = (offset, len, mem_align, write);
        None
    }

    /// The run of bytes from `offset` (at most `len`, at least one byte when `len > 0`)
    /// that is all known to read as zeros without reading it (a hole of a sparse file), or
    /// all may hold data. The default knows nothing: all of `len` may hold data. Hydration
    /// zeroes the known zeros unread, and reads only the rest.
    fn extent(&self, offset: u64, len: u64) -> io::Result<Extent> {
        let _ = offset;
        Ok(Extent { len, zero: false })
    }

    /// Whether all of `[offset, offset+len)` is known to read as zeros without reading it
    /// (from [`extent`](Self::extent)). `false` for an empty range.
    fn known_zero(&self, offset: u64, len: u64) -> io::Result<bool> {
        let e = self.extent(offset, len)?;
        Ok(len > 0 && e.zero && e.len >= len)
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`. Not durable until a later `flush` returns (unless the
    /// device has no volatile cache).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;

    /// Discards `[offset, offset+len)`. Devices without [`Caps::discard`] return
    /// [`io::ErrorKind::Unsupported`].
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    /// Makes `[offset, offset+len)` read as zeros. The default writes zero buffers.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done) as usize;
            self.write_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Makes `[offset, offset+len)` read as zeros and, where the device can, releases the
    /// space it held (a hole punched in a regular file, which so stays sparse). Hydration
    /// zeroes the holes and zeros of a source this way. Durable, like a write, only after a
    /// later `flush`. The default is [`write_zeroes`](Self::write_zeroes).
    fn punch_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len)
    }
}

impl<T: BlockDev + ?Sized> BlockDev for std::sync::Arc<T> {
    fn size_bytes(&self) -> u64 {
        (**self).size_bytes()
    }
    fn logical_block_size(&self) -> u32 {
        (**self).logical_block_size()
    }
    fn caps(&self) -> Caps {
        (**self).caps()
    }
    fn direct_file(
        &self,
        offset: u64,
        len: u64,
        mem_align: usize,
        write: bool,
    ) -> Option<Arc<File>> {
        (**self).direct_file(offset, len, mem_align, write)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).write_zeroes(offset, len)
    }
    fn punch_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).punch_zeroes(offset, len)
    }
    fn extent(&self, offset: u64, len: u64) -> io::Result<Extent> {
        (**self).extent(offset, len)
    }
}
