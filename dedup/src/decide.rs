//! The planner's decisions, shard by shard: candidates are split by the index shard their hash
//! picks (`index::SHARDS`), and each shard decides its own candidates in address order, alone
//! (every entry and slot a decision reads or changes has the candidate's hash, so lives in that
//! shard). The shards run in parallel; the result does not depend on how many threads ran them.
//!
//! Slots a shard opens get provisional numbers; once every shard is done they are numbered in
//! the order of their donors, runs of consecutive donor pages on consecutive slots from a free
//! stretch of slot numbers, so that every later run of the same pages in the same order is one
//! remap. (Numbered in the order pairs were found, the donors of a run get slots scattered by
//! the order in which their partners turn up.)

use hashbrown::{HashMap, HashSet};
use rayon::prelude::*;

use crate::index::{ContentIndex, Entry, IndexKey, IndexShard, MAX_PROBE, Numbers, PageLoc};
use crate::meta::PAYLOAD_MASK;
use crate::plan::{Assign, Candidate, NewSlot, Plan, PlanView, Rules, Target, entry_hash};
use crate::slots::SlotTable;

/// Provisional numbers start above every real slot number.
const PROVISIONAL: u32 = PAYLOAD_MASK + 1;

/// A slot a shard opened.
#[derive(Clone, Copy, Debug)]
struct Opened {
    donor: PageLoc,
    hash: u32,
    node: u8,
    domain: u16,
    key: IndexKey,
}

/// What one shard decided: assigns to real or provisional slots (or the zero page never: zero
/// pages are decided before sharding), and the slots it opened.
#[derive(Debug, Default)]
struct ShardPlan {
    assigns: Vec<Assign>,
    opened: Vec<Opened>,
    /// A partner was passed over for being on another node now.
    moved: bool,
}

/// A page location as one number, in the same order.
fn loc_key(l: PageLoc) -> u64 {
    (u64::from(l.guest) << 48) | (u64::from(l.region) << 32) | u64::from(l.page)
}

/// The hash of an entry, provisional slots included.
fn hash_of(slots: &SlotTable, view: &impl PlanView, opened: &[Opened], e: Entry) -> Option<u32> {
    match e {
        Entry::Slot(s) if s >= PROVISIONAL => {
            opened.get((s - PROVISIONAL) as usize).map(|o| o.hash)
        }
        e => entry_hash(slots, view, e),
    }
}

