//! The scan-time advisor (kernel KSM's `advisor_mode=scan-time`, rebuilt for this engine): after
//! each full pass, choose `pages_to_scan` from what the pass cost so that the next full pass
//! takes about `advisor_target_scan_ms`, without using more than `advisor_max_cpu` percent of
//! one core. `sleep_millisecs` stays as set; the engine's own CPU cap (`max_cpu_percent`) is set
//! to the same share so that a burst of work is paced at once, not a pass later.
//!
//! The model: a pass over `P` pages in steps of `p` pages costs `P * w` of step time (wall time
//! inside the steps) and `P * c` of CPU time, plus `ceil(P / p)` sleeps of `s`. The pass takes
//! `T = P * w + ceil(P / p) * s`, and uses `P * c / T` of a core. Solving for the target time,
//! stretched where the CPU cap needs it, gives `p`.

/// The advisor's knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdvisorSettings {
    /// Wanted time for one full pass over all guest memory, in milliseconds.
    pub target_scan_ms: u64,
    /// Largest share of one core the scanner may use, in percent (1 to 100).
    pub max_cpu_percent: u32,
}

impl Default for AdvisorSettings {
    fn default() -> Self {
        Self {
            target_scan_ms: 2000,
            max_cpu_percent: 50,
        }
    }
}

/// Bounds a tuner keeps `pages_to_scan` in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLimits {
    /// Smallest `pages_to_scan`.
    pub min: u64,
    /// Largest `pages_to_scan`.
    pub max: u64,
}

impl Default for PageLimits {
    fn default() -> Self {
        Self {
            min: 256,
            max: 1 << 16,
        }
    }
}

impl PageLimits {
    /// `pages` within the bounds.
    pub fn clamp(&self, pages: u64) -> u64 {
        pages.clamp(self.min, self.max.max(self.min))
    }
}

/// What one full pass cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassCost {
    /// Pages the pass looked at (all registered guest pages).
    pub pages: u64,
    /// CPU time of the pass (every engine thread), in nanoseconds.
    pub cpu_ns: u64,
    /// Wall time spent inside the pass's steps (sleeps excluded), in nanoseconds.
    pub work_ns: u64,
}

/// Largest factor by which one advice changes `pages_to_scan`, so that one odd pass cannot
/// swing the rate.
const MAX_CHANGE: u64 = 4;

/// The advisor's memory: smoothed costs per page.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Advisor {
    cpu_per_page: Option<f64>,
    work_per_page: Option<f64>,
}

fn smooth(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |o| (o + new) / 2.0)
}

