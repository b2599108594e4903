//! Statistics, global and per guest, with kernel KSM's names and meanings where they exist.

use crate::merge::{Cause, Repairs};

/// Merges refused, by cause. With the `serde` feature it serializes as an object with these
/// field names, the names [`Failures::by_cause`] gives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Failures {
    /// Bytes differed under the guard (page changed, or hash collision).
    pub differed: u64,
    /// Page had device I/O in flight.
    pub excluded: u64,
    /// Page was outside userfaultfd's guard.
    pub unguarded: u64,
    /// VMA budget refused the remap.
    pub vma_budget: u64,
    /// Write-protect failed.
    pub protect: u64,
    /// Remap failed.
    pub remap: u64,
    /// Remap failed with ENOMEM at `vm.max_map_count`.
    pub vma_limit: u64,
    /// Dropping a zero page failed.
    pub zero_page: u64,
    /// Pool could not be created, grown, filled or read.
    pub pool: u64,
}

impl Failures {
    /// Counts one refusal.
    pub fn count(&mut self, cause: Cause) {
        let c = match cause {
            Cause::Differed => &mut self.differed,
            Cause::Excluded => &mut self.excluded,
            Cause::Unguarded => &mut self.unguarded,
            Cause::VmaBudget => &mut self.vma_budget,
            Cause::Protect => &mut self.protect,
            Cause::Remap => &mut self.remap,
            Cause::VmaLimit => &mut self.vma_limit,
            Cause::ZeroPage => &mut self.zero_page,
            Cause::Pool => &mut self.pool,
        };
        *c += 1;
    }

    /// Each cause's name, as the statistics spell it (the field's name), with its count.
    pub fn by_cause(&self) -> [(&'static str, u64); 9] {
        [
            ("differed", self.differed),
            ("excluded", self.excluded),
            ("unguarded", self.unguarded),
            ("vma_budget", self.vma_budget),
            ("protect", self.protect),
            ("remap", self.remap),
            ("vma_limit", self.vma_limit),
            ("zero_page", self.zero_page),
            ("pool", self.pool),
        ]
    }

    /// All refusals.
    pub fn total(&self) -> u64 {
        self.by_cause().iter().map(|&(_, n)| n).sum()
    }
}

/// A kind of failure going on (see `vm_dedup::backoff`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Failing {
    /// Short name: `vma_limit`, `remap`, `protect`, `zero_page`, `pool`, `punch`, `guard` or
    /// `scan`.
    pub cause: String,
    /// What fails, e.g. `the pool of node 0`.
    pub what: String,
    /// Failures since it began.
    pub failures: u64,
    /// The latest error, e.g. `Too many open files (os error 24)`.
    pub last_error: String,
    /// Seconds since it began.
    pub secs: u64,
    /// Whether the merges it would refuse are held back until the next try.
    pub held_back: bool,
}

/// Wall time spent in each phase of the scan steps, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhaseTimes {
    /// Reading page categories, hashing, stability.
    pub scan_ns: u64,
    /// Merge decisions.
    pub plan_ns: u64,
    /// Creating and growing pools, plus filling slots (done inside the commit, where donors are
    /// copied under the guard: summed over worker threads, and also part of `commit_ns`).
    pub fill_ns: u64,
    /// Guarded compare and remap.
    pub commit_ns: u64,
    /// Bookkeeping, slot release, end-of-pass refcount rebuild and VMA count.
    pub account_ns: u64,
}

/// Statistics of one guest. Page counts are gauges as of the last step; `pages_scanned` and
/// `cow_breaks` are cumulative.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestStats {
    /// The guest's id.
    pub id: u32,
    /// The guest's name.
    pub name: String,
    /// The guest's trust domain.
    pub domain: String,
    /// Guest pages registered (private anonymous regions only).
    pub pages: u64,
    /// Pages in regions that are not private anonymous memory, never touched.
    pub pages_skipped: u64,
    /// Pool slots this guest counts as the owner of (for each slot, the first guest mapping it).
    pub pages_shared: u64,
    /// This guest's pages mapped to a pool slot, minus `pages_shared`.
    pub pages_sharing: u64,
    /// Stable pages not shared with anyone.
    pub pages_unshared: u64,
    /// Pages whose content changed between the last two looks.
    pub pages_volatile: u64,
    /// Pages hashed so far.
    pub pages_scanned: u64,
    /// Pages dropped to the host zero page.
    pub zero_pages: u64,
    /// Merged or zero pages that a write turned private again.
    pub cow_breaks: u64,
    /// `(pages_sharing + zero_pages) * 4096`.
    pub bytes_saved: u64,
    /// `bytes_saved` minus this guest's per-page metadata.
    pub general_profit: i64,
}

