//! `vmm` start-up time and memory overhead with the probe guest (issue 2, item 6).
//!
//! Run with `cargo bench -p vmm-benches --bench startup`. It builds the release `vmm` binary
//! (`cargo build --release -p vmm`; `VMM_BIN` uses another one), then measures:
//!
//! - start-up: from spawning `vmm` to the `PROBE READY` console line of every guest (the
//!   guest's first port exits), over [`RUNS`] runs, against spawning `vmm --version` (process
//!   start and exit without KVM) as the baseline of the same run;
//! - memory: the VMM process's PSS with idle probe guests, minus the PSS of the guest RAM
//!   mappings (what the guests and the VMM's boot setup touched), for 1 and 4 guests.
//!
//! Kernel memory for KVM (shadow page tables, vCPU state) is not part of a process's PSS and is
//! not counted.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use vmm_benches::smaps::ProcessMemory;
use vmm_benches::summary::{Summary, millis};
use vmm_tests::{ProbeGuest, Stream, VmmProcess};

/// Runs per start-up figure.
const RUNS: usize = 20;
/// Runs per memory figure (the median is reported).
const MEMORY_RUNS: usize = 5;
/// Guest RAM per guest (also how the guest RAM mappings are found in smaps).
const GUEST_MEM: &str = "64M";
/// [`GUEST_MEM`] in bytes.
const GUEST_MEM_BYTES: u64 = 64 << 20;
/// Guest counts measured.
const GUEST_COUNTS: [u32; 2] = [1, 4];
/// Pause after the guests are ready and before reading smaps, so start-up work settles.
const SETTLE: Duration = Duration::from_millis(200);

/// Builds the release `vmm` binary next to this bench (unless `VMM_BIN` names one) and
/// returns its path.
fn release_vmm() -> PathBuf {
    if std::env::var_os("VMM_BIN").is_none() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        eprintln!("building the release vmm binary (cargo build --release -p vmm) ...");
        let status = Command::new(&cargo)
            .args(["build", "--release", "-p", "vmm", "--bin", "vmm"])
            .current_dir(vmm_tests::workspace_root())
            .stdin(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("cannot run {cargo:?}: {e}"));
        assert!(
            status.success(),
            "cargo build --release -p vmm failed: {status}"
        );
    }
    // The bench runs from target/release/deps, where `cargo build --release` put `vmm` one up.
    vmm_tests::vmm_bin()
}

/// Starts `guests` probe guests and waits for all of them to print `PROBE READY`; returns
/// the process and the time from spawn to the last ready line.
fn start_probes(vmm_bin: &Path, probe: &ProbeGuest, guests: u32) -> (VmmProcess, Duration) {
    let count = guests.to_string();
    let mut command = Command::new(vmm_bin);
    command.args(probe.args(GUEST_MEM, &["--guests", &count]));
    let mut vmm = VmmProcess::start(&mut command);
    let mut last = vmm.spawned_at();
    for _ in 0..guests {
        let line = vmm.wait_for("a PROBE READY line", |l| {
            l.stream == Stream::Stdout && l.text.ends_with("PROBE READY vcpus=1")
        });
        last = last.max(line.at);
    }
    let elapsed = last.duration_since(vmm.spawned_at());
    (vmm, elapsed)
}

/// Stops every guest through the probe and checks the clean exit.
fn stop(mut vmm: VmmProcess) {
    vmm.send_line("X 0");
    assert_eq!(vmm.exit_code(), 0, "{}", vmm.transcript());
}

/// Time to spawn `vmm --version` and see it exit.
fn baseline(vmm_bin: &Path) -> Duration {
    let start = Instant::now();
    let status = Command::new(vmm_bin)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", vmm_bin.display()));
    assert!(status.success(), "vmm --version: {status}");
    start.elapsed()
}

/// Repeats `run` [`RUNS`] times, printing a dot per run.
fn repeat(what: &str, mut run: impl FnMut() -> Duration) -> Summary<Duration> {
    eprint!("{what}: ");
    let times: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let t = run();
            eprint!(".");
            t
        })
        .collect();
    eprintln!(" done");
    Summary::of(&times).unwrap_or_else(|| unreachable!("RUNS > 0"))
}

