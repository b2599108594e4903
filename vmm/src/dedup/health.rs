//! Whether the engine is degraded, and why: the statistics fields `degraded`,
//! `degraded_reasons`, `failures` (merges refused, by cause), `pool_errors`, `pool_error`,
//! `guard_repairs`, `guarded_writes`, `merging_paused`, `memory` and `figures` (whether the page
//! figures are stale, see [`super::figures`]).
//!
//! A failing system call never stops the engine: the batch it concerns rolls back and the pages
//! stay private with their content. The engine is *degraded* while such failures keep
//! happening: a cause counts as long as its failures grew during the current or the last
//! completed pass over guest memory, or the engine reports that kind of failure going on
//! (`Stats::failing`: while a failing operation backs off its counters stand still), and
//! clears after a whole pass without one once the engine no longer reports it. `vma_budget`
//! counts the merges the VMA budget refused (the longest runs go first, shorter ones wait);
//! `memory_pressure` is a state: the memory guard paused merging.

use serde::{Deserialize, Serialize};
use vm_dedup::{Failures, Stats};

use super::figures::FiguresReport;
use super::guard::Level;

/// Why the engine is degraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// Pool operations fail (memfd creation, growth, filling, punching).
    Pool,
    /// Remaps fail with ENOMEM: the process is at `vm.max_map_count`.
    VmaLimit,
    /// The VMA budget refuses merges: the longest runs go first, shorter ones wait.
    VmaBudget,
    /// userfaultfd guard operations fail or pages are left outside the guard.
    Guard,
    /// Remaps fail for another reason.
    Remap,
    /// Write-protecting fails.
    Protect,
    /// Dropping zero pages fails.
    ZeroPage,
    /// The memory guard paused merging.
    MemoryPressure,
}

impl Cause {
    /// Every cause, in the order `degraded_reasons` lists them.
    pub const ALL: [Cause; 8] = [
        Cause::Pool,
        Cause::VmaLimit,
        Cause::VmaBudget,
        Cause::Guard,
        Cause::Remap,
        Cause::Protect,
        Cause::ZeroPage,
        Cause::MemoryPressure,
    ];

    /// The cause's name, as the statistics spell it.
    pub fn name(self) -> &'static str {
        match self {
            Cause::Pool => "pool",
            Cause::VmaLimit => "vma_limit",
            Cause::VmaBudget => "vma_budget",
            Cause::Guard => "guard",
            Cause::Remap => "remap",
            Cause::Protect => "protect",
            Cause::ZeroPage => "zero_page",
            Cause::MemoryPressure => "memory_pressure",
        }
    }
}

/// One reason the engine is degraded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    /// What fails.
    pub cause: Cause,
    /// What it means, with figures and the system's error where known.
    pub detail: String,
}

/// The memory cgroup as the guard last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CgroupReport {
    /// `v1` or `v2`.
    pub version: String,
    /// The cgroup's path in its hierarchy.
    pub path: String,
    /// Memory charged to it.
    pub usage_bytes: u64,
    /// `usage_bytes` less inactive file cache: what counts against the limit.
    pub working_set_bytes: u64,
    /// Its effective limit (`null`: none).
    pub limit_bytes: Option<u64>,
    /// `working_set_bytes` in percent of `limit_bytes`.
    pub percent: Option<u32>,
    /// The kernel reports it out of memory.
    pub under_oom: bool,
    /// Out-of-memory events the kernel counted.
    pub oom_events: u64,
}

/// The host's RAM as the guard last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HostReport {
    /// `MemTotal`.
    pub mem_total_bytes: u64,
    /// `MemAvailable`.
    pub mem_available_bytes: u64,
    /// `MemTotal - MemAvailable` in percent of `MemTotal`.
    pub used_percent: u32,
}

