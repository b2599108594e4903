//! Living with failures that repeat: backing off from operations that keep failing, and logging
//! them without flooding. Pure logic: the engine reports what failed and what worked in each
//! step, asks whether it may try again, and writes the log lines this module returns.
//!
//! Each kind of failure ([`Trouble`]) has an *episode*: it begins with the first failure (one
//! warning naming the error), lasts while failures go on (a summary at most once a minute, only
//! when there were more failures), and ends when the operation works again (one line). The kinds
//! whose retries are costly or pointless while the cause lasts ([`Trouble::backs_off`]) are not
//! tried again right away: after the `k`-th failed try in a row the next try waits
//! `2^(k-1)` passes (at most 64) or `2^(k-1)` seconds (at most 5 minutes), whichever comes
//! first, and the planner leaves out the work that would fail meanwhile.

use std::fmt::{Display, Write as _};
use std::time::{Duration, Instant};

/// Most passes between two tries.
pub const MAX_BACKOFF_PASSES: u64 = 64;
/// Longest time between two tries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Shortest time between two summaries of an episode.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// A kind of failure the engine watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Trouble {
    /// Remapping fails with ENOMEM: the process is at `vm.max_map_count`.
    VmaLimit,
    /// Remapping fails otherwise (e.g. EPERM from a seccomp filter).
    Remap,
    /// Write-protecting guest pages fails.
    Protect,
    /// Dropping zero pages (`MADV_DONTNEED`) fails.
    ZeroPage,
    /// The pool of a node cannot be created, grown or filled (EMFILE, EPERM, ENOSPC, ...).
    Pool(u8),
    /// Punching freed pool slots fails (they are tried again at the end of each pass).
    Punch,
    /// Releasing the write-protect guard needed a repair (un-protect, wake or re-register
    /// failed, or fault messages could not be read).
    Guard,
    /// Reading page categories (`PAGEMAP_SCAN`) or NUMA nodes fails: chunks are skipped.
    Scan,
}

impl Trouble {
    /// Whether tries are held back while it lasts.
    pub fn backs_off(self) -> bool {
        matches!(
            self,
            Trouble::VmaLimit
                | Trouble::Remap
                | Trouble::Protect
                | Trouble::ZeroPage
                | Trouble::Pool(_)
        )
    }

    /// What fails, for log lines and statistics.
    pub fn describe(self) -> String {
        match self {
            Trouble::VmaLimit => "remapping at the VMA limit (vm.max_map_count)".into(),
            Trouble::Remap => "remapping guest pages".into(),
            Trouble::Protect => "write-protecting guest pages".into(),
            Trouble::ZeroPage => "dropping zero pages".into(),
            Trouble::Pool(n) => format!("the pool of node {n}"),
            Trouble::Punch => "punching freed pool slots".into(),
            Trouble::Guard => "releasing the write-protect guard".into(),
            Trouble::Scan => "reading page categories".into(),
        }
    }

    /// A short name (`vma_limit`, `remap`, `protect`, `zero_page`, `pool`, `punch`, `guard`,
    /// `scan`).
    pub fn name(self) -> &'static str {
        match self {
            Trouble::VmaLimit => "vma_limit",
            Trouble::Remap => "remap",
            Trouble::Protect => "protect",
            Trouble::ZeroPage => "zero_page",
            Trouble::Pool(_) => "pool",
            Trouble::Punch => "punch",
            Trouble::Guard => "guard",
            Trouble::Scan => "scan",
        }
    }
}

/// Failures of one step (or one worker's share of it), by kind, with the first error of each.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    entries: Vec<(Trouble, u64, String)>,
}

impl Tally {
    /// Counts one failure; the error is formatted only for the first of its kind.
    pub fn add(&mut self, t: Trouble, error: &dyn Display) {
        match self.entries.iter_mut().find(|e| e.0 == t) {
            Some(e) => e.1 += 1,
            None => self.entries.push((t, 1, error.to_string())),
        }
    }

    /// Adds another tally's failures.
    pub fn absorb(&mut self, other: Tally) {
        for (t, n, text) in other.entries {
            match self.entries.iter_mut().find(|e| e.0 == t) {
                Some(e) => e.1 += n,
                None => self.entries.push((t, n, text)),
            }
        }
    }

