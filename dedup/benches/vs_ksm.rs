//! Convergence against kernel KSM on the same content, side by side in one run: the same pages
//! in the same number of regions, merged by kernel KSM at its defaults and at max rate
//! (pages_to_scan=10000, sleep_millisecs=0), and by this engine. Reports time to 95% of the
//! attainable savings, CPU-seconds to get there, final savings, and scan throughput, then the
//! ratios on the last line:
//!
//! `RESULT speedup_vs_ksm_max=<x> cpu_ratio=<ours/ksm> savings_ratio=<ours/ksm> scan_gbps_per_core=<y>`
//!
//! Environment: `VS_KSM_GUESTS` (2), `VS_KSM_MIB` per guest (1024), `VS_KSM_SHARED` percent of
//! pages from the shared set (75, of which a twentieth are zero pages), `VS_KSM_DEFAULTS_SECS`
//! time cap for KSM at its defaults (60; 0 skips it), `VS_KSM_MAX_SECS` cap for the other
//! modes (300), `VS_KSM_SCAN_MIB` memory for the scan measurement (2048), `VS_KSM_SKIP_KSM=1`
//! to run only this engine (for profiling), `VS_KSM_THREADS` worker threads of this engine (all
//! cores, all of them committing), `VS_KSM_OPTIONS` more engine knobs (`name=value,...`, e.g.
//! `batch_pages=256`).
//!
//! Besides the table, it prints this engine's statistics when it reached 95%: wall time per
//! phase, CPU time, passes, and the cost per page of each phase, to see where the time goes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_dedup::{Config, Engine, GuestConfig, ksm};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const PAGE: usize = 4096;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Content id of every page of every guest: 0 is zero, ids below `shared_ids` come from the
/// shared set (each appears once in every guest, in runs placed differently per guest), higher
/// ids are unique.
struct Layout {
    guests: Vec<Vec<u64>>,
    distinct: u64,
}

fn rng(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn layout(guests: usize, pages: usize, shared_pct: u64) -> Layout {
    let shared = pages * shared_pct as usize / 100;
    let zero = shared / 20;
    let shared_ids = (shared - zero) as u64;
    // Runs of 16..512 consecutive shared contents, like the pages of files.
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut id = 1;
    while id <= shared_ids {
        let len = (16 + rng(&mut x) % 497).min(shared_ids + 1 - id);
        runs.push((id, len));
        id += len;
    }
    let mut unique_next = shared_ids + 1;
    let mut out = Vec::new();
    for g in 0..guests {
        // Each guest gets the runs in its own order, with unique and zero runs in between.
        let mut order: Vec<usize> = (0..runs.len()).collect();
        let mut y = 0x9e37_79b9_7f4a_7c15u64 ^ (g as u64 + 1);
        for i in (1..order.len()).rev() {
            let j = (rng(&mut y) % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        let mut pages_of: Vec<u64> = Vec::with_capacity(pages);
        let unique_total = pages - shared;
        let per_gap_unique = unique_total / order.len().max(1);
        let per_gap_zero = zero / order.len().max(1);
        for &r in &order {
            let (first, len) = runs[r];
            pages_of.extend(first..first + len);
            pages_of.extend(std::iter::repeat_n(0, per_gap_zero));
            for _ in 0..per_gap_unique {
                pages_of.push(unique_next);
                unique_next += 1;
            }
        }
        while pages_of.len() < pages {
            if pages_of.len() % 2 == 0 {
                pages_of.push(0);
            } else {
                pages_of.push(unique_next);
                unique_next += 1;
            }
        }
        pages_of.truncate(pages);
        out.push(pages_of);
    }
    let mut ids: Vec<u64> = out.iter().flatten().copied().collect();
    ids.sort_unstable();
    ids.dedup();
    Layout {
        guests: out,
        distinct: ids.len() as u64,
    }
}

fn fill_page(dst: &mut [u8], id: u64) {
    if id == 0 {
        dst.fill(0);
        return;
    }
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for w in dst.chunks_exact_mut(8) {
        w.copy_from_slice(&rng(&mut x).to_ne_bytes());
    }
}

type Mem = GuestMemoryMmap<()>;

fn build(lay: &Layout) -> Vec<Arc<Mem>> {
    lay.guests
        .iter()
        .map(|ids| {
            let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), ids.len() * PAGE)]).unwrap();
            let r = m.iter().next().unwrap();
            // SAFETY: the region is ours, `ids.len()` pages long.
            let bytes = unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), ids.len() * PAGE) };
            for (page, &id) in bytes.chunks_exact_mut(PAGE).zip(ids) {
                fill_page(page, id);
            }
            Arc::new(m)
        })
        .collect()
}

