//! The background scanner: a thread that follows the run mode, takes `pages_to_scan` pages per
//! step and sleeps `sleep_millisecs` between steps (longer under a CPU cap), and wakes early
//! when the configuration changes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::RunMode;
use crate::engine::{Engine, EngineError};
use crate::pacing::Pacing;

/// A running background scanner; dropping it stops the thread and waits for it.
#[derive(Debug)]
pub struct Scanner {
    engine: Engine,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// Starts the background scanner. At most one runs per engine.
    pub fn start(&self) -> Result<Scanner, EngineError> {
        if self.inner.scanner_running.swap(true, Ordering::SeqCst) {
            return Err(EngineError::AlreadyRunning);
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let engine = self.clone();
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vm-dedup-scan".into())
            .spawn(move || run(&engine, &flag))
            .map_err(|e| {
                self.inner.scanner_running.store(false, Ordering::SeqCst);
                EngineError::Spawn(e)
            })?;
        Ok(Scanner {
            engine: self.clone(),
            stop,
            thread: Some(thread),
        })
    }
}

fn run(engine: &Engine, stop: &std::sync::atomic::AtomicBool) {
    let mut unmerged = false;
    while !stop.load(Ordering::SeqCst) {
        let cfg = engine.config();
        let pause = match cfg.run {
            RunMode::Run => {
                unmerged = false;
                let spent = match engine.step_cpu(None) {
                    Ok((_, cpu)) => cpu,
                    Err(e) => {
                        log::error!("vm-dedup: scan step failed: {e}");
                        0
                    }
                };
                let pacing = Pacing {
                    pages_to_scan: cfg.pages_to_scan,
                    sleep: Duration::from_millis(cfg.sleep_millisecs),
                    max_cpu_percent: cfg.max_cpu_percent,
                };
                Some(pacing.pause_after(Duration::from_nanos(spent)))
            }
            RunMode::UnmergeAll => {
                if !unmerged {
                    if let Err(e) = engine.unmerge_all() {
                        log::error!("vm-dedup: unmerge-all: {e}");
                    }
                    unmerged = true;
                }
                None
            }
            RunMode::Stop => None,
        };
        wait(engine, stop, pause, &cfg);
    }
}

/// Sleeps for `pause` (or until the configuration changes or the scanner stops). `seen` is
/// the configuration the step ran with: a change made since (whose wake-up came before this
/// wait) ends the wait at once.
fn wait(
    engine: &Engine,
    stop: &std::sync::atomic::AtomicBool,
    pause: Option<Duration>,
    seen: &crate::config::Config,
) {
    if pause == Some(Duration::ZERO) {
        return;
    }
    let Ok(guard) = engine.inner.config.lock() else {
        return;
    };
    // Both are set under this lock before the wake-up, so neither can slip in unseen.
    if stop.load(Ordering::SeqCst) || *guard != *seen {
        return;
    }
    let _ = match pause {
        Some(d) => engine.inner.wake.wait_timeout(guard, d).map(|_| ()),
        None => engine
            .inner
            .wake
            .wait_timeout(guard, Duration::from_millis(200))
            .map(|_| ()),
    };
}

impl Scanner {
    /// Stops the scanner and waits for its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        {
            // Under the lock the scanner checks `stop` with, so that it is not between that
            // check and its wait when the wake-up comes.
            let _config = self.engine.inner.config.lock();
            self.stop.store(true, Ordering::SeqCst);
            self.engine.inner.wake.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.engine
            .inner
            .scanner_running
            .store(false, Ordering::SeqCst);
    }
}

impl Drop for Scanner {
    fn drop(&mut self) {
        self.shutdown();
    }
}
