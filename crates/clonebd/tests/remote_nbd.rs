//! Cloning from an export on a real NBD server (qemu-nbd on a unix socket, nbdkit on
//! 127.0.0.1): the clone reads right while it hydrates, writes land, hydration finishes with
//! every byte right; a slow server, and one that fails reads at random with EIO, still give
//! every byte right through retries; a server killed mid-hydration and started again is
//! reconnected to (hydrated regions serve meanwhile) and hydration finishes; a server that
//! comes back with another size is refused: hydration stops and a restart is refused; a
//! server that takes one client (qemu-nbd's default) gets one connection; over TLS
//! (`nbds://`, `nbds+unix://`) the server's certificate must verify against the CA given.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::daemon::{Daemon, Files, clonebd, first_difference, run, run_status};
use common::servers::{Listen, make_certs, nbdkit, need, qemu_nbd, qemu_nbd_shared, qemu_nbd_with};

fn have_all() -> bool {
    need("qemu-nbd") && need("nbdkit") && need("qemu-img") && need("qemu-io")
}

fn wait_for(d: &Daemon, what: &str, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = d.status_json();
        if ok(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{what}: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads right before hydration, writes land, hydrates, ends equal to source plus writes.
fn clone_reads_right_and_ends_equal(f: &Files, uri: &str) {
    let c = f.with_remote_source(uri);
    let d = Daemon::start(&c, &["--no-hydration"]);
    let st = d.status_json();
    assert_eq!(st["source"]["uri"], uri);
    assert_eq!(st["source"]["state"], "connected");
    let source = f.source.to_str().unwrap();
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &d.unix_uri(), source],
    );
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
    // Compared while hydration runs: the image with the writes.
    let img = c.dir.path().join("expected.img");
    std::fs::write(&img, &expected).unwrap();
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &d.unix_uri(),
            img.to_str().unwrap(),
        ],
    );
    d.ctl_ok("wait", &["--no-progress"]);
    let st = d.status_json();
    assert_eq!(st["complete"], true);
    assert!(st["source"]["requests"].as_u64().unwrap() > 0);
    assert!(d.terminate().success());
    if let Some(diff) = first_difference(&c.dest_bytes(), &expected) {
        panic!("destination differs from source plus writes: {diff}");
    }
    let mut pin = c.meta.clone().into_os_string();
    pin.push(".source-pin");
    let pin = std::fs::read_to_string(&pin).expect("pin file");
    assert!(pin.contains("\"export\"") && pin.contains(uri), "{pin}");
}

#[test]
fn a_clone_of_a_qemu_nbd_export_on_a_unix_socket_reads_right_and_ends_equal() {
    if !have_all() {
        return;
    }
    let f = Files::new(16 << 20, 21);
    let at = Listen::Unix(f.path("qemu.sock"));
    let _q = qemu_nbd(&f.source, "golden", &at);
    clone_reads_right_and_ends_equal(&f, &at.uri("golden"));
    // An export the server does not have is named as such.
    let g = Files::new(1 << 20, 0);
    let uri = at.uri("nosuch");
    let out = clonebd(&[
        "run",
        "--source",
        &uri,
        "--dest",
        g.dest.to_str().unwrap(),
        "--metadata",
        g.meta.to_str().unwrap(),
        "--create",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "clonebd: source {uri}: the server has no export of that name"
        )),
        "{err}"
    );
    assert!(!g.meta.exists(), "a refused start created the metadata");
}

#[test]
fn a_server_that_takes_one_client_gets_one_connection_and_the_clone_completes() {
    if !have_all() {
        return;
    }
    let f = Files::new(4 << 20, 26);
    let at = Listen::Unix(f.path("qemu1.sock"));
    let _q = qemu_nbd_shared(&f.source, "golden", &at, 1);
    let c = f.with_remote_source(&at.uri("golden"));
    let d = Daemon::start(&c, &["--source-connections", "3"]);
    d.ctl_ok("wait", &["--no-progress"]);
    assert_eq!(d.status_json()["source"]["state"], "connected");
    let log = d.log_text();
    assert!(
        log.contains("the server took 1 of the 3 connections asked for"),
        "{log}"
    );
    assert!(d.terminate().success());
    if let Some(diff) = first_difference(&c.dest_bytes(), &f.source_bytes()) {
        panic!("destination differs from the source: {diff}");
    }
}

