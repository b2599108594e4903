//! Guest density: the same guests with no merging, kernel KSM and this VMM's engine, one mode
//! after the other in one run (issue 4, item 8).
//!
//! `cargo bench -p vmm-benches --bench density [-- --guests 4 --size 512M --modes ...]`
//! (`-- --help` lists the options). It builds the release `vmm` (`VMM_BIN` uses another), builds
//! the guest images if missing and composes one memory image per guest from real Debian package
//! files, then runs each mode as one `vmm` process with probe guests whose RAM starts as the
//! images:
//!
//! | mode | what merges |
//! |---|---|
//! | `none` | nothing: the baseline every saving is measured against |
//! | `ksm-default` | kernel KSM at its defaults (`pages_to_scan=100`, `sleep_millisecs=20`) |
//! | `ksm-max` | kernel KSM at max rate (`pages_to_scan=10000`, `sleep_millisecs=0`) |
//! | `dedup-default` | `vmm --dedup` |
//! | `dedup-fastest` | `vmm --dedup --dedup-opt pages_to_scan=65536,sleep_millisecs=0,commit_threads=<CPUs>` |
//!
//! From the moment every guest prints `PROBE READY` it samples the VMM's PSS, its own memory
//! cgroup's memory (without file cache) when a memory controller is there, and the CPU time
//! of the VMM plus `ksmd` for the KSM modes, until memory stops going down (a whole scan pass
//! without savings, see `vmm_benches::convergence::Plateau`) or the time cap. Then each guest
//! checksums a sample of its pages through the probe, compared with the images.
//!
//! Writes `bench-results/density/` (`--out`): `density.md` (table), `density.csv` (every
//! sample), `density.svg` (memory over time); `--out` is checked before anything is measured,
//! and Ctrl-C writes the modes that finished. Kernel KSM's settings are restored at the end,
//! on errors and on Ctrl-C. Where KVM has hardware virtualization (not `kvm_pvm`), the modes
//! run again with Linux guests (`guest-images/out/vmlinuz` + `initramfs.cpio`, the workload
//! filling memory and verifying it afterwards). The last line is
//! `RESULT speedup_vs_ksm_max=<x> cpu_ratio=<ours/ksm> savings_ratio=<ours/ksm>`, ours being
//! `dedup-fastest`.

use std::error::Error;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::thread;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use guest_images::build_images::{INITRAMFS, VMLINUZ};
use guest_images::units::parse_size;
use vm_dedup::ksm::{self, KsmGuard};
use vmm_benches::cgroup::MemoryCgroup;
use vmm_benches::convergence::{Plateau, Sample, savings};
use vmm_benches::guest_sets::{Guests, workload_mib};
use vmm_benches::interrupt::{catch_termination, die_with_parent, interrupted};
use vmm_benches::modes::Mode;
use vmm_benches::plot::{Series, svg, zoom_for};
use vmm_benches::prepare::{self, Images};
use vmm_benches::report::{self, Figures, ModeRun, Ratios, markdown_table, signed_mib};
use vmm_benches::sampler::{Sampler, read_stats_json};
use vmm_tests::{ProbeGuest, VmmProcess};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const MIB: f64 = (1u64 << 20) as f64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LinuxGuests {
    /// Where KVM has hardware virtualization (not kvm_pvm).
    Auto,
    /// Even under kvm_pvm (where the stock kernel does not reach userspace in useful time).
    Always,
    /// Only the Linux guests (no probe guests, no RESULT line), even under kvm_pvm.
    Only,
    /// Never.
    Never,
}

fn size_arg(text: &str) -> std::result::Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

