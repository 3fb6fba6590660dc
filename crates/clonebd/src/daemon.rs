//! The daemon: open the three devices in the kernel's order, load the metadata, start the
//! engine, serve the exports and the control socket, and on shutdown run the suspend
//! sequence so everything is committed (H3).
//!
//! Both ways of describing a clone go through the kernel's table parser
//! ([`clonebd_core::dmclone::parse_table`]), so the checks, their order and their messages
//! are the kernel's whichever form the user chose.
//!
//! A fully hydrated clone may start without its source ([`CloneSpec::Hydrated`], or the
//! source word [`NO_SOURCE`] in a table): the region size and length come from the
//! metadata's superblock unless given, the start is refused unless the metadata says every
//! region is hydrated, and the clone is served finalized at once ([`Volume::start_finalized`]).
//! A running clone is finalized through the control socket ([`ControlRequest::Finalize`]).

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clonebd_core::dmclone::{
    CloneTable, DeviceInfo, Message, OpenFailure, TableDevices, TableError, format_table_line,
    parse_message, parse_table, split_table_words,
};
use clonebd_core::engine::{Config, Control, HydrationPriority};
use clonebd_core::errno::describe;
use clonebd_core::{BlockDev, Geometry, SECTOR_SIZE};
use clonebd_driver::{
    FinalizeError, Finalized, IoError, MonotonicClock, StoreBackend, Volume, VolumeOptions,
};
use clonebd_io::identity::Identity;
use clonebd_io::socket::{BindError, SocketFile, bind_unix};
use clonebd_io::{FileDevice, OpenError, OpenOptions};
use clonebd_metadata::{MetadataError, MetadataStore, StoreOptions};
use clonebd_nbd::{MemoryBudget, Server, ServerConfig, ServerError, ShutdownHandle};
use thiserror::Error;

use crate::control::{
    ControlError, ControlHandler, ControlReply, ControlRequest, ControlServer, remove_socket,
};
use crate::export_nbd::CloneExport;
use crate::pin::{PinError, PinFile};
use crate::source::{self, Opened, SourceOptions, Sources};
use crate::status::{RateMeter, status_json, status_line};
use clonebd_remote::SourceStats;

use crate::metrics::{MetricsError, MetricsServer, MetricsSources};
use crate::notify::Notifier;
use crate::order::{self, OrderFileError, OrderFiles};
use clonebd_core::ranges::ByteRange;
use clonebd_driver::record::ReadRecorder;

/// How the clone is described.
#[derive(Debug, Clone)]
pub enum CloneSpec {
    /// With flags (`--source --dest --metadata ...`).
    Flags {
        /// Source path.
        source: PathBuf,
        /// Destination path.
        dest: PathBuf,
        /// Metadata path (created and formatted only with `create_metadata`).
        metadata: PathBuf,
        /// Region size in bytes.
        region_bytes: u64,
        /// `no_hydration`.
        no_hydration: bool,
        /// `no_discard_passdown`.
        no_discard_passdown: bool,
        /// `hydration_threshold` (ours by default, see `--help`).
        hydration_threshold: u32,
        /// `hydration_batch_size`.
        hydration_batch_size: u32,
    },
    /// A fully hydrated clone without its source (`--dest --metadata` and no `--source`):
    /// served finalized, straight from the destination. Refused unless the metadata says
    /// every region is hydrated.
    Hydrated {
        /// Destination path.
        dest: PathBuf,
        /// Metadata path (it must exist and hold the clone).
        metadata: PathBuf,
        /// Region size in bytes (default: the metadata's).
        region_bytes: Option<u64>,
        /// `no_discard_passdown`.
        no_discard_passdown: bool,
    },
    /// With the kernel's table language:
    /// `META DEST SOURCE REGION_SECTORS [#features FEATURES...] [#core KEY VALUE...]`,
    /// optionally preceded by `<start> <len> clone`. A SOURCE of [`NO_SOURCE`] (`-`) starts a
    /// fully hydrated clone without its source, as [`CloneSpec::Hydrated`] does.
    Table(String),
}

/// The source word that means "no source" in a table line: the clone is fully hydrated and
/// is served finalized from its destination.
pub const NO_SOURCE: &str = "-";

/// Everything `clonebd run` is told.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The clone.
    pub spec: CloneSpec,
    /// The clone's size in bytes (default: the source's).
    pub size_bytes: Option<u64>,
    /// Create and format the metadata file, which must not exist yet (`--create`). Without
    /// it a missing metadata path is an error: a mistyped path must never start a clone
    /// afresh over a destination that holds one.
    pub create_metadata: bool,
    /// Serve NBD on this unix socket.
    pub nbd_unix: Option<PathBuf>,
    /// Serve NBD on this TCP address.
    pub nbd_tcp: Option<SocketAddr>,
    /// The control socket.
    pub control: Option<PathBuf>,
    /// Serve Prometheus metrics at `/metrics` on this TCP address.
    pub metrics: Option<SocketAddr>,
    /// Sparse-aware hydration: holes and zeros of the source are zeroed on the destination
    /// instead of copied.
    pub sparse_hydration: bool,
    /// Use O_DIRECT on the data devices where they allow it.
    pub direct_io: bool,
    /// Reserve the clone's space in a regular-file destination at start (with sparse-aware
    /// hydration, a local source's data only: `reserve_ranges`).
    pub preallocate: bool,
    /// Threads running background copies.
    pub copy_threads: usize,
    /// Background hydration bandwidth limit, bytes per second (0: none).
    pub hydration_rate_limit: u64,
    /// Copy-on-read (`--hydrate-on-read`): the most bytes of read data waiting to be
    /// written to the destination (0: off).
    pub hydrate_on_read: u64,
    /// How background copies and client I/O trade while clients are active.
    pub hydration_priority: HydrationPriority,
    /// NBD worker threads (default: the server's).
    pub nbd_workers: Option<usize>,
    /// Serve NBD connections through io_uring (`ServerConfig::io_uring`).
    pub nbd_io_uring: bool,
    /// Admission limits of the NBD servers.
    pub nbd_limits: NbdLimits,
    /// Serve the clone as this regular file over FUSE (created if missing).
    pub fuse: Option<PathBuf>,
    /// Serve the clone as a ublk block device (/dev/ublkbN).
    pub ublk: bool,
    /// How a remote source is reached (timeouts, connections, TLS roots).
    pub source: SourceOptions,
    /// Where a remote source's identity is pinned (default: `META.source-pin`).
    pub source_pin: Option<PathBuf>,
    /// Require TLS on the NBD exports, made secure by this hook (`--nbd-tls-cert`).
    pub nbd_tls: Option<clonebd_nbd::ServerTls>,
    /// The hydration order's files (`--hydrate-first`, `--record-reads`).
    pub order: OrderFiles,
}

