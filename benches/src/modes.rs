//! The density benchmark's modes: who merges guest memory and how the `vmm` and kernel KSM
//! are set up for it.
//!
//! ```
//! use std::path::Path;
//! use vmm_benches::modes::Mode;
//!
//! let m: Mode = "dedup-fastest".parse().unwrap();
//! assert_eq!(m.name(), "dedup-fastest");
//! assert!(m.vmm_args(Path::new("/tmp/s.json")).contains(&"--dedup".to_string()));
//! ```

use std::path::Path;
use std::str::FromStr;

use vm_dedup::ksm::{self, KsmError, KsmGuard};

use crate::sampler::Merger;

/// The knobs `dedup-fastest` adds to `--dedup`: no pause between steps, and steps as large as
/// the engine's own benchmark against KSM uses; [`fastest_opts`] adds every worker committing.
pub const DEDUP_FASTEST_OPTS: &str = "pages_to_scan=65536,sleep_millisecs=0";

/// `dedup-fastest`'s knobs on a host with `cpus` CPUs: [`DEDUP_FASTEST_OPTS`], and all of the
/// engine's workers (one per CPU) committing, its fastest setting (the default, half of them,
/// spends about a quarter less CPU for about 5% more time on the density images here).
pub fn fastest_opts(cpus: usize) -> String {
    format!("{DEDUP_FASTEST_OPTS},commit_threads={}", cpus.max(1))
}

/// Kernel KSM's settings for both KSM modes besides the rate: its defaults. Knobs a kernel
/// lacks (`smart_scan`, `advisor_mode` before 6.7) are left out.
pub const KSM_DEFAULTS: &[(&str, &str)] = &[
    ("advisor_mode", "none"),
    ("smart_scan", "1"),
    ("use_zero_pages", "0"),
    ("merge_across_nodes", "1"),
    ("max_page_sharing", "256"),
];

/// Who merges the guests' memory in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Nobody: the baseline.
    None,
    /// Kernel KSM at its defaults (`pages_to_scan=100`, `sleep_millisecs=20`).
    KsmDefault,
    /// Kernel KSM at max rate (`pages_to_scan=10000`, `sleep_millisecs=0`).
    KsmMax,
    /// `vmm --dedup`.
    DedupDefault,
    /// `vmm --dedup --dedup-opt` [`fastest_opts`].
    DedupFastest,
}

impl Mode {
    /// Every mode, in the benchmark's order.
    pub const ALL: [Mode; 5] = [
        Mode::None,
        Mode::KsmDefault,
        Mode::KsmMax,
        Mode::DedupDefault,
        Mode::DedupFastest,
    ];

