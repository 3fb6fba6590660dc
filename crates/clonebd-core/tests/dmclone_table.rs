//! The clone constructor against SPEC 1.2 (the check table, in order) and SPEC 11's error
//! table: one test per row with the exact string and errno, the first failing check wins, and
//! the deliberate H4 difference on trailing words. Accepted cases: dmclone_table_accepted.rs.

use clonebd_core::dmclone::errno::{EINVAL, ENODEV};
use clonebd_core::dmclone::{
    CloneTable, DeviceInfo, OpenFailure, TableDevices, TableError, TableErrorKind, parse_table,
    split_table_words,
};

/// The SPEC 11 main device: 262144 sectors (128 MiB).
const LEN: u64 = 262_144;
const MIB: u64 = 1 << 20;
/// Permission denied (Linux), for an open failure that is not ENODEV.
const EACCES: i32 = libc::EACCES;

/// A fake set of devices: each path maps to a size and logical block size, and every open is
/// recorded so tests can check which devices the constructor reached.
struct FakeDevs {
    meta_bytes: u64,
    dest: DeviceInfo,
    source: DeviceInfo,
    opened: Vec<String>,
}

impl FakeDevs {
    /// 8 MiB metadata, destination and source exactly `len` sectors, 512-byte blocks.
    fn new(len: u64) -> Self {
        let info = DeviceInfo {
            size_bytes: len * 512,
            logical_block_size: 512,
        };
        Self {
            meta_bytes: 8 * MIB,
            dest: info,
            source: info,
            opened: Vec::new(),
        }
    }

    fn open(&mut self, role: &str, path: &str) -> Result<(), OpenFailure> {
        self.opened.push(role.to_owned());
        match path {
            "/dev/nonexistent" => Err(OpenFailure {
                errno: ENODEV,
                detail: format!("{path}: no such device"),
            }),
            "/dev/forbidden" => Err(OpenFailure {
                errno: EACCES,
                detail: format!("{path}: permission denied"),
            }),
            _ => Ok(()),
        }
    }
}

impl TableDevices for FakeDevs {
    fn open_metadata(&mut self, path: &str) -> Result<u64, OpenFailure> {
        self.open("meta", path).map(|()| self.meta_bytes)
    }
    fn open_destination(&mut self, path: &str) -> Result<DeviceInfo, OpenFailure> {
        self.open("dest", path).map(|()| self.dest)
    }
    fn open_source(&mut self, path: &str) -> Result<DeviceInfo, OpenFailure> {
        self.open("source", path).map(|()| self.source)
    }
}

/// Runs the constructor on `args` (a table line after `clone`) with `devs`.
fn ctr_with(len: u64, args: &str, devs: &mut FakeDevs) -> Result<CloneTable, TableError> {
    let words = split_table_words(args);
    let refs: Vec<&str> = words.iter().map(String::as_str).collect();
    parse_table(len, &refs, devs)
}

/// Runs the constructor on `/dev/vdc /dev/vdb /dev/vda <rest>` with devices of `len` sectors.
fn ctr(len: u64, rest: &str) -> Result<CloneTable, TableError> {
    ctr_with(
        len,
        &format!("/dev/vdc /dev/vdb /dev/vda {rest}"),
        &mut FakeDevs::new(len),
    )
}

/// Asserts the constructor fails with exactly `message` (the kernel's ti->error) and `errno`.
#[track_caller]
fn assert_fails(result: Result<CloneTable, TableError>, message: &str, errno: i32) {
    match result {
        Ok(table) => panic!("expected `{message}', got {table:?}"),
        Err(e) => {
            assert_eq!(e.to_string(), message);
            assert_eq!(e.errno(), errno, "errno for `{message}'");
        }
    }
}

// ---- SPEC 1.2, row by row ----------------------------------------------------------------

#[test]
fn ctr_zero_length_target_is_refused_before_anything_else() {
    let mut devs = FakeDevs::new(LEN);
    let r = ctr_with(0, "", &mut devs);
    assert_fails(r, "zero-length target", EINVAL);
    assert!(devs.opened.is_empty());
}

#[test]
fn ctr_row1_too_few_arguments() {
    for args in ["", "/dev/vdc /dev/vdb /dev/vda", "/dev/nonexistent"] {
        let mut devs = FakeDevs::new(LEN);
        assert_fails(
            ctr_with(LEN, args, &mut devs),
            "Invalid number of arguments",
            EINVAL,
        );
        assert!(devs.opened.is_empty(), "{args:?} opened {:?}", devs.opened);
    }
}

