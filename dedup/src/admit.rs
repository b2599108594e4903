//! What of a step's plan goes on to the commit, pure: the VMA budget admits planned runs (or
//! refuses them) before any pool slot is filled or any page is write-protected, and the work
//! that a backed-off failure would refuse is left out. What is refused or left out is taken out
//! of the plan, and the new slots nobody is left to map are freed (they were never filled), so
//! the commit only attempts what it may do.

use hashbrown::HashMap;

use crate::budget::{Admission, VMAS_PER_REMAP, VmaBudget};
use crate::demand::{ByClass, CLASSES, class};
use crate::index::{ContentIndex, Entry};
use crate::plan::{self, Assign, Plan, PlanView, Rules, Target};
use crate::slots::{CHUNK_SLOTS, SlotTable};

/// Run number of each planned merge (`u32::MAX` for zero pages), and the length of each run.
/// A run is a maximal sequence of consecutive pages of one region mapped to consecutive slots
/// of one node within one chunk (consecutive pages of one pool file): one remap. `assigns` must
/// be sorted by page (as plans are).
pub fn runs(assigns: &[Assign], slots: &SlotTable) -> (Vec<u32>, Vec<usize>) {
    let mut ids = Vec::with_capacity(assigns.len());
    let mut lens: Vec<usize> = Vec::new();
    let mut prev: Option<(Assign, u8)> = None;
    for a in assigns {
        let Target::Slot(s) = a.target else {
            ids.push(u32::MAX);
            prev = None;
            continue;
        };
        let node = slots.node(s);
        let extends = prev.is_some_and(|(p, pn)| {
            p.loc.guest == a.loc.guest
                && p.loc.region == a.loc.region
                && p.loc.page + 1 == a.loc.page
                && pn == node
                && matches!(p.target, Target::Slot(ps) if ps + 1 == s && ps / CHUNK_SLOTS == s / CHUNK_SLOTS)
        });
        match lens.last_mut() {
            Some(l) if extends => *l += 1,
            _ => lens.push(1),
        }
        ids.push((lens.len() - 1) as u32);
        prev = Some((*a, node));
    }
    (ids, lens)
}

