//! The memory-pressure tuner (the idea of ksmtuned, rebuilt): merging costs CPU and only pays
//! when memory is short, so scan according to how much of the host's RAM is still available
//! (`MemAvailable` as a percentage of `MemTotal`):
//!
//! - below `pressure_low_percent`: memory is short. Run, and double `pages_to_scan` at every
//!   look, up to `tune_max_pages_to_scan`.
//! - from `pressure_low_percent` to below `pressure_high_percent`: enough for now. If running,
//!   keep running but back off: `pages_to_scan` shrinks by a quarter at every look, down to
//!   `tune_min_pages_to_scan`. If stopped, stay stopped (hysteresis: no flapping at one
//!   threshold).
//! - at or above `pressure_high_percent`: plenty. Stop scanning (`run=0`); what is merged stays
//!   merged.

use super::advisor::PageLimits;

/// The memory-pressure thresholds, in percent of host RAM available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PressureSettings {
    /// Below this, scan harder.
    pub low_percent: u32,
    /// At or above this, stop scanning.
    pub high_percent: u32,
}

impl Default for PressureSettings {
    fn default() -> Self {
        Self {
            low_percent: 20,
            high_percent: 40,
        }
    }
}

/// The scanner's state as the tuner sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Whether the scanner runs (`run=1`) or is stopped (`run=0`).
    pub run: bool,
    /// `pages_to_scan`.
    pub pages_to_scan: u64,
}

/// The next rate, from the share of host RAM available now (0 to 100) and the current rate.
pub fn decide(
    settings: &PressureSettings,
    limits: PageLimits,
    available_percent: u32,
    current: Rate,
) -> Rate {
    if available_percent < settings.low_percent {
        let from = if current.run {
            current.pages_to_scan
        } else {
            limits.min
        };
        Rate {
            run: true,
            pages_to_scan: limits.clamp(from.saturating_mul(2)),
        }
    } else if available_percent >= settings.high_percent {
        Rate {
            run: false,
            pages_to_scan: limits.min,
        }
    } else if current.run {
        let p = current.pages_to_scan;
        Rate {
            run: true,
            pages_to_scan: limits.clamp(p - p / 4),
        }
    } else {
        Rate {
            run: false,
            pages_to_scan: limits.clamp(current.pages_to_scan),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: PressureSettings = PressureSettings {
        low_percent: 20,
        high_percent: 40,
    };
    const L: PageLimits = PageLimits {
        min: 100,
        max: 1000,
    };

    fn rate(run: bool, pages_to_scan: u64) -> Rate {
        Rate { run, pages_to_scan }
    }

    #[test]
    fn short_memory_starts_and_boosts_the_scan_up_to_the_limit() {
        let mut r = rate(false, 100);
        let mut seen = Vec::new();
        for _ in 0..6 {
            r = decide(&S, L, 10, r);
            assert!(r.run);
            seen.push(r.pages_to_scan);
        }
        assert_eq!(seen, [200, 400, 800, 1000, 1000, 1000]);
    }

    #[test]
    fn enough_memory_backs_off_while_running_and_stays_stopped_otherwise() {
        let mut r = rate(true, 1000);
        for want in [750, 563, 423, 318, 239, 180, 135, 102, 100, 100] {
            r = decide(&S, L, 30, r);
            assert_eq!(r, rate(true, want));
        }
        assert_eq!(decide(&S, L, 30, rate(false, 100)), rate(false, 100));
        // The low threshold itself is not short.
        assert_eq!(decide(&S, L, 20, rate(false, 100)), rate(false, 100));
    }

    #[test]
    fn plenty_of_memory_stops_the_scan() {
        assert_eq!(decide(&S, L, 40, rate(true, 800)), rate(false, 100));
        assert_eq!(decide(&S, L, 95, rate(false, 100)), rate(false, 100));
        // Above the threshold after a stop, short memory restarts from the minimum.
        assert_eq!(decide(&S, L, 5, rate(false, 100)), rate(true, 200));
    }
}
