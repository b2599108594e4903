//! The exact merge: a batch of pages is write-protected with userfaultfd, compared byte by byte
//! with its pool slot (or checked all-zero), remapped onto the slot in runs (or dropped to the
//! zero page), and released: fault messages are drained, pages not merged are un-protected
//! without waking, the whole batch is woken, and remapped pages are registered again. A writer
//! that hits a page in the batch waits until the end and then writes to what the page has become
//! (its own copy of the slot, or a fresh zero page): no write is ever lost.
//!
//! Every step can fail (or be made to fail, see `fault`). A failure refuses the pages it
//! concerns and leaves them private with their content; the guard is always released, falling
//! back to unregistering a range (which wakes its writers and clears its protection) when
//! un-protecting or waking fails.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::backoff::{Tally, Trouble};
use crate::budget::{Admission, VMAS_PER_REMAP, VmaBudget};
use crate::fault::{FaultPoint, Faults};
use crate::hash::is_zero;
use crate::hooks::ExclusionSource;
use crate::plan::Target;
use crate::pool::Pools;
use crate::slots::CHUNK_SLOTS;
use crate::sys::PAGE_SIZE;
use crate::sys::attrs::Attrs;
use crate::sys::mem;
use crate::sys::uffd::Uffd;
use vm_memory::GuestAddress;

/// Why a planned merge did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cause {
    /// The bytes differed under the guard (the page changed, or the hashes collided).
    Differed,
    /// The exclusion source reported device I/O in flight.
    Excluded,
    /// The page is not under userfaultfd's guard (an earlier registration failed).
    Unguarded,
    /// The VMA budget refused the remap.
    VmaBudget,
    /// Write-protecting failed.
    Protect,
    /// Remapping failed (other than at the VMA limit).
    Remap,
    /// Remapping failed with ENOMEM: `vm.max_map_count` reached.
    VmaLimit,
    /// Dropping a zero page failed.
    ZeroPage,
    /// The pool slot could not be read or filled.
    Pool,
}

/// Result of one planned merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Merged.
    Merged,
    /// Not merged; the page is private and unchanged.
    Refused(Cause),
}

/// One page to merge in a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Item {
    /// Page index in the region.
    pub page: u32,
    /// Where it goes.
    pub target: Target,
    /// Node of the slot's pool.
    pub node: u8,
    /// The planned run (consecutive pages onto consecutive slots) the page belongs to.
    pub run: u32,
    /// The page starts its planned run: the remap that starts here was paid for in the VMA
    /// budget when the plan was admitted. A run split by a page that differed (or by a batch
    /// or phase boundary) costs more remaps, each charged when it is made.
    pub first_of_run: bool,
    /// Whether the VMA budget admitted the page's run.
    pub admitted: bool,
    /// The page fills its (new) slot: it is copied there while write-protected, which makes
    /// the two equal without a comparison.
    pub fill: bool,
}

/// A guest region (or the part of it a work unit commits) as the committer sees it.
#[derive(Debug)]
pub struct RegionGuard<'a> {
    /// Host address of the region.
    pub hva: usize,
    /// Guest physical address of the region.
    pub gpa: u64,
    /// The userfaultfd the region is registered with.
    pub uffd: &'a Uffd,
    /// Host ranges (start to end) not registered with the userfaultfd: pages remapped onto the
    /// pool (a remap drops the registration) are registered again only when they are about to
    /// be guarded again, which most never are. A work unit holds the ranges of its own pages.
    pub unregistered: Ranges,
    /// Attributes of the region's memory, given to each pool mapping made in it.
    pub attrs: Attrs,
}

/// Disjoint host address ranges, start to end.
pub type Ranges = std::collections::BTreeMap<usize, usize>;

/// Adds `[start, end)` to `ranges`, joined with every range it overlaps or touches, so that the
/// ranges stay disjoint.
pub fn add_range(ranges: &mut Ranges, start: usize, end: usize) {
    let (mut lo, mut hi) = (start, end);
    // The last range starting at or before `hi` is joined if it reaches `lo`; disjoint ranges
    // end in the order they start, so once one does not, none before it does.
    while let Some((&s, &e)) = ranges.range(..=hi).next_back() {
        if e < lo {
            break;
        }
        ranges.remove(&s);
        lo = lo.min(s);
        hi = hi.max(e);
    }
    ranges.insert(lo, hi);
}

