//! clonebd-testkit: deterministic test equipment.
//!
//! - [`SimDisk`]: a [`clonebd_core::BlockDev`] held in memory with a volatile write cache.
//!   Writes are visible at once but durable only after a flush; [`SimDisk::power_cut`] keeps
//!   the durable image plus any subset of the unflushed writes, torn at 512-byte sectors, as a
//!   real disk losing power may. Faults can be injected per operation and per range, and every
//!   operation can be recorded in a [`Trace`] shared between disks, so tests can check the order
//!   of writes and flushes across devices.
//! - [`Rng`]: a small seeded generator (SplitMix64), so every simulation replays from its seed.
//! - [`machine`]: what a test needs from the machine (programs, root), skipping without it on
//!   a developer's machine and failing under CI.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod machine;
mod rng;
mod sim;

pub use rng::Rng;
pub use sim::{CutStyle, FaultOp, SimDisk, Trace, TraceEvent, TraceOp};
