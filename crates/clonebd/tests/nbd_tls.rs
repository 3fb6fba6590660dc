//! `clonebd run --nbd-tls-cert/--nbd-tls-key [--nbd-tls-client-ca]`: the NBD exports require
//! TLS. Real TLS clients (nbdinfo through libnbd, qemu-img and qemu-io through qemu's
//! tls-creds-x509) read and write the clone; clients without TLS, and without a client
//! certificate when one is required, are refused; bad certificate files stop the start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::daemon::{Daemon, Files, clonebd, have, run, run_status};
use common::servers::{Certs, make_certs};

const SIZE: u64 = 8 << 20;

/// `NBD_REP_ERR_TLS_REQD`.
const ERR_TLS_REQD: u32 = (1 << 31) + 5;

/// The CA, server and client certificates, and two client directories with libnbd's and
/// qemu's names: `with_cert` (ca-cert.pem, client-cert.pem, client-key.pem) and `ca_only`.
struct Pki {
    certs: Certs,
    with_cert: PathBuf,
    ca_only: PathBuf,
}

fn pki(f: &Files) -> Pki {
    let dir = f.path("pki");
    std::fs::create_dir_all(&dir).unwrap();
    let certs = make_certs(&dir);
    let with_cert = f.path("client-with-cert");
    let ca_only = f.path("client-ca-only");
    for d in [&with_cert, &ca_only] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::copy(&certs.ca, d.join("ca-cert.pem")).unwrap();
    }
    std::fs::copy(&certs.client_cert, with_cert.join("client-cert.pem")).unwrap();
    std::fs::copy(&certs.client_key, with_cert.join("client-key.pem")).unwrap();
    Pki {
        certs,
        with_cert,
        ca_only,
    }
}

fn have_all() -> bool {
    have("nbdinfo") && have("qemu-img") && have("qemu-io") && have("openssl")
}

fn tls_args(p: &Pki) -> Vec<String> {
    vec![
        "--nbd-tls-cert".into(),
        p.certs.server_cert.display().to_string(),
        "--nbd-tls-key".into(),
        p.certs.server_key.display().to_string(),
    ]
}

fn start(f: &Files, args: &[String]) -> Daemon {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start(f, &args)
}

fn nbds_uri(d: &Daemon, dir: &Path) -> String {
    format!(
        "nbds://{}/clonebd?tls-certificates={}",
        d.tcp,
        dir.display()
    )
}

/// qemu's `--object` and `--image-opts` for the TLS export, with the client files in `dir`.
fn qemu_opts(d: &Daemon, dir: &Path) -> [String; 4] {
    [
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            dir.display()
        ),
        "--image-opts".into(),
        format!(
            "driver=nbd,host=127.0.0.1,port={},export=clonebd,tls-creds=tls0",
            d.tcp.port()
        ),
    ]
}

