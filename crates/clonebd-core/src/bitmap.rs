//! The in-core hydration map: one bit per region, readable without a lock.
//!
//! Every request asks "is region r hydrated?", from many threads at once, so the map is a
//! slice of `AtomicU64` words (region `r` is bit `r % 64` of word `r / 64`, the kernel's
//! on-disk bitset layout). Only the engine sets bits (with `Release`), and readers load with
//! `Acquire`: a reader that sees a bit set also sees the completed destination write that
//! preceded the marking. Bits are cleared only when a failed commit reloads the last committed
//! state from disk (SPEC 5.4), which the engine performs.
//!
//! Memory is exactly one bit per region plus a few counters: 32 MiB for 2^28 regions.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::geometry::RegionId;

/// The in-core bitmap of hydrated regions, shared by the engine (the only writer) and every
/// export thread (readers).
#[derive(Debug)]
pub struct HydrationMap {
    words: Box<[AtomicU64]>,
    nr_regions: u64,
    nr_hydrated: AtomicU64,
    complete: AtomicBool,
}

/// Number of 64-bit words needed for `nr_regions` bits.
pub fn words_for(nr_regions: u64) -> u64 {
    nr_regions.div_ceil(64)
}

impl HydrationMap {
    /// An all-unhydrated map for `nr_regions` regions.
    pub fn new(nr_regions: u64) -> Self {
        let n = usize::try_from(words_for(nr_regions)).unwrap_or(usize::MAX);
        let mut words = Vec::with_capacity(n);
        words.resize_with(n, || AtomicU64::new(0));
        Self {
            words: words.into_boxed_slice(),
            nr_regions,
            nr_hydrated: AtomicU64::new(0),
            complete: AtomicBool::new(nr_regions == 0),
        }
    }

    /// Number of regions the map covers.
    pub fn nr_regions(&self) -> u64 {
        self.nr_regions
    }

    /// Number of 64-bit words.
    pub fn nr_words(&self) -> u64 {
        self.words.len() as u64
    }

    /// Mask of the bits of word `w` that stand for real regions (the last word may be partial).
    pub fn valid_mask(&self, w: u64) -> u64 {
        let first = w * 64;
        let n = self.nr_regions.saturating_sub(first).min(64);
        if n == 64 { u64::MAX } else { (1u64 << n) - 1 }
    }

    /// Whether region `r` is hydrated. Lock-free; regions past the end read as unhydrated.
    #[inline]
    pub fn is_hydrated(&self, r: RegionId) -> bool {
        if self.complete.load(Ordering::Acquire) {
            return r < self.nr_regions;
        }
        match self.words.get((r / 64) as usize) {
            Some(w) => w.load(Ordering::Acquire) & (1u64 << (r % 64)) != 0,
            None => false,
        }
    }

    /// Whether every region of `[first, first+n)` is hydrated.
    pub fn is_range_hydrated(&self, first: RegionId, n: u64) -> bool {
        if n == 0 || self.complete.load(Ordering::Acquire) {
            return first + n <= self.nr_regions;
        }
        self.first_unhydrated_in(first, first + n).is_none()
    }

    /// The first unhydrated region in `[from, to)`, if any.
    pub fn first_unhydrated_in(&self, from: RegionId, to: RegionId) -> Option<RegionId> {
        if self.complete.load(Ordering::Acquire) {
            return None;
        }
        self.first_in(from, to, true)
    }

    /// The first hydrated region in `[from, to)`, if any.
    pub fn first_hydrated_in(&self, from: RegionId, to: RegionId) -> Option<RegionId> {
        if self.complete.load(Ordering::Acquire) {
            return (from < to.min(self.nr_regions)).then_some(from);
        }
        self.first_in(from, to, false)
    }

    /// Where the run of regions sharing region `r`'s state ends, within `[r, limit)`:
    /// `(hydrated, end)`, every region of `[r, end)` being `hydrated` or not alike. This is how
    /// a request over several regions is routed run by run.
    pub fn run_from(&self, r: RegionId, limit: RegionId) -> (bool, RegionId) {
        let limit = limit.min(self.nr_regions);
        let hydrated = self.is_hydrated(r);
        let end = if hydrated {
            self.first_unhydrated_in(r, limit)
        } else {
            self.first_hydrated_in(r, limit)
        };
        (hydrated, end.unwrap_or(limit))
    }

