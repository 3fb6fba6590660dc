//! A raw image at an HTTP(S) URL, or an S3 object, as a read-only block device.
//!
//! Opening sends a `HEAD` (the size from `Content-Length`; the identity from a strong
//! `ETag`, or `Last-Modified`, and on S3 `x-amz-version-id`) and one ranged `GET` of the
//! first byte: a server that answers it with the whole object (200) does not serve byte
//! ranges and is refused with an error saying so. Reads are ranged `GET`s on a pool of
//! keep-alive connections; each carries the pinned identity (`If-Match` with the ETag, or
//! `If-Unmodified-Since`, and `versionId`), and each response is checked to be the range
//! asked for of an object of the pinned size (`Content-Range`) and ETag. A `412`, a `416`,
//! or a response of another size or ETag means the source changed since the clone began:
//! the source is marked changed, and that read and every later one fails with EIO (the
//! hydrated regions keep serving from the destination). Transient failures are retried by
//! [`crate::retry::Policy`].

use std::io::{self, Read};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use clonebd_core::{BlockDev, Caps};
use thiserror::Error;
use ureq::Agent;
use ureq::tls::{Certificate, RootCerts, TlsConfig};
use url::Url;

use crate::SourceIdentity;
use crate::retry::{Failure, Policy, request, retry_after};
use crate::s3::S3Object;
use crate::stats::{SourceState, SourceStats};
use crate::uri::redact;

/// How a remote HTTP or S3 source is reached.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Retries and the deadline of every request (`--source-timeout`).
    pub policy: Policy,
    /// Connect timeout of each attempt.
    pub connect_timeout: Duration,
    /// Time limit of each attempt (connect, request, the whole body).
    pub attempt_timeout: Duration,
    /// Keep-alive connections kept open (`--source-connections`).
    pub connections: usize,
    /// Trust these PEM certificates instead of the system's roots (`--source-tls-ca`).
    pub tls_ca: Option<std::path::PathBuf>,
    /// Show the server this certificate when it asks for one (`--source-tls-cert`).
    pub tls_client: Option<crate::tls::ClientIdentity>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            policy: Policy::default(),
            connect_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(30),
            connections: 32,
            tls_ca: None,
            tls_client: None,
        }
    }
}

