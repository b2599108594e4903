//! The overcommit guardrail: guests committing more RAM than the host has (RAM + swap) start
//! with a warning by default and are refused with `--overcommit=refuse`, because merged pages
//! can be unshared by the guests at any time. Guest RAM is mapped with `MAP_NORESERVE`, so the
//! warned case costs only what the guests touch.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test

use vmm_tests::{ProbeGuest, ProbeProtocol};

/// Host RAM and swap in bytes, from /proc/meminfo.
fn host_ram_and_swap() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    (kib("MemTotal:") << 10, kib("SwapTotal:") << 10)
}

/// Guests of at most half the host's RAM each (the VMM refuses a guest larger than the host),
/// enough of them to commit more than RAM + swap: `--mem` and `--guests` values.
fn overcommitting_guests() -> (String, String) {
    let (ram, swap) = host_ram_and_swap();
    let mem_gib = ((ram / 2) >> 30).max(1);
    let guests = (ram + swap) / (mem_gib << 30) + 1;
    (format!("{mem_gib}G"), guests.to_string())
}

#[test]
fn overcommitted_guests_are_refused_with_overcommit_refuse() {
    let (mem, guests) = overcommitting_guests();
    let probe = ProbeGuest::new();
    let mut vmm = probe.spawn(&mem, &["--guests", &guests, "--overcommit=refuse"]);
    assert_eq!(vmm.exit_code(), 2, "{}", vmm.transcript());
    let out = vmm.transcript();
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.starts_with("[stderr] vmm: error: --overcommit=refuse: the guests commit"),
        "{out}"
    );
    assert!(out.contains("swap") && out.contains("unshared"), "{out}");
}

#[test]
fn overcommitted_guests_start_with_a_warning_by_default() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let (mem, guests) = overcommitting_guests();
    let probe = ProbeGuest::new();
    let mut vmm = probe.spawn(&mem, &["--guests", &guests, "--dedup"]);
    let warning = vmm.wait_stderr("vmm: warning: the guests commit");
    assert!(
        warning.text.contains("merged pages can be unshared"),
        "{}",
        warning.text
    );
    let count: usize = guests.parse().unwrap();
    vmm.wait_probes_ready((0..count).map(|g| format!("guest{g}")));
    vmm.probe_of("guest0").write(0x20_0000, 1);
    vmm.send_line("X 0");
    assert_eq!(vmm.exit_code(), 0, "{}", vmm.transcript());
}

#[test]
fn guests_within_ram_and_swap_start_without_a_warning() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let probe = ProbeGuest::new();
    let mut vmm = probe.spawn("16M", &["--guests", "2", "--overcommit=refuse"]);
    vmm.wait_probes_ready(["guest0", "guest1"]);
    vmm.send_line("X 0");
    assert_eq!(vmm.exit_code(), 0, "{}", vmm.transcript());
    assert!(!vmm.transcript().contains("commit"), "{}", vmm.transcript());
}
