//! Running under systemd:
//! - `Type=notify`: with NOTIFY_SOCKET on a datagram socket the test owns, clonebd sends
//!   READY=1 only once its NBD socket accepts, STATUS= lines with the progress (and once
//!   finalized, that it is), WATCHDOG=1 when WATCHDOG_USEC asks for it, and STOPPING=1 on
//!   SIGTERM (then exits 0);
//! - `--config FILE` gives the same clone as the flags; a bad key or value is refused naming
//!   it;
//! - contrib/systemd/clonebd@.service passes `systemd-analyze verify`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{CLONEBD, Daemon, Files, clonebd, have, run};

/// The notifications received within `timeout`, each as its text, until `until` matches one.
fn receive_until(sock: &UnixDatagram, timeout: Duration, until: &str) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        if let Ok(n) = sock.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = text.lines().any(|l| l == until);
            got.push(text);
            if done {
                return got;
            }
        }
    }
    panic!("no {until} within {timeout:?}; got {got:?}");
}

#[test]
fn notify_says_ready_once_the_export_serves_then_status_watchdog_and_stopping() {
    if !have("nbdinfo") {
        return;
    }
    let f = Files::new(8 << 20, 31);
    let path = f.path("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind notify socket");
    let notify = path.to_str().unwrap().to_string();
    // The daemon starts on another thread; READY=1 is read here as it comes.
    let starter = std::thread::spawn(move || {
        let env = [
            ("NOTIFY_SOCKET", notify.as_str()),
            ("WATCHDOG_USEC", "400000"),
        ];
        let d = Daemon::start_with_env(&f, "64k", &["--no-hydration"], &env);
        (d, f)
    });
    let got = receive_until(&sock, Duration::from_secs(30), "READY=1");
    // At READY=1 the NBD socket accepts and serves.
    let (d, files) = starter.join().expect("daemon started");
    let ready = got.last().unwrap();
    assert!(
        ready.contains("STATUS=hydrated 0 of 128 regions (0.0%)"),
        "{ready}"
    );
    UnixStream::connect(&d.socket).expect("the NBD socket accepts at READY=1");
    let info = run("nbdinfo", &["--size", &d.unix_uri()]);
    assert_eq!(info.trim(), (8u64 << 20).to_string());
    // Progress and the watchdog, at half WATCHDOG_USEC.
    let more = receive_until(&sock, Duration::from_secs(10), "WATCHDOG=1");
    assert!(
        more.iter().any(|m| m.contains("STATUS=hydrated")),
        "{more:?}"
    );
    d.ctl_ok("message", &["enable_hydration"]);
    let done = receive_until(
        &sock,
        Duration::from_secs(60),
        "STATUS=hydrated: all 128 regions",
    );
    assert!(!done.is_empty());
    // Once finalized, the status says so.
    d.ctl_ok("finalize", &["--no-wait"]);
    let finalized = receive_until(
        &sock,
        Duration::from_secs(30),
        "STATUS=finalized: all 128 regions hydrated, the source detached",
    );
    assert!(!finalized.is_empty());
    // SIGTERM: STOPPING=1, then a clean exit.
    let stopper = std::thread::spawn(move || d.terminate());
    let stop = receive_until(&sock, Duration::from_secs(30), "STOPPING=1");
    assert!(!stop.is_empty());
    assert!(stopper.join().expect("stopped").success());
    drop(files);
}

fn start_with_config(config: &Path, log: &Path) -> std::process::Child {
    Command::new(CLONEBD)
        .args(["run", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("spawn clonebd run --config")
}

#[test]
fn a_config_file_gives_the_same_clone_as_the_flags_and_bad_keys_are_refused() {
    let f = Files::new(4 << 20, 32);
    let flags = [
        "--no-hydration",
        "--hydration-threshold",
        "64",
        "--no-discard-passdown",
    ];
    let d = Daemon::start(&f, &flags);
    let by_flags = d.ctl_ok("table", &[]);
    assert!(d.terminate().success());
    let ctl = f.path("cfg.ctl");
    let config = f.path("clone.toml");
    std::fs::write(
        &config,
        format!(
            "# the same clone, from a file\nsource = \"{}\"\ndest = \"{}\"\nmetadata = \"{}\"\nregion-size = \"64k\"\nno-hydration = true\nhydration_threshold = 64\nno-discard-passdown = true\ncontrol = \"{}\"\n",
            f.source.display(),
            f.dest.display(),
            f.meta.display(),
            ctl.display()
        ),
    )
    .expect("config");
    let log = f.path("cfg.log");
    let mut child = start_with_config(&config, &log);
    let deadline = Instant::now() + Duration::from_secs(30);
    let by_file = loop {
        let out = clonebd(&["table", "--control", ctl.to_str().unwrap()]);
        if out.status.success() {
            break String::from_utf8(out.stdout).expect("utf-8");
        }
        assert!(
            Instant::now() < deadline && child.try_wait().expect("wait").is_none(),
            "clonebd run --config did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(by_file, by_flags);
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    assert!(child.wait().expect("exit").success());
    // A misspelt key, and a bad value: refused naming the file and the key; nothing starts.
    for (text, says) in [
        (
            "hydration-treshold = 64\n",
            "unknown key `hydration-treshold`",
        ),
        (
            "hydration-threshold = \"lots\"\n",
            "invalid value 'lots' for '--hydration-threshold <N>'",
        ),
        (
            "no-hydration = 1\n",
            "`no-hydration`: a switch: write true or false",
        ),
    ] {
        std::fs::write(&config, text).expect("config");
        let out = clonebd(&["run", "--config", config.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.starts_with(&format!("clonebd: config {}: ", config.display()))
                && err.contains(says),
            "{err}"
        );
    }
}

#[test]
fn the_systemd_unit_verifies() {
    if !have("systemd-analyze") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../contrib/systemd/clonebd@.service"
    ))
    .expect("unit file");
    assert!(unit.contains("Type=notify") && unit.contains("KillSignal=SIGTERM"));
    assert!(unit.contains("OOMScoreAdjust=-1000"));
    // The instance as installed, with this build's binary where /usr/bin/clonebd would be.
    let here = unit.replace("/usr/bin/clonebd", CLONEBD);
    let instance = dir.path().join("clonebd@test.service");
    std::fs::write(&instance, here).expect("instance");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&instance)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .expect("systemd-analyze");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    // systemd only warns about a setting it cannot parse: a warning is a failure here.
    assert!(
        !said.contains("ignoring") && !said.contains("Unknown"),
        "{said}"
    );
}
