//! `clonebd run`: the daemon.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use clonebd::daemon::{
    CloneSpec, Daemon, NbdLimits, RunOptions, default_batch, default_copy_bytes, default_threshold,
};
use clonebd::notify::Notifier;
use clonebd::order::OrderFiles;
use clonebd::source::SourceOptions;
use clonebd::units::parse_size;
use clonebd_core::engine::HydrationPriority;
use clonebd_nbd::ServerTls;

/// Start a clone and serve it.
///
/// Clones SOURCE (opened read-only, never written) onto DEST through the hydration bitmap in
/// METADATA, serves the clone over NBD, and hydrates it in the background. The clone is
/// usable at once: reads of regions not yet hydrated go to the source; writes to them first
/// copy the region (unless they cover it wholly).
///
/// Describe the clone with flags, or with the kernel's table language (`--table`), in which
/// case every default and check is exactly dm-clone's. Either way, errors are the kernel's
/// ("Region size is not a power of 2", "Device size larger than destination device", ...).
///
/// A new clone needs --create, which creates and formats METADATA (sized for the clone,
/// twice the bitmap plus 1 MiB) and refuses a path that exists; a zeroed METADATA file or
/// device is formatted as the kernel does; metadata written by the Linux kernel's dm-clone
/// opens as it is. A METADATA path that does not exist is an error without --create. The
/// region size and clone size are recorded in the metadata and must match on every later
/// start. METADATA and DEST are locked while the daemon runs, so a second daemon cannot use
/// them.
///
/// SOURCE, DEST and METADATA must be three different files or devices: the same path, a
/// link, a loop device over one of the others, a partition of another's disk or a file on
/// another's file system is refused before anything is opened for writing. The clone's size
/// (the source's, or --size) must be a whole number of 512-byte sectors.
///
/// On SIGTERM or SIGINT the daemon stops accepting connections, finishes requests in
/// flight, stops hydration, waits for copies in flight, commits the metadata and exits 0.
/// Writes acknowledged before a flush (or with FUA) survive a crash at any moment.
///
/// Once every region is hydrated, `clonebd finalize` detaches the source while the exports
/// go on serving, as swapping the table for dm-linear does. A fully hydrated clone also
/// starts without its source: leave out --source (with --table, give `-` as the source
/// device). The region size and the clone's size then come from METADATA, the start is
/// refused unless METADATA says every region is hydrated (naming how many are not), and
/// the clone is served finalized: every request goes straight to DEST.
///
/// Examples:
///
///   clonebd run --source /dev/vg/snap --dest /dev/nvme0n1p3 --metadata /var/lib/clone.meta \
///       --create --nbd-unix /run/clone.sock --control /run/clone.ctl
///
///   clonebd run --table "/var/lib/clone.meta /dev/nvme0n1p3 /dev/vg/snap 8 1 no_hydration" \
///       --nbd-tcp 10809 --control /run/clone.ctl
///
///   clonebd run --dest /dev/nvme0n1p3 --metadata /var/lib/clone.meta \
///       --nbd-unix /run/clone.sock --control /run/clone.ctl     # hydrated, no source
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct RunArgs {
    /// What to clone, opened read-only: a file or block device, or a remote source:
    /// an http:// or https:// URL of a raw image (read with ranged GETs; the server must
    /// serve byte ranges), or an S3 object, s3://BUCKET/KEY[?versionId=V], configured as the
    /// AWS tools are (AWS_ENDPOINT_URL, with path-style addressing, for MinIO and Ceph RGW;
    /// AWS_REGION or AWS_DEFAULT_REGION; AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
    /// AWS_SESSION_TOKEN, or AWS_PROFILE in the shared credentials file), or an NBD export
    /// as qemu spells it, nbd://HOST[:PORT][/EXPORT] (port 10809 by default) or
    /// nbd+unix:///[EXPORT]?socket=PATH, or over TLS nbds:// and nbds+unix:// (the
    /// server's certificate verified for the host, localhost on a unix socket); a
    /// connection that breaks is made again and its reads resent. A remote source's
    /// identity (size, and ETag, Last-Modified or S3 version, or NBD export name) is pinned
    /// before the first copy (see --source-pin): every read carries it, and a source that
    /// changed stops hydration with an error instead of being mixed in.
    ///
    /// Without --source, the clone must be fully hydrated (see above): it is served
    /// finalized, from DEST alone.
    #[arg(long, value_name = "SRC", conflicts_with = "table")]
    source: Option<PathBuf>,
    /// Where the copy is made: at least the clone's size.
    #[arg(
        long,
        value_name = "DEST",
        required_unless_present = "table",
        conflicts_with = "table"
    )]
    dest: Option<PathBuf>,
    /// The metadata device or file (kernel dm-clone v1 format). It must exist: metadata
    /// from an earlier start goes on with that clone, a zeroed file or device is formatted
    /// (as the kernel does). To start a new clone in a file that does not exist yet, add
    /// --create.
    #[arg(
        long,
        value_name = "META",
        required_unless_present = "table",
        conflicts_with = "table"
    )]
    metadata: Option<PathBuf>,
    /// Region size: the unit of copying and tracking, 4k to 1g, a power of 2 (default 4k;
    /// without --source, the metadata's). The kernel recommends the filesystem's block
    /// size; larger regions copy faster and need less metadata, smaller ones copy less on
    /// scattered writes.
    #[arg(long, value_name = "SIZE", conflicts_with = "table")]
    region_size: Option<String>,
    /// Create the metadata file and format it for a new clone (sized for it: twice the
    /// bitmap plus 1 MiB). Refused if the path exists, so an existing clone's metadata is
    /// never replaced; without it, a metadata path that does not exist is an error, so a
    /// mistyped path cannot start a clone afresh over a destination that holds one.
    #[arg(long)]
    create: bool,
    /// The clone's size in bytes (suffixes k, m, g, t), a multiple of 512. Default: the
    /// source's size, which must then be a multiple of 512: a partial last sector is never
    /// dropped silently (give --size to clone a shorter prefix on purpose).
    #[arg(long, value_name = "BYTES")]
    size: Option<String>,
    /// Start with background hydration off (`no_hydration`); enable it later with
    /// `clonebd message --control PATH enable_hydration`.
    #[arg(long, conflicts_with = "table")]
    no_hydration: bool,
    /// Do not pass discards down to DEST (`no_discard_passdown`). Off automatically when DEST
    /// cannot discard.
    #[arg(long, conflicts_with = "table")]
    no_discard_passdown: bool,
    /// Regions of background copies in flight at most. Default: eight batches, so eight
    /// copies overlap and keep a disk (or a remote source) busy. dm-clone's own default, kept
    /// by --table, is 1.
    #[arg(long, value_name = "N", conflicts_with = "table")]
    hydration_threshold: Option<u32>,
    /// Adjacent regions copied as one I/O. Default: as many as make 1 MiB (256 regions of
    /// 4 KiB), the size at which disks reach their sequential bandwidth. dm-clone's own
    /// default, kept by --table, is 1.
    #[arg(long, value_name = "N", conflicts_with = "table")]
    hydration_batch_size: Option<u32>,
    /// Limit background hydration to this many bytes per second (suffixes k, m, g), to leave
    /// bandwidth to the source's other users. Foreground copies (writes, NBD CACHE) are not
    /// limited. Default: no limit.
    #[arg(long, value_name = "BYTES")]
    hydration_rate_limit: Option<String>,
    /// Hydrate these byte ranges before the rest of the background pass, in the file's
    /// order. FILE holds one range per line, OFFSET LENGTH, each a number of bytes with an
    /// optional k, m, g or t suffix (for example `1g 64m`); a `#` starts a comment, blank
    /// lines are ignored. Each range stands for the regions it touches; regions already
    /// hydrated are skipped. The ranges are background hydration, only first: they wait
    /// while hydration is disabled, and obey --hydration-threshold, --hydration-batch-size
    /// and --hydration-rate-limit. A file written by --record-reads during an earlier clone
    /// of the same image (a VM's first boot) makes the next clone prefetch what that boot
    /// read, in the order it read it. The whole file is checked at start, before anything
    /// is opened for writing: a malformed line or a range past the clone's end is refused,
    /// naming the file and the line. While running, `clonebd message --control PATH
    /// hydrate_range OFFSET LENGTH` puts one more range at the front.
    #[arg(long, value_name = "FILE")]
    hydrate_first: Option<PathBuf>,
    /// Append to FILE, in --hydrate-first's format, the ranges of regions not yet hydrated
    /// in the order clients first read them (each region once; adjacent ones joined into
    /// one range), so that the next clone of the same image can hydrate them first with
    /// --hydrate-first FILE. FILE is created if missing; what it holds already is checked
    /// as --hydrate-first checks its file. Ranges are written within a second of the read
    /// that ends them, and the file is synced when the daemon stops. The reads themselves
    /// never wait for the file.
    #[arg(long, value_name = "FILE")]
    record_reads: Option<PathBuf>,
    /// Copy-on-read: a read of regions not hydrated also hydrates them, from the data it
    /// read. The client gets its data as soon as the source returns it (the read does not
    /// wait for the destination); the data of each region the read covers wholly (the short
    /// last region too, when the read reaches the end) is then written to DEST on a copy
    /// thread, and the region is recorded hydrated only once that write completed, and
    /// committed only after a flush made it durable, as for any copy. A region the read
    /// covers only partly stays as it was (hydrating it would read the source again), so
    /// with reads aligned to the region size exactly the regions read are hydrated. A write
    /// that reaches a region first wins: the read's data is then dropped. Independent of
    /// --no-hydration: background hydration may stay off while reads hydrate what they use.
    #[arg(long)]
    hydrate_on_read: bool,
    /// With --hydrate-on-read, the most memory (suffixes k, m, g) held by read data waiting
    /// to be written to DEST; a read whose data would go over it leaves its regions as they
    /// were (counted as `fills_dropped` in status --json) rather than wait.
    #[arg(
        long,
        value_name = "BYTES",
        default_value = "64m",
        requires = "hydrate_on_read"
    )]
    hydrate_on_read_budget: String,
    /// How background hydration and client I/O trade while clients are active. Background
    /// copies are bounded by a window that shrinks when the clients' latency rises above its
    /// idle level and grows back when it falls, and are split into small pieces, paced with
    /// gaps when the window is below one piece; a piece always comes within 50 ms, so
    /// hydration never stops. The idle level is measured by holding copies back for 60 ms at
    /// the first client activity and every 10 s of it. `background`: yield at 10 % above the
    /// idle latency, 64 KiB pieces; `balanced`: at 30 %, 256 KiB pieces; `hydration`: only
    /// when the latency doubles, copies kept whole. With no client I/O hydration runs at
    /// full speed whatever the setting; --hydration-rate-limit applies on top.
    #[arg(long, value_name = "PRIORITY", value_enum, default_value_t = Priority::Balanced)]
    hydration_priority: Priority,
    /// The clone in dm-clone's table language:
    /// "META DEST SOURCE REGION_SECTORS [#features FEATURES...] [#core KEY VALUE...]",
    /// optionally preceded by "<start> <len> clone" as `dmsetup table` prints it.
    #[arg(long, value_name = "TABLE")]
    table: Option<String>,
    /// Serve NBD on this unix socket.
    #[arg(long, value_name = "PATH")]
    nbd_unix: Option<PathBuf>,
    /// Serve NBD over TCP on [ADDR:]PORT. Without ADDR, only on 127.0.0.1: listening on
    /// another address must be asked for explicitly (NBD has no authentication here).
    #[arg(long, value_name = "[ADDR:]PORT")]
    nbd_tcp: Option<String>,
    /// Serve the clone as the regular file FILE (created if missing) over FUSE, for
    /// `losetup` where no NBD client is at hand. A stale mount left there by a daemon that
    /// was killed is cleaned up, or refused with the command that cleans it.
    #[arg(long, value_name = "FILE")]
    fuse: Option<PathBuf>,
    /// Serve the clone as a ublk block device, /dev/ublkbN (Linux's ublk_drv; clonebd built
    /// with the `ublk` feature).
    #[arg(long)]
    ublk: bool,
    /// Create the control socket here (mode 0600), for status, table, message, wait and
    /// finalize.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Serve Prometheus metrics at http://[ADDR:]PORT/metrics (127.0.0.1 unless ADDR is
    /// given): regions total and hydrated, bytes hydrated, copy errors, client requests by
    /// operation with latency histograms, commits and their latency, the metadata mode, NBD
    /// connections, a remote source's requests, retries, errors and latency. The names are
    /// listed in docs/METRICS.md.
    #[arg(long, value_name = "[ADDR:]PORT")]
    metrics: Option<String>,
    /// Copy every byte of the source. By default hydration is sparse-aware: a piece of a
    /// copy that the source holds as a hole (a regular file's, found with SEEK_DATA) is not
    /// read, and one that reads back all zeros is not written; either is zeroed on the
    /// destination instead (which then reads zeros whatever it held before, and a file
    /// destination keeps its holes where the file system zeroes by unmapping). The map and
    /// the commit rules are those of any copy. status --json counts the bytes copied and
    /// the bytes zeroed.
    #[arg(long)]
    no_sparse_hydration: bool,
    /// Use the page cache instead of O_DIRECT for SOURCE and DEST.
    #[arg(long)]
    no_direct_io: bool,
    /// Do not reserve the clone's space in a regular-file destination at start. By default
    /// the space is reserved (fallocate, size and content unchanged), so a full filesystem
    /// is found at start rather than in the middle of a hydration, and writes no longer
    /// allocate one by one. With sparse-aware hydration only a local source's data is
    /// reserved (its holes stay holes in the destination), and nothing for a remote source.
    #[arg(long)]
    no_preallocate: bool,
    /// Threads running background copies.
    #[arg(long, value_name = "N", default_value_t = 8)]
    copy_threads: usize,
    /// Threads serving NBD requests (default: four per CPU, 16 to 128).
    #[arg(long, value_name = "N")]
    nbd_workers: Option<usize>,
    /// Serve NBD with a reader and a writer thread per connection and every request on the
    /// worker threads. By default (where the kernel allows io_uring) each connection has one
    /// thread that does its socket I/O and its plain writes to hydrated regions through
    /// io_uring, many per system call, and hands the other requests to the workers.
    #[arg(long)]
    no_nbd_io_uring: bool,
    /// The time an NBD client has for its whole handshake, from connecting to the start of
    /// transmission (seconds, at least 1). A connection that has not finished by then is
    /// closed, however often it sends a byte; real clients take milliseconds.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    nbd_handshake_timeout: u64,
    /// The time an NBD client has to send the whole data of a write once its request header
    /// has arrived and its memory is reserved, and to take each batch of replies (read data)
    /// once the daemon has started sending it (seconds, at least 1). A deadline for the
    /// whole transfer, not for a pause: a client that sends or reads a byte now and then
    /// does not stretch it. Past it the connection is closed and the memory it held goes
    /// back to the budget (--nbd-memory-budget), so clients that stall mid-request, or stop
    /// reading, hold it for this long at most and cannot lock others out. Time a request
    /// waits for memory or spends in the clone does not count. Set it so that the largest
    /// transfer (a connection's 64 MiB in flight) goes through the slowest link to be served
    /// in this time.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    nbd_payload_timeout: u64,
    /// NBD connections in their handshake at once, per socket (unix or TCP). Past it, new
    /// connections are closed as soon as they are accepted. Connections in their handshake
    /// never take the places of established ones (--nbd-max-connections).
    #[arg(long, value_name = "N", default_value_t = 128)]
    nbd_max_handshakes: usize,
    /// NBD connections in their handshake at once from one IP address (TCP; for IPv6, one
    /// /64 network). Past it, new connections from that address are closed as soon as they
    /// are accepted, so that one host cannot take every handshake place.
    #[arg(long, value_name = "N", default_value_t = 16)]
    nbd_max_handshakes_per_peer: usize,
    /// NBD clients served at once (past their handshake), per socket. While all places are
    /// taken, new connections are closed.
    #[arg(long, value_name = "N", default_value_t = 64)]
    nbd_max_connections: usize,
    /// Memory all NBD connections together may hold for request data (write data received,
    /// read data not yet sent), on both sockets; suffixes k, m, g; at least 32m, the largest
    /// request. Each connection also holds at most 64 MiB. A connection that finds the budget
    /// spent stops reading its socket until replies have gone out: clients wait, and see no
    /// error.
    #[arg(long, value_name = "BYTES", default_value = "256m")]
    nbd_memory_budget: String,
    /// Of --nbd-memory-budget, what the connections from one IP address (for IPv6, one /64
    /// network) may hold (at least 32m), so that one host cannot hold the whole budget. Connections over the unix
    /// socket are limited by the budget alone.
    #[arg(long, value_name = "BYTES", default_value = "128m")]
    nbd_memory_budget_per_peer: String,
    /// The longest a read from a remote source may take, retries included (seconds).
    /// Transient failures (connection reset or refused, timeouts, HTTP 5xx, 429 and 503
    /// with Retry-After) are retried with exponential back-off and jitter until then; then
    /// the read fails with EIO (a client's cold read, or a write that needs a copy), or,
    /// for background hydration, is tried again later: hydration pauses while the source
    /// is away and resumes by itself. Hydrated regions never wait for the source.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    source_timeout: u64,
    /// Connections to a remote source: keep-alive connections to an HTTP or S3 source
    /// (default 64); connections to an NBD server, each carrying many reads at once
    /// (default 4; one when the server does not advertise CAN_MULTI_CONN and the export is
    /// writable, and only as many as the server takes: qemu-nbd takes one client unless
    /// started with --shared).
    #[arg(long, value_name = "N")]
    source_connections: Option<usize>,
    /// Trust the PEM certificates in FILE for an https:// source (or S3 endpoint) instead of
    /// the system's roots, and for an nbds:// source instead of Mozilla's.
    #[arg(long, value_name = "FILE")]
    source_tls_ca: Option<PathBuf>,
    /// Show the certificate chain in FILE (PEM, the client's own certificate first) to an
    /// nbds:// or https:// source that asks for one (qemu-nbd's tls-creds-x509 verifies
    /// clients by default). Needs --source-tls-key.
    #[arg(long, value_name = "FILE", requires = "source_tls_key")]
    source_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --source-tls-cert.
    #[arg(long, value_name = "FILE", requires = "source_tls_cert")]
    source_tls_key: Option<PathBuf>,
    /// Where a remote source's pinned identity is kept. Default: METADATA.source-pin beside
    /// a metadata file; needed when METADATA is a block device. While no region is
    /// hydrated the pin is written anew from the source as it is; once one is, a start
    /// whose source does not match the pin is refused.
    #[arg(long, value_name = "FILE")]
    source_pin: Option<PathBuf>,
    /// Require TLS on the NBD exports (unix socket and TCP), with the PEM certificate chain
    /// in FILE (the server's certificate first) and its key in --nbd-tls-key. Clients must
    /// ask for TLS (NBD_OPT_STARTTLS) before anything else: until they do, every option is
    /// answered NBD_REP_ERR_TLS_REQD and NBD_OPT_EXPORT_NAME closes the connection, so a
    /// client without TLS is refused. With libnbd (nbdinfo, nbdcopy):
    /// 'nbds://HOST:PORT/clonebd?tls-certificates=DIR'; with qemu: --object
    /// tls-creds-x509,id=tls0,dir=DIR,endpoint=client and
    /// driver=nbd,host=HOST,port=PORT,export=clonebd,tls-creds=tls0, DIR holding
    /// ca-cert.pem (and client-cert.pem, client-key.pem for --nbd-tls-client-ca). The TLS
    /// handshake counts in --nbd-handshake-timeout, and the payload deadline
    /// (--nbd-payload-timeout) bounds what goes to the client through TLS too. TLS
    /// connections are served with threads, as with --no-nbd-io-uring: io_uring cannot run
    /// TLS on their sockets. The files are read once, at start.
    #[arg(long, value_name = "FILE", requires = "nbd_tls_key")]
    nbd_tls_cert: Option<PathBuf>,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of --nbd-tls-cert.
    #[arg(long, value_name = "FILE", requires = "nbd_tls_cert")]
    nbd_tls_key: Option<PathBuf>,
    /// Require NBD clients to present a TLS certificate signed by one of the PEM
    /// certificates in FILE; a client with none, or with another, fails the TLS handshake.
    /// Needs --nbd-tls-cert.
    #[arg(long, value_name = "FILE", requires = "nbd_tls_cert")]
    nbd_tls_client_ca: Option<PathBuf>,
    /// Log format on standard error (the level comes from RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// Read settings from the TOML file FILE: each key is one of these long options, spelled
    /// as the flag or with underscores, with its value (a string or a number; true or false
    /// for a switch), for example `source = "/dev/vg/snap"` and `hydration-threshold = 64`.
    /// A flag given on the command line overrides the file's setting. An unknown key or a
    /// bad value is refused, naming the file and the key. This is how the systemd unit in
    /// contrib/systemd runs a clone: `clonebd run --config /etc/clonebd/NAME.toml`.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per line.
    Json,
}

