//! Regular files and block devices as [`BlockDev`]s.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clonebd_core::errno::describe;
use clonebd_core::{BlockDev, Caps, Extent};
use thiserror::Error;

/// How a device is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessMode {
    /// Read-only: the source is always opened this way, so it can never be written.
    ReadOnly,
    /// Read and write.
    ReadWrite,
}

/// Options for [`FileDevice::open`].
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    /// Read-only or read-write.
    pub mode: AccessMode,
    /// Use `O_DIRECT` for aligned I/O when the device accepts it.
    pub direct: bool,
    /// Take an exclusive advisory lock (flock) for as long as the device is open.
    pub exclusive: bool,
}

impl OpenOptions {
    /// Read-only, buffered, unlocked.
    pub fn read_only() -> Self {
        Self {
            mode: AccessMode::ReadOnly,
            direct: false,
            exclusive: false,
        }
    }

    /// Read-write, buffered, unlocked.
    pub fn read_write() -> Self {
        Self {
            mode: AccessMode::ReadWrite,
            direct: false,
            exclusive: false,
        }
    }

    /// Sets `direct`.
    pub fn direct(mut self, direct: bool) -> Self {
        self.direct = direct;
        self
    }

    /// Sets `exclusive`.
    pub fn exclusive(mut self, exclusive: bool) -> Self {
        self.exclusive = exclusive;
        self
    }
}

/// Why a device could not be opened. Each message starts with the path and gives the cause
/// once; the caller puts the device's role in front ("source disk.img: ...").
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The path could not be opened.
    #[error("{}: {}", .path.display(), describe(.cause))]
    Open {
        /// The device's path.
        path: PathBuf,
        /// The system's error.
        cause: io::Error,
    },
    /// Another process holds the exclusive lock.
    #[error(
        "{}: in use by another process (it is locked: is another clonebd running on it?)",
        .path.display()
    )]
    InUse {
        /// The device's path.
        path: PathBuf,
    },
    /// The path is neither a regular file nor a block device.
    #[error("{}: not a regular file or a block device", .path.display())]
    NotADevice {
        /// The device's path.
        path: PathBuf,
    },
    /// Querying the device failed.
    #[error("{}: cannot query the device: {}", .path.display(), describe(.cause))]
    Query {
        /// The device's path.
        path: PathBuf,
        /// The system's error.
        cause: io::Error,
    },
}

impl OpenError {
    /// The errno behind the failure, as the kernel's constructor would return it.
    pub fn errno(&self) -> i32 {
        match self {
            OpenError::Open { cause, .. } | OpenError::Query { cause, .. } => {
                cause.raw_os_error().unwrap_or(libc::EIO)
            }
            OpenError::InUse { .. } => libc::EBUSY,
            OpenError::NotADevice { .. } => libc::ENOTBLK,
        }
    }
}

/// A regular file or a block device.
#[derive(Debug)]
pub struct FileDevice {
    path: PathBuf,
    file: File,
    /// Shared so that I/O submitted elsewhere (io_uring) keeps it open until it completes.
    direct: Option<Arc<File>>,
    is_block: bool,
    size: u64,
    logical_block_size: u32,
    discard: bool,
    read_only: bool,
}

const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

