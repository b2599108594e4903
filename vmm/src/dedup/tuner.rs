//! The tuner thread: every `tune_interval_ms` it looks at the engine (advisor) or at the host's
//! available memory (pressure) and sets the engine knobs the active mode owns. The decisions
//! themselves are in `advisor` and `pressure`.

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use vm_dedup::{RunMode, Stats};

use super::advisor::{Advisor, PassCost};
use super::pressure::{self, Rate};
use super::settings::TuneMode;
use super::{Shared, lock};
use crate::hostmem::HostMemory;

/// A running tuner thread.
#[derive(Debug)]
pub(crate) struct Tuner {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

/// Cumulative engine figures at the end of the last pass the advisor looked at.
#[derive(Debug, Clone, Copy)]
struct Mark {
    full_scans: u64,
    cpu_ns: u64,
    wall_ns: u64,
}

impl From<&Stats> for Mark {
    fn from(s: &Stats) -> Self {
        Self {
            full_scans: s.full_scans,
            cpu_ns: s.cpu_ns,
            wall_ns: s.wall_ns,
        }
    }
}

impl Tuner {
    pub(crate) fn start(shared: Arc<Shared>) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = thread::Builder::new()
            .name("dedup-tuner".into())
            .spawn(move || {
                let mut advisor = Advisor::default();
                let mut mark = Mark::from(&shared.engine.stats());
                let mut last_mode = TuneMode::Fixed;
                loop {
                    let tune = *lock(&shared.tune);
                    match stopped.recv_timeout(Duration::from_millis(tune.interval_ms)) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                    }
                    let tune = *lock(&shared.tune);
                    let stats = shared.engine.stats();
                    if tune.mode != last_mode {
                        advisor = Advisor::default();
                        mark = Mark::from(&stats);
                        last_mode = tune.mode;
                        if tune.mode == TuneMode::Advisor {
                            let cap = tune.advisor.max_cpu_percent.to_string();
                            shared.tuner_set(tune.mode, &[("max_cpu_percent", cap)]);
                        }
                    }
                    match tune.mode {
                        TuneMode::Fixed => {}
                        TuneMode::Advisor if stats.full_scans > mark.full_scans => {
                            let passes = stats.full_scans - mark.full_scans;
                            let cost = PassCost {
                                pages: stats.pages,
                                cpu_ns: stats.cpu_ns.saturating_sub(mark.cpu_ns) / passes,
                                work_ns: stats.wall_ns.saturating_sub(mark.wall_ns) / passes,
                            };
                            mark = Mark::from(&stats);
                            let config = shared.engine.config();
                            let pages = advisor.advise(
                                &tune.advisor,
                                tune.limits,
                                cost,
                                config.sleep_millisecs,
                                config.pages_to_scan,
                            );
                            shared.tuner_set(
                                tune.mode,
                                &[
                                    ("pages_to_scan", pages.to_string()),
                                    ("max_cpu_percent", tune.advisor.max_cpu_percent.to_string()),
                                ],
                            );
                        }
                        TuneMode::Advisor => {}
                        TuneMode::Pressure => match HostMemory::read() {
                            Ok(host) => {
                                let config = shared.engine.config();
                                let now = Rate {
                                    run: config.run == RunMode::Run,
                                    pages_to_scan: config.pages_to_scan,
                                };
                                let next = pressure::decide(
                                    &tune.pressure,
                                    tune.limits,
                                    host.available_percent(),
                                    now,
                                );
                                if next != now {
                                    log::info!(
                                        "dedup: {}% of host RAM available: run={} pages_to_scan={}",
                                        host.available_percent(),
                                        u8::from(next.run),
                                        next.pages_to_scan
                                    );
                                }
                                shared.tuner_set(
                                    tune.mode,
                                    &[
                                        ("run", u8::from(next.run).to_string()),
                                        ("pages_to_scan", next.pages_to_scan.to_string()),
                                    ],
                                );
                            }
                            Err(e) => log::warn!("dedup pressure tuner: {e}"),
                        },
                    }
                }
            })?;
        Ok(Self { stop, thread })
    }

    pub(crate) fn stop(self) {
        // The thread may already have ended; then there is nobody to tell.
        let _ = self.stop.send(());
        if self.thread.join().is_err() {
            log::error!("dedup: the tuner thread panicked");
        }
    }
}