/// Guest density with no merging, kernel KSM and vmm --dedup, side by side.
#[derive(Debug, Parser)]
#[command(name = "density")]
struct Cli {
    /// Guests in each run.
    #[arg(long, default_value_t = 4)]
    guests: usize,
    /// RAM of each guest, and the size of its composed image (e.g. 512M).
    #[arg(long, default_value = "512M", value_parser = size_arg)]
    size: u64,
    /// Modes, comma-separated, run in this order; `none` runs first in any case (savings are
    /// measured against it).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "none,ksm-default,ksm-max,dedup-default,dedup-fastest"
    )]
    modes: Vec<Mode>,
    /// Time cap of each mode in seconds (at least 1); a mode still saving memory then is
    /// reported as not converged.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_secs: u64,
    /// Milliseconds between samples (10 to 10000).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(10..=10_000))]
    sample_ms: u64,
    /// Pages per guest checksummed by the guest and compared with its image after each run.
    #[arg(long, default_value_t = 32)]
    check_pages: usize,
    /// Output folder [default: bench-results/density in the workspace].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also run the modes with Linux guests (kernel + initramfs, the workload filling memory).
    #[arg(long, value_enum, default_value_t = LinuxGuests::Auto)]
    linux: LinuxGuests,
    /// Seconds the Linux guests are watched before they verify their memory.
    #[arg(long, default_value_t = 60)]
    linux_secs: u64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The typed configuration of a run.
#[derive(Debug)]
struct Config {
    guests: usize,
    size: u64,
    modes: Vec<Mode>,
    cap: Duration,
    sample: Duration,
    check_pages: usize,
    out: PathBuf,
    linux: LinuxGuests,
    linux_secs: u64,
}

impl TryFrom<Cli> for Config {
    type Error = String;

    fn try_from(cli: Cli) -> std::result::Result<Self, String> {
        if cli.guests == 0 {
            return Err("--guests must be at least 1".into());
        }
        if cli.size % 4096 != 0 || cli.size < (16 << 20) {
            return Err("--size must be whole 4 KiB pages, at least 16M".into());
        }
        let mut modes = vec![Mode::None];
        for m in cli.modes {
            if !modes.contains(&m) {
                modes.push(m);
            }
        }
        Ok(Self {
            guests: cli.guests,
            size: cli.size,
            modes,
            cap: Duration::from_secs(cli.timeout_secs),
            sample: Duration::from_millis(cli.sample_ms),
            check_pages: cli.check_pages,
            out: cli
                .out
                .unwrap_or_else(|| vmm_tests::workspace_root().join("bench-results/density")),
            linux: cli.linux,
            linux_secs: cli.linux_secs.max(1),
        })
    }
}

/// Prints one progress line (over itself on a terminal).
fn progress(mode: Mode, s: &Sample, base: Option<u64>, tty: bool) {
    let mut line = format!(
        "[{}] {:6.1} s  PSS {:6.0} MiB",
        mode.name(),
        s.t,
        s.pss as f64 / MIB
    );
    if let Some(base) = base {
        let _ = write!(line, "  saved {:>6} MiB", signed_mib(savings(base, s.pss)));
    }
    let _ = write!(line, "  CPU {:6.1} s", s.cpu);
    if let Some(n) = s.full_scans {
        let _ = write!(line, "  full scans {n}");
    }
    if tty {
        eprint!("\r{line}   ");
    } else {
        eprintln!("{line}");
    }
    let _ = std::io::stderr().flush();
}

/// What one mode's run gives: the run and the engine's last stats.
struct Outcome {
    run: ModeRun,
    stats: Option<serde_json::Value>,
}

