//! Memory pressure: two probe guests whose duplicate pages are merged run in a memory cgroup of
//! their own, whose limit is then set between the merged and the un-deduplicated size. The
//! guests unshare every merged page, one write at a time. The VMM's memory guard
//!
//! 1. pauses merging at `mem_pressure_percent` (75% here, leaving room to check every page) of
//!    the limit, logs it, shows it in
//!    `/stats` (`merging_paused`, `memory.level`, a `memory_pressure` reason) and refuses `run`
//!    and unmerging meanwhile; every page written so far holds what was written;
//! 2. at `mem_stop_percent` (default 98%) stops every guest, prints one `vmm: error: out of
//!    memory: ...` line and exits with status 1, before the kernel fails a charge (the kernel
//!    reports no OOM).
//!
//! The cgroup is created under the memory controller's mount (cgroup v1 `memory`, or cgroup v2
//! with the memory controller enabled at its root), the child joins it before exec, and it is
//! removed afterwards. The kernel's OOM killer stays on, as `docs/operations.md` recommends: had
//! the guard been too late, the VMM would have been killed (and the test would say so).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use test_guests::{filled_page_checksum, page_checksum};
use vmm::cgroup::{self, CgroupReader, Version};
use vmm_sys_util::tempdir::TempDir;
use vmm_tests::{
    ApiClient, DedupImages, Kinds, ProbeGuest, ProbeProtocol, VmmProcess, field,
    join_cgroup_on_spawn, settled,
};

const GUESTS: [&str; 2] = ["guest0", "guest1"];
const DUP: usize = 2048;
const KINDS: Kinds = Kinds {
    dup: DUP,
    shared: 0,
    unique: 16,
    zero: 0,
};

/// A memory cgroup made for the test, removed when dropped.
struct TestCgroup {
    place: cgroup::Place,
}

impl TestCgroup {
    /// A new cgroup under the memory controller's mount, or `None` (with the reason) when
    /// there is none this test can use.
    fn create() -> Result<Self, String> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        // Where the hierarchy root is: as if this process were in the root cgroup.
        let root = cgroup::locate("1:memory:/\n0::/\n", &mountinfo)
            .ok_or("no memory cgroup hierarchy is mounted")?;
        if root.version == Version::V2 {
            let control = std::fs::read_to_string(root.mount.join("cgroup.subtree_control"))
                .unwrap_or_default();
            if !control.split_whitespace().any(|c| c == "memory") {
                return Err(format!(
                    "cgroup v2 at {} does not enable the memory controller",
                    root.mount.display()
                ));
            }
        }
        let name = format!("vmm-pressure-{}", std::process::id());
        let dir = root.mount.join(&name);
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let cg = Self {
            place: cgroup::Place {
                version: root.version,
                path: format!("/{name}"),
                mount: root.mount,
                dir,
            },
        };
        Ok(cg)
    }

    fn write(&self, file: &str, value: &str) {
        let path = self.place.dir.join(file);
        std::fs::write(&path, value)
            .unwrap_or_else(|e| panic!("cannot write {value} to {}: {e}", path.display()));
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.place.dir.join(file)).unwrap()
    }

    fn set_limit(&self, bytes: u64) {
        match self.place.version {
            Version::V1 => self.write("memory.limit_in_bytes", &bytes.to_string()),
            Version::V2 => self.write("memory.max", &bytes.to_string()),
        }
    }

    fn figures(&self) -> cgroup::Figures {
        CgroupReader::open(self.place.clone())
            .unwrap()
            .read()
            .unwrap()
    }

    /// The file a process writes its pid to, to join.
    fn procs(&self) -> PathBuf {
        self.place.dir.join("cgroup.procs")
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // The child is gone by now (its handle is dropped first); the kernel may need a moment
        // to let go of the cgroup.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.place.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!("warning: could not remove {}", self.place.dir.display());
    }
}

/// The value guest `g` writes over its duplicate page `p`: unique, so nothing merges again.
fn value(g: usize, p: usize) -> u64 {
    0xa000_0000_0000 | ((g as u64) << 32) | p as u64
}

