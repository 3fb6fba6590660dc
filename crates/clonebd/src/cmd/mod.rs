//! Subcommands. Each module owns its arguments (a clap `Args` struct) and a `run` function
//! returning the process exit code.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod check;
mod client;
pub mod config;
mod demo;
mod dump;
mod repair;
mod run;

/// clonebd: dm-clone in userspace.
///
/// clonebd makes a one-to-one copy of a read-only SOURCE on a writable DESTINATION and lets
/// you use the copy at once: reads of regions not yet copied go to the source, writes go to
/// the destination once their region is copied ("hydrated"), a background process hydrates
/// the rest, and a bitmap on a METADATA device (in the Linux kernel's own dm-clone format)
/// records what is hydrated, so nothing is lost across crashes.
///
/// The clone is served over NBD (unix socket or TCP). A running daemon is driven through its
/// control socket: `status` and `table` print what `dmsetup status` and `dmsetup table` print
/// for a kernel dm-clone device, `message` takes dm-clone's messages, `wait` waits for
/// hydration to finish, `finalize` waits for it and then detaches the source while the
/// clone goes on serving from the destination alone. `check` and `dump` read metadata, the
/// kernel's or ours; `repair` writes consistent metadata from damaged metadata.
#[derive(Debug, Parser)]
#[command(name = "clonebd", version, about, long_about, max_term_width = 100)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a clone and serve it (the daemon).
    Run(Box<run::RunArgs>),
    /// Print the dm-clone status line of a running clone.
    Status(client::StatusArgs),
    /// Print the dm-clone table line of a running clone.
    Table(client::TableArgs),
    /// Send a dm-clone message to a running clone.
    Message(client::MessageArgs),
    /// Wait until every region of a running clone is hydrated.
    Wait(client::WaitArgs),
    // Its help text (the whole man page) comes from its argument struct.
    Finalize(client::FinalizeArgs),
    // `check`, `dump` and `repair` take their help texts from their argument structs.
    Check(check::CheckArgs),
    Dump(dump::DumpArgs),
    Repair(repair::RepairArgs),
    /// Show a clone's whole life with real I/O, verified (start here).
    Demo(demo::DemoArgs),
}

/// Runs the chosen subcommand.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(a) => run::run(*a),
        Command::Status(a) => client::status(a),
        Command::Table(a) => client::table(a),
        Command::Message(a) => client::message(a),
        Command::Wait(a) => client::wait(a),
        Command::Finalize(a) => client::finalize(a),
        Command::Check(a) => check::run(a),
        Command::Dump(a) => dump::run(a),
        Command::Repair(a) => repair::run(a),
        Command::Demo(a) => demo::run(a),
    }
}

/// Starts logging to standard error: human-readable by default, JSON lines with `json`.
/// The level comes from `RUST_LOG`, else `default_level`. Colours only on a terminal: a log
/// file or the journal gets plain text.
pub fn init_logging(json: bool, default_level: &str) {
    use std::io::IsTerminal;

    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if json {
        b.json().try_init()
    } else {
        b.try_init()
    };
}
