//! The soak, short (a few seconds; the full one is `cargo bench -p vmm-benches --bench soak`):
//! guest memories merged by one engine at full rate while host writers rewrite their pages with
//! sequence numbers. No write may be lost: not while the engine merges (each writer reads its
//! previous write back before the next), not at the end (every page of every guest is checked),
//! not after unmerging everything.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test

use std::time::Duration;

use vmm_tests::soak::{self, SoakConfig};

#[test]
fn writers_lose_nothing_while_the_engine_merges_at_full_rate() {
    let config = SoakConfig {
        guests: 3,
        pages: 2048,
        writers: 1,
        templates: 16,
        duration: Duration::from_secs(3),
        write_interval: Duration::from_millis(200),
        // Two threads committing at once, racing each other and the writers.
        threads: 2,
        commit_threads: 2,
        ..SoakConfig::default()
    };
    let report = soak::run(&config, Duration::from_secs(1), |p| {
        eprintln!(
            "{:.0} s: {} writes, {} merge attempts",
            p.elapsed.as_secs_f64(),
            p.writes,
            p.stats.merge_attempts
        );
    });
    eprintln!("{}\n{}", report.text(), report.result_line());
    assert_eq!(report.lost_writes(), 0, "{}", report.text());
    assert_eq!(report.pages_checked, 3 * 2048);
    let s = &report.stats;
    // The soak did soak: the engine merged, writers broke merges and hit the guard.
    assert!(report.writes > 10_000, "{}", report.text());
    assert!(s.merges > 1000 && s.cow_breaks > 100, "{}", report.text());
    assert!(s.full_scans >= 2, "{}", report.text());
    assert!(
        report.slow.count() + report.stalled.count() > 0,
        "{}",
        report.text()
    );
}
