//! The clone as one regular file over FUSE: `clonebd run --fuse FILE`.
//!
//! Where no NBD client is at hand (containers, hosts without the `nbd` module), a file is
//! the universal block device: `losetup` turns it into a real one that any file system can
//! mount. [`FuseExport::start`] mounts a single-file FUSE file system over FILE itself (a
//! regular file may be a mount point), so FILE *is* the clone while the daemon runs: its
//! size is the clone's, and its bytes are the clone's bytes.
//!
//! Modules:
//! - the block device behind the file is any [`BlockExport`] (the clone's `Volume`), whose
//!   errors become a reply's errno through [`IoError::errno`](clonebd_driver::IoError::errno);
//! - `blockio`: byte-addressed reads and writes over whole logical blocks (read-modify-write
//!   of partial blocks, serialised by a range lock);
//! - `fs`: the FUSE requests;
//! - [`mountpoint`]: creating FILE, and what a daemon that died left mounted there.
//!
//! Page cache: a file opened without `O_DIRECT` goes through the kernel's page cache, which
//! FUSE drops at every open. Writes made through another export (NBD) are seen by FUSE
//! readers at their next open, or at once with `O_DIRECT`.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod blockio;
mod fs;
pub mod mountpoint;
mod rangelock;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub use clonebd_driver::BlockExport;
use fuser::{Config, MountOption, Session, SessionACL, SessionUnmounter};
pub use mountpoint::Prepared;
use thiserror::Error;

use crate::fs::{CloneFs, Gate, Stats, Tuning};

/// Why the FUSE export could not start or stop.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FuseError {
    /// The path could not be examined.
    #[error("cannot examine {path}: {source}", path = .path.display())]
    Inspect {
        /// The file.
        path: PathBuf,
        /// The system's error.
        source: io::Error,
    },
    /// The path exists and is something else than a regular file.
    #[error("{path} is {what}: --fuse needs a regular file (or a path to create one at)", path = .path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
        /// What it is.
        what: &'static str,
    },
    /// The file could not be created.
    #[error("cannot create {path}: {source}", path = .path.display())]
    Create {
        /// The file.
        path: PathBuf,
        /// The system's error.
        source: io::Error,
    },
    /// Something live is mounted there already.
    #[error(
        "{path} is already a mount point ({fstype}) that a running process serves; stop that process or unmount it first",
        path = .path.display()
    )]
    AlreadyMounted {
        /// The file.
        path: PathBuf,
        /// The file system type mounted there.
        fstype: String,
    },
    /// A dead daemon's mount is still used by loop devices: cleaning it up is not ours to do.
    #[error(
        "{path} is a FUSE mount left by a clonebd that died, still in use by {users}; release it, then unmount it: {command}",
        path = .path.display(),
        users = .users.join(", ")
    )]
    StaleInUse {
        /// The file.
        path: PathBuf,
        /// Loop devices backed by it.
        users: Vec<String>,
        /// The commands that clean it up.
        command: String,
    },
    /// A dead daemon's mount could not be unmounted.
    #[error(
        "{path} is a FUSE mount left by a clonebd that died, and unmounting it failed ({source}); unmount it with: {command}",
        path = .path.display()
    )]
    StaleCleanup {
        /// The file.
        path: PathBuf,
        /// The command that cleans it up.
        command: String,
        /// Why the unmount failed.
        source: io::Error,
    },
    /// `/dev/fuse` is missing.
    #[error("cannot use FUSE: /dev/fuse is missing (load the fuse module: modprobe fuse)")]
    NoFuse,
    /// The mount failed.
    #[error("cannot mount the clone over {path} with FUSE: {source}", path = .path.display())]
    Mount {
        /// The file.
        path: PathBuf,
        /// The system's error.
        source: io::Error,
    },
    /// The serving thread could not start.
    #[error("cannot start the FUSE thread: {0}")]
    Thread(io::Error),
    /// The unmount at shutdown failed; the mount was detached lazily instead.
    #[error(
        "{path} was busy at shutdown ({source}); it was detached lazily and whatever still uses it (a loop device?) now gets I/O errors",
        path = .path.display()
    )]
    Busy {
        /// The file.
        path: PathBuf,
        /// Why the plain unmount failed.
        source: io::Error,
    },
}

