//! The dirty-page source and the exclusion source.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::Mutex;

use common::*;
use vm_dedup::{DirtySource, Engine, ExclusionSource, GuestConfig, PageState};
use vm_memory::GuestAddress;

/// Reports the pages listed in `dirty` as written (once), everything else clean.
#[derive(Default)]
struct Log {
    dirty: Mutex<Vec<usize>>,
    calls: Mutex<u32>,
}

impl DirtySource for Log {
    fn take_dirty(
        &self,
        _region: usize,
        _gpa: GuestAddress,
        _pages: usize,
        bm: &mut [u64],
    ) -> bool {
        *self.calls.lock().unwrap() += 1;
        for p in self.dirty.lock().unwrap().drain(..) {
            bm[p / 64] |= 1 << (p % 64);
        }
        true
    }
}

#[test]
fn clean_pages_are_not_rehashed_and_written_ones_wait() {
    let a = memory(128);
    let seeds: Vec<u64> = (0..128).map(|i| 1 + i % 8).collect();
    fill_all(&a, &seeds);
    let log = Arc::new(Log::default());
    let engine = Engine::new(fast_config()).unwrap();
    let id = engine
        .register(
            GuestConfig::new("a", "d").with_dirty_source(log.clone()),
            a.clone(),
        )
        .unwrap();
    let s1 = engine.scan_pass().unwrap();
    assert_eq!(s1.pages_scanned, 128);
    assert_eq!(s1.pages_sharing, 0);
    // Page 3 is reported written; it is rehashed and must wait, the rest merge without hashing.
    *log.dirty.lock().unwrap() = vec![3];
    let s2 = engine.scan_pass().unwrap();
    assert_eq!(
        s2.pages_scanned - s1.pages_scanned,
        1,
        "only the written page is hashed"
    );
    assert_eq!(s2.pages_volatile, 1);
    assert_eq!(
        engine.page_info(id, page_gpa(&a, 3)).unwrap().state,
        PageState::Volatile
    );
    assert_eq!(s2.pages_shared, 8);
    assert_eq!(s2.pages_sharing, 127 - 8);
    let s3 = engine.scan_pass().unwrap();
    assert_eq!(
        s3.pages_sharing,
        128 - 8,
        "merged once it stopped being written"
    );
    assert_eq!(*log.calls.lock().unwrap(), 3);
    assert_contents(&a, &seeds);
}

struct Busy(Vec<u64>);

impl ExclusionSource for Busy {
    fn is_excluded(&self, gpa: GuestAddress) -> bool {
        self.0.contains(&gpa.0)
    }
}

#[test]
fn excluded_pages_are_not_merged() {
    let a = memory(32);
    fill_all(&a, &[5; 32]);
    let busy = Arc::new(Busy(vec![0, 4 * PAGE as u64]));
    let engine = Engine::new(fast_config()).unwrap();
    let id = engine
        .register(
            GuestConfig::new("a", "d").with_exclusion_source(busy),
            a.clone(),
        )
        .unwrap();
    engine.scan_pass().unwrap();
    let s = engine.scan_pass().unwrap();
    assert_eq!(s.pages_sharing + s.pages_shared, 30);
    assert_eq!(s.failures.excluded, 2);
    for p in [0, 4] {
        assert_ne!(
            engine.page_info(id, page_gpa(&a, p)).unwrap().state,
            PageState::Merged
        );
    }
    assert_contents(&a, &[5; 32]);
}

#[test]
fn unwritten_chunks_skip_pagemap_but_writes_are_seen() {
    let a = memory(1024);
    let seeds: Vec<u64> = (0..1024).map(|i| 1 + i % 8).collect();
    fill_all(&a, &seeds);
    let log = Arc::new(Log::default());
    let engine = Engine::new(fast_config()).unwrap();
    engine
        .register(
            GuestConfig::new("a", "d").with_dirty_source(log.clone()),
            a.clone(),
        )
        .unwrap();
    engine.scan_pass().unwrap();
    let s = engine.scan_pass().unwrap();
    assert_eq!(s.pages_sharing, 1024 - 8);
    // A reported write breaks sharing; the next pass sees it (the page's chunk is queried).
    fill(&a, 5, 999);
    *log.dirty.lock().unwrap() = vec![5];
    let s = engine.scan_pass().unwrap();
    assert_eq!(s.cow_breaks, 1);
    assert_eq!(s.pages_sharing, 1024 - 8 - 1);
    // A write the source misses (page 700, in another chunk) is found by the pass that
    // verifies every chunk with pagemap, at the latest eight passes on.
    fill(&a, 700, 998);
    let mut passes = 0;
    while engine.stats().cow_breaks < 2 {
        engine.scan_pass().unwrap();
        passes += 1;
        assert!(
            passes <= 8,
            "a missed write went unnoticed for {passes} passes"
        );
    }
    assert!(
        passes > 1,
        "unwritten chunks were queried at once: {passes}"
    );
    let mut want = seeds.clone();
    want[5] = 999;
    want[700] = 998;
    assert_contents(&a, &want);
}