    /// Failures of kind `t`.
    pub fn count(&self, t: Trouble) -> u64 {
        self.entries.iter().find(|e| e.0 == t).map_or(0, |e| e.1)
    }

    /// Each kind with its count and first error.
    pub fn entries(&self) -> impl Iterator<Item = (Trouble, u64, &str)> {
        self.entries.iter().map(|(t, n, s)| (*t, *n, s.as_str()))
    }

    /// Whether nothing failed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// When to try again after failed tries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Failed tries in a row.
    pub failures: u32,
    /// First pass (count of completed passes) at which a try is allowed again.
    pub retry_pass: u64,
    /// Time from which a try is allowed again.
    pub retry_at: Option<Instant>,
}

impl Backoff {
    /// No failure yet: tries are allowed.
    pub const CLEAR: Backoff = Backoff {
        failures: 0,
        retry_pass: 0,
        retry_at: None,
    };

    /// Whether a try is allowed at completed-pass count `pass` and time `now`.
    pub fn allowed(&self, pass: u64, now: Instant) -> bool {
        self.failures == 0 || pass >= self.retry_pass || self.retry_at.is_some_and(|t| now >= t)
    }

    /// A try failed at `pass`, `now`: the next one waits twice as long as the last wait.
    pub fn failed(&mut self, pass: u64, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        let k = (self.failures - 1).min(20);
        self.retry_pass = pass + (1u64 << k).min(MAX_BACKOFF_PASSES);
        self.retry_at = Some(now + Duration::from_secs(1u64 << k).min(MAX_BACKOFF));
    }
}

/// A log line to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// Its level.
    pub level: log::Level,
    /// Its text.
    pub text: String,
}

impl Line {
    /// Writes it through `log`.
    pub fn emit(&self) {
        log::log!(self.level, "{}", self.text);
    }
}

/// A kind of failure while it lasts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Episode {
    /// What fails.
    pub trouble: Trouble,
    /// When it began.
    pub began: Instant,
    /// Failures since it began.
    pub failures: u64,
    /// The latest error.
    pub last_error: String,
    /// Completed-pass count at the latest failure.
    pub last_pass: u64,
    /// When to try again.
    pub backoff: Backoff,
    since_line: u64,
    line_at: Instant,
}

/// The episodes going on, and the backoff of each kind.
#[derive(Clone, Debug, Default)]
pub struct Troubles {
    episodes: Vec<Episode>,
}

fn secs(d: Duration) -> String {
    format!("{:.0} s", d.as_secs_f64())
}

impl Troubles {
    /// No episode.
    pub fn new() -> Self {
        Self::default()
    }

    fn find(&self, t: Trouble) -> Option<&Episode> {
        self.episodes.iter().find(|e| e.trouble == t)
    }

    /// Whether `t` may be tried at completed-pass count `pass` and time `now`.
    pub fn allowed(&self, t: Trouble, pass: u64, now: Instant) -> bool {
        self.find(t).is_none_or(|e| e.backoff.allowed(pass, now))
    }

    /// Whether an episode of `t` is going on.
    pub fn active(&self, t: Trouble) -> bool {
        self.find(t).is_some()
    }

    /// The episodes going on.
    pub fn episodes(&self) -> &[Episode] {
        &self.episodes
    }

    /// `count` tries of `t` failed in one step, the first with `error`. Returns the line
    /// that begins an episode.
    pub fn failed(
        &mut self,
        t: Trouble,
        count: u64,
        error: &str,
        pass: u64,
        now: Instant,
    ) -> Option<Line> {
        if let Some(e) = self.episodes.iter_mut().find(|e| e.trouble == t) {
            e.failures += count;
            e.since_line += count;
            e.last_pass = pass;
            error.clone_into(&mut e.last_error);
            if t.backs_off() {
                e.backoff.failed(pass, now);
            }
            return None;
        }
        let mut backoff = Backoff::CLEAR;
        let mut text = format!("vm-dedup: {} failing: {error}", t.describe());
        if t.backs_off() {
            backoff.failed(pass, now);
            let _ = write!(
                text,
                "; held back, next try after {} pass(es) or {}",
                backoff.retry_pass - pass,
                secs(backoff.retry_at.map_or(Duration::ZERO, |r| r - now))
            );
        }
        let _ = write!(
            text,
            " (further failures summarized every {})",
            secs(SUMMARY_EVERY)
        );
        self.episodes.push(Episode {
            trouble: t,
            began: now,
            failures: count,
            last_error: error.to_string(),
            last_pass: pass,
            backoff,
            since_line: 0,
            line_at: now,
        });
        Some(Line {
            level: log::Level::Warn,
            text,
        })
    }

