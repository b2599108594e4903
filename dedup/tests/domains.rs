//! Trust domains: non-zero pages never share a host page across domains; zero pages may.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

#[test]
fn no_nonzero_page_is_shared_across_domains() {
    let seeds: Vec<u64> = (0..128u64)
        .map(|i| if i % 4 == 0 { 0 } else { 50 + i % 16 })
        .collect();
    let mems: Vec<_> = (0..3).map(|_| memory(128)).collect();
    for m in &mems {
        fill_all(m, &seeds);
    }
    // Guests 0 and 1 in domain "red", guest 2 in "blue".
    let (engine, _) = engine_with(
        fast_config(),
        &[
            ("r0", "red", mems[0].clone()),
            ("r1", "red", mems[1].clone()),
            ("b0", "blue", mems[2].clone()),
        ],
    );
    engine.scan_pass().unwrap();
    let s = engine.scan_pass().unwrap();
    // 12 non-zero contents per domain: 24 copies; zero pages everywhere.
    assert_eq!(s.pages_shared, 24);
    assert_eq!(s.zero_pages, 3 * 32);
    for m in &mems {
        assert_contents(m, &seeds);
    }
    if !pfns_visible() {
        return;
    }
    let pfns = |m: &Mem| -> Vec<Option<u64>> { (0..128).map(|p| pfn(page_ptr(m, p))).collect() };
    let (r0, r1, b0) = (pfns(&mems[0]), pfns(&mems[1]), pfns(&mems[2]));
    let zero_pfn = r0[0];
    for p in 0..128 {
        if seeds[p] == 0 {
            // All zero pages read as the host zero page, in every domain.
            assert_eq!(r0[p], zero_pfn);
            assert_eq!(b0[p], zero_pfn);
            continue;
        }
        assert!(r0[p].is_some() && b0[p].is_some());
        assert_eq!(r0[p], r1[p], "same domain shares");
        for (q, red) in r0.iter().enumerate() {
            assert_ne!(
                b0[p], *red,
                "blue page {p} shares a host page with red page {q}"
            );
        }
    }
}
