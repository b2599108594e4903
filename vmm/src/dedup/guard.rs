//! The memory guard's decisions (the thread that applies them is in `watch`). Merged pages are a
//! loan the guests can call back at any time: every write to one needs a fresh page. So the
//! guard watches how close the process is to the memory it may use, and
//!
//! - at `mem_pressure_percent` of a limit (the memory cgroup's limit, or the host's RAM): the
//!   level is **pressure**: merging of new pages pauses (merged pages stay merged; a new merge
//!   needs a pool page before it frees anything, and every merge is one more page the guests can
//!   unshare). It ends below `mem_pressure_percent - 5` (hysteresis);
//! - at `mem_stop_percent` of the memory cgroup's limit, or with less than [`STOP_HEADROOM`] of
//!   it left (what the VMM needs to stop cleanly), or as soon as the kernel reports the cgroup
//!   out of memory (v1 `under_oom`, v2 `memory.events` `oom`): the level is **critical**: the
//!   VMM stops every guest and exits with status 1, before the kernel fails a guest's page fault
//!   or kills the VMM. Critical is final. The host's RAM alone never makes it critical (the
//!   kernel's OOM killer decides there); `mem_stop_percent=0` turns stopping off.
//!
//! A cgroup's use is its working set (usage less inactive file cache), the host's
//! `MemTotal - MemAvailable`.

use serde::{Deserialize, Serialize};

/// Pressure ends this many percentage points below `mem_pressure_percent`.
pub const HYSTERESIS: u32 = 5;

/// The guests are stopped, whatever `mem_stop_percent` says, when less than this is left below
/// the memory cgroup's limit: stopping the guests and exiting needs some memory too.
pub const STOP_HEADROOM: u64 = 1 << 20;

/// The guard's knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardSettings {
    /// Pause merging at this share of a limit (1 to 100).
    pub pressure_percent: u32,
    /// Stop every guest at this share of the memory cgroup's limit (0: never).
    pub stop_percent: u32,
    /// How often the guard looks, in milliseconds.
    pub check_ms: u64,
}

impl Default for GuardSettings {
    fn default() -> Self {
        Self {
            pressure_percent: 90,
            stop_percent: 98,
            check_ms: 100,
        }
    }
}

/// How close the process is to running out of memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Enough memory.
    #[default]
    Ok,
    /// Merging of new pages is paused.
    Pressure,
    /// The guests are stopped.
    Critical,
}

impl Level {
    /// Every level, lowest first.
    pub const ALL: [Level; 3] = [Level::Ok, Level::Pressure, Level::Critical];

    /// `ok`, `pressure` or `critical`.
    pub fn name(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Pressure => "pressure",
            Level::Critical => "critical",
        }
    }
}

/// What the guard sees of one limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes in use that count against the limit.
    pub used: u64,
    /// The limit in bytes (`None`: no limit).
    pub limit: Option<u64>,
}

impl Usage {
    /// Bytes left below the limit; `None` without a limit.
    pub fn left(&self) -> Option<u64> {
        self.limit.map(|l| l.saturating_sub(self.used))
    }

    /// `used` as a percentage of `limit` (may exceed 100); `None` without a limit.
    pub fn percent(&self) -> Option<u32> {
        let limit = self.limit.filter(|&l| l > 0)?;
        let p = u128::from(self.used) * 100 / u128::from(limit);
        Some(u32::try_from(p).unwrap_or(u32::MAX))
    }
}

/// One look at the process's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Look {
    /// The memory cgroup, when the process is in one.
    pub cgroup: Option<Usage>,
    /// The kernel reports the memory cgroup out of memory (now, or since the guard started).
    pub cgroup_oom: bool,
    /// The host's RAM.
    pub host: Option<Usage>,
}

