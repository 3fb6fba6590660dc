//! What a `--source` word names: a local path, or a remote source's URI; and how a URI is
//! shown without the credentials it may hold.
//!
//! NBD URIs are spelled as qemu and libnbd spell them (the NBD project's URI format):
//! `nbd://HOST[:PORT][/EXPORT]` (port 10809 by default) and
//! `nbd+unix:///[EXPORT]?socket=PATH`; the export name is the path without its first `/`,
//! percent-decoded; `nbds://` and `nbds+unix://` are the same over TLS.

use thiserror::Error;
use url::Url;

/// A source word, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceUri {
    /// A local file or block device (any word that is not a URI of a known scheme).
    Local(String),
    /// An `http://` or `https://` URL of a raw image.
    Http(Url),
    /// An NBD export.
    Nbd {
        /// Where the server listens.
        addr: NbdAddr,
        /// The export's name (`""`: the server's default export).
        export: String,
        /// Over TLS (`nbds://`, `nbds+unix://`).
        tls: bool,
    },
    /// An object in S3-compatible storage: `s3://BUCKET/KEY[?versionId=V]`.
    S3 {
        /// The bucket.
        bucket: String,
        /// The object's key.
        key: String,
        /// A version asked for, on a versioned bucket.
        version_id: Option<String>,
    },
}

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// TCP.
    Tcp {
        /// A host name or address (an IPv6 address without its brackets).
        host: String,
        /// The port.
        port: u16,
    },
    /// A unix socket.
    Unix(std::path::PathBuf),
}

/// The NBD port assigned by IANA.
pub const NBD_DEFAULT_PORT: u16 = 10809;

/// Why a source URI is refused.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("source {shown}: {why}")]
pub struct UriError {
    /// The URI, without credentials.
    pub shown: String,
    /// What is wrong.
    pub why: String,
}

impl SourceUri {
    /// Classifies `word`. A word with `://` and a scheme clonebd does not know is refused
    /// rather than taken for a file name.
    pub fn parse(word: &str) -> Result<SourceUri, UriError> {
        let Some((scheme, _)) = word.split_once("://") else {
            return Ok(SourceUri::Local(word.to_string()));
        };
        let err = |why: &str| UriError {
            shown: redact(word),
            why: why.to_string(),
        };
        match scheme.to_ascii_lowercase().as_str() {
            "http" | "https" => {
                let url = Url::parse(word).map_err(|e| err(&format!("not a valid URL: {e}")))?;
                if url.host_str().is_none() {
                    return Err(err("the URL names no host"));
                }
                Ok(SourceUri::Http(url))
            }
            "s3" => {
                let url = Url::parse(word).map_err(|e| err(&format!("not a valid URI: {e}")))?;
                let bucket = url
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| err("expected s3://BUCKET/KEY"))?
                    .to_string();
                let key = url.path().trim_start_matches('/');
                if key.is_empty() {
                    return Err(err("expected s3://BUCKET/KEY: the key is missing"));
                }
                let key = percent_decode(key).ok_or_else(|| err("the key is not valid UTF-8"))?;
                let mut version_id = None;
                for (k, v) in url.query_pairs() {
                    match k.as_ref() {
                        "versionId" => version_id = Some(v.into_owned()),
                        other => {
                            return Err(err(&format!(
                                "unknown parameter {other:?} (only versionId is taken)"
                            )));
                        }
                    }
                }
                Ok(SourceUri::S3 {
                    bucket,
                    key,
                    version_id,
                })
            }
            "nbd" | "nbd+unix" | "nbds" | "nbds+unix" => parse_nbd(word).map_err(|why| err(&why)),
            other => Err(err(&format!(
                "unknown scheme {other:?} (expected a path, http://, https://, s3://, nbd:// or nbd+unix://)"
            ))),
        }
    }

    /// Whether this is a remote source.
    pub fn is_remote(&self) -> bool {
        !matches!(self, SourceUri::Local(_))
    }
}

