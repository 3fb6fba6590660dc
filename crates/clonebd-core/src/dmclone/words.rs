//! Splitting a table line into words, and the `<start> <len> <target>` prefix.
//!
//! `dmsetup create` reads `<start> <len> <target type>` off the table line and hands the rest,
//! untouched, to the kernel, which splits it into words: runs of white space separate words,
//! and a backslash makes the next character part of the word whatever it is (so `a\ b` is the
//! one word `a b`, and `a\\b` is `a\b`). A backslash at the very end stays a backslash.
//! [`split_table_words`] does the same. White space is what C's `isspace` accepts in ASCII:
//! space, `\t`, `\n`, `\v`, `\f` and `\r`.
//!
//! [`escape_table_word`] is the inverse for one word, used where we print a word that may
//! hold white space (a file path in the TABLE status), so that the printed line splits back
//! into the same words.

use thiserror::Error;

/// Whether `c` separates words in a table line (C `isspace`, ASCII only).
pub fn is_table_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

/// Splits a table line (or its arguments) into words, as the kernel does with the parameters
/// of a table line: white space separates, a backslash quotes the next character.
pub fn split_table_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.next_if(|&c| is_table_space(c)).is_some() {}
        if chars.peek().is_none() {
            return words;
        }
        let mut word = String::new();
        while let Some(c) = chars.next_if(|&c| !is_table_space(c)) {
            if c == '\\' {
                match chars.next() {
                    Some(quoted) => word.push(quoted),
                    None => word.push('\\'),
                }
            } else {
                word.push(c);
            }
        }
        words.push(word);
    }
}

/// Prints one word so that [`split_table_words`] reads it back unchanged: a backslash before
/// every backslash and every white-space character. Words without either (every `maj:min`,
/// every ordinary path) are returned as they are.
pub fn escape_table_word(word: &str) -> String {
    let mut out = String::with_capacity(word.len());
    for c in word.chars() {
        if c == '\\' || is_table_space(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A whole table line for one target: `<start> <len> <target type> <args>*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableLine {
    /// First sector of the target in the device (`0` for a single-target table).
    pub start: u64,
    /// Length of the target in sectors (the constructor's `target_sectors`).
    pub len: u64,
    /// The target type, e.g. `clone`.
    pub target_type: String,
    /// The words after the target type, as [`split_table_words`] splits them.
    pub args: Vec<String>,
}

/// Why a table line does not start with `<start> <len> <target type>`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TableLineError {
    /// Fewer than three words.
    #[error("a table line needs `<start> <len> <target type>', got {words} word(s)")]
    TooShort {
        /// How many words the line had.
        words: usize,
    },
    /// `<start>` or `<len>` is not a plain unsigned decimal number.
    #[error("invalid {field} `{word}' in table line: not an unsigned decimal number")]
    BadNumber {
        /// `start` or `len`.
        field: &'static str,
        /// The word as given.
        word: String,
    },
}

/// Parses a plain unsigned decimal `u64` (ASCII digits only, no overflow).
pub(crate) fn parse_plain_u64(word: &str) -> Option<u64> {
    if word.is_empty() || !word.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    word.parse().ok()
}

/// Splits a full table line into its prefix and its argument words.
///
/// `<start>` and `<len>` must be plain decimal numbers. The target type is not checked here;
/// a caller building a clone compares it with `clone`.
pub fn parse_table_line(line: &str) -> Result<TableLine, TableLineError> {
    let mut words = split_table_words(line).into_iter();
    let (Some(start), Some(len), Some(target_type)) = (words.next(), words.next(), words.next())
    else {
        return Err(TableLineError::TooShort {
            words: split_table_words(line).len(),
        });
    };
    let number = |field: &'static str, word: String| {
        parse_plain_u64(&word).ok_or(TableLineError::BadNumber { field, word })
    };
    Ok(TableLine {
        start: number("start", start)?,
        len: number("len", len)?,
        target_type,
        args: words.collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_collapses_runs_of_white_space() {
        assert_eq!(
            split_table_words(" \t/dev/a  /dev/b\n/dev/c\x0b8\x0c1\rno_hydration  "),
            ["/dev/a", "/dev/b", "/dev/c", "8", "1", "no_hydration"]
        );
        assert!(split_table_words("").is_empty());
        assert!(split_table_words(" \t\n ").is_empty());
    }

    #[test]
    fn split_honours_backslash_quoting() {
        assert_eq!(
            split_table_words(r"/tmp/a\ b c\\d e\"),
            ["/tmp/a b", r"c\d", r"e\"]
        );
        assert_eq!(split_table_words(r"\ "), [" "]);
    }

    #[test]
    fn escape_round_trips_through_split() {
        for word in [
            "/dev/vdc",
            "254:32",
            "/tmp/my disk",
            r"a\b",
            "tab\there",
            r"end\",
        ] {
            let line = format!("x {} y", escape_table_word(word));
            assert_eq!(split_table_words(&line), ["x", word, "y"], "{word:?}");
        }
        assert_eq!(escape_table_word("254:32"), "254:32");
    }

    #[test]
    fn table_line_prefix_is_parsed() {
        let line = parse_table_line("0 262144 clone /dev/vdc /dev/vdb /dev/vda 8 1 no_hydration")
            .expect("valid line");
        assert_eq!(line.start, 0);
        assert_eq!(line.len, 262_144);
        assert_eq!(line.target_type, "clone");
        assert_eq!(
            line.args,
            ["/dev/vdc", "/dev/vdb", "/dev/vda", "8", "1", "no_hydration"]
        );
    }

    #[test]
    fn table_line_rejects_short_lines_and_bad_numbers() {
        assert_eq!(
            parse_table_line("0 262144"),
            Err(TableLineError::TooShort { words: 2 })
        );
        assert_eq!(
            parse_table_line("0 -5 clone"),
            Err(TableLineError::BadNumber {
                field: "len",
                word: "-5".into()
            })
        );
        assert!(matches!(
            parse_table_line("x 5 clone"),
            Err(TableLineError::BadNumber { field: "start", .. })
        ));
        assert!(matches!(
            parse_table_line("0 99999999999999999999 clone"),
            Err(TableLineError::BadNumber { field: "len", .. })
        ));
    }
}