/// Admission limits of the NBD servers (see `clonebd_nbd::admission`); the defaults are
/// `ServerConfig`'s. The memory budget is one for the unix and the TCP server together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdLimits {
    /// Connections in the transmission phase at once, per server.
    pub max_connections: usize,
    /// Connections in their handshake at once, per server.
    pub max_handshakes: usize,
    /// Connections in their handshake at once from one IP address.
    pub max_handshakes_per_peer: usize,
    /// The deadline of the whole handshake.
    pub handshake_timeout: Duration,
    /// The payload deadline: a write's payload, and each send of replies, must be over
    /// within this of its start.
    pub payload_timeout: Duration,
    /// Payload bytes all connections may hold in flight.
    pub memory_budget: usize,
    /// Of the budget, what the connections of one IP address may hold.
    pub memory_budget_per_peer: usize,
}

impl Default for NbdLimits {
    fn default() -> Self {
        let c = ServerConfig::default();
        Self {
            max_connections: c.max_connections,
            max_handshakes: c.max_handshakes,
            max_handshakes_per_peer: c.max_handshakes_per_peer,
            handshake_timeout: c.handshake_timeout.unwrap_or(Duration::from_secs(10)),
            payload_timeout: c.payload_timeout.unwrap_or(Duration::from_secs(30)),
            memory_budget: c.memory_budget,
            memory_budget_per_peer: c.memory_budget_per_peer,
        }
    }
}

