//! One guest: its KVM VM (in-kernel irqchip and PIT), RAM, devices and vCPU threads, and how
//! it stops independently of the other guests of the process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::signal::Killable;

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use crate::config::GuestConfig;
use crate::devices::Devices;
use crate::devices::console::{ConsoleOut, SharedSerial, Sink};
use crate::devices::serial::{self, COM1_GSI, IrqLine, SerialPort};
use crate::exit::Stop;
use crate::kvm::Host;
use crate::memory::{self, DirtyLogReader, GuestMem, GuestRam, MemorySlot};
use crate::setup;
use crate::vcpu;

/// How often a stopping guest's vCPU threads are signalled until they have all left `KVM_RUN`.
const KICK_INTERVAL: Duration = Duration::from_millis(1);

/// Errors building or starting a guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A VM-level KVM call failed.
    #[error("{name}: cannot {what}: {source}")]
    Kvm {
        /// The guest.
        name: String,
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up.
    #[error("{name}: {source}")]
    Memory {
        /// The guest.
        name: String,
        /// Cause.
        #[source]
        source: memory::Error,
    },
    /// Loading or boot data failed.
    #[error("{name}: {source}")]
    Setup {
        /// The guest.
        name: String,
        /// Cause.
        #[source]
        source: setup::Error,
    },
    /// A vCPU could not be set up.
    #[error("{name}: {source}")]
    Vcpu {
        /// The guest.
        name: String,
        /// Cause.
        #[source]
        source: vcpu::Error,
    },
    /// The serial port could not be set up.
    #[error("{name}: {source}")]
    Serial {
        /// The guest.
        name: String,
        /// Cause.
        #[source]
        source: serial::Error,
    },
    /// A vCPU thread could not be started.
    #[error("{name}: cannot start a vCPU thread: {source}")]
    Thread {
        /// The guest.
        name: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Whether the error is about what the user asked for (a file, a size) rather than the host.
    pub fn is_usage(&self) -> bool {
        match self {
            Error::Memory { source, .. } => matches!(
                source,
                memory::Error::ImageRead { .. }
                    | memory::Error::ImageTooLarge { .. }
                    | memory::Error::StreamTooLarge { .. }
            ),
            Error::Setup { .. } => true,
            _ => false,
        }
    }
}

/// What the process needs to hear from a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Guest `index` has begun to stop.
    GuestStopping(usize),
    /// Every guest must stop (signal or host application).
    StopAll,
}

/// Stop state shared by a guest's vCPU threads and the process.
#[derive(Debug)]
pub struct GuestState {
    index: usize,
    stopping: AtomicBool,
    stop: Mutex<Option<Stop>>,
    events: Sender<Event>,
}

impl GuestState {
    /// The state of guest `index`, not stopping, reporting to `events`.
    pub(crate) fn new(index: usize, events: Sender<Event>) -> Self {
        Self {
            index,
            stopping: AtomicBool::new(false),
            stop: Mutex::new(None),
            events,
        }
    }

    /// Whether the guest is stopping.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Records why the guest stops (the first reason wins) and tells the process.
    pub fn request_stop(&self, stop: Stop) {
        self.stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(stop);
        self.stopping.store(true, Ordering::Release);
        // The receiver only goes away when the process is already stopping every guest.
        let _ = self.events.send(Event::GuestStopping(self.index));
    }

