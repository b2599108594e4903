//! Helpers shared by the engine's integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex, MutexGuard};

use vm_dedup::{Config, Engine, GuestConfig, GuestId};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

pub const PAGE: usize = 4096;

pub type Mem = GuestMemoryMmap<()>;

/// Serializes tests of one binary that measure the whole process (PSS, VMAs).
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Guest memory of `pages` pages at GPA 0, in one region.
pub fn memory(pages: usize) -> Arc<Mem> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), pages * PAGE)]).unwrap())
}

/// Guest memory in several regions of `pages` pages each, with a gap between them.
pub fn memory_regions(regions: usize, pages: usize) -> Arc<Mem> {
    let ranges: Vec<(GuestAddress, usize)> = (0..regions)
        .map(|i| (GuestAddress((i * (pages + 16) * PAGE) as u64), pages * PAGE))
        .collect();
    Arc::new(GuestMemoryMmap::from_ranges(&ranges).unwrap())
}

/// Host address of guest page `page` (counting pages across regions in order).
pub fn page_ptr(mem: &Mem, page: usize) -> *mut u8 {
    let mut left = page;
    for r in mem.iter() {
        let n = r.size() / PAGE;
        if left < n {
            // SAFETY: `left` pages into a region of more than `left` pages.
            return unsafe { r.as_ptr().add(left * PAGE) };
        }
        left -= n;
    }
    panic!("page {page} out of range");
}

/// GPA of guest page `page` (counting across regions).
pub fn page_gpa(mem: &Mem, page: usize) -> GuestAddress {
    let mut left = page;
    for r in mem.iter() {
        let n = r.size() / PAGE;
        if left < n {
            return GuestAddress(r.start_addr().0 + (left * PAGE) as u64);
        }
        left -= n;
    }
    panic!("page {page} out of range");
}

/// Total pages of a memory.
pub fn pages_of(mem: &Mem) -> usize {
    mem.iter().map(|r| r.size() / PAGE).sum()
}

/// Deterministic page content for `seed`; seed 0 is all zeros.
pub fn content(seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; PAGE];
    if seed == 0 {
        return out;
    }
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_ne_bytes());
    }
    out
}

/// Writes content `seed` into guest page `page`.
pub fn fill(mem: &Mem, page: usize, seed: u64) {
    let c = content(seed);
    // SAFETY: `page_ptr` is a whole page of the test's own guest memory.
    unsafe { std::ptr::copy_nonoverlapping(c.as_ptr(), page_ptr(mem, page), PAGE) };
}

/// Reads guest page `page`.
pub fn read(mem: &Mem, page: usize) -> Vec<u8> {
    let mut out = vec![0u8; PAGE];
    // SAFETY: `page_ptr` is a whole page of the test's own guest memory.
    unsafe { std::ptr::copy_nonoverlapping(page_ptr(mem, page), out.as_mut_ptr(), PAGE) };
    out
}

/// Checks that every page holds the content of its seed.
pub fn assert_contents(mem: &Mem, seeds: &[u64]) {
    for (p, &s) in seeds.iter().enumerate() {
        assert!(
            read(mem, p) == content(s),
            "page {p} lost its content (seed {s})"
        );
    }
}

/// Fills a memory with `seeds` (one per page).
pub fn fill_all(mem: &Mem, seeds: &[u64]) {
    for (p, &s) in seeds.iter().enumerate() {
        fill(mem, p, s);
    }
}

/// A config that scans everything at once with two threads.
pub fn fast_config() -> Config {
    let mut c = Config::default();
    // Both threads commit: the tests exercise concurrent commits on one userfaultfd (the
    // default commits on half the workers, one here).
    c.apply_options("pages_to_scan=65536,sleep_millisecs=0,threads=2,commit_threads=2")
        .unwrap();
    c
}

/// Registers `mem` in a fresh engine with `config`.
pub fn engine_with(config: Config, guests: &[(&str, &str, Arc<Mem>)]) -> (Engine, Vec<GuestId>) {
    let engine = Engine::new(config).unwrap();
    let ids = guests
        .iter()
        .map(|(name, domain, mem)| {
            engine
                .register(GuestConfig::new(*name, *domain), mem.clone())
                .unwrap()
        })
        .collect();
    (engine, ids)
}

/// `mems` registered in a fresh engine with [`fast_config`], as guests "a", "b", "c", ... of
/// one domain.
pub fn engine_of(mems: &[&Arc<Mem>]) -> (Engine, Vec<GuestId>) {
    let names: Vec<String> = (b'a'..=b'z').map(|c| char::from(c).to_string()).collect();
    let guests: Vec<(&str, &str, Arc<Mem>)> = mems
        .iter()
        .zip(&names)
        .map(|(m, n)| (n.as_str(), "d", Arc::clone(m)))
        .collect();
    engine_with(fast_config(), &guests)
}

