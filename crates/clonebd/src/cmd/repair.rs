//! `clonebd repair`: writes consistent metadata from what damaged metadata still holds,
//! never changing the damaged metadata (the library's `clonebd_metadata::repair` does the
//! work; this module owns the command line, the output file and the report).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use clonebd::units::parse_size;
use clonebd_core::errno::describe;
use clonebd_io::{FileDevice, OpenOptions};
use clonebd_metadata::repair::{self, RepairError, RepairOptions, UnknownAs};

/// Exit status when NEW could not be written (nothing is left at NEW).
const EXIT_NOT_WRITTEN: u8 = 1;
/// Exit status when nothing was done.
const EXIT_REFUSED: u8 = 2;

/// Write consistent dm-clone metadata from damaged metadata, without changing it.
///
/// Reads the dm-clone metadata on META (a device or an image file, written by the Linux
/// kernel's dm-clone or by clonebd) as far as it can still be read, and writes a new,
/// consistent metadata file NEW recording the same hydrated regions. META is opened
/// read-only and never changed; NEW must not exist yet. NEW is freshly formatted (as
/// `clonebd run --create` formats metadata), is as large as META (or as the geometry
/// needs, if more), passes `clonebd check`, and can be given to `clonebd run` (or the
/// kernel's dm-clone) in place of META.
///
/// Every block is verified (location and checksum); a damaged block loses only the regions
/// it covers: a damaged array block its 32576 regions, a damaged btree node the array
/// blocks below it, unless they can be found again by scanning META for the blocks its
/// space map counts as in use (see docs/FORMAT.md, "Repair"). A damaged space map loses no
/// regions: NEW gets a new one.
///
/// The regions whose state could not be read are UNKNOWN: each range is reported (regions
/// and bytes of the clone) and they become what --unknown says. There is no default,
/// because both choices can lose data: `hydrated` makes the clone serve those regions from
/// the destination, which is garbage wherever they were never copied; `unhydrated` makes
/// it serve them from the source and copy them again, which discards whatever clients
/// wrote there. Choose knowing which regions those are (the report lists them).
///
/// The geometry (region size and length) comes from META's superblock. If the superblock
/// is damaged, give it with --region-size and --size (or --nr-regions): repair refuses
/// without them and names what is missing. With a valid superblock, any geometry given
/// must agree with it.
#[derive(Debug, Args)]
#[command(
    override_usage = "clonebd repair META --output NEW --unknown <hydrated|unhydrated> [OPTIONS]",
    after_long_help = "\
Exit status:
  0  NEW was written and passes `clonebd check` (unknown regions, if any, are listed)
  1  NEW could not be written; nothing is left at NEW
  2  nothing was done: the command line is wrong (--unknown missing, say), META cannot be
     read or is in use by a running clone, NEW exists or is META, or the superblock is
     damaged and the geometry was not given

Examples:
  clonebd repair meta.img --output meta-repaired.img --unknown unhydrated
  clonebd repair /dev/vg/clone-meta -o new-meta.img --unknown hydrated --json
  clonebd repair meta.img -o new.img --unknown unhydrated --region-size 4k --size 128m"
)]
pub struct RepairArgs {
    /// The damaged metadata device or image file (opened read-only; never changed).
    #[arg(value_name = "META")]
    pub meta: PathBuf,

    /// The file to write the repaired metadata to. Must not exist: repair never replaces
    /// a file.
    #[arg(short, long, value_name = "NEW")]
    pub output: PathBuf,

    /// What regions whose state could not be read become. Required, with no default:
    /// `hydrated` serves destination garbage where nothing was copied, `unhydrated`
    /// discards what clients wrote there.
    #[arg(long, value_enum, value_name = "STATE")]
    pub unknown: Option<Unknown>,

    /// Region size (suffixes k, m, g), if the superblock is damaged.
    #[arg(long, value_name = "SIZE")]
    pub region_size: Option<String>,

    /// The clone's length in bytes (suffixes k, m, g, t), a multiple of 512, if the
    /// superblock is damaged.
    #[arg(long, value_name = "BYTES", conflicts_with = "nr_regions")]
    pub size: Option<String>,

