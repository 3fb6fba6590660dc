//! Table lines the kernel accepts, including SPEC 11's "accepted, possibly surprising" cases
//! (except trailing words, which clonebd refuses: dmclone_table.rs), and the TABLE status
//! that echoes them (SPEC 2.2).

use clonebd_core::dmclone::{
    CloneTable, DeviceInfo, MetadataMode, OpenFailure, StatusInfo, TableDevices, TableError,
    format_status_line, format_table, format_table_line, parse_table, parse_table_line,
    split_table_words,
};

/// The SPEC 11 main device: 262144 sectors (128 MiB).
const LEN: u64 = 262_144;

/// Devices that always open: 8 MiB metadata, destination and source exactly `len` sectors
/// with 512-byte logical blocks. Records the paths it was asked to open.
struct Devs {
    len: u64,
    opened: Vec<String>,
}

impl Devs {
    fn new(len: u64) -> Self {
        Self {
            len,
            opened: Vec::new(),
        }
    }

    fn data(&mut self, path: &str) -> Result<DeviceInfo, OpenFailure> {
        self.opened.push(path.to_owned());
        Ok(DeviceInfo {
            size_bytes: self.len * 512,
            logical_block_size: 512,
        })
    }
}

impl TableDevices for Devs {
    fn open_metadata(&mut self, path: &str) -> Result<u64, OpenFailure> {
        self.opened.push(path.to_owned());
        Ok(8 << 20)
    }
    fn open_destination(&mut self, path: &str) -> Result<DeviceInfo, OpenFailure> {
        self.data(path)
    }
    fn open_source(&mut self, path: &str) -> Result<DeviceInfo, OpenFailure> {
        self.data(path)
    }
}

/// Runs the constructor on `args` (a table line after `clone`) with devices of `len` sectors.
fn ctr_with(len: u64, args: &str, devs: &mut Devs) -> Result<CloneTable, TableError> {
    let words = split_table_words(args);
    let refs: Vec<&str> = words.iter().map(String::as_str).collect();
    parse_table(len, &refs, devs)
}

/// Runs the constructor on `/dev/vdc /dev/vdb /dev/vda <rest>`; it must accept it.
fn accepted(len: u64, rest: &str) -> CloneTable {
    let args = format!("/dev/vdc /dev/vdb /dev/vda {rest}");
    match ctr_with(len, &args, &mut Devs::new(len)) {
        Ok(table) => table,
        Err(e) => panic!("`{rest}' should be accepted, got `{e}' ({e:?})"),
    }
}

/// The status a freshly constructed table shows (fresh 8 MiB metadata: 7/2048 used).
fn fresh_status(table: &CloneTable) -> String {
    let g = table.geometry;
    let info = StatusInfo {
        md_used: 7,
        md_total: 2048,
        region_sectors: g.region_sectors(),
        nr_hydrated: 0,
        nr_regions: g.nr_regions(),
        hydrating: 0,
        hydration_enabled: !table.no_hydration,
        discard_passdown: !table.no_discard_passdown,
        hydration_threshold: table.hydration_threshold,
        hydration_batch_size: table.hydration_batch_size,
        mode: MetadataMode::ReadWrite,
    };
    format_status_line(g.target_sectors(), &info)
}

// ---- Accepted, possibly surprising (SPEC 11) ----------------------------------------------

#[test]
fn ctr_spec11_main_table_echoes_in_table_status() {
    let table = accepted(LEN, "8 1 no_hydration");
    assert!(table.no_hydration && !table.no_discard_passdown);
    assert_eq!(
        (table.hydration_threshold, table.hydration_batch_size),
        (1, 1)
    );
    assert_eq!(
        format_table_line(LEN, ["254:32", "254:16", "254:0"], &table.ctr_args),
        "0 262144 clone 254:32 254:16 254:0 8 1 no_hydration"
    );
    assert_eq!(
        fresh_status(&table),
        "0 262144 clone 8 7/2048 8 0/32768 0 1 no_hydration 4 hydration_threshold 1 \
         hydration_batch_size 1 rw"
    );
    assert_eq!(table.metadata_path, "/dev/vdc");
    assert_eq!(table.destination_path, "/dev/vdb");
    assert_eq!(table.source_path, "/dev/vda");
}

#[test]
fn ctr_duplicate_and_upper_case_features_are_echoed_verbatim() {
    let table = accepted(LEN, "8 2 NO_HYDRATION no_hydration");
    assert!(table.no_hydration && !table.no_discard_passdown);
    assert_eq!(
        table.table_status(["254:32", "254:16", "254:0"]),
        "254:32 254:16 254:0 8 2 NO_HYDRATION no_hydration"
    );
    assert!(fresh_status(&table).contains(" 1 no_hydration 4 "));
}

#[test]
fn ctr_upper_case_core_key_sets_the_value() {
    let table = accepted(LEN, "8 0 2 HYDRATION_THRESHOLD 0");
    assert_eq!(table.hydration_threshold, 0);
    assert!(fresh_status(&table).ends_with(" 0 4 hydration_threshold 0 hydration_batch_size 1 rw"));
    assert_eq!(
        format_table(["254:32", "254:16", "254:0"], &table.ctr_args),
        "254:32 254:16 254:0 8 0 2 HYDRATION_THRESHOLD 0"
    );
}

#[test]
fn ctr_duplicate_core_keys_last_one_wins() {
    let table = accepted(LEN, "8 0 4 hydration_threshold 5 Hydration_Threshold 7");
    assert_eq!(table.hydration_threshold, 7);
    assert_eq!(table.hydration_batch_size, 1);
}