/// `nbd://HOST[:PORT][/EXPORT]` or `nbd+unix:///[EXPORT]?socket=PATH`.
fn parse_nbd(word: &str) -> Result<SourceUri, String> {
    let url = Url::parse(word).map_err(|e| format!("not a valid URI: {e}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("an NBD URI takes no user name or password".to_string());
    }
    let export = percent_decode(url.path().strip_prefix('/').unwrap_or(url.path()))
        .ok_or("the export name is not valid UTF-8")?;
    let mut socket = None;
    for (k, v) in url.query_pairs() {
        match k.as_ref() {
            "socket" => socket = Some(std::path::PathBuf::from(v.into_owned())),
            other => {
                return Err(format!(
                    "unknown parameter {other:?} (only socket is taken)"
                ));
            }
        }
    }
    let scheme = url.scheme().to_ascii_lowercase();
    let unix = scheme.ends_with("+unix");
    let tls = scheme.starts_with("nbds");
    let addr =
        if unix {
            if url.host_str().is_some_and(|h| !h.is_empty()) || url.port().is_some() {
                return Err(format!("expected {scheme}:///EXPORT?socket=PATH (no host)"));
            }
            NbdAddr::Unix(socket.ok_or_else(|| {
                format!("expected {scheme}:///EXPORT?socket=PATH: socket is missing")
            })?)
        } else {
            if socket.is_some() {
                return Err(format!("socket= is for {scheme}+unix:// URIs"));
            }
            let host = match url.host() {
                Some(url::Host::Domain(d)) if !d.is_empty() => d.to_string(),
                Some(url::Host::Ipv4(a)) => a.to_string(),
                Some(url::Host::Ipv6(a)) => a.to_string(),
                _ => {
                    return Err(format!(
                        "expected {scheme}://HOST[:PORT][/EXPORT]: the host is missing"
                    ));
                }
            };
            NbdAddr::Tcp {
                host,
                port: url.port().unwrap_or(NBD_DEFAULT_PORT),
            }
        };
    Ok(SourceUri::Nbd { addr, export, tls })
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Query parameters whose values are secrets (presigned URLs, tokens).
fn secret_param(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "sig",
        "token",
        "credential",
        "secret",
        "password",
        "key",
        "auth",
    ]
    .iter()
    .any(|s| n.contains(s))
}

/// `uri` as it may be shown in logs, status and errors: no user name or password, and the
/// values of secret-looking query parameters replaced by `REDACTED`.
pub fn redact(uri: &str) -> String {
    let Ok(mut url) = Url::parse(uri) else {
        // Not a URL: drop anything between "://" and an "@" all the same.
        return match (uri.find("://"), uri.find('@')) {
            (Some(s), Some(at)) if at > s => format!("{}{}", &uri[..s + 3], &uri[at + 1..]),
            _ => uri.to_string(),
        };
    };
    let _ = url.set_username("");
    let _ = url.set_password(None);
    // The query is rewritten only when it holds a secret, so that a URI without one is
    // shown as it was written (a socket path stays readable).
    if url.query_pairs().any(|(k, _)| secret_param(&k)) {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if secret_param(&k) {
                    "REDACTED".to_string()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_classified_and_bad_uris_refused() {
        assert_eq!(
            SourceUri::parse("disk.img"),
            Ok(SourceUri::Local("disk.img".into()))
        );
        assert_eq!(
            SourceUri::parse("/dev/vg/snap"),
            Ok(SourceUri::Local("/dev/vg/snap".into()))
        );
        assert!(matches!(
            SourceUri::parse("https://example.com/a.img"),
            Ok(SourceUri::Http(_))
        ));
        assert_eq!(
            SourceUri::parse("s3://golden/images/a%20b.raw?versionId=v1"),
            Ok(SourceUri::S3 {
                bucket: "golden".into(),
                key: "images/a b.raw".into(),
                version_id: Some("v1".into())
            })
        );
        assert_eq!(
            SourceUri::parse("s3://golden/").map_err(|e| e.to_string()),
            Err("source s3://golden/: expected s3://BUCKET/KEY: the key is missing".into())
        );
        assert!(SourceUri::parse("ftp://x/y").is_err());
        assert!(SourceUri::parse("s3://b/k?acl=1").is_err());
    }

    #[test]
    fn nbd_uris_are_parsed_as_qemu_spells_them() {
        let tcp = |host: &str, port| NbdAddr::Tcp {
            host: host.into(),
            port,
        };
        assert_eq!(
            SourceUri::parse("nbd://127.0.0.1:1234/x"),
            Ok(SourceUri::Nbd {
                addr: tcp("127.0.0.1", 1234),
                export: "x".into(),
                tls: false
            })
        );
        assert_eq!(
            SourceUri::parse("nbd://example.com"),
            Ok(SourceUri::Nbd {
                addr: tcp("example.com", 10809),
                export: String::new(),
                tls: false
            })
        );
        assert_eq!(
            SourceUri::parse("nbd://[::1]/a%20b"),
            Ok(SourceUri::Nbd {
                addr: tcp("::1", 10809),
                export: "a b".into(),
                tls: false
            })
        );
        assert_eq!(
            SourceUri::parse("nbd+unix:///disk?socket=/run/q.sock"),
            Ok(SourceUri::Nbd {
                addr: NbdAddr::Unix("/run/q.sock".into()),
                export: "disk".into(),
                tls: false
            })
        );
        assert_eq!(
            SourceUri::parse("nbd+unix://?socket=/run/q.sock"),
            Ok(SourceUri::Nbd {
                addr: NbdAddr::Unix("/run/q.sock".into()),
                export: String::new(),
                tls: false
            })
        );
        let refused = |w: &str| match SourceUri::parse(w) {
            Ok(u) => panic!("{w} was taken as {u:?}"),
            Err(e) => e.to_string(),
        };
        assert_eq!(
            refused("nbd+unix:///disk"),
            "source nbd+unix:///disk: expected nbd+unix:///EXPORT?socket=PATH: socket is missing"
        );
        assert_eq!(
            SourceUri::parse("nbds+unix:///d?socket=/s"),
            Ok(SourceUri::Nbd {
                addr: NbdAddr::Unix("/s".into()),
                export: "d".into(),
                tls: true
            })
        );
        assert!(matches!(
            SourceUri::parse("nbds://h:1/x"),
            Ok(SourceUri::Nbd { tls: true, .. })
        ));
        assert!(refused("nbd:///x").contains("the host is missing"));
        assert!(refused("nbd://h/x?tls=on").contains("unknown parameter"));
        assert!(refused("nbd://u:p@h/x").contains("no user name"));
        assert!(!refused("nbd://u:p@h/x").contains("u:p"));
    }

    #[test]
    fn credentials_never_show() {
        assert_eq!(
            redact("https://user:pw@example.com/a.img"),
            "https://example.com/a.img"
        );
        let r = redact(
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc&versionId=3",
        );
        assert!(!r.contains("AKIA") && !r.contains("abc"), "{r}");
        assert!(r.contains("versionId=3"), "{r}");
        assert_eq!(redact("nbd://u:p@host/x"), "nbd://host/x");
        assert_eq!(
            redact("nbd+unix:///x?socket=/run/a.sock"),
            "nbd+unix:///x?socket=/run/a.sock"
        );
    }
}
