//! One scan step: hash a slice of guest memory in parallel, plan merges, leave out what the VMA
//! budget or a backed-off failure would refuse, fill new pool slots, commit region by region in
//! parallel under the write-protect guard, and account for it all (failures go to
//! `backoff::Troubles`, which decides what is held back and what is logged). At the end of a
//! full pass, slot references are rebuilt and, if anything may have changed them, the VMAs
//! are counted.

use std::time::{Duration, Instant};

use rayon::prelude::*;
use vm_memory::GuestAddress;

use std::sync::Mutex;

use crate::admit;
use crate::backoff::{Tally, Trouble, Troubles};
use crate::budget::VmaBudget;
use crate::commit::commit_plan;
use crate::fault::Faults;
use crate::merge::Outcome;
use crate::meta::{Meta, PageState};
use crate::numa::Topology;
use crate::plan::{self, Target};
use crate::scan::{CHUNK_PAGES, Chunk, scan_chunk};
use crate::state::{Cursor, EngineView, State};
use crate::sys::procfs::{self, thread_cpu_ns};
use hashbrown::HashSet;

/// What a step needs besides the state.
pub(crate) struct StepCtx<'a> {
    pub topology: &'a dyn Topology,
    pub faults: &'a Faults,
    pub threads: &'a rayon::ThreadPool,
    /// How many work units are committed at the same time.
    pub committers: usize,
    pub batch_pages: usize,
}

/// Candidates below which the planner's shards are decided on this thread.
const PARALLEL_PLAN_MIN: usize = 2048;

/// One chunk to scan: guest, region, first page, page count.
type Spec = (usize, usize, usize, usize);

/// Longest time between two counts of the VMAs while nothing the engine does changes them (the
/// rest of the process may, and the automatic budget leaves room for it).
const VMA_RECOUNT: Duration = Duration::from_secs(10);

/// Every this many passes, chunks that the dirty-page source reports unwritten are checked with
/// pagemap all the same (a source that missed a write then costs accounting, never data).
const VERIFY_EVERY: u64 = 8;

impl State {
    fn begin_pass(&mut self) {
        if !self.quiet {
            self.index.clear_pages();
        }
        for g in self.guests.iter_mut().flatten() {
            for r in &mut g.regions {
                r.dirty = None;
            }
        }
        self.cursor = Cursor::default();
        self.in_pass = true;
        if let Ok(mut b) = self.budget.lock() {
            b.begin_pass(self.quiet);
        }
    }

    /// Picks up to `max_pages` pages from the cursor on; returns the chunks and whether the pass
    /// is complete after them.
    fn take_specs(&mut self, max_pages: usize) -> (Vec<Spec>, bool) {
        let mut specs = Vec::new();
        let mut taken = 0;
        let mut c = self.cursor;
        while taken < max_pages {
            let Some(slot) = self.guests.get_mut(c.guest) else {
                self.cursor = c;
                return (specs, true);
            };
            let Some(g) = slot.as_mut() else {
                c = Cursor {
                    guest: c.guest + 1,
                    ..Cursor::default()
                };
                continue;
            };
            let Some(r) = g.regions.get_mut(c.region) else {
                c = Cursor {
                    guest: c.guest + 1,
                    ..Cursor::default()
                };
                continue;
            };
            if !r.active() || c.page >= r.pages {
                c.region += 1;
                c.page = 0;
                continue;
            }
            if c.page == 0 {
                r.dirty = g.dirty.as_ref().and_then(|src| {
                    crate::hooks::take_dirty(&**src, c.region, GuestAddress(r.gpa), r.pages)
                });
            }
            let n = CHUNK_PAGES.min(r.pages - c.page).min(max_pages - taken);
            specs.push((c.guest, c.region, c.page, n));
            taken += n;
            c.page += n;
        }
        self.cursor = c;
        let done = self.at_end();
        (specs, done)
    }

    /// Whether the cursor is past the last page of the last guest.
    fn at_end(&self) -> bool {
        let c = self.cursor;
        for (gi, g) in self.guests.iter().enumerate().skip(c.guest) {
            let Some(g) = g else { continue };
            for (ri, r) in g.regions.iter().enumerate() {
                let from = if gi == c.guest && ri == c.region {
                    c.page
                } else if gi == c.guest && ri < c.region {
                    continue;
                } else {
                    0
                };
                if r.active() && from < r.pages {
                    return false;
                }
            }
        }
        true
    }

