//! The `vmm` binary running the probe guest: the guest sees the memory image the host loaded,
//! its own writes, its vCPUs; several guests stop independently; the debug-exit status becomes
//! the exit code; SIGTERM and SIGINT stop a running guest with status 0.
//!
//! Bad input, reset and triple fault, and SIGTERM with two guests are covered by
//! `vmm/tests/cli.rs`; the library's own view (host reads of guest writes, dirty log) by
//! `vmm_library.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test

use std::process::Command;

use test_guests::{PAGE_SIZE, PROBE, filled_page_checksum, page_checksum};
use vmm_tests::{
    ProbeConsole, ProbeGuest, ProbeProtocol, VmmProcess, pattern, temp_file_with, u64_at,
};

/// Guest RAM of every probe guest here.
const MEM: &str = "16M";

/// Asserts that the guest reads the words at `words` and checksums the pages at `pages` as
/// they are in `image` (loaded from GPA 0).
fn assert_guest_sees(probe: &mut ProbeConsole<'_>, image: &[u8], words: &[u64], pages: &[u64]) {
    for &gpa in words {
        let expected = u64_at(image, gpa as usize);
        assert_eq!(probe.read(gpa), expected, "word at {gpa:#x}");
    }
    for &gpa in pages {
        let page = &image[gpa as usize..gpa as usize + PAGE_SIZE];
        assert_eq!(probe.checksum(gpa), page_checksum(page), "page at {gpa:#x}");
    }
}

#[test]
fn the_guest_reads_the_memory_image_the_host_loaded() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let image = pattern(11, 4 << 20);
    let image_file = temp_file_with(&image);
    let probe = ProbeGuest::new();
    let image_path = image_file.as_path().to_str().unwrap();
    let mut vmm = probe.spawn(MEM, &["--mem-image", image_path]);
    let mut guest = vmm.probe();
    assert_eq!(guest.wait_ready(), 1);

    assert_guest_sees(
        &mut guest,
        &image,
        &[0x20_0000, 0x20_0ff8, 0x2a_bcd0, 0x3f_fff8],
        &[0x20_0000, 0x31_4000, 0x3f_f000],
    );
    // The flat binary is loaded over the image.
    assert_ne!(u64_at(PROBE, 0), u64_at(&image, 0x10_0000));
    assert_eq!(guest.read(0x10_0000), u64_at(PROBE, 0));
    // Past the end of the image, RAM is zero.
    assert_eq!(guest.read(0x40_0000), 0);
    assert_eq!(guest.checksum(0x40_0000), page_checksum(&[0; PAGE_SIZE]));

    guest.exit(0);
    assert_eq!(vmm.exit_code(), 0, "{}", vmm.transcript());
}

#[test]
fn the_guest_reads_back_what_it_wrote_and_filled() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let probe = ProbeGuest::new();
    let mut vmm = probe.spawn(MEM, &[]);
    let mut guest = vmm.probe();
    guest.wait_ready();

    guest.write(0x20_0008, 0x1122_3344_5566_7788);
    assert_eq!(guest.read(0x20_0008), 0x1122_3344_5566_7788);
    guest.write(0xff_fff8, u64::MAX);
    assert_eq!(guest.read(0xff_fff8), u64::MAX);

    let value = 0xdead_beef_0bad_f00d;
    guest.fill(0x80_0000, value);
    assert_eq!(guest.checksum(0x80_0000), filled_page_checksum(value));
    assert_eq!(guest.read(0x80_0ff8), value);
    // The neighbouring pages are untouched.
    assert_eq!(guest.checksum(0x80_1000), page_checksum(&[0; PAGE_SIZE]));
    assert_eq!(guest.read(0x7f_fff8), 0);

    // A bad command gets an error and the guest keeps answering.
    assert_eq!(guest.request("R 200001"), "ERR align");
    assert_eq!(guest.read(0x20_0008), 0x1122_3344_5566_7788);

    guest.exit(0);
    assert_eq!(vmm.exit_code(), 0, "{}", vmm.transcript());
}

#[test]
fn two_vcpus_start_and_check_in() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let probe = ProbeGuest::new();
    let mut vmm = probe.spawn(MEM, &["--vcpus", "2"]);
    let mut guest = vmm.probe();
    assert_eq!(guest.wait_ready(), 2);
    guest.fill(0x30_0000, 2);
    assert_eq!(guest.checksum(0x30_0000), filled_page_checksum(2));
    guest.exit(0);
    assert_eq!(vmm.exit_code(), 0, "{}", vmm.transcript());
}

#[test]
fn two_guests_stop_independently_and_the_highest_status_wins() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let probe = ProbeGuest::new();
    // At info level the VMM logs each guest's stop on stderr.
    let mut command = Command::new(vmm_tests::vmm_bin());
    command
        .args(probe.args(MEM, &["--guests", "2"]))
        .env("RUST_LOG", "info");
    let mut vmm = VmmProcess::start(&mut command);
    vmm.wait_probes_ready(["guest0", "guest1"]);

    vmm.probe_of("guest1").exit(3);
    vmm.wait_stderr("guest1: debug exit with status 3");
    // Input for the stopped guest goes nowhere; guest0 still answers.
    vmm.send_line("guest1: R 100000");
    let mut guest0 = vmm.probe_of("guest0");
    guest0.write(0x20_0000, 0x77);
    assert_eq!(guest0.read(0x20_0000), 0x77);

    guest0.exit(1);
    assert_eq!(vmm.exit_code(), 3, "{}", vmm.transcript());
    let output = vmm.transcript();
    assert!(
        output.contains("guest0: debug exit with status 1"),
        "{output}"
    );
    assert!(!output.contains("guest1: OK"), "{output}");
}

#[test]
fn the_debug_exit_status_is_the_exit_code() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let probe = ProbeGuest::new();
    for status in [0x2a, 0xff] {
        let mut vmm = probe.spawn(MEM, &[]);
        vmm.probe().wait_ready();
        vmm.probe().exit(status);
        assert_eq!(vmm.exit_code(), i32::from(status), "{}", vmm.transcript());
    }
}

#[test]
fn a_mem_image_per_guest_gives_each_guest_its_own_content() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let images = [pattern(21, 3 << 20), pattern(22, 3 << 20)];
    let files = images.each_ref().map(|image| temp_file_with(image));
    let paths = files.each_ref().map(|f| f.as_path().to_str().unwrap());
    let probe = ProbeGuest::new();
    let mut vmm = probe.spawn(
        MEM,
        &[
            "--guests",
            "2",
            "--mem-image",
            paths[0],
            "--mem-image",
            paths[1],
        ],
    );
    for (name, image) in ["guest0", "guest1"].into_iter().zip(&images) {
        let mut guest = vmm.probe_of(name);
        guest.wait_ready();
        assert_guest_sees(&mut guest, image, &[0x20_0000, 0x2f_fff8], &[0x28_0000]);
    }
    assert_ne!(u64_at(&images[0], 0x20_0000), u64_at(&images[1], 0x20_0000));
    vmm.send_line("X 0");
    assert_eq!(vmm.exit_code(), 0, "{}", vmm.transcript());
}

#[test]
fn sigterm_sigint_and_sighup_stop_a_running_guest_with_status_0() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let probe = ProbeGuest::new();
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        let mut vmm = probe.spawn(MEM, &[]);
        let mut guest = vmm.probe();
        guest.wait_ready();
        guest.write(0x20_0000, 1);
        vmm.signal(signal);
        assert_eq!(vmm.exit_code(), 0, "signal {signal}: {}", vmm.transcript());
    }
}
