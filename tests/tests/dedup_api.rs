//! The control API of `vmm --dedup` against real guests: knobs changed at run time take effect
//! (`run`, `max_page_sharing`, the tuners), unmerge-all gives every guest page back as a private
//! page with its content, and bad requests get a 4xx with a JSON error while the VMM keeps
//! serving.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test

use std::path::Path;

use serde_json::Value;
use test_guests::{filled_page_checksum, page_checksum};
use vmm_sys_util::tempdir::TempDir;
use vmm_sys_util::tempfile::TempFile;
use vmm_tests::{
    ApiClient, DedupImages, Kinds, ProbeGuest, ProbeProtocol, VmmProcess, after_passes, field,
    settled, temp_file_with,
};

const MEM: &str = "16M";
const KINDS: Kinds = Kinds {
    dup: 8,
    shared: 4,
    unique: 2,
    zero: 4,
};

/// Starts one probe guest per image (one without images) with `--dedup`, the API on
/// `dir/api.sock` and `extra` arguments; waits until the guests and the API are ready.
fn start(
    probe: &ProbeGuest,
    dir: &Path,
    images: &[&str],
    extra: &[&str],
) -> (VmmProcess, ApiClient) {
    let sock = dir.join("api.sock");
    let count = images.len().max(1);
    let guests = count.to_string();
    let mut args = vec![
        "--guests",
        &guests,
        "--dedup",
        "--api-sock",
        sock.to_str().unwrap(),
    ];
    for i in images {
        args.extend(["--mem-image", i]);
    }
    args.extend(extra);
    let mut vmm = probe.spawn(MEM, &args);
    if count == 1 {
        vmm.probe().wait_ready();
    } else {
        vmm.wait_probes_ready((0..count).map(|g| format!("guest{g}")));
    }
    let api = ApiClient::ready(sock);
    (vmm, api)
}

/// The images of `layout` in temporary files.
fn image_files(layout: &DedupImages) -> Vec<TempFile> {
    layout.images.iter().map(|i| temp_file_with(i)).collect()
}

fn paths(files: &[TempFile]) -> Vec<&str> {
    files
        .iter()
        .map(|f| f.as_path().to_str().unwrap())
        .collect()
}

/// Kilobytes of pool (memfd) pages mapped in process `pid` that are not private anonymous
/// copies: pages still shared through the pool.
fn pool_shared_kib(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let (mut rss, mut anon, mut inside) = (0, 0, false);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            inside = line.contains("vm-dedup-pool");
            continue;
        }
        let kib = || {
            line.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if inside && line.starts_with("Rss:") {
            rss += kib();
        } else if inside && line.starts_with("Anonymous:") {
            anon += kib();
        }
    }
    rss - anon
}

