//! Support shared by the daemon's integration tests; each file is one helper module.

pub mod daemon;
pub mod loops;
pub mod peers;
pub mod servers;
