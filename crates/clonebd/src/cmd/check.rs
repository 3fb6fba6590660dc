//! `clonebd check`: verifies dm-clone metadata block by block, never writing to it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use clonebd_io::{FileDevice, OpenOptions};

/// Exit status when the metadata has problems.
const EXIT_PROBLEMS: u8 = 1;
/// Exit status when the metadata cannot be read at all.
const EXIT_UNREADABLE: u8 = 2;

/// Verify dm-clone metadata, without changing it.
///
/// Reads every block of the dm-clone metadata on META (a device or an image file, written
/// by the Linux kernel's dm-clone or by clonebd) and checks it: the superblock (location,
/// magic, checksum, version, geometry), the metadata space map (index and bitmap blocks,
/// free counts, the reference-count tree), the bitset (every btree node and array block,
/// its length against the geometry, no bit set past the last region), and that the space
/// map counts exactly the blocks reachable from the superblock (no leaked, missing or
/// shared blocks). Every problem found is printed, one per line, not just the first.
///
/// META is opened read-only and without a lock, so the metadata of a running clone can be
/// checked (it may then show a transaction in the making as problems; check again after
/// the clone stops for a definitive answer).
#[derive(Debug, Args)]
#[command(after_long_help = "\
Exit status:
  0  the metadata is valid
  1  problems were found (each printed on standard output)
  2  META could not be opened or read (or the command line is wrong)

Examples:
  clonebd check /dev/vg/clone-meta
  clonebd check meta.img && echo valid")]
pub struct CheckArgs {
    /// The metadata device or image file.
    #[arg(value_name = "META")]
    pub meta: PathBuf,

    /// Print nothing when the metadata is valid.
    #[arg(short, long)]
    pub quiet: bool,
}

/// Runs `clonebd check`.
pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let path = args.meta.display().to_string();
    let dev = match FileDevice::open(&args.meta, OpenOptions::read_only()) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("clonebd check: metadata {e}");
            return Ok(ExitCode::from(EXIT_UNREADABLE));
        }
    };
    let report = match clonebd_metadata::check(&dev) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("clonebd check: metadata {path}: {e}");
            return Ok(ExitCode::from(EXIT_UNREADABLE));
        }
    };
    if report.is_clean() {
        if !args.quiet {
            println!(
                "{path}: clean: {} of {} regions hydrated ({} sectors each), {}/{} metadata \
                 blocks used",
                report.nr_hydrated,
                report.nr_regions.unwrap_or(0),
                report.region_sectors.unwrap_or(0),
                report.metadata_blocks_used,
                report.metadata_blocks_total,
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    for p in &report.problems {
        println!("{path}: {p}");
    }
    eprintln!(
        "clonebd check: {path}: {} problem{} found",
        report.problems.len(),
        if report.problems.len() == 1 { "" } else { "s" }
    );
    Ok(ExitCode::from(EXIT_PROBLEMS))
}
