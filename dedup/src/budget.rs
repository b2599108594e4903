//! The VMA budget. Each remap of guest pages onto pool slots can cost up to two VMAs (the new
//! mapping and the split of the old one), and the whole process fails `mmap` and `mprotect` with
//! ENOMEM past `vm.max_map_count`. The budget counts VMAs inside guest memory, is measured from
//! /proc/self/maps at the end of a pass that changed them, charges two VMAs per remap in
//! between, and is never exceeded. Zero pages cost no VMA and always continue.
//!
//! Two VMAs is what a remap costs alone in private memory; next to another merged page it
//! costs one or none, so the charges can run far ahead of the count (twice it where merged
//! pages lie side by side). Before refusing on charges of remaps already done, the budget asks
//! for a new count ([`VmaBudget::recount_due`], [`VmaBudget::recounted`]): the count of now
//! plus the charges of the plan being admitted is again an upper bound. What else splits
//! guest mappings (a discard inside a merged run, registering part of a remapped range with
//! the userfaultfd) is charged as it happens ([`VmaBudget::charge`]).
//!
//! When the merges a pass asks for need more than the budget holds, it admits the longest runs
//! first ([`crate::demand`]): a step's runs from the longest down, and only those classes of
//! run length that leave room for the longer runs the rest of the pass is expected to bring.
//! A remap the plan did not ask for as such (a planned run cut by a page that changed) is
//! admitted past seven eighths of the budget only if it maps at least four pages.
//!
//! When a remap fails with ENOMEM all the same (the configured budget is more than the process
//! may map, or the rest of the process grew), the budget *learns* the count of that moment as
//! its limit until a later try shows more room.

use crate::demand::{self, ByClass, Demand};

/// VMAs one remap may add.
pub const VMAS_PER_REMAP: u64 = 2;
/// The budget is tight (only runs of unplanned remaps are admitted) once `TIGHT_NUM /
/// TIGHT_DEN` of it is used.
const TIGHT_NUM: u64 = 7;
const TIGHT_DEN: u64 = 8;
/// Shortest unplanned remap admitted once the budget is tight.
pub const MIN_RUN_WHEN_TIGHT: usize = 4;
/// A new count is worth reading /proc/self/maps (a line per VMA) once the charges of remaps
/// done since the last count reach `1 / RECOUNT_DIV` of the limit, and at least `RECOUNT_MIN`.
const RECOUNT_DIV: u64 = 16;
const RECOUNT_MIN: u64 = 64;

/// A budget of VMAs inside guest memory.
#[derive(Clone, Debug, PartialEq)]
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
    /// What the passes ask for, by run length.
    demand: Demand,
    /// The plan being admitted: what it asks for, the pass's progress after it, and the
    /// shortest class of runs it may admit.
    plan_asks: ByClass,
    plan_progress: f64,
    min_class: usize,
    /// The last count, and since then the remaps made and the VMAs charged for other things.
    counted_at: u64,
    remaps: u64,
    charged_other: u64,
    /// Runs were refused in the pass going on (in the last completed one) while shorter than
    /// the longer runs that went first, with room left for them later.
    waited: bool,
    waited_last: bool,
}

/// Which rule besides the room decides an admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rule {
    /// Planned runs: the longest go first.
    Longest,
    /// The rest of a new slot's planned runs: only the room.
    Room,
    /// Remaps not planned as such: only runs of four pages once the budget is tight.
    Tight,
}

