//! Subcommands. Each module owns its arguments (a clap `Args` struct) and a `run` function
//! returning the process exit code.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// clonebd: dm-clone in userspace.
///
/// clonebd makes a one-to-one copy of a read-only SOURCE on a writable DESTINATION and lets
/// you use the copy at once: reads of regions not yet copied go to the source, writes go to
/// the destination once their region is copied ("hydrated"), a background process hydrates
/// the rest, and a bitmap on a METADATA device (in the Linux kernel's own dm-clone format)
/// records what is hydrated, so nothing is lost across crashes.
#[derive(Debug, Parser)]
#[command(name = "clonebd", version, about, long_about, max_term_width = 100)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {}

/// Runs the chosen subcommand.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {}
}
