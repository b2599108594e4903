//! The seeded page-content generator shared by the guest workload and host-side tests.
//!
//! A [`ContentPlan`] assigns each page of a region a [`PageKind`] (duplicate, unique or zero) in
//! exact proportions, placed by a seeded shuffle. [`ContentPlan::fill_page`] then writes a page's
//! content for a given *generation*: generation 0 is what `fill` writes, every `churn` rewrite
//! bumps the page's generation and gives it fresh content. The same plan built on the host
//! computes exactly the pages a guest wrote.
//!
//! Content rules (all derived from [`mix64`] keys, so they are stable across builds):
//! - zero pages at generation 0 are all zero bytes;
//! - duplicate pages at generation 0 take one of `dup_classes` contents, keyed by `seed` and the
//!   class only, so guests started with the same seed share them;
//! - unique pages at generation 0 are keyed by `seed`, `instance` and the page index: give each
//!   guest its own `instance` to keep them unique across guests;
//! - any page at generation > 0 is keyed by `seed`, `instance`, page and generation.

use thiserror::Error;

/// Size of a guest page in bytes.
pub const PAGE_SIZE: usize = 4096;

/// Domain tags that keep the content keys of different page roles apart.
const TAG_DUPLICATE: u64 = 0x6475_7000_0000_0001;
const TAG_UNIQUE: u64 = 0x756e_6900_0000_0002;
const TAG_CHURN: u64 = 0x6368_7200_0000_0003;
const TAG_SHUFFLE: u64 = 0x7368_7500_0000_0004;

/// Errors from building a content plan.
#[derive(Debug, Error, PartialEq)]
pub enum Error {
    /// A fraction outside `[0, 1]` or not a number.
    #[error("{name} fraction {value} is not between 0 and 1")]
    FractionRange {
        /// Which fraction (`unique` or `zero`).
        name: &'static str,
        /// The value given.
        value: f64,
    },
    /// The unique and zero fractions add up to more than 1.
    #[error("unique ({unique}) + zero ({zero}) fractions exceed 1")]
    FractionSum {
        /// The unique fraction.
        unique: f64,
        /// The zero fraction.
        zero: f64,
    },
    /// Duplicate pages were asked for with no duplicate class to draw from.
    #[error("dup_classes must be at least 1")]
    NoDupClasses,
}

/// SplitMix64's finalizer: a fast, well-mixed 64-bit hash of `x`.
pub fn mix64(x: u64) -> u64 {
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Hashes a sequence of words into one key (order matters).
pub fn key(words: &[u64]) -> u64 {
    words
        .iter()
        .fold(0x9e37_79b9_7f4a_7c15, |acc, &w| mix64(acc ^ mix64(w)))
}

/// The SplitMix64 pseudo-random generator: small, seedable, deterministic everywhere.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.state)
    }

    /// A value in `0..bound` (`0` when `bound` is 0), by multiply-shift reduction.
    pub fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }

    /// Shuffles `items` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// Fills `out` with the pseudo-random page content identified by `content_key`.
pub fn fill_random_page(content_key: u64, out: &mut [u8; PAGE_SIZE]) {
    let mut rng = SplitMix64::new(content_key);
    for chunk in out.chunks_exact_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
}

/// What a page holds at generation 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// One of the shared duplicate contents, by class.
    Duplicate(u32),
    /// Content no other page has.
    Unique,
    /// All zero bytes.
    Zero,
}

/// How a region's pages are split between duplicate, unique and zero content.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContentMix {
    /// Seed of the shared content and of the placement.
    pub seed: u64,
    /// Distinguishes unique and churned content between guests that share a seed.
    pub instance: u64,
    /// Fraction of pages with unique content.
    pub unique: f64,
    /// Fraction of all-zero pages.
    pub zero: f64,
    /// Number of distinct duplicate contents; the other pages are spread over them evenly.
    pub dup_classes: u32,
}

impl Default for ContentMix {
    fn default() -> Self {
        Self {
            seed: 1,
            instance: 0,
            unique: 0.25,
            zero: 0.25,
            dup_classes: 64,
        }
    }
}

/// Page counts of a plan by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KindCounts {
    /// Pages with one of the duplicate contents.
    pub duplicate: usize,
    /// Pages with unique content.
    pub unique: usize,
    /// All-zero pages.
    pub zero: usize,
    /// Distinct duplicate contents actually used (at most `dup_classes`).
    pub dup_classes_used: usize,
}

/// The kind of every page of a region, placed by a seeded shuffle in exact proportions.
#[derive(Debug, Clone)]
pub struct ContentPlan {
    mix: ContentMix,
    kinds: Vec<PageKind>,
    counts: KindCounts,
}

/// Rounds `fraction * pages` to a page count.
fn share(fraction: f64, pages: usize) -> usize {
    (fraction * pages as f64).round() as usize
}