/// Why the daemon could not start or stopped badly.
///
/// Each message names the role and path once and gives the cause once: none of these
/// errors hands its cause on as a `source()`, so a printed chain never repeats it.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The table (or the flags) were refused; the text is the kernel's, or for a device that
    /// did not open, what failed on which role.
    #[error("{}", table_text(.error))]
    Table {
        /// The parser's error.
        error: TableError,
    },
    /// The source could not be opened (the message names it and the cause).
    #[error("{0}")]
    Source(String),
    /// A path could not be examined.
    #[error("{role} {}: cannot examine it: {}", .path.display(), describe(.error))]
    Stat {
        /// "source", "destination" or "metadata".
        role: &'static str,
        /// The path.
        path: PathBuf,
        /// The system's error.
        error: io::Error,
    },
    /// Two roles name the same storage.
    #[error("{0}")]
    RolesOverlap(String),
    /// The metadata path does not exist and `--create` was not given.
    #[error(
        "metadata {}: not found. To start a new clone, add --create (clonebd creates and formats it), or give a zeroed file or device, as the kernel's dm-clone expects; to go on with a clone, give the metadata it was started with",
        .path.display()
    )]
    MetadataMissing {
        /// The metadata path.
        path: PathBuf,
    },
    /// `--create` was given for a path that exists.
    #[error(
        "metadata {}: already exists, and --create only makes new metadata. Drop --create to go on with the clone it holds (a zeroed file or device is formatted)",
        .path.display()
    )]
    MetadataExists {
        /// The metadata path.
        path: PathBuf,
    },
    /// A size is not a whole number of sectors.
    #[error("{0}")]
    Size(String),
    /// The metadata could not be loaded or created.
    #[error("metadata {}: {error}{}", .path.display(), metadata_hint(.error, .path))]
    Metadata {
        /// The metadata path.
        path: PathBuf,
        /// The store's error.
        error: MetadataError,
    },
    /// Space for the clone could not be reserved in the destination file.
    #[error(
        "destination {}: cannot reserve {bytes} bytes for the clone: {}; free space, or start with --no-preallocate",
        .path.display(), describe(.error)
    )]
    Preallocate {
        /// The destination.
        path: PathBuf,
        /// The clone's size.
        bytes: u64,
        /// The system's error.
        error: io::Error,
    },
    /// The NBD unix socket could not be created: a server answers on the path, something
    /// else is there, or binding failed.
    #[error("NBD socket {}: {error}", .path.display())]
    Bind {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        error: BindError,
    },
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// An NBD TCP listener could not start.
    #[error("NBD socket {what}: cannot listen: {}", describe(.error))]
    Listen {
        /// The socket.
        what: String,
        /// The system's error.
        error: io::Error,
    },
    /// A thread could not start.
    #[error("cannot start thread {name}: {}", describe(.error))]
    Thread {
        /// The thread's name.
        name: String,
        /// The system's error.
        error: io::Error,
    },
    /// A file of the hydration order was refused (it names the file and the line).
    #[error("{0}")]
    Order(OrderFileError),
    /// The NBD server refused the export.
    #[error("NBD server: {0}")]
    Nbd(ServerError),
    /// The control socket could not start.
    #[error("{0}")]
    Control(ControlError),
    /// The FUSE export could not start.
    #[error("{0}")]
    Fuse(clonebd_fuse::FuseError),
    /// The ublk export could not start.
    #[error("{0}")]
    Ublk(clonebd_ublk::UblkError),
    /// A remote source's pinned identity could not be kept, or the source changed.
    #[error("{0}")]
    Pin(PinError),
    /// Waiting for signals failed.
    #[error("cannot wait for signals: {}", describe(.0))]
    Signals(io::Error),
    /// The final commit failed: the metadata may not hold the last hydrations.
    #[error("the final metadata commit failed ({0}); the next start re-copies what was lost")]
    FinalCommit(IoError),
    /// No source was given, but the metadata does not say every region is hydrated.
    #[error(
        "metadata {}: {remaining} of {total} regions are not hydrated, so the clone still needs its source: give --source (or the table's source device) to go on hydrating it",
        .path.display()
    )]
    SourceNeeded {
        /// The metadata path.
        path: PathBuf,
        /// Regions not hydrated.
        remaining: u64,
        /// Regions in all.
        total: u64,
    },
    /// No source was given, and the metadata holds no clone to serve without one.
    #[error("metadata {}: {why}, so there is no hydrated clone to serve without a source: give --source", .path.display())]
    NoClone {
        /// The metadata path.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

impl From<ServerError> for DaemonError {
    fn from(e: ServerError) -> Self {
        DaemonError::Nbd(e)
    }
}

impl From<ControlError> for DaemonError {
    fn from(e: ControlError) -> Self {
        DaemonError::Control(e)
    }
}

impl From<clonebd_fuse::FuseError> for DaemonError {
    fn from(e: clonebd_fuse::FuseError) -> Self {
        DaemonError::Fuse(e)
    }
}

impl From<clonebd_ublk::UblkError> for DaemonError {
    fn from(e: clonebd_ublk::UblkError) -> Self {
        DaemonError::Ublk(e)
    }
}

/// A table error in words: for a device that did not open, what the opener said (the role,
/// the path and the cause); otherwise the kernel's text and its detail.
fn table_text(e: &TableError) -> String {
    match e {
        TableError::MetadataOpen { failure, .. }
        | TableError::DestinationOpen { failure, .. }
        | TableError::SourceOpen { failure, .. } => failure.detail.clone(),
        _ => format!("{e}{}", detail_of(e)),
    }
}

/// What to do about a metadata device that is too small.
fn metadata_hint(e: &MetadataError, path: &Path) -> String {
    match e {
        MetadataError::DeviceTooSmall { needed_bytes, .. } => format!(
            "; for a new clone, make it large enough (truncate -s {} {})",
            needed_bytes.div_ceil(4096) * 4096,
            path.display()
        ),
        _ => String::new(),
    }
}

fn detail_of(e: &TableError) -> String {
    match std::error::Error::source(e) {
        Some(s) => format!(": {s}"),
        None => String::new(),
    }
}

/// The bytes one background copy reads from the source `word` names, by default: 1 MiB from
/// a local file or device or an NBD export; 8 MiB from an HTTP(S) image or an S3 object,
/// where each read is a request of its own, with a round trip and, on object stores, a
/// cost per request (moto, measured: 1 MiB ranges take 7 times as long as 8 MiB ones for
/// the same object). It is also the piece a copy is done in (`VolumeOptions::copy_chunk`).
pub fn default_copy_bytes(word: &str) -> u64 {
    use clonebd_remote::uri::SourceUri;
    match SourceUri::parse(word) {
        Ok(SourceUri::Http(_) | SourceUri::S3 { .. }) => 8 << 20,
        _ => 1 << 20,
    }
}

/// Our default `hydration_batch_size` for a region size: enough regions for one copy of
/// `copy_bytes` ([`default_copy_bytes`]).
pub fn default_batch(region_bytes: u64, copy_bytes: u64) -> u32 {
    u32::try_from((copy_bytes / region_bytes.max(1)).max(1)).unwrap_or(u32::MAX)
}

/// Our default `hydration_threshold` for a region size: eight such copies in flight.
pub fn default_threshold(region_bytes: u64, copy_bytes: u64) -> u32 {
    default_batch(region_bytes, copy_bytes).saturating_mul(8)
}

/// Metadata bytes to create for a geometry: twice the bitmap (shadowing may copy every
/// block once in a transaction) plus 1 MiB, at least 4 MiB, whole 4 KiB blocks (SPEC 5.6).
pub fn metadata_size_for(g: &Geometry) -> u64 {
    let bitmap = g.nr_regions().div_ceil(8);
    let bytes = (2 * bitmap + (1 << 20)).max(4 << 20);
    bytes.div_ceil(4096) * 4096
}

/// Opens devices for the table parser, in the order it asks.
struct Opener {
    direct: bool,
    /// No source: the table's source word is [`NO_SOURCE`], and it reports this many bytes
    /// (the clone's length) to the parser.
    no_source: Option<u64>,
    create_meta: Option<u64>,
    /// Metadata this start created: removed again if the start fails.
    created_meta: CreatedFile,
    meta: Option<FileDevice>,
    dest: Option<FileDevice>,
    source: Option<Opened>,
    sources: Sources,
    source_opts: SourceOptions,
}

/// An open error as the table parser takes it: the kernel's errno, and our words with the
/// role in front.
fn failure(role: &str, e: &OpenError) -> OpenFailure {
    let errno = match e {
        OpenError::Open { cause, .. } if cause.kind() == io::ErrorKind::NotFound => libc::ENODEV,
        _ => e.errno(),
    };
    OpenFailure {
        errno,
        detail: format!("{role} {e}"),
    }
}

impl TableDevices for Opener {
    fn open_metadata(&mut self, path: &str) -> Result<u64, OpenFailure> {
        let p = Path::new(path);
        if let Some(size) = self.create_meta {
            // `Daemon::start` made sure nothing is there; create_new refuses a path that
            // appeared since.
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(p)
                .and_then(|f| f.set_len(size));
            match f {
                Ok(()) => self.created_meta = CreatedFile(Some(p.to_path_buf())),
                Err(e) => {
                    return Err(OpenFailure {
                        errno: e.raw_os_error().unwrap_or(libc::EIO),
                        detail: format!("metadata {path}: cannot create it: {}", describe(&e)),
                    });
                }
            }
        }
        let d = FileDevice::open(p, OpenOptions::read_write().exclusive(true))
            .map_err(|e| failure("metadata", &e))?;
        let size = d.size_bytes();
        self.meta = Some(d);
        Ok(size)
    }

    fn open_destination(&mut self, path: &str) -> Result<DeviceInfo, OpenFailure> {
        let d = FileDevice::open(
            path,
            OpenOptions::read_write()
                .direct(self.direct)
                .exclusive(true),
        )
        .map_err(|e| failure("destination", &e))?;
        let info = DeviceInfo {
            size_bytes: d.size_bytes(),
            logical_block_size: d.logical_block_size(),
        };
        self.dest = Some(d);
        Ok(info)
    }

    fn open_source(&mut self, path: &str) -> Result<DeviceInfo, OpenFailure> {
        if let Some(size_bytes) = self.no_source {
            // Nothing to open: the parser's checks hold for a source as long as the clone,
            // and the destination's logical block alone sets the clone's.
            return Ok(DeviceInfo {
                size_bytes,
                logical_block_size: 512,
            });
        }
        // Read-only, always: the source is never written (see `source::open`).
        let d = self
            .sources
            .get(path, &self.source_opts)
            .map_err(|e| OpenFailure {
                errno: e.errno(),
                detail: e.to_string(),
            })?;
        let info = DeviceInfo {
            size_bytes: d.dev.size_bytes(),
            logical_block_size: d.dev.logical_block_size(),
        };
        self.source = Some(d);
        Ok(info)
    }
}

/// The three roles, in the order [`check_roles`] takes their paths.
const ROLES: [&str; 3] = ["source", "destination", "metadata"];

/// Refuses a clone whose source, destination and metadata share storage (the same file
/// through any name or link, a loop device over one of the others, a partition and its
/// disk, a file on a device that is another role), before anything is opened for writing.
/// Paths that do not exist overlap nothing. `paths` are the source, the destination and the
/// metadata.
pub fn check_roles(paths: [&Path; 3]) -> Result<(), DaemonError> {
    check_present_roles(ROLES.iter().copied().zip(paths))
}

/// As [`check_roles`] over the roles given (a clone without a source has two).
fn check_present_roles<'a>(
    roles: impl Iterator<Item = (&'static str, &'a Path)>,
) -> Result<(), DaemonError> {
    let mut ids = Vec::with_capacity(3);
    for (role, path) in roles {
        match Identity::of(path) {
            Ok(id) => ids.push((role, id)),
            Err(error) => {
                return Err(DaemonError::Stat {
                    role,
                    path: path.to_path_buf(),
                    error,
                });
            }
        }
    }
    for i in 0..ids.len() {
        for j in i + 1..ids.len() {
            let ((ra, Some(a)), (rb, Some(b))) = (&ids[i], &ids[j]) else {
                continue;
            };
            let Some(how) = a.overlap(b) else { continue };
            let first = format!("{ra} {}", a.path.display());
            let second = format!("{rb} {}", b.path.display());
            let harm = match (*ra, *rb) {
                (_, "record-reads file") => "the reads recorded would be appended to it",
                ("source", "metadata") => "the source would be formatted as metadata",
                ("source", _) => "the source would be written",
                _ => "the metadata and the clone's data would overwrite each other",
            };
            return Err(DaemonError::RolesOverlap(format!(
                "{}: {harm}. Give the source, the destination and the metadata three different files or devices",
                how.sentence(&first, &second)
            )));
        }
    }
    Ok(())
}

