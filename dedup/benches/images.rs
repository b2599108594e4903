//! The engine on the composed guest images of the density benchmark (real Debian package files
//! at different page offsets, 10% zero and 10% unique pages; `guest-images/out/compose-4x512M`):
//! each image is loaded into its own guest memory the way the VMM loads `--mem-image` (all-zero
//! pages skipped, so they are never present), the background scanner runs with the fastest
//! settings until it converges, then keeps running on idle guests for a while. Reports the time
//! and CPU to 95% of the attainable savings (every non-zero page whose content another page
//! also holds, minus one copy per content) with the wall time of each phase by then (where a
//! many-core host spends it), the savings reached, merges, attempts and
//! refusals, full scans, the VMAs inside guest memory and how they are made up, and what the
//! idle passes cost. Then what any merger that shares pages by remapping them needs for these
//! images: the fewest file mappings with one pool copy per content (and how few of them hold
//! 95% of the merged pages), and what one remap costs, alone and while a thread of the process
//! runs on every other CPU (as the engine's workers do: each remap's TLB flush reaches them).
//! The kernel takes the address space's write lock for each, so their sum is a floor on the
//! time to merge, however many threads the engine runs.
//!
//! Environment: `IMAGES_DIR` (the compose directory, default
//! `guest-images/out/compose-4x512M` of the workspace), `IMAGES_OPTIONS` (engine knobs,
//! `name=value,...`, after `pages_to_scan=65536,sleep_millisecs=0`), `IMAGES_THREADS` (engine
//! threads, default all cores), `IMAGES_SECS` (time cap to converge, 120), `IMAGES_IDLE_SECS`
//! (how long to watch the idle engine, 5), `IMAGES_DIRTY` (1: the guests have a dirty-page
//! source that reports no write, as KVM's dirty log does for idle guests; 0: none, so every
//! pass hashes every page).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_dedup::{Config, DirtySource, Engine, GuestConfig, Stats};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const PAGE: usize = 4096;

type Mem = GuestMemoryMmap<()>;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Idle guests under KVM's dirty log: nothing written since the last look.
struct NothingWritten;

impl DirtySource for NothingWritten {
    fn take_dirty(&self, _: usize, _: GuestAddress, _: usize, _: &mut [u64]) -> bool {
        true
    }
}

/// Loads an image into fresh guest memory, skipping all-zero pages.
fn load(path: &std::path::Path) -> (Arc<Mem>, Vec<u8>) {
    let data = std::fs::read(path).unwrap();
    let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), data.len())]).unwrap();
    let r = m.iter().next().unwrap();
    // SAFETY: the region is ours and as long as the image.
    let dst = unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), data.len()) };
    for (d, s) in dst.chunks_exact_mut(PAGE).zip(data.chunks_exact(PAGE)) {
        if s.iter().any(|&b| b != 0) {
            d.copy_from_slice(s);
        }
    }
    (Arc::new(m), data)
}

/// Non-zero pages, and the savings a complete merge of them reaches (pages minus distinct
/// contents).
fn attainable(images: &[Vec<u8>]) -> (u64, u64) {
    let mut seen: HashMap<u128, ()> = HashMap::new();
    let mut nonzero = 0u64;
    for img in images {
        for p in img.chunks_exact(PAGE) {
            if p.iter().any(|&b| b != 0) {
                nonzero += 1;
                seen.insert(xxhash_rust::xxh3::xxh3_128(p), ());
            }
        }
    }
    (nonzero, nonzero - seen.len() as u64)
}

/// What the VMAs inside `ranges` are made of.
#[derive(Debug, Default)]
struct VmaShape {
    file: u64,
    anon: u64,
    /// File VMAs directly followed by another file VMA: a boundary between two remapped runs
    /// whose slots are not consecutive.
    file_file: u64,
    /// ... of which the next one continues the same file at the next offset (could be one).
    file_file_contiguous: u64,
    /// File VMAs of 1, 2-3, 4-15, 16-63, 64+ pages.
    lengths: [u64; 5],
}