/// Removes `[start, end)` from `ranges`, trimming ranges that overlap it.
pub fn remove_range(ranges: &mut Ranges, start: usize, end: usize) {
    let overlapping: Vec<(usize, usize)> = ranges
        .range(..end)
        .filter(|&(_, &e)| e > start)
        .map(|(&s, &e)| (s, e))
        .collect();
    for (s, e) in overlapping {
        ranges.remove(&s);
        if s < start {
            ranges.insert(s, start);
        }
        if e > end {
            ranges.insert(end, e);
        }
    }
}

/// The range of `ranges` holding `addr`.
pub fn range_of(ranges: &Ranges, addr: usize) -> Option<(usize, usize)> {
    ranges
        .range(..=addr)
        .next_back()
        .filter(|&(_, &e)| addr < e)
        .map(|(&s, &e)| (s, e))
}

/// Guard operations that failed and were repaired by unregistering (counted, not fatal).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Repairs {
    /// Un-protect failures.
    pub unprotect: u64,
    /// Wake failures.
    pub wake: u64,
    /// Re-registration failures (the range is left out of merging until registered again).
    pub reregister: u64,
}

/// What committing a region's items did.
#[derive(Debug, Default)]
pub struct RegionReport {
    /// One outcome per item.
    pub outcomes: Vec<Outcome>,
    /// Addresses where a writer hit a guarded page (of this region; with several work units on
    /// one userfaultfd, possibly of another unit's items).
    pub faulted: Vec<usize>,
    /// Slots filled from their donors.
    pub filled: Vec<u32>,
    /// Time spent filling slots, in nanoseconds.
    pub fill_ns: u64,
    /// Slot fills that failed.
    pub pool_errors: u64,
    /// Guard repairs.
    pub repairs: Repairs,
    /// Write-protect ioctls issued.
    pub protects: u64,
    /// Remap calls issued.
    pub remaps: u64,
    /// Every way of waking writers failed: the region's userfaultfd must be replaced.
    pub reset_guard: bool,
    /// Failures, by kind, with the first error of each (logged by the engine, rate-limited).
    pub tally: Tally,
}

/// Shared context of a commit.
pub struct Committer<'a> {
    /// Pools holding the slots.
    pub pools: &'a Pools,
    /// Failure injection.
    pub faults: &'a Faults,
    /// VMA budget, shared by all regions.
    pub budget: &'a Mutex<VmaBudget>,
    /// Pages with I/O in flight.
    pub exclusion: Option<&'a dyn ExclusionSource>,
    /// Most pages per guard.
    pub batch_pages: usize,
    /// Set by the first remap that fails with ENOMEM: the process is at `vm.max_map_count`,
    /// so the remaps after it in the same step are refused without trying.
    pub vma_limit_hit: &'a AtomicBool,
}

/// Most pages under one guard when a planned run is kept whole (one remap for the run).
pub const MAX_BATCH_PAGES: usize = 512;

fn page_bytes<'a>(addr: usize, pages: usize) -> &'a [u8] {
    // SAFETY: `addr` starts `pages` pages of registered guest memory, which stays mapped while
    // the engine holds the guest's memory; while the pages are write-protected nobody can
    // change them, and racing writers elsewhere only make a comparison fail.
    unsafe { std::slice::from_raw_parts(addr as *const u8, pages * PAGE_SIZE) }
}

/// Maximal runs `[i, j)` of items with consecutive page numbers.
fn runs<T>(items: &[T], page: impl Fn(&T) -> u32) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < items.len() {
        let mut j = i + 1;
        while j < items.len() && page(&items[j]) == page(&items[j - 1]) + 1 {
            j += 1;
        }
        out.push((i, j));
        i = j;
    }
    out
}

impl std::fmt::Debug for Committer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer")
            .field("batch_pages", &self.batch_pages)
            .field("exclusion", &self.exclusion.is_some())
            .finish_non_exhaustive()
    }
}

