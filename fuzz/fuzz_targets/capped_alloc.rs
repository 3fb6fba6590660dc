//! A global allocator that aborts on any single allocation above a cap, so that a fuzz run
//! proves the code under test never allocates an amount a peer chose.

use std::alloc::{GlobalAlloc, Layout, System};

/// Larger than any allocation the handshake or the request decoder legitimately makes
/// (option data is capped at 64 KiB; the decoder allocates nothing per request).
pub const CAP: usize = 1 << 20;

pub struct CappedAlloc;

fn check(size: usize) {
    if size > CAP {
        // Not `panic!`: formatting a panic message may itself allocate.
        std::process::abort();
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, after a
// size check that has no effect on memory; `System` upholds the `GlobalAlloc` contract.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: forwarded as received; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: forwarded as received; the caller upholds `alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this allocator with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        // SAFETY: `ptr` came from `System` through this allocator with this layout, and the
        // caller upholds `realloc`'s contract for `new_size`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
