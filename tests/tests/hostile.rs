//! A hostile guest beside well-behaved ones in one `vmm --dedup` process: guest0 runs
//! `test_guests::HOSTILE` (garbage to every I/O port, unmapped MMIO, invalid instructions and
//! faults, then a triple fault), guest1 and guest2 run the probe, all three with the same
//! memory image (`--flat` once per guest). The VMM logs the hostile guest's stop, stops only
//! that guest and never panics; the other guests keep answering with their content intact and
//! their merged pages still merged and still copy-on-write.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test

use std::process::Command;

use serde_json::Value;
use test_guests::{HOSTILE, HOSTILE_FAULTS, HOSTILE_MMIO_AND, LOAD_ADDRESS, page_checksum};
use vmm_sys_util::tempdir::TempDir;
use vmm_tests::{
    ApiClient, DedupImages, Kinds, ProbeGuest, ProbeProtocol, VmmProcess, field, guest_stats,
    settled, temp_file_with, vmm_bin,
};

const PROBES: [&str; 2] = ["guest1", "guest2"];
const KINDS: Kinds = Kinds {
    dup: 16,
    shared: 16,
    unique: 4,
    zero: 0,
};

/// Waits for console line `text` of guest0 (the hostile one).
fn hostile_line(vmm: &mut VmmProcess, text: &str) {
    vmm.wait_line(&format!("guest0: {text}"));
}

/// Asserts that every image page of the probe guests maps a shared copy (the probes' own
/// stack and line buffer pages also merge and break with every command, so only this much is
/// certain), and that the image's duplicates are counted as sharing.
fn assert_image_merged(stats: &Value) {
    let image_pages = (KINDS.dup + KINDS.shared) as u64;
    for g in PROBES {
        let s = guest_stats(stats, g);
        let mapped = field(s, "pages_shared") + field(s, "pages_sharing");
        assert!(
            mapped >= image_pages,
            "{g} maps {mapped} merged pages: {stats}"
        );
    }
    let image_sharing = 3 * KINDS.dup as u64 - 1 + 2 * KINDS.shared as u64;
    assert!(
        field(stats, "pages_sharing") >= image_sharing,
        "not merged: {stats}"
    );
}

fn cows(stats: &Value, guest: &str) -> u64 {
    field(guest_stats(stats, guest), "cow_breaks")
}

#[test]
fn a_hostile_guest_stops_alone_and_the_others_keep_their_merged_pages() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let sock = dir.as_path().join("api.sock");
    let probe = ProbeGuest::new();
    let hostile = temp_file_with(HOSTILE);
    let layout = DedupImages::new(1, KINDS, 23);
    let image = temp_file_with(&layout.images[0]);
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let mut command = Command::new(vmm_bin());
    command
        // The guest's stop is logged at info level; unhandled accesses at debug (not shown).
        .env("RUST_LOG", "info")
        .args(["--guests", "3", "--mem", "16M", "--entry"])
        .arg(format!("{LOAD_ADDRESS:#x}"))
        .args(["--flat", &path(hostile.as_path())])
        .args(["--flat", &path(probe.path())])
        .args(["--flat", &path(probe.path())])
        .args(["--mem-image", &path(image.as_path())])
        .args(["--dedup", "--api-sock", &path(&sock)]);
    let mut vmm = VmmProcess::start(&mut command);
    hostile_line(&mut vmm, "HOSTILE READY");
    vmm.wait_probes_ready(PROBES);
    let api = ApiClient::ready(&sock);

    // Merged before the attack: the image's duplicates, in all three guests (one copy of the
    // dup content, one of each shared content).
    let before = settled(&api);
    assert_image_merged(&before);

    vmm.send_line("guest0: go");
    // The line before holds the garbage the guest wrote to the UART's data register.
    hostile_line(&mut vmm, "HOSTILE PORTS DONE");
    hostile_line(
        &mut vmm,
        &format!("HOSTILE MMIO DONE and={HOSTILE_MMIO_AND:x}"),
    );
    let (ud, gp, pf) = HOSTILE_FAULTS;
    hostile_line(
        &mut vmm,
        &format!("HOSTILE FAULTS ud={ud:x} gp={gp:x} pf={pf:x}"),
    );
    hostile_line(&mut vmm, "HOSTILE TRIPLE FAULT");
    vmm.wait_stderr("guest0: shut down (triple fault or shutdown event)");

    // The others still answer, with their content intact ...
    for g in PROBES {
        let mut guest = vmm.probe_of(g);
        for gpa in layout.all() {
            let want = page_checksum(layout.page(0, gpa));
            assert_eq!(guest.checksum(gpa), want, "{g} page {gpa:#x}");
        }
    }
    // ... their image pages still merged ...
    assert_image_merged(&settled(&api));
    // ... and still copy-on-write: a write stays with its writer (guest2 gets no command until
    // its figures are read).
    let dup = layout.dup()[5];
    let old = page_checksum(layout.page(0, dup));
    let unwritten = settled(&api);
    vmm.probe_of("guest1").write(dup, 0x0bad_c0de);
    assert_eq!(vmm.probe_of("guest1").read(dup), 0x0bad_c0de);
    let written = settled(&api);
    assert!(
        cows(&written, "guest1") > cows(&unwritten, "guest1"),
        "{unwritten}\n{written}"
    );
    assert_eq!(
        cows(&written, "guest2"),
        cows(&unwritten, "guest2"),
        "{unwritten}\n{written}"
    );
    assert_eq!(vmm.probe_of("guest2").checksum(dup), old);

    for g in PROBES {
        vmm.probe_of(g).exit(0);
    }
    assert_eq!(vmm.exit_code(), 0, "{}", vmm.transcript());
    let transcript = vmm.transcript();
    assert!(!transcript.contains("panicked"), "{transcript}");
    let stopped: Vec<&str> = transcript
        .lines()
        .filter(|l| l.starts_with("[stderr]") && l.contains(": shut down"))
        .collect();
    assert_eq!(stopped.len(), 1, "only guest0 shut down: {stopped:?}");
}