    /// The part of the pass's pages before the cursor (0 to 1).
    fn pass_progress(&self) -> f64 {
        let c = self.cursor;
        let (mut before, mut total) = (0usize, 0usize);
        for (gi, g) in self.guests.iter().enumerate() {
            let Some(g) = g else { continue };
            for (ri, r) in g.regions.iter().enumerate().filter(|(_, r)| r.active()) {
                total += r.pages;
                before += match (gi, ri).cmp(&(c.guest, c.region)) {
                    std::cmp::Ordering::Less => r.pages,
                    std::cmp::Ordering::Equal => c.page.min(r.pages),
                    std::cmp::Ordering::Greater => 0,
                };
            }
        }
        if total == 0 {
            1.0
        } else {
            before as f64 / total as f64
        }
    }

    /// Runs one step over at most `max_pages` pages; returns true when it completed a pass.
    pub(crate) fn step(&mut self, ctx: &StepCtx<'_>, max_pages: usize) -> bool {
        let wall0 = Instant::now();
        let cpu0 = thread_cpu_ns();
        let mut worker_cpu = 0u64;
        if !self.in_pass {
            self.begin_pass();
        }
        let pass = self.totals.full_scans;
        let mut tally = std::mem::take(&mut self.pending);
        self.probe_vma_limit(pass, wall0);
        let (specs, done) = self.take_specs(max_pages.max(1));
        let collide = ctx.faults.collide_hashes();
        let trust_clean = (pass + 1) % VERIFY_EVERY != 0;

        // Scan chunks in parallel.
        let outs = {
            let State {
                guests, pagemap, ..
            } = self;
            let mut chunks: Vec<Chunk<'_>> = Vec::with_capacity(specs.len());
            for (gi, slot) in guests.iter_mut().enumerate() {
                let Some(g) = slot else { continue };
                let domain = g.domain;
                for (ri, region) in g.regions.iter_mut().enumerate() {
                    let mut here = specs.iter().filter(|s| s.0 == gi && s.1 == ri).peekable();
                    if here.peek().is_none() {
                        continue;
                    }
                    let hva = region.hva;
                    let dirty = region.dirty.as_deref();
                    let mut rest: &mut [Meta] = region.metas.as_mut_slice();
                    let mut offset = 0;
                    for &(_, _, first, len) in here {
                        let (_, tail) = std::mem::take(&mut rest).split_at_mut(first - offset);
                        let (mine, tail) = tail.split_at_mut(len);
                        rest = tail;
                        offset = first + len;
                        chunks.push(Chunk {
                            guest: gi as u16,
                            region: ri as u16,
                            first: first as u32,
                            hva,
                            domain,
                            metas: mine,
                            dirty,
                            trust_clean,
                        });
                    }
                }
            }
            let pagemap = &*pagemap;
            ctx.threads.install(|| {
                chunks
                    .par_iter_mut()
                    .map(|c| scan_chunk(c, pagemap, ctx.topology, collide))
                    .collect::<Vec<_>>()
            })
        };
        let mut cands = Vec::new();
        let quiet = self.quiet;
        for (out, spec) in outs.into_iter().zip(&specs) {
            worker_cpu += out.cpu_ns;
            if let Some(g) = self.guests.get_mut(spec.0).and_then(Option::as_mut) {
                g.pages_scanned += out.scanned;
                g.cow_breaks += out.broken_slots.len() as u64 + out.zero_broken;
            }
            if !out.broken_slots.is_empty() || out.zero_broken > 0 {
                self.changed = true;
            }
            for s in out.broken_slots {
                self.slots.dec(s);
            }
            if quiet {
                // Only the pages new to the planner: the others were planned when nothing
                // had changed since, and would be decided the same way.
                cands.extend(
                    out.cands
                        .into_iter()
                        .zip(out.fresh)
                        .filter_map(|(c, f)| f.then_some(c)),
                );
            } else {
                cands.extend(out.cands);
            }
            tally.absorb(out.tally);
        }

        let t_scan = Instant::now();
        // Plan: the index lookups in parallel, the decisions in order. Then leave out what a
        // backed-off failure would refuse, and what the VMA budget refuses: neither is filled,
        // protected nor counted as an attempt.
        let progress = if done { 1.0 } else { self.pass_progress() };
        let mut budget = std::mem::replace(&mut self.budget, Mutex::new(VmaBudget::new(0, 0)));
        let (plan, held, refused) = {
            let mut index = std::mem::take(&mut self.index);
            let mut slots = std::mem::take(&mut self.slots);
            let rules = self.rules;
            let view = EngineView {
                state: self,
                topology: ctx.topology,
            };
            let mut p = if cands.len() >= PARALLEL_PLAN_MIN {
                plan::plan_parallel(&cands, &rules, &mut index, &mut slots, &view, ctx.threads)
            } else {
                plan::plan(&cands, &rules, &mut index, &mut slots, &view)
            };
            let keep = hold_back(&self.troubles, &p, &slots, pass, wall0);
            let held = admit::prune(&mut p, &keep, &rules, &mut index, &mut slots, &view);
            let refused = match budget.get_mut() {
                Ok(b) => {
                    b.set_progress(progress);
                    admit::admit_and_prune(
                        &mut p,
                        &rules,
                        &mut index,
                        &mut slots,
                        &view,
                        b,
                        // Before refusing on charges of remaps done since the last count.
                        &mut || {
                            view.state
                                .count_vmas()
                                .ok()
                                .map(|(_, inside)| inside as u64)
                        },
                    )
                }
                Err(_) => 0,
            };
            self.index = index;
            self.slots = slots;
            (p, held, refused)
        };
        self.budget = budget;
        self.totals.held_back += held;
        self.totals.failures.vma_budget += refused;
        if !plan.assigns.is_empty() || !tally.is_empty() || plan.moved {
            self.changed = true;
        }

        let t_plan = Instant::now();
        // Make room for the new slots (they are filled from their donors under the guard).
        let failed_slots = self.grow_pools(ctx, &plan.new_slots, &mut tally);

        let t_fill = Instant::now();
        // Commit, in parallel over work units of every region.
        let mut out = {
            let State {
                guests,
                pools,
                budget,
                slots,
                ..
            } = self;
            commit_plan(guests, pools, budget, slots, &plan, &failed_slots, ctx)
        };
        worker_cpu += out.cpu_ns;
        self.totals.pool_errors += out.pool_errors;
        if let Ok(mut b) = self.budget.lock() {
            b.remapped(out.remaps);
        }
        let filled = std::mem::take(&mut out.filled);
        tally.absorb(std::mem::take(&mut out.tally));
        let (outcomes, written, repairs) = (out.outcomes, out.written, out.repairs);
        for hva in out.resets {
            self.reset_guard(hva);
        }
        let t_commit = Instant::now();
        // Account.
        let mut merged = vec![false; plan.assigns.len()];
        for (i, a) in plan.assigns.iter().enumerate() {
            self.totals.merge_attempts += 1;
            if written[i] {
                self.totals.guarded_writes += 1;
            }
            let Some(&mut m) = self.meta_mut(a.loc) else {
                continue;
            };
            match outcomes[i] {
                Outcome::Merged => {
                    if !self.distrusted.is_empty() {
                        self.distrusted.remove(&a.loc);
                    }
                    let Some(meta) = self.meta_mut(a.loc) else {
                        continue;
                    };
                    merged[i] = true;
                    *meta = match a.target {
                        Target::Slot(s) => Meta::new(PageState::Merged, s).remapped_now(),
                        Target::Zero => m.with(PageState::Zero, 0),
                    };
                    self.totals.merges += 1;
                }
                Outcome::Refused(cause) => {
                    if cause == crate::merge::Cause::Differed {
                        if let Some(meta) = self.meta_mut(a.loc) {
                            *meta = m.with(PageState::Volatile, m.payload());
                        }
                        if self.distrusted.len() >= 1 << 16 {
                            self.distrusted.clear();
                        }
                        self.distrusted.insert(a.loc);
                    }
                    self.totals.failures.count(cause);
                }
            }
        }
        self.totals.guard_repairs += repairs.unprotect + repairs.wake + repairs.reregister;
        if repairs.unprotect + repairs.wake + repairs.reregister > 0
            || plan
                .assigns
                .iter()
                .any(|a| matches!(a.target, Target::Slot(_)))
        {
            self.vmas_changed = true;
        }
        let unref = plan::settle(&plan, &merged, &mut self.slots);
        self.release_slots(unref, ctx.faults);
        tally.absorb(std::mem::take(&mut self.pending));
        self.settle_troubles(&plan, &outcomes, &filled, &tally, pass, wall0);

        let t_account = Instant::now();
        if done {
            self.end_pass(ctx.faults);
        }
        let t_end = Instant::now();
        let ns = |a: Instant, b: Instant| b.duration_since(a).as_nanos() as u64;
        let p = &mut self.totals.phases;
        p.scan_ns += ns(wall0, t_scan);
        p.plan_ns += ns(t_scan, t_plan);
        p.fill_ns += ns(t_plan, t_fill) + out.fill_ns;
        p.commit_ns += ns(t_fill, t_commit);
        p.account_ns += ns(t_commit, t_account) + ns(t_account, t_end);
        self.totals.cpu_ns += thread_cpu_ns().saturating_sub(cpu0) + worker_cpu;
        self.totals.wall_ns += wall0.elapsed().as_nanos() as u64;
        done
    }

