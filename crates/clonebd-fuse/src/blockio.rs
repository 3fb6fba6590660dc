//! Byte-addressed file I/O over a block device: [`BlockFile`].
//!
//! FUSE hands the file system any byte offset and length (the page cache writes through
//! exactly the bytes a program wrote). Requests that are whole logical blocks go straight to
//! the backend; the others read the partial blocks at either end, patch them, and write the
//! whole blocks back, holding the blocks' range in a [`RangeLock`] so no other write can
//! slip in between. Data is staged in page-aligned buffers so the destination's `O_DIRECT`
//! path can take it.
//!
//! The file has the backend's size, rounded down to whole logical blocks, and can neither
//! grow nor shrink: a write past the end is cut short there, and one at or past the end
//! fails with `EFBIG`.

use clonebd_core::AlignedBuf;
use clonebd_core::buf::BUF_ALIGN;
use clonebd_driver::{BlockExport, IoError};
use fuser::Errno;

use crate::rangelock::RangeLock;

/// How [`BlockFile::zero`] treats the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroMode {
    /// `FALLOC_FL_PUNCH_HOLE`: discard the whole blocks, then make the range read as zeros
    /// (what `fallocate(2)` promises, and what the loop driver relies on when it turns a
    /// block device's WRITE_ZEROES into a hole punch).
    PunchHole,
    /// `FALLOC_FL_ZERO_RANGE`: make the range read as zeros.
    ZeroRange,
}

/// The file: a backend, its block size, and the lock that orders writes.
#[derive(Debug)]
pub(crate) struct BlockFile<B> {
    dev: B,
    size: u64,
    lbs: u64,
    writes: RangeLock,
}

fn down(x: u64, a: u64) -> u64 {
    x - x % a
}

fn up(x: u64, a: u64) -> u64 {
    x.div_ceil(a).saturating_mul(a)
}

/// The errno a FUSE reply carries for a failed request.
fn errno_of(e: IoError) -> Errno {
    Errno::from_i32(e.errno())
}

/// `usize` of a length known to fit (it is at most a request's length).
fn len_of(x: u64) -> Result<usize, Errno> {
    usize::try_from(x).map_err(|_| Errno::EINVAL)
}

impl<B: BlockExport> BlockFile<B> {
    /// A file over `dev`.
    pub(crate) fn new(dev: B) -> Self {
        let lbs = u64::from(dev.caps().logical_block_size.max(512));
        let size = down(dev.size_bytes(), lbs);
        Self {
            dev,
            size,
            lbs,
            writes: RangeLock::default(),
        }
    }

    /// The file's size in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// The logical block size in bytes.
    pub(crate) fn block_size(&self) -> u64 {
        self.lbs
    }

