//! Recording the order in which clients first read cold regions (`--record-reads`), so that
//! the next clone of the same image can hydrate them first (`--hydrate-first`).
//!
//! The read path calls [`ReadRecorder::note`] with each read's range. It looks at the
//! hydration map and a second lock-free map of regions already seen (one bit per region,
//! set at most once); a region not hydrated and not seen before is a first cold read, and
//! each run of such regions goes over a channel to a writer thread. The read path does no
//! file I/O and takes no lock. The writer joins runs that follow on from each other
//! (`64k` then the next `64k` is one line), and writes each range as an `OFFSET LENGTH`
//! line ([`format_range_line`]) once the next run does not continue it, or the recorder has
//! been idle for [`IDLE_FLUSH`]. [`ReadRecorder::finish`] (at shutdown) writes what is left
//! and makes the file durable.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use clonebd_core::ranges::{ByteRange, format_range_line};
use clonebd_core::{Geometry, HydrationMap, RegionId};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};

/// How long the writer holds a range that might still grow before it writes it out.
pub const IDLE_FLUSH: Duration = Duration::from_secs(1);

enum Note {
    /// Regions `[first, first+n)` were read cold for the first time.
    Run(RegionId, u64),
    /// Write what is left, sync, and stop.
    Finish,
}

/// Notes first reads of cold regions and appends them to a file, in order. See the module
/// documentation.
pub struct ReadRecorder {
    geometry: Geometry,
    seen: HydrationMap,
    tx: Sender<Note>,
    writer: Mutex<Option<JoinHandle<io::Result<()>>>>,
}

impl std::fmt::Debug for ReadRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadRecorder")
            .field("seen", &self.seen.nr_hydrated())
            .finish_non_exhaustive()
    }
}

impl ReadRecorder {
    /// A recorder for a clone of `geometry` that appends to `file` (opened for appending),
    /// with its writer thread started.
    pub fn new(geometry: Geometry, file: File) -> io::Result<Self> {
        let (tx, rx) = unbounded();
        let writer = std::thread::Builder::new()
            .name("clonebd-record".to_string())
            .spawn(move || write_loop(geometry, &rx, BufWriter::new(file)))?;
        Ok(Self {
            geometry,
            seen: HydrationMap::new(geometry.nr_regions()),
            tx,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// A client reads `[offset, offset+len)` (a range inside the clone) now, with `map`
    /// the clone's hydration map: note the regions it reads cold for the first time.
    pub fn note(&self, map: &HydrationMap, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let g = &self.geometry;
        let first = g.region_of_byte(offset);
        let end = g.region_of_byte(offset + len - 1) + 1;
        let mut run: Option<(RegionId, u64)> = None;
        let mut r = first;
        while let Some(cold) = map.first_unhydrated_in(r, end) {
            if self.seen.set(cold) {
                run = match run {
                    Some((s, n)) if s + n == cold => Some((s, n + 1)),
                    Some((s, n)) => {
                        let _ = self.tx.send(Note::Run(s, n));
                        Some((cold, 1))
                    }
                    None => Some((cold, 1)),
                };
            }
            r = cold + 1;
        }
        if let Some((s, n)) = run {
            // After `finish` nobody listens; a read then is not recorded.
            let _ = self.tx.send(Note::Run(s, n));
        }
    }

    /// Writes out what is left, makes the file durable (`fdatasync`) and stops the writer.
    /// Reads noted afterwards are not recorded. Later calls return `Ok` at once.
    pub fn finish(&self) -> io::Result<()> {
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(writer) = writer else {
            return Ok(());
        };
        let _ = self.tx.send(Note::Finish);
        writer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the read recorder's writer panicked")))
    }
}

impl Drop for ReadRecorder {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

fn write_loop(g: Geometry, rx: &Receiver<Note>, mut out: BufWriter<File>) -> io::Result<()> {
    let mut pending: Option<(RegionId, u64)> = None;
    let line = |(first, n): (RegionId, u64)| {
        let (offset, end) = g.regions_byte_range(first, n);
        format_range_line(ByteRange {
            offset,
            len: end - offset,
        })
    };
    loop {
        match rx.recv_timeout(IDLE_FLUSH) {
            Ok(Note::Run(first, n)) => {
                pending = match pending {
                    Some((s, m)) if s + m == first => Some((s, m + n)),
                    Some(p) => {
                        out.write_all(line(p).as_bytes())?;
                        Some((first, n))
                    }
                    None => Some((first, n)),
                };
            }
            Err(RecvTimeoutError::Timeout) => {
                if let Some(p) = pending.take() {
                    out.write_all(line(p).as_bytes())?;
                    out.flush()?;
                }
            }
            Ok(Note::Finish) | Err(RecvTimeoutError::Disconnected) => {
                if let Some(p) = pending.take() {
                    out.write_all(line(p).as_bytes())?;
                }
                out.flush()?;
                return out.get_ref().sync_data();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clonebd_core::ranges::parse_range_list;

    #[test]
    fn first_cold_reads_are_recorded_in_order_and_joined_when_adjacent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reads");
        // 16 regions of 4 KiB, the last one 2 KiB.
        let g = Geometry::new(15 * 8 + 4, 8).unwrap();
        let map = HydrationMap::new(g.nr_regions());
        map.set(6);
        let file = File::options()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let rec = ReadRecorder::new(g, file).unwrap();
        rec.note(&map, 5 * 4096 + 512, 512); // region 5
        rec.note(&map, 5 * 4096, 3 * 4096); // 5 seen, 6 hydrated: 7
        rec.note(&map, 8 * 4096, 4096); // 8 follows 7
        rec.note(&map, 0, 2 * 4096); // 0 and 1
        rec.note(&map, 0, 4096); // seen
        rec.note(&map, 15 * 4096, 2048); // the short last region
        rec.finish().unwrap();
        rec.note(&map, 12 * 4096, 4096); // after finish: not recorded
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text, "20480 4096\n28672 8192\n0 8192\n61440 2048\n",
            "{text}"
        );
        assert_eq!(
            parse_range_list(&text, Some(g.target_bytes()))
                .unwrap()
                .len(),
            4
        );
    }
}
