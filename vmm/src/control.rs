//! What the control API and the statistics writer can ask of a VMM process, whichever way its
//! guest memory is merged: `--dedup` (this VMM's engine), `--ksm` (kernel KSM) or neither.

use std::sync::Arc;

use vm_dedup::{GuestStats, Stats};

use crate::dedup::{self, Shared};
use crate::kernel_ksm::KernelKsm;
use crate::report::{Counts, EngineDetails, GuestReport, Mode, PAGE_BYTES, Phases, Report};

/// Why a request could not be done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is wrong (a 400).
    #[error("{0}")]
    Invalid(String),
    /// The request conflicts with the process's state (a 409).
    #[error("{0}")]
    Conflict(String),
    /// The request was right but failed (a 500).
    #[error("{0}")]
    Failed(String),
}

impl From<dedup::Error> for Error {
    fn from(e: dedup::Error) -> Self {
        match e {
            dedup::Error::Settings(_) => Error::Invalid(e.to_string()),
            dedup::Error::Owned { .. } | dedup::Error::Busy(_) | dedup::Error::Paused(_) => {
                Error::Conflict(e.to_string())
            }
            e => Error::Failed(e.to_string()),
        }
    }
}

/// The knobs as `GET /config` lists them: name and value as text, in a stable order.
pub type Knobs = Vec<(&'static str, String)>;

/// A VMM process's memory merging, as the API and the statistics writer see it.
pub trait Control: Send + Sync {
    /// Current statistics.
    fn stats(&self) -> Report;
    /// Current knobs.
    fn config(&self) -> Knobs;
    /// Changes knobs (name, value as text) all together or not at all; returns the knobs now in
    /// force.
    fn update(&self, changes: &[(String, String)]) -> Result<Knobs, Error>;
    /// Turns every merged page back into a private page; returns the statistics after.
    fn unmerge_all(&self) -> Result<Report, Error>;
}

impl std::fmt::Debug for dyn Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = self.stats().mode;
        f.debug_struct("Control").field("mode", &mode).finish()
    }
}

/// `--dedup`: this VMM's engine.
#[derive(Debug, Clone)]
pub struct DedupControl(pub Arc<Shared>);

fn counts_of_guest(g: &GuestStats, full_scans: u64) -> Counts {
    Counts {
        pages_shared: g.pages_shared,
        pages_sharing: g.pages_sharing,
        pages_unshared: g.pages_unshared,
        pages_volatile: g.pages_volatile,
        pages_scanned: g.pages_scanned,
        full_scans,
        zero_pages: g.zero_pages,
        cow_breaks: g.cow_breaks,
        general_profit: g.general_profit,
        bytes_saved: g.bytes_saved,
    }
}

/// The report of engine statistics; `dirty` gives a guest's dirty-log page count by name.
pub fn dedup_report(s: &Stats, dirty: impl Fn(&str) -> u64) -> Report {
    Report {
        mode: Mode::Dedup,
        counts: Counts {
            pages_shared: s.pages_shared,
            pages_sharing: s.pages_sharing,
            pages_unshared: s.pages_unshared,
            pages_volatile: s.pages_volatile,
            pages_scanned: s.pages_scanned,
            full_scans: s.full_scans,
            zero_pages: s.zero_pages,
            cow_breaks: s.cow_breaks,
            general_profit: s.general_profit,
            bytes_saved: s.bytes_saved,
        },
        pages: s.pages,
        engine: Some(EngineDetails {
            merges: s.merges,
            merge_attempts: s.merge_attempts,
            merge_failures: s.failures.total(),
            vmas_used: s.vmas_used,
            vma_budget: s.vma_budget,
            vma_budget_reached: s.vma_budget_reached,
            metadata_bytes: s.metadata_bytes,
            cpu_ns: s.cpu_ns,
            wall_ns: s.wall_ns,
            phases: Phases::from(&s.phases),
        }),
        health: None,
        guests: s
            .guests
            .iter()
            .map(|g| GuestReport {
                name: g.name.clone(),
                domain: g.domain.clone(),
                counts: counts_of_guest(g, s.full_scans),
                pages: g.pages,
                pages_dirty: dirty(&g.name),
            })
            .collect(),
    }
}

impl Control for DedupControl {
    fn stats(&self) -> Report {
        let guests = self.0.guests();
        let stats = self.0.engine().stats();
        let mut report = dedup_report(&stats, |name| {
            guests
                .iter()
                .find(|g| g.name == name)
                .map_or(0, |g| g.dirty.pages_reported())
        });
        report.health = Some(self.0.health(&stats));
        report
    }

    fn config(&self) -> Knobs {
        self.0.settings().knobs()
    }

    fn update(&self, changes: &[(String, String)]) -> Result<Knobs, Error> {
        Ok(self.0.update(changes)?.knobs())
    }