/// `[ADDR:]PORT` for the flag `flag`: a port alone is on 127.0.0.1.
fn parse_tcp(flag: &str, s: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    s.parse()
        .with_context(|| format!("{flag} {s}: expected PORT or ADDR:PORT"))
}

/// Builds the daemon's options from the command line.
pub fn options(a: &RunArgs) -> anyhow::Result<RunOptions> {
    let size_bytes = a
        .size
        .as_deref()
        .map(parse_size)
        .transpose()
        .context("--size")?;
    let spec = match &a.table {
        Some(t) => CloneSpec::Table(t.clone()),
        None => {
            let (Some(dest), Some(metadata)) = (&a.dest, &a.metadata) else {
                bail!(
                    "--dest and --metadata are required, and --source for a new clone (or --table)"
                );
            };
            let region_bytes = a
                .region_size
                .as_deref()
                .map(|r| {
                    let bytes = parse_size(r).context("--region-size")?;
                    if !(4096..=1 << 30).contains(&bytes) || !bytes.is_power_of_two() {
                        bail!("--region-size {r}: must be a power of 2 from 4k to 1g");
                    }
                    Ok(bytes)
                })
                .transpose()?;
            match &a.source {
                None if a.create => bail!(
                    "--create starts a new clone, which needs --source (without it, only a fully hydrated clone starts)"
                ),
                None => CloneSpec::Hydrated {
                    dest: dest.clone(),
                    metadata: metadata.clone(),
                    region_bytes,
                    no_discard_passdown: a.no_discard_passdown,
                },
                Some(source) => {
                    let region_bytes = region_bytes.unwrap_or(4096);
                    let copy_bytes = default_copy_bytes(&source.to_string_lossy());
                    CloneSpec::Flags {
                        source: source.clone(),
                        dest: dest.clone(),
                        metadata: metadata.clone(),
                        region_bytes,
                        no_hydration: a.no_hydration,
                        no_discard_passdown: a.no_discard_passdown,
                        hydration_threshold: a
                            .hydration_threshold
                            .unwrap_or(default_threshold(region_bytes, copy_bytes)),
                        hydration_batch_size: a
                            .hydration_batch_size
                            .unwrap_or(default_batch(region_bytes, copy_bytes)),
                    }
                }
            }
        }
    };
    if a.nbd_unix.is_none() && a.nbd_tcp.is_none() && a.fuse.is_none() && !a.ublk {
        tracing::warn!(
            "no export: give --nbd-unix, --nbd-tcp, --fuse or --ublk to reach the clone"
        );
    }
    Ok(RunOptions {
        spec,
        size_bytes,
        create_metadata: a.create,
        nbd_unix: a.nbd_unix.clone(),
        nbd_tcp: a
            .nbd_tcp
            .as_deref()
            .map(|s| parse_tcp("--nbd-tcp", s))
            .transpose()?,
        sparse_hydration: !a.no_sparse_hydration,
        metrics: a
            .metrics
            .as_deref()
            .map(|s| parse_tcp("--metrics", s))
            .transpose()?,
        control: a.control.clone(),
        direct_io: !a.no_direct_io,
        preallocate: !a.no_preallocate,
        copy_threads: a.copy_threads,
        hydration_rate_limit: a
            .hydration_rate_limit
            .as_deref()
            .map(parse_size)
            .transpose()
            .context("--hydration-rate-limit")?
            .unwrap_or(0),
        hydrate_on_read: if a.hydrate_on_read {
            parse_size(&a.hydrate_on_read_budget)
                .context("--hydrate-on-read-budget")?
                .max(1)
        } else {
            0
        },
        hydration_priority: a.hydration_priority.into(),
        nbd_workers: a.nbd_workers,
        nbd_io_uring: !a.no_nbd_io_uring,
        nbd_limits: nbd_limits(a)?,
        fuse: a.fuse.clone(),
        ublk: a.ublk,
        source: SourceOptions {
            direct: !a.no_direct_io,
            timeout: Duration::from_secs(a.source_timeout.max(1)),
            connections: a.source_connections.map(|n| n.max(1)),
            tls_ca: a.source_tls_ca.clone(),
            tls_client: match (&a.source_tls_cert, &a.source_tls_key) {
                (Some(cert), Some(key)) => Some(clonebd_remote::tls::ClientIdentity {
                    cert: cert.clone(),
                    key: key.clone(),
                }),
                _ => None,
            },
        },
        source_pin: a.source_pin.clone(),
        nbd_tls: nbd_tls(a)?,
        order: OrderFiles {
            hydrate_first: a.hydrate_first.clone(),
            record_reads: a.record_reads.clone(),
        },
    })
}