impl FileDevice {
    /// Opens `path` as a device.
    pub fn open(path: impl AsRef<Path>, opts: OpenOptions) -> Result<Self, OpenError> {
        let path = path.as_ref().to_path_buf();
        let open = |flags: i32| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(opts.mode == AccessMode::ReadWrite)
                .custom_flags(flags)
                .open(&path)
        };
        let file = open(libc::O_CLOEXEC).map_err(|cause| OpenError::Open {
            path: path.clone(),
            cause,
        })?;
        let meta = file.metadata().map_err(|cause| OpenError::Query {
            path: path.clone(),
            cause,
        })?;
        let ft = meta.file_type();
        let is_block = ft.is_block_device();
        if !is_block && !ft.is_file() {
            return Err(OpenError::NotADevice { path });
        }
        if opts.exclusive {
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => return Err(OpenError::InUse { path }),
                Err(std::fs::TryLockError::Error(cause)) => {
                    return Err(OpenError::Query { path, cause });
                }
            }
        }
        let size = if is_block {
            (&file)
                .seek(SeekFrom::End(0))
                .map_err(|cause| OpenError::Query {
                    path: path.clone(),
                    cause,
                })?
        } else {
            meta.len()
        };
        let logical_block_size = if is_block {
            let mut lbs: libc::c_int = 0;
            // SAFETY: BLKSSZGET writes one c_int through the pointer, which points at a live,
            // properly aligned local; the fd is open for the duration of the call.
            let rc =
                unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut lbs as *mut libc::c_int) };
            if rc != 0 {
                return Err(OpenError::Query {
                    path,
                    cause: io::Error::last_os_error(),
                });
            }
            u32::try_from(lbs).unwrap_or(512).max(512)
        } else {
            512
        };
        // A second descriptor with O_DIRECT, used for aligned I/O only. Filesystems that do not
        // support it (tmpfs before 6.6, some FUSE mounts) refuse at open: then stay buffered.
        let direct = if opts.direct {
            open(libc::O_CLOEXEC | libc::O_DIRECT).ok().map(Arc::new)
        } else {
            None
        };
        let discard = if is_block {
            block_discard_supported(&meta)
        } else {
            true
        };
        Ok(Self {
            path,
            file,
            direct,
            is_block,
            size,
            logical_block_size,
            discard,
            read_only: opts.mode == AccessMode::ReadOnly,
        })
    }

    /// The path the device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this is a block device (rather than a regular file).
    pub fn is_block_device(&self) -> bool {
        self.is_block
    }

    /// Whether aligned I/O bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// `major:minor` of a block device, or of the device holding a regular file.
    pub fn dev_numbers(&self) -> io::Result<(u32, u32)> {
        let m = self.file.metadata()?;
        let dev = if self.is_block { m.rdev() } else { m.dev() };
        Ok((libc::major(dev), libc::minor(dev)))
    }

    /// Reserves space for `[0, len)` of a regular file without changing its size or its
    /// content (`fallocate` with `FALLOC_FL_KEEP_SIZE`): holes become allocated, unwritten
    /// extents. A clone's destination ends up fully written anyway; reserving it at start
    /// finds a full filesystem at once instead of in the middle of a hydration, and spares
    /// writes into holes the filesystem's allocation path (ext4 serialises direct writes that
    /// allocate). Block devices need nothing: returns `Ok(false)`; `Ok(true)` when done.
    pub fn preallocate(&self, len: u64) -> io::Result<bool> {
        self.preallocate_range(0, len)
    }

    /// As [`preallocate`](Self::preallocate), for `[offset, offset+len)` only (clipped to
    /// the file): what a sparse-aware clone reserves, the source's data and not its holes.
    pub fn preallocate_range(&self, offset: u64, len: u64) -> io::Result<bool> {
        if self.is_block || self.read_only || offset >= self.size {
            return Ok(false);
        }
        let len = len.min(self.size - offset);
        if len == 0 {
            return Ok(false);
        }
        self.fallocate(libc::FALLOC_FL_KEEP_SIZE, offset, len)
            .map(|()| true)
    }

    /// The `O_DIRECT` file that `len` bytes at `offset`, from or into memory aligned to
    /// `mem_align` bytes, may be read or written through by a caller submitting the I/O itself
    /// (io_uring): `None` unless the device has one, the range is inside the device, offset,
    /// length and memory are aligned to the logical block size, and (for a `write`) the device
    /// is writable. The caller must transfer exactly that range.
    pub fn direct_file(
        &self,
        offset: u64,
        len: u64,
        mem_align: usize,
        write: bool,
    ) -> Option<Arc<File>> {
        let a = u64::from(self.logical_block_size);
        let ok = len > 0
            && self.check_range(offset, len).is_ok()
            && offset.is_multiple_of(a)
            && len.is_multiple_of(a)
            && (mem_align as u64).is_multiple_of(a)
            && !(write && self.read_only);
        self.direct.as_ref().filter(|_| ok).map(Arc::clone)
    }

    fn pick(&self, ptr: *const u8, len: usize, offset: u64) -> &File {
        let a = u64::from(self.logical_block_size);
        match &self.direct {
            Some(d)
                if offset.is_multiple_of(a)
                    && (len as u64).is_multiple_of(a)
                    && (ptr as u64).is_multiple_of(a) =>
            {
                d
            }
            _ => &self.file,
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "I/O at {offset}+{len} is past the end of {} ({} bytes)",
                    self.path.display(),
                    self.size
                ),
            )),
        }
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (off, l) = (to_off(offset)?, to_off(len)?);
        // SAFETY: fallocate takes plain integers; the fd stays open for the call.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn blk_range_ioctl(&self, req: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKDISCARD/BLKZEROOUT read two u64s through the pointer, which points at a
        // live local array; the fd stays open for the call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), req, range.as_ptr()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn ensure_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} is open read-only", self.path.display()),
            ))
        } else {
            Ok(())
        }
    }
}

