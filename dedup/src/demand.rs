//! Longest runs first when the VMA budget cannot hold every merge. A remap costs the same VMAs
//! whether it merges one page or five hundred, so when a pass asks for more remaps than the
//! budget has room for, pages per remap decide which go first. Remaps fall into *classes* by
//! their pages per remap (class `k`: `2^k` to `2^(k+1) - 1`), and a step admits only the
//! classes that, together with what the rest of the pass is expected to ask of the longer
//! classes, fit the room left ([`Demand::min_class`]). In a pass after one that asked for
//! merges, the rest of it is expected to ask for what the last one refused and this one has
//! not asked for again yet; otherwise, for what the part scanned so far asked, scaled to the
//! part still to come. The shorter runs wait for a later pass, and take what room is left then (the budget
//! has the engine plan them again: [`crate::budget::VmaBudget::left_waiting`]).
//!
//! Pure: the step gives the pass's progress and what each step asks, the budget
//! ([`crate::budget::VmaBudget`]) applies the answer. How many VMAs a remap adds is learnt from
//! the counts of /proc/self/maps (a remap next to merged pages adds one or none, alone in
//! private memory two).

/// Number of classes; the last one holds every remap of `2^(CLASSES - 1)` pages or more.
pub const CLASSES: usize = 10;

/// Remaps a pass must have asked for before its own figures are scaled to the rest of it.
const MIN_SAMPLE: u64 = 64;

/// Remaps between two counts needed to learn what one costs.
const MIN_LEARN: u64 = 256;

/// Bounds of the learnt VMAs per remap.
const COST_MIN: f64 = 0.25;
const COST_MAX: f64 = 2.0;

/// Remaps by class.
pub type ByClass = [u64; CLASSES];

/// The class of a remap of `pages` pages (pages per remap, for runs admitted together).
pub fn class(pages: usize) -> usize {
    let p = pages.max(1);
    ((usize::BITS - 1 - p.leading_zeros()) as usize).min(CLASSES - 1)
}

/// Fewest pages per remap of class `k`.
pub fn class_pages(k: usize) -> usize {
    1 << k.min(CLASSES - 1)
}

/// What the merges of a pass ask of the VMA budget, by class.
#[derive(Clone, Debug, PartialEq)]
pub struct Demand {
    /// Asked in the pass going on, by the steps admitted so far.
    asked: ByClass,
    /// Refused in the pass going on.
    refused: ByClass,
    /// Refused in the last completed pass.
    refused_last: Option<ByClass>,
    /// VMAs one remap adds.
    cost: f64,
    /// The pass going on plans only pages new to the planner: the runs the last pass
    /// refused are not asked for again.
    quiet: bool,
}

impl Demand {
    /// No pass seen yet; a remap is taken to add `cost` VMAs until a count shows otherwise.
    pub fn new(cost: f64) -> Self {
        Demand {
            asked: [0; CLASSES],
            refused: [0; CLASSES],
            refused_last: None,
            cost: cost.clamp(COST_MIN, COST_MAX),
            quiet: false,
        }
    }

    /// The shortest class a step that asks for `step` may admit, with `progress` (0 to 1) of
    /// the pass scanned once the step is done and `room` VMAs left in the budget: the longest
    /// classes whose remaps, this step's and those the rest of the pass is expected to ask for,
    /// fit in `room` (if not even the longest does, that one, first come first served). 0
    /// admits everything (as far as the room goes).
    pub fn min_class(&self, step: &ByClass, progress: f64, room: u64) -> usize {
        let p = if progress.is_finite() {
            progress.clamp(0.0, 1.0)
        } else {
            1.0
        };
        let seen: u64 = self.asked.iter().chain(step).sum();
        let mut need = 0.0;
        for k in (0..CLASSES).rev() {
            let asked = self.asked[k] + step[k];
            let rest = if let Some(last) = self.refused_last.as_ref().filter(|_| !self.quiet) {
                last[k].saturating_sub(asked) as f64
            } else if p > 0.0 && seen >= MIN_SAMPLE {
                asked as f64 * (1.0 - p) / p
            } else {
                0.0
            };
            let longer = need;
            need += (step[k] as f64 + rest) * self.cost;
            if need > room as f64 {
                // The longer classes fit: they go first. If there are none, this class takes
                // what room there is.
                return if longer > 0.0 { k + 1 } else { k };
            }
        }
        0
    }