/// `qemu-img compare` of the export against `file`; the command's output.
fn qemu_compare(d: &Daemon, dir: &Path, file: &Path) -> std::process::Output {
    let [o, creds, io, img] = qemu_opts(d, dir);
    let other = format!("driver=file,filename={}", file.display());
    run_status(
        "qemu-img",
        &["compare", &o, &creds, io.as_str(), &img, &other],
    )
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn tls_export_is_read_and_written_by_nbdinfo_qemu_img_and_qemu_io() {
    if !have_all() {
        return;
    }
    let f = Files::new(SIZE, 41);
    let p = pki(&f);
    let d = start(&f, &tls_args(&p));
    let info = run("nbdinfo", &["--size", &nbds_uri(&d, &p.ca_only)]);
    assert_eq!(info.trim(), SIZE.to_string());
    let out = qemu_compare(&d, &p.ca_only, &f.source);
    assert!(out.status.success(), "qemu-img compare: {}", text(&out));
    // A write over TLS, read back over TLS, then the whole export against the source with
    // it.
    let [o, creds, io, img] = qemu_opts(&d, &p.ca_only);
    let out = run(
        "qemu-io",
        &[
            &o,
            &creds,
            &io,
            &img,
            "-c",
            "write -P 0xab 1m 192k",
            "-c",
            "read -P 0xab 1m 192k",
        ],
    );
    assert!(
        out.contains("read 196608/196608") && !out.contains("failed"),
        "qemu-io: {out}"
    );
    let mut expected = f.source_bytes();
    expected[1 << 20..(1 << 20) + (192 << 10)].fill(0xab);
    let exp = f.path("expected.img");
    std::fs::write(&exp, &expected).unwrap();
    let out = qemu_compare(&d, &p.ca_only, &exp);
    assert!(
        out.status.success(),
        "qemu-img compare after write: {}",
        text(&out)
    );
    let out = qemu_compare(&d, &p.ca_only, &f.source);
    assert!(!out.status.success(), "the write is not in the export");
    d.terminate();
}

#[test]
fn plain_clients_are_refused_with_tls_required() {
    if !have_all() {
        return;
    }
    let f = Files::new(SIZE, 42);
    let p = pki(&f);
    let d = start(&f, &tls_args(&p));
    let out = run_status("nbdinfo", &[&d.tcp_uri()]);
    assert!(!out.status.success(), "nbdinfo without TLS: {}", text(&out));
    let out = run_status("nbdinfo", &[&d.unix_uri()]);
    assert!(
        !out.status.success(),
        "nbdinfo on unix without TLS: {}",
        text(&out)
    );
    let out = run_status("qemu-img", &["info", "-f", "raw", &d.tcp_uri()]);
    assert!(
        !out.status.success(),
        "qemu-img without TLS: {}",
        text(&out)
    );

    // What the server answers, byte by byte: NBD_OPT_GO before TLS gets
    // NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME closes the connection.
    let mut s = TcpStream::connect(d.tcp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let option = |ty: u32, data: &[u8]| {
        let mut o = b"IHAVEOPT".to_vec();
        o.extend_from_slice(&ty.to_be_bytes());
        o.extend_from_slice(&(data.len() as u32).to_be_bytes());
        o.extend_from_slice(data);
        o
    };
    // NBD_OPT_GO (7): name "clonebd", no information requests.
    let mut go = 7u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"clonebd");
    go.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&option(7, &go)).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_be_bytes(reply[8..12].try_into().unwrap()), 7);
    assert_eq!(
        u32::from_be_bytes(reply[12..16].try_into().unwrap()),
        ERR_TLS_REQD
    );
    let len = u32::from_be_bytes(reply[16..20].try_into().unwrap()) as usize;
    let mut message = vec![0u8; len];
    s.read_exact(&mut message).unwrap();
    // NBD_OPT_EXPORT_NAME (1): the server cannot answer it, and closes.
    s.write_all(&option(1, b"clonebd")).unwrap();
    let mut rest = Vec::new();
    let n = s.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "the server sent {rest:?} after NBD_OPT_EXPORT_NAME");
    d.terminate();
}

#[test]
fn client_ca_admits_a_signed_client_certificate_and_refuses_none() {
    if !have_all() {
        return;
    }
    let f = Files::new(SIZE, 43);
    let p = pki(&f);
    let mut args = tls_args(&p);
    args.push("--nbd-tls-client-ca".into());
    args.push(p.certs.ca.display().to_string());
    let d = start(&f, &args);
    let info = run("nbdinfo", &["--size", &nbds_uri(&d, &p.with_cert)]);
    assert_eq!(info.trim(), SIZE.to_string());
    let out = qemu_compare(&d, &p.with_cert, &f.source);
    assert!(
        out.status.success(),
        "qemu-img with a client certificate: {}",
        text(&out)
    );
    let out = run_status("nbdinfo", &["--size", &nbds_uri(&d, &p.ca_only)]);
    assert!(
        !out.status.success(),
        "nbdinfo without a client certificate: {}",
        text(&out)
    );
    let out = qemu_compare(&d, &p.ca_only, &f.source);
    assert!(
        !out.status.success(),
        "qemu-img without a client certificate: {}",
        text(&out)
    );
    assert!(
        d.log_text().contains("TLS handshake failed"),
        "{}",
        d.log_text()
    );
    d.terminate();
}

