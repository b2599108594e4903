//! Merge decisions, pure: which stable pages go to which pool slot (existing or new) or to the
//! zero page, and what to do with the slots once the commit has said which merges happened.
//! The commit itself (write-protect, compare, remap) lives in `merge`; the reference model that
//! these decisions are checked against lives in `model`.

use crate::index::{ANY_NODE, ContentIndex, Entry, IndexKey, PageLoc};
use crate::slots::SlotTable;

/// A stable private page offered for merging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Where the page is.
    pub loc: PageLoc,
    /// 28-bit content hash.
    pub hash: u32,
    /// Trust domain of its guest.
    pub domain: u16,
    /// Host NUMA node of the page.
    pub node: u8,
    /// The page is all zeros (checked byte by byte, not from the hash).
    pub zero: bool,
}

/// Where a page is to be merged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Dropped to the host zero page.
    Zero,
    /// Mapped to a pool slot.
    Slot(u32),
}

/// One planned merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assign {
    /// The page.
    pub loc: PageLoc,
    /// Its target.
    pub target: Target,
}

/// A slot to fill from a donor page before the commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewSlot {
    /// The slot.
    pub slot: u32,
    /// The page whose content fills it (compared again under the guard like every other page).
    pub donor: PageLoc,
    /// Node whose pool holds it.
    pub node: u8,
}

/// The decisions of one step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Slots to fill first.
    pub new_slots: Vec<NewSlot>,
    /// Merges to attempt.
    pub assigns: Vec<Assign>,
    /// A partner page was passed over for being on another node than its index entry says
    /// (`merge_across_nodes` off): the index needs rebuilding from a full pass.
    pub moved: bool,
}

/// The knobs that change merge decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// Zero pages go to the host zero page (no slot, no VMA), in any domain.
    pub use_zero_pages: bool,
    /// Pages on different nodes may share a slot.
    pub merge_across_nodes: bool,
    /// Most pages mapped to one slot.
    pub max_page_sharing: u16,
}

/// What the planner needs to know about pages beyond the candidates.
pub trait PlanView {
    /// The 28-bit hash of a page if it is still a stable, unmerged page.
    fn stable_hash(&self, loc: PageLoc) -> Option<u32>;
    /// Unguarded byte comparison of two pages, to avoid opening a slot for a hash collision
    /// when several entries share a hash or the candidate is distrusted.
    fn same_content(&self, a: PageLoc, b: PageLoc) -> bool;
    /// Unguarded comparison of a page with a filled slot (in the pool of `node`), used only
    /// when several entries share a hash, to pick the right one.
    fn matches_slot(&self, loc: PageLoc, node: u8, slot: u32) -> bool;
    /// Whether a merge of this page was refused for differing bytes before: its hash is not
    /// trusted alone any more (a collision), so it is compared before being planned.
    fn distrusted(&self, loc: PageLoc) -> bool;
    /// Whether the page is on host node `node` now. Asked, with `merge_across_nodes` off, of
    /// a partner page indexed earlier, which the kernel may have moved to another node since.
    fn on_node(&self, loc: PageLoc, node: u8) -> bool {
        let _ = (loc, node);
        true
    }
}

/// The index table a slot or page of `domain` on `node` belongs to.
pub fn index_key(rules: &Rules, domain: u16, node: u8) -> IndexKey {
    IndexKey {
        domain,
        node: if rules.merge_across_nodes {
            ANY_NODE
        } else {
            node
        },
    }
}

/// The hash of an index entry, `None` when the entry is stale.
pub fn entry_hash(slots: &SlotTable, view: &impl PlanView, e: Entry) -> Option<u32> {
    match e {
        Entry::Slot(s) => slots.allocated(s).then(|| slots.hash(s)),
        Entry::Page(l) => view.stable_hash(l),
    }
}

/// Decides the merges of `cands` (in address order), updating the index and allocating slots:
/// zero pages go to the zero page; a page whose content has a slot with room joins it; a page
/// with a stable partner opens a slot with it (the partner is the donor); others are entered in
/// the index. The new slots are numbered in donor order, runs of consecutive donors on
/// consecutive slots (see `decide`).
pub fn plan(
    cands: &[Candidate],
    rules: &Rules,
    index: &mut ContentIndex,
    slots: &mut SlotTable,
    view: &(impl PlanView + Sync),
) -> Plan {
    crate::decide::decide(cands, rules, index, slots, view, None)
}

/// [`plan`], the index's shards decided in parallel on `threads`: the same plan.
pub fn plan_parallel(
    cands: &[Candidate],
    rules: &Rules,
    index: &mut ContentIndex,
    slots: &mut SlotTable,
    view: &(impl PlanView + Sync),
    threads: &rayon::ThreadPool,
) -> Plan {
    crate::decide::decide(cands, rules, index, slots, view, Some(threads))
}