#[test]
fn ctr_core_values_follow_kstrtouint() {
    let table = ctr_with(
        LEN,
        "/dev/vdc /dev/vdb /dev/vda 8 0 4 hydration_threshold +5 hydration_batch_size 4294967295\\\n",
        &mut Devs::new(LEN),
    )
    .expect("`+5' and a value with one trailing newline are kstrtouint numbers");
    assert_eq!(table.hydration_threshold, 5);
    assert_eq!(table.hydration_batch_size, u32::MAX);
}

#[test]
fn ctr_zero_threshold_and_zero_batch_are_accepted() {
    let table = accepted(LEN, "8 0 4 hydration_threshold 0 hydration_batch_size 0");
    assert_eq!(
        (table.hydration_threshold, table.hydration_batch_size),
        (0, 0)
    );
}

#[test]
fn ctr_groups_may_be_omitted_or_empty() {
    let bare = accepted(LEN, "8");
    assert!(!bare.no_hydration && !bare.no_discard_passdown);
    assert_eq!(
        (bare.hydration_threshold, bare.hydration_batch_size),
        (1, 1)
    );
    assert_eq!(bare.ctr_args, ["8"]);

    let empty = accepted(LEN, "8 0 0");
    assert_eq!(empty.ctr_args, ["8", "0", "0"]);
    assert_eq!(
        (empty.hydration_threshold, empty.hydration_batch_size),
        (1, 1)
    );

    let core_only = accepted(LEN, "8 0 2 hydration_threshold 4");
    assert_eq!(core_only.hydration_threshold, 4);
}

#[test]
fn ctr_same_device_for_source_destination_and_metadata_is_accepted() {
    let mut devs = Devs::new(LEN);
    let table = ctr_with(LEN, "/dev/vdb /dev/vdb /dev/vdb 8", &mut devs).expect("no overlap check");
    assert_eq!(table.source_path, table.destination_path);
    assert_eq!(devs.opened, ["/dev/vdb", "/dev/vdb", "/dev/vdb"]);
}

#[test]
fn ctr_largest_region_with_one_region_shows_2097152_0_of_1() {
    let table = accepted(32_768, "2097152 1 no_hydration");
    assert_eq!(table.geometry.nr_regions(), 1);
    assert!(fresh_status(&table).contains(" 2097152 0/1 0 "));
}

#[test]
fn ctr_length_not_a_multiple_of_region_rounds_regions_up() {
    let table = accepted(32_767, "8 1 no_hydration");
    assert_eq!(table.geometry.nr_regions(), 4096);
    assert!(fresh_status(&table).contains(" 8 0/4096 0 "));
}

#[test]
fn ctr_both_features_and_core_args_show_in_status() {
    let table = accepted(
        LEN,
        "8 2 no_hydration no_discard_passdown 4 hydration_threshold 128 hydration_batch_size 16",
    );
    assert!(fresh_status(&table).ends_with(
        " 2 no_hydration no_discard_passdown 4 hydration_threshold 128 hydration_batch_size 16 rw"
    ));
}

#[test]
fn ctr_f7_two_to_the_31_regions_all_hydrated_prints_unsigned() {
    let len = 8u64 << 31;
    let table =
        ctr_with(len, "/dev/vdc /dev/vdb /dev/vda 8", &mut Devs::new(len)).expect("2^31 regions");
    let g = table.geometry;
    let info = StatusInfo {
        md_used: 66_000,
        md_total: 4_161_600,
        region_sectors: g.region_sectors(),
        nr_hydrated: g.nr_regions(),
        nr_regions: g.nr_regions(),
        hydrating: 0,
        hydration_enabled: true,
        discard_passdown: true,
        hydration_threshold: 1,
        hydration_batch_size: 1,
        mode: MetadataMode::ReadWrite,
    };
    assert!(
        format_status_line(len, &info).contains(" 8 2147483648/2147483648 0 0 4 "),
        "{}",
        format_status_line(len, &info)
    );
}

// ---- Table lines and the TABLE status -----------------------------------------------------

#[test]
fn table_line_round_trips_through_the_constructor_and_table_status() {
    let line = parse_table_line("0 262144 clone /dev/vdc /dev/vdb /dev/vda 8 1 no_hydration")
        .expect("valid");
    let args: Vec<&str> = line.args.iter().map(String::as_str).collect();
    let table = parse_table(line.len, &args, &mut Devs::new(line.len)).expect("accepted");
    assert_eq!(
        format_table_line(line.len, ["254:32", "254:16", "254:0"], &table.ctr_args),
        "0 262144 clone 254:32 254:16 254:0 8 1 no_hydration"
    );
}

#[test]
fn table_status_prints_file_paths_escaped_so_they_split_back() {
    let args = vec!["8".to_owned(), "1".to_owned(), "no_hydration".to_owned()];
    let line = format_table(
        ["/var/lib/clonebd/meta.img", "/srv/my dest.img", "src.img"],
        &args,
    );
    assert_eq!(
        line,
        "/var/lib/clonebd/meta.img /srv/my\\ dest.img src.img 8 1 no_hydration"
    );
    assert_eq!(
        split_table_words(&line),
        [
            "/var/lib/clonebd/meta.img",
            "/srv/my dest.img",
            "src.img",
            "8",
            "1",
            "no_hydration"
        ]
    );
}

#[test]
fn ctr_path_with_escaped_space_reaches_the_devices_unescaped() {
    let mut devs = Devs::new(LEN);
    let table = ctr_with(LEN, "/tmp/my\\ meta /dev/vdb /dev/vda 8", &mut devs).expect("accepted");
    assert_eq!(table.metadata_path, "/tmp/my meta");
    assert_eq!(devs.opened, ["/tmp/my meta", "/dev/vdb", "/dev/vda"]);
}