impl Committer<'_> {
    /// Commits `items` (sorted by page) of one region.
    pub fn commit(&self, r: &mut RegionGuard<'_>, items: &[Item]) -> RegionReport {
        let mut rep = RegionReport {
            outcomes: vec![Outcome::Refused(Cause::Unguarded); items.len()],
            ..RegionReport::default()
        };
        // Register the remapped ranges that hold pages to guard now.
        let mut wanted: Vec<(usize, usize)> = items
            .iter()
            .filter_map(|it| range_of(&r.unregistered, r.hva + it.page as usize * PAGE_SIZE))
            .collect();
        wanted.dedup();
        for (s, e) in wanted {
            let ok = self
                .faults
                .check(FaultPoint::Reregister)
                .and_then(|()| self.register(r, s, e));
            match ok {
                Ok(()) => {
                    r.unregistered.remove(&s);
                }
                Err(err) => {
                    rep.tally.add(Trouble::Guard, &err);
                    rep.repairs.reregister += 1;
                }
            }
        }
        let span = self.batch_pages.max(1);
        let mut i = 0;
        while i < items.len() {
            let mut j = i + 1;
            while j < items.len()
                && j - i < span
                && ((items[j].page - items[i].page) as usize) < 4 * span
            {
                j += 1;
            }
            // Keep a planned run whole: one remap, one VMA.
            while j < items.len()
                && j - i < MAX_BATCH_PAGES
                && crate::commit::same_run(&items[j - 1], &items[j])
            {
                j += 1;
            }
            self.commit_batch(r, &items[i..j], i, &mut rep);
            i = j;
        }
        rep
    }

    fn commit_batch(
        &self,
        r: &mut RegionGuard<'_>,
        items: &[Item],
        base: usize,
        rep: &mut RegionReport,
    ) {
        let hva = r.hva;
        let addr_of = |it: &Item| hva + it.page as usize * PAGE_SIZE;
        // Pages still outside the guard (their registration failed) are left alone.
        let unguarded: Vec<bool> = items
            .iter()
            .map(|it| range_of(&r.unregistered, addr_of(it)).is_some())
            .collect();
        // 1. Write-protect each run of consecutive pages.
        let mut protected: Vec<(usize, usize)> = Vec::new();
        for (k, it) in items.iter().enumerate() {
            if !it.admitted {
                rep.outcomes[base + k] = Outcome::Refused(Cause::VmaBudget);
            }
        }
        let wanted: Vec<&Item> = items.iter().filter(|it| it.admitted).collect();
        for (w0, w1) in runs(&wanted, |it| it.page) {
            // Indices into `items` of the admitted run.
            let i0 = items
                .iter()
                .position(|it| it.page == wanted[w0].page)
                .unwrap_or(0);
            let i1 = i0 + (w1 - w0);
            if unguarded[i0..i1].iter().any(|&u| u) {
                continue;
            }
            let (addr, len) = (addr_of(&items[i0]), (i1 - i0) * PAGE_SIZE);
            rep.protects += 1;
            match self
                .faults
                .check(FaultPoint::Protect)
                .and_then(|()| r.uffd.protect(addr, len))
            {
                Ok(()) => protected.push((i0, i1)),
                Err(e) => {
                    rep.tally.add(Trouble::Protect, &e);
                    for k in i0..i1 {
                        rep.outcomes[base + k] = Outcome::Refused(Cause::Protect);
                    }
                    self.release(r, addr, len, rep);
                }
            }
        }
        // 2. Under the guard: leave out excluded pages, fill new slots from their donors (the
        // copy equals the page), compare the other pages with their slot (or check all-zero).
        let mut equal = vec![false; items.len()];
        let mut check = vec![false; items.len()];
        for &(i0, i1) in &protected {
            for k in i0..i1 {
                let gpa = GuestAddress(r.gpa + u64::from(items[k].page) * PAGE_SIZE as u64);
                if self
                    .exclusion
                    .is_some_and(|x| crate::hooks::is_excluded(x, gpa))
                {
                    rep.outcomes[base + k] = Outcome::Refused(Cause::Excluded);
                } else {
                    check[k] = true;
                }
            }
        }
        let mut k = 0;
        while k < items.len() {
            let (it, Target::Slot(s)) = (items[k], items[k].target) else {
                k += 1;
                continue;
            };
            if !(check[k] && it.fill) {
                k += 1;
                continue;
            }
            let mut j = k + 1;
            while j < items.len()
                && check[j]
                && items[j].fill
                && items[j].node == it.node
                && items[j].page == items[j - 1].page + 1
                && items[j].target == Target::Slot(s + (j - k) as u32)
            {
                j += 1;
            }
            let t = std::time::Instant::now();
            let filled = self
                .pools
                .fill(it.node, s, page_bytes(addr_of(&it), j - k), self.faults);
            rep.fill_ns += t.elapsed().as_nanos() as u64;
            match filled {
                Ok(()) => {
                    equal[k..j].iter_mut().for_each(|e| *e = true);
                    rep.filled.extend(s..s + (j - k) as u32);
                }
                Err(e) => {
                    rep.tally.add(Trouble::Pool(it.node), &e.describe());
                    rep.pool_errors += 1;
                    for m in k..j {
                        rep.outcomes[base + m] = Outcome::Refused(Cause::Pool);
                    }
                }
            }
            k = j;
        }
        for k in (0..items.len()).filter(|&k| check[k] && !items[k].fill) {
            let it = &items[k];
            let bytes = page_bytes(addr_of(it), 1);
            let same = match it.target {
                Target::Zero => Ok(is_zero(bytes)),
                Target::Slot(s) => self.pools.slot_bytes(it.node, s).map(|p| p == bytes),
            };
            match same {
                Ok(true) => equal[k] = true,
                Ok(false) => rep.outcomes[base + k] = Outcome::Refused(Cause::Differed),
                Err(_) => rep.outcomes[base + k] = Outcome::Refused(Cause::Pool),
            }
        }
        // 3. Remap runs of equal pages onto consecutive slots; drop zero pages.
        let mut remapped: Vec<(usize, usize)> = Vec::new();
        let mut on_slot = vec![false; items.len()];
        for &(i0, i1) in &protected {
            let mut k = i0;
            while k < i1 {
                if !equal[k] {
                    k += 1;
                    continue;
                }
                let it = items[k];
                let mut j = k + 1;
                while j < i1
                    && equal[j]
                    && items[j].node == it.node
                    && match (it.target, items[j].target) {
                        (Target::Zero, Target::Zero) => true,
                        // Consecutive slots in one chunk: consecutive pages of one file.
                        (Target::Slot(a), Target::Slot(b)) => {
                            b == a + (j - k) as u32 && b / CHUNK_SLOTS == a / CHUNK_SLOTS
                        }
                        _ => false,
                    }
                {
                    j += 1;
                }
                let (addr, len) = (addr_of(&it), (j - k) * PAGE_SIZE);
                let result = match it.target {
                    Target::Zero => self
                        .faults
                        .check(FaultPoint::ZeroPage)
                        // SAFETY: the pages are guest memory in an anonymous mapping (zero
                        // targets are never planned for remapped pages), write-protected and
                        // just checked all-zero.
                        .and_then(|()| unsafe { mem::dont_need(addr, len) })
                        .map_err(|_| Cause::ZeroPage),
                    Target::Slot(s) => {
                        // A remap lies within one planned run: only the one starting at the
                        // run's first page was paid for.
                        let prepaid = it.first_of_run;
                        let run = (addr, len, j - k);
                        self.remap(run, it.node, s, prepaid, r.attrs, &mut rep.tally)
                    }
                };
                for m in k..j {
                    rep.outcomes[base + m] = match result {
                        Ok(()) => Outcome::Merged,
                        Err(c) => Outcome::Refused(c),
                    };
                }
                if result.is_ok() && matches!(it.target, Target::Slot(_)) {
                    rep.remaps += 1;
                    remapped.push((addr, len));
                    on_slot[k..j].iter_mut().for_each(|b| *b = true);
                }
                k = j;
            }
        }
        // 4. Drain fault messages: those pages were written during the guard.
        if let Err(e) = r.uffd.drain(&mut rep.faulted) {
            rep.tally
                .add(Trouble::Guard, &format_args!("reading fault messages: {e}"));
        }
        // 5. Un-protect, without waking, what was not remapped.
        for &(i0, i1) in &protected {
            for (a, b) in runs_where(i0, i1, |k| !on_slot[k]) {
                let (addr, len) = (addr_of(&items[a]), (b - a) * PAGE_SIZE);
                let ok = self
                    .faults
                    .check(FaultPoint::Unprotect)
                    .and_then(|()| r.uffd.unprotect_nowake(addr, len));
                if let Err(e) = ok {
                    rep.tally
                        .add(Trouble::Guard, &format_args!("un-protecting: {e}"));
                    rep.repairs.unprotect += 1;
                    self.release(r, addr, len, rep);
                }
            }
        }
        // 7. The remapped ranges lost their registration; they are registered again only when
        // some page of theirs is about to be guarded (see `commit`).
        for &(addr, len) in &remapped {
            add_range(&mut r.unregistered, addr, addr + len);
        }
        // 6. Wake the whole batch.
        for &(i0, i1) in &protected {
            let (addr, len) = (addr_of(&items[i0]), (i1 - i0) * PAGE_SIZE);
            let mut err = None;
            let woke = (0..2).any(|_| {
                self.faults
                    .check(FaultPoint::Wake)
                    .and_then(|()| r.uffd.wake(addr, len))
                    .map_err(|e| err = Some(e))
                    .is_ok()
            });
            if !woke {
                if let Some(e) = err {
                    rep.tally
                        .add(Trouble::Guard, &format_args!("waking writers: {e}"));
                }
                rep.repairs.wake += 1;
                self.release(r, addr, len, rep);
            }
        }
    }

    /// Remaps a run (`addr`, `len` bytes, `pages` pages) onto consecutive slots from `slot`,
    /// and gives the new mapping the region's `attrs`. A remap that was not paid for when the
    /// plan was admitted (see [`Item::first_of_run`]) is charged now. After a remap failed
    /// with ENOMEM in this step, remaps are refused without trying.
    fn remap(
        &self,
        (addr, len, pages): (usize, usize, usize),
        node: u8,
        slot: u32,
        prepaid: bool,
        attrs: Attrs,
        tally: &mut Tally,
    ) -> Result<(), Cause> {
        if self.vma_limit_hit.load(Ordering::Relaxed) {
            return Err(Cause::VmaLimit);
        }
        if !prepaid {
            let admitted = match self.budget.lock() {
                Ok(mut b) => b.admit(pages),
                Err(_) => Admission::Exhausted,
            };
            if admitted != Admission::Admitted {
                return Err(Cause::VmaBudget);
            }
        }
        let (fd, offset) = self.pools.mapping(node, slot).map_err(|_| Cause::Pool)?;
        let mapped = self
            .faults
            .check(FaultPoint::RemapNoMem)
            .and_then(|()| self.faults.check(FaultPoint::Remap))
            // SAFETY: the range is guest memory the engine holds, write-protected (writers
            // wait), every page equal to the slot it is about to map, as when `mmap` unmaps it.
            .and_then(|()| unsafe { self.faults.check_late(FaultPoint::RemapLate, addr, len) })
            // SAFETY: `[addr, addr + len)` is guest memory of a registered region, write-protected,
            // and every page in it was just found equal to the slot it is mapped onto.
            .and_then(|()| unsafe { mem::map_private_fixed(addr, len, fd, offset) });
        let Err(e) = mapped else {
            give_attrs(attrs, addr, len);
            return Ok(());
        };
        let cause = if e.raw_os_error() == Some(libc::ENOMEM) {
            self.vma_limit_hit.store(true, Ordering::Relaxed);
            tally.add(Trouble::VmaLimit, &e);
            Cause::VmaLimit
        } else {
            tally.add(Trouble::Remap, &e);
            Cause::Remap
        };
        if mem::is_mapped(addr, len) {
            return Err(cause);
        }
        // Before Linux 6.12, `mmap` unmaps the range first and can still fail after that (the
        // new VMA's allocation under memory pressure): the guest's pages are gone, but each
        // equalled the slot. Mapping the slot into the hole, replacing nothing mapped meanwhile,
        // completes the merge.
        // SAFETY: the hole is where the guest's pages were, each equal to the slot.
        match unsafe { mem::map_private_into_hole(addr, len, fd, offset) } {
            Ok(()) => {
                log::warn!(
                    "vm-dedup: a failed remap unmapped guest memory at {addr:#x} ({e}); mapped \
                     its pages' content in again"
                );
                give_attrs(attrs, addr, len);
                Ok(())
            }
            Err(again) => {
                log::error!(
                    "vm-dedup: a failed remap unmapped guest memory at {addr:#x} ({e}), and it \
                     cannot be mapped again ({again}): {len} bytes of it are lost"
                );
                Err(cause)
            }
        }
    }

    /// Registers `[start, end)` with the region's userfaultfd. Registering part of a mapping
    /// splits it: the VMA budget is charged for that.
    fn register(&self, r: &RegionGuard<'_>, start: usize, end: usize) -> std::io::Result<()> {
        r.uffd.register(start, end - start)?;
        if let Ok(mut b) = self.budget.lock() {
            b.charge(VMAS_PER_REMAP);
        }
        Ok(())
    }

    /// Releases a guarded range after a failed step: register its remapped parts (so that the
    /// whole range can be addressed), un-protect with wake-up; failing that, unregister (which
    /// clears the protection) and register again, then wake; failing that, ask for the
    /// region's userfaultfd to be replaced (closing it wakes every writer).
    fn release(&self, r: &mut RegionGuard<'_>, addr: usize, len: usize, rep: &mut RegionReport) {
        let inside: Vec<(usize, usize)> = r
            .unregistered
            .range(..addr + len)
            .filter(|&(_, &e)| e > addr)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in inside {
            if self.register(r, s, e).is_ok() {
                r.unregistered.remove(&s);
            }
        }
        if r.uffd.unprotect(addr, len).is_ok() {
            return;
        }
        if let Err(e) = r.uffd.unregister(addr, len) {
            log::error!("vm-dedup: unregistering a guarded range failed: {e}");
        }
        if self.register(r, addr, addr + len).is_err() {
            rep.repairs.reregister += 1;
            add_range(&mut r.unregistered, addr, addr + len);
        }
        if r.uffd.wake(addr, len).is_err() {
            log::error!("vm-dedup: cannot wake writers; replacing the region's userfaultfd");
            rep.reset_guard = true;
        }
    }
}

