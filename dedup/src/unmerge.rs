//! Unmerging (KSM's `run=2`, and unregistering a guest whose memory is still in use): merged
//! pages become private anonymous memory again, with the same content, and no concurrent write
//! is lost.
//!
//! Merged pages live in pool-file mappings inside guest memory. Making them private where they
//! are (`MADV_POPULATE_WRITE`) would leave those file VMAs behind for good. Moving an anonymous
//! copy over each merged range with `mremap` does not help either: a moved anonymous mapping
//! keeps the page offset and `anon_vma` of the place it was created, so the kernel never merges
//! it with the guest memory around it (measured: 3 VMAs where there was 1). So a region holding
//! merged pages is rebuilt as a whole, in a scratch mapping, and moved back in one step:
//!
//! 0. the scratch is given the attributes the region had at registration (advice such as
//!    `MADV_DONTDUMP`, and `mlock`, on fault until it is filled), see [`Attrs`];
//! 1. guard: the region's anonymous parts are registered for missing-page faults as well (from
//!    the moment a page leaves, any access to it waits), the pool-file parts are write-protected
//!    (writers there wait), and the scratch is registered with the region's userfaultfd;
//! 2. fill: the pool-file parts are copied into the scratch; the anonymous parts' pages are moved
//!    there with `UFFDIO_MOVE` (no copy, no extra memory); a page that cannot be moved is
//!    write-protected and copied;
//! 3. swap: one `mremap` moves the scratch over the region, which is one anonymous VMA again;
//! 4. release: the region is registered again (write-protect only) and everyone waiting is
//!    woken; they retry on the new mapping, which holds every byte written before.
//!
//! A failure before the swap is rolled back (moved pages go back with `UFFDIO_MOVE`, else
//! `UFFDIO_COPY`), and the region is then unmerged in place, keeping its pool-file VMAs.

use std::io;

use crate::engine::EngineError;
use crate::fault::{FaultPoint, Faults};
use crate::guest::Region;
use crate::merge::{Ranges, add_range};
use crate::meta::{Meta, PageState};
use crate::state::State;
use crate::sys::PAGE_SIZE;
use crate::sys::attrs::{self, Attrs};
use crate::sys::mem::{self, Scratch};
use crate::sys::pagemap::{PAGE_IS_FILE, PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PageRegion, Pagemap};
use crate::sys::procfs;
use crate::sys::uffd::Uffd;

