//! Cloning from an S3 object on a real S3 server (moto, on 127.0.0.1, with authentication
//! on), configured the way the AWS tools are (`AWS_ENDPOINT_URL`, keys in the environment):
//! - on a versioned bucket the clone pins the object's version and keeps reading it after
//!   the object is overwritten, across a restart;
//! - on an unversioned bucket an overwrite is detected by its ETag: hydration stops with the
//!   "changed" error, and a restart is refused;
//! - wrong credentials are refused at start with an error that says so, creating nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::daemon::{Daemon, Files, Rng, clonebd_env, first_difference, run};
use common::servers::{Moto, moto_server};

const SIZE: u64 = 2 << 20;

fn have_all() -> bool {
    moto_server().is_some() && common::daemon::have("qemu-io")
}

/// Puts `bytes` (from the file `from`) as `bucket/key`; returns the version id (or "null").
fn put(moto: &Moto, bucket: &str, key: &str, from: &Path) -> String {
    moto.python(&format!(
        "r = s3.put_object(Bucket='{bucket}', Key='{key}', Body=open('{}', 'rb').read())\nprint(r.get('VersionId', 'null'))\n",
        from.display()
    ))
    .trim()
    .to_string()
}

fn make_bucket(moto: &Moto, bucket: &str, versioned: bool) {
    let mut code = format!("s3.create_bucket(Bucket='{bucket}')\n");
    if versioned {
        code.push_str(&format!(
            "s3.put_bucket_versioning(Bucket='{bucket}', VersioningConfiguration={{'Status': 'Enabled'}})\n"
        ));
    }
    moto.python(&code);
}

fn env(moto: &Moto) -> Vec<(&'static str, String)> {
    moto.env()
}

fn env_refs<'a>(e: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    e.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

fn wait_hydrated(d: &Daemon, at_least: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = d.status_json();
        if st["nr_hydrated"].as_u64().unwrap() >= at_least {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "hydration does not progress: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Other bytes of the same size, written to `f`'s directory.
fn other_image(f: &Files, seed: u64) -> PathBuf {
    let mut other = vec![0u8; f.size as usize];
    Rng::new(seed).fill(&mut other);
    let p = f.path(&format!("other-{seed}.img"));
    std::fs::write(&p, &other).expect("other image");
    p
}

#[test]
fn a_versioned_object_stays_pinned_to_its_version_after_an_overwrite_and_a_restart() {
    if !have_all() {
        return;
    }
    let f = Files::new(SIZE, 21);
    let moto = Moto::start(f.dir.path());
    make_bucket(&moto, "golden", true);
    let v1 = put(&moto, "golden", "disk.raw", &f.source);
    assert_ne!(v1, "null", "moto did not version the object");
    let e = env(&moto);
    let e = env_refs(&e);
    let uri = "s3://golden/disk.raw";
    let c = f.with_remote_source(uri);
    // One region per copy, slowly, so that the overwrite comes mid-hydration.
    let slow = [
        "--hydration-rate-limit",
        "256k",
        "--hydration-batch-size",
        "1",
        "--hydration-threshold",
        "2",
    ];
    let d = Daemon::start_with_env(&c, "64k", &slow, &e);
    let st = d.status_json();
    assert_eq!(st["source"]["uri"], uri);
    assert_eq!(st["source"]["state"], "connected");
    // The version is pinned beside the metadata before the first copy.
    let pin = std::fs::read_to_string(format!("{}.source-pin", c.meta.display())).expect("pin");
    assert!(pin.contains(&v1), "{pin}");
    assert!(!pin.contains(&moto.secret), "the pin holds a secret: {pin}");
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &d.unix_uri(),
            "-c",
            "write -P 0x3c 100000 3000",
            "-c",
            "flush",
        ],
    );
    let mut expected = f.source_bytes();
    expected[100_000..103_000].fill(0x3c);
    wait_hydrated(&d, 4);
    // The object is overwritten: a new version, other bytes.
    let other = other_image(&f, 77);
    let v2 = put(&moto, "golden", "disk.raw", &other);
    assert_ne!(v1, v2);
    wait_hydrated(&d, 8);
    // A restart by the same URI goes on with the pinned version, not the latest.
    assert!(d.terminate().success());
    let d = Daemon::start_with_env(&c, "64k", &[], &e);
    d.wait_complete(Duration::from_secs(120));
    let st = d.status_json();
    assert_eq!(st["source"]["state"], "connected", "{st}");
    assert!(d.terminate().success());
    let dest = std::fs::read(&c.dest).expect("dest");
    assert_eq!(
        first_difference(&dest, &expected),
        None,
        "the clone is not version {v1} plus the write"
    );
}

#[test]
fn an_overwritten_unversioned_object_stops_hydration_and_a_restart_is_refused() {
    if !have_all() {
        return;
    }
    let f = Files::new(SIZE, 22);
    let moto = Moto::start(f.dir.path());
    make_bucket(&moto, "plain", false);
    put(&moto, "plain", "disk.raw", &f.source);
    let e = env(&moto);
    let e = env_refs(&e);
    let uri = "s3://plain/disk.raw";
    let c = f.with_remote_source(uri);
    let d = Daemon::start_with_env(
        &c,
        "64k",
        &[
            "--hydration-rate-limit",
            "128k",
            "--hydration-batch-size",
            "1",
            "--hydration-threshold",
            "2",
        ],
        &e,
    );
    wait_hydrated(&d, 2);
    let other = other_image(&f, 78);
    put(&moto, "plain", "disk.raw", &other);
    let deadline = Instant::now() + Duration::from_secs(60);
    let st = loop {
        let st = d.status_json();
        if st["source"]["state"] == "changed" {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the overwrite was not detected: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let last = st["source"]["last_error"].as_str().unwrap_or_default();
    assert!(last.contains("changed since the clone began"), "{last}");
    assert!(!st["complete"].as_bool().unwrap());
    // What was hydrated is the original object's bytes.
    let n = st["nr_hydrated"].as_u64().unwrap();
    assert!(d.terminate().success());
    let out = clonebd_env(
        &[
            "run",
            "--source",
            uri,
            "--dest",
            c.dest.to_str().unwrap(),
            "--metadata",
            c.meta.to_str().unwrap(),
            "--region-size",
            "64k",
        ],
        &e,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "restart on a changed object started");
    assert!(
        err.contains(&format!(
            "clonebd: source {uri}: changed since the clone began"
        )),
        "{err}"
    );
    assert!(n < SIZE / 65536);
}

#[test]
fn wrong_credentials_are_refused_at_start_and_create_nothing() {
    if !have_all() {
        return;
    }
    let f = Files::new(SIZE, 23);
    let moto = Moto::start(f.dir.path());
    make_bucket(&moto, "locked", false);
    put(&moto, "locked", "disk.raw", &f.source);
    let mut e = env(&moto);
    for (k, v) in &mut e {
        if *k == "AWS_SECRET_ACCESS_KEY" {
            *v = "not-the-secret".to_string();
        }
    }
    let e = env_refs(&e);
    let c = f.with_remote_source("s3://locked/disk.raw");
    let out = clonebd_env(
        &[
            "run",
            "--create",
            "--source",
            "s3://locked/disk.raw",
            "--dest",
            c.dest.to_str().unwrap(),
            "--metadata",
            c.meta.to_str().unwrap(),
        ],
        &e,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(
            "clonebd: source s3://locked/disk.raw: access denied (403): check the credentials"
        ),
        "{err}"
    );
    assert!(!err.contains("not-the-secret"), "{err}");
    assert!(!c.meta.exists(), "metadata was created");
}
