//! The soak, short (a few seconds; the full one is `cargo bench -p vmm-benches --bench soak`):
//! guest memories merged by one engine at full rate while host writers rewrite their pages with
//! sequence numbers. No write may be lost: not while the engine merges (each writer reads its
//! previous write back before the next), not at the end (every page of every guest is checked),
//! not after unmerging everything.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test

use std::time::Duration;

use vmm_tests::soak::{self, Goal, SoakConfig};

#[test]
fn writers_lose_nothing_while_the_engine_merges_at_full_rate() {
    // The soak must soak, however fast the machine: the engine merged, writers broke merges
    // and hit the guard, over several passes. It runs on past its 3 s until it has.
    let goal = Goal {
        writes: 10_000,
        merges: 1000,
        cow_breaks: 100,
        guarded_writes: 1,
        full_scans: 2,
    };
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
        goal: Some(goal),
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
    assert!(
        goal.met(report.writes, &report.stats),
        "the soak did not soak (goal {goal:?}):\n{}",
        report.text()
    );
}