/// Why a region could not be rebuilt (it is then unmerged in place).
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// The region has no userfaultfd guard.
    #[error("the region is not guarded")]
    Unguarded,
    /// The scratch mapping could not be created.
    #[error("mapping the scratch copy")]
    Scratch(#[source] io::Error),
    /// /proc/self/smaps could not be read.
    #[error("reading VMA flags")]
    Smaps(#[source] io::Error),
    /// The region's VMA flags changed since registration, or a rebuilt mapping would not have
    /// the flags the region had then (those listed differ).
    #[error(
        "guest memory's VMA flags differ from those at registration or of a rebuilt mapping: {0:?}"
    )]
    Flags(Vec<String>),
    /// Locking the filled scratch as the region is locked (`mlock`) failed.
    #[error("locking the rebuilt mapping")]
    Lock(#[source] io::Error),
    /// Registering or write-protecting the region failed.
    #[error("guarding the region")]
    Guard(#[source] io::Error),
    /// Reading page categories failed.
    #[error("reading page categories")]
    Pagemap(#[source] io::Error),
    /// The region was unmapped by a failed move and could not be mapped again: the guest's
    /// memory there is gone (the guest cannot go on).
    #[error("guest memory unmapped by a failed move could not be mapped again")]
    Refill(#[source] io::Error),
    /// Moving the scratch over the region failed.
    #[error("moving the rebuilt mapping over guest memory")]
    Remap(#[source] io::Error),
}

/// Pages `[first, end)` of a region, all in pool-file mappings (`file`) or all anonymous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Part {
    pub first: usize,
    pub end: usize,
    pub file: bool,
}

/// Splits a region into maximal parts by whether its pages were ever remapped onto the pool
/// (those, and only those, lie in pool-file mappings).
pub(crate) fn parts(metas: &[Meta]) -> Vec<Part> {
    let mut out: Vec<Part> = Vec::new();
    for (i, m) in metas.iter().enumerate() {
        match out.last_mut() {
            Some(p) if p.file == m.remapped() => p.end = i + 1,
            _ => out.push(Part {
                first: i,
                end: i + 1,
                file: m.remapped(),
            }),
        }
    }
    out
}

/// The flags in one of `a` and `b` but not both.
fn differing(a: &[String], b: &[String]) -> Vec<String> {
    a.iter()
        .chain(b)
        .filter(|f| !(a.contains(f) && b.contains(f)))
        .cloned()
        .collect()
}

/// Checks that the region `[hva, hva + len)` still has the VmFlags it had at registration
/// (`want`, see [`attrs::relevant`]) where it is still anonymous memory (memory the VMM made
/// read-only or locked since is not rebuilt as what it was), then gives the scratch the
/// attributes recorded at registration (`attrs`: advice such as `MADV_DONTFORK`, and `mlock`,
/// on fault, so that nothing is allocated ahead and pages can move between the two:
/// `UFFDIO_MOVE` wants both locked or neither) and checks that its VmFlags are then `want`.
/// The recorded attributes count, not only those of the anonymous VMAs left in the region: a
/// region whose every page was merged has none left.
fn match_flags(
    (hva, len): (usize, usize),
    want: &[String],
    attrs: Attrs,
    scratch: &Scratch,
) -> Result<(), RebuildError> {
    if let Err(e) = attrs.apply_to_scratch(scratch.addr(), scratch.len()) {
        log::debug!("vm-dedup: giving the unmerge scratch the region's attributes: {e}");
    }
    // One read of smaps (it walks every mapping of the process) for both.
    let smaps = procfs::Smaps::read().map_err(RebuildError::Smaps)?;
    for v in smaps.vmas(hva, hva + len).iter().filter(|v| !v.file) {
        let f = attrs::relevant(&v.flags);
        if f != want {
            return Err(RebuildError::Flags(differing(want, &f)));
        }
    }
    let v = smaps.vmas(scratch.addr(), scratch.addr() + scratch.len());
    let mut now = v
        .first()
        .map(|v| attrs::relevant(&v.flags))
        .unwrap_or_default();
    if attrs.locked_ahead() {
        // Locked on fault for now (`lf`, on kernels that show it), locked ahead once filled
        // (`Attrs::lock_scratch`).
        now.retain(|f| f != "lf");
    }
    if now != want {
        return Err(RebuildError::Flags(differing(want, &now)));
    }
    Ok(())
}

/// One region's rebuild in progress.
struct Rebuild<'a> {
    uffd: &'a Uffd,
    faults: &'a Faults,
    hva: usize,
    parts: Vec<Part>,
    scratch: Scratch,
    /// Byte offsets `[start, end)` of the pages moved into the scratch.
    moved: Vec<(usize, usize)>,
}

fn is_again(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EAGAIN)
}

impl Rebuild<'_> {
    fn bytes(&self, p: &Part) -> (usize, usize) {
        (
            self.hva + p.first * PAGE_SIZE,
            (p.end - p.first) * PAGE_SIZE,
        )
    }

    /// Step 1. On failure, [`Rebuild::release`] undoes whatever was done.
    fn guard(&self) -> Result<(), RebuildError> {
        for p in &self.parts {
            let (a, l) = self.bytes(p);
            let r = if p.file {
                self.uffd.register(a, l)
            } else {
                self.uffd.register_missing(a, l)
            };
            r.map_err(RebuildError::Guard)?;
        }
        self.uffd
            .register(self.scratch.addr(), self.scratch.len())
            .map_err(RebuildError::Guard)?;
        for p in self.parts.iter().filter(|p| p.file) {
            let (a, l) = self.bytes(p);
            self.uffd.protect(a, l).map_err(RebuildError::Guard)?;
        }
        Ok(())
    }

    /// Step 2. On failure, [`Rebuild::roll_back`] puts moved pages back.
    fn fill(&mut self, pagemap: &Pagemap) -> Result<(), RebuildError> {
        for p in self.parts.iter().filter(|p| p.file) {
            let (a, l) = self.bytes(p);
            // SAFETY: `[a, a + l)` is guest memory (pool-file mappings, write-protected, so
            // nobody changes it) and the same offsets of the scratch are ours; the two
            // mappings never overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    a as *const u8,
                    (self.scratch.addr() + (a - self.hva)) as *mut u8,
                    l,
                )
            };
        }
        // Anonymous parts: no page can appear there any more (a touch of a missing page waits),
        // so the pages present now are all there is to move.
        let anon: Vec<(usize, usize)> = self
            .parts
            .iter()
            .filter(|p| !p.file)
            .map(|p| self.bytes(p))
            .collect();
        for (a, l) in anon {
            let mut cats: Vec<PageRegion> = Vec::new();
            pagemap
                .scan(a, a + l, &mut cats)
                .map_err(RebuildError::Pagemap)?;
            for c in cats
                .iter()
                .filter(|c| c.categories & (PAGE_IS_PRESENT | PAGE_IS_SWAPPED) != 0)
            {
                self.move_run(c.start as usize, c.end as usize)?;
            }
        }
        Ok(())
    }

    /// Moves the pages of `[start, end)` into the scratch; a page that cannot be moved is
    /// write-protected and copied instead.
    fn move_run(&mut self, start: usize, end: usize) -> Result<(), RebuildError> {
        let mut at = start;
        let mut again = 0;
        while at < end {
            let off = at - self.hva;
            let (n, res) = match self.faults.check(FaultPoint::UnmergeMove) {
                Ok(()) => self
                    .uffd
                    .move_pages(self.scratch.addr() + off, at, end - at),
                Err(e) => (0, Err(e)),
            };
            if n > 0 {
                match self.moved.last_mut() {
                    Some(last) if last.1 == off => last.1 = off + n,
                    _ => self.moved.push((off, off + n)),
                }
                at += n;
                again = 0;
            }
            match res {
                Ok(()) => break,
                Err(e) if is_again(&e) && (n > 0 || again < 100) => {
                    again += 1;
                    std::thread::yield_now();
                }
                Err(e) => {
                    log::debug!("vm-dedup: moving page {at:#x} failed ({e}), copying it");
                    self.uffd
                        .protect(at, PAGE_SIZE)
                        .map_err(RebuildError::Guard)?;
                    // SAFETY: a present page of guest memory, write-protected now (nobody
                    // changes it), copied to the same offset of the scratch, which is ours.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            at as *const u8,
                            (self.scratch.addr() + off) as *mut u8,
                            PAGE_SIZE,
                        )
                    };
                    at += PAGE_SIZE;
                }
            }
        }
        Ok(())
    }

    /// Puts every moved page back where it came from (the region's anonymous parts, where its
    /// place is missing): with `UFFDIO_MOVE`, else with `UFFDIO_COPY`.
    fn roll_back(&mut self) {
        let scratch = self.scratch.addr();
        for (s, e) in std::mem::take(&mut self.moved) {
            let mut at = s;
            while at < e {
                let (n, res) = self.uffd.move_pages(self.hva + at, scratch + at, e - at);
                at += n;
                if res.is_ok() {
                    break;
                }
                if n > 0 {
                    continue;
                }
                let (c, res) = self.uffd.copy_pages(self.hva + at, scratch + at, PAGE_SIZE);
                if let Err(err) = res {
                    log::error!(
                        "vm-dedup: putting page {:#x} back failed: {err}",
                        self.hva + at
                    );
                }
                at += c.max(PAGE_SIZE);
            }
        }
    }

    /// Undoes the guard after a failure: the region is unregistered (which wakes everyone
    /// waiting and clears every write protection, the missing-page mode with it) and
    /// registered again for write-protect faults only.
    fn release(&self, unregistered: &mut Ranges) {
        let len = self.scratch.len();
        if let Err(e) = self.uffd.unregister(self.hva, len) {
            log::warn!("vm-dedup: releasing the unmerge guard: {e}");
        }
        reregister(self.uffd, self.hva, len, unregistered);
    }
}