/// The NBD exports' TLS, loaded now so that a bad file stops the start before anything is
/// opened or written.
fn nbd_tls(a: &RunArgs) -> anyhow::Result<Option<ServerTls>> {
    let (Some(cert), Some(key)) = (&a.nbd_tls_cert, &a.nbd_tls_key) else {
        return Ok(None);
    };
    let config = clonebd_remote::tls::server_config(cert, key, a.nbd_tls_client_ca.as_deref())?;
    // The relay's sends to the client are bound by the payload deadline, as the server's are.
    let send = Some(Duration::from_secs(a.nbd_payload_timeout.max(1)));
    Ok(Some(ServerTls(Arc::new(move |socket, timeout| {
        clonebd_remote::tls::serve(socket, &config, timeout, send)
    }))))
}

fn nbd_limits(a: &RunArgs) -> anyhow::Result<NbdLimits> {
    let size = |flag: &str, s: &str| -> anyhow::Result<usize> {
        let n = parse_size(s).with_context(|| format!("--{flag}"))?;
        let n = usize::try_from(n).with_context(|| format!("--{flag} {s}: too large"))?;
        if n < 32 << 20 {
            bail!("--{flag} {s}: must be at least 32m, the largest NBD request");
        }
        Ok(n)
    };
    let count = |flag: &str, n: usize| -> anyhow::Result<usize> {
        if n == 0 {
            bail!("--{flag}: must be at least 1");
        }
        Ok(n)
    };
    if a.nbd_handshake_timeout == 0 {
        bail!("--nbd-handshake-timeout: must be at least 1 second");
    }
    if a.nbd_payload_timeout == 0 {
        bail!("--nbd-payload-timeout: must be at least 1 second");
    }
    Ok(NbdLimits {
        max_connections: count("nbd-max-connections", a.nbd_max_connections)?,
        max_handshakes: count("nbd-max-handshakes", a.nbd_max_handshakes)?,
        max_handshakes_per_peer: count(
            "nbd-max-handshakes-per-peer",
            a.nbd_max_handshakes_per_peer,
        )?,
        handshake_timeout: Duration::from_secs(a.nbd_handshake_timeout),
        payload_timeout: Duration::from_secs(a.nbd_payload_timeout),
        memory_budget: size("nbd-memory-budget", &a.nbd_memory_budget)?,
        memory_budget_per_peer: size("nbd-memory-budget-per-peer", &a.nbd_memory_budget_per_peer)?,
    })
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    super::init_logging(a.log_format == LogFormat::Json, "info");
    let opts = options(&a)?;
    let daemon = Daemon::start(&opts)?;
    daemon.run_until_signal(&Notifier::from_env())?;
    Ok(ExitCode::SUCCESS)
}

