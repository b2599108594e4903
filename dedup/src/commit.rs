//! Committing a step's plan. Each region's planned merges are cut into work units (page ranges
//! that never split a planned run), committed in parallel on the region's userfaultfd, so that
//! one large guest uses every worker thread. Two phases:
//!
//! 1. the donors of new pool slots (each fills its slot while write-protected: the copy equals
//!    the page, so it needs no comparison), the pages joining slots filled in earlier steps, and
//!    the zero pages;
//! 2. the pages joining the slots filled in phase 1 (compared with them under the guard).
//!
//! The plan was admitted against the VMA budget before (`admit`): every planned run's first remap
//! is paid for; a run split by a page that differed pays for its extra remaps here.

use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, PoisonError};

use hashbrown::{HashMap, HashSet};
use rayon::prelude::*;

use crate::backoff::{Tally, Trouble};
use crate::budget::VmaBudget;
use crate::guest::Guest;
use crate::index::PageLoc;
use crate::merge::{Cause, Committer, Item, Outcome, Ranges, RegionGuard, Repairs, add_range};
use crate::plan::{self, Plan, Target};
use crate::pool::Pools;
use crate::slots::SlotTable;
use crate::step::StepCtx;
use crate::sys::PAGE_SIZE;
use crate::sys::procfs::thread_cpu_ns;

/// Items per work unit (more where a planned run would be cut).
const UNIT_ITEMS: usize = 1024;

/// What committing a plan did.
#[derive(Debug, Default)]
pub(crate) struct CommitOut {
    /// One outcome per planned merge (`plan.assigns`).
    pub outcomes: Vec<Outcome>,
    /// Per planned merge: a writer hit the page while it was guarded.
    pub written: Vec<bool>,
    /// Guard repairs.
    pub repairs: Repairs,
    /// Host addresses of regions whose userfaultfd must be replaced.
    pub resets: Vec<usize>,
    /// Time spent filling pool slots, summed over threads.
    pub fill_ns: u64,
    /// CPU time of the worker threads.
    pub cpu_ns: u64,
    /// Pool slot fills that failed.
    pub pool_errors: u64,
    /// Remaps made.
    pub remaps: u64,
    /// New slots filled.
    pub filled: HashSet<u32>,
    /// Failures by kind, with the first error of each.
    pub tally: Tally,
}

/// A region's share of the plan.
struct RegionWork<'a> {
    /// Index into the plan's region groups.
    group: usize,
    hva: usize,
    gpa: u64,
    uffd: &'a crate::sys::uffd::Uffd,
    attrs: crate::sys::attrs::Attrs,
    exclusion: Option<&'a dyn crate::hooks::ExclusionSource>,
    items: Vec<Item>,
    /// Index into `plan.assigns` of each item.
    index_of: Vec<usize>,
    /// Whether each item joins a slot filled in phase 1.
    late: Vec<bool>,
    /// First item of each unit.
    units: Vec<usize>,
    pages: usize,
}

/// One unit's items of one phase, and what happened to them.
struct UnitWork<'a> {
    region: usize,
    guard: RegionGuard<'a>,
    exclusion: Option<&'a dyn crate::hooks::ExclusionSource>,
    items: Vec<Item>,
    index_of: Vec<usize>,
}

