//! Opening the source a `--source` word (or the table's source field) names: a local file
//! or block device, or a remote source (an HTTP(S) URL, an S3 object, an NBD export), always
//! read-only.
//!
//! The daemon needs the source's size before the table parser runs (the clone's default
//! size) and the device itself when the parser opens it, so [`Sources`] opens a word once
//! and hands the same device to both: a remote source is not asked twice.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clonebd_core::BlockDev;
use clonebd_io::{FileDevice, OpenError, OpenOptions};
use clonebd_remote::http::{HttpOptions, HttpSource, Target};
use clonebd_remote::nbd::{NbdOptions, NbdSource};
use clonebd_remote::retry::Policy;
use clonebd_remote::s3::{S3Env, S3Object};
use clonebd_remote::tls::ClientIdentity;
use clonebd_remote::uri::{SourceUri, redact};
use clonebd_remote::{SourceIdentity, SourceStats};

/// How remote sources are reached.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Use O_DIRECT on a local source where it allows it.
    pub direct: bool,
    /// The longest a request to a remote source may take, retries included.
    pub timeout: Duration,
    /// Connections to a remote source; `None`: the scheme's default
    /// ([`DEFAULT_HTTP_CONNECTIONS`], [`DEFAULT_NBD_CONNECTIONS`]).
    pub connections: Option<usize>,
    /// Trust these PEM certificates for HTTPS instead of the system's roots.
    pub tls_ca: Option<PathBuf>,
    /// The certificate to show a server (HTTPS or NBD over TLS) that asks for one.
    pub tls_client: Option<ClientIdentity>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            direct: true,
            timeout: Duration::from_secs(60),
            connections: None,
            tls_ca: None,
            tls_client: None,
        }
    }
}

/// Keep-alive connections to an HTTP or S3 source unless `--source-connections` says.
pub const DEFAULT_HTTP_CONNECTIONS: usize = 64;

/// Connections to an NBD server (that allows several) unless `--source-connections` says:
/// each carries many reads at once.
pub const DEFAULT_NBD_CONNECTIONS: usize = 4;

/// Why a source could not be opened: the message names the source and the cause once.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A local source.
    #[error("source {0}")]
    Local(OpenError),
    /// A remote source, or its URI.
    #[error("{0}")]
    Remote(String),
}

impl SourceError {
    /// The errno the kernel's constructor would return for it.
    pub fn errno(&self) -> i32 {
        match self {
            SourceError::Local(OpenError::Open { cause, .. })
                if cause.kind() == std::io::ErrorKind::NotFound =>
            {
                libc::ENODEV
            }
            SourceError::Local(e) => e.errno(),
            SourceError::Remote(_) => libc::EIO,
        }
    }
}

/// A remote source, as the daemon keeps it beside the device.
#[derive(Debug, Clone)]
pub enum Remote {
    /// An HTTP(S) image or an S3 object.
    Http(Arc<HttpSource>),
    /// An NBD export.
    Nbd(Arc<NbdSource>),
}

impl Remote {
    /// Its identity now.
    pub fn identity(&self) -> SourceIdentity {
        match self {
            Remote::Http(h) => h.identity(),
            Remote::Nbd(n) => n.identity(),
        }
    }

    /// Goes on with the identity pinned when the clone began; refused if it changed.
    pub fn adopt(&self, pinned: &SourceIdentity) -> Result<(), String> {
        match self {
            Remote::Http(h) => h.adopt(pinned).map_err(|e| e.to_string()),
            Remote::Nbd(n) => n.adopt(pinned).map_err(|e| e.to_string()),
        }
    }

    /// Its state and counters.
    pub fn stats(&self) -> Arc<SourceStats> {
        match self {
            Remote::Http(h) => h.stats(),
            Remote::Nbd(n) => n.stats(),
        }
    }
}

/// An opened source.
#[derive(Clone)]
pub struct Opened {
    /// The device, read-only.
    pub dev: Arc<dyn BlockDev>,
    /// Set for a remote source.
    pub remote: Option<Remote>,
    /// How the source appears in the table line and logs: the path, the device numbers,
    /// or the URI without credentials.
    pub shown: String,
    /// Whether reads bypass the page cache.
    pub direct: bool,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("shown", &self.shown)
            .finish_non_exhaustive()
    }
}