/// The region size and length, in sectors, that the metadata at `path` records: what a
/// clone started without its source is served with. Refused, naming why, if the path holds
/// no formatted clone (a zeroed file would otherwise be formatted as a new, empty clone).
fn stored_geometry(path: &Path) -> Result<(u64, u64), DaemonError> {
    use clonebd_metadata::format::superblock::{Superblock, is_all_zero};
    use clonebd_metadata::format::{BLOCK_SIZE, BlockBuf};
    use std::os::unix::fs::FileExt;
    let no_clone = |why: String| DaemonError::NoClone {
        path: path.to_path_buf(),
        why,
    };
    let f = std::fs::File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => no_clone("not found".to_string()),
        _ => no_clone(format!("cannot open it: {}", describe(&e))),
    })?;
    let mut block: Box<BlockBuf> = Box::new([0u8; BLOCK_SIZE]);
    f.read_exact_at(&mut block[..], 0)
        .map_err(|e| no_clone(format!("cannot read its superblock: {}", describe(&e))))?;
    if is_all_zero(&block[..]) {
        return Err(no_clone("it is not formatted (all zeros)".to_string()));
    }
    let sb = Superblock::decode(&block).map_err(|e| no_clone(e.to_string()))?;
    Ok((sb.region_sectors, sb.target_sectors))
}

/// Refuses a size that is not a whole number of sectors, naming the nearest sizes that
/// work: clonebd never drops the partial sector at a source's end without a word.
fn check_size(
    size: u64,
    given: bool,
    source: &str,
    source_bytes: Option<u64>,
) -> Result<(), DaemonError> {
    if size.is_multiple_of(SECTOR_SIZE) {
        return Ok(());
    }
    let down = size / SECTOR_SIZE * SECTOR_SIZE;
    let up = down + SECTOR_SIZE;
    let text = if given {
        let mut ok: Vec<String> = Vec::new();
        if down > 0 {
            ok.push(down.to_string());
        }
        if source_bytes.is_none_or(|s| up <= s) {
            ok.push(up.to_string());
        }
        format!(
            "--size {size}: not a multiple of 512 bytes (a clone is a whole number of sectors); the nearest sizes that work: {}",
            ok.join(" or ")
        )
    } else {
        let shorter = if down > 0 {
            format!("give --size {down} to clone its first {down} bytes, or ")
        } else {
            String::new()
        };
        format!(
            "source {source}: its size, {size} bytes, is not a multiple of 512 bytes, and a clone is a whole number of sectors: {shorter}extend the source to {up} bytes"
        )
    };
    Err(DaemonError::Size(text))
}

fn dev_word(d: &FileDevice) -> String {
    if d.is_block_device() {
        match d.dev_numbers() {
            Ok((maj, min)) => format!("{maj}:{min}"),
            Err(_) => d.path().display().to_string(),
        }
    } else {
        d.path().display().to_string()
    }
}

/// A running daemon.
pub struct Daemon {
    volume: Volume,
    table: CloneTable,
    table_line: String,
    nbd: Vec<(ShutdownHandle, JoinHandle<()>)>,
    nbd_servers: Vec<Arc<Server>>,
    /// The NBD unix socket's file, removed on shutdown if still ours.
    nbd_unix: Option<SocketFile>,
    control: Option<ControlServer>,
    stop_sampler: Arc<AtomicBool>,
    sampler: Option<JoinHandle<()>>,
    fuse: Option<clonebd_fuse::FuseExport>,
    ublk: Option<clonebd_ublk::UblkExport>,
    /// A remote source's state and counters.
    source_stats: Option<Arc<SourceStats>>,
    metrics: Option<MetricsServer>,
    /// `--record-reads`: finished (written out and synced) at shutdown.
    recorder: Option<Arc<ReadRecorder>>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("table", &self.table_line)
            .finish_non_exhaustive()
    }
}

struct Handler {
    volume: Volume,
    table_line: String,
    /// The source as the table shows it, and the destination's path, for messages.
    source_word: String,
    dest_path: String,
    rate: Arc<RateMeter>,
    servers: Arc<Mutex<Vec<Arc<Server>>>>,
    started: Instant,
    source: Option<Arc<SourceStats>>,
}

impl Handler {
    fn connections(&self) -> (u64, u64) {
        let servers = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        servers.iter().map(|s| s.stats()).fold((0, 0), |(a, t), s| {
            (a + s.active_connections, t + s.total_connections)
        })
    }

    fn commit_unless(&self, noflush: bool) {
        if !noflush {
            // The kernel's INFO status commits first; a failure shows in the mode.
            let _ = self.volume.commit();
        }
    }
}

fn control_of(m: Message) -> Control {
    match m {
        Message::EnableHydration => Control::EnableHydration,
        Message::DisableHydration => Control::DisableHydration,
        Message::HydrationThreshold(n) => Control::SetHydrationThreshold(n),
        Message::HydrationBatchSize(n) => Control::SetHydrationBatchSize(n),
        Message::HydrateRange(r) => Control::HydrateFirst {
            offset: r.offset,
            len: r.len,
            front: true,
        },
    }
}

impl ControlHandler for Handler {
    fn handle(&self, req: ControlRequest) -> ControlReply {
        match req {
            ControlRequest::Status { noflush } => {
                self.commit_unless(noflush);
                ControlReply::ok(status_line(&self.volume.status()))
            }
            ControlRequest::StatusJson { noflush } => {
                self.commit_unless(noflush);
                let j = status_json(
                    &self.volume.status(),
                    self.rate.rate(),
                    self.connections(),
                    self.started.elapsed(),
                    self.source.as_ref().map(|s| s.report()),
                );
                match serde_json::to_string_pretty(&j) {
                    Ok(s) => ControlReply::ok(s),
                    Err(e) => ControlReply::err(e.to_string()),
                }
            }
            ControlRequest::Table => ControlReply::ok(self.table_line.clone()),
            ControlRequest::Message { words } => {
                let w: Vec<&str> = words.iter().map(String::as_str).collect();
                match parse_message(&w) {
                    Ok(m) if self.volume.is_finalized() => ControlReply::err(format!(
                        "message {m}: refused, the clone is finalized: every region is hydrated and the source is detached, so there is no hydration left to control"
                    )),
                    Ok(Message::HydrateRange(r))
                        if let Err(e) = r.check(self.volume.size_bytes()) =>
                    {
                        ControlReply::err(format!("hydrate_range: {e}"))
                    }
                    Ok(m) => {
                        tracing::info!("message: {m}");
                        self.volume.control(control_of(m));
                        ControlReply::ok(String::new())
                    }
                    Err(e) => ControlReply::err(e.to_string()),
                }
            }
            ControlRequest::Finalize => self.finalize(),
        }
    }
}

