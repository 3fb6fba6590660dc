//! The constructor: a dm-clone table line checked in the kernel's order (SPEC 1), and the
//! TABLE status that echoes it back (SPEC 2.2).
//!
//! ```text
//! <metadata dev> <destination dev> <source dev> <region size>
//!     [<#feature args> [<feature arg>]* [<#core args> [<key> <value>]*]]
//! ```
//!
//! [`parse_table`] runs every check of SPEC 1.2 in the kernel's order and stops at the first
//! failure, so the error a user sees is the one the kernel would have shown. Devices are not
//! opened here: the caller implements [`TableDevices`], and this module only asks it to open
//! each device at the point where the kernel would, and looks at the sizes it reports.
//!
//! Where clonebd differs from the kernel on purpose (SPEC D3, H4):
//! - words after the core group are refused ([`TableError::TrailingArguments`]) instead of
//!   being ignored and echoed;
//! - a count or region size that does not fit in 32 bits is refused instead of wrapping (see
//!   [`super::number`]);
//! - region counts are `u64`, so the kernel's 32-bit-only `EOVERFLOW` path does not exist here:
//!   every count above 2^31 is [`TableError::TooManyRegions`] with `EINVAL`, as on a 64-bit
//!   kernel.

use thiserror::Error;

use super::errno;
use super::number::{parse_kstrtouint, parse_scan_u32};
use super::words::escape_table_word;
use crate::geometry::{
    Geometry, GeometryError, MAX_REGION_SECTORS, MAX_REGIONS, MIN_REGION_SECTORS, SECTOR_SIZE,
};

/// `hydration_threshold` when the table does not set it.
pub const DEFAULT_HYDRATION_THRESHOLD: u32 = 1;
/// `hydration_batch_size` when the table does not set it.
pub const DEFAULT_HYDRATION_BATCH_SIZE: u32 = 1;
/// A metadata device larger than this many sectors (16 GiB) draws a warning.
pub const METADATA_WARNING_SECTORS: u64 = 16 * (1 << 30) / SECTOR_SIZE;
/// The most metadata sectors ever used (4 161 600 blocks of 8 sectors); named in the warning.
pub const METADATA_MAX_SECTORS: u64 = 33_292_800;
/// Most feature arguments the feature group may announce.
const MAX_FEATURE_ARGS: u32 = 2;
/// Most core arguments (words, not pairs) the core group may announce.
const MAX_CORE_ARGS: u32 = 4;

/// What the caller learnt about a data device (destination or source) when it opened it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceInfo {
    /// Size in bytes. The constructor uses whole sectors (`size_bytes / 512`), as the kernel does.
    pub size_bytes: u64,
    /// Logical block size in bytes (512 for regular files and most disks, 4096 for 4Kn disks).
    pub logical_block_size: u32,
}

/// Why the caller could not open a device; kept for logs, shown as the error's source.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{detail} (errno {errno})")]
pub struct OpenFailure {
    /// The errno the constructor returns. The kernel returns `ENODEV` for a path that does not
    /// name a device (SPEC 11), so a caller should report a missing path that way.
    pub errno: i32,
    /// What went wrong, in words, for logs.
    pub detail: String,
}

/// The seam through which [`parse_table`] opens devices; the caller implements it.
///
/// Each method receives the word from the table line as given and is called at most once, at
/// the point where the kernel opens that device: metadata, then destination, then source.
/// When [`parse_table`] fails, the caller closes whatever it had opened.
pub trait TableDevices {
    /// Opens the metadata device read-write; returns its size in bytes.
    fn open_metadata(&mut self, path: &str) -> Result<u64, OpenFailure>;
    /// Opens the destination device read-write.
    fn open_destination(&mut self, path: &str) -> Result<DeviceInfo, OpenFailure>;
    /// Opens the source device. The caller opens it read-only: it is never written.
    fn open_source(&mut self, path: &str) -> Result<DeviceInfo, OpenFailure>;
}