/// Engine statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Pool slots in use: how many shared copies exist (KSM's `pages_shared`).
    pub pages_shared: u64,
    /// Guest pages mapped to those copies beyond the first of each (KSM's `pages_sharing`).
    pub pages_sharing: u64,
    /// Stable pages not shared with anyone (KSM's `pages_unshared`).
    pub pages_unshared: u64,
    /// Pages changing too fast to merge (KSM's `pages_volatile`).
    pub pages_volatile: u64,
    /// Pages hashed so far (KSM's `pages_scanned`).
    pub pages_scanned: u64,
    /// Completed passes over all guest memory (KSM's `full_scans`).
    pub full_scans: u64,
    /// Pages dropped to the host zero page (KSM's `ksm_zero_pages`).
    pub zero_pages: u64,
    /// Bytes saved minus the engine's metadata (KSM's `general_profit`).
    pub general_profit: i64,
    /// Merged or zero pages turned private again by a write (KSM's vmstat `cow_ksm`, plus
    /// zero pages).
    pub cow_breaks: u64,
    /// `(pages_sharing + zero_pages) * 4096`.
    pub bytes_saved: u64,
    /// Merges attempted under the guard (merges the VMA budget refused, or that were held
    /// back, are not attempts).
    pub merge_attempts: u64,
    /// Merges that happened (cumulative).
    pub merges: u64,
    /// Merges refused, by cause. All but `vma_budget` happened during attempts; the VMA
    /// budget refuses planned merges before they are attempted.
    pub failures: Failures,
    /// Planned merges left out because a kind of failure they would run into is held back
    /// (see `failing`), cumulative; not attempts.
    pub held_back: u64,
    /// The kinds of failure going on.
    pub failing: Vec<Failing>,
    /// Guard releases that had to fall back to unregistering.
    pub guard_repairs: u64,
    /// Pages that a writer hit while they were guarded.
    pub guarded_writes: u64,
    /// VMAs inside guest memory (measured at the end of passes that changed them, and every
    /// ten seconds; charged per remap in between).
    pub vmas_used: u64,
    /// Most VMAs the engine may use inside guest memory now: the configured (or automatic)
    /// budget, or the limit learnt from ENOMEM when lower.
    pub vma_budget: u64,
    /// The limit learnt from a remap that failed with ENOMEM (the process reached
    /// `vm.max_map_count`), in force until a later try finds more room.
    pub vma_budget_learned: Option<u64>,
    /// Whether the VMA budget holds merges back now: it is tight (seven eighths used), or it
    /// refused merges during the pass going on or the last completed one.
    pub vma_budget_reached: bool,
    /// Bytes of engine metadata (page metadata, slots, index).
    pub metadata_bytes: u64,
    /// Guest pages registered.
    pub pages: u64,
    /// Pages in regions that are not private anonymous memory, never touched.
    pub pages_skipped: u64,
    /// CPU time spent by the engine, in nanoseconds.
    pub cpu_ns: u64,
    /// Wall time spent in scan steps, in nanoseconds.
    pub wall_ns: u64,
    /// Pool operations that failed (create, grow, fill, punch).
    pub pool_errors: u64,
    /// The most recent pool failure with its cause (`creating the pool of node 0: Too many open
    /// files (os error 24)`), if any failed.
    pub pool_error: Option<String>,
    /// Regions turned back into one anonymous mapping by unmerging (cumulative).
    pub rebuilt_regions: u64,
    /// Regions unmerged in place because rebuilding them failed: their pages are private but
    /// stay in pool-file VMAs (cumulative).
    pub unmerged_in_place: u64,
    /// Pool slots kept for memory that was unregistered while it still mapped them (held
    /// elsewhere, or not unmerged): never freed or reused.
    pub pinned_slots: u64,
    /// Wall time per phase of the scan steps.
    pub phases: PhaseTimes,
    /// Per guest.
    pub guests: Vec<GuestStats>,
}

impl Stats {
    /// Adds guard repairs.
    pub fn add_repairs(&mut self, r: &Repairs) {
        self.guard_repairs += r.unprotect + r.wake + r.reregister;
    }
}
