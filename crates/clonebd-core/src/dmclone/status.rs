//! The INFO status line (`dmsetup status`, SPEC 2.1), printed byte for byte as the kernel
//! prints it, and read back.
//!
//! ```text
//! <md block size> <md used>/<md total> <region size> <hydrated>/<nr regions> <hydrating>
//!     <#features> [no_hydration] [no_discard_passdown]
//!     4 hydration_threshold <T> hydration_batch_size <B> <rw|ro>
//! ```
//!
//! One space between fields, none at the end. In fail mode the whole status is `Fail`; when
//! the metadata block counts cannot be read it is `Error`. `dmsetup` puts
//! `<start> <len> clone ` in front ([`format_status_line`]).
//!
//! Numbers are `u64` throughout, so 2^31 hydrated regions print as `2147483648` (SPEC F7:
//! the kernel once printed `18446744071562067968` there).
//!
//! [`parse_status`] reads either form back, with or without the `dmsetup` prefix (and with
//! the `<name>: ` that `dmsetup status` puts in front when it lists every device), for tests
//! and for clients that poll the status. It splits on runs of white space and ignores white
//! space at either end, so a line read with its newline parses too.

use std::fmt;

use thiserror::Error;

use super::words::parse_plain_u64;

/// The metadata block size the status reports, in sectors (4096 bytes).
pub const METADATA_BLOCK_SECTORS: u64 = 8;
/// The status when the metadata block counts could not be read.
pub const ERROR_STATUS: &str = "Error";
/// The status in fail mode.
pub const FAIL_STATUS: &str = "Fail";

/// The metadata mode (SPEC 5.7): read-write, then read-only after a failed metadata
/// operation, then fail if even the recovery failed. There is no way back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetadataMode {
    /// `rw`: normal operation.
    ReadWrite,
    /// `ro`: a metadata operation failed; no new hydration, writes to unhydrated regions fail.
    ReadOnly,
    /// `Fail`: every I/O fails; the status is just `Fail`.
    Fail,
}

impl MetadataMode {
    /// The word the status line uses: `rw`, `ro` or `Fail`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReadWrite => "rw",
            Self::ReadOnly => "ro",
            Self::Fail => FAIL_STATUS,
        }
    }
}

impl fmt::Display for MetadataMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything the INFO status shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatusInfo {
    /// Metadata blocks in use (total minus free in the metadata space map).
    pub md_used: u64,
    /// Metadata blocks in all: `min(metadata bytes / 4096, 4161600)`.
    pub md_total: u64,
    /// Region size in sectors.
    pub region_sectors: u64,
    /// Regions hydrated in core (committed or not).
    pub nr_hydrated: u64,
    /// Regions in all.
    pub nr_regions: u64,
    /// Hydrations in flight (background, write-triggered and overwrites, plus the pass's guard).
    pub hydrating: u64,
    /// Background hydration is currently enabled (`no_hydration` is shown when not).
    pub hydration_enabled: bool,
    /// Discards are currently passed down (`no_discard_passdown` is shown when not).
    pub discard_passdown: bool,
    /// Current `hydration_threshold`.
    pub hydration_threshold: u32,
    /// Current `hydration_batch_size`.
    pub hydration_batch_size: u32,
    /// Current metadata mode.
    pub mode: MetadataMode,
}

/// A status as `dmsetup status` can show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusLine {
    /// The normal form.
    Info(StatusInfo),
    /// `Fail`: the device is in fail mode.
    Fail,
    /// `Error`: the metadata block counts could not be read.
    Error,
}

impl fmt::Display for StatusLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Info(info) => f.write_str(&format_status(info)),
            Self::Fail => f.write_str(FAIL_STATUS),
            Self::Error => f.write_str(ERROR_STATUS),
        }
    }
}

/// The INFO status, without the `dmsetup` prefix: the normal form, or `Fail` in fail mode.
pub fn format_status(info: &StatusInfo) -> String {
    if info.mode == MetadataMode::Fail {
        return FAIL_STATUS.to_owned();
    }
    let mut features = Vec::with_capacity(2);
    if !info.hydration_enabled {
        features.push("no_hydration");
    }
    if !info.discard_passdown {
        features.push("no_discard_passdown");
    }
    let mut out = format!(
        "{METADATA_BLOCK_SECTORS} {}/{} {} {}/{} {} {}",
        info.md_used,
        info.md_total,
        info.region_sectors,
        info.nr_hydrated,
        info.nr_regions,
        info.hydrating,
        features.len(),
    );
    for feature in features {
        out.push(' ');
        out.push_str(feature);
    }
    out.push_str(&format!(
        " 4 hydration_threshold {} hydration_batch_size {} {}",
        info.hydration_threshold, info.hydration_batch_size, info.mode
    ));
    out
}

/// [`format_status`] with the `dmsetup status` prefix `0 <len> clone `.
pub fn format_status_line(target_sectors: u64, info: &StatusInfo) -> String {
    format!("0 {target_sectors} clone {}", format_status(info))
}

