//! The INFO status line against every status line the real kernel printed: SPEC 11 and the
//! kernel-written fixtures (tests/fixtures/kernel-metadata), built from their fields and
//! compared byte for byte; and the reader as the inverse of the printer.

use std::fs;
use std::path::{Path, PathBuf};

use clonebd_core::dmclone::{
    MetadataMode, StatusInfo, StatusLine, format_error_status, format_status, format_status_line,
    parse_status,
};
use proptest::prelude::*;

/// The SPEC 11 main device (128 MiB, 4 KiB regions, 8 MiB metadata) as created with
/// `8 1 no_hydration`.
fn spec11(nr_hydrated: u64) -> StatusInfo {
    StatusInfo {
        md_used: 7,
        md_total: 2048,
        region_sectors: 8,
        nr_hydrated,
        nr_regions: 32768,
        hydrating: 0,
        hydration_enabled: false,
        discard_passdown: true,
        hydration_threshold: 1,
        hydration_batch_size: 1,
        mode: MetadataMode::ReadWrite,
    }
}

/// The SPEC 11 device after `hydration_threshold 64`, `hydration_batch_size 32`,
/// `enable_hydration`.
fn spec11_hydrating(nr_hydrated: u64, hydrating: u64) -> StatusInfo {
    StatusInfo {
        hydrating,
        hydration_enabled: true,
        hydration_threshold: 64,
        hydration_batch_size: 32,
        ..spec11(nr_hydrated)
    }
}

#[test]
fn status_matches_spec11_lines() {
    let cases = [
        (
            spec11(0),
            "0 262144 clone 8 7/2048 8 0/32768 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1 rw",
        ),
        (
            spec11(1063),
            "0 262144 clone 8 7/2048 8 1063/32768 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1 rw",
        ),
        (
            spec11_hydrating(3525, 64),
            "0 262144 clone 8 7/2048 8 3525/32768 64 0 4 hydration_threshold 64 hydration_batch_size 32 rw",
        ),
        (
            spec11_hydrating(11845, 64),
            "0 262144 clone 8 7/2048 8 11845/32768 64 0 4 hydration_threshold 64 hydration_batch_size 32 rw",
        ),
        (
            spec11_hydrating(20421, 64),
            "0 262144 clone 8 7/2048 8 20421/32768 64 0 4 hydration_threshold 64 hydration_batch_size 32 rw",
        ),
        (
            spec11_hydrating(27717, 64),
            "0 262144 clone 8 7/2048 8 27717/32768 64 0 4 hydration_threshold 64 hydration_batch_size 32 rw",
        ),
        (
            spec11_hydrating(32768, 0),
            "0 262144 clone 8 7/2048 8 32768/32768 0 0 4 hydration_threshold 64 hydration_batch_size 32 rw",
        ),
        (
            spec11(32768),
            "0 262144 clone 8 7/2048 8 32768/32768 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1 rw",
        ),
    ];
    for (info, line) in cases {
        assert_eq!(format_status_line(262_144, &info), line);
        assert_eq!(parse_status(line), Ok(StatusLine::Info(info)), "{line}");
    }
}

#[test]
fn status_matches_spec11_fragments_after_writes_and_discards() {
    // The SPEC 11 log abbreviates these lines to `... 8 <n>/32768 0 ...`.
    let cases = [
        (1, "... 8 1/32768 0 ..."),
        (17, "... 8 17/32768 0 ..."),
        (18, "... 8 18/32768 0 ..."),
        (20, "... 8 20/32768 0 ..."),
        (21, "... 8 21/32768 0 ..."),
        (24, "... 8 24/32768 0 ..."),
        (56, "... 8 56/32768 0 ..."),
        (63, "... 8 63/32768 0 ..."),
    ];
    for (n, fragment) in cases {
        let inner = fragment.trim_matches(|c| c == '.' || c == ' ');
        let line = format_status_line(262_144, &spec11(n));
        assert!(line.contains(&format!(" {inner} ")), "{line} lacks {inner}");
    }
}

#[test]
fn status_with_hydration_enabled_right_after_create() {
    // SPEC 11: `... 8 155/4096 1 0 4 hydration_threshold 1 hydration_batch_size 1 rw`.
    let info = StatusInfo {
        nr_hydrated: 155,
        nr_regions: 4096,
        hydrating: 1,
        hydration_enabled: true,
        ..spec11(0)
    };
    assert!(
        format_status(&info)
            .ends_with(" 8 155/4096 1 0 4 hydration_threshold 1 hydration_batch_size 1 rw")
    );
}

