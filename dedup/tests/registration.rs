//! Registration: regions that are not private anonymous memory are left alone; unregistering a
//! guest that is still in use turns its merged pages private without touching the others.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::ffi::OsStringExt;
use std::sync::Arc;

use common::*;
use vm_dedup::{Engine, GuestConfig, PageState};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// A new file of `len` bytes at `path`, open for reading and writing.
fn sized_file(path: &std::path::Path, len: usize) -> std::fs::File {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    file.set_len(len as u64).unwrap();
    file
}

#[test]
fn file_backed_regions_are_left_alone() {
    let file = sized_file(
        &std::env::temp_dir().join(format!("vm-dedup-file-{}", std::process::id())),
        64 * PAGE,
    );
    let mem: Arc<Mem> = Arc::new(
        GuestMemoryMmap::from_ranges_with_files(&[
            (GuestAddress(0), 64 * PAGE, None),
            (
                GuestAddress((128 * PAGE) as u64),
                64 * PAGE,
                Some(FileOffset::new(file, 0)),
            ),
        ])
        .unwrap(),
    );
    // Identical content everywhere, in both regions.
    for p in 0..128 {
        fill(&mem, p, 9);
    }
    let (engine, ids) = engine_with(fast_config(), &[("g", "d", mem.clone())]);
    let id = ids[0];
    engine.scan_pass().unwrap();
    let s = engine.scan_pass().unwrap();
    assert_eq!(s.pages, 64);
    assert_eq!(s.pages_skipped, 64);
    assert_eq!((s.pages_shared, s.pages_sharing), (1, 63));
    for p in 64..128 {
        let info = engine.page_info(id, page_gpa(&mem, p)).unwrap();
        assert_eq!(info.state, PageState::Empty, "file page {p} untouched");
    }
    for p in 0..128 {
        assert_eq!(read(&mem, p), content(9));
    }
}

