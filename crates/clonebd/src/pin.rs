//! A remote source's identity, pinned with the clone so that a clone never mixes the bytes
//! of two different sources.
//!
//! A remote source can change under a clone: the object overwritten, the image replaced,
//! the export resized. Regions copied before the change and regions copied after it would
//! then be a disk that never existed. So the identity the source had when the clone began
//! (its size, and its ETag, version or export name) is pinned before the first copy and
//! kept crash-safely with the clone: every later start compares the source with the pin,
//! and the source's requests carry it (`If-Match`, `versionId`).
//!
//! The kernel's metadata format has no room for it (and must stay byte-compatible), so the
//! pin lives in a small file beside the metadata (`META.source-pin`), or where
//! `--source-pin` says (a metadata block device has no "beside"). It is written atomically
//! (a temporary file, `fsync`, `rename`, `fsync` of the directory): a crash leaves the old
//! pin or the new one, never half of one.
//!
//! A pin left by an earlier clone must never apply to metadata formatted afresh. The rule
//! that makes this hold without any mark in the metadata: while no region is hydrated, the
//! destination holds nothing of the source's (every write, copy and discard marks a
//! region), so the pin is simply written anew from the source as it is now; once a region
//! is hydrated, the pin must exist and the source must match it. A clone formatted afresh
//! starts with no region hydrated, so it always takes a fresh pin.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clonebd_core::errno::describe;
use clonebd_remote::SourceIdentity;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What the pin file's `format` field says.
const FORMAT: &str = "clonebd-source-pin/1";

/// The pin file's form of a [`SourceIdentity`].
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PinnedSource {
    uri: String,
    size: u64,
    #[serde(default)]
    marks: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PinFileBody {
    format: String,
    source: PinnedSource,
}

/// Why a pin could not be kept or the source does not match it.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PinError {
    /// The pin file could not be read or written.
    #[error("source pin {}: {what}: {}", .path.display(), describe(.error))]
    Io {
        /// The pin file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The system's error.
        error: io::Error,
    },
    /// The pin file is not one.
    #[error("source pin {}: not a clonebd source pin ({detail})", .path.display())]
    Malformed {
        /// The pin file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Regions are hydrated but no pin says from which source.
    #[error(
        "source {uri}: the clone has hydrated regions but no pinned source identity (expected in {}), so clonebd cannot tell that this is the source they were copied from",
        .path.display()
    )]
    Missing {
        /// The source.
        uri: String,
        /// Where the pin should be.
        path: PathBuf,
    },
    /// The source is not the one the clone began with (the source's own words).
    #[error("{0}")]
    Refused(String),
    /// A metadata block device and no `--source-pin`.
    #[error(
        "metadata {}: a block device has no place beside it for the remote source's pinned identity: give --source-pin FILE",
        .path.display()
    )]
    NoPlace {
        /// The metadata device.
        path: PathBuf,
    },
}

/// Where a clone's source pin is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinFile {
    path: PathBuf,
}

