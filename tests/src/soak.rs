//! The soak: several guest memories registered with one engine that merges at full rate (its
//! background scanner with `sleep_millisecs=0`), while host writer threads rewrite their pages
//! with sequence numbers for a set time. Run for a few seconds by `tests/tests/soak.rs` and for
//! as long as asked by `cargo bench -p vmm-benches --bench soak`.
//!
//! Every guest holds the same page contents (a few templates), so nearly everything merges,
//! across guests too. Each page has one writer, which owns the page's first word: half of its
//! writes put back the template's 0 (the page can merge again), half write the writer's next
//! sequence number (the page becomes unique, or breaks copy-on-write if merged). Writers pace
//! themselves so that each page is written every `write_interval` on average: pages stay still
//! long enough to merge, and writes keep landing on pages being merged. A lost write shows up
//! three ways, all counted:
//!
//! - during the run: before each write the writer reads the word back, and it must still hold
//!   the writer's previous write;
//! - at the end: every page of every guest must be its template with the writer's last word;
//! - after unmerging everything: the same again.
//!
//! Writer stalls: every write is timed; writes that took more than [`SLOW_NS`] went through
//! the kernel. A write blocked by the merge sleeps there: on the write-protect guard
//! (userfaultfd; the engine counts those as `guarded_writes`), or on the process's memory-map
//! lock or the page while the engine remaps. Sleeping counts a *voluntary* context switch for
//! the thread (`getrusage(RUSAGE_THREAD)`), while a copy-on-write break does not sleep and a
//! preemption is an involuntary switch: so each slow write is read against the thread's
//! voluntary switches and kept in one of two histograms, the stalls (writes that slept) and
//! the other slow writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use vm_dedup::{Config, Engine, GuestConfig, Stats};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::probe::pattern;

/// Bytes in a page.
const PAGE: usize = 4096;

/// Writes that took longer than this (in nanoseconds) went through the kernel.
pub const SLOW_NS: u64 = 1_000;

/// What to soak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SoakConfig {
    /// Guest memories.
    pub guests: usize,
    /// Pages per guest.
    pub pages: usize,
    /// Writer threads per guest.
    pub writers: usize,
    /// Distinct page contents (the same in every guest).
    pub templates: usize,
    /// How long the writers write (at least; see `goal`).
    pub duration: Duration,
    /// Mean time between two writes to one page.
    pub write_interval: Duration,
    /// The engine's `batch_pages`.
    pub batch_pages: usize,
    /// The engine's threads (0: one per CPU).
    pub threads: usize,
    /// The engine's `commit_threads` (0: half the threads, at least one).
    pub commit_threads: usize,
    /// What the soak must have seen before it stops: it goes on past `duration` until then,
    /// for at most [`GOAL_OVERRUN`] times `duration` (`None`: it stops after `duration`).
    pub goal: Option<Goal>,
}

/// How many times its `duration` a soak may run to reach its [`Goal`].
pub const GOAL_OVERRUN: u32 = 20;

/// Counts a soak must reach, whatever the machine's speed, to have soaked: writes, merges,
/// writes that broke a merge, writes that hit the write-protect guard, and full passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Goal {
    /// Writes by the writers.
    pub writes: u64,
    /// The engine's merges.
    pub merges: u64,
    /// Copy-on-write breaks.
    pub cow_breaks: u64,
    /// Writes that found their page guarded.
    pub guarded_writes: u64,
    /// Full scans.
    pub full_scans: u64,
}

impl Goal {
    /// Whether `writes` and `stats` reach every count of the goal.
    pub fn met(&self, writes: u64, stats: &Stats) -> bool {
        writes >= self.writes
            && stats.merges >= self.merges
            && stats.cow_breaks >= self.cow_breaks
            && stats.guarded_writes >= self.guarded_writes
            && stats.full_scans >= self.full_scans
    }
}

impl Default for SoakConfig {
    fn default() -> Self {
        Self {
            guests: 4,
            pages: 4 * 1024,
            writers: 1,
            templates: 64,
            duration: Duration::from_secs(60),
            write_interval: Duration::from_millis(500),
            batch_pages: 64,
            threads: 0,
            commit_threads: 0,
            goal: None,
        }
    }
}