/// Registers a whole region again (write-protect only) and wakes anyone still waiting; a range
/// that cannot be registered is left to the commit, which registers what it guards.
fn reregister(uffd: &Uffd, hva: usize, len: usize, unregistered: &mut Ranges) -> bool {
    unregistered.clear();
    if let Err(e) = uffd.register(hva, len) {
        log::warn!("vm-dedup: registering guest memory again failed: {e}");
        add_range(unregistered, hva, hva + len);
    }
    let woke = (0..2).any(|_| uffd.wake(hva, len).is_ok());
    let mut faulted = Vec::new();
    let _ = uffd.drain(&mut faulted);
    woke
}

/// How a region's unmerge went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rebuilt {
    /// Rebuilt as one anonymous mapping.
    Yes,
    /// Rebuilt, but waking the threads that waited failed: the guard must be replaced.
    WakeFailed,
}

/// Rebuilds region `r` as one anonymous mapping (see the module docs).
fn rebuild(r: &mut Region, pagemap: &Pagemap, faults: &Faults) -> Result<Rebuilt, RebuildError> {
    let Region {
        hva,
        pages,
        metas,
        uffd,
        unregistered,
        attrs,
        vma_flags,
        ..
    } = r;
    let (hva, len) = (*hva, *pages * PAGE_SIZE);
    let uffd = uffd.as_ref().ok_or(RebuildError::Unguarded)?;
    let scratch = Scratch::new(len).map_err(RebuildError::Scratch)?;
    match_flags((hva, len), vma_flags, *attrs, &scratch)?;
    let mut rb = Rebuild {
        uffd,
        faults,
        hva,
        parts: parts(metas),
        scratch,
        moved: Vec::new(),
    };
    if let Err(e) = rb.guard() {
        rb.release(unregistered);
        return Err(e);
    }
    let filled = rb.fill(pagemap).and_then(|()| {
        attrs
            .lock_scratch(rb.scratch.addr(), len)
            .map_err(RebuildError::Lock)
    });
    if let Err(e) = filled {
        rb.roll_back();
        rb.release(unregistered);
        return Err(e);
    }
    // Unregistered, the scratch moves by whole page tables instead of page by page.
    let _ = uffd.unregister(rb.scratch.addr(), len);
    let Rebuild {
        scratch,
        parts,
        moved,
        ..
    } = rb;
    let swapped = match swap_faults(faults, hva, len) {
        Err(e) => Err((scratch, e)),
        // SAFETY: the region is guest memory the engine holds; every page of it is in the
        // scratch now (copied under write protection, or moved, after which any access
        // waits), so readers see the same bytes before and after, and waiting writers retry
        // on the new mapping.
        Ok(()) => unsafe { scratch.move_over(hva) },
    };
    if let Err((scratch, e)) = swapped {
        if !mem::is_mapped(hva, len) {
            // `mremap` unmaps its destination before it moves anything: failing late, it left
            // the guest's range unmapped. Every page is in the scratch: move it in again.
            log::error!(
                "vm-dedup: moving the rebuilt region over {hva:#x} failed after the kernel \
                 unmapped it ({e}): moving it in again"
            );
            let refilled = refill(scratch, hva, faults);
            // Whatever happened, nobody may stay waiting on the guard.
            let woke = reregister(uffd, hva, len, unregistered);
            refilled.map_err(RebuildError::Refill)?;
            return Ok(if woke {
                Rebuilt::Yes
            } else {
                Rebuilt::WakeFailed
            });
        }
        // The moves back need the scratch registered like the region.
        let _ = uffd.register(scratch.addr(), len);
        let mut rb = Rebuild {
            uffd,
            faults,
            hva,
            parts,
            scratch,
            moved,
        };
        rb.roll_back();
        rb.release(unregistered);
        return Err(RebuildError::Remap(e));
    }
    Ok(if reregister(uffd, hva, len, unregistered) {
        Rebuilt::Yes
    } else {
        Rebuilt::WakeFailed
    })
}