    /// Why the guest stopped, once it has.
    pub fn stop_reason(&self) -> Option<Stop> {
        self.stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// One guest.
#[derive(Debug)]
pub struct Guest {
    name: String,
    vm: Arc<VmFd>,
    ram: GuestRam,
    slots: Vec<MemorySlot>,
    devices: Arc<Devices>,
    state: Arc<GuestState>,
    vcpus: Vec<VcpuFd>,
    threads: Vec<JoinHandle<()>>,
}

impl Guest {
    /// Builds guest `index` from `config`: VM, RAM (with its memory image), code and boot
    /// structures, serial console on `sink`, and vCPUs ready to run.
    pub fn build(
        host: &Host,
        config: &GuestConfig,
        index: usize,
        sink: Sink,
        prefixed: bool,
        events: Sender<Event>,
    ) -> Result<Self, Error> {
        let name = config.name.clone();
        let kvm_err = |what| {
            let name = name.clone();
            move |source| Error::Kvm { name, what, source }
        };
        let vm = host.kvm().create_vm().map_err(kvm_err("create a VM"))?;
        vm.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(kvm_err("set the TSS address"))?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(kvm_err("set the identity map address"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("create the irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("create the PIT"))?;

        let mem_err = |source| Error::Memory {
            name: name.clone(),
            source,
        };
        let ram = GuestRam::new(config.mem, config.track_dirty).map_err(mem_err)?;
        if let Some(image) = &config.mem_image {
            ram.load_image(image).map_err(mem_err)?;
        }
        let entry = setup::prepare(&ram, config).map_err(|source| Error::Setup {
            name: name.clone(),
            source,
        })?;
        let slots = ram.register(&vm).map_err(mem_err)?;

        let irq = IrqLine::new().map_err(|source| Error::Serial {
            name: name.clone(),
            source,
        })?;
        vm.register_irqfd(irq.eventfd(), COM1_GSI)
            .map_err(kvm_err("connect the serial interrupt"))?;
        let out = if prefixed {
            ConsoleOut::prefixed(sink, &name)
        } else {
            ConsoleOut::raw(sink)
        };
        let serial: SharedSerial = Arc::new(Mutex::new(SerialPort::new(irq, out)));
        let devices = Arc::new(Devices::new(&name, serial));

        let vcpus = (0..config.vcpus)
            .map(|i| vcpu::create(&vm, host, i, config.vcpus, entry.start(i, config.vcpus)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| Error::Vcpu {
                name: name.clone(),
                source,
            })?;

        let state = Arc::new(GuestState::new(index, events));
        Ok(Self {
            name,
            vm: Arc::new(vm),
            ram,
            slots,
            devices,
            state,
            vcpus,
            threads: Vec::new(),
        })
    }

    /// The guest's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its RAM, as vm-memory sees it.
    pub fn memory(&self) -> &Arc<GuestMem> {
        self.ram.memory()
    }

    /// Its RAM with size and write-tracking state.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Its KVM memory slots.
    pub fn slots(&self) -> &[MemorySlot] {
        &self.slots
    }

    /// A reader of KVM's dirty log, usable while the guest runs (`None` unless the guest was
    /// built with `track_dirty`).
    pub fn dirty_log_reader(&self) -> Option<DirtyLogReader> {
        self.ram
            .tracks_dirty()
            .then(|| DirtyLogReader::new(Arc::clone(&self.vm), self.slots.clone()))
    }

    /// Its serial port (for console input).
    pub fn serial(&self) -> &SharedSerial {
        self.devices.serial()
    }

    /// Its stop state.
    pub fn state(&self) -> &Arc<GuestState> {
        &self.state
    }

    /// Starts one thread per vCPU.
    pub fn start(&mut self) -> Result<(), Error> {
        for (index, fd) in self.vcpus.drain(..).enumerate() {
            let state = Arc::clone(&self.state);
            let devices = Arc::clone(&self.devices);
            let handle = thread::Builder::new()
                .name(format!("{}-vcpu{index}", self.name))
                .spawn(move || vcpu::run(fd, index as u32, state, devices))
                .map_err(|source| Error::Thread {
                    name: self.name.clone(),
                    source,
                })?;
            self.threads.push(handle);
        }
        Ok(())
    }

    /// Stops every vCPU (recording `reason` unless the guest already has one), waits for
    /// their threads and flushes the console; returns why the guest stopped.
    pub fn stop(&mut self, reason: Stop) -> Stop {
        if !self.state.stopping() {
            self.state.request_stop(reason);
        }
        while self.threads.iter().any(|t| !t.is_finished()) {
            for t in self.threads.iter().filter(|t| !t.is_finished()) {
                // A thread may finish between the check and the signal; the handle stays valid
                // until joined, so the signal is harmless then.
                let _ = t.kill(vcpu::kick_signal());
            }
            thread::sleep(KICK_INTERVAL);
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("{}: a vCPU thread panicked", self.name);
            }
        }
        let mut serial = self
            .devices
            .serial()
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = serial.output_mut().finish() {
            log::warn!("{}: cannot write its last console line: {e}", self.name);
        }
        self.state.stop_reason().unwrap_or(Stop::Requested)
    }
}
