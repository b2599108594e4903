//! Knobs of `--dedup` as one typed value: the engine's (KSM's names, [`vm_dedup::Config`]) and
//! the tuner's, set from `name=value` text by `--dedup-opt` and by the control API alike.

use std::fmt;
use std::str::FromStr;

use vm_dedup::Config;
use vm_dedup::config::KNOBS as ENGINE_KNOBS;

use super::advisor::{AdvisorSettings, PageLimits};
use super::guard::GuardSettings;
use super::pressure::PressureSettings;

/// Knobs of the tuner, accepted beside the engine's.
pub const TUNE_KNOBS: &[&str] = &[
    "tune",
    "tune_interval_ms",
    "tune_min_pages_to_scan",
    "tune_max_pages_to_scan",
    "advisor_target_scan_ms",
    "advisor_max_cpu",
    "pressure_low_percent",
    "pressure_high_percent",
    "mem_pressure_percent",
    "mem_stop_percent",
    "mem_check_ms",
];

/// Errors in dedup knobs (usage errors at start, 400 or 409 through the API).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No knob of that name.
    #[error("unknown knob {0:?}; known knobs: {known}", known = known_knobs())]
    UnknownKnob(String),
    /// An option is not `name=value`.
    #[error("{0:?} is not name=value")]
    NotAssignment(String),
    /// A value that does not parse or is out of range.
    #[error("bad value {value:?} for {knob}: {why}")]
    BadValue {
        /// The knob.
        knob: String,
        /// The value given.
        value: String,
        /// What is wrong.
        why: String,
    },
    /// Knobs that contradict each other.
    #[error("{0}")]
    Conflict(&'static str),
}

fn known_knobs() -> String {
    ENGINE_KNOBS
        .iter()
        .chain(TUNE_KNOBS)
        .copied()
        .collect::<Vec<_>>()
        .join(", ")
}

impl From<vm_dedup::ConfigError> for Error {
    fn from(e: vm_dedup::ConfigError) -> Self {
        match e {
            vm_dedup::ConfigError::UnknownKnob(k) => Error::UnknownKnob(k),
            vm_dedup::ConfigError::NotAssignment(o) => Error::NotAssignment(o),
            vm_dedup::ConfigError::BadValue { knob, value, why } => Error::BadValue {
                knob: knob.to_string(),
                value,
                why: why.to_string(),
            },
        }
    }
}

/// How the scan rate is chosen while guests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TuneMode {
    /// `pages_to_scan` and `sleep_millisecs` stay as set.
    #[default]
    Fixed,
    /// Scan-time advisor: `pages_to_scan` follows the measured cost of a pass so that a full pass
    /// takes `advisor_target_scan_ms`, within `advisor_max_cpu` percent of one core.
    Advisor,
    /// Memory pressure: scan harder as the host's available memory falls below
    /// `pressure_low_percent` of its RAM, back off above it, stop at `pressure_high_percent`.
    Pressure,
}

impl TuneMode {
    /// The mode's name, as `--dedup-tune` and the API spell it.
    pub fn name(self) -> &'static str {
        match self {
            TuneMode::Fixed => "fixed",
            TuneMode::Advisor => "advisor",
            TuneMode::Pressure => "pressure",
        }
    }

    /// The engine knobs this mode sets by itself (the API refuses to set them while it is on).
    pub fn owned_knobs(self) -> &'static [&'static str] {
        match self {
            TuneMode::Fixed => &[],
            TuneMode::Advisor => &["pages_to_scan", "max_cpu_percent"],
            TuneMode::Pressure => &["pages_to_scan", "run"],
        }
    }
}

impl fmt::Display for TuneMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TuneMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim() {
            "fixed" => Ok(TuneMode::Fixed),
            "advisor" => Ok(TuneMode::Advisor),
            "pressure" => Ok(TuneMode::Pressure),
            other => Err(Error::BadValue {
                knob: "tune".into(),
                value: other.into(),
                why: "expected fixed, advisor or pressure".into(),
            }),
        }
    }
}

/// The tuner's knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TuneSettings {
    /// The mode.
    pub mode: TuneMode,
    /// How often the tuner looks at the engine and the host, in milliseconds.
    pub interval_ms: u64,
    /// Bounds of the `pages_to_scan` the tuner sets.
    pub limits: PageLimits,
    /// Scan-time advisor knobs.
    pub advisor: AdvisorSettings,
    /// Memory-pressure knobs.
    pub pressure: PressureSettings,
    /// The memory guard's knobs.
    pub guard: GuardSettings,
}

