//! Memory of a run over time and what it says: savings against a baseline, when savings reached
//! a fraction of their final value, and whether they have stopped growing (a plateau).
//!
//! Pure functions over [`Sample`]s; the density benchmark and the demo take the samples.
//!
//! ```
//! use vmm_benches::convergence::{Plateau, Sample, time_to_fraction};
//!
//! // 1000 bytes without merging; merging brings the memory down to 600.
//! let s = |t: f64, mem: u64, cpu: f64| Sample { t, pss: mem, cgroup: None, cpu, full_scans: None };
//! let run = [s(0.0, 1000, 0.0), s(1.0, 900, 0.5), s(2.0, 700, 1.0), s(3.0, 600, 1.5)];
//! // Final savings 400; 95% of them (380) falls between t=2 (300 saved) and t=3 (400).
//! let at = time_to_fraction(&run, 1000, 0.95).unwrap();
//! assert!((at.t - 2.8).abs() < 1e-9);
//! assert!((at.cpu - 1.4).abs() < 1e-9);
//! // Still going down over the last 3 s (the default window), by more than 0.5%.
//! let rule = Plateau { abs_tol: 0, ..Plateau::default() };
//! assert!(!rule.reached(&run));
//! ```

/// One look at a running VMM: times in seconds since its guests were ready, memory in bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Seconds since every guest was ready.
    pub t: f64,
    /// PSS of the VMM process.
    pub pss: u64,
    /// Memory of its cgroup without file cache, when it has one.
    pub cgroup: Option<u64>,
    /// CPU-seconds spent since ready by whatever does the merging (the VMM, plus `ksmd` for
    /// kernel KSM).
    pub cpu: f64,
    /// Completed full scans since ready, when the merger reports them.
    pub full_scans: Option<u64>,
}

/// Bytes saved when the memory is `mem` and the baseline `base` (negative: more than it).
pub fn savings(base: u64, mem: u64) -> i64 {
    i64::try_from(base).unwrap_or(i64::MAX) - i64::try_from(mem).unwrap_or(i64::MAX)
}

/// The moment a run reached some savings, interpolated between the samples around it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Crossing {
    /// Seconds since ready.
    pub t: f64,
    /// CPU-seconds spent by then.
    pub cpu: f64,
}

/// When the run first saved `fraction` of its final savings (those of its last sample) against
/// `base`: linear between the two samples around the crossing. `None` when the final savings
/// are not positive.
pub fn time_to_fraction(samples: &[Sample], base: u64, fraction: f64) -> Option<Crossing> {
    let last = samples.last()?;
    let final_savings = savings(base, last.pss);
    if final_savings <= 0 {
        return None;
    }
    let target = fraction * final_savings as f64;
    let mut previous: Option<&Sample> = None;
    for s in samples {
        let saved = savings(base, s.pss) as f64;
        if saved >= target {
            let Some(p) = previous else {
                return Some(Crossing { t: s.t, cpu: s.cpu });
            };
            let before = savings(base, p.pss) as f64;
            let k = if saved > before {
                (target - before) / (saved - before)
            } else {
                1.0
            };
            return Some(Crossing {
                t: p.t + k * (s.t - p.t),
                cpu: p.cpu + k * (s.cpu - p.cpu),
            });
        }
        previous = Some(s);
    }
    None
}

/// When memory is taken to have stopped going down.
///
/// Over the last `window_secs` (stretched back to the end of the full scan before the last one
/// when the merger reports full scans, so that the window holds one whole pass) the memory went
/// down by at most `rel_tol` of what it was at the window's start, or `abs_tol` bytes, whichever
/// is more. Kernel KSM and the engine both merge a page on the pass after the one that first
/// saw it, so a whole pass that saves nothing more means that nothing more will merge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plateau {
    /// Shortest window, seconds.
    pub window_secs: f64,
    /// Tolerated decrease, as a fraction of the memory at the window's start.
    pub rel_tol: f64,
    /// Tolerated decrease in bytes, when more than the relative one.
    pub abs_tol: u64,
}

impl Default for Plateau {
    fn default() -> Self {
        Self {
            window_secs: 3.0,
            rel_tol: 0.005,
            abs_tol: 4 << 20,
        }
    }
}

impl Plateau {
    /// Index of the window's first sample, or `None` when the samples do not cover a window yet.
    fn window_start(&self, samples: &[Sample]) -> Option<usize> {
        let last = samples.last()?;
        if last.t < self.window_secs {
            return None;
        }
        let by_time = samples
            .iter()
            .rposition(|s| s.t <= last.t - self.window_secs)?;
        let Some(scans) = last.full_scans else {
            return Some(by_time);
        };
        // The first sample after which a whole pass ended: the one where the count reached
        // scans - 1 (the pass that ends at `scans` ran entirely after it).
        let want = scans.checked_sub(1)?;
        let first_scan = samples.first()?.full_scans?;
        if want < first_scan + 1 {
            // No pass both started and ended since the first sample.
            return None;
        }
        let by_scan = samples
            .iter()
            .position(|s| s.full_scans.is_some_and(|n| n >= want))?;
        Some(by_time.min(by_scan))
    }