/// `--hydration-priority`'s values, one for each [`HydrationPriority`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Priority {
    Background,
    Balanced,
    Hydration,
}

impl From<Priority> for HydrationPriority {
    fn from(p: Priority) -> Self {
        match p {
            Priority::Background => HydrationPriority::Background,
            Priority::Balanced => HydrationPriority::Balanced,
            Priority::Hydration => HydrationPriority::Hydration,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::Parser;

    use super::*;
    use crate::cmd::{Cli, Command};

    /// `clonebd run` with its three roles and `extra`, as clap parses it.
    fn try_parse(extra: &[&str]) -> Result<Cli, clap::Error> {
        let mut args = vec![
            "clonebd",
            "run",
            "--source",
            "s",
            "--dest",
            "d",
            "--metadata",
            "m",
        ];
        args.extend_from_slice(extra);
        Cli::try_parse_from(args)
    }

    fn parse(extra: &[&str]) -> Box<RunArgs> {
        match try_parse(extra).unwrap().command {
            Command::Run(a) => a,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn nbd_limit_defaults_are_the_servers() {
        assert_eq!(nbd_limits(&parse(&[])).unwrap(), NbdLimits::default());
    }

    #[test]
    fn nbd_limits_below_their_minimum_are_refused() {
        assert!(nbd_limits(&parse(&["--nbd-memory-budget", "16m"])).is_err());
        assert!(nbd_limits(&parse(&["--nbd-memory-budget-per-peer", "1m"])).is_err());
        assert!(nbd_limits(&parse(&["--nbd-handshake-timeout", "0"])).is_err());
        assert!(nbd_limits(&parse(&["--nbd-payload-timeout", "0"])).is_err());
        assert!(nbd_limits(&parse(&["--nbd-max-handshakes", "0"])).is_err());
        let l = nbd_limits(&parse(&[
            "--nbd-memory-budget",
            "1g",
            "--nbd-handshake-timeout",
            "3",
            "--nbd-payload-timeout",
            "7",
        ]))
        .unwrap();
        assert_eq!(l.memory_budget, 1 << 30);
        assert_eq!(l.handshake_timeout, Duration::from_secs(3));
        assert_eq!(l.payload_timeout, Duration::from_secs(7));
    }

    #[test]
    fn hydration_priority_defaults_to_balanced_and_takes_each_setting() {
        assert_eq!(
            HydrationPriority::from(parse(&[]).hydration_priority),
            HydrationPriority::Balanced
        );
        for p in HydrationPriority::ALL {
            let a = parse(&["--hydration-priority", p.name()]);
            assert_eq!(HydrationPriority::from(a.hydration_priority), p);
        }
    }

    #[test]
    fn hydration_priority_refuses_other_words() {
        for bad in ["fast", "Balanced", ""] {
            let r = try_parse(&["--hydration-priority", bad]);
            let e = r.err().unwrap().to_string();
            assert!(e.contains("--hydration-priority"), "{bad:?}: {e}");
            assert!(
                e.contains("background, balanced, hydration"),
                "{bad:?}: {e}"
            );
        }
    }
}