fn check_fraction(name: &'static str, value: f64) -> Result<(), Error> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(Error::FractionRange { name, value })
    }
}

impl ContentPlan {
    /// Plans `pages` pages with the proportions of `mix`.
    ///
    /// Unique and zero page counts are `fraction * pages` rounded; the rest are duplicates,
    /// assigned round-robin to the duplicate classes after the shuffle.
    pub fn new(mix: ContentMix, pages: usize) -> Result<Self, Error> {
        check_fraction("unique", mix.unique)?;
        check_fraction("zero", mix.zero)?;
        if mix.unique + mix.zero > 1.0 + 1e-9 {
            return Err(Error::FractionSum {
                unique: mix.unique,
                zero: mix.zero,
            });
        }
        let unique = share(mix.unique, pages).min(pages);
        let zero = share(mix.zero, pages).min(pages - unique);
        let duplicate = pages - unique - zero;
        if duplicate > 0 && mix.dup_classes == 0 {
            return Err(Error::NoDupClasses);
        }
        let mut kinds = Vec::with_capacity(pages);
        kinds.resize(unique, PageKind::Unique);
        kinds.resize(unique + zero, PageKind::Zero);
        kinds.resize(pages, PageKind::Duplicate(0));
        SplitMix64::new(key(&[TAG_SHUFFLE, mix.seed])).shuffle(&mut kinds);
        let mut ordinal = 0u64;
        for kind in kinds.iter_mut() {
            if let PageKind::Duplicate(class) = kind {
                *class = (ordinal % u64::from(mix.dup_classes)) as u32;
                ordinal += 1;
            }
        }
        let counts = KindCounts {
            duplicate,
            unique,
            zero,
            dup_classes_used: duplicate.min(mix.dup_classes as usize),
        };
        Ok(Self { mix, kinds, counts })
    }

    /// The mix this plan was built from.
    pub fn mix(&self) -> &ContentMix {
        &self.mix
    }

    /// Number of pages in the plan.
    pub fn pages(&self) -> usize {
        self.kinds.len()
    }

    /// The generation-0 kind of `page`, or `None` past the end.
    pub fn kind(&self, page: usize) -> Option<PageKind> {
        self.kinds.get(page).copied()
    }

    /// Page counts by kind.
    pub fn counts(&self) -> KindCounts {
        self.counts
    }

    /// Writes the content of `page` at `generation` into `out`; pages past the end are zero.
    pub fn fill_page(&self, page: usize, generation: u32, out: &mut [u8; PAGE_SIZE]) {
        let m = &self.mix;
        if generation > 0 {
            let k = key(&[
                TAG_CHURN,
                m.seed,
                m.instance,
                page as u64,
                u64::from(generation),
            ]);
            fill_random_page(k, out);
            return;
        }
        match self.kind(page) {
            Some(PageKind::Duplicate(class)) => {
                fill_random_page(key(&[TAG_DUPLICATE, m.seed, u64::from(class)]), out)
            }
            Some(PageKind::Unique) => {
                fill_random_page(key(&[TAG_UNIQUE, m.seed, m.instance, page as u64]), out)
            }
            Some(PageKind::Zero) | None => out.fill(0),
        }
    }