impl Handler {
    fn finalize(&self) -> ControlReply {
        match self.volume.finalize() {
            Ok(Finalized::Now) => {
                tracing::info!(
                    "finalized: source {} detached; requests go straight to {}",
                    self.source_word,
                    self.dest_path
                );
                ControlReply::ok(format!(
                    "finalized: every region is hydrated and committed, the source {} is detached, and requests go straight to {}",
                    self.source_word, self.dest_path
                ))
            }
            Ok(Finalized::Already) => ControlReply::ok(format!(
                "already finalized: requests go straight to {}",
                self.dest_path
            )),
            Err(FinalizeError::NotHydrated { remaining, total }) => ControlReply::err(format!(
                "cannot finalize: {remaining} of {total} regions are not hydrated yet (without --no-wait, finalize waits for them)"
            )),
            Err(e) => ControlReply::err(format!("cannot finalize: {e}")),
        }
    }
}

impl Daemon {
    /// Opens everything and starts serving.
    pub fn start(opts: &RunOptions) -> Result<Daemon, DaemonError> {
        // Every NBD connection is a descriptor (two with threads): allow as many as the hard
        // limit does, not the 1024 a shell starts with.
        match clonebd_io::limits::raise_nofile_limit() {
            Ok((before, after)) if after > before => {
                tracing::debug!(before, after, "raised the open-file limit");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
        }
        let source_opts = SourceOptions {
            direct: opts.direct_io,
            ..opts.source.clone()
        };
        let mut sources = Sources::default();
        let (words, target_sectors, create_size) =
            Self::table_words(opts, &mut sources, &source_opts)?;
        let no_source = words.get(2).is_some_and(|w| w == NO_SOURCE);
        if let [meta, dest, source, ..] = &words[..] {
            let source = (!no_source).then_some(("source", Path::new(source)));
            let rest = [
                ("destination", Path::new(dest)),
                ("metadata", Path::new(meta)),
            ];
            // The record file is appended to: it must not be any of the clone's storage.
            let record = opts
                .order
                .record_reads
                .as_deref()
                .map(|p| ("record-reads file", p));
            check_present_roles(source.into_iter().chain(rest).chain(record))?;
        }
        // The order's files, checked against the clone's size before anything is opened
        // for writing (the record file is opened for appending only once it passed).
        let (first, record) = Self::order_files(&opts.order, target_sectors * SECTOR_SIZE)?;
        // A record file this start created goes again if the start fails.
        let mut created_record = CreatedFile(record.as_ref().and_then(|r| r.2.clone()));
        if no_source {
            let meta = PathBuf::from(words.first().map_or("", String::as_str));
            if opts.create_metadata {
                return Err(DaemonError::NoClone {
                    path: meta,
                    why: "--create makes new metadata".to_string(),
                });
            }
            // Before the store could format a zeroed file (a table line gives the length,
            // so the superblock may not have been read yet).
            stored_geometry(&meta)?;
        }
        let create_meta = match words.first() {
            Some(meta) => {
                let path = Path::new(meta);
                // symlink_metadata: a dangling link is something there, not nothing.
                let exists = path.symlink_metadata().is_ok();
                match (opts.create_metadata, exists) {
                    (true, true) => {
                        return Err(DaemonError::MetadataExists {
                            path: path.to_path_buf(),
                        });
                    }
                    (false, false) => {
                        return Err(DaemonError::MetadataMissing {
                            path: path.to_path_buf(),
                        });
                    }
                    (true, false) => create_size,
                    (false, true) => None,
                }
            }
            None => None,
        };
        let refs: Vec<&str> = words.iter().map(String::as_str).collect();
        let mut opener = Opener {
            direct: opts.direct_io,
            no_source: no_source.then(|| target_sectors * SECTOR_SIZE),
            create_meta,
            created_meta: CreatedFile(None),
            meta: None,
            dest: None,
            source: None,
            sources,
            source_opts,
        };
        let table = match parse_table(target_sectors, &refs, &mut opener) {
            Ok(t) => t,
            Err(error) => {
                return Err(DaemonError::Table { error });
            }
        };
        for w in &table.warnings {
            tracing::warn!("{w}");
        }
        let (Some(meta_dev), Some(dest), source) =
            (opener.meta.take(), opener.dest.take(), opener.source.take())
        else {
            return Err(DaemonError::Table {
                error: TableError::ArgumentCount { argc: words.len() },
            });
        };
        if source.is_none() != no_source {
            return Err(DaemonError::Table {
                error: TableError::ArgumentCount { argc: words.len() },
            });
        }
        let meta_path = PathBuf::from(&table.metadata_path);
        let shown = source
            .as_ref()
            .map_or_else(|| NO_SOURCE.to_string(), |s| s.shown.clone());
        let devs = [dev_word(&meta_dev), dev_word(&dest), shown];
        let table_line = format_table_line(
            table.geometry.target_sectors(),
            [&devs[0], &devs[1], &devs[2]],
            &table.ctr_args,
        );
        let geometry = table.geometry;
        // Where a remote source's pin goes is known before the metadata is opened: a start
        // that cannot keep the pin must not format a zeroed metadata device first.
        let remote = source.as_ref().and_then(|s| s.remote.clone());
        let pin_file = match &remote {
            Some(_) => match PinFile::for_metadata(&meta_path, opts.source_pin.as_deref()) {
                Ok(p) => Some(p),
                Err(e) => {
                    return Err(DaemonError::Pin(e));
                }
            },
            None => None,
        };
        let (store, map) = match MetadataStore::open(meta_dev, geometry, StoreOptions::default()) {
            Ok(x) => x,
            Err(source) => {
                return Err(DaemonError::Metadata {
                    path: meta_path,
                    error: source,
                });
            }
        };
        if no_source {
            let total = map.nr_regions();
            let remaining = total - map.nr_hydrated();
            if remaining > 0 {
                return Err(DaemonError::SourceNeeded {
                    path: meta_path,
                    remaining,
                    total,
                });
            }
        }
        if let (Some(remote), Some(pin)) = (&remote, pin_file) {
            // Before the first copy: a fresh clone pins the source as it is now; one with
            // hydrated regions goes on only with the source it began with.
            let pinned = pin
                .reconcile(map.nr_hydrated(), &remote.identity(), |p| remote.adopt(p))
                .map(|()| pin);
            match pinned {
                Ok(pin) => tracing::info!(
                    "source {} pinned in {}: {} bytes, {:?}",
                    remote.identity().uri,
                    pin.path().display(),
                    remote.identity().size,
                    remote.identity().marks
                ),
                Err(e) => {
                    return Err(DaemonError::Pin(e));
                }
            }
        }
        if opts.preallocate {
            let ranges = reserve_ranges(
                source.as_ref().map(|s| (&*s.dev, s.remote.is_some())),
                opts.sparse_hydration,
                geometry.target_bytes(),
            );
            let bytes = ranges.iter().map(|r| r.1).sum::<u64>();
            let reserved = ranges
                .iter()
                .try_for_each(|&(at, len)| dest.preallocate_range(at, len).map(drop));
            match reserved {
                Ok(()) => tracing::debug!(
                    "{}: reserved {bytes} bytes in {} ranges",
                    table.destination_path,
                    ranges.len()
                ),
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    tracing::info!(
                        "{}: cannot reserve space ({e}); continuing",
                        table.destination_path
                    );
                }
                Err(error) => {
                    return Err(DaemonError::Preallocate {
                        path: PathBuf::from(&table.destination_path),
                        bytes,
                        error,
                    });
                }
            }
        }
        // From here on the clone's metadata stays, as the volume starts on it.
        opener.created_meta.keep();
        let mut passdown = !table.no_discard_passdown;
        if passdown && !dest.caps().discard {
            tracing::warn!(
                "Destination device ({}) discard unsupported: Disabling discard passdown.",
                table.destination_path
            );
            passdown = false;
        }
        let mut cfg = Config::new(geometry);
        cfg.logical_block_size = table.logical_block_size();
        cfg.hydration_enabled = !table.no_hydration;
        cfg.discard_passdown = passdown;
        cfg.hydration_threshold = table.hydration_threshold;
        cfg.hydration_batch_size = table.hydration_batch_size;
        cfg.hydration_rate_limit = opts.hydration_rate_limit;
        cfg.hydration_priority = opts.hydration_priority;
        let vopts = VolumeOptions {
            engine: cfg,
            copy_threads: opts.copy_threads.max(1),
            copy_chunk: default_copy_bytes(&table.source_path),
            sparse: opts.sparse_hydration,
        };
        let clock = Arc::new(MonotonicClock::new());
        let volume = match &source {
            Some(source) => {
                tracing::info!(
                    "clone of {} onto {}: {} regions of {} KiB, {} hydrated; {} (direct I/O: source {}, destination {})",
                    table.source_path,
                    table.destination_path,
                    geometry.nr_regions(),
                    geometry.region_bytes() / 1024,
                    map.nr_hydrated(),
                    table_line,
                    source.direct,
                    dest.is_direct(),
                );
                Volume::start_ordered(
                    vopts,
                    &first,
                    Arc::clone(&source.dev),
                    Arc::new(dest),
                    Box::new(StoreBackend::new(store)),
                    map,
                    clock,
                )
            }
            None => {
                tracing::info!(
                    "finalized clone on {}, without a source: {} regions of {} KiB, all hydrated; {} (direct I/O: destination {})",
                    table.destination_path,
                    geometry.nr_regions(),
                    geometry.region_bytes() / 1024,
                    table_line,
                    dest.is_direct(),
                );
                let total = map.nr_regions();
                let backend = Box::new(StoreBackend::new(store));
                Volume::start_finalized(vopts, Arc::new(dest), backend, map, clock).map_err(
                    |_| DaemonError::SourceNeeded {
                        path: meta_path.clone(),
                        remaining: total,
                        total,
                    },
                )?
            }
        };
        if opts.hydrate_on_read > 0 {
            tracing::info!(
                "copy-on-read: reads hydrate the regions they cover wholly ({} KiB of read data held at most)",
                opts.hydrate_on_read / 1024
            );
            volume.set_hydrate_on_read(opts.hydrate_on_read);
        }
        // The volume holds the only reference to the source from here on, so finalizing
        // closes it.
        drop(source);
        let recorder = match record {
            Some((path, file, _)) => {
                let r = ReadRecorder::new(geometry, file).map_err(|error| DaemonError::Thread {
                    name: "clonebd-record".to_string(),
                    error,
                });
                let r = match r {
                    Ok(r) => Arc::new(r),
                    Err(e) => {
                        let _ = volume.shutdown();
                        return Err(e);
                    }
                };
                let _ = volume.record_reads(Arc::clone(&r));
                tracing::info!(
                    "recording the first reads of regions not hydrated in {}",
                    path.display()
                );
                Some(r)
            }
            None => None,
        };
        let mut daemon = Daemon {
            volume: volume.clone(),
            table,
            table_line: table_line.clone(),
            nbd: Vec::new(),
            nbd_servers: Vec::new(),
            nbd_unix: None,
            control: None,
            stop_sampler: Arc::new(AtomicBool::new(false)),
            sampler: None,
            fuse: None,
            ublk: None,
            source_stats: remote.as_ref().map(source::Remote::stats),
            metrics: None,
            recorder,
        };
        // From here on, a failure must still shut the volume down cleanly.
        match daemon.start_services(opts) {
            Ok(()) => {
                created_record.keep();
                Ok(daemon)
            }
            Err(e) => {
                let _ = daemon.shutdown();
                Err(e)
            }
        }
    }

