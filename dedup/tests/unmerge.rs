//! Unmerge-all (KSM's run=2) restores private pages with identical content and zeroes the
//! statistics, and gives guest memory back as plain anonymous memory (no pool mapping left, as
//! many VMAs as before merging), without losing concurrent writes; the background scanner
//! follows the run mode.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    let _serial = serial();
    let a = memory(256);
    let b = memory(256);
    fill_all(&a, &layout());
    fill_all(&b, &layout());
    let (engine, ids) = engine_with(
        fast_config(),
        &[("a", "d", a.clone()), ("b", "d", b.clone())],
    );
    let vmas_before = vma_count(&a) + vma_count(&b);
    engine.scan_pass().unwrap();
    let s = engine.scan_pass().unwrap();
    assert!(s.pages_sharing > 0 && s.zero_pages > 0);
    assert!(pool_mappings(&a) > 0 && pool_mappings(&b) > 0);
    assert!(vma_count(&a) + vma_count(&b) > vmas_before);
    let s = engine.unmerge_all().unwrap();
    assert_eq!((s.pages_shared, s.pages_sharing, s.zero_pages), (0, 0, 0));
    assert_eq!(s.bytes_saved, 0);
    assert_eq!(
        pool_mappings(&a) + pool_mappings(&b),
        0,
        "{:?}",
        maps_of(&a)
    );
    assert_eq!(vma_count(&a) + vma_count(&b), vmas_before);
    assert_eq!((s.rebuilt_regions, s.unmerged_in_place), (2, 0));
    assert_eq!(s.vmas_used, vmas_before as u64);
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

/// Page `p` of guest `g` in the concurrency test: zero, shared by both guests (in runs), or
/// unique to the guest (left in anonymous memory).
fn seed_of(g: u64, p: usize) -> u64 {
    match p % 64 {
        0..8 => 0,
        8..40 => 100_000 + (g << 32) + p as u64,
        k => 1 + (p / 64 % 8) as u64 * 64 + k as u64,
    }
}

