//! The engine: registration of guest memory, blocking scan passes, statistics, unmerge-all and
//! page inspection. The background scanner is in `scanner`.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestRegionMmap};

use crate::budget::VmaBudget;
use crate::config::{Config, ConfigError, RunMode};
use crate::fault::Faults;
use crate::guest::{self, Guest, GuestConfig, GuestId};
use crate::index::ContentIndex;
use crate::numa::{HostTopology, Topology, TopologyError};
use crate::plan::Rules;
use crate::pool::Pools;
use crate::slots::{MAX_NODES, SlotTable};
use crate::state::{Cursor, State, Totals};
use crate::step::StepCtx;
use crate::sys::PAGE_SIZE;
use crate::sys::pagemap::Pagemap;
use crate::sys::procfs;

/// Errors from the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The configuration is invalid.
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// The NUMA topology could not be read.
    #[error("reading the NUMA topology")]
    Topology(#[from] TopologyError),
    /// The topology has more nodes than slots can name.
    #[error("{0} NUMA nodes, at most 16 supported")]
    TooManyNodes(usize),
    /// The worker threads could not be started.
    #[error("starting worker threads")]
    Threads(#[source] rayon::ThreadPoolBuildError),
    /// /proc/self/pagemap could not be opened.
    #[error("opening /proc/self/pagemap")]
    Pagemap(#[source] std::io::Error),
    /// userfaultfd could not guard the guest's memory.
    #[error("registering guest memory with userfaultfd")]
    Userfaultfd(#[source] std::io::Error),
    /// Too much registered at once: a guest of more than 32,767 regions, 65,535 guests, 65,535
    /// trust domains in use (by registered guests, or by pool slots still kept for memory that
    /// left), or more private guest memory than the index can number (2^31 pages, 8 TiB, with
    /// each region in one range of free numbers). Guests that left count for none of these.
    #[error("too many regions, guests, trust domains or guest pages registered at once")]
    TooMany,
    /// No guest with that id.
    #[error("no guest {0:?}")]
    NoGuest(GuestId),
    /// The address is not in the guest's memory.
    #[error("address {0:#x} is not in the guest's memory")]
    NoAddress(u64),
    /// A knob that can only change while nothing is merged (like KSM's EBUSY).
    #[error("{0} can only change while no page is merged")]
    Busy(&'static str),
    /// A knob that is fixed when the engine is created.
    #[error("{0} is fixed when the engine is created")]
    Fixed(&'static str),
    /// The engine's lock was poisoned by a panic.
    #[error("engine state poisoned by an earlier panic")]
    Poisoned,
    /// Unmerging could not break the sharing of some pages.
    #[error("unmerging failed for {0} pages")]
    Unmerge(u64),
    /// The background scanner could not be started.
    #[error("starting the background scanner")]
    Spawn(#[source] std::io::Error),
    /// Discarding guest memory failed.
    #[error("discarding guest memory")]
    Discard(#[source] std::io::Error),
    /// A background scanner is already running.
    #[error("a background scanner is already running")]
    AlreadyRunning,
    /// Pages of the guest's memory are still in pool mappings: after `unregister`, the region
    /// could not be rebuilt as anonymous memory (the guest stays registered); after `release`,
    /// the memory lives on elsewhere (its slots are kept).
    #[error(
        "{0} pages of the guest's memory still map the pool (unmerging could not rebuild it, \
         or it lives on elsewhere)"
    )]
    StillMapped(u64),
    /// The memory to register maps this engine's pool (memory that left the engine without
    /// being unmerged), or overlaps a registered guest's memory.
    #[error(
        "the memory maps this engine's pool or overlaps a registered guest (register memory \
         once, and unregister it before registering it again)"
    )]
    Overlap,
    /// /proc/self/maps could not be read to check that the memory maps no pool page.
    #[error("reading /proc/self/maps")]
    Maps(#[source] std::io::Error),
    /// /proc/self/smaps could not be read to check what the guest's memory is.
    #[error("reading /proc/self/smaps")]
    Smaps(#[source] std::io::Error),
}

pub(crate) struct Inner {
    pub state: Mutex<State>,
    pub config: Mutex<Config>,
    pub wake: Condvar,
    pub stats: Mutex<crate::stats::Stats>,
    pub faults: Faults,
    pub topology: Arc<dyn Topology>,
    pub threads: rayon::ThreadPool,
    pub scanner_running: std::sync::atomic::AtomicBool,
    /// When the statistics were last computed (they walk all page metadata).
    pub published: Mutex<Option<std::time::Instant>>,
}

impl Drop for Inner {
    /// The last handle is gone with guests still registered: memory of theirs that lives on
    /// (the VMM still holds it) is unmerged as [`Engine::release`] does, so that it does not
    /// keep pool mappings that a later `MADV_DONTNEED` would read back; memory only the engine
    /// held is dropped with it.
    fn drop(&mut self) {
        let Ok(st) = self.state.get_mut() else {
            log::error!("vm-dedup: dropping a poisoned engine: registered memory is left as is");
            return;
        };
        for gi in 0..st.guests.len() {
            let Some(g) = st.guests[gi].as_ref() else {
                continue;
            };
            if Arc::strong_count(&g._keep) == 1 {
                continue;
            }
            let name = g.name.clone();
            if let Err(e) = st.unmerge_guest(gi, &self.faults) {
                log::error!(
                    "vm-dedup: the engine was dropped with guest {name} registered, and \
                     unmerging its memory failed: {e}"
                );
            }
        }
    }
}

/// The dedup engine. Cheap to clone: clones share one engine.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

fn rules_of(c: &Config) -> Rules {
    Rules {
        use_zero_pages: c.use_zero_pages,
        merge_across_nodes: c.merge_across_nodes,
        max_page_sharing: c.max_page_sharing,
    }
}

impl Engine {
    /// An engine on the host's NUMA topology.
    pub fn new(config: Config) -> Result<Engine, EngineError> {
        Self::with_topology(config, Arc::new(HostTopology::new()?))
    }

    /// An engine on a given topology (e.g. [`crate::FakeTopology`] in tests).
    pub fn with_topology(
        config: Config,
        topology: Arc<dyn Topology>,
    ) -> Result<Engine, EngineError> {
        config.validate()?;
        let nodes = topology.node_count();
        if nodes > MAX_NODES {
            return Err(EngineError::TooManyNodes(nodes));
        }
        let threads = rayon::ThreadPoolBuilder::new()
            .num_threads(config.threads)
            .thread_name(|i| format!("vm-dedup-{i}"))
            .build()
            .map_err(EngineError::Threads)?;
        let state = State {
            guests: Vec::new(),
            domains: crate::ids::Domains::default(),
            pools: Pools::new(nodes),
            slots: SlotTable::new(),
            index: ContentIndex::new(),
            budget: Mutex::new(VmaBudget::new(config.vma_budget.unwrap_or(0), 0)),
            budget_auto: config.vma_budget.is_none(),
            cursor: Cursor::default(),
            in_pass: false,
            pagemap: Pagemap::open().map_err(EngineError::Pagemap)?,
            rules: rules_of(&config),
            totals: Totals::default(),
            next_id: 1,
            distrusted: hashbrown::HashSet::new(),
            pinned: hashbrown::HashSet::new(),
            page_ids: crate::ids::PageIds::new(crate::index::MAX_PAGE_IDS as u32),
            troubles: crate::backoff::Troubles::new(),
            pending: crate::backoff::Tally::default(),
            vma_probe: false,
            vmas_changed: true,
            vmas_counted: None,
            quiet: false,
            changed: true,
            replanning: false,
        };
        let engine = Engine {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                config: Mutex::new(config),
                wake: Condvar::new(),
                stats: Mutex::new(crate::stats::Stats::default()),
                faults: Faults::default(),
                topology,
                threads,
                scanner_running: std::sync::atomic::AtomicBool::new(false),
                published: Mutex::new(None),
            }),
        };
        {
            let mut st = engine.state()?;
            st.measure_vmas();
            engine.publish(&st);
        }
        Ok(engine)
    }

    pub(crate) fn state(&self) -> Result<MutexGuard<'_, State>, EngineError> {
        self.inner.state.lock().map_err(|_| EngineError::Poisoned)
    }

    /// The current configuration.
    pub fn config(&self) -> Config {
        match self.inner.config.lock() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replaces the configuration (takes effect at the next step; a background scanner step
    /// that starts after this returns follows it, its run mode included). While anything is
    /// merged, `merge_across_nodes` cannot change and `max_page_sharing` can only grow
    /// ([`EngineError::Busy`]); `threads` never changes ([`EngineError::Fixed`]).
    pub fn set_config(&self, config: Config) -> Result<(), EngineError> {
        config.validate()?;
        if config.threads != self.config().threads {
            return Err(EngineError::Fixed("threads"));
        }
        let mut st = self.state()?;
        let merged = st.slots.allocated_count() > 0;
        if merged && config.merge_across_nodes != st.rules.merge_across_nodes {
            return Err(EngineError::Busy("merge_across_nodes"));
        }
        if merged && config.max_page_sharing < st.rules.max_page_sharing {
            return Err(EngineError::Busy("max_page_sharing"));
        }
        st.rules = rules_of(&config);
        st.budget_auto = config.vma_budget.is_none();
        if let (Some(limit), Ok(mut b)) = (config.vma_budget, st.budget.lock()) {
            b.set_limit(limit);
        }
        if st.budget_auto {
            st.measure_vmas();
        }
        // Whatever failed may work with the new settings: try everything again now.
        st.troubles.retry_now();
        st.stir();
        // In place before the state lock is let go: a scanner step that takes the lock after
        // this returns runs with the new configuration (see `Engine::step_cpu`).
        let mut current = self
            .inner
            .config
            .lock()
            .map_err(|_| EngineError::Poisoned)?;
        *current = config;
        drop(current);
        drop(st);
        self.inner.wake.notify_all();
        Ok(())
    }

    /// Sets one knob by its KSM name (see [`Config::set`]).
    pub fn set_knob(&self, name: &str, value: &str) -> Result<(), EngineError> {
        let mut c = self.config();
        c.set(name, value)?;
        self.set_config(c)
    }

    /// Registers a guest's memory. Regions that are not private anonymous memory, readable and
    /// writable (file-backed, shared, hugetlb, read-only, ...), are listed but never touched:
    /// the kernel's view (/proc/self/smaps, read once per call) decides, not the regions' flags,
    /// which vm-memory cannot know for memory mapped elsewhere. Each region's attributes
    /// (`MADV_DONTDUMP`, `MADV_DONTFORK`, `mlock`, ...) are recorded now and given to every
    /// mapping the engine makes inside it; a region whose VMAs differ in them is left alone.
    /// The engine keeps `memory` alive until the guest is unregistered.
    ///
    /// Guest memory registered here must not be discarded with `MADV_DONTNEED` (balloon,
    /// reset): a merged page would read back pool content. Use [`Engine::discard`].
    pub fn register<M, B>(&self, guest: GuestConfig, memory: Arc<M>) -> Result<GuestId, EngineError>
    where
        M: GuestMemoryBackend<R = GuestRegionMmap<B>> + Send + Sync + 'static,
        B: Bitmap + 'static,
    {
        // Memory registered already would fail its userfaultfd registration below (EBUSY):
        // say what it is. (Checked again under the lock once the regions are built.)
        let wanted: Vec<(usize, usize)> = memory
            .iter()
            .map(|r| (r.as_ptr() as usize, r.as_ptr() as usize + r.size()))
            .collect();
        if self.state()?.overlaps_guests(&wanted) {
            return Err(EngineError::Overlap);
        }
        let smaps = procfs::Smaps::read().map_err(EngineError::Smaps)?;
        let regions = guest::regions_of(&*memory, &smaps).map_err(EngineError::Userfaultfd)?;
        drop(smaps);
        if regions.len() > 0x7fff {
            return Err(EngineError::TooMany);
        }
        let mut st = self.state()?;
        // Memory in pool mappings would read (and discard to) slots the engine may give to
        // other guests; memory registered twice would be merged under two domains.
        if st.overlaps_guests(&wanted) || st.maps_pool_in(&wanted).map_err(EngineError::Maps)? {
            return Err(EngineError::Overlap);
        }
        let gi = match st.guests.iter().position(Option::is_none) {
            Some(i) => i,
            None if st.guests.len() < usize::from(u16::MAX) => st.guests.len(),
            None => return Err(EngineError::TooMany),
        };
        let domain = st
            .number_guest(gi, &regions, &guest.domain)
            .ok_or(EngineError::TooMany)?;
        let id = GuestId(st.next_id);
        st.next_id += 1;
        let g = Guest {
            id,
            name: guest.name,
            domain,
            regions,
            _keep: guest::keep_alive(memory),
            dirty: guest.dirty,
            exclusion: guest.exclusion,
            pages_scanned: 0,
            cow_breaks: 0,
        };
        if gi == st.guests.len() {
            st.guests.push(None);
        }
        st.guests[gi] = Some(g);
        st.stir();
        st.measure_vmas();
        self.publish(&st);
        Ok(id)
    }

    /// Unregisters a guest after turning its merged pages back into private anonymous memory
    /// (the regions are rebuilt as plain anonymous mappings), so that the memory can go on
    /// without the engine. Where that fails (the error says how), the guest stays registered
    /// and nothing changes for it: call again later, or [`Engine::release`] it once its memory
    /// is being dropped.
    pub fn unregister(&self, id: GuestId) -> Result<(), EngineError> {
        let mut st = self.state()?;
        let gi = st.guest_index(id).ok_or(EngineError::NoGuest(id))?;
        let unmerged = st.unmerge_guest(gi, &self.inner.faults);
        let in_pool = st.guests[gi].as_ref().map_or(0, |g| {
            g.regions
                .iter()
                .flat_map(|r| r.metas.iter())
                .filter(|m| m.remapped())
                .count() as u64
        });
        if unmerged.is_err() || in_pool > 0 {
            st.stir();
            st.rebuild_refs(&self.inner.faults);
            self.publish(&st);
            return Err(unmerged.err().unwrap_or(EngineError::StillMapped(in_pool)));
        }
        let (st, _) = self.drop_guest(st, gi);
        drop(st);
        Ok(())
    }

    /// Lets go of a guest at the end of its life: when the engine holds the last reference to
    /// the memory given to [`Engine::register`], without unmerging (the memory is unmapped
    /// with that reference; copying every merged page back would be wasted), else as
    /// [`Engine::unregister`]. For a VMM whose guests stopped and dropped their memory.
    ///
    /// A clone of the memory's regions elsewhere (clones of a `GuestMemoryMmap` share them)
    /// keeps the memory mapped without the engine knowing: then the slots it still maps are
    /// kept and never reused (`Stats::pinned_slots`) and [`EngineError::StillMapped`] says how
    /// many pages map the pool. Those pages read their old content, but a private copy dropped
    /// later (`MADV_DONTNEED`) would read whatever its slot holds: use `unregister` for memory
    /// that lives on.
    pub fn release(&self, id: GuestId) -> Result<(), EngineError> {
        let st = self.state()?;
        let gi = st.guest_index(id).ok_or(EngineError::NoGuest(id))?;
        let last = st.guests[gi]
            .as_ref()
            .is_some_and(|g| Arc::strong_count(&g._keep) == 1);
        if !last {
            drop(st);
            return self.unregister(id);
        }
        let (st, still) = self.drop_guest(st, gi);
        drop(st);
        if still > 0 {
            return Err(EngineError::StillMapped(still));
        }
        Ok(())
    }

    /// Takes guest `gi` out of the engine (its hold on the memory dropped with it) and frees
    /// what only it used, except the slots its memory still maps if it lives on (returns how
    /// many pages map the pool there).
    fn drop_guest<'a>(
        &self,
        mut st: MutexGuard<'a, State>,
        gi: usize,
    ) -> (MutexGuard<'a, State>, u64) {
        let mut ranges = Vec::new();
        let mut domain = None;
        if let Some(g) = st.guests[gi].take() {
            domain = Some(g.domain);
            for r in &g.regions {
                if let Some(u) = &r.uffd {
                    let _ = u.unregister(r.hva, r.pages * PAGE_SIZE);
                }
                ranges.push((r.hva, r.hva + r.pages * PAGE_SIZE));
            }
            // Dropped here: if the engine held the memory last, it is unmapped now.
        }
        let still = st.pin_slots_mapped_in(&ranges);
        st.unnumber_guest(gi);
        st.distrusted.retain(|l| usize::from(l.guest) != gi);
        if st.cursor.guest == gi {
            st.cursor = Cursor {
                guest: gi + 1,
                ..Cursor::default()
            };
        }
        st.stir();
        st.rebuild_refs(&self.inner.faults);
        // After the slots nobody maps are freed: the domain may have none left.
        if let Some(d) = domain {
            st.forget_domain_if_unused(d);
        }
        st.measure_vmas();
        self.publish(&st);
        (st, still)
    }

    pub(crate) fn step_ctx(&self) -> StepCtx<'_> {
        self.step_ctx_of(&self.config())
    }

    /// The step context for `config`.
    fn step_ctx_of(&self, config: &Config) -> StepCtx<'_> {
        StepCtx {
            topology: &*self.inner.topology,
            faults: &self.inner.faults,
            threads: &self.inner.threads,
            committers: config.committers(self.inner.threads.current_num_threads()),
            batch_pages: config.batch_pages,
        }
    }

    /// Runs one step of at most `pages` pages (the background scanner's unit of work); returns
    /// true when it completed a full pass. Statistics are refreshed at the end of each pass and
    /// at most every 100 ms in between.
    pub fn step(&self, pages: usize) -> Result<bool, EngineError> {
        self.step_cpu(Some(pages)).map(|(done, _)| done)
    }

    /// [`Engine::step`] of `pages` pages, also returning the CPU time the step used (all
    /// threads), in ns. With `None` (the background scanner), the step takes `pages_to_scan`
    /// pages, and nothing is done unless the run mode is [`RunMode::Run`].
    pub(crate) fn step_cpu(&self, pages: Option<usize>) -> Result<(bool, u64), EngineError> {
        let mut st = self.state()?;
        // Read under the state lock, which `set_config` holds while it changes the
        // configuration: a step that starts after a change has returned follows it.
        let config = self.config();
        let pages = match pages {
            Some(p) => p,
            None if config.run == RunMode::Run => config.pages_to_scan as usize,
            None => return Ok((false, 0)),
        };
        let ctx = self.step_ctx_of(&config);
        let before = st.totals.cpu_ns;
        let done = st.step(&ctx, pages);
        let cpu = st.totals.cpu_ns.saturating_sub(before);
        let due = match self.inner.published.lock() {
            Ok(t) => t.is_none_or(|t| t.elapsed() >= std::time::Duration::from_millis(100)),
            Err(_) => true,
        };
        if done || due {
            self.publish(&st);
        }
        Ok((done, cpu))
    }

    /// Scans all guest memory once, merging what is stable, and returns the statistics. A
    /// page must be seen unchanged twice (or be reported clean by the dirty-page source)
    /// before it merges, so a fresh engine needs two passes.
    pub fn scan_pass(&self) -> Result<crate::stats::Stats, EngineError> {
        let ctx = self.step_ctx();
        let step_pages = 1 << 16;
        loop {
            let mut st = self.state()?;
            if st.step(&ctx, step_pages) {
                self.publish(&st);
                break;
            }
        }
        Ok(self.stats())
    }

    /// Turns every merged page of every guest back into a private page with the same content
    /// (KSM's `run=2`), frees the pool and returns the statistics.
    pub fn unmerge_all(&self) -> Result<crate::stats::Stats, EngineError> {
        let mut st = self.state()?;
        let mut failed = 0;
        for gi in 0..st.guests.len() {
            if st.guests[gi].is_some() {
                if let Err(EngineError::Unmerge(n)) = st.unmerge_guest(gi, &self.inner.faults) {
                    failed += n;
                }
            }
        }
        st.index.clear_pages();
        st.stir();
        st.rebuild_refs(&self.inner.faults);
        st.measure_vmas();
        self.publish(&st);
        drop(st);
        if failed > 0 {
            return Err(EngineError::Unmerge(failed));
        }
        Ok(self.stats())
    }

    /// The latest statistics (updated after every step).
    pub fn stats(&self) -> crate::stats::Stats {
        match self.inner.stats.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub(crate) fn publish(&self, st: &State) {
        if let Ok(mut t) = self.inner.published.lock() {
            *t = Some(std::time::Instant::now());
        }
        let s = st.stats();
        if let Ok(mut out) = self.inner.stats.lock() {
            *out = s;
        }
    }

    /// Failure injection points of this engine (feature `fault-injection`).
    pub fn faults(&self) -> &Faults {
        &self.inner.faults
    }

    /// Whether the configured run mode is [`RunMode::Run`].
    pub fn running(&self) -> bool {
        self.config().run == RunMode::Run
    }

    /// CPU time of the whole process so far, in nanoseconds (for benchmarks).
    pub fn process_cpu_ns() -> u64 {
        procfs::process_cpu_ns()
    }
}