    /// Replaces the userfaultfd of the region at `hva`: closing the old one wakes every writer
    /// it held and clears its protection. Without a new one the region is no longer merged.
    fn reset_guard(&mut self, hva: usize) {
        for g in self.guests.iter_mut().flatten() {
            for r in g.regions.iter_mut().filter(|r| r.hva == hva) {
                r.replace_guard();
            }
        }
    }

    fn meta_mut(&mut self, loc: crate::index::PageLoc) -> Option<&mut Meta> {
        self.guests
            .get_mut(usize::from(loc.guest))?
            .as_mut()?
            .regions
            .get_mut(usize::from(loc.region))?
            .metas
            .get_mut(loc.page as usize)
    }

    /// Lifts a learnt VMA limit once its backoff allows, to see whether there is more room.
    fn probe_vma_limit(&mut self, pass: u64, now: Instant) {
        let learned = self
            .budget
            .lock()
            .map(|b| b.learned().is_some())
            .unwrap_or(false);
        if learned && self.troubles.allowed(Trouble::VmaLimit, pass, now) {
            if let Ok(mut b) = self.budget.lock() {
                b.unlearn();
            }
            self.vma_probe = true;
        }
    }

    /// Hands a step's failures and successes to `troubles` and writes the log lines that
    /// come back. A remap that failed with ENOMEM teaches the budget the VMA count of now.
    fn settle_troubles(
        &mut self,
        plan: &plan::Plan,
        outcomes: &[Outcome],
        filled: &HashSet<u32>,
        tally: &Tally,
        pass: u64,
        now: Instant,
    ) {
        let mut lines = Vec::new();
        if tally.count(Trouble::VmaLimit) > 0 {
            self.vma_probe = false;
            let inside = self.count_vmas().map(|(_, inside)| inside as u64);
            if let (Ok(inside), Ok(mut b)) = (inside, self.budget.lock()) {
                b.learn(inside);
            }
        }
        for (t, n, error) in tally.entries() {
            lines.extend(self.troubles.failed(t, n, error, pass, now));
        }
        let merged_to = |zero: bool| {
            plan.assigns
                .iter()
                .zip(outcomes)
                .any(|(a, o)| *o == Outcome::Merged && matches!(a.target, Target::Zero) == zero)
        };
        let remapped = merged_to(false);
        let mut worked: Vec<Trouble> = Vec::new();
        if remapped || merged_to(true) {
            worked.push(Trouble::Protect);
        }
        if remapped {
            worked.push(Trouble::Remap);
            if self.vma_probe {
                self.vma_probe = false;
                worked.push(Trouble::VmaLimit);
            }
        }
        if merged_to(true) {
            worked.push(Trouble::ZeroPage);
        }
        for n in &plan.new_slots {
            if filled.contains(&n.slot) {
                worked.push(Trouble::Pool(n.node));
            }
        }
        worked.dedup();
        for t in worked {
            if tally.count(t) == 0 {
                lines.extend(self.troubles.succeeded(t, now));
            }
        }
        lines.extend(self.troubles.summaries(now));
        for l in lines {
            l.emit();
        }
    }