    /// The mode's name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::KsmDefault => "ksm-default",
            Mode::KsmMax => "ksm-max",
            Mode::DedupDefault => "dedup-default",
            Mode::DedupFastest => "dedup-fastest",
        }
    }

    /// Kernel KSM's rate in the KSM modes: `pages_to_scan`, `sleep_millisecs`.
    pub fn ksm_rate(self) -> Option<(&'static str, &'static str)> {
        match self {
            Mode::KsmDefault => Some(("100", "20")),
            Mode::KsmMax => Some(("10000", "0")),
            _ => None,
        }
    }

    /// Whether this VMM's engine merges.
    pub fn is_engine(self) -> bool {
        matches!(self, Mode::DedupDefault | Mode::DedupFastest)
    }

    /// The mode's `vmm` arguments; the engine writes its stats to `stats_json` twice a second.
    pub fn vmm_args(self, stats_json: &Path) -> Vec<String> {
        let mut args: Vec<String> = Vec::new();
        if self.ksm_rate().is_some() {
            // No periodic stats: with --ksm they read /proc/self/smaps, which would be
            // counted as KSM's CPU time.
            args.extend(["--ksm", "--stats-interval", "0"].map(String::from));
        }
        if self.is_engine() {
            args.extend(["--dedup", "--stats-interval", "500ms", "--stats-json"].map(String::from));
            args.push(stats_json.display().to_string());
        }
        if self == Mode::DedupFastest {
            let cpus = std::thread::available_parallelism().map_or(1, usize::from);
            args.extend(["--dedup-opt".into(), fastest_opts(cpus)]);
        }
        args
    }

    /// Where the run's CPU time and full scans are read.
    pub fn merger(self, stats_json: &Path) -> Merger {
        if self.ksm_rate().is_some() {
            Merger::KernelKsm
        } else if self.is_engine() {
            Merger::Engine {
                stats_json: stats_json.to_owned(),
            }
        } else {
            Merger::None
        }
    }

    /// The kernel KSM settings of the mode, `run=1` last; empty for the other modes.
    pub fn ksm_settings(self) -> Vec<(&'static str, &'static str)> {
        let Some((pages, sleep)) = self.ksm_rate() else {
            return Vec::new();
        };
        let mut settings = KSM_DEFAULTS.to_vec();
        settings.extend([
            ("pages_to_scan", pages),
            ("sleep_millisecs", sleep),
            ("run", "1"),
        ]);
        settings
    }

    /// Sets kernel KSM up for the mode through `guard` (which restores what it found when
    /// dropped) and starts it; nothing for the other modes.
    pub fn configure_ksm(self, guard: &KsmGuard) -> Result<(), KsmError> {
        for (knob, value) in self.ksm_settings() {
            match ksm::read(knob) {
                Ok(now) if now == value => {}
                Ok(_) => guard.set(knob, value)?,
                // This kernel lacks the knob.
                Err(_) => {}
            }
        }
        Ok(())
    }
}

/// An unknown mode name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown mode {0:?} (none, ksm-default, ksm-max, dedup-default, dedup-fastest)")]
pub struct Error(String);

impl FromStr for Mode {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == text)
            .ok_or_else(|| Error(text.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in Mode::ALL {
            assert_eq!(m.name().parse::<Mode>(), Ok(m));
        }
        assert!("ksm".parse::<Mode>().is_err());
    }

    #[test]
    fn each_mode_has_its_own_vmm_arguments() {
        let p = Path::new("/t/s.json");
        assert!(Mode::None.vmm_args(p).is_empty());
        assert_eq!(Mode::KsmMax.vmm_args(p), ["--ksm", "--stats-interval", "0"]);
        assert_eq!(
            Mode::DedupDefault.vmm_args(p),
            [
                "--dedup",
                "--stats-interval",
                "500ms",
                "--stats-json",
                "/t/s.json"
            ]
        );
        let fastest = Mode::DedupFastest.vmm_args(p);
        assert_eq!(fastest[..2], ["--dedup", "--stats-interval"]);
        assert_eq!(fastest[5], "--dedup-opt");
        assert!(fastest[6].starts_with(DEDUP_FASTEST_OPTS), "{fastest:?}");
        assert_eq!(
            fastest_opts(16),
            "pages_to_scan=65536,sleep_millisecs=0,commit_threads=16"
        );
        assert_eq!(Mode::KsmDefault.merger(p), Merger::KernelKsm);
        assert_eq!(Mode::None.merger(p), Merger::None);
        assert!(matches!(
            Mode::DedupFastest.merger(p),
            Merger::Engine { .. }
        ));
    }

    #[test]
    fn ksm_modes_set_the_defaults_then_their_rate_then_run() {
        assert!(Mode::DedupDefault.ksm_settings().is_empty());
        let s = Mode::KsmDefault.ksm_settings();
        assert_eq!(s.last(), Some(&("run", "1")));
        assert!(s.contains(&("pages_to_scan", "100")));
        assert!(s.contains(&("sleep_millisecs", "20")));
        let s = Mode::KsmMax.ksm_settings();
        assert!(s.contains(&("pages_to_scan", "10000")));
        assert!(s.contains(&("sleep_millisecs", "0")));
        assert!(s.contains(&("max_page_sharing", "256")));
    }
}