/// Fails the swap where a failure is armed. `UnmergeRemapLate` fails it as `mremap` does when
/// it fails after unmapping its destination.
fn swap_faults(faults: &Faults, hva: usize, len: usize) -> io::Result<()> {
    faults.check(FaultPoint::UnmergeRemap)?;
    // SAFETY: the region is guest memory the engine holds, guarded (any access waits) and
    // entirely copied or moved into the scratch, as when `mremap` unmaps it.
    unsafe { faults.check_late(FaultPoint::UnmergeRemapLate, hva, len) }
}

/// Moves `scratch` over `hva` again after a move failed late, leaving the range unmapped:
/// the hole is claimed first (so that no mapping made meanwhile is replaced), then the
/// scratch moves over the claim in one step, as in a rebuild. Accesses meanwhile find nothing
/// mapped (as they did since the failed move); waiters on the guard wait on. If this fails too,
/// the guest's memory is gone (nothing, or an inaccessible claim, is mapped there) and the
/// scratch is kept mapped (leaked) with its content, its address logged.
fn refill(scratch: Scratch, hva: usize, faults: &Faults) -> io::Result<()> {
    let lost = |scratch: Scratch, e: io::Error| {
        log::error!(
            "vm-dedup: guest memory at {hva:#x} cannot be mapped again ({e}); its content is \
             kept at {:#x}",
            scratch.addr()
        );
        std::mem::forget(scratch);
        e
    };
    let claimed = faults
        .check(FaultPoint::UnmergeRefill)
        .and_then(|()| mem::claim_hole(hva, scratch.len()));
    if let Err(e) = claimed {
        return Err(lost(scratch, e));
    }
    // SAFETY: `[hva, hva + len)` is the guest's range, now the engine's own inaccessible claim;
    // the scratch holds every byte of the region, as in a rebuild's move.
    unsafe { scratch.move_over(hva) }.map_err(|(scratch, e)| lost(scratch, e))
}