#[test]
fn ctr_row2_metadata_open_failure_stops_before_destination() {
    let mut devs = FakeDevs::new(LEN);
    let r = ctr_with(
        LEN,
        "/dev/nonexistent /dev/nonexistent /dev/vda 0",
        &mut devs,
    );
    assert_fails(r.clone(), "Error opening metadata device", ENODEV);
    assert_eq!(devs.opened, ["meta"]);
    let err = r.expect_err("refused");
    assert_eq!(err.kind(), TableErrorKind::MetadataOpen);
    let source = std::error::Error::source(&err).map(ToString::to_string);
    assert_eq!(
        source.as_deref(),
        Some("/dev/nonexistent: no such device (errno 19)")
    );
}

#[test]
fn ctr_open_failure_keeps_the_callers_errno() {
    let mut devs = FakeDevs::new(LEN);
    let r = ctr_with(LEN, "/dev/forbidden /dev/vdb /dev/vda 8", &mut devs);
    assert_fails(r, "Error opening metadata device", EACCES);
}

#[test]
fn ctr_row2a_large_metadata_warns_naming_the_device_f10() {
    let mut devs = FakeDevs::new(LEN);
    devs.meta_bytes = 16 * 1024 * MIB + 512;
    let table = ctr_with(LEN, "/dev/vdc /dev/vdb /dev/vda 8", &mut devs).expect("accepted");
    assert_eq!(
        table.warnings,
        [
            "Metadata device /dev/vdc is larger than 33292800 sectors: excess space will not be used."
        ]
    );
    // Exactly 16 GiB (33554432 sectors), or 511 bytes more, is not "larger".
    for bytes in [16 * 1024 * MIB, 16 * 1024 * MIB + 511] {
        let mut devs = FakeDevs::new(LEN);
        devs.meta_bytes = bytes;
        let table = ctr_with(LEN, "/dev/vdc /dev/vdb /dev/vda 8", &mut devs).expect("accepted");
        assert!(table.warnings.is_empty(), "{bytes}");
    }
}

#[test]
fn ctr_row3_destination_open_failure_stops_before_source() {
    let mut devs = FakeDevs::new(LEN);
    let r = ctr_with(
        LEN,
        "/dev/vdc /dev/nonexistent /dev/nonexistent x",
        &mut devs,
    );
    assert_fails(r, "Error opening destination device", ENODEV);
    assert_eq!(devs.opened, ["meta", "dest"]);
}

#[test]
fn ctr_row3a_destination_smaller_than_length() {
    // SPEC 11: length 45056 > destination 40960.
    let mut devs = FakeDevs::new(45_056);
    devs.dest.size_bytes = 40_960 * 512;
    let r = ctr_with(45_056, "/dev/vdc /dev/vdb /dev/vda 8", &mut devs);
    assert_fails(r, "Device size larger than destination device", EINVAL);
    assert_eq!(devs.opened, ["meta", "dest"]);
}

#[test]
fn ctr_sizes_count_whole_sectors_only() {
    let mut devs = FakeDevs::new(LEN);
    devs.dest.size_bytes = LEN * 512 - 1;
    let r = ctr_with(LEN, "/dev/vdc /dev/vdb /dev/vda 8", &mut devs);
    assert_fails(r, "Device size larger than destination device", EINVAL);

    let mut devs = FakeDevs::new(LEN);
    devs.dest.size_bytes = LEN * 512 + 511;
    devs.source.size_bytes = (LEN + 1000) * 512;
    let table = ctr_with(LEN, "/dev/vdc /dev/vdb /dev/vda 8", &mut devs).expect("larger is fine");
    assert_eq!(table.geometry.target_sectors(), LEN);
}

#[test]
fn ctr_row4_source_open_failure() {
    let mut devs = FakeDevs::new(LEN);
    let r = ctr_with(LEN, "/dev/vdc /dev/vdb /dev/nonexistent 8", &mut devs);
    assert_fails(r, "Error opening source device", ENODEV);
    assert_eq!(devs.opened, ["meta", "dest", "source"]);
}

#[test]
fn ctr_row4a_source_smaller_than_length_but_destination_large_enough() {
    let mut devs = FakeDevs::new(LEN);
    devs.source.size_bytes = (LEN - 1) * 512;
    let r = ctr_with(LEN, "/dev/vdc /dev/vdb /dev/vda 8", &mut devs);
    assert_fails(r, "Device size larger than source device", EINVAL);
}