#[test]
fn a_clone_of_an_nbdkit_export_over_tcp_reads_right_and_ends_equal() {
    if !have_all() {
        return;
    }
    let f = Files::new(16 << 20, 22);
    let at = Listen::tcp();
    let file = format!("file={}", f.source.display());
    let _k = nbdkit(f.dir.path(), &["file", &file], &at);
    clone_reads_right_and_ends_equal(&f, &at.uri(""));
}

#[test]
fn a_slow_server_that_fails_reads_at_random_still_gives_every_byte_right() {
    if !have_all() {
        return;
    }
    let f = Files::new(8 << 20, 23);
    let at = Listen::tcp();
    let file = format!("file={}", f.source.display());
    let _k = nbdkit(
        f.dir.path(),
        &[
            "--filter=error",
            "--filter=delay",
            "file",
            &file,
            "delay-read=5ms",
            "error=EIO",
            "error-pread-rate=20%",
        ],
        &at,
    );
    let uri = at.uri("");
    let c = f.with_remote_source(&uri);
    // One region per copy: 128 reads, so that some surely fail (a fifth of them, on average).
    let d = Daemon::start(&c, &["--hydration-batch-size", "1"]);
    d.ctl_ok("wait", &["--no-progress"]);
    let st = d.status_json();
    assert_eq!(st["complete"], true);
    assert!(
        st["source"]["retries"].as_u64().unwrap() > 0,
        "no read was retried: {st}"
    );
    assert_eq!(st["source"]["state"], "connected", "{st}");
    let last = st["source"]["last_error"].as_str().unwrap_or_default();
    assert!(
        last.contains("the server answered the read with server error 5 (input/output error)"),
        "{st}"
    );
    assert!(d.terminate().success());
    if let Some(diff) = first_difference(&c.dest_bytes(), &f.source_bytes()) {
        panic!("destination differs from the source: {diff}");
    }
}

#[test]
fn a_server_killed_mid_hydration_and_started_again_is_reconnected_to() {
    if !have_all() {
        return;
    }
    let f = Files::new(16 << 20, 24);
    let at = Listen::tcp();
    let file = format!("file={}", f.source.display());
    let k = nbdkit(f.dir.path(), &["file", &file], &at);
    let uri = at.uri("");
    let c = f.with_remote_source(&uri);
    let d = Daemon::start(
        &c,
        &["--hydration-rate-limit", "2m", "--source-timeout", "5"],
    );
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
    wait_for(&d, "hydration does not progress", |st| {
        st["nr_hydrated"].as_u64().unwrap() >= 16
    });
    drop(k);
    // While the server is down, the source is retried, then given up on for a while...
    let st = wait_for(&d, "the outage is not noticed", |st| {
        st["source"]["state"] == "retrying" || st["source"]["state"] == "failed"
    });
    assert!(st["complete"] == false, "{st}");
    // ...hydrated regions still read, and a cold read fails within --source-timeout.
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
    // The server comes back on the same port: the clone reconnects and finishes.
    let _k = nbdkit(f.dir.path(), &["file", &file], &at);
    d.ctl_ok("wait", &["--no-progress"]);
    let st = d.status_json();
    assert_eq!(st["complete"], true);
    assert_eq!(st["source"]["state"], "connected", "{st}");
    assert!(st["source"]["retries"].as_u64().unwrap() > 0, "{st}");
    let log = d.log_text();
    assert!(log.contains("NBD source reconnected"), "{log}");
    assert!(d.terminate().success());
    let mut expected = f.source_bytes();
    expected[..65536].fill(0x77);
    if let Some(diff) = first_difference(&c.dest_bytes(), &expected) {
        panic!("destination differs from source plus writes: {diff}");
    }
}