#[test]
fn run_and_max_page_sharing_set_through_the_api_take_effect() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let probe = ProbeGuest::new();
    let layout = DedupImages::new(2, KINDS, 61);
    let files = image_files(&layout);
    let (mut vmm, api) = start(
        &probe,
        dir.as_path(),
        &paths(&files),
        &["--dedup-opt", "run=0"],
    );

    // Stopped from the start: the guests work, nothing is scanned or merged.
    assert_eq!(api.config()["run"], 0);
    for gpa in layout.all() {
        vmm.probe_of("guest0").checksum(gpa);
    }
    let stopped = api.stats();
    assert_eq!(field(&stopped, "full_scans"), 0, "{stopped}");
    assert_eq!(field(&stopped, "pages_shared"), 0, "{stopped}");

    // max_page_sharing can be lowered while nothing is merged.
    let config = api.set(r#"{"max_page_sharing": 2, "pages_to_scan": 2048, "sleep_millisecs": 5}"#);
    assert_eq!(config["max_page_sharing"], 2);
    assert_eq!(config["pages_to_scan"], 2048);
    assert_eq!(config["sleep_millisecs"], 5);
    assert_eq!(api.set(r#"{"run": 1}"#)["run"], 1);
    let merged = settled(&api);
    // At most two pages per copy: the 16 equal pages of the dup group alone need 8 copies,
    // and no copy has more than one page sharing it.
    let want = layout.expected(2);
    assert!(
        field(&merged, "pages_shared") >= want.pages_shared,
        "{merged}"
    );
    assert!(
        field(&merged, "pages_sharing") <= field(&merged, "pages_shared"),
        "max_page_sharing=2 not respected: {merged}"
    );
    // Knobs that need nothing merged are refused now, like KSM's EBUSY.
    let busy = api.patch_config(r#"{"merge_across_nodes": 0}"#);
    assert_eq!(busy.status, 409, "{}", busy.body);
    assert!(busy.error().contains("merge_across_nodes"), "{}", busy.body);

    // Stopped again: new duplicates stay unmerged while guests keep working...
    assert_eq!(api.set(r#"{"run": 0}"#)["run"], 0);
    let before = api.stats();
    let (a, b) = (layout.zero()[0], layout.zero()[1]);
    vmm.probe_of("guest0").fill(a, 0xabc);
    vmm.probe_of("guest0").fill(b, 0xabc);
    for gpa in layout.all() {
        vmm.probe_of("guest1").checksum(gpa);
    }
    let still = api.stats();
    assert_eq!(field(&still, "full_scans"), field(&before, "full_scans"));
    assert_eq!(field(&still, "merges"), field(&before, "merges"));
    // ...and merge once it runs again.
    api.set(r#"{"run": 1}"#);
    let after = settled(&api);
    assert!(field(&after, "full_scans") > field(&before, "full_scans"));
    assert!(
        field(&after, "merges") > field(&before, "merges"),
        "{after}"
    );
    assert_eq!(
        vmm.probe_of("guest0").checksum(b),
        filled_page_checksum(0xabc)
    );

    vmm.send_line("X 0");
    assert_eq!(vmm.exit_code(), 0, "{}", vmm.transcript());
}

#[test]
fn unmerge_all_gives_back_private_pages_with_their_content() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let probe = ProbeGuest::new();
    let layout = DedupImages::new(2, KINDS, 62);
    let files = image_files(&layout);
    let (mut vmm, api) = start(&probe, dir.as_path(), &paths(&files), &[]);
    for &gpa in &layout.zero()[..2] {
        vmm.probe_of("guest1").fill(gpa, 0);
    }
    let merged = settled(&api);
    assert!(field(&merged, "pages_sharing") > 0, "{merged}");
    assert!(field(&merged, "zero_pages") >= 2, "{merged}");
    // The guests read their merged pages, so pool pages are mapped.
    for (i, g) in ["guest0", "guest1"].into_iter().enumerate() {
        for gpa in layout.dup().into_iter().chain(layout.shared()) {
            let sum = vmm.probe_of(g).checksum(gpa);
            assert_eq!(sum, page_checksum(layout.page(i, gpa)));
        }
    }
    assert!(pool_shared_kib(vmm.pid()) > 0, "no pool page is mapped");

    let r = api.request("POST", "/unmerge", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let unmerged: Value = r.json();
    for f in ["pages_shared", "pages_sharing", "zero_pages", "bytes_saved"] {
        assert_eq!(field(&unmerged, f), 0, "{f}: {unmerged}");
    }
    for g in unmerged["guests"].as_array().unwrap() {
        assert_eq!(field(g, "pages_sharing") + field(g, "zero_pages"), 0, "{g}");
    }
    assert_eq!(api.config()["run"], 2, "the scanner idles after unmerging");
    assert_eq!(pool_shared_kib(vmm.pid()), 0, "pool pages still mapped");

    // Every page reads as before, and nothing merges again while run=2.
    for (i, g) in ["guest0", "guest1"].into_iter().enumerate() {
        for gpa in layout.all() {
            let want = if layout.zero()[..2].contains(&gpa) && i == 1 {
                page_checksum(&[0; 4096])
            } else {
                page_checksum(layout.page(i, gpa))
            };
            assert_eq!(vmm.probe_of(g).checksum(gpa), want, "{g} {gpa:#x}");
        }
    }
    let idle = api.stats();
    assert_eq!(field(&idle, "pages_shared"), 0, "{idle}");
    assert_eq!(field(&idle, "full_scans"), field(&unmerged, "full_scans"));

    vmm.send_line("X 0");
    assert_eq!(vmm.exit_code(), 0, "{}", vmm.transcript());
}

#[test]
fn bad_requests_get_a_4xx_with_a_json_error_and_the_vmm_keeps_serving() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let probe = ProbeGuest::new();
    let (mut vmm, api) = start(&probe, dir.as_path(), &[], &[]);
    let before = api.config();

    let huge = format!(r#"{{"pages_to_scan": "{}"}}"#, "9".repeat(70_000));
    let cases: Vec<(&str, &str, Option<&str>, u16, &str)> = vec![
        ("GET", "/nope", None, 404, "endpoints"),
        ("DELETE", "/stats", None, 405, "GET"),
        ("GET", "/unmerge", None, 405, "POST"),
        ("POST", "/config", Some("{}"), 405, "PATCH"),
        ("PATCH", "/config", None, 400, "empty body"),
        ("PATCH", "/config", Some("{bad"), 400, "not valid JSON"),
        ("PATCH", "/config", Some("[1]"), 400, "not a JSON object"),
        (
            "PUT",
            "/config",
            Some(r#"{"frob": 1}"#),
            400,
            "unknown knob \"frob\"",
        ),
        (
            "PATCH",
            "/config",
            Some(r#"{"pages_to_scan": 0}"#),
            400,
            "pages_to_scan",
        ),
        (
            "PATCH",
            "/config",
            Some(r#"{"max_page_sharing": 1}"#),
            400,
            "max_page_sharing",
        ),
        ("PATCH", "/config", Some(r#"{"run": {"a": 1}}"#), 400, "run"),
        (
            "PATCH",
            "/config",
            Some(r#"{"tune": "fast"}"#),
            400,
            "advisor",
        ),
        (
            "PATCH",
            "/config",
            Some(r#"{"pages_to_scan": 100, "frob": 1}"#),
            400,
            "frob",
        ),
        (
            "PATCH",
            "/config",
            Some(r#"{"tune": "advisor", "pages_to_scan": 100}"#),
            409,
            "advisor tuner",
        ),
        ("PATCH", "/config", Some(&huge), 413, "larger than"),
    ];
    for (method, path, body, status, says) in cases {
        let r = api.request(method, path, body);
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        assert_eq!(r.header("content-type"), Some("application/json"));
        let msg = r.error();
        assert!(msg.contains(says), "{method} {path}: {msg}");
        if status == 405 {
            assert!(r.header("allow").is_some(), "405 without Allow");
        }
    }
    // Not HTTP at all: the server answers 4xx and goes on.
    let garbage = api.raw(b"HELLO THERE\r\n\r\n");
    assert!((400..500).contains(&garbage.status), "{garbage:?}");
    // Nothing changed, not even the good half of a refused request.
    assert_eq!(api.config(), before);
    assert_eq!(
        vmm.probe().read(0x10_0000),
        vmm_tests::u64_at(test_guests::PROBE, 0)
    );
    assert_eq!(api.get("/stats").status, 200);

    // A second VMM cannot take the live socket; a stale one is replaced.
    let sock = dir.as_path().join("api.sock");
    let mut second = probe.spawn(MEM, &["--api-sock", sock.to_str().unwrap()]);
    assert_eq!(second.exit_code(), 2, "{}", second.transcript());
    assert!(second.transcript().contains("another process is listening"));
    // A path that is not a socket fails the start before any statistics line, and is kept.
    let file = dir.as_path().join("not-a-socket");
    std::fs::write(&file, b"keep").unwrap();
    let mut refused = probe.spawn(MEM, &["--dedup", "--api-sock", file.to_str().unwrap()]);
    assert_eq!(refused.exit_code(), 2, "{}", refused.transcript());
    let said = refused.transcript();
    assert!(said.contains("is not a socket"), "{said}");
    assert!(
        !said.contains("stats"),
        "statistics before the start failed: {said}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    vmm.probe().exit(0);
    assert_eq!(vmm.exit_code(), 0, "{}", vmm.transcript());
    std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let (mut third, api) = start(&probe, dir.as_path(), &[], &[]);
    assert_eq!(api.get("/stats").status, 200);
    third.probe().exit(0);
    assert_eq!(third.exit_code(), 0, "{}", third.transcript());
}

#[test]
fn the_advisor_and_the_pressure_tuner_set_the_knobs_they_own() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let probe = ProbeGuest::new();
    let layout = DedupImages::new(2, KINDS, 63);
    let files = image_files(&layout);
    let (mut vmm, api) = start(
        &probe,
        dir.as_path(),
        &paths(&files),
        &[
            "--dedup-tune",
            "advisor",
            "--dedup-opt",
            "advisor_max_cpu=30,tune_interval_ms=20,pages_to_scan=4096",
        ],
    );
    // Small guests: a full pass costs little, so the advisor lowers pages_to_scan to stretch
    // the pass toward its 2 s target, and caps the CPU.
    let config = api.wait_config("the advisor to lower pages_to_scan", |c| {
        field(c, "pages_to_scan") < 4096
    });
    assert_eq!(config["tune"], "advisor");
    assert_eq!(config["max_cpu_percent"], 30);
    let owned = api.patch_config(r#"{"pages_to_scan": 1000}"#);
    assert_eq!(owned.status, 409, "{}", owned.body);
    // Switching the tuner off gives the knob back.
    api.set(r#"{"tune": "fixed", "pages_to_scan": 1000}"#);
    after_passes(&api, &api.stats(), 3);
    assert_eq!(api.config()["pages_to_scan"], 1000);

    // Pressure: with at least 1 % of RAM available, memory is plentiful: the scan stops.
    api.set(r#"{"tune": "pressure", "pressure_low_percent": 0, "pressure_high_percent": 1}"#);
    api.wait_config("the pressure tuner to stop the scan", |c| c["run"] == 0);
    let host = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib = |name: &str| -> u64 {
        host.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let available = kib("MemAvailable:") * 100 / kib("MemTotal:");
    if available <= 97 {
        // Short of memory by these thresholds: it runs and scans harder.
        api.set(r#"{"pressure_low_percent": 99, "pressure_high_percent": 100}"#);
        api.wait_config("the pressure tuner to start and boost the scan", |c| {
            c["run"] == 1 && field(c, "pages_to_scan") > 256
        });
        let owned = api.patch_config(r#"{"run": 0}"#);
        assert_eq!(owned.status, 409, "{}", owned.body);
        assert!(field(&settled(&api), "pages_shared") > 0);
    } else {
        eprintln!("{available}% of RAM available: the pressure start case cannot be set up");
    }
    vmm.send_line("X 0");
    assert_eq!(vmm.exit_code(), 0, "{}", vmm.transcript());
}
