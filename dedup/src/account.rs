//! Statistics from the engine state, and discarding guest memory.

use crate::engine::EngineError;
use crate::fault::{FaultPoint, Faults};
use crate::meta::PageState;
use crate::state::State;
use crate::stats::{GuestStats, Stats};
use crate::sys::PAGE_SIZE;
use crate::sys::attrs::Attrs;
use crate::sys::mem;

impl State {
    /// Discards pages `[first, first + count)` of region `ri` of guest `gi`: they read as zeros
    /// afterwards. Pages that were ever remapped onto the pool get fresh anonymous memory
    /// (`MADV_DONTNEED` would bring back pool content); the others are dropped.
    pub(crate) fn discard(
        &mut self,
        gi: usize,
        ri: usize,
        first: usize,
        count: usize,
        faults: &Faults,
    ) -> Result<(), EngineError> {
        let State {
            guests,
            slots,
            budget,
            vmas_changed,
            ..
        } = self;
        let Some(r) = guests
            .get_mut(gi)
            .and_then(Option::as_mut)
            .and_then(|g| g.regions.get_mut(ri))
        else {
            return Ok(());
        };
        let (addr, len) = (r.hva + first * PAGE_SIZE, count * PAGE_SIZE);
        let Some(uffd) = r.uffd.as_ref() else {
            return Err(EngineError::NoAddress(r.gpa + (first * PAGE_SIZE) as u64));
        };
        let mut lost = None;
        if r.metas[first..first + count].iter().any(|m| m.remapped()) {
            match fresh_memory(addr, len, r.attrs, faults) {
                Ok(()) => {
                    // Fresh memory inside merged runs splits them.
                    if let Ok(b) = budget.get_mut() {
                        b.charge(crate::budget::VMAS_PER_REMAP);
                    }
                    *vmas_changed = true;
                    crate::merge::remove_range(&mut r.unregistered, addr, addr + len);
                    if let Err(e) = uffd.register(addr, len) {
                        log::warn!("vm-dedup: registering discarded memory failed: {e}");
                        crate::merge::add_range(&mut r.unregistered, addr, addr + len);
                    }
                }
                Err(Unfresh::Kept(e)) => return Err(EngineError::Discard(e)),
                Err(Unfresh::Hole(e)) => {
                    // The engine lets go of the region. Its other merged pages keep their slots,
                    // and a write to them still gets a private copy from the kernel.
                    log::error!(
                        "vm-dedup: discarding guest memory at {addr:#x} unmapped it and it \
                         cannot be mapped again ({e}): the region at {:#x} is lost; release \
                         the guest (Engine::release)",
                        r.hva
                    );
                    r.let_go();
                    lost = Some(e);
                }
            }
        } else {
            // SAFETY: anonymous guest memory whose content the VMM discards.
            unsafe { mem::dont_need(addr, len) }.map_err(EngineError::Discard)?;
        }
        for m in &mut r.metas[first..first + count] {
            if m.state() == PageState::Merged {
                slots.dec(m.payload());
            }
            *m = crate::meta::Meta::NEW;
        }
        lost.map_or(Ok(()), |e| Err(EngineError::Discard(e)))
    }

