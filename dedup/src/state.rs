//! The engine's mutable state, guarded by one mutex: guests, pools, slots, index, VMA budget,
//! scan cursor and cumulative counters.

use std::sync::Mutex;

use crate::budget::VmaBudget;
use crate::guest::{Guest, GuestId, Region};
use crate::index::{ContentIndex, PageLoc};
use crate::meta::PageState;
use crate::plan::{self, PlanView, Rules};
use crate::pool::Pools;
use crate::slots::SlotTable;
use crate::stats::Failures;
use crate::sys::PAGE_SIZE;
use crate::sys::pagemap::Pagemap;
use crate::sys::procfs;

/// Where the scan is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub guest: usize,
    pub region: usize,
    pub page: usize,
}

/// Cumulative counters.
#[derive(Clone, Debug, Default)]
pub(crate) struct Totals {
    pub full_scans: u64,
    pub merge_attempts: u64,
    pub merges: u64,
    pub failures: Failures,
    pub guard_repairs: u64,
    pub guarded_writes: u64,
    pub cpu_ns: u64,
    pub wall_ns: u64,
    pub pool_errors: u64,
    pub rebuilt_regions: u64,
    pub unmerged_in_place: u64,
    pub held_back: u64,
    pub phases: crate::stats::PhaseTimes,
}

#[derive(Debug)]
pub(crate) struct State {
    pub guests: Vec<Option<Guest>>,
    /// Trust-domain names by number (forgotten once nothing uses them).
    pub domains: crate::ids::Domains,
    pub pools: Pools,
    pub slots: SlotTable,
    pub index: ContentIndex,
    pub budget: Mutex<VmaBudget>,
    pub budget_auto: bool,
    pub cursor: Cursor,
    pub in_pass: bool,
    pub pagemap: Pagemap,
    pub rules: Rules,
    pub totals: Totals,
    pub next_id: u32,
    /// Pages whose merge was refused for differing bytes: compared before being planned again.
    pub distrusted: hashbrown::HashSet<PageLoc>,
    /// Slots still mapped by memory that left the engine (see `Engine::unregister`): never
    /// punched or reused, whatever their reference count.
    pub pinned: hashbrown::HashSet<u32>,
    /// Free numbers of the index's page numbering (those of guests that left are given back).
    pub page_ids: crate::ids::PageIds,
    /// Kinds of failure going on, their backoff and their log lines.
    pub troubles: crate::backoff::Troubles,
    /// Failures not yet handed to `troubles` (from operations outside a step's commit).
    pub pending: crate::backoff::Tally,
    /// A learnt VMA limit was lifted to see whether there is more room now.
    pub vma_probe: bool,
    /// Something may have changed the VMAs inside guest memory since they were counted.
    pub vmas_changed: bool,
    /// When the VMAs were last counted.
    pub vmas_counted: Option<std::time::Instant>,
    /// The pass going on began after a pass that changed nothing: the index kept its stable
    /// pages, and only pages new to the planner are planned (the others would be decided the
    /// same way again).
    pub quiet: bool,
    /// Something changed during the pass going on (a merge, a copy-on-write break, a slot
    /// freed, a failure, the VMA count, a registration or a setting).
    pub changed: bool,
    /// The pass going on plans every stable page again only because runs waited for longer
    /// ones in the last pass, which changed nothing: if it changes nothing either, the next
    /// one is quiet all the same.
    pub replanning: bool,
}

impl State {
    pub fn guest_index(&self, id: GuestId) -> Option<usize> {
        self.guests
            .iter()
            .position(|g| g.as_ref().is_some_and(|g| g.id == id))
    }