#[derive(Debug, Default, Clone, Copy)]
struct Run {
    /// Seconds to 95% of attainable savings (None: not reached within the cap).
    t95: Option<f64>,
    cpu95: Option<f64>,
    /// Final savings in pages, and the time and CPU at the end.
    saved: u64,
    t_end: f64,
    cpu_end: f64,
}

/// Polls `saved()` until 95% of `attainable` (calling `at95` then), then until two more full
/// scans (`scans()`) or the cap.
fn converge(
    attainable: u64,
    cap: Duration,
    saved: impl Fn() -> u64,
    scans: impl Fn() -> u64,
    cpu: impl Fn() -> f64,
    mut at95: impl FnMut(),
) -> Run {
    let t0 = Instant::now();
    let cpu0 = cpu();
    let mut r = Run::default();
    let target = attainable * 95 / 100;
    let mut scans_at_95 = 0;
    let mut last_print = Instant::now();
    loop {
        let s = saved();
        let el = t0.elapsed();
        if r.t95.is_none() && s >= target {
            r.t95 = Some(el.as_secs_f64());
            r.cpu95 = Some(cpu() - cpu0);
            scans_at_95 = scans();
            at95();
        }
        if r.t95.is_some() && scans() >= scans_at_95 + 2 || el >= cap {
            r.saved = s;
            r.t_end = el.as_secs_f64();
            r.cpu_end = cpu() - cpu0;
            return r;
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "  ... {:.0}s: {:.1}% of attainable",
                el.as_secs_f64(),
                100.0 * s as f64 / attainable as f64
            );
            last_print = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(if r.t95.is_some() { 20 } else { 2 }));
    }
}

fn run_ksm(lay: &Layout, attainable: u64, pages_to_scan: &str, sleep: &str, cap: Duration) -> Run {
    let guard = ksm::KsmGuard::acquire().unwrap();
    guard.unmerge_all().unwrap();
    for (k, v) in [
        ("advisor_mode", "none"),
        ("pages_to_scan", pages_to_scan),
        ("sleep_millisecs", sleep),
        ("use_zero_pages", "0"),
        ("merge_across_nodes", "1"),
        ("max_page_sharing", "256"),
    ] {
        if ksm::read(k).is_ok() {
            guard.set(k, v).unwrap();
        }
    }
    let mems = build(lay);
    for m in &mems {
        let r = m.iter().next().unwrap();
        // SAFETY: our own mapping; the advice changes no content.
        unsafe { ksm::madvise_mergeable(r.as_ptr(), r.size()) }.unwrap();
    }
    let base = ksm::stats().unwrap();
    ksm::write("run", "1").unwrap();
    let run = converge(
        attainable,
        cap,
        || {
            ksm::stats()
                .map(|s| s.pages_saved().saturating_sub(base.pages_saved()))
                .unwrap_or(0)
        },
        || ksm::stats().map(|s| s.full_scans).unwrap_or(0),
        || ksm::ksmd_cpu_ns().unwrap_or(0) as f64 / 1e9,
        || {},
    );
    guard.unmerge_all().unwrap();
    drop(mems);
    drop(guard);
    run
}