#[test]
fn ctr_row5_invalid_region_sizes() {
    // SPEC 11's list, then overflow (which the kernel's %u scanner would wrap to 8) and the
    // bounds just outside [8, 2097152].
    for region in [
        "0",
        "4",
        "abc",
        "8k",
        "0x8",
        "-8",
        "+8",
        "4194304",
        "4294967304",
        "7",
        "2097153",
        "8.0",
    ] {
        assert_fails(ctr(LEN, region), "Invalid region size", EINVAL);
    }
}

#[test]
fn ctr_row5a_region_size_not_a_power_of_two() {
    for region in ["12", "24", "65"] {
        assert_fails(ctr(LEN, region), "Region size is not a power of 2", EINVAL);
    }
}

#[test]
fn ctr_row5b_region_size_not_a_multiple_of_either_logical_block_size() {
    let msg = "Region size is not a multiple of device logical block size";
    for (dest_lbs, source_lbs) in [(8192, 512), (512, 8192), (8192, 8192)] {
        let mut devs = FakeDevs::new(LEN);
        devs.dest.logical_block_size = dest_lbs;
        devs.source.logical_block_size = source_lbs;
        let r = ctr_with(LEN, "/dev/vdc /dev/vdb /dev/vda 8", &mut devs);
        assert_fails(r, msg, EINVAL);
    }
    let mut devs = FakeDevs::new(LEN);
    devs.dest.logical_block_size = 4096;
    devs.source.logical_block_size = 8192;
    let table = ctr_with(LEN, "/dev/vdc /dev/vdb /dev/vda 16", &mut devs).expect("accepted");
    assert_eq!(table.logical_block_size(), 8192);
}

#[test]
fn ctr_row6a_too_many_regions() {
    let msg = "Too many regions. Consider increasing the region size";
    // 2^31 + 1 regions of 8 sectors, then more than 2^32 (must not wrap, SPEC F5).
    for len in [(8u64 << 31) + 1, 8 << 33, u64::MAX / 512] {
        let mut devs = FakeDevs::new(LEN);
        devs.dest.size_bytes = u64::MAX;
        devs.source.size_bytes = u64::MAX;
        let r = ctr_with(len, "/dev/vdc /dev/vdb /dev/vda 8", &mut devs);
        assert_fails(r, msg, EINVAL);
    }
    // Exactly 2^31 regions is accepted.
    let mut devs = FakeDevs::new(8 << 31);
    let table = ctr_with(8 << 31, "/dev/vdc /dev/vdb /dev/vda 8", &mut devs).expect("2^31");
    assert_eq!(table.geometry.nr_regions(), 1 << 31);
}

#[test]
fn ctr_row8_invalid_feature_counts() {
    for rest in [
        "8 x",
        "8 3 a b c",
        "8 2 no_hydration",
        "8 -1 no_hydration",
        "8 +1 no_hydration",
        "8 4294967297 no_hydration",
        "8 1",
    ] {
        assert_fails(
            ctr(LEN, rest),
            "Invalid number of feature arguments",
            EINVAL,
        );
    }
}

#[test]
fn ctr_row8a_unknown_feature() {
    for rest in [
        "8 1 foo",
        "8 2 no_hydration foo",
        "8 1 no_hydration_",
        "8 1 0",
    ] {
        assert_fails(ctr(LEN, rest), "Invalid feature argument", EINVAL);
    }
}

#[test]
fn ctr_row9_invalid_core_counts() {
    for rest in [
        "8 1 no_hydration x",
        "8 0 6 a b c d e f",
        "8 0 2 hydration_threshold",
        "8 0 -2 hydration_threshold 1",
        "8 0 4 hydration_threshold 1",
    ] {
        assert_fails(ctr(LEN, rest), "Invalid number of core arguments", EINVAL);
    }
}

#[test]
fn ctr_row9a_odd_core_count() {
    for rest in ["8 0 3 a b c", "8 0 1 hydration_threshold"] {
        assert_fails(
            ctr(LEN, rest),
            "Number of core arguments must be even",
            EINVAL,
        );
    }
}

#[test]
fn ctr_row9b_invalid_hydration_threshold_values() {
    let msg = "Invalid value for argument `hydration_threshold'";
    for value in [
        "abc",
        "-1",
        "0x10",
        "4294967296",
        "1.5",
        "\\ 1",
        "1\\\n\\\n",
        "+",
    ] {
        let rest = format!("8 0 2 hydration_threshold {value}");
        assert_fails(ctr(LEN, &rest), msg, EINVAL);
    }
}

