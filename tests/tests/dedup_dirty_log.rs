//! The engine's dirty-page source in the VMM: KVM's dirty log of the guest's slots OR'ed with
//! the VMM's own writes. Pages the guest keeps writing are not merged while it writes them (even
//! when every write leaves the same content, which hashing alone would call stable), and merge
//! once it stops; an idle guest's pages are not hashed again.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test

mod in_process;

use std::path::Path;
use std::sync::Arc;
use std::thread;

use in_process::probe_guest;
use test_guests::filled_page_checksum;
use vm_dedup::{Engine, PageState};
use vm_memory::{Bytes, GuestAddress};
use vmm::config::VmmConfig;
use vmm::dedup::{Dedup, DedupConfig};
use vmm::{StopHandle, Vmm};
use vmm_tests::{
    CONTENT_BASE, CapturedConsole, ConsoleProbe, ProbeGuest, ProbeProtocol, pattern, temp_file_with,
};

/// The value the pages under test are filled with.
const VALUE: u64 = 0x5eed_0000_1234_abcd;

/// A probe guest running in-process, its console and a way to stop it.
struct Running {
    console: CapturedConsole,
    input: vmm::devices::console::ConsoleInput,
    stop: StopHandle,
    thread: thread::JoinHandle<Result<u8, vmm::Error>>,
}

impl Running {
    fn probe(&self) -> ConsoleProbe<'_, impl Fn(&str) + '_> {
        self.console.probe("", |l| self.input.send_line(l))
    }

    fn finish(self) {
        self.stop.stop_all();
        assert_eq!(self.thread.join().unwrap().unwrap(), 0);
    }
}

/// Builds one probe guest with `image` and write tracking; `register` sees it before it runs.
fn run_guest<T>(probe: &Path, image: &Path, register: impl FnOnce(&Vmm) -> T) -> (Running, T) {
    let config = VmmConfig {
        guests: vec![probe_guest(0, 16 << 20, probe, Some(image))],
    };
    let console = CapturedConsole::default();
    let vmm = Vmm::with_sink(&config, console.sink()).unwrap();
    let registered = register(&vmm);
    let input = vmm.console_input();
    let stop = vmm.stop_handle();
    let thread = thread::spawn(move || vmm.run());
    console.wait_line("PROBE READY vcpus=1");
    (
        Running {
            console,
            input,
            stop,
            thread,
        },
        registered,
    )
}

/// An image whose page at `CONTENT_BASE` is filled with `VALUE`, as the probe's `F` fills one.
fn image_with_a_filled_page() -> Vec<u8> {
    let mut image = vec![0u8; CONTENT_BASE as usize + 4096];
    for w in image[CONTENT_BASE as usize..].chunks_exact_mut(8) {
        w.copy_from_slice(&VALUE.to_le_bytes());
    }
    image
}

#[test]
fn pages_the_guest_keeps_writing_merge_only_after_it_stops() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let probe = ProbeGuest::new();
    let image = temp_file_with(&image_with_a_filled_page());
    let (guest, dedup) = run_guest(probe.path(), image.as_path(), |vmm| {
        Dedup::new(&DedupConfig::default(), vmm.guests()).unwrap()
    });
    let engine = dedup.engine();
    let id = dedup.guest_id("guest0").unwrap();
    let state = |gpa: u64| engine.page_info(id, GuestAddress(gpa)).unwrap();
    let (a, b) = (CONTENT_BASE, CONTENT_BASE + 0x1000);
    engine.scan_pass().unwrap();
    engine.scan_pass().unwrap();
    assert_eq!(state(a).state, PageState::Stable);

    // The guest fills page b with the same content as a, again and again, between passes.
    for round in 0..6 {
        guest.probe().fill(b, VALUE);
        engine.scan_pass().unwrap();
        assert_ne!(
            state(b).state,
            PageState::Merged,
            "round {round}: {:?}",
            state(b)
        );
        assert_ne!(state(a).state, PageState::Merged, "round {round}");
        if round > 0 {
            assert_eq!(state(b).state, PageState::Volatile, "round {round}");
        }
    }
    let volatile = engine.stats().pages_volatile;
    assert!(volatile >= 1, "{:?}", engine.stats());

    // It stops writing: the next pass finds b clean and merges it with a.
    engine.scan_pass().unwrap();
    engine.scan_pass().unwrap();
    let (sa, sb) = (state(a), state(b));
    assert_eq!(sb.state, PageState::Merged, "{sb:?}");
    assert_eq!(sa.slot, sb.slot);
    assert_eq!(guest.probe().checksum(b), filled_page_checksum(VALUE));

    guest.finish();
    dedup.shutdown().unwrap();
}

