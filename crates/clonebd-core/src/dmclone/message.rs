//! Messages (`dmsetup message <dev> 0 <words>`, SPEC 2.3): parsed here, applied by the engine.
//!
//! | words | result |
//! |---|---|
//! | `enable_hydration` / `disable_hydration` | accepted |
//! | `hydration_threshold N` / `hydration_batch_size N` | accepted when `N` is a `kstrtouint` number |
//! | `hydrate_range OFFSET LENGTH` (clonebd only) | accepted when both are sizes ([`parse_range`]) |
//! | any other two words | `EINVAL`; the kernel logs ``Unsupported message `<name>'`` |
//! | no words, or any other count | `EINVAL` |
//!
//! Names match case-insensitively. Every failure is `EINVAL`.
//!
//! Where clonebd differs from the kernel on purpose (SPEC D3, H4): the kernel ignores words
//! after `enable_hydration` and `disable_hydration`; here they are refused with
//! [`MessageError::ExtraWords`], so a mistyped message is not silently half-applied.
//!
//! `hydrate_range OFFSET LENGTH` is clonebd's own (SPEC D6, hydration order): it queues the
//! regions the byte range touches at the front of background hydration. Its words are read
//! by the range parser of the `--hydrate-first` file ([`parse_range`]), so `1g 64m` means
//! the same in both; whether the range lies inside the clone is the caller's check
//! ([`ByteRange::check`](crate::ranges::ByteRange::check)), which knows the clone's size.

use std::fmt;

use thiserror::Error;

use super::errno;
use super::number::parse_kstrtouint;
use super::words::escape_table_word;
use crate::ranges::{ByteRange, RangeError, parse_range};

/// A message the clone accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Message {
    /// `enable_hydration`: start (or resume) background hydration.
    EnableHydration,
    /// `disable_hydration`: start no new background copies; those in flight finish.
    DisableHydration,
    /// `hydration_threshold N`: at most `N` regions hydrating in the background; 0 stops.
    HydrationThreshold(u32),
    /// `hydration_batch_size N`: copy up to `N` contiguous regions in one job.
    HydrationBatchSize(u32),
    /// `hydrate_range OFFSET LENGTH` (clonebd only): hydrate the regions this byte range
    /// touches before any other in the background.
    HydrateRange(ByteRange),
}

impl fmt::Display for Message {
    /// The message as words, in the kernel's spelling, e.g. `hydration_threshold 64`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EnableHydration => f.write_str("enable_hydration"),
            Self::DisableHydration => f.write_str("disable_hydration"),
            Self::HydrationThreshold(n) => write!(f, "hydration_threshold {n}"),
            Self::HydrationBatchSize(n) => write!(f, "hydration_batch_size {n}"),
            Self::HydrateRange(r) => write!(f, "hydrate_range {} {}", r.offset, r.len),
        }
    }
}

/// Which way a message failed; one per [`MessageError`] variant, for matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MessageErrorKind {
    /// No words at all.
    Empty,
    /// H4 (clonebd only): words after `enable_hydration` or `disable_hydration`.
    ExtraWords,
    /// A tuning message with a value that is not a `kstrtouint` number.
    InvalidValue,
    /// `hydrate_range` with words that are not a range.
    InvalidRange,
    /// Two words, and the first is not a message name.
    Unsupported,
    /// A word count no message has.
    WrongWordCount,
}

