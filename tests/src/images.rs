//! Guest memory images with a known duplicate layout for dedup tests: above 2 MiB (below it the
//! VMM writes boot structures and the probe runs), each guest's image has runs of
//!
//! - `dup` pages that all hold the same content, in every guest;
//! - `shared` pages, each with its own content, the same in every guest;
//! - `unique` pages, content found nowhere else;
//! - `zero` pages (left out of guest RAM by the loader: they read as zero but are not present).
//!
//! and [`Expected`] says what a complete merge of them gives, with KSM's meanings.

use crate::probe::pattern;

/// Where test content starts: the VMM and the probe guest use the memory below.
pub const CONTENT_BASE: u64 = 0x20_0000;

/// Bytes in a page.
pub const PAGE: usize = 4096;

/// How many pages of each kind every image has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kinds {
    /// Pages with one content shared by all of them, in every guest.
    pub dup: usize,
    /// Pages with distinct contents, each the same in every guest.
    pub shared: usize,
    /// Pages unique to their guest.
    pub unique: usize,
    /// All-zero pages.
    pub zero: usize,
}

/// What a complete merge of the image content gives (beyond whatever low memory gives).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// Shared copies.
    pub pages_shared: u64,
    /// Pages mapped to a copy beyond the first of each.
    pub pages_sharing: u64,
    /// Stable pages nothing else has, over all guests.
    pub pages_unshared: u64,
}

/// The images of some guests with the same layout.
#[derive(Debug, Clone)]
pub struct DedupImages {
    /// The layout.
    pub kinds: Kinds,
    /// One image per guest, from GPA 0.
    pub images: Vec<Vec<u8>>,
}

impl DedupImages {
    /// Images for `guests` guests; `seed` varies the contents between tests.
    pub fn new(guests: usize, kinds: Kinds, seed: u64) -> Self {
        let total = kinds.dup + kinds.shared + kinds.unique + kinds.zero;
        let len = CONTENT_BASE as usize + total * PAGE;
        let dup = pattern(seed, PAGE);
        let images = (0..guests)
            .map(|g| {
                let mut image = vec![0u8; len];
                let mut page = 0;
                let mut put = |content: &[u8]| {
                    let at = CONTENT_BASE as usize + page * PAGE;
                    image[at..at + PAGE].copy_from_slice(content);
                    page += 1;
                };
                for _ in 0..kinds.dup {
                    put(&dup);
                }
                for i in 0..kinds.shared {
                    put(&pattern(seed + 1000 + i as u64, PAGE));
                }
                for i in 0..kinds.unique {
                    put(&pattern(seed + 100_000 * (g as u64 + 1) + i as u64, PAGE));
                }
                image
            })
            .collect();
        Self { kinds, images }
    }

    fn gpas(&self, first: usize, count: usize) -> Vec<u64> {
        (first..first + count)
            .map(|p| CONTENT_BASE + (p * PAGE) as u64)
            .collect()
    }

    /// Guest addresses of the `dup` pages.
    pub fn dup(&self) -> Vec<u64> {
        self.gpas(0, self.kinds.dup)
    }

    /// Guest addresses of the `shared` pages.
    pub fn shared(&self) -> Vec<u64> {
        self.gpas(self.kinds.dup, self.kinds.shared)
    }

    /// Guest addresses of the `unique` pages.
    pub fn unique(&self) -> Vec<u64> {
        self.gpas(self.kinds.dup + self.kinds.shared, self.kinds.unique)
    }

    /// Guest addresses of the `zero` pages.
    pub fn zero(&self) -> Vec<u64> {
        let k = self.kinds;
        self.gpas(k.dup + k.shared + k.unique, k.zero)
    }

    /// Every content page's address.
    pub fn all(&self) -> Vec<u64> {
        let k = self.kinds;
        self.gpas(0, k.dup + k.shared + k.unique + k.zero)
    }

    /// The content of guest `guest`'s page at `gpa`.
    pub fn page(&self, guest: usize, gpa: u64) -> &[u8] {
        &self.images[guest][gpa as usize..gpa as usize + PAGE]
    }

    /// What merging the content pages of every guest gives, with at most `max_page_sharing`
    /// pages per copy.
    pub fn expected(&self, max_page_sharing: u64) -> Expected {
        let guests = self.images.len() as u64;
        let k = self.kinds;
        // A group of n equal pages needs ceil(n / max) copies; each copy's first page is the
        // shared one, the rest are sharing.
        let group = |n: u64| {
            if n < 2 {
                return (0, 0);
            }
            let copies = n.div_ceil(max_page_sharing);
            (copies, n - copies)
        };
        let (dup_shared, dup_sharing) = group(guests * k.dup as u64);
        let (one_shared, one_sharing) = group(guests);
        Expected {
            pages_shared: dup_shared + one_shared * k.shared as u64,
            pages_sharing: dup_sharing + one_sharing * k.shared as u64,
            pages_unshared: guests * k.unique as u64
                + if guests == 1 { k.shared as u64 } else { 0 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: Kinds = Kinds {
        dup: 8,
        shared: 4,
        unique: 3,
        zero: 2,
    };

    #[test]
    fn layout_and_expected_merge() {
        let d = DedupImages::new(2, K, 7);
        assert_eq!(d.images.len(), 2);
        assert_eq!(d.dup()[0], CONTENT_BASE);
        assert_eq!(d.zero().len(), 2);
        assert_eq!(d.all().len(), 17);
        // dup: 16 equal pages in one copy; shared: 4 pairs.
        assert_eq!(
            d.expected(256),
            Expected {
                pages_shared: 5,
                pages_sharing: 15 + 4,
                pages_unshared: 6
            }
        );
        // At most 2 per copy: the 16 dup pages need 8 copies.
        assert_eq!(d.expected(2).pages_shared, 8 + 4);
        assert_eq!(d.expected(2).pages_sharing, 8 + 4);
        let s = d.shared()[1];
        assert_eq!(d.page(0, s), d.page(1, s));
        let u = d.unique()[0];
        assert_ne!(d.page(0, u), d.page(1, u));
        assert!(d.page(1, d.zero()[1]).iter().all(|&b| b == 0));
        assert_eq!(d.page(0, d.dup()[0]), d.page(1, d.dup()[7]));
    }
}
