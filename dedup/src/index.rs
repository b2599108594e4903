//! The content index: for each trust domain and NUMA node (or all nodes when merging across
//! them), a hashbrown table from 28-bit page hash to either a pool slot that holds the content
//! or a stable page not shared yet (KSM's stable and unstable trees in one table). Entries are
//! 8 bytes; the hash of an entry is looked up from the slot table or the page's metadata, so it
//! is not stored twice.

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

const PAGE_TAG: u64 = 1 << 63;

impl Entry {
    fn pack(self) -> u64 {
        match self {
            Entry::Slot(s) => u64::from(s),
            Entry::Page(l) => {
                PAGE_TAG
                    | (u64::from(l.guest) << 47)
                    | (u64::from(l.region & 0x7fff) << 32)
                    | u64::from(l.page)
            }
        }
    }

    fn unpack(v: u64) -> Entry {
        if v & PAGE_TAG == 0 {
            Entry::Slot(v as u32)
        } else {
            Entry::Page(PageLoc {
                guest: ((v >> 47) & 0xffff) as u16,
                region: ((v >> 32) & 0x7fff) as u16,
                page: v as u32,
            })
        }
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

/// The content index.
#[derive(Debug, Default)]
pub struct ContentIndex {
    tables: HashMap<IndexKey, HashTable<u64>>,
}

/// Most entries looked at for one hash (bounds the work when many contents collide).
pub const MAX_PROBE: usize = 16;

impl ContentIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
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
        let Some(t) = self.tables.get(&key) else {
            return Vec::new();
        };
        t.iter_hash(mix(hash))
            .map(|&v| Entry::unpack(v))
            .filter(|&e| usable(e) && hash_of(e) == Some(hash))
            .take(MAX_PROBE)
            .collect()
    }

    /// Adds an entry with content hash `hash`.
    pub fn insert(
        &mut self,
        key: IndexKey,
        hash: u32,
        entry: Entry,
        hash_of: impl Fn(Entry) -> Option<u32>,
    ) {
        let t = self.tables.entry(key).or_default();
        t.insert_unique(mix(hash), entry.pack(), |&v| {
            mix(hash_of(Entry::unpack(v)).unwrap_or(0))
        });
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
        if let Some(t) = self.tables.get_mut(&key) {
            let packed = old.pack();
            if let Some(v) = t.find_mut(mix(hash), |&v| v == packed) {
                *v = new.pack();
                return;
            }
        }
        self.insert(key, hash, new, hash_of);
    }

    /// Removes an entry with hash `hash`, if present.
    pub fn remove(&mut self, key: IndexKey, hash: u32, entry: Entry) {
        if let Some(t) = self.tables.get_mut(&key) {
            let packed = entry.pack();
            if let Ok(e) = t.find_entry(mix(hash), |&v| v == packed) {
                e.remove();
            }
        }
    }

    /// Drops every page entry (the unstable part is rebuilt each full pass).
    pub fn clear_pages(&mut self) {
        for t in self.tables.values_mut() {
            t.retain(|v| *v & PAGE_TAG == 0);
        }
    }

    /// Drops every entry of guest `guest`.
    pub fn remove_guest(&mut self, guest: u16) {
        for t in self.tables.values_mut() {
            t.retain(|&mut v| !matches!(Entry::unpack(v), Entry::Page(l) if l.guest == guest));
        }
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.tables.clear();
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.tables.values().map(HashTable::len).sum()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of memory the index holds.
    pub fn memory_bytes(&self) -> usize {
        self.tables.values().map(HashTable::allocation_size).sum()
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

    #[test]
    fn entries_round_trip() {
        for e in [
            Entry::Slot(0),
            Entry::Slot(0x0fff_ffff),
            Entry::Page(PageLoc {
                guest: u16::MAX,
                region: 0x7fff,
                page: u32::MAX,
            }),
            Entry::Page(loc(0)),
        ] {
            assert_eq!(Entry::unpack(e.pack()), e);
        }
    }

    #[test]
    fn lookup_filters_by_real_hash_and_key() {
        let hashes = |e: Entry| match e {
            Entry::Slot(s) => Some(s % 10),
            Entry::Page(l) => Some(l.page % 10),
        };
        let k = IndexKey { domain: 1, node: 0 };
        let other = IndexKey { domain: 2, node: 0 };
        let mut idx = ContentIndex::new();
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
        let mut idx = ContentIndex::new();
        idx.insert(k, 5, Entry::Page(loc(1)), |_| Some(5));
        assert!(idx.lookup(k, 5, |_| None, |_| true).is_empty());
        idx.remove_guest(3);
        assert!(idx.is_empty());
    }
}