    /// Creates and grows the pools for the new slots. Returns the slots that have no room.
    fn grow_pools(
        &mut self,
        ctx: &StepCtx<'_>,
        new_slots: &[plan::NewSlot],
        tally: &mut Tally,
    ) -> HashSet<u32> {
        let mut failed = HashSet::new();
        let mut top: hashbrown::HashMap<u8, u32> = hashbrown::HashMap::new();
        for n in new_slots {
            let node = self.slots.node(n.slot);
            let t = top.entry(node).or_insert(0);
            *t = (*t).max(n.slot);
        }
        for (&node, &last) in &top {
            if let Err(e) = self.pools.ensure(node, last, ctx.topology, ctx.faults) {
                tally.add(Trouble::Pool(node), &e.describe());
                self.totals.pool_errors += 1;
                for n in new_slots {
                    if self.slots.node(n.slot) == node {
                        failed.insert(n.slot);
                    }
                }
            }
        }
        failed
    }

    fn end_pass(&mut self, faults: &Faults) {
        self.totals.full_scans += 1;
        self.in_pass = false;
        self.cursor = Cursor::default();
        // Slot references change only with what marks the pass changed.
        if self.changed {
            self.rebuild_refs(faults);
        }
        let mut waiting = false;
        if let Ok(mut b) = self.budget.lock() {
            b.pass_done();
            waiting = b.left_waiting();
        }
        let stale = self.vmas_counted.is_none_or(|t| t.elapsed() >= VMA_RECOUNT);
        if self.vmas_changed || stale {
            self.measure_vmas();
        }
        // Runs that waited for longer ones are planned again even if nothing changed: the
        // refusals of this pass may leave room for them. Once: if a pass planned again for
        // them changes nothing, the budget has no room for them until something changes.
        let replan = !self.changed && waiting && !self.replanning;
        self.replanning = replan;
        self.quiet = !self.changed && !replan && self.troubles.episodes().is_empty();
        self.changed = false;
        for l in self
            .troubles
            .pass_done(self.totals.full_scans, Instant::now())
        {
            l.emit();
        }
    }

