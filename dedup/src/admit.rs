//! What of a step's plan goes on to the commit, pure: the VMA budget admits planned runs (or
//! refuses them) before any pool slot is filled or any page is write-protected, and the work
//! that a backed-off failure would refuse is left out. What is refused or left out is taken out
//! of the plan, and the new slots nobody is left to map are freed (they were never filled), so
//! the commit only attempts what it may do.

use hashbrown::HashMap;

use crate::budget::{Admission, VmaBudget};
use crate::index::{ContentIndex, Entry};
use crate::plan::{self, Assign, Plan, PlanView, Rules, Target};
use crate::slots::SlotTable;

/// Run number of each planned merge (`u32::MAX` for zero pages), and the length of each run.
/// A run is a maximal sequence of consecutive pages of one region mapped to consecutive slots
/// of one node: one remap. `assigns` must be sorted by page (as plans are).
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
                && matches!(p.target, Target::Slot(ps) if ps + 1 == s)
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
/// partner ran out of budget; zero pages cost no VMA. Refusals are counted by the budget.
/// Before a refusal that a new count could lift, `recount` is asked for the VMAs inside guest
/// memory now (`None`: no count, refuse).
pub fn admit(
    plan: &Plan,
    slots: &SlotTable,
    budget: &mut VmaBudget,
    recount: &mut dyn FnMut() -> Option<u64>,
) -> Vec<bool> {
    budget.begin_plan();
    let mut ask = |budget: &mut VmaBudget, lens: &[usize]| {
        if budget.check(lens) != Admission::Admitted && budget.recount_due() {
            if let Some(counted) = recount() {
                budget.recounted(counted);
            }
        }
        budget.admit_all(lens) == Admission::Admitted
    };
    let (ids, lens) = runs(&plan.assigns, slots);
    // The runs holding each new slot's pages: (new slot's number in the plan, run), sorted.
    let new: HashMap<u32, u32> = plan
        .new_slots
        .iter()
        .enumerate()
        .map(|(k, n)| (n.slot, k as u32))
        .collect();
    let mut slot_runs: Vec<(u32, u32)> = plan
        .assigns
        .iter()
        .zip(&ids)
        .filter_map(|(a, &r)| match a.target {
            Target::Slot(s) => new.get(&s).map(|&k| (k, r)),
            Target::Zero => None,
        })
        .collect();
    slot_runs.sort_unstable();
    slot_runs.dedup();
    let mut state: Vec<Option<bool>> = vec![None; lens.len()];
    let (mut need, mut need_lens): (Vec<u32>, Vec<usize>) = (Vec::new(), Vec::new());
    for group in slot_runs.chunk_by(|a, b| a.0 == b.0) {
        let refused = group.iter().any(|&(_, r)| state[r as usize] == Some(false));
        need.clear();
        need.extend(
            group
                .iter()
                .map(|&(_, r)| r)
                .filter(|&r| state[r as usize].is_none()),
        );
        let ok = if refused {
            budget.refuse(need.len() as u64);
            false
        } else {
            need_lens.clear();
            need_lens.extend(need.iter().map(|&r| lens[r as usize]));
            ask(budget, &need_lens)
        };
        for &r in &need {
            state[r as usize] = Some(ok);
        }
    }
    for (r, st) in state.iter_mut().enumerate() {
        if st.is_none() {
            *st = Some(ask(budget, &lens[r..=r]));
        }
    }
    ids.iter()
        .map(|&r| r == u32::MAX || state[r as usize] == Some(true))
        .collect()
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
        let mut budget = VmaBudget::new(1000, 0);
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
        let mut budget = VmaBudget::new(1000, 0);
        for _ in 0..440 {
            budget.admit(8);
        }
        let keep = admit(&plan, &slots, &mut budget, &mut || None);
        assert_eq!(keep, [false; 4], "tight on charges: single pages refused");
        let mut budget = VmaBudget::new(10, 4);
        let mut counts = 0;
        let keep = admit(&plan, &slots, &mut budget, &mut || {
            counts += 1;
            Some(0)
        });
        assert_eq!(keep, [true, true, true, false]);
        assert_eq!(counts, 0, "nothing charged since the last count");
    }
}