fn vma_shape(ranges: &[(usize, usize)]) -> VmaShape {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mut out = VmaShape::default();
    let mut prev: Option<(usize, bool, u64)> = None;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(_), Some(off), Some(_), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            usize::from_str_radix(a, 16).unwrap(),
            usize::from_str_radix(b, 16).unwrap(),
        );
        if !ranges.iter().any(|&(s, e)| a >= s && a < e) {
            prev = None;
            continue;
        }
        let off = u64::from_str_radix(off, 16).unwrap();
        let file = inode != "0";
        if file {
            out.file += 1;
            let pages = (b - a) / PAGE;
            let k = match pages {
                1 => 0,
                2..=3 => 1,
                4..=15 => 2,
                16..=63 => 3,
                _ => 4,
            };
            out.lengths[k] += 1;
            if let Some((end, true, next_off)) = prev {
                if end == a {
                    out.file_file += 1;
                    if next_off == off {
                        out.file_file_contiguous += 1;
                    }
                }
            }
        } else {
            out.anon += 1;
        }
        prev = Some((b, file, off + (b - a) as u64));
    }
    out
}

fn engine_config(threads: usize) -> Config {
    let mut c = Config::default();
    c.apply_options(&format!(
        "pages_to_scan=65536,sleep_millisecs=0,threads={threads}"
    ))
    .unwrap();
    if let Ok(extra) = std::env::var("IMAGES_OPTIONS") {
        c.apply_options(&extra).unwrap();
    }
    c
}

fn line(what: &str, s: &Stats) {
    println!(
        "{what}: saved {} pages ({:.0} MiB), {} merges of {} attempts, refused {} (budget {}, \
         VMA limit {}, differed {}), {} full scans, {} VMAs of a budget of {} (reached: {}), \
         engine CPU {:.2} s",
        s.bytes_saved / PAGE as u64,
        s.bytes_saved as f64 / (1 << 20) as f64,
        s.merges,
        s.merge_attempts,
        s.failures.total(),
        s.failures.vma_budget,
        s.failures.vma_limit,
        s.failures.differed,
        s.full_scans,
        s.vmas_used,
        s.vma_budget,
        s.vma_budget_reached,
        s.cpu_ns as f64 / 1e9,
    );
}