/// Decides the candidates `which` (indices into `cands`, in address order) of one shard.
#[allow(clippy::too_many_arguments)]
fn decide_shard(
    shard: &mut IndexShard,
    nums: Numbers<'_>,
    cands: &[Candidate],
    which: &[u32],
    rules: &Rules,
    slots: &SlotTable,
    view: &impl PlanView,
) -> ShardPlan {
    let mut out = ShardPlan::default();
    let mut pending: HashMap<u32, u32> = HashMap::with_capacity(which.len() / 2);
    let mut assigned: HashSet<PageLoc> = HashSet::with_capacity(which.len());
    let mut entries: Vec<Entry> = Vec::with_capacity(MAX_PROBE);
    let max = u32::from(rules.max_page_sharing.max(2));
    for &i in which {
        let c = cands[i as usize];
        if assigned.contains(&c.loc) {
            continue;
        }
        let key = crate::plan::index_key(rules, c.domain, c.node);
        let refs = |s: u32| {
            if s >= PROVISIONAL {
                0
            } else {
                u32::from(slots.refs(s))
            }
        };
        let has_room = |s: u32| refs(s) + pending.get(&s).copied().unwrap_or(0) < max;
        let usable = |e: Entry| match e {
            Entry::Slot(s) => has_room(s),
            Entry::Page(_) => true,
        };
        let opened = &out.opened;
        shard.lookup_into(
            nums,
            key,
            c.hash,
            |e| hash_of(slots, view, opened, e),
            usable,
            &mut entries,
        );
        // With one entry the hash decides (the guarded comparison catches a collision); with
        // several, compare now to pick the right one.
        let several = entries.len() > 1 || view.distrusted(c.loc);
        let same_as_slot = |s: u32| {
            !several
                || if s >= PROVISIONAL {
                    opened
                        .get((s - PROVISIONAL) as usize)
                        .is_some_and(|o| view.same_content(o.donor, c.loc))
                } else {
                    view.matches_slot(c.loc, slots.node(s), s)
                }
        };
        let open = entries.iter().find_map(|&e| match e {
            Entry::Slot(s) if has_room(s) && same_as_slot(s) => Some(s),
            _ => None,
        });
        if let Some(s) = open {
            *pending.entry(s).or_insert(0) += 1;
            out.assigns.push(Assign {
                loc: c.loc,
                target: Target::Slot(s),
            });
            assigned.insert(c.loc);
            continue;
        }
        // A lone partner with the same hash is trusted (a collision only costs a slot with one
        // sharer, and makes the candidate distrusted); with several, or a distrusted candidate,
        // the bytes are compared first.
        let mut moved = false;
        let partner = entries.iter().find_map(|&e| match e {
            Entry::Page(p)
                if p != c.loc
                    && !assigned.contains(&p)
                    && (!several || view.same_content(p, c.loc)) =>
            {
                // Its entry is under the node it was on when indexed.
                let here = rules.merge_across_nodes || view.on_node(p, c.node);
                moved |= !here;
                here.then_some(p)
            }
            _ => None,
        });
        out.moved |= moved;
        if let Some(p) = partner {
            let s = PROVISIONAL + out.opened.len() as u32;
            out.opened.push(Opened {
                donor: p,
                hash: c.hash,
                node: c.node,
                domain: c.domain,
                key,
            });
            for loc in [p, c.loc] {
                out.assigns.push(Assign {
                    loc,
                    target: Target::Slot(s),
                });
                assigned.insert(loc);
            }
            pending.insert(s, 2);
            let opened = &out.opened;
            shard.replace(nums, key, c.hash, Entry::Page(p), Entry::Slot(s), |e| {
                hash_of(slots, view, opened, e)
            });
            continue;
        }
        if !entries.contains(&Entry::Page(c.loc)) {
            let opened = &out.opened;
            shard.insert(nums, key, c.hash, Entry::Page(c.loc), |e| {
                hash_of(slots, view, opened, e)
            });
        }
    }
    out
}

/// Numbers the opened slots of every shard in donor order: each run of consecutive donor pages
/// (one region, one node) gets consecutive slots. Returns, per shard, the real slot of each
/// opened one (`None` when slot numbers ran out).
fn number_slots(
    parts: &[ShardPlan],
    slots: &mut SlotTable,
    threads: Option<&rayon::ThreadPool>,
) -> Vec<Vec<Option<u32>>> {
    let mut order: Vec<(u64, u32, u32)> = parts
        .iter()
        .enumerate()
        .flat_map(|(si, p)| {
            p.opened
                .iter()
                .enumerate()
                .map(move |(k, o)| (loc_key(o.donor), si as u32, k as u32))
        })
        .collect();
    match threads {
        Some(pool) => pool.install(|| order.par_sort_unstable()),
        None => order.sort_unstable(),
    }
    let order: Vec<(PageLoc, usize, usize)> = order
        .into_iter()
        .map(|(_, si, k)| {
            (
                parts[si as usize].opened[k as usize].donor,
                si as usize,
                k as usize,
            )
        })
        .collect();
    let mut real: Vec<Vec<Option<u32>>> =
        parts.iter().map(|p| vec![None; p.opened.len()]).collect();
    let mut i = 0;
    while i < order.len() {
        let first = parts[order[i].1].opened[order[i].2];
        let mut j = i + 1;
        while j < order.len() {
            let (prev, next) = (order[j - 1].0, order[j].0);
            let o = parts[order[j].1].opened[order[j].2];
            if next.guest != prev.guest
                || next.region != prev.region
                || next.page != prev.page + 1
                || o.node != first.node
            {
                break;
            }
            j += 1;
        }
        let mut prefer = slots.free_stretch((j - i) as u32);
        for &(_, si, k) in &order[i..j] {
            let o = parts[si].opened[k];
            let s = slots.alloc(o.hash, o.node, o.domain, prefer);
            real[si][k] = s;
            prefer = s.map(|s| s + 1);
        }
        i = j;
    }
    real
}