/// Applies the commit's results: `merged[i]` tells whether `plan.assigns[i]` happened. Adds the
/// references and returns the plan's new slots that nobody maps (to punch, then [`release`]).
pub fn settle(plan: &Plan, merged: &[bool], slots: &mut SlotTable) -> Vec<u32> {
    for (a, &ok) in plan.assigns.iter().zip(merged) {
        if let (Target::Slot(s), true) = (a.target, ok) {
            slots.inc(s);
        }
    }
    plan.new_slots
        .iter()
        .map(|n| n.slot)
        .filter(|&s| slots.refs(s) == 0)
        .collect()
}

/// Forgets a slot whose pool page has been punched (or was never mapped).
pub fn release(slot: u32, rules: &Rules, index: &mut ContentIndex, slots: &mut SlotTable) {
    if !slots.allocated(slot) {
        return;
    }
    let key = index_key(rules, slots.domain(slot), slots.node(slot));
    index.remove(key, slots.hash(slot), Entry::Slot(slot));
    slots.free(slot);
}

#[cfg(test)]
mod tests {
    use super::*;

    struct View(Vec<(u32, u64)>);
    impl PlanView for View {
        fn stable_hash(&self, loc: PageLoc) -> Option<u32> {
            self.0.get(loc.page as usize).map(|p| p.0)
        }
        fn same_content(&self, a: PageLoc, b: PageLoc) -> bool {
            self.0[a.page as usize].1 == self.0[b.page as usize].1
        }
        fn matches_slot(&self, _loc: PageLoc, _node: u8, _slot: u32) -> bool {
            false
        }
        fn distrusted(&self, _loc: PageLoc) -> bool {
            false
        }
    }

    fn loc(page: u32) -> PageLoc {
        PageLoc {
            guest: 0,
            region: 0,
            page,
        }
    }

    fn cand(page: u32, hash: u32) -> Candidate {
        Candidate {
            loc: loc(page),
            hash,
            domain: 0,
            node: 0,
            zero: false,
        }
    }

    const RULES: Rules = Rules {
        use_zero_pages: true,
        merge_across_nodes: true,
        max_page_sharing: 256,
    };

    fn index() -> ContentIndex {
        let mut idx = ContentIndex::new();
        idx.number_region(0, 0, 0, 64);
        idx
    }

    #[test]
    fn pairs_open_one_slot_and_later_pages_join_it() {
        let view = View(vec![(1, 10), (2, 20), (1, 10), (1, 10)]);
        let (mut idx, mut slots) = (index(), SlotTable::new());
        let cands: Vec<_> = (0..4).map(|p| cand(p, view.0[p as usize].0)).collect();
        let plan = plan(&cands, &RULES, &mut idx, &mut slots, &view);
        assert_eq!(plan.new_slots.len(), 1);
        let targets: Vec<_> = plan
            .assigns
            .iter()
            .map(|a| (a.loc.page, a.target))
            .collect();
        assert_eq!(
            targets,
            vec![
                (0, Target::Slot(0)),
                (2, Target::Slot(0)),
                (3, Target::Slot(0))
            ]
        );
        let unref = settle(&plan, &[true, true, false], &mut slots);
        assert!(unref.is_empty());
        assert_eq!(slots.refs(0), 2);
    }

    #[test]
    fn hash_collision_with_different_bytes_opens_no_slot_once_distrusted() {
        struct Distrust(View);
        impl PlanView for Distrust {
            fn stable_hash(&self, loc: PageLoc) -> Option<u32> {
                self.0.stable_hash(loc)
            }
            fn same_content(&self, a: PageLoc, b: PageLoc) -> bool {
                self.0.same_content(a, b)
            }
            fn matches_slot(&self, loc: PageLoc, node: u8, slot: u32) -> bool {
                self.0.matches_slot(loc, node, slot)
            }
            fn distrusted(&self, _loc: PageLoc) -> bool {
                true
            }
        }
        let pages = vec![(7, 1), (7, 2)];
        // Trusted: the hash decides, the guarded comparison will refuse the second page.
        let (mut idx, mut slots) = (index(), SlotTable::new());
        let p = plan(
            &[cand(0, 7), cand(1, 7)],
            &RULES,
            &mut idx,
            &mut slots,
            &View(pages.clone()),
        );
        assert_eq!(p.new_slots.len(), 1);
        // Distrusted: the bytes are compared first.
        let (mut idx, mut slots) = (index(), SlotTable::new());
        let view = Distrust(View(pages));
        let p = plan(
            &[cand(0, 7), cand(1, 7)],
            &RULES,
            &mut idx,
            &mut slots,
            &view,
        );
        assert!(p.assigns.is_empty());
        assert_eq!(slots.allocated_count(), 0);
    }