/// Commits `plan` (its new slots already exist in the pools, except `failed_slots`).
pub(crate) fn commit_plan(
    guests: &mut [Option<Guest>],
    pools: &Pools,
    budget: &Mutex<VmaBudget>,
    slots: &SlotTable,
    plan: &Plan,
    failed_slots: &HashSet<u32>,
    ctx: &StepCtx<'_>,
) -> CommitOut {
    let n = plan.assigns.len();
    let mut out = CommitOut {
        outcomes: vec![Outcome::Refused(Cause::Pool); n],
        written: vec![false; n],
        ..CommitOut::default()
    };
    let donors: HashMap<PageLoc, u32> = plan.new_slots.iter().map(|s| (s.donor, s.slot)).collect();
    let new: HashSet<u32> = plan.new_slots.iter().map(|s| s.slot).collect();
    let groups = group_assigns(&plan.assigns);
    let (run_ids, _) = crate::admit::runs(&plan.assigns, slots);

    // Take each region's unregistered ranges out, to hand them to its units.
    let mut taken: Vec<Option<Ranges>> = groups
        .iter()
        .map(|&(gi, ri, _, _)| {
            guests
                .get_mut(gi)
                .and_then(Option::as_mut)
                .and_then(|g| g.regions.get_mut(ri))
                .map(|r| std::mem::take(&mut r.unregistered))
        })
        .collect();

    let mut regions: Vec<RegionWork<'_>> = Vec::new();
    let mut maps: Vec<Vec<Ranges>> = Vec::new();
    for (gk, &(gi, ri, from, to)) in groups.iter().enumerate() {
        let Some(g) = guests.get(gi).and_then(Option::as_ref) else {
            continue;
        };
        let Some(r) = g.regions.get(ri) else { continue };
        let Some(uffd) = r.uffd.as_ref() else {
            continue;
        };
        let mut w = RegionWork {
            group: gk,
            hva: r.hva,
            gpa: r.gpa,
            uffd,
            attrs: r.attrs,
            exclusion: g.exclusion.as_deref(),
            items: Vec::with_capacity(to - from),
            index_of: Vec::with_capacity(to - from),
            late: Vec::with_capacity(to - from),
            units: Vec::new(),
            pages: r.pages,
        };
        for (k, a) in plan.assigns[from..to].iter().enumerate() {
            let (node, fill, late) = match a.target {
                Target::Slot(s) if failed_slots.contains(&s) => continue,
                Target::Slot(s) => {
                    let fill = donors.get(&a.loc) == Some(&s);
                    (slots.node(s), fill, new.contains(&s) && !fill)
                }
                Target::Zero => (0, false, false),
            };
            let run = run_ids[from + k];
            w.items.push(Item {
                page: a.loc.page,
                target: a.target,
                node,
                run,
                // Runs never cross regions, so a group's first page starts one.
                first_of_run: k == 0 || run_ids[from + k - 1] != run,
                admitted: true,
                fill,
            });
            w.index_of.push(from + k);
            w.late.push(late);
        }
        if w.items.is_empty() {
            // Nothing to commit here (every slot it needed failed to grow): its unregistered
            // ranges stay in `taken` and go back to it unchanged.
            continue;
        }
        regions.push(w);
    }
    // Each unit's share of its region's unregistered ranges: the pages from its first item to
    // the next unit's first item (the first unit from the region's start, the last to its end).
    for w in &mut regions {
        w.units = cut_units(&w.items, UNIT_ITEMS);
        let mut bounds: Vec<usize> = w
            .units
            .iter()
            .map(|&u| w.hva + w.items[u].page as usize * PAGE_SIZE)
            .collect();
        if let Some(b) = bounds.first_mut() {
            *b = w.hva;
        }
        bounds.push(w.hva + w.pages * PAGE_SIZE);
        let all = taken[w.group].take().unwrap_or_default();
        maps.push(split_ranges(all, &bounds));
    }

    let mut faulted: Vec<Vec<usize>> = vec![Vec::new(); regions.len()];
    let mut filled: HashSet<u32> = HashSet::new();
    let vma_limit_hit = AtomicBool::new(false);
    for phase in 0..2 {
        if phase == 1 {
            // A donor left out (excluded, or outside the guard) leaves its slot empty: fill it
            // from the first page joining it instead, unguarded; every joining page is compared
            // under its own guard, as always.
            fill_from_partners(&regions, &mut filled, pools, ctx, &mut out);
        }
        let mut units: Vec<UnitWork<'_>> = Vec::new();
        let mut map_iters: Vec<std::vec::IntoIter<Ranges>> = std::mem::take(&mut maps)
            .into_iter()
            .map(Vec::into_iter)
            .collect();
        for (wi, w) in regions.iter().enumerate() {
            for (ui, &start) in w.units.iter().enumerate() {
                let end = w.units.get(ui + 1).copied().unwrap_or(w.items.len());
                let mut u = UnitWork {
                    region: wi,
                    guard: RegionGuard {
                        hva: w.hva,
                        gpa: w.gpa,
                        uffd: w.uffd,
                        unregistered: map_iters[wi].next().unwrap_or_default(),
                        attrs: w.attrs,
                    },
                    exclusion: w.exclusion,
                    items: Vec::new(),
                    index_of: Vec::new(),
                };
                for k in start..end {
                    if w.late[k] != (phase == 1) {
                        continue;
                    }
                    let it = w.items[k];
                    if phase == 1 {
                        let ok = matches!(it.target, Target::Slot(s) if filled.contains(&s));
                        if !ok {
                            out.outcomes[w.index_of[k]] = Outcome::Refused(if it.admitted {
                                Cause::Pool
                            } else {
                                Cause::VmaBudget
                            });
                            continue;
                        }
                    }
                    u.items.push(it);
                    u.index_of.push(w.index_of[k]);
                }
                units.push(u);
            }
        }
        // Every remap takes the address space's lock for writing: units are committed by at
        // most `committers` threads at a time, each taking the next unit as it gets free (units
        // differ in cost: a fixed share each would leave threads idle).
        let commit_unit = |u: &mut UnitWork<'_>| {
            let cpu = thread_cpu_ns();
            let committer = Committer {
                pools,
                faults: ctx.faults,
                budget,
                exclusion: u.exclusion,
                batch_pages: ctx.batch_pages,
                vma_limit_hit: &vma_limit_hit,
            };
            let rep = if u.items.is_empty() {
                crate::merge::RegionReport::default()
            } else {
                committer.commit(&mut u.guard, &u.items)
            };
            (rep, thread_cpu_ns().saturating_sub(cpu))
        };
        let committers = ctx.committers.clamp(1, units.len().max(1));
        let queue = Mutex::new(units.iter_mut().enumerate());
        let mut done: Vec<_> = ctx.threads.install(|| {
            (0..committers)
                .into_par_iter()
                .flat_map_iter(|_| {
                    let mut mine = Vec::new();
                    loop {
                        let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
                        let Some((i, u)) = next else { break };
                        mine.push((i, commit_unit(u)));
                    }
                    mine
                })
                .collect()
        });
        done.sort_unstable_by_key(|&(i, _)| i);
        let reports = done.into_iter().map(|(_, r)| r);
        let mut back: Vec<Vec<Ranges>> = (0..regions.len()).map(|_| Vec::new()).collect();
        for ((rep, cpu), u) in reports.zip(units) {
            out.cpu_ns += cpu;
            out.fill_ns += rep.fill_ns;
            out.pool_errors += rep.pool_errors;
            out.remaps += rep.remaps;
            if rep.reset_guard && !out.resets.contains(&u.guard.hva) {
                out.resets.push(u.guard.hva);
            }
            out.repairs.unprotect += rep.repairs.unprotect;
            out.repairs.wake += rep.repairs.wake;
            out.repairs.reregister += rep.repairs.reregister;
            out.tally.absorb(rep.tally);
            for (k, &i) in u.index_of.iter().enumerate() {
                if let Some(&o) = rep.outcomes.get(k) {
                    out.outcomes[i] = o;
                }
            }
            filled.extend(rep.filled);
            faulted[u.region].extend(rep.faulted);
            back[u.region].push(u.guard.unregistered);
        }
        maps = back;
    }

    // Give the regions their unregistered ranges back, joined.
    for (w, parts) in regions.iter().zip(maps) {
        taken[w.group] = Some(join_ranges(parts));
    }
    // Pages written while guarded, by address (a unit may drain another unit's messages).
    for (w, addrs) in regions.iter().zip(&faulted) {
        for &a in addrs {
            let page = (a.wrapping_sub(w.hva) / PAGE_SIZE) as u32;
            if let Ok(k) = w.items.binary_search_by_key(&page, |it| it.page) {
                out.written[w.index_of[k]] = true;
            }
        }
    }
    drop(regions);
    for (&(gi, ri, _, _), ranges) in groups.iter().zip(taken) {
        if let (Some(r), Some(ranges)) = (
            guests
                .get_mut(gi)
                .and_then(Option::as_mut)
                .and_then(|g| g.regions.get_mut(ri)),
            ranges,
        ) {
            r.unregistered = ranges;
        }
    }
    out.filled = filled;
    out
}

