//! Tests of the composer: layouts, rendering and expected statistics checked against a brute-force
//! count over the rendered images.

use std::collections::{HashMap, HashSet};
use std::io::Cursor;

use super::*;

/// Files with the awkward cases: partial last pages, an all-zero page inside a file, pages
/// shared between different files, an identical copy of a file, and an empty file.
fn sample_files() -> Vec<SourceFile> {
    let pattern = |seed: u8, len: usize| -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i / 4096) as u8)
            .collect()
    };
    let mut with_zero_page = pattern(1, 3 * PAGE_SIZE + 100);
    with_zero_page[PAGE_SIZE..2 * PAGE_SIZE].fill(0);
    let shared = pattern(7, PAGE_SIZE);
    let mut a = shared.clone();
    a.extend(pattern(2, 2 * PAGE_SIZE));
    let mut b = pattern(3, PAGE_SIZE);
    b.extend(&shared);
    vec![
        SourceFile {
            name: "pkg:/with-zero-page".into(),
            data: with_zero_page,
        },
        SourceFile {
            name: "pkg:/a".into(),
            data: a.clone(),
        },
        SourceFile {
            name: "pkg:/b".into(),
            data: b,
        },
        SourceFile {
            name: "other:/copy-of-a".into(),
            data: a,
        },
        SourceFile {
            name: "pkg:/empty".into(),
            data: Vec::new(),
        },
        SourceFile {
            name: "pkg:/small".into(),
            data: b"tiny".to_vec(),
        },
    ]
}

fn params(guests: usize, image_pages: u64) -> Params {
    Params {
        guests,
        image_size: image_pages * PAGE,
        unique: 0.1,
        zero: 0.15,
        seed: 42,
        reserved_low: 16 * PAGE,
    }
}

fn render(c: &Composition<'_>, guest: usize) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    let mut last = 0;
    c.write_image(guest, &mut out, &mut |p| {
        assert!(p >= last);
        last = p;
    })
    .unwrap();
    out.into_inner()
}

/// Counts what a content-based merge finds in the rendered bodies.
fn brute_force(c: &Composition<'_>, images: &[Vec<u8>]) -> Stats {
    let reserved = c.params().reserved_low as usize;
    let mut totals = Totals::default();
    let mut count: HashMap<&[u8], u64> = HashMap::new();
    let mut seen_before: HashSet<&[u8]> = HashSet::new();
    let mut guests = Vec::new();
    for (g, image) in images.iter().enumerate() {
        let mut s = GuestStats::default();
        let mut seen_here: HashSet<&[u8]> = HashSet::new();
        for page in image[reserved..].chunks(PAGE_SIZE) {
            s.pages += 1;
            if page.iter().all(|&b| b == 0) {
                s.zero_pages += 1;
                continue;
            }
            *count.entry(page).or_default() += 1;
            if !seen_here.insert(page) {
                s.dup_within_guest += 1;
            } else {
                s.distinct_nonzero += 1;
                if seen_before.contains(page) {
                    s.dup_across_guests += 1;
                }
            }
        }
        seen_before.extend(seen_here);
        let ext = c.extents(g);
        for e in ext {
            match e {
                Extent::File { pages, .. } => {
                    s.file_pages += pages;
                    s.file_extents += 1;
                }
                Extent::Unique { pages, .. } => s.unique_pages += pages,
                Extent::Zero { pages } => s.zero_fill_pages += pages,
            }
        }
        totals.pages += s.pages;
        totals.zero_pages += s.zero_pages;
        totals.dup_within_guests += s.dup_within_guest;
        totals.dup_across_guests += s.dup_across_guests;
        guests.push(s);
    }
    for &n in count.values() {
        if n == 1 {
            totals.pages_unshared += 1;
        } else {
            totals.pages_shared += 1;
            totals.pages_sharing += n - 1;
        }
    }
    totals.pages_saved = totals.pages_sharing + totals.zero_pages;
    totals.bytes_saved = totals.pages_saved * PAGE;
    Stats { guests, totals }
}

#[test]
fn expected_stats_match_a_brute_force_count_of_the_images() {
    let files = sample_files();
    for (guests, pages) in [(3, 256), (1, 40), (4, 100)] {
        let c = compose(&files, params(guests, pages)).unwrap();
        let images: Vec<_> = (0..guests).map(|g| render(&c, g)).collect();
        assert_eq!(
            *c.stats(),
            brute_force(&c, &images),
            "{guests} x {pages} pages"
        );
        let t = &c.stats().totals;
        assert_eq!(t.pages_sharing, t.dup_within_guests + t.dup_across_guests);
        assert!(t.pages_sharing > 0 && t.zero_pages > 0);
    }
}

#[test]
fn images_have_the_size_a_zero_low_area_and_page_renders_the_same_bytes() {
    let files = sample_files();
    let c = compose(&files, params(2, 128)).unwrap();
    for g in 0..2 {
        let image = render(&c, g);
        assert_eq!(image.len() as u64, 128 * PAGE);
        assert!(image[..16 * PAGE_SIZE].iter().all(|&b| b == 0));
        let mut buf = [0u8; PAGE_SIZE];
        for (i, page) in image.chunks(PAGE_SIZE).enumerate() {
            c.page(g, i as u64, &mut buf);
            assert_eq!(&buf[..], page, "guest {g} page {i}");
        }
    }
}

