//! An object in S3-compatible storage (AWS S3, MinIO, Ceph RGW), configured the way the AWS
//! tools are, every request SigV4-signed (`rusty-s3`, sans-IO) and sent by [`crate::http`].
//!
//! - endpoint: `AWS_ENDPOINT_URL` (then path-style addressing, as MinIO and Ceph RGW want),
//!   else `https://s3.REGION.amazonaws.com` with virtual-host addressing;
//! - region: `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's `region` in the shared config
//!   file (`AWS_CONFIG_FILE`, default `~/.aws/config`), else `us-east-1`;
//! - credentials: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`, else
//!   the profile (`AWS_PROFILE`, default `default`) in the shared credentials file
//!   (`AWS_SHARED_CREDENTIALS_FILE`, default `~/.aws/credentials`); none: unsigned requests,
//!   for public objects.
//!
//! Each request is signed when it is sent (SigV4 in the `Authorization` header, over `host`
//! and the `x-amz-*` headers), so a retry hours later is signed afresh; `Range` and
//! `If-Match` travel as plain headers. `rusty-s3` builds the addressing (path or virtual
//! host style, the key's encoding).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::SystemTime;

use rusty_s3::{Bucket, Credentials, UrlStyle};
use thiserror::Error;
use url::Url;

/// Why an S3 source cannot be configured.
#[derive(Debug, Error)]
#[error("source {shown}: {why}")]
pub struct S3Error {
    /// The URI.
    pub shown: String,
    /// What is wrong.
    pub why: String,
}

/// Where the AWS settings come from: the environment, in a form tests can give directly.
#[derive(Debug, Clone, Default)]
pub struct S3Env {
    vars: HashMap<String, String>,
}

impl S3Env {
    /// The process's environment.
    pub fn from_process() -> Self {
        Self {
            vars: std::env::vars()
                .filter(|(k, _)| k.starts_with("AWS_") || k == "HOME")
                .collect(),
        }
    }

    /// These variables only.
    pub fn from_vars<'a>(vars: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self {
            vars: vars
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.vars
            .get(k)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn file(&self, var: &str, default: &str) -> Option<PathBuf> {
        match self.get(var) {
            Some(p) => Some(PathBuf::from(p)),
            None => self.get("HOME").map(|h| PathBuf::from(h).join(default)),
        }
    }
}

/// An S3 object and how to sign requests for it.
#[derive(Debug)]
pub struct S3Object {
    bucket: Bucket,
    key: String,
    credentials: Option<Credentials>,
    version_id: Option<String>,
    shown: String,
}

impl S3Object {
    /// The object `key` of `bucket` (at `version_id` if given), configured from `env`.
    pub fn new(
        bucket: &str,
        key: &str,
        version_id: Option<String>,
        env: &S3Env,
    ) -> Result<Self, S3Error> {
        let mut shown = format!("s3://{bucket}/{key}");
        if let Some(v) = &version_id {
            shown.push_str(&format!("?versionId={v}"));
        }
        let err = |why: String| S3Error {
            shown: shown.clone(),
            why,
        };
        let profile = env.get("AWS_PROFILE").unwrap_or("default").to_string();
        let config = env
            .file("AWS_CONFIG_FILE", ".aws/config")
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|t| ini_section(&t, &config_section(&profile)))
            .unwrap_or_default();
        let region = env
            .get("AWS_REGION")
            .or_else(|| env.get("AWS_DEFAULT_REGION"))
            .map(str::to_string)
            .or_else(|| config.get("region").cloned())
            .unwrap_or_else(|| "us-east-1".to_string());
        let (endpoint, style) = match env.get("AWS_ENDPOINT_URL") {
            Some(e) => (
                Url::parse(e).map_err(|x| err(format!("AWS_ENDPOINT_URL {e}: not a URL: {x}")))?,
                UrlStyle::Path,
            ),
            None => (
                Url::parse(&format!("https://s3.{region}.amazonaws.com"))
                    .map_err(|x| err(format!("region {region}: {x}")))?,
                UrlStyle::VirtualHost,
            ),
        };
        let credentials = match (
            env.get("AWS_ACCESS_KEY_ID"),
            env.get("AWS_SECRET_ACCESS_KEY"),
        ) {
            (Some(k), Some(s)) => Some(match env.get("AWS_SESSION_TOKEN") {
                Some(t) => Credentials::new_with_token(k, s, t),
                None => Credentials::new(k, s),
            }),
            (Some(_), None) | (None, Some(_)) => {
                return Err(err(
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be given together"
                        .to_string(),
                ));
            }
            (None, None) => {
                let path = env.file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials");
                let text = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok());
                match text {
                    Some(t) => {
                        let sec = ini_section(&t, &profile);
                        match (
                            sec.get("aws_access_key_id"),
                            sec.get("aws_secret_access_key"),
                        ) {
                            (Some(k), Some(s)) => Some(match sec.get("aws_session_token") {
                                Some(tok) => Credentials::new_with_token(k, s, tok),
                                None => Credentials::new(k, s),
                            }),
                            _ if env.get("AWS_PROFILE").is_some() => {
                                return Err(err(format!(
                                    "AWS_PROFILE {profile}: no aws_access_key_id and aws_secret_access_key for it in {}",
                                    path.map(|p| p.display().to_string()).unwrap_or_default()
                                )));
                            }
                            _ => None,
                        }
                    }
                    None => None,
                }
            }
        };
        let bucket = Bucket::new(endpoint, style, bucket.to_string(), region)
            .map_err(|e| err(format!("bucket {bucket}: {e}")))?;
        Ok(Self {
            bucket,
            key: key.to_string(),
            credentials,
            version_id,
            shown,
        })
    }

    /// The URI as shown (never with credentials).
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// The version named in the URI.
    pub fn version_id(&self) -> Option<&str> {
        self.version_id.as_deref()
    }

    /// A `HEAD` (or a `GET`) of the object, at `version` if given, signed at `now`.
    pub fn request(&self, head: bool, version: Option<&str>, now: SystemTime) -> Signed {
        let mut url = self.bucket.object_url(&self.key);
        let query: Vec<(&str, &str)> = version.map(|v| ("versionId", v)).into_iter().collect();
        url.set_query(None);
        if !query.is_empty() {
            url.set_query(Some(&canonical_query(&query)));
        }
        let Some(creds) = &self.credentials else {
            return Signed {
                url: url.to_string(),
                headers: Vec::new(),
            };
        };
        let method = if head { "HEAD" } else { "GET" };
        let headers = sign(
            &Signing {
                method,
                url: &url,
                query: &query,
                headers: &[],
                payload_sha256: UNSIGNED_PAYLOAD,
                key: creds.key(),
                secret: creds.secret(),
                token: creds.token(),
                region: self.bucket.region(),
            },
            now,
        );
        Signed {
            url: url.to_string(),
            headers,
        }
    }
}

