//! `vmm` start-up time and memory overhead with the probe guest (issue 2, item 6).
//!
//! Run with `cargo bench -p vmm-benches --bench startup`. It builds the release `vmm` binary
//! (`cargo build --release -p vmm`; `VMM_BIN` uses another one), then measures:
//!
//! - start-up: from spawning `vmm` to the `PROBE READY` console line of every guest (the
//!   guest's first port exits), over [`RUNS`] runs, against spawning `vmm --version` (process
//!   start and exit without KVM) as the baseline of the same run;
//! - memory: the VMM process's PSS with idle probe guests, minus the PSS of their RAM (what
//!   the guests and the VMM's boot setup touched), for 1 and 4 guests. Each guest's RAM is
//!   found from a marker page its memory image puts at [`MARKER_GPA`]; where the kernel merged
//!   guest RAM with the anonymous memory next to it (a malloc arena's heap) into one mapping,
//!   the resident pages of that part, from the pagemap (not the shared zero page), count as the
//!   VMM's.
//!
//! Kernel memory for KVM (shadow page tables, vCPU state) is not part of a process's PSS and is
//! not counted.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use vmm_benches::smaps::ProcessMemory;
use vmm_benches::summary::{Summary, millis};
use vmm_tests::{ProbeGuest, ProcessPages, Stream, VmmProcess, pattern, temp_file_with, zero_pfn};

/// Runs per start-up figure.
const RUNS: usize = 20;
/// Runs per memory figure (the median is reported).
const MEMORY_RUNS: usize = 5;
/// Guest RAM per guest (also how the guest RAM mappings are found in smaps).
const GUEST_MEM: &str = "64M";
/// [`GUEST_MEM`] in bytes.
const GUEST_MEM_BYTES: u64 = 64 << 20;
/// Bytes in a page.
const PAGE: u64 = 4096;
/// Guest address of the page that marks where the memory bench finds each guest's RAM (above
/// the probe and what it touches).
const MARKER_GPA: u64 = 0x30_0000;
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
fn start_probes(
    vmm_bin: &Path,
    probe: &ProbeGuest,
    guests: u32,
    extra: &[&str],
) -> (VmmProcess, Duration) {
    let count = guests.to_string();
    let mut command = Command::new(vmm_bin);
    command.args(probe.args(GUEST_MEM, &["--guests", &count]));
    command.args(extra);
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
    // A memory image of one marker page tells where each guest's RAM is mapped.
    let marker = pattern(0x57a7_7a9e, PAGE as usize);
    let mut image = vec![0u8; (MARKER_GPA + PAGE) as usize];
    image[MARKER_GPA as usize..].copy_from_slice(&marker);
    let image = temp_file_with(&image);
    let image = image.as_path().to_string_lossy().into_owned();
    let (vmm, _) = start_probes(vmm_bin, probe, guests, &["--mem-image", &image]);
    thread::sleep(SETTLE);
    let pid = vmm.pid();
    let memory =
        ProcessMemory::of(pid).unwrap_or_else(|e| panic!("cannot read smaps of vmm {pid}: {e}"));
    let pages = ProcessPages::open(pid)
        .unwrap_or_else(|e| panic!("cannot read the pagemap of vmm {pid}: {e}"));
    let ranges = guest_ram_ranges(&pages, &memory, &marker);
    assert_eq!(
        ranges.len(),
        guests as usize,
        "found the RAM of {} guests in vmm {pid}, not {guests}: {ranges:x?}",
        ranges.len()
    );
    // The shared zero page is present but not in the PSS.
    let zero = zero_pfn();
    let guest_ram = memory.pss_within(&ranges, |start, end| {
        let present = pages
            .pfns(start, ((end - start) / PAGE) as usize)
            .unwrap_or_else(|e| panic!("cannot read the pagemap of vmm {pid}: {e}"));
        let resident = present.iter().flatten().filter(|&&pfn| Some(pfn) != zero);
        resident.count() as u64 * PAGE / 1024
    });
    stop(vmm);
    Overhead {
        overhead: memory.pss_kib - guest_ram,
        total: memory.pss_kib,
        guest_ram,
    }
}

/// Where the guests' RAM is mapped: every guest holds `marker` at [`MARKER_GPA`], so each copy
/// of it inside memory that looks like guest RAM, with a whole [`GUEST_MEM`] of it from
/// [`MARKER_GPA`] below, places one guest (sorted by address).
fn guest_ram_ranges(
    pages: &ProcessPages,
    memory: &ProcessMemory,
    marker: &[u8],
) -> Vec<(u64, u64)> {
    let found = pages
        .find_page(marker)
        .unwrap_or_else(|e| panic!("cannot look for the marker in guest RAM: {e}"));
    let mut ranges: Vec<(u64, u64)> = found
        .into_iter()
        .filter_map(|hva| hva.checked_sub(MARKER_GPA))
        .map(|start| (start, start + GUEST_MEM_BYTES))
        .filter(|&(start, end)| {
            memory
                .mappings
                .iter()
                .any(|m| m.looks_like_guest_ram() && m.start <= start && end <= m.end)
        })
        .collect();
    ranges.sort_unstable();
    ranges.dedup();
    ranges
}

fn main() -> std::process::ExitCode {
    // No options: `cargo bench` passes `--bench`, and `--help` says what this measures.
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--bench" => {}
            "-h" | "--help" => {
                println!(
                    "startup: vmm start-up time and memory overhead with probe guests; no \
                     options (VMM_BIN picks the vmm binary, else it is built). Run with `cargo \
                     bench -p vmm-benches --bench startup`."
                );
                return std::process::ExitCode::SUCCESS;
            }
            other => {
                eprintln!("startup: unknown argument {other:?}: this bench takes no options");
                return std::process::ExitCode::from(2);
            }
        }
    }
    if !vmm_tests::require_kvm() {
        return std::process::ExitCode::SUCCESS;
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
                let (vmm, elapsed) = start_probes(&vmm_bin, &probe, guests, &[]);
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
    std::process::ExitCode::SUCCESS
}
