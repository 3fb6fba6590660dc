//! clonebd-ublk (placeholder while the crate is written).