    /// The first region in `[from, to)` whose bit is clear (`unset`) or set (`!unset`), a word
    /// at a time.
    fn first_in(&self, from: RegionId, to: RegionId, unset: bool) -> Option<RegionId> {
        let to = to.min(self.nr_regions);
        if from >= to {
            return None;
        }
        let mut w = from / 64;
        let last_w = (to - 1) / 64;
        let mut mask = !0u64 << (from % 64);
        while w <= last_w {
            let word = self.words[w as usize].load(Ordering::Acquire);
            let bits = if unset {
                !word & self.valid_mask(w)
            } else {
                word
            } & mask;
            if bits != 0 {
                let r = w * 64 + u64::from(bits.trailing_zeros());
                return (r < to).then_some(r);
            }
            w += 1;
            mask = !0;
        }
        None
    }

    /// Marks region `r` hydrated. Returns whether it was newly set. Engine only.
    pub fn set(&self, r: RegionId) -> bool {
        debug_assert!(r < self.nr_regions);
        let bit = 1u64 << (r % 64);
        let old = self.words[(r / 64) as usize].fetch_or(bit, Ordering::AcqRel);
        if old & bit == 0 {
            self.add_hydrated(1);
            true
        } else {
            false
        }
    }

    /// Sets the bits of `mask` in word `w`; returns how many were newly set. Engine only.
    pub fn set_word_bits(&self, w: u64, mask: u64) -> u32 {
        let mask = mask & self.valid_mask(w);
        let old = self.words[w as usize].fetch_or(mask, Ordering::AcqRel);
        let newly = (mask & !old).count_ones();
        if newly > 0 {
            self.add_hydrated(u64::from(newly));
        }
        newly
    }

    /// The raw word `w`.
    pub fn word(&self, w: u64) -> u64 {
        self.words[w as usize].load(Ordering::Acquire)
    }

    /// Replaces word `w` (used when loading or reloading from disk). Bits past the last
    /// region are dropped. Keeps the hydrated count exact.
    pub fn store_word(&self, w: u64, value: u64) {
        let value = value & self.valid_mask(w);
        let old = self.words[w as usize].swap(value, Ordering::AcqRel);
        let (o, n) = (u64::from(old.count_ones()), u64::from(value.count_ones()));
        if n >= o {
            self.add_hydrated(n - o);
        } else {
            self.nr_hydrated.fetch_sub(o - n, Ordering::AcqRel);
            self.complete.store(false, Ordering::Release);
        }
    }

    fn add_hydrated(&self, n: u64) {
        let now = self.nr_hydrated.fetch_add(n, Ordering::AcqRel) + n;
        if now == self.nr_regions {
            self.complete.store(true, Ordering::Release);
        }
    }

    /// Number of hydrated regions (unsigned, 64-bit: F7).
    pub fn nr_hydrated(&self) -> u64 {
        self.nr_hydrated.load(Ordering::Acquire)
    }

    /// Whether every region is hydrated.
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// Hydrated regions as sorted, merged `(first, count)` runs.
    pub fn hydrated_ranges(&self) -> Vec<(RegionId, u64)> {
        let mut out = Vec::new();
        let mut r = 0;
        while let Some(start) = self.first_hydrated_in(r, self.nr_regions) {
            let end = self
                .first_unhydrated_in(start, self.nr_regions)
                .unwrap_or(self.nr_regions);
            out.push((start, end - start));
            r = end;
        }
        out
    }
}

/// Regions newly hydrated in one transaction, kept sparsely so that memory and the cost of a
/// commit grow with the number of dirty regions, not with the size of the clone.
///
/// The set is split into chunks of 512 words (32 768 regions); a chunk exists only once one
/// of its regions is dirty. Iteration is in ascending word order, which is the order the
/// metadata store writes array blocks in.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DirtySet {
    chunks: std::collections::BTreeMap<u64, Box<[u64; CHUNK_WORDS]>>,
    nr_dirty: u64,
}

const CHUNK_WORDS: usize = 512;

