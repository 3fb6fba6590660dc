//! systemd's service notification protocol (`Type=notify`, through `sd-notify`): `READY=1`
//! once every export serves, `STATUS=` with the hydration progress while the clone runs,
//! `WATCHDOG=1` at half the `WatchdogSec` systemd asked for, and `STOPPING=1` when a signal
//! stops the daemon. Without `NOTIFY_SOCKET` (not under systemd) every call does nothing.
//!
//! The watchdog is fed by the thread that reads the volume's status: a volume whose state
//! cannot be read (its engine lock held forever) stops feeding it, and systemd restarts the
//! service, which is what the watchdog is for.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clonebd_driver::Volume;
use sd_notify::NotifyState;

/// How often `STATUS=` is sent when no watchdog asks for more.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// The link to systemd, if there is one.
#[derive(Debug, Clone)]
pub struct Notifier {
    active: bool,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From the environment systemd gives a service (`NOTIFY_SOCKET`, `WATCHDOG_USEC`,
    /// `WATCHDOG_PID`).
    pub fn from_env() -> Self {
        let active = std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty());
        let watchdog = active.then(watchdog_from_env).flatten();
        Self { active, watchdog }
    }

    /// Whether systemd listens.
    pub fn active(&self) -> bool {
        self.active
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.active {
            return;
        }
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::warn!("NOTIFY_SOCKET: cannot notify systemd: {e}");
        }
    }

    /// Every export serves: `READY=1`, with the first status line.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// The daemon is stopping (it commits first): `STOPPING=1`.
    pub fn stopping(&self) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping: committing"),
        ]);
    }

    /// Sends the volume's progress as `STATUS=` (and feeds the watchdog) until the returned
    /// reporter is stopped.
    pub fn report(&self, volume: Volume) -> Option<Reporter> {
        if !self.active {
            return None;
        }
        let every = self
            .watchdog
            .map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
        let stop = Arc::new(AtomicBool::new(false));
        let me = self.clone();
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("sd-notify".to_string())
            .spawn(move || {
                let mut next = Instant::now();
                while !flag.load(Ordering::Acquire) {
                    if Instant::now() >= next {
                        let text = progress(&volume);
                        let mut states = vec![NotifyState::Status(&text)];
                        if me.watchdog.is_some() {
                            states.push(NotifyState::Watchdog);
                        }
                        me.send(&states);
                        next = Instant::now() + every;
                    }
                    std::thread::sleep(Duration::from_millis(50).min(every));
                }
            });
        match thread {
            Ok(t) => Some(Reporter {
                stop,
                thread: Some(t),
            }),
            Err(e) => {
                tracing::warn!("cannot start the systemd status thread: {e}");
                None
            }
        }
    }
}

/// The watchdog interval systemd asks for, as `sd_watchdog_enabled(3)` reads it:
/// `WATCHDOG_USEC`, for this process unless `WATCHDOG_PID` names another one.
fn watchdog_from_env() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.trim().parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// The thread that sends `STATUS=` and `WATCHDOG=1`; stopped and joined on drop.
#[derive(Debug)]
pub struct Reporter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One line of progress: "hydrated 1021 of 32768 regions (3.1%)", "hydrated: all N
/// regions" once complete, or "finalized: ..." once the source is detached.
pub fn progress(volume: &Volume) -> String {
    let s = volume.status();
    let (n, total) = (s.engine.nr_hydrated, s.engine.nr_regions);
    if s.finalized {
        format!("finalized: all {total} regions hydrated, the source detached")
    } else if n >= total {
        format!("hydrated: all {total} regions")
    } else {
        let pct = if total == 0 {
            100.0
        } else {
            n as f64 * 100.0 / total as f64
        };
        format!("hydrated {n} of {total} regions ({pct:.1}%)")
    }
}