/// Where an `lseek` for data or a hole landed.
enum Landed {
    /// At this offset.
    At(u64),
    /// Past the end (`ENXIO`: no data at or after the offset).
    Beyond,
    /// The file system cannot tell.
    Unsupported,
}

impl FileDevice {
    fn lseek(&self, offset: u64, whence: libc::c_int) -> io::Result<Landed> {
        let off = to_off(offset)?;
        // SAFETY: lseek takes plain integers and moves only the descriptor's offset, which
        // nothing here uses (every read and write is positioned); the fd stays open.
        let at = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if at >= 0 {
            return Ok(Landed::At(at as u64));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(Landed::Beyond),
            Some(libc::EINVAL | libc::EOPNOTSUPP) => Ok(Landed::Unsupported),
            _ => Err(e),
        }
    }
}

fn to_off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn block_discard_supported(meta: &std::fs::Metadata) -> bool {
    let dev = meta.rdev();
    let p = format!(
        "/sys/dev/block/{}:{}/queue/discard_max_bytes",
        libc::major(dev),
        libc::minor(dev)
    );
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0)
}

impl BlockDev for FileDevice {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    fn caps(&self) -> Caps {
        Caps {
            discard: self.discard && !self.read_only,
            write_zeroes: true,
            volatile_cache: true,
        }
    }

    fn direct_file(
        &self,
        offset: u64,
        len: u64,
        mem_align: usize,
        write: bool,
    ) -> Option<Arc<File>> {
        FileDevice::direct_file(self, offset, len, mem_align, write)
    }