/// Runs `mode` with `guests` until memory settles or `cap`, then checks the guests' memory.
fn run_mode(
    vmm_bin: &Path,
    guests: &Guests<'_>,
    mode: Mode,
    cap: Duration,
    config: &Config,
    guard: Option<&KsmGuard>,
    base: Option<u64>,
) -> Result<Outcome> {
    let tag = format!("vmm-density-{}-{}", std::process::id(), mode.name());
    let stats_json = std::env::temp_dir().join(format!("{tag}.json"));
    if let Some(guard) = guard {
        mode.configure_ksm(guard)?;
    } else if mode.ksm_rate().is_some() {
        return Err("kernel KSM is not available here".into());
    }
    let cgroup = MemoryCgroup::create(&tag)?;
    let mut command = Command::new(vmm_bin);
    command.args(guests.args(&mode.vmm_args(&stats_json)));
    if let Some(c) = &cgroup {
        c.join_on_spawn(&mut command)?;
    }
    die_with_parent(&mut command);
    let mut vmm = VmmProcess::start(&mut command);
    let spawned = vmm.spawned_at();
    let ready = guests.wait_ready(&mut vmm);
    let mut sampler = Sampler::new(vmm.pid(), ready, cgroup.as_ref(), mode.merger(&stats_json))?;
    let plateau = Plateau::default();
    let tty = std::io::stderr().is_terminal();
    let mut samples: Vec<Sample> = Vec::new();
    let mut shown = Instant::now();
    let converged = loop {
        if interrupted() {
            return Err("interrupted (SIGINT or SIGTERM)".into());
        }
        let s = sampler.sample()?;
        samples.push(s);
        if shown.elapsed() >= Duration::from_secs(1) || samples.len() == 1 {
            progress(mode, &s, base, tty);
            shown = Instant::now();
        }
        if plateau.reached(&samples) {
            break true;
        }
        if s.t >= cap.as_secs_f64() {
            break false;
        }
        let next = config.sample.as_secs_f64() * samples.len() as f64;
        let wait = next - ready.elapsed().as_secs_f64();
        if wait > 0.0 {
            thread::sleep(Duration::from_secs_f64(wait));
        }
    };
    if let Some(last) = samples.last() {
        progress(mode, last, base, tty);
    }
    if tty {
        eprintln!();
    }
    let stats = read_stats_json(&stats_json);
    // Kernel KSM's own memory for this VMM (reverse-map items), which no PSS shows; the
    // engine's is in the VMM's PSS already.
    let kernel_metadata = match mode.ksm_rate() {
        Some(_) => Some(ksm::process_stat_of(vmm.pid())?.metadata_bytes(4096)),
        None => None,
    };
    let (pages_checked, pages_bad) = guests.check_and_stop(vmm)?;
    let _ = std::fs::remove_file(&stats_json);
    drop(cgroup);
    eprintln!(
        "[{}] {} after {:.1} s; {pages_checked} pages checked, {pages_bad} bad",
        mode.name(),
        if converged {
            "converged"
        } else {
            "NOT converged (time cap)"
        },
        samples.last().map_or(0.0, |s| s.t),
    );
    Ok(Outcome {
        run: ModeRun {
            mode: mode.name().into(),
            ready_secs: ready.duration_since(spawned).as_secs_f64(),
            samples,
            converged,
            cap_secs: cap.as_secs_f64(),
            pages_checked,
            pages_bad,
            kernel_metadata,
        },
        stats,
    })
}

/// The engine's own figures from its last stats, for the notes under the table.
fn engine_notes(mode: &str, stats: &serde_json::Value) -> String {
    let n = |k: &str| stats[k].as_u64().unwrap_or(0);
    let mut text = format!(
        "- `{mode}` engine: CPU {:.2} s in all, {} full scans, {} merges of {} attempts \
         ({} refused), VMAs {} of a budget of {}{}, metadata {:.1} MiB",
        n("cpu_ns") as f64 / 1e9,
        n("full_scans"),
        n("merges"),
        n("merge_attempts"),
        n("merge_failures"),
        n("vmas_used"),
        n("vma_budget"),
        if stats["vma_budget_reached"].as_bool() == Some(true) {
            " (reached: the longest runs merge first, shorter ones wait)"
        } else {
            ""
        },
        n("metadata_bytes") as f64 / MIB,
    );
    let phases = &stats["phases"];
    if phases.is_object() {
        let names = ["scan_ns", "plan_ns", "fill_ns", "commit_ns", "account_ns"];
        let parts: Vec<String> = names
            .iter()
            .map(|k| {
                format!(
                    "{} {:.2} s",
                    k.trim_end_matches("_ns"),
                    phases[*k].as_u64().unwrap_or(0) as f64 / 1e9
                )
            })
            .collect();
        let _ = write!(text, "; wall time per phase: {}", parts.join(", "));
    } else {
        text.push_str("; the VMM's /stats has no per-phase times");
    }
    text.push('\n');
    text
}