fn causes(s: &Value) -> Vec<String> {
    s["degraded_reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["cause"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn guests_unsharing_in_a_memory_cgroup_pause_merging_then_stop_cleanly() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let cg = match TestCgroup::create() {
        Ok(cg) => cg,
        Err(why) => {
            vmm_tests::skip_for(&why);
            return;
        }
    };
    let dir = TempDir::new().unwrap();
    let probe = ProbeGuest::new();
    let layout = DedupImages::new(2, KINDS, 91);
    let files: Vec<_> = layout
        .images
        .iter()
        .map(|i| vmm_tests::temp_file_with(i))
        .collect();
    let sock = dir.as_path().join("api.sock");
    let mut args = probe.args(
        "24M",
        &[
            "--guests",
            "2",
            "--dedup",
            "--dedup-opt",
            "mem_pressure_percent=75",
            "--stats-interval",
            "200ms",
            "--api-sock",
            sock.to_str().unwrap(),
        ],
    );
    for f in &files {
        args.extend(["--mem-image".into(), f.as_path().into()]);
    }
    let mut command = Command::new(vmm_tests::vmm_bin());
    command.args(args);
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cg.procs())
        .unwrap();
    join_cgroup_on_spawn(&mut command, &procs).unwrap();
    let mut vmm = VmmProcess::start(&mut command);
    vmm.wait_probes_ready(GUESTS);
    let api = ApiClient::ready(&sock);
    let merged = settled(&api);
    assert!(
        field(&merged, "pages_sharing") >= 2 * DUP as u64 - 16,
        "{merged}"
    );
    assert_eq!(
        merged["memory"]["cgroup"]["path"], cg.place.path,
        "{merged}"
    );
    assert!(
        merged["memory"]["cgroup"]["limit_bytes"].is_null(),
        "{merged}"
    );

    // Limit: pressure (75%) after about half of the merged pages are unshared; everything
    // unshared would not fit, even with the 1 MiB the guard keeps.
    let gap = (2 * DUP * 4096) as u64;
    let merged_size = cg.figures().working_set();
    let limit = (merged_size + gap / 2) * 100 / 75 / 4096 * 4096;
    assert!(
        limit + (1 << 20) < merged_size + gap,
        "{merged_size} + {gap}"
    );
    cg.set_limit(limit);
    let limited = api.wait_stats("the guard to see the limit", |s| {
        s["memory"]["cgroup"]["limit_bytes"] == limit
    });
    assert_eq!(limited["merging_paused"], false, "{limited}");

    // Unshare, guest by guest, page by page, until the guard pauses merging.
    let dup = layout.dup();
    let mut written: Vec<(usize, usize)> = Vec::new();
    let mut next = (0..DUP).flat_map(|p| (0..2).map(move |g| (g, p)));
    let paused = loop {
        let (g, p) = next
            .next()
            .expect("every page unshared without memory pressure");
        vmm.probe_of(GUESTS[g]).fill(dup[p], value(g, p));
        written.push((g, p));
        if written.len() % 16 == 0 {
            let s = api.stats();
            if s["merging_paused"] == true {
                break s;
            }
        }
    };
    assert_eq!(paused["memory"]["level"], "pressure", "{paused}");
    assert!(
        causes(&paused).contains(&"memory_pressure".into()),
        "{paused}"
    );
    // Paused at 75%; it stays paused until 5 points below, and the working set it reports now
    // may have moved since.
    assert!(
        field(&paused["memory"]["cgroup"], "percent") >= 70,
        "{paused}"
    );
    vmm.wait_stderr("memory pressure: memory cgroup");
    assert_eq!(api.config()["run"], 0);
    let refused = api.patch_config(r#"{"run": 1}"#);
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert!(
        refused.error().contains("memory pressure"),
        "{}",
        refused.body
    );
    let refused = api.request("POST", "/unmerge", None);
    assert_eq!(refused.status, 409, "{}", refused.body);

    // Nothing written so far is lost; pages not yet written still read their merged content.
    for &(g, p) in &written {
        let sum = vmm.probe_of(GUESTS[g]).checksum(dup[p]);
        assert_eq!(
            sum,
            filled_page_checksum(value(g, p)),
            "{} page {p}",
            GUESTS[g]
        );
    }
    let untouched = page_checksum(layout.page(0, dup[0]));
    for &(g, p) in next.clone().collect::<Vec<_>>().iter().step_by(97) {
        assert_eq!(vmm.probe_of(GUESTS[g]).checksum(dup[p]), untouched);
    }

    eprintln!(
        "paused at {} bytes of {limit}; {} bytes after checking {} pages",
        field(&paused["memory"]["cgroup"], "working_set_bytes"),
        cg.figures().working_set(),
        written.len()
    );

    // Go on unsharing until the guard stops the guests.
    let mut after = 0;
    for (g, p) in next {
        let cmd = format!("F {:x} {:x}", dup[p], value(g, p));
        match vmm.probe_of(GUESTS[g]).try_request(&cmd) {
            Some(reply) => assert!(reply.starts_with("OK "), "{reply}"),
            None => break,
        }
        after += 1;
    }
    let status = vmm.wait_exit();
    assert_eq!(
        status.code(),
        Some(1),
        "after {after} more writes: {status}\n{}",
        vmm.transcript()
    );
    let error = vmm.wait_stderr("vmm: error: out of memory: memory cgroup ");
    assert!(error.text.contains(&cg.place.path), "{}", error.text);
    assert!(
        error.text.contains("every guest was stopped"),
        "{}",
        error.text
    );
    vmm.wait_stderr("stats (final): ");
    let oom = cg.read(match cg.place.version {
        Version::V1 => "memory.oom_control",
        Version::V2 => "memory.events",
    });
    for key in ["under_oom", "oom_kill", "oom"] {
        assert_eq!(cgroup::keyed(&oom, key).unwrap_or(0), 0, "{key}: {oom}");
    }
}
