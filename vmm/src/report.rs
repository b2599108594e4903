//! The statistics of a VMM process as `GET /stats`, `--stats-json` and the summary line show
//! them: kernel KSM's names, global and per guest. The field names are a stable interface.

use serde::{Deserialize, Serialize};

use crate::dedup::health::HealthReport;

/// Bytes in a page.
pub const PAGE_BYTES: u64 = 4096;

/// Who merges the process's guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Nobody.
    #[default]
    None,
    /// This VMM's engine (`--dedup`).
    Dedup,
    /// Kernel KSM (`--ksm`).
    Ksm,
}

impl Mode {
    /// The mode's name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Dedup => "dedup",
            Mode::Ksm => "ksm",
        }
    }
}

/// The figures reported globally and per guest, with KSM's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Counts {
    /// Shared copies in use (pool slots; kernel: KSM pages).
    pub pages_shared: u64,
    /// Pages mapped to a shared copy beyond the first of each: pages saved by sharing.
    pub pages_sharing: u64,
    /// Stable pages that nothing else has the content of.
    pub pages_unshared: u64,
    /// Pages whose content changed since the previous look.
    pub pages_volatile: u64,
    /// Pages hashed so far (cumulative).
    pub pages_scanned: u64,
    /// Completed passes over all guest memory (cumulative).
    pub full_scans: u64,
    /// Pages dropped to the host's zero page.
    pub zero_pages: u64,
    /// Merged or zero pages that a write made private again (cumulative).
    pub cow_breaks: u64,
    /// `bytes_saved` minus the metadata it costs.
    pub general_profit: i64,
    /// `(pages_sharing + zero_pages) * 4096`.
    pub bytes_saved: u64,
}

/// One guest's figures.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GuestReport {
    /// The guest's name (`guest0`, ...).
    pub name: String,
    /// Its trust domain (empty without `--dedup`).
    pub domain: String,
    /// The figures.
    #[serde(flatten)]
    pub counts: Counts,
    /// Guest RAM pages.
    pub pages: u64,
    /// Pages the dirty log reported written so far (with `--dedup`).
    pub pages_dirty: u64,
}

/// Time the engine's scan steps spent in each phase, in nanoseconds (cumulative). Every phase
/// is wall time of the step except `fill_ns`: creating and growing pools (wall time) plus
/// filling new slots from their donors, which happens inside the commit on every worker thread
/// and is summed over them, so it is also part of `commit_ns`. Hence `scan_ns + plan_ns +
/// commit_ns + account_ns` is at most the engine's `wall_ns`, and `fill_ns` is not to be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Phases {
    /// Reading page states, hashing, stability.
    pub scan_ns: u64,
    /// Merge decisions.
    pub plan_ns: u64,
    /// Pool creation and growth, plus slot fills summed over threads (overlaps `commit_ns`).
    pub fill_ns: u64,
    /// Guarded compare and remap.
    pub commit_ns: u64,
    /// Bookkeeping, slot release, end-of-pass recount.
    pub account_ns: u64,
}

impl From<&vm_dedup::stats::PhaseTimes> for Phases {
    fn from(p: &vm_dedup::stats::PhaseTimes) -> Self {
        Self {
            scan_ns: p.scan_ns,
            plan_ns: p.plan_ns,
            fill_ns: p.fill_ns,
            commit_ns: p.commit_ns,
            account_ns: p.account_ns,
        }
    }
}

/// Engine figures beyond KSM's (with `--dedup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EngineDetails {
    /// Merges done (cumulative).
    pub merges: u64,
    /// Merges attempted under the write-protect guard (cumulative).
    pub merge_attempts: u64,
    /// Merges refused, all causes (cumulative).
    pub merge_failures: u64,
    /// VMAs inside guest memory.
    pub vmas_used: u64,
    /// Most VMAs the engine may use.
    pub vma_budget: u64,
    /// Whether the VMA budget holds merges back now.
    pub vma_budget_reached: bool,
    /// Bytes of engine metadata.
    pub metadata_bytes: u64,
    /// CPU time the engine used, in nanoseconds.
    pub cpu_ns: u64,
    /// Wall time inside the engine's scan steps, in nanoseconds (cumulative).
    pub wall_ns: u64,
    /// Time per phase of the scan steps.
    pub phases: Phases,
}

/// The whole report: `GET /stats`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Report {
    /// Who merges.
    pub mode: Mode,
    /// Global figures.
    #[serde(flatten)]
    pub counts: Counts,
    /// Guest RAM pages of every guest.
    pub pages: u64,
    /// Engine details (`--dedup` only).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineDetails>,
    /// Degraded state, failures by cause and the memory guard (`--dedup` only).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthReport>,
    /// Per guest, in start order.
    pub guests: Vec<GuestReport>,
}