/// The status when the metadata block counts cannot be read: `Error`.
pub fn format_error_status() -> &'static str {
    ERROR_STATUS
}

/// Why a line is not a dm-clone status.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum StatusParseError {
    /// Nothing but white space (after any prefix).
    #[error("empty dm-clone status")]
    Empty,
    /// The line ended before this field.
    #[error("dm-clone status ends before its {field}")]
    Missing {
        /// The field that is missing.
        field: &'static str,
    },
    /// This field does not hold what it should.
    #[error("dm-clone status has an invalid {field}: `{word}'")]
    BadField {
        /// The field.
        field: &'static str,
        /// The word found there.
        word: String,
    },
    /// Words after the mode.
    #[error("dm-clone status has words after the mode: `{}'", words.join(" "))]
    Trailing {
        /// The extra words.
        words: Vec<String>,
    },
}

/// Drops `<start> <len> clone` (optionally after `<name>:`) from the front of `words`.
fn strip_prefix<'a, 'w>(words: &'a [&'w str]) -> &'a [&'w str] {
    let is_prefix = |w: &[&str]| {
        matches!(w, [start, len, "clone", ..]
            if parse_plain_u64(start).is_some() && parse_plain_u64(len).is_some())
    };
    if is_prefix(words) {
        return &words[3..];
    }
    match words.split_first() {
        Some((name, rest)) if name.ends_with(':') && is_prefix(rest) => &rest[3..],
        _ => words,
    }
}

/// A cursor over the status words that names the field it is reading.
struct Fields<'a, 'w> {
    words: std::slice::Iter<'a, &'w str>,
}

impl<'w> Fields<'_, 'w> {
    fn word(&mut self, field: &'static str) -> Result<&'w str, StatusParseError> {
        self.words
            .next()
            .copied()
            .ok_or(StatusParseError::Missing { field })
    }

    fn bad(field: &'static str, word: &str) -> StatusParseError {
        StatusParseError::BadField {
            field,
            word: word.to_owned(),
        }
    }

    fn number(&mut self, field: &'static str) -> Result<u64, StatusParseError> {
        let word = self.word(field)?;
        parse_plain_u64(word).ok_or_else(|| Self::bad(field, word))
    }

    fn number_u32(&mut self, field: &'static str) -> Result<u32, StatusParseError> {
        let word = self.word(field)?;
        parse_plain_u64(word)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| Self::bad(field, word))
    }

    fn ratio(&mut self, field: &'static str) -> Result<(u64, u64), StatusParseError> {
        let word = self.word(field)?;
        word.split_once('/')
            .and_then(|(a, b)| Some((parse_plain_u64(a)?, parse_plain_u64(b)?)))
            .ok_or_else(|| Self::bad(field, word))
    }

    fn literal(&mut self, field: &'static str, expected: &str) -> Result<(), StatusParseError> {
        let word = self.word(field)?;
        if word == expected {
            Ok(())
        } else {
            Err(Self::bad(field, word))
        }
    }
}

/// Reads a status back: the normal form, `Fail` or `Error`, with or without the `dmsetup`
/// prefix.
///
/// The normal form must have metadata block size `8`, a feature count matching the features
/// listed (each of `no_hydration` and `no_discard_passdown` at most once), the core group
/// `4 hydration_threshold <T> hydration_batch_size <B>` (the two pairs in either order), and
/// a mode of `rw`, `ro` or `Fail`.
pub fn parse_status(line: &str) -> Result<StatusLine, StatusParseError> {
    let all: Vec<&str> = line.split_ascii_whitespace().collect();
    let words = strip_prefix(&all);
    match words {
        [] => return Err(StatusParseError::Empty),
        [w] if *w == FAIL_STATUS => return Ok(StatusLine::Fail),
        [w] if *w == ERROR_STATUS => return Ok(StatusLine::Error),
        _ => {}
    }
    let mut f = Fields {
        words: words.iter(),
    };
    f.literal("metadata block size", "8")?;
    let (md_used, md_total) = f.ratio("metadata usage")?;
    let region_sectors = f.number("region size")?;
    let (nr_hydrated, nr_regions) = f.ratio("hydrated count")?;
    let hydrating = f.number("hydrating count")?;

    let nr_features = f.number("feature count")?;
    if nr_features > 2 {
        return Err(Fields::bad("feature count", &nr_features.to_string()));
    }
    let mut hydration_enabled = true;
    let mut discard_passdown = true;
    for _ in 0..nr_features {
        let word = f.word("feature")?;
        let flag = match word {
            "no_hydration" => &mut hydration_enabled,
            "no_discard_passdown" => &mut discard_passdown,
            _ => return Err(Fields::bad("feature", word)),
        };
        if !*flag {
            return Err(Fields::bad("feature", word));
        }
        *flag = false;
    }

    f.literal("core argument count", "4")?;
    let mut threshold = None;
    let mut batch_size = None;
    for _ in 0..2 {
        let key = f.word("core argument")?;
        let slot = match key {
            "hydration_threshold" => &mut threshold,
            "hydration_batch_size" => &mut batch_size,
            _ => return Err(Fields::bad("core argument", key)),
        };
        if slot.is_some() {
            return Err(Fields::bad("core argument", key));
        }
        *slot = Some(f.number_u32(key_field(key))?);
    }
    let (Some(hydration_threshold), Some(hydration_batch_size)) = (threshold, batch_size) else {
        return Err(StatusParseError::Missing {
            field: "core argument",
        });
    };

    let mode_word = f.word("mode")?;
    let mode = match mode_word {
        "rw" => MetadataMode::ReadWrite,
        "ro" => MetadataMode::ReadOnly,
        FAIL_STATUS => MetadataMode::Fail,
        _ => return Err(Fields::bad("mode", mode_word)),
    };
    let trailing: Vec<String> = f.words.map(|w| (*w).to_owned()).collect();
    if !trailing.is_empty() {
        return Err(StatusParseError::Trailing { words: trailing });
    }
    Ok(StatusLine::Info(StatusInfo {
        md_used,
        md_total,
        region_sectors,
        nr_hydrated,
        nr_regions,
        hydrating,
        hydration_enabled,
        discard_passdown,
        hydration_threshold,
        hydration_batch_size,
        mode,
    }))
}

