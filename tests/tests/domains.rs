//! Trust domains through the `vmm` binary: three probe guests with the same memory image,
//! guest0 and guest1 in domain `a`, guest2 in domain `b`
//! (`--dedup-domain a --dedup-domain a --dedup-domain b`).
//!
//! From the host's pagemap of the `vmm` process (host page frame numbers, visible to root):
//! non-zero pages are shared within domain `a`, no non-zero physical page of `a` is mapped by
//! `b`, and all-zero pages map the host zero page in every domain. The API's per-guest figures
//! say the same: guest2's copies of content that guest0 and guest1 share stay unshared.
//!
//! The guests' RAM is found in the `vmm` process from a marker page each guest fills with its
//! own value (`ProcessPages::find_page`), so the API does not have to expose host addresses.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test

use std::collections::HashSet;
use std::path::Path;

use serde_json::Value;
use test_guests::{filled_page_checksum, page_checksum};
use vmm_sys_util::tempdir::TempDir;
use vmm_tests::{
    ApiClient, CONTENT_BASE, DedupImages, Kinds, ProbeGuest, ProbeProtocol, ProcessPages,
    VmmProcess, assert_stats_shape, delta, field, guest_stats, settled, temp_file_with, zero_pfn,
};

const MEM: &str = "16M";
const MEM_PAGES: usize = 16 << 8;
const PAGE: u64 = 4096;
const GUESTS: [&str; 3] = ["guest0", "guest1", "guest2"];
const DOMAINS: [&str; 3] = ["a", "a", "b"];
/// The image: `dup` pages of one content, `shared` pages of distinct contents; the same image
/// in every guest.
const KINDS: Kinds = Kinds {
    dup: 8,
    shared: 8,
    unique: 0,
    zero: 0,
};
/// Pages each guest fills with zeros (after the image content).
const ZERO_PAGES: u64 = 8;

/// The page each guest fills with its marker, after the zero pages.
const fn marker_gpa() -> u64 {
    CONTENT_BASE + (KINDS.dup + KINDS.shared) as u64 * PAGE + ZERO_PAGES * PAGE
}

/// The u64 guest `i` fills its marker page with.
const fn marker_value(i: usize) -> u64 {
    0x6d61_726b_0000_0000 | (0xd0 + i as u64)
}

/// The guest addresses the guests fill with zeros.
fn zero_gpas() -> Vec<u64> {
    let first = CONTENT_BASE + (KINDS.dup + KINDS.shared) as u64 * PAGE;
    (0..ZERO_PAGES).map(|i| first + i * PAGE).collect()
}

/// Starts the three guests in their domains, with `image` in every guest (or none); waits
/// until they are ready and the merge figures have settled.
fn start(probe: &ProbeGuest, sock: &Path, image: Option<&str>) -> (VmmProcess, ApiClient, Value) {
    let mut args = vec!["--guests", "3", "--dedup"];
    for d in DOMAINS {
        args.extend(["--dedup-domain", d]);
    }
    args.extend(["--api-sock", sock.to_str().unwrap()]);
    if let Some(image) = image {
        args.extend(["--mem-image", image]);
    }
    let mut vmm = probe.spawn(MEM, &args);
    vmm.wait_probes_ready(GUESTS);
    let api = ApiClient::ready(sock);
    let stats = settled(&api);
    (vmm, api, stats)
}

/// The sum over `guests` of field `f`'s change between two statistics.
fn guests_delta(after: &Value, before: &Value, guests: &[&str], f: &str) -> i64 {
    guests
        .iter()
        .map(|g| delta(guest_stats(after, g), guest_stats(before, g), f))
        .sum()
}