#[test]
fn status_lists_features_in_kernel_order() {
    let both_off = StatusInfo {
        discard_passdown: false,
        hydration_threshold: 128,
        hydration_batch_size: 16,
        ..spec11(0)
    };
    assert_eq!(
        format_status(&both_off),
        "8 7/2048 8 0/32768 0 2 no_hydration no_discard_passdown 4 hydration_threshold 128 \
         hydration_batch_size 16 rw"
    );
    let passdown_off = StatusInfo {
        hydration_enabled: true,
        discard_passdown: false,
        ..spec11(0)
    };
    assert_eq!(
        format_status(&passdown_off),
        "8 7/2048 8 0/32768 0 1 no_discard_passdown 4 hydration_threshold 1 \
         hydration_batch_size 1 rw"
    );
}

#[test]
fn status_modes_print_rw_ro_and_fail() {
    let ro = StatusInfo {
        mode: MetadataMode::ReadOnly,
        ..spec11(5)
    };
    assert!(format_status(&ro).ends_with(" hydration_batch_size 1 ro"));
    let fail = StatusInfo {
        mode: MetadataMode::Fail,
        ..spec11(5)
    };
    assert_eq!(format_status(&fail), "Fail");
    assert_eq!(format_status_line(262_144, &fail), "0 262144 clone Fail");
    assert_eq!(parse_status("0 262144 clone Fail"), Ok(StatusLine::Fail));
    assert_eq!(format_error_status(), "Error");
    assert_eq!(parse_status("0 262144 clone Error"), Ok(StatusLine::Error));
}

#[test]
fn status_f7_two_to_the_31_hydrated_regions_print_unsigned() {
    let info = StatusInfo {
        nr_hydrated: 1 << 31,
        nr_regions: 1 << 31,
        md_total: 4_161_600,
        ..spec11(0)
    };
    let line = format_status_line(8 << 31, &info);
    assert_eq!(
        line,
        "0 17179869184 clone 8 7/4161600 8 2147483648/2147483648 0 1 no_hydration 4 \
         hydration_threshold 1 hydration_batch_size 1 rw"
    );
    assert_eq!(parse_status(&line), Ok(StatusLine::Info(info)));
}

// ---- The kernel-written fixtures ----------------------------------------------------------

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/kernel-metadata")
}

/// The value of string field `key` in a flat JSON object (no escapes occur in these fields).
fn json_str(json: &str, key: &str) -> String {
    let tag = format!("\"{key}\": \"");
    let start = json.find(&tag).map(|i| i + tag.len());
    let start = start.unwrap_or_else(|| panic!("no string field {key}"));
    let len = json[start..].find('"').expect("closing quote");
    json[start..start + len].to_owned()
}

