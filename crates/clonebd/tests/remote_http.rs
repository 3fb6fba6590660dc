//! Cloning from a raw image on a real web server (nginx on 127.0.0.1, a configuration the
//! test writes): the clone reads right while it hydrates, writes land, hydration finishes
//! with every byte right; a server without byte ranges is refused; an image replaced
//! mid-hydration is detected (ETag), hydration stops, hydrated regions still serve, cold
//! reads fail, and a restart is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, Files, Rng, clonebd, first_difference, run, run_status};
use common::loops::{Loop, can_use_loop_devices};
use common::servers::{make_certs, need, nginx, nginx_on, nginx_tls};

fn have_all() -> bool {
    need("nginx") && need("qemu-img") && need("qemu-io")
}

#[test]
fn a_clone_of_an_http_image_reads_right_while_it_hydrates_and_ends_equal() {
    if !have_all() {
        return;
    }
    let f = Files::new(16 << 20, 11);
    let web = nginx(f.dir.path(), "");
    let url = format!("http://127.0.0.1:{}/source.img", web.port);
    let c = f.with_remote_source(&url);
    let d = Daemon::start(&c, &["--no-hydration"]);
    let st = d.status_json();
    assert_eq!(st["source"]["uri"], url.as_str());
    assert_eq!(st["source"]["state"], "connected");
    // Every byte through clonebd's export equals the source, before any hydration.
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &d.unix_uri(),
            f.source.to_str().unwrap(),
        ],
    );
    // Writes land (inside a region, and across regions).
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &d.unix_uri(),
            "-c",
            "write -P 0x5a 70000 5000",
            "-c",
            "write -P 0xa5 1048000 200000",
            "-c",
            "flush",
        ],
    );
    let mut expected = f.source_bytes();
    expected[70000..75000].fill(0x5a);
    expected[1_048_000..1_248_000].fill(0xa5);
    d.ctl_ok("message", &["enable_hydration"]);
    // Compared while hydration runs.
    run(
        "qemu-io",
        &["-f", "raw", &d.unix_uri(), "-c", "read -P 0x5a 70000 5000"],
    );
    d.ctl_ok("wait", &["--no-progress"]);
    let st = d.status_json();
    assert_eq!(st["complete"], true);
    assert!(st["source"]["requests"].as_u64().unwrap() > 0);
    assert!(d.terminate().success());
    if let Some(diff) = first_difference(&c.dest_bytes(), &expected) {
        panic!("destination differs from source plus writes: {diff}");
    }
    // The pin sits beside the metadata and names the image's ETag, without secrets.
    let mut pin = c.meta.clone().into_os_string();
    pin.push(".source-pin");
    let pin = std::fs::read_to_string(&pin).expect("pin file");
    assert!(pin.contains("\"etag\"") && pin.contains(&url), "{pin}");
}

#[test]
fn a_server_without_byte_ranges_is_refused() {
    if !have_all() {
        return;
    }
    let f = Files::new(1 << 20, 12);
    let web = nginx(f.dir.path(), "max_ranges 0;");
    let url = format!("http://127.0.0.1:{}/source.img", web.port);
    let out = clonebd(&[
        "run",
        "--source",
        &url,
        "--dest",
        f.dest.to_str().unwrap(),
        "--metadata",
        f.meta.to_str().unwrap(),
        "--create",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "clonebd: source {url}: the server does not serve byte ranges"
        )),
        "{err}"
    );
    assert!(!f.meta.exists(), "a refused start created the metadata");
    // A missing image is named too.
    let url = format!("http://127.0.0.1:{}/nosuch.img", web.port);
    let out = clonebd(&[
        "run",
        "--source",
        &url,
        "--dest",
        f.dest.to_str().unwrap(),
        "--metadata",
        f.meta.to_str().unwrap(),
        "--create",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains(&format!("clonebd: source {url}: not found (404)")),
        "{err}"
    );
}