/// A file whose path is not UTF-8, mapped anywhere in the process (say a VMM binary installed
/// under such a path), is listed in /proc/self/maps and smaps like any other: registering,
/// merging and the unmerge rebuild, which read both, work as usual.
#[test]
fn a_mapped_file_with_a_non_utf8_path_changes_nothing() {
    let mut name = std::env::temp_dir().into_os_string().into_vec();
    name.extend_from_slice(format!("/vm-dedup-{}-", std::process::id()).as_bytes());
    name.extend_from_slice(b"\xff\xfe");
    let path = std::path::PathBuf::from(std::ffi::OsString::from_vec(name));
    let file = sized_file(&path, PAGE);
    // Maps the file outside guest memory for the rest of the test.
    let _mapping = vm_memory::MmapRegion::<()>::from_file(FileOffset::new(file, 0), PAGE).unwrap();
    assert!(std::fs::read_to_string("/proc/self/maps").is_err());
    let mem = memory(64);
    for p in 0..64 {
        fill(&mem, p, 5);
    }
    let (engine, ids) = engine_with(fast_config(), &[("g", "d", mem.clone())]);
    let id = ids[0];
    engine.scan_pass().unwrap();
    let s = engine.scan_pass().unwrap();
    assert_eq!((s.pages_shared, s.pages_sharing), (1, 63));
    let s = engine.unmerge_all().unwrap();
    assert_eq!((s.rebuilt_regions, s.unmerged_in_place), (1, 0));
    assert!(engine.merged_pages(id).unwrap().is_empty());
    for p in 0..64 {
        assert_eq!(read(&mem, p), content(5));
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn unregistering_a_guest_in_use_unmerges_it_only() {
    let a = memory(64);
    let b = memory(64);
    let c = memory(64);
    for m in [&a, &b, &c] {
        fill_all(m, &[3; 64]);
    }
    let (engine, ids) = engine_of(&[&a, &b, &c]);
    engine.scan_pass().unwrap();
    assert_eq!(engine.scan_pass().unwrap().pages_sharing, 3 * 64 - 1);
    engine.unregister(ids[1]).unwrap();
    let s = engine.stats();
    assert_eq!(s.guests.len(), 2);
    assert_eq!(s.pages_sharing, 2 * 64 - 1);
    assert!(engine.page_info(ids[1], GuestAddress(0)).is_err());
    assert_eq!(pool_mappings(&b), 0, "b is plain anonymous memory again");
    assert_eq!(vma_count(&b), 1);
    // b's pages are private now; a and c still share.
    if pfns_visible() {
        let pfns: std::collections::HashSet<_> = (0..64).map(|p| pfn(page_ptr(&b, p))).collect();
        assert_eq!(pfns.len(), 64);
    }
    assert_contents(&b, &[3; 64]);
    // SAFETY: the test's own memory; b is no longer registered.
    unsafe { *page_ptr(&b, 0) = 1 };
    assert_contents(&a, &[3; 64]);
    assert_contents(&c, &[3; 64]);
    assert_eq!(engine.scan_pass().unwrap().cow_breaks, 0);
    // A guest whose memory nobody else holds can go away with the engine's hold.
    let d = memory(64);
    fill_all(&d, &[3; 64]);
    let id = engine.register(GuestConfig::new("d", "d"), d).unwrap();
    engine.scan_pass().unwrap();
    engine.scan_pass().unwrap();
    engine.release(id).unwrap();
    assert_eq!(engine.stats().pinned_slots, 0);
    assert_eq!(engine.scan_pass().unwrap().pages_sharing, 2 * 64 - 1);
    assert_contents(&a, &[3; 64]);
}

#[test]
fn discard_reads_zero_even_for_merged_pages() {
    let (a, b, seeds, engine, ids) = merged_pair();
    let before = engine.stats();
    // A range whose end overflows is not in the guest's memory (and leaves the engine usable).
    let huge = u64::MAX - page_gpa(&a, 8).0 + 1 + PAGE as u64;
    assert!(matches!(
        engine.discard(ids[0], page_gpa(&a, 8), huge),
        Err(vm_dedup::EngineError::NoAddress(_))
    ));
    // Discard pages 8..24 of a (merged and zero pages), as a balloon or reset would.
    engine
        .discard(ids[0], page_gpa(&a, 8), (16 * PAGE) as u64)
        .unwrap();
    for (p, &seed) in seeds.iter().enumerate() {
        let want = if (8..24).contains(&p) { 0 } else { seed };
        assert_eq!(read(&a, p), content(want), "page {p}");
    }
    assert_contents(&b, &seeds);
    for p in 8..24 {
        let info = engine.page_info(ids[0], page_gpa(&a, p)).unwrap();
        assert!(info.slot.is_none());
    }
    // The discarded range is ordinary memory again: written, then merged again.
    for (p, &seed) in seeds.iter().enumerate().take(24).skip(8) {
        fill(&a, p, seed);
    }
    engine.scan_pass().unwrap();
    let after = engine.scan_pass().unwrap();
    assert_eq!(after.pages_sharing, before.pages_sharing);
    assert_eq!(after.zero_pages, before.zero_pages);
    assert_eq!(
        after.cow_breaks, 0,
        "discarding is not a copy-on-write break"
    );
    assert_contents(&a, &seeds);
    assert!(engine.discard(ids[0], GuestAddress(1), 4096).is_err());
    assert!(
        engine
            .discard(ids[0], GuestAddress(0), (65 * PAGE) as u64)
            .is_err()
    );
}

/// Registers guest "c" of `domain`, every page holding content 5, and runs two passes.
fn another_guest_merged(engine: &Engine, domain: &str) -> Arc<Mem> {
    let c = memory(64);
    fill_all(&c, &[5; 64]);
    engine
        .register(GuestConfig::new("c", domain), c.clone())
        .unwrap();
    engine.scan_pass().unwrap();
    engine.scan_pass().unwrap();
    c
}

/// Guests "a" and "b" of `domain` after two passes, b registered through a clone of its
/// regions (which share their mappings): the engine's hold on it is the only `Arc`, yet the
/// memory lives on with `b`. Returns the engine and b's id.
fn merged_with_cloned_b(a: &Arc<Mem>, b: &Arc<Mem>, domain: &str) -> (Engine, vm_dedup::GuestId) {
    let (engine, _) = engine_with(fast_config(), &[("a", domain, a.clone())]);
    let idb = engine
        .register(GuestConfig::new("b", domain), Arc::new((**b).clone()))
        .unwrap();
    engine.scan_pass().unwrap();
    engine.scan_pass().unwrap();
    (engine, idb)
}

/// Guest b's memory lives on after unregister through a clone of its regions (which share
/// their mappings), which the engine cannot see: unregister rebuilds it as anonymous memory
/// all the same, so a private copy dropped later reads zeros, never a slot another guest got.
#[test]
fn unregister_leaves_plain_memory_even_when_held_elsewhere() {
    let _serial = serial();
    let a = memory(64);
    let b = memory(64);
    fill_all(&a, &[3; 64]);
    fill_all(&b, &[3; 64]);
    let (engine, idb) = merged_with_cloned_b(&a, &b, "red");
    assert_eq!(engine.stats().pages_sharing, 127);
    // a and b write their pages: private copies inside the pool mappings; the slot is freed.
    fill_all(&a, &[4; 64]);
    fill_all(&b, &[4; 64]);
    engine.scan_pass().unwrap();
    engine.unregister(idb).unwrap();
    assert_eq!(pool_mappings(&b), 0, "b is plain anonymous memory");
    assert_eq!(engine.stats().pinned_slots, 0);
    assert_contents(&b, &[4; 64]);
    // Another domain's content gets the freed slot; b drops a page.
    let c = another_guest_merged(&engine, "blue");
    // SAFETY: drops pages of the test's own memory, no longer registered.
    let rc = unsafe { libc::madvise(page_ptr(&b, 0).cast(), PAGE, libc::MADV_DONTNEED) };
    assert_eq!(rc, 0);
    assert!(read(&b, 0).iter().all(|&x| x == 0));
    assert_contents(&c, &[5; 64]);
}

/// `release` is for memory that goes away with the engine's hold. Memory that lives on all
/// the same (a clone of its regions) keeps the slots it maps, never reused, and the error
/// says how many pages map the pool; memory in pool mappings cannot be registered again.
#[test]
fn released_memory_that_lives_on_keeps_its_slots() {
    let _serial = serial();
    let a = memory(64);
    let b = memory(64);
    let a_seeds: Vec<u64> = (0..64).map(|i| 1000 + i).collect();
    fill_all(&a, &a_seeds);
    fill_all(&b, &[3; 64]);
    let (engine, idb) = merged_with_cloned_b(&a, &b, "d");
    assert_eq!(engine.stats().pages_sharing, 63);
    assert!(matches!(
        engine.release(idb),
        Err(vm_dedup::EngineError::StillMapped(64))
    ));
    assert_eq!(engine.stats().pinned_slots, 1, "b's one slot is kept");
    assert!(matches!(
        engine.register(GuestConfig::new("b", "d"), b.clone()),
        Err(vm_dedup::EngineError::Overlap)
    ));
    let c = another_guest_merged(&engine, "d");
    assert_contents(&b, &[3; 64]);
    assert_contents(&c, &[5; 64]);
    // The same memory twice would be merged twice (and under two domains), merged or not.
    assert!(matches!(
        engine.register(GuestConfig::new("c2", "e"), c.clone()),
        Err(vm_dedup::EngineError::Overlap)
    ));
    let fresh = memory(16);
    engine
        .register(GuestConfig::new("f", "d"), fresh.clone())
        .unwrap();
    let twice = engine.register(GuestConfig::new("f2", "e"), fresh);
    assert!(
        matches!(twice, Err(vm_dedup::EngineError::Overlap)),
        "{twice:?}"
    );
}

/// Guest "b" of 64 pages whose first 32 hold one content, merged: its engine, id, memory and
/// page seeds.
fn half_merged() -> (Engine, vm_dedup::GuestId, Arc<Mem>, Vec<u64>) {
    let b = memory(64);
    let seeds: Vec<u64> = (0..64).map(|i| if i < 32 { 3 } else { 500 + i }).collect();
    fill_all(&b, &seeds);
    let (engine, ids) = engine_with(fast_config(), &[("b", "d", b.clone())]);
    engine.scan_pass().unwrap();
    assert_eq!(engine.scan_pass().unwrap().pages_sharing, 31);
    (engine, ids[0], b, seeds)
}

/// Unmerging fails (read-only guest memory: neither a rebuild nor a write fault works): the
/// guest stays registered with its pages merged, and nothing is lost.
#[test]
fn a_failed_unmerge_keeps_the_guest_registered() {
    let _serial = serial();
    let (engine, id, b, seeds) = half_merged();
    let (start, end) = host_range(&b);
    // SAFETY: the test's own guest memory; it is only read from now on.
    let rc = unsafe { libc::mprotect(start as *mut libc::c_void, end - start, libc::PROT_READ) };
    assert_eq!(rc, 0);
    assert!(engine.unregister(id).is_err());
    assert_eq!(engine.stats().guests.len(), 1, "still registered");
    let c = another_guest_merged(&engine, "d");
    assert_contents(&b, &seeds);
    assert_contents(&c, &[5; 64]);
}

/// Rebuilding fails (part of the memory is locked, which the scratch mapping is not), so the
/// region is unmerged in place: private pages in pool mappings. The guest stays registered
/// (the owner must not drop such pages itself); once the rebuild can work, unregister does.
#[test]
fn memory_unmerged_in_place_stays_registered_until_rebuilt() {
    let _serial = serial();
    let (engine, id, b, seeds) = half_merged();
    // SAFETY: locks pages of the test's own guest memory.
    let rc = unsafe { libc::mlock(page_ptr(&b, 32).cast(), 32 * PAGE) };
    assert_eq!(rc, 0);
    assert!(matches!(
        engine.unregister(id),
        Err(vm_dedup::EngineError::StillMapped(_))
    ));
    assert!(pool_mappings(&b) > 0, "unmerged in place");
    assert_eq!(engine.stats().guests.len(), 1, "still registered");
    assert_contents(&b, &seeds);
    // SAFETY: unlocks the pages locked above.
    let rc = unsafe { libc::munlock(page_ptr(&b, 32).cast(), 32 * PAGE) };
    assert_eq!(rc, 0);
    engine.unregister(id).unwrap();
    assert_eq!(pool_mappings(&b), 0);
    assert_contents(&b, &seeds);
}

/// Guests "a" of domain `da` and "b" of domain `db`, 64 pages each holding `seeds`, merged
/// after two passes in `engine`: their memory and ids.
fn two_merged(
    engine: &Engine,
    da: &str,
    db: &str,
    seeds: &[u64],
) -> (Arc<Mem>, Arc<Mem>, vm_dedup::GuestId, vm_dedup::GuestId) {
    let a = memory(64);
    let b = memory(64);
    fill_all(&a, seeds);
    fill_all(&b, seeds);
    let ida = engine
        .register(GuestConfig::new("a", da), a.clone())
        .unwrap();
    let idb = engine
        .register(GuestConfig::new("b", db), b.clone())
        .unwrap();
    engine.scan_pass().unwrap();
    engine.scan_pass().unwrap();
    (a, b, ida, idb)
}

/// Page numbers of guests that left are given back: registering and unregistering a 128 GiB
/// guest (never touched) more often than the index's 2^31 page numbers allow for in all
/// leaves room for the next guests, which still merge.
#[test]
fn page_numbers_of_guests_that_left_are_reused() {
    let _serial = serial();
    let engine = Engine::new(fast_config()).unwrap();
    let pages = (128usize << 30) / PAGE;
    let cycles = vm_dedup::index::MAX_PAGE_IDS as usize / pages + 2;
    let t = std::time::Instant::now();
    for i in 0..cycles {
        let big: Arc<Mem> =
            Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), pages * PAGE)]).unwrap());
        let id = engine
            .register(GuestConfig::new("big", "d"), big)
            .unwrap_or_else(|e| panic!("registration {i} of a 128 GiB guest: {e}"));
        if i % 2 == 0 {
            engine.unregister(id).unwrap();
        } else {
            engine.release(id).unwrap();
        }
    }
    eprintln!("{cycles} cycles of 128 GiB in {:?}", t.elapsed());
    let seeds: Vec<u64> = (0..64).map(|i| if i < 32 { 7 } else { 900 + i }).collect();
    let (a, b, ida, idb) = two_merged(&engine, "d", "d", &seeds);
    let s = engine.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (33, 2 * 64 - 33));
    for p in 0..64 {
        let (pa, pb) = (
            engine.page_info(ida, page_gpa(&a, p)).unwrap(),
            engine.page_info(idb, page_gpa(&b, p)).unwrap(),
        );
        assert_eq!(pa.state, PageState::Merged, "page {p}");
        assert_eq!(pa.slot, pb.slot, "page {p} shares one slot");
    }
    assert_contents(&a, &seeds);
    assert_contents(&b, &seeds);
}

