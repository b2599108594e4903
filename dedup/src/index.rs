//! The content index: for each trust domain and NUMA node (or all nodes when merging across
//! them), a hashbrown table from 28-bit page hash to either a pool slot that holds the content
//! or a stable page not shared yet (KSM's stable and unstable trees in one table). Entries are
//! 4 bytes: a slot number, or a page number in one numbering of all registered guest pages
//! (31 bits: up to 8 TiB of guest memory registered at once; the numbers of guests that left
//! are reused, see `State::unnumber_guest`). The hash of an entry is looked up from the slot
//! table or the page's metadata, so it is not stored twice.

use hashbrown::{HashMap, HashTable};

/// Where a guest page is: guest, region of that guest, page within the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageLoc {
    /// Engine-internal guest number.
    pub guest: u16,
    /// Region index in the guest's memory.
    pub region: u16,
    /// Page index in the region.
    pub page: u32,
}

/// One index entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A pool slot holding the content.
    Slot(u32),
    /// A stable private page with the content.
    Page(PageLoc),
}

const PAGE_TAG: u32 = 1 << 31;
/// Most guest pages the index can number.
pub const MAX_PAGE_IDS: u64 = PAGE_TAG as u64;

/// One region in the page numbering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Numbered {
    base: u32,
    pages: u32,
    guest: u16,
    region: u16,
}

/// The numbering of guest pages used by index entries.
#[derive(Debug, Default)]
struct Numbering {
    /// Sorted by `base`.
    regions: Vec<Numbered>,
    /// `by_loc[guest][region]`: index into `regions`.
    by_loc: Vec<Vec<Option<usize>>>,
}

impl Numbering {
    fn rebuild(&mut self) {
        self.regions.sort_by_key(|r| r.base);
        self.by_loc.clear();
        for (i, r) in self.regions.iter().enumerate() {
            let (g, reg) = (usize::from(r.guest), usize::from(r.region));
            if self.by_loc.len() <= g {
                self.by_loc.resize(g + 1, Vec::new());
            }
            if self.by_loc[g].len() <= reg {
                self.by_loc[g].resize(reg + 1, None);
            }
            self.by_loc[g][reg] = Some(i);
        }
    }

    fn id(&self, l: PageLoc) -> Option<u32> {
        let i = (*self
            .by_loc
            .get(usize::from(l.guest))?
            .get(usize::from(l.region))?)?;
        let r = self.regions[i];
        (l.page < r.pages).then_some(r.base + l.page)
    }

    fn loc(&self, id: u32) -> Option<PageLoc> {
        let i = self
            .regions
            .partition_point(|r| r.base <= id)
            .checked_sub(1)?;
        let r = self.regions[i];
        (id - r.base < r.pages).then_some(PageLoc {
            guest: r.guest,
            region: r.region,
            page: id - r.base,
        })
    }
}

/// Which table an entry belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IndexKey {
    /// Trust domain.
    pub domain: u16,
    /// NUMA node, or [`ANY_NODE`] when merging across nodes.
    pub node: u8,
}

/// Node value of an [`IndexKey`] when pages merge across nodes.
pub const ANY_NODE: u8 = u8::MAX;