/// Which planned merges the budget admits. The runs holding the pages of a new slot are
/// admitted together or not at all, so that no slot is left with one sharer because its
/// partner ran out of budget; zero pages cost no VMA. The longest go first: a new slot's runs
/// by their pages per remap, other runs by their own, from the longest class down (see
/// [`crate::demand`] and [`VmaBudget::set_progress`]).
/// Refusals are counted by the budget. Before a refusal that a new count could lift,
/// `recount` is asked for the VMAs inside guest memory now (`None`: no count, refuse).
pub fn admit(
    plan: &Plan,
    slots: &SlotTable,
    budget: &mut VmaBudget,
    recount: &mut dyn FnMut() -> Option<u64>,
) -> Vec<bool> {
    let (ids, lens) = runs(&plan.assigns, slots);
    let number = NewSlotNumbers::new(plan);
    let groups = SlotRuns::new(plan, &ids, &number);
    let mut grouped = vec![false; lens.len()];
    for group in groups.iter() {
        for &r in group {
            grouped[r as usize] = true;
        }
    }
    let singles: Vec<u32> = (0..lens.len() as u32)
        .filter(|&r| !grouped[r as usize])
        .collect();
    // Every ask (a new slot's runs, or one other run) by the class of its pages per remap, in
    // the plan's order within a class.
    let mut by_class: [Vec<&[u32]>; CLASSES] = Default::default();
    for group in groups.iter().chain(singles.chunks(1)) {
        let pages: usize = group.iter().map(|&r| lens[r as usize]).sum();
        by_class[class(pages / group.len())].push(group);
    }
    // Longest first. A run is asked for with the first ask that holds it, along with the
    // other runs of that ask not asked for before: those runs' pages per remap are its class.
    // Asks too big for the room (all of a new slot's runs together) are no demand to keep
    // room for: they cannot be admitted now.
    let order = || by_class.iter().rev().flatten();
    let room = budget.room();
    let mut class_of: Vec<Option<usize>> = vec![None; lens.len()];
    let mut claimed = vec![false; lens.len()];
    let mut asked: ByClass = [0; CLASSES];
    let mut need: Vec<u32> = Vec::new();
    for group in order() {
        need.clear();
        need.extend(group.iter().filter(|&&r| !claimed[r as usize]));
        if need.is_empty() {
            continue;
        }
        let pages: usize = need.iter().map(|&r| lens[r as usize]).sum();
        let k = class(pages / need.len());
        let fits = VMAS_PER_REMAP * need.len() as u64 <= room;
        for &r in &need {
            claimed[r as usize] = true;
            class_of[r as usize] = fits.then_some(k);
        }
        if fits {
            asked[k] += need.len() as u64;
        }
    }
    budget.begin_plan(&asked);
    let mut ask = |budget: &mut VmaBudget, lens: &[usize], rest: bool| {
        if budget.check(lens, rest) != Admission::Admitted && budget.recount_due() {
            if let Some(counted) = recount() {
                budget.recounted(counted);
            }
        }
        let verdict = if rest {
            budget.admit_rest(lens)
        } else {
            budget.admit_all(lens)
        };
        verdict == Admission::Admitted
    };
    let donor_runs = donor_runs(plan, &ids, &number, lens.len());
    let mut state: Vec<Option<bool>> = vec![None; lens.len()];
    // Refused along with a run refused before: waiting for that run, not for the budget.
    let mut followed = vec![false; lens.len()];
    let mut need_lens: Vec<usize> = Vec::new();
    for group in order() {
        let refused = group.iter().any(|&r| state[r as usize] == Some(false));
        need.clear();
        need.extend(group.iter().filter(|&&r| state[r as usize].is_none()));
        if need.is_empty() {
            continue;
        }
        if refused {
            budget.refuse(need.len() as u64);
            for &r in &need {
                followed[r as usize] = true;
                state[r as usize] = Some(false);
            }
            continue;
        }
        // The rest of a slot whose other runs were admitted: the slot must keep its donor and
        // its sharers, so only the room can refuse them.
        let rest = group.iter().any(|&r| state[r as usize] == Some(true));
        // A new slot's runs that do not fit together: its donor's run and the longest of the
        // others that fit, at least one (the others stay undecided).
        if !rest && need.len() > 2 && VMAS_PER_REMAP * need.len() as u64 > budget.room() {
            let fit = (budget.room() / VMAS_PER_REMAP) as usize;
            if fit >= 2 {
                need.sort_by_key(|&r| {
                    (!donor_runs[r as usize], std::cmp::Reverse(lens[r as usize]))
                });
                need.truncate(fit);
            }
        }
        need_lens.clear();
        need_lens.extend(need.iter().map(|&r| lens[r as usize]));
        let ok = ask(budget, &need_lens, rest);
        for &r in &need {
            state[r as usize] = Some(ok);
        }
    }
    let mut refused: ByClass = [0; CLASSES];
    for (r, st) in state.iter().enumerate() {
        if *st == Some(false) && !followed[r] {
            if let Some(k) = class_of[r] {
                refused[k] += 1;
            }
        }
    }
    budget.plan_done(&asked, &refused);
    let mut keep: Vec<bool> = ids
        .iter()
        .map(|&r| r == u32::MAX || state[r as usize] == Some(true))
        .collect();
    keep_whole_slots(plan, &number, &mut keep);
    keep
}

/// Whether each of the `runs` runs holds the donor of a new slot.
fn donor_runs(plan: &Plan, ids: &[u32], number: &NewSlotNumbers, runs: usize) -> Vec<bool> {
    let mut donor = vec![false; runs];
    for (a, &r) in plan.assigns.iter().zip(ids) {
        if let Some(k) = number.of(a.target) {
            donor[r as usize] |= a.loc == plan.new_slots[k as usize].donor;
        }
    }
    donor
}