#[test]
fn bad_certificate_or_key_files_stop_the_start_naming_flag_and_file() {
    if !have("openssl") {
        return;
    }
    let f = Files::new(1 << 20, 44);
    let p = pki(&f);
    let missing = f.path("missing.pem").display().to_string();
    let cert = p.certs.server_cert.display().to_string();
    let key = p.certs.server_key.display().to_string();
    let tcp = format!("127.0.0.1:{}", common::daemon::free_port());
    let cases: [(&[&str], &str, &str); 4] = [
        (
            &["--nbd-tls-cert", &missing, "--nbd-tls-key", &key],
            "--nbd-tls-cert",
            &missing,
        ),
        (
            &["--nbd-tls-cert", &cert, "--nbd-tls-key", &missing],
            "--nbd-tls-key",
            &missing,
        ),
        // A certificate where the key should be: no private key in it.
        (
            &["--nbd-tls-cert", &cert, "--nbd-tls-key", &cert],
            "--nbd-tls-key",
            &cert,
        ),
        (
            &[
                "--nbd-tls-cert",
                &cert,
                "--nbd-tls-key",
                &key,
                "--nbd-tls-client-ca",
                &missing,
            ],
            "--nbd-tls-client-ca",
            &missing,
        ),
    ];
    for (tls, flag, path) in cases {
        let mut args = vec![
            "run",
            "--create",
            "--source",
            f.source.to_str().unwrap(),
            "--dest",
            f.dest.to_str().unwrap(),
            "--metadata",
            f.meta.to_str().unwrap(),
            "--nbd-tcp",
            &tcp,
        ];
        args.extend_from_slice(tls);
        let out = clonebd(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{tls:?} started");
        assert!(
            err.contains(&format!("{flag} {path}")),
            "{tls:?}: the error does not name {flag} {path}: {err}"
        );
        assert!(!f.meta.exists(), "{tls:?}: metadata was written");
    }
    // The key flag alone is refused by the parser.
    let out = clonebd(&["run", "--nbd-tls-key", &key, "--nbd-tcp", &tcp]);
    assert!(!out.status.success());
}

#[test]
fn our_client_reads_the_tls_export_over_the_unix_socket() {
    if !have("openssl") {
        return;
    }
    let f = Files::new(SIZE, 45);
    let p = pki(&f);
    let d = start(&f, &tls_args(&p));
    let config = clonebd_remote::tls::config(Some(&p.certs.ca), None).unwrap();
    let mut opts = clonebd_nbd::ClientOptions::new("clonebd");
    opts.timeout = Some(Duration::from_secs(10));
    opts.starttls = Some(clonebd_nbd::StartTls(std::sync::Arc::new(move |socket| {
        clonebd_remote::tls::relay(socket, &config, "localhost", Duration::from_secs(10))
    })));
    let mut c = opts.connect_unix(&d.socket).unwrap();
    assert_eq!(c.size(), SIZE);
    let mut buf = vec![0u8; 1 << 20];
    c.read(3 << 20, &mut buf).unwrap();
    assert!(
        buf == f.source_bytes()[3 << 20..4 << 20],
        "data read differs"
    );
    // Without TLS the same socket refuses the export.
    let err = clonebd_nbd::ClientOptions::new("clonebd")
        .connect_unix(&d.socket)
        .expect_err("a plain client was served");
    assert!(
        matches!(&err, clonebd_nbd::ClientError::OptionRefused { reply, .. } if *reply == ERR_TLS_REQD),
        "{err}"
    );
    d.terminate();
}

#[test]
fn the_handshake_deadline_covers_the_tls_handshake() {
    if !have("openssl") {
        return;
    }
    let f = Files::new(SIZE, 46);
    let p = pki(&f);
    let mut args = tls_args(&p);
    args.extend(["--nbd-handshake-timeout".to_string(), "1".to_string()]);
    let d = start(&f, &args);
    let mut s = TcpStream::connect(d.tcp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    // NBD_OPT_STARTTLS (5), acknowledged; then no TLS handshake at all.
    let mut o = b"IHAVEOPT".to_vec();
    o.extend_from_slice(&5u32.to_be_bytes());
    o.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&o).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_be_bytes(reply[12..16].try_into().unwrap()), 1);
    let t = std::time::Instant::now();
    let mut b = [0u8; 1];
    let r = s.read(&mut b);
    assert!(
        matches!(r, Ok(0))
            || matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{r:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "closed after {:?}",
        t.elapsed()
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        d.log_text().contains("handshake deadline passed"),
        "{}",
        d.log_text()
    );
    d.terminate();
}

/// The fixed newstyle greeting and client flags, then `NBD_OPT_STARTTLS` and its
/// `NBD_REP_ACK`, on `s`.
fn starttls_raw(s: &mut TcpStream) {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut o = b"IHAVEOPT".to_vec();
    o.extend_from_slice(&5u32.to_be_bytes());
    o.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&o).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_be_bytes(reply[12..16].try_into().unwrap()), 1);
}