/// Settings of the FUSE export.
#[derive(Debug, Clone, Copy)]
pub struct FuseOptions {
    /// Threads serving FUSE requests (each blocks on one clone I/O at a time).
    pub threads: usize,
    /// Largest read or write the kernel sends, in bytes (the kernel caps it, 1 MiB on
    /// current kernels).
    pub max_io_bytes: u32,
    /// Asynchronous requests (direct I/O, readahead) the kernel keeps in flight.
    pub max_background: u16,
}

impl Default for FuseOptions {
    fn default() -> Self {
        Self {
            threads: 16,
            max_io_bytes: 1 << 20,
            max_background: 64,
        }
    }
}

/// How long stopping waits for requests in flight before going on.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// A mounted FUSE export: FILE is the clone until [`FuseExport::stop`].
#[derive(Debug)]
pub struct FuseExport {
    path: PathBuf,
    unmounter: SessionUnmounter,
    thread: Option<JoinHandle<io::Result<()>>>,
    gate: Arc<Gate>,
    stats: Arc<Stats>,
    prepared: Prepared,
}

impl FuseExport {
    /// Mounts `backend` as the regular file `path` (created if missing; a stale mount a dead
    /// daemon left there is cleaned up when safe) and serves it on `opts.threads` threads.
    pub fn start<B: BlockExport + 'static>(
        backend: B,
        path: &Path,
        opts: &FuseOptions,
    ) -> Result<FuseExport, FuseError> {
        if !Path::new("/dev/fuse").exists() {
            return Err(FuseError::NoFuse);
        }
        let (abs, prepared) = mountpoint::prepare(path)?;
        let gate = Arc::new(Gate::default());
        let stats = Arc::new(Stats::default());
        let fs = CloneFs::new(
            backend,
            Arc::clone(&gate),
            Arc::clone(&stats),
            Tuning {
                max_io_bytes: opts.max_io_bytes,
                max_background: opts.max_background,
            },
        );
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("clonebd".to_string()),
            MountOption::Subtype("clonebd".to_string()),
            MountOption::DefaultPermissions,
            MountOption::NoAtime,
        ];
        config.acl = SessionACL::Owner;
        config.n_threads = Some(opts.threads.max(1));
        config.clone_fd = true;
        let mut session = Session::new(fs, &abs, &config).map_err(|source| FuseError::Mount {
            path: abs.clone(),
            source,
        })?;
        let unmounter = session.unmount_callable();
        let thread = std::thread::Builder::new()
            .name("clonebd-fuse".to_string())
            .spawn(move || session.run())
            .map_err(FuseError::Thread)?;
        Ok(FuseExport {
            path: abs,
            unmounter,
            thread: Some(thread),
            gate,
            stats,
            prepared,
        })
    }

    /// The absolute path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What was found at the path before mounting.
    pub fn prepared(&self) -> &Prepared {
        &self.prepared
    }

    /// Unmounts the file and waits for the serving threads. If something still uses the
    /// file (a loop device), the plain unmount fails: requests in flight are then finished,
    /// new ones refused with `EIO`, the mount detached lazily, and [`FuseError::Busy`]
    /// returned.
    pub fn stop(mut self) -> Result<(), FuseError> {
        let r = self.unmount_and_join();
        tracing::info!(
            "FUSE {}: {}",
            self.path.display(),
            self.stats.summary(self.gate.max_inflight())
        );
        r
    }

    fn unmount_and_join(&mut self) -> Result<(), FuseError> {
        match self.unmounter.unmount() {
            Ok(()) => {
                self.gate.close_and_drain(DRAIN_LIMIT);
                if let Some(t) = self.thread.take() {
                    match t.join() {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::warn!("FUSE session ended with: {e}"),
                        Err(_) => tracing::error!("FUSE session thread panicked"),
                    }
                }
                Ok(())
            }
            Err(source) => {
                let left = self.gate.close_and_drain(DRAIN_LIMIT);
                if left > 0 {
                    tracing::error!("{left} FUSE requests still running after {DRAIN_LIMIT:?}");
                }
                if let Err(e) = mountpoint::detach(&self.path) {
                    tracing::error!(
                        "cannot detach {}: {e}; unmount it with: {}",
                        self.path.display(),
                        mountpoint::unmount_command(&self.path)
                    );
                }
                // The serving threads end when the last user lets go, or with the process.
                drop(self.thread.take());
                Err(FuseError::Busy {
                    path: self.path.clone(),
                    source,
                })
            }
        }
    }
}