#[test]
fn an_image_replaced_mid_hydration_stops_hydration_and_a_restart_is_refused() {
    if !have_all() {
        return;
    }
    let f = Files::new(16 << 20, 13);
    let web = nginx(f.dir.path(), "");
    let url = format!("http://127.0.0.1:{}/source.img", web.port);
    let c = f.with_remote_source(&url);
    let original = f.source_bytes();
    // Slow hydration, so that the replacement lands in the middle of it.
    let d = Daemon::start(
        &c,
        &[
            "--hydration-rate-limit",
            "1m",
            "--hydration-batch-size",
            "1",
            "--hydration-threshold",
            "2",
        ],
    );
    // One region hydrated by a client write, one by a copy of the source (CACHE).
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &d.unix_uri(),
            "-c",
            "write -P 0x77 0 65536",
            "-c",
            "flush",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.status_json()["nr_hydrated"].as_u64().unwrap() < 8 {
        assert!(Instant::now() < deadline, "hydration does not progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Replace the image: same size, other bytes, a new ETag.
    let mut other = vec![0u8; original.len()];
    Rng::new(99).fill(&mut other);
    let tmp = f.path("source.img.new");
    std::fs::write(&tmp, &other).expect("new image");
    // nginx's ETag is the modification time in seconds and the size: make the time differ
    // even when the replacement comes within the second the original was written.
    let was = std::fs::metadata(&f.source)
        .and_then(|m| m.modified())
        .expect("mtime");
    std::fs::File::options()
        .write(true)
        .open(&tmp)
        .and_then(|file| file.set_modified(was + Duration::from_secs(10)))
        .expect("set mtime");
    std::fs::rename(&tmp, &f.source).expect("replace");
    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        let st = d.status_json();
        if st["source"]["state"] == "changed" {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the change was not detected: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let last = st["source"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(last.contains("changed since the clone began"), "{last}");
    let log = d.log_text();
    assert!(log.contains("changed since the clone began"), "{log}");
    // Hydration stops: nothing more is hydrated.
    let n = st["nr_hydrated"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(d.status_json()["nr_hydrated"].as_u64().unwrap(), n);
    assert!(n < st["nr_regions"].as_u64().unwrap());
    // The hydrated region the client wrote still reads right; a cold one fails.
    run(
        "qemu-io",
        &["-f", "raw", &d.unix_uri(), "-c", "read -P 0x77 0 65536"],
    );
    let cold = run_status(
        "qemu-io",
        &["-f", "raw", &d.unix_uri(), "-c", "read 15m 4k"],
    );
    let out =
        String::from_utf8_lossy(&cold.stdout).into_owned() + &String::from_utf8_lossy(&cold.stderr);
    assert!(out.contains("Input/output error"), "{out}");
    assert!(d.terminate().success(), "stop must still commit and exit 0");
    // Every region recorded hydrated holds the original image's bytes (or the write).
    let dest = c.dest_bytes();
    assert_eq!(&dest[..65536], &[0x77u8; 65536][..]);
    let dump = run(
        env!("CARGO_BIN_EXE_clonebd"),
        &["dump", "--json", c.meta.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(&dump).expect("dump json");
    let region = v["region_sectors"].as_u64().expect("region_sectors") as usize * 512;
    for r in v["hydrated_ranges"].as_array().expect("ranges") {
        let (first, n) = (
            r[0].as_u64().unwrap() as usize,
            r[1].as_u64().unwrap() as usize,
        );
        for i in first.max(1)..first + n {
            let at = i * region;
            assert_eq!(
                &dest[at..at + region],
                &original[at..at + region],
                "region {i}"
            );
        }
    }
    // A restart on the changed image is refused.
    let out = clonebd(&[
        "run",
        "--source",
        &url,
        "--dest",
        c.dest.to_str().unwrap(),
        "--metadata",
        c.meta.to_str().unwrap(),
        "--region-size",
        "64k",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "restart on a changed source started:\n{err}"
    );
    assert!(
        err.contains(&format!(
            "clonebd: source {url}: changed since the clone began (its etag was"
        )),
        "{err}"
    );
}

#[test]
fn an_https_image_is_cloned_with_the_ca_given_and_refused_without_it() {
    if !have_all() || !need("openssl") {
        return;
    }
    let f = Files::new(4 << 20, 17);
    let certs = make_certs(f.dir.path());
    let web = nginx_tls(f.dir.path(), &certs);
    let url = format!("https://127.0.0.1:{}/source.img", web.port);
    // The system's roots do not know the test's CA: refused, saying why.
    let c = f.with_remote_source(&url);
    let out = clonebd(&[
        "run",
        "--create",
        "--source",
        &url,
        "--dest",
        c.dest.to_str().unwrap(),
        "--metadata",
        c.meta.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "an untrusted certificate was accepted"
    );
    assert!(
        err.contains(&format!("clonebd: source {url}: TLS:")),
        "{err}"
    );
    assert!(!c.meta.exists(), "metadata was created");
    // With the CA: cloned, every byte right.
    let ca = certs.ca.to_str().unwrap();
    let d = Daemon::start(&c, &["--source-tls-ca", ca]);
    d.wait_complete(Duration::from_secs(60));
    assert!(d.terminate().success());
    let dest = std::fs::read(&c.dest).expect("dest");
    assert_eq!(first_difference(&dest, &f.source_bytes()), None);
}

#[test]
fn a_server_that_goes_away_pauses_hydration_and_it_resumes_when_the_server_is_back() {
    if !have_all() {
        return;
    }
    let f = Files::new(8 << 20, 19);
    let web = nginx(f.dir.path(), "");
    let port = web.port;
    let url = format!("http://127.0.0.1:{port}/source.img");
    let c = f.with_remote_source(&url);
    // One region per copy, slowly: most of the image is still cold when the server goes.
    let d = Daemon::start(
        &c,
        &[
            "--hydration-rate-limit",
            "1m",
            "--hydration-batch-size",
            "1",
            "--hydration-threshold",
            "2",
            "--source-timeout",
            "2",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.status_json()["nr_hydrated"].as_u64().unwrap() < 8 {
        assert!(Instant::now() < deadline, "hydration does not progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(web);
    // Hydrated regions read at once; a cold one fails after the source timeout, not never.
    run(
        "qemu-io",
        &["-f", "raw", &d.unix_uri(), "-c", "read 0 65536"],
    );
    let t0 = Instant::now();
    let out = run_status(
        "qemu-io",
        &["-f", "raw", &d.unix_uri(), "-c", "read 8323072 65536"],
    );
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("Input/output error"),
        "a cold read with the source away: {said}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "a cold read waited {:?}",
        t0.elapsed()
    );
    let st = d.status_json();
    assert!(
        st["source"]["state"] == "failed" || st["source"]["state"] == "retrying",
        "{st}"
    );
    assert!(!st["complete"].as_bool().unwrap());
    // The server comes back on the same port: hydration resumes by itself and finishes.
    let _web = nginx_on(f.dir.path(), port);
    d.wait_complete(Duration::from_secs(120));
    assert_eq!(d.status_json()["source"]["state"], "connected");
    assert!(d.terminate().success());
    let dest = std::fs::read(&c.dest).expect("dest");
    assert_eq!(first_difference(&dest, &f.source_bytes()), None);
}

#[test]
fn metadata_on_a_block_device_needs_a_pin_file_and_works_with_one() {
    if !have_all() || !can_use_loop_devices() {
        return;
    }
    let f = Files::new(4 << 20, 23);
    let web = nginx(f.dir.path(), "");
    let url = format!("http://127.0.0.1:{}/source.img", web.port);
    let mut c = f.with_remote_source(&url);
    let meta_file = c.path("meta-dev.img");
    std::fs::write(&meta_file, vec![0u8; 4 << 20]).expect("meta file");
    let lo = Loop::attach(&meta_file, false);
    let args = |pin: Option<&str>| {
        let mut a = vec![
            "run".to_string(),
            "--source".to_string(),
            url.clone(),
            "--dest".to_string(),
            c.dest.display().to_string(),
            "--metadata".to_string(),
            lo.0.clone(),
        ];
        if let Some(p) = pin {
            a.extend(["--source-pin".to_string(), p.to_string()]);
        }
        a
    };
    // /dev holds nothing across a reboot: no pin beside the device, and no silent default.
    let a = args(None);
    let out = clonebd(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "clonebd: metadata {}: a block device has no place beside it for the remote source's pinned identity: give --source-pin FILE",
            lo.0
        )),
        "{err}"
    );
    assert!(
        std::fs::read(&meta_file)
            .expect("meta")
            .iter()
            .all(|&b| b == 0),
        "a refused start wrote the metadata device"
    );
    // With a pin file: the clone runs, and the pin is where it was asked to be.
    let pin = c.path("clone.pin");
    c.meta = PathBuf::from(&lo.0);
    let d = Daemon::start(&c, &["--source-pin", pin.to_str().unwrap()]);
    d.wait_complete(Duration::from_secs(60));
    assert!(d.terminate().success());
    let text = std::fs::read_to_string(&pin).expect("pin file");
    assert!(text.contains(&url), "{text}");
    let dest = std::fs::read(&c.dest).expect("dest");
    assert_eq!(first_difference(&dest, &f.source_bytes()), None);
}