fn main() {
    let dir = std::env::var("IMAGES_DIR").map_or_else(
        |_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../guest-images/out/compose-4x512M"),
        PathBuf::from,
    );
    let cap = Duration::from_secs(env("IMAGES_SECS", 120));
    let idle = Duration::from_secs(env("IMAGES_IDLE_SECS", 5));
    let dirty = env("IMAGES_DIRTY", 1) != 0;
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = env("IMAGES_THREADS", all as u64) as usize;
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "img"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no images in {}", dir.display());
    let loaded: Vec<(Arc<Mem>, Vec<u8>)> = paths.iter().map(|p| load(p)).collect();
    let images: Vec<Vec<u8>> = loaded.iter().map(|(_, d)| d.clone()).collect();
    let (nonzero, target) = attainable(&images);
    println!(
        "images: {} x {} MiB from {}; {nonzero} non-zero pages, attainable savings {target} pages \
         ({:.0} MiB); engine: {threads} threads, dirty source: {dirty}, options {:?}",
        paths.len(),
        images[0].len() >> 20,
        dir.display(),
        (target * PAGE as u64) as f64 / (1 << 20) as f64,
        std::env::var("IMAGES_OPTIONS").unwrap_or_default(),
    );

    let engine = Engine::new(engine_config(threads)).unwrap();
    let ranges: Vec<(usize, usize)> = loaded
        .iter()
        .map(|(m, _)| {
            let r = m.iter().next().unwrap();
            (r.as_ptr() as usize, r.as_ptr() as usize + r.len() as usize)
        })
        .collect();
    for (i, (m, _)) in loaded.iter().enumerate() {
        let mut g = GuestConfig::new(format!("g{i}"), "bench");
        if dirty {
            g = g.with_dirty_source(Arc::new(NothingWritten));
        }
        engine.register(g, m.clone()).unwrap();
    }
    let t0 = Instant::now();
    let cpu0 = Engine::process_cpu_ns();
    let scanner = engine.start().unwrap();
    let mut t95 = None;
    let mut last = (0u64, Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(5));
        let s = engine.stats();
        let saved = s.bytes_saved / PAGE as u64;
        if t95.is_none() && saved >= target * 95 / 100 {
            t95 = Some((
                t0.elapsed().as_secs_f64(),
                (Engine::process_cpu_ns() - cpu0) as f64 / 1e9,
                s.clone(),
            ));
        }
        if saved != last.0 {
            last = (saved, Instant::now());
        }
        // Converged: no more savings for a second and four passes.
        if last.1.elapsed() > Duration::from_secs(1) && s.full_scans >= 4 || t0.elapsed() > cap {
            break;
        }
    }
    let conv = engine.stats();
    let t_conv = t0.elapsed().as_secs_f64();
    let cpu_conv = (Engine::process_cpu_ns() - cpu0) as f64 / 1e9;
    std::thread::sleep(idle);
    let end = engine.stats();
    let cpu_end = (Engine::process_cpu_ns() - cpu0) as f64 / 1e9;
    scanner.stop();

    match t95 {
        Some((t, c, s)) => {
            let ms = |ns: u64| ns as f64 / 1e6;
            let p = &s.phases;
            println!(
                "95% of attainable in {t:.2} s, {c:.2} CPU-s: {} full scans, {} merges; wall ms \
                 per phase: scan {:.0}, plan {:.0}, commit {:.0}, account {:.0}; filling pool \
                 slots {:.0} ms summed over the workers",
                s.full_scans,
                s.merges,
                ms(p.scan_ns),
                ms(p.plan_ns),
                ms(p.commit_ns),
                ms(p.account_ns),
                ms(p.fill_ns),
            );
        }
        None => println!("95% of attainable not reached"),
    }
    line(
        &format!("converged after {t_conv:.2} s, {cpu_conv:.2} CPU-s"),
        &conv,
    );
    line(&format!("after {} s idle", idle.as_secs()), &end);
    let passes = end.full_scans - conv.full_scans;
    let idle_cpu = cpu_end - cpu_conv;
    println!(
        "idle: {passes} passes in {:.1} s, {:.2} CPU-s ({:.2} ms per pass), {} attempts, {} \
         refusals, {} merges",
        idle.as_secs_f64(),
        idle_cpu,
        if passes > 0 {
            idle_cpu * 1e3 / passes as f64
        } else {
            0.0
        },
        end.merge_attempts - conv.merge_attempts,
        end.failures.total() - conv.failures.total(),
        end.merges - conv.merges,
    );
    let shape = vma_shape(&ranges);
    println!(
        "VMAs in guest memory: {} file, {} anonymous; file VMAs followed directly by another: {} \
         ({} continuing its offsets); file VMA lengths 1 / 2-3 / 4-15 / 16-63 / 64+ pages: {:?}",
        shape.file, shape.anon, shape.file_file, shape.file_file_contiguous, shape.lengths
    );
    let saved_pct = 100.0 * (end.bytes_saved / PAGE as u64) as f64 / target as f64;
    println!(
        "RESULT saved_pages={} attainable={target} saved_pct={saved_pct:.1} vmas={} \
         idle_ms_per_pass={:.2}",
        end.bytes_saved / PAGE as u64,
        end.vmas_used,
        if passes > 0 {
            idle_cpu * 1e3 / passes as f64
        } else {
            0.0
        }
    );
    // Content check: every page still holds its image's bytes.
    for (m, data) in &loaded {
        let r = m.iter().next().unwrap();
        // SAFETY: our own mapping; the scanner has stopped.
        let got = unsafe { std::slice::from_raw_parts(r.as_ptr(), data.len()) };
        assert!(got == data.as_slice(), "content changed by merging");
    }
    println!("content checked: every page unchanged");

    // What any merger that remaps pages needs for these images, and what remapping costs.
    let floor = layout_floor(&images);
    let us = remap_cost(4096, 0);
    let others = all.saturating_sub(1);
    let busy_us = remap_cost(4096, others);
    println!(
        "mappings the merged pages need with one pool copy per content: {} with the best slot \
         order found ({} in order of first occurrence; the engine made {} file VMAs), the \
         longest {} of them hold 95% of the pages. One remap: {us:.1} us on one thread: {:.2} \
         s for all, {:.2} s for 95%, one after the other however many threads run them; \
         {busy_us:.1} us while {others} other thread(s) of the process run (each remap's TLB \
         flush reaches their CPUs, as with the engine's other workers): {:.2} s and {:.2} s",
        floor.best,
        floor.first_occurrence,
        shape.file,
        floor.best_for_95,
        floor.best as f64 * us / 1e6,
        floor.best_for_95 as f64 * us / 1e6,
        floor.best as f64 * busy_us / 1e6,
        floor.best_for_95 as f64 * busy_us / 1e6,
    );
    println!(
        "RESULT floor_mappings={} floor_mappings_95={} remap_us={us:.2} remap_busy_us={busy_us:.2} \
         busy_threads={others}",
        floor.best, floor.best_for_95
    );
}