impl Default for TuneSettings {
    fn default() -> Self {
        Self {
            mode: TuneMode::Fixed,
            interval_ms: 500,
            limits: PageLimits::default(),
            advisor: AdvisorSettings::default(),
            pressure: PressureSettings::default(),
            guard: GuardSettings::default(),
        }
    }
}

/// Every dedup knob: the engine's and the tuner's.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settings {
    /// The engine's configuration.
    pub engine: Config,
    /// The tuner's.
    pub tune: TuneSettings,
}

fn number<T: FromStr + PartialOrd + fmt::Display + Copy>(
    knob: &str,
    value: &str,
    lo: T,
    hi: T,
) -> Result<T, Error> {
    let bad = |why: String| Error::BadValue {
        knob: knob.to_string(),
        value: value.to_string(),
        why,
    };
    let v: T = value
        .trim()
        .parse()
        .map_err(|_| bad("not a number".into()))?;
    if v < lo || v > hi {
        return Err(bad(format!("must be {lo} to {hi}")));
    }
    Ok(v)
}

impl Settings {
    /// Sets one knob from its text form.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), Error> {
        // Trimmed once: errors name the knob, not the whitespace around it.
        let name = name.trim();
        let t = &mut self.tune;
        match name {
            "tune" => t.mode = value.parse()?,
            "tune_interval_ms" => t.interval_ms = number(name, value, 10, 3_600_000)?,
            "tune_min_pages_to_scan" => t.limits.min = number(name, value, 1, 1 << 30)?,
            "tune_max_pages_to_scan" => t.limits.max = number(name, value, 1, 1 << 30)?,
            "advisor_target_scan_ms" => {
                t.advisor.target_scan_ms = number(name, value, 10, 86_400_000)?;
            }
            "advisor_max_cpu" => t.advisor.max_cpu_percent = number(name, value, 1, 100)?,
            "pressure_low_percent" => t.pressure.low_percent = number(name, value, 0, 100)?,
            "pressure_high_percent" => t.pressure.high_percent = number(name, value, 0, 100)?,
            "mem_pressure_percent" => t.guard.pressure_percent = number(name, value, 1, 100)?,
            "mem_stop_percent" => t.guard.stop_percent = number(name, value, 0, 100)?,
            "mem_check_ms" => t.guard.check_ms = number(name, value, 10, 60_000)?,
            other => self.engine.set(other, value)?,
        }
        Ok(())
    }

    /// Applies comma-separated `name=value` options in order; stops at the first bad one and
    /// checks the result as a whole.
    pub fn apply_options(&mut self, options: &str) -> Result<(), Error> {
        for opt in options.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let (name, value) = opt
                .split_once('=')
                .ok_or_else(|| Error::NotAssignment(opt.to_string()))?;
            self.set(name, value)?;
        }
        self.validate()
    }

    /// Checks the knobs that depend on each other.
    pub fn validate(&self) -> Result<(), Error> {
        self.engine.validate()?;
        let t = &self.tune;
        if t.limits.min > t.limits.max {
            return Err(Error::Conflict(
                "tune_min_pages_to_scan is above tune_max_pages_to_scan",
            ));
        }
        if t.pressure.low_percent >= t.pressure.high_percent {
            return Err(Error::Conflict(
                "pressure_low_percent must be below pressure_high_percent",
            ));
        }
        if t.guard.stop_percent != 0 && t.guard.stop_percent < t.guard.pressure_percent {
            return Err(Error::Conflict(
                "mem_stop_percent must be 0 (never) or at least mem_pressure_percent",
            ));
        }
        Ok(())
    }

    /// Every knob with its value as text, engine knobs first, in a stable order.
    pub fn knobs(&self) -> Vec<(&'static str, String)> {
        let mut out: Vec<(&'static str, String)> = ENGINE_KNOBS
            .iter()
            .filter_map(|&k| self.engine.get(k).map(|v| (k, v)))
            .collect();
        let t = &self.tune;
        out.extend([
            ("tune", t.mode.name().to_string()),
            ("tune_interval_ms", t.interval_ms.to_string()),
            ("tune_min_pages_to_scan", t.limits.min.to_string()),
            ("tune_max_pages_to_scan", t.limits.max.to_string()),
            (
                "advisor_target_scan_ms",
                t.advisor.target_scan_ms.to_string(),
            ),
            ("advisor_max_cpu", t.advisor.max_cpu_percent.to_string()),
            ("pressure_low_percent", t.pressure.low_percent.to_string()),
            ("pressure_high_percent", t.pressure.high_percent.to_string()),
            ("mem_pressure_percent", t.guard.pressure_percent.to_string()),
            ("mem_stop_percent", t.guard.stop_percent.to_string()),
            ("mem_check_ms", t.guard.check_ms.to_string()),
        ]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_and_tuner_knobs_are_set_from_one_option_string() {
        let mut s = Settings::default();
        s.apply_options(
            "pages_to_scan=100,sleep_millisecs=5,merge_across_nodes=0,use_zero_pages=0,\
             max_page_sharing=2,tune=advisor,advisor_target_scan_ms=500,advisor_max_cpu=30,\
             tune_min_pages_to_scan=10,tune_max_pages_to_scan=1000,tune_interval_ms=100,\
             pressure_low_percent=5,pressure_high_percent=15,mem_pressure_percent=70,\
             mem_stop_percent=0,mem_check_ms=50",
        )
        .unwrap();
        assert_eq!(s.engine.pages_to_scan, 100);
        assert_eq!(s.engine.sleep_millisecs, 5);
        assert!(!s.engine.merge_across_nodes && !s.engine.use_zero_pages);
        assert_eq!(s.engine.max_page_sharing, 2);
        assert_eq!(s.tune.mode, TuneMode::Advisor);
        assert_eq!(s.tune.advisor.target_scan_ms, 500);
        assert_eq!(s.tune.advisor.max_cpu_percent, 30);
        assert_eq!(s.tune.limits, PageLimits { min: 10, max: 1000 });
        assert_eq!(
            (s.tune.pressure.low_percent, s.tune.pressure.high_percent),
            (5, 15)
        );
        assert_eq!(s.tune.interval_ms, 100);
        assert_eq!(
            s.tune.guard,
            GuardSettings {
                pressure_percent: 70,
                stop_percent: 0,
                check_ms: 50
            }
        );

        // Every knob round-trips through its text form.
        let mut t = Settings::default();
        for (k, v) in s.knobs() {
            t.set(k, &v).unwrap();
        }
        assert_eq!(s, t);
    }

    #[test]
    fn bad_options_say_what_is_wrong() {
        let mut s = Settings::default();
        let e = s.apply_options("pages_to_scan=x").unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad value \"x\" for pages_to_scan: not a number"
        );
        let e = s.apply_options("frobs=1").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("unknown knob \"frobs\"; known knobs: pages_to_scan")
        );
        assert!(e.to_string().contains("advisor_max_cpu"));
        assert_eq!(
            s.apply_options("run").unwrap_err(),
            Error::NotAssignment("run".into())
        );
        assert!(
            s.apply_options("tune=fast")
                .unwrap_err()
                .to_string()
                .contains("advisor")
        );
        assert!(s.apply_options("advisor_max_cpu=0").is_err());
        assert!(s.apply_options("max_page_sharing=1").is_err());
        let e = s
            .apply_options("pressure_low_percent=50,pressure_high_percent=40")
            .unwrap_err();
        assert!(matches!(e, Error::Conflict(_)), "{e}");
        let mut s = Settings::default();
        let e = s
            .apply_options("mem_pressure_percent=95,mem_stop_percent=90")
            .unwrap_err();
        assert!(e.to_string().contains("mem_stop_percent"), "{e}");
        assert!(s.apply_options("mem_check_ms=5").is_err());
        let mut s = Settings::default();
        let e = s
            .apply_options("tune_min_pages_to_scan=100,tune_max_pages_to_scan=10")
            .unwrap_err();
        assert!(matches!(e, Error::Conflict(_)), "{e}");
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn tuners_own_the_knobs_they_set() {
        assert!(TuneMode::Fixed.owned_knobs().is_empty());
        assert!(TuneMode::Advisor.owned_knobs().contains(&"pages_to_scan"));
        assert!(TuneMode::Pressure.owned_knobs().contains(&"run"));
        for m in [TuneMode::Fixed, TuneMode::Advisor, TuneMode::Pressure] {
            assert_eq!(m.name().parse::<TuneMode>().unwrap(), m);
        }
    }
}
