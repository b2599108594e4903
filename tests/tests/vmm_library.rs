//! The `vmm` library driven in-process against real KVM with the probe guest: console output
//! captured through a sink, input through `ConsoleInput`, stops through `StopHandle`, and
//! write tracking through the dirty log.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test

use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;

use test_guests::LOAD_ADDRESS;
use vm_memory::{Bytes, GuestAddress};
use vmm::config::{Boot, GuestConfig, VmmConfig, guest_name};
use vmm::devices::console::Sink;
use vmm::{StopHandle, Vmm};
use vmm_tests::{ProbeGuest, wait_until};

/// Console output shared with the test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn sink(&self) -> Sink {
        Arc::new(Mutex::new(Box::new(self.clone())))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits until a whole output line equals `line`.
    fn wait_line(&self, line: &str) {
        wait_until(
            &format!("console line {line:?}"),
            || self.text().lines().any(|l| l == line),
            || self.text(),
        );
    }
}

fn probe_config(probe: &Path, guests: u32, vcpus: u32, track_dirty: bool) -> VmmConfig {
    let template = GuestConfig {
        name: guest_name(0),
        mem: 16 << 20,
        vcpus,
        boot: Boot::Flat {
            image: probe.to_path_buf(),
            entry: LOAD_ADDRESS,
        },
        mem_image: None,
        track_dirty,
    };
    VmmConfig::replicated(&template, guests, &[]).unwrap()
}

/// Runs `vmm` on a thread; returns its result through the join handle.
fn spawn(vmm: Vmm) -> thread::JoinHandle<Result<u8, vmm::Error>> {
    thread::spawn(move || vmm.run())
}

#[test]
fn guest_and_host_see_each_others_writes() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let probe = ProbeGuest::new();
    let out = Captured::default();
    let vmm = Vmm::with_sink(&probe_config(probe.path(), 1, 1, false), out.sink()).unwrap();
    let memory = vmm.guests()[0].memory().clone();
    let input = vmm.console_input();
    let running = spawn(vmm);
    out.wait_line("PROBE READY vcpus=1");

    memory
        .write_obj(0x1122_3344_5566_7788u64, GuestAddress(0x20_0008))
        .unwrap();
    input.send_line("R 200008");
    out.wait_line("OK R 200008 1122334455667788");

    input.send_line("W 300000 abcdef");
    out.wait_line("OK W 300000");
    let seen: u64 = memory.read_obj(GuestAddress(0x30_0000)).unwrap();
    assert_eq!(seen, 0xab_cdef);

    input.send_line("X 2a");
    assert_eq!(running.join().unwrap().unwrap(), 0x2a);
}

#[test]
fn a_stop_asked_for_before_run_starts_no_guest() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let probe = ProbeGuest::new();
    let out = Captured::default();
    let vmm = Vmm::with_sink(&probe_config(probe.path(), 2, 1, false), out.sink()).unwrap();
    vmm.stop_handle().stop_all();
    assert_eq!(vmm.run().unwrap(), 0);
    assert_eq!(out.text(), "", "a guest ran");
}

/// Whether page `page` (counted from the slot start) is marked in `bitmap`.
fn marked(bitmap: &[u64], page: usize) -> bool {
    bitmap[page / 64] & (1 << (page % 64)) != 0
}

#[test]
fn dirty_log_reports_the_pages_the_guest_wrote() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let probe = ProbeGuest::new();
    let out = Captured::default();
    let vmm = Vmm::with_sink(&probe_config(probe.path(), 1, 1, true), out.sink()).unwrap();
    let guest = &vmm.guests()[0];
    assert!(guest.ram().tracks_dirty());
    let reader = guest.dirty_log_reader().unwrap();
    let input = vmm.console_input();
    let stop: StopHandle = vmm.stop_handle();
    let running = spawn(vmm);
    out.wait_line("PROBE READY vcpus=1");

    reader.read().unwrap();
    input.send_line("W 500000 1");
    out.wait_line("OK W 500000");
    let log = reader.read().unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].slot.guest_addr, 0);
    assert!(
        marked(&log[0].bitmap, 0x500),
        "the written page is not in the dirty log"
    );
    assert!(
        !marked(&log[0].bitmap, 0x501),
        "an untouched page is in the dirty log"
    );
    let again = reader.read().unwrap();
    assert!(
        !marked(&again[0].bitmap, 0x500),
        "reading the log did not clear it"
    );

    stop.stop_all();
    assert_eq!(running.join().unwrap().unwrap(), 0);
}

#[test]
fn guests_stop_independently_and_the_highest_status_wins() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let probe = ProbeGuest::new();
    let out = Captured::default();
    let vmm = Vmm::with_sink(&probe_config(probe.path(), 2, 2, false), out.sink()).unwrap();
    assert!(vmm.guests()[0].dirty_log_reader().is_none());
    let states: Vec<_> = vmm.guests().iter().map(|g| g.state().clone()).collect();
    let input = vmm.console_input();
    let running = spawn(vmm);
    out.wait_line("guest0: PROBE READY vcpus=2");
    out.wait_line("guest1: PROBE READY vcpus=2");

    input.send_line("guest1: X 3");
    wait_until("guest1's stop", || states[1].stopping(), || out.text());
    input.send_line("guest0: W 200000 77");
    out.wait_line("guest0: OK W 200000");
    assert!(!states[0].stopping());

    input.send_line("guest0: X 1");
    assert_eq!(running.join().unwrap().unwrap(), 3);
    assert!(!out.text().contains("guest1: OK"), "{}", out.text());
}
