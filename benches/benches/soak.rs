//! The soak as a benchmark: `cargo bench -p vmm-benches --bench soak [-- --duration 60 ...]`.
//!
//! Several guest memories registered with one engine that merges at full rate, host writer
//! threads rewriting their pages with sequence numbers for `--duration` seconds (default 60),
//! every page checked at the end and again after unmerging everything (see
//! `vmm_tests::soak`). Prints progress every 5 s, then the figures: merges attempted, lost
//! writes (must be 0: the exit status is 1 otherwise) and writer stalls under the merge guard
//! (p50, p99, max), and as its last line `RESULT soak ...`. Not run by CI (`tests/tests/soak.rs`
//! runs a short one).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vmm_tests::soak::{self, SoakConfig};

/// Soak the dedup engine with concurrent writers.
#[derive(Debug, Parser)]
struct Args {
    /// How long the writers write, in seconds.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Guest memories.
    #[arg(long, default_value_t = 4)]
    guests: usize,
    /// MiB of memory per guest. The default keeps every page mergeable within the default VMA
    /// budget even when each merged page sits alone (two mappings each); beyond it the budget
    /// refuses merges (counted as `vma_budget` failures).
    #[arg(long, default_value_t = 16)]
    mem_mib: usize,
    /// Writer threads per guest.
    #[arg(long, default_value_t = 1)]
    writers: usize,
    /// Mean milliseconds between two writes to one page.
    #[arg(long, default_value_t = 500)]
    write_interval_ms: u64,
    /// Distinct page contents (the same in every guest).
    #[arg(long, default_value_t = 64)]
    templates: usize,
    /// Pages merged under one write-protect guard (the engine's batch_pages).
    #[arg(long, default_value_t = 64)]
    batch_pages: usize,
    /// The engine's threads (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Threads committing merges at once (the engine's commit_threads; 0: half the threads).
    #[arg(long, default_value_t = 0)]
    commit_threads: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let usage = |message: &str| {
        eprintln!("soak: {message}");
        ExitCode::from(2)
    };
    let duration = match Duration::try_from_secs_f64(args.duration) {
        Ok(d) if !d.is_zero() => d,
        _ => return usage("--duration must be a positive number of seconds"),
    };
    for (flag, value) in [
        ("--guests", args.guests),
        ("--mem-mib", args.mem_mib),
        ("--writers", args.writers),
        ("--templates", args.templates),
    ] {
        if value == 0 {
            return usage(&format!("{flag} must be at least 1"));
        }
    }
    let config = SoakConfig {
        guests: args.guests,
        pages: match args.mem_mib.checked_mul(1 << 20) {
            Some(bytes) => bytes / 4096,
            None => return usage("--mem-mib is too large"),
        },
        writers: args.writers,
        templates: args.templates,
        duration,
        write_interval: Duration::from_millis(args.write_interval_ms.max(1)),
        batch_pages: args.batch_pages,
        threads: args.threads,
        commit_threads: args.commit_threads,
        goal: None,
    };
    if let Err(e) = soak::engine_config(&config) {
        return usage(&e.to_string());
    }
    eprintln!(
        "soak: {} guests x {} MiB, {} writer(s) each, {:.0} s",
        config.guests, args.mem_mib, config.writers, args.duration
    );
    let report = soak::run(&config, Duration::from_secs(5), |p| {
        let s = &p.stats;
        eprintln!(
            "  {:>5.0} s: {} writes, {} merge attempts, {} merges, {} cow breaks, {} guarded \
             writes, {} passes",
            p.elapsed.as_secs_f64(),
            p.writes,
            s.merge_attempts,
            s.merges,
            s.cow_breaks,
            s.guarded_writes,
            s.full_scans
        );
    });
    println!("{}", report.text());
    println!("{}", report.result_line());
    if report.lost_writes() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
