//! `vmm --ksm`: guest RAM is marked mergeable for kernel KSM (VmFlags `mg`), the statistics come
//! from the kernel's figures for the process, and `--ksm --dedup` is refused. Kernel KSM itself
//! is only switched on through `vm_dedup::ksm::KsmGuard`, which restores its settings.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test

use vm_dedup::ksm::{self, KsmGuard};
use vmm_sys_util::tempdir::TempDir;
use vmm_tests::{
    ApiClient, DedupImages, Kinds, ProbeGuest, assert_stats_shape, field, guest_stats,
    temp_file_with,
};

/// Guest RAM per guest here.
const MEM: &str = "40M";
const MEM_KIB: u64 = 40 << 10;

/// Kilobytes of the mappings of process `pid` whose VmFlags have `mg` (mergeable). Guest RAM
/// of several guests may sit in one mapping, as the kernel joins adjacent mappings.
fn mergeable_kib(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut total = 0;
    let mut size = 0;
    for line in smaps.lines() {
        if let Some(rest) = line.strip_prefix("Size:") {
            size = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        } else if let Some(flags) = line.strip_prefix("VmFlags:")
            && flags.split_whitespace().any(|f| f == "mg")
        {
            total += size;
        }
    }
    total
}

#[test]
fn ksm_marks_guest_ram_mergeable_and_reports_the_kernels_figures() {
    if !vmm_tests::require_kvm() {
        return;
    }
    if !ksm::available() {
        vmm_tests::skip_for("kernel KSM not available");
        return;
    }
    let dir = TempDir::new().unwrap();
    let sock = dir.as_path().join("api.sock");
    let probe = ProbeGuest::new();

    // Without --ksm, guest RAM is not mergeable.
    let mut plain = probe.spawn(MEM, &["--guests", "2"]);
    plain.wait_probes_ready(["guest0", "guest1"]);
    assert_eq!(mergeable_kib(plain.pid()), 0);
    plain.send_line("X 0");
    assert_eq!(plain.exit_code(), 0);

    let mut vmm = probe.spawn(
        MEM,
        &[
            "--guests",
            "2",
            "--ksm",
            "--api-sock",
            sock.to_str().unwrap(),
        ],
    );
    vmm.wait_probes_ready(["guest0", "guest1"]);
    let mergeable = mergeable_kib(vmm.pid());
    assert!(mergeable >= 2 * MEM_KIB, "{mergeable} KiB mergeable");
    let api = ApiClient::ready(&sock);
    let stats = api.stats();
    assert_eq!(stats["mode"], "ksm");
    assert_stats_shape(&stats);
    assert_eq!(field(guest_stats(&stats, "guest1"), "pages"), MEM_KIB / 4);
    // Knobs and unmerging belong to the kernel.
    assert_eq!(api.patch_config(r#"{"run": 1}"#).status, 409);
    assert_eq!(api.request("POST", "/unmerge", None).status, 409);
    vmm.send_line("X 0");
    assert_eq!(vmm.exit_code(), 0, "{}", vmm.transcript());
}

#[test]
fn kernel_ksm_merges_the_guests_and_the_stats_show_it() {
    if !vmm_tests::require_kvm() {
        return;
    }
    if !ksm::available() {
        vmm_tests::skip_for("kernel KSM not available");
        return;
    }
    let layout = DedupImages::new(
        2,
        Kinds {
            dup: 16,
            shared: 8,
            unique: 2,
            zero: 0,
        },
        71,
    );
    let files: Vec<_> = layout.images.iter().map(|i| temp_file_with(i)).collect();
    let dir = TempDir::new().unwrap();
    let sock = dir.as_path().join("api.sock");
    let probe = ProbeGuest::new();
    let mut args = vec![
        "--guests",
        "2",
        "--ksm",
        "--api-sock",
        sock.to_str().unwrap(),
    ];
    for f in &files {
        args.extend(["--mem-image", f.as_path().to_str().unwrap()]);
    }
    let mut vmm = probe.spawn(MEM, &args);
    vmm.wait_probes_ready(["guest0", "guest1"]);
    let api = ApiClient::ready(&sock);

    // Kernel KSM at full rate, under the guard that restores its settings.
    let guard = KsmGuard::acquire().unwrap();
    guard.set("pages_to_scan", "10000").unwrap();
    guard.set("sleep_millisecs", "0").unwrap();
    guard.set("run", "1").unwrap();
    let want = layout.expected(256);
    api.wait_stats("kernel KSM to merge the image duplicates", |s| {
        field(s, "pages_sharing") >= want.pages_shared + want.pages_sharing
    });
    drop(guard);
    let stats = api.stats();
    assert!(field(&stats, "bytes_saved") > 0, "{stats}");
    // Per guest: at least its duplicate and shared pages map a KSM page mapped more than
    // once; together no more than the kernel counts for the process.
    let mut sum = 0;
    for g in ["guest0", "guest1"] {
        let sharing = field(guest_stats(&stats, g), "pages_sharing");
        assert!(sharing >= 16 + 8, "{g}: {stats}");
        sum += sharing;
    }
    assert!(sum <= field(&stats, "pages_sharing"), "{stats}");
    vmm.send_line("X 0");
    assert_eq!(vmm.exit_code(), 0, "{}", vmm.transcript());
}

#[test]
fn ksm_with_dedup_is_refused_clearly() {
    let probe = ProbeGuest::new();
    let mut vmm = probe.spawn("16M", &["--ksm", "--dedup"]);
    assert_eq!(vmm.exit_code(), 2);
    let out = vmm.transcript();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(lines[0].starts_with("[stderr] vmm: error: "), "{out}");
    assert!(
        lines[0].contains("--ksm") && lines[0].contains("--dedup"),
        "{out}"
    );
}