/// What the memory guard last saw and decided.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MemoryReport {
    /// `ok`, `pressure` (merging paused) or `critical` (guests stopped).
    pub level: Level,
    /// The process's memory cgroup (`null` when it is in none with a readable memory
    /// controller).
    pub cgroup: Option<CgroupReport>,
    /// The host (`null` when /proc/meminfo cannot be read).
    pub host: Option<HostReport>,
}

/// The health fields of `GET /stats` with `--dedup`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HealthReport {
    /// Whether any reason below holds.
    pub degraded: bool,
    /// Why, one entry per cause.
    pub degraded_reasons: Vec<Reason>,
    /// Merges refused, by cause (cumulative), with the engine's names.
    pub failures: Failures,
    /// Pool operations that failed (cumulative).
    pub pool_errors: u64,
    /// The most recent pool failure with its cause.
    pub pool_error: Option<String>,
    /// userfaultfd guard operations repaired by unregistering (cumulative).
    pub guard_repairs: u64,
    /// Writes that hit a page while it was guarded (they waited for the batch; cumulative).
    pub guarded_writes: u64,
    /// Whether the memory guard paused merging.
    pub merging_paused: bool,
    /// The memory guard's view (`null` before its first look).
    pub memory: Option<MemoryReport>,
    /// Whether the page figures follow the guests, and from when they date.
    pub figures: FiguresReport,
}

impl HealthReport {
    /// The report for `stats`, with the tracker's reasons, the guard's state and the figures'
    /// freshness.
    pub fn new(
        stats: &Stats,
        reasons: &[Reason],
        paused: bool,
        memory: Option<MemoryReport>,
        figures: FiguresReport,
    ) -> Self {
        Self {
            degraded: !reasons.is_empty(),
            degraded_reasons: reasons.to_vec(),
            failures: stats.failures,
            pool_errors: stats.pool_errors,
            pool_error: stats.pool_error.clone(),
            guard_repairs: stats.guard_repairs,
            guarded_writes: stats.guarded_writes,
            merging_paused: paused,
            memory,
            figures,
        }
    }

    /// The causes, comma-separated (`pool,vma_limit`), for the summary line.
    pub fn causes(&self) -> String {
        let names: Vec<&str> = self
            .degraded_reasons
            .iter()
            .map(|r| r.cause.name())
            .collect();
        names.join(",")
    }
}

/// A failure counter and the pass during which it last grew.
#[derive(Debug, Clone, Copy, Default)]
struct Mark {
    value: u64,
    grew_at: Option<u64>,
}

/// Failure counters of each cause that is about failures.
fn counters(s: &Stats) -> [(Cause, u64); 7] {
    let f = &s.failures;
    [
        (Cause::Pool, s.pool_errors + f.pool),
        (Cause::VmaLimit, f.vma_limit),
        (Cause::VmaBudget, f.vma_budget),
        (Cause::Guard, s.guard_repairs + f.unguarded),
        (Cause::Remap, f.remap),
        (Cause::Protect, f.protect),
        (Cause::ZeroPage, f.zero_page),
    ]
}

/// The cause a kind of failure the engine reports going on (`Stats::failing`) belongs to.
/// `vma_limit` is left to its counter: once a remap fails with ENOMEM the engine keeps under the
/// limit it learnt, and what holds merges back from then on is the VMA budget (`vma_budget`).
fn cause_of_failing(name: &str) -> Option<Cause> {
    Some(match name {
        "pool" | "punch" => Cause::Pool,
        "guard" => Cause::Guard,
        "remap" => Cause::Remap,
        "protect" => Cause::Protect,
        "zero_page" => Cause::ZeroPage,
        _ => return None,
    })
}

/// Whether the engine reports a failure of `cause` going on. Between the tries of its
/// backoff a failing operation is not tried, so its counters stand still; the cause holds
/// until the engine sees the operation succeed again.
fn engine_failing(s: &Stats, cause: Cause) -> bool {
    s.failing
        .iter()
        .any(|f| cause_of_failing(&f.cause) == Some(cause))
}