/// Memory of one VMM with `guests` idle probe guests, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Overhead {
    /// PSS beyond the guest RAM mappings (sorted on first, so medians are of this).
    overhead: u64,
    /// PSS of the whole process.
    total: u64,
    /// PSS of the guest RAM mappings.
    guest_ram: u64,
}

fn measure_memory(vmm_bin: &Path, probe: &ProbeGuest, guests: u32) -> Overhead {
    let (vmm, _) = start_probes(vmm_bin, probe, guests);
    thread::sleep(SETTLE);
    let memory = ProcessMemory::of(vmm.pid())
        .unwrap_or_else(|e| panic!("cannot read smaps of vmm {}: {e}", vmm.pid()));
    let Some(ram) = memory.guest_ram(u64::from(guests), GUEST_MEM_BYTES) else {
        panic!(
            "cannot tell the {guests} x {GUEST_MEM} of guest RAM apart in smaps of vmm {}",
            vmm.pid()
        );
    };
    let guest_ram = ram.iter().map(|m| m.pss_kib).sum();
    stop(vmm);
    Overhead {
        overhead: memory.pss_kib - guest_ram,
        total: memory.pss_kib,
        guest_ram,
    }
}

fn main() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let vmm_bin = release_vmm();
    eprintln!("vmm: {}", vmm_bin.display());
    let probe = ProbeGuest::new();

    let base = repeat("baseline: vmm --version", || baseline(&vmm_bin));
    let startups: Vec<(u32, Summary<Duration>)> = GUEST_COUNTS
        .iter()
        .map(|&guests| {
            let what = format!("start-up, {guests} guest(s)");
            let summary = repeat(&what, || {
                let (vmm, elapsed) = start_probes(&vmm_bin, &probe, guests);
                stop(vmm);
                elapsed
            });
            (guests, summary)
        })
        .collect();
    let memories: Vec<(u32, Overhead)> = GUEST_COUNTS
        .iter()
        .map(|&guests| {
            eprint!("memory, {guests} guest(s): ");
            let mut runs: Vec<Overhead> = (0..MEMORY_RUNS)
                .map(|_| {
                    let m = measure_memory(&vmm_bin, &probe, guests);
                    eprint!(".");
                    m
                })
                .collect();
            eprintln!(" done");
            runs.sort_unstable();
            (guests, runs[runs.len() / 2])
        })
        .collect();

    println!();
    println!(
        "vmm start-up: spawn to every guest's `PROBE READY` (probe guest, {GUEST_MEM} per guest), {RUNS} runs, ms"
    );
    println!(
        "  {:<34} {:>8} {:>8} {:>8} {:>8} {:>10}",
        "", "median", "p90", "min", "max", "x baseline"
    );
    let row = |name: &str, s: &Summary<Duration>| {
        println!(
            "  {name:<34} {:>8} {:>8} {:>8} {:>8} {:>10.1}",
            millis(s.median),
            millis(s.p90),
            millis(s.min),
            millis(s.max),
            s.median.as_secs_f64() / base.median.as_secs_f64()
        );
    };
    row("baseline: vmm --version", &base);
    for (guests, s) in &startups {
        row(&format!("{guests} guest(s) to PROBE READY"), s);
    }
    println!();
    println!(
        "vmm memory beyond guest RAM: PSS of idle probe guests ({GUEST_MEM} each), median of {MEMORY_RUNS} runs, KiB"
    );
    println!(
        "  {:>6} {:>10} {:>16} {:>10} {:>10} {:>14}",
        "guests", "PSS total", "guest RAM (PSS)", "overhead", "per guest", "% of guest RAM"
    );
    for (guests, m) in &memories {
        let per_guest = m.overhead / u64::from(*guests);
        println!(
            "  {guests:>6} {:>10} {:>16} {:>10} {:>10} {:>13.2}%",
            m.total,
            m.guest_ram,
            m.overhead,
            per_guest,
            per_guest as f64 * 1024.0 * 100.0 / GUEST_MEM_BYTES as f64
        );
    }
}