/// Takes out the merges of every new slot that would be left without its donor or with a
/// single page: whatever the order the runs were admitted in, a slot is filled from its donor
/// and shared by two pages at least. (Each merge belongs to one slot, so taking out one slot's
/// merges leaves the others' counts as they are.)
fn keep_whole_slots(plan: &Plan, number: &NewSlotNumbers, keep: &mut [bool]) {
    let mut kept = vec![0u32; plan.new_slots.len()];
    let mut donor_kept = vec![false; plan.new_slots.len()];
    for (a, _) in plan.assigns.iter().zip(keep.iter()).filter(|(_, k)| **k) {
        if let Some(k) = number.of(a.target) {
            kept[k as usize] += 1;
            donor_kept[k as usize] |= a.loc == plan.new_slots[k as usize].donor;
        }
    }
    for (a, k) in plan.assigns.iter().zip(keep.iter_mut()) {
        if let Some(n) = number.of(a.target) {
            if kept[n as usize] < 2 || !donor_kept[n as usize] {
                *k = false;
            }
        }
    }
}

/// The runs holding the pages of each new slot of a plan, slot by slot in the plan's order,
/// each slot's runs in increasing order without repeats. Built in two linear passes (a
/// counting sort by slot): run numbers grow along the assigns, so a slot's runs come in order.
struct SlotRuns {
    /// Where each slot's runs start in `runs` (one more entry than slots).
    start: Vec<usize>,
    runs: Vec<u32>,
}

impl SlotRuns {
    fn new(plan: &Plan, ids: &[u32], number: &NewSlotNumbers) -> Self {
        let mut start = vec![0usize; plan.new_slots.len() + 1];
        let mut pairs: Vec<(u32, u32)> = Vec::with_capacity(plan.assigns.len());
        for (a, &r) in plan.assigns.iter().zip(ids) {
            if let Some(k) = number.of(a.target) {
                // A run's merges are consecutive assigns, so a repeat of (slot, run) could only
                // follow itself.
                if pairs.last() != Some(&(k, r)) {
                    pairs.push((k, r));
                    start[k as usize + 1] += 1;
                }
            }
        }
        for k in 1..start.len() {
            start[k] += start[k - 1];
        }
        let mut next = start.clone();
        let mut runs = vec![0u32; pairs.len()];
        for &(k, r) in &pairs {
            runs[next[k as usize]] = r;
            next[k as usize] += 1;
        }
        Self { start, runs }
    }

    /// Each slot's runs (slots without any are skipped).
    fn iter(&self) -> impl Iterator<Item = &[u32]> + '_ {
        self.start
            .windows(2)
            .filter(|w| w[0] < w[1])
            .map(|w| &self.runs[w[0]..w[1]])
    }
}

/// The number in a plan of each of its new slots, looked up by slot: a table over the slots'
/// span when they are about as many as the span (as slots numbered in donor order are), else a
/// hash map.
enum NewSlotNumbers {
    Dense { first: u32, number: Vec<u32> },
    Sparse(HashMap<u32, u32>),
}

impl NewSlotNumbers {
    fn new(plan: &Plan) -> Self {
        let slots = plan.new_slots.iter().map(|n| n.slot);
        let (Some(first), Some(last)) = (slots.clone().min(), slots.max()) else {
            return Self::Sparse(HashMap::new());
        };
        let span = (last - first) as usize + 1;
        if span > 4 * plan.new_slots.len() + 1024 {
            return Self::Sparse(
                plan.new_slots
                    .iter()
                    .enumerate()
                    .map(|(k, n)| (n.slot, k as u32))
                    .collect(),
            );
        }
        let mut number = vec![u32::MAX; span];
        for (k, n) in plan.new_slots.iter().enumerate() {
            number[(n.slot - first) as usize] = k as u32;
        }
        Self::Dense { first, number }
    }

    /// The plan's number of the new slot `target` names, if it names one.
    fn of(&self, target: Target) -> Option<u32> {
        let Target::Slot(s) = target else {
            return None;
        };
        match self {
            Self::Dense { first, number } => s
                .checked_sub(*first)
                .and_then(|i| number.get(i as usize))
                .copied()
                .filter(|&k| k != u32::MAX),
            Self::Sparse(map) => map.get(&s).copied(),
        }
    }
}

