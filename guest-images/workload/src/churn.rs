//! Pacing of `churn`: how many page rewrites are due after a given time.

use std::time::Duration;
use thiserror::Error;

/// Errors from setting up a churn schedule.
#[derive(Debug, Error, PartialEq)]
pub enum Error {
    /// The fraction per second is negative or not finite.
    #[error("churn fraction {0} per second must be a finite number >= 0")]
    Fraction(f64),
}

/// Rewrites `fraction` of `pages` per second, spread evenly over time.
#[derive(Debug, Clone)]
pub struct ChurnSchedule {
    pages_per_sec: f64,
    written: u64,
}

impl ChurnSchedule {
    /// A schedule for a region of `pages` pages, rewriting `fraction` of them per second.
    pub fn new(pages: usize, fraction: f64) -> Result<Self, Error> {
        if !fraction.is_finite() || fraction < 0.0 {
            return Err(Error::Fraction(fraction));
        }
        Ok(Self {
            pages_per_sec: fraction * pages as f64,
            written: 0,
        })
    }

    /// Rewrites due now, `elapsed` after the start, beyond those already handed out.
    pub fn due(&mut self, elapsed: Duration) -> u64 {
        let total = (self.pages_per_sec * elapsed.as_secs_f64()).floor() as u64;
        let now = total.saturating_sub(self.written);
        self.written += now;
        now
    }

    /// Rewrites handed out so far.
    pub fn written(&self) -> u64 {
        self.written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_the_rate_over_time_without_double_counting() {
        let mut s = ChurnSchedule::new(1000, 0.1).unwrap(); // 100 pages/s
        assert_eq!(s.due(Duration::from_millis(0)), 0);
        assert_eq!(s.due(Duration::from_millis(250)), 25);
        assert_eq!(s.due(Duration::from_millis(250)), 0);
        assert_eq!(s.due(Duration::from_millis(1005)), 75);
        assert_eq!(s.due(Duration::from_secs(3)), 200);
        assert_eq!(s.written(), 300);
    }

    #[test]
    fn fractional_rates_accumulate() {
        let mut s = ChurnSchedule::new(10, 0.15).unwrap(); // 1.5 pages/s
        let total: u64 = (1..=4).map(|i| s.due(Duration::from_secs(i))).sum();
        assert_eq!(total, 6);
    }

    #[test]
    fn bad_fractions_are_rejected() {
        assert_eq!(
            ChurnSchedule::new(10, -1.0).unwrap_err(),
            Error::Fraction(-1.0)
        );
        assert!(ChurnSchedule::new(10, f64::INFINITY).is_err());
        assert!(ChurnSchedule::new(10, f64::NAN).is_err());
    }
}