fn mix(hash: u32) -> u64 {
    (u64::from(hash) | (u64::from(hash) << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Number of shards of the index: an entry lives in the shard its content hash picks, so the
/// decisions for different shards never touch the same entries and can be taken in parallel.
pub const SHARDS: usize = 64;

/// The shard of a content hash.
pub fn shard_of(hash: u32) -> usize {
    hash as usize % SHARDS
}

/// One shard of the content index: the entries whose hash picks it, per table.
#[derive(Debug, Default)]
pub struct IndexShard {
    tables: HashMap<IndexKey, HashTable<u32>>,
}

/// The content index.
#[derive(Debug)]
pub struct ContentIndex {
    shards: Vec<IndexShard>,
    numbering: Numbering,
}

impl Default for ContentIndex {
    fn default() -> Self {
        ContentIndex {
            shards: (0..SHARDS).map(|_| IndexShard::default()).collect(),
            numbering: Numbering::default(),
        }
    }
}

/// Most entries looked at for one hash (bounds the work when many contents collide).
pub const MAX_PROBE: usize = 16;

/// The page numbering that index entries use, shared by every shard.
#[derive(Debug, Clone, Copy)]
pub struct Numbers<'a>(&'a Numbering);

impl Numbers<'_> {
    fn pack(self, e: Entry) -> Option<u32> {
        match e {
            Entry::Slot(s) => (s < PAGE_TAG).then_some(s),
            Entry::Page(l) => self.0.id(l).map(|id| id | PAGE_TAG),
        }
    }

    fn unpack(self, v: u32) -> Option<Entry> {
        if v & PAGE_TAG == 0 {
            Some(Entry::Slot(v))
        } else {
            self.0.loc(v & !PAGE_TAG).map(Entry::Page)
        }
    }
}

impl IndexShard {
    /// [`ContentIndex::lookup_into`] within this shard.
    pub fn lookup_into(
        &self,
        nums: Numbers<'_>,
        key: IndexKey,
        hash: u32,
        hash_of: impl Fn(Entry) -> Option<u32>,
        usable: impl Fn(Entry) -> bool,
        out: &mut Vec<Entry>,
    ) {
        out.clear();
        let Some(t) = self.tables.get(&key) else {
            return;
        };
        out.extend(
            t.iter_hash(mix(hash))
                .filter_map(|&v| nums.unpack(v))
                .filter(|&e| usable(e) && hash_of(e) == Some(hash))
                .take(MAX_PROBE),
        );
    }

    /// [`ContentIndex::insert`] within this shard.
    pub fn insert(
        &mut self,
        nums: Numbers<'_>,
        key: IndexKey,
        hash: u32,
        entry: Entry,
        hash_of: impl Fn(Entry) -> Option<u32>,
    ) {
        let Some(packed) = nums.pack(entry) else {
            return;
        };
        let t = self.tables.entry(key).or_default();
        t.insert_unique(mix(hash), packed, |&v| {
            mix(nums.unpack(v).and_then(&hash_of).unwrap_or(0))
        });
    }

    /// [`ContentIndex::replace`] within this shard.
    pub fn replace(
        &mut self,
        nums: Numbers<'_>,
        key: IndexKey,
        hash: u32,
        old: Entry,
        new: Entry,
        hash_of: impl Fn(Entry) -> Option<u32>,
    ) {
        if let (Some(packed), Some(new_packed)) = (nums.pack(old), nums.pack(new)) {
            if let Some(t) = self.tables.get_mut(&key) {
                if let Some(v) = t.find_mut(mix(hash), |&v| v == packed) {
                    *v = new_packed;
                    return;
                }
            }
        }
        self.insert(nums, key, hash, new, hash_of);
    }

    fn remove(&mut self, nums: Numbers<'_>, key: IndexKey, hash: u32, entry: Entry) {
        let Some(packed) = nums.pack(entry) else {
            return;
        };
        if let Some(t) = self.tables.get_mut(&key) {
            if let Ok(e) = t.find_entry(mix(hash), |&v| v == packed) {
                e.remove();
            }
        }
    }
}

impl ContentIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Numbers the pages of region `region` of guest `guest` from `base` on (ranges must not
    /// overlap, and a range may only be reused once [`ContentIndex::remove_guest`] gave it
    /// back: an entry left with an old number would name another guest's page).
    pub fn number_region(&mut self, guest: u16, region: u16, base: u32, pages: u32) {
        self.numbering
            .regions
            .retain(|r| !(r.guest == guest && r.region == region));
        self.numbering.regions.push(Numbered {
            base,
            pages,
            guest,
            region,
        });
        self.numbering.rebuild();
    }

    /// The page numbering and every shard, to work on the shards in parallel.
    pub fn shards_mut(&mut self) -> (Numbers<'_>, &mut [IndexShard]) {
        (Numbers(&self.numbering), &mut self.shards)
    }

    /// The page numbering and the shard of `hash`.
    pub fn shard(&self, hash: u32) -> (Numbers<'_>, &IndexShard) {
        (Numbers(&self.numbering), &self.shards[shard_of(hash)])
    }

    /// Up to [`MAX_PROBE`] entries of table `key` whose content hash is `hash` (as told by
    /// `hash_of`) and that are `usable` (full slots, for example, are not counted).
    pub fn lookup(
        &self,
        key: IndexKey,
        hash: u32,
        hash_of: impl Fn(Entry) -> Option<u32>,
        usable: impl Fn(Entry) -> bool,
    ) -> Vec<Entry> {
        let mut out = Vec::new();
        self.lookup_into(key, hash, hash_of, usable, &mut out);
        out
    }

    /// [`ContentIndex::lookup`] into `out` (cleared first), which callers reuse.
    pub fn lookup_into(
        &self,
        key: IndexKey,
        hash: u32,
        hash_of: impl Fn(Entry) -> Option<u32>,
        usable: impl Fn(Entry) -> bool,
        out: &mut Vec<Entry>,
    ) {
        let (nums, shard) = self.shard(hash);
        shard.lookup_into(nums, key, hash, hash_of, usable, out);
    }

    /// Adds an entry with content hash `hash`.
    pub fn insert(
        &mut self,
        key: IndexKey,
        hash: u32,
        entry: Entry,
        hash_of: impl Fn(Entry) -> Option<u32>,
    ) {
        let nums = Numbers(&self.numbering);
        self.shards[shard_of(hash)].insert(nums, key, hash, entry, hash_of);
    }

    /// Replaces `old` (hash `hash`) by `new` with the same hash; inserts `new` if `old` is gone.
    pub fn replace(
        &mut self,
        key: IndexKey,
        hash: u32,
        old: Entry,
        new: Entry,
        hash_of: impl Fn(Entry) -> Option<u32>,
    ) {
        let nums = Numbers(&self.numbering);
        self.shards[shard_of(hash)].replace(nums, key, hash, old, new, hash_of);
    }

    /// Removes an entry with hash `hash`, if present.
    pub fn remove(&mut self, key: IndexKey, hash: u32, entry: Entry) {
        let nums = Numbers(&self.numbering);
        self.shards[shard_of(hash)].remove(nums, key, hash, entry);
    }

    fn tables_mut(&mut self) -> impl Iterator<Item = &mut HashTable<u32>> {
        self.shards.iter_mut().flat_map(|s| s.tables.values_mut())
    }

    fn tables(&self) -> impl Iterator<Item = &HashTable<u32>> {
        self.shards.iter().flat_map(|s| s.tables.values())
    }

    /// Drops every page entry (the unstable part is rebuilt each full pass).
    pub fn clear_pages(&mut self) {
        for t in self.tables_mut() {
            t.retain(|v| *v & PAGE_TAG == 0);
        }
    }

    /// Drops every entry of guest `guest` and its numbering. Returns the page numbers it had,
    /// as `(base, pages)`: once this returns no entry holds any of them, so they may number
    /// other pages (see [`ContentIndex::number_region`]).
    pub fn remove_guest(&mut self, guest: u16) -> Vec<(u32, u32)> {
        let ranges: Vec<(u32, u32)> = self
            .numbering
            .regions
            .iter()
            .filter(|r| r.guest == guest)
            .map(|r| (r.base, r.pages))
            .collect();
        if !ranges.is_empty() {
            for t in self.tables_mut() {
                // Page numbers without the tag, so that a range ending at `MAX_PAGE_IDS`
                // (whose end would wrap with the tag) is dropped too.
                t.retain(|&mut v| {
                    v & PAGE_TAG == 0
                        || !ranges
                            .iter()
                            .any(|&(base, pages)| (v & !PAGE_TAG).wrapping_sub(base) < pages)
                });
            }
        }
        self.numbering.regions.retain(|r| r.guest != guest);
        self.numbering.rebuild();
        ranges
    }

    /// Drops the tables of trust domain `domain` (forgotten: its number goes to another
    /// domain). Returns how many entries they still had, which should be none: entries of a
    /// domain belong to its guests' pages (dropped with each guest) or to its slots (dropped
    /// when the slot is freed), and a domain is only forgotten once it has neither.
    pub fn forget_domain(&mut self, domain: u16) -> usize {
        let mut left = 0;
        for s in &mut self.shards {
            s.tables.retain(|k, t| {
                if k.domain == domain {
                    left += t.len();
                    return false;
                }
                true
            });
        }
        left
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        for s in &mut self.shards {
            s.tables.clear();
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.tables().map(HashTable::len).sum()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of memory the index holds.
    pub fn memory_bytes(&self) -> usize {
        self.tables().map(HashTable::allocation_size).sum::<usize>()
            + self.numbering.regions.capacity() * std::mem::size_of::<Numbered>()
    }

    #[cfg(test)]
    fn pack(&self, e: Entry) -> Option<u32> {
        Numbers(&self.numbering).pack(e)
    }

    #[cfg(test)]
    fn unpack(&self, v: u32) -> Option<Entry> {
        Numbers(&self.numbering).unpack(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(page: u32) -> PageLoc {
        PageLoc {
            guest: 3,
            region: 2,
            page,
        }
    }

    fn numbered() -> ContentIndex {
        let mut idx = ContentIndex::new();
        idx.number_region(3, 2, 1000, 200);
        idx.number_region(0, 0, 0, 10);
        idx.number_region(3, 0, 500, 100);
        idx
    }

    #[test]
    fn entries_round_trip() {
        let idx = numbered();
        for e in [
            Entry::Slot(0),
            Entry::Slot(0x0fff_ffff),
            Entry::Page(loc(199)),
            Entry::Page(loc(0)),
            Entry::Page(PageLoc {
                guest: 3,
                region: 0,
                page: 99,
            }),
        ] {
            assert_eq!(idx.unpack(idx.pack(e).unwrap()), Some(e));
        }
        assert_eq!(idx.pack(Entry::Page(loc(200))), None);
        assert_eq!(idx.unpack(PAGE_TAG | 1200), None);
        assert_eq!(idx.unpack(PAGE_TAG | 20), None);
    }

    #[test]
    fn lookup_filters_by_real_hash_and_key() {
        let hashes = |e: Entry| match e {
            Entry::Slot(s) => Some(s % 10),
            Entry::Page(l) => Some(l.page % 10),
        };
        let k = IndexKey { domain: 1, node: 0 };
        let other = IndexKey { domain: 2, node: 0 };
        let mut idx = numbered();
        for p in 0..100 {
            idx.insert(k, p % 10, Entry::Page(loc(p)), hashes);
        }
        idx.insert(k, 3, Entry::Slot(13), hashes);
        let found = idx.lookup(k, 3, hashes, |_| true);
        assert!(
            !idx.lookup(k, 3, hashes, |e| e != Entry::Slot(13))
                .contains(&Entry::Slot(13))
        );
        assert!(found.contains(&Entry::Slot(13)));
        assert!(found.iter().all(|&e| hashes(e) == Some(3)));
        assert!(idx.lookup(other, 3, hashes, |_| true).is_empty());
        idx.replace(k, 3, Entry::Page(loc(3)), Entry::Slot(23), hashes);
        assert!(
            !idx.lookup(k, 3, hashes, |_| true)
                .contains(&Entry::Page(loc(3)))
        );
        idx.clear_pages();
        let mut left = idx.lookup(k, 3, hashes, |_| true);
        left.sort_by_key(|e| match e {
            Entry::Slot(s) => *s,
            Entry::Page(_) => u32::MAX,
        });
        assert_eq!(left, vec![Entry::Slot(13), Entry::Slot(23)]);
        idx.remove(k, 3, Entry::Slot(13));
        assert_eq!(idx.len(), 1);
    }

    #[test]
    fn stale_entries_are_not_returned() {
        let k = IndexKey {
            domain: 0,
            node: ANY_NODE,
        };
        let mut idx = numbered();
        idx.insert(k, 5, Entry::Page(loc(1)), |_| Some(5));
        assert!(idx.lookup(k, 5, |_| None, |_| true).is_empty());
        idx.insert(
            k,
            5,
            Entry::Page(PageLoc {
                guest: 0,
                region: 0,
                page: 1,
            }),
            |_| Some(5),
        );
        assert_eq!(idx.remove_guest(3), vec![(500, 100), (1000, 200)]);
        assert_eq!(idx.len(), 1);
        assert_eq!(idx.pack(Entry::Page(loc(1))), None);
    }

    #[test]
    fn a_removed_guest_leaves_no_entry_even_at_the_last_numbers() {
        let k = IndexKey { domain: 4, node: 0 };
        let mut idx = ContentIndex::new();
        let top = (MAX_PAGE_IDS - 10) as u32;
        idx.number_region(1, 0, top, 10);
        idx.number_region(2, 0, 0, 10);
        let at = |guest, page| PageLoc {
            guest,
            region: 0,
            page,
        };
        for p in 0..10 {
            idx.insert(k, p, Entry::Page(at(1, p)), |_| Some(p));
            idx.insert(k, p, Entry::Page(at(2, p)), |_| Some(p));
        }
        idx.insert(k, 3, Entry::Slot(7), |_| Some(3));
        assert_eq!(idx.remove_guest(1), vec![(top, 10)]);
        assert_eq!(idx.len(), 11, "guest 2's pages and the slot are left");
        // The numbers go to another guest: no entry names its pages.
        idx.number_region(1, 0, top, 10);
        assert!(idx.lookup(k, 5, |_| Some(5), |_| true) == vec![Entry::Page(at(2, 5))]);
        assert_eq!(idx.forget_domain(4), 11);
        assert!(idx.is_empty());
    }
}
