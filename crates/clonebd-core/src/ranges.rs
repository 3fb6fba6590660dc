//! Sizes and byte ranges as people write them, and the range list of the hydration order.
//!
//! - [`parse_size`]: `4k`, `64KiB`, `1g`, `1073741824` (every size flag of `clonebd` uses it);
//! - [`parse_range`]: one range, `OFFSET LENGTH`, each a size (the `hydrate_range` message);
//! - [`parse_range_list`]: a text of ranges, one `OFFSET LENGTH` per line, with `#`
//!   comments and blank lines (the files of `--hydrate-first` and `--record-reads`), each
//!   error naming its line;
//! - [`ByteRange::check`]: a range lies inside a clone of a given size;
//! - [`format_range_line`]: the line [`parse_range_list`] reads back.
//!
//! Pure text in, values out: the caller reads the file and names its path.

use thiserror::Error;

/// A size that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "invalid size `{0}': expected a number of bytes with an optional k, m, g or t suffix (powers of 1024)"
)]
pub struct SizeError(pub String);

/// Parses a byte size: decimal digits with an optional binary suffix `k`, `m`, `g`, `t`
/// (optionally followed by `iB` or `B`), case-insensitive. Overflow is an error.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let err = || SizeError(s.to_string());
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return Err(err());
    }
    let n: u64 = t[..digits_end].parse().map_err(|_| err())?;
    let suffix = t[digits_end..].to_ascii_lowercase();
    let shift = match suffix.as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(err()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(err)
}

/// `[offset, offset + len)` in bytes of the clone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ByteRange {
    /// First byte.
    pub offset: u64,
    /// Length in bytes (never 0 once parsed).
    pub len: u64,
}

impl ByteRange {
    /// The byte after the range (parsing refuses ranges whose end overflows).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }

    /// Refuses a range that does not lie wholly inside a clone of `size` bytes.
    pub fn check(&self, size: u64) -> Result<(), RangeError> {
        if self.end() > size {
            return Err(RangeError::PastEnd {
                offset: self.offset,
                len: self.len,
                size,
            });
        }
        Ok(())
    }
}

/// Why a range was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RangeError {
    /// Not two words.
    #[error("expected OFFSET LENGTH (two sizes, e.g. `1g 64m`), found {found} words")]
    Words {
        /// How many words there were.
        found: usize,
    },
    /// A word is not a size.
    #[error("{0}")]
    Size(SizeError),
    /// The length is 0.
    #[error("the length is 0")]
    Empty,
    /// The range ends past the end of the clone (or past 2^64).
    #[error("the range {offset} +{len} ends past the clone's end ({size} bytes)")]
    PastEnd {
        /// The range's offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The clone's size.
        size: u64,
    },
}

/// Parses one range from its two words, `OFFSET LENGTH`.
pub fn parse_range(offset: &str, len: &str) -> Result<ByteRange, RangeError> {
    let offset = parse_size(offset).map_err(RangeError::Size)?;
    let len = parse_size(len).map_err(RangeError::Size)?;
    if len == 0 {
        return Err(RangeError::Empty);
    }
    if offset.checked_add(len).is_none() {
        return Err(RangeError::PastEnd {
            offset,
            len,
            size: u64::MAX,
        });
    }
    Ok(ByteRange { offset, len })
}

/// A line of a range list that was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("line {line}: {error}")]
pub struct RangeLineError {
    /// The line's number, from 1.
    pub line: usize,
    /// What is wrong with it.
    pub error: RangeError,
}

/// Parses a range list: one `OFFSET LENGTH` per line (words separated by blanks), blank
/// lines and everything from a `#` to the end of its line ignored. With `size`, every
/// range must lie inside a clone of that many bytes. The ranges come back in the file's
/// order; the first bad line is the error.
pub fn parse_range_list(text: &str, size: Option<u64>) -> Result<Vec<ByteRange>, RangeLineError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let at = |error| RangeLineError { line: i + 1, error };
        let content = raw.split('#').next().unwrap_or("");
        let words: Vec<&str> = content.split_whitespace().collect();
        let range = match words[..] {
            [] => continue,
            [offset, len] => parse_range(offset, len).map_err(at)?,
            _ => return Err(at(RangeError::Words { found: words.len() })),
        };
        if let Some(size) = size {
            range.check(size).map_err(at)?;
        }
        out.push(range);
    }
    Ok(out)
}

/// The line for `range` in a range list, newline included: `OFFSET LENGTH` in bytes.
pub fn format_range_line(range: ByteRange) -> String {
    format!("{} {}\n", range.offset, range.len)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("4x").is_err());
        assert!(parse_size("-4k").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("20000000t").is_err());
    }

    #[test]
    fn range_list_with_suffixes_comments_and_blank_lines_parses_in_order() {
        let text = "# boot order\n1m 64k\n\n  0 4096   # the first block\n2G 1m\n";
        let got = parse_range_list(text, Some(4 << 30)).unwrap();
        let want = [(1 << 20, 64 << 10), (0, 4096), (2 << 30, 1 << 20)];
        let want: Vec<ByteRange> = want
            .iter()
            .map(|&(offset, len)| ByteRange { offset, len })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn range_list_bad_line_is_refused_with_its_number() {
        let cases = [
            ("0 4k\n\n1m\n", 3, RangeError::Words { found: 1 }),
            ("0 4k\n1m 4k 8k\n", 2, RangeError::Words { found: 3 }),
            (
                "# x\n1q 4k\n",
                2,
                RangeError::Size(SizeError("1q".to_string())),
            ),
            ("0 0\n", 1, RangeError::Empty),
            (
                "0 4k\n0 4k\n1m 1\n",
                3,
                RangeError::PastEnd {
                    offset: 1 << 20,
                    len: 1,
                    size: 1 << 20,
                },
            ),
        ];
        for (text, line, error) in cases {
            assert_eq!(
                parse_range_list(text, Some(1 << 20)),
                Err(RangeLineError { line, error }),
                "{text:?}"
            );
        }
    }

    #[test]
    fn range_whose_end_overflows_is_refused() {
        assert!(matches!(
            parse_range("16777215t", "1t"),
            Err(RangeError::PastEnd { .. })
        ));
    }

    #[test]
    fn formatted_lines_read_back() {
        let r = ByteRange {
            offset: 3 << 20,
            len: 128 << 10,
        };
        assert_eq!(format_range_line(r), "3145728 131072\n");
        assert_eq!(
            parse_range_list(&format_range_line(r), Some(4 << 20)),
            Ok(vec![r])
        );
    }

    #[test]
    fn line_error_names_the_line() {
        let e = parse_range_list("0 4k\nfoo bar\n", None).unwrap_err();
        assert!(
            e.to_string().starts_with("line 2: invalid size `foo'"),
            "{e}"
        );
    }
}