/// Panics when asked about the pages listed (the first time only, unless `always`).
struct Panicky {
    pages: Vec<u64>,
    always: bool,
    asked: std::sync::atomic::AtomicBool,
}

impl Panicky {
    fn new(pages: Vec<u64>, always: bool) -> Arc<Self> {
        Arc::new(Self {
            pages,
            always,
            asked: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn panic_now(&self, gpa: GuestAddress) -> bool {
        self.pages.contains(&gpa.0)
            && (self.always || !self.asked.swap(true, std::sync::atomic::Ordering::SeqCst))
    }
}

impl ExclusionSource for Panicky {
    fn is_excluded(&self, gpa: GuestAddress) -> bool {
        assert!(!self.panic_now(gpa), "exclusion source bug at {:#x}", gpa.0);
        false
    }
}

impl DirtySource for Panicky {
    fn take_dirty(&self, _: usize, gpa: GuestAddress, _: usize, _: &mut [u64]) -> bool {
        assert!(!self.panic_now(gpa), "dirty source bug at {:#x}", gpa.0);
        true
    }
}

#[test]
fn a_panicking_exclusion_source_leaves_its_pages_unmerged_and_nothing_blocked() {
    // Asked while the page is write-protected: a panic that unwound through the engine left
    // the page protected (a writer hung for good) and poisoned the engine.
    let a = memory(32);
    fill_all(&a, &[5; 32]);
    let hook = Panicky::new(vec![0, 4 * PAGE as u64], true);
    let engine = Engine::new(fast_config()).unwrap();
    let id = engine
        .register(
            GuestConfig::new("a", "d").with_exclusion_source(hook),
            a.clone(),
        )
        .unwrap();
    engine.scan_pass().unwrap();
    let s = engine.scan_pass().unwrap();
    // Its pages count as excluded; the others merge.
    assert_eq!(s.pages_sharing + s.pages_shared, 30, "{s:?}");
    assert_eq!(s.failures.excluded, 2, "{s:?}");
    // A host write to every page completes (none stayed protected), and reads back.
    let writer = {
        let a = a.clone();
        std::thread::spawn(move || (0..32).for_each(|p| fill(&a, p, 6)))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !writer.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "a write hung on a page left protected"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    writer.join().unwrap();
    assert_contents(&a, &[6; 32]);
    // The engine was not poisoned.
    engine.unmerge_all().unwrap();
    engine.unregister(id).unwrap();
}

#[test]
fn a_panicking_dirty_source_means_every_page_is_hashed() {
    let a = memory(32);
    let b = memory(32);
    fill_all(&a, &[5; 32]);
    fill_all(&b, &[5; 32]);
    // b's source panics once, on its first call.
    let hook = Panicky::new(vec![0], false);
    let engine = Engine::new(fast_config()).unwrap();
    let ia = engine
        .register(GuestConfig::new("a", "d"), a.clone())
        .unwrap();
    let ib = engine
        .register(
            GuestConfig::new("b", "d").with_dirty_source(hook),
            b.clone(),
        )
        .unwrap();
    for _ in 0..3 {
        engine.scan_pass().unwrap();
    }
    let s = engine.stats();
    assert_eq!(s.pages_sharing + s.pages_shared, 64, "{s:?}");
    // The engine was not poisoned: both guests unregister.
    engine.unregister(ib).unwrap();
    engine.unregister(ia).unwrap();
    assert_contents(&a, &[5; 32]);
    assert_contents(&b, &[5; 32]);
}
