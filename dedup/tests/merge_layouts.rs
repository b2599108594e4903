//! Known duplicate layouts across several guest memories: exact statistics, PSS drop, content
//! intact, shared host pages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use vm_dedup::PageState;

const PAGES: u64 = 2048;

/// Layout per guest g of 3 (2048 pages each, two regions of 1024):
/// pages 0..400: content 1000+i, the same in every guest (3 copies each);
/// pages 400..560: zero; pages 560..680: content 7 (120 copies per guest, 360 in all);
/// pages 680..2048: unique to the guest.
fn seeds(g: u64) -> Vec<u64> {
    (0..PAGES)
        .map(|i| match i {
            0..400 => 1000 + i,
            400..560 => 0,
            560..680 => 7,
            _ => 1_000_000 * (g + 1) + i,
        })
        .collect()
}

#[test]
fn duplicate_layout_merges_exactly_and_pss_drops() {
    let _serial = serial();
    let mems: Vec<_> = (0..3).map(|_| memory_regions(2, 1024)).collect();
    for (g, m) in mems.iter().enumerate() {
        fill_all(m, &seeds(g as u64));
    }
    let (engine, ids) = engine_with(
        fast_config(),
        &[
            ("a", "d", mems[0].clone()),
            ("b", "d", mems[1].clone()),
            ("c", "d", mems[2].clone()),
        ],
    );
    let first = engine.scan_pass().unwrap();
    assert_eq!(first.pages_sharing, 0, "one look is not enough to merge");
    assert_eq!(first.pages_scanned, 3 * PAGES);
    let pss_before = pss();
    let s = engine.scan_pass().unwrap();
    let pss_after = pss();

    // 400 contents x 3 copies, and 360 copies of content 7 in two copies because
    // max_page_sharing is 256: 402 shared pages.
    assert_eq!(s.pages_shared, 402);
    assert_eq!(s.pages_sharing, 400 * 2 + 358);
    assert_eq!(s.zero_pages, 3 * 160);
    assert_eq!(s.pages_unshared, 3 * (PAGES - 680));
    assert_eq!(s.pages_volatile, 0);
    assert_eq!(s.full_scans, 2);
    assert_eq!(s.cow_breaks, 0);
    assert_eq!(s.bytes_saved, (1158 + 480) * PAGE as u64);
    assert_eq!(
        s.general_profit,
        s.bytes_saved as i64 - s.metadata_bytes as i64
    );
    assert_eq!(s.failures.total(), 0);
    assert_eq!(s.guests.len(), 3);
    assert_eq!(
        s.guests.iter().map(|g| g.pages_shared).sum::<u64>(),
        s.pages_shared
    );
    assert_eq!(
        s.guests[0].pages_shared, 401,
        "the first guest owns the first copies"
    );
    assert_eq!(
        s.guests[2].pages_shared, 1,
        "the third guest opened the second copy of 7"
    );
    assert_eq!(s.guests[1].pages_sharing, 520);
    assert_eq!(s.pages, 3 * PAGES);

    // PSS drops by the pages saved, within 5% plus 512 KiB (the pass's own allocations).
    let saved = s.bytes_saved as f64;
    let drop = pss_before as f64 - pss_after as f64;
    assert!(
        (drop - saved).abs() <= saved * 0.05 + 512.0 * 1024.0,
        "PSS dropped {drop} bytes, stats say {saved}"
    );

    // Content intact, and duplicates share one host page.
    for (g, m) in mems.iter().enumerate() {
        assert_contents(m, &seeds(g as u64));
    }
    // (The contents were just read back, so the merged pages are present.)
    let pfn_a = pfn(page_ptr(&mems[0], 5));
    assert!(pfn_a.is_some());
    if pfns_visible() {
        assert_eq!(pfn(page_ptr(&mems[1], 5)), pfn_a);
        assert_eq!(pfn(page_ptr(&mems[2], 5)), pfn_a);
    }
    let info = engine.page_info(ids[1], page_gpa(&mems[1], 5)).unwrap();
    assert_eq!(info.state, PageState::Merged);
    let (node, slot) = info.slot.unwrap();
    assert_eq!(engine.pool_page(node, slot).unwrap(), content(1005));
    let zero = engine.page_info(ids[0], page_gpa(&mems[0], 450)).unwrap();
    assert_eq!(zero.state, PageState::Zero);
    assert_eq!(engine.merged_pages(ids[2]).unwrap().len(), 400 + 160 + 120);

    // A third pass changes nothing.
    let again = engine.scan_pass().unwrap();
    assert_eq!(again.pages_sharing, s.pages_sharing);
    assert_eq!(again.merges, s.merges);
}