    fn start_services(&mut self, opts: &RunOptions) -> Result<(), DaemonError> {
        let mut cfg = ServerConfig {
            export_name: "clonebd".to_string(),
            description: if self.table.source_path == NO_SOURCE {
                format!(
                    "clonebd clone on {} (finalized)",
                    self.table.destination_path
                )
            } else {
                format!("clonebd clone of {}", self.table.source_path)
            },
            ..ServerConfig::default()
        };
        if let Some(w) = opts.nbd_workers {
            cfg.workers = w.max(1);
        }
        cfg.io_uring = opts.nbd_io_uring;
        cfg.tls = opts.nbd_tls.clone();
        // The URIs the log shows: nbds:// once the exports require TLS.
        let s = if cfg.tls.is_some() { "s" } else { "" };
        let l = &opts.nbd_limits;
        cfg.max_connections = l.max_connections;
        cfg.max_handshakes = l.max_handshakes;
        cfg.max_handshakes_per_peer = l.max_handshakes_per_peer;
        cfg.handshake_timeout = Some(l.handshake_timeout);
        cfg.payload_timeout = Some(l.payload_timeout);
        cfg.memory_budget = l.memory_budget;
        cfg.memory_budget_per_peer = l.memory_budget_per_peer;
        // One budget for both servers: the bound is on the daemon's memory.
        let budget = Arc::new(MemoryBudget::new(
            l.memory_budget,
            l.memory_budget_per_peer,
        )?);
        if let Some(p) = &opts.nbd_unix {
            let (l, file) = bind_unix(p, None).map_err(|error| DaemonError::Bind {
                path: p.clone(),
                error,
            })?;
            // Kept before anything else can fail, so that shutdown removes it.
            self.nbd_unix = Some(file);
            let server = Arc::new(Server::with_budget(
                Arc::new(CloneExport::new(self.volume.clone())),
                cfg.clone(),
                Arc::clone(&budget),
            )?);
            let h = server.shutdown_handle();
            let s2 = Arc::clone(&server);
            let t = spawn("clonebd-nbd-unix", move || {
                if let Err(e) = s2.serve_unix(l) {
                    tracing::error!("NBD unix server: {e}");
                }
            })?;
            tracing::info!(
                "serving NBD on unix socket {} (nbd{s}+unix:///clonebd?socket={})",
                p.display(),
                p.display()
            );
            self.nbd.push((h, t));
            self.nbd_servers.push(server);
        }
        if let Some(addr) = opts.nbd_tcp {
            let l = TcpListener::bind(addr).map_err(|error| DaemonError::Listen {
                what: addr.to_string(),
                error,
            })?;
            let server = Arc::new(Server::with_budget(
                Arc::new(CloneExport::new(self.volume.clone())),
                cfg,
                budget,
            )?);
            let h = server.shutdown_handle();
            let s2 = Arc::clone(&server);
            let t = spawn("clonebd-nbd-tcp", move || {
                if let Err(e) = s2.serve_tcp(l) {
                    tracing::error!("NBD TCP server: {e}");
                }
            })?;
            tracing::info!("serving NBD on {addr} (nbd{s}://{addr}/clonebd)");
            self.nbd.push((h, t));
            self.nbd_servers.push(server);
        }
        if let Some(p) = &opts.fuse {
            let fuse = clonebd_fuse::FuseExport::start(
                self.volume.clone(),
                p,
                &clonebd_fuse::FuseOptions::default(),
            )?;
            tracing::info!(
                "serving the clone as the file {} (FUSE; losetup it for a block device)",
                fuse.path().display()
            );
            self.fuse = Some(fuse);
        }
        if opts.ublk {
            let ublk = clonebd_ublk::UblkExport::start(
                self.volume.clone(),
                &clonebd_ublk::UblkOptions::default(),
            )?;
            tracing::info!("serving the clone as {}", ublk.device().display());
            self.ublk = Some(ublk);
        }
        let rate = Arc::new(RateMeter::new(Duration::from_secs(10)));
        {
            let (vol, rate, stop) = (
                self.volume.clone(),
                Arc::clone(&rate),
                Arc::clone(&self.stop_sampler),
            );
            self.sampler = Some(spawn("clonebd-rate", move || {
                while !stop.load(Ordering::Acquire) {
                    rate.sample(Instant::now(), vol.status().engine.bytes_hydrated);
                    std::thread::sleep(Duration::from_millis(500));
                }
            })?);
        }
        if let Some(addr) = opts.metrics {
            let m = MetricsServer::start(
                addr,
                MetricsSources {
                    volume: self.volume.clone(),
                    servers: self.nbd_servers.clone(),
                    source: self.source_stats.clone(),
                    started: Instant::now(),
                },
            )?;
            tracing::info!("metrics at http://{}/metrics", m.local_addr());
            self.metrics = Some(m);
        }
        if let Some(p) = &opts.control {
            let handler = Handler {
                volume: self.volume.clone(),
                table_line: self.table_line.clone(),
                source_word: self.table.source_path.clone(),
                dest_path: self.table.destination_path.clone(),
                rate,
                servers: Arc::new(Mutex::new(self.nbd_servers.clone())),
                started: Instant::now(),
                source: self.source_stats.clone(),
            };
            self.control = Some(ControlServer::start(p, Arc::new(handler))?);
            tracing::info!("control socket {}", p.display());
        }
        Ok(())
    }

