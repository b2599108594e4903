//! Order statistics of repeated measurements.

use std::time::Duration;

/// Minimum, median, 90th percentile and maximum of a set of runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary<T> {
    /// Number of runs.
    pub runs: usize,
    /// Smallest value.
    pub min: T,
    /// Median (the lower middle value for an even count).
    pub median: T,
    /// 90th percentile (nearest rank).
    pub p90: T,
    /// Largest value.
    pub max: T,
}

/// The value of nearest rank `percent` (1-100) in `sorted` (ascending, not empty).
fn nearest_rank<T: Copy>(sorted: &[T], percent: usize) -> T {
    let rank = (percent * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

impl<T: Copy + Ord> Summary<T> {
    /// Summarises `values`; `None` when there are none.
    pub fn of(values: &[T]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_unstable();
        Some(Self {
            runs: sorted.len(),
            min: sorted[0],
            median: nearest_rank(&sorted, 50),
            p90: nearest_rank(&sorted, 90),
            max: sorted[sorted.len() - 1],
        })
    }
}

/// Milliseconds with two decimals, for tables.
pub fn millis(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_to_summarise() {
        assert_eq!(Summary::<u64>::of(&[]), None);
    }

    #[test]
    fn one_value_is_every_statistic() {
        let s = Summary::of(&[7u64]);
        assert_eq!(
            s,
            Some(Summary {
                runs: 1,
                min: 7,
                median: 7,
                p90: 7,
                max: 7
            })
        );
    }

    #[test]
    fn nearest_rank_percentiles_of_unsorted_runs() {
        let values: Vec<u64> = (1..=20).rev().collect();
        let s = Summary::of(&values).unwrap();
        assert_eq!((s.runs, s.min, s.max), (20, 1, 20));
        assert_eq!(s.median, 10);
        assert_eq!(s.p90, 18);
        let s = Summary::of(&[5u64, 1, 3]).unwrap();
        assert_eq!((s.median, s.p90), (3, 5));
    }

    #[test]
    fn durations_print_as_milliseconds() {
        assert_eq!(millis(Duration::from_micros(14_770)), "14.77");
        let s = Summary::of(&[Duration::from_millis(3), Duration::from_millis(1)]);
        assert_eq!(s.map(|s| s.median), Some(Duration::from_millis(1)));
    }
}