    /// A try of `t` worked (and none failed in the same step): a kind that backs off ends its
    /// episode. Returns the line that ends it.
    pub fn succeeded(&mut self, t: Trouble, now: Instant) -> Option<Line> {
        if !t.backs_off() {
            return None;
        }
        self.end(t, now)
    }

    fn end(&mut self, t: Trouble, now: Instant) -> Option<Line> {
        let i = self.episodes.iter().position(|e| e.trouble == t)?;
        let e = self.episodes.remove(i);
        Some(Line {
            level: log::Level::Info,
            text: format!(
                "vm-dedup: {} works again ({} failures over {})",
                t.describe(),
                e.failures,
                secs(now.duration_since(e.began))
            ),
        })
    }

    /// A pass completed (`pass` passes now): the kinds that do not back off end their
    /// episode once a whole pass went by without a failure. Returns the lines that end them.
    pub fn pass_done(&mut self, pass: u64, now: Instant) -> Vec<Line> {
        let quiet: Vec<Trouble> = self
            .episodes
            .iter()
            .filter(|e| !e.trouble.backs_off() && e.last_pass + 2 <= pass)
            .map(|e| e.trouble)
            .collect();
        quiet.into_iter().filter_map(|t| self.end(t, now)).collect()
    }

    /// Summaries of the episodes with failures since their last line, at most one per
    /// [`SUMMARY_EVERY`] each.
    pub fn summaries(&mut self, now: Instant) -> Vec<Line> {
        let mut out = Vec::new();
        for e in &mut self.episodes {
            if e.since_line == 0 || now.duration_since(e.line_at) < SUMMARY_EVERY {
                continue;
            }
            out.push(Line {
                level: log::Level::Warn,
                text: format!(
                    "vm-dedup: {} still failing: {} more failures in the last {} ({} since it \
                     began {} ago), last: {}",
                    e.trouble.describe(),
                    e.since_line,
                    secs(now.duration_since(e.line_at)),
                    e.failures,
                    secs(now.duration_since(e.began)),
                    e.last_error
                ),
            });
            e.since_line = 0;
            e.line_at = now;
        }
        out
    }