    #[test]
    fn shards_decided_in_parallel_give_the_same_plan() {
        // Pages with few hashes (some colliding with different content), three domains, a
        // small sharing limit, planned step by step so that later steps see earlier slots and
        // pages, and so that some hashes have more entries than a lookup returns.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let pages: Vec<(u32, u64)> = (0..4000)
            .map(|_| {
                let r = next();
                let hash = (r % 150) as u32;
                let content = u64::from(hash) * 10 + (r >> 32) % 3;
                (hash, content)
            })
            .collect();
        let view = View(pages.clone());
        let rules = Rules {
            max_page_sharing: 3,
            ..RULES
        };
        let fresh = || {
            let mut idx = ContentIndex::new();
            idx.number_region(0, 0, 0, 4000);
            (idx, SlotTable::new())
        };
        let (mut idx_a, mut slots_a) = fresh();
        let (mut idx_b, mut slots_b) = fresh();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        let mut total = 0;
        for step in pages.chunks(500).enumerate() {
            let (n, chunk) = step;
            let cands: Vec<Candidate> = (0..chunk.len())
                .map(|i| {
                    let page = (n * 500 + i) as u32;
                    let mut c = cand(page, pages[page as usize].0);
                    c.domain = (page % 3) as u16;
                    c.zero = pages[page as usize].0 == 0;
                    c
                })
                .collect();
            let a = plan(&cands, &rules, &mut idx_a, &mut slots_a, &view);
            let b = plan_parallel(&cands, &rules, &mut idx_b, &mut slots_b, &view, &pool);
            assert_eq!(a, b, "step {n}");
            let merged = vec![true; a.assigns.len()];
            settle(&a, &merged, &mut slots_a);
            settle(&b, &merged, &mut slots_b);
            total += a.assigns.len();
        }
        assert!(total > 2000, "{total} merges planned");
    }

    #[test]
    fn max_page_sharing_opens_a_second_slot() {
        let view = View(vec![(4, 9); 5]);
        let rules = Rules {
            max_page_sharing: 2,
            ..RULES
        };
        let (mut idx, mut slots) = (index(), SlotTable::new());
        let cands: Vec<_> = (0..5).map(|p| cand(p, 4)).collect();
        let plan = plan(&cands, &rules, &mut idx, &mut slots, &view);
        assert_eq!(plan.new_slots.len(), 2);
        assert_eq!(plan.assigns.len(), 4);
    }

    #[test]
    fn zero_pages_and_domains() {
        let view = View(vec![(5, 0), (5, 0), (6, 3), (6, 3)]);
        let (mut idx, mut slots) = (index(), SlotTable::new());
        let mut cands = vec![cand(0, 5), cand(1, 5), cand(2, 6), cand(3, 6)];
        cands[0].zero = true;
        cands[1].zero = true;
        cands[3].domain = 1;
        let plan = plan(&cands, &RULES, &mut idx, &mut slots, &view);
        assert_eq!(plan.assigns.len(), 2);
        assert!(plan.assigns.iter().all(|a| a.target == Target::Zero));
        let no_zero = Rules {
            use_zero_pages: false,
            ..RULES
        };
        let (mut idx, mut slots) = (index(), SlotTable::new());
        let plan = super::plan(&cands, &no_zero, &mut idx, &mut slots, &view);
        assert_eq!(plan.new_slots.len(), 1);
        assert_eq!(plan.assigns.len(), 2);
    }

    #[test]
    fn consecutive_donors_get_consecutive_slots_and_failed_slots_are_released() {
        let view = View((0..8).map(|p| (p % 4, u64::from(p % 4))).collect());
        let (mut idx, mut slots) = (index(), SlotTable::new());
        let cands: Vec<_> = (0..8).map(|p| cand(p, p % 4)).collect();
        let plan = plan(&cands, &RULES, &mut idx, &mut slots, &view);
        let new: Vec<u32> = plan.new_slots.iter().map(|n| n.slot).collect();
        assert_eq!(new, vec![0, 1, 2, 3]);
        let merged = vec![false; plan.assigns.len()];
        let unref = settle(&plan, &merged, &mut slots);
        assert_eq!(unref, new);
        for s in unref {
            release(s, &RULES, &mut idx, &mut slots);
        }
        assert_eq!(slots.allocated_count(), 0);
        assert!(
            idx.lookup(index_key(&RULES, 0, 0), 1, |_| Some(1), |_| true)
                .is_empty()
        );
    }
}
