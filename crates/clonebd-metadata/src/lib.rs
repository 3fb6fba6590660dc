//! clonebd-metadata: dm-clone v1 metadata, byte-compatible with the Linux kernel.
//!
//! The metadata device records which regions of the clone are hydrated. Its format is the
//! kernel's (SPEC 5.1): a superblock at block 0 and, built from the kernel's
//! *persistent-data* library, a bitset (an array of `u64` words stored in array blocks
//! indexed by a btree) and a metadata space map (an index block, bitmap blocks with two-bit
//! reference counts, a reference-count btree). Every change is made copy-on-write
//! ("shadowing") and a single superblock write switches a whole transaction in, so a crash
//! leaves either the old or the new state, never a mix (see `docs/FORMAT.md`).
//!
//! The crate is layered:
//! - [`format`](mod@format): pure encode/decode of every block type on `&[u8]`, with the kernel's
//!   checksums and validation order;
//! - `tm` (private): the transaction manager and the metadata space map: copy-on-write
//!   shadowing, block allocation and reference counting, following the kernel's allocation
//!   order so that formatted and committed images match the kernel's block for block;
//! - `btree`, `array` (private): the persistent-data btree and array/bitset on top of it;
//! - [`MetadataStore`]: open (or format), commit, abort, reload: what the engine's driver
//!   calls;
//! - [`check()`] and [`dump()`]: read-only whole-device verification and summaries, for the
//!   `clonebd check` and `clonebd dump` commands;
//! - [`repair`](mod@repair): consistent metadata rebuilt from a damaged device (read-only),
//!   reporting the regions whose state was lost, for `clonebd repair`.
//!
//! Nothing here panics on bad input: every malformed block is a [`MetadataError`], and
//! metadata that fails validation is never written to.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod array;
mod btree;
pub mod check;
pub mod dump;
mod error;
pub mod format;
pub mod repair;
mod store;
mod tm;

pub use check::{CheckReport, Problem, check};
pub use dump::{DumpReport, dump};
pub use error::{BlockKind, Corruption, IoOp, MetadataError, Unsupported};
pub use repair::{RepairError, RepairOptions, RepairReport, UnknownAs};
pub use store::{MetadataStore, StoreOptions, metadata_size_warning, required_metadata_bytes};