#[test]
fn nonzero_pages_are_shared_within_a_domain_and_never_across() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let probe = ProbeGuest::new();
    let layout = DedupImages::new(1, KINDS, 91);
    let image = temp_file_with(&layout.images[0]);

    // What the guests' own low memory merges to, in the same domains, without the image.
    let (mut base_vmm, _, base) = start(&probe, &dir.as_path().join("base.sock"), None);
    base_vmm.send_line("X 0");
    assert_eq!(base_vmm.exit_code(), 0, "{}", base_vmm.transcript());

    let (mut vmm, api, merged) = start(
        &probe,
        &dir.as_path().join("api.sock"),
        Some(image.as_path().to_str().unwrap()),
    );
    assert_stats_shape(&merged);
    for (g, d) in GUESTS.iter().zip(DOMAINS) {
        assert_eq!(guest_stats(&merged, g)["domain"], d, "{merged}");
    }

    // The image's content, per domain: `a` (two guests) keeps one copy of the dup content and
    // one of each shared content; `b` (one guest) one copy of the dup content, and its shared
    // contents, though equal to `a`'s, stay unshared.
    let (dup, shared) = (KINDS.dup as i64, KINDS.shared as i64);
    let shown = || format!("baseline {base}\nmerged {merged}");
    let d = |f| delta(&merged, &base, f);
    assert_eq!(d("pages_shared"), 1 + shared + 1, "{}", shown());
    assert_eq!(
        d("pages_sharing"),
        (2 * dup - 1) + shared + (dup - 1),
        "{}",
        shown()
    );
    assert_eq!(d("pages_unshared"), shared, "{}", shown());
    let a = ["guest0", "guest1"];
    let da = |f| guests_delta(&merged, &base, &a, f);
    assert_eq!(da("pages_shared"), 1 + shared, "{}", shown());
    assert_eq!(da("pages_sharing"), 2 * dup - 1 + shared, "{}", shown());
    assert_eq!(da("pages_unshared"), 0, "{}", shown());
    let db = |f| guests_delta(&merged, &base, &["guest2"], f);
    assert_eq!(db("pages_shared"), 1, "{}", shown());
    assert_eq!(db("pages_sharing"), dup - 1, "{}", shown());
    assert_eq!(db("pages_unshared"), shared, "{}", shown());

    // Zero pages and markers, written by the guests themselves.
    for (i, g) in GUESTS.iter().enumerate() {
        let mut guest = vmm.probe_of(g);
        for gpa in zero_gpas() {
            guest.fill(gpa, 0);
        }
        guest.fill(marker_gpa(), marker_value(i));
    }
    api.wait_stats("every guest's zero pages to be dropped", |s| {
        GUESTS.iter().all(|g| {
            field(guest_stats(s, g), "zero_pages")
                >= field(guest_stats(&merged, g), "zero_pages") + ZERO_PAGES
        })
    });
    let zeroed = settled(&api);
    for g in GUESTS {
        assert_eq!(
            guests_delta(&zeroed, &merged, &[g], "zero_pages"),
            ZERO_PAGES as i64,
            "{g}: before {merged}\nafter {zeroed}"
        );
    }

    // Every guest reads its content (and so maps what it reads): still right everywhere.
    let zero_sum = page_checksum(&[0u8; PAGE as usize]);
    for g in GUESTS {
        let mut guest = vmm.probe_of(g);
        for gpa in layout.all() {
            let want = page_checksum(layout.page(0, gpa));
            assert_eq!(guest.checksum(gpa), want, "{g} page {gpa:#x}");
        }
        for gpa in zero_gpas() {
            assert_eq!(guest.checksum(gpa), zero_sum, "{g} zero page {gpa:#x}");
        }
    }

    let Some(zero) = zero_pfn() else {
        vmm_tests::skip_for("the pagemap checks need root (host page frame numbers are hidden)");
        vmm.send_line("X 0");
        assert_eq!(vmm.exit_code(), 0, "{}", vmm.transcript());
        return;
    };
    let pages = ProcessPages::open(vmm.pid()).unwrap();
    let pfns: Vec<Vec<Option<u64>>> = (0..GUESTS.len())
        .map(|i| {
            let marker: Vec<u8> = marker_value(i)
                .to_le_bytes()
                .into_iter()
                .cycle()
                .take(PAGE as usize)
                .collect();
            assert_eq!(
                page_checksum(&marker),
                filled_page_checksum(marker_value(i))
            );
            let found = pages.find_page(&marker).unwrap();
            assert_eq!(found.len(), 1, "{}'s marker page at {found:x?}", GUESTS[i]);
            pages.pfns(found[0] - marker_gpa(), MEM_PAGES).unwrap()
        })
        .collect();
    let pfn = |guest: usize, gpa: u64| pfns[guest][(gpa / PAGE) as usize];

    // All-zero pages map the host zero page, in every domain.
    for (i, g) in GUESTS.iter().enumerate() {
        for gpa in zero_gpas() {
            assert_eq!(pfn(i, gpa), Some(zero), "{g} zero page {gpa:#x}");
        }
    }
    // Within domain a, every content page is one physical page for both guests; the dup
    // pages are one physical page in each domain.
    for gpa in layout.all() {
        let p = pfn(0, gpa);
        assert!(p.is_some_and(|p| p != zero), "guest0 page {gpa:#x}: {p:?}");
        assert_eq!(pfn(1, gpa), p, "domain a shares page {gpa:#x}");
    }
    for (i, g) in GUESTS.iter().enumerate() {
        let dups: HashSet<_> = layout.dup().iter().map(|&gpa| pfn(i, gpa)).collect();
        assert_eq!(dups.len(), 1, "{g}'s dup pages: {dups:?}");
    }
    let b_shared: HashSet<_> = layout.shared().iter().map(|&gpa| pfn(2, gpa)).collect();
    assert_eq!(
        b_shared.len(),
        KINDS.shared,
        "guest2's lone pages: {b_shared:?}"
    );
    // No non-zero physical page of domain a, anywhere in its guests' RAM, is mapped by b.
    let nonzero = |guest: usize| -> HashSet<u64> {
        pfns[guest]
            .iter()
            .flatten()
            .copied()
            .filter(|&p| p != zero)
            .collect()
    };
    let in_a: HashSet<u64> = nonzero(0).union(&nonzero(1)).copied().collect();
    let in_b = nonzero(2);
    assert!(
        in_b.len() > KINDS.shared,
        "guest2 maps {} pages",
        in_b.len()
    );
    let crossing: Vec<_> = in_b.intersection(&in_a).collect();
    assert!(
        crossing.is_empty(),
        "domains a and b share physical pages {crossing:x?}"
    );

    for g in GUESTS {
        vmm.probe_of(g).exit(0);
    }
    assert_eq!(vmm.exit_code(), 0, "{}", vmm.transcript());
}