/// Sub-buckets per power of two in a [`Histogram`] (about 6% resolution).
const SUB: u64 = 16;

/// A log-linear histogram of durations in nanoseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; (64 * SUB) as usize],
            count: 0,
            max: 0,
        }
    }
}

impl Histogram {
    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let octave = 63 - u64::from(v.leading_zeros());
        let shift = octave - 4;
        ((octave - 3) * SUB + ((v >> shift) & (SUB - 1))) as usize
    }

    /// The middle of bucket `i`.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let octave = i / SUB + 3;
        let shift = octave - 4;
        let low = (SUB + i % SUB) << shift;
        low + (1 << shift) / 2
    }

    /// Counts one duration.
    pub fn record(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
        self.count += 1;
        self.max = self.max.max(ns);
    }

    /// Adds `other`'s counts.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.count += other.count;
        self.max = self.max.max(other.max);
    }

    /// Durations counted.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The longest duration (exact).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The duration at 1-based `rank` in ascending order (within a bucket's resolution).
    fn at_rank(&self, rank: u64) -> Option<u64> {
        if rank == 0 || rank > self.count {
            return None;
        }
        if rank == self.count {
            return Some(self.max);
        }
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Self::value(i).min(self.max));
            }
        }
        None
    }

    /// The `q` quantile (0 to 1) of all durations.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        self.top_quantile(self.count, q)
    }

    /// The `q` quantile of the `n` longest durations.
    pub fn top_quantile(&self, n: u64, q: f64) -> Option<u64> {
        let n = n.min(self.count);
        let within = ((q * n as f64).ceil() as u64).clamp(1, n.max(1));
        self.at_rank(self.count - n + within)
    }
}

/// p50, p99 and max of some durations, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Longest.
    pub max: u64,
}

/// What a soak found.
#[derive(Debug, Clone)]
pub struct SoakReport {
    /// What was soaked.
    pub config: SoakConfig,
    /// How long the writers wrote.
    pub elapsed: Duration,
    /// Writes done.
    pub writes: u64,
    /// Writes that found the page's first word not holding their writer's previous write.
    pub lost_during: u64,
    /// Pages not holding their template and their writer's last write at the end.
    pub lost_at_end: u64,
    /// The same after unmerging everything.
    pub lost_after_unmerge: u64,
    /// Pages checked at the end (each time).
    pub pages_checked: u64,
    /// The engine's statistics at the end, before unmerging.
    pub stats: Stats,
    /// Writes that went through the kernel (longer than [`SLOW_NS`]) without sleeping there:
    /// copy-on-write breaks, or writes slowed by preemption.
    pub slow: Histogram,
    /// Writes that slept in the kernel: waits on the merge guard, or on the memory-map lock or
    /// the page while the engine remapped.
    pub stalled: Histogram,
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn percentiles(h: &Histogram) -> Option<Percentiles> {
    Some(Percentiles {
        p50: h.quantile(0.5)?,
        p99: h.quantile(0.99)?,
        max: h.max(),
    })
}

impl SoakReport {
    /// Every lost write found.
    pub fn lost_writes(&self) -> u64 {
        self.lost_during + self.lost_at_end + self.lost_after_unmerge
    }

    /// Percentiles of the writes that went through the kernel without sleeping.
    pub fn slow_writes(&self) -> Option<Percentiles> {
        percentiles(&self.slow)
    }

    /// Percentiles of the writer stalls (writes that slept in the kernel).
    pub fn stalls(&self) -> Option<Percentiles> {
        percentiles(&self.stalled)
    }