/// Takes the merges where `keep` is false out of `plan`, and frees the new slots left without
/// any merge (never filled: no punch needed); their donors are stable pages in the index again,
/// as before the plan. Returns how many merges were taken out.
pub fn prune(
    plan: &mut Plan,
    keep: &[bool],
    rules: &Rules,
    index: &mut ContentIndex,
    slots: &mut SlotTable,
    view: &impl PlanView,
) -> u64 {
    if keep.iter().all(|&k| k) {
        return 0;
    }
    let mut left: HashMap<u32, u32> = HashMap::new();
    let mut removed = 0;
    let mut i = 0;
    plan.assigns.retain(|a| {
        let k = keep.get(i).copied().unwrap_or(true);
        i += 1;
        if k {
            if let Target::Slot(s) = a.target {
                *left.entry(s).or_insert(0) += 1;
            }
        } else {
            removed += 1;
        }
        k
    });
    plan.new_slots.retain(|n| {
        let used = left.get(&n.slot).copied().unwrap_or(0) > 0;
        if !used {
            let key = plan::index_key(rules, slots.domain(n.slot), slots.node(n.slot));
            let hash = slots.hash(n.slot);
            plan::release(n.slot, rules, index, slots);
            if view.stable_hash(n.donor) == Some(hash) {
                index.insert(key, hash, Entry::Page(n.donor), |e| {
                    plan::entry_hash(slots, view, e)
                });
            }
        }
        used
    });
    removed
}

