//! Pacing of the background scanner: KSM's `pages_to_scan` per wake-up and `sleep_millisecs`
//! between wake-ups, plus an optional CPU cap that lengthens the sleep after an expensive step.

use std::time::Duration;

/// How the background scanner spaces its steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pacing {
    /// Pages looked at per step.
    pub pages_to_scan: u64,
    /// Pause between steps.
    pub sleep: Duration,
    /// Largest share of one core the scanner may use, in percent (100 or more: no cap).
    pub max_cpu_percent: u32,
}

impl Pacing {
    /// The pause after a step that used `step_cpu` of CPU time: at least `sleep`, and long
    /// enough that the CPU used stays within the cap.
    pub fn pause_after(&self, step_cpu: Duration) -> Duration {
        if self.max_cpu_percent == 0 || self.max_cpu_percent >= 100 {
            return self.sleep;
        }
        let cap = u128::from(self.max_cpu_percent);
        let cpu = step_cpu.as_nanos();
        let needed = cpu * (100 - cap) / cap;
        let needed = Duration::from_nanos(u64::try_from(needed).unwrap_or(u64::MAX));
        needed.max(self.sleep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_cap_keeps_configured_sleep() {
        let p = Pacing {
            pages_to_scan: 100,
            sleep: Duration::from_millis(20),
            max_cpu_percent: 0,
        };
        assert_eq!(
            p.pause_after(Duration::from_secs(5)),
            Duration::from_millis(20)
        );
    }

    #[test]
    fn cap_stretches_sleep() {
        let p = Pacing {
            pages_to_scan: 100,
            sleep: Duration::from_millis(1),
            max_cpu_percent: 25,
        };
        // 10 ms of CPU at 25 % needs 30 ms of rest.
        assert_eq!(
            p.pause_after(Duration::from_millis(10)),
            Duration::from_millis(30)
        );
        // A cheap step keeps the configured minimum.
        assert_eq!(
            p.pause_after(Duration::from_micros(100)),
            Duration::from_millis(1)
        );
        let half = Pacing {
            max_cpu_percent: 50,
            ..p
        };
        assert_eq!(
            half.pause_after(Duration::from_millis(10)),
            Duration::from_millis(10)
        );
    }
}
