//! The files of the hydration order: `--hydrate-first FILE` (byte ranges hydrated, in the
//! file's order, before the rest of the background pass) and `--record-reads FILE` (the
//! ranges clients first read cold, appended in the same format, for the next clone).
//!
//! Both are range lists ([`clonebd_core::ranges::parse_range_list`]: one `OFFSET LENGTH`
//! per line, `k`/`m`/`g`/`t` suffixes, `#` comments), and both are checked whole against
//! the clone's size before anything is opened for writing: a malformed line, or a range
//! past the clone's end, is refused naming the file and the line. A `--record-reads` file
//! that does not exist yet is created, empty; one that exists is appended to, so it can be
//! the next start's `--hydrate-first` file as well.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use clonebd_core::errno::describe;
use clonebd_core::ranges::{ByteRange, RangeLineError, parse_range_list};
use thiserror::Error;

/// The files `clonebd run` was given for the hydration order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderFiles {
    /// `--hydrate-first FILE`: ranges to hydrate before the rest, in this order.
    pub hydrate_first: Option<PathBuf>,
    /// `--record-reads FILE`: where the first cold reads are appended.
    pub record_reads: Option<PathBuf>,
}

/// Why a file of the hydration order cannot be used. The message names the flag's file
/// and the line.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum OrderFileError {
    /// A line is not a range, or its range is past the clone's end.
    #[error("{role} file {}: {error}", .path.display())]
    Line {
        /// `hydrate-first` or `record-reads`.
        role: &'static str,
        /// The file.
        path: PathBuf,
        /// The line and what is wrong with it.
        error: RangeLineError,
    },
    /// The file cannot be read, or opened for appending.
    #[error("{role} file {}: cannot {what} it: {}", .path.display(), describe(.error))]
    Io {
        /// `hydrate-first` or `record-reads`.
        role: &'static str,
        /// The file.
        path: PathBuf,
        /// `read` or `open for appending`.
        what: &'static str,
        /// The system's error.
        error: io::Error,
    },
}

/// Reads and checks the `--hydrate-first` file for a clone of `size` bytes.
pub fn hydrate_first(path: &Path, size: u64) -> Result<Vec<ByteRange>, OrderFileError> {
    read_checked("hydrate-first", path, size)?.ok_or_else(|| OrderFileError::Io {
        role: "hydrate-first",
        path: path.to_path_buf(),
        what: "read",
        error: io::Error::from(io::ErrorKind::NotFound),
    })
}

/// Checks what the `--record-reads` file holds already (if it exists) for a clone of `size`
/// bytes, then opens it for appending, creating it if needed: the file, and whether this
/// created it.
pub fn record_reads(path: &Path, size: u64) -> Result<(File, bool), OrderFileError> {
    let role = "record-reads";
    let existed = read_checked(role, path, size)?.is_some();
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .map(|f| (f, !existed))
        .map_err(|error| OrderFileError::Io {
            role,
            path: path.to_path_buf(),
            what: "open for appending",
            error,
        })
}

/// The ranges of the file at `path`, each inside `size` bytes; `None` if there is no file.
fn read_checked(
    role: &'static str,
    path: &Path,
    size: u64,
) -> Result<Option<Vec<ByteRange>>, OrderFileError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(OrderFileError::Io {
                role,
                path: path.to_path_buf(),
                what: "read",
                error,
            });
        }
    };
    parse_range_list(&text, Some(size))
        .map(Some)
        .map_err(|error| OrderFileError::Line {
            role,
            path: path.to_path_buf(),
            error,
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_bad_line_is_refused_naming_the_file_and_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("order");
        std::fs::write(&p, "0 64k\n# comment\n8m 64k\n").unwrap();
        let e = hydrate_first(&p, 8 << 20).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "hydrate-first file {}: line 3: the range 8388608 +65536 ends past the clone's end (8388608 bytes)",
                p.display()
            )
        );
        let e = record_reads(&p, 8 << 20).unwrap_err();
        assert!(e.to_string().starts_with("record-reads file "), "{e}");
        assert!(e.to_string().contains(": line 3: "), "{e}");
    }

    #[test]
    fn a_missing_record_file_is_created_and_a_missing_order_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("reads");
        assert!(record_reads(&p, 1 << 20).unwrap().1, "created");
        assert_eq!(std::fs::read(&p).unwrap(), b"");
        assert!(!record_reads(&p, 1 << 20).unwrap().1, "there already");
        let e = hydrate_first(&dir.path().join("none"), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("cannot read it: "), "{e}");
    }
}