#[test]
fn the_payload_deadline_closes_a_tls_client_that_stops_mid_write() {
    if !have("openssl") {
        return;
    }
    let f = Files::new(SIZE, 47);
    let p = pki(&f);
    let mut args = tls_args(&p);
    args.extend(["--nbd-payload-timeout".to_string(), "1".to_string()]);
    let d = start(&f, &args);
    let mut s = TcpStream::connect(d.tcp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    starttls_raw(&mut s);
    let config = clonebd_remote::tls::config(Some(&p.certs.ca), None).unwrap();
    let mut plain = clonebd_remote::tls::relay(
        clonebd_nbd::Socket::Tcp(s),
        &config,
        "127.0.0.1",
        Duration::from_secs(10),
    )
    .unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // NBD_OPT_GO over TLS, replies up to NBD_REP_ACK.
    let mut go = b"IHAVEOPT".to_vec();
    go.extend_from_slice(&7u32.to_be_bytes());
    go.extend_from_slice(&13u32.to_be_bytes());
    go.extend_from_slice(&7u32.to_be_bytes());
    go.extend_from_slice(b"clonebd");
    go.extend_from_slice(&0u16.to_be_bytes());
    plain.write_all(&go).unwrap();
    loop {
        let mut h = [0u8; 20];
        plain.read_exact(&mut h).unwrap();
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut data = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        plain.read_exact(&mut data).unwrap();
        assert!(
            ty < 1 << 31,
            "NBD_OPT_GO over TLS refused: {ty:#x} {data:?}"
        );
        if ty == 1 {
            break;
        }
    }
    // A read first shows the transmission phase works over TLS.
    let request = |ty: u16, cookie: u64, offset: u64, len: u32| {
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&ty.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r
    };
    plain.write_all(&request(0, 1, 4096, 4096)).unwrap();
    let mut reply = vec![0u8; 16 + 4096];
    plain.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[4..8], &0u32.to_be_bytes(), "read error");
    assert!(reply[16..] == f.source_bytes()[4096..8192]);
    // A write of 64 KiB with 100 bytes of its payload, then nothing.
    plain.write_all(&request(1, 2, 0, 65536)).unwrap();
    plain.write_all(&[7u8; 100]).unwrap();
    let t = std::time::Instant::now();
    let mut b = [0u8; 64];
    let r = plain.read(&mut b);
    assert!(matches!(r, Ok(0)), "{r:?}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "closed after {:?}",
        t.elapsed()
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        d.log_text()
            .contains("write payload not received within the payload deadline"),
        "{}",
        d.log_text()
    );
    d.terminate();
}