/// Fills the new slots that phase 1 left empty from the first admitted page joining each.
fn fill_from_partners(
    regions: &[RegionWork<'_>],
    filled: &mut HashSet<u32>,
    pools: &Pools,
    ctx: &StepCtx<'_>,
    out: &mut CommitOut,
) {
    let mut tried: HashSet<u32> = HashSet::new();
    for w in regions {
        for (k, it) in w.items.iter().enumerate() {
            let Target::Slot(s) = it.target else { continue };
            if !w.late[k] || !it.admitted || filled.contains(&s) || !tried.insert(s) {
                continue;
            }
            let addr = w.hva + it.page as usize * PAGE_SIZE;
            // SAFETY: a page of a registered guest region, mapped while the engine holds the
            // guest; a racing write only makes the slot differ from the pages joining it,
            // which their guarded comparison then refuses.
            let src = unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE_SIZE) };
            let t = std::time::Instant::now();
            match pools.fill(it.node, s, src, ctx.faults) {
                Ok(()) => {
                    filled.insert(s);
                }
                Err(e) => {
                    out.tally.add(Trouble::Pool(it.node), &e.describe());
                    out.pool_errors += 1;
                }
            }
            out.fill_ns += t.elapsed().as_nanos() as u64;
        }
    }
}

/// Cuts a region's items (sorted by page) into units of about `per` items; a unit only ends
/// where the next item does not continue the same planned run. Returns each unit's first item.
fn cut_units(items: &[Item], per: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < items.len() {
        out.push(start);
        let mut end = (start + per.max(1)).min(items.len());
        while end < items.len() && same_run(&items[end - 1], &items[end]) {
            end += 1;
        }
        start = end;
    }
    out
}