    /// Measures VMAs inside guest memory and, when automatic, the budget's limit.
    pub(crate) fn measure_vmas(&mut self) {
        let Ok((total, inside)) = self.count_vmas() else {
            return;
        };
        self.vmas_changed = false;
        self.vmas_counted = Some(Instant::now());
        let max = procfs::max_map_count().unwrap_or(65530);
        if let Ok(mut b) = self.budget.lock() {
            let before = (b.used(), b.limit());
            b.measured(inside as u64);
            if self.budget_auto {
                b.set_limit(VmaBudget::default_limit(max, (total - inside) as u64));
            }
            if (b.used(), b.limit()) != before {
                self.changed = true;
            }
        }
    }
}

/// Which merges of `plan` to keep: not those a backed-off failure would refuse (all of them
/// while write-protecting fails, remaps while remapping fails, zero pages while dropping them
/// fails, new slots of a node whose pool fails).
fn hold_back(
    troubles: &Troubles,
    plan: &plan::Plan,
    slots: &crate::slots::SlotTable,
    pass: u64,
    now: Instant,
) -> Vec<bool> {
    let t = troubles;
    if t.episodes().iter().all(|e| !e.trouble.backs_off()) {
        return vec![true; plan.assigns.len()];
    }
    let protect = t.allowed(Trouble::Protect, pass, now);
    let remap = t.allowed(Trouble::Remap, pass, now);
    let zero = t.allowed(Trouble::ZeroPage, pass, now);
    let new: HashSet<u32> = plan.new_slots.iter().map(|n| n.slot).collect();
    plan.assigns
        .iter()
        .map(|a| {
            protect
                && match a.target {
                    Target::Zero => zero,
                    Target::Slot(s) => {
                        remap
                            && (!new.contains(&s)
                                || t.allowed(Trouble::Pool(slots.node(s)), pass, now))
                    }
                }
        })
        .collect()
}
