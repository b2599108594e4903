//! A VMM process: several independent guests sharing one KVM handle and one console, run
//! until all have stopped.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;

use crate::config::{self, VmmConfig};
use crate::devices::console::{self, ConsoleInput, Sink};
use crate::exit::Stop;
use crate::kvm::{self, Host};
use crate::vcpu;
use crate::vm::{self, Event, Guest};

/// Errors of a VMM process.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::Error),
    /// KVM is unusable.
    #[error(transparent)]
    Host(#[from] kvm::Error),
    /// More vCPUs than this host's KVM runs in one VM.
    #[error("--vcpus {vcpus} is too many for this host: its KVM runs at most {max} per VM")]
    HostVcpus {
        /// Requested vCPUs.
        vcpus: u32,
        /// KVM's limit.
        max: u32,
    },
    /// More RAM than the host has.
    #[error(
        "--mem {} is larger than this host's {} of RAM: give less --mem",
        config::format_size(*.mem),
        crate::report::human_bytes(i128::from(*.host))
    )]
    HostMem {
        /// Requested bytes.
        mem: u64,
        /// Host RAM.
        host: u64,
    },
    /// A guest could not be built or started.
    #[error(transparent)]
    Guest(#[from] vm::Error),
    /// vCPU threads cannot be interrupted.
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
}

impl Error {
    /// Whether this is a usage error (exit status 2) rather than a runtime error (1).
    pub fn is_usage(&self) -> bool {
        match self {
            Error::Config(_) | Error::HostVcpus { .. } | Error::HostMem { .. } => true,
            Error::Guest(e) => e.is_usage(),
            Error::Host(_) | Error::Vcpu(_) => false,
        }
    }
}

/// Builds the guests of `config`, several at once (up to one per CPU): copying `--mem-image`
/// files into guest RAM is most of the time a start takes. Once a guest fails, no other is
/// begun; the first error in configuration order is returned.
fn build_guests(
    host: &Host,
    config: &VmmConfig,
    sink_of: &(dyn Fn(usize) -> Sink + Sync),
    events: &Sender<Event>,
) -> Result<Vec<Guest>, vm::Error> {
    let prefixed = config.guests.len() > 1;
    let workers = thread::available_parallelism().map_or(1, usize::from);
    in_parallel(&config.guests, workers, |i, g| {
        Guest::build(host, g, i, sink_of(i), prefixed, events.clone())
    })
    .into_iter()
    .collect()
}

/// Runs `build` on each of `items` (with its index) on up to `workers` threads, this one
/// included, each taking the next item as it gets free. Once a build fails or panics, no
/// further one is begun. Returns the results of the builds that ran, in index order; a panic
/// is raised again once every thread has stopped.
fn in_parallel<I: Sync, T: Send, E: Send>(
    items: &[I],
    workers: usize,
    build: impl Fn(usize, &I) -> Result<T, E> + Sync,
) -> Vec<Result<T, E>> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let work = || {
        let mut done = Vec::new();
        while !failed.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = items.get(i) else {
                break;
            };
            let stop = StopOthersOnPanic(&failed);
            let result = build(i, item);
            std::mem::forget(stop);
            if result.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
            done.push((i, result));
        }
        done
    };
    let mut done = thread::scope(|s| {
        // A helper that cannot be started leaves its share to the others.
        let helpers: Vec<_> = (1..workers.min(items.len()))
            .filter_map(|w| {
                thread::Builder::new()
                    .name(format!("build{w}"))
                    .spawn_scoped(s, work)
                    .ok()
            })
            .collect();
        let mut done = work();
        for h in helpers {
            match h.join() {
                Ok(more) => done.extend(more),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        done
    });
    done.sort_by_key(|&(i, _)| i);
    done.into_iter().map(|(_, result)| result).collect()
}

/// Tells the other build threads to stop when dropped, which only happens while a build
/// unwinds (it is forgotten once the build returns).
struct StopOthersOnPanic<'a>(&'a AtomicBool);

impl Drop for StopOthersOnPanic<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Asks a running [`Vmm`] to stop every guest.
#[derive(Debug, Clone)]
pub struct StopHandle(Sender<Event>);

impl StopHandle {
    /// Stops every guest; [`Vmm::run`] then returns.
    pub fn stop_all(&self) {
        // Nothing to stop once the VMM is gone.
        let _ = self.0.send(Event::StopAll);
    }
}

/// The guests of one process.
pub struct Vmm {
    guests: Vec<Guest>,
    events: Sender<Event>,
    receiver: Receiver<Event>,
    /// The guests' console output, flushed once when every guest has stopped.
    sink: Sink,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("guests", &self.guests)
            .finish_non_exhaustive()
    }
}

impl Vmm {
    /// Builds every guest of `config`, with console output on stdout (a lane each).
    pub fn new(config: &VmmConfig) -> Result<Self, Error> {
        let stdout = console::StdoutSinks::new();
        Self::build(config, &|i| stdout.sink(i), stdout.sink(0))
    }

    /// Builds every guest of `config`, with console output on `sink`.
    pub fn with_sink(config: &VmmConfig, sink: Sink) -> Result<Self, Error> {
        Self::build(config, &|_| Arc::clone(&sink), Arc::clone(&sink))
    }