impl PinFile {
    /// The pin of the clone whose metadata is `meta`: `explicit` if given, else
    /// `META.source-pin` beside a metadata file (a block device needs `explicit`).
    pub fn for_metadata(meta: &Path, explicit: Option<&Path>) -> Result<Self, PinError> {
        if let Some(p) = explicit {
            return Ok(Self {
                path: p.to_path_buf(),
            });
        }
        let is_block = std::fs::metadata(meta).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_block_device()
        });
        if is_block {
            return Err(PinError::NoPlace {
                path: meta.to_path_buf(),
            });
        }
        let mut name = meta.as_os_str().to_os_string();
        name.push(".source-pin");
        Ok(Self {
            path: PathBuf::from(name),
        })
    }

    /// The pin file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pinned identity, if a pin exists.
    pub fn load(&self) -> Result<Option<SourceIdentity>, PinError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                return Err(PinError::Io {
                    path: self.path.clone(),
                    what: "cannot read it",
                    error,
                });
            }
        };
        let body: PinFileBody = serde_json::from_str(&text).map_err(|e| PinError::Malformed {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        if body.format != FORMAT {
            return Err(PinError::Malformed {
                path: self.path.clone(),
                detail: format!("format {:?}, expected {FORMAT:?}", body.format),
            });
        }
        Ok(Some(SourceIdentity {
            uri: body.source.uri,
            size: body.source.size,
            marks: body.source.marks,
        }))
    }

    /// Pins `id`, atomically and durably.
    pub fn store(&self, id: &SourceIdentity) -> Result<(), PinError> {
        let io = |what: &'static str| {
            let path = self.path.clone();
            move |error| PinError::Io { path, what, error }
        };
        let body = PinFileBody {
            format: FORMAT.to_string(),
            source: PinnedSource {
                uri: id.uri.clone(),
                size: id.size,
                marks: id.marks.clone(),
            },
        };
        let mut text = serde_json::to_string_pretty(&body).map_err(|e| PinError::Malformed {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        text.push('\n');
        let mut tmp_name = self.path.as_os_str().to_os_string();
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(tmp_name);
        let mut f = std::fs::File::create(&tmp).map_err(io("cannot create it"))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(io("cannot write it"))?;
        drop(f);
        std::fs::rename(&tmp, &self.path).map_err(io("cannot put it in place"))?;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("cannot make it durable"))?;
        Ok(())
    }

    /// Settles which source the clone goes on with. With no region hydrated
    /// (`nr_hydrated` 0) the source as it is now (`now`) is pinned, replacing any earlier
    /// pin. Otherwise the pin must exist, and `adopt` is given it: the source then goes on
    /// with the pinned identity (reading a pinned version, say) or says how it differs.
    pub fn reconcile(
        &self,
        nr_hydrated: u64,
        now: &SourceIdentity,
        adopt: impl FnOnce(&SourceIdentity) -> Result<(), String>,
    ) -> Result<(), PinError> {
        if nr_hydrated == 0 {
            return self.store(now);
        }
        let Some(pinned) = self.load()? else {
            return Err(PinError::Missing {
                uri: now.uri.clone(),
                path: self.path.clone(),
            });
        };
        adopt(&pinned).map_err(PinError::Refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(size: u64, etag: &str) -> SourceIdentity {
        SourceIdentity {
            uri: "http://127.0.0.1/disk.img".to_string(),
            size,
            marks: [("etag".to_string(), etag.to_string())].into(),
        }
    }

    /// What a source does when asked to go on with `pinned`, being `now`.
    fn adopt_as(now: SourceIdentity) -> impl FnOnce(&SourceIdentity) -> Result<(), String> {
        move |pinned| match pinned.difference(&now) {
            None => Ok(()),
            Some(why) => Err(format!(
                "source {}: changed since the clone began ({why})",
                now.uri
            )),
        }
    }

    #[test]
    fn a_fresh_clone_pins_and_a_hydrated_one_must_match() {
        let dir = tempfile::tempdir().expect("tempdir");
        let meta = dir.path().join("clone.meta");
        let pin = PinFile::for_metadata(&meta, None).expect("pin");
        assert_eq!(pin.path(), dir.path().join("clone.meta.source-pin"));
        let a = id(4096, "\"a\"");
        // Hydrated regions and no pin: refused.
        assert!(matches!(
            pin.reconcile(5, &a, adopt_as(a.clone())),
            Err(PinError::Missing { .. })
        ));
        // Nothing hydrated: pinned as it is.
        pin.reconcile(0, &a, |_| panic!("nothing to adopt"))
            .expect("pin");
        assert_eq!(pin.load().expect("load"), Some(a.clone()));
        // Same source later: adopted.
        pin.reconcile(5, &a, adopt_as(a.clone())).expect("same");
        // Changed: refused, naming the difference.
        let b = id(4096, "\"b\"");
        let e = pin
            .reconcile(5, &b, adopt_as(b.clone()))
            .expect_err("changed");
        assert_eq!(
            e.to_string(),
            "source http://127.0.0.1/disk.img: changed since the clone began (its etag was \"a\" and is \"b\" now)"
        );
        // Metadata formatted afresh (nothing hydrated): the old pin does not apply.
        pin.reconcile(0, &b, |_| panic!("nothing to adopt"))
            .expect("re-pin");
        assert_eq!(pin.load().expect("load"), Some(b));
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("clone.meta.source-pin")]
        );
    }

    #[test]
    fn a_damaged_pin_is_refused_not_trusted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("pin");
        std::fs::write(
            &p,
            "{\"format\":\"other/9\",\"source\":{\"uri\":\"x\",\"size\":1}}",
        )
        .expect("write");
        let pin = PinFile::for_metadata(Path::new("unused"), Some(&p)).expect("explicit");
        assert!(matches!(pin.load(), Err(PinError::Malformed { .. })));
        std::fs::write(&p, "{\"format\":").expect("write");
        let x = id(1, "x");
        assert!(matches!(
            pin.reconcile(3, &x, adopt_as(x.clone())),
            Err(PinError::Malformed { .. })
        ));
    }
}