    /// The number of trust domain `name`, a new one if it has none; `None` when every number
    /// is taken by a domain still in use. Numbers of domains nothing uses any more are
    /// normally forgotten as their last guest leaves (`forget_domain_if_unused`); those still
    /// held then by slots freed later are forgotten here, once no number is left.
    pub fn domain_id(&mut self, name: &str) -> Option<u16> {
        if let Some(id) = self.domains.id(name) {
            return Some(id);
        }
        let mut guests = vec![false; crate::ids::MAX_DOMAINS];
        for g in self.guests.iter().flatten() {
            if let Some(u) = guests.get_mut(usize::from(g.domain)) {
                *u = true;
            }
        }
        for d in self.domains.known() {
            if !guests[usize::from(d)] && self.slots.domain_slots(d) == 0 {
                self.forget_domain(d);
            }
        }
        self.domains.id(name)
    }

    /// Forgets trust domain `d` if nothing uses it any more, so that its number can go to
    /// another domain. A domain number is used by:
    /// - registered guests of the domain (their pages are indexed and merged under it);
    /// - allocated pool slots of the domain (`SlotTable::domain`): slots still mapped by a
    ///   guest, slots whose punch failed (freed by a later pass), and pinned slots, still
    ///   mapped by memory that left the engine and kept for good: such a slot keeps its domain
    ///   for good too;
    /// - index entries under the domain's keys: page entries of its guests' pages (dropped
    ///   with each guest, `ContentIndex::remove_guest`) and slot entries of its slots (dropped
    ///   as each slot is freed, `plan::release`).
    ///
    /// With no guest and no slot of the domain left, nothing else can name the number (plans
    /// live within one step, under the state lock like this), so a domain that takes it over
    /// can neither find nor join a page or slot of the old one: two domains never share a pool
    /// page. Its index tables are dropped all the same (they should be empty).
    pub fn forget_domain_if_unused(&mut self, d: u16) {
        let guests = self.guests.iter().flatten().any(|g| g.domain == d);
        if !guests && self.slots.domain_slots(d) == 0 {
            self.forget_domain(d);
        }
    }

    /// Forgets trust domain `d`, which nothing uses (see `forget_domain_if_unused`).
    fn forget_domain(&mut self, d: u16) {
        let left = self.index.forget_domain(d);
        if left > 0 {
            log::error!("vm-dedup: trust domain {d} forgotten with {left} index entries left");
        }
        self.domains.forget(d);
    }

    /// Numbers the pages of guest `gi`'s active `regions` for the index, one range each (from
    /// numbers given back by guests that left, first fit), and returns the number of its
    /// trust domain `domain`; `None`, with nothing taken, when either has run out.
    pub fn number_guest(&mut self, gi: usize, regions: &[Region], domain: &str) -> Option<u16> {
        let lens: Vec<u32> = regions
            .iter()
            .map(|r| {
                if r.active() {
                    u32::try_from(r.pages).ok()
                } else {
                    Some(0)
                }
            })
            .collect::<Option<_>>()?;
        let bases = self.page_ids.take_all(&lens)?;
        // The domain last: nothing that can fail comes after it, so it is never left taken.
        let Some(domain) = self.domain_id(domain) else {
            for (&base, &len) in bases.iter().zip(&lens) {
                self.page_ids.give_back(base, len);
            }
            return None;
        };
        for (ri, (&base, &len)) in bases.iter().zip(&lens).enumerate() {
            if len > 0 {
                self.index.number_region(gi as u16, ri as u16, base, len);
            }
        }
        Some(domain)
    }

    /// Drops the index entries and the page numbering of guest `gi` (which has left) and gives
    /// its page numbers back for other guests.
    ///
    /// Why reusing them is safe: `remove_guest` drops every index entry that holds one, and
    /// nothing else holds them: slots record no page (a new slot's donor is a place, in a plan
    /// that lives within one step, under the state lock like this), `distrusted` names pages by
    /// place (and the caller drops the guest's), and the stability state is the guest's page
    /// metadata, gone with it. A number left in an entry would name another guest's page,
    /// maybe of another trust domain.
    pub fn unnumber_guest(&mut self, gi: usize) {
        for (base, len) in self.index.remove_guest(gi as u16) {
            self.page_ids.give_back(base, len);
        }
    }