    /// The report as a few lines of text.
    pub fn text(&self) -> String {
        let c = &self.config;
        let s = &self.stats;
        let p = |x: Option<Percentiles>| {
            x.map_or("none".into(), |p| {
                format!(
                    "p50 {:.1} us, p99 {:.1} us, max {:.1} us",
                    us(p.p50),
                    us(p.p99),
                    us(p.max)
                )
            })
        };
        format!(
            "soak: {} guests x {} pages, {} writer(s) each, {:.1} s\n\
             writes: {} ({} through the kernel without sleeping: {})\n\
             engine: {} merge attempts, {} merges, {} copy-on-write breaks, {} full passes, \
             {} guarded writes, {} merges refused ({:?})\n\
             writer stalls ({} writes slept in the kernel): {}\n\
             lost writes: {} (during {}, at the end {}, after unmerging {}; {} pages checked \
             twice)",
            c.guests,
            c.pages,
            c.writers,
            self.elapsed.as_secs_f64(),
            self.writes,
            self.slow.count(),
            p(self.slow_writes()),
            s.merge_attempts,
            s.merges,
            s.cow_breaks,
            s.full_scans,
            s.guarded_writes,
            s.failures.total(),
            s.failures,
            self.stalled.count(),
            p(self.stalls()),
            self.lost_writes(),
            self.lost_during,
            self.lost_at_end,
            self.lost_after_unmerge,
            self.pages_checked,
        )
    }

    /// One line of `key=value` figures, starting with `RESULT soak`.
    pub fn result_line(&self) -> String {
        let s = &self.stats;
        let f = |x: Option<Percentiles>, name: &str| {
            x.map_or(String::new(), |p| {
                format!(
                    " {name}_p50_us={:.1} {name}_p99_us={:.1} {name}_max_us={:.1}",
                    us(p.p50),
                    us(p.p99),
                    us(p.max)
                )
            })
        };
        format!(
            "RESULT soak duration_s={:.1} guests={} pages={} writers={} writes={} \
             merge_attempts={} merges={} cow_breaks={} guarded_writes={} stalls={} \
             lost_writes={}{}{}",
            self.elapsed.as_secs_f64(),
            self.config.guests,
            self.config.guests * self.config.pages,
            self.config.guests * self.config.writers,
            self.writes,
            s.merge_attempts,
            s.merges,
            s.cow_breaks,
            s.guarded_writes,
            self.stalled.count(),
            self.lost_writes(),
            f(self.stalls(), "stall"),
            f(self.slow_writes(), "slow_write"),
        )
    }
}

/// One guest memory and where its pages are.
struct Guest {
    memory: Arc<GuestMemoryMmap<()>>,
    base: usize,
}

impl Guest {
    fn new(pages: usize) -> Self {
        let memory = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), pages * PAGE)])
                .unwrap_or_else(|e| panic!("cannot map {pages} pages of guest memory: {e}")),
        );
        let base = memory
            .iter()
            .next()
            .map(|r| r.as_ptr() as usize)
            .unwrap_or_else(|| panic!("guest memory without a region"));
        Self { memory, base }
    }

    fn page(&self, p: usize) -> usize {
        self.base + p * PAGE
    }
}

/// The first word of a page.
fn word(addr: usize) -> u64 {
    // SAFETY: `addr` is a page of a guest memory the soak keeps mapped; the word is aligned.
    unsafe { (addr as *const u64).read_volatile() }
}

/// A writer's result: its pages' last words, writes, immediate losses and slow writes.
struct Written {
    pages: Vec<(usize, usize, u64)>,
    writes: u64,
    lost: u64,
    slow: Histogram,
    stalled: Histogram,
}

/// Voluntary context switches of the calling thread so far.
fn voluntary_switches() -> u64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into `usage`, which lives across the call.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
        return 0;
    }
    usage.ru_nvcsw as u64
}

