//! What the kernel says about guest memory, not what vm-memory's region says, decides whether
//! the engine touches it: shared and read-only memory is left alone whatever the region's flags
//! claim. The VMA attributes of guest memory (`MADV_DONTDUMP`, `MADV_DONTFORK`, `mlock`) stay on
//! every page the engine merges, discards or unmerges, and a locked guest can be unregistered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::*;
use vm_dedup::PageState;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// One VMA of /proc/self/smaps.
#[derive(Debug)]
struct Vma {
    header: String,
    flags: Vec<String>,
    size_kb: u64,
    rss_kb: u64,
    pss_kb: u64,
    locked_kb: u64,
}

/// The VMAs of /proc/self/smaps that overlap `[start, end)`.
fn smaps_in(start: usize, end: usize) -> Vec<Vma> {
    let text = String::from_utf8_lossy(&std::fs::read("/proc/self/smaps").unwrap()).into_owned();
    let mut out = Vec::new();
    let mut cur: Option<Vma> = None;
    let kb = |rest: &str| -> u64 { rest.trim().trim_end_matches("kB").trim().parse().unwrap() };
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                cur = (a < end && b > start).then(|| Vma {
                    header: line.to_string(),
                    flags: Vec::new(),
                    size_kb: 0,
                    rss_kb: 0,
                    pss_kb: 0,
                    locked_kb: 0,
                });
                continue;
            }
        }
        let Some(v) = cur.as_mut() else { continue };
        if let Some(rest) = line.strip_prefix("VmFlags:") {
            v.flags = rest.split_whitespace().map(str::to_string).collect();
            out.push(cur.take().unwrap());
        } else if let Some(rest) = line.strip_prefix("Size:") {
            v.size_kb = kb(rest);
        } else if let Some(rest) = line.strip_prefix("Rss:") {
            v.rss_kb = kb(rest);
        } else if let Some(rest) = line.strip_prefix("Pss:") {
            v.pss_kb = kb(rest);
        } else if let Some(rest) = line.strip_prefix("Locked:") {
            v.locked_kb = kb(rest);
        }
    }
    out
}

/// Asserts that every VMA of `mem` has each of `flags` in its VmFlags; with `lo` among them,
/// also that every page is present and locked.
fn assert_flags(mem: &Mem, flags: &[&str], when: &str) {
    let (start, end) = host_range(mem);
    let vmas = smaps_in(start, end);
    assert!(!vmas.is_empty());
    for v in &vmas {
        for f in flags {
            assert!(
                v.flags.iter().any(|g| g == f),
                "{when}: VMA without `{f}`: {} (VmFlags {:?})",
                v.header,
                v.flags
            );
        }
        if flags.contains(&"lo") {
            assert_eq!(
                v.rss_kb, v.size_kb,
                "{when}: pages not present: {}",
                v.header
            );
            assert_eq!(v.locked_kb, v.pss_kb, "{when}: not locked: {}", v.header);
        }
    }
}

