//! `--metrics`: scraped with a real HTTP client (curl) while a clone hydrates and serves I/O,
//! parsed as Prometheus text; the counters move as the workload does, and the names are
//! exactly those docs/METRICS.md lists.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::daemon::{Daemon, Files, free_port, have, run};
use common::servers::nginx;

/// One scrape: each sample's name with its labels, and its value.
fn scrape(port: u16) -> BTreeMap<String, f64> {
    let text = run(
        "curl",
        &["-sf", &format!("http://127.0.0.1:{port}/metrics")],
    );
    let mut out = BTreeMap::new();
    let mut eof = false;
    for line in text.lines() {
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').expect("sample line: NAME VALUE");
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
        out.insert(key.to_string(), v);
    }
    assert!(eof, "no # EOF: not OpenMetrics text:\n{text}");
    out
}

/// The metric family of a sample name (`x_bucket{..}` → `x`, labels dropped).
fn family(sample: &str) -> String {
    let name = sample.split('{').next().unwrap();
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && base.ends_with("_seconds")
        {
            return base.to_string();
        }
    }
    name.to_string()
}

/// The names docs/METRICS.md lists.
fn documented() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/METRICS.md"
    ))
    .expect("docs/METRICS.md");
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect()
}

#[test]
fn metrics_move_with_the_workload_and_match_the_documented_names() {
    if !have("curl") || !have("qemu-io") || !have("nginx") {
        return;
    }
    // A remote source, so that the source's metrics are there too.
    let f = Files::new(8 << 20, 41);
    let web = nginx(f.dir.path(), "");
    let url = format!("http://127.0.0.1:{}/source.img", web.port);
    let c = f.with_remote_source(&url);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start(&c, &["--no-hydration", "--metrics", &addr]);
    let before = scrape(port);
    let names: BTreeSet<String> = before.keys().map(|k| family(k)).collect();
    assert_eq!(
        names,
        documented(),
        "scraped names differ from docs/METRICS.md"
    );
    assert_eq!(before["clonebd_regions"], 128.0);
    assert_eq!(before["clonebd_regions_hydrated"], 0.0);
    assert_eq!(before["clonebd_metadata_mode{mode=\"rw\"}"], 1.0);
    assert_eq!(before["clonebd_source_state{state=\"connected\"}"], 1.0);
    assert_eq!(before["clonebd_requests_total{op=\"read\"}"], 0.0);
    // Reads of cold regions (from the source), a write, a flush.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &d.unix_uri(),
            "-c",
            "read 0 1m",
            "-c",
            "write -P 0x11 1m 64k",
            "-c",
            "flush",
        ],
    );
    let after = scrape(port);
    let reads = after["clonebd_requests_total{op=\"read\"}"];
    assert!(reads >= 1.0, "{after:?}");
    assert!(after["clonebd_request_bytes_total{op=\"read\"}"] >= 1048576.0);
    assert!(after["clonebd_requests_total{op=\"write\"}"] >= 1.0);
    assert!(after["clonebd_requests_total{op=\"flush\"}"] >= 1.0);
    assert_eq!(
        after["clonebd_request_duration_seconds_count{op=\"read\"}"],
        reads
    );
    assert_eq!(
        after["clonebd_request_duration_seconds_bucket{le=\"+Inf\",op=\"read\"}"],
        reads
    );
    assert!(after["clonebd_source_requests_total"] > before["clonebd_source_requests_total"]);
    assert!(after["clonebd_source_request_duration_seconds_count"] >= 1.0);
    assert!(after["clonebd_commits_total"] >= 1.0, "the flush committed");
    assert!(
        after["clonebd_regions_hydrated"] >= 1.0,
        "the write hydrated its region"
    );
    assert!(after["clonebd_nbd_connections_accepted_total"] >= 1.0);
    // Hydration: the bytes and regions climb to the whole clone.
    d.ctl_ok("message", &["enable_hydration"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = scrape(port);
        if m["clonebd_regions_hydrated"] == 128.0 {
            assert!(
                m["clonebd_hydrated_bytes_total"] >= (127u64 * 65536) as f64,
                "{m:?}"
            );
            assert_eq!(m["clonebd_hydration_enabled"], 1.0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "hydration does not finish: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Anything but /metrics is not found.
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{addr}/"),
        ])
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    assert!(d.terminate().success());
}
