//! The watch thread: every `mem_check_ms` it looks at the process's memory (its memory cgroup and
//! the host, files kept open) and applies the memory guard's decision (`guard`): pause or resume
//! merging, or stop every guest through the VMM's callback. It also follows the engine's
//! statistics and logs when the engine becomes degraded and when it recovers (`health`).

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::guard::{self, Level, Look, Usage};
use super::health::{CgroupReport, HostReport, MemoryReport, Tracker};
use super::{Shared, lock};
use crate::cgroup::{CgroupReader, Figures};
use crate::hostmem::{HostMemory, MEMINFO, Reread};
use crate::report::human_bytes;

/// Called once when the level becomes critical, with the error to report: stops every guest.
pub type OnCritical = Box<dyn Fn(&str) + Send>;

/// A running watch thread, and the thread that pauses and resumes merging for it.
#[derive(Debug)]
pub(crate) struct Watch {
    stop: Sender<()>,
    thread: JoinHandle<()>,
    merging: JoinHandle<()>,
}

/// What the guard asks of merging. Applied in order on a thread of its own: pausing waits for
/// the engine, which an unmerge can hold for seconds while memory climbs, and the watch thread
/// must still see the level turn critical and stop the guests meanwhile.
enum Merging {
    Pause(String),
    Resume,
}

/// The files the guard reads, opened once.
struct Sources {
    cgroup: Option<CgroupReader>,
    /// `oom_events` at the first look: later growth means the kernel found the cgroup out of
    /// memory.
    oom_baseline: Option<u64>,
    meminfo: Option<Reread>,
    /// Read failures already logged (one line per source, not one per look).
    cgroup_failed: bool,
    host_failed: bool,
}

impl Sources {
    fn open() -> Self {
        let cgroup = match CgroupReader::of_this_process() {
            Ok(Some(r)) => {
                let p = r.place();
                log::info!(
                    "memory guard: memory cgroup {} {} ({})",
                    p.version.name(),
                    p.path,
                    p.dir.display()
                );
                Some(r)
            }
            Ok(None) => None,
            Err(e) => {
                log::warn!("memory guard: the memory cgroup is not watched: {e}");
                None
            }
        };
        let meminfo = Reread::open(MEMINFO)
            .map_err(|e| log::warn!("memory guard: {MEMINFO} is not watched: {e}"))
            .ok();
        Self {
            cgroup,
            oom_baseline: None,
            meminfo,
            cgroup_failed: false,
            host_failed: false,
        }
    }

    fn cgroup(&mut self) -> Option<Figures> {
        let r = self.cgroup.as_mut()?;
        match r.read() {
            Ok(f) => {
                self.cgroup_failed = false;
                Some(f)
            }
            Err(e) => {
                if !self.cgroup_failed {
                    log::warn!("memory guard: {e}");
                }
                self.cgroup_failed = true;
                None
            }
        }
    }

    fn host(&mut self) -> Option<HostMemory> {
        let m = self.meminfo.as_mut()?;
        match HostMemory::reread(m) {
            Ok(h) => {
                self.host_failed = false;
                Some(h)
            }
            Err(e) => {
                if !self.host_failed {
                    log::warn!("memory guard: {e}");
                }
                self.host_failed = true;
                None
            }
        }
    }

    /// Reads both sources: what the guard decides from, and what the statistics show.
    fn look(&mut self) -> (Look, MemoryReport) {
        let figures = self.cgroup();
        let host = self.host();
        let baseline = *self
            .oom_baseline
            .get_or_insert(figures.map_or(0, |f| f.oom_events));
        let cgroup_usage = figures.map(|f| Usage {
            used: f.working_set(),
            limit: f.limit,
        });
        let host_usage = host.map(|h| Usage {
            used: h.mem_total.saturating_sub(h.mem_available),
            limit: Some(h.mem_total),
        });
        let look = Look {
            cgroup: cgroup_usage,
            cgroup_oom: figures.is_some_and(|f| f.under_oom || f.oom_events > baseline),
            host: host_usage,
        };
        let cgroup = self
            .cgroup
            .as_ref()
            .zip(figures)
            .map(|(r, f)| CgroupReport {
                version: r.place().version.name().into(),
                path: r.place().path.clone(),
                usage_bytes: f.usage,
                working_set_bytes: f.working_set(),
                limit_bytes: f.limit,
                percent: cgroup_usage.and_then(|u| u.percent()),
                under_oom: f.under_oom,
                oom_events: f.oom_events,
            });
        let host = host.zip(host_usage).map(|(h, u)| HostReport {
            mem_total_bytes: h.mem_total,
            mem_available_bytes: h.mem_available,
            used_percent: u.percent().unwrap_or(0),
        });
        let report = MemoryReport {
            level: Level::Ok,
            cgroup,
            host,
        };
        (look, report)
    }
}

/// One line saying where the memory stands (for logs and errors).
fn describe(m: &MemoryReport) -> String {
    let mut parts = Vec::new();
    if let Some(c) = &m.cgroup {
        let mut s = format!(
            "memory cgroup {} {}: working set {}",
            c.version,
            c.path,
            human_bytes(c.working_set_bytes.into()),
        );
        match c.limit_bytes {
            Some(l) => s.push_str(&format!(" of its {} limit", human_bytes(l.into()))),
            None => s.push_str(", no limit"),
        }
        if let Some(p) = c.percent {
            s.push_str(&format!(" ({p}%)"));
        }
        if c.under_oom {
            s.push_str(", the kernel reports it out of memory (under_oom)");
        }
        parts.push(s);
    }
    if let Some(h) = &m.host {
        parts.push(format!(
            "host RAM {}% used ({} available)",
            h.used_percent,
            human_bytes(h.mem_available_bytes.into())
        ));
    }
    if parts.is_empty() {
        "memory figures unavailable".into()
    } else {
        parts.join("; ")
    }
}

