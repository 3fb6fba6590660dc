//! Buffers aligned for direct I/O.
//!
//! `O_DIRECT` needs the memory address, the offset and the length aligned to the device's
//! logical block size. [`AlignedBuf`] gets an aligned slice without `unsafe` by
//! over-allocating by the alignment and starting at the first aligned byte.

use std::ops::{Deref, DerefMut};

/// Alignment of every [`AlignedBuf`]: a page, which satisfies any logical block size up to
/// 4 KiB.
pub const BUF_ALIGN: usize = 4096;

/// A zero-initialised byte buffer whose start is aligned to [`BUF_ALIGN`].
#[derive(Debug, Clone)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    /// A buffer of `len` zero bytes.
    pub fn new(len: usize) -> Self {
        let raw = vec![0u8; len + BUF_ALIGN];
        let off = raw.as_ptr().align_offset(BUF_ALIGN);
        // align_offset on a byte pointer is always below the alignment.
        let off = if off < BUF_ALIGN { off } else { 0 };
        Self { raw, off, len }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Capacity usable without reallocating.
    pub fn capacity(&self) -> usize {
        self.raw.len() - BUF_ALIGN
    }

    /// Sets the length to `len`, growing (with zeros) if needed. Contents up to the old
    /// length are kept only when no reallocation happens.
    pub fn resize(&mut self, len: usize) {
        if len > self.capacity() {
            *self = Self::new(len);
        } else {
            self.len = len;
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned_and_sized() {
        for len in [0, 1, 512, 4096, 100_000] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
            b.resize(len / 2);
            assert_eq!(b.len(), len / 2);
            assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
        }
    }
}