/// Opens `word` read-only.
pub fn open(word: &str, opts: &SourceOptions) -> Result<Opened, SourceError> {
    let uri = SourceUri::parse(word).map_err(|e| SourceError::Remote(e.to_string()))?;
    let http = |target: Target| {
        let o = HttpOptions {
            policy: Policy {
                deadline: opts.timeout,
                ..Policy::default()
            },
            connections: opts.connections.unwrap_or(DEFAULT_HTTP_CONNECTIONS),
            tls_ca: opts.tls_ca.clone(),
            tls_client: opts.tls_client.clone(),
            ..HttpOptions::default()
        };
        let h = HttpSource::open(target, &o).map_err(|e| SourceError::Remote(e.to_string()))?;
        let h = Arc::new(h);
        Ok(Opened {
            dev: Arc::clone(&h) as Arc<dyn BlockDev>,
            shown: h.stats().uri().to_string(),
            remote: Some(Remote::Http(h)),
            direct: false,
        })
    };
    match uri {
        SourceUri::Local(p) => {
            // Read-only, always: the source is never written. Not locked: several clones
            // may share one source.
            let d = FileDevice::open(&p, OpenOptions::read_only().direct(opts.direct))
                .map_err(SourceError::Local)?;
            let shown = if d.is_block_device() {
                d.dev_numbers()
                    .map(|(a, b)| format!("{a}:{b}"))
                    .unwrap_or_else(|_| p.clone())
            } else {
                p.clone()
            };
            let direct = d.is_direct();
            Ok(Opened {
                dev: Arc::new(d),
                remote: None,
                shown,
                direct,
            })
        }
        SourceUri::Http(url) => http(Target::Url(url)),
        SourceUri::Nbd { addr, export, tls } => {
            let tls = match tls {
                false => None,
                true => Some(
                    clonebd_remote::tls::config(opts.tls_ca.as_deref(), opts.tls_client.as_ref())
                        .map_err(|why| match (&opts.tls_ca, why.starts_with("--")) {
                        // The identity's errors name their flag already.
                        (_, true) | (None, false) => SourceError::Remote(why),
                        (Some(ca), false) => {
                            SourceError::Remote(format!("--source-tls-ca {}: {why}", ca.display()))
                        }
                    })?,
                ),
            };
            let o = NbdOptions {
                tls,
                policy: Policy {
                    deadline: opts.timeout,
                    ..Policy::default()
                },
                connections: opts.connections.unwrap_or(DEFAULT_NBD_CONNECTIONS),
                ..NbdOptions::default()
            };
            let n = NbdSource::open(addr, export, redact(word), &o)
                .map_err(|e| SourceError::Remote(e.to_string()))?;
            let n = Arc::new(n);
            Ok(Opened {
                dev: Arc::clone(&n) as Arc<dyn BlockDev>,
                shown: n.stats().uri().to_string(),
                remote: Some(Remote::Nbd(n)),
                direct: false,
            })
        }
        SourceUri::S3 {
            bucket,
            key,
            version_id,
        } => {
            let o = S3Object::new(&bucket, &key, version_id, &S3Env::from_process())
                .map_err(|e| SourceError::Remote(e.to_string()))?;
            http(Target::S3(o))
        }
    }
}

/// The source word as it may be shown (a URI without credentials).
pub fn shown(word: &str) -> String {
    redact(word)
}

/// Sources opened once, by word.
#[derive(Debug, Default)]
pub struct Sources {
    opened: Vec<(String, Opened)>,
}

impl Sources {
    /// The source `word`, opened now or earlier.
    pub fn get(&mut self, word: &str, opts: &SourceOptions) -> Result<Opened, SourceError> {
        if let Some((_, o)) = self.opened.iter().find(|(w, _)| w == word) {
            return Ok(o.clone());
        }
        let o = open(word, opts)?;
        self.opened.push((word.to_string(), o.clone()));
        Ok(o)
    }
}