/// A constructor line that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CloneTable {
    /// The metadata device word, as given.
    pub metadata_path: String,
    /// The destination device word, as given.
    pub destination_path: String,
    /// The source device word, as given.
    pub source_path: String,
    /// Size of the metadata device in bytes, as the caller reported it.
    pub metadata_size_bytes: u64,
    /// The destination device, as the caller reported it.
    pub destination: DeviceInfo,
    /// The source device, as the caller reported it.
    pub source: DeviceInfo,
    /// The clone's length and region size.
    pub geometry: Geometry,
    /// `no_hydration` was given: background hydration starts disabled.
    pub no_hydration: bool,
    /// `no_discard_passdown` was given: discards are not passed to the destination.
    pub no_discard_passdown: bool,
    /// Most regions hydrating in the background at once (default 1; 0 stops hydration).
    pub hydration_threshold: u32,
    /// Most contiguous regions copied in one background job (default 1; 0 acts as 1).
    pub hydration_batch_size: u32,
    /// Every word after the three devices, verbatim, for the TABLE status (SPEC 2.2).
    pub ctr_args: Vec<String>,
    /// Warnings the kernel would log while constructing, in order.
    pub warnings: Vec<String>,
}

impl CloneTable {
    /// The clone's logical block size: the larger of the destination's and the source's, as
    /// device-mapper stacks them (the metadata device does not count).
    pub fn logical_block_size(&self) -> u32 {
        self.destination
            .logical_block_size
            .max(self.source.logical_block_size)
    }

    /// The TABLE status for this table; see [`format_table`].
    pub fn table_status(&self, devs: [&str; 3]) -> String {
        format_table(devs, &self.ctr_args)
    }
}

/// Which check of SPEC 1.2 failed; one per [`TableError`] variant, for matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TableErrorKind {
    /// The target has zero length.
    ZeroLength,
    /// Check 1: fewer than four arguments.
    ArgumentCount,
    /// Check 2: the metadata device did not open.
    MetadataOpen,
    /// Check 3: the destination device did not open.
    DestinationOpen,
    /// Check 3a: the destination is shorter than the target.
    DestinationTooSmall,
    /// Check 4: the source device did not open.
    SourceOpen,
    /// Check 4a: the source is shorter than the target.
    SourceTooSmall,
    /// Check 5: the region size is not a number in `[8, 2097152]`.
    InvalidRegionSize,
    /// Check 5a: the region size is not a power of two.
    RegionSizeNotPowerOfTwo,
    /// Check 5b: the region size is not a multiple of a logical block size.
    RegionSizeNotBlockMultiple,
    /// Check 6a: more than 2^31 regions.
    TooManyRegions,
    /// Check 8: bad feature-argument count.
    FeatureCount,
    /// Check 8a: unknown feature.
    UnknownFeature,
    /// Check 9: bad core-argument count.
    CoreCount,
    /// Check 9a: odd core-argument count.
    OddCoreCount,
    /// Check 9b: bad `hydration_threshold` value.
    InvalidHydrationThreshold,
    /// Check 9c: bad `hydration_batch_size` value.
    InvalidHydrationBatchSize,
    /// Check 9d: unknown core key.
    UnknownCoreArgument,
    /// H4 (clonebd only): words after the core group.
    TrailingArguments,
}