    /// Whether `content` is what `page` holds at `generation`.
    pub fn check_page(&self, page: usize, generation: u32, content: &[u8; PAGE_SIZE]) -> bool {
        let mut expected = [0u8; PAGE_SIZE];
        self.fill_page(page, generation, &mut expected);
        expected == *content
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn page(plan: &ContentPlan, i: usize, generation: u32) -> Vec<u8> {
        let mut buf = [0u8; PAGE_SIZE];
        plan.fill_page(i, generation, &mut buf);
        buf.to_vec()
    }

    #[test]
    fn counts_are_exact_and_sum_to_pages() {
        let mix = ContentMix {
            unique: 0.3,
            zero: 0.2,
            ..ContentMix::default()
        };
        let plan = ContentPlan::new(mix, 1000).unwrap();
        let c = plan.counts();
        assert_eq!((c.unique, c.zero, c.duplicate), (300, 200, 500));
        let mut seen = KindCounts::default();
        for i in 0..plan.pages() {
            match plan.kind(i).unwrap() {
                PageKind::Duplicate(_) => seen.duplicate += 1,
                PageKind::Unique => seen.unique += 1,
                PageKind::Zero => seen.zero += 1,
            }
        }
        assert_eq!(
            (seen.unique, seen.zero, seen.duplicate),
            (c.unique, c.zero, c.duplicate)
        );
        assert_eq!(plan.kind(1000), None);
    }

    #[test]
    fn content_matches_the_kinds() {
        let mix = ContentMix {
            dup_classes: 7,
            ..ContentMix::default()
        };
        let plan = ContentPlan::new(mix, 400).unwrap();
        let mut by_content: HashMap<Vec<u8>, usize> = HashMap::new();
        for i in 0..plan.pages() {
            let p = page(&plan, i, 0);
            if plan.kind(i) == Some(PageKind::Zero) {
                assert!(p.iter().all(|&b| b == 0));
            } else {
                assert!(p.iter().any(|&b| b != 0));
            }
            *by_content.entry(p).or_default() += 1;
        }
        let c = plan.counts();
        // distinct contents: one zero page, each unique page, each duplicate class
        assert_eq!(by_content.len(), 1 + c.unique + c.dup_classes_used);
        assert_eq!(c.dup_classes_used, 7);
        // duplicates are spread evenly over the classes
        let dup_counts: Vec<usize> = by_content
            .iter()
            .filter(|(k, n)| **n > 1 && k.iter().any(|&b| b != 0))
            .map(|(_, &n)| n)
            .collect();
        assert_eq!(dup_counts.len(), 7);
        let (min, max) = (dup_counts.iter().min(), dup_counts.iter().max());
        assert!(max.unwrap() - min.unwrap() <= 1);
    }

    #[test]
    fn same_seed_shares_duplicates_and_instance_separates_unique() {
        let a = ContentPlan::new(ContentMix::default(), 256).unwrap();
        let b = ContentPlan::new(
            ContentMix {
                instance: 1,
                ..ContentMix::default()
            },
            256,
        )
        .unwrap();
        for i in 0..256 {
            assert_eq!(a.kind(i), b.kind(i));
            match a.kind(i).unwrap() {
                PageKind::Unique => assert_ne!(page(&a, i, 0), page(&b, i, 0)),
                _ => assert_eq!(page(&a, i, 0), page(&b, i, 0)),
            }
            assert_ne!(page(&a, i, 1), page(&b, i, 1));
        }
    }

    #[test]
    fn generations_change_content_and_check_page_detects_it() {
        let plan = ContentPlan::new(ContentMix::default(), 64).unwrap();
        let mut buf = [0u8; PAGE_SIZE];
        plan.fill_page(5, 2, &mut buf);
        assert!(plan.check_page(5, 2, &buf));
        assert!(!plan.check_page(5, 1, &buf));
        assert!(!plan.check_page(6, 2, &buf));
        buf[100] ^= 1;
        assert!(!plan.check_page(5, 2, &buf));
    }

    #[test]
    fn placement_depends_on_the_seed() {
        let a = ContentPlan::new(ContentMix::default(), 512).unwrap();
        let b = ContentPlan::new(
            ContentMix {
                seed: 2,
                ..ContentMix::default()
            },
            512,
        )
        .unwrap();
        let differ = (0..512).filter(|&i| a.kind(i) != b.kind(i)).count();
        assert!(differ > 0);
        assert_eq!(a.counts().unique, b.counts().unique);
    }

    #[test]
    fn bad_fractions_are_rejected() {
        let bad = |unique, zero| {
            ContentPlan::new(
                ContentMix {
                    unique,
                    zero,
                    ..ContentMix::default()
                },
                10,
            )
            .unwrap_err()
        };
        assert!(matches!(
            bad(1.5, 0.0),
            Error::FractionRange { name: "unique", .. }
        ));
        assert!(matches!(
            bad(0.0, -0.1),
            Error::FractionRange { name: "zero", .. }
        ));
        assert!(matches!(bad(f64::NAN, 0.0), Error::FractionRange { .. }));
        assert!(matches!(bad(0.6, 0.6), Error::FractionSum { .. }));
        let no_classes = ContentMix {
            dup_classes: 0,
            ..ContentMix::default()
        };
        assert_eq!(
            ContentPlan::new(no_classes, 10).unwrap_err(),
            Error::NoDupClasses
        );
        // all unique needs no class
        let all_unique = ContentMix {
            unique: 1.0,
            zero: 0.0,
            dup_classes: 0,
            ..ContentMix::default()
        };
        assert_eq!(
            ContentPlan::new(all_unique, 10).unwrap().counts().unique,
            10
        );
    }

    #[test]
    fn rng_below_stays_in_bounds_and_shuffle_permutes() {
        let mut rng = SplitMix64::new(42);
        assert_eq!(rng.below(0), 0);
        for bound in [1u64, 2, 3, 1000] {
            for _ in 0..1000 {
                assert!(rng.below(bound) < bound);
            }
        }
        let mut v: Vec<u32> = (0..100).collect();
        rng.shuffle(&mut v);
        assert_ne!(v, (0..100).collect::<Vec<_>>());
        v.sort_unstable();
        assert_eq!(v, (0..100).collect::<Vec<_>>());
    }
}