/// Why a remote source could not be opened.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The source answered, or failed, in a way that makes it unusable.
    #[error("source {uri}: {why}")]
    Source {
        /// The URI, without credentials.
        uri: String,
        /// What is wrong, and what to do.
        why: String,
    },
    /// The client certificate or key could not be used (the message names the flag).
    #[error("{why}")]
    TlsClient {
        /// What is wrong.
        why: String,
    },
    /// The CA file could not be used.
    #[error("--source-tls-ca {}: {why}", .path.display())]
    TlsCa {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// Where the requests go.
#[derive(Debug)]
pub enum Target {
    /// A plain URL.
    Url(Url),
    /// An S3 object; every request is signed.
    S3(S3Object),
}

/// What every request must match: the identity pinned for the clone.
#[derive(Debug, Clone, Default)]
struct Pinned {
    etag: Option<String>,
    last_modified: Option<String>,
    version_id: Option<String>,
}

/// A remote HTTP(S) or S3 source.
#[derive(Debug)]
pub struct HttpSource {
    agent: Agent,
    target: Target,
    size: u64,
    pinned: RwLock<Pinned>,
    policy: Policy,
    stats: Arc<SourceStats>,
}

impl HttpSource {
    /// Opens `target`: sizes it, takes its identity, checks that it serves byte ranges.
    /// A version named in an `s3://` URI is read from the start.
    pub fn open(target: Target, opts: &HttpOptions) -> Result<HttpSource, OpenError> {
        let shown = match &target {
            Target::Url(u) => redact(u.as_str()),
            Target::S3(o) => o.shown().to_string(),
        };
        let agent = agent(opts)?;
        let version = match &target {
            Target::S3(o) => o.version_id().map(str::to_string),
            Target::Url(_) => None,
        };
        let src = HttpSource {
            agent,
            target,
            size: 0,
            pinned: RwLock::new(Pinned {
                version_id: version,
                ..Pinned::default()
            }),
            policy: opts.policy,
            stats: Arc::new(SourceStats::new(shown.clone())),
        };
        let err = |why: String| OpenError::Source {
            uri: shown.clone(),
            why,
        };
        let head = src.retrying(|| src.head()).map_err(err)?;
        let mut src = src;
        src.size = head.size;
        {
            let mut p = src.pinned.write().unwrap_or_else(|e| e.into_inner());
            p.etag = head.etag;
            p.last_modified = head.last_modified;
            if p.version_id.is_none() {
                p.version_id = head.version_id;
            }
        }
        if src.size > 0 {
            let mut one = [0u8; 1];
            src.retrying(|| src.get(&mut one, 0)).map_err(err)?;
        }
        src.stats.set_state(SourceState::Connected);
        Ok(src)
    }

    /// The counters and state, for `status`.
    pub fn stats(&self) -> Arc<SourceStats> {
        Arc::clone(&self.stats)
    }

    /// The identity the source has now (as opened or adopted).
    pub fn identity(&self) -> SourceIdentity {
        let p = self
            .pinned
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut marks = std::collections::BTreeMap::new();
        if let Some(e) = p.etag {
            marks.insert("etag".to_string(), e);
        } else if let Some(l) = p.last_modified {
            marks.insert("last_modified".to_string(), l);
        }
        if let Some(v) = p.version_id {
            marks.insert("version_id".to_string(), v);
        }
        SourceIdentity {
            uri: self.stats.uri().to_string(),
            size: self.size,
            marks,
        }
    }

    /// Goes on with the identity pinned when the clone began: on a versioned S3 bucket the
    /// pinned version is read from now on (even if the object was overwritten since);
    /// otherwise the source must still be what was pinned. Refused, naming the difference,
    /// when it is not.
    pub fn adopt(&self, pinned: &SourceIdentity) -> Result<(), OpenError> {
        let changed = |why: String| {
            self.stats.failed(&why, SourceState::Changed);
            OpenError::Source {
                uri: self.stats.uri().to_string(),
                why: format!(
                    "changed since the clone began ({why}); refusing to mix its bytes with those copied before"
                ),
            }
        };
        let version = pinned.marks.get("version_id");
        let is_s3 = matches!(self.target, Target::S3(_));
        if let Some(v) = version.filter(|_| is_s3)
            && self.identity().marks.get("version_id") != Some(v)
        {
            // Read the pinned version from now on, and see that it is still there as it was.
            let mut p = self.pinned.write().unwrap_or_else(|e| e.into_inner());
            p.version_id = Some(v.clone());
            p.etag = None;
            p.last_modified = None;
            drop(p);
            let head = self
                .retrying(|| self.head())
                .map_err(|why| changed(format!("its pinned version {v} cannot be read: {why}")))?;
            let mut p = self.pinned.write().unwrap_or_else(|e| e.into_inner());
            p.etag = head.etag;
            p.last_modified = head.last_modified;
            drop(p);
            if head.size != self.size {
                return Err(changed(format!(
                    "its pinned version {v} has {} bytes, the clone {}",
                    head.size, self.size
                )));
            }
        }
        match pinned.difference(&self.identity()) {
            None => Ok(()),
            Some(why) => Err(changed(why)),
        }
    }

    /// Runs one request under the retry policy, keeping the counters; the error in words.
    fn retrying<T>(&self, mut f: impl FnMut() -> Result<T, Failure>) -> Result<T, String> {
        request(&self.policy, &self.stats, |_| f())
    }

    /// The request's URL and, for S3, the headers that sign it (signed now, per attempt).
    fn request(&self, head: bool) -> crate::s3::Signed {
        let version = self
            .pinned
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .version_id
            .clone();
        match &self.target {
            Target::Url(u) => crate::s3::Signed {
                url: u.to_string(),
                headers: Vec::new(),
            },
            Target::S3(o) => o.request(head, version.as_deref(), std::time::SystemTime::now()),
        }
    }

    fn head(&self) -> Result<Head, Failure> {
        let r = self.request(true);
        let mut req = self.agent.head(&r.url);
        for (k, v) in &r.headers {
            req = req.header(k, v);
        }
        let resp = req.call().map_err(transport)?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(status_failure(status, header(&resp, "retry-after"), "HEAD"));
        }
        let size = header(&resp, "content-length")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                Failure::Fatal("the server does not say the image's size (no Content-Length in its HEAD answer)".to_string())
            })?;
        let etag = header(&resp, "etag").filter(|e| !e.starts_with("W/"));
        Ok(Head {
            size,
            etag,
            last_modified: header(&resp, "last-modified"),
            version_id: header(&resp, "x-amz-version-id").filter(|v| v != "null"),
        })
    }

    /// One ranged GET of `buf.len()` bytes at `offset`, checked against the pin.
    fn get(&self, buf: &mut [u8], offset: u64) -> Result<(), Failure> {
        let end = offset + buf.len() as u64 - 1;
        let pinned = self
            .pinned
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let r = self.request(false);
        let mut req = self
            .agent
            .get(&r.url)
            .header("Range", &format!("bytes={offset}-{end}"));
        for (k, v) in &r.headers {
            req = req.header(k, v);
        }
        if let Some(e) = &pinned.etag {
            req = req.header("If-Match", e);
        } else if let Some(l) = &pinned.last_modified {
            req = req.header("If-Unmodified-Since", l);
        }
        let resp = req.call().map_err(transport)?;
        let status = resp.status().as_u16();
        match status {
            206 => {}
            200 => {
                return Err(Failure::Fatal(
                    "the server does not serve byte ranges (it answered a ranged GET with the whole image); clonebd needs ranges to read regions on demand".to_string(),
                ));
            }
            412 => {
                return Err(Failure::Changed(
                    "the server answered 412 Precondition Failed to If-Match".to_string(),
                ));
            }
            416 => {
                return Err(Failure::Changed(format!(
                    "the range {offset}-{end} is no longer inside it (416)"
                )));
            }
            s => return Err(status_failure(s, header(&resp, "retry-after"), "GET")),
        }
        // The range asked for, of an object of the pinned size and ETag.
        let want = format!("bytes {offset}-{end}/{}", self.size);
        match header(&resp, "content-range") {
            Some(cr) if cr.trim() == want => {}
            Some(cr) => {
                return Err(
                    match cr
                        .rsplit('/')
                        .next()
                        .and_then(|t| t.trim().parse::<u64>().ok())
                    {
                        Some(total) if total != self.size => Failure::Changed(format!(
                            "its size was {} bytes and is {total} bytes now",
                            self.size
                        )),
                        _ => Failure::Fatal(format!("the server sent range {cr:?} for {want:?}")),
                    },
                );
            }
            None => {
                return Err(Failure::Fatal(
                    "the server's 206 answer has no Content-Range".to_string(),
                ));
            }
        }
        if let (Some(was), Some(is)) = (&pinned.etag, header(&resp, "etag"))
            && &is != was
        {
            return Err(Failure::Changed(format!(
                "its etag was {was} and is {is} now"
            )));
        }
        let mut body = resp.into_body();
        let mut reader = body.as_reader();
        reader.read_exact(buf).map_err(|e| {
            Failure::Transient(
                format!(
                    "the answer ended early: {}",
                    clonebd_core::errno::describe(&e)
                ),
                None,
            )
        })?;
        // Read on to the end of the body (nothing is left): only a body read to its end
        // gives the connection back to the pool for the next request to reuse.
        let mut rest = [0u8; 1];
        match reader.read(&mut rest) {
            Ok(0) => Ok(()),
            Ok(_) => Err(Failure::Fatal(
                "the server sent more bytes than the range asked for".to_string(),
            )),
            Err(_) => Ok(()),
        }
    }

    fn read_range(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.retrying(|| self.get(buf, offset))
            .map_err(|why| io::Error::other(format!("source {}: {why}", self.stats.uri())))
    }
}