fn writer(
    id: u64,
    pages: Vec<(usize, usize)>,
    interval: Duration,
    stop: Arc<AtomicBool>,
    writes_so_far: Arc<AtomicU64>,
) -> Written {
    // One write every `interval / pages` on average.
    let every = interval.as_secs_f64() / pages.len().max(1) as f64;
    let start = Instant::now();
    let mut last = vec![0u64; pages.len()];
    let (mut slow, mut stalled) = (Histogram::default(), Histogram::default());
    let (mut writes, mut lost, mut seq) = (0u64, 0u64, 0u64);
    let mut slept = voluntary_switches();
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ id.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    while !stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = (x % pages.len() as u64) as usize;
        let addr = pages[i].1;
        if word(addr) != last[i] {
            lost += 1;
        }
        let value = if x & (1 << 40) == 0 {
            0
        } else {
            seq += 1;
            (id << 48) | seq
        };
        let t = Instant::now();
        // SAFETY: the page belongs to this writer alone and stays mapped while it runs.
        unsafe { (addr as *mut u64).write_volatile(value) };
        let ns = t.elapsed().as_nanos() as u64;
        if ns > SLOW_NS {
            let now = voluntary_switches();
            if now > slept {
                stalled.record(ns);
            } else {
                slow.record(ns);
            }
            slept = now;
        }
        last[i] = value;
        writes += 1;
        if writes % 64 == 0 {
            writes_so_far.fetch_add(64, Ordering::Relaxed);
            let due = start + Duration::from_secs_f64(every * writes as f64);
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
                slept = voluntary_switches();
            }
        }
    }
    Written {
        pages: pages
            .iter()
            .zip(&last)
            .map(|(&(k, a), &l)| (k, a, l))
            .collect(),
        writes,
        lost,
        slow,
        stalled,
    }
}

/// Pages whose content is not `templates[page % n]` with `last` as the first word.
fn check(guests: &[Guest], templates: &[Vec<u8>], last: &[u64], pages: usize) -> u64 {
    let mut bad = 0;
    for (g, guest) in guests.iter().enumerate() {
        for p in 0..pages {
            // SAFETY: a page of a guest memory the soak keeps mapped; nobody writes it now.
            let bytes = unsafe { std::slice::from_raw_parts(guest.page(p) as *const u8, PAGE) };
            let t = &templates[p % templates.len()];
            let first = u64::from_ne_bytes(bytes[..8].try_into().unwrap_or_default());
            if first != last[g * pages + p] || bytes[8..] != t[8..] {
                bad += 1;
            }
        }
    }
    bad
}

/// Progress while the soak runs.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Time since the writers started.
    pub elapsed: Duration,
    /// Writes so far (to within 64 per writer).
    pub writes: u64,
    /// The engine's statistics now.
    pub stats: Stats,
}

/// The engine's configuration for `config`: full rate, with its batch and thread knobs (an
/// error names a knob out of range).
pub fn engine_config(config: &SoakConfig) -> Result<Config, vm_dedup::ConfigError> {
    let mut engine_config = Config::default();
    engine_config.apply_options(&format!(
        "pages_to_scan=65536,sleep_millisecs=0,batch_pages={},threads={},commit_threads={}",
        config.batch_pages, config.threads, config.commit_threads
    ))?;
    Ok(engine_config)
}

