//! Real servers the remote-source tests start on 127.0.0.1 and stop when dropped: nginx
//! (from `nginx-light`, in the foreground, with a configuration the test writes) serving a
//! directory with byte ranges and ETags, moto's S3 server with authentication on, and NBD
//! servers: qemu-nbd and nbdkit (with any plugin and filters), on a unix socket or a TCP
//! port, which a test may kill and start again on the same socket or port.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::daemon::free_port;

/// A server process, killed on drop.
pub struct Server {
    child: Child,
    /// Its port on 127.0.0.1 (0 for a server on a unix socket).
    pub port: u16,
    /// Its unix socket, for a server on one.
    pub socket: Option<PathBuf>,
    /// Its log.
    pub log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn wait_for_port(child: &mut Child, port: u16, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "server exited with {st}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "server not listening on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a program is on PATH (under CI it must be: a missing one fails).
pub fn need(program: &str) -> bool {
    super::daemon::have(program)
}

/// nginx serving `root` on a free port of 127.0.0.1; `extra` goes into its `server` block.
pub fn nginx(root: &Path, extra: &str) -> Server {
    nginx_with(root, extra, None, free_port())
}

/// nginx serving `root` on `port` of 127.0.0.1 (to start one again where one was).
pub fn nginx_on(root: &Path, port: u16) -> Server {
    nginx_with(root, "", None, port)
}

/// nginx serving `root` over HTTPS with this certificate chain and key.
pub fn nginx_tls(root: &Path, certs: &Certs) -> Server {
    nginx_with(root, "", Some(certs), free_port())
}

fn nginx_with(root: &Path, extra: &str, tls: Option<&Certs>, port: u16) -> Server {
    let dir = root.join(format!(".nginx-{}", free_port()));
    std::fs::create_dir_all(&dir).expect("nginx dir");
    let log = dir.join("error.log");
    let conf = dir.join("nginx.conf");
    let (ssl, ssl_conf) = match tls {
        Some(c) => (
            " ssl",
            format!(
                "ssl_certificate {};\n    ssl_certificate_key {};\n",
                c.server_cert.display(),
                c.server_key.display()
            ),
        ),
        None => ("", String::new()),
    };
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  keepalive_requests 100000;\n  server {{\n    listen 127.0.0.1:{port}{ssl};\n    {ssl_conf}    root {r};\n    {extra}\n  }}\n}}\n",
            d = dir.display(),
            r = root.display(),
        ),
    )
    .expect("nginx.conf");
    let mut child = Command::new("nginx")
        .args(["-e", &log.display().to_string(), "-p"])
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    wait_for_port(&mut child, port, &log);
    Server {
        child,
        port,
        socket: None,
        log,
    }
}

/// Where an NBD server listens.
#[derive(Debug, Clone)]
pub enum Listen {
    /// A TCP port on 127.0.0.1.
    Tcp(u16),
    /// A unix socket.
    Unix(PathBuf),
}

impl Listen {
    /// A free TCP port.
    pub fn tcp() -> Self {
        Listen::Tcp(free_port())
    }

    /// The NBD URI of `export` here.
    pub fn uri(&self, export: &str) -> String {
        match self {
            Listen::Tcp(p) => format!("nbd://127.0.0.1:{p}/{export}"),
            Listen::Unix(s) => format!("nbd+unix:///{export}?socket={}", s.display()),
        }
    }
}