#[test]
fn unmerge_all_under_concurrent_writers_and_readers() {
    let _serial = serial();
    const PAGES: usize = 16 << 10;
    const WRITERS: usize = 2;
    let seeds: [Vec<u64>; 2] = [0, 1].map(|g| (0..PAGES).map(|p| seed_of(g, p)).collect());
    let a = memory_regions(2, PAGES / 2);
    let b = memory(PAGES);
    fill_all(&a, &seeds[0]);
    fill_all(&b, &seeds[1]);
    let (engine, _) = engine_with(
        fast_config(),
        &[("a", "d", a.clone()), ("b", "d", b.clone())],
    );
    let vmas_before = vma_count(&a) + vma_count(&b);
    engine.scan_pass().unwrap();
    let merged = engine.scan_pass().unwrap();
    assert!(merged.pages_sharing > PAGES as u64 / 4, "{merged:?}");
    assert!(pool_mappings(&a) > 0);

    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let addrs: Vec<(usize, usize)> = (0..PAGES)
        .map(|p| (page_ptr(&a, p) as usize, page_ptr(&b, p) as usize))
        .collect();
    // Writers put sequence numbers into the first word of their own pages (merged, zero and
    // private ones alike); readers check that the rest of every page never changes.
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (stop, writes, addrs) = (stop.clone(), writes.clone(), addrs.clone());
            std::thread::spawn(move || {
                let mut last = vec![None; PAGES];
                let mut seq = (w as u64 + 1) << 40;
                let mut x = 0x2545_F491_4F6C_DD1Du64 ^ w as u64;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let p = (x as usize % (PAGES / WRITERS)) * WRITERS + w;
                    seq += 1;
                    let addr = if x & 1 == 0 { addrs[p].0 } else { addrs[p].1 };
                    // SAFETY: the page belongs to this writer; the memory outlives the thread.
                    unsafe { (addr as *mut u64).write_volatile(seq) };
                    last[p] = Some((x & 1, seq));
                    if writes.fetch_add(1, Ordering::Relaxed) % 64 == 0 {
                        std::thread::yield_now();
                    }
                }
                last
            })
        })
        .collect();
    let reader = {
        let (stop, addrs, seeds) = (stop.clone(), addrs.clone(), seeds.clone());
        std::thread::spawn(move || {
            let mut bad = 0u64;
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let p = x as usize % PAGES;
                let (addr, seed) = if x & 1 == 0 {
                    (addrs[p].0, seeds[0][p])
                } else {
                    (addrs[p].1, seeds[1][p])
                };
                // SAFETY: a page of the test's guest memory, which outlives the thread; the
                // writers only change its first word.
                let tail = unsafe { std::slice::from_raw_parts((addr + 8) as *const u8, PAGE - 8) };
                if tail != &content(seed)[8..] {
                    bad += 1;
                }
            }
            bad
        })
    };
    std::thread::sleep(Duration::from_millis(20));
    let w0 = writes.load(Ordering::Relaxed);
    let s = engine.unmerge_all().unwrap();
    let during = writes.load(Ordering::Relaxed) - w0;
    std::thread::sleep(Duration::from_millis(20));
    stop.store(true, Ordering::Relaxed);
    let bad_reads = reader.join().unwrap();
    let lasts: Vec<_> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    eprintln!("{during} writes while unmerging");

    assert_eq!((s.pages_sharing, s.zero_pages), (0, 0));
    assert_eq!((s.rebuilt_regions, s.unmerged_in_place), (3, 0));
    assert_eq!(pool_mappings(&a) + pool_mappings(&b), 0);
    assert_eq!(
        vma_count(&a) + vma_count(&b),
        vmas_before,
        "{:?}",
        maps_of(&a)
    );
    assert_eq!(bad_reads, 0, "readers saw other content");
    for p in 0..PAGES {
        for (which, mem) in [(0u64, &a), (1, &b)] {
            let mut want = content(seeds[which as usize][p]);
            let last = lasts.iter().find_map(|l| l[p].filter(|&(m, _)| m == which));
            if let Some((_, seq)) = last {
                want[..8].copy_from_slice(&seq.to_ne_bytes());
            }
            assert!(
                read(mem, p) == want,
                "page {p} of guest {which} lost a write"
            );
        }
    }
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
    let _serial = serial();
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
    assert_eq!(pool_mappings(&a) + pool_mappings(&b), 0);
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
    // Raising max_page_sharing is fine while merged, lowering it is not (as documented).
    let sharing = engine.config().max_page_sharing;
    let raised = (sharing + 1).to_string();
    engine.set_knob("max_page_sharing", &raised).unwrap();
    assert!(matches!(
        engine.set_knob("max_page_sharing", &sharing.to_string()),
        Err(vm_dedup::EngineError::Busy("max_page_sharing"))
    ));
    engine.unmerge_all().unwrap();
    engine.set_knob("merge_across_nodes", "0").unwrap();
    assert_contents(&b, &layout());
    // The worker threads are fixed at creation: config() never reports a count not in force.
    let threads = engine.config().threads;
    assert!(matches!(
        engine.set_knob("threads", &(threads + 3).to_string()),
        Err(vm_dedup::EngineError::Fixed("threads"))
    ));
    assert_eq!(engine.config().threads, threads);
}

#[test]
fn dropping_the_engine_unmerges_memory_that_lives_on() {
    let _serial = serial();
    let a = memory(32);
    let b = memory(32);
    fill_all(&a, &[6; 32]);
    fill_all(&b, &[6; 32]);
    let (engine, _) = engine_with(
        fast_config(),
        &[("a", "d", a.clone()), ("b", "d", b.clone())],
    );
    engine.scan_pass().unwrap();
    let s = engine.scan_pass().unwrap();
    assert_eq!(s.pages_shared + s.pages_sharing, 64);
    assert!(pool_mappings(&a) > 0);
    // The VMM drops the engine (every handle) but keeps the memory: it must be plain
    // anonymous memory again, which a later MADV_DONTNEED empties.
    drop(engine);
    assert_eq!(pool_mappings(&a) + pool_mappings(&b), 0);
    assert_contents(&a, &[6; 32]);
    assert_contents(&b, &[6; 32]);
    // SAFETY: page 0 of a, which nothing else uses now.
    let dropped = unsafe { libc::madvise(page_ptr(&a, 0).cast(), PAGE, libc::MADV_DONTNEED) };
    assert_eq!(dropped, 0);
    assert!(
        read(&a, 0).iter().all(|&x| x == 0),
        "a dropped page reads zeros"
    );
}