    /// Host address of a page.
    pub fn addr(&self, loc: PageLoc) -> Option<usize> {
        let g = self.guests.get(usize::from(loc.guest))?.as_ref()?;
        let r = g.regions.get(usize::from(loc.region))?;
        ((loc.page as usize) < r.pages && r.active()).then(|| r.addr(loc.page))
    }

    /// Host ranges of the regions of every guest, active ones only or all.
    fn ranges(&self, active_only: bool) -> Vec<(usize, usize)> {
        self.guests
            .iter()
            .flatten()
            .flat_map(|g| g.regions.iter())
            .filter(|r| !active_only || r.active())
            .map(|r| (r.hva, r.hva + r.pages * PAGE_SIZE))
            .collect()
    }

    /// Host ranges of every region of every guest, active or not.
    pub fn guest_ranges(&self) -> Vec<(usize, usize)> {
        self.ranges(false)
    }

    /// Address ranges of every active region.
    pub fn active_ranges(&self) -> Vec<(usize, usize)> {
        self.ranges(true)
    }

    /// VMAs of the process, and of them those inside active guest memory.
    pub fn count_vmas(&self) -> std::io::Result<(usize, usize)> {
        procfs::count_vmas(&self.active_ranges())
    }

    /// Something outside the scan changed guest memory, pages or settings: the next pass
    /// plans every stable page again.
    pub fn stir(&mut self) {
        self.changed = true;
        self.quiet = false;
    }

    /// Frees slots nobody maps: punches their pool pages, then forgets them. Slots whose punch
    /// fails stay allocated and are tried again later.
    pub fn release_slots(&mut self, mut slots: Vec<u32>, faults: &crate::fault::Faults) {
        if !self.pinned.is_empty() {
            slots.retain(|s| !self.pinned.contains(s));
        }
        if !slots.is_empty() {
            self.changed = true;
        }
        slots.sort_unstable();
        let mut i = 0;
        while i < slots.len() {
            let node = self.slots.node(slots[i]);
            let mut j = i + 1;
            while j < slots.len()
                && slots[j] == slots[j - 1] + 1
                && self.slots.node(slots[j]) == node
            {
                j += 1;
            }
            let ok = if self.pools.exists(node) {
                let punched = self.pools.punch(node, slots[i], (j - i) as u32, faults);
                if let Err(e) = &punched {
                    self.pending
                        .add(crate::backoff::Trouble::Punch, &e.describe());
                }
                punched.is_ok()
            } else {
                true
            };
            if ok {
                for &s in &slots[i..j] {
                    plan::release(s, &self.rules, &mut self.index, &mut self.slots);
                }
            } else {
                self.totals.pool_errors += 1;
            }
            i = j;
        }
    }

    /// Mappings of this engine's pool files that overlap `ranges`.
    fn pool_mappings_in(
        &self,
        ranges: &[(usize, usize)],
    ) -> std::io::Result<Vec<procfs::FileMapping>> {
        let mut maps = procfs::file_mappings_in(ranges)?;
        maps.retain(|m| self.pools.is_pool_file(m.dev, m.inode));
        Ok(maps)
    }

    /// Pins every slot that a pool mapping inside `ranges` (memory no longer registered) still
    /// maps, so that it is never punched or reused. Returns how many pages still map the pool.
    pub fn pin_slots_mapped_in(&mut self, ranges: &[(usize, usize)]) -> u64 {
        let maps = match self.pool_mappings_in(ranges) {
            Ok(m) => m,
            Err(e) => {
                // Without the maps nothing can be freed safely: keep every slot in use.
                log::error!("vm-dedup: reading /proc/self/maps failed ({e}): no slot is freed");
                self.pinned.extend(self.slots.all_allocated());
                return 0;
            }
        };
        let mut pages = 0;
        for m in &maps {
            let count = ((m.end - m.start) / PAGE_SIZE) as u64;
            for slot in self.pools.slots_mapped(m.dev, m.inode, m.offset, count) {
                self.pinned.insert(slot);
                self.slots.reserve(slot);
            }
            pages += count;
        }
        if pages > 0 {
            log::error!(
                "vm-dedup: memory no longer registered still maps {pages} pool pages (held \
                 elsewhere, or not unmerged): their slots are kept and never reused"
            );
        }
        pages
    }