    /// Records what a step asked for and what of it was refused.
    pub fn step_done(&mut self, asked: &ByClass, refused: &ByClass) {
        for k in 0..CLASSES {
            self.asked[k] += asked[k];
            self.refused[k] += refused[k];
        }
    }

    /// A pass begins; `quiet`: it plans only pages new to the planner, so it expects only
    /// what its own figures tell, and leaves the last full pass's refusals for the next one.
    pub fn begin_pass(&mut self, quiet: bool) {
        self.quiet = quiet;
    }

    /// A pass completed: its refusals are what the next one starts from, if it asked for
    /// anything (a first look at pages tells nothing) and was not quiet.
    pub fn pass_done(&mut self) {
        let refused = std::mem::take(&mut self.refused);
        let asked = std::mem::take(&mut self.asked);
        if !self.quiet {
            self.refused_last = asked.iter().any(|&n| n > 0).then_some(refused);
        }
    }

    /// A count found `added` more VMAs than the one before, with `remaps` remaps done in
    /// between: learns what a remap adds (when enough were done to tell).
    pub fn counted(&mut self, added: u64, remaps: u64) {
        if remaps >= MIN_LEARN && added > 0 {
            self.cost = (added as f64 / remaps as f64).clamp(COST_MIN, COST_MAX);
        }
    }