/// Why a message was refused. Every case is `EINVAL` ([`MessageError::errno`]).
///
/// `Display` is what a user should see:
/// - [`MessageError::Empty`]: the kernel's log line, `Empty message received.`;
/// - [`MessageError::Unsupported`]: the kernel's log line, ``Unsupported message `FOO'``, with
///   the name as given;
/// - [`MessageError::ExtraWords`] (clonebd only): names the extra words;
/// - the rest: `Invalid argument`, what `dmsetup` prints for `EINVAL` (the kernel logs
///   nothing for them).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum MessageError {
    /// No words at all.
    #[error("Empty message received.")]
    Empty,
    /// clonebd only (SPEC H4): words after `enable_hydration` or `disable_hydration`, which
    /// the kernel ignores.
    #[error(
        "Unexpected trailing arguments after `{name}': `{}'",
        join_escaped(extra)
    )]
    ExtraWords {
        /// The message name, as given.
        name: String,
        /// The extra words.
        extra: Vec<String>,
    },
    /// `hydration_threshold` or `hydration_batch_size` with a value that is not a number.
    #[error("Invalid argument")]
    InvalidValue {
        /// The message name, as given.
        name: String,
        /// The value, as given.
        value: String,
    },
    /// clonebd only: `hydrate_range` whose words are not `OFFSET LENGTH` sizes.
    #[error("{name}: {error}")]
    InvalidRange {
        /// The message name, as given.
        name: String,
        /// What is wrong with the range.
        error: RangeError,
    },
    /// Two words, and the first is not a message name.
    #[error("Unsupported message `{name}'")]
    Unsupported {
        /// The name, as given.
        name: String,
    },
    /// One word, or three or more, that do not start with `enable_hydration` or
    /// `disable_hydration`.
    #[error("Invalid argument")]
    WrongWordCount {
        /// The first word, as given.
        name: String,
        /// How many words there were.
        words: usize,
    },
}

impl MessageError {
    /// Which way the message failed.
    pub fn kind(&self) -> MessageErrorKind {
        match self {
            Self::Empty => MessageErrorKind::Empty,
            Self::ExtraWords { .. } => MessageErrorKind::ExtraWords,
            Self::InvalidValue { .. } => MessageErrorKind::InvalidValue,
            Self::InvalidRange { .. } => MessageErrorKind::InvalidRange,
            Self::Unsupported { .. } => MessageErrorKind::Unsupported,
            Self::WrongWordCount { .. } => MessageErrorKind::WrongWordCount,
        }
    }

    /// The errno: always `EINVAL`, as in the kernel.
    pub fn errno(&self) -> i32 {
        errno::EINVAL
    }
}

/// The extra words for the H4 message, escaped so that a word holding a space shows as one.
fn join_escaped(words: &[String]) -> String {
    words
        .iter()
        .map(|w| escape_table_word(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses the words of a message, in the kernel's order: no words; `enable_hydration` and
/// `disable_hydration` (alone, here); clonebd's `hydrate_range`; then only two-word messages
/// are considered.
pub fn parse_message(words: &[&str]) -> Result<Message, MessageError> {
    let Some((name, rest)) = words.split_first() else {
        return Err(MessageError::Empty);
    };
    let name: &str = name;
    if name.eq_ignore_ascii_case("hydrate_range") {
        let range = match rest {
            [offset, len] => parse_range(offset, len),
            _ => Err(RangeError::Words { found: rest.len() }),
        };
        return range
            .map(Message::HydrateRange)
            .map_err(|error| MessageError::InvalidRange {
                name: name.to_owned(),
                error,
            });
    }
    let toggle = if name.eq_ignore_ascii_case("enable_hydration") {
        Some(Message::EnableHydration)
    } else if name.eq_ignore_ascii_case("disable_hydration") {
        Some(Message::DisableHydration)
    } else {
        None
    };
    if let Some(message) = toggle {
        if rest.is_empty() {
            return Ok(message);
        }
        return Err(MessageError::ExtraWords {
            name: name.to_owned(),
            extra: rest.iter().map(|w| (*w).to_owned()).collect(),
        });
    }

    let [value] = rest else {
        return Err(MessageError::WrongWordCount {
            name: name.to_owned(),
            words: words.len(),
        });
    };
    let value: &str = value;
    let tuning: fn(u32) -> Message = if name.eq_ignore_ascii_case("hydration_threshold") {
        Message::HydrationThreshold
    } else if name.eq_ignore_ascii_case("hydration_batch_size") {
        Message::HydrationBatchSize
    } else {
        return Err(MessageError::Unsupported {
            name: name.to_owned(),
        });
    };
    parse_kstrtouint(value)
        .map(tuning)
        .map_err(|_| MessageError::InvalidValue {
            name: name.to_owned(),
            value: value.to_owned(),
        })
}