struct Head {
    size: u64,
    etag: Option<String>,
    last_modified: Option<String>,
    version_id: Option<String>,
}

fn header(resp: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn transport(e: ureq::Error) -> Failure {
    use ureq::Error as E;
    match e {
        E::Io(io) => Failure::of_tls(&io)
            .unwrap_or_else(|| Failure::Transient(clonebd_core::errno::describe(&io), None)),
        E::Timeout(t) => Failure::Transient(format!("timed out ({t})"), None),
        E::HostNotFound => Failure::Transient("host not found".to_string(), None),
        E::ConnectionFailed => Failure::Transient("connection failed".to_string(), None),
        E::Tls(m) => Failure::Fatal(format!("TLS: {m}")),
        E::Rustls(r) => Failure::Fatal(format!("TLS: {r}")),
        other => Failure::Transient(other.to_string(), None),
    }
}

fn status_failure(status: u16, retry: Option<String>, what: &str) -> Failure {
    let after = retry.as_deref().and_then(retry_after);
    match status {
        429 | 500..=599 => {
            Failure::Transient(format!("the server answered {what} with {status}"), after)
        }
        401 | 403 => Failure::Fatal(format!(
            "access denied ({status}): check the credentials (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE) and that they may read the object"
        )),
        404 => Failure::Fatal("not found (404)".to_string()),
        s => Failure::Fatal(format!("the server answered {what} with {s}")),
    }
}

fn agent(opts: &HttpOptions) -> Result<Agent, OpenError> {
    let roots = match &opts.tls_ca {
        Some(p) => RootCerts::new_with_certs(&load_pem(p)?),
        None => RootCerts::PlatformVerifier,
    };
    let client = match &opts.tls_client {
        None => None,
        Some(id) => {
            let loaded = id.load().map_err(|why| OpenError::TlsClient { why })?;
            let chain: Vec<Certificate<'static>> = loaded
                .chain
                .iter()
                .map(|c| Certificate::from_der(c.as_ref()).to_owned())
                .collect();
            // ureq takes the key as its own PEM reader gives it (the same file, checked by
            // `load` above).
            let pem = std::fs::read(&id.key).map_err(|e| OpenError::TlsClient {
                why: format!(
                    "--source-tls-key {}: {}",
                    id.key.display(),
                    clonebd_core::errno::describe(&e)
                ),
            })?;
            let key = ureq::tls::parse_pem(&pem)
                .find_map(|item| match item {
                    Ok(ureq::tls::PemItem::PrivateKey(k)) => Some(k.to_owned()),
                    _ => None,
                })
                .ok_or_else(|| OpenError::TlsClient {
                    why: format!(
                        "--source-tls-key {}: no private key in it",
                        id.key.display()
                    ),
                })?;
            drop(loaded.key);
            Some(ureq::tls::ClientCert::new_with_certs(&chain, key))
        }
    };
    let tls = TlsConfig::builder()
        .root_certs(roots)
        .client_cert(client)
        .build();
    let config = Agent::config_builder()
        .http_status_as_error(false)
        .tls_config(tls)
        .timeout_connect(Some(opts.connect_timeout))
        .timeout_global(Some(opts.attempt_timeout))
        .max_idle_connections(opts.connections.max(1))
        .max_idle_connections_per_host(opts.connections.max(1))
        .max_redirects(0)
        .build();
    Ok(config.into())
}

fn load_pem(path: &Path) -> Result<Vec<Certificate<'static>>, OpenError> {
    let err = |why: String| OpenError::TlsCa {
        path: path.to_path_buf(),
        why,
    };
    let pem = std::fs::read(path).map_err(|e| err(clonebd_core::errno::describe(&e)))?;
    let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate in it".to_string()));
    }
    Ok(certs)
}

impl BlockDev for HttpSource {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        crate::readonly::CAPS
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        crate::readonly::check_read(offset, buf.len(), self.size)?;
        self.read_range(buf, offset)
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(crate::readonly::refuse_write(self.stats.uri()))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64) -> io::Result<()> {
        self.write_at(&[], 0)
    }
}