/// How many file mappings the images' merged pages need at least, with one pool copy of each
/// content: a mapping covers a run of guest pages whose slots are consecutive, so the count
/// depends only on the order of the slots. Returns the count with slots in order of first
/// occurrence (address order, guest 0 first) and with the best order a greedy maximum-weight
/// path cover finds (consecutive slots for the content pairs that sit side by side most often).
fn layout_floor(images: &[Vec<u8>]) -> LayoutFloor {
    // Content of every page: `None` for zero pages and pages no other page shares.
    let mut count: HashMap<u128, u32> = HashMap::new();
    let hashes: Vec<Vec<Option<u128>>> = images
        .iter()
        .map(|img| {
            img.chunks_exact(PAGE)
                .map(|p| {
                    p.iter().any(|&b| b != 0).then(|| {
                        let h = xxhash_rust::xxh3::xxh3_128(p);
                        *count.entry(h).or_insert(0) += 1;
                        h
                    })
                })
                .collect()
        })
        .collect();
    let mut id: HashMap<u128, u32> = HashMap::new();
    let seqs: Vec<Vec<Option<u32>>> = hashes
        .iter()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    let h = (*h)?;
                    (count[&h] > 1).then(|| {
                        let next = id.len() as u32;
                        *id.entry(h).or_insert(next)
                    })
                })
                .collect()
        })
        .collect();
    let n = id.len();
    // Pages of each mapping.
    let mappings = |pos: &[u32]| -> Vec<u32> {
        let mut lengths = Vec::new();
        for seq in &seqs {
            let mut prev: Option<u32> = None;
            for &c in seq {
                let p = c.map(|c| pos[c as usize]);
                if let Some(p) = p {
                    if prev.is_none_or(|q| q + 1 != p) {
                        lengths.push(0);
                    }
                    if let Some(l) = lengths.last_mut() {
                        *l += 1;
                    }
                }
                prev = p;
            }
        }
        lengths
    };
    let first: Vec<u32> = (0..n as u32).collect();
    // Pairs of contents side by side, by how often.
    let mut pairs: HashMap<(u32, u32), u32> = HashMap::new();
    for seq in &seqs {
        for w in seq.windows(2) {
            if let [Some(a), Some(b)] = *w {
                if a != b {
                    *pairs.entry((a, b)).or_insert(0) += 1;
                }
            }
        }
    }
    let mut pairs: Vec<((u32, u32), u32)> = pairs.into_iter().collect();
    pairs.sort_unstable_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
    let (mut next, mut prev) = (vec![u32::MAX; n], vec![u32::MAX; n]);
    // Union-find over path members, so that no pair closes a cycle.
    let mut root: Vec<u32> = (0..n as u32).collect();
    fn find(root: &mut [u32], mut x: u32) -> u32 {
        while root[x as usize] != x {
            root[x as usize] = root[root[x as usize] as usize];
            x = root[x as usize];
        }
        x
    }
    for ((a, b), _) in pairs {
        if next[a as usize] != u32::MAX || prev[b as usize] != u32::MAX {
            continue;
        }
        let (ra, rb) = (find(&mut root, a), find(&mut root, b));
        if ra == rb {
            continue;
        }
        next[a as usize] = b;
        prev[b as usize] = a;
        root[rb as usize] = ra;
    }
    let mut best = vec![0u32; n];
    let mut at = 0u32;
    for start in (0..n).filter(|&c| prev[c] == u32::MAX) {
        let mut c = start as u32;
        loop {
            best[c as usize] = at;
            at += 1;
            c = next[c as usize];
            if c == u32::MAX {
                break;
            }
        }
    }
    let mut best = mappings(&best);
    // Longest first: how few of them hold 95% of the merged pages.
    best.sort_unstable_by(|a, b| b.cmp(a));
    let pages: u64 = best.iter().map(|&l| u64::from(l)).sum();
    let mut held = 0u64;
    let for_95 = best
        .iter()
        .take_while(|&&l| {
            let short = held * 100 < pages * 95;
            held += u64::from(l);
            short
        })
        .count() as u64;
    LayoutFloor {
        first_occurrence: mappings(&first).len() as u64,
        best: best.len() as u64,
        best_for_95: for_95,
    }
}

