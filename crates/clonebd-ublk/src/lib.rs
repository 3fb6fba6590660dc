//! The clone as a ublk block device: `clonebd run --ublk` creates `/dev/ublkbN`.
//!
//! ublk (Linux 6.0+, module `ublk_drv`) hands a block device's requests to a userspace
//! server through io_uring: the fastest way to give the clone a kernel block device. The
//! device is built with libublk when the crate's `libublk` feature is on (clonebd's `ublk`
//! feature); without it, [`UblkExport::start`] says clonebd was built without ublk support.
//! Without `/dev/ublk-control` it says the kernel lacks ublk, and how to get it.
//!
//! Each queue is served by one thread that runs every request to completion on the clone
//! ([`serve`]), so requests on one queue run one after the other and parallelism comes
//! from the queues (blk-mq maps each submitting CPU to a queue). The device advertises a
//! volatile write cache with FUA (a flush commits the clone's metadata), discard with the
//! region size as granularity, and WRITE_ZEROES.
//!
//! The ublk server must not share a mount namespace with a file system mounted on its own
//! device, or the daemon's exit can deadlock on that file system's final writes.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

#[cfg(feature = "libublk")]
mod device;

use std::path::{Path, PathBuf};

use clonebd_driver::{BlockExport, IoError, Volume};
use thiserror::Error;

/// The ublk control device, present when the kernel has ublk.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// Request opcodes and flags of the ublk ABI (`include/uapi/linux/ublk_cmd.h`).
pub mod op {
    /// Read.
    pub const READ: u32 = 0;
    /// Write.
    pub const WRITE: u32 = 1;
    /// Flush the volatile cache.
    pub const FLUSH: u32 = 2;
    /// Discard.
    pub const DISCARD: u32 = 3;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 5;
    /// Forced unit access, in `op_flags`.
    pub const F_FUA: u32 = 1 << 13;
}

/// Why the ublk export could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum UblkError {
    /// This build has no ublk support.
    #[error(
        "--ublk: clonebd was built without ublk support; rebuild it with `cargo build --release --features ublk` (needs libclang to build)"
    )]
    NotBuilt,
    /// The kernel has no ublk driver loaded.
    #[error(
        "--ublk: the kernel lacks ublk ({CONTROL_PATH} is missing): load the module with `modprobe ublk_drv`, on a kernel built with CONFIG_BLK_DEV_UBLK (Linux 6.0 or later); or use --fuse or --nbd-unix instead"
    )]
    NoKernelSupport,
    /// The ublk driver refused the device.
    #[error("--ublk: cannot create the ublk device: {0}")]
    Create(String),
    /// The device did not come up.
    #[error("--ublk: the ublk device did not start: {0}")]
    Start(String),
}

/// Settings of the ublk device.
#[derive(Debug, Clone, Copy)]
pub struct UblkOptions {
    /// Hardware queues, each served by one thread.
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Largest request, bytes.
    pub max_io_bytes: u32,
}

impl Default for UblkOptions {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            queues: u16::try_from(cpus.clamp(1, 8)).unwrap_or(1),
            depth: 64,
            max_io_bytes: 512 << 10,
        }
    }
}

/// Runs one ublk request on `t` (the clone's [`Volume`], or a stand-in in tests) with the
/// tag's buffer `buf`, and returns what completes it: the bytes moved for reads and writes,
/// 0 for the others, or `-errno` ([`IoError::errno`]).
pub fn serve<T: BlockExport + ?Sized>(
    t: &T,
    op_flags: u32,
    start_sector: u64,
    nr_sectors: u32,
    buf: &mut [u8],
) -> i32 {
    let fua = op_flags & op::F_FUA != 0;
    // A flush has no range: the kernel's flush request carries start sector u64::MAX
    // (blk_rq_pos of a flush), so it must not go through the offset arithmetic below.
    if op_flags & 0xff == op::FLUSH {
        return t.flush().map_or_else(|e| -e.errno(), |()| 0);
    }
    let (Some(offset), len) = (start_sector.checked_mul(512), u64::from(nr_sectors) * 512) else {
        return -libc::EINVAL;
    };
    let data_len = usize::try_from(len).ok().filter(|&l| l <= buf.len());
    let moved = i32::try_from(len).unwrap_or(i32::MAX);
    let r = match op_flags & 0xff {
        op::READ => match data_len {
            Some(l) => t.read(offset, &mut buf[..l]).map(|()| moved),
            None => Err(IoError::Invalid),
        },
        op::WRITE => match data_len {
            Some(l) => t.write(offset, &buf[..l], fua).map(|()| moved),
            None => Err(IoError::Invalid),
        },
        op::DISCARD => t.discard(offset, len).map(|()| 0),
        op::WRITE_ZEROES => t.write_zeroes(offset, len, fua).map(|()| 0),
        _ => Err(IoError::NotSupported),
    };
    r.unwrap_or_else(|e| -e.errno())
}