    /// The number of regions, instead of --size (the clone is then taken to end on a
    /// region boundary).
    #[arg(long, value_name = "N")]
    pub nr_regions: Option<u64>,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `--unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Unknown {
    /// Serve them from the destination; never copy them.
    Hydrated,
    /// Serve them from the source; copy them again.
    Unhydrated,
}

fn refuse(msg: impl std::fmt::Display) -> anyhow::Result<ExitCode> {
    eprintln!("clonebd repair: {msg}");
    Ok(ExitCode::from(EXIT_REFUSED))
}

/// The geometry options in sectors: (region size, length).
fn geometry_options(a: &RepairArgs) -> Result<(Option<u64>, Option<u64>), String> {
    let sectors = |flag: &str, v: &str| -> Result<u64, String> {
        let bytes = parse_size(v).map_err(|e| format!("{flag}: {e}"))?;
        if bytes == 0 || bytes % 512 != 0 {
            return Err(format!(
                "{flag} {v}: must be a non-zero multiple of 512 bytes"
            ));
        }
        Ok(bytes / 512)
    };
    let region = a
        .region_size
        .as_deref()
        .map(|v| sectors("--region-size", v))
        .transpose()?;
    let length = match (&a.size, a.nr_regions, region) {
        (Some(s), _, _) => Some(sectors("--size", s)?),
        (None, Some(n), Some(r)) => Some(
            n.checked_mul(r)
                .ok_or_else(|| format!("--nr-regions {n}: too many"))?,
        ),
        (None, Some(_), None) => return Err("--nr-regions needs --region-size".to_string()),
        (None, None, _) => None,
    };
    Ok((region, length))
}

/// Whether `a` and `b` name the same file (both exist and share device and inode).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Runs `clonebd repair`.
pub fn run(args: RepairArgs) -> anyhow::Result<ExitCode> {
    let meta_path = args.meta.display().to_string();
    let out_path = args.output.display().to_string();
    let Some(unknown) = args.unknown else {
        return refuse(
            "--unknown hydrated|unhydrated is required: it decides what the regions whose \
             state cannot be read become, and there is no safe default (hydrated serves \
             destination garbage where nothing was copied; unhydrated discards what clients \
             wrote there). See clonebd repair --help",
        );
    };
    let (region_sectors, target_sectors) = match geometry_options(&args) {
        Ok(g) => g,
        Err(e) => return refuse(e),
    };
    if args.output == args.meta || same_file(&args.meta, &args.output) {
        return refuse(format!(
            "output {out_path}: is META itself; repair never changes META, give a new file"
        ));
    }
    if std::fs::symlink_metadata(&args.output).is_ok() {
        return refuse(format!(
            "output {out_path}: already exists; repair writes only a new file and never \
             replaces one (remove it, or give another path)"
        ));
    }
    // Locked, so that the metadata of a running clone is not repaired under it.
    let meta = match FileDevice::open(&args.meta, OpenOptions::read_only().exclusive(true)) {
        Ok(d) => d,
        Err(e) => return refuse(format!("metadata {e}")),
    };
    let opts = RepairOptions {
        unknown_as: match unknown {
            Unknown::Hydrated => UnknownAs::Hydrated,
            Unknown::Unhydrated => UnknownAs::Unhydrated,
        },
        region_sectors,
        target_sectors,
    };
    let recovered = match repair::recover(&meta, &opts) {
        Ok(r) => r,
        Err(RepairError::MissingGeometry {
            cause,
            region_size,
            length,
        }) => {
            let missing = match (region_size, length) {
                (true, true) => "--region-size and --size (or --nr-regions)",
                (true, false) => "--region-size",
                _ => "--size (or --nr-regions)",
            };
            return refuse(format!(
                "metadata {meta_path}: the superblock is unusable ({cause}), so the geometry \
                 cannot be read from it: give {missing}"
            ));
        }
        Err(e) => return refuse(format!("metadata {meta_path}: {e}")),
    };
    // As large as META (whole blocks), or as the geometry needs if that is more.
    let size = (clonebd_core::BlockDev::size_bytes(&meta) / 4096 * 4096).max(
        clonebd_metadata::required_metadata_bytes(&recovered.geometry()),
    );
    let created = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&args.output)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return refuse(format!(
                "output {out_path}: already exists; repair writes only a new file and never \
                 replaces one (remove it, or give another path)"
            ));
        }
        Err(e) => {
            return refuse(format!(
                "output {out_path}: cannot create it: {}",
                describe(&e)
            ));
        }
    };
    let written = created
        .set_len(size)
        .map_err(|e| format!("output {out_path}: cannot size it: {}", describe(&e)))
        .and_then(|()| {
            FileDevice::open(&args.output, OpenOptions::read_write())
                .map_err(|e| format!("output {e}"))
        })
        .and_then(|dev| {
            repair::write(recovered, dev).map_err(|e| format!("output {out_path}: {e}"))
        })
        .and_then(|(report, _dev)| {
            sync_parent(&args.output)
                .map_err(|e| {
                    format!(
                        "output {out_path}: cannot sync its directory: {}",
                        describe(&e)
                    )
                })
                .map(|()| report)
        });
    let report = match written {
        Ok(r) => r,
        Err(msg) => {
            // Leave nothing half-written behind (we created it, so it is ours to remove).
            let _ = std::fs::remove_file(&args.output);
            eprintln!("clonebd repair: {msg}");
            return Ok(ExitCode::from(EXIT_NOT_WRITTEN));
        }
    };
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("metadata".into(), meta_path.into());
            o.insert("output".into(), out_path.into());
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("repaired {meta_path} into {out_path}");
        print!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Makes the new file's directory entry durable.
fn sync_parent(p: &Path) -> std::io::Result<()> {
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)?.sync_all()
}
