//! The VMA budget. Each remap of guest pages onto pool slots can cost up to two VMAs (the new
//! mapping and the split of the old one), and the whole process fails `mmap` and `mprotect` with
//! ENOMEM past `vm.max_map_count`. The budget counts VMAs inside guest memory, is measured from
//! /proc/self/maps at the end of a pass that changed them, charges two VMAs per remap in
//! between, and is never exceeded. Past seven eighths of it, only runs (several consecutive
//! pages in one remap) are admitted; zero pages cost no VMA and always continue.
//!
//! Two VMAs is what a remap costs alone in private memory; next to another merged page it
//! costs one or none, so the charges can run far ahead of the count (twice it where merged
//! pages lie side by side). Before refusing on charges of remaps already done, the budget asks
//! for a new count ([`VmaBudget::recount_due`], [`VmaBudget::recounted`]): the count of now
//! plus the charges of the plan being admitted is again an upper bound. What else splits
//! guest mappings (a discard inside a merged run, registering part of a remapped range with
//! the userfaultfd) is charged as it happens ([`VmaBudget::charge`]).
//!
//! When a remap fails with ENOMEM all the same (the configured budget is more than the process
//! may map, or the rest of the process grew), the budget *learns* the count of that moment as
//! its limit until a later try shows more room.

/// VMAs one remap may add.
pub const VMAS_PER_REMAP: u64 = 2;
/// The budget is tight (only runs are admitted) once `TIGHT_NUM / TIGHT_DEN` of it is used.
const TIGHT_NUM: u64 = 7;
const TIGHT_DEN: u64 = 8;
/// Shortest run admitted once the budget is tight.
pub const MIN_RUN_WHEN_TIGHT: usize = 4;
/// A new count is worth reading /proc/self/maps (a line per VMA) once the charges of remaps
/// done since the last count reach `1 / RECOUNT_DIV` of the limit, and at least `RECOUNT_MIN`.
const RECOUNT_DIV: u64 = 16;
const RECOUNT_MIN: u64 = 64;

/// A budget of VMAs inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmaBudget {
    limit: u64,
    /// A lower limit learnt from ENOMEM.
    learned: Option<u64>,
    used: u64,
    /// Charged since the last count, and of that in the plan being admitted (not mapped yet).
    charged: u64,
    charged_plan: u64,
    denied: u64,
    /// Refusals in the pass going on, and in the last completed one.
    denied_pass: u64,
    denied_last_pass: u64,
}

/// What the budget says about one remap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead; two VMAs were charged.
    Admitted,
    /// Refused: the budget is tight and the run too short.
    TooShort,
    /// Refused: the budget is spent.
    Exhausted,
}

impl VmaBudget {
    /// A budget of `limit` VMAs of which `used` are in use now.
    pub fn new(limit: u64, used: u64) -> Self {
        VmaBudget {
            limit,
            learned: None,
            used,
            charged: 0,
            charged_plan: 0,
            denied: 0,
            denied_pass: 0,
            denied_last_pass: 0,
        }
    }

    /// The default limit: what `vm.max_map_count` leaves after the rest of the process, minus
    /// an eighth (at least 1024) of headroom for the process's own later mappings.
    pub fn default_limit(max_map_count: u64, other_vmas: u64) -> u64 {
        let headroom = (max_map_count / 8).max(1024);
        max_map_count
            .saturating_sub(other_vmas)
            .saturating_sub(headroom)
    }

    fn deny(&mut self, n: u64) {
        self.denied += n;
        self.denied_pass += n;
    }

    /// Counts `n` remaps refused without asking (their slot's other runs were refused).
    pub fn refuse(&mut self, n: u64) {
        self.deny(n);
    }

    /// What [`VmaBudget::admit_all`] would say, without charging or counting anything.
    pub fn check(&self, run_pages: &[usize]) -> Admission {
        let cost = VMAS_PER_REMAP * run_pages.len() as u64;
        if self.used + cost > self.limit() {
            Admission::Exhausted
        } else if self.tight() && run_pages.iter().any(|&p| p < MIN_RUN_WHEN_TIGHT) {
            Admission::TooShort
        } else {
            Admission::Admitted
        }
    }

    /// Asks to remap a run of `run_pages` pages.
    pub fn admit(&mut self, run_pages: usize) -> Admission {
        self.admit_all(&[run_pages])
    }

    /// Asks to remap several runs together (all or none), `run_pages[i]` pages each.
    pub fn admit_all(&mut self, run_pages: &[usize]) -> Admission {
        let verdict = self.check(run_pages);
        if verdict == Admission::Admitted {
            let cost = VMAS_PER_REMAP * run_pages.len() as u64;
            self.used += cost;
            self.charged += cost;
            self.charged_plan += cost;
        } else {
            self.deny(run_pages.len() as u64);
        }
        verdict
    }

    /// Charges `n` VMAs that something other than a merge made or may have made (registering
    /// part of a mapping splits it; a discard maps fresh memory into a merged run), without
    /// refusing: it has happened. Past the limit, merges are refused until a count shows room.
    pub fn charge(&mut self, n: u64) {
        self.used += n;
        self.charged += n;
    }

    /// A plan is about to be admitted: what was charged before is mapped (or was never
    /// needed) by now, so a count would see it.
    pub fn begin_plan(&mut self) {
        self.charged_plan = 0;
    }

    /// Whether a new count of the VMAs may make room: enough was charged for remaps done since
    /// the last count (each charged as two VMAs, where many cost fewer).
    pub fn recount_due(&self) -> bool {
        self.charged.saturating_sub(self.charged_plan)
            >= (self.limit() / RECOUNT_DIV).max(RECOUNT_MIN)
    }

