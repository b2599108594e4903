//! The `vmm` command line (clap derive) and its translation into a checked [`Plan`]. A module
//! of the binary, not of the library (only binaries parse a CLI); the `cli` fuzz target and
//! `vmm/tests/proptest_cli.rs` compile this file too, through `#[path]`, to check that any
//! argument list gives a plan or one clear line of error, never a panic.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{ArgGroup, Parser, ValueEnum};
use vmm::config::{self, Boot, DEFAULT_CMDLINE, GuestConfig, VmmConfig};
use vmm::dedup::settings::{self, Settings, TuneMode};
use vmm::dedup::{self, DedupConfig};
use vmm::monitor::MonitorConfig;
use vmm::overcommit;
use vmm::services::{Merging, ServicesConfig};

/// Reference for the dedup knobs, tuning modes and the control API, shown by `--help`.
const AFTER_HELP: &str = "\
Memory merging (--dedup):
  One engine per process merges identical pages within and across all --guests. A page merges
  only after two looks find it unchanged; KVM's dirty log tells which pages were written since
  the previous pass, so only those are hashed again. A guest write to a merged page gets a
  private copy (copy-on-write); no other guest ever sees it.

  --dedup-opt knobs (KSM's names; comma-separated, repeatable, applied in order):
    pages_to_scan=4096      pages looked at per step
    sleep_millisecs=20      pause between steps
    merge_across_nodes=1    0: merge only pages on the same host NUMA node
    use_zero_pages=1        all-zero pages map the host zero page (any trust domain)
    max_page_sharing=256    most pages sharing one copy (2-65535)
    run=1                   0: stop scanning (merged pages stay), 1: run, 2: unmerge all
    vma_budget=auto         most VMAs merged pages may cost (auto: from vm.max_map_count)
    threads=0               scan/merge threads (0: one per CPU)
    commit_threads=0        threads committing merges at once (0: half of threads)
    batch_pages=64          pages merged under one write-protect guard (16-512)
    max_cpu_percent=0       CPU cap for the scanner in percent of one core (0: none)
  Tuner knobs (see --dedup-tune):
    tune_interval_ms=500          how often the tuner looks
    tune_min_pages_to_scan=256    lowest pages_to_scan a tuner sets
    tune_max_pages_to_scan=65536  highest pages_to_scan a tuner sets
    advisor_target_scan_ms=2000   advisor: wanted time for a full pass
    advisor_max_cpu=50            advisor: CPU cap in percent of one core
    pressure_low_percent=20       pressure: scan harder while MemAvailable < 20% of RAM
    pressure_high_percent=40      pressure: stop scanning while MemAvailable >= 40% of RAM
  Memory guard knobs (docs/operations.md):
    mem_pressure_percent=90       pause merging at 90% of the memory cgroup's limit (or host RAM)
    mem_stop_percent=98           stop every guest, exit 1, at 98% of the cgroup's limit (0: never)
    mem_check_ms=100              how often the guard looks

  --dedup-tune MODE:
    fixed     pages_to_scan and sleep_millisecs stay as set (default)
    advisor   after each full pass, pages_to_scan is set from the pass's measured cost so that
              a pass takes advisor_target_scan_ms, and max_cpu_percent to advisor_max_cpu
              (the pass is stretched when the target would need more CPU)
    pressure  below pressure_low_percent available: run, doubling pages_to_scan at each look;
              between the thresholds: keep running if running, shrinking pages_to_scan by a
              quarter at each look (stay stopped if stopped); at or above
              pressure_high_percent: stop (run=0), merged pages stay merged
  A tuner owns the knobs it sets (advisor: pages_to_scan, max_cpu_percent; pressure:
  pages_to_scan, run): the API refuses to change them until tune=fixed.

  --dedup-domain NAME: the trust domain of the guests (once for all, or once per guest;
  default: every guest in domain \"default\"). Non-zero pages never merge across domains;
  all-zero pages map the host zero page in any domain. Guests sharing a domain can learn which
  page contents the others hold (copy-on-write timing): give each tenant its own domain
  (docs/security.md).

Overcommit: at start the guest RAM of all guests is compared with host RAM + swap. Merged pages
  can be unshared by the guests at any time, so by default the VMM warns; --overcommit=refuse
  makes it a usage error.

Statistics: with --dedup or --ksm, a one-line summary goes to stderr every --stats-interval (and
  at exit); --stats-json PATH gets the GET /stats object, replaced atomically, at the same times.

Control API (--api-sock PATH, HTTP/1.1 + JSON over a unix socket, mode 0600):
  GET /stats           statistics, global and per guest (KSM's names, bytes_saved, guests[])
  GET /config          the knobs now in force
  PUT|PATCH /config    change knobs: a JSON object, e.g. {\"pages_to_scan\": 1000, \"run\": 1}
  POST /unmerge        unmerge everything (like KSM's run=2); the scanner then idles
  GET /metrics         Prometheus text format
  e.g. curl --unix-socket PATH http://localhost/stats   (docs/api.md has the reference)

Exit status: the highest guest status (0 when stopped cleanly or by SIGINT/SIGTERM/SIGHUP),
  2 for usage errors, 1 for runtime errors.";

/// Runs Linux kernels or flat binaries as KVM guests; the serial console is stdin/stdout.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, after_help = AFTER_HELP)]
#[command(group(ArgGroup::new("boot").required(true).args(["kernel", "flat"])))]
pub struct Cli {
    /// Linux kernel to boot: a bzImage or an ELF vmlinux.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    // Each boot source's own flags conflict with the other source: `requires` naming a member
    // of the `boot` group is met by either member (clap-rs/clap#4707), so it would let
    // `--flat --initrd` and `--kernel --entry` through, silently ignored. A conflict only
    // counts flags given on the command line, not --cmdline's default.
    /// Initramfs for the kernel.
    #[arg(long, value_name = "PATH", conflicts_with = "flat")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", conflicts_with = "flat", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Raw binary loaded at --entry and started there in 64-bit mode with identity paging;
    /// every vCPU starts there with rdi = its index and rsi = the vCPU count. Once for every
    /// guest, or repeated once per guest.
    #[arg(long, value_name = "PATH", requires = "entry")]
    flat: Vec<PathBuf>,
    /// Guest-physical load and start address of --flat (at least 0x100000).
    #[arg(long, value_name = "GPA", value_parser = parse_addr, conflicts_with = "kernel")]
    entry: Option<u64>,
    /// Guest RAM per guest: bytes or a number with K, M, G (whole 4 KiB pages).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "256M")]
    mem: u64,
    /// vCPUs per guest.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u32,
    /// Independent guests in this process; their console lines are prefixed "guestI: ".
    #[arg(long, value_name = "N", default_value_t = 1)]
    guests: u32,
    /// Raw file copied into guest RAM from GPA 0 at start; once for every guest, or repeated
    /// once per guest.
    #[arg(long = "mem-image", value_name = "PATH")]
    mem_images: Vec<PathBuf>,
    /// Merge identical guest pages with this VMM's engine, shared by all guests of the process.
    #[arg(long, conflicts_with = "ksm")]
    dedup: bool,
    /// Dedup knobs as name=value, comma-separated; repeatable (knobs listed below).
    #[arg(long = "dedup-opt", value_name = "K=V,..", requires = "dedup")]
    dedup_opts: Vec<String>,
    /// Trust domain of the guests: once for every guest, or repeated once per guest (default:
    /// one domain, "default", for the whole process).
    #[arg(long = "dedup-domain", value_name = "NAME", requires = "dedup")]
    dedup_domains: Vec<String>,
    /// How the scan rate is chosen: fixed, advisor or pressure (see below).
    #[arg(long = "dedup-tune", value_name = "MODE", requires = "dedup", value_parser = parse_tune)]
    dedup_tune: Option<TuneMode>,
    /// Mark guest RAM MADV_MERGEABLE and leave it to kernel KSM (which must be running).
    #[arg(long)]
    ksm: bool,
    /// When the guests commit more RAM than the host has (RAM + swap): warn or refuse.
    #[arg(long, value_name = "POLICY", value_enum, default_value_t = Overcommit::Warn)]
    overcommit: Overcommit,
    /// How often the summary line is printed and --stats-json rewritten (500ms, 10s; 0: only
    /// at start and exit).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    stats_interval: Duration,
    /// Write the GET /stats object to this file, replaced atomically every --stats-interval.
    #[arg(long, value_name = "PATH")]
    stats_json: Option<PathBuf>,
    /// Serve the control API (HTTP/JSON) on this unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
}

/// `--overcommit` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Overcommit {
    /// Start anyway, with a warning.
    Warn,
    /// Refuse to start (exit status 2).
    Refuse,
}

/// Usage errors found while turning the command line into a configuration.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// Guest configuration.
    #[error(transparent)]
    Config(#[from] config::Error),
    /// A bad `--dedup-opt`.
    #[error("--dedup-opt: {0}")]
    DedupOpt(#[source] settings::Error),
    /// Bad `--dedup-domain`s.
    #[error(transparent)]
    Dedup(#[from] dedup::Error),
    /// `--dedup-tune` and a `tune=` in `--dedup-opt` disagree.
    #[error("--dedup-tune {flag} and --dedup-opt tune={opt} disagree: give the mode once")]
    TuneTwice {
        /// The flag's mode.
        flag: &'static str,
        /// The knob's mode.
        opt: &'static str,
    },
}

/// Everything the command line asks for.
#[derive(Debug)]
pub struct Plan {
    /// The guests.
    pub vmm: VmmConfig,
    /// Merging, statistics and the control API.
    pub services: ServicesConfig,
    /// What to do when the guests commit more RAM than the host has.
    pub overcommit: overcommit::Policy,
}

fn parse_tune(s: &str) -> Result<TuneMode, String> {
    s.parse().map_err(|e: settings::Error| e.to_string())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    config::parse_duration(s).map_err(|e| e.to_string())
}

fn parse_size(s: &str) -> Result<u64, String> {
    config::parse_size(s).map_err(|e| e.to_string())
}

fn parse_addr(s: &str) -> Result<u64, String> {
    config::parse_addr(s).map_err(|e| e.to_string())
}

impl Cli {
    /// Turns the parsed flags into a checked configuration.
    pub fn into_plan(self) -> Result<Plan, UsageError> {
        let boot = match (self.kernel, self.flat.first(), self.entry) {
            (Some(kernel), _, _) => Boot::Linux {
                kernel,
                initrd: self.initrd,
                cmdline: self.cmdline,
            },
            (None, Some(image), Some(entry)) => Boot::Flat {
                image: image.clone(),
                entry,
            },
            // clap requires --kernel or --flat with --entry.
            (None, _, _) => unreachable!("clap enforces a boot source"),
        };
        let merging = if self.dedup {
            let mut settings = Settings::default();
            for opts in &self.dedup_opts {
                settings.apply_options(opts).map_err(UsageError::DedupOpt)?;
            }
            if let Some(mode) = self.dedup_tune {
                let tune_opt = self
                    .dedup_opts
                    .iter()
                    .flat_map(|o| o.split(','))
                    .any(|kv| kv.split('=').next().map(str::trim) == Some("tune"));
                if tune_opt && settings.tune.mode != mode {
                    return Err(UsageError::TuneTwice {
                        flag: mode.name(),
                        opt: settings.tune.mode.name(),
                    });
                }
                settings.tune.mode = mode;
            }
            let dedup = DedupConfig {
                settings,
                domains: self.dedup_domains,
            };
            dedup.validate(self.guests as usize)?;
            Merging::Dedup(dedup)
        } else if self.ksm {
            Merging::Ksm
        } else {
            Merging::None
        };
        let template = GuestConfig {
            name: config::guest_name(0),
            mem: self.mem,
            vcpus: self.vcpus,
            boot,
            mem_image: None,
            track_dirty: matches!(merging, Merging::Dedup(_)),
        };
        let vmm = VmmConfig::replicated(&template, self.guests, &self.mem_images)?
            .with_flat_images(&self.flat)?;
        let services = ServicesConfig {
            monitor: MonitorConfig {
                interval: self.stats_interval,
                summary: merging != Merging::None,
                stats_json: self.stats_json,
            },
            merging,
            api_sock: self.api_sock,
        };
        let overcommit = match self.overcommit {
            Overcommit::Warn => overcommit::Policy::Warn,
            Overcommit::Refuse => overcommit::Policy::Refuse,
        };
        Ok(Plan {
            vmm,
            services,
            overcommit,
        })
    }
}

/// clap's error message on one line: its first paragraph (the error and, for missing
/// arguments, their list), without the `error: ` tag. The paragraph ends where clap's tips or
/// usage begin, so an argument holding blank lines does not cut the message short; control
/// characters that arguments bring in (a carriage return, an escape sequence) are escaped so
/// that they cannot garble the terminal line.
pub fn one_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let end = ["\n\n  tip:", "\n\nUsage:", "\n\nFor more information"]
        .iter()
        .filter_map(|m| text.find(m))
        .min()
        .unwrap_or(text.len());
    let paragraph: Vec<&str> = text[..end]
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let joined = paragraph.join(" ");
    joined
        .strip_prefix("error: ")
        .unwrap_or(&joined)
        .chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// What a command line asks for.
#[derive(Debug)]
pub enum Parsed {
    /// Run the guests.
    Run(Box<Plan>),
    /// Print help or the version (clap's text, `Error::print`) and exit successfully.
    Print(clap::Error),
}

/// Parses a command line (`args`, the program name first). `Err` is the usage error as one
/// line, without the `vmm: error: ` prefix.
pub fn parse<I, T>(args: I) -> Result<Parsed, String>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            return Ok(Parsed::Print(e));
        }
        Err(e) => return Err(format!("{}; run `vmm --help` for usage", one_line(&e))),
    };
    cli.into_plan()
        .map(|plan| Parsed::Run(Box::new(plan)))
        .map_err(|e| e.to_string())
}