#[test]
fn without_the_dirty_log_a_page_rewritten_with_the_same_content_merges_while_written() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let probe = ProbeGuest::new();
    let image = temp_file_with(&image_with_a_filled_page());
    let (guest, (engine, id)) = run_guest(probe.path(), image.as_path(), |vmm| {
        let engine = Engine::new(vm_dedup::Config::default()).unwrap();
        let g = &vmm.guests()[0];
        let id = engine
            .register(
                vm_dedup::GuestConfig::new(g.name(), "default"),
                Arc::clone(g.memory()),
            )
            .unwrap();
        (engine, id)
    });
    let state = |gpa: u64| engine.page_info(id, GuestAddress(gpa)).unwrap().state;
    let b = CONTENT_BASE + 0x1000;
    engine.scan_pass().unwrap();
    engine.scan_pass().unwrap();
    let mut merged_while_written = false;
    for _ in 0..4 {
        guest.probe().fill(b, VALUE);
        engine.scan_pass().unwrap();
        merged_while_written |= state(b) == PageState::Merged;
    }
    assert!(
        merged_while_written,
        "hashing alone sees the same content and merges; the dirty log is what prevents it"
    );
    guest.finish();
    engine.unregister(id).unwrap();
}

#[test]
fn an_idle_guest_is_not_hashed_again_and_written_pages_are() {
    if !vmm_tests::require_kvm() {
        return;
    }
    const UNIQUE: usize = 1024;
    let probe = ProbeGuest::new();
    let content = pattern(5, UNIQUE * 4096);
    let mut image = vec![0u8; CONTENT_BASE as usize];
    image.extend(&content);
    let image = temp_file_with(&image);
    let (guest, (dedup, memory)) = run_guest(probe.path(), image.as_path(), |vmm| {
        let dedup = Dedup::new(&DedupConfig::default(), vmm.guests()).unwrap();
        (dedup, Arc::clone(vmm.guests()[0].memory()))
    });
    let engine = dedup.engine().clone();
    let dirty = Arc::clone(&dedup.shared().guests()[0].dirty);
    let pass = |engine: &Engine| {
        let before = engine.stats().pages_scanned;
        engine.scan_pass().unwrap();
        engine.stats().pages_scanned - before
    };
    let first = pass(&engine);
    assert!(
        first >= UNIQUE as u64,
        "the first pass hashes every present page: {first}"
    );
    pass(&engine);
    let idle: Vec<u64> = (0..3).map(|_| pass(&engine)).collect();
    assert_eq!(
        idle,
        [0, 0, 0],
        "an idle guest's pages are not hashed again"
    );

    // Three pages written by the guest; one by the VMM through vm-memory, which copies the
    // content of another page there (so that it can only merge if it is hashed again).
    for i in 0..3u64 {
        guest.probe().write(CONTENT_BASE + (i + 1) * 0x10000, i + 1);
    }
    let (x, y) = (CONTENT_BASE + 0x8000, CONTENT_BASE + 0x9000);
    memory
        .write_slice(&content[0x9000..0xa000], GuestAddress(x))
        .unwrap();
    let reported = dirty.pages_reported();
    let written = pass(&engine);
    let reported = dirty.pages_reported() - reported;
    assert!(written >= 4, "the written pages are hashed: {written}");
    assert_eq!(
        written, reported,
        "only the pages the dirty log reported are hashed"
    );
    engine.scan_pass().unwrap();
    let id = dedup.guest_id("guest0").unwrap();
    let info = |gpa: u64| engine.page_info(id, GuestAddress(gpa)).unwrap();
    assert_eq!(info(x).state, PageState::Merged, "the VMM's write was seen");
    assert_eq!(info(x).slot, info(y).slot);
    dedup.shutdown().unwrap();

    // The same memory without the dirty log: every unmerged present page is hashed each pass.
    let plain = Engine::new(vm_dedup::Config::default()).unwrap();
    let id = plain
        .register(vm_dedup::GuestConfig::new("guest0", "default"), memory)
        .unwrap();
    pass(&plain);
    pass(&plain);
    let without = pass(&plain);
    assert!(
        without >= UNIQUE as u64 - 2,
        "without the dirty log an idle pass hashes the stable pages again: {without}"
    );
    eprintln!(
        "pages hashed per idle pass: {} with the dirty log, {without} without",
        idle[2]
    );
    guest.finish();
    plain.unregister(id).unwrap();
}