/// Runs every mode with `guests`; returns the runs and the notes on the engine.
fn run_modes(
    vmm_bin: &Path,
    guests: &Guests<'_>,
    cap: Duration,
    config: &Config,
    guard: Option<&KsmGuard>,
) -> Result<(Vec<ModeRun>, String)> {
    let mut runs: Vec<ModeRun> = Vec::new();
    let mut notes = String::new();
    let mut base = None;
    for &mode in &config.modes {
        if mode.ksm_rate().is_some() && guard.is_none() {
            eprintln!(
                "[{}] skipped: kernel KSM is not available here",
                mode.name()
            );
            continue;
        }
        let outcome = match run_mode(vmm_bin, guests, mode, cap, config, guard, base) {
            Ok(outcome) => outcome,
            // Ctrl-C: the modes that finished are still worth their table.
            Err(e) if interrupted() && !runs.is_empty() => {
                eprintln!("[{}] {e}: writing the modes that finished", mode.name());
                let _ = writeln!(
                    notes,
                    "- Interrupted during {}: only the modes before it ran.",
                    mode.name()
                );
                break;
            }
            Err(e) => return Err(e),
        };
        if mode == Mode::None {
            base = outcome.run.samples.last().map(|s| s.pss);
        }
        if let Some(stats) = &outcome.stats {
            notes.push_str(&engine_notes(mode.name(), stats));
        }
        runs.push(outcome.run);
    }
    Ok((runs, notes))
}

/// Host facts for the report's header.
fn host_line() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let kvm = if vmm_tests::is_kvm_pvm() {
        "kvm_pvm (no hardware virtualization; guest code runs in KVM's emulator)"
    } else {
        "hardware virtualization"
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "Linux {}, {cpus} CPUs, KVM: {kvm}, load average {} when the table was written",
        kernel.trim(),
        load.join(" ")
    )
}

/// One set of runs to write out.
struct ResultSet<'a> {
    /// File name stem.
    name: &'a str,
    /// Title of the table and plot.
    title: String,
    /// Paragraph before the table.
    header: String,
    runs: &'a [ModeRun],
    /// Notes after the table.
    notes: &'a str,
    guests: usize,
    size: u64,
}

/// Writes the table, CSV and plot of a set of runs as `out/name.{md,csv,svg}` and prints the
/// table; returns the figures.
fn write_results(config: &Config, set: &ResultSet<'_>) -> Result<Vec<Figures>> {
    let ResultSet {
        name,
        title,
        header,
        runs,
        notes,
        guests,
        size,
    } = set;
    let (guests, size) = (*guests, *size);
    let base = runs
        .iter()
        .find(|r| r.mode == Mode::None.name())
        .and_then(|r| r.samples.last())
        .map(|s| s.pss)
        .ok_or("the none mode did not run")?;
    let guest_ram = guests as u64 * size;
    let guests_u32 = u32::try_from(guests).unwrap_or(u32::MAX);
    let figures: Vec<Figures> = runs
        .iter()
        .map(|r| Figures::of(r, base, guests_u32, guest_ram))
        .collect();
    let table = markdown_table(&figures);
    let mut md = format!("# {title}\n\n{header}\n\n{table}\n");
    md.push_str(
        "Savings are against the `none` run's final PSS; CPU-seconds are counted from the moment \
         every guest was ready (the VMM process's user + system time, plus `ksmd`'s for the KSM \
         modes); \"to 95%\" is the moment savings first reached 95% of the run's final savings. \
         Cgroup memory is the VMM's own memory cgroup without file cache. Merger memory outside \
         PSS is kernel KSM's reverse-map items for the VMM, as the kernel counts them in \
         `ksm_process_profit` (/proc/PID/ksm_stat, read just before the guests stop); this \
         engine's own memory (page metadata, index, buffers) is in the VMM's PSS already, so \
         \"saved net\" compares what each merger saves the host after its own memory.\n\n",
    );
    let from_start: Vec<String> = figures
        .iter()
        .filter(|f| f.converged)
        .filter_map(|f| {
            f.t95
                .map(|t| format!("{} {:.1} s", f.mode, f.ready_secs + t))
        })
        .collect();
    if !from_start.is_empty() {
        let _ = writeln!(
            md,
            "- Counted from starting the VMM instead (the mergers already run while the images \
             load), 95% of the savings took: {}",
            from_start.join(", ")
        );
    }
    md.push_str(notes);
    let write = |ext: &str, text: &[u8]| {
        let path = config.out.join(format!("{name}.{ext}"));
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))
    };
    std::fs::create_dir_all(&config.out)?;
    write("md", md.as_bytes())?;
    write("csv", report::csv(runs, base).as_bytes())?;
    let series: Vec<Series> = runs
        .iter()
        .map(|r| Series {
            name: r.mode.clone(),
            points: r.samples.iter().map(|s| (s.t, s.pss as f64)).collect(),
        })
        .collect();
    write("svg", svg(title, &series, zoom_for(&series)).as_bytes())?;
    println!("\n{md}");
    let bad: Vec<String> = figures
        .iter()
        .filter(|f| f.pages.1 > 0)
        .map(|f| format!("{} ({} of {} pages)", f.mode, f.pages.1, f.pages.0))
        .collect();
    if !bad.is_empty() {
        return Err(format!(
            "guest memory differs from what the guests were given in: {}",
            bad.join(", ")
        )
        .into());
    }
    Ok(figures)
}