    /// Takes a count of the VMAs made while a plan is being admitted: it holds the remaps done
    /// so far, and the plan's charges come on top.
    pub fn recounted(&mut self, counted: u64) {
        self.used = counted + self.charged_plan;
        self.charged = self.charged_plan;
    }

    /// Replaces the running charge by a measurement.
    pub fn measured(&mut self, used: u64) {
        self.used = used;
        self.charged = 0;
        self.charged_plan = 0;
    }

    /// Changes the configured limit (a learnt one stays).
    pub fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
    }

    /// Learns from ENOMEM that the process can map no more than `used` VMAs inside guest
    /// memory: the limit becomes `used` until [`VmaBudget::unlearn`].
    pub fn learn(&mut self, used: u64) {
        self.learned = Some(used);
        self.used = self.used.max(used);
    }

    /// Forgets the learnt limit (to try whether there is more room now).
    pub fn unlearn(&mut self) {
        self.learned = None;
    }

    /// The learnt limit, if any.
    pub fn learned(&self) -> Option<u64> {
        self.learned
    }

    /// A pass completed: its refusals become the last pass's.
    pub fn pass_done(&mut self) {
        self.denied_last_pass = std::mem::take(&mut self.denied_pass);
    }

    /// Whether the budget holds merges back now: it is tight, or it refused some during the
    /// pass going on or the last completed one.
    pub fn reached(&self) -> bool {
        self.tight() || self.denied_pass > 0 || self.denied_last_pass > 0
    }

    /// Whether only runs are admitted now.
    pub fn tight(&self) -> bool {
        self.used.saturating_mul(TIGHT_DEN) >= self.limit().saturating_mul(TIGHT_NUM)
    }

    /// The limit in force: the configured one, or the learnt one when lower.
    pub fn limit(&self) -> u64 {
        self.learned.map_or(self.limit, |l| l.min(self.limit))
    }

    /// The configured limit.
    pub fn configured_limit(&self) -> u64 {
        self.limit
    }

    /// VMAs counted as used.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Remaps refused so far.
    pub fn denied(&self) -> u64 {
        self.denied
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_exceeds_limit() {
        let mut b = VmaBudget::new(10, 1);
        let mut admitted = 0;
        for _ in 0..100 {
            if b.admit(64) == Admission::Admitted {
                admitted += 1;
            }
            assert!(b.used() <= b.limit());
        }
        assert_eq!(admitted, 4);
        assert_eq!(b.admit(64), Admission::Exhausted);
        assert_eq!(b.denied(), 97);
    }

    #[test]
    fn tight_budget_admits_only_runs() {
        let mut b = VmaBudget::new(100, 86);
        assert!(!b.tight());
        assert_eq!(b.admit(1), Admission::Admitted);
        assert!(b.tight());
        assert_eq!(b.admit(1), Admission::TooShort);
        assert_eq!(b.admit(MIN_RUN_WHEN_TIGHT), Admission::Admitted);
        b.measured(10);
        assert!(!b.tight());
        assert_eq!(b.admit(1), Admission::Admitted);
    }

    #[test]
    fn admit_all_is_all_or_nothing() {
        let mut b = VmaBudget::new(20, 14);
        assert_eq!(b.admit_all(&[8, 8, 8, 8]), Admission::Exhausted);
        assert_eq!(b.used(), 14);
        assert_eq!(b.admit_all(&[8, 8]), Admission::Admitted);
        assert_eq!(b.used(), 18);
        assert_eq!(b.admit_all(&[1]), Admission::TooShort);
        assert_eq!(b.admit_all(&[]), Admission::Admitted);
    }

    #[test]
    fn learned_limit_holds_until_unlearned_and_reached_is_current() {
        let mut b = VmaBudget::new(1000, 100);
        assert!(!b.reached());
        b.learn(120);
        assert_eq!(b.limit(), 120);
        assert_eq!(b.configured_limit(), 1000);
        assert_eq!(b.used(), 120);
        assert_eq!(b.admit(64), Admission::Exhausted);
        assert!(b.reached());
        b.set_limit(2000);
        assert_eq!(
            b.limit(),
            120,
            "a new configured limit keeps the learnt one"
        );
        b.unlearn();
        assert_eq!(b.limit(), 2000);
        b.measured(100);
        // The refusal counts for the pass it happened in and the next one, then clears.
        assert!(b.reached());
        b.pass_done();
        assert!(b.reached());
        b.pass_done();
        assert!(!b.reached());
        assert_eq!(b.denied(), 1);
    }

    #[test]
    fn charges_outside_merges_count_and_a_count_replaces_them() {
        let mut b = VmaBudget::new(100, 90);
        b.charge(30);
        assert_eq!(b.used(), 120, "over the limit: it happened");
        assert_eq!(b.admit(64), Admission::Exhausted);
        b.begin_plan();
        assert!(!b.recount_due(), "30 charged: not worth a count yet");
        b.charge(40);
        assert!(b.recount_due());
        b.recounted(60);
        assert_eq!(b.used(), 60);
        assert_eq!(b.admit(64), Admission::Admitted);
    }

    #[test]
    fn default_limit_keeps_headroom() {
        assert_eq!(VmaBudget::default_limit(65530, 100), 65530 - 100 - 8191);
        assert_eq!(VmaBudget::default_limit(2000, 100), 2000 - 100 - 1024);
        assert_eq!(VmaBudget::default_limit(1000, 900), 0);
    }
}
