//! Messages against SPEC 2.3 and every message case of SPEC 11, with the deliberate H4
//! difference: words after `enable_hydration` / `disable_hydration` are refused.

use clonebd_core::dmclone::errno::EINVAL;
use clonebd_core::dmclone::{
    Message, MessageError, MessageErrorKind, parse_message, split_table_words,
};
use proptest::prelude::*;

/// Parses a message typed as on the `dmsetup message` command line.
fn msg(text: &str) -> Result<Message, MessageError> {
    let words = split_table_words(text);
    let refs: Vec<&str> = words.iter().map(String::as_str).collect();
    parse_message(&refs)
}

#[track_caller]
fn assert_refused(text: &str, display: &str, kind: MessageErrorKind) {
    match msg(text) {
        Ok(m) => panic!("`{text}' should be refused, got {m:?}"),
        Err(e) => {
            assert_eq!(e.to_string(), display, "`{text}'");
            assert_eq!(e.kind(), kind, "`{text}'");
            assert_eq!(e.errno(), EINVAL, "`{text}'");
        }
    }
}

#[test]
fn message_spec11_accepted_cases() {
    let cases = [
        ("disable_hydration", Message::DisableHydration),
        ("enable_hydration", Message::EnableHydration),
        ("ENABLE_HYDRATION", Message::EnableHydration),
        ("Disable_Hydration", Message::DisableHydration),
        ("hydration_threshold 0", Message::HydrationThreshold(0)),
        ("hydration_batch_size 0", Message::HydrationBatchSize(0)),
        ("hydration_threshold 64", Message::HydrationThreshold(64)),
        ("hydration_batch_size 32", Message::HydrationBatchSize(32)),
        ("HYDRATION_THRESHOLD 7", Message::HydrationThreshold(7)),
    ];
    for (text, expected) in cases {
        assert_eq!(msg(text), Ok(expected), "`{text}'");
    }
}

#[test]
fn message_values_follow_kstrtouint() {
    assert_eq!(
        parse_message(&["hydration_threshold", "+5"]),
        Ok(Message::HydrationThreshold(5))
    );
    assert_eq!(
        parse_message(&["hydration_batch_size", "5\n"]),
        Ok(Message::HydrationBatchSize(5))
    );
    assert_eq!(
        parse_message(&["hydration_threshold", "4294967295"]),
        Ok(Message::HydrationThreshold(u32::MAX))
    );
    for value in ["4294967296", "0x10", "1\n\n", "", " 1"] {
        let e = parse_message(&["hydration_batch_size", value]).expect_err(value);
        assert_eq!(e.kind(), MessageErrorKind::InvalidValue, "{value:?}");
        assert_eq!(e.to_string(), "Invalid argument");
    }
}

#[test]
fn message_h4_extra_words_after_toggles_are_refused() {
    // The kernel accepts `disable_hydration extra_arg` and ignores the extra word (SPEC 11);
    // clonebd refuses it on purpose (SPEC 9 H4).
    assert_refused(
        "disable_hydration extra_arg",
        "Unexpected trailing arguments after `disable_hydration': `extra_arg'",
        MessageErrorKind::ExtraWords,
    );
    assert_refused(
        "ENABLE_HYDRATION x y",
        "Unexpected trailing arguments after `ENABLE_HYDRATION': `x y'",
        MessageErrorKind::ExtraWords,
    );
    assert_eq!(
        msg("enable_hydration 1"),
        Err(MessageError::ExtraWords {
            name: "enable_hydration".into(),
            extra: vec!["1".into()],
        })
    );
}

#[test]
fn message_spec11_failing_cases_are_invalid_argument() {
    let cases = [
        ("hydration_threshold abc", MessageErrorKind::InvalidValue),
        ("hydration_threshold -1", MessageErrorKind::InvalidValue),
        ("hydration_batch_size -1", MessageErrorKind::InvalidValue),
        ("hydration_threshold 1 2", MessageErrorKind::WrongWordCount),
        ("hydration_threshold", MessageErrorKind::WrongWordCount),
        ("foo", MessageErrorKind::WrongWordCount),
        ("foo a b", MessageErrorKind::WrongWordCount),
    ];
    for (text, kind) in cases {
        assert_refused(text, "Invalid argument", kind);
    }
}

#[test]
fn message_two_word_unknown_names_the_message_as_given() {
    assert_refused(
        "FOO bar",
        "Unsupported message `FOO'",
        MessageErrorKind::Unsupported,
    );
    assert_refused(
        "hydration_thresholds 1",
        "Unsupported message `hydration_thresholds'",
        MessageErrorKind::Unsupported,
    );
}

#[test]
fn message_empty_is_refused_with_the_kernel_text() {
    assert_refused("", "Empty message received.", MessageErrorKind::Empty);
    assert_eq!(parse_message(&[]), Err(MessageError::Empty));
}

#[test]
fn message_display_is_the_kernel_spelling() {
    assert_eq!(Message::EnableHydration.to_string(), "enable_hydration");
    assert_eq!(Message::DisableHydration.to_string(), "disable_hydration");
    assert_eq!(
        Message::HydrationThreshold(64).to_string(),
        "hydration_threshold 64"
    );
    assert_eq!(
        Message::HydrationBatchSize(32).to_string(),
        "hydration_batch_size 32"
    );
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        Just(Message::EnableHydration),
        Just(Message::DisableHydration),
        any::<u32>().prop_map(Message::HydrationThreshold),
        any::<u32>().prop_map(Message::HydrationBatchSize),
    ]
}

proptest! {
    #[test]
    fn message_parse_inverts_display(m in arb_message()) {
        prop_assert_eq!(msg(&m.to_string()), Ok(m));
        prop_assert_eq!(msg(&m.to_string().to_uppercase()), Ok(m));
    }
}

#[test]
fn hydrate_range_takes_two_sizes_with_suffixes() {
    use clonebd_core::ranges::ByteRange;
    let want = |offset, len| Message::HydrateRange(ByteRange { offset, len });
    assert_eq!(msg("hydrate_range 1g 64m"), Ok(want(1 << 30, 64 << 20)));
    assert_eq!(msg("HYDRATE_RANGE 0 4096"), Ok(want(0, 4096)));
    assert_eq!(
        want(3 << 20, 128 << 10).to_string(),
        "hydrate_range 3145728 131072"
    );
}

#[test]
fn hydrate_range_without_a_range_is_refused_saying_why() {
    assert_refused(
        "hydrate_range 1g",
        "hydrate_range: expected OFFSET LENGTH (two sizes, e.g. `1g 64m`), found 1 words",
        MessageErrorKind::InvalidRange,
    );
    assert_refused(
        "hydrate_range 1x 4k",
        "hydrate_range: invalid size `1x': expected a number of bytes with an optional k, m, g or t suffix (powers of 1024)",
        MessageErrorKind::InvalidRange,
    );
    assert_refused(
        "hydrate_range 0 0",
        "hydrate_range: the length is 0",
        MessageErrorKind::InvalidRange,
    );
}