/// Gives a merged run's new pool mapping `[addr, addr + len)` the attributes of its region
/// (nothing to do, and no system call, for a region without any). The merge stands if this
/// fails (the pages are mapped already, and writers may have gone on): the error is logged.
fn give_attrs(attrs: Attrs, addr: usize, len: usize) {
    if attrs.is_empty() {
        return;
    }
    if let Err(e) = attrs.apply_to_file(addr, len) {
        log::error!(
            "vm-dedup: merged guest memory at {addr:#x} ({len} bytes) lacks attributes of its \
             region ({attrs:?}): {e}"
        );
    }
}

/// Maximal runs `[a, b)` within `[i0, i1)` where `keep` holds.
fn runs_where(i0: usize, i1: usize, keep: impl Fn(usize) -> bool) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut k = i0;
    while k < i1 {
        if !keep(k) {
            k += 1;
            continue;
        }
        let mut j = k + 1;
        while j < i1 && keep(j) {
            j += 1;
        }
        out.push((k, j));
        k = j;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_on_gaps() {
        let pages = [1u32, 2, 3, 7, 9, 10];
        assert_eq!(runs(&pages, |p| *p), vec![(0, 3), (3, 4), (4, 6)]);
        assert!(runs(&[] as &[u32], |p| *p).is_empty());
        assert_eq!(runs_where(0, 6, |k| k != 2), vec![(0, 2), (3, 6)]);
        assert_eq!(runs_where(2, 4, |_| false), vec![]);
    }

    #[test]
    fn ranges_join_and_find() {
        let mut r = Ranges::new();
        add_range(&mut r, 100, 200);
        add_range(&mut r, 200, 300);
        add_range(&mut r, 400, 500);
        assert_eq!(r.len(), 2);
        assert_eq!(range_of(&r, 250), Some((100, 300)));
        assert_eq!(range_of(&r, 300), None);
        assert_eq!(range_of(&r, 99), None);
        assert_eq!(range_of(&r, 499), Some((400, 500)));
        remove_range(&mut r, 150, 450);
        assert_eq!(
            r.clone().into_iter().collect::<Vec<_>>(),
            vec![(100, 150), (450, 500)]
        );
        // A range overlapping or touching others (on either side) is joined with all of them.
        add_range(&mut r, 600, 700);
        add_range(&mut r, 120, 460);
        assert_eq!(
            r.clone().into_iter().collect::<Vec<_>>(),
            vec![(100, 500), (600, 700)]
        );
        add_range(&mut r, 500, 600);
        add_range(&mut r, 650, 660);
        assert_eq!(r.into_iter().collect::<Vec<_>>(), vec![(100, 700)]);
    }
}
