//! `clonebd dump`: prints what dm-clone metadata holds, never writing to it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use clonebd_io::{FileDevice, OpenOptions};
use clonebd_metadata::MetadataError;

/// Exit status when the metadata is invalid.
const EXIT_INVALID: u8 = 1;
/// Exit status when the metadata cannot be read at all.
const EXIT_UNREADABLE: u8 = 2;

/// Print what dm-clone metadata holds.
///
/// Reads the dm-clone metadata on META (a device or an image file, written by the Linux
/// kernel's dm-clone or by clonebd) and prints the clone's geometry (length and region
/// size, in sectors of 512 bytes), how many regions are hydrated, the metadata blocks used
/// and in total (the `<md used>/<md total>` of the dm-clone status line), and the hydrated
/// regions as sorted, merged ranges.
///
/// With --json the same is printed as one JSON object with the fields target_sectors,
/// region_sectors, nr_regions, nr_hydrated, metadata_blocks_used, metadata_blocks_total and
/// hydrated_ranges (a list of [first_region, count] pairs).
///
/// META is opened read-only and without a lock. The metadata is validated while it is
/// read; use `clonebd check` for a complete verification.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Exit status:
  0  the metadata was printed
  1  the metadata is invalid (run `clonebd check` for every problem)
  2  META could not be opened or read (or the command line is wrong)

Examples:
  clonebd dump /dev/vg/clone-meta
  clonebd dump --json meta.img | jq .nr_hydrated")]
pub struct DumpArgs {
    /// The metadata device or image file.
    #[arg(value_name = "META")]
    pub meta: PathBuf,

    /// Print JSON instead of a human-readable summary.
    #[arg(long)]
    pub json: bool,
}

/// Runs `clonebd dump`.
pub fn run(args: DumpArgs) -> anyhow::Result<ExitCode> {
    let path = args.meta.display().to_string();
    let dev = match FileDevice::open(&args.meta, OpenOptions::read_only()) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("clonebd dump: metadata {e}");
            return Ok(ExitCode::from(EXIT_UNREADABLE));
        }
    };
    match clonebd_metadata::dump(&dev) {
        Ok(report) => {
            if args.json {
                println!("{}", report.to_json());
            } else {
                print!("{report}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e @ MetadataError::Io { .. }) => {
            eprintln!("clonebd dump: metadata {path}: {e}");
            Ok(ExitCode::from(EXIT_UNREADABLE))
        }
        Err(e) => {
            eprintln!("clonebd dump: metadata {path}: {e}");
            Ok(ExitCode::from(EXIT_INVALID))
        }
    }
}