/// The fields of [`Counts`] in order, with their Prometheus type and help text.
pub const COUNT_FIELDS: &[(&str, &str, &str)] = &[
    ("pages_shared", "gauge", "Shared copies in use."),
    (
        "pages_sharing",
        "gauge",
        "Pages mapped to a shared copy beyond the first of each.",
    ),
    (
        "pages_unshared",
        "gauge",
        "Stable pages nothing else has the content of.",
    ),
    (
        "pages_volatile",
        "gauge",
        "Pages whose content changed since the previous look.",
    ),
    ("pages_scanned", "counter", "Pages hashed."),
    (
        "full_scans",
        "counter",
        "Completed passes over all guest memory.",
    ),
    (
        "zero_pages",
        "gauge",
        "Pages dropped to the host zero page.",
    ),
    (
        "cow_breaks",
        "counter",
        "Merged or zero pages made private again by a write.",
    ),
    ("general_profit", "gauge", "Bytes saved minus metadata."),
    (
        "bytes_saved",
        "gauge",
        "Bytes saved: (pages_sharing + zero_pages) * 4096.",
    ),
];

impl Counts {
    /// The value of field `name` of [`COUNT_FIELDS`].
    pub fn get(&self, name: &str) -> Option<i128> {
        Some(match name {
            "pages_shared" => self.pages_shared.into(),
            "pages_sharing" => self.pages_sharing.into(),
            "pages_unshared" => self.pages_unshared.into(),
            "pages_volatile" => self.pages_volatile.into(),
            "pages_scanned" => self.pages_scanned.into(),
            "full_scans" => self.full_scans.into(),
            "zero_pages" => self.zero_pages.into(),
            "cow_breaks" => self.cow_breaks.into(),
            "general_profit" => self.general_profit.into(),
            "bytes_saved" => self.bytes_saved.into(),
            _ => return None,
        })
    }
}

impl Report {
    /// The report as pretty JSON text, fields in a fixed order.
    pub fn to_json(&self) -> String {
        // Plain structs of strings and numbers always serialize; the empty object is a
        // fallback that cannot happen.
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".into()) + "\n"
    }

    /// The one-line summary printed on stderr every `--stats-interval`; with `--dedup` it ends
    /// with ` degraded=CAUSE,..` while the engine is degraded, ` memory=LEVEL` while the
    /// memory guard is not at `ok` and ` stale=AGE` (`12.3s`) while the engine does not scan,
    /// so that the page figures are as old as that.
    pub fn summary(&self) -> String {
        let mut line = self.counts_summary();
        if let Some(h) = &self.health {
            if h.degraded {
                line.push_str(&format!(" degraded={}", h.causes()));
            }
            if let Some(m) = h.memory.as_ref().filter(|m| m.level != Default::default()) {
                line.push_str(&format!(" memory={}", m.level.name()));
            }
            if h.figures.stale {
                let ms = h.figures.age_ms;
                line.push_str(&format!(" stale={}.{}s", ms / 1000, ms % 1000 / 100));
            }
        }
        line
    }

    fn counts_summary(&self) -> String {
        let c = &self.counts;
        format!(
            "mode={} shared={} sharing={} unshared={} volatile={} zero={} scanned={} full_scans={} cow_breaks={} saved={} profit={}",
            self.mode.name(),
            c.pages_shared,
            c.pages_sharing,
            c.pages_unshared,
            c.pages_volatile,
            c.zero_pages,
            c.pages_scanned,
            c.full_scans,
            c.cow_breaks,
            human_bytes(c.bytes_saved as i128),
            human_bytes(c.general_profit.into()),
        )
    }
}