impl Advisor {
    /// The `pages_to_scan` for the next pass, given the cost of the pass just finished, the
    /// engine's `sleep_millisecs` and its current `pages_to_scan`.
    pub fn advise(
        &mut self,
        settings: &AdvisorSettings,
        limits: PageLimits,
        pass: PassCost,
        sleep_ms: u64,
        current: u64,
    ) -> u64 {
        if pass.pages == 0 {
            return limits.clamp(current);
        }
        let pages = pass.pages as f64;
        let cpu = smooth(self.cpu_per_page, pass.cpu_ns as f64 / pages);
        let work = smooth(self.work_per_page, pass.work_ns as f64 / pages);
        self.cpu_per_page = Some(cpu);
        self.work_per_page = Some(work);

        let cap = f64::from(settings.max_cpu_percent.clamp(1, 100)) / 100.0;
        let target_ns = settings.target_scan_ms as f64 * 1e6;
        // A pass must last at least this long for its CPU time to stay within the cap.
        let capped_ns = pages * cpu / cap;
        let pass_ns = target_ns.max(capped_ns);
        let sleep_ns = sleep_ms as f64 * 1e6;
        let sleep_budget = pass_ns - pages * work;
        let wanted = if sleep_ns <= 0.0 || sleep_budget <= sleep_ns {
            // Sleeps cost nothing, or the work alone fills the time: as few steps as allowed.
            limits.max
        } else {
            // Enough sleeps to fill the time, and steps small enough to need them all.
            let steps = (sleep_budget / sleep_ns).ceil().max(1.0);
            ((pages / steps).floor() as u64).max(1)
        };
        let lo = (current / MAX_CHANGE).max(1);
        let hi = current.saturating_mul(MAX_CHANGE).max(1);
        limits.clamp(wanted.clamp(lo, hi))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: PageLimits = PageLimits {
        min: 64,
        max: 1 << 20,
    };

    /// A pass of `pages` pages costing `ns_per_page` of CPU and of step time.
    fn pass(pages: u64, ns_per_page: u64) -> PassCost {
        PassCost {
            pages,
            cpu_ns: pages * ns_per_page,
            work_ns: pages * ns_per_page,
        }
    }

    /// Predicted pass time and CPU share for `p` pages per step.
    fn predict(pass: PassCost, p: u64, sleep_ms: u64) -> (f64, f64) {
        let steps = pass.pages.div_ceil(p) as f64;
        let t = pass.work_ns as f64 + steps * sleep_ms as f64 * 1e6;
        (t, pass.cpu_ns as f64 / t)
    }

    /// Runs the advisor until it settles.
    fn settle(s: &AdvisorSettings, pass: PassCost, sleep_ms: u64, start: u64) -> u64 {
        let mut a = Advisor::default();
        let mut p = start;
        for _ in 0..20 {
            p = a.advise(s, LIMITS, pass, sleep_ms, p);
        }
        p
    }

    #[test]
    fn reaches_the_target_pass_time() {
        // 1 GiB of guest pages at 200 ns each: 52 ms of work; 20 ms sleeps; 2 s target.
        let s = AdvisorSettings {
            target_scan_ms: 2000,
            max_cpu_percent: 100,
        };
        let cost = pass(262_144, 200);
        let p = settle(&s, cost, 20, 100);
        let (t, _) = predict(cost, p, 20);
        assert!(
            (2.0e9..=2.05e9).contains(&t),
            "pass of {t} ns with {p} pages per step"
        );
    }

    #[test]
    fn slow_passes_raise_and_fast_passes_lower_the_rate() {
        let s = AdvisorSettings::default();
        let cost = pass(262_144, 200);
        let mut a = Advisor::default();
        // 100 pages per step: 2622 sleeps of 20 ms, far too slow.
        assert_eq!(a.advise(&s, LIMITS, cost, 20, 100), 400);
        // A huge step: one sleep per pass, far faster than needed.
        let mut a = Advisor::default();
        assert_eq!(a.advise(&s, LIMITS, cost, 20, 200_000), 50_000);
    }

    #[test]
    fn the_cpu_cap_stretches_the_pass() {
        // 1 us of CPU per page: 262 ms per pass; a 300 ms target would take 87 % of a core.
        let s = AdvisorSettings {
            target_scan_ms: 300,
            max_cpu_percent: 25,
        };
        let cost = pass(262_144, 1000);
        let p = settle(&s, cost, 10, 1000);
        let (t, share) = predict(cost, p, 10);
        assert!(
            share <= 0.25 + 1e-9,
            "share {share} with {p} pages per step"
        );
        assert!(
            t <= 1.1 * 262_144e3 / 0.25,
            "pass of {t} ns is longer than the cap needs"
        );
    }

    #[test]
    fn stays_within_limits_and_ignores_empty_passes() {
        let s = AdvisorSettings::default();
        let mut a = Advisor::default();
        let tight = PageLimits { min: 500, max: 600 };
        assert_eq!(a.advise(&s, tight, pass(10, 1), 20, 550), 500);
        assert_eq!(a.advise(&s, tight, pass(1 << 30, 1000), 20, 550), 600);
        assert_eq!(a.advise(&s, LIMITS, pass(0, 0), 20, 777), 777);
        // Without sleeps, the pass is as short as the work: take the largest steps.
        let mut a = Advisor::default();
        assert_eq!(
            a.advise(&s, LIMITS, pass(1 << 20, 100), 0, 1 << 19),
            1 << 20
        );
    }
}
