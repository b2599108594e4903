//! The statistics of `vmm --dedup` as users read them: `GET /stats` and the `--stats-json`
//! file have the documented, stable field names (globally and per guest, with each guest's
//! name and trust domain, the engine's phase times, health and the figures' freshness), the
//! file is replaced atomically, `GET /metrics` is Prometheus text with the health families, and
//! a one-line summary goes to stderr every interval. While the engine does not scan (the memory
//! guard paused merging, `run` 0 or 2), the page figures are marked stale.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use vmm_sys_util::tempdir::TempDir;
use vmm_sys_util::tempfile::TempFile;
use vmm_tests::{
    ApiClient, DedupImages, Kinds, ProbeGuest, ProbeProtocol, STATS_FIELDS, VmmProcess,
    assert_stats_shape, field, guest_stats, settled, temp_file_with, wait_until,
};

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

/// The value of the Prometheus sample `series` (`name{labels}`) in `body`.
fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in\n{body}"))
        .parse()
        .unwrap()
}

/// Two `probe` guests started from the first image of `layout` with `--dedup`, the API socket and
/// statistics every 100 ms, plus `extra` arguments; returns once both guests and the API are
/// ready (the folder holds the socket and whatever `extra` names in it).
fn start(
    probe: &ProbeGuest,
    dir: &TempDir,
    layout: &DedupImages,
    extra: &[&str],
) -> (VmmProcess, ApiClient, TempFile) {
    let sock = dir.as_path().join("api.sock");
    let image = temp_file_with(&layout.images[0]);
    let mut args = vec![
        "--guests",
        "2",
        "--mem-image",
        image.as_path().to_str().unwrap(),
        "--dedup",
        "--api-sock",
        sock.to_str().unwrap(),
        "--stats-interval",
        "100ms",
    ];
    args.extend(extra);
    let mut vmm = probe.spawn("16M", &args);
    vmm.wait_probes_ready(["guest0", "guest1"]);
    let api = ApiClient::ready(&sock);
    (vmm, api, image)
}