    /// Computes all statistics. Gauges come from page metadata, which pagemap keeps exact.
    pub(crate) fn stats(&self) -> Stats {
        let mut s = Stats::default();
        let mut seen = vec![0u64; (self.slots.high_water() as usize).div_ceil(64)];
        let mut metadata = self.slots.memory_bytes() + self.index.memory_bytes();
        for g in self.guests.iter().flatten() {
            let mut gs = GuestStats {
                id: g.id.0,
                name: g.name.clone(),
                domain: self
                    .domains
                    .name(g.domain)
                    .map(str::to_string)
                    .unwrap_or_default(),
                pages_scanned: g.pages_scanned,
                cow_breaks: g.cow_breaks,
                ..GuestStats::default()
            };
            let mut merged = 0u64;
            let mut meta_bytes = 0usize;
            for r in &g.regions {
                if !r.active() {
                    gs.pages_skipped += r.pages as u64;
                    continue;
                }
                gs.pages += r.pages as u64;
                meta_bytes += r.metas.capacity() * std::mem::size_of::<crate::meta::Meta>();
                for m in &r.metas {
                    match m.state() {
                        PageState::Merged => {
                            merged += 1;
                            let slot = m.payload() as usize;
                            if let Some(w) = seen.get_mut(slot / 64) {
                                if *w & (1 << (slot % 64)) == 0 {
                                    *w |= 1 << (slot % 64);
                                    gs.pages_shared += 1;
                                }
                            }
                        }
                        PageState::Zero => gs.zero_pages += 1,
                        PageState::Stable => gs.pages_unshared += 1,
                        PageState::Volatile => gs.pages_volatile += 1,
                        _ => {}
                    }
                }
            }
            gs.pages_sharing = merged - gs.pages_shared;
            gs.bytes_saved = (gs.pages_sharing + gs.zero_pages) * PAGE_SIZE as u64;
            gs.general_profit = gs.bytes_saved as i64 - meta_bytes as i64;
            metadata += meta_bytes;
            s.pages_shared += gs.pages_shared;
            s.pages_sharing += gs.pages_sharing;
            s.pages_unshared += gs.pages_unshared;
            s.pages_volatile += gs.pages_volatile;
            s.pages_scanned += gs.pages_scanned;
            s.zero_pages += gs.zero_pages;
            s.cow_breaks += gs.cow_breaks;
            s.pages += gs.pages;
            s.pages_skipped += gs.pages_skipped;
            s.guests.push(gs);
        }
        let t = &self.totals;
        s.full_scans = t.full_scans;
        s.merge_attempts = t.merge_attempts;
        s.merges = t.merges;
        s.failures = t.failures;
        s.guard_repairs = t.guard_repairs;
        s.guarded_writes = t.guarded_writes;
        s.cpu_ns = t.cpu_ns;
        s.wall_ns = t.wall_ns;
        s.pool_errors = t.pool_errors;
        s.rebuilt_regions = t.rebuilt_regions;
        s.pinned_slots = self.pinned.len() as u64;
        s.unmerged_in_place = t.unmerged_in_place;
        s.pool_error = self.pools.last_error();
        s.held_back = t.held_back;
        let now = std::time::Instant::now();
        s.failing = self
            .troubles
            .episodes()
            .iter()
            .map(|e| crate::stats::Failing {
                cause: e.trouble.name().to_string(),
                what: e.trouble.describe(),
                failures: e.failures,
                last_error: e.last_error.clone(),
                secs: now.duration_since(e.began).as_secs(),
                held_back: e.trouble.backs_off(),
            })
            .collect();
        s.phases = t.phases;
        s.bytes_saved = (s.pages_sharing + s.zero_pages) * PAGE_SIZE as u64;
        s.metadata_bytes = metadata as u64;
        s.general_profit = s.bytes_saved as i64 - metadata as i64;
        if let Ok(b) = self.budget.lock() {
            s.vmas_used = b.used();
            s.vma_budget = b.limit();
            s.vma_budget_learned = b.learned();
            s.vma_budget_reached = b.reached();
        }
        s
    }
}

/// Replaces `[addr, addr + len)` (registered guest memory being discarded) with fresh memory,
/// given the region's attributes `attrs`. Before Linux 6.12 `mmap` unmaps the range first and
/// can still fail after that (the new VMA's allocation under memory pressure): fresh memory is
/// then mapped into the hole, which is what the discard asked for.
fn fresh_memory(addr: usize, len: usize, attrs: Attrs, faults: &Faults) -> Result<(), Unfresh> {
    // SAFETY: the range is registered guest memory whose content the VMM discards; nobody
    // writes it meanwhile (`Engine::discard`'s contract).
    let replaced = unsafe { faults.check_late(FaultPoint::DiscardLate, addr, len) }
        // SAFETY: as above.
        .and_then(|()| unsafe { mem::map_anonymous_fixed(addr, len) });
    let Err(e) = replaced else {
        give_attrs(attrs, addr, len);
        return Ok(());
    };
    if mem::is_mapped(addr, len) {
        return Err(Unfresh::Kept(e));
    }
    match faults
        .check(FaultPoint::DiscardRefill)
        .and_then(|()| mem::fill_hole(addr, len))
    {
        Ok(()) => {
            log::warn!(
                "vm-dedup: discarding guest memory at {addr:#x} unmapped it ({e}); mapped fresh \
                 memory in again"
            );
            give_attrs(attrs, addr, len);
            Ok(())
        }
        Err(_) => Err(Unfresh::Hole(e)),
    }
}

/// Why [`fresh_memory`] failed, with the error of the first `mmap`.
enum Unfresh {
    /// Nothing changed: the range is mapped as it was.
    Kept(std::io::Error),
    /// The range was unmapped, and nothing could be mapped into the hole.
    Hole(std::io::Error),
}

/// Gives fresh memory `[addr, addr + len)` the attributes of its region (no system call for a
/// region without any). The discard stands if this fails: the error is logged.
fn give_attrs(attrs: Attrs, addr: usize, len: usize) {
    if attrs.is_empty() {
        return;
    }
    if let Err(e) = attrs.apply_to_anonymous(addr, len) {
        log::error!(
            "vm-dedup: discarded guest memory at {addr:#x} ({len} bytes) lacks attributes of \
             its region ({attrs:?}): {e}"
        );
    }
}