/// A request ready to send: its URL and the headers that sign it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The URL (never with credentials in it).
    pub url: String,
    /// `Authorization`, `x-amz-date`, `x-amz-content-sha256`, `x-amz-security-token`.
    pub headers: Vec<(String, String)>,
}

/// The payload hash of a request whose body is not signed (S3 accepts it for every request,
/// and a `GET` or `HEAD` has no body).
const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

/// What SigV4 signs of one request.
struct Signing<'a> {
    method: &'a str,
    /// The URL; its path must be percent-encoded already (as `Bucket::object_url` does).
    url: &'a Url,
    query: &'a [(&'a str, &'a str)],
    /// Further headers to sign, beyond `host` and the `x-amz-*` ones added here.
    headers: &'a [(&'a str, &'a str)],
    payload_sha256: &'a str,
    key: &'a str,
    secret: &'a str,
    token: Option<&'a str>,
    region: &'a str,
}

/// AWS Signature Version 4 in the `Authorization` header: the headers to add to the
/// request. The header form rather than a presigned URL because every S3 implementation
/// verifies it (moto, for one, checks only the header form), and no signature travels in a
/// URL that a proxy may log.
fn sign(r: &Signing<'_>, now: SystemTime) -> Vec<(String, String)> {
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let ts = jiff::Timestamp::from_second(secs).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    let amz_date = ts.strftime("%Y%m%dT%H%M%SZ").to_string();
    let day = &amz_date[..8];
    let host = match r.url.port() {
        Some(p) => format!("{}:{p}", r.url.host_str().unwrap_or_default()),
        None => r.url.host_str().unwrap_or_default().to_string(),
    };
    let mut signed: Vec<(String, String)> = vec![
        ("host".to_string(), host),
        (
            "x-amz-content-sha256".to_string(),
            r.payload_sha256.to_string(),
        ),
        ("x-amz-date".to_string(), amz_date.clone()),
    ];
    if let Some(t) = r.token.filter(|t| !t.is_empty()) {
        signed.push(("x-amz-security-token".to_string(), t.to_string()));
    }
    for (k, v) in r.headers {
        signed.push((k.to_ascii_lowercase(), v.trim().to_string()));
    }
    signed.sort();
    let names = signed
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let mut canonical = format!(
        "{}\n{}\n{}\n",
        r.method,
        r.url.path(),
        canonical_query(r.query)
    );
    for (k, v) in &signed {
        canonical.push_str(&format!("{k}:{v}\n"));
    }
    canonical.push_str(&format!("\n{names}\n{}", r.payload_sha256));
    let scope = format!("{day}/{}/s3/aws4_request", r.region);
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(&sha256(canonical.as_bytes()))
    );
    let mut k = hmac_sha256(format!("AWS4{}", r.secret).as_bytes(), day.as_bytes());
    for part in [r.region.as_bytes(), b"s3", b"aws4_request"] {
        k = hmac_sha256(&k, part);
    }
    let signature = hex(&hmac_sha256(&k, to_sign.as_bytes()));
    let mut out: Vec<(String, String)> = signed
        .into_iter()
        .filter(|(k, _)| k.starts_with("x-amz-"))
        .collect();
    out.push((
        "Authorization".to_string(),
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={names}, Signature={signature}",
            r.key
        ),
    ));
    out
}

