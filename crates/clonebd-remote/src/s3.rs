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
//! Requests are presigned for a short time: the signature goes in the query string (which
//! the shown URI never contains), so `Range` and `If-Match` travel as plain headers.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use rusty_s3::actions::{GetObject, HeadObject, S3Action};
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

/// A presigned URL is good for this long: far longer than one request takes, short enough
/// that a URL seen somewhere is soon useless.
const SIGNED_FOR: Duration = Duration::from_secs(15 * 60);

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

    /// A presigned URL for a `HEAD` (or a `GET`) of the object, at `version` if given.
    pub fn signed_url(&self, head: bool, version: Option<&str>) -> String {
        let creds = self.credentials.as_ref();
        let url = if head {
            let mut a = HeadObject::new(&self.bucket, creds, &self.key);
            if let Some(v) = version {
                a.query_mut().insert("versionId", v.to_string());
            }
            a.sign(SIGNED_FOR)
        } else {
            let mut a = GetObject::new(&self.bucket, creds, &self.key);
            if let Some(v) = version {
                a.query_mut().insert("versionId", v.to_string());
            }
            a.sign(SIGNED_FOR)
        };
        url.to_string()
    }
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
        let u = o.signed_url(false, Some("v7"));
        // Path style on the endpoint, signed, with the version.
        assert!(
            u.starts_with("http://127.0.0.1:9000/golden/img/disk.raw?"),
            "{u}"
        );
        assert!(
            u.contains("versionId=v7") && u.contains("X-Amz-Signature="),
            "{u}"
        );
        assert!(
            u.contains("AKCI") && u.contains("X-Amz-Security-Token=tok"),
            "{u}"
        );
        assert!(u.contains("eu-west-1"), "{u}");
        // The environment's keys win over the file.
        let env = S3Env::from_vars([
            ("AWS_ACCESS_KEY_ID", "AKENV"),
            ("AWS_SECRET_ACCESS_KEY", "s3"),
            ("AWS_SHARED_CREDENTIALS_FILE", c),
        ]);
        let o = S3Object::new("b", "k", None, &env).expect("object");
        let u = o.signed_url(true, None);
        assert!(
            u.starts_with("https://b.s3.us-east-1.amazonaws.com/k?"),
            "{u}"
        );
        assert!(u.contains("AKENV"), "{u}");
        // A profile that the file does not have is an error at start.
        let env = S3Env::from_vars([("AWS_SHARED_CREDENTIALS_FILE", c), ("AWS_PROFILE", "nope")]);
        let e = S3Object::new("b", "k", None, &env).expect_err("no such profile");
        assert!(
            e.to_string()
                .starts_with("source s3://b/k: AWS_PROFILE nope: no aws_access_key_id"),
            "{e}"
        );
    }
}