/// The engine at its fastest on this layout: large steps, no pause, every worker committing
/// (its long runs cost few remaps, so committers rarely wait for each other's: measured here,
/// time to 95% 1.04 s on 1.86 CPU-s with 2 committers, 1.19 s on 1.63 with the default 1).
fn engine_config(threads: usize) -> Config {
    let mut c = Config::default();
    c.apply_options(&format!(
        "pages_to_scan=65536,sleep_millisecs=0,use_zero_pages=1,max_page_sharing=256,\
         threads={threads},commit_threads={threads}"
    ))
    .unwrap();
    if let Ok(extra) = std::env::var("VS_KSM_OPTIONS") {
        c.apply_options(&extra).unwrap();
    }
    c
}

/// This engine's run: the convergence, its statistics at 95% and at the end.
struct Ours {
    run: Run,
    at95: Option<vm_dedup::Stats>,
    end: vm_dedup::Stats,
}

fn run_ours(lay: &Layout, attainable: u64, cap: Duration, threads: usize) -> Ours {
    let mems = build(lay);
    let engine = Engine::new(engine_config(threads)).unwrap();
    for (i, m) in mems.iter().enumerate() {
        engine
            .register(GuestConfig::new(format!("g{i}"), "bench"), m.clone())
            .unwrap();
    }
    let scanner = engine.start().unwrap();
    let mut at95 = None;
    let run = converge(
        attainable,
        cap,
        || engine.stats().bytes_saved / PAGE as u64,
        || engine.stats().full_scans,
        || Engine::process_cpu_ns() as f64 / 1e9,
        || at95 = Some(engine.stats()),
    );
    scanner.stop();
    let stats = engine.stats();
    // Verify the content survived.
    for (m, ids) in mems.iter().zip(&lay.guests) {
        let r = m.iter().next().unwrap();
        // SAFETY: our own mapping, no writer left.
        let bytes = unsafe { std::slice::from_raw_parts(r.as_ptr(), ids.len() * PAGE) };
        let mut want = vec![0u8; PAGE];
        for (page, &id) in bytes.chunks_exact(PAGE).zip(ids) {
            fill_page(&mut want, id);
            assert!(page == want.as_slice(), "content changed by merging");
        }
    }
    Ours {
        run,
        at95,
        end: stats,
    }
}

/// Where this engine's time went up to 95%: wall time per phase, and per page.
fn show_phases(s: &vm_dedup::Stats, threads: usize) {
    let p = &s.phases;
    let ms = |ns: u64| ns as f64 / 1e6;
    let per = |ns: u64, n: u64| {
        if n == 0 { 0.0 } else { ns as f64 / n as f64 }
    };
    println!(
        "vm-dedup at 95% ({threads} threads): {} full scans, {} pages hashed, {} merges of {} \
         attempts, {} pool slots; engine CPU {:.2} s in {:.2} s of steps",
        s.full_scans,
        s.pages_scanned,
        s.merges,
        s.merge_attempts,
        s.pages_shared,
        s.cpu_ns as f64 / 1e9,
        s.wall_ns as f64 / 1e9
    );
    println!(
        "  wall ms: scan {:.0}, plan {:.0}, fill {:.0}, commit {:.0}, account {:.0}",
        ms(p.scan_ns),
        ms(p.plan_ns),
        ms(p.fill_ns),
        ms(p.commit_ns),
        ms(p.account_ns)
    );
    println!(
        "  wall ns per page: scan {:.0} per page hashed, plan {:.0} per attempt, fill {:.0} \
         per slot, commit {:.0} per attempt",
        per(p.scan_ns, s.pages_scanned),
        per(p.plan_ns, s.merge_attempts),
        per(p.fill_ns, s.pages_shared),
        per(p.commit_ns, s.merge_attempts),
    );
}

/// Seconds for the first pass (hashing only) over `mib` MiB with `threads` threads.
fn scan_pass_secs(mib: usize, threads: usize) -> f64 {
    let pages = mib * 256;
    let ids: Vec<u64> = (1..=pages as u64).collect();
    let lay = Layout {
        guests: vec![ids],
        distinct: pages as u64,
    };
    let mems = build(&lay);
    let engine = Engine::new(engine_config(threads)).unwrap();
    engine
        .register(GuestConfig::new("scan", "bench"), mems[0].clone())
        .unwrap();
    let t = Instant::now();
    let s = engine.scan_pass().unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(s.pages_scanned, pages as u64);
    secs
}