fn detail(cause: Cause, s: &Stats) -> String {
    let f = &s.failures;
    match cause {
        Cause::Pool => format!(
            "{} pool operations failed, {} merges refused: {}; no new shared copy can be made \
             (zero pages still merge)",
            s.pool_errors,
            f.pool,
            s.pool_error.as_deref().unwrap_or("cause unknown")
        ),
        Cause::VmaLimit => format!(
            "{} remaps failed with ENOMEM: the process is at vm.max_map_count; merged pages \
             stay, merges needing a new mapping are refused (leave vma_budget=auto, which keeps \
             headroom)",
            f.vma_limit
        ),
        Cause::VmaBudget => format!(
            "{} merges refused by the VMA budget ({} of its {} VMAs used): the longest runs of \
             pages merge first, shorter ones wait (raise vm.max_map_count to merge more)",
            f.vma_budget, s.vmas_used, s.vma_budget
        ),
        Cause::Guard => format!(
            "{} write-protect guard repairs, {} merges refused outside the guard: the \
             ranges concerned are left out of merging until they can be guarded again",
            s.guard_repairs, f.unguarded
        ),
        Cause::Remap => format!("{} remaps failed", f.remap),
        Cause::Protect => format!("{} write-protects failed", f.protect),
        Cause::ZeroPage => format!("{} zero-page drops failed", f.zero_page),
        Cause::MemoryPressure => "merging paused by the memory guard".into(),
    }
}

/// What changed at an update.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Causes that began, with their reasons.
    pub began: Vec<Reason>,
    /// Causes that ended.
    pub ended: Vec<Cause>,
}

/// Follows the statistics and says which causes hold.
#[derive(Debug, Default)]
pub struct Tracker {
    marks: Vec<(Cause, Mark)>,
    reasons: Vec<Reason>,
}

impl Tracker {
    /// Looks at `s`; `paused` is the memory guard's reason when it paused merging.
    pub fn update(&mut self, s: &Stats, paused: Option<&str>) -> Changes {
        let mut now: Vec<Reason> = Vec::new();
        for (cause, value) in counters(s) {
            let i = match self.marks.iter().position(|(c, _)| *c == cause) {
                Some(i) => i,
                None => {
                    self.marks.push((cause, Mark::default()));
                    self.marks.len() - 1
                }
            };
            let mark = &mut self.marks[i].1;
            if value > mark.value {
                mark.grew_at = Some(s.full_scans);
            }
            mark.value = value;
            let grew_lately = mark.grew_at.is_some_and(|p| s.full_scans <= p + 1);
            if grew_lately || engine_failing(s, cause) {
                now.push(Reason {
                    cause,
                    detail: detail(cause, s),
                });
            }
        }
        if let Some(why) = paused {
            now.push(Reason {
                cause: Cause::MemoryPressure,
                detail: why.to_string(),
            });
        }
        let had = |c: Cause, list: &[Reason]| list.iter().any(|r| r.cause == c);
        let changes = Changes {
            began: now
                .iter()
                .filter(|r| !had(r.cause, &self.reasons))
                .cloned()
                .collect(),
            ended: self
                .reasons
                .iter()
                .filter(|r| !had(r.cause, &now))
                .map(|r| r.cause)
                .collect(),
        };
        self.reasons = now;
        changes
    }

