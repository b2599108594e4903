//! Behaviour at the limits: failures that repeat (ENOMEM at the VMA limit, a pool that cannot be
//! created) are not retried at every pass and do not log a line per failure; the VMA budget
//! learns the limit from ENOMEM and forgets it once there is room again; merges the budget
//! refuses are not attempts, and `vma_budget_reached` tells the state of now.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Mutex;

use common::*;
use vm_dedup::{Engine, FaultPoint};

/// Log records written while a test runs (tests take `serial()` to count only their own).
struct Capture;

static LINES: Mutex<Vec<(log::Level, String)>> = Mutex::new(Vec::new());

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        LINES
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((r.level(), r.args().to_string()));
    }
    fn flush(&self) {}
}

fn capture() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        log::set_logger(&Capture).unwrap();
        log::set_max_level(log::LevelFilter::Info);
    });
    LINES.lock().unwrap().clear();
}

/// Warnings and errors logged since `capture()`.
fn warnings() -> Vec<String> {
    LINES
        .lock()
        .unwrap()
        .iter()
        .filter(|(l, _)| *l <= log::Level::Warn)
        .map(|(_, t)| t.clone())
        .collect()
}

fn infos() -> Vec<String> {
    LINES
        .lock()
        .unwrap()
        .iter()
        .filter(|(l, _)| *l == log::Level::Info)
        .map(|(_, t)| t.clone())
        .collect()
}

const PAGES: usize = 512;

/// Isolated duplicates across two guests (each merge is its own remap), zero pages, unique
/// pages.
fn seeds(g: u64) -> Vec<u64> {
    (0..PAGES as u64)
        .map(|i| match i % 4 {
            0 => 10 + i,
            1 => 0,
            _ => 100_000 * (g + 1) + i,
        })
        .collect()
}

fn two_guests(cfg: vm_dedup::Config) -> (Engine, Arc2) {
    let a = memory(PAGES);
    let b = memory(PAGES);
    fill_all(&a, &seeds(0));
    fill_all(&b, &seeds(1));
    let (engine, _) = engine_with(cfg, &[("a", "d", a.clone()), ("b", "d", b.clone())]);
    (engine, (a, b))
}

type Arc2 = (std::sync::Arc<Mem>, std::sync::Arc<Mem>);

const PASSES: u64 = 40;

#[test]
fn enomem_at_the_vma_limit_backs_off_and_the_budget_learns_the_limit() {
    let _serial = serial();
    capture();
    let (engine, (a, b)) = two_guests(fast_config());
    // Every remap fails with ENOMEM, as at vm.max_map_count.
    engine.faults().arm(FaultPoint::RemapNoMem, 0, u64::MAX);
    for _ in 0..PASSES {
        engine.scan_pass().unwrap();
    }
    let s = engine.stats();
    let tries = engine.faults().injected(FaultPoint::RemapNoMem);
    // Each pass would try every duplicate (128 remaps); with the backoff only the passes that
    // try again do, and each stops at its first ENOMEM: passes 1, 2, 4, 8, 16, 32 (the first
    // pass only hashes), with both worker threads possibly failing at once.
    assert!(tries > 0);
    assert!(tries <= 12, "{tries} remaps tried in {PASSES} passes");
    let lines = warnings();
    assert!(lines.len() <= 2, "{} warnings: {lines:?}", lines.len());
    assert!(
        lines[0].contains("remapping at the VMA limit") && lines[0].contains("os error 12"),
        "{lines:?}"
    );
    assert!(s.vma_budget_learned.is_some(), "{s:?}");
    assert!(s.vma_budget_reached);
    assert_eq!(s.vma_budget, s.vma_budget_learned.unwrap());
    assert!(
        s.failing
            .iter()
            .any(|f| f.cause == "vma_limit" && f.held_back)
    );
    // Zero pages need no VMA: they all merged.
    assert_eq!(s.zero_pages, 2 * PAGES as u64 / 4);
    assert_eq!(s.pages_sharing, 0);

    // There is room again: the next try finds it, the budget forgets the learnt limit, the
    // episode ends with one line.
    engine.faults().disarm_all();
    engine.set_knob("pages_to_scan", "65536").unwrap();
    engine.scan_pass().unwrap();
    let s = engine.stats();
    assert_eq!(s.vma_budget_learned, None, "{s:?}");
    assert_eq!(s.pages_sharing, PAGES as u64 / 4);
    assert!(s.failing.is_empty(), "{:?}", s.failing);
    assert!(
        infos()
            .iter()
            .any(|l| l.contains("remapping at the VMA limit (vm.max_map_count) works again")),
        "{:?}",
        infos()
    );
    assert_contents(&a, &seeds(0));
    assert_contents(&b, &seeds(1));
}