/// Runs a soak, calling `progress` about every `every`.
///
/// # Panics
/// When guest memory cannot be mapped, the knobs are out of range ([`engine_config`]), or the
/// engine cannot be created, started or asked to unmerge.
pub fn run(
    config: &SoakConfig,
    every: Duration,
    mut progress: impl FnMut(&Progress),
) -> SoakReport {
    let c = config;
    let templates: Vec<Vec<u8>> = (0..c.templates.max(1))
        .map(|t| {
            let mut page = pattern(0x50a4 + t as u64, PAGE);
            page[..8].fill(0);
            page
        })
        .collect();
    let guests: Vec<Guest> = (0..c.guests).map(|_| Guest::new(c.pages)).collect();
    for guest in &guests {
        for p in 0..c.pages {
            let t = &templates[p % templates.len()];
            // SAFETY: a page of guest memory just mapped, not yet shared with anyone.
            unsafe { std::ptr::copy_nonoverlapping(t.as_ptr(), guest.page(p) as *mut u8, PAGE) };
        }
    }
    let engine_config = engine_config(c).unwrap_or_else(|e| panic!("soak engine knobs: {e}"));
    let engine = Engine::new(engine_config).unwrap_or_else(|e| panic!("soak engine: {e}"));
    let ids: Vec<_> = guests
        .iter()
        .enumerate()
        .map(|(g, guest)| {
            engine
                .register(
                    GuestConfig::new(format!("soak{g}"), "soak"),
                    guest.memory.clone(),
                )
                .unwrap_or_else(|e| panic!("registering soak guest {g}: {e}"))
        })
        .collect();
    let scanner = engine
        .start()
        .unwrap_or_else(|e| panic!("starting the scanner: {e}"));

    let stop = Arc::new(AtomicBool::new(false));
    let writes_so_far = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..c.guests * c.writers)
        .map(|w| {
            let (g, k) = (w / c.writers, w % c.writers);
            let pages: Vec<(usize, usize)> = (k..c.pages)
                .step_by(c.writers)
                .map(|p| (g * c.pages + p, guests[g].page(p)))
                .collect();
            let (stop, so_far, interval) = (stop.clone(), writes_so_far.clone(), c.write_interval);
            thread::Builder::new()
                .name(format!("soak-writer-{w}"))
                .spawn(move || writer(w as u64 + 1, pages, interval, stop, so_far))
                .unwrap_or_else(|e| panic!("starting a writer: {e}"))
        })
        .collect();
    let cap = c.duration.saturating_mul(GOAL_OVERRUN);
    loop {
        let elapsed = start.elapsed();
        let end = if elapsed < c.duration {
            c.duration
        } else {
            cap
        };
        thread::sleep(every.min(end.saturating_sub(elapsed)));
        let p = Progress {
            elapsed: start.elapsed(),
            writes: writes_so_far.load(Ordering::Relaxed),
            stats: engine.stats(),
        };
        progress(&p);
        let goal_met = c.goal.is_none_or(|g| g.met(p.writes, &p.stats));
        if (p.elapsed >= c.duration && goal_met) || p.elapsed >= cap {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    let mut last = vec![0u64; c.guests * c.pages];
    let (mut writes, mut lost_during) = (0, 0);
    let (mut slow, mut stalled) = (Histogram::default(), Histogram::default());
    for t in threads {
        let w = t
            .join()
            .unwrap_or_else(|_| panic!("a soak writer panicked"));
        for (k, _, l) in w.pages {
            last[k] = l;
        }
        writes += w.writes;
        lost_during += w.lost;
        slow.merge(&w.slow);
        stalled.merge(&w.stalled);
    }
    scanner.stop();
    let stats = engine.stats();
    let lost_at_end = check(&guests, &templates, &last, c.pages);
    engine
        .unmerge_all()
        .unwrap_or_else(|e| panic!("unmerging after the soak: {e}"));
    let lost_after_unmerge = check(&guests, &templates, &last, c.pages);
    for id in ids {
        engine
            .unregister(id)
            .unwrap_or_else(|e| panic!("unregistering a soak guest: {e}"));
    }
    SoakReport {
        config: c.clone(),
        elapsed,
        writes,
        lost_during,
        lost_at_end,
        lost_after_unmerge,
        pages_checked: (c.guests * c.pages) as u64,
        stats,
        slow,
        stalled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_within_a_bucket() {
        let mut h = Histogram::default();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        assert_eq!(h.count(), 1000);
        assert_eq!(h.max(), 1_000_000);
        let p50 = h.quantile(0.5).unwrap() as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.07, "{p50}");
        let p99 = h.quantile(0.99).unwrap() as f64;
        assert!((p99 - 990_000.0).abs() / 990_000.0 < 0.07, "{p99}");
        // The 10 longest: 991..1000 us.
        let top = h.top_quantile(10, 0.5).unwrap() as f64;
        assert!((top - 995_000.0).abs() / 995_000.0 < 0.07, "{top}");
        assert_eq!(h.top_quantile(10, 1.0), Some(1_000_000));
        let mut other = Histogram::default();
        other.record(5);
        h.merge(&other);
        assert_eq!(h.quantile(0.0), Some(5));
        assert_eq!(Histogram::default().quantile(0.5), None);
        for v in [0u64, 15, 16, 17, 1 << 20, u64::MAX] {
            let i = Histogram::index(v);
            let mid = Histogram::value(i) as f64;
            assert!(v < 16 || (mid - v as f64).abs() / (v as f64) < 0.07, "{v}");
        }
    }
}