#[test]
fn fractions_give_exact_page_counts() {
    let files = sample_files();
    let c = compose(&files, params(3, 216)).unwrap(); // body: 200 pages
    for s in &c.stats().guests {
        assert_eq!(s.pages, 200);
        assert_eq!(s.unique_pages, 20);
        assert_eq!(s.zero_fill_pages, 30);
        assert_eq!(s.file_pages, 150);
        // the all-zero page inside a file counts as a zero page too
        assert!(s.zero_pages > 30);
    }
}

#[test]
fn files_are_page_aligned_at_different_offsets_per_guest() {
    let files = sample_files();
    let c = compose(&files, params(4, 200)).unwrap();
    let mut first_offsets = Vec::new();
    for g in 0..4 {
        let image = render(&c, g);
        let mut pos = 16u64;
        let mut first = None;
        for e in c.extents(g) {
            if let Extent::File { file, pages, .. } = *e {
                let data = &files[file].data;
                let at = (pos * PAGE) as usize;
                let len = data.len().min((pages * PAGE) as usize);
                assert_eq!(&image[at..at + len], &data[..len]);
                if file == 0 && first.is_none() {
                    first = Some(pos);
                }
            }
            pos += e.pages();
        }
        first_offsets.push(first.unwrap());
    }
    let distinct: HashSet<_> = first_offsets.iter().collect();
    assert!(distinct.len() > 1, "{first_offsets:?}");
}

#[test]
fn guests_hold_the_same_files_even_when_only_some_fit() {
    let files = sample_files();
    // body of 20 pages, 15 for files: one pass over the sources' 13 pages and part of another
    let c = compose(&files, params(3, 36)).unwrap();
    let placed = |g: usize| {
        let mut v: Vec<(usize, u64)> = c
            .extents(g)
            .iter()
            .filter_map(|e| match *e {
                Extent::File { file, pages, .. } => Some((file, pages)),
                _ => None,
            })
            .collect();
        v.sort_unstable();
        v
    };
    assert_eq!(placed(0).iter().map(|p| p.1).sum::<u64>(), 15);
    assert_eq!(placed(0), placed(1));
    assert_eq!(placed(0), placed(2));
}

#[test]
fn files_repeat_when_the_body_is_larger_and_guests_share_them() {
    let files = sample_files();
    let c = compose(&files, params(2, 400)).unwrap();
    let s = &c.stats().guests;
    assert!(s[0].dup_within_guest > s[0].file_pages / 2);
    assert!(s[1].dup_across_guests > 0);
    // unique pages never merge: every one is unshared
    let t = &c.stats().totals;
    assert!(t.pages_unshared >= s[0].unique_pages + s[1].unique_pages);
}

#[test]
fn the_same_seed_composes_the_same_images() {
    let files = sample_files();
    let a = compose(&files, params(2, 64)).unwrap();
    let b = compose(&files, params(2, 64)).unwrap();
    assert_eq!(render(&a, 1), render(&b, 1));
    let c = compose(
        &files,
        Params {
            seed: 43,
            ..params(2, 64)
        },
    )
    .unwrap();
    assert_ne!(render(&a, 1), render(&c, 1));
    assert_ne!(a.extents(0), a.extents(1));
    assert!(a.extents(2).is_empty());
}

#[test]
fn unique_pages_are_unique() {
    let mut a = [0u8; PAGE_SIZE];
    let mut b = [0u8; PAGE_SIZE];
    unique_page(1, 0, 5, &mut a);
    unique_page(1, 1, 5, &mut b);
    assert_ne!(a, b);
    unique_page(1, 0, 6, &mut b);
    assert_ne!(a, b);
    assert_eq!(&a[..8], UNIQUE_MAGIC);
}

#[test]
fn all_unique_or_all_zero_needs_no_files() {
    let c = compose(
        &[],
        Params {
            unique: 0.5,
            zero: 0.5,
            ..params(2, 32)
        },
    )
    .unwrap();
    let t = &c.stats().totals;
    assert_eq!(t.zero_pages, 16);
    assert_eq!(t.pages_unshared, 16);
    assert_eq!(t.pages_sharing, 0);
}

#[test]
fn bad_parameters_are_refused() {
    let files = sample_files();
    let bad = |p: Params| compose(&files, p).unwrap_err();
    assert_eq!(bad(params(0, 64)), Error::NoGuests);
    assert!(matches!(
        bad(Params {
            image_size: 64 * PAGE + 1,
            ..params(1, 64)
        }),
        Error::NotPageMultiple {
            what: "image size",
            ..
        }
    ));
    assert!(matches!(
        bad(Params {
            reserved_low: 100,
            ..params(1, 64)
        }),
        Error::NotPageMultiple { .. }
    ));
    assert!(matches!(bad(params(1, 16)), Error::TooSmall { .. }));
    for (unique, zero) in [(0.7, 0.7), (-0.1, 0.0), (0.0, 1.5), (f64::NAN, 0.0)] {
        assert!(matches!(
            bad(Params {
                unique,
                zero,
                ..params(1, 64)
            }),
            Error::Fractions { .. }
        ));
    }
    assert_eq!(compose(&[], params(1, 64)).unwrap_err(), Error::NoFiles);
}