/// Why a table line was refused. `Display` is the kernel's exact `ti->error` string (SPEC
/// 1.2, 11), except for [`TableError::TrailingArguments`], which the kernel does not have.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TableError {
    /// The target length is zero. Device-mapper core refuses this before the constructor
    /// runs and logs `zero-length target`.
    #[error("zero-length target")]
    ZeroLength,
    /// Fewer than four arguments.
    #[error("Invalid number of arguments")]
    ArgumentCount {
        /// How many arguments were given.
        argc: usize,
    },
    /// The metadata device did not open.
    #[error("Error opening metadata device")]
    MetadataOpen {
        /// The device word.
        path: String,
        /// What the caller reported.
        #[source]
        failure: OpenFailure,
    },
    /// The destination device did not open.
    #[error("Error opening destination device")]
    DestinationOpen {
        /// The device word.
        path: String,
        /// What the caller reported.
        #[source]
        failure: OpenFailure,
    },
    /// The destination has fewer sectors than the target.
    #[error("Device size larger than destination device")]
    DestinationTooSmall {
        /// Whole sectors on the destination.
        device_sectors: u64,
        /// The target length.
        target_sectors: u64,
    },
    /// The source device did not open.
    #[error("Error opening source device")]
    SourceOpen {
        /// The device word.
        path: String,
        /// What the caller reported.
        #[source]
        failure: OpenFailure,
    },
    /// The source has fewer sectors than the target.
    #[error("Device size larger than source device")]
    SourceTooSmall {
        /// Whole sectors on the source.
        device_sectors: u64,
        /// The target length.
        target_sectors: u64,
    },
    /// The region size is not a plain decimal number in `[8, 2097152]`.
    #[error("Invalid region size")]
    InvalidRegionSize {
        /// The word as given.
        word: String,
    },
    /// The region size is not a power of two.
    #[error("Region size is not a power of 2")]
    RegionSizeNotPowerOfTwo {
        /// The region size in sectors.
        region_sectors: u64,
    },
    /// The region size is not a multiple of the source's or the destination's logical block.
    #[error("Region size is not a multiple of device logical block size")]
    RegionSizeNotBlockMultiple {
        /// The region size in sectors.
        region_sectors: u64,
        /// The offending logical block size, in bytes.
        logical_block_size: u32,
    },
    /// More than 2^31 regions.
    #[error("Too many regions. Consider increasing the region size")]
    TooManyRegions {
        /// How many regions the table would have.
        nr_regions: u64,
    },
    /// The feature count is not a number, is above 2, or announces more words than remain.
    #[error("Invalid number of feature arguments")]
    FeatureCount {
        /// The count word as given.
        word: String,
    },
    /// A feature other than `no_hydration` and `no_discard_passdown`.
    #[error("Invalid feature argument")]
    UnknownFeature {
        /// The feature as given.
        word: String,
    },
    /// The core count is not a number, is above 4, or announces more words than remain.
    #[error("Invalid number of core arguments")]
    CoreCount {
        /// The count word as given.
        word: String,
    },
    /// The core count is odd.
    #[error("Number of core arguments must be even")]
    OddCoreCount {
        /// The count.
        count: usize,
    },
    /// The `hydration_threshold` value is not a `kstrtouint` number.
    #[error("Invalid value for argument `hydration_threshold'")]
    InvalidHydrationThreshold {
        /// The value as given.
        word: String,
    },
    /// The `hydration_batch_size` value is not a `kstrtouint` number.
    #[error("Invalid value for argument `hydration_batch_size'")]
    InvalidHydrationBatchSize {
        /// The value as given.
        word: String,
    },
    /// A core key other than `hydration_threshold` and `hydration_batch_size`.
    #[error("Invalid core argument")]
    UnknownCoreArgument {
        /// The key as given.
        key: String,
    },
    /// clonebd only (SPEC H4): words follow the core group. The kernel ignores them.
    #[error(
        "Unexpected trailing arguments after the core arguments: `{}'",
        join_escaped(words)
    )]
    TrailingArguments {
        /// The extra words, as given.
        words: Vec<String>,
    },
}

impl TableError {
    /// Which check failed.
    pub fn kind(&self) -> TableErrorKind {
        match self {
            Self::ZeroLength => TableErrorKind::ZeroLength,
            Self::ArgumentCount { .. } => TableErrorKind::ArgumentCount,
            Self::MetadataOpen { .. } => TableErrorKind::MetadataOpen,
            Self::DestinationOpen { .. } => TableErrorKind::DestinationOpen,
            Self::DestinationTooSmall { .. } => TableErrorKind::DestinationTooSmall,
            Self::SourceOpen { .. } => TableErrorKind::SourceOpen,
            Self::SourceTooSmall { .. } => TableErrorKind::SourceTooSmall,
            Self::InvalidRegionSize { .. } => TableErrorKind::InvalidRegionSize,
            Self::RegionSizeNotPowerOfTwo { .. } => TableErrorKind::RegionSizeNotPowerOfTwo,
            Self::RegionSizeNotBlockMultiple { .. } => TableErrorKind::RegionSizeNotBlockMultiple,
            Self::TooManyRegions { .. } => TableErrorKind::TooManyRegions,
            Self::FeatureCount { .. } => TableErrorKind::FeatureCount,
            Self::UnknownFeature { .. } => TableErrorKind::UnknownFeature,
            Self::CoreCount { .. } => TableErrorKind::CoreCount,
            Self::OddCoreCount { .. } => TableErrorKind::OddCoreCount,
            Self::InvalidHydrationThreshold { .. } => TableErrorKind::InvalidHydrationThreshold,
            Self::InvalidHydrationBatchSize { .. } => TableErrorKind::InvalidHydrationBatchSize,
            Self::UnknownCoreArgument { .. } => TableErrorKind::UnknownCoreArgument,
            Self::TrailingArguments { .. } => TableErrorKind::TrailingArguments,
        }
    }

    /// The errno the constructor returns: the caller's errno for a failed open, `EINVAL` for
    /// everything else.
    pub fn errno(&self) -> i32 {
        match self {
            Self::MetadataOpen { failure, .. }
            | Self::DestinationOpen { failure, .. }
            | Self::SourceOpen { failure, .. } => failure.errno,
            _ => errno::EINVAL,
        }
    }
}