/// A byte count in binary units with one decimal (`1.5GiB`, `-12.0KiB`, `512B`).
pub fn human_bytes(bytes: i128) -> String {
    let sign = if bytes < 0 { "-" } else { "" };
    let b = bytes.unsigned_abs();
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if b >= 1 << shift {
            let whole = b >> shift;
            let tenth = ((b - (whole << shift)) * 10) >> shift;
            return format!("{sign}{whole}.{tenth}{unit}");
        }
    }
    format!("{sign}{b}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let counts = Counts {
            pages_shared: 2,
            pages_sharing: 5,
            zero_pages: 3,
            bytes_saved: 8 * PAGE_BYTES,
            general_profit: 8 * 4096 - 100,
            ..Counts::default()
        };
        Report {
            mode: Mode::Dedup,
            counts,
            pages: 100,
            engine: Some(EngineDetails {
                merges: 10,
                wall_ns: 100,
                phases: Phases {
                    scan_ns: 1,
                    plan_ns: 2,
                    fill_ns: 3,
                    commit_ns: 4,
                    account_ns: 5,
                },
                ..EngineDetails::default()
            }),
            health: None,
            guests: vec![GuestReport {
                name: "guest0".into(),
                domain: "default".into(),
                counts,
                pages: 100,
                pages_dirty: 7,
            }],
        }
    }

    #[test]
    fn json_has_the_documented_flat_field_names() {
        let v: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        let top = v.as_object().unwrap();
        for (f, _, _) in COUNT_FIELDS {
            assert!(top[*f].is_number(), "{f}");
        }
        assert_eq!(top["mode"], "dedup");
        assert_eq!(top["merges"], 10);
        assert_eq!(top["wall_ns"], 100);
        // The phases as one nested object with exactly the documented names.
        let phases = top["phases"].as_object().unwrap();
        let names = ["scan_ns", "plan_ns", "fill_ns", "commit_ns", "account_ns"];
        assert_eq!(phases.len(), names.len(), "{phases:?}");
        for (i, n) in names.iter().enumerate() {
            assert_eq!(phases[*n], i as u64 + 1, "{n}");
        }
        let g = &top["guests"][0];
        for (f, _, _) in COUNT_FIELDS {
            assert!(g[*f].is_number(), "guest {f}");
        }
        assert_eq!(g["name"], "guest0");
        assert_eq!(g["domain"], "default");
        assert_eq!(g["pages_dirty"], 7);
        // The JSON reads back as the same report.
        let back: Report = serde_json::from_str(&sample().to_json()).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn engine_details_are_left_out_without_an_engine() {
        let r = Report {
            engine: None,
            mode: Mode::Ksm,
            ..sample()
        };
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert!(v.get("merges").is_none());
        assert!(v.get("phases").is_none());
        assert!(v.get("figures").is_none());
        assert_eq!(v["mode"], "ksm");
    }

    #[test]
    fn every_count_field_is_listed_and_readable() {
        let v = serde_json::to_value(Counts::default()).unwrap();
        let names: Vec<&str> = COUNT_FIELDS.iter().map(|f| f.0).collect();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(keys, sorted);
        let c = sample().counts;
        assert_eq!(c.get("pages_sharing"), Some(5));
        assert_eq!(c.get("nope"), None);
    }

    #[test]
    fn summary_names_degraded_causes_and_memory_level() {
        use crate::dedup::guard::Level;
        use crate::dedup::health::{Cause, HealthReport, MemoryReport, Reason};
        let mut r = sample();
        r.health = Some(HealthReport::default());
        assert!(!r.summary().contains("degraded"), "{}", r.summary());
        r.health = Some(HealthReport {
            degraded: true,
            degraded_reasons: vec![Reason {
                cause: Cause::Pool,
                detail: "x".into(),
            }],
            memory: Some(MemoryReport {
                level: Level::Pressure,
                ..MemoryReport::default()
            }),
            ..HealthReport::default()
        });
        assert!(
            r.summary().ends_with(" degraded=pool memory=pressure"),
            "{}",
            r.summary()
        );
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["degraded_reasons"][0]["cause"], "pool");
        assert_eq!(v["memory"]["level"], "pressure");
        assert_eq!(v["merging_paused"], false);
        assert_eq!(v["figures"]["stale"], false);
    }

    #[test]
    fn summary_says_how_old_stale_figures_are() {
        use crate::dedup::figures::{FiguresReport, StaleReason};
        use crate::dedup::health::HealthReport;
        let mut r = sample();
        let figures = |stale: bool, age_ms: u64| HealthReport {
            merging_paused: stale,
            figures: FiguresReport {
                stale,
                reason: stale.then_some(StaleReason::MemoryPressure),
                as_of_unix_ms: 1,
                age_ms,
            },
            ..HealthReport::default()
        };
        r.health = Some(figures(false, 12_345));
        assert!(!r.summary().contains("stale"), "{}", r.summary());
        r.health = Some(figures(true, 12_345));
        assert!(r.summary().ends_with(" stale=12.3s"), "{}", r.summary());
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["figures"]["reason"], "memory_pressure");
        assert_eq!(v["figures"]["age_ms"], 12_345);
        let back: Report = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn summary_is_one_line_with_human_sizes() {
        let s = sample().summary();
        assert!(!s.contains('\n'));
        assert!(s.starts_with("mode=dedup shared=2 sharing=5 "), "{s}");
        assert!(s.contains("saved=32.0KiB"), "{s}");
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(3 << 29), "1.5GiB");
        assert_eq!(human_bytes(-(12 << 10)), "-12.0KiB");
    }
}
