//! The clock seam: the engine is given time and never reads it; drivers read a [`Clock`]
//! (the system's monotonic clock in production, a manual one in simulations).

/// A monotonic clock in nanoseconds.
pub trait Clock: Send + Sync {
    /// Nanoseconds since an arbitrary, fixed origin; never goes backwards.
    fn now(&self) -> u64;
}