/// The value of numeric field `key` in a flat JSON object.
fn json_u64(json: &str, key: &str) -> u64 {
    let tag = format!("\"{key}\": ");
    let start = json.find(&tag).map(|i| i + tag.len());
    let start = start.unwrap_or_else(|| panic!("no numeric field {key}"));
    let digits: String = json[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().expect("a number")
}

/// What each fixture's status shows that fixture.json does not hold: the metadata blocks in
/// use (README: 7, 6 and 524 of the totals) and whether the final status was taken with the
/// `hydration_threshold 64`, `hydration_batch_size 32`, `enable_hydration` messages applied.
const FIXTURES: [(&str, u64, bool); 5] = [
    ("fresh-4k", 7, false),
    ("partial-4k", 7, false),
    ("full-4k", 7, true),
    ("partial-64k-tail", 6, false),
    ("multilevel-4k", 524, false),
];

struct Fixture {
    name: &'static str,
    json: String,
    history: String,
    target_sectors: u64,
    base: StatusInfo,
}

fn load_fixtures() -> Vec<(Fixture, bool)> {
    FIXTURES
        .iter()
        .map(|&(name, md_used, tuned)| {
            let dir = fixtures_dir().join(name);
            let json = fs::read_to_string(dir.join("fixture.json")).expect("fixture.json");
            let history =
                fs::read_to_string(dir.join("status-history.txt")).expect("status-history.txt");
            let base = StatusInfo {
                md_used,
                md_total: (json_u64(&json, "metadata_bytes") / 4096).min(4_161_600),
                region_sectors: json_u64(&json, "region_sectors"),
                nr_hydrated: json_u64(&json, "nr_hydrated"),
                nr_regions: json_u64(&json, "nr_regions"),
                hydrating: 0,
                hydration_enabled: false,
                discard_passdown: true,
                hydration_threshold: 1,
                hydration_batch_size: 1,
                mode: MetadataMode::ReadWrite,
            };
            let target_sectors = json_u64(&json, "target_sectors");
            let fixture = Fixture {
                name,
                json,
                history,
                target_sectors,
                base,
            };
            (fixture, tuned)
        })
        .collect()
}

#[test]
fn status_matches_every_fixture_status_line_built_from_its_fields() {
    for (fx, tuned) in load_fixtures() {
        let last = if tuned {
            StatusInfo {
                hydration_enabled: true,
                hydration_threshold: 64,
                hydration_batch_size: 32,
                ..fx.base
            }
        } else {
            fx.base
        };
        let expected = json_str(&fx.json, "status_line");
        assert_eq!(
            format_status_line(fx.target_sectors, &last),
            expected,
            "{}",
            fx.name
        );
        assert_eq!(parse_status(&expected), Ok(StatusLine::Info(last)));

        // Re-created on the same metadata with `<region> 1 no_hydration`: defaults again.
        let expected = json_str(&fx.json, "recreate_status_line");
        assert_eq!(
            format_status_line(fx.target_sectors, &fx.base),
            expected,
            "{}",
            fx.name
        );
    }
}

#[test]
fn status_matches_every_fixture_status_history_line() {
    let mut checked = 0;
    for (fx, _) in load_fixtures() {
        for entry in fx.history.lines().filter(|l| !l.trim().is_empty()) {
            let (label, line) = entry.split_once(": ").expect("`label: line`");
            let Ok(StatusLine::Info(info)) = parse_status(line) else {
                panic!("{}: {label}: not a status: {line}", fx.name);
            };
            // The geometry and metadata fields are the fixture's; the count is 0 at creation
            // and the fixture's final count afterwards.
            assert_eq!(info.region_sectors, fx.base.region_sectors, "{}", fx.name);
            assert_eq!(info.nr_regions, fx.base.nr_regions, "{}", fx.name);
            assert_eq!(
                (info.md_used, info.md_total),
                (fx.base.md_used, fx.base.md_total)
            );
            let expected_count = if label == "created" {
                0
            } else {
                fx.base.nr_hydrated
            };
            assert_eq!(info.nr_hydrated, expected_count, "{}: {label}", fx.name);
            assert_eq!(format_status_line(fx.target_sectors, &info), line);
            checked += 1;
        }
    }
    assert_eq!(checked, 26, "every history line of the five fixtures");
}

// ---- The reader is the printer's inverse --------------------------------------------------

fn arb_mode() -> impl Strategy<Value = MetadataMode> {
    prop_oneof![
        Just(MetadataMode::ReadWrite),
        Just(MetadataMode::ReadOnly),
        Just(MetadataMode::Fail),
    ]
}

prop_compose! {
    fn arb_status()(
        md_used in any::<u64>(),
        md_total in any::<u64>(),
        region_sectors in any::<u64>(),
        nr_hydrated in any::<u64>(),
        nr_regions in any::<u64>(),
        hydrating in any::<u64>(),
        hydration_enabled in any::<bool>(),
        discard_passdown in any::<bool>(),
        hydration_threshold in any::<u32>(),
        hydration_batch_size in any::<u32>(),
        mode in arb_mode(),
    ) -> StatusInfo {
        StatusInfo {
            md_used, md_total, region_sectors, nr_hydrated, nr_regions, hydrating,
            hydration_enabled, discard_passdown, hydration_threshold, hydration_batch_size, mode,
        }
    }
}

proptest! {
    #[test]
    fn status_parse_inverts_format(info in arb_status(), len in any::<u64>()) {
        let expected = if info.mode == MetadataMode::Fail {
            StatusLine::Fail
        } else {
            StatusLine::Info(info)
        };
        prop_assert_eq!(parse_status(&format_status(&info)), Ok(expected));
        prop_assert_eq!(parse_status(&format_status_line(len, &info)), Ok(expected));
        prop_assert_eq!(expected.to_string(), format_status(&info));
    }

    #[test]
    fn status_format_has_single_spaces_and_no_trailing_space(info in arb_status()) {
        let line = format_status(&info);
        prop_assert!(!line.contains("  "));
        prop_assert!(!line.ends_with(' ') && !line.starts_with(' '));
    }
}
