//! The statistics of `vmm --dedup` as users read them: `GET /stats` and the `--stats-json`
//! file have the documented, stable field names (globally and per guest, with each guest's
//! name and trust domain, and the engine's phase times), the file is replaced atomically,
//! `GET /metrics` is Prometheus text with the merge counters and health families, and a
//! one-line summary goes to stderr every interval.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test

use std::collections::BTreeSet;

use serde_json::Value;
use vmm_sys_util::tempdir::TempDir;
use vmm_tests::{
    ApiClient, DedupImages, Kinds, ProbeGuest, STATS_FIELDS, assert_stats_shape, field,
    guest_stats, settled, temp_file_with, wait_until,
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

#[test]
fn stats_json_file_api_metrics_and_summary_line_agree_on_documented_fields() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let sock = dir.as_path().join("api.sock");
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
    let image = temp_file_with(&layout.images[0]);
    let probe = ProbeGuest::new();
    let mut vmm = probe.spawn(
        "16M",
        &[
            "--guests",
            "2",
            "--mem-image",
            image.as_path().to_str().unwrap(),
            "--dedup",
            "--dedup-domain",
            "tenant-a",
            "--api-sock",
            sock.to_str().unwrap(),
            "--stats-json",
            json.to_str().unwrap(),
            "--stats-interval",
            "100ms",
        ],
    );
    vmm.probe_of("guest0").wait_ready();
    vmm.probe_of("guest1").wait_ready();
    let api = ApiClient::new(&sock);
    api.wait_ready();
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
    assert!(!sock.exists());
}
