//! Pool slots: 8 bytes each (28-bit content hash, node, reference count, trust domain) plus one
//! bit of allocation state. Slot numbers are global; slot `n` lives in the pool of its node, in
//! chunk `n / CHUNK_SLOTS` (the pool spreads chunks over several files, see `pool::locate`).

use crate::meta::PAYLOAD_MASK;

/// Consecutive slots that stay consecutive pages of one pool file (2 MiB): a stretch of up to
/// this many slots never crosses a chunk, and a longer one starts at a chunk (see
/// [`SlotTable::free_stretch`]), so that a run of pages merged onto it takes as few remaps as
/// it can.
pub const CHUNK_SLOTS: u32 = 512;

/// Highest number of NUMA nodes a slot can name.
pub const MAX_NODES: usize = 16;
/// Highest number of sharers one slot can count.
pub const MAX_REFS: u16 = u16::MAX;
/// The trust domain of a slot that belongs to none (see [`SlotTable::reserve`]).
pub const NO_DOMAIN: u16 = u16::MAX;

#[derive(Clone, Copy, Debug, Default)]
struct SlotRec {
    /// 28-bit hash in the low bits, node in the top 4.
    hash_node: u32,
    refs: u16,
    domain: u16,
}

/// The table of pool slots.
#[derive(Debug, Default)]
pub struct SlotTable {
    recs: Vec<SlotRec>,
    /// One bit per slot, set when allocated.
    used: Vec<u64>,
    allocated: u64,
    /// Slots with at least one reference.
    live: u64,
    /// Sum of all reference counts.
    total_refs: u64,
    search_from: usize,
    /// Allocated slots per trust domain (a domain with slots cannot be forgotten).
    by_domain: Vec<u32>,
}

impl SlotTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn is_used(&self, slot: u32) -> bool {
        let i = slot as usize;
        self.used
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Allocates a slot for content with `hash` on `node` in `domain`, at `prefer` when that slot
    /// is free (so that consecutive pages get consecutive slots), else the lowest free one.
    /// Returns `None` when slot numbers are exhausted.
    pub fn alloc(&mut self, hash: u32, node: u8, domain: u16, prefer: Option<u32>) -> Option<u32> {
        let slot = match prefer.filter(|&p| p <= PAYLOAD_MASK && !self.is_used(p)) {
            Some(p) => p,
            None => self.first_free()?,
        };
        let i = slot as usize;
        if i >= self.recs.len() {
            // Grow by an eighth, not by doubling: the table is metadata counted per guest page.
            let want = i + 1 - self.recs.len();
            if self.recs.capacity() < i + 1 {
                self.recs
                    .reserve_exact(want.max(1024).max(self.recs.len() / 8));
            }
            self.recs.resize(i + 1, SlotRec::default());
        }
        if i / 64 >= self.used.len() {
            self.used.resize(i / 64 + 1, 0);
        }
        self.used[i / 64] |= 1 << (i % 64);
        self.recs[i] = SlotRec {
            hash_node: (hash & PAYLOAD_MASK) | (u32::from(node & 0xf) << 28),
            refs: 0,
            domain,
        };
        if domain != NO_DOMAIN {
            let d = usize::from(domain);
            if d >= self.by_domain.len() {
                self.by_domain.resize(d + 1, 0);
            }
            self.by_domain[d] += 1;
        }
        self.allocated += 1;
        Some(slot)
    }

    /// The first slot of `len` free slots in a row: the lowest free slot if the ones after it
    /// are free too (the first few holes are tried), else the first slot past every allocated
    /// one. A stretch of up to [`CHUNK_SLOTS`] never crosses a chunk: it starts at the next
    /// chunk instead; a longer one starts at a chunk. `None` when slot numbers are exhausted.
    pub fn free_stretch(&mut self, len: u32) -> Option<u32> {
        let len = len.max(1) as usize;
        while self.search_from < self.used.len() && self.used[self.search_from] == u64::MAX {
            self.search_from += 1;
        }
        let end = self.used.len() * 64;
        let fits = |s: usize| {
            u32::try_from(s)
                .ok()
                .filter(|&s| s.saturating_add(len as u32 - 1) <= PAYLOAD_MASK)
        };
        let mut s = self.search_from * 64;
        for _ in 0..8 {
            // The next hole from `s` on, word by word.
            while s < end && self.used[s / 64] == u64::MAX {
                s = (s / 64 + 1) * 64;
            }
            while s < end && self.is_used(s as u32) {
                s += 1;
            }
            s = within_chunk(s, len);
            if s >= end {
                break;
            }
            let mut e = s;
            while e < end && e - s < len && !self.is_used(e as u32) {
                e += 1;
            }
            if e - s >= len || e >= end {
                return fits(s);
            }
            s = e;
        }
        fits(within_chunk(s.max(end), len))
    }