fn madvise(mem: &Mem, advice: libc::c_int) {
    let (start, end) = host_range(mem);
    // SAFETY: the test's own guest memory; the advice changes no content.
    let rc = unsafe { libc::madvise(start as *mut libc::c_void, end - start, advice) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

fn mlock(mem: &Mem) {
    let (start, end) = host_range(mem);
    // SAFETY: mlock changes no content.
    let rc = unsafe { libc::mlock(start as *const libc::c_void, end - start) };
    assert_eq!(rc, 0, "mlock: {}", std::io::Error::last_os_error());
}

fn munlock(mem: &Mem) {
    let (start, end) = host_range(mem);
    // SAFETY: munlock changes no content.
    unsafe { libc::munlock(start as *const libc::c_void, end - start) };
}

/// A guest region over memory mapped elsewhere (`with_raw_mmap_pointer`): vm-memory reports it
/// as private anonymous memory, whatever the mapping really is.
fn raw_region(addr: *mut u8, len: usize, gpa: u64) -> GuestRegionMmap<()> {
    // SAFETY: `[addr, addr + len)` is a mapping the test keeps until it unmaps it at its end,
    // after the engine let go of the memory.
    let builder = unsafe { MmapRegionBuilder::<()>::new(len).with_raw_mmap_pointer(addr) };
    GuestRegionMmap::new(builder.build().unwrap(), GuestAddress(gpa)).unwrap()
}

fn anon_region(len: usize, gpa: u64) -> GuestRegionMmap<()> {
    GuestRegionMmap::new(MmapRegion::new(len).unwrap(), GuestAddress(gpa)).unwrap()
}

fn map_shared(fd: libc::c_int, len: usize) -> *mut u8 {
    // SAFETY: a fresh mapping chosen by the kernel.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p.cast()
}

/// vhost-user style guest memory: a memfd mapped shared, once for the guest and once for
/// another user (the device backend), handed to vm-memory as a raw pointer.
#[test]
fn shared_memory_behind_a_raw_pointer_is_left_alone() {
    const PAGES: usize = 64;
    let len = PAGES * PAGE;
    // SAFETY: a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"vm-dedup-test-shared".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: the memfd just made.
    assert_eq!(unsafe { libc::ftruncate(fd, len as libc::off_t) }, 0);
    let guest_view = map_shared(fd, len);
    let backend_view = map_shared(fd, len);
    let mem: Arc<Mem> = Arc::new(
        GuestMemoryMmap::from_regions(vec![
            anon_region(len, 0),
            raw_region(guest_view, len, (2 * len) as u64),
        ])
        .unwrap(),
    );
    assert_eq!(mem.iter().nth(1).unwrap().flags() & libc::MAP_SHARED, 0);
    let seeds = vec![4u64; 2 * PAGES];
    fill_all(&mem, &seeds);
    let (engine, ids) = engine_with(fast_config(), &[("g", "d", mem.clone())]);
    engine.scan_pass().unwrap();
    let s = engine.scan_pass().unwrap();
    assert_eq!(
        s.pages_skipped, PAGES as u64,
        "the shared region is skipped"
    );
    assert_eq!((s.pages_shared, s.pages_sharing), (1, PAGES as u64 - 1));
    for p in PAGES..2 * PAGES {
        let info = engine.page_info(ids[0], page_gpa(&mem, p)).unwrap();
        assert_eq!(info.state, PageState::Empty);
    }
    let (s0, e0) = (guest_view as usize, guest_view as usize + len);
    assert!(
        smaps_in(s0, e0).iter().all(|v| v.header.contains(" rw-s ")),
        "the shared mapping stays shared: {:?}",
        smaps_in(s0, e0)
    );
    // The backend sees every write of the VMM, and the other way round.
    for p in 0..PAGES {
        fill(&mem, PAGES + p, 100 + p as u64);
    }
    for p in 0..PAGES {
        let mut got = vec![0u8; PAGE];
        // SAFETY: a page of the backend's view, mapped for the whole test.
        unsafe {
            std::ptr::copy_nonoverlapping(backend_view.add(p * PAGE), got.as_mut_ptr(), PAGE)
        };
        assert!(
            got == content(100 + p as u64),
            "backend misses write to page {p}"
        );
    }
    engine.unregister(ids[0]).unwrap();
    drop(engine);
    drop(mem);
    // SAFETY: the two views, which nothing uses any more.
    unsafe {
        libc::munmap(guest_view.cast(), len);
        libc::munmap(backend_view.cast(), len);
        libc::close(fd);
    }
}

/// Guest memory the VMM made read-only after filling it (vm-memory still says read-write).
#[test]
fn read_only_memory_is_left_alone_and_stays_read_only() {
    const PAGES: usize = 64;
    let mem = memory(PAGES);
    fill_all(&mem, &[6; PAGES]);
    let (start, end) = host_range(&mem);
    // SAFETY: the test's own guest memory; nobody writes it from now on.
    let rc = unsafe { libc::mprotect(start as *mut libc::c_void, end - start, libc::PROT_READ) };
    assert_eq!(rc, 0);
    let (engine, ids) = engine_with(fast_config(), &[("g", "d", mem.clone())]);
    engine.scan_pass().unwrap();
    let s = engine.scan_pass().unwrap();
    assert_eq!(s.pages_skipped, PAGES as u64);
    assert_eq!((s.pages_shared, s.pages_sharing, s.zero_pages), (0, 0, 0));
    assert_eq!(pool_mappings(&mem), 0);
    for v in smaps_in(start, end) {
        assert!(v.header.contains(" r--p "), "{}", v.header);
        assert!(!v.flags.iter().any(|f| f == "wr"), "{:?}", v.flags);
    }
    assert_contents(&mem, &[6; PAGES]);
    engine.unregister(ids[0]).unwrap();
}

/// Fills `mem` with one content everywhere, merges it fully and checks it is merged.
fn merge_fully(mem: &Arc<Mem>, pages: usize) -> (vm_dedup::Engine, vm_dedup::GuestId) {
    fill_all(mem, &vec![8; pages]);
    let (engine, ids) = engine_with(fast_config(), &[("g", "d", mem.clone())]);
    engine.scan_pass().unwrap();
    let s = engine.scan_pass().unwrap();
    assert_eq!((s.pages_shared, s.pages_sharing), (1, pages as u64 - 1));
    assert!(pool_mappings(mem) > 0);
    (engine, ids[0])
}

#[test]
fn dontdump_and_dontfork_survive_merge_and_unregister() {
    const PAGES: usize = 64;
    let mem = memory(PAGES);
    madvise(&mem, libc::MADV_DONTDUMP);
    madvise(&mem, libc::MADV_DONTFORK);
    let (engine, id) = merge_fully(&mem, PAGES);
    assert_flags(&mem, &["dd", "dc"], "merged");
    engine.unregister(id).unwrap();
    assert_eq!(pool_mappings(&mem), 0);
    assert_eq!(vma_count(&mem), 1);
    assert_flags(&mem, &["dd", "dc"], "unregistered");
    assert_contents(&mem, &[8; PAGES]);
}

#[test]
fn mlock_survives_merge_and_unregister() {
    const PAGES: usize = 64;
    let mem = memory(PAGES);
    mlock(&mem);
    madvise(&mem, libc::MADV_DONTDUMP);
    let (engine, id) = merge_fully(&mem, PAGES);
    assert_flags(&mem, &["lo", "dd"], "merged");
    engine.unregister(id).unwrap();
    assert_eq!(pool_mappings(&mem), 0);
    assert_eq!(vma_count(&mem), 1);
    assert_flags(&mem, &["lo", "dd"], "unregistered");
    let (start, end) = host_range(&mem);
    assert!(
        smaps_in(start, end)
            .iter()
            .all(|v| !v.flags.iter().any(|f| f == "lf")),
        "locked ahead as before, not on fault"
    );
    assert_contents(&mem, &[8; PAGES]);
    munlock(&mem);
}

/// Memory locked on fault (`mlock2(MLOCK_ONFAULT)`, VmFlags `lo lf`) stays so, and pages never
/// touched are not allocated by merging or unmerging.
#[test]
fn memory_locked_on_fault_stays_locked_on_fault() {
    const PAGES: usize = 64;
    let mem = memory(PAGES);
    let (start, end) = host_range(&mem);
    fill_all(&mem, &[10; PAGES / 2]);
    // SAFETY: mlock2 changes no content.
    let rc = unsafe {
        libc::mlock2(
            start as *const libc::c_void,
            end - start,
            libc::MLOCK_ONFAULT,
        )
    };
    assert_eq!(rc, 0, "mlock2: {}", std::io::Error::last_os_error());
    let on_fault = smaps_in(start, end)[0].flags.iter().any(|f| f == "lf");
    let (engine, ids) = engine_with(fast_config(), &[("g", "d", mem.clone())]);
    engine.scan_pass().unwrap();
    let s = engine.scan_pass().unwrap();
    assert_eq!((s.pages_shared, s.pages_sharing), (1, PAGES as u64 / 2 - 1));
    engine.unregister(ids[0]).unwrap();
    assert_eq!(pool_mappings(&mem), 0);
    assert_eq!(vma_count(&mem), 1);
    let v = &smaps_in(start, end)[0];
    assert!(v.flags.iter().any(|f| f == "lo"), "{:?}", v.flags);
    if on_fault {
        assert!(v.flags.iter().any(|f| f == "lf"), "{:?}", v.flags);
    }
    assert!(
        v.rss_kb <= (PAGES / 2 * PAGE / 1024) as u64,
        "untouched pages allocated: {v:?}"
    );
    let mut seeds = vec![10; PAGES / 2];
    seeds.resize(PAGES, 0);
    assert_contents(&mem, &seeds);
    munlock(&mem);
}

#[test]
fn discarded_memory_keeps_its_attributes() {
    const PAGES: usize = 64;
    let mem = memory(PAGES);
    mlock(&mem);
    madvise(&mem, libc::MADV_DONTDUMP);
    madvise(&mem, libc::MADV_DONTFORK);
    let (engine, id) = merge_fully(&mem, PAGES);
    engine
        .discard(id, GuestAddress(8 * PAGE as u64), 16 * PAGE as u64)
        .unwrap();
    let mut seeds = vec![8; PAGES];
    seeds[8..24].iter_mut().for_each(|s| *s = 0);
    assert_contents(&mem, &seeds);
    assert_flags(&mem, &["lo", "dd", "dc"], "discarded");
    engine.unregister(id).unwrap();
    assert_flags(&mem, &["lo", "dd", "dc"], "unregistered");
    munlock(&mem);
}

/// A locked guest with merged and unmerged pages: the rebuild's scratch is locked like the
/// guest, so the guest is rebuilt as one locked VMA and can be unregistered.
#[test]
fn a_locked_half_merged_guest_unregisters() {
    const PAGES: usize = 64;
    let mem = memory(PAGES);
    let seeds: Vec<u64> = (0..PAGES as u64)
        .map(|p| if p < 32 { 9 } else { 1000 + p })
        .collect();
    fill_all(&mem, &seeds);
    mlock(&mem);
    let (engine, ids) = engine_with(fast_config(), &[("g", "d", mem.clone())]);
    engine.scan_pass().unwrap();
    let s = engine.scan_pass().unwrap();
    assert_eq!((s.pages_shared, s.pages_sharing), (1, 31));
    assert_flags(&mem, &["lo"], "merged");
    engine.unregister(ids[0]).unwrap();
    let s = engine.stats();
    assert_eq!((s.rebuilt_regions, s.unmerged_in_place), (1, 0));
    assert_eq!(pool_mappings(&mem), 0);
    assert_eq!(vma_count(&mem), 1);
    assert_flags(&mem, &["lo"], "unregistered");
    assert_contents(&mem, &seeds);
    munlock(&mem);
}
