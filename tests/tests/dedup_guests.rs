//! `vmm --dedup` with two probe guests through the binary and its control API: merged pages
//! match the images' duplicates, each guest reads back exactly its own content, and a guest
//! write to a merged page breaks sharing for that page in that guest only.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test

use serde_json::Value;
use test_guests::{filled_page_checksum, page_checksum};
use vmm_sys_util::tempdir::TempDir;
use vmm_tests::{
    ApiClient, DedupImages, Kinds, ProbeGuest, ProbeProtocol, VmmProcess, assert_stats_shape,
    delta, field, guest_stats, settled, temp_file_with,
};

const MEM: &str = "16M";
const GUESTS: [&str; 2] = ["guest0", "guest1"];
const KINDS: Kinds = Kinds {
    dup: 8,
    shared: 8,
    unique: 8,
    zero: 8,
};

/// Starts two probe guests with `--dedup` and the API on `sock`, with `images` (or none);
/// waits until both guests are ready and the merge figures have settled.
fn start(
    probe: &ProbeGuest,
    sock: &std::path::Path,
    images: &[&str],
) -> (VmmProcess, ApiClient, Value) {
    let mut args = vec![
        "--guests",
        "2",
        "--dedup",
        "--api-sock",
        sock.to_str().unwrap(),
    ];
    for i in images {
        args.extend(["--mem-image", i]);
    }
    let mut vmm = probe.spawn(MEM, &args);
    vmm.wait_probes_ready(GUESTS);
    let api = ApiClient::ready(sock);
    let stats = settled(&api);
    (vmm, api, stats)
}

#[test]
fn two_guests_merge_their_duplicates_read_their_own_content_and_break_sharing_alone() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let probe = ProbeGuest::new();
    let layout = DedupImages::new(2, KINDS, 41);
    let files = layout
        .images
        .iter()
        .map(|i| temp_file_with(i))
        .collect::<Vec<_>>();
    let paths: Vec<&str> = files
        .iter()
        .map(|f| f.as_path().to_str().unwrap())
        .collect();

    // What the VMM's own low memory merges to, with the same guests and no image content.
    let (mut base_vmm, _, base) = start(&probe, &dir.as_path().join("base.sock"), &[]);
    base_vmm.send_line("X 0");
    assert_eq!(base_vmm.exit_code(), 0, "{}", base_vmm.transcript());

    let (mut vmm, api, merged) = start(&probe, &dir.as_path().join("api.sock"), &paths);
    assert_stats_shape(&merged);
    let want = layout.expected(256);
    let shown = || format!("baseline {base}\nmerged {merged}");
    assert_eq!(
        delta(&merged, &base, "pages_shared"),
        want.pages_shared as i64,
        "{}",
        shown()
    );
    assert_eq!(
        delta(&merged, &base, "pages_sharing"),
        want.pages_sharing as i64,
        "{}",
        shown()
    );
    assert_eq!(
        delta(&merged, &base, "pages_unshared"),
        want.pages_unshared as i64,
        "{}",
        shown()
    );
    assert_eq!(delta(&merged, &base, "zero_pages"), 0, "{}", shown());
    assert_eq!(
        field(&merged, "bytes_saved"),
        (field(&merged, "pages_sharing") + field(&merged, "zero_pages")) * 4096
    );
    for g in GUESTS {
        let (gm, gb) = (guest_stats(&merged, g), guest_stats(&base, g));
        assert_eq!(
            delta(gm, gb, "pages_unshared"),
            KINDS.unique as i64,
            "{g}: {}",
            shown()
        );
        assert_eq!(gm["domain"], "default");
    }

    // Each guest reads exactly its own image.
    for (i, g) in GUESTS.into_iter().enumerate() {
        let mut guest = vmm.probe_of(g);
        for gpa in layout.all() {
            assert_eq!(
                guest.checksum(gpa),
                page_checksum(layout.page(i, gpa)),
                "{g} page {gpa:#x}"
            );
        }
    }

    // Zero pages the guest fills with zeros go to the host zero page.
    let before = settled(&api);
    let zeros = &layout.zero()[..4];
    for &gpa in zeros {
        vmm.probe_of("guest0").fill(gpa, 0);
    }
    let after = settled(&api);
    assert_eq!(delta(&after, &before, "zero_pages"), 4, "{before}\n{after}");
    let (a0, b0) = (
        guest_stats(&after, "guest0"),
        guest_stats(&before, "guest0"),
    );
    assert_eq!(delta(a0, b0, "zero_pages"), 4, "{after}");

    // A guest write to a merged page breaks sharing in that guest only: the write is counted
    // as a copy-on-write break of the writer, never of the other guest (which gets no commands
    // here). The probe's own stack and line buffer are guest pages too and may merge and break
    // with every command, so the exact per-page view is in `dedup_engine_kvm.rs`.
    let shared = layout.shared()[0];
    let old = page_checksum(layout.page(0, shared));
    let cows = |s: &Value, g: &str| field(guest_stats(s, g), "cow_breaks") as i64;
    let before = settled(&api);
    vmm.probe_of("guest0").write(shared, 0x1234_5678);
    assert_eq!(vmm.probe_of("guest0").read(shared), 0x1234_5678);
    let written = settled(&api);
    let shown = || format!("before {before}\nwritten {written}");
    assert!(
        cows(&written, "guest0") > cows(&before, "guest0"),
        "{}",
        shown()
    );
    assert_eq!(
        cows(&written, "guest1"),
        cows(&before, "guest1"),
        "{}",
        shown()
    );
    assert_eq!(
        field(&written, "cow_breaks"),
        GUESTS.iter().map(|g| cows(&written, g) as u64).sum::<u64>()
    );
    // The other guest still reads the old content; the writer keeps its own.
    assert_eq!(vmm.probe_of("guest1").checksum(shared), old);
    assert_eq!(vmm.probe_of("guest0").read(shared), 0x1234_5678);

    // The same from the other side, with a fill of a page of the big duplicate group.
    let dup = layout.dup()[3];
    let before = settled(&api);
    vmm.probe_of("guest1").fill(dup, 0x77);
    assert_eq!(
        vmm.probe_of("guest1").checksum(dup),
        filled_page_checksum(0x77)
    );
    let after = settled(&api);
    assert!(cows(&after, "guest1") > cows(&before, "guest1"), "{after}");
    assert_eq!(cows(&after, "guest0"), cows(&before, "guest0"), "{after}");
    let dup_sum = page_checksum(layout.page(0, dup));
    assert_eq!(vmm.probe_of("guest0").checksum(dup), dup_sum);
    assert_eq!(vmm.probe_of("guest1").checksum(layout.dup()[2]), dup_sum);

    vmm.send_line("X 0");
    assert_eq!(vmm.exit_code(), 0, "{}", vmm.transcript());
    assert!(
        !dir.as_path().join("api.sock").exists(),
        "the socket is removed at exit"
    );
}
