//! Unmerge-all (KSM's run=2) restores private pages with identical content and zeroes the
//! statistics; the background scanner follows the run mode.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use vm_dedup::PageState;

fn layout() -> Vec<u64> {
    (0..256u64)
        .map(|i| if i % 3 == 0 { 0 } else { 1 + i % 17 })
        .collect()
}

#[test]
fn unmerge_all_restores_private_pages() {
    let a = memory(256);
    let b = memory(256);
    fill_all(&a, &layout());
    fill_all(&b, &layout());
    let (engine, ids) = engine_with(
        fast_config(),
        &[("a", "d", a.clone()), ("b", "d", b.clone())],
    );
    engine.scan_pass().unwrap();
    let s = engine.scan_pass().unwrap();
    assert!(s.pages_sharing > 0 && s.zero_pages > 0);
    let s = engine.unmerge_all().unwrap();
    assert_eq!((s.pages_shared, s.pages_sharing, s.zero_pages), (0, 0, 0));
    assert_eq!(s.bytes_saved, 0);
    let pfns_ok = pfns_visible();
    for (id, mem) in [(ids[0], &a), (ids[1], &b)] {
        assert!(engine.merged_pages(id).unwrap().is_empty());
        let mut pfns = std::collections::HashSet::new();
        for p in 0..256 {
            let info = engine.page_info(id, page_gpa(mem, p)).unwrap();
            assert_ne!(info.state, PageState::Merged);
            assert_ne!(info.state, PageState::Zero);
            let pfn = info.host_pfn.expect("unmerged pages are present");
            assert!(
                !pfns_ok || pfns.insert(pfn),
                "page {p} still shares a host page"
            );
        }
    }
    assert_contents(&a, &layout());
    assert_contents(&b, &layout());
    // Pages stay private until merged again by later passes.
    engine.scan_pass().unwrap();
    engine.scan_pass().unwrap();
    assert!(engine.stats().pages_sharing > 0);
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn background_scanner_follows_run_mode() {
    let a = memory(256);
    let b = memory(256);
    fill_all(&a, &layout());
    fill_all(&b, &layout());
    let mut cfg = fast_config();
    cfg.apply_options("pages_to_scan=100,sleep_millisecs=1")
        .unwrap();
    let (engine, _) = engine_with(cfg, &[("a", "d", a.clone()), ("b", "d", b.clone())]);
    let scanner = engine.start().unwrap();
    assert!(engine.start().is_err(), "one scanner per engine");
    wait_for("merging", || engine.stats().full_scans >= 3);
    let merged = engine.stats();
    assert!(merged.pages_sharing > 0);
    engine.set_knob("run", "2").unwrap();
    wait_for("unmerge", || {
        let s = engine.stats();
        s.pages_sharing == 0 && s.zero_pages == 0 && s.pages_shared == 0
    });
    assert_contents(&a, &layout());
    engine.set_knob("run", "1").unwrap();
    wait_for("merging again", || {
        engine.stats().pages_sharing == merged.pages_sharing
    });
    engine.set_knob("run", "0").unwrap();
    scanner.stop();
    assert!(
        engine.set_knob("merge_across_nodes", "0").is_err(),
        "busy while merged"
    );
    engine.unmerge_all().unwrap();
    engine.set_knob("merge_across_nodes", "0").unwrap();
    assert_contents(&b, &layout());
}