/// Prunes what the budget refuses (see [`admit`]); returns how many merges it refused.
pub fn admit_and_prune(
    plan: &mut Plan,
    rules: &Rules,
    index: &mut ContentIndex,
    slots: &mut SlotTable,
    view: &impl PlanView,
    budget: &mut VmaBudget,
    recount: &mut dyn FnMut() -> Option<u64>,
) -> u64 {
    let keep = admit(plan, slots, budget, recount);
    prune(plan, &keep, rules, index, slots, view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::PageLoc;
    use crate::plan::NewSlot;

    fn loc(page: u32) -> PageLoc {
        PageLoc {
            guest: 0,
            region: 0,
            page,
        }
    }

    fn slot_plan(pairs: &[(u32, u32)], slots: &mut SlotTable) -> Plan {
        // (page, slot) assigns; every slot new, its first page the donor.
        let mut plan = Plan::default();
        for &(page, slot) in pairs {
            if !slots.allocated(slot) {
                assert_eq!(slots.alloc(slot, 0, 0, Some(slot)), Some(slot));
                plan.new_slots.push(NewSlot {
                    slot,
                    donor: loc(page),
                    node: 0,
                });
            }
            plan.assigns.push(Assign {
                loc: loc(page),
                target: Target::Slot(slot),
            });
        }
        plan.assigns.sort_by_key(|a| a.loc);
        plan
    }

    /// Every planned page is stable with its slot's hash.
    struct Stable(Vec<(u32, u32)>);

    impl PlanView for Stable {
        fn stable_hash(&self, l: PageLoc) -> Option<u32> {
            self.0.iter().find(|p| p.0 == l.page).map(|p| p.1)
        }
        fn same_content(&self, _: PageLoc, _: PageLoc) -> bool {
            true
        }
        fn matches_slot(&self, _: PageLoc, _: u8, _: u32) -> bool {
            true
        }
        fn distrusted(&self, _: PageLoc) -> bool {
            false
        }
    }

    const RULES: Rules = Rules {
        use_zero_pages: true,
        merge_across_nodes: true,
        max_page_sharing: 256,
    };

    #[test]
    fn runs_are_consecutive_pages_on_consecutive_slots() {
        let mut slots = SlotTable::new();
        let mut plan = slot_plan(
            &[
                (0, 10),
                (1, 11),
                (2, 12),
                (3, 40),
                (5, 41),
                (6, 42),
                (10, 10),
            ],
            &mut slots,
        );
        plan.assigns.push(Assign {
            loc: loc(11),
            target: Target::Zero,
        });
        let (ids, lens) = runs(&plan.assigns, &slots);
        assert_eq!(ids, [0, 0, 0, 1, 2, 2, 3, u32::MAX]);
        assert_eq!(lens, [3, 1, 2, 1]);
    }

    #[test]
    fn refused_runs_are_taken_out_before_anything_is_filled() {
        // Pages 0-2 open slots 0-2 with pages 10-12 (two runs), pages 20 and 30 open slot 5
        // (two single pages). Budget: room for two remaps only.
        let pairs = [
            (0, 0),
            (1, 1),
            (2, 2),
            (10, 0),
            (11, 1),
            (12, 2),
            (20, 5),
            (30, 5),
        ];
        let mut slots = SlotTable::new();
        let mut plan = slot_plan(&pairs, &mut slots);
        let view = Stable(pairs.to_vec());
        let mut index = ContentIndex::new();
        index.number_region(0, 0, 0, 64);
        // As the planner leaves it: the slot in place of its donor's entry.
        let key = plan::index_key(&RULES, 0, 0);
        index.insert(key, 5, Entry::Slot(5), |_| Some(5));
        let mut budget = VmaBudget::new(4, 0);
        let refused = admit_and_prune(
            &mut plan,
            &RULES,
            &mut index,
            &mut slots,
            &view,
            &mut budget,
            &mut || None,
        );
        assert_eq!(refused, 2);
        assert_eq!(plan.assigns.len(), 6);
        assert!(plan.assigns.iter().all(|a| a.target != Target::Slot(5)));
        assert_eq!(plan.new_slots.len(), 3);
        assert!(!slots.allocated(5), "the refused new slot is freed");
        assert_eq!(
            index.lookup(key, 5, |e| plan::entry_hash(&slots, &view, e), |_| true),
            [Entry::Page(loc(20))],
            "its donor is a stable page in the index again"
        );
        assert_eq!(slots.allocated_count(), 3);
        assert_eq!(budget.used(), 4);
        assert_eq!(budget.denied(), 2);
    }

    #[test]
    fn a_new_slot_is_admitted_with_all_its_runs_or_not_at_all() {
        // Slot 0's pages are in two runs; room for one remap: neither is admitted.
        let mut slots = SlotTable::new();
        let mut plan = slot_plan(&[(0, 0), (9, 0)], &mut slots);
        let mut budget = VmaBudget::new(3, 0);
        assert_eq!(
            admit(&plan, &slots, &mut budget, &mut || None),
            [false, false]
        );
        // Joining pages of an existing slot are single runs, admitted one by one.
        plan.new_slots.clear();
        let mut budget = VmaBudget::new(3, 0);
        assert_eq!(
            admit(&plan, &slots, &mut budget, &mut || None),
            [true, false]
        );
    }

    #[test]
    fn counts_again_before_refusing_on_charges_of_remaps_done() {
        // Three single-page runs onto an existing slot: six VMAs charged.
        let mut slots = SlotTable::new();
        let mut plan = slot_plan(&[(0, 0)], &mut slots);
        plan.new_slots.clear();
        for page in [10, 20, 30] {
            plan.assigns.push(Assign {
                loc: loc(page),
                target: Target::Slot(0),
            });
        }
        let mut budget = VmaBudget::new(884, 0);
        for _ in 0..440 {
            assert_eq!(budget.admit(8), Admission::Admitted);
        }
        // 880 charged for remaps done since the last count: past the limit with this plan,
        // while a count finds 500.
        let mut counts = 0;
        let keep = admit(&plan, &slots, &mut budget, &mut || {
            counts += 1;
            Some(500)
        });
        assert_eq!(keep, [true; 4]);
        assert_eq!(
            counts, 1,
            "counted once, when the charges would have refused"
        );
        assert_eq!(budget.used(), 500 + 8, "the count plus the plan's charges");
        assert_eq!(budget.denied(), 0);

        // Without a count (or with too little charged since), it refuses as before.
        let mut budget = VmaBudget::new(884, 0);
        for _ in 0..440 {
            budget.admit(8);
        }
        let keep = admit(&plan, &slots, &mut budget, &mut || None);
        assert_eq!(keep, [true, true, false, false], "room for two on charges");
        let mut budget = VmaBudget::new(10, 4);
        let mut counts = 0;
        let keep = admit(&plan, &slots, &mut budget, &mut || {
            counts += 1;
            Some(0)
        });
        assert_eq!(keep, [true, true, true, false]);
        assert_eq!(counts, 0, "nothing charged since the last count");
    }

    /// A budget of `limit` VMAs halfway through a pass after one that refused `refused`
    /// runs of class `class`.
    fn midway_after_refusals(limit: u64, class: usize, refused: u64) -> VmaBudget {
        let mut budget = VmaBudget::new(limit, 0);
        let mut last = [0; CLASSES];
        last[class] = refused;
        budget.plan_done(&last, &last);
        budget.pass_done();
        budget.set_progress(0.5);
        budget
    }

    #[test]
    fn the_rest_of_a_new_slot_is_not_left_waiting() {
        // Run 0: pages 0-2 open slots 0-2; run 1: pages 10-13 onto slots 0-3; run 2: page 20
        // opens slot 3 (its donor). Slots 0-2 admit runs 0 and 1; slot 3 is left with run 2, a
        // single page, while single pages wait for longer runs: it is admitted all the same.
        let mut slots = SlotTable::new();
        let mut plan = slot_plan(&[(0, 0), (1, 1), (2, 2), (20, 3)], &mut slots);
        for (page, slot) in [(10, 0), (11, 1), (12, 2), (13, 3)] {
            plan.assigns.push(Assign {
                loc: loc(page),
                target: Target::Slot(slot),
            });
        }
        plan.assigns.sort_by_key(|a| a.loc);
        // The last pass refused 600 runs of 2-3 pages; half of this pass is scanned.
        let mut budget = midway_after_refusals(1000, 1, 600);
        assert_eq!(admit(&plan, &slots, &mut budget, &mut || None), [true; 8]);
        assert!(budget.min_run() > 1, "single pages were waiting");
    }

    #[test]
    fn an_ask_too_big_for_the_room_keeps_no_room_for_itself() {
        // A new slot's eight runs of 32 pages need 16 VMAs; the room is 10. A run of 4 pages
        // onto existing slots fits and is admitted.
        let mut slots = SlotTable::new();
        for slot in 1000..1004 {
            assert_eq!(slots.alloc(slot, 0, 0, Some(slot)), Some(slot));
        }
        let mut pairs: Vec<(u32, u32)> = (0..8u32)
            .flat_map(|run| (0..32u32).map(move |i| (run * 100 + i, i)))
            .collect();
        pairs.extend((0..4u32).map(|i| (900 + i, 1000 + i)));
        let plan = slot_plan(&pairs, &mut slots);
        // Room for one remap: not even the donor's run and one other (see below).
        let mut budget = VmaBudget::new(3, 0);
        let keep = admit(&plan, &slots, &mut budget, &mut || None);
        assert!(keep[..256].iter().all(|&k| !k));
        assert_eq!(keep[256..], [true; 4]);
        assert_eq!(budget.used(), 2);
    }

    #[test]
    fn a_new_slot_too_big_for_the_room_is_merged_in_part() {
        // The same eight runs of 32 pages with room for five remaps: the donor's run and four
        // others; the slots' other pages stay as they are.
        let mut slots = SlotTable::new();
        let pairs: Vec<(u32, u32)> = (0..8u32)
            .flat_map(|run| (0..32u32).map(move |i| (run * 100 + i, i)))
            .collect();
        let plan = slot_plan(&pairs, &mut slots);
        let mut budget = VmaBudget::new(10, 0);
        let keep = admit(&plan, &slots, &mut budget, &mut || None);
        assert_eq!(keep.iter().filter(|&&k| k).count(), 5 * 32);
        assert!((0..32).all(|i| keep[i]), "the donors' run");
        assert_eq!(budget.used(), 10);
    }

    #[test]
    fn every_kept_new_slot_keeps_its_donor_and_a_sharer() {
        // Slots 0-63: donors on pages 0-63 (one run), sharers on pages 5000-5063. Slot 64:
        // donor page 2000, sharers 1001 (run 1000-1001, with slot 63) and 3000 (run 3000-3001,
        // with slot 65). Slots 65-72: donors on pages 4000-4007, sharers on 6000-6007. Runs of
        // 8 pages wait for longer ones: slots 65-72 wait, which refuses the run 3000-3001,
        // which refuses page 2000 after page 1001 was admitted with slot 63. Slot 64 must not
        // be kept with page 1001 alone.
        let mut slots = SlotTable::new();
        let mut pairs: Vec<(u32, u32)> = (0..64).map(|i| (i, i)).collect();
        pairs.push((2000, 64));
        pairs.extend((0..8).map(|i| (4000 + i, 65 + i)));
        pairs.extend((0..64).map(|i| (5000 + i, i)));
        pairs.extend((0..8).map(|i| (6000 + i, 65 + i)));
        pairs.extend([(1000, 63), (1001, 64), (3000, 64), (3001, 65)]);
        let plan = slot_plan(&pairs, &mut slots);
        let mut budget = midway_after_refusals(2000, 5, 1000);
        let keep = admit(&plan, &slots, &mut budget, &mut || None);
        assert!(keep.iter().any(|&k| k) && keep.iter().any(|&k| !k));
        for n in &plan.new_slots {
            let kept: Vec<PageLoc> = plan
                .assigns
                .iter()
                .zip(&keep)
                .filter(|(a, k)| **k && a.target == Target::Slot(n.slot))
                .map(|(a, _)| a.loc)
                .collect();
            assert!(
                kept.is_empty() || (kept.len() >= 2 && kept.contains(&n.donor)),
                "slot {} kept with {kept:?}, donor {:?}",
                n.slot,
                n.donor
            );
        }
    }

    #[test]
    fn a_run_ends_where_its_slots_change_pool_file() {
        // Consecutive pages on consecutive slots, but slots 510..512 and 512..514 lie in two
        // chunks (two pool files): two remaps, two runs.
        let mut slots = SlotTable::new();
        let first = CHUNK_SLOTS - 2;
        let pairs: Vec<(u32, u32)> = (0..4).map(|i| (i, first + i)).collect();
        let plan = slot_plan(&pairs, &mut slots);
        let (ids, lens) = runs(&plan.assigns, &slots);
        assert_eq!(ids, [0, 0, 1, 1]);
        assert_eq!(lens, [2, 2]);
    }

    #[test]
    fn slot_runs_group_each_new_slots_runs_in_order() {
        // The grouping the budget admits by, against the plain way (sort and deduplicate the
        // (slot number, run) pairs), on plans whose slots are numbered densely and sparsely.
        for spread in [1u32, 100_000] {
            let mut slots = SlotTable::new();
            let mut plan = Plan::default();
            // Slots 0..40 (times `spread`): donors on pages 0..40 in runs of 8, joiners on
            // pages 100.. in runs of 5 over the same slots, and a second joiner of every
            // third slot alone.
            for i in 0..40u32 {
                let slot = i * spread;
                assert_eq!(slots.alloc(slot, 0, 0, Some(slot)), Some(slot));
                plan.new_slots.push(NewSlot {
                    slot,
                    donor: loc(i),
                    node: 0,
                });
            }
            let mut assigns = Vec::new();
            for i in 0..40u32 {
                assigns.push((i + (i / 8) * 2, i * spread));
                assigns.push((200 + i + (i / 5) * 3, i * spread));
                if i % 3 == 0 {
                    assigns.push((400 + 2 * i, i * spread));
                }
            }
            assigns.sort_unstable();
            plan.assigns = assigns
                .iter()
                .map(|&(page, slot)| Assign {
                    loc: loc(page),
                    target: Target::Slot(slot),
                })
                .collect();
            plan.assigns.push(Assign {
                loc: loc(900),
                target: Target::Zero,
            });
            let (ids, _) = runs(&plan.assigns, &slots);
            let got: Vec<Vec<u32>> = SlotRuns::new(&plan, &ids, &NewSlotNumbers::new(&plan))
                .iter()
                .map(<[u32]>::to_vec)
                .collect();
            let number: HashMap<u32, u32> = plan
                .new_slots
                .iter()
                .enumerate()
                .map(|(k, n)| (n.slot, k as u32))
                .collect();
            let mut pairs: Vec<(u32, u32)> = plan
                .assigns
                .iter()
                .zip(&ids)
                .filter_map(|(a, &r)| match a.target {
                    Target::Slot(s) => number.get(&s).map(|&k| (k, r)),
                    Target::Zero => None,
                })
                .collect();
            pairs.sort_unstable();
            pairs.dedup();
            let want: Vec<Vec<u32>> = pairs
                .chunk_by(|a, b| a.0 == b.0)
                .map(|g| g.iter().map(|&(_, r)| r).collect())
                .collect();
            assert_eq!(got, want, "spread {spread}");
            assert_eq!(got.len(), 40);
            assert!(got.iter().any(|g| g.len() == 3));
            let dense = matches!(NewSlotNumbers::new(&plan), NewSlotNumbers::Dense { .. });
            assert_eq!(dense, spread == 1);
        }
    }
}