    /// Reads up to `len` bytes at `offset` (fewer at the end of the file, none past it),
    /// staging them in `buf`, and returns them.
    pub(crate) fn read<'a>(
        &self,
        offset: u64,
        len: u64,
        buf: &'a mut AlignedBuf,
    ) -> Result<&'a [u8], Errno> {
        if offset >= self.size || len == 0 {
            return Ok(&[]);
        }
        let end = offset.saturating_add(len).min(self.size);
        let (start_al, end_al) = (down(offset, self.lbs), up(end, self.lbs));
        let n = len_of(end_al - start_al)?;
        buf.resize(n);
        self.dev.read(start_al, &mut buf[..n]).map_err(errno_of)?;
        let skip = len_of(offset - start_al)?;
        let take = len_of(end - offset)?;
        Ok(&buf[skip..skip + take])
    }

    /// Writes `data` at `offset` and returns how many bytes were written (fewer than asked
    /// at the end of the file). With `fua`, they are durable on return.
    pub(crate) fn write(
        &self,
        offset: u64,
        data: &[u8],
        fua: bool,
        buf: &mut AlignedBuf,
    ) -> Result<usize, Errno> {
        if data.is_empty() {
            return Ok(0);
        }
        if offset >= self.size {
            return Err(Errno::EFBIG);
        }
        let end = offset.saturating_add(data.len() as u64).min(self.size);
        let data = &data[..len_of(end - offset)?];
        let (start_al, end_al) = (down(offset, self.lbs), up(end, self.lbs));
        let _held = self.writes.lock(start_al, end_al);
        if start_al == offset && end_al == end {
            if data.as_ptr().addr().is_multiple_of(BUF_ALIGN) {
                self.dev.write(offset, data, fua).map_err(errno_of)?;
            } else {
                buf.resize(data.len());
                buf.copy_from_slice(data);
                self.dev.write(offset, buf, fua).map_err(errno_of)?;
            }
            return Ok(data.len());
        }
        let n = len_of(end_al - start_al)?;
        buf.resize(n);
        self.fill_edges(start_al, end_al, offset, end, &mut buf[..n])?;
        let at = len_of(offset - start_al)?;
        buf[at..at + data.len()].copy_from_slice(data);
        self.dev.write(start_al, &buf[..n], fua).map_err(errno_of)?;
        Ok(data.len())
    }

    /// Reads into `buf` (which covers `[start_al, end_al)`) the partial blocks at either end
    /// that `[offset, end)` does not cover.
    fn fill_edges(
        &self,
        start_al: u64,
        end_al: u64,
        offset: u64,
        end: u64,
        buf: &mut [u8],
    ) -> Result<(), Errno> {
        let lbs = len_of(self.lbs)?;
        let n = buf.len();
        let head = offset != start_al;
        let tail = end != end_al;
        if head {
            self.dev.read(start_al, &mut buf[..lbs]).map_err(errno_of)?;
        }
        // A single block already read as the head needs no second read.
        if tail && !(head && n == lbs) {
            self.dev
                .read(end_al - self.lbs, &mut buf[n - lbs..])
                .map_err(errno_of)?;
        }
        Ok(())
    }

    /// Makes `[offset, offset+len)` (cut at the end of the file) read as zeros; with
    /// [`ZeroMode::PunchHole`] the whole blocks are discarded first. Partial blocks at
    /// either end are zeroed by read-modify-write.
    pub(crate) fn zero(
        &self,
        offset: u64,
        len: u64,
        mode: ZeroMode,
        buf: &mut AlignedBuf,
    ) -> Result<(), Errno> {
        if offset >= self.size || len == 0 {
            return Ok(());
        }
        let end = offset.saturating_add(len).min(self.size);
        let (start_al, end_al) = (down(offset, self.lbs), up(end, self.lbs));
        let _held = self.writes.lock(start_al, end_al);
        let (inner_start, inner_end) = (up(offset, self.lbs), down(end, self.lbs));
        if inner_start < inner_end {
            let n = inner_end - inner_start;
            if mode == ZeroMode::PunchHole {
                self.dev.discard(inner_start, n).map_err(errno_of)?;
            }
            self.dev
                .write_zeroes(inner_start, n, false)
                .map_err(errno_of)?;
        }
        // The partial blocks at either end (one, if the range starts and ends in it).
        let mut edges = Vec::with_capacity(2);
        if !offset.is_multiple_of(self.lbs) {
            edges.push(start_al);
        }
        if !end.is_multiple_of(self.lbs) && edges.last() != Some(&down(end, self.lbs)) {
            edges.push(down(end, self.lbs));
        }
        let lbs = len_of(self.lbs)?;
        for b in edges {
            buf.resize(lbs);
            self.dev.read(b, &mut buf[..lbs]).map_err(errno_of)?;
            let from = len_of(offset.max(b) - b)?;
            let to = len_of(end.min(b + self.lbs) - b)?;
            buf[from..to].fill(0);
            self.dev.write(b, &buf[..lbs], false).map_err(errno_of)?;
        }
        Ok(())
    }

    /// Makes every completed write durable.
    pub(crate) fn flush(&self) -> Result<(), Errno> {
        self.dev.flush().map_err(errno_of)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use clonebd_driver::ExportCaps;
    use proptest::prelude::*;

    use super::*;

    /// A memory disk that refuses unaligned requests, as the volume does.
    #[derive(Debug)]
    struct MemDisk {
        data: Mutex<Vec<u8>>,
        lbs: u32,
        log: Mutex<Vec<&'static str>>,
    }

    impl MemDisk {
        fn new(size: usize, lbs: u32) -> Self {
            let data = (0..size).map(|i| (i % 251) as u8).collect();
            Self {
                data: Mutex::new(data),
                lbs,
                log: Mutex::new(Vec::new()),
            }
        }

        fn check(&self, offset: u64, len: u64) -> Result<(usize, usize), IoError> {
            let lbs = u64::from(self.lbs);
            let size = self.data.lock().expect("disk").len() as u64;
            if len == 0
                || !offset.is_multiple_of(lbs)
                || !len.is_multiple_of(lbs)
                || offset + len > size
            {
                return Err(IoError::Invalid);
            }
            Ok((offset as usize, (offset + len) as usize))
        }

        fn snapshot(&self) -> Vec<u8> {
            self.data.lock().expect("disk").clone()
        }
    }

    /// The disk as the file's backend, shared with the test that inspects it.
    #[derive(Debug)]
    struct Shared(Arc<MemDisk>);

    impl std::ops::Deref for Shared {
        type Target = MemDisk;
        fn deref(&self) -> &MemDisk {
            &self.0
        }
    }

    impl BlockExport for Shared {
        fn size_bytes(&self) -> u64 {
            self.data.lock().expect("disk").len() as u64
        }
        fn caps(&self) -> ExportCaps {
            ExportCaps {
                logical_block_size: self.lbs,
                granularity: u64::from(self.lbs),
                flush: true,
                fua: true,
                discard: true,
                write_zeroes: true,
            }
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
            let (s, e) = self.check(offset, buf.len() as u64)?;
            buf.copy_from_slice(&self.data.lock().expect("disk")[s..e]);
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), IoError> {
            let (s, e) = self.check(offset, data.len() as u64)?;
            // Widen the window between a read-modify-write's read and write.
            std::thread::yield_now();
            self.data.lock().expect("disk")[s..e].copy_from_slice(data);
            Ok(())
        }
        fn flush(&self) -> Result<(), IoError> {
            self.log.lock().expect("log").push("flush");
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
            let (s, e) = self.check(offset, len)?;
            self.log.lock().expect("log").push("discard");
            // Discarded blocks read as garbage, not zeros.
            self.data.lock().expect("disk")[s..e].fill(0xdd);
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), IoError> {
            let (s, e) = self.check(offset, len)?;
            self.log.lock().expect("log").push("zeroes");
            self.data.lock().expect("disk")[s..e].fill(0);
            Ok(())
        }
    }

    fn file(size: usize, lbs: u32) -> (BlockFile<Shared>, Arc<MemDisk>) {
        let d = Arc::new(MemDisk::new(size, lbs));
        (BlockFile::new(Shared(Arc::clone(&d))), d)
    }

    #[test]
    fn read_unaligned_returns_exact_bytes_and_stops_at_end() {
        let (f, d) = file(8192, 512);
        let want = d.snapshot();
        let mut buf = AlignedBuf::new(0);
        assert_eq!(f.read(3, 700, &mut buf).expect("read"), &want[3..703]);
        assert_eq!(f.read(8000, 1000, &mut buf).expect("read"), &want[8000..]);
        assert!(f.read(8192, 10, &mut buf).expect("read").is_empty());
    }

    #[test]
    fn write_past_end_is_cut_short_and_at_end_is_efbig() {
        let (f, d) = file(4096, 512);
        let mut buf = AlignedBuf::new(0);
        assert_eq!(f.write(4000, &[7; 200], false, &mut buf), Ok(96));
        assert!(d.snapshot()[4000..].iter().all(|&b| b == 7));
        assert_eq!(f.write(4096, &[7; 1], false, &mut buf), Err(Errno::EFBIG));
    }

    #[test]
    fn zero_unaligned_range_in_one_block_keeps_neighbours() {
        let (f, d) = file(4096, 512);
        let before = d.snapshot();
        let mut buf = AlignedBuf::new(0);
        f.zero(600, 10, ZeroMode::ZeroRange, &mut buf)
            .expect("zero");
        let after = d.snapshot();
        assert!(after[600..610].iter().all(|&b| b == 0));
        assert_eq!(after[..600], before[..600]);
        assert_eq!(after[610..], before[610..]);
    }

    #[test]
    fn punch_hole_discards_whole_blocks_then_reads_zeros() {
        let (f, d) = file(8192, 512);
        let before = d.snapshot();
        let mut buf = AlignedBuf::new(0);
        f.zero(100, 3000, ZeroMode::PunchHole, &mut buf)
            .expect("punch");
        let after = d.snapshot();
        assert!(after[100..3100].iter().all(|&b| b == 0));
        assert_eq!(after[..100], before[..100]);
        assert_eq!(after[3100..], before[3100..]);
        assert_eq!(*d.log.lock().expect("log"), vec!["discard", "zeroes"]);
    }

    #[test]
    fn concurrent_unaligned_writes_to_one_block_keep_every_byte() {
        let (f, d) = file(4096, 4096);
        let f = Arc::new(f);
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let f = Arc::clone(&f);
                std::thread::spawn(move || {
                    let mut buf = AlignedBuf::new(0);
                    for round in 0..200u64 {
                        // Thread t owns bytes [t*16, t*16+16) of the block.
                        let v = [t.wrapping_add(round as u8); 16];
                        f.write(u64::from(t) * 16, &v, false, &mut buf)
                            .expect("write");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("writer");
        }
        let after = d.snapshot();
        for t in 0..8u8 {
            let want = t.wrapping_add(199);
            let s = usize::from(t) * 16;
            assert!(
                after[s..s + 16].iter().all(|&b| b == want),
                "thread {t}'s last write was lost"
            );
        }
    }

    proptest! {
        #[test]
        fn file_ops_match_a_plain_buffer(
            ops in proptest::collection::vec((0u64..9000, 0usize..3000, 0u8..3, any::<u8>()), 1..40)
        ) {
            let (f, d) = file(8192, 512);
            let mut model = d.snapshot();
            let mut buf = AlignedBuf::new(0);
            for (off, len, kind, v) in ops {
                let end = (off as usize).saturating_add(len).min(model.len());
                match kind {
                    0 => {
                        let r = f.write(off, &vec![v; len], false, &mut buf);
                        if len == 0 {
                            prop_assert_eq!(r, Ok(0));
                        } else if off >= 8192 {
                            prop_assert_eq!(r, Err(Errno::EFBIG));
                        } else {
                            prop_assert_eq!(r, Ok(end - off as usize));
                            model[off as usize..end].fill(v);
                        }
                    }
                    1 => {
                        f.zero(off, len as u64, ZeroMode::ZeroRange, &mut buf).expect("zero");
                        if (off as usize) < model.len() {
                            model[off as usize..end].fill(0);
                        }
                    }
                    _ => {
                        let got = f.read(off, len as u64, &mut buf).expect("read").to_vec();
                        let want = if (off as usize) < model.len() { &model[off as usize..end] } else { &[][..] };
                        prop_assert_eq!(&got[..], want);
                    }
                }
            }
            prop_assert_eq!(d.snapshot(), model);
        }
    }
}