    /// Words for the table parser, the target length, and the size to create missing
    /// metadata with (when `--create` asks for it).
    fn table_words(
        opts: &RunOptions,
        sources: &mut Sources,
        source_opts: &SourceOptions,
    ) -> Result<(Vec<String>, u64, Option<u64>), DaemonError> {
        // The clone's size: given (`--size`), or the source's; a whole number of sectors.
        let mut target_bytes = |source: &Path| -> Result<u64, DaemonError> {
            let word = source.display().to_string();
            let mut source_size = || {
                sources
                    .get(&word, source_opts)
                    .map(|o| o.dev.size_bytes())
                    .map_err(|e| DaemonError::Source(e.to_string()))
            };
            let shown = source::shown(&word);
            match opts.size_bytes {
                Some(s) => {
                    if !s.is_multiple_of(SECTOR_SIZE) {
                        let src = source_size().ok();
                        check_size(s, true, &shown, src)?;
                    }
                    Ok(s)
                }
                None => {
                    let s = source_size()?;
                    check_size(s, false, &shown, Some(s))?;
                    Ok(s)
                }
            }
        };
        let create_size = |target_sectors: u64, region_sectors: u64| {
            Geometry::new(target_sectors, region_sectors)
                .ok()
                .map(|g| metadata_size_for(&g))
        };
        match &opts.spec {
            CloneSpec::Flags {
                source,
                dest,
                metadata,
                region_bytes,
                no_hydration,
                no_discard_passdown,
                hydration_threshold,
                hydration_batch_size,
            } => {
                let target_sectors = target_bytes(source)? / SECTOR_SIZE;
                let region_sectors = region_bytes / SECTOR_SIZE;
                let mut w = vec![
                    metadata.display().to_string(),
                    dest.display().to_string(),
                    source.display().to_string(),
                    region_sectors.to_string(),
                ];
                let feats: Vec<&str> = [
                    (*no_hydration, "no_hydration"),
                    (*no_discard_passdown, "no_discard_passdown"),
                ]
                .into_iter()
                .filter_map(|(on, f)| on.then_some(f))
                .collect();
                w.push(feats.len().to_string());
                w.extend(feats.iter().map(|s| s.to_string()));
                w.extend([
                    "4".to_string(),
                    "hydration_threshold".to_string(),
                    hydration_threshold.to_string(),
                    "hydration_batch_size".to_string(),
                    hydration_batch_size.to_string(),
                ]);
                let create = create_size(target_sectors, region_sectors);
                Ok((w, target_sectors, create))
            }
            CloneSpec::Hydrated {
                dest,
                metadata,
                region_bytes,
                no_discard_passdown,
            } => {
                let (sb_region, sb_target) = stored_geometry(metadata)?;
                // Given sizes must match the metadata's; the store's open says so if not.
                if let Some(s) = opts.size_bytes {
                    check_size(s, true, NO_SOURCE, None)?;
                }
                let target_sectors = opts.size_bytes.map_or(sb_target, |s| s / SECTOR_SIZE);
                let region_sectors = region_bytes.map_or(sb_region, |r| r / SECTOR_SIZE);
                let mut w = vec![
                    metadata.display().to_string(),
                    dest.display().to_string(),
                    NO_SOURCE.to_string(),
                    region_sectors.to_string(),
                ];
                if *no_discard_passdown {
                    w.extend(["1".to_string(), "no_discard_passdown".to_string()]);
                } else {
                    w.push("0".to_string());
                }
                // Our defaults, as a start with a source has them: the status line shows them.
                let region = region_sectors * SECTOR_SIZE;
                w.extend([
                    "4".to_string(),
                    "hydration_threshold".to_string(),
                    default_threshold(region, 1 << 20).to_string(),
                    "hydration_batch_size".to_string(),
                    default_batch(region, 1 << 20).to_string(),
                ]);
                Ok((w, target_sectors, None))
            }
            CloneSpec::Table(line) => {
                let mut words = split_table_words(line);
                let mut target = None;
                // Accept the full dmsetup form `<start> <len> clone ...` too.
                if words.len() >= 3 && words[2] == "clone" {
                    target = words[1].parse::<u64>().ok();
                    words.drain(..3);
                }
                let target = match (opts.size_bytes, target, words.get(2)) {
                    (None, Some(t), _) => t,
                    (Some(s), _, Some(src)) if src == NO_SOURCE => {
                        check_size(s, true, NO_SOURCE, None)?;
                        s / SECTOR_SIZE
                    }
                    (None, None, Some(src)) if src == NO_SOURCE => {
                        stored_geometry(Path::new(&words[0]))?.1
                    }
                    (_, _, Some(src)) => target_bytes(Path::new(src))? / SECTOR_SIZE,
                    (Some(s), _, None) => s / SECTOR_SIZE,
                    (None, None, None) => 0,
                };
                let create = words
                    .get(3)
                    .and_then(|w| w.parse::<u64>().ok())
                    .and_then(|r| create_size(target, r));
                Ok((words, target, create))
            }
        }
    }

