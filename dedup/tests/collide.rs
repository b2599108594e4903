//! With every hash forced equal, only byte comparison separates contents: different content
//! must never merge, and identical content still does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;

use common::*;

#[test]
fn colliding_hashes_never_merge_different_content() {
    let a = memory(96);
    let b = memory(96);
    // 6 contents (one of them zero) repeated, plus a few unique pages. (Every page lands in
    // the same index bucket chain, of which at most 16 entries are probed, so the test keeps
    // the number of distinct contents below that.)
    let seeds_a: Vec<u64> = (0..96)
        .map(|i| if i < 92 { i % 6 } else { 500 + i })
        .collect();
    let seeds_b: Vec<u64> = (0..96)
        .map(|i| if i < 92 { (i + 1) % 6 } else { 900 + i })
        .collect();
    fill_all(&a, &seeds_a);
    fill_all(&b, &seeds_b);
    let mut cfg = fast_config();
    cfg.set("use_zero_pages", "0").unwrap();
    let (engine, ids) = engine_with(cfg, &[("a", "d", a.clone()), ("b", "d", b.clone())]);
    engine.faults().set_collide_hashes(true);
    for _ in 0..4 {
        engine.scan_pass().unwrap();
    }
    let s = engine.stats();
    assert_contents(&a, &seeds_a);
    assert_contents(&b, &seeds_b);
    // Every slot's sharers had the same original content.
    let mut by_slot: HashMap<(u8, u32), u64> = HashMap::new();
    let mut merged = 0;
    for (id, mem, seeds) in [(ids[0], &a, &seeds_a), (ids[1], &b, &seeds_b)] {
        for p in engine.merged_pages(id).unwrap() {
            let page = (p.gpa.0 as usize) / PAGE;
            let slot = p.slot.expect("no zero pages with use_zero_pages=0");
            let seed = seeds[page];
            assert_eq!(
                *by_slot.entry(slot).or_insert(seed),
                seed,
                "slot {slot:?} mixes contents"
            );
            assert_eq!(engine.pool_page(slot.0, slot.1).unwrap(), content(seed));
            assert_eq!(read(mem, page), content(seed));
            merged += 1;
        }
    }
    // The 184 repeated pages (about 30 copies of each of 6 contents) all merge into 6 copies.
    assert_eq!(merged, 184);
    assert_eq!(s.pages_shared, 6);
    assert_eq!(s.pages_sharing, 178);
    assert!(
        s.failures.differed > 0,
        "the guarded comparison refused colliding pages"
    );
}
