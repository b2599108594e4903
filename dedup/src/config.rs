//! Engine configuration, with kernel KSM's knob names and meanings where they exist.

use std::str::FromStr;

/// What the engine's background scanner does (KSM's `run`: 0, 1, 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RunMode {
    /// Do not scan; merged pages stay merged (`run=0`).
    Stop,
    /// Scan and merge (`run=1`).
    #[default]
    Run,
    /// Turn every merged page back into a private page, then idle (`run=2`).
    UnmergeAll,
}

impl RunMode {
    /// KSM's number for the mode.
    pub fn as_ksm(self) -> u8 {
        match self {
            RunMode::Stop => 0,
            RunMode::Run => 1,
            RunMode::UnmergeAll => 2,
        }
    }
}

/// Errors from configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// No such knob.
    #[error("unknown knob {0:?}")]
    UnknownKnob(String),
    /// The value does not parse or is out of range.
    #[error("bad value {value:?} for {knob}: {why}")]
    BadValue {
        /// Knob name.
        knob: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An option is not `name=value`.
    #[error("option {0:?} is not name=value")]
    NotAssignment(String),
}

/// Engine configuration. Field names are KSM's sysfs knobs where one exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Pages looked at per background step (KSM default 100; ours converges in seconds).
    pub pages_to_scan: u64,
    /// Pause between background steps, in milliseconds.
    pub sleep_millisecs: u64,
    /// Whether pages on different NUMA nodes may share one copy.
    pub merge_across_nodes: bool,
    /// Whether all-zero pages go to the host zero page (no pool slot, no VMA, any domain).
    /// On by default here (KSM's default is off).
    pub use_zero_pages: bool,
    /// Most pages sharing one copy (2 to 65535).
    pub max_page_sharing: u16,
    /// Run mode of the background scanner.
    pub run: RunMode,
    /// Most VMAs the engine may have inside guest memory; `None`: derived from
    /// `vm.max_map_count`, leaving the rest of the process and headroom alone.
    pub vma_budget: Option<u64>,
    /// Worker threads for scanning and merging; 0: one per CPU. Fixed when the engine is
    /// created (`Engine::set_config` refuses a change).
    pub threads: usize,
    /// Worker threads that commit merges at the same time; 0: half the worker threads, at
    /// least one. Every remap takes the process's address-space lock for writing: more
    /// committers spend more CPU waiting for each other, and finish much sooner only where
    /// remaps are few (long runs of merged pages; see the crate's README).
    pub commit_threads: usize,
    /// Pages committed under one write-protect guard (16 to 512).
    pub batch_pages: usize,
    /// Largest share of one core the background scanner may use, in percent; 0: no cap.
    pub max_cpu_percent: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            pages_to_scan: 4096,
            sleep_millisecs: 20,
            merge_across_nodes: true,
            use_zero_pages: true,
            max_page_sharing: 256,
            run: RunMode::Run,
            vma_budget: None,
            threads: 0,
            commit_threads: 0,
            batch_pages: 64,
            max_cpu_percent: 0,
        }
    }
}

/// Knob names accepted by [`Config::set`].
pub const KNOBS: &[&str] = &[
    "pages_to_scan",
    "sleep_millisecs",
    "merge_across_nodes",
    "use_zero_pages",
    "max_page_sharing",
    "run",
    "vma_budget",
    "threads",
    "commit_threads",
    "batch_pages",
    "max_cpu_percent",
];

fn num<T: FromStr>(knob: &'static str, value: &str) -> Result<T, ConfigError> {
    value.trim().parse().map_err(|_| ConfigError::BadValue {
        knob,
        value: value.to_string(),
        why: "not a number",
    })
}

fn flag(knob: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.trim() {
        "1" | "true" | "on" | "yes" => Ok(true),
        "0" | "false" | "off" | "no" => Ok(false),
        _ => Err(ConfigError::BadValue {
            knob,
            value: value.to_string(),
            why: "expected 0 or 1",
        }),
    }
}

fn range<T: PartialOrd + Copy>(
    knob: &'static str,
    raw: &str,
    v: T,
    lo: T,
    hi: T,
    why: &'static str,
) -> Result<T, ConfigError> {
    if v < lo || v > hi {
        return Err(ConfigError::BadValue {
            knob,
            value: raw.to_string(),
            why,
        });
    }
    Ok(v)
}