/// How a run ended.
enum Finished {
    /// Without KVM: nothing ran.
    Skipped,
    /// With the comparison, when both dedup-fastest and ksm-max ran and saved memory.
    Ran(Option<Ratios>),
}

/// Creates `dir` and checks that files can be written there: a bad `--out` fails the run
/// before its minutes of measuring, not after.
fn check_out(dir: &Path) -> Result<()> {
    let fail = |e: std::io::Error| format!("--out {}: cannot write there: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(fail)?;
    let probe = dir.join(format!(".density-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(fail)?;
    std::fs::remove_file(&probe).map_err(fail)?;
    Ok(())
}

fn run(config: &Config) -> Result<Finished> {
    if !vmm_tests::require_kvm() {
        return Ok(Finished::Skipped);
    }
    check_out(&config.out)?;
    let vmm_bin = prepare::release_vmm()?;
    eprintln!("vmm: {}", vmm_bin.display());
    let probe_set = match config.linux {
        LinuxGuests::Only => None,
        _ => Some((
            prepare::compose(config.guests, config.size)?,
            ProbeGuest::new(),
        )),
    };
    let pvm = vmm_tests::is_kvm_pvm();
    let linux = match config.linux {
        LinuxGuests::Never => false,
        LinuxGuests::Auto => !pvm,
        LinuxGuests::Always | LinuxGuests::Only => true,
    };

    let uses_ksm = config.modes.iter().any(|m| m.ksm_rate().is_some());
    let guard = if uses_ksm && ksm::available() {
        eprintln!(
            "taking kernel KSM (waits while another user holds {}) ...",
            ksm::LOCK_PATH
        );
        Some(KsmGuard::acquire()?)
    } else {
        None
    };
    // From here Ctrl-C (or SIGTERM) stops the run through the flag, so that the guard
    // restores kernel KSM and the cgroups are removed (before, the default action is right:
    // nothing to undo yet).
    catch_termination()?;

    let ratios = match &probe_set {
        Some((images, probe)) => run_probes(config, &vmm_bin, images, probe, guard.as_ref())?,
        None => None,
    };
    if linux {
        if !interrupted() {
            run_linux(config, &vmm_bin, guard.as_ref())?;
        }
    } else if config.linux == LinuxGuests::Auto {
        println!(
            "Linux guests: skipped: this host's KVM is kvm_pvm (/sys/module/kvm_pvm): no \
             hardware virtualization, guest code runs in KVM's instruction emulator and the \
             stock kernel does not reach userspace in useful time. Run with --linux always to \
             try anyway."
        );
    }
    if let Some(guard) = guard {
        guard.restore()?;
        let found: Vec<String> = guard
            .saved()
            .iter()
            .filter(|(k, _)| ["run", "pages_to_scan", "sleep_millisecs"].contains(&k.as_str()))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        eprintln!(
            "kernel KSM settings restored as found ({} ...)",
            found.join(" ")
        );
    }
    if interrupted() {
        return Err(format!(
            "interrupted (SIGINT or SIGTERM); {} holds the modes that finished",
            config.out.display()
        )
        .into());
    }
    Ok(Finished::Ran(ratios))
}

/// The runs with probe guests on composed images; returns the comparison of dedup-fastest
/// with ksm-max.
fn run_probes(
    config: &Config,
    vmm_bin: &Path,
    images: &Images,
    probe: &ProbeGuest,
    guard: Option<&KsmGuard>,
) -> Result<Option<Ratios>> {
    let guests = Guests::Probe {
        probe,
        images,
        check_pages: config.check_pages,
    };
    let (runs, notes) = run_modes(vmm_bin, &guests, config.cap, config, guard)?;
    let t = &images.sidecar.totals;
    let header = format!(
        "{} guests x {} MiB, probe guests with RAM from composed images (`{}`: real Debian package \
         files, 10% unique and 10% zero pages; a complete merge saves {:.0} MiB of non-zero \
         duplicates, and the {:.0} MiB of zero pages are never loaded). Host: {}. Time cap {} s.",
        config.guests,
        config.size >> 20,
        images
            .dir
            .strip_prefix(vmm_tests::workspace_root())
            .unwrap_or(&images.dir)
            .display(),
        t.pages_sharing as f64 * 4096.0 / MIB,
        t.zero_pages as f64 * 4096.0 / MIB,
        host_line(),
        config.cap.as_secs(),
    );
    let figures = write_results(
        config,
        &ResultSet {
            name: "density",
            title: format!(
                "Host memory (PSS) of {} guests x {} MiB over time",
                config.guests,
                config.size >> 20
            ),
            header,
            runs: &runs,
            notes: &notes,
            guests: config.guests,
            size: config.size,
        },
    )?;
    let find = |m: Mode| figures.iter().find(|f| f.mode == m.name());
    let (Some(ours), Some(ksm)) = (find(Mode::DedupFastest), find(Mode::KsmMax)) else {
        return Ok(None);
    };
    if !ksm.converged {
        println!("note: ksm-max did not converge: its time cap counts as its time to 95%");
    }
    if !ours.converged {
        println!("note: dedup-fastest did not converge within the time cap");
    }
    Ok(Ratios::of(ours, ksm))
}

/// The Linux-guest runs, where hardware virtualization makes them meaningful.
fn run_linux(config: &Config, vmm_bin: &Path, guard: Option<&KsmGuard>) -> Result<()> {
    let out = prepare::images_dir();
    if !out.join(VMLINUZ).is_file() || !out.join(INITRAMFS).is_file() {
        prepare::build_images_if_missing(&out)?;
    }
    let guests = Guests::Linux {
        kernel: out.join(VMLINUZ),
        initrd: out.join(INITRAMFS),
        guests: config.guests,
        size: config.size,
        // The guests check their memory after the watch ends.
        wait_secs: config.linux_secs + 5,
    };
    let cap = Duration::from_secs(config.linux_secs);
    let (runs, notes) = run_modes(vmm_bin, &guests, cap, config, guard)?;
    let header = format!(
        "{} Linux guests x {} MiB (`vmlinuz` + `initramfs.cpio`), each running `guest-workload \
         verify --mib {} --unique 0.1 --zero 0.1 --seed 1` (one command line for all guests: \
         their unique pages are alike across guests). Host: {}. Watched {} s.",
        guests.count(),
        guests.size() >> 20,
        workload_mib(guests.size()),
        host_line(),
        config.linux_secs,
    );
    write_results(
        config,
        &ResultSet {
            name: "density-linux",
            title: format!(
                "Host memory (PSS) of {} Linux guests x {} MiB over time",
                guests.count(),
                guests.size() >> 20
            ),
            header,
            runs: &runs,
            notes: &notes,
            guests: guests.count(),
            size: guests.size(),
        },
    )?;
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| writeln!(buf, "density: {}", record.args()))
        .init();
    let config = match Config::try_from(Cli::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("density: error: {e}");
            return ExitCode::from(2);
        }
    };
    // The helpers that drive the VMMs panic when one cannot start or stops answering: one
    // error line, as for any other failure (kernel KSM is restored as the run unwinds).
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        if interrupted() {
            eprintln!("\ndensity: interrupted (SIGINT or SIGTERM): {message}");
        } else {
            let at = info
                .location()
                .map(|l| format!(" (at {l})"))
                .unwrap_or_default();
            eprintln!("\ndensity: error: {message}{at}");
        }
    }));
    let Ok(ran) = std::panic::catch_unwind(|| run(&config)) else {
        return ExitCode::FAILURE;
    };
    match ran {
        Ok(Finished::Ran(Some(ratios))) => {
            println!("{}", ratios.net_line());
            println!("{}", ratios.result_line());
            ExitCode::SUCCESS
        }
        Ok(Finished::Ran(None)) => {
            println!(
                "no RESULT line: it needs the probe-guest runs of dedup-fastest and ksm-max, both \
                 saving memory"
            );
            ExitCode::SUCCESS
        }
        Ok(Finished::Skipped) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!();
            eprintln!("density: error: {}", vmm_benches::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
