//! Copy-on-write: after a merge, a write changes only the written page; other sharers and the
//! pool are unchanged, and the break is counted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use vm_dedup::PageState;

#[test]
fn write_to_merged_page_changes_only_that_page() {
    let a = memory(64);
    let b = memory(64);
    let c = memory(64);
    let seeds: Vec<u64> = (0..64).map(|i| if i < 8 { 0 } else { 100 + i }).collect();
    for m in [&a, &b, &c] {
        fill_all(m, &seeds);
    }
    let (engine, ids) = engine_of(&[&a, &b, &c]);
    engine.scan_pass().unwrap();
    let s = engine.scan_pass().unwrap();
    assert_eq!(s.pages_shared, 56);
    assert_eq!(s.zero_pages, 24);

    let info = engine.page_info(ids[1], page_gpa(&b, 20)).unwrap();
    let (node, slot) = info.slot.unwrap();
    // Fault the merged pages in (a remapped page is not present until read).
    assert_eq!(read(&a, 20), content(120));
    assert_eq!(read(&b, 20), content(120));
    let pfns = pfns_visible();
    let shared_pfn = pfn(page_ptr(&b, 20));
    assert!(shared_pfn.is_some());
    if pfns {
        assert_eq!(pfn(page_ptr(&a, 20)), shared_pfn);
    }

    // A host thread writes one byte of b's merged page 20 and of b's zero page 3.
    // SAFETY: pages of the test's own guest memory.
    unsafe {
        *page_ptr(&b, 20).add(100) ^= 0xff;
        *page_ptr(&b, 3).add(7) = 1;
    }
    let mut expect = content(120);
    expect[100] ^= 0xff;
    assert_eq!(read(&b, 20), expect);
    assert_eq!(read(&a, 20), content(120));
    assert_eq!(read(&c, 20), content(120));
    assert_eq!(engine.pool_page(node, slot).unwrap(), content(120));
    assert_ne!(
        pfn(page_ptr(&b, 20)),
        shared_pfn,
        "the writer got its own copy"
    );
    assert_eq!(
        pfn(page_ptr(&a, 20)),
        shared_pfn,
        "other sharers keep the shared page"
    );
    assert_eq!(read(&a, 3), content(0));
    assert_eq!(read(&b, 3)[7], 1);

    let s = engine.scan_pass().unwrap();
    assert_eq!(s.cow_breaks, 2);
    assert_eq!(s.guests[1].cow_breaks, 2);
    assert_eq!(s.guests[0].cow_breaks, 0);
    assert_eq!(s.pages_shared, 56, "a and c still share page 20's content");
    assert_eq!(s.pages_sharing, 56 * 2 - 1);
    assert_eq!(s.zero_pages, 23);
    let now = engine.page_info(ids[1], page_gpa(&b, 20)).unwrap();
    assert_ne!(now.state, PageState::Merged);
    assert_eq!(
        engine.page_info(ids[2], page_gpa(&c, 20)).unwrap().slot,
        Some((node, slot))
    );

    // Written back to the shared content, the page merges again after two looks.
    // SAFETY: as above.
    unsafe { *page_ptr(&b, 20).add(100) ^= 0xff };
    engine.scan_pass().unwrap();
    let s = engine.scan_pass().unwrap();
    assert_eq!(s.pages_sharing, 56 * 2);
    assert_eq!(
        engine.page_info(ids[1], page_gpa(&b, 20)).unwrap().slot,
        Some((node, slot))
    );
    assert_contents(&a, &seeds);
    assert_contents(&c, &seeds);
}

#[test]
fn last_sharer_breaking_frees_the_slot() {
    let a = memory(4);
    let b = memory(4);
    for m in [&a, &b] {
        fill_all(m, &[1, 2, 3, 4]);
    }
    let (engine, _) = engine_with(
        fast_config(),
        &[("a", "d", a.clone()), ("b", "d", b.clone())],
    );
    engine.scan_pass().unwrap();
    assert_eq!(engine.scan_pass().unwrap().pages_shared, 4);
    for m in [&a, &b] {
        // SAFETY: the test's own guest memory.
        unsafe { *page_ptr(m, 0) = 9 };
    }
    let s = engine.scan_pass().unwrap();
    assert_eq!(s.cow_breaks, 2);
    assert_eq!(s.pages_shared, 3);
    assert_eq!(s.pages_sharing, 3);
}