/// What the budget says about one remap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead; two VMAs were charged.
    Admitted,
    /// Refused: the run is too short, for a tight budget or for the longer runs that go first.
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
            demand: Demand::new(VMAS_PER_REMAP as f64),
            plan_asks: [0; demand::CLASSES],
            plan_progress: 1.0,
            min_class: 0,
            counted_at: used,
            remaps: 0,
            charged_other: 0,
            waited: false,
            waited_last: false,
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

    /// What [`VmaBudget::admit_all`] (or with `rest`, [`VmaBudget::admit_rest`]) would say,
    /// without charging or counting anything.
    pub fn check(&self, run_pages: &[usize], rest: bool) -> Admission {
        self.verdict(run_pages, if rest { Rule::Room } else { Rule::Longest })
    }

    fn verdict(&self, run_pages: &[usize], rule: Rule) -> Admission {
        let cost = VMAS_PER_REMAP * run_pages.len() as u64;
        let short = match rule {
            Rule::Longest => self.waits(run_pages),
            Rule::Room => false,
            Rule::Tight => self.tight() && run_pages.iter().any(|&p| p < MIN_RUN_WHEN_TIGHT),
        };
        if self.used + cost > self.limit() {
            Admission::Exhausted
        } else if short {
            Admission::TooShort
        } else {
            Admission::Admitted
        }
    }

    /// Whether planned runs of `run_pages` pages wait for longer ones (asking for none never
    /// waits).
    fn waits(&self, run_pages: &[usize]) -> bool {
        let pages: usize = run_pages.iter().sum();
        !run_pages.is_empty() && demand::class(pages / run_pages.len()) < self.min_class
    }

    /// Asks to remap a run of `run_pages` pages that was not planned as such (part of a
    /// planned run): the tight budget's rule applies, not the longest-first one.
    pub fn admit(&mut self, run_pages: usize) -> Admission {
        self.take(&[run_pages], Rule::Tight)
    }

    /// Asks to remap several planned runs together (all or none), `run_pages[i]` pages each.
    pub fn admit_all(&mut self, run_pages: &[usize]) -> Admission {
        self.take(run_pages, Rule::Longest)
    }

    /// Asks to remap the planned runs of a new slot that are left once its other runs were
    /// admitted: only the room decides, so that the slot keeps its donor and its sharers.
    pub fn admit_rest(&mut self, run_pages: &[usize]) -> Admission {
        self.take(run_pages, Rule::Room)
    }

    /// VMAs left before the limit.
    pub fn room(&self) -> u64 {
        self.limit().saturating_sub(self.used)
    }

    fn take(&mut self, run_pages: &[usize], rule: Rule) -> Admission {
        let planned = rule != Rule::Tight;
        let verdict = self.verdict(run_pages, rule);
        if verdict == Admission::Admitted {
            let n = run_pages.len() as u64;
            let cost = VMAS_PER_REMAP * n;
            self.used += cost;
            self.charged += cost;
            if planned {
                self.charged_plan += cost;
            }
        } else {
            self.deny(run_pages.len() as u64);
            if verdict == Admission::TooShort && rule == Rule::Longest {
                self.waited = true;
            }
        }
        verdict
    }

    /// Charges `n` VMAs that something other than a merge made or may have made (registering
    /// part of a mapping splits it; a discard maps fresh memory into a merged run), without
    /// refusing: it has happened. Past the limit, merges are refused until a count shows room.
    pub fn charge(&mut self, n: u64) {
        self.used += n;
        self.charged += n;
        self.charged_other += n;
    }

    /// `n` remaps were made (what a remap costs is learnt from them and the next count).
    pub fn remapped(&mut self, n: u64) {
        self.remaps += n;
    }

    /// The part of the pass (0 to 1) scanned once the pages of the next plan are.
    pub fn set_progress(&mut self, progress: f64) {
        self.plan_progress = progress;
    }

    /// A plan is about to be admitted that asks for the remaps `asks` (by class of run
    /// length): what was charged before is mapped (or was never needed) by now, so a count
    /// would see it.
    pub fn begin_plan(&mut self, asks: &ByClass) {
        self.charged_plan = 0;
        self.plan_asks = *asks;
        self.update_min_class();
    }

    fn update_min_class(&mut self) {
        self.min_class = self
            .demand
            .min_class(&self.plan_asks, self.plan_progress, self.room());
    }

    /// A pass begins; `quiet`: it plans only pages new to the planner (see
    /// [`Demand::begin_pass`]).
    pub fn begin_pass(&mut self, quiet: bool) {
        self.demand.begin_pass(quiet);
    }

    /// The plan being admitted asked for `asked` and was refused `refused` (by class).
    pub fn plan_done(&mut self, asked: &ByClass, refused: &ByClass) {
        self.demand.step_done(asked, refused);
    }

    /// Fewest pages per remap the plan being admitted may merge (1: any).
    pub fn min_run(&self) -> usize {
        demand::class_pages(self.min_class)
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
        self.learn_cost(counted);
        self.used = counted + self.charged_plan;
        self.charged = self.charged_plan;
        self.update_min_class();
    }

    /// Learns what a remap costs from a count: the VMAs added since the last one, less those
    /// charged for other things, over the remaps made in between.
    fn learn_cost(&mut self, counted: u64) {
        let added = counted
            .saturating_sub(self.counted_at)
            .saturating_sub(self.charged_other);
        self.demand.counted(added, self.remaps);
        self.counted_at = counted;
        self.remaps = 0;
        self.charged_other = 0;
    }

    /// Replaces the running charge by a measurement.
    pub fn measured(&mut self, used: u64) {
        self.learn_cost(used);
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
        self.waited_last = std::mem::take(&mut self.waited);
        self.demand.pass_done();
    }

    /// Whether the last completed pass left runs waiting for longer ones: the next pass must
    /// plan them again, even if nothing changed.
    pub fn left_waiting(&self) -> bool {
        self.waited_last
    }

    /// Whether the budget holds merges back now: it is tight, or it refused some during the
    /// pass going on or the last completed one.
    pub fn reached(&self) -> bool {
        self.tight() || self.denied_pass > 0 || self.denied_last_pass > 0
    }

    /// Whether seven eighths of the budget are used (only runs of unplanned remaps are
    /// admitted).
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
        assert_eq!(b.admit_all(&[1, 1]), Admission::Exhausted);
        assert_eq!(b.admit_all(&[]), Admission::Admitted);
    }

    #[test]
    fn planned_runs_wait_for_longer_ones_others_keep_the_tight_rule() {
        let mut b = VmaBudget::new(50, 0);
        // A plan at the end of its pass asking for 10 single pages and 20 runs of 16: room
        // for 25 remaps at 2 VMAs each, the runs first.
        let mut asks = [0; demand::CLASSES];
        asks[0] = 10;
        asks[4] = 20;
        b.begin_plan(&asks);
        assert_eq!(b.min_run(), 2);
        assert_eq!(b.admit_all(&[1]), Admission::TooShort);
        assert_eq!(
            b.admit_all(&[2, 1]),
            Admission::TooShort,
            "1.5 pages a remap"
        );
        assert_eq!(
            b.admit_all(&[16, 1]),
            Admission::Admitted,
            "8.5 pages a remap"
        );
        assert_eq!(b.admit_all(&[16, 16]), Admission::Admitted);
        assert_eq!(b.admit_all(&[]), Admission::Admitted, "nothing to wait for");
        b.pass_done();
        assert!(b.left_waiting());
        // Past seven eighths, single pages outside a plan are refused, planned ones are not.
        let mut b = VmaBudget::new(100, 90);
        b.begin_plan(&[0; demand::CLASSES]);
        assert_eq!(b.admit(1), Admission::TooShort);
        assert_eq!(b.admit_all(&[1]), Admission::Admitted);
        b.pass_done();
        assert!(!b.left_waiting());
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
        b.begin_plan(&[0; demand::CLASSES]);
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
