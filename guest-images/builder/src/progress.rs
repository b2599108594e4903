//! Progress of long steps, reported through `log` at every tenth of the work.

use std::time::Instant;

use log::info;

/// Logs `label: N%` each time another tenth of `total` is done.
#[derive(Debug)]
pub struct Progress {
    label: String,
    total: u64,
    reported: u64,
    started: Instant,
}

impl Progress {
    /// Starts reporting progress of `label` towards `total` units.
    pub fn new(label: impl Into<String>, total: u64) -> Self {
        Self {
            label: label.into(),
            total,
            reported: 0,
            started: Instant::now(),
        }
    }

    /// Tenths of the work that `done` units represent.
    fn tenths(&self, done: u64) -> u64 {
        (done.min(self.total) * 10)
            .checked_div(self.total)
            .unwrap_or(10)
    }

    /// Records that `done` units are finished; logs when a new tenth is reached.
    pub fn update(&mut self, done: u64) {
        let tenths = self.tenths(done);
        if tenths > self.reported {
            self.reported = tenths;
            info!(
                "{}: {}% ({:.1} s)",
                self.label,
                tenths * 10,
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    /// Tenths reported so far.
    pub fn reported_tenths(&self) -> u64 {
        self.reported
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_each_tenth_once_and_never_goes_back() {
        let mut p = Progress::new("x", 200);
        p.update(19);
        assert_eq!(p.reported_tenths(), 0);
        p.update(20);
        assert_eq!(p.reported_tenths(), 1);
        p.update(10);
        assert_eq!(p.reported_tenths(), 1);
        p.update(1000);
        assert_eq!(p.reported_tenths(), 10);
        let mut empty = Progress::new("y", 0);
        empty.update(0);
        assert_eq!(empty.reported_tenths(), 10);
    }
}