/// The field name for a core argument's value.
fn key_field(key: &str) -> &'static str {
    if key == "hydration_threshold" {
        "hydration_threshold value"
    } else {
        "hydration_batch_size value"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> StatusInfo {
        StatusInfo {
            md_used: 7,
            md_total: 2048,
            region_sectors: 8,
            nr_hydrated: 0,
            nr_regions: 32768,
            hydrating: 0,
            hydration_enabled: false,
            discard_passdown: true,
            hydration_threshold: 1,
            hydration_batch_size: 1,
            mode: MetadataMode::ReadWrite,
        }
    }

    #[test]
    fn fail_mode_prints_only_fail() {
        let info = StatusInfo {
            mode: MetadataMode::Fail,
            ..fresh()
        };
        assert_eq!(format_status(&info), "Fail");
        assert_eq!(format_status_line(8, &info), "0 8 clone Fail");
        assert_eq!(format_error_status(), "Error");
        assert_eq!(StatusLine::Error.to_string(), "Error");
    }

    #[test]
    fn parse_accepts_name_prefix_and_newline() {
        let line = "clone: 0 262144 clone 8 7/2048 8 0/32768 0 1 no_hydration \
                    4 hydration_threshold 1 hydration_batch_size 1 rw\n";
        assert_eq!(parse_status(line), Ok(StatusLine::Info(fresh())));
        assert_eq!(parse_status("0 8 clone Fail"), Ok(StatusLine::Fail));
        assert_eq!(parse_status("Error\n"), Ok(StatusLine::Error));
    }

    #[test]
    fn parse_accepts_core_pairs_in_either_order() {
        let line = "8 7/2048 8 0/32768 0 1 no_hydration \
                    4 hydration_batch_size 1 hydration_threshold 1 rw";
        assert_eq!(parse_status(line), Ok(StatusLine::Info(fresh())));
    }

    #[test]
    fn parse_rejects_malformed_lines() {
        let ok =
            "8 7/2048 8 0/32768 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1";
        let cases = [
            ("", StatusParseError::Empty),
            ("0 262144 clone", StatusParseError::Empty),
            (ok, StatusParseError::Missing { field: "mode" }),
        ];
        for (line, err) in cases {
            assert_eq!(parse_status(line), Err(err), "{line:?}");
        }
        for line in [
            "16 7/2048 8 0/32768 0 0 4 hydration_threshold 1 hydration_batch_size 1 rw",
            "8 7-2048 8 0/32768 0 0 4 hydration_threshold 1 hydration_batch_size 1 rw",
            "8 7/2048 8 0/32768 +0 0 4 hydration_threshold 1 hydration_batch_size 1 rw",
            "8 7/2048 8 0/32768 0 1 foo 4 hydration_threshold 1 hydration_batch_size 1 rw",
            "8 7/2048 8 0/32768 0 2 no_hydration no_hydration 4 hydration_threshold 1 \
             hydration_batch_size 1 rw",
            "8 7/2048 8 0/32768 0 3 a b c 4 hydration_threshold 1 hydration_batch_size 1 rw",
            "8 7/2048 8 0/32768 0 0 2 hydration_threshold 1 rw",
            "8 7/2048 8 0/32768 0 0 4 hydration_threshold 1 hydration_threshold 1 rw",
            "8 7/2048 8 0/32768 0 0 4 hydration_threshold 4294967296 hydration_batch_size 1 rw",
            "8 7/2048 8 0/32768 0 0 4 hydration_threshold 1 hydration_batch_size 1 RW",
        ] {
            assert!(
                matches!(parse_status(line), Err(StatusParseError::BadField { .. })),
                "{line:?}"
            );
        }
        assert_eq!(
            parse_status(&format!("{ok} rw junk")),
            Err(StatusParseError::Trailing {
                words: vec!["junk".into()]
            })
        );
    }
}