/// Trust domains that nothing uses any more are forgotten: 70,000 guests, each in a domain of
/// its own and a few registered at a time, all register (65,535 domain numbers). A reused
/// domain number never lets a guest share pages with a guest of another domain, nor join a
/// slot kept for memory of a domain whose guests left.
#[test]
fn domains_nothing_uses_are_forgotten() {
    let _serial = serial();
    // Domain "kept": b lives on after release, its slot kept (pinned) and so its domain.
    let a = memory(64);
    let b = memory(64);
    fill_all(&a, &[3; 64]);
    fill_all(&b, &[3; 64]);
    let (engine, idb) = merged_with_cloned_b(&a, &b, "kept");
    let pinned = engine.page_info(idb, GuestAddress(0)).unwrap().slot;
    assert!(pinned.is_some());
    assert!(engine.release(idb).is_err());
    assert_eq!(engine.stats().pinned_slots, 1);
    let ida = engine.stats().guests[0].id;
    engine.unregister(vm_dedup::GuestId(ida)).unwrap();
    // No guest of "kept" is left, its slot is: another domain merges the same content on a
    // slot of its own; "kept" again still has its slot.
    let slot_of = |domain: &str| {
        let m = memory(64);
        fill_all(&m, &[3; 64]);
        let id = engine.register(GuestConfig::new("o", domain), m).unwrap();
        engine.scan_pass().unwrap();
        engine.scan_pass().unwrap();
        let slot = engine.page_info(id, GuestAddress(0)).unwrap().slot;
        engine.unregister(id).unwrap();
        slot
    };
    let other = slot_of("other");
    assert!(
        other.is_some() && other != pinned,
        "another domain on the kept slot"
    );
    assert_eq!(
        slot_of("kept"),
        pinned,
        "the kept slot is still its domain's"
    );
    let t = std::time::Instant::now();
    let mut live = std::collections::VecDeque::new();
    for i in 0..70_000u32 {
        let id = engine
            .register(GuestConfig::new("g", format!("domain-{i}")), memory(1))
            .unwrap_or_else(|e| panic!("registration {i}: {e}"));
        live.push_back(id);
        if live.len() == 3 {
            let id = live.pop_front().unwrap();
            if i % 2 == 0 {
                engine.unregister(id).unwrap();
            } else {
                engine.release(id).unwrap();
            }
        }
    }
    for id in live {
        engine.unregister(id).unwrap();
    }
    eprintln!("70,000 domains in {:?}", t.elapsed());
    // Six non-zero contents (3 among them, the kept slot's) in two domains: each shared
    // within its domain only, never on the kept slot.
    let seeds: Vec<u64> = (0..64)
        .map(|i| match i % 8 {
            0 | 4 => 0,
            1 => 3,
            r => 60 + r,
        })
        .collect();
    let check = |da: &str, db: &str| {
        let (a, b, ida, idb) = two_merged(&engine, da, db, &seeds);
        let s = engine.stats();
        assert_eq!(s.pages_shared, 2 * 6, "one copy per content and domain");
        assert_eq!(s.zero_pages, 2 * 16);
        for p in (0..64).filter(|&p| seeds[p] != 0) {
            let (pa, pb) = (
                engine.page_info(ida, page_gpa(&a, p)).unwrap(),
                engine.page_info(idb, page_gpa(&b, p)).unwrap(),
            );
            assert!(pa.slot.is_some() && pb.slot.is_some(), "page {p} merged");
            assert_ne!(pa.slot, pb.slot, "page {p} shared across domains");
            assert!(
                pa.slot != pinned && pb.slot != pinned,
                "page {p} on the kept slot"
            );
        }
        assert_contents(&a, &seeds);
        assert_contents(&b, &seeds);
        engine.unregister(ida).unwrap();
        engine.unregister(idb).unwrap();
    };
    check("red", "blue");
    // Their numbers go to the next domains, in another order.
    check("green", "red");
    assert_eq!(engine.stats().pinned_slots, 1);
    assert_contents(&b, &[3; 64]);
}
