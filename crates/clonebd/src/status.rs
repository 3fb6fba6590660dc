//! Status reports: the dm-clone status line (byte-exact, the same once finalized) and the
//! JSON form with rates, which also says whether the clone is finalized.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clonebd_core::dmclone::{MetadataMode, StatusInfo, format_status_line};
use clonebd_core::engine::Mode;
use clonebd_driver::VolumeStatus;
use clonebd_remote::SourceReport;
use serde::{Deserialize, Serialize};

/// The dm-clone INFO status of a volume.
pub fn status_info(s: &VolumeStatus) -> StatusInfo {
    StatusInfo {
        md_used: s.metadata.used,
        md_total: s.metadata.total,
        region_sectors: s.geometry.region_sectors(),
        nr_hydrated: s.engine.nr_hydrated,
        nr_regions: s.engine.nr_regions,
        hydrating: s.engine.hydrating,
        hydration_enabled: s.engine.hydration_enabled,
        discard_passdown: s.engine.discard_passdown,
        hydration_threshold: s.engine.hydration_threshold,
        hydration_batch_size: s.engine.hydration_batch_size,
        mode: match s.engine.mode {
            Mode::ReadWrite => MetadataMode::ReadWrite,
            Mode::ReadOnly => MetadataMode::ReadOnly,
            Mode::Fail => MetadataMode::Fail,
        },
    }
}

/// The status line as `dmsetup status` prints it, prefix included.
pub fn status_line(s: &VolumeStatus) -> String {
    format_status_line(s.geometry.target_sectors(), &status_info(s))
}

/// The JSON status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusJson {
    /// The dm-clone status line.
    pub status_line: String,
    /// Clone length in sectors.
    pub target_sectors: u64,
    /// Region size in sectors.
    pub region_sectors: u64,
    /// Regions in all.
    pub nr_regions: u64,
    /// Hydrated regions.
    pub nr_hydrated: u64,
    /// Regions with a hydration in flight.
    pub hydrating: u64,
    /// Whether every region is hydrated.
    pub complete: bool,
    /// Finalized (`clonebd finalize`, or a start without a source): requests go straight to
    /// the destination.
    #[serde(default)]
    pub finalized: bool,
    /// Whether the source is detached (closed): true exactly when finalized.
    #[serde(default)]
    pub source_detached: bool,
    /// Metadata blocks in use.
    pub metadata_blocks_used: u64,
    /// Metadata blocks in all.
    pub metadata_blocks_total: u64,
    /// `rw`, `ro` or `Fail`.
    pub mode: String,
    /// Features currently off, as in the status line.
    pub features: Vec<String>,
    /// Background hydration enabled.
    pub hydration_enabled: bool,
    /// Discards passed down.
    pub discard_passdown: bool,
    /// Current `hydration_threshold`.
    pub hydration_threshold: u32,
    /// Current `hydration_batch_size`.
    pub hydration_batch_size: u32,
    /// Background hydration bandwidth limit, bytes per second (0: none).
    pub hydration_rate_limit: u64,
    /// Recent hydration rate, bytes per second.
    pub hydration_rate: f64,
    /// Estimated seconds until every region is hydrated, at the recent rate.
    pub eta_seconds: Option<f64>,
    /// Bytes copied from the source so far (this run).
    pub bytes_hydrated: u64,
    /// Of them, bytes background copies read and wrote (this run).
    pub bytes_copied: u64,
    /// Bytes background copies zeroed on the destination instead of copying them: holes
    /// and zeros of the source (this run).
    pub bytes_skipped_zero: u64,
    /// Of them, the bytes the source reported as holes (`SEEK_DATA` on a file, NBD block
    /// status `base:allocation`), which were never read (this run).
    #[serde(default)]
    pub bytes_skipped_hole: u64,
    /// Failed copies so far (this run).
    pub copy_errors: u64,
    /// Why the last failed copy failed: the device, the offset and the system's error.
    pub last_copy_error: Option<String>,
    /// Copy-on-read (`--hydrate-on-read`): regions hydrated from reads' data (this run).
    #[serde(default)]
    pub regions_filled: u64,
    /// Regions reads offered that were left alone: hydrated, in flight or written first
    /// (this run).
    #[serde(default)]
    pub fills_refused: u64,
    /// Regions still in the hydration order queue (`--hydrate-first`, `hydrate_range`),
    /// hydrated before the rest of the background pass; counted whole, so some may be
    /// hydrated already.
    #[serde(default)]
    pub regions_queued: u64,
    /// Reads whose data was not kept, as it would have gone over --hydrate-on-read-budget
    /// (this run).
    #[serde(default)]
    pub fills_dropped: u64,
    /// Bytes of read data waiting to be written to the destination now.
    #[serde(default)]
    pub fill_bytes_pending: u64,
    /// Regions hydrated but not yet committed.
    pub dirty_regions: u64,
    /// NBD connections open now.
    pub connections: u64,
    /// NBD connections since start.
    pub total_connections: u64,
    /// Seconds since the daemon started.
    pub uptime_seconds: f64,
    /// A remote source: its state (`detached` once finalized) and counters (absent for a
    /// local source).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceJson>,
}