#[test]
fn stats_json_file_api_metrics_and_summary_line_agree_on_documented_fields() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let json = dir.as_path().join("stats.json");
    let layout = DedupImages::new(
        2,
        Kinds {
            dup: 4,
            shared: 4,
            unique: 1,
            zero: 0,
        },
        91,
    );
    let probe = ProbeGuest::new();
    let (mut vmm, api, _image) = start(
        &probe,
        &dir,
        &layout,
        &[
            "--dedup-domain",
            "tenant-a",
            "--stats-json",
            json.to_str().unwrap(),
        ],
    );
    let stats = settled(&api);
    assert_stats_shape(&stats);
    assert_eq!(stats["mode"], "dedup");
    assert!(field(&stats, "pages_sharing") > 0, "{stats}");
    // The engine's figures beyond KSM's: merges, and the time per phase of its steps.
    assert!(field(&stats, "merges") > 0, "{stats}");
    assert!(field(&stats, "merge_attempts") >= field(&stats, "merges"));
    assert!(field(&stats, "wall_ns") > 0, "{stats}");
    let phases = &stats["phases"];
    assert_eq!(
        keys(phases),
        ["account_ns", "commit_ns", "fill_ns", "plan_ns", "scan_ns"]
            .map(String::from)
            .into(),
        "{stats}"
    );
    // Pages were scanned and merged: those phases took time. The wall-time phases stay within
    // the steps' wall time (fill_ns is summed over threads and overlaps commit_ns).
    for p in ["scan_ns", "plan_ns", "commit_ns", "account_ns"] {
        assert!(field(phases, p) > 0, "{p}: {stats}");
    }
    let wall: u64 = ["scan_ns", "plan_ns", "commit_ns", "account_ns"]
        .iter()
        .map(|p| field(phases, p))
        .sum();
    assert!(wall <= field(&stats, "wall_ns"), "{stats}");
    assert!(phases["fill_ns"].is_u64(), "{stats}");
    // Scanning: the figures follow the guests.
    assert_eq!(stats["figures"]["stale"], false, "{stats}");
    assert!(stats["figures"]["reason"].is_null(), "{stats}");
    assert!(field(&stats["figures"], "as_of_unix_ms") > 0, "{stats}");
    assert!(stats["figures"]["age_ms"].is_u64(), "{stats}");
    let names: Vec<&str> = stats["guests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["guest0", "guest1"]);
    for g in ["guest0", "guest1"] {
        assert_eq!(guest_stats(&stats, g)["domain"], "tenant-a");
    }
    // Totals are the sums of the guests' figures.
    for f in [
        "pages_sharing",
        "pages_unshared",
        "zero_pages",
        "cow_breaks",
        "bytes_saved",
    ] {
        let sum: u64 = stats["guests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| field(g, f))
            .sum();
        assert_eq!(field(&stats, f), sum, "{f}");
    }

    // The file: the same object, rewritten every interval, always whole.
    let read = || -> Value {
        let text = std::fs::read_to_string(&json).unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"))
    };
    wait_until(
        "the stats file to catch up",
        || field(&read(), "full_scans") >= field(&stats, "full_scans"),
        || format!("{}", read()),
    );
    let file = read();
    assert_stats_shape(&file);
    assert_eq!(keys(&file), keys(&stats));
    assert_eq!(keys(&file["guests"][0]), keys(&stats["guests"][0]));
    // Readers never see a half-written file.
    for _ in 0..200 {
        assert_stats_shape(&read());
    }
    assert!(
        std::fs::read_dir(dir.as_path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".tmp")),
        "a temporary file was left behind"
    );

    // Prometheus text: every documented figure, for the process and for each guest.
    let metrics = api.get("/metrics");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .header("content-type")
            .unwrap()
            .starts_with("text/plain"),
        "{:?}",
        metrics.headers
    );
    for f in STATS_FIELDS {
        let counter = matches!(*f, "pages_scanned" | "full_scans" | "cow_breaks");
        let name = if counter {
            format!("vmm_{f}_total")
        } else {
            format!("vmm_{f}")
        };
        let kind = if counter { "counter" } else { "gauge" };
        assert!(
            metrics.body.contains(&format!("# TYPE {name} {kind}\n")),
            "{name}"
        );
        for g in ["", "guest0", "guest1"] {
            let domain = if g.is_empty() { "" } else { "tenant-a" };
            let sample = format!("{name}{{mode=\"dedup\",guest=\"{g}\",domain=\"{domain}\"}} ");
            assert!(metrics.body.contains(&sample), "{sample}\n{}", metrics.body);
        }
    }

    // With --dedup, the merge counters and the health families, for the process.
    for line in [
        "# TYPE vmm_merges_total counter\n",
        "# TYPE vmm_merge_attempts_total counter\n",
        "vmm_degraded{mode=\"dedup\"} 0\n",
        "vmm_degraded_cause{mode=\"dedup\",cause=\"pool\"} 0\n",
        "vmm_degraded_cause{mode=\"dedup\",cause=\"memory_pressure\"} 0\n",
        "# TYPE vmm_merge_failures_total counter\n",
        "vmm_merge_failures_total{mode=\"dedup\",cause=\"differed\"} ",
        "vmm_merge_failures_total{mode=\"dedup\",cause=\"vma_limit\"} 0\n",
        "vmm_pool_errors_total{mode=\"dedup\"} 0\n",
        "# TYPE vmm_guard_repairs_total counter\n",
        "# TYPE vmm_guarded_writes_total counter\n",
        "vmm_merging_paused{mode=\"dedup\"} 0\n",
        "vmm_memory_level{mode=\"dedup\",level=\"ok\"} 1\n",
        "vmm_memory_level{mode=\"dedup\",level=\"pressure\"} 0\n",
        "vmm_memory_level{mode=\"dedup\",level=\"critical\"} 0\n",
        "vmm_memory_host_available_bytes{mode=\"dedup\"} ",
        "vmm_figures_stale{mode=\"dedup\"} 0\n",
        "# TYPE vmm_figures_age_seconds gauge\n",
    ] {
        assert!(metrics.body.contains(line), "{line}\n{}", metrics.body);
    }
    let merges = metric(&metrics.body, "vmm_merges_total{mode=\"dedup\"}");
    assert!(merges >= field(&stats, "merges") as f64, "{}", metrics.body);

    // The summary line on stderr at start and every interval after, and once more at exit.
    for _ in 0..2 {
        vmm.wait_stderr("vmm: stats: mode=dedup shared=");
    }
    vmm.send_line("X 0");
    assert_eq!(vmm.exit_code(), 0, "{}", vmm.transcript());
    let out = vmm.transcript();
    assert!(
        out.contains("[stderr] vmm: stats (final): mode=dedup shared="),
        "{out}"
    );
    // The file holds the final figures, and the socket is gone.
    assert_stats_shape(&read());
    assert!(!api.path().exists());
}

/// The page figures of a statistics object: what the engine counts only while it scans.
fn page_figures(s: &Value) -> [u64; 6] {
    [
        "pages_shared",
        "pages_sharing",
        "pages_unshared",
        "pages_volatile",
        "cow_breaks",
        "bytes_saved",
    ]
    .map(|f| field(s, f))
}

