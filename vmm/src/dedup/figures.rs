//! Whether the page figures of the statistics follow the guests: the `figures` field of
//! `GET /stats` with `--dedup`.
//!
//! The engine counts pages (`pages_shared` to `bytes_saved`, `cow_breaks` included) only while
//! it scans: a guest's write to a merged page is counted when the scanner next looks at it. While
//! the engine does not scan (the memory guard paused merging, or `run` is 0 or 2) the figures
//! stay those of its last step. They are then *stale*; `as_of_unix_ms` and `age_ms` say from
//! when, as the VMM last saw the engine publish new figures (it looks at every statistics request
//! and every `mem_check_ms`). The engine offers no way to recount without scanning, so the VMM
//! marks them rather than refreshing them.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use vm_dedup::{RunMode, Stats};

/// Why the engine is not scanning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StaleReason {
    /// The memory guard paused merging.
    MemoryPressure,
    /// `run` is 0 (set through the API, or by the pressure tuner).
    Stopped,
    /// `run` is 2: everything was unmerged and the scanner is idle.
    Unmerged,
}

impl StaleReason {
    /// Why the engine does not scan, given the memory guard's pause and the run mode; `None`
    /// while it scans.
    pub fn of(paused: bool, run: RunMode) -> Option<Self> {
        if paused {
            return Some(Self::MemoryPressure);
        }
        match run {
            RunMode::Run => None,
            RunMode::Stop => Some(Self::Stopped),
            RunMode::UnmergeAll => Some(Self::Unmerged),
        }
    }

    /// The reason's name, as the statistics spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::MemoryPressure => "memory_pressure",
            Self::Stopped => "stopped",
            Self::Unmerged => "unmerged",
        }
    }
}

/// The `figures` field of the statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FiguresReport {
    /// Whether the engine is not scanning, so the page figures do not follow the guests.
    pub stale: bool,
    /// Why (`null` while it scans).
    pub reason: Option<StaleReason>,
    /// When the engine last published new figures, in milliseconds since the Unix epoch.
    pub as_of_unix_ms: u64,
    /// How long ago that was, in milliseconds.
    pub age_ms: u64,
}

/// When the engine's statistics last changed, as far as the VMM has seen.
#[derive(Debug)]
pub struct Freshness {
    last: Option<Stats>,
    at: Instant,
    wall: SystemTime,
}

impl Freshness {
    /// Nothing seen yet: the figures date from `now` (the engine was just created).
    pub fn new(now: Instant, wall: SystemTime) -> Self {
        Self {
            last: None,
            at: now,
            wall,
        }
    }

    /// Looks at the engine's latest statistics at `now`: if they differ from those seen before,
    /// the engine published new figures since. `Engine::stats` returns the snapshot published
    /// after a step (or an unmerge or discard), and every step changes at least its time
    /// counters, so equal statistics mean nothing was published.
    pub fn observe(&mut self, stats: &Stats, now: Instant, wall: SystemTime) {
        if self.last.as_ref() == Some(stats) {
            return;
        }
        if self.last.is_some() {
            self.at = now;
            self.wall = wall;
        }
        self.last = Some(stats.clone());
    }

    /// The report at `now`, with the reason the engine does not scan, if any.
    pub fn report(&self, reason: Option<StaleReason>, now: Instant) -> FiguresReport {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        FiguresReport {
            stale: reason.is_some(),
            reason,
            // A clock set before 1970 reads as the epoch.
            as_of_unix_ms: self.wall.duration_since(UNIX_EPOCH).map_or(0, ms),
            age_ms: ms(now.saturating_duration_since(self.at)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_date_from_the_last_change_the_vmm_saw() {
        let t0 = Instant::now();
        let w0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let later = |ms: u64| {
            (
                t0 + Duration::from_millis(ms),
                w0 + Duration::from_millis(ms),
            )
        };
        let mut f = Freshness::new(t0, w0);
        let mut s = Stats::default();
        // The first look only learns the figures: they date from the engine's creation.
        let (t, w) = later(50);
        f.observe(&s, t, w);
        let r = f.report(None, t);
        assert_eq!((r.stale, r.reason, r.age_ms), (false, None, 50));
        assert_eq!(r.as_of_unix_ms, 1_700_000_000_000);
        // A step changes them.
        s.wall_ns = 1;
        let (t, w) = later(120);
        f.observe(&s, t, w);
        assert_eq!(f.report(None, t).as_of_unix_ms, 1_700_000_000_120);
        // Paused: nothing changes, the age grows, the date stays.
        let (t, w) = later(5120);
        f.observe(&s, t, w);
        let r = f.report(StaleReason::of(true, RunMode::Stop), t);
        assert!(r.stale);
        assert_eq!(r.reason, Some(StaleReason::MemoryPressure));
        assert_eq!((r.as_of_unix_ms, r.age_ms), (1_700_000_000_120, 5000));
        let v = serde_json::to_value(r).unwrap();
        assert_eq!(v["reason"], "memory_pressure");
        assert_eq!(v["stale"], true);
        assert!(v["age_ms"].is_u64() && v["as_of_unix_ms"].is_u64());
    }

    #[test]
    fn stale_whenever_the_engine_does_not_scan() {
        assert_eq!(StaleReason::of(false, RunMode::Run), None);
        assert_eq!(
            StaleReason::of(false, RunMode::Stop),
            Some(StaleReason::Stopped)
        );
        assert_eq!(
            StaleReason::of(false, RunMode::UnmergeAll),
            Some(StaleReason::Unmerged)
        );
        assert_eq!(
            StaleReason::of(true, RunMode::Run),
            Some(StaleReason::MemoryPressure)
        );
        for r in [
            StaleReason::MemoryPressure,
            StaleReason::Stopped,
            StaleReason::Unmerged,
        ] {
            assert_eq!(serde_json::to_value(r).unwrap(), r.name());
        }
        let v = serde_json::to_value(FiguresReport::default()).unwrap();
        assert!(v["reason"].is_null());
    }
}
