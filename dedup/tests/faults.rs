//! Failure injection at each step of a batch commit and each pool operation: the batch rolls
//! back with data intact, no writer stays blocked, the engine keeps going, and the cause shows
//! in the statistics where the engine counts it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use common::*;
use vm_dedup::{Engine, FaultPoint, Stats, fault::FAULT_POINTS};

const PAGES: usize = 256;
const HOT: usize = 32;

/// Static layout: duplicates across the two guests, zero pages, unique pages.
fn seeds(g: u64) -> Vec<u64> {
    (0..PAGES as u64)
        .map(|i| match i % 8 {
            0 | 1 => 0,
            2..=5 => 10 + i,
            _ => 1000 * (g + 1) + i,
        })
        .collect()
}

/// A writer rewriting the first word of the first `HOT` pages of a guest, half the time back
/// to the layout's value (so the page becomes mergeable again).
fn writer(mem: &Mem, stop: Arc<AtomicBool>) -> JoinHandle<Vec<u64>> {
    let addrs: Vec<usize> = (0..HOT).map(|p| page_ptr(mem, p) as usize).collect();
    let orig: Vec<u64> = addrs
        .iter()
        // SAFETY: pages of the test's guest memory.
        .map(|&a| unsafe { (a as *const u64).read_volatile() })
        .collect();
    std::thread::spawn(move || {
        let mut last = orig.clone();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let p = (x as usize) % HOT;
            let v = if x & 1 == 0 { orig[p] } else { x | 1 };
            // SAFETY: only this thread writes these pages; the memory outlives it.
            unsafe { (addrs[p] as *mut u64).write_volatile(v) };
            last[p] = v;
            n += 1;
            if n % 16 == 0 {
                std::thread::yield_now();
            }
        }
        last
    })
}

fn check(mem: &Mem, seeds: &[u64], last: &[u64]) {
    for (p, &s) in seeds.iter().enumerate() {
        let mut want = content(s);
        if p < HOT {
            want[..8].copy_from_slice(&last[p].to_ne_bytes());
        }
        assert!(read(mem, p) == want, "page {p} lost data");
    }
}

/// The statistic that counts a failure at `point`; `None` where the engine recovers without
/// counting it anywhere (only its log says so), and the scenario checks the outcome instead.
fn cause_count(s: &Stats, point: FaultPoint) -> Option<u64> {
    match point {
        FaultPoint::Protect => Some(s.failures.protect),
        FaultPoint::Remap => Some(s.failures.remap),
        // The repaired remap merged; the step's later remaps are refused as at the VMA limit.
        FaultPoint::RemapNoMem | FaultPoint::RemapLate => Some(s.failures.vma_limit),
        FaultPoint::ZeroPage => Some(s.failures.zero_page),
        FaultPoint::Unprotect | FaultPoint::Wake | FaultPoint::Reregister => Some(s.guard_repairs),
        FaultPoint::PoolCreate
        | FaultPoint::PoolGrow
        | FaultPoint::PoolFill
        | FaultPoint::PoolPunch => Some(s.pool_errors),
        // Falling back to an unmerge in place is counted.
        FaultPoint::UnmergeRemap => Some(s.unmerged_in_place),
        // A page that cannot be moved is copied, and a late failure's hole is mapped again from
        // the rebuilt copy: both rebuilds succeed, as the scenario checks.
        FaultPoint::UnmergeMove | FaultPoint::UnmergeRemapLate => None,
        // Not in the scenarios (see `a_region_lost_by_a_failed_refill_is_let_go` and the
        // discard tests below).
        FaultPoint::UnmergeRefill | FaultPoint::DiscardLate | FaultPoint::DiscardRefill => None,
    }
}