/// What the watch thread keeps between looks.
struct State {
    sources: Sources,
    level: Level,
    tracker: Tracker,
    on_critical: Option<OnCritical>,
    merging: Sender<Merging>,
}

impl State {
    fn ask(&self, what: Merging) {
        if self.merging.send(what).is_err() {
            log::error!("memory guard: the thread that pauses merging is gone");
        }
    }

    fn look(&mut self, shared: &Shared) {
        let settings = lock(&shared.tune).guard;
        let (look, mut memory) = self.sources.look();
        let level = guard::decide(&settings, &look, self.level);
        memory.level = level;
        let now = describe(&memory);
        if level != self.level {
            match level {
                Level::Pressure if self.level == Level::Ok => {
                    let why = format!(
                        "memory pressure: {now}; merging paused at mem_pressure_percent={}",
                        settings.pressure_percent
                    );
                    log::warn!("{why}");
                    self.ask(Merging::Pause(why));
                }
                Level::Pressure => {}
                Level::Ok => {
                    log::warn!("memory pressure over: {now}; merging resumes");
                    self.ask(Merging::Resume);
                }
                Level::Critical => {
                    let why = format!(
                        "out of memory: {now}: every guest was stopped before the kernel could \
                         fail a guest's page fault or kill the VMM (mem_stop_percent={}, or less \
                         than {} left)",
                        settings.stop_percent,
                        human_bytes(guard::STOP_HEADROOM.into())
                    );
                    log::error!("{why}");
                    // The guests first: nothing here may wait for the engine.
                    *lock(&shared.critical) = Some(why.clone());
                    if let Some(stop) = self.on_critical.take() {
                        stop(&why);
                    }
                    self.ask(Merging::Pause(why));
                }
            }
            self.level = level;
        }
        let paused = lock(&shared.paused).as_ref().map(|p| p.why.clone());
        let stats = shared.engine.stats();
        shared.note_figures(&stats);
        let changes = self.tracker.update(&stats, paused.as_deref());
        for r in &changes.began {
            log::warn!("dedup degraded: {}: {}", r.cause.name(), r.detail);
        }
        for c in &changes.ended {
            log::warn!("dedup no longer degraded: {}", c.name());
        }
        let mut status = lock(&shared.status);
        status.reasons = self.tracker.reasons().to_vec();
        status.memory = Some(memory);
        status.paused = paused.is_some();
    }
}

impl Watch {
    /// Opens the memory sources and starts the thread; `on_critical` is called once if the
    /// memory guard stops the guests.
    pub(crate) fn start(shared: Arc<Shared>, on_critical: OnCritical) -> std::io::Result<Self> {
        let (ask, asked) = mpsc::channel::<Merging>();
        let applier = shared.clone();
        let merging = thread::Builder::new()
            .name("dedup-guard".into())
            .spawn(move || {
                // Ends when the watch thread's state (the sender) is dropped.
                for what in asked {
                    match what {
                        Merging::Pause(why) => applier.pause_merging(why),
                        Merging::Resume => applier.resume_merging(),
                    }
                }
            })?;
        let mut state = State {
            sources: Sources::open(),
            level: Level::Ok,
            tracker: Tracker::default(),
            on_critical: Some(on_critical),
            merging: ask,
        };
        state.look(&shared);
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = thread::Builder::new()
            .name("dedup-watch".into())
            .spawn(move || {
                loop {
                    let every = lock(&shared.tune).guard.check_ms;
                    match stopped.recv_timeout(Duration::from_millis(every)) {
                        Err(RecvTimeoutError::Timeout) => state.look(&shared),
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread,
            merging,
        })
    }

    pub(crate) fn stop(self) {
        // The thread may already have ended; then there is nobody to tell.
        let _ = self.stop.send(());
        if self.thread.join().is_err() {
            log::error!("dedup: the watch thread panicked");
        }
        if self.merging.join().is_err() {
            log::error!("dedup: the memory guard's pause thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(limit_bytes: Option<u64>, percent: Option<u32>) -> MemoryReport {
        MemoryReport {
            level: Level::Ok,
            cgroup: Some(CgroupReport {
                version: "v2".into(),
                path: "/vmm".into(),
                usage_bytes: 50 << 20,
                working_set_bytes: 43 << 20,
                limit_bytes,
                percent,
                under_oom: false,
                oom_events: 0,
            }),
            host: None,
        }
    }

    #[test]
    fn a_cgroup_limit_is_described_with_its_share() {
        assert_eq!(
            describe(&report(Some(1 << 30), Some(4))),
            "memory cgroup v2 /vmm: working set 43.0MiB of its 1.0GiB limit (4%)"
        );
    }

    #[test]
    fn a_cgroup_without_a_limit_says_so() {
        assert_eq!(
            describe(&report(None, None)),
            "memory cgroup v2 /vmm: working set 43.0MiB, no limit"
        );
    }

    #[test]
    fn the_host_follows_the_cgroup() {
        let mut m = report(None, None);
        m.host = Some(HostReport {
            mem_total_bytes: 8 << 30,
            mem_available_bytes: 6 << 30,
            used_percent: 25,
        });
        assert_eq!(
            describe(&m),
            "memory cgroup v2 /vmm: working set 43.0MiB, no limit; host RAM 25% used (6.0GiB available)"
        );
        assert_eq!(
            describe(&MemoryReport::default()),
            "memory figures unavailable"
        );
    }
}