/// A running ublk device serving the clone.
#[derive(Debug)]
pub struct UblkExport {
    path: PathBuf,
    #[cfg(feature = "libublk")]
    inner: device::Device,
}

impl UblkExport {
    /// Creates `/dev/ublkbN` served by `vol`.
    pub fn start(vol: Volume, opts: &UblkOptions) -> Result<UblkExport, UblkError> {
        #[cfg(feature = "libublk")]
        {
            if !Path::new(CONTROL_PATH).exists() {
                return Err(UblkError::NoKernelSupport);
            }
            let inner = device::Device::start(vol, opts)?;
            Ok(UblkExport {
                path: inner.path(),
                inner,
            })
        }
        #[cfg(not(feature = "libublk"))]
        {
            let _ = (vol, opts);
            Err(UblkError::NotBuilt)
        }
    }

    /// The block device, `/dev/ublkbN`.
    pub fn device(&self) -> &Path {
        &self.path
    }

    /// Stops and deletes the device; requests in flight finish first.
    pub fn stop(self) {
        #[cfg(feature = "libublk")]
        self.inner.stop();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use clonebd_driver::ExportCaps;

    use super::*;

    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);

    impl BlockExport for Log {
        fn size_bytes(&self) -> u64 {
            1 << 20
        }
        fn caps(&self) -> ExportCaps {
            ExportCaps {
                logical_block_size: 512,
                granularity: 4096,
                flush: true,
                fua: true,
                discard: true,
                write_zeroes: true,
            }
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
            buf.fill(0xab);
            self.0
                .lock()
                .expect("log")
                .push(format!("read {offset}+{}", buf.len()));
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), IoError> {
            self.0
                .lock()
                .expect("log")
                .push(format!("write {offset}+{} fua={fua}", data.len()));
            Ok(())
        }
        fn flush(&self) -> Result<(), IoError> {
            self.0.lock().expect("log").push("flush".into());
            Ok(())
        }
        fn discard(&self, _offset: u64, _len: u64) -> Result<(), IoError> {
            Err(IoError::NoSpace)
        }
        fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), IoError> {
            self.0
                .lock()
                .expect("log")
                .push(format!("zeroes {offset}+{len} fua={fua}"));
            Ok(())
        }
    }

    #[test]
    fn serve_maps_each_opcode_to_the_clone() {
        let t = Log::default();
        let mut buf = vec![0u8; 8192];
        assert_eq!(serve(&t, op::READ, 8, 2, &mut buf), 1024);
        assert!(buf[..1024].iter().all(|&b| b == 0xab));
        assert_eq!(serve(&t, op::WRITE | op::F_FUA, 1, 16, &mut buf), 8192);
        assert_eq!(serve(&t, op::FLUSH, 0, 0, &mut buf), 0);
        // What ublk_drv sends for a flush: no sectors, start sector u64::MAX.
        assert_eq!(serve(&t, op::FLUSH, u64::MAX, 0, &mut buf), 0);
        assert_eq!(serve(&t, op::WRITE_ZEROES, 4, 8, &mut buf), 0);
        assert_eq!(
            *t.0.lock().expect("log"),
            vec![
                "read 4096+1024",
                "write 512+8192 fua=true",
                "flush",
                "flush",
                "zeroes 2048+4096 fua=false"
            ]
        );
    }

    #[test]
    fn serve_returns_negative_errno_on_failure_and_oversize() {
        let t = Log::default();
        let mut buf = vec![0u8; 512];
        assert_eq!(serve(&t, op::DISCARD, 0, 8, &mut buf), -libc::ENOSPC);
        assert_eq!(serve(&t, op::READ, 0, 2, &mut buf), -libc::EINVAL);
        assert_eq!(serve(&t, 4, 0, 1, &mut buf), -libc::EOPNOTSUPP);
        assert_eq!(serve(&t, op::READ, u64::MAX, 1, &mut buf), -libc::EINVAL);
    }

    #[cfg(not(feature = "libublk"))]
    #[test]
    fn start_without_the_feature_says_so() {
        let e = UblkError::NotBuilt.to_string();
        assert!(e.contains("built without ublk support"), "{e}");
    }
}