/// The trailing words for the H4 message, escaped so that a word holding a space shows as one.
fn join_escaped(words: &[String]) -> String {
    words
        .iter()
        .map(|w| escape_table_word(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whole sectors in `bytes`, as the kernel computes a device's size.
fn whole_sectors(bytes: u64) -> u64 {
    bytes / SECTOR_SIZE
}

/// Reads a group count (`<#feature args>` or `<#core args>`) off the front of `rest`: a `%u`
/// number of at most `max` that does not announce more words than follow it. Returns the
/// count and the words after the count word.
fn read_group<'a, 'w>(rest: &'a [&'w str], max: u32) -> Option<(usize, &'a [&'w str])> {
    let (word, tail) = rest.split_first()?;
    let count = parse_scan_u32(word).ok().filter(|&n| n <= max)?;
    let count = usize::try_from(count).ok().filter(|&n| n <= tail.len())?;
    Some((count, tail))
}

/// Checks a clone constructor and returns the table it describes.
///
/// `target_sectors` is the table line's `<len>`; `args` are the words after `clone` (see
/// [`super::split_table_words`]). The checks run in the kernel's order (SPEC 1.2), each
/// device is opened through `devs` only once the checks before it passed, and the first
/// failure is returned.
pub fn parse_table(
    target_sectors: u64,
    args: &[&str],
    devs: &mut dyn TableDevices,
) -> Result<CloneTable, TableError> {
    if target_sectors == 0 {
        return Err(TableError::ZeroLength);
    }
    // Check 1: at least the three devices and the region size.
    let [
        metadata_path,
        destination_path,
        source_path,
        region_word,
        rest @ ..,
    ] = args
    else {
        return Err(TableError::ArgumentCount { argc: args.len() });
    };

    // Check 2, 2a: the metadata device, and the warning for one larger than 16 GiB.
    let metadata_size_bytes =
        devs.open_metadata(metadata_path)
            .map_err(|failure| TableError::MetadataOpen {
                path: (*metadata_path).to_owned(),
                failure,
            })?;
    let mut warnings = Vec::new();
    if whole_sectors(metadata_size_bytes) > METADATA_WARNING_SECTORS {
        warnings.push(format!(
            "Metadata device {metadata_path} is larger than {METADATA_MAX_SECTORS} sectors: \
             excess space will not be used."
        ));
    }

    // Check 3, 3a: the destination, at least as long as the target.
    let destination =
        devs.open_destination(destination_path)
            .map_err(|failure| TableError::DestinationOpen {
                path: (*destination_path).to_owned(),
                failure,
            })?;
    let device_sectors = whole_sectors(destination.size_bytes);
    if device_sectors < target_sectors {
        return Err(TableError::DestinationTooSmall {
            device_sectors,
            target_sectors,
        });
    }

    // Check 4, 4a: the source, at least as long as the target.
    let source = devs
        .open_source(source_path)
        .map_err(|failure| TableError::SourceOpen {
            path: (*source_path).to_owned(),
            failure,
        })?;
    let device_sectors = whole_sectors(source.size_bytes);
    if device_sectors < target_sectors {
        return Err(TableError::SourceTooSmall {
            device_sectors,
            target_sectors,
        });
    }

    // Check 5: "%u" with nothing after it, inside [8, 2097152].
    let region_sectors = parse_scan_u32(region_word)
        .ok()
        .map(u64::from)
        .filter(|r| (MIN_REGION_SECTORS..=MAX_REGION_SECTORS).contains(r))
        .ok_or_else(|| TableError::InvalidRegionSize {
            word: (*region_word).to_owned(),
        })?;
    // Check 5a.
    if !region_sectors.is_power_of_two() {
        return Err(TableError::RegionSizeNotPowerOfTwo { region_sectors });
    }
    // Check 5b: source first, then destination. A logical block below one sector cannot
    // occur on a real device; it is treated as one sector rather than divided by.
    for info in [&source, &destination] {
        let block_sectors = u64::from(info.logical_block_size / 512).max(1);
        if !region_sectors.is_multiple_of(block_sectors) {
            return Err(TableError::RegionSizeNotBlockMultiple {
                region_sectors,
                logical_block_size: info.logical_block_size,
            });
        }
    }

    // Check 6a: at most 2^31 regions (u64 arithmetic: nothing here can wrap).
    let geometry = Geometry::new(target_sectors, region_sectors).map_err(|e| match e {
        GeometryError::TooManyRegions { nr_regions } => TableError::TooManyRegions { nr_regions },
        GeometryError::ZeroLength => TableError::ZeroLength,
        GeometryError::RegionSizeNotPowerOfTwo { region_sectors } => {
            TableError::RegionSizeNotPowerOfTwo { region_sectors }
        }
        _ => TableError::InvalidRegionSize {
            word: (*region_word).to_owned(),
        },
    })?;
    debug_assert!(geometry.nr_regions() <= MAX_REGIONS);

    // Check 8, 8a: the optional feature group.
    let mut no_hydration = false;
    let mut no_discard_passdown = false;
    let mut rest = rest;
    if let Some(first) = rest.first() {
        let (count, tail) =
            read_group(rest, MAX_FEATURE_ARGS).ok_or_else(|| TableError::FeatureCount {
                word: (*first).to_owned(),
            })?;
        let (features, after) = tail.split_at(count);
        for feature in features {
            if feature.eq_ignore_ascii_case("no_hydration") {
                no_hydration = true;
            } else if feature.eq_ignore_ascii_case("no_discard_passdown") {
                no_discard_passdown = true;
            } else {
                return Err(TableError::UnknownFeature {
                    word: (*feature).to_owned(),
                });
            }
        }
        rest = after;
    }

    // Check 9..9d: the optional core group; the last duplicate wins.
    let mut hydration_threshold = DEFAULT_HYDRATION_THRESHOLD;
    let mut hydration_batch_size = DEFAULT_HYDRATION_BATCH_SIZE;
    if let Some(first) = rest.first() {
        let (count, tail) =
            read_group(rest, MAX_CORE_ARGS).ok_or_else(|| TableError::CoreCount {
                word: (*first).to_owned(),
            })?;
        if !count.is_multiple_of(2) {
            return Err(TableError::OddCoreCount { count });
        }
        let (pairs, after) = tail.split_at(count);
        for pair in pairs.chunks_exact(2) {
            let [key, value] = pair else { continue };
            if key.eq_ignore_ascii_case("hydration_threshold") {
                hydration_threshold =
                    parse_kstrtouint(value).map_err(|_| TableError::InvalidHydrationThreshold {
                        word: (*value).to_owned(),
                    })?;
            } else if key.eq_ignore_ascii_case("hydration_batch_size") {
                hydration_batch_size =
                    parse_kstrtouint(value).map_err(|_| TableError::InvalidHydrationBatchSize {
                        word: (*value).to_owned(),
                    })?;
            } else {
                return Err(TableError::UnknownCoreArgument {
                    key: (*key).to_owned(),
                });
            }
        }
        rest = after;
    }

    // H4: nothing may follow the core group.
    if !rest.is_empty() {
        return Err(TableError::TrailingArguments {
            words: rest.iter().map(|w| (*w).to_owned()).collect(),
        });
    }

    Ok(CloneTable {
        metadata_path: (*metadata_path).to_owned(),
        destination_path: (*destination_path).to_owned(),
        source_path: (*source_path).to_owned(),
        metadata_size_bytes,
        destination,
        source,
        geometry,
        no_hydration,
        no_discard_passdown,
        hydration_threshold,
        hydration_batch_size,
        ctr_args: args[3..].iter().map(|w| (*w).to_owned()).collect(),
        warnings,
    })
}

/// The TABLE status (SPEC 2.2): the three devices, then every constructor word after them,
/// verbatim, separated by single spaces.
///
/// `devs` are metadata, destination, source: `maj:min` for a block device, as the kernel
/// prints. A device that is a regular file has no device number of its own, so the caller
/// passes its path; a path holding white space or a backslash is printed with backslash
/// escapes so that the line splits back into the same words.
pub fn format_table(devs: [&str; 3], ctr_args: &[String]) -> String {
    let mut out = devs
        .iter()
        .map(|d| escape_table_word(d))
        .collect::<Vec<_>>()
        .join(" ");
    for arg in ctr_args {
        out.push(' ');
        out.push_str(arg);
    }
    out
}

/// [`format_table`] with the `dmsetup table` prefix `0 <len> clone `.
pub fn format_table_line(target_sectors: u64, devs: [&str; 3], ctr_args: &[String]) -> String {
    format!("0 {target_sectors} clone {}", format_table(devs, ctr_args))
}