#[test]
fn ctr_row9c_invalid_hydration_batch_size_values() {
    let msg = "Invalid value for argument `hydration_batch_size'";
    for value in ["-1", "4294967296", "abc"] {
        let rest = format!("8 0 2 hydration_batch_size {value}");
        assert_fails(ctr(LEN, &rest), msg, EINVAL);
    }
}

#[test]
fn ctr_row9d_unknown_core_key() {
    for rest in ["8 0 2 foo 1", "8 0 4 hydration_threshold 1 no_hydration 1"] {
        assert_fails(ctr(LEN, rest), "Invalid core argument", EINVAL);
    }
}

#[test]
fn ctr_h4_trailing_words_after_core_group_are_refused() {
    // The kernel accepts both and echoes the junk in `dmsetup table` (SPEC 11); clonebd
    // refuses them on purpose (SPEC 9 H4).
    let r = ctr(LEN, "8 1 no_hydration 0 junk junk2");
    assert_fails(
        r.clone(),
        "Unexpected trailing arguments after the core arguments: `junk junk2'",
        EINVAL,
    );
    assert_eq!(
        r.expect_err("refused").kind(),
        TableErrorKind::TrailingArguments
    );
    assert_fails(
        ctr(LEN, "8 0 0 junk"),
        "Unexpected trailing arguments after the core arguments: `junk'",
        EINVAL,
    );
    assert_fails(
        ctr(LEN, "8 0 2 hydration_threshold 4 5"),
        "Unexpected trailing arguments after the core arguments: `5'",
        EINVAL,
    );
}

// ---- The first failing check wins ---------------------------------------------------------

#[test]
fn ctr_first_failure_wins_destination_size_before_region_size() {
    let mut devs = FakeDevs::new(45_056);
    devs.dest.size_bytes = 40_960 * 512;
    let r = ctr_with(45_056, "/dev/vdc /dev/vdb /dev/vda 12 1 foo", &mut devs);
    assert_fails(r, "Device size larger than destination device", EINVAL);
}

#[test]
fn ctr_first_failure_wins_source_size_before_region_size() {
    let mut devs = FakeDevs::new(LEN);
    devs.source.size_bytes = 0;
    let r = ctr_with(LEN, "/dev/vdc /dev/vdb /dev/vda abc", &mut devs);
    assert_fails(r, "Device size larger than source device", EINVAL);
}

#[test]
fn ctr_first_failure_wins_along_the_argument_groups() {
    let cases = [
        ("4 1 foo", "Invalid region size"),
        ("12 1 foo", "Region size is not a power of 2"),
        ("8 3 foo 2 x", "Invalid number of feature arguments"),
        ("8 1 foo 2 foo x", "Invalid feature argument"),
        ("8 0 3 foo 1 x", "Number of core arguments must be even"),
        ("8 0 2 foo abc junk", "Invalid core argument"),
        (
            "8 0 4 hydration_threshold abc foo 1 junk",
            "Invalid value for argument `hydration_threshold'",
        ),
        (
            "8 0 4 hydration_batch_size 1 foo 1 junk",
            "Invalid core argument",
        ),
    ];
    for (rest, msg) in cases {
        assert_fails(ctr(LEN, rest), msg, EINVAL);
    }
}

#[test]
fn ctr_first_failure_wins_block_size_before_too_many_regions() {
    let mut devs = FakeDevs::new(LEN);
    devs.dest.size_bytes = u64::MAX;
    devs.source.size_bytes = u64::MAX;
    devs.source.logical_block_size = 8192;
    let r = ctr_with(8 << 32, "/dev/vdc /dev/vdb /dev/vda 8 1 foo", &mut devs);
    assert_fails(
        r,
        "Region size is not a multiple of device logical block size",
        EINVAL,
    );
}

#[test]
fn ctr_first_failure_wins_too_many_regions_before_features() {
    let mut devs = FakeDevs::new(LEN);
    devs.dest.size_bytes = u64::MAX;
    devs.source.size_bytes = u64::MAX;
    let r = ctr_with(8 << 32, "/dev/vdc /dev/vdb /dev/vda 8 1 foo", &mut devs);
    assert_fails(
        r,
        "Too many regions. Consider increasing the region size",
        EINVAL,
    );
}