#[test]
fn a_server_that_comes_back_with_another_size_is_refused() {
    if !have_all() {
        return;
    }
    let f = Files::new(16 << 20, 25);
    let at = Listen::Unix(f.path("qemu.sock"));
    let q = qemu_nbd(&f.source, "golden", &at);
    let uri = at.uri("golden");
    let c = f.with_remote_source(&uri);
    let d = Daemon::start(&c, &["--hydration-rate-limit", "2m"]);
    wait_for(&d, "hydration does not progress", |st| {
        st["nr_hydrated"].as_u64().unwrap() >= 8
    });
    drop(q);
    // The export comes back larger.
    let bigger = f.path("bigger.img");
    let mut bytes = f.source_bytes();
    bytes.extend_from_slice(&[0u8; 1 << 20]);
    std::fs::write(&bigger, &bytes).unwrap();
    let _q = qemu_nbd(&bigger, "golden", &at);
    let st = wait_for(&d, "the change was not detected", |st| {
        st["source"]["state"] == "changed"
    });
    let last = st["source"]["last_error"].as_str().unwrap_or_default();
    assert!(
        last.contains("changed since the clone began") && last.contains("size"),
        "{last}"
    );
    assert!(d.log_text().contains("changed since the clone began"));
    let n = st["nr_hydrated"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(d.status_json()["nr_hydrated"].as_u64().unwrap(), n);
    let cold = run_status(
        "qemu-io",
        &["-f", "raw", &d.unix_uri(), "-c", "read 15m 4k"],
    );
    let out =
        String::from_utf8_lossy(&cold.stdout).into_owned() + &String::from_utf8_lossy(&cold.stderr);
    assert!(out.contains("Input/output error"), "{out}");
    assert!(d.terminate().success(), "stop must still commit and exit 0");
    // A restart on the changed export is refused.
    let out = clonebd(&[
        "run",
        "--source",
        &uri,
        "--dest",
        c.dest.to_str().unwrap(),
        "--metadata",
        c.meta.to_str().unwrap(),
        "--region-size",
        "64k",
        "--size",
        "16m",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "restart on a changed source started:\n{err}"
    );
    assert!(
        err.contains(&format!(
            "clonebd: source {uri}: changed since the clone began (its size was"
        )),
        "{err}"
    );
}

#[test]
fn a_clone_over_tls_verifies_the_server_and_ends_equal() {
    if !have_all() || !need("openssl") {
        return;
    }
    let f = Files::new(8 << 20, 27);
    let pki = f.path("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let certs = make_certs(&pki);
    // nbdkit's names for them.
    std::fs::copy(&certs.ca, pki.join("ca-cert.pem")).unwrap();
    std::fs::copy(&certs.server_cert, pki.join("server-cert.pem")).unwrap();
    std::fs::copy(&certs.server_key, pki.join("server-key.pem")).unwrap();
    let at = Listen::tcp();
    let file = format!("file={}", f.source.display());
    let tls_dir = format!("--tls-certificates={}", pki.display());
    let _k = nbdkit(
        f.dir.path(),
        &["--tls=require", &tls_dir, "file", &file],
        &at,
    );
    let Listen::Tcp(port) = at else {
        unreachable!("a TCP server")
    };
    let uri = format!("nbds://127.0.0.1:{port}/");
    let g = Files::new(f.size, 0);
    let start = |source: &str, extra: &[&str]| {
        let mut args = vec![
            "run",
            "--source",
            source,
            "--dest",
            g.dest.to_str().unwrap(),
            "--metadata",
            g.meta.to_str().unwrap(),
            "--create",
        ];
        args.extend_from_slice(extra);
        let out = clonebd(&args);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Without the CA, the server's certificate does not verify: refused at once.
    let err = start(&uri, &[]);
    assert!(
        err.contains(&format!(
            "clonebd: source {uri}: TLS: invalid peer certificate"
        )),
        "{err}"
    );
    assert!(err.contains("--source-tls-ca"), "{err}");
    // Without TLS, the server says it needs it.
    let plain = at.uri("");
    let err = start(&plain, &[]);
    assert!(
        err.contains(&format!(
            "clonebd: source {plain}: the server requires TLS: use nbds://"
        )),
        "{err}"
    );
    assert!(!g.meta.exists(), "a refused start created the metadata");
    // With the CA: cloned, every byte right.
    let c = f.with_remote_source(&uri);
    let ca = certs.ca.to_str().unwrap();
    let d = Daemon::start(&c, &["--source-tls-ca", ca]);
    assert_eq!(d.status_json()["source"]["state"], "connected");
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
    d.ctl_ok("wait", &["--no-progress"]);
    assert!(d.terminate().success());
    if let Some(diff) = first_difference(&c.dest_bytes(), &f.source_bytes()) {
        panic!("destination differs from the source: {diff}");
    }
    // Over a unix socket, the certificate is checked for localhost.
    let at = Listen::Unix(f.path("tls.sock"));
    let _u = nbdkit(
        f.dir.path(),
        &["--tls=require", &tls_dir, "file", &file],
        &at,
    );
    let Listen::Unix(sock) = &at else {
        unreachable!("a unix socket")
    };
    let uri = format!("nbds+unix:///?socket={}", sock.display());
    let c = f.with_remote_source(&uri);
    let d = Daemon::start(&c, &["--source-tls-ca", ca]);
    d.ctl_ok("wait", &["--no-progress"]);
    assert!(d.terminate().success());
    if let Some(diff) = first_difference(&c.dest_bytes(), &f.source_bytes()) {
        panic!("destination differs from the source over nbds+unix: {diff}");
    }
}

#[test]
fn qemu_nbd_over_tls_that_verifies_clients_takes_the_clone_only_with_its_certificate() {
    if !have_all() || !need("openssl") {
        return;
    }
    let f = Files::new(4 << 20, 29);
    let pki = f.path("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let certs = make_certs(&pki);
    // qemu's names for them; tls-creds-x509 verifies clients (verify-peer) by default.
    std::fs::copy(&certs.ca, pki.join("ca-cert.pem")).unwrap();
    std::fs::copy(&certs.server_cert, pki.join("server-cert.pem")).unwrap();
    std::fs::copy(&certs.server_key, pki.join("server-key.pem")).unwrap();
    let at = Listen::tcp();
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
        pki.display()
    );
    let _q = qemu_nbd_with(
        &f.source,
        "golden",
        &at,
        0,
        &["--object", &object, "--tls-creds", "tls0"],
    );
    let Listen::Tcp(port) = at else {
        unreachable!("a TCP server")
    };
    let uri = format!("nbds://127.0.0.1:{port}/golden");
    let ca = certs.ca.to_str().unwrap();
    // Without a client certificate, the server ends the handshake: refused at start.
    let g = Files::new(f.size, 0);
    let out = clonebd(&[
        "run",
        "--create",
        "--source",
        &uri,
        "--dest",
        g.dest.to_str().unwrap(),
        "--metadata",
        g.meta.to_str().unwrap(),
        "--source-tls-ca",
        ca,
        "--source-timeout",
        "3",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a start without a client certificate succeeded"
    );
    assert!(err.contains(&format!("clonebd: source {uri}:")), "{err}");
    assert!(!g.meta.exists(), "a refused start created the metadata");
    // A key that is not a key: named by its flag.
    let out = clonebd(&[
        "run",
        "--create",
        "--source",
        &uri,
        "--dest",
        g.dest.to_str().unwrap(),
        "--metadata",
        g.meta.to_str().unwrap(),
        "--source-tls-ca",
        ca,
        "--source-tls-cert",
        certs.client_cert.to_str().unwrap(),
        "--source-tls-key",
        ca,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("clonebd: --source-tls-key {ca}:")),
        "{err}"
    );
    // With it: cloned, every byte right.
    let c = f.with_remote_source(&uri);
    let d = Daemon::start(
        &c,
        &[
            "--source-tls-ca",
            ca,
            "--source-tls-cert",
            certs.client_cert.to_str().unwrap(),
            "--source-tls-key",
            certs.client_key.to_str().unwrap(),
        ],
    );
    assert_eq!(d.status_json()["source"]["state"], "connected");
    d.ctl_ok("wait", &["--no-progress"]);
    assert!(d.terminate().success());
    if let Some(diff) = first_difference(&c.dest_bytes(), &f.source_bytes()) {
        panic!("destination differs from the source: {diff}");
    }
}