    /// Reads and checks the order's files for a clone of `size` bytes: the ranges to
    /// hydrate first, and the record file opened for appending (with its path again if
    /// this created it).
    #[allow(clippy::type_complexity)]
    fn order_files(
        files: &OrderFiles,
        size: u64,
    ) -> Result<
        (
            Vec<ByteRange>,
            Option<(PathBuf, std::fs::File, Option<PathBuf>)>,
        ),
        DaemonError,
    > {
        let first = match &files.hydrate_first {
            Some(p) => order::hydrate_first(p, size).map_err(DaemonError::Order)?,
            None => Vec::new(),
        };
        let record = match &files.record_reads {
            Some(p) => {
                let (file, created) = order::record_reads(p, size).map_err(DaemonError::Order)?;
                Some((p.clone(), file, created.then(|| p.clone())))
            }
            None => None,
        };
        if !first.is_empty() {
            let bytes: u64 = first.iter().map(|r| r.len).sum();
            tracing::info!(
                "hydrating first: {} ranges ({bytes} bytes) from {}",
                first.len(),
                files
                    .hydrate_first
                    .as_deref()
                    .unwrap_or(Path::new(""))
                    .display()
            );
        }
        Ok((first, record))
    }

    /// The running volume.
    pub fn volume(&self) -> &Volume {
        &self.volume
    }

    /// The dm-clone table line.
    pub fn table_line(&self) -> &str {
        &self.table_line
    }

    /// Tells systemd the clone is ready (every export serves once [`Daemon::start`] has
    /// returned), reports its progress, waits for SIGTERM or SIGINT, then shuts down.
    pub fn run_until_signal(self, notify: &Notifier) -> Result<(), DaemonError> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        // Signals are caught before READY=1, so a stop right after it still commits.
        let mut signals =
            signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(DaemonError::Signals)?;
        notify.ready(&crate::notify::progress(&self.volume));
        let reporter = notify.report(self.volume.clone());
        if let Some(sig) = signals.forever().next() {
            tracing::info!("signal {sig}: stopping");
        }
        notify.stopping();
        drop(reporter);
        self.shutdown()
    }

    /// Stops the exports (requests in flight finish), then runs the suspend sequence:
    /// stop hydration, wait for copies, commit.
    pub fn shutdown(mut self) -> Result<(), DaemonError> {
        drop(self.metrics.take());
        for (h, _) in &self.nbd {
            h.shutdown();
        }
        for (_, t) in self.nbd.drain(..) {
            let _ = t.join();
        }
        if let Some(f) = self.nbd_unix.take() {
            remove_socket("NBD socket", &f);
        }
        if let Some(f) = self.fuse.take()
            && let Err(e) = f.stop()
        {
            tracing::error!("{e}");
        }
        if let Some(u) = self.ublk.take() {
            u.stop();
        }
        if let Some(c) = self.control.take() {
            c.stop();
        }
        self.stop_sampler.store(true, Ordering::Release);
        if let Some(t) = self.sampler.take() {
            let _ = t.join();
        }
        let committed = self.volume.shutdown();
        if let Some(r) = self.recorder.take()
            && let Err(e) = r.finish()
        {
            tracing::error!("record-reads file: cannot write it: {}", describe(&e));
        }
        let s = self.volume.status();
        tracing::info!(
            "stopped: {} of {} regions hydrated",
            s.engine.nr_hydrated,
            s.engine.nr_regions
        );
        committed.map_err(DaemonError::FinalCommit)
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, DaemonError> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map_err(|error| DaemonError::Thread {
            name: name.to_string(),
            error,
        })
}

/// A file a start created (the metadata with `--create`, a `--record-reads` file), removed
/// again when dropped unless kept ([`CreatedFile::keep`]) once the start got far enough to
/// need it: a failed start leaves nothing behind.
struct CreatedFile(Option<PathBuf>);

impl CreatedFile {
    /// The file stays.
    fn keep(&mut self) {
        self.0 = None;
    }
}

impl Drop for CreatedFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// What a clone reserves in a regular-file destination at start (`--no-preallocate` aside),
/// as `(offset, length)` ranges: everything, unless hydration is sparse-aware. Then a local
/// source's data only, as its extents tell ([`BlockDev::extent`]: `SEEK_DATA` on a file), so
/// the destination ends as sparse as the source and the holes it keeps are known to read as
/// zeros (a copy then has nothing to zero there); and nothing for a remote source, whose
/// extents would cost round trips before the clone could start (its data is allocated as
/// it arrives). A local source that cannot tell its extents is reserved whole.
fn reserve_ranges(
    source: Option<(&dyn BlockDev, bool)>,
    sparse: bool,
    size: u64,
) -> Vec<(u64, u64)> {
    let whole = vec![(0, size)];
    let Some((src, remote)) = source.filter(|_| sparse) else {
        return whole;
    };
    if remote {
        return Vec::new();
    }
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut at = 0;
    while at < size {
        let e = match src.extent(at, size - at) {
            Ok(e) if e.len > 0 => e,
            Ok(_) => return whole,
            Err(error) => {
                tracing::warn!("source extents unknown ({error}): reserving the whole clone");
                return whole;
            }
        };
        if !e.zero {
            match ranges.last_mut() {
                Some(last) if last.0 + last.1 == at => last.1 += e.len,
                _ => ranges.push((at, e.len)),
            }
        }
        at += e.len;
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_copy_a_mebibyte_per_io_with_eight_in_flight() {
        assert_eq!(default_batch(4096, 1 << 20), 256);
        assert_eq!(default_threshold(4096, 1 << 20), 2048);
        assert_eq!(default_copy_bytes("/dev/vg/snap"), 1 << 20);
        assert_eq!(default_copy_bytes("nbd://host/x"), 1 << 20);
        assert_eq!(default_copy_bytes("https://host/disk.raw"), 8 << 20);
        assert_eq!(default_copy_bytes("s3://b/k"), 8 << 20);
        assert_eq!(default_batch(65536, 8 << 20), 128);
        assert_eq!(default_batch(64 << 10, 1 << 20), 16);
        assert_eq!(default_batch(1 << 30, 1 << 20), 1);
        assert_eq!(default_threshold(1 << 30, 1 << 20), 8);
    }

    #[test]
    fn metadata_size_covers_twice_the_bitmap() {
        let g = Geometry::new(1 << 31, 8).expect("1 TiB");
        // 2^28 regions: 32 MiB of bitmap.
        assert_eq!(metadata_size_for(&g), 2 * (32 << 20) + (1 << 20));
        let small = Geometry::new(2048, 8).expect("1 MiB");
        assert_eq!(metadata_size_for(&small), 4 << 20);
    }
}
