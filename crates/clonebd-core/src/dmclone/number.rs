//! The two ways the kernel reads an unsigned number out of a dm-clone word.
//!
//! dm-clone reads numbers with two different routines, and they accept different spellings:
//!
//! - **Counts and the region size** go through device-mapper's argument reader, which scans the
//!   word with `sscanf("%u%c")` and wants exactly one conversion: the word is a plain run of
//!   decimal digits with nothing after it. No sign (`+8` and `-8` are refused, SPEC 11), no
//!   `0x` (`0x8` scans as `0` followed by `x`, refused), no unit (`8k`). See [`parse_scan_u32`].
//! - **Core argument and message values** (`hydration_threshold`, `hydration_batch_size`) go
//!   through `kstrtouint(.., 10, ..)`: an optional leading `+`, decimal digits, at most one
//!   trailing `\n`, and a value that fits in 32 bits. See [`parse_kstrtouint`].
//!
//! One deliberate difference (SPEC 1.2 quirks): the kernel's `%u` scanner does not detect
//! overflow, so `4294967304` wraps to `8` there and is accepted as a region size. Here a value
//! that does not fit in 32 bits is always refused.
//!
//! The kernel's scanner also skips leading white space before `%u`; a word produced by
//! splitting a table line on white space (see [`super::split_table_words`]) can only contain
//! white space when it was escaped with a backslash, and such a word is refused here.

use thiserror::Error;

use super::errno;

/// Why a word is not an acceptable unsigned number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum NumberError {
    /// The word is not spelled as the routine requires (empty, a sign, a letter, ...).
    #[error("not an unsigned decimal number")]
    Invalid,
    /// The word is spelled correctly but its value does not fit in 32 bits.
    #[error("number out of range for an unsigned 32-bit value")]
    OutOfRange,
}

impl NumberError {
    /// The errno `kstrtouint` returns for this failure (`EINVAL` or `ERANGE`). dm-clone itself
    /// turns every failure into `EINVAL`.
    pub fn errno(self) -> i32 {
        match self {
            Self::Invalid => errno::EINVAL,
            Self::OutOfRange => errno::ERANGE,
        }
    }
}

/// Accumulates a run of ASCII decimal digits into a `u32`, refusing overflow. `digits` must be
/// non-empty and all digits; the callers check that.
fn digits_to_u32(digits: &str) -> Result<u32, NumberError> {
    digits.bytes().try_fold(0u32, |acc, b| {
        acc.checked_mul(10)
            .and_then(|v| v.checked_add(u32::from(b - b'0')))
            .ok_or(NumberError::OutOfRange)
    })
}

/// Reads a count or a region size the way device-mapper's argument reader does
/// (`sscanf(word, "%u%c")` must return exactly 1): one or more ASCII decimal digits and
/// nothing else.
///
/// Values above `u32::MAX` are refused with [`NumberError::OutOfRange`] (the kernel's scanner
/// would wrap them; see the module docs).
pub fn parse_scan_u32(word: &str) -> Result<u32, NumberError> {
    if word.is_empty() || !word.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NumberError::Invalid);
    }
    digits_to_u32(word)
}

/// Reads a value the way the kernel's `kstrtouint(word, 10, &v)` does: an optional leading
/// `+`, one or more ASCII decimal digits, an optional single trailing `\n`, nothing else, and
/// a value of at most 4294967295.
///
/// `-`, leading white space, `0x` and an empty word are [`NumberError::Invalid`]; a value
/// above `u32::MAX` is [`NumberError::OutOfRange`].
pub fn parse_kstrtouint(word: &str) -> Result<u32, NumberError> {
    let unsigned = word.strip_prefix('+').unwrap_or(word);
    let digits = unsigned.strip_suffix('\n').unwrap_or(unsigned);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NumberError::Invalid);
    }
    digits_to_u32(digits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_u32_accepts_plain_digits_only() {
        assert_eq!(parse_scan_u32("8"), Ok(8));
        assert_eq!(parse_scan_u32("0"), Ok(0));
        assert_eq!(parse_scan_u32("0008"), Ok(8));
        assert_eq!(parse_scan_u32("4294967295"), Ok(u32::MAX));
        for bad in ["", "+8", "-8", "8k", "0x8", "abc", " 8", "8 ", "8\n", "８"] {
            assert_eq!(parse_scan_u32(bad), Err(NumberError::Invalid), "{bad:?}");
        }
    }

    #[test]
    fn scan_u32_refuses_values_the_kernel_would_wrap() {
        assert_eq!(parse_scan_u32("4294967296"), Err(NumberError::OutOfRange));
        assert_eq!(parse_scan_u32("4294967304"), Err(NumberError::OutOfRange));
        assert_eq!(
            parse_scan_u32("99999999999999999999999"),
            Err(NumberError::OutOfRange)
        );
    }

    #[test]
    fn kstrtouint_accepts_plus_and_one_trailing_newline() {
        assert_eq!(parse_kstrtouint("0"), Ok(0));
        assert_eq!(parse_kstrtouint("+64"), Ok(64));
        assert_eq!(parse_kstrtouint("64\n"), Ok(64));
        assert_eq!(parse_kstrtouint("+64\n"), Ok(64));
        assert_eq!(parse_kstrtouint("007"), Ok(7));
        assert_eq!(parse_kstrtouint("4294967295"), Ok(u32::MAX));
    }

    #[test]
    fn kstrtouint_refuses_signs_hex_spaces_and_extra_newlines() {
        for bad in [
            "", "+", "\n", "+\n", "-1", "-0", "++1", "0x10", "1a", "abc", " 1", "1 ", "1\n\n",
            "\n1", "1\r", "+-1",
        ] {
            assert_eq!(parse_kstrtouint(bad), Err(NumberError::Invalid), "{bad:?}");
        }
    }

    #[test]
    fn kstrtouint_reports_overflow_as_out_of_range() {
        assert_eq!(parse_kstrtouint("4294967296"), Err(NumberError::OutOfRange));
        assert_eq!(NumberError::OutOfRange.errno(), errno::ERANGE);
        assert_eq!(NumberError::Invalid.errno(), errno::EINVAL);
    }
}