impl State {
    /// Turns the merged and zero pages of guest `gi` back into private pages with the same
    /// content. Regions holding merged pages are rebuilt as plain anonymous memory (see the
    /// module docs); where that fails, and for zero pages, `MADV_POPULATE_WRITE` breaks the
    /// sharing in place without changing a byte. Pagemap then confirms each page; slot
    /// references are rebuilt by the caller.
    pub(crate) fn unmerge_guest(&mut self, gi: usize, faults: &Faults) -> Result<(), EngineError> {
        let State {
            guests,
            pagemap,
            totals,
            ..
        } = self;
        let Some(g) = guests.get_mut(gi).and_then(Option::as_mut) else {
            return Ok(());
        };
        let mut failed = 0u64;
        for r in g.regions.iter_mut().filter(|r| r.active()) {
            if r.metas.iter().any(|m| m.remapped()) {
                match rebuild(r, pagemap, faults) {
                    Ok(how) => {
                        for m in r.metas.iter_mut() {
                            *m = m.anonymous();
                            if m.state() == PageState::Merged {
                                *m = m.with(PageState::New, 0);
                            }
                        }
                        totals.rebuilt_regions += 1;
                        if how == Rebuilt::WakeFailed {
                            log::error!("vm-dedup: cannot wake writers; replacing the guard");
                            r.replace_guard();
                        }
                    }
                    Err(e @ RebuildError::Refill(_)) => {
                        // The guest's memory is not there any more: the engine lets go of the
                        // region (never reads, scans nor merges it again), nothing there maps
                        // the pool (its slots are freed when no other page holds them), and
                        // nothing is unmerged in place.
                        log::error!("vm-dedup: the region at {:#x} is lost: {e}", r.hva);
                        r.let_go();
                        for m in r.metas.iter_mut() {
                            *m = m.anonymous().with(PageState::New, 0);
                        }
                        failed += r.pages as u64;
                        continue;
                    }
                    Err(e) => {
                        log::warn!(
                            "vm-dedup: unmerging the region at {:#x} in place (its pool \
                             mappings stay): {e}",
                            r.hva
                        );
                        totals.unmerged_in_place += 1;
                    }
                }
            }
            failed += unmerge_in_place(r, pagemap);
        }
        if failed > 0 {
            return Err(EngineError::Unmerge(failed));
        }
        Ok(())
    }
}

/// Breaks the sharing of the merged and zero pages of `r` where they are, then checks every
/// such page with pagemap; returns how many are not private.
fn unmerge_in_place(r: &mut Region, pagemap: &Pagemap) -> u64 {
    let mut failed = 0;
    let mut i = 0;
    while i < r.pages {
        let merged = |k: usize| matches!(r.metas[k].state(), PageState::Merged | PageState::Zero);
        if !merged(i) {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < r.pages && merged(j) {
            j += 1;
        }
        let (addr, len) = (r.hva + i * PAGE_SIZE, (j - i) * PAGE_SIZE);
        if let Err(e) = mem::populate_write(addr, len) {
            log::warn!("vm-dedup: unmerging {len} bytes failed: {e}");
        }
        let mut cats: Vec<PageRegion> = Vec::new();
        if let Err(e) = pagemap.scan(addr, addr + len, &mut cats) {
            log::warn!("vm-dedup: PAGEMAP_SCAN failed while unmerging: {e}");
        }
        for k in i..j {
            let a = (r.hva + k * PAGE_SIZE) as u64;
            let cat = cats
                .iter()
                .find(|c| c.start <= a && a < c.end)
                .map_or(0, |c| c.categories);
            let private = cat & PAGE_IS_PRESENT != 0 && cat & PAGE_IS_FILE == 0;
            if private {
                r.metas[k] = r.metas[k].with(PageState::New, 0);
            } else {
                failed += 1;
            }
        }
        i = j;
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_follow_the_remapped_flag() {
        let anon = Meta::new(PageState::Stable, 1);
        let file = Meta::new(PageState::Merged, 2).remapped_now();
        let broken = file.with(PageState::New, 0);
        let metas = [anon, file, broken, anon, anon, file];
        let p = parts(&metas);
        assert_eq!(
            p,
            vec![
                Part {
                    first: 0,
                    end: 1,
                    file: false
                },
                Part {
                    first: 1,
                    end: 3,
                    file: true
                },
                Part {
                    first: 3,
                    end: 5,
                    file: false
                },
                Part {
                    first: 5,
                    end: 6,
                    file: true
                },
            ]
        );
        assert!(parts(&[]).is_empty());
    }
}