    /// A regular file's holes and data, by `SEEK_DATA` and `SEEK_HOLE`: a hole runs to the
    /// next data, data to the next hole. A block device, or a file system without them,
    /// cannot tell: all may hold data.
    fn extent(&self, offset: u64, len: u64) -> io::Result<Extent> {
        let data = Extent { len, zero: false };
        if self.is_block || len == 0 {
            return Ok(data);
        }
        self.check_range(offset, len)?;
        let end = offset + len;
        match self.lseek(offset, libc::SEEK_DATA)? {
            // No data at or after `offset`: a hole to the end of the file.
            Landed::Beyond => Ok(Extent { len, zero: true }),
            Landed::Unsupported => Ok(data),
            Landed::At(next) if next > offset => Ok(Extent {
                len: next.min(end) - offset,
                zero: true,
            }),
            // Data at `offset`: up to the next hole (there is always one, at the end).
            Landed::At(_) => match self.lseek(offset, libc::SEEK_HOLE)? {
                Landed::At(hole) if hole > offset => Ok(Extent {
                    len: hole.min(end) - offset,
                    zero: false,
                }),
                _ => Ok(data),
            },
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.pick(buf.as_ptr(), buf.len(), offset)
            .read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.ensure_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        self.pick(buf.as_ptr(), buf.len(), offset)
            .write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.ensure_writable()?;
        self.check_range(offset, len)?;
        if !self.discard {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        let r = if self.is_block {
            self.blk_range_ioctl(BLKDISCARD, offset, len)
        } else {
            self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        r.map_err(|e| match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) => io::Error::from(io::ErrorKind::Unsupported),
            _ => e,
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.ensure_writable()?;
        self.check_range(offset, len)?;
        let fast = if self.is_block {
            self.blk_range_ioctl(BLKZEROOUT, offset, len)
        } else {
            self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        match fast {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                // Slow path: write zero buffers.
                const CHUNK: u64 = 1 << 20;
                let zeros = vec![0u8; CHUNK.min(len) as usize];
                let mut done = 0;
                while done < len {
                    let n = CHUNK.min(len - done) as usize;
                    self.file.write_all_at(&zeros[..n], offset + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// A regular file: a hole punched (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`), which
    /// reads as zeros and keeps the file sparse; where the file system cannot punch holes,
    /// [`write_zeroes`](BlockDev::write_zeroes). A block device: `BLKZEROOUT`, as
    /// `write_zeroes` (a discard need not read back as zeros).
    fn punch_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.ensure_writable()?;
        self.check_range(offset, len)?;
        if self.is_block {
            return self.write_zeroes(offset, len);
        }
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                self.write_zeroes(offset, len)
            }
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpfile(len: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("tempfile");
        f.as_file().set_len(len).expect("set_len");
        f
    }

    #[test]
    fn file_device_reads_back_what_it_wrote() {
        let f = tmpfile(1 << 20);
        let d = FileDevice::open(f.path(), OpenOptions::read_write()).expect("open");
        assert_eq!(d.size_bytes(), 1 << 20);
        d.write_at(b"hello", 4096).expect("write");
        d.flush().expect("flush");
        let mut b = [0u8; 5];
        d.read_at(&mut b, 4096).expect("read");
        assert_eq!(&b, b"hello");
    }

    #[test]
    fn holes_of_a_sparse_file_are_known_zero_and_data_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sparse.img");
        let file = std::fs::File::create(&path).expect("create");
        file.set_len(8 << 20).expect("set_len");
        file.write_all_at(&[1u8; 4096], 2 << 20).expect("data");
        file.sync_all().expect("sync");
        let d = FileDevice::open(&path, OpenOptions::read_only()).expect("open");
        assert!(
            d.known_zero(0, 1 << 20).expect("seek"),
            "a hole before the data"
        );
        assert!(
            !d.known_zero(0, 3 << 20).expect("seek"),
            "a range holding data"
        );
        assert!(
            !d.known_zero(2 << 20, 4096).expect("seek"),
            "the data itself"
        );
        assert!(
            d.known_zero(4 << 20, 4 << 20).expect("seek"),
            "the hole to the end"
        );
        assert!(
            !d.known_zero(0, 0).expect("empty"),
            "nothing is not known zero"
        );
        // Runs: the hole up to the data, the data up to the next hole, the hole to the end.
        let run = |o, l| d.extent(o, l).expect("seek");
        assert_eq!(
            run(0, 8 << 20),
            Extent {
                len: 2 << 20,
                zero: true
            }
        );
        assert_eq!(
            run(2 << 20, 6 << 20),
            Extent {
                len: 4096,
                zero: false
            }
        );
        assert_eq!(
            run((2 << 20) + 4096, 1 << 20),
            Extent {
                len: 1 << 20,
                zero: true
            }
        );
    }

    #[test]
    fn read_only_device_refuses_writes() {
        let f = tmpfile(4096);
        let d = FileDevice::open(f.path(), OpenOptions::read_only()).expect("open");
        assert_eq!(
            d.write_at(b"x", 0).map_err(|e| e.kind()),
            Err(io::ErrorKind::PermissionDenied)
        );
        assert!(d.discard(0, 4096).is_err());
    }

    #[test]
    fn second_exclusive_open_reports_in_use() {
        let f = tmpfile(4096);
        let _a =
            FileDevice::open(f.path(), OpenOptions::read_write().exclusive(true)).expect("open");
        let err = FileDevice::open(f.path(), OpenOptions::read_write().exclusive(true))
            .expect_err("second open must fail");
        let msg = err.to_string();
        assert!(matches!(err, OpenError::InUse { .. }));
        assert!(
            msg.contains("in use") && msg.contains(&f.path().display().to_string()),
            "{msg}"
        );
    }

    #[test]
    fn io_past_the_end_is_refused() {
        let f = tmpfile(4096);
        let d = FileDevice::open(f.path(), OpenOptions::read_write()).expect("open");
        let mut b = [0u8; 512];
        assert!(d.read_at(&mut b, 4096 - 256).is_err());
        assert!(d.read_at(&mut b, u64::MAX - 10).is_err());
    }

    #[test]
    fn preallocate_keeps_size_and_content() {
        let f = tmpfile(1 << 20);
        let d = FileDevice::open(f.path(), OpenOptions::read_write()).expect("open");
        d.write_at(&[7u8; 4096], 8192).expect("write");
        assert!(d.preallocate(1 << 20).expect("preallocate"));
        assert_eq!(f.as_file().metadata().expect("stat").len(), 1 << 20);
        let mut b = vec![0u8; 1 << 20];
        d.read_at(&mut b, 0).expect("read");
        assert!(b[..8192].iter().all(|&x| x == 0) && b[8192..12288].iter().all(|&x| x == 7));
        assert!(b[12288..].iter().all(|&x| x == 0));
        use std::os::unix::fs::MetadataExt;
        assert!(
            f.as_file().metadata().expect("stat").blocks() * 512 >= 1 << 20,
            "space reserved"
        );
        let ro = FileDevice::open(f.path(), OpenOptions::read_only()).expect("open");
        assert!(!ro.preallocate(1 << 20).expect("read-only: nothing to do"));
    }

    #[test]
    fn discard_and_write_zeroes_read_back_zeros() {
        let f = tmpfile(1 << 16);
        let d = FileDevice::open(f.path(), OpenOptions::read_write()).expect("open");
        d.write_at(&[0xab; 1 << 16], 0).expect("write");
        d.discard(4096, 8192).expect("discard");
        d.write_zeroes(32768, 4096).expect("zero");
        let mut b = vec![0u8; 1 << 16];
        d.read_at(&mut b, 0).expect("read");
        assert!(b[4096..12288].iter().all(|&x| x == 0));
        assert!(b[32768..36864].iter().all(|&x| x == 0));
        assert_eq!(b[0], 0xab);
        assert_eq!(b[12288], 0xab);
    }

    #[test]
    fn punch_zeroes_reads_back_zeros_and_releases_the_space() {
        use std::os::unix::fs::MetadataExt;
        let f = tmpfile(1 << 20);
        let d = FileDevice::open(f.path(), OpenOptions::read_write()).expect("open");
        d.write_at(&vec![0xab; 1 << 20], 0).expect("write");
        d.flush().expect("flush");
        let before = f.as_file().metadata().expect("stat").blocks();
        d.punch_zeroes(4096, (1 << 20) - 8192).expect("punch");
        d.flush().expect("flush");
        let mut b = vec![0u8; 1 << 20];
        d.read_at(&mut b, 0).expect("read");
        assert!(b[4096..(1 << 20) - 4096].iter().all(|&x| x == 0));
        assert!(b[..4096].iter().all(|&x| x == 0xab));
        assert!(b[(1 << 20) - 4096..].iter().all(|&x| x == 0xab));
        let after = f.as_file().metadata().expect("stat").blocks();
        assert!(
            after * 512 <= 16 * 4096 && after < before,
            "{before} blocks before, {after} after: the hole holds no space"
        );
        assert!(d.known_zero(4096, (1 << 20) - 8192).expect("seek"));
    }
}