fn spawn_nbd(program: &str, args: &[String], at: &Listen, log: PathBuf) -> Server {
    if let Listen::Unix(s) = at {
        let _ = std::fs::remove_file(s);
    }
    let out = std::fs::File::create(&log).expect("server log");
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("start {program}: {e}"));
    match at {
        Listen::Tcp(port) => {
            wait_for_port(&mut child, *port, &log);
            Server {
                child,
                port: *port,
                socket: None,
                log,
            }
        }
        Listen::Unix(sock) => {
            let deadline = Instant::now() + Duration::from_secs(30);
            while std::os::unix::net::UnixStream::connect(sock).is_err() {
                if let Ok(Some(st)) = child.try_wait() {
                    panic!(
                        "{program} exited with {st}:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "{program} not listening on {sock:?}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Server {
                child,
                port: 0,
                socket: Some(sock.clone()),
                log,
            }
        }
    }
}

/// qemu-nbd serving `image` read-only as `export`, to many clients at once.
pub fn qemu_nbd(image: &Path, export: &str, at: &Listen) -> Server {
    qemu_nbd_shared(image, export, at, 0)
}

/// qemu-nbd serving `image` read-only as `export` to `shared` clients at once (0: any
/// number; qemu-nbd's own default is 1).
pub fn qemu_nbd_shared(image: &Path, export: &str, at: &Listen, shared: u32) -> Server {
    qemu_nbd_with(image, export, at, shared, &[])
}

/// qemu-nbd as [`qemu_nbd_shared`], with `extra` arguments first (`--object`, `--tls-creds`).
pub fn qemu_nbd_with(
    image: &Path,
    export: &str,
    at: &Listen,
    shared: u32,
    extra: &[&str],
) -> Server {
    let mut args: Vec<String> = extra.iter().map(|w| w.to_string()).collect();
    args.extend::<Vec<String>>(vec![
        "-f".into(),
        "raw".into(),
        "-r".into(),
        "--persistent".into(),
        format!("--shared={shared}"),
        "-x".into(),
        export.into(),
    ]);
    match at {
        Listen::Tcp(p) => {
            args.extend(["-b".into(), "127.0.0.1".into(), "-p".into(), p.to_string()])
        }
        Listen::Unix(s) => args.extend(["-k".into(), s.display().to_string()]),
    }
    args.push(image.display().to_string());
    let log = image.with_extension(format!("qemu-nbd.{}.log", free_port()));
    spawn_nbd("qemu-nbd", &args, at, log)
}

/// nbdkit in the foreground, read-only, with `words` (filters, the plugin and its
/// parameters, as on nbdkit's command line).
pub fn nbdkit(dir: &Path, words: &[&str], at: &Listen) -> Server {
    let mut args: Vec<String> = vec!["-f".into(), "-r".into()];
    match at {
        Listen::Tcp(p) => {
            args.extend(["-i".into(), "127.0.0.1".into(), "-p".into(), p.to_string()])
        }
        Listen::Unix(s) => args.extend(["-U".into(), s.display().to_string()]),
    }
    args.extend(words.iter().map(|w| w.to_string()));
    let log = dir.join(format!("nbdkit.{}.log", free_port()));
    spawn_nbd("nbdkit", &args, at, log)
}

/// moto's S3 server (`moto_server`, from `moto[server]` in a virtualenv: the program
/// `CLONEBD_MOTO_SERVER` names, else the first on PATH) with authentication on: an IAM user that may do anything, whose keys are
/// [`key_id`](Moto::key_id) and [`secret`](Moto::secret). Requests signed with other keys
/// are refused (403), as AWS refuses them.
pub struct Moto {
    /// The server.
    pub server: Server,
    /// The access key id.
    pub key_id: String,
    /// The secret access key.
    pub secret: String,
    python: PathBuf,
}

/// Requests moto serves without authentication before it checks every one: the three that
/// make the user (create it, give it a policy, give it keys).
const MOTO_SETUP_ACTIONS: u32 = 3;

impl Moto {
    /// Starts moto on a free port in `dir`.
    pub fn start(dir: &Path) -> Moto {
        let program = moto_server().expect("moto_server");
        let python = program
            .parent()
            .map(|d| d.join("python3"))
            .filter(|p| p.exists())
            .expect("moto_server's virtualenv has no python3 beside it");
        let port = free_port();
        let log = dir.join(format!("moto-{port}.log"));
        let mut child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env(
                "INITIAL_NO_AUTH_ACTION_COUNT",
                MOTO_SETUP_ACTIONS.to_string(),
            )
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("moto log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        wait_for_port(&mut child, port, &log);
        let mut m = Moto {
            server: Server {
                child,
                port,
                socket: None,
                log,
            },
            key_id: String::new(),
            secret: String::new(),
            python,
        };
        let keys = m.python(
            "import json\n\
             iam = boto3.client('iam', endpoint_url=ep, region_name='us-east-1',\n\
                 aws_access_key_id='AKIAIOSFODNN7EXAMPLE', aws_secret_access_key='setup')\n\
             iam.create_user(UserName='clonebd')\n\
             iam.put_user_policy(UserName='clonebd', PolicyName='all', PolicyDocument=json.dumps(\n\
                 {'Version': '2012-10-17', 'Statement': [{'Effect': 'Allow', 'Action': '*', 'Resource': '*'}]}))\n\
             k = iam.create_access_key(UserName='clonebd')['AccessKey']\n\
             print(k['AccessKeyId'], k['SecretAccessKey'])\n",
        );
        let mut words = keys.split_whitespace();
        m.key_id = words.next().expect("access key id").to_string();
        m.secret = words.next().expect("secret").to_string();
        m
    }

    /// `AWS_ENDPOINT_URL` for it.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.server.port)
    }

    /// The AWS settings of a client of it with its keys.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_CONFIG_FILE", "/nonexistent".to_string()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent".to_string()),
        ]
    }

    /// Runs `code` in moto's virtualenv, with `boto3` imported, `ep` the endpoint, and `s3`
    /// a client signed with the user's keys (when it has them); returns what it printed.
    pub fn python(&self, code: &str) -> String {
        let prelude = format!(
            "import boto3, sys\nep = '{}'\ns3 = boto3.client('s3', endpoint_url=ep, region_name='us-east-1', aws_access_key_id='{}', aws_secret_access_key='{}')\n",
            self.endpoint(),
            if self.key_id.is_empty() {
                "none"
            } else {
                &self.key_id
            },
            if self.secret.is_empty() {
                "none"
            } else {
                &self.secret
            },
        );
        let out = Command::new(&self.python)
            .arg("-c")
            .arg(format!("{prelude}{code}"))
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "python failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.server.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The first `program` on PATH.
pub use clonebd_testkit::machine::which;

/// The moto server program: `CLONEBD_MOTO_SERVER`, else `moto_server` on PATH. Under CI it
/// must be there.
pub fn moto_server() -> Option<PathBuf> {
    let found = std::env::var_os("CLONEBD_MOTO_SERVER")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .or_else(|| which("moto_server"));
    if found.is_none() {
        clonebd_testkit::machine::skip(
            "moto_server is not installed (CLONEBD_MOTO_SERVER, PATH; pip install 'moto[server]' in a virtualenv)",
        );
    }
    found
}

/// A certificate authority made for a test, a server certificate it signed for 127.0.0.1
/// (and `localhost`), and a client certificate it signed, made by `openssl`.
pub struct Certs {
    /// The CA's certificate (PEM): what a client trusts.
    pub ca: PathBuf,
    /// The server's certificate (PEM), signed by the CA.
    pub server_cert: PathBuf,
    /// The server's private key (PEM).
    pub server_key: PathBuf,
    /// A client's certificate (PEM), signed by the CA, for servers that ask for one.
    pub client_cert: PathBuf,
    /// The client's private key (PEM).
    pub client_key: PathBuf,
}

/// Makes a CA, a server certificate and a client certificate in `dir`.
pub fn make_certs(dir: &Path) -> Certs {
    let p = |n: &str| dir.join(n).display().to_string();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .expect("ext file");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=clonebd test CA",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.pem"),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &p("server.key"),
        "-out",
        &p("server.csr"),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("server.csr"),
        "-CA",
        &p("ca.pem"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &p("server.ext"),
        "-out",
        &p("server.pem"),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=clonebd test client",
        "-keyout",
        &p("client.key"),
        "-out",
        &p("client.csr"),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("client.csr"),
        "-CA",
        &p("ca.pem"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &p("server.ext"),
        "-out",
        &p("client.pem"),
    ]);
    Certs {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    }
}