    /// Builds every guest of `config`, guest `i`'s console output on `sink_of(i)`; `sink` is
    /// flushed once every guest has stopped.
    fn build(
        config: &VmmConfig,
        sink_of: &(dyn Fn(usize) -> Sink + Sync),
        sink: Sink,
    ) -> Result<Self, Error> {
        config.validate()?;
        let host = Host::open()?;
        for g in &config.guests {
            if g.vcpus > host.max_vcpus() {
                return Err(Error::HostVcpus {
                    vcpus: g.vcpus,
                    max: host.max_vcpus(),
                });
            }
            if let Some(total) = host.mem_total()
                && g.mem > total
            {
                return Err(Error::HostMem {
                    mem: g.mem,
                    host: total,
                });
            }
        }
        vcpu::install_kick_handler()?;
        let (events, receiver) = mpsc::channel();
        let guests = build_guests(&host, config, sink_of, &events)?;
        Ok(Self {
            guests,
            events,
            receiver,
            sink,
        })
    }

    /// The guests, in configuration order.
    pub fn guests(&self) -> &[Guest] {
        &self.guests
    }

    /// A handle to stop every guest from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.events.clone())
    }

    /// Console input for the guests.
    pub fn console_input(&self) -> ConsoleInput {
        ConsoleInput::new(
            self.guests.iter().map(|g| g.name().to_string()).collect(),
            self.guests.iter().map(|g| g.serial().clone()).collect(),
        )
    }

    /// Runs every guest until all have stopped; returns the highest guest status (0 when
    /// all stopped cleanly or were stopped on request).
    pub fn run(mut self) -> Result<u8, Error> {
        let ran = self.run_guests();
        // Once, with no vCPU left to hold up: the flush waits (a bounded time) for stdout.
        if let Err(e) = self
            .sink
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .flush()
        {
            log::warn!("console: cannot flush guest output: {e}");
        }
        ran
    }

    fn run_guests(&mut self) -> Result<u8, Error> {
        let mut stops: Vec<Option<Stop>> = vec![None; self.guests.len()];
        // A stop asked for before the guests started (a signal while the VMM was still setting
        // up): none of them runs.
        if let Ok(Event::StopAll) = self.receiver.try_recv() {
            self.stop_remaining(&mut stops);
            return Ok(0);
        }
        for i in 0..self.guests.len() {
            if let Err(e) = self.guests[i].start() {
                self.stop_remaining(&mut stops);
                return Err(e.into());
            }
        }
        while stops.iter().any(Option::is_none) {
            match self.receiver.recv() {
                Ok(Event::GuestStopping(i)) if stops[i].is_none() => {
                    let stop = self.guests[i].stop(Stop::Requested);
                    log::info!("{}: {stop}", self.guests[i].name());
                    stops[i] = Some(stop);
                }
                Ok(Event::GuestStopping(_)) => {}
                Ok(Event::StopAll) | Err(_) => self.stop_remaining(&mut stops),
            }
        }
        Ok(stops.iter().flatten().map(Stop::status).max().unwrap_or(0))
    }

    fn stop_remaining(&mut self, stops: &mut [Option<Stop>]) {
        for (guest, stop) in self.guests.iter_mut().zip(stops.iter_mut()) {
            if stop.is_none() {
                *stop = Some(guest.stop(Stop::Requested));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::panic::{self, AssertUnwindSafe};
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    #[test]
    fn every_item_is_built_once_and_results_keep_their_order() {
        let items: Vec<u32> = (0..23).collect();
        let calls = AtomicUsize::new(0);
        let results = in_parallel(&items, 4, |i, &item| {
            calls.fetch_add(1, Ordering::Relaxed);
            assert_eq!(i as u32, item);
            Ok::<_, ()>(item * 10)
        });
        assert_eq!(calls.into_inner(), items.len());
        let values: Vec<u32> = results.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(values, items.iter().map(|x| x * 10).collect::<Vec<_>>());
        assert!(in_parallel(&[] as &[u32], 4, |_, _| Ok::<_, ()>(())).is_empty());
    }

    #[test]
    fn no_build_begins_after_one_fails() {
        let items = [0, 1, 2, 3, 4, 5];
        let begun = Mutex::new(Vec::new());
        let results = in_parallel(&items, 1, |i, _| {
            begun.lock().unwrap().push(i);
            if i == 2 { Err(i) } else { Ok(i) }
        });
        assert_eq!(results, vec![Ok(0), Ok(1), Err(2)]);
        assert_eq!(*begun.lock().unwrap(), vec![0, 1, 2]);
    }

    #[test]
    fn a_panicking_build_stops_the_others_and_is_raised_again() {
        let items = [(); 50];
        let begun = AtomicUsize::new(0);
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
            in_parallel(&items, 2, |i, _| {
                begun.fetch_add(1, Ordering::Relaxed);
                if i == 0 {
                    // Unwinds at once, without the panic hook's message and backtrace.
                    panic::resume_unwind(Box::new("build 0 panics"));
                }
                thread::sleep(Duration::from_millis(20));
                Ok::<_, ()>(())
            })
        }));
        assert!(outcome.is_err(), "the panic is raised again");
        // The other thread finishes the build it is in (a build takes 20 ms, the panic
        // microseconds) and begins no more: without the stop it would build all 49.
        assert!(begun.into_inner() <= 3);
    }
}