/// The query string in SigV4's canonical form: names and values percent-encoded (all but
/// the unreserved characters), sorted.
fn canonical_query(q: &[(&str, &str)]) -> String {
    let mut parts: Vec<String> = q
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect();
    parts.sort();
    parts.join("&")
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(data).into()
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    use hmac::{KeyInit as _, Mac as _};
    // HMAC takes a key of any length: `new_from_slice` cannot fail for it.
    match hmac::Hmac::<sha2::Sha256>::new_from_slice(key) {
        Ok(mut m) => {
            m.update(data);
            m.finalize().into_bytes().into()
        }
        Err(_) => [0; 32],
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The profile's section name in the shared config file.
fn config_section(profile: &str) -> String {
    if profile == "default" {
        profile.to_string()
    } else {
        format!("profile {profile}")
    }
}

/// The `key = value` pairs of section `[name]` of an INI text.
fn ini_section(text: &str, name: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut inside = false;
    for line in text.lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') || l.starts_with(';') {
            continue;
        }
        if let Some(sec) = l.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            inside = sec.trim() == name;
            continue;
        }
        if inside && let Some((k, v)) = l.split_once('=') {
            out.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_like_the_aws_tools() {
        let dir = tempfile::tempdir().expect("tempdir");
        let creds = dir.path().join("credentials");
        std::fs::write(
            &creds,
            "[default]\naws_access_key_id = AKDEFAULT\naws_secret_access_key = s1\n\n[ci]\naws_access_key_id=AKCI\naws_secret_access_key=s2\naws_session_token=tok\n",
        )
        .expect("write");
        let c = creds.to_str().expect("utf-8");
        let env = S3Env::from_vars([
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000"),
            ("AWS_REGION", "eu-west-1"),
            ("AWS_SHARED_CREDENTIALS_FILE", c),
            ("AWS_PROFILE", "ci"),
        ]);
        let o = S3Object::new("golden", "img/disk.raw", Some("v7".into()), &env).expect("object");
        assert_eq!(o.shown(), "s3://golden/img/disk.raw?versionId=v7");
        let r = o.request(false, Some("v7"), SystemTime::UNIX_EPOCH);
        // Path style on the endpoint, with the version, signed with the profile's keys.
        assert_eq!(
            r.url,
            "http://127.0.0.1:9000/golden/img/disk.raw?versionId=v7"
        );
        let h = |name: &str| {
            r.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let auth = h("Authorization");
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKCI/19700101/eu-west-1/s3/aws4_request, SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token, Signature="),
            "{auth}"
        );
        assert_eq!(h("x-amz-security-token"), "tok");
        assert_eq!(h("x-amz-date"), "19700101T000000Z");
        // The environment's keys win over the file.
        let env = S3Env::from_vars([
            ("AWS_ACCESS_KEY_ID", "AKENV"),
            ("AWS_SECRET_ACCESS_KEY", "s3"),
            ("AWS_SHARED_CREDENTIALS_FILE", c),
        ]);
        let o = S3Object::new("b", "k", None, &env).expect("object");
        let r = o.request(true, None, SystemTime::UNIX_EPOCH);
        assert_eq!(r.url, "https://b.s3.us-east-1.amazonaws.com/k");
        assert!(
            r.headers
                .iter()
                .any(|(k, v)| k == "Authorization" && v.contains("Credential=AKENV/")),
            "{:?}",
            r.headers
        );
        // No credentials at all: unsigned, for public objects.
        let o = S3Object::new(
            "b",
            "k",
            None,
            &S3Env::from_vars([("HOME", "/nonexistent")]),
        )
        .expect("object");
        assert!(o.request(false, None, SystemTime::now()).headers.is_empty());
        // A profile that the file does not have is an error at start.
        let env = S3Env::from_vars([("AWS_SHARED_CREDENTIALS_FILE", c), ("AWS_PROFILE", "nope")]);
        let e = S3Object::new("b", "k", None, &env).expect_err("no such profile");
        assert!(
            e.to_string()
                .starts_with("source s3://b/k: AWS_PROFILE nope: no aws_access_key_id"),
            "{e}"
        );
    }

    /// The example of AWS's documentation for SigV4 in the Authorization header ("GET
    /// Object": a range of examplebucket/test.txt, 2013-05-24, the example keys).
    #[test]
    fn signs_as_the_aws_documentation_does() {
        let url = Url::parse("https://examplebucket.s3.amazonaws.com/test.txt").expect("url");
        let headers = sign(
            &Signing {
                method: "GET",
                url: &url,
                query: &[],
                headers: &[("Range", "bytes=0-9")],
                payload_sha256: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                key: "AKIAIOSFODNN7EXAMPLE",
                secret: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                token: None,
                region: "us-east-1",
            },
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_369_353_600),
        );
        let auth = headers
            .iter()
            .find(|(k, _)| k == "Authorization")
            .map(|(_, v)| v.as_str())
            .unwrap_or_default();
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    #[test]
    fn the_canonical_query_is_encoded_and_sorted() {
        assert_eq!(
            canonical_query(&[("versionId", "a+b/c=d"), ("acl", "")]),
            "acl=&versionId=a%2Bb%2Fc%3Dd"
        );
    }
}