    /// Allows every kind to be tried again now (the configuration changed); episodes go on
    /// until a try works.
    pub fn retry_now(&mut self) {
        for e in &mut self.episodes {
            e.backoff = Backoff::CLEAR;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_in_passes_and_time() {
        let t0 = Instant::now();
        let mut b = Backoff::CLEAR;
        assert!(b.allowed(0, t0));
        b.failed(0, t0);
        assert!(!b.allowed(0, t0));
        assert!(b.allowed(1, t0));
        assert!(b.allowed(0, t0 + Duration::from_secs(1)));
        b.failed(1, t0);
        assert!(!b.allowed(2, t0 + Duration::from_millis(1999)));
        assert!(b.allowed(3, t0));
        assert!(b.allowed(2, t0 + Duration::from_secs(2)));
        for _ in 0..40 {
            b.failed(10, t0);
        }
        assert_eq!(b.retry_pass, 10 + MAX_BACKOFF_PASSES);
        assert_eq!(b.retry_at, Some(t0 + MAX_BACKOFF));
    }

    #[test]
    fn tries_over_many_passes_grow_with_their_logarithm() {
        // One try per pass when allowed, every try failing: at passes 0, 1, 3, 7, ..., 63, then
        // every 64 passes (127, 191, ..., 959): 21 tries in 1000 passes, and one log line.
        let t0 = Instant::now();
        let mut tr = Troubles::new();
        let mut tries = 0;
        let mut lines = 0;
        for pass in 0..1000 {
            if tr.allowed(Trouble::VmaLimit, pass, t0) {
                tries += 1;
                lines += usize::from(
                    tr.failed(Trouble::VmaLimit, 5, "ENOMEM", pass, t0)
                        .is_some(),
                );
            }
            lines += tr.summaries(t0).len();
        }
        assert_eq!(tries, 21);
        assert_eq!(lines, 1);
        assert_eq!(tr.episodes()[0].failures, 5 * tries);
    }

    #[test]
    fn an_episode_begins_summarizes_and_ends() {
        let t0 = Instant::now();
        let mut tr = Troubles::new();
        let begin = tr.failed(Trouble::Pool(0), 1, "EMFILE", 3, t0).unwrap();
        assert_eq!(begin.level, log::Level::Warn);
        assert!(
            begin.text.contains("the pool of node 0 failing: EMFILE"),
            "{}",
            begin.text
        );
        assert!(
            begin.text.contains("next try after 1 pass(es) or 1 s"),
            "{}",
            begin.text
        );
        assert!(tr.failed(Trouble::Pool(0), 2, "EPERM", 4, t0).is_none());
        assert!(tr.summaries(t0 + Duration::from_secs(59)).is_empty());
        let s = tr.summaries(t0 + SUMMARY_EVERY);
        assert_eq!(s.len(), 1);
        assert!(s[0].text.contains("2 more failures"), "{}", s[0].text);
        assert!(s[0].text.contains("last: EPERM"), "{}", s[0].text);
        // Nothing new: no summary.
        assert!(tr.summaries(t0 + 3 * SUMMARY_EVERY).is_empty());
        assert!(!tr.allowed(Trouble::Pool(0), 4, t0));
        assert!(tr.allowed(Trouble::Pool(1), 4, t0));
        assert!(tr.succeeded(Trouble::Pool(1), t0).is_none());
        let end = tr.succeeded(Trouble::Pool(0), t0).unwrap();
        assert_eq!(end.level, log::Level::Info);
        assert!(end.text.contains("works again (3 failures"), "{}", end.text);
        assert!(tr.episodes().is_empty());
    }

    #[test]
    fn kinds_without_backoff_end_after_a_quiet_pass() {
        let t0 = Instant::now();
        let mut tr = Troubles::new();
        assert!(tr.failed(Trouble::Guard, 1, "EIO", 5, t0).is_some());
        assert!(tr.allowed(Trouble::Guard, 5, t0));
        assert!(tr.succeeded(Trouble::Guard, t0).is_none());
        // The pass in which it failed completes (6), then a whole pass without failures (7).
        assert!(tr.pass_done(6, t0).is_empty());
        assert_eq!(tr.pass_done(7, t0).len(), 1);
        assert!(!tr.active(Trouble::Guard));
    }

    #[test]
    fn retry_now_clears_the_wait_but_not_the_episode() {
        let t0 = Instant::now();
        let mut tr = Troubles::new();
        tr.failed(Trouble::Remap, 1, "EPERM", 0, t0);
        tr.failed(Trouble::Remap, 1, "EPERM", 1, t0);
        assert!(!tr.allowed(Trouble::Remap, 2, t0));
        tr.retry_now();
        assert!(tr.allowed(Trouble::Remap, 2, t0));
        assert!(tr.active(Trouble::Remap));
    }

    #[test]
    fn tally_counts_and_keeps_the_first_error() {
        let mut a = Tally::default();
        a.add(Trouble::Protect, &"EIO");
        a.add(Trouble::Protect, &"EINVAL");
        let mut b = Tally::default();
        b.add(Trouble::Protect, &"ENOENT");
        b.add(Trouble::Scan, &"EPERM");
        a.absorb(b);
        assert_eq!(a.count(Trouble::Protect), 3);
        assert_eq!(a.count(Trouble::Scan), 1);
        assert_eq!(a.count(Trouble::Remap), 0);
        let first: Vec<_> = a.entries().map(|(_, _, s)| s.to_string()).collect();
        assert_eq!(first, ["EIO", "EPERM"]);
    }
}