    /// The reasons that hold as of the last update.
    pub fn reasons(&self) -> &[Reason] {
        &self.reasons
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(full_scans: u64, pool_errors: u64) -> Stats {
        Stats {
            full_scans,
            pool_errors,
            pool_error: (pool_errors > 0)
                .then(|| "creating the pool of node 0: Too many open files (os error 24)".into()),
            ..Stats::default()
        }
    }

    #[test]
    fn a_failure_degrades_until_a_whole_pass_goes_by_without_one() {
        let mut t = Tracker::default();
        assert_eq!(t.update(&stats(3, 0), None), Changes::default());
        let c = t.update(&stats(3, 2), None);
        assert_eq!(c.began.len(), 1);
        assert_eq!(c.began[0].cause, Cause::Pool);
        assert!(c.began[0].detail.contains("Too many open files"), "{c:?}");
        // Still failing during the next pass; then one pass without failures is not enough,
        // the pass in which the failure happened must end first.
        assert!(t.update(&stats(4, 5), None).began.is_empty());
        assert_eq!(t.reasons().len(), 1);
        assert_eq!(t.update(&stats(5, 5), None), Changes::default());
        let c = t.update(&stats(6, 5), None);
        assert_eq!(c.ended, vec![Cause::Pool]);
        assert!(t.reasons().is_empty());
    }

    #[test]
    fn a_failure_the_engine_holds_back_degrades_while_its_counters_stand_still() {
        let mut t = Tracker::default();
        let mut s = stats(3, 2);
        s.failing.push(vm_dedup::Failing {
            cause: "pool".into(),
            what: "the pool of node 0".into(),
            failures: 2,
            last_error: "Operation not permitted (os error 1)".into(),
            secs: 1,
            held_back: true,
        });
        assert_eq!(t.update(&s, None).began.len(), 1);
        // Many passes without a try (backoff): still degraded.
        s.full_scans = 40;
        assert_eq!(t.update(&s, None), Changes::default());
        assert_eq!(t.reasons()[0].cause, Cause::Pool);
        // The engine saw the pool work again: the cause ends.
        s.failing.clear();
        assert_eq!(t.update(&s, None).ended, vec![Cause::Pool]);
    }

    #[test]
    fn states_hold_while_they_last() {
        let mut t = Tracker::default();
        let mut tight = Stats {
            vmas_used: 90,
            vma_budget: 100,
            ..Stats::default()
        };
        tight.failures.vma_budget = 7;
        let c = t.update(&tight, Some("cgroup at 91%"));
        let causes: Vec<Cause> = c.began.iter().map(|r| r.cause).collect();
        assert_eq!(causes, vec![Cause::VmaBudget, Cause::MemoryPressure]);
        assert!(
            c.began[0]
                .detail
                .starts_with("7 merges refused by the VMA budget (90 of its 100 VMAs used)"),
            "{c:?}"
        );
        let r = HealthReport::new(&tight, t.reasons(), true, None, FiguresReport::default());
        assert!(r.degraded && r.merging_paused);
        assert_eq!(r.causes(), "vma_budget,memory_pressure");
        // The budget's refusals end after a whole pass without one; the pause at once.
        let later = Stats {
            full_scans: 2,
            ..tight.clone()
        };
        let c = t.update(&later, None);
        assert_eq!(c.ended, vec![Cause::VmaBudget, Cause::MemoryPressure]);
        let v = serde_json::to_value(HealthReport::new(
            &Stats::default(),
            &[],
            false,
            None,
            FiguresReport::default(),
        ))
        .unwrap();
        assert_eq!(v["degraded"], false);
        assert_eq!(v["failures"]["vma_limit"], 0);
        assert!(v["pool_error"].is_null() && v["memory"].is_null());
    }

    #[test]
    fn cause_lists_match_the_json_names() {
        for c in Cause::ALL {
            assert_eq!(serde_json::to_value(c).unwrap(), c.name());
        }
        let mut names: Vec<&str> = Cause::ALL.iter().map(|c| c.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Cause::ALL.len());
        // Distinct counts, so that a name paired with the wrong field shows.
        let f = Failures {
            differed: 1,
            excluded: 2,
            unguarded: 3,
            vma_budget: 4,
            protect: 5,
            remap: 6,
            vma_limit: 7,
            zero_page: 8,
            pool: 9,
        };
        let v = serde_json::to_value(f).unwrap();
        assert_eq!(v.as_object().unwrap().len(), f.by_cause().len());
        for (name, count) in f.by_cause() {
            assert_eq!(v[name], count, "{name}");
        }
    }
}