    fn unmerge_all(&self) -> Result<Report, Error> {
        self.0.unmerge_all()?;
        Ok(self.stats())
    }
}

/// `--ksm`: kernel KSM; knobs are the kernel's and are not changed here.
#[derive(Debug, Clone)]
pub struct KsmControl(pub Arc<KernelKsm>);

impl Control for KsmControl {
    fn stats(&self) -> Report {
        self.0.report()
    }

    fn config(&self) -> Knobs {
        Vec::new()
    }

    fn update(&self, _: &[(String, String)]) -> Result<Knobs, Error> {
        Err(Error::Conflict(
            "this process runs with --ksm: kernel KSM's knobs are in /sys/kernel/mm/ksm, not here"
                .into(),
        ))
    }

    fn unmerge_all(&self) -> Result<Report, Error> {
        Err(Error::Conflict(
            "this process runs with --ksm: unmerge through kernel KSM (run=2), not here".into(),
        ))
    }
}

/// Neither `--dedup` nor `--ksm`: nothing is merged; guests are listed by name.
#[derive(Debug, Clone)]
pub struct NoControl {
    /// Guest names and RAM pages.
    pub guests: Vec<(String, u64)>,
}

impl Control for NoControl {
    fn stats(&self) -> Report {
        Report {
            mode: Mode::None,
            counts: Counts::default(),
            pages: self.guests.iter().map(|g| g.1).sum(),
            engine: None,
            health: None,
            guests: self
                .guests
                .iter()
                .map(|(name, pages)| GuestReport {
                    name: name.clone(),
                    pages: *pages,
                    ..GuestReport::default()
                })
                .collect(),
        }
    }

    fn config(&self) -> Knobs {
        Vec::new()
    }

    fn update(&self, _: &[(String, String)]) -> Result<Knobs, Error> {
        Err(Error::Conflict(
            "this process runs without --dedup: there are no knobs to change".into(),
        ))
    }

    fn unmerge_all(&self) -> Result<Report, Error> {
        Err(Error::Conflict(
            "this process runs without --dedup: nothing is merged".into(),
        ))
    }
}

/// Guest RAM pages of `bytes`.
pub fn pages_of(bytes: u64) -> u64 {
    bytes / PAGE_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_stats_map_to_ksm_names_per_guest() {
        let g = GuestStats {
            name: "guest1".into(),
            domain: "tenant".into(),
            pages: 10,
            pages_shared: 1,
            pages_sharing: 2,
            pages_unshared: 3,
            pages_volatile: 4,
            pages_scanned: 5,
            zero_pages: 6,
            cow_breaks: 7,
            bytes_saved: 8 * 4096,
            general_profit: 9,
            ..GuestStats::default()
        };
        let s = Stats {
            pages_shared: 1,
            pages_sharing: 2,
            full_scans: 11,
            merges: 12,
            pages: 10,
            wall_ns: 100,
            phases: vm_dedup::stats::PhaseTimes {
                scan_ns: 21,
                plan_ns: 22,
                fill_ns: 23,
                commit_ns: 24,
                account_ns: 25,
            },
            guests: vec![g],
            ..Stats::default()
        };
        let r = dedup_report(&s, |n| if n == "guest1" { 13 } else { 0 });
        assert_eq!(r.mode, Mode::Dedup);
        assert_eq!((r.counts.pages_shared, r.counts.full_scans), (1, 11));
        let e = r.engine.unwrap();
        assert_eq!((e.merges, e.wall_ns), (12, 100));
        let p = e.phases;
        assert_eq!(
            [p.scan_ns, p.plan_ns, p.fill_ns, p.commit_ns, p.account_ns],
            [21, 22, 23, 24, 25]
        );
        let gr = &r.guests[0];
        assert_eq!((gr.name.as_str(), gr.domain.as_str()), ("guest1", "tenant"));
        let c = gr.counts;
        assert_eq!(
            [
                c.pages_shared,
                c.pages_sharing,
                c.pages_unshared,
                c.pages_volatile,
                c.pages_scanned,
                c.zero_pages,
                c.cow_breaks,
                c.full_scans
            ],
            [1, 2, 3, 4, 5, 6, 7, 11]
        );
        assert_eq!((c.bytes_saved, c.general_profit), (8 * 4096, 9));
        assert_eq!((gr.pages, gr.pages_dirty), (10, 13));
    }

    #[test]
    fn without_an_engine_changes_are_conflicts() {
        let c = NoControl {
            guests: vec![("guest0".into(), 4096)],
        };
        assert!(matches!(c.update(&[]), Err(Error::Conflict(_))));
        assert!(matches!(c.unmerge_all(), Err(Error::Conflict(_))));
        let r = c.stats();
        assert_eq!(
            (r.mode, r.pages, r.guests[0].pages),
            (Mode::None, 4096, 4096)
        );
    }
}