    /// Whether any of `ranges` overlaps the memory of a registered guest.
    pub fn overlaps_guests(&self, ranges: &[(usize, usize)]) -> bool {
        self.guest_ranges()
            .iter()
            .any(|&(s, e)| ranges.iter().any(|&(a, b)| a < e && s < b))
    }

    /// Whether a mapping of this engine's pool overlaps `ranges`.
    pub fn maps_pool_in(&self, ranges: &[(usize, usize)]) -> std::io::Result<bool> {
        Ok(!self.pool_mappings_in(ranges)?.is_empty())
    }

    /// Recounts every slot's references from page metadata (kept exact by the pagemap checks of
    /// each pass) and frees the slots nobody maps.
    pub fn rebuild_refs(&mut self, faults: &crate::fault::Faults) {
        let mut counts = vec![0u32; self.slots.high_water() as usize];
        for g in self.guests.iter().flatten() {
            for r in &g.regions {
                for m in &r.metas {
                    if m.state() == PageState::Merged {
                        if let Some(c) = counts.get_mut(m.payload() as usize) {
                            *c += 1;
                        }
                    }
                }
            }
        }
        for s in self.slots.all_allocated() {
            let n = counts.get(s as usize).copied().unwrap_or(0);
            let n = u16::try_from(n).unwrap_or(u16::MAX);
            if self.slots.refs(s) != n {
                log::debug!(
                    "vm-dedup: slot {s} had {} refs, counted {n}",
                    self.slots.refs(s)
                );
                self.slots.set_refs(s, n);
            }
        }
        let unref = self.slots.unreferenced();
        self.release_slots(unref, faults);
    }
}

/// The planner's view of guest pages.
pub(crate) struct EngineView<'a> {
    pub state: &'a State,
    pub topology: &'a dyn crate::numa::Topology,
}

impl PlanView for EngineView<'_> {
    fn stable_hash(&self, loc: PageLoc) -> Option<u32> {
        let g = self.state.guests.get(usize::from(loc.guest))?.as_ref()?;
        let m = g
            .regions
            .get(usize::from(loc.region))?
            .metas
            .get(loc.page as usize)?;
        (m.state() == PageState::Stable).then(|| m.payload())
    }

    fn same_content(&self, a: PageLoc, b: PageLoc) -> bool {
        match (self.state.addr(a), self.state.addr(b)) {
            (Some(x), Some(y)) => {
                // SAFETY: both are pages of registered, active guest regions, mapped while the
                // engine holds the guests; racing writes only make the comparison fail, and this
                // comparison decides nothing on its own (the commit compares again under guard).
                let (pa, pb) = unsafe {
                    (
                        std::slice::from_raw_parts(x as *const u8, PAGE_SIZE),
                        std::slice::from_raw_parts(y as *const u8, PAGE_SIZE),
                    )
                };
                pa == pb
            }
            _ => false,
        }
    }

    fn matches_slot(&self, loc: PageLoc, node: u8, slot: u32) -> bool {
        match (
            self.state.addr(loc),
            self.state.pools.slot_bytes(node, slot),
        ) {
            (Some(x), Ok(pool)) => {
                // SAFETY: a page of a registered, active guest region (see `same_content`).
                let page = unsafe { std::slice::from_raw_parts(x as *const u8, PAGE_SIZE) };
                page == pool
            }
            _ => false,
        }
    }

    fn distrusted(&self, loc: PageLoc) -> bool {
        self.state.distrusted.contains(&loc)
    }

    fn on_node(&self, loc: PageLoc, node: u8) -> bool {
        if self.topology.node_count() == 1 {
            return true;
        }
        let Some(addr) = self.state.addr(loc) else {
            return false;
        };
        let mut now = [0u8];
        self.topology.nodes_of(&[addr], &mut now).is_ok() && now[0] == node
    }
}
