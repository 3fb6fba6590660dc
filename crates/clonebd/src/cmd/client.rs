//! The commands that talk to a running daemon through its control socket: `status`,
//! `table`, `message` and `wait`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use clonebd::control::{ControlReply, ControlRequest, request};
use clonebd::status::StatusJson;
use clonebd::units::human_bytes;

/// Print the dm-clone status line of a running clone.
///
/// Prints exactly what `dmsetup status` prints for a kernel dm-clone device:
///
///   0 <len> clone <md block size> <md used>/<md total> <region size> <hydrated>/<regions>
///   <hydrating> <#features> [no_hydration] [no_discard_passdown] 4 hydration_threshold <T>
///   hydration_batch_size <B> <rw|ro>
///
/// or `0 <len> clone Fail`. Like the kernel, it commits the metadata first unless
/// --noflush is given. With --json it prints a JSON document with the same fields plus the
/// hydration rate, ETA, copy errors, NBD connections and uptime.
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct StatusArgs {
    /// The daemon's control socket (`clonebd run --control PATH`).
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Do not commit the metadata first (`dmsetup status --noflush`).
    #[arg(long)]
    noflush: bool,
}

/// Print the dm-clone table line of a running clone.
///
/// Prints what `dmsetup table` prints: `0 <len> clone <meta> <dest> <source>` (major:minor
/// for block devices, paths for files) followed by the constructor arguments as given.
#[derive(Debug, Args)]
pub struct TableArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
}

/// Send a dm-clone message to a running clone.
///
/// Messages (names are case-insensitive):
///
///   enable_hydration            start background hydration
///   disable_hydration           stop it (copies in flight finish)
///   hydration_threshold N       regions of background copies in flight (0 stops)
///   hydration_batch_size N      adjacent regions copied as one I/O
///
/// Anything else fails with the kernel's error text and exit status 1. Unlike the kernel,
/// extra words after enable_hydration or disable_hydration are refused, not ignored.
/// Messages are not persisted: a restart goes back to the command line's values.
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct MessageArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
    /// The message's words.
    #[arg(value_name = "WORDS", num_args = 0.., allow_hyphen_values = true)]
    words: Vec<String>,
}

/// Wait until every region of a running clone is hydrated.
///
/// Exits 0 once every region is hydrated and that is committed to the metadata, so that a
/// crash after `wait` returns cannot lose it. On a terminal it shows a progress bar with
/// hydrated/total regions, the hydration rate and the estimated time left. Exits 1 if the
/// clone fails (metadata mode `Fail`), the daemon goes away, or --timeout passes.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
    /// Give up after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// Milliseconds between polls.
    #[arg(long, value_name = "MS", default_value_t = 250)]
    interval: u64,
    /// Never show the progress bar.
    #[arg(long)]
    no_progress: bool,
}

fn ask(path: &Path, req: &ControlRequest) -> anyhow::Result<ControlReply> {
    Ok(request(path, req)?)
}

fn print_reply(r: ControlReply) -> ExitCode {
    if r.ok {
        if !r.output.is_empty() {
            println!("{}", r.output);
        }
        ExitCode::SUCCESS
    } else {
        eprintln!("{}", r.error.unwrap_or_else(|| "failed".into()));
        ExitCode::FAILURE
    }
}

/// `clonebd status`.
pub fn status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let req = if a.json {
        ControlRequest::StatusJson { noflush: a.noflush }
    } else {
        ControlRequest::Status { noflush: a.noflush }
    };
    Ok(print_reply(ask(&a.control, &req)?))
}

/// `clonebd table`.
pub fn table(a: TableArgs) -> anyhow::Result<ExitCode> {
    Ok(print_reply(ask(&a.control, &ControlRequest::Table)?))
}

/// `clonebd message`.
pub fn message(a: MessageArgs) -> anyhow::Result<ExitCode> {
    Ok(print_reply(ask(
        &a.control,
        &ControlRequest::Message { words: a.words },
    )?))
}

fn poll(path: &Path, noflush: bool) -> anyhow::Result<StatusJson> {
    let r = ask(path, &ControlRequest::StatusJson { noflush })?;
    if !r.ok {
        bail!("status failed: {}", r.error.unwrap_or_default());
    }
    serde_json::from_str(&r.output).context("parsing the daemon's status")
}

/// `clonebd wait`.
pub fn wait(a: WaitArgs) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    let show = !a.no_progress && std::io::stderr().is_terminal();
    let mut bar: Option<indicatif::ProgressBar> = None;
    loop {
        let s = poll(&a.control, true)?;
        if s.mode == "Fail" {
            if let Some(b) = &bar {
                b.abandon();
            }
            bail!("the clone failed (metadata mode Fail): {}", s.status_line);
        }
        if show {
            let b = bar.get_or_insert_with(|| {
                let b = indicatif::ProgressBar::new(s.nr_regions);
                let style = indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} regions {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
                b.set_style(style);
                b
            });
            b.set_position(s.nr_hydrated);
            let eta = match s.eta_seconds {
                Some(e) => format!("ETA {}", fmt_secs(e)),
                None => "ETA --".into(),
            };
            b.set_message(format!("{}/s {eta}", human_bytes(s.hydration_rate as u64)));
        }
        if s.complete {
            // Make the completion durable before saying so.
            let c = poll(&a.control, false)?;
            if let Some(b) = &bar {
                b.finish_with_message("hydrated");
            }
            if c.mode != "rw" {
                bail!(
                    "hydrated, but the metadata is {}: the final commit may be lost",
                    c.mode
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(t) = a.timeout
            && start.elapsed().as_secs_f64() >= t
        {
            if let Some(b) = &bar {
                b.abandon();
            }
            bail!(
                "timed out after {t} s: {}/{} regions hydrated",
                s.nr_hydrated,
                s.nr_regions
            );
        }
        std::thread::sleep(Duration::from_millis(a.interval.max(10)));
    }
}

fn fmt_secs(s: f64) -> String {
    let s = s.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}