#[test]
fn a_pool_that_cannot_be_created_is_not_retried_at_every_pass() {
    let _serial = serial();
    capture();
    let (engine, (a, b)) = two_guests(fast_config());
    engine.faults().arm(FaultPoint::PoolCreate, 0, u64::MAX);
    for _ in 0..PASSES {
        engine.scan_pass().unwrap();
    }
    let s = engine.stats();
    let tries = engine.faults().injected(FaultPoint::PoolCreate);
    assert!(tries > 0);
    assert!(
        tries <= 7,
        "{tries} pool creations tried in {PASSES} passes"
    );
    assert_eq!(s.pool_errors, tries);
    let lines = warnings();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("the pool of node 0 failing"), "{lines:?}");
    assert!(lines[0].contains("os error 24"), "{lines:?}");
    // The merges needing a new slot were held back, not attempted.
    assert!(s.held_back > 0);
    assert_eq!(
        s.merge_attempts,
        s.merges + s.failures.total() - s.failures.vma_budget
    );
    assert_eq!(s.zero_pages, 2 * PAGES as u64 / 4);
    // A new setting retries at once (EMFILE may be gone after a limit was raised).
    engine.faults().disarm_all();
    engine.set_knob("max_page_sharing", "256").unwrap();
    let s = engine.scan_pass().unwrap();
    assert_eq!(s.pages_sharing, PAGES as u64 / 4);
    assert!(s.failing.is_empty());
    assert_contents(&a, &seeds(0));
    assert_contents(&b, &seeds(1));
}

#[test]
fn budget_refusals_are_not_attempts_and_reached_clears() {
    let _serial = serial();
    capture();
    let mut cfg = fast_config();
    cfg.set("vma_budget", "40").unwrap();
    let (engine, (a, b)) = two_guests(cfg);
    // Two passes to merge, then a few more while the budget's count of VMAs (two charged per
    // remap, measured at the end of the pass) settles.
    for _ in 0..6 {
        engine.scan_pass().unwrap();
    }
    let first = engine.stats();
    assert!(first.vma_budget_reached);
    assert!(first.failures.vma_budget > 0);
    // Idle passes: nothing is attempted (the refused merges are not planned again while
    // nothing changes), and the budget still holds them back.
    let mut last = first.clone();
    for _ in 0..5 {
        last = engine.scan_pass().unwrap();
    }
    assert_eq!(last.merge_attempts, first.merge_attempts);
    assert_eq!(last.pages_sharing, first.pages_sharing);
    assert!(last.vma_budget_reached);
    assert!(warnings().is_empty(), "{:?}", warnings());
    // Room again: everything merges and the flag clears once a pass went by without refusals.
    engine.set_knob("vma_budget", "100000").unwrap();
    for _ in 0..3 {
        last = engine.scan_pass().unwrap();
    }
    assert_eq!(last.pages_sharing, PAGES as u64 / 4);
    assert!(!last.vma_budget_reached, "{last:?}");
    assert_contents(&a, &seeds(0));
    assert_contents(&b, &seeds(1));
}

#[test]
fn a_page_that_becomes_a_duplicate_merges_while_nothing_else_changes() {
    let _serial = serial();
    capture();
    let (engine, (a, b)) = two_guests(fast_config());
    for _ in 0..4 {
        engine.scan_pass().unwrap();
    }
    let before = engine.stats();
    assert_eq!(before.pages_sharing, PAGES as u64 / 4);
    // Quiet passes plan only pages new to the planner; a page of b that now holds what an
    // unshared page of a holds must still find it.
    let mut want_b = seeds(1);
    want_b[2] = seeds(0)[3];
    fill(&b, 2, want_b[2]);
    for _ in 0..3 {
        engine.scan_pass().unwrap();
    }
    let after = engine.stats();
    assert_eq!(after.pages_sharing, before.pages_sharing + 1, "{after:?}");
    assert_contents(&a, &seeds(0));
    assert_contents(&b, &want_b);
}