/// A remote source in the JSON status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceJson {
    /// Its URI, without credentials.
    pub uri: String,
    /// `connected`, `retrying`, `failed` or `changed`; `detached` once finalized.
    pub state: String,
    /// Requests made (each retry counts).
    pub requests: u64,
    /// Retries after transient failures.
    pub retries: u64,
    /// Requests that failed for good.
    pub errors: u64,
    /// The last failure, in words.
    pub last_error: Option<String>,
}

/// Measures the hydration rate over a sliding window of samples.
#[derive(Debug)]
pub struct RateMeter {
    samples: Mutex<VecDeque<(Instant, u64)>>,
    window: Duration,
}

impl RateMeter {
    /// A meter averaging over `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            samples: Mutex::new(VecDeque::new()),
            window,
        }
    }

    /// Records `bytes` (a running total) at `now`.
    pub fn sample(&self, now: Instant, bytes: u64) {
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        s.push_back((now, bytes));
        while s.len() > 2
            && s.front()
                .is_some_and(|(t, _)| now.duration_since(*t) > self.window)
        {
            s.pop_front();
        }
    }

    /// Bytes per second over the window (0 with fewer than two samples).
    pub fn rate(&self) -> f64 {
        let s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        match (s.front(), s.back()) {
            (Some((t0, b0)), Some((t1, b1))) if t1 > t0 => {
                b1.saturating_sub(*b0) as f64 / t1.duration_since(*t0).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

/// Builds the JSON status.
pub fn status_json(
    s: &VolumeStatus,
    rate: f64,
    connections: (u64, u64),
    uptime: Duration,
    source: Option<SourceReport>,
) -> StatusJson {
    let info = status_info(s);
    let mut features = Vec::new();
    if !info.hydration_enabled {
        features.push("no_hydration".to_string());
    }
    if !info.discard_passdown {
        features.push("no_discard_passdown".to_string());
    }
    let remaining = s.engine.nr_regions.saturating_sub(s.engine.nr_hydrated);
    let remaining_bytes = remaining.saturating_mul(s.geometry.region_bytes());
    let eta = if remaining == 0 {
        Some(0.0)
    } else if rate > 0.0 {
        Some(remaining_bytes as f64 / rate)
    } else {
        None
    };
    StatusJson {
        status_line: status_line(s),
        target_sectors: s.geometry.target_sectors(),
        region_sectors: s.geometry.region_sectors(),
        nr_regions: s.engine.nr_regions,
        nr_hydrated: s.engine.nr_hydrated,
        hydrating: s.engine.hydrating,
        complete: remaining == 0,
        finalized: s.finalized,
        source_detached: s.finalized,
        metadata_blocks_used: s.metadata.used,
        metadata_blocks_total: s.metadata.total,
        mode: info.mode.as_str().to_string(),
        features,
        hydration_enabled: info.hydration_enabled,
        discard_passdown: info.discard_passdown,
        hydration_threshold: info.hydration_threshold,
        hydration_batch_size: info.hydration_batch_size,
        hydration_rate_limit: s.engine.hydration_rate_limit,
        hydration_rate: rate,
        eta_seconds: eta,
        bytes_hydrated: s.engine.bytes_hydrated,
        bytes_copied: s.copies.copied,
        bytes_skipped_zero: s.copies.zeroed,
        bytes_skipped_hole: s.copies.unread,
        copy_errors: s.engine.copy_errors,
        last_copy_error: s.last_copy_error.clone(),
        regions_filled: s.engine.regions_filled,
        fills_refused: s.engine.fills_refused,
        regions_queued: s.engine.regions_queued,
        fills_dropped: s.fills.dropped,
        fill_bytes_pending: s.fills.pending_bytes,
        dirty_regions: s.engine.nr_dirty,
        connections: connections.0,
        total_connections: connections.1,
        uptime_seconds: uptime.as_secs_f64(),
        source: source.map(|r| SourceJson {
            uri: r.uri,
            state: if s.finalized {
                "detached".to_string()
            } else {
                r.state.as_str().to_string()
            },
            requests: r.requests,
            retries: r.retries,
            errors: r.errors,
            last_error: r.last_error,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_meter_averages_over_its_window() {
        let m = RateMeter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(m.rate(), 0.0);
        m.sample(t0, 0);
        m.sample(t0 + Duration::from_secs(2), 200);
        assert!((m.rate() - 100.0).abs() < 1e-9);
    }
}