/// File mappings the merged pages of the images need (see [`layout_floor`]).
struct LayoutFloor {
    /// With slots in order of first occurrence.
    first_occurrence: u64,
    /// With the best slot order found.
    best: u64,
    /// The fewest of those that hold 95% of the merged pages (the longest).
    best_for_95: u64,
}

/// Microseconds one remap of a page of populated anonymous memory onto a file page takes
/// (`mmap` with `MAP_FIXED`, as the engine merges), over `n` remaps of every other page onto
/// scattered file offsets, made by one thread while `others` other threads of the process spin
/// (0: alone). The kernel holds the address space's write lock through each, so remaps of one
/// process never overlap; and each flushes the TLB of every CPU that runs a thread of the
/// process.
fn remap_cost(n: usize, others: usize) -> f64 {
    use std::sync::atomic::{AtomicBool, Ordering};
    use vm_dedup::sys::mem;
    let fd = mem::memfd_create(c"remap-cost").unwrap();
    mem::set_len(fd.as_fd(), (n * PAGE) as u64).unwrap();
    for k in 0..n {
        mem::write_at(fd.as_fd(), &[1u8; PAGE], (k * PAGE) as u64).unwrap();
    }
    let area = mem::Scratch::new(2 * n * PAGE).unwrap();
    mem::populate_write(area.addr(), area.len()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Timing starts once every spinner runs.
    let running = Arc::new(std::sync::Barrier::new(others + 1));
    let spinners: Vec<_> = (0..others)
        .map(|_| {
            let (stop, running) = (Arc::clone(&stop), Arc::clone(&running));
            std::thread::spawn(move || {
                running.wait();
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    running.wait();
    let t = Instant::now();
    for k in 0..n {
        let offset = ((k * 7919) % n * PAGE) as u64;
        // SAFETY: the page is ours (the scratch mapping above, unmapped on drop) and nothing
        // reads it.
        unsafe { mem::map_private_fixed(area.addr() + 2 * k * PAGE, PAGE, fd.as_fd(), offset) }
            .unwrap();
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    stop.store(true, Ordering::Relaxed);
    for s in spinners {
        s.join().unwrap();
    }
    us
}
