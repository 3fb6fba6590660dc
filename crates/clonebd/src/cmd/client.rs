//! The commands that talk to a running daemon through its control socket: `status`,
//! `table`, `message`, `wait` and `finalize` (which waits as `wait` does, through the same
//! loop, then asks the daemon to finalize).

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
/// hydration rate, ETA, copy errors, NBD connections and uptime, and whether the clone is
/// finalized ("finalized": true, "source_detached": true). A finalized clone's status
/// line is the same as a fully hydrated one's.
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
///   hydrate_range OFFSET LENGTH hydrate the regions of this byte range (k, m, g, t
///                               suffixes) before any other in the background, still
///                               under the enable flag, threshold and rate limit (clonebd
///                               only; see run --hydrate-first)
///
/// Anything else fails with the kernel's error text and exit status 1. Unlike the kernel,
/// extra words after enable_hydration or disable_hydration are refused, not ignored.
/// Messages are not persisted: a restart goes back to the command line's values. Once the
/// clone is finalized, every message is refused (exit status 1): there is no hydration
/// left to control.
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

/// Finalize a running clone: detach the source, serve from the destination alone.
///
/// Waits until every region is hydrated (showing the same progress bar as `clonebd wait`
/// on a terminal), commits the metadata, then detaches the source while the exports go on
/// serving without interruption: this is what dm-clone users do by swapping the table for
/// dm-linear over the destination, done live. From then on every request goes straight to
/// the destination, without looking at the hydration bitmap; the source (a local file or
/// device, or a remote source) is closed, and may be removed or reused. Writes, flushes and
/// FUA keep their durability (a flush still flushes the destination); discards are passed
/// down to the destination unless the clone was started with no_discard_passdown (or the
/// destination cannot discard); hydration messages are refused.
///
/// The metadata is left committed, consistent and fully hydrated, so the kernel's dm-clone
/// or clonebd can load it again; `clonebd run` without --source starts such a clone
/// finalized at once. The alternative stays open: stop the daemon after `clonebd wait` and
/// use the destination directly.
///
/// With --no-wait, a clone that is not fully hydrated is refused at once (exit status 1,
/// saying how many regions remain). Exits 1 as well if the clone fails, the metadata is
/// read-only (the final commit cannot be made), the daemon goes away, or --timeout passes.
/// Finalizing a finalized clone succeeds and says so.
#[derive(Debug, Args)]
pub struct FinalizeArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
    /// Do not wait for hydration: refuse unless every region is hydrated now.
    #[arg(long)]
    no_wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, value_name = "SECONDS", conflicts_with = "no_wait")]
    timeout: Option<f64>,
    /// Milliseconds between polls while waiting.
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
    wait_hydrated(&a.control, a.timeout, a.interval, a.no_progress)?;
    Ok(ExitCode::SUCCESS)
}

/// `clonebd finalize`.
pub fn finalize(a: FinalizeArgs) -> anyhow::Result<ExitCode> {
    if !a.no_wait {
        wait_hydrated(&a.control, a.timeout, a.interval, a.no_progress)?;
    }
    Ok(print_reply(ask(&a.control, &ControlRequest::Finalize)?))
}

/// Polls the daemon until every region is hydrated and that is committed (a progress bar
/// on a terminal unless `no_progress`); fails if the clone fails, the metadata is not
/// read-write at the end, or `timeout` seconds pass.
fn wait_hydrated(
    control: &Path,
    timeout: Option<f64>,
    interval: u64,
    no_progress: bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let show = !no_progress && std::io::stderr().is_terminal();
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut warned = false;
    loop {
        let s = poll(control, true)?;
        if s.mode == "Fail" {
            if let Some(b) = &bar {
                b.abandon();
            }
            bail!("the clone failed (metadata mode Fail): {}", s.status_line);
        }
        if !s.complete && !s.hydration_enabled && !warned {
            warned = true;
            let note = format!(
                "background hydration is off: only writes hydrate now (clonebd message --control {} enable_hydration)",
                control.display()
            );
            match &bar {
                Some(b) => b.println(note),
                None => eprintln!("{note}"),
            }
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
            let c = poll(control, false)?;
            if let Some(b) = &bar {
                b.finish_with_message("hydrated");
            }
            if c.mode != "rw" {
                bail!(
                    "hydrated, but the metadata is {}: the final commit may be lost",
                    c.mode
                );
            }
            return Ok(());
        }
        if let Some(t) = timeout
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
        std::thread::sleep(Duration::from_millis(interval.max(10)));
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
