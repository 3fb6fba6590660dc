//! Real servers the remote-source tests start on 127.0.0.1 and stop when dropped: nginx
//! (from `nginx-light`, in the foreground, with a configuration the test writes) serving a
//! directory with byte ranges and ETags, and moto's S3 server with authentication on.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::daemon::free_port;

/// A server process, killed on drop.
pub struct Server {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
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
    Server { child, port, log }
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
            server: Server { child, port, log },
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
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    })
}

/// The moto server program: `CLONEBD_MOTO_SERVER`, else `moto_server` on PATH. Under CI it
/// must be there.
pub fn moto_server() -> Option<PathBuf> {
    let found = std::env::var_os("CLONEBD_MOTO_SERVER")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .or_else(|| which("moto_server"));
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "moto_server is not installed (CLONEBD_MOTO_SERVER, PATH), and under CI no test may skip for it"
        );
        println!(
            "SKIPPED: moto_server is not installed (pip install 'moto[server]' in a virtualenv)"
        );
    }
    found
}

/// A certificate authority made for a test, and a server certificate it signed for
/// 127.0.0.1 (and `localhost`), made by `openssl`.
pub struct Certs {
    /// The CA's certificate (PEM): what a client trusts.
    pub ca: PathBuf,
    /// The server's certificate (PEM), signed by the CA.
    pub server_cert: PathBuf,
    /// The server's private key (PEM).
    pub server_key: PathBuf,
}

/// Makes a CA and a server certificate in `dir`.
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
    Certs {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
    }
}
