//! What runs beside the guests of a process: memory merging (`--dedup` or `--ksm`), the
//! periodic statistics (`--stats-interval`, `--stats-json`) and the control API
//! (`--api-sock`). Started after the guests are built and before they run; stopped after they
//! have stopped.

use std::path::PathBuf;
use std::sync::Arc;

use crate::api::{self, ApiServer};
use crate::control::{Control, DedupControl, KsmControl, NoControl, pages_of};
use crate::dedup::{self, Dedup, DedupConfig};
use crate::kernel_ksm::{self, KernelKsm};
use crate::monitor::{self, LineSink, Monitor, MonitorConfig};
use crate::vmm::Vmm;

/// Who merges guest memory.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Merging {
    /// Nobody.
    #[default]
    None,
    /// This VMM's engine (guests must be built with `track_dirty`).
    Dedup(DedupConfig),
    /// Kernel KSM.
    Ksm,
}

/// The services of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicesConfig {
    /// Who merges.
    pub merging: Merging,
    /// Periodic statistics.
    pub monitor: MonitorConfig,
    /// The control API's socket.
    pub api_sock: Option<PathBuf>,
}

/// Errors starting or stopping the services.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The dedup engine.
    #[error(transparent)]
    Dedup(#[from] dedup::Error),
    /// Kernel KSM.
    #[error(transparent)]
    Ksm(#[from] kernel_ksm::Error),
    /// The statistics writer.
    #[error(transparent)]
    Monitor(#[from] monitor::Error),
    /// The control API.
    #[error(transparent)]
    Api(#[from] api::Error),
    /// The memory guard stopped every guest (see `docs/operations.md`).
    #[error("{0}")]
    OutOfMemory(String),
}

impl Error {
    /// Whether this is a usage error (exit status 2) rather than a runtime error (1).
    pub fn is_usage(&self) -> bool {
        match self {
            Error::Dedup(e) => e.is_usage(),
            Error::Api(e) => e.is_usage(),
            Error::Monitor(monitor::Error::Write { .. }) => true,
            Error::Ksm(_) | Error::Monitor(_) | Error::OutOfMemory(_) => false,
        }
    }
}

/// The running services.
#[derive(Debug)]
pub struct Services {
    dedup: Option<Dedup>,
    control: Arc<dyn Control>,
    monitor: Option<Monitor>,
    api: Option<ApiServer>,
}

impl Services {
    /// Sets up merging for `vmm`'s guests, starts the statistics writer and the API, and
    /// starts the dedup scanner. Call right before [`Vmm::run`].
    pub fn start(vmm: &Vmm, config: &ServicesConfig, lines: LineSink) -> Result<Self, Error> {
        let mut dedup = None;
        let control: Arc<dyn Control> = match &config.merging {
            Merging::None => Arc::new(NoControl {
                guests: vmm
                    .guests()
                    .iter()
                    .map(|g| (g.name().to_string(), pages_of(g.ram().size())))
                    .collect(),
            }),
            Merging::Ksm => Arc::new(KsmControl(Arc::new(KernelKsm::enable(vmm.guests())?))),
            Merging::Dedup(c) => {
                let d = Dedup::new(c, vmm.guests())?;
                let control = Arc::new(DedupControl(Arc::clone(d.shared())));
                dedup = Some(d);
                control
            }
        };
        // The socket first: a path that cannot be served fails the start before any
        // statistics line is printed or written.
        let api = config
            .api_sock
            .as_deref()
            .map(|path| ApiServer::start(path, Arc::clone(&control)))
            .transpose()?;
        let monitor = Monitor::start(Arc::clone(&control), config.monitor.clone(), lines)?;
        if let Some(d) = dedup.as_mut() {
            let guests = vmm.stop_handle();
            d.start(Box::new(move |_| guests.stop_all()))?;
        }
        Ok(Self {
            dedup,
            control,
            monitor: Some(monitor),
            api,
        })
    }

    /// The dedup engine, with `--dedup`.
    pub fn dedup(&self) -> Option<&Dedup> {
        self.dedup.as_ref()
    }

    /// What the API serves.
    pub fn control(&self) -> &Arc<dyn Control> {
        &self.control
    }

    /// Stops the API, writes the final statistics, stops the scanner and unregisters the
    /// guests. Call after [`Vmm::run`] has returned. When the memory guard stopped the guests,
    /// that is the error returned (exit status 1).
    pub fn stop(mut self) -> Result<(), Error> {
        let out_of_memory = self.dedup.as_ref().and_then(|d| d.shared().out_of_memory());
        if let Some(api) = self.api.take() {
            api.stop();
        }
        if let Some(d) = self.dedup.as_mut() {
            d.stop();
        }
        let written = self.monitor.take().map_or(Ok(()), Monitor::stop);
        if let Some(why) = out_of_memory {
            // Out of memory, unregistering (which reads every mapping of the process) could
            // itself hit the limit; the guests are stopped and exiting frees it all.
            drop(self.dedup.take());
            written?;
            return Err(Error::OutOfMemory(why));
        }
        // `Vmm::run` dropped the guests and their memory: nothing to unmerge.
        let unregistered = self.dedup.take().map_or(Ok(()), Dedup::release);
        written?;
        unregistered?;
        Ok(())
    }
}