/// Replaces a shard's provisional slot entries by the real ones (or by the donor page again
/// where no slot number was left), and its provisional assigns; drops the assigns of slots that
/// got no number.
fn settle_shard(
    shard: &mut IndexShard,
    nums: Numbers<'_>,
    part: &mut ShardPlan,
    real: &[Option<u32>],
    slots: &SlotTable,
    view: &impl PlanView,
) {
    // Entries already replaced are real slots (known to `slots`); the others are still
    // provisional and known by `opened`.
    for (k, o) in part.opened.iter().enumerate() {
        let new = real[k].map_or(Entry::Page(o.donor), Entry::Slot);
        let opened = &part.opened;
        shard.replace(
            nums,
            o.key,
            o.hash,
            Entry::Slot(PROVISIONAL + k as u32),
            new,
            |e| hash_of(slots, view, opened, e),
        );
    }
    part.assigns.retain_mut(|a| match a.target {
        Target::Slot(s) if s >= PROVISIONAL => match real[(s - PROVISIONAL) as usize] {
            Some(r) => {
                a.target = Target::Slot(r);
                true
            }
            None => false,
        },
        _ => true,
    });
}

/// Decides the merges of `cands` (in address order): zero pages first, then every shard's
/// candidates (in parallel on `threads` when given), then the new slots are numbered in donor
/// order. The index and the slot table are updated.
pub(crate) fn decide(
    cands: &[Candidate],
    rules: &Rules,
    index: &mut ContentIndex,
    slots: &mut SlotTable,
    view: &(impl PlanView + Sync),
    threads: Option<&rayon::ThreadPool>,
) -> Plan {
    let mut out = Plan::default();
    let mut which: Vec<Vec<u32>> = vec![Vec::new(); crate::index::SHARDS];
    for (i, c) in cands.iter().enumerate() {
        if c.zero && rules.use_zero_pages {
            out.assigns.push(Assign {
                loc: c.loc,
                target: Target::Zero,
            });
        } else {
            which[crate::index::shard_of(c.hash)].push(i as u32);
        }
    }
    let (nums, shards) = index.shards_mut();
    let frozen: &SlotTable = slots;
    let run = |(shard, w): (&mut IndexShard, &Vec<u32>)| {
        if w.is_empty() {
            ShardPlan::default()
        } else {
            decide_shard(shard, nums, cands, w, rules, frozen, view)
        }
    };
    let mut parts: Vec<ShardPlan> = match threads {
        Some(pool) => pool.install(|| shards.par_iter_mut().zip(&which).map(run).collect()),
        None => shards.iter_mut().zip(&which).map(run).collect(),
    };
    let real = number_slots(&parts, slots, threads);
    let (nums, shards) = index.shards_mut();
    let frozen: &SlotTable = slots;
    let settle = |((shard, part), real): ((&mut IndexShard, &mut ShardPlan), &Vec<Option<u32>>)| {
        if !part.opened.is_empty() {
            settle_shard(shard, nums, part, real, frozen, view);
        }
    };
    match threads {
        Some(pool) => pool.install(|| {
            shards
                .par_iter_mut()
                .zip(&mut parts)
                .zip(&real)
                .for_each(settle);
        }),
        None => shards
            .iter_mut()
            .zip(&mut parts)
            .zip(&real)
            .for_each(settle),
    }
    for (part, real) in parts.into_iter().zip(&real) {
        for (o, r) in part.opened.iter().zip(real) {
            if let Some(slot) = *r {
                out.new_slots.push(NewSlot {
                    slot,
                    donor: o.donor,
                    node: o.node,
                });
            }
        }
        out.assigns.extend(part.assigns);
        out.moved |= part.moved;
    }
    match threads {
        Some(pool) => pool.install(|| {
            rayon::join(
                || out.new_slots.par_sort_unstable_by_key(|n| n.slot),
                || out.assigns.par_sort_unstable_by_key(|a| loc_key(a.loc)),
            );
        }),
        None => {
            out.new_slots.sort_unstable_by_key(|n| n.slot);
            out.assigns.sort_unstable_by_key(|a| loc_key(a.loc));
        }
    }
    out
}
