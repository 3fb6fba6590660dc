//! clonebd-core: the parts of clonebd that are pure logic.
//!
//! - [`geometry`]: sectors, regions and their conversions (all `u64`);
//! - [`bitmap`]: the lock-free in-core hydration map and the sparse per-transaction dirty set;
//! - [`buf`], [`clock`]: direct-I/O buffers and the clock seam;
//! - [`dev`]: the block-device trait that real and simulated devices implement;
//! - [`errno`]: system errors in words, with the errno's name;
//! - [`histogram`]: lock-free latency histograms for metrics;
//! - [`dmclone`]: the dm-clone table line, status line and messages, byte-exact;
//! - [`ranges`]: sizes (`64k`) and byte ranges as people write them, and range lists;
//! - [`engine`]: the region state machine, hydration and the commit protocol.
//!
//! Nothing in this crate performs I/O, reads a clock, spawns a thread or allocates on behalf of
//! an untrusted peer; everything that happens is an input passed in, and everything the crate
//! wants done is an output returned.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod bitmap;
pub mod buf;
pub mod clock;
pub mod dev;
pub mod dmclone;
pub mod engine;
pub mod errno;
pub mod geometry;
pub mod histogram;
pub mod ranges;

pub use bitmap::{DirtySet, HydrationMap};
pub use buf::AlignedBuf;
pub use clock::Clock;
pub use dev::{BlockDev, Caps, Extent};
pub use geometry::{Geometry, GeometryError, RegionId, SECTOR_SIZE};