impl Config {
    /// Sets one knob from its text form, as written to KSM's sysfs files.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), ConfigError> {
        match name.trim() {
            "pages_to_scan" => {
                let v = num("pages_to_scan", value)?;
                self.pages_to_scan =
                    range("pages_to_scan", value, v, 1, 1 << 30, "must be 1 to 2^30")?;
            }
            "sleep_millisecs" => {
                let v = num("sleep_millisecs", value)?;
                self.sleep_millisecs = range(
                    "sleep_millisecs",
                    value,
                    v,
                    0,
                    3_600_000,
                    "at most one hour",
                )?;
            }
            "merge_across_nodes" => self.merge_across_nodes = flag("merge_across_nodes", value)?,
            "use_zero_pages" => self.use_zero_pages = flag("use_zero_pages", value)?,
            "max_page_sharing" => {
                let v: u32 = num("max_page_sharing", value)?;
                let v = range("max_page_sharing", value, v, 2, 65535, "must be 2 to 65535")?;
                self.max_page_sharing = v as u16;
            }
            "run" => {
                self.run = match value.trim() {
                    "0" | "stop" => RunMode::Stop,
                    "1" | "run" => RunMode::Run,
                    "2" | "unmerge" => RunMode::UnmergeAll,
                    _ => {
                        return Err(ConfigError::BadValue {
                            knob: "run",
                            value: value.to_string(),
                            why: "expected 0, 1 or 2",
                        });
                    }
                }
            }
            "vma_budget" => {
                self.vma_budget = match value.trim() {
                    "auto" | "" => None,
                    v => Some(num("vma_budget", v)?),
                }
            }
            "threads" => {
                let v = num("threads", value)?;
                self.threads = range("threads", value, v, 0, 1024, "at most 1024")?;
            }
            "commit_threads" => {
                let v = num("commit_threads", value)?;
                self.commit_threads = range("commit_threads", value, v, 0, 1024, "at most 1024")?;
            }
            "batch_pages" => {
                let v = num("batch_pages", value)?;
                self.batch_pages = range("batch_pages", value, v, 16, 512, "must be 16 to 512")?;
            }
            "max_cpu_percent" => {
                let v = num("max_cpu_percent", value)?;
                self.max_cpu_percent =
                    range("max_cpu_percent", value, v, 0, 100, "must be 0 to 100")?;
            }
            other => return Err(ConfigError::UnknownKnob(other.to_string())),
        }
        Ok(())
    }

    /// Applies comma-separated `name=value` options, e.g.
    /// `pages_to_scan=10000,sleep_millisecs=0`. Stops at the first bad one.
    pub fn apply_options(&mut self, options: &str) -> Result<(), ConfigError> {
        for opt in options.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let (name, value) = opt
                .split_once('=')
                .ok_or_else(|| ConfigError::NotAssignment(opt.to_string()))?;
            self.set(name, value)?;
        }
        Ok(())
    }

    /// The text form of a knob's value, `None` for unknown names.
    pub fn get(&self, name: &str) -> Option<String> {
        Some(match name {
            "pages_to_scan" => self.pages_to_scan.to_string(),
            "sleep_millisecs" => self.sleep_millisecs.to_string(),
            "merge_across_nodes" => u8::from(self.merge_across_nodes).to_string(),
            "use_zero_pages" => u8::from(self.use_zero_pages).to_string(),
            "max_page_sharing" => self.max_page_sharing.to_string(),
            "run" => self.run.as_ksm().to_string(),
            "vma_budget" => self
                .vma_budget
                .map_or_else(|| "auto".to_string(), |v| v.to_string()),
            "threads" => self.threads.to_string(),
            "commit_threads" => self.commit_threads.to_string(),
            "batch_pages" => self.batch_pages.to_string(),
            "max_cpu_percent" => self.max_cpu_percent.to_string(),
            _ => return None,
        })
    }

    /// How many of `workers` worker threads commit at the same time: `commit_threads`, or half
    /// the workers (at least one) when it is 0; never more than the workers.
    pub fn committers(&self, workers: usize) -> usize {
        let wanted = match self.commit_threads {
            0 => workers / 2,
            n => n,
        };
        wanted.clamp(1, workers.max(1))
    }

    /// Checks every knob's range (for configs built field by field).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut probe = Config::default();
        for knob in KNOBS {
            if let Some(v) = self.get(knob) {
                probe.set(knob, &v)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knobs_round_trip() {
        let mut c = Config::default();
        c.apply_options(
            "pages_to_scan=10000, sleep_millisecs=0,merge_across_nodes=0,use_zero_pages=0,\
             max_page_sharing=2,run=2,vma_budget=100,threads=1,commit_threads=3,batch_pages=16,\
             max_cpu_percent=50",
        )
        .unwrap();
        assert_eq!(c.pages_to_scan, 10000);
        assert_eq!(c.sleep_millisecs, 0);
        assert!(!c.merge_across_nodes && !c.use_zero_pages);
        assert_eq!(c.max_page_sharing, 2);
        assert_eq!(c.run, RunMode::UnmergeAll);
        assert_eq!(c.vma_budget, Some(100));
        assert_eq!((c.threads, c.batch_pages, c.max_cpu_percent), (1, 16, 50));
        assert_eq!(c.commit_threads, 3);
        let mut d = Config::default();
        for k in KNOBS {
            d.set(k, &c.get(k).unwrap()).unwrap();
        }
        assert_eq!(c, d);
        c.validate().unwrap();
    }

    #[test]
    fn commits_run_on_half_the_workers_unless_set() {
        let mut c = Config::default();
        assert_eq!([1, 2, 3, 16].map(|w| c.committers(w)), [1, 1, 1, 8]);
        c.commit_threads = 4;
        assert_eq!([2, 4, 16].map(|w| c.committers(w)), [2, 4, 4]);
        assert_eq!(c.committers(0), 1);
    }

    #[test]
    fn bad_options_are_refused() {
        let mut c = Config::default();
        assert!(matches!(
            c.set("nope", "1"),
            Err(ConfigError::UnknownKnob(_))
        ));
        assert!(c.set("max_page_sharing", "1").is_err());
        assert!(c.set("max_page_sharing", "70000").is_err());
        assert!(c.set("pages_to_scan", "0").is_err());
        assert!(c.set("pages_to_scan", "-5").is_err());
        assert!(c.set("run", "3").is_err());
        assert!(c.set("use_zero_pages", "maybe").is_err());
        assert!(c.set("batch_pages", "4").is_err());
        assert!(c.set("commit_threads", "1025").is_err());
        assert!(matches!(
            c.apply_options("run"),
            Err(ConfigError::NotAssignment(_))
        ));
        assert_eq!(c, Config::default());
        let bad = Config {
            batch_pages: 1,
            ..Config::default()
        };
        assert!(bad.validate().is_err());
    }
}