    /// Whether `samples` (in time order) end on a plateau.
    pub fn reached(&self, samples: &[Sample]) -> bool {
        let (Some(start), Some(last)) = (self.window_start(samples), samples.last()) else {
            return false;
        };
        let from = samples[start].pss;
        let drop = from.saturating_sub(last.pss);
        let tol = (self.rel_tol * from as f64).max(self.abs_tol as f64);
        drop as f64 <= tol
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: f64, pss: u64) -> Sample {
        Sample {
            t,
            pss,
            cgroup: None,
            cpu: t,
            full_scans: None,
        }
    }

    fn scanned(t: f64, pss: u64, scans: u64) -> Sample {
        Sample {
            full_scans: Some(scans),
            ..s(t, pss)
        }
    }

    #[test]
    fn savings_against_the_baseline() {
        assert_eq!(savings(1000, 400), 600);
        assert_eq!(savings(1000, 1200), -200);
    }

    #[test]
    fn crossing_is_interpolated_between_samples() {
        let run = [s(0.0, 1000), s(1.0, 900), s(2.0, 500), s(3.0, 500)];
        // final savings 500; 95% = 475, between 100 (t=1) and 500 (t=2): t = 1 + 375/400.
        let at = time_to_fraction(&run, 1000, 0.95).unwrap();
        assert!((at.t - (1.0 + 375.0 / 400.0)).abs() < 1e-9);
        assert!((at.cpu - at.t).abs() < 1e-9);
        // Already there at the first sample.
        let at = time_to_fraction(&[s(0.5, 500), s(1.0, 500)], 1000, 0.95).unwrap();
        assert_eq!(at.t, 0.5);
        // Memory that dips below its final value counts when the target is first reached:
        // final savings 480, target 456, between 0 (t=0) and 600 (t=1).
        let run = [s(0.0, 1000), s(1.0, 400), s(2.0, 520)];
        let at = time_to_fraction(&run, 1000, 0.95).unwrap();
        assert!((at.t - 0.76).abs() < 1e-9);
    }

    #[test]
    fn no_crossing_without_savings() {
        assert_eq!(time_to_fraction(&[], 1000, 0.95), None);
        assert_eq!(time_to_fraction(&[s(0.0, 1000)], 1000, 0.95), None);
        assert_eq!(time_to_fraction(&[s(0.0, 1100)], 1000, 0.95), None);
    }

    #[test]
    fn plateau_needs_a_flat_window() {
        let p = Plateau {
            window_secs: 2.0,
            rel_tol: 0.01,
            abs_tol: 0,
        };
        // Too short to tell.
        assert!(!p.reached(&[s(0.0, 1000), s(1.0, 1000)]));
        // Flat over 2 s.
        let flat = [s(0.0, 1000), s(1.0, 1000), s(2.0, 995)];
        assert!(p.reached(&flat));
        // Still falling: 1000 -> 900 in the last 2 s.
        let falling = [s(0.0, 2000), s(1.0, 1000), s(2.0, 950), s(3.0, 900)];
        assert!(!p.reached(&falling));
        // The absolute tolerance covers small memory.
        let p = Plateau { abs_tol: 100, ..p };
        assert!(p.reached(&falling));
    }

    #[test]
    fn plateau_waits_for_a_whole_pass_without_savings() {
        let p = Plateau {
            window_secs: 1.0,
            rel_tol: 0.0,
            abs_tol: 0,
        };
        // Flat for long, but the first pass (which only looks) has not ended: not a plateau.
        let first_pass: Vec<Sample> = (0..10).map(|i| scanned(i as f64, 1000, 0)).collect();
        assert!(!p.reached(&first_pass));
        // Pass 1 ended at t=9, pass 2 is still running: no whole pass seen flat yet.
        let mut run = first_pass.clone();
        run.push(scanned(10.0, 1000, 1));
        assert!(!p.reached(&run));
        // Pass 2 merges (memory falls) and ends at t=14.
        run.extend((11..=14).map(|i| scanned(i as f64, 1000 - 50 * (i - 10), 1)));
        run.push(scanned(15.0, 750, 2));
        assert!(!p.reached(&run));
        // Pass 3 saves nothing more and ends at t=20: a plateau.
        run.extend((16..20).map(|i| scanned(i as f64, 750, 2)));
        assert!(!p.reached(&run));
        run.push(scanned(20.0, 750, 3));
        assert!(p.reached(&run));
    }

    #[test]
    fn passes_before_the_first_sample_do_not_count() {
        let p = Plateau {
            window_secs: 1.0,
            rel_tol: 0.0,
            abs_tol: 0,
        };
        // The counter was 5 at the first sample and is 6 now: one pass ended, but it started
        // before the samples did.
        let run = [
            scanned(0.0, 10, 5),
            scanned(1.0, 10, 5),
            scanned(2.0, 10, 6),
        ];
        assert!(!p.reached(&run));
        let run = [
            scanned(0.0, 10, 5),
            scanned(1.0, 10, 6),
            scanned(2.0, 10, 6),
            scanned(3.0, 10, 7),
        ];
        assert!(p.reached(&run));
    }
}