    /// VMAs one remap is taken to add.
    pub fn cost(&self) -> f64 {
        self.cost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn by(pairs: &[(usize, u64)]) -> ByClass {
        let mut c = [0; CLASSES];
        for &(k, n) in pairs {
            c[k] += n;
        }
        c
    }

    #[test]
    fn classes_are_powers_of_two_of_pages() {
        assert_eq!(class(0), 0);
        assert_eq!(class(1), 0);
        assert_eq!(class(2), 1);
        assert_eq!(class(3), 1);
        assert_eq!(class(4), 2);
        assert_eq!(class(511), 8);
        assert_eq!(class(512), 9);
        assert_eq!(class(100_000), CLASSES - 1);
        for k in 0..CLASSES {
            assert_eq!(class(class_pages(k)), k);
        }
    }

    #[test]
    fn everything_goes_when_it_fits() {
        let d = Demand::new(2.0);
        // A tenth of the pass asked 100 single pages and 10 long runs: 1,100 remaps in all,
        // 2,200 VMAs, in a room of 3,000.
        let step = by(&[(0, 100), (6, 10)]);
        assert_eq!(d.min_class(&step, 0.1, 3000), 0);
    }

    #[test]
    fn short_runs_wait_for_the_longer_ones_the_pass_is_expected_to_bring() {
        let d = Demand::new(1.0);
        // A tenth of the pass: 100 single pages, 10 runs of 64 and more. Expected in all: 1,000
        // and 100; room for 500 remaps: only the long runs.
        let step = by(&[(0, 100), (6, 10)]);
        assert_eq!(d.min_class(&step, 0.1, 500), 1);
        // Room for none of the rest: still the longest class first.
        assert_eq!(d.min_class(&step, 0.1, 5), 6);
        // Only single pages: nothing better to wait for.
        assert_eq!(d.min_class(&by(&[(0, 100)]), 0.1, 5), 0);
        // The end of the pass: nothing more to come, the room holds this step.
        assert_eq!(d.min_class(&step, 1.0, 110), 0);
        assert_eq!(d.min_class(&step, 1.0, 50), 1);
    }

    #[test]
    fn earlier_steps_of_the_pass_count_and_a_pass_starts_from_the_last_ones_refusals() {
        let mut d = Demand::new(1.0);
        d.step_done(&by(&[(0, 1000), (4, 100)]), &by(&[(0, 900), (4, 40)]));
        // Half the pass: this step asks little, the first half's mix is expected again.
        assert_eq!(d.min_class(&by(&[(0, 1)]), 0.5, 600), 1);
        assert_eq!(d.min_class(&by(&[(0, 1)]), 0.5, 5000), 0);
        d.pass_done();
        // Too little of the new pass seen: its refusals are expected, what is left of them.
        assert_eq!(d.min_class(&by(&[(0, 1)]), 0.01, 500), 1);
        assert_eq!(d.min_class(&by(&[(0, 1)]), 0.01, 1000), 0);
        // Once it has asked for them again, nothing more.
        let mut again = d.clone();
        again.step_done(&by(&[(0, 900), (4, 40)]), &by(&[]));
        assert_eq!(again.min_class(&by(&[(0, 10)]), 0.5, 15), 0);
        // Not the first pass's scaling: the refusals may all lie in the part already scanned.
        assert_eq!(again.min_class(&by(&[(0, 10)]), 0.05, 15), 0);
        // A pass that asked and refused nothing expects nothing more.
        d.step_done(&by(&[(0, 5)]), &by(&[]));
        d.pass_done();
        assert_eq!(d.min_class(&by(&[(0, 100), (5, 1)]), 0.1, 150), 0);
        // One that asked nothing tells nothing: the pass scales its own figures.
        d.pass_done();
        assert_eq!(d.min_class(&by(&[(0, 100), (5, 1)]), 0.1, 150), 1);
    }

    #[test]
    fn a_quiet_pass_expects_only_its_own_and_keeps_the_last_refusals() {
        let mut d = Demand::new(1.0);
        d.step_done(&by(&[(0, 900), (4, 100)]), &by(&[(0, 800), (4, 90)]));
        d.pass_done();
        let step = by(&[(0, 10)]);
        assert_eq!(
            d.min_class(&step, 0.1, 500),
            1,
            "a full pass expects the refusals"
        );
        // A quiet pass plans only fresh pages: the refused ones do not come back in it.
        d.begin_pass(true);
        assert_eq!(d.min_class(&step, 0.1, 500), 0);
        d.step_done(&step, &by(&[]));
        d.pass_done();
        d.begin_pass(false);
        assert_eq!(
            d.min_class(&step, 0.1, 500),
            1,
            "kept for the next full pass"
        );
    }

    #[test]
    fn the_cost_of_a_remap_is_learnt_from_counts() {
        let mut d = Demand::new(2.0);
        let step = by(&[(0, 100), (3, 10)]);
        // 1,100 remaps expected: 2,200 VMAs at 2 each, 1,100 at 1.
        assert_eq!(d.min_class(&step, 0.1, 1500), 1);
        d.counted(100, 10);
        assert_eq!(d.cost(), 2.0, "too few remaps to tell");
        d.counted(300, 300);
        assert_eq!(d.cost(), 1.0);
        assert_eq!(d.min_class(&step, 0.1, 1500), 0);
        d.counted(0, 1000);
        assert_eq!(
            d.cost(),
            1.0,
            "a count that found fewer (unmerges) teaches nothing"
        );
        d.counted(10_000, 1000);
        assert_eq!(d.cost(), COST_MAX);
    }

    #[test]
    fn odd_progress_is_taken_as_the_end_of_the_pass() {
        let d = Demand::new(1.0);
        let step = by(&[(0, 100)]);
        assert_eq!(d.min_class(&step, f64::NAN, 100), 0);
        assert_eq!(d.min_class(&step, 7.0, 100), 0);
        assert_eq!(
            d.min_class(&step, -1.0, 100),
            0,
            "nothing seen: the step alone"
        );
    }
}