    fn first_free(&mut self) -> Option<u32> {
        let start = self.search_from.min(self.used.len());
        for w in start..self.used.len() {
            let word = self.used[w];
            if word != u64::MAX {
                self.search_from = w;
                let slot = w * 64 + (!word).trailing_zeros() as usize;
                return u32::try_from(slot).ok().filter(|&s| s <= PAYLOAD_MASK);
            }
        }
        self.search_from = self.used.len();
        u32::try_from(self.used.len() * 64)
            .ok()
            .filter(|&s| s <= PAYLOAD_MASK)
    }

    /// Keeps `slot` from ever being allocated (memory outside the engine still maps it): a free
    /// slot becomes allocated with no domain, no hash and no reference; an allocated one is
    /// left as it is (the caller never frees it).
    pub fn reserve(&mut self, slot: u32) {
        if slot <= PAYLOAD_MASK && !self.is_used(slot) {
            let _ = self.alloc(0, 0, NO_DOMAIN, Some(slot));
        }
    }

    /// Frees a slot (its pool page must have been punched, or never mapped).
    pub fn free(&mut self, slot: u32) {
        if !self.is_used(slot) {
            return;
        }
        let i = slot as usize;
        let refs = self.recs[i].refs;
        if refs > 0 {
            self.live -= 1;
            self.total_refs -= u64::from(refs);
        }
        let domain = self.recs[i].domain;
        if let Some(n) = self.by_domain.get_mut(usize::from(domain)) {
            if domain != NO_DOMAIN {
                *n = n.saturating_sub(1);
            }
        }
        self.recs[i] = SlotRec::default();
        self.used[i / 64] &= !(1 << (i % 64));
        self.allocated -= 1;
        self.search_from = self.search_from.min(i / 64);
    }

    /// Whether `slot` is allocated.
    pub fn allocated(&self, slot: u32) -> bool {
        self.is_used(slot)
    }

    /// Reference count of `slot`.
    pub fn refs(&self, slot: u32) -> u16 {
        self.recs.get(slot as usize).map_or(0, |r| r.refs)
    }

    /// Sets the reference count of `slot` (from a pagemap rebuild).
    pub fn set_refs(&mut self, slot: u32, refs: u16) {
        if !self.is_used(slot) {
            return;
        }
        let r = &mut self.recs[slot as usize];
        let old = r.refs;
        r.refs = refs;
        self.total_refs = self.total_refs - u64::from(old) + u64::from(refs);
        match (old > 0, refs > 0) {
            (false, true) => self.live += 1,
            (true, false) => self.live -= 1,
            _ => {}
        }
    }

    /// Adds one reference; returns false when the count would overflow.
    pub fn inc(&mut self, slot: u32) -> bool {
        let refs = self.refs(slot);
        if refs == MAX_REFS || !self.is_used(slot) {
            return false;
        }
        self.set_refs(slot, refs + 1);
        true
    }

    /// Drops one reference; returns the new count.
    pub fn dec(&mut self, slot: u32) -> u16 {
        let refs = self.refs(slot).saturating_sub(1);
        self.set_refs(slot, refs);
        refs
    }

    /// 28-bit content hash of `slot`.
    pub fn hash(&self, slot: u32) -> u32 {
        self.recs
            .get(slot as usize)
            .map_or(0, |r| r.hash_node & PAYLOAD_MASK)
    }

    /// Node whose pool holds `slot`.
    pub fn node(&self, slot: u32) -> u8 {
        self.recs
            .get(slot as usize)
            .map_or(0, |r| (r.hash_node >> 28) as u8)
    }

    /// Trust domain of `slot`.
    pub fn domain(&self, slot: u32) -> u16 {
        self.recs.get(slot as usize).map_or(0, |r| r.domain)
    }

    /// Allocated slots of trust domain `domain`: pinned ones, ones whose punch failed, and any
    /// other not freed yet.
    pub fn domain_slots(&self, domain: u16) -> u32 {
        self.by_domain
            .get(usize::from(domain))
            .copied()
            .unwrap_or(0)
    }

    /// Allocated slots.
    pub fn allocated_count(&self) -> u64 {
        self.allocated
    }

    /// Slots with at least one reference (KSM's `pages_shared`).
    pub fn live(&self) -> u64 {
        self.live
    }

    /// Sum of reference counts.
    pub fn total_refs(&self) -> u64 {
        self.total_refs
    }

    /// One past the highest slot number ever allocated.
    pub fn high_water(&self) -> u32 {
        self.recs.len() as u32
    }

    /// Allocated slots with no reference (to punch and free).
    pub fn unreferenced(&self) -> Vec<u32> {
        self.allocated_slots()
            .filter(|&slot| self.recs[slot as usize].refs == 0)
            .collect()
    }

    /// Every allocated slot.
    pub fn all_allocated(&self) -> Vec<u32> {
        self.allocated_slots().collect()
    }