fn show(name: &str, r: &Run, attainable: u64) {
    let t95 = r
        .t95
        .map_or("not reached".to_string(), |t| format!("{t:.2} s"));
    let cpu95 = r.cpu95.map_or("-".to_string(), |c| format!("{c:.2} s"));
    println!(
        "| {name:<22} | {t95:>12} | {cpu95:>9} | {:>8.1}% | {:>10} |",
        100.0 * r.saved as f64 / attainable as f64,
        r.saved
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let guests = env("VS_KSM_GUESTS", 2) as usize;
    let mib = env("VS_KSM_MIB", 1024) as usize;
    let shared = env("VS_KSM_SHARED", 75);
    let defaults_cap = Duration::from_secs(env("VS_KSM_DEFAULTS_SECS", 60));
    let cap = Duration::from_secs(env("VS_KSM_MAX_SECS", 300));
    let scan_mib = env("VS_KSM_SCAN_MIB", 2048) as usize;
    let pages = mib * 256;
    let lay = layout(guests, pages, shared);
    let total = (guests * pages) as u64;
    let attainable = total - lay.distinct;
    println!(
        "vs_ksm: {guests} guests x {mib} MiB, {shared}% from a shared set; {total} pages, \
         {} distinct, attainable savings {attainable} pages",
        lay.distinct
    );

    let have_ksm = ksm::available() && env("VS_KSM_SKIP_KSM", 0) == 0;
    let ksm_default = if have_ksm && !defaults_cap.is_zero() {
        eprintln!("kernel KSM, defaults (cap {}s)...", defaults_cap.as_secs());
        Some(run_ksm(&lay, attainable, "100", "20", defaults_cap))
    } else {
        None
    };
    let ksm_max = if have_ksm {
        eprintln!("kernel KSM, max rate...");
        Some(run_ksm(&lay, attainable, "10000", "0", cap))
    } else {
        eprintln!("kernel KSM not available: comparison skipped");
        None
    };
    let all_threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = env("VS_KSM_THREADS", all_threads as u64) as usize;
    eprintln!("vm-dedup ({threads} threads)...");
    let Ours {
        run: ours,
        at95,
        end: stats,
    } = run_ours(&lay, attainable, cap, threads);
    eprintln!("scan throughput...");
    let one = scan_pass_secs(scan_mib, 1);
    let all = scan_pass_secs(scan_mib, threads);
    let gb = (scan_mib << 20) as f64 / 1e9;

    println!();
    println!("| mode                   | time to 95%  | CPU to 95% | final     | pages saved |");
    println!("|------------------------|--------------|-----------|-----------|------------|");
    if let Some(r) = &ksm_default {
        show("kernel KSM defaults", r, attainable);
    }
    if let Some(r) = &ksm_max {
        show("kernel KSM max rate", r, attainable);
    }
    show(&format!("vm-dedup ({threads} threads)"), &ours, attainable);
    println!();
    println!(
        "vm-dedup: {} merges, {} remaps refused, metadata {:.1} bytes per guest page, \
         {} VMAs in guest memory",
        stats.merges,
        stats.failures.total(),
        stats.metadata_bytes as f64 / total as f64,
        stats.vmas_used
    );
    if let Some(s) = &at95 {
        show_phases(s, threads);
    }
    println!(
        "scan (first pass, hashing) over {scan_mib} MiB: 1 thread {:.2} GB/s; {threads} threads \
         {:.2} GB/s ({:.2} GB/s per thread)",
        gb / one,
        gb / all,
        gb / all / threads as f64
    );
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "nan".to_string(),
    };
    let km = ksm_max.unwrap_or_default();
    println!(
        "RESULT speedup_vs_ksm_max={} cpu_ratio={} savings_ratio={} scan_gbps_per_core={:.2}",
        ratio(km.t95, ours.t95),
        ratio(ours.cpu95, km.cpu95),
        ratio(Some(ours.saved as f64), ksm_max.map(|k| k.saved as f64)),
        gb / one
    );
}