/// The level after `look`, given the level before it.
pub fn decide(s: &GuardSettings, look: &Look, before: Level) -> Level {
    if before == Level::Critical {
        return Level::Critical;
    }
    let cgroup = look.cgroup.and_then(|u| u.percent());
    let full = look.cgroup.is_some_and(|u| {
        u.percent().is_some_and(|p| p >= s.stop_percent)
            || u.left().is_some_and(|l| l < STOP_HEADROOM)
    });
    if look.cgroup_oom || (s.stop_percent > 0 && full) {
        return Level::Critical;
    }
    let highest = [cgroup, look.host.and_then(|u| u.percent())]
        .into_iter()
        .flatten()
        .max();
    let threshold = if before == Level::Pressure {
        s.pressure_percent.saturating_sub(HYSTERESIS)
    } else {
        s.pressure_percent
    };
    match highest {
        Some(p) if p >= threshold => Level::Pressure,
        _ => Level::Ok,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: GuardSettings = GuardSettings {
        pressure_percent: 80,
        stop_percent: 95,
        check_ms: 100,
    };

    #[test]
    fn too_little_left_below_the_limit_is_critical() {
        // 10 MiB: 80% is pressure, but less than 1 MiB left is critical before 95%.
        assert_eq!(decide(&S, &cgroup(8, 10), Level::Ok), Level::Pressure);
        let tight = Look {
            cgroup: Some(Usage {
                used: (9 << 20) + 1,
                limit: Some(10 << 20),
            }),
            ..Look::default()
        };
        assert_eq!(decide(&S, &tight, Level::Ok), Level::Critical);
        let never = GuardSettings {
            stop_percent: 0,
            ..S
        };
        assert_eq!(decide(&never, &tight, Level::Ok), Level::Pressure);
    }

    /// `used_mib` of a `limit_mib` memory cgroup.
    fn cgroup(used_mib: u64, limit_mib: u64) -> Look {
        Look {
            cgroup: Some(Usage {
                used: used_mib << 20,
                limit: Some(limit_mib << 20),
            }),
            ..Look::default()
        }
    }

    #[test]
    fn pressure_with_hysteresis_then_critical_for_good() {
        assert_eq!(decide(&S, &cgroup(79, 100), Level::Ok), Level::Ok);
        assert_eq!(decide(&S, &cgroup(80, 100), Level::Ok), Level::Pressure);
        // Stays under pressure until 5 points below the threshold.
        assert_eq!(
            decide(&S, &cgroup(76, 100), Level::Pressure),
            Level::Pressure
        );
        assert_eq!(
            decide(&S, &cgroup(75, 100), Level::Pressure),
            Level::Pressure
        );
        assert_eq!(decide(&S, &cgroup(74, 100), Level::Pressure), Level::Ok);
        assert_eq!(
            decide(&S, &cgroup(95, 100), Level::Pressure),
            Level::Critical
        );
        assert_eq!(
            decide(&S, &cgroup(10, 100), Level::Critical),
            Level::Critical
        );
    }

    #[test]
    fn kernel_oom_is_critical_and_host_ram_only_pressure() {
        let oom = Look {
            cgroup_oom: true,
            ..cgroup(1, 100)
        };
        assert_eq!(decide(&S, &oom, Level::Ok), Level::Critical);
        let host = Look {
            host: Some(Usage {
                used: 99,
                limit: Some(100),
            }),
            ..Look::default()
        };
        assert_eq!(decide(&S, &host, Level::Ok), Level::Pressure);
        // No limit, no decision; stop_percent 0 never stops.
        let unlimited = Look {
            cgroup: Some(Usage {
                used: 1 << 40,
                limit: None,
            }),
            ..Look::default()
        };
        assert_eq!(decide(&S, &unlimited, Level::Ok), Level::Ok);
        let never = GuardSettings {
            stop_percent: 0,
            ..S
        };
        assert_eq!(
            decide(&never, &cgroup(100, 100), Level::Ok),
            Level::Pressure
        );
    }

    #[test]
    fn percent_rounds_down_and_may_pass_100() {
        let u = |used, limit| Usage {
            used,
            limit: Some(limit),
        };
        assert_eq!(u(1, 3).percent(), Some(33));
        assert_eq!(u(5, 4).percent(), Some(125));
        assert_eq!(u(5, 0).percent(), None);
    }
}