fn scenario(point: FaultPoint) {
    eprintln!("fault point {point:?}");
    let a = memory(PAGES);
    let b = memory(PAGES);
    fill_all(&a, &seeds(0));
    fill_all(&b, &seeds(1));
    let (engine, _): (Engine, _) = engine_with(
        fast_config(),
        &[("a", "d", a.clone()), ("b", "d", b.clone())],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Some([writer(&a, stop.clone()), writer(&b, stop.clone())]);
    let mut stopped = None;
    if point == FaultPoint::RemapLate {
        // The failed remap leaves the range unmapped until the engine maps the slot into it: a
        // writer arriving in between would fault on nothing (as it would with a real late
        // failure of the kernel's `mmap`). Writers already waiting on the guard are fine.
        stop.store(true, Ordering::Relaxed);
        let [wa, wb] = writers.take().unwrap();
        stopped = Some((wa.join().unwrap(), wb.join().unwrap()));
    }
    if matches!(
        point,
        FaultPoint::UnmergeMove | FaultPoint::UnmergeRemap | FaultPoint::UnmergeRemapLate
    ) {
        // Unmerging rebuilds guest memory: merge first, then unmerge (with the writers
        // running) while armed. One move goes through, so a region fails half-way.
        engine.scan_pass().unwrap();
        engine.scan_pass().unwrap();
        if point == FaultPoint::UnmergeRemapLate {
            // The failed move leaves b's range unmapped until the engine maps it again: a
            // writer arriving in between would fault on nothing (as it would with a real late
            // failure of the kernel's `mremap`). Writers already waiting on the guard are fine.
            stop.store(true, Ordering::Relaxed);
            let [wa, wb] = writers.take().unwrap();
            stopped = Some((wa.join().unwrap(), wb.join().unwrap()));
        }
        engine.faults().arm(point, 1, 1_000_000);
        engine.unmerge_all().unwrap();
        let s = engine.stats();
        assert_eq!((s.pages_sharing, s.zero_pages), (0, 0));
        if point == FaultPoint::UnmergeRemapLate {
            // b was unmapped by the failed move and mapped again from its rebuilt copy: both
            // regions are plain anonymous memory again.
            assert_eq!((s.rebuilt_regions, s.unmerged_in_place), (2, 0));
            assert_eq!(pool_mappings(&a) + pool_mappings(&b), 0);
        } else if point == FaultPoint::UnmergeRemap {
            // a was rebuilt; b was rolled back and unmerged in place: private pages, pool
            // mappings still there.
            assert_eq!((s.rebuilt_regions, s.unmerged_in_place), (1, 1));
            assert_eq!(pool_mappings(&a), 0);
            assert!(pool_mappings(&b) > 0);
        } else {
            assert_eq!(pool_mappings(&a) + pool_mappings(&b), 0);
        }
    } else if point == FaultPoint::PoolPunch {
        // Punching happens when slots are freed: merge first, then unmerge while armed.
        engine.scan_pass().unwrap();
        engine.scan_pass().unwrap();
        engine.faults().arm(point, 0, 1_000);
        engine.unmerge_all().unwrap();
        assert!(engine.stats().pages_shared == 0);
    } else if point == FaultPoint::Reregister {
        // Registration is needed again only when a page that was merged, then written, is
        // merged again: merge first, break some merges, then arm. The writers' pages may
        // still be changing when the passes come; these, written once with the same bytes
        // (a copy-on-write break), merge again for sure.
        engine.scan_pass().unwrap();
        engine.scan_pass().unwrap();
        let cold = (HOT..PAGES).filter(|p| (2..=5).contains(&(p % 8))).take(8);
        for p in cold {
            fill(&a, p, seeds(0)[p]);
        }
        engine.faults().arm(point, 0, 1_000);
        for _ in 0..6 {
            engine.scan_pass().unwrap();
        }
    } else {
        // Let one call through (so a batch fails half-way), except for the pool's creation and
        // growth, which happen once here.
        let after = u64::from(!matches!(
            point,
            FaultPoint::PoolCreate | FaultPoint::PoolGrow
        ));
        engine.faults().arm(point, after, 1_000);
        for _ in 0..3 {
            engine.scan_pass().unwrap();
        }
    }
    let injected = engine.faults().injected(point);
    let during = engine.stats();
    engine.faults().disarm_all();
    for _ in 0..3 {
        engine.scan_pass().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let (la, lb) = match (writers, stopped) {
        (Some([wa, wb]), _) => (wa.join().unwrap(), wb.join().unwrap()),
        (None, Some(last)) => last,
        (None, None) => unreachable!("the writers are joined once"),
    };
    let after = engine.stats();
    assert!(injected > 0, "{point:?} was never reached");
    if let Some(count) = cause_count(&during, point) {
        assert!(count > 0, "{point:?} not in the stats: {during:?}");
    }
    check(&a, &seeds(0), &la);
    check(&b, &seeds(1), &lb);
    // The engine kept going: once disarmed, the static duplicates and zero pages are merged.
    assert!(
        after.pages_sharing >= (PAGES / 2 - HOT) as u64,
        "{point:?}: {after:?}"
    );
    assert!(
        after.zero_pages >= (2 * (PAGES / 4 - HOT)) as u64,
        "{point:?}: {after:?}"
    );
    engine.unmerge_all().unwrap();
    check(&a, &seeds(0), &la);
    check(&b, &seeds(1), &lb);
    assert_eq!(
        pool_mappings(&a) + pool_mappings(&b),
        0,
        "{point:?}: unmerging leaves anonymous memory"
    );
}

#[test]
fn every_fault_point_rolls_back_and_recovers() {
    // Alone: its scenarios count on the writers' timing against the scan passes.
    let _serial = serial();
    // Discards have tests of their own: nothing in the scenario discards.
    let scenarios = FAULT_POINTS
        .into_iter()
        .filter(|&p| !p.loses_memory() && p != FaultPoint::DiscardLate);
    for point in scenarios {
        scenario(point);
    }
}

#[test]
fn a_region_lost_by_a_failed_refill_is_let_go() {
    let _serial = serial();
    // b's rebuilt copy cannot be moved over b again after the first move failed late: b's
    // memory is lost. The engine must let go of it (never read it again: that would crash
    // the process) and keep serving a.
    let a = memory(PAGES);
    let b = memory(PAGES);
    fill_all(&a, &seeds(0));
    fill_all(&b, &seeds(1));
    let (engine, ids) = engine_with(
        fast_config(),
        &[("a", "d", a.clone()), ("b", "d", b.clone())],
    );
    engine.scan_pass().unwrap();
    engine.scan_pass().unwrap();
    assert!(pool_mappings(&b) > 0);
    engine.faults().arm(FaultPoint::UnmergeRemapLate, 1, 1);
    engine.faults().arm(FaultPoint::UnmergeRefill, 0, 1);
    let lost = engine.unmerge_all();
    assert!(
        matches!(lost, Err(vm_dedup::EngineError::Unmerge(n)) if n == PAGES as u64),
        "{lost:?}"
    );
    assert_eq!(engine.faults().injected(FaultPoint::UnmergeRefill), 1);
    engine.faults().disarm_all();
    // a was rebuilt and still merges with itself; b is never touched again.
    for _ in 0..3 {
        engine.scan_pass().unwrap();
    }
    let s = engine.stats();
    assert_eq!(
        s.guests[1].pages_sharing + s.guests[1].zero_pages,
        0,
        "{s:?}"
    );
    assert!(s.guests[0].zero_pages > 0, "{s:?}");
    assert_eq!(pool_mappings(&b), 0);
    let intact = |mem: &Mem, seeds: &[u64]| {
        for (p, &s) in seeds.iter().enumerate() {
            assert!(read(mem, p) == content(s), "page {p} lost data");
        }
    };
    intact(&a, &seeds(0));
    // b can be unregistered (it maps no pool page), and a unmerged as usual.
    engine.unregister(ids[1]).unwrap();
    engine.unmerge_all().unwrap();
    assert_eq!(pool_mappings(&a), 0);
    intact(&a, &seeds(0));
}

#[test]
fn a_region_left_with_nothing_to_commit_keeps_its_unregistered_ranges() {
    let _serial = serial();
    // Guest a's first 8 pages merge with b's, then are written (private copies inside the
    // pool mappings, which a remap left unregistered from the userfaultfd).
    const PAIRS: usize = 16384; // new slots past the pool's first 64 MiB
    let a = memory(16 + 2 * PAIRS);
    let b = memory(16);
    for p in 0..8 {
        fill(&a, p, 1 + p as u64);
        fill(&b, p, 1 + p as u64);
    }
    let (engine, _) = engine_with(
        fast_config(),
        &[("a", "d", a.clone()), ("b", "d", b.clone())],
    );
    engine.scan_pass().unwrap();
    assert_eq!(engine.scan_pass().unwrap().pages_sharing, 8);
    assert!(pool_mappings(&a) > 0);
    for p in 0..8 {
        fill(&a, p, 101 + p as u64);
    }
    // New duplicate pairs in a, all needing new slots, while the pool cannot grow: a's whole
    // share of the commit is left out.
    for i in 0..PAIRS {
        fill(&a, 16 + 2 * i, 1000 + i as u64);
        fill(&a, 16 + 2 * i + 1, 1000 + i as u64);
    }
    engine.faults().arm(FaultPoint::PoolGrow, 0, 1_000_000);
    for _ in 0..3 {
        engine.scan_pass().unwrap();
    }
    assert!(engine.faults().injected(FaultPoint::PoolGrow) > 0);
    engine.faults().disarm_all();
    // a's first pages take b's content again: they join b's slots, guarded inside the
    // mappings that must be registered first.
    for p in 0..8 {
        fill(&a, p, 1 + p as u64);
    }
    for _ in 0..3 {
        engine.scan_pass().unwrap();
    }
    let s = engine.stats();
    assert_eq!(s.failures.protect, 0, "guarded unregistered pages: {s:?}");
    assert_eq!(
        s.guests[0].pages_sharing + s.guests[0].pages_shared,
        8 + 2 * PAIRS as u64
    );
    for p in 0..8 {
        assert!(read(&a, p) == content(1 + p as u64), "page {p}");
    }
}

#[test]
fn a_discard_failing_late_maps_fresh_memory_into_the_hole() {
    let _serial = serial();
    let (a, b, seeds, engine, ids) = merged_pair();
    // Fresh memory over a's merged pages 8..24 fails after the kernel unmapped them: the
    // engine maps fresh memory into the hole, which is what the discard asked for.
    engine.faults().arm(FaultPoint::DiscardLate, 0, 1);
    engine
        .discard(ids[0], page_gpa(&a, 8), (16 * PAGE) as u64)
        .unwrap();
    assert_eq!(engine.faults().injected(FaultPoint::DiscardLate), 1);
    engine.faults().disarm_all();
    for (p, &seed) in seeds.iter().enumerate() {
        let want = if (8..24).contains(&p) { 0 } else { seed };
        assert!(read(&a, p) == content(want), "page {p}");
    }
    assert_contents(&b, &seeds);
    // The range is guest memory like any other again: written, then merged again.
    for (p, &seed) in seeds.iter().enumerate().take(24).skip(8) {
        fill(&a, p, seed);
    }
    engine.scan_pass().unwrap();
    let s = engine.scan_pass().unwrap();
    assert_eq!(s.pages_sharing + s.pages_shared, 2 * 48, "{s:?}");
    assert_contents(&a, &seeds);
    engine.unmerge_all().unwrap();
    assert_eq!(pool_mappings(&a) + pool_mappings(&b), 0);
    assert_contents(&a, &seeds);
    assert_contents(&b, &seeds);
}

#[test]
fn a_region_lost_by_a_failed_discard_is_let_go() {
    let _serial = serial();
    let (a, b, seeds, engine, ids) = merged_pair();
    // The hole left by the late failure cannot be filled either: a's memory there is gone.
    // The engine lets go of a (never scans, merges nor unmerges it again) and keeps serving b.
    engine.faults().arm(FaultPoint::DiscardLate, 0, 1);
    engine.faults().arm(FaultPoint::DiscardRefill, 0, 1);
    let lost = engine.discard(ids[0], page_gpa(&a, 8), (16 * PAGE) as u64);
    assert!(
        matches!(lost, Err(vm_dedup::EngineError::Discard(_))),
        "{lost:?}"
    );
    assert_eq!(engine.faults().injected(FaultPoint::DiscardRefill), 1);
    engine.faults().disarm_all();
    for _ in 0..3 {
        engine.scan_pass().unwrap();
    }
    let s = engine.stats();
    assert_eq!(s.guests[0].pages_skipped, 64, "{s:?}");
    // a's pages outside the hole still read their content; a write to one of its merged pages
    // gets a private copy, and b never sees it.
    for (p, &seed) in seeds.iter().enumerate().skip(24) {
        assert!(read(&a, p) == content(seed), "page {p}");
    }
    fill(&a, 25, 999);
    assert!(read(&a, 25) == content(999));
    assert_contents(&b, &seeds);
    engine.unmerge_all().unwrap();
    assert_contents(&b, &seeds);
    assert_eq!(pool_mappings(&b), 0);
    // a still maps the pool where it lost nothing: its memory cannot go on without the engine
    // (unregister refuses), but it can be released at the end of its life.
    let kept = engine.unregister(ids[0]);
    assert!(
        matches!(kept, Err(vm_dedup::EngineError::StillMapped(n)) if n > 0),
        "{kept:?}"
    );
    for (p, &seed) in seeds.iter().enumerate().skip(26) {
        assert!(read(&a, p) == content(seed), "page {p}");
    }
    drop(a);
    engine.release(ids[0]).unwrap();
    assert_eq!(engine.stats().pinned_slots, 0);
    assert_contents(&b, &seeds);
}
