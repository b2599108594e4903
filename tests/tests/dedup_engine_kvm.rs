//! The engine inside the VMM, driven in-process through the `vmm` library so that the test can
//! look at the engine's pool and pages: two probe guests whose memory images share pages; after
//! merging, the guests read the merged content; a guest write breaks sharing for that guest
//! only, and neither the pool slot nor the other guest changes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test

mod in_process;

use std::path::Path;
use std::thread;

use in_process::probe_guest;
use test_guests::page_checksum;
use vm_dedup::PageState;
use vm_memory::GuestAddress;
use vmm::Vmm;
use vmm::config::VmmConfig;
use vmm::dedup::{Dedup, DedupConfig};
use vmm_tests::{CapturedConsole, DedupImages, Kinds, ProbeGuest, ProbeProtocol, temp_file_with};

fn probe_guests(probe: &Path, images: &[&Path]) -> VmmConfig {
    let guests = images
        .iter()
        .enumerate()
        .map(|(i, image)| probe_guest(i as u32, 16 << 20, probe, Some(image)))
        .collect();
    VmmConfig { guests }
}

#[test]
fn guest_write_to_a_merged_page_leaves_the_pool_and_the_other_guest_unchanged() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let probe = ProbeGuest::new();
    let layout = DedupImages::new(
        2,
        Kinds {
            dup: 4,
            shared: 4,
            unique: 2,
            zero: 0,
        },
        77,
    );
    let files = layout
        .images
        .iter()
        .map(|i| temp_file_with(i))
        .collect::<Vec<_>>();
    let paths: Vec<&Path> = files.iter().map(|f| f.as_path()).collect();
    let console = CapturedConsole::default();
    let vmm = Vmm::with_sink(&probe_guests(probe.path(), &paths), console.sink()).unwrap();
    let dedup = Dedup::new(&DedupConfig::default(), vmm.guests()).unwrap();
    let input = vmm.console_input();
    let stop = vmm.stop_handle();
    let running = thread::spawn(move || vmm.run());
    let send = |line: &str| input.send_line(line);
    let mut g0 = console.probe("guest0: ", send);
    let mut g1 = console.probe("guest1: ", send);
    console.wait_line("guest0: PROBE READY vcpus=1");
    console.wait_line("guest1: PROBE READY vcpus=1");

    let engine = dedup.engine();
    let ids = [
        dedup.guest_id("guest0").unwrap(),
        dedup.guest_id("guest1").unwrap(),
    ];
    // A page merges on its second look; a third pass settles the pool.
    for _ in 0..3 {
        engine.scan_pass().unwrap();
    }
    let info = |g: usize, gpa: u64| engine.page_info(ids[g], GuestAddress(gpa)).unwrap();

    // The guests read the merged content.
    for (g, probe) in [&mut g0, &mut g1].into_iter().enumerate() {
        for gpa in layout.all() {
            assert_eq!(
                probe.checksum(gpa),
                page_checksum(layout.page(g, gpa)),
                "guest{g} {gpa:#x}"
            );
        }
    }

    // Every duplicate page of both guests maps one pool slot with the pages' content, and
    // both guests map the one host page of the slot (once they have read it).
    let shared = layout.shared()[1];
    let before = [info(0, shared), info(1, shared)];
    for (g, i) in before.iter().enumerate() {
        assert_eq!(i.state, PageState::Merged, "guest{g} {shared:#x}: {i:?}");
    }
    assert_eq!(before[0].slot, before[1].slot);
    let (node, slot) = before[0].slot.unwrap();
    let pool = engine.pool_page(node, slot).unwrap();
    assert_eq!(pool, layout.page(0, shared));
    match (before[0].host_pfn, before[1].host_pfn) {
        (Some(a), Some(b)) if a != 0 => assert_eq!(a, b, "both guests map one host page"),
        // Without CAP_SYS_ADMIN pagemap hides PFNs.
        (Some(_), Some(_)) => {}
        other => panic!("merged pages not present after the guests read them: {other:?}"),
    }
    let dup_slot = info(0, layout.dup()[0]).slot;
    assert!(
        dup_slot.is_some() && dup_slot != before[0].slot,
        "{dup_slot:?}"
    );
    for gpa in layout.dup() {
        for g in 0..2 {
            assert_eq!(info(g, gpa).slot, dup_slot, "guest{g} {gpa:#x}");
        }
    }
    for gpa in layout.unique() {
        assert_eq!(info(0, gpa).state, PageState::Stable, "unique {gpa:#x}");
    }

    // guest0 writes one word of the merged page.
    g0.write(shared + 0x18, 0xfeed);
    assert_eq!(g0.read(shared + 0x18), 0xfeed);
    engine.scan_pass().unwrap();
    let after = [info(0, shared), info(1, shared)];
    assert_ne!(after[0].state, PageState::Merged, "{:?}", after[0]);
    assert_eq!(after[0].slot, None);
    assert_eq!(after[1], before[1], "the other guest's page is unchanged");
    if let (Some(a), Some(b)) = (after[0].host_pfn, after[1].host_pfn)
        && b != 0
    {
        assert_ne!(a, b, "the writer has its own copy");
    }
    assert_eq!(
        engine.pool_page(node, slot).unwrap(),
        pool,
        "the pool slot is unchanged"
    );
    let merged = |g: usize| engine.merged_pages(ids[g]).unwrap();
    assert!(!merged(0).iter().any(|m| m.gpa.0 == shared));
    assert!(
        merged(1)
            .iter()
            .any(|m| m.gpa.0 == shared && m.slot == Some((node, slot)))
    );
    assert!(
        engine
            .stats()
            .guests
            .iter()
            .any(|g| g.name == "guest0" && g.cow_breaks >= 1),
        "{:?}",
        engine.stats()
    );

    // The other guest still reads the old content; the writer its own.
    assert_eq!(g1.checksum(shared), page_checksum(layout.page(1, shared)));
    let mut mine = layout.page(0, shared).to_vec();
    mine[0x18..0x20].copy_from_slice(&0xfeed_u64.to_le_bytes());
    assert_eq!(g0.checksum(shared), page_checksum(&mine));
    // More passes change nothing for the other guest.
    engine.scan_pass().unwrap();
    engine.scan_pass().unwrap();
    assert_eq!(info(1, shared), before[1]);
    assert_eq!(engine.pool_page(node, slot).unwrap(), pool);

    stop.stop_all();
    assert_eq!(running.join().unwrap().unwrap(), 0);
    dedup.shutdown().unwrap();
}
