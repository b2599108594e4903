//! `--dedup`: one [`vm_dedup::Engine`] for the whole process, shared by every guest, fed by each
//! guest's KVM dirty log, paced by a tuner, and changed at run time through [`Shared::update`].
//!
//! Guests are registered with their name and trust domain (non-zero pages never merge across
//! domains). Each guest must be built with `track_dirty` so that its memory slots log dirty
//! pages and its regions carry a write bitmap: the engine then hashes only the pages written
//! since the previous pass (see [`dirty`]).

pub mod advisor;
pub mod dirty;
pub mod figures;
pub mod guard;
pub mod health;
pub mod pressure;
pub mod settings;
mod tuner;
mod watch;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime};

use vm_dedup::{Engine, EngineError, GuestConfig, GuestId, RunMode, Scanner, Stats};

use crate::vm::Guest;
use dirty::DirtyLog;
use figures::{FiguresReport, Freshness, StaleReason};
use health::{HealthReport, MemoryReport, Reason};
use settings::{Settings, TuneSettings};
pub use watch::OnCritical;

/// The trust domain of guests given no `--dedup-domain`.
pub const DEFAULT_DOMAIN: &str = "default";

/// Errors of the dedup engine in the VMM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The engine could not be created.
    #[error("cannot start the dedup engine: {0}")]
    Engine(#[source] EngineError),
    /// A guest could not be registered.
    #[error("cannot register {name} with the dedup engine: {source}")]
    Register {
        /// The guest.
        name: String,
        /// Cause.
        #[source]
        source: EngineError,
    },
    /// A guest was built without write tracking.
    #[error("{0} has no dirty log: build it with write tracking (track_dirty) for --dedup")]
    NoDirtyLog(String),
    /// `--dedup-domain` given neither once nor once per guest.
    #[error(
        "--dedup-domain given {domains} times for {guests} guests: give it once (every guest) or once per guest"
    )]
    DomainCount {
        /// Domains given.
        domains: usize,
        /// Guests.
        guests: usize,
    },
    /// A domain name that is empty or not printable.
    #[error("--dedup-domain {0:?}: use a non-empty name of printable characters")]
    DomainName(String),
    /// A bad knob or value.
    #[error(transparent)]
    Settings(#[from] settings::Error),
    /// A knob the active tuner sets by itself.
    #[error("{knob} is set by the {mode} tuner: set tune=fixed first")]
    Owned {
        /// The knob.
        knob: String,
        /// The tuner.
        mode: &'static str,
    },
    /// The engine refused the change (a knob that needs nothing merged, like KSM's EBUSY).
    #[error("{0}; unmerge everything first (POST /unmerge)")]
    Busy(#[source] EngineError),
    /// The engine failed while changing knobs, scanning or unmerging.
    #[error("dedup engine: {0}")]
    Runtime(#[source] EngineError),
    /// The scanner or tuner thread could not be started.
    #[error("cannot start the dedup scanner: {0}")]
    Start(#[source] EngineError),
    /// The tuner or watch thread could not be started.
    #[error("cannot start a dedup thread (tuner or watch): {0}")]
    Thread(#[source] std::io::Error),
    /// The memory guard paused merging: `run` and unmerging (which needs memory) are refused.
    #[error("{0}; run and unmerge are refused until it ends")]
    Paused(String),
}

impl Error {
    /// Whether this is the caller's mistake (a usage error, or a 4xx through the API).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Error::DomainCount { .. }
                | Error::DomainName(_)
                | Error::Settings(_)
                | Error::Owned { .. }
                | Error::Busy(_)
                | Error::Paused(_)
        )
    }
}

/// How `--dedup` is set up.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DedupConfig {
    /// Knobs at start.
    pub settings: Settings,
    /// Trust domains: none (every guest in [`DEFAULT_DOMAIN`]), one for every guest, or one per
    /// guest in order.
    pub domains: Vec<String>,
}

impl DedupConfig {
    /// Checks the domains against the number of guests.
    pub fn validate(&self, guests: usize) -> Result<(), Error> {
        if self.domains.len() > 1 && self.domains.len() != guests {
            return Err(Error::DomainCount {
                domains: self.domains.len(),
                guests,
            });
        }
        if let Some(bad) = self
            .domains
            .iter()
            .find(|d| d.is_empty() || d.chars().any(char::is_control))
        {
            return Err(Error::DomainName(bad.clone()));
        }
        self.settings.validate()?;
        Ok(())
    }

    /// The trust domain of guest `index`.
    pub fn domain_of(&self, index: usize) -> &str {
        match self.domains.as_slice() {
            [] => DEFAULT_DOMAIN,
            [one] => one,
            many => many.get(index).map_or(DEFAULT_DOMAIN, String::as_str),
        }
    }
}

/// A guest registered with the engine.
#[derive(Debug, Clone)]
pub struct Registered {
    /// Its id in the engine.
    pub id: GuestId,
    /// Its name.
    pub name: String,
    /// Its trust domain.
    pub domain: String,
    /// Its dirty-page source.
    pub dirty: Arc<DirtyLog>,
}

/// Merging paused by the memory guard.
#[derive(Debug, Clone)]
struct Paused {
    /// The run mode to restore.
    wanted: RunMode,
    /// Why.
    why: String,
}

/// What the watch thread last saw and decided (one consistent look).
#[derive(Debug, Default)]
struct Status {
    reasons: Vec<Reason>,
    memory: Option<MemoryReport>,
    paused: bool,
}

/// What the API and the tuner share with the owner of the engine.
#[derive(Debug)]
pub struct Shared {
    engine: Engine,
    tune: Mutex<TuneSettings>,
    guests: Mutex<Vec<Registered>>,
    /// Serializes knob changes (API requests, tuner and memory guard decisions).
    update: Mutex<()>,
    /// Set while the memory guard has paused merging.
    paused: Mutex<Option<Paused>>,
    /// Health and memory as the watch thread last saw them.
    status: Mutex<Status>,
    /// Set when the memory guard stopped the guests: the error to report.
    critical: Mutex<Option<String>>,
    /// When the engine last published new statistics.
    freshness: Mutex<Freshness>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The registered guests.
    pub fn guests(&self) -> Vec<Registered> {
        lock(&self.guests).clone()
    }

    /// Every knob as now in force.
    pub fn settings(&self) -> Settings {
        Settings {
            engine: self.engine.config(),
            tune: *lock(&self.tune),
        }
    }

    /// Applies `changes` (knob name, value as text) all together or not at all, and returns
    /// the knobs now in force. Knobs the active tuner sets are refused unless the same change
    /// switches the tuner off (`tune=fixed`).
    pub fn update(&self, changes: &[(String, String)]) -> Result<Settings, Error> {
        let _serial = lock(&self.update);
        let mut next = self.settings();
        for (k, v) in changes {
            next.set(k, v)?;
        }
        next.validate()?;
        if let Some(p) = lock(&self.paused).as_ref() {
            if next.engine.run != RunMode::Stop {
                return Err(Error::Paused(p.why.clone()));
            }
        }
        let owned = next.tune.mode.owned_knobs();
        if let Some((k, _)) = changes.iter().find(|(k, _)| owned.contains(&k.trim())) {
            return Err(Error::Owned {
                knob: k.trim().to_string(),
                mode: next.tune.mode.name(),
            });
        }
        self.engine
            .set_config(next.engine.clone())
            .map_err(|e| match e {
                EngineError::Busy(_) | EngineError::Fixed(_) | EngineError::Config(_) => {
                    Error::Busy(e)
                }
                e => Error::Runtime(e),
            })?;
        *lock(&self.tune) = next.tune;
        Ok(next)
    }

    /// Sets engine knobs on behalf of the tuner (no ownership check), unless the user switched
    /// tuners in the meantime.
    fn tuner_set(&self, mode: settings::TuneMode, knobs: &[(&str, String)]) {
        let _serial = lock(&self.update);
        if lock(&self.tune).mode != mode {
            return;
        }
        let paused = lock(&self.paused).is_some();
        let mut config = self.engine.config();
        for (k, v) in knobs {
            if paused && *k == "run" {
                continue;
            }
            if let Err(e) = config.set(k, v) {
                log::warn!("dedup tuner: {k}={v}: {e}");
                return;
            }
        }
        if config != self.engine.config() {
            log::debug!("dedup tuner ({}): {knobs:?}", mode.name());
            if let Err(e) = self.engine.set_config(config) {
                log::warn!("dedup tuner: {e}");
            }
        }
    }

    /// Turns every merged page back into a private page with the same content and leaves the
    /// scanner idle (KSM's `run=2`); a tuner is switched off so that it does not restart the
    /// scan. Returns the knobs now in force.
    pub fn unmerge_all(&self) -> Result<Settings, Error> {
        let _serial = lock(&self.update);
        if let Some(p) = lock(&self.paused).as_ref() {
            return Err(Error::Paused(p.why.clone()));
        }
        let mut config = self.engine.config();
        config.run = vm_dedup::RunMode::Stop;
        self.engine
            .set_config(config.clone())
            .map_err(Error::Runtime)?;
        lock(&self.tune).mode = settings::TuneMode::Fixed;
        self.engine.unmerge_all().map_err(Error::Runtime)?;
        config.run = vm_dedup::RunMode::UnmergeAll;
        self.engine.set_config(config).map_err(Error::Runtime)?;
        Ok(self.settings())
    }

    /// The health fields of the statistics, for `stats` (the engine's latest).
    pub fn health(&self, stats: &Stats) -> HealthReport {
        let figures = self.figures(stats);
        let status = lock(&self.status);
        HealthReport::new(
            stats,
            &status.reasons,
            status.paused,
            status.memory.clone(),
            figures,
        )
    }

    /// Notes `stats` (the engine's latest): the watch thread does at every look, so that the
    /// figures' date is known to within `mem_check_ms` even while nobody asks for them.
    fn note_figures(&self, stats: &Stats) {
        lock(&self.freshness).observe(stats, Instant::now(), SystemTime::now());
    }

    /// Notes `stats` (the engine's latest) and says whether the page figures are stale.
    fn figures(&self, stats: &Stats) -> FiguresReport {
        self.note_figures(stats);
        let paused = lock(&self.paused).is_some();
        let reason = StaleReason::of(paused, self.engine.config().run);
        lock(&self.freshness).report(reason, Instant::now())
    }

    /// The error to report when the memory guard stopped the guests.
    pub fn out_of_memory(&self) -> Option<String> {
        lock(&self.critical).clone()
    }

    /// Stops merging new pages (merged pages stay merged) until [`Shared::resume_merging`];
    /// `why` shows in the statistics and in refusals.
    fn pause_merging(&self, why: String) {
        let _serial = lock(&self.update);
        if let Some(p) = lock(&self.paused).as_mut() {
            p.why = why;
            return;
        }
        // `paused` is not held while the engine is busy: the watch thread reads it every look.
        let mut config = self.engine.config();
        let wanted = config.run;
        config.run = RunMode::Stop;
        if let Err(e) = self.engine.set_config(config) {
            log::error!("memory guard: cannot pause merging: {e}");
            return;
        }
        *lock(&self.paused) = Some(Paused { wanted, why });
    }

    /// Restores the run mode that [`Shared::pause_merging`] replaced.
    fn resume_merging(&self) {
        let _serial = lock(&self.update);
        let Some(p) = lock(&self.paused).take() else {
            return;
        };
        let mut config = self.engine.config();
        config.run = p.wanted;
        if let Err(e) = self.engine.set_config(config) {
            log::error!("memory guard: cannot resume merging: {e}");
        }
    }
}

/// The engine of a VMM process with its guests, scanner, tuner and watch thread (memory guard
/// and health).
#[derive(Debug)]
pub struct Dedup {
    shared: Arc<Shared>,
    scanner: Option<Scanner>,
    tuner: Option<tuner::Tuner>,
    watch: Option<watch::Watch>,
}

impl Dedup {
    /// Creates the engine with `config`'s knobs and registers every guest (built with
    /// `track_dirty`) with its name, its trust domain and its dirty log. Nothing is scanned
    /// before [`Dedup::start`].
    pub fn new(config: &DedupConfig, guests: &[Guest]) -> Result<Self, Error> {
        config.validate(guests.len())?;
        let engine = Engine::new(config.settings.engine.clone()).map_err(Error::Engine)?;
        let shared = Arc::new(Shared {
            engine,
            tune: Mutex::new(config.settings.tune),
            guests: Mutex::new(Vec::new()),
            update: Mutex::new(()),
            paused: Mutex::new(None),
            status: Mutex::new(Status::default()),
            critical: Mutex::new(None),
            freshness: Mutex::new(Freshness::new(Instant::now(), SystemTime::now())),
        });
        let dedup = Self {
            shared,
            scanner: None,
            tuner: None,
            watch: None,
        };
        for (i, g) in guests.iter().enumerate() {
            let reader = g
                .dirty_log_reader()
                .ok_or_else(|| Error::NoDirtyLog(g.name().to_string()))?;
            let dirty = Arc::new(DirtyLog::new(reader, Arc::clone(g.memory())));
            let domain = config.domain_of(i).to_string();
            let guest = GuestConfig::new(g.name(), domain.clone()).with_dirty_source(dirty.clone());
            let id = dedup
                .shared
                .engine
                .register(guest, Arc::clone(g.memory()))
                .map_err(|source| Error::Register {
                    name: g.name().to_string(),
                    source,
                })?;
            log::info!("dedup: registered {} in domain {domain}", g.name());
            lock(&dedup.shared.guests).push(Registered {
                id,
                name: g.name().to_string(),
                domain,
                dirty,
            });
        }
        Ok(dedup)
    }

    /// What the API and the statistics need.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.shared.engine
    }

    /// The engine's id of the guest named `name`.
    pub fn guest_id(&self, name: &str) -> Option<GuestId> {
        lock(&self.shared.guests)
            .iter()
            .find(|g| g.name == name)
            .map(|g| g.id)
    }

    /// Starts the background scanner, the tuner and the watch thread (when guests start).
    /// `on_critical` is called once, with the error to report, if the memory guard finds the
    /// process out of memory: it must stop every guest.
    pub fn start(&mut self, on_critical: OnCritical) -> Result<(), Error> {
        if self.watch.is_none() {
            self.watch = Some(
                watch::Watch::start(Arc::clone(&self.shared), on_critical)
                    .map_err(Error::Thread)?,
            );
        }
        if self.scanner.is_none() {
            self.scanner = Some(self.shared.engine.start().map_err(Error::Start)?);
        }
        if self.tuner.is_none() {
            self.tuner =
                Some(tuner::Tuner::start(Arc::clone(&self.shared)).map_err(Error::Thread)?);
        }
        Ok(())
    }

    /// Stops the scanner, the tuner and the watch thread; merged pages stay merged.
    pub fn stop(&mut self) {
        if let Some(w) = self.watch.take() {
            w.stop();
        }
        if let Some(t) = self.tuner.take() {
            t.stop();
        }
        if let Some(s) = self.scanner.take() {
            s.stop();
        }
    }

    /// Stops scanning and unregisters every guest (when the guests have stopped): their
    /// merged pages are turned back into private anonymous memory first, so their memory can
    /// live on.
    pub fn shutdown(self) -> Result<(), Error> {
        self.let_go(vm_dedup::Engine::unregister)
    }

    /// Stops scanning and lets go of every guest for the VMM's exit: where the guests and
    /// their memory are gone (the engine's hold is the last) without unmerging, which would
    /// copy every merged page for RAM about to be freed; else as `shutdown` (see
    /// `Engine::release`).
    pub fn release(self) -> Result<(), Error> {
        self.let_go(vm_dedup::Engine::release)
    }

    fn let_go(
        mut self,
        how: fn(&vm_dedup::Engine, vm_dedup::GuestId) -> Result<(), vm_dedup::EngineError>,
    ) -> Result<(), Error> {
        self.stop();
        let guests = std::mem::take(&mut *lock(&self.shared.guests));
        let mut first = None;
        for g in guests {
            if let Err(e) = how(&self.shared.engine, g.id) {
                log::warn!("dedup: unregistering {}: {e}", g.name);
                first.get_or_insert(Error::Runtime(e));
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Dedup {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_none_one_or_one_per_guest() {
        let mut c = DedupConfig::default();
        assert_eq!(c.domain_of(3), DEFAULT_DOMAIN);
        c.domains = vec!["a".into()];
        c.validate(3).unwrap();
        assert_eq!(c.domain_of(2), "a");
        c.domains = vec!["a".into(), "b".into()];
        c.validate(2).unwrap();
        assert_eq!((c.domain_of(0), c.domain_of(1)), ("a", "b"));
        let e = c.validate(3).unwrap_err();
        assert!(e.to_string().contains("once per guest"), "{e}");
        assert!(e.is_usage());
        c.domains = vec![String::new()];
        assert!(matches!(c.validate(1), Err(Error::DomainName(_))));
    }
}
