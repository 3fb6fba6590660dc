//! `--metrics [ADDR:]PORT`: the clone's metrics in the Prometheus (OpenMetrics) text format
//! at `GET /metrics`, encoded by `prometheus-client` at scrape time from the counters the
//! I/O paths keep with atomic adds (the volume's [`IoMetrics`](clonebd_driver::metrics::IoMetrics), the NBD servers' stats, a
//! remote source's [`SourceStats`]), on a plain listener thread: nothing on the I/O path
//! takes a lock or allocates for a metric.
//!
//! The names, each with its `# HELP` text, are listed in docs/METRICS.md.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clonebd_core::engine::Mode;
use clonebd_core::histogram::HistogramSnapshot;
use clonebd_driver::Volume;
use clonebd_driver::metrics::Op;
use clonebd_io::socket::{Acceptor, StopSignal};
use clonebd_nbd::Server;
use clonebd_remote::{SourceState, SourceStats};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

/// What the metrics are read from.
#[derive(Debug, Clone)]
pub struct MetricsSources {
    /// The clone.
    pub volume: Volume,
    /// Its NBD servers.
    pub servers: Vec<Arc<Server>>,
    /// The remote source, if the source is remote.
    pub source: Option<Arc<SourceStats>>,
    /// When the daemon started.
    pub started: Instant,
}

/// A histogram read at scrape time, encoded as one.
struct Hist(HistogramSnapshot);

impl EncodeMetric for Hist {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(
            self.0.sum_seconds,
            self.0.count,
            &self.0.buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let m = e.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)).encode(m)
}

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let m = e.encode_descriptor(name, help, unit, MetricType::Counter)?;
    ConstCounter::new(v).encode(m)
}

/// One counter per operation, labelled `op`.
fn per_op(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: &[(Op, u64)],
) -> Result<(), std::fmt::Error> {
    let mut fam = e.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (op, n) in v {
        let labels = [("op", op.name())];
        ConstCounter::new(*n).encode(fam.encode_family(&labels)?)?;
    }
    Ok(())
}

