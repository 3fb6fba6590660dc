//! `clonebd demo`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use clonebd::demo::{DemoOptions, run as run_demo};
use clonebd::units::parse_size;

/// Show a clone's whole life, with real I/O, in a temporary directory.
///
/// Generates a source image, starts a clone of it served over NBD on a unix socket, and with
/// clonebd's own NBD client: reads regions not yet hydrated (from the source), writes across
/// regions (partial, full-region, FUA, write-zeroes, discard), flushes, shows the dm-clone
/// status line and the hydrated map, enables background hydration and shows its progress,
/// verifies every byte through the export, stops the daemon (which commits), checks the
/// metadata, and verifies that the destination alone equals the source with the writes on
/// top and that the source was never written. Exits 0 only if every check passed.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Size of the generated source image.
    #[arg(long, value_name = "SIZE", default_value = "256m")]
    size: String,
    /// Region size.
    #[arg(long, value_name = "SIZE", default_value = "64k")]
    region_size: String,
    /// Background hydration bandwidth limit, so the progress can be watched ("0": none).
    #[arg(long, value_name = "BYTES", default_value = "128m")]
    rate_limit: String,
    /// Work in DIR and keep the files instead of a temporary directory.
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
}

/// Runs the demo.
pub fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    super::init_logging(false, "warn");
    let opts = DemoOptions {
        size: parse_size(&a.size).context("--size")?,
        region: parse_size(&a.region_size).context("--region-size")?,
        rate_limit: parse_size(&a.rate_limit).context("--rate-limit")?,
        keep: a.keep,
    };
    anyhow::ensure!(
        opts.region.is_power_of_two() && (4096..=1 << 30).contains(&opts.region),
        "--region-size must be a power of 2 from 4k to 1g"
    );
    anyhow::ensure!(
        opts.size >= 128 * opts.region,
        "--size must hold at least 128 regions"
    );
    anyhow::ensure!(
        opts.size.is_multiple_of(4096),
        "--size must be a multiple of 4 KiB"
    );
    run_demo(&opts)?;
    Ok(ExitCode::SUCCESS)
}