impl DirtySet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether no region is dirty (the kernel's `changed` flag, negated).
    pub fn is_empty(&self) -> bool {
        self.nr_dirty == 0
    }

    /// Number of dirty regions.
    pub fn len(&self) -> u64 {
        self.nr_dirty
    }

    /// Adds region `r`; returns whether it was new.
    pub fn insert(&mut self, r: RegionId) -> bool {
        self.insert_word_bits(r / 64, 1u64 << (r % 64)) == 1
    }

    /// Adds the bits of `mask` in word `w`; returns how many were new.
    pub fn insert_word_bits(&mut self, w: u64, mask: u64) -> u32 {
        if mask == 0 {
            return 0;
        }
        let chunk = self
            .chunks
            .entry(w / CHUNK_WORDS as u64)
            .or_insert_with(|| Box::new([0u64; CHUNK_WORDS]));
        let slot = &mut chunk[(w % CHUNK_WORDS as u64) as usize];
        let newly = (mask & !*slot).count_ones();
        *slot |= mask;
        self.nr_dirty += u64::from(newly);
        newly
    }

    /// Whether region `r` is in the set.
    pub fn contains(&self, r: RegionId) -> bool {
        let w = r / 64;
        self.chunks
            .get(&(w / CHUNK_WORDS as u64))
            .is_some_and(|c| c[(w % CHUNK_WORDS as u64) as usize] & (1u64 << (r % 64)) != 0)
    }

    /// Non-zero `(word_index, mask)` pairs in ascending word order.
    pub fn words(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.chunks.iter().flat_map(|(&ci, chunk)| {
            chunk
                .iter()
                .enumerate()
                .filter(|(_, m)| **m != 0)
                .map(move |(i, &m)| (ci * CHUNK_WORDS as u64 + i as u64, m))
        })
    }

    /// Every dirty region in ascending order.
    pub fn regions(&self) -> impl Iterator<Item = RegionId> + '_ {
        self.words().flat_map(|(w, mut m)| {
            std::iter::from_fn(move || {
                if m == 0 {
                    return None;
                }
                let b = m.trailing_zeros();
                m &= m - 1;
                Some(w * 64 + u64::from(b))
            })
        })
    }

    /// Adds every region of `other`.
    pub fn union_with(&mut self, other: &DirtySet) {
        for (w, m) in other.words() {
            self.insert_word_bits(w, m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hydration_map_counts_and_completes() {
        let m = HydrationMap::new(130);
        assert!(!m.is_hydrated(5));
        assert!(m.set(5));
        assert!(!m.set(5));
        assert_eq!(m.nr_hydrated(), 1);
        for r in 0..130 {
            m.set(r);
        }
        assert!(m.is_complete());
        assert!(m.is_hydrated(129));
        assert!(!m.is_hydrated(130));
        assert_eq!(m.hydrated_ranges(), vec![(0, 130)]);
    }

    #[test]
    fn hydration_map_store_word_masks_tail_and_recounts() {
        let m = HydrationMap::new(70);
        m.store_word(1, u64::MAX);
        assert_eq!(m.nr_hydrated(), 6);
        m.store_word(0, u64::MAX);
        assert!(m.is_complete());
        m.store_word(0, 0);
        assert!(!m.is_complete());
        assert_eq!(m.nr_hydrated(), 6);
        assert_eq!(m.hydrated_ranges(), vec![(64, 6)]);
    }

    #[test]
    fn first_unhydrated_skips_full_words() {
        let m = HydrationMap::new(300);
        for r in 0..200 {
            m.set(r);
        }
        assert_eq!(m.first_unhydrated_in(0, 300), Some(200));
        assert_eq!(m.first_unhydrated_in(0, 200), None);
        assert_eq!(m.first_hydrated_in(150, 300), Some(150));
        assert!(m.is_range_hydrated(10, 190));
        assert!(!m.is_range_hydrated(10, 191));
        assert_eq!(m.run_from(150, 300), (true, 200));
        assert_eq!(m.run_from(200, 300), (false, 300));
        assert_eq!(m.run_from(200, 250), (false, 250));
    }

    #[test]
    fn dirty_set_iterates_in_order_and_counts() {
        let mut d = DirtySet::new();
        assert!(d.insert(100_000));
        assert!(d.insert(3));
        assert!(!d.insert(3));
        d.insert(64);
        assert_eq!(d.len(), 3);
        assert_eq!(d.regions().collect::<Vec<_>>(), vec![3, 64, 100_000]);
        assert!(d.contains(64));
        assert!(!d.contains(65));
        assert_eq!(d.words().next(), Some((0, 1 << 3)));
    }
}