fn as_of(s: &Value) -> u64 {
    field(&s["figures"], "as_of_unix_ms")
}

#[test]
fn page_figures_are_marked_stale_while_the_engine_does_not_scan() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let layout = DedupImages::new(
        2,
        Kinds {
            dup: 32,
            shared: 0,
            unique: 2,
            zero: 0,
        },
        53,
    );
    let probe = ProbeGuest::new();
    let (mut vmm, api, _image) = start(&probe, &dir, &layout, &[]);
    let merged = settled(&api);
    assert!(field(&merged, "pages_sharing") >= 32, "{merged}");
    assert_eq!(merged["figures"]["stale"], false, "{merged}");

    // Provoke the memory guard without a memory cgroup: the host's RAM in use is above 1%.
    api.set(r#"{"mem_pressure_percent": 1}"#);
    api.wait_stats("the memory guard to pause merging", |s| {
        s["merging_paused"] == true
    });
    // A step under way when the guard paused may still publish once; then nothing changes.
    let last = RefCell::new(api.stats());
    wait_until(
        "the figures to stop changing",
        || {
            std::thread::sleep(Duration::from_millis(300));
            let now = api.stats();
            let same = as_of(&now) == as_of(&last.borrow());
            *last.borrow_mut() = now;
            same
        },
        || format!("{}", last.borrow()),
    );
    let before = last.into_inner();
    assert_eq!(before["figures"]["stale"], true, "{before}");
    assert_eq!(before["figures"]["reason"], "memory_pressure", "{before}");

    // Guest writes unshare merged pages, but nothing counts them: the figures and their date
    // stay, their age grows, and every view says so.
    let dup = layout.dup();
    let written = 8;
    for (i, &gpa) in dup.iter().take(written).enumerate() {
        vmm.probe_of("guest0").fill(gpa, 0x57a1_e000 + i as u64);
    }
    let after = api.stats();
    assert_eq!(after["figures"]["stale"], true, "{after}");
    assert_eq!(as_of(&after), as_of(&before), "{after}");
    assert!(
        field(&after["figures"], "age_ms") > field(&before["figures"], "age_ms"),
        "{before}\n{after}"
    );
    assert_eq!(page_figures(&after), page_figures(&before), "{after}");
    let metrics = api.get("/metrics").body;
    assert_eq!(metric(&metrics, "vmm_figures_stale{mode=\"dedup\"}"), 1.0);
    assert_eq!(metric(&metrics, "vmm_merging_paused{mode=\"dedup\"}"), 1.0);
    assert_eq!(
        metric(
            &metrics,
            "vmm_memory_level{mode=\"dedup\",level=\"pressure\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "vmm_degraded_cause{mode=\"dedup\",cause=\"memory_pressure\"}"
        ),
        1.0
    );
    assert!(metric(&metrics, "vmm_figures_age_seconds{mode=\"dedup\"}") > 0.0);
    let line = vmm.wait_stderr(" memory=pressure stale=");
    assert!(
        line.text.starts_with("vmm: stats: mode=dedup "),
        "{}",
        line.text
    );

    // Merging resumes: the figures are fresh again and count the writes made meanwhile.
    api.set(r#"{"mem_pressure_percent": 90}"#);
    let resumed = api.wait_stats("the figures to catch up after the pause", |s| {
        s["merging_paused"] == false
            && s["figures"]["stale"] == false
            && field(s, "cow_breaks") >= field(&before, "cow_breaks") + written as u64
    });
    assert!(resumed["figures"]["reason"].is_null(), "{resumed}");
    assert!(as_of(&resumed) > as_of(&before), "{resumed}");

    // Stopped through the API, and idle after unmerging: stale too, with the reason.
    let stopped = api.set(r#"{"run": 0}"#);
    assert_eq!(stopped["run"], 0);
    let s = api.stats();
    assert_eq!(s["figures"]["stale"], true, "{s}");
    assert_eq!(s["figures"]["reason"], "stopped", "{s}");
    let unmerged = api.request("POST", "/unmerge", None);
    assert_eq!(unmerged.status, 200, "{}", unmerged.body);
    let s = unmerged.json();
    assert_eq!(s["figures"]["reason"], "unmerged", "{s}");
    assert_eq!(field(&s, "pages_sharing"), 0, "{s}");

    vmm.send_line("X 0");
    assert_eq!(vmm.exit_code(), 0, "{}", vmm.transcript());
}