impl prometheus_client::collector::Collector for MetricsSources {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.volume.status();
        let st = &s.engine;
        gauge(
            &mut e,
            "clonebd_regions",
            "Regions of the clone.",
            None,
            st.nr_regions,
        )?;
        gauge(
            &mut e,
            "clonebd_regions_hydrated",
            "Regions hydrated (copied, or written whole, on the destination).",
            None,
            st.nr_hydrated,
        )?;
        gauge(
            &mut e,
            "clonebd_regions_hydrating",
            "Regions being copied now.",
            None,
            st.hydrating,
        )?;
        counter(
            &mut e,
            "clonebd_hydrated",
            "Bytes copied from the source to the destination by hydration.",
            Some(&Unit::Bytes),
            st.bytes_hydrated,
        )?;
        counter(
            &mut e,
            "clonebd_hydrated_zero",
            "Bytes hydrated without copying them: holes and zeros of the source, zeroed on the destination.",
            Some(&Unit::Bytes),
            s.copies.zeroed,
        )?;
        counter(
            &mut e,
            "clonebd_copy_errors",
            "Copies from the source that failed (each is tried again later).",
            None,
            st.copy_errors,
        )?;
        gauge(
            &mut e,
            "clonebd_hydration_enabled",
            "1 while background hydration runs, 0 while it is disabled.",
            None,
            u64::from(st.hydration_enabled),
        )?;
        {
            let mut fam = e.encode_descriptor(
                "clonebd_metadata_mode",
                "The metadata mode, as the status line shows it: 1 for the current one.",
                None,
                MetricType::Gauge,
            )?;
            for (name, is) in [
                ("rw", st.mode == Mode::ReadWrite),
                ("ro", st.mode == Mode::ReadOnly),
                ("fail", st.mode == Mode::Fail),
            ] {
                ConstGauge::new(i64::from(is)).encode(fam.encode_family(&[("mode", name)])?)?;
            }
        }
        gauge(
            &mut e,
            "clonebd_metadata_blocks",
            "Metadata blocks in all.",
            None,
            s.metadata.total,
        )?;
        gauge(
            &mut e,
            "clonebd_metadata_blocks_used",
            "Metadata blocks allocated.",
            None,
            s.metadata.used,
        )?;
        let m = self.volume.metrics();
        let (commits, commit_errors) = m.commits();
        counter(
            &mut e,
            "clonebd_commits",
            "Metadata commits.",
            None,
            commits,
        )?;
        counter(
            &mut e,
            "clonebd_commit_errors",
            "Metadata commits that failed.",
            None,
            commit_errors,
        )?;
        Hist(m.commit_latency()).encode(e.encode_descriptor(
            "clonebd_commit_duration",
            "How long metadata commits take.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?)?;
        let ops: Vec<_> = Op::ALL
            .iter()
            .map(|&op| (op, m.op(op).snapshot()))
            .collect();
        let pick = |f: fn(&clonebd_driver::metrics::OpSnapshot) -> u64| {
            ops.iter().map(|(op, s)| (*op, f(s))).collect::<Vec<_>>()
        };
        per_op(
            &mut e,
            "clonebd_requests",
            "Client requests completed (NBD, FUSE and ublk alike), by operation.",
            None,
            &pick(|s| s.requests),
        )?;
        per_op(
            &mut e,
            "clonebd_request_errors",
            "Client requests that failed, by operation.",
            None,
            &pick(|s| s.errors),
        )?;
        per_op(
            &mut e,
            "clonebd_request",
            "Bytes of client requests, by operation.",
            Some(&Unit::Bytes),
            &pick(|s| s.bytes),
        )?;
        {
            let mut fam = e.encode_descriptor(
                "clonebd_request_duration",
                "How long client requests take, by operation.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for (op, s) in &ops {
                Hist(s.latency.clone()).encode(fam.encode_family(&[("op", op.name())])?)?;
            }
        }
        let (active, total) = self
            .servers
            .iter()
            .map(|s| s.stats())
            .fold((0, 0), |(a, t), s| {
                (a + s.active_connections, t + s.total_connections)
            });
        gauge(
            &mut e,
            "clonebd_nbd_connections",
            "NBD connections open now.",
            None,
            active,
        )?;
        counter(
            &mut e,
            "clonebd_nbd_connections_accepted",
            "NBD connections accepted since the start.",
            None,
            total,
        )?;
        if let Some(src) = &self.source {
            let r = src.report();
            counter(
                &mut e,
                "clonebd_source_requests",
                "Requests to the remote source (each attempt).",
                None,
                r.requests,
            )?;
            counter(
                &mut e,
                "clonebd_source_retries",
                "Requests to the remote source tried again after a transient failure.",
                None,
                r.retries,
            )?;
            counter(
                &mut e,
                "clonebd_source_errors",
                "Requests to the remote source that failed for good.",
                None,
                r.errors,
            )?;
            Hist(src.latency()).encode(e.encode_descriptor(
                "clonebd_source_request_duration",
                "How long each request to the remote source takes.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?)?;
            let mut fam = e.encode_descriptor(
                "clonebd_source_state",
                "The remote source's state: 1 for the current one.",
                None,
                MetricType::Gauge,
            )?;
            for state in [
                SourceState::Connected,
                SourceState::Retrying,
                SourceState::Failed,
                SourceState::Changed,
            ] {
                ConstGauge::new(i64::from(r.state == state))
                    .encode(fam.encode_family(&[("state", state.as_str())])?)?;
            }
        }
        gauge(
            &mut e,
            "clonebd_finalized",
            "1 once the clone is finalized (the source detached), else 0.",
            None,
            u64::from(self.volume.is_finalized()),
        )?;
        gauge(
            &mut e,
            "clonebd_uptime",
            "Seconds since the daemon started.",
            Some(&Unit::Seconds),
            self.started.elapsed().as_secs(),
        )?;
        Ok(())
    }
}

/// The text of one scrape.
pub fn render(sources: &MetricsSources) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(sources.clone()));
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

/// The metrics endpoint, serving on a thread until stopped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<StopSignal>,
    thread: Option<JoinHandle<()>>,
}

/// Why the endpoint cannot start.
#[derive(Debug, thiserror::Error)]
#[error("--metrics {addr}: {}", clonebd_core::errno::describe(.cause))]
pub struct MetricsError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// The system's error.
    pub cause: std::io::Error,
}

impl MetricsServer {
    /// Listens on `addr` and serves `GET /metrics`.
    pub fn start(addr: SocketAddr, sources: MetricsSources) -> Result<Self, MetricsError> {
        let err = |cause| MetricsError { addr, cause };
        let listener = TcpListener::bind(addr).map_err(err)?;
        let bound = listener.local_addr().map_err(err)?;
        let stop = Arc::new(StopSignal::new().map_err(err)?);
        let acceptor = Acceptor::new(listener, Arc::clone(&stop)).map_err(err)?;
        let thread = std::thread::Builder::new()
            .name("clonebd-metrics".into())
            .spawn(move || serve(&acceptor, &sources))
            .map_err(err)?;
        Ok(Self {
            addr: bound,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(acceptor: &Acceptor<TcpListener>, sources: &MetricsSources) {
    loop {
        match acceptor.accept() {
            Ok(Some(conn)) => {
                if let Err(e) = answer(conn, sources) {
                    tracing::debug!("metrics: {e}");
                }
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(
                    "metrics: accept failed: {}",
                    clonebd_core::errno::describe(&e)
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// One HTTP/1.x exchange: `GET /metrics` gets the metrics, anything else 404 or 405; the
/// connection is closed after it. A client that sends nothing is dropped after 5 s.
fn answer(conn: TcpStream, sources: &MetricsSources) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(std::io::Read::take(&conn, 16 << 10));
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // The headers: read and ignored, up to the blank line.
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut words = request.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, kind, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(sources),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "clonebd serves its metrics at /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "GET /metrics\n".to_string(),
        ),
    };
    let mut w = &conn;
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    if method != "HEAD" {
        w.write_all(body.as_bytes())?;
    }
    w.flush()
}