    /// The allocated slots in ascending order: the set bits of the allocation bitmap.
    fn allocated_slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.used.iter().enumerate().flat_map(|(w, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let b = bits.trailing_zeros();
                    bits &= bits - 1;
                    w as u32 * 64 + b
                })
            })
        })
    }

    /// Bytes of memory this table holds.
    pub fn memory_bytes(&self) -> usize {
        self.recs.capacity() * std::mem::size_of::<SlotRec>()
            + self.used.capacity() * 8
            + self.by_domain.capacity() * 4
    }
}

/// `s`, or the start of the next chunk when a stretch of `len` slots from `s` would cross more
/// chunk boundaries than it must: a stretch of at most a chunk's slots crosses none, a longer
/// one starts at a chunk.
fn within_chunk(s: usize, len: usize) -> usize {
    let chunk = CHUNK_SLOTS as usize;
    let crosses = s / chunk != (s + len - 1) / chunk;
    if (len <= chunk && crosses) || (len > chunk && s % chunk != 0) {
        s.div_ceil(chunk) * chunk
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_prefers_hint_then_lowest_free() {
        let mut t = SlotTable::new();
        assert_eq!(t.alloc(1, 0, 0, None), Some(0));
        assert_eq!(t.alloc(2, 0, 0, Some(1)), Some(1));
        assert_eq!(t.alloc(3, 1, 5, Some(1)), Some(2));
        assert_eq!(t.alloc(4, 0, 0, Some(10)), Some(10));
        assert_eq!(t.alloc(5, 0, 0, None), Some(3));
        t.free(1);
        assert_eq!(t.alloc(6, 0, 0, None), Some(1));
        assert_eq!(t.hash(2), 3);
        assert_eq!(t.node(2), 1);
        assert_eq!(t.domain(2), 5);
        assert_eq!(t.allocated_count(), 5);
    }

    #[test]
    fn counts_slots_per_domain() {
        let mut t = SlotTable::new();
        let a = t.alloc(1, 0, 3, None).unwrap();
        let b = t.alloc(2, 0, 3, None).unwrap();
        t.reserve(40);
        assert_eq!((t.domain_slots(3), t.domain_slots(0)), (2, 0));
        assert_eq!(t.domain(40), NO_DOMAIN);
        assert_eq!(t.domain_slots(NO_DOMAIN), 0);
        t.free(a);
        t.free(a);
        assert_eq!(t.domain_slots(3), 1);
        t.free(40);
        t.free(b);
        assert_eq!(t.domain_slots(3), 0);
        assert_eq!(t.allocated_count(), 0);
    }

    #[test]
    fn free_stretch_skips_holes_too_small() {
        let mut t = SlotTable::new();
        for s in 0..10 {
            t.alloc(1, 0, 0, Some(s));
        }
        t.free(2);
        t.free(5);
        t.free(6);
        t.free(7);
        assert_eq!(t.free_stretch(1), Some(2));
        assert_eq!(t.free_stretch(3), Some(5));
        assert_eq!(t.free_stretch(4), Some(10));
        for s in 10..64 {
            t.alloc(1, 0, 0, Some(s));
        }
        assert_eq!(t.free_stretch(4), Some(64));
        assert_eq!(SlotTable::new().free_stretch(100), Some(0));
    }

    #[test]
    fn free_stretch_never_crosses_a_chunk() {
        let chunk = CHUNK_SLOTS;
        let mut t = SlotTable::new();
        for s in 0..chunk - 10 {
            t.alloc(1, 0, 0, Some(s));
        }
        // Past every allocated slot: 10 fit before the chunk ends, 11 start the next chunk.
        assert_eq!(t.free_stretch(10), Some(chunk - 10));
        assert_eq!(t.free_stretch(11), Some(chunk));
        // A hole at a chunk's end is used for what fits in it, skipped for what does not.
        for s in chunk..chunk + 64 {
            t.alloc(1, 0, 0, Some(s));
        }
        assert_eq!(t.free_stretch(10), Some(chunk - 10));
        assert_eq!(t.free_stretch(11), Some(chunk + 64));
        // Longer than a chunk: it has to cross, and starts at a chunk.
        assert_eq!(t.free_stretch(chunk + 1), Some(2 * chunk));
        assert_eq!(SlotTable::new().free_stretch(chunk), Some(0));
    }

    #[test]
    fn counts_refs_live_and_unreferenced() {
        let mut t = SlotTable::new();
        let a = t.alloc(1, 0, 0, None).unwrap();
        let b = t.alloc(2, 0, 0, None).unwrap();
        assert!(t.inc(a));
        assert!(t.inc(a));
        assert!(t.inc(b));
        assert_eq!((t.live(), t.total_refs()), (2, 3));
        assert_eq!(t.dec(b), 0);
        assert_eq!(t.unreferenced(), vec![b]);
        assert_eq!((t.live(), t.total_refs()), (1, 2));
        t.free(a);
        assert_eq!((t.live(), t.total_refs()), (0, 0));
        assert!(!t.inc(a));
        t.set_refs(b, MAX_REFS);
        assert!(!t.inc(b));
        assert_eq!(t.all_allocated(), vec![b]);
    }
}
