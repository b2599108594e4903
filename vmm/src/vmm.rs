//! A VMM process: several independent guests sharing one KVM handle and one console, run
//! until all have stopped.

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
        config::format_size(*.host)
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
    sink: &Sink,
    events: &Sender<Event>,
) -> Result<Vec<Guest>, vm::Error> {
    let count = config.guests.len();
    let prefixed = count > 1;
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let work = || {
        let mut built = Vec::new();
        while !failed.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(g) = config.guests.get(i) else {
                break;
            };
            let guest = Guest::build(host, g, i, sink.clone(), prefixed, events.clone());
            if guest.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
            built.push((i, guest));
        }
        built
    };
    let workers = thread::available_parallelism()
        .map_or(1, usize::from)
        .min(count);
    let mut built = thread::scope(|s| {
        // A helper that cannot be started leaves its share to the others.
        let helpers: Vec<_> = (1..workers)
            .filter_map(|w| {
                thread::Builder::new()
                    .name(format!("build{w}"))
                    .spawn_scoped(s, work)
                    .ok()
            })
            .collect();
        let mut built = work();
        for h in helpers {
            match h.join() {
                Ok(more) => built.extend(more),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        built
    });
    built.sort_by_key(|&(i, _)| i);
    built.into_iter().map(|(_, guest)| guest).collect()
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
#[derive(Debug)]
pub struct Vmm {
    guests: Vec<Guest>,
    events: Sender<Event>,
    receiver: Receiver<Event>,
}

impl Vmm {
    /// Builds every guest of `config`, with console output on stdout.
    pub fn new(config: &VmmConfig) -> Result<Self, Error> {
        Self::with_sink(config, console::stdout_sink())
    }

    /// Builds every guest of `config`, with console output on `sink`.
    pub fn with_sink(config: &VmmConfig, sink: Sink) -> Result<Self, Error> {
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
        let guests = build_guests(&host, config, &sink, &events)?;
        Ok(Self {
            guests,
            events,
            receiver,
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
        let mut stops: Vec<Option<Stop>> = vec![None; self.guests.len()];
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