/// Proportional set size of this process, in bytes.
pub fn pss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    for line in s.lines() {
        if let Some(rest) = line.strip_prefix("Pss:") {
            let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().unwrap();
            return kb * 1024;
        }
    }
    panic!("no Pss in smaps_rollup");
}

/// Host PFN of the page at `addr` (needs root; 0 otherwise).
pub fn pfn(addr: *const u8) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, (addr as u64 / PAGE as u64) * 8)
        .unwrap();
    let e = u64::from_ne_bytes(b);
    (e >> 63 == 1).then_some(e & ((1 << 55) - 1))
}

/// Whether pagemap shows real PFNs (needs CAP_SYS_ADMIN); prints a skip notice when not, or
/// panics when `VMM_REQUIRE_KVM` is `1` (CI, whose host shows them: the checks must run).
pub fn pfns_visible() -> bool {
    let v = vec![1u8; PAGE];
    let ok = pfn(v.as_ptr()).is_some_and(|p| p != 0);
    if !ok {
        if std::env::var("VMM_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("skipped PFN checks (pagemap PFNs need CAP_SYS_ADMIN), and VMM_REQUIRE_KVM=1");
        }
        eprintln!("skipped PFN checks: pagemap PFNs need CAP_SYS_ADMIN");
    }
    ok
}

/// The text of /proc/self/maps; a mapped file's path that is not UTF-8 is read lossily.
pub fn self_maps() -> String {
    String::from_utf8_lossy(&std::fs::read("/proc/self/maps").unwrap()).into_owned()
}

/// Counts VMAs that start inside `[start, end)`.
pub fn vmas_in(start: usize, end: usize) -> usize {
    self_maps()
        .lines()
        .filter_map(|l| usize::from_str_radix(l.split('-').next()?, 16).ok())
        .filter(|&a| a >= start && a < end)
        .count()
}

/// VMAs inside the host ranges of `mems` (see [`host_range`]).
pub fn guest_vmas(mems: &[&Mem]) -> u64 {
    mems.iter()
        .map(|m| {
            let (start, end) = host_range(m);
            vmas_in(start, end) as u64
        })
        .sum()
}

/// Host address range `[start, end)` of a memory's regions (first region start to last end).
pub fn host_range(mem: &Mem) -> (usize, usize) {
    let start = mem.iter().map(|r| r.as_ptr() as usize).min().unwrap();
    let end = mem
        .iter()
        .map(|r| r.as_ptr() as usize + r.size())
        .max()
        .unwrap();
    (start, end)
}

/// The /proc/self/maps lines of VMAs that overlap a memory's regions.
pub fn maps_of(mem: &Mem) -> Vec<String> {
    let ranges: Vec<(usize, usize)> = mem
        .iter()
        .map(|r| (r.as_ptr() as usize, r.as_ptr() as usize + r.size()))
        .collect();
    self_maps()
        .lines()
        .filter(|l| {
            let Some((a, b)) = l.split_whitespace().next().and_then(|r| r.split_once('-')) else {
                return false;
            };
            let (a, b) = (
                usize::from_str_radix(a, 16).unwrap(),
                usize::from_str_radix(b, 16).unwrap(),
            );
            ranges.iter().any(|&(s, e)| a < e && b > s)
        })
        .map(str::to_string)
        .collect()
}

/// VMAs overlapping a memory's regions.
pub fn vma_count(mem: &Mem) -> usize {
    maps_of(mem).len()
}

/// Pool mappings (`memfd:vm-dedup-pool`) inside a memory's regions.
pub fn pool_mappings(mem: &Mem) -> usize {
    maps_of(mem)
        .iter()
        .filter(|l| l.contains("vm-dedup-pool"))
        .count()
}

/// Guests a and b with the same content (merged and zero pages), merged.
pub fn merged_pair() -> (Arc<Mem>, Arc<Mem>, Vec<u64>, Engine, Vec<GuestId>) {
    let a = memory(64);
    let b = memory(64);
    let seeds: Vec<u64> = (0..64)
        .map(|i| if i % 4 == 0 { 0 } else { 40 + i % 8 })
        .collect();
    fill_all(&a, &seeds);
    fill_all(&b, &seeds);
    let (engine, ids) = engine_with(
        fast_config(),
        &[("a", "d", a.clone()), ("b", "d", b.clone())],
    );
    engine.scan_pass().unwrap();
    assert_eq!(engine.scan_pass().unwrap().pages_shared, 6);
    (a, b, seeds, engine, ids)
}