/// Whether `b` continues `a`'s planned run (the next page onto the next slot, one remap).
pub(crate) fn same_run(a: &Item, b: &Item) -> bool {
    a.run != u32::MAX && a.run == b.run && b.page == a.page + 1
}

/// Splits `ranges` at `bounds` (sorted addresses, first and last enclosing every range) into
/// one map per interval.
fn split_ranges(ranges: Ranges, bounds: &[usize]) -> Vec<Ranges> {
    let mut out: Vec<Ranges> = (1..bounds.len()).map(|_| Ranges::new()).collect();
    for (s, e) in ranges {
        for (i, w) in bounds.windows(2).enumerate() {
            let (a, b) = (s.max(w[0]), e.min(w[1]));
            if a < b {
                out[i].insert(a, b);
            }
        }
    }
    out
}

/// Joins per-unit maps back into one, merging ranges that touch.
fn join_ranges(parts: Vec<Ranges>) -> Ranges {
    let mut all: Vec<(usize, usize)> = parts.into_iter().flatten().collect();
    all.sort_unstable();
    let mut out = Ranges::new();
    for (s, e) in all {
        add_range(&mut out, s, e);
    }
    out
}

/// Consecutive assigns of the same region: `(guest, region, from, to)`.
fn group_assigns(assigns: &[plan::Assign]) -> Vec<(usize, usize, usize, usize)> {
    let mut out: Vec<(usize, usize, usize, usize)> = Vec::new();
    for (i, a) in assigns.iter().enumerate() {
        let (g, r) = (usize::from(a.loc.guest), usize::from(a.loc.region));
        match out.last_mut() {
            Some(last) if last.0 == g && last.1 == r => last.3 = i + 1,
            _ => out.push((g, r, i, i + 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(page: u32, run: u32) -> Item {
        Item {
            page,
            target: Target::Slot(page),
            node: 0,
            run,
            first_of_run: false,
            admitted: true,
            fill: false,
        }
    }

    #[test]
    fn units_never_cut_a_run() {
        // Runs: pages 0-4 (run 0), 5-6 (run 1), 8 (run 2), 9-11 (run 3).
        let items: Vec<Item> = [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (5, 1), (6, 1)]
            .into_iter()
            .chain([(8, 2), (9, 3), (10, 3), (11, 3)])
            .map(|(p, r)| item(p, r))
            .collect();
        assert_eq!(cut_units(&items, 1), vec![0, 5, 7, 8]);
        assert_eq!(cut_units(&items, 2), vec![0, 5, 7]);
        assert_eq!(cut_units(&items, 100), vec![0]);
        assert!(cut_units(&[], 4).is_empty());
    }

    #[test]
    fn ranges_split_at_unit_bounds_and_join_back() {
        let mut r = Ranges::new();
        r.insert(0x1000, 0x5000);
        r.insert(0x8000, 0x9000);
        let parts = split_ranges(r.clone(), &[0, 0x3000, 0x8800, 0x10000]);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0].iter().collect::<Vec<_>>(), [(&0x1000, &0x3000)]);
        assert_eq!(
            parts[1].iter().collect::<Vec<_>>(),
            [(&0x3000, &0x5000), (&0x8000, &0x8800)]
        );
        assert_eq!(parts[2].iter().collect::<Vec<_>>(), [(&0x8800, &0x9000)]);
        assert_eq!(join_ranges(parts), r);
    }
}
