//! clonebd-remote: sources that live on other machines, behind the read-only device seam.
//!
//! - [`http`]: a raw image at an `http://` or `https://` URL, or an object in S3-compatible
//!   storage ([`s3`]), read with ranged `GET`s over a pool of keep-alive connections
//!   (`ureq`, rustls; blocking, like the rest of clonebd: no async runtime);
//! - [`nbd`]: an export on an NBD server, read over multiplexed connections
//!   ([`clonebd_nbd::MuxClient`]) that are re-established, and checked unchanged, when they
//!   break; over TLS ([`tls`]) for `nbds://`;
//! - [`retry`]: the one policy for timeouts, retries with back-off and jitter, and giving up;
//! - [`SourceIdentity`]: what a source's content is known by (size, ETag, version), which
//!   the clone pins before its first copy and every request then carries (`If-Match`,
//!   `versionId`), so a source that changed is detected instead of mixed in;
//! - [`SourceStats`]: the source's state and counters for `status --json`.
//!
//! Every source here implements [`clonebd_core::BlockDev`] read-only: writes are refused
//! without sending anything, so the source is never written. A read succeeds only with
//! every byte asked for, from a response that proves it is of the pinned content; a
//! failed or partial read is an error, so no region is ever recorded as hydrated from one.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod http;
pub mod nbd;
mod readonly;
pub mod retry;
pub mod s3;
mod stats;
pub mod tls;
pub mod uri;

use std::collections::BTreeMap;

pub use stats::{SourceReport, SourceState, SourceStats};

/// What identifies a remote source's content. Never holds credentials.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SourceIdentity {
    /// The source's URI, without credentials.
    pub uri: String,
    /// Its size in bytes.
    pub size: u64,
    /// Protocol-specific marks of its content, each compared as given: `export` (NBD),
    /// `etag` and `last_modified` (HTTP), `etag` and `version_id` (S3).
    pub marks: BTreeMap<String, String>,
}

impl SourceIdentity {
    /// Why `now` is not the source that was pinned as `self`, or `None` when it is.
    pub fn difference(&self, now: &SourceIdentity) -> Option<String> {
        if self.size != now.size {
            return Some(format!(
                "its size was {} bytes and is {} bytes now",
                self.size, now.size
            ));
        }
        for (k, was) in &self.marks {
            match now.marks.get(k) {
                Some(is) if is == was => {}
                Some(is) => return Some(format!("its {k} was {was} and is {is} now")),
                None => return Some(format!("its {k} was {was} and is gone now")),
            }
        }
        None
    }
}
