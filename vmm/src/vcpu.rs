//! vCPUs: creation with their boot state, the run loop on their own thread, and the signal
//! that kicks a vCPU out of `KVM_RUN` when its guest must stop.

use std::sync::{Arc, OnceLock};

use kvm_bindings::{KVM_MP_STATE_RUNNABLE, Msrs, kvm_mp_state};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use libc::{c_int, c_void, siginfo_t};

use crate::arch::x86_64::{cpuid, msr, regs};
use crate::devices::Devices;
use crate::exit::{self, Action, Exit, Stop};
use crate::kvm::Host;
use crate::vm::GuestState;

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A vCPU ioctl failed.
    #[error("cannot set up vCPU {index} ({what}): {source}")]
    Setup {
        /// The vCPU.
        index: u32,
        /// What was being set.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only some of the boot MSRs.
    #[error("KVM set only {set} of {wanted} boot MSRs on vCPU {index}")]
    Msrs {
        /// The vCPU.
        index: u32,
        /// MSRs set.
        set: usize,
        /// MSRs given.
        wanted: usize,
    },
    /// The boot MSR list could not be built.
    #[error("cannot build the MSR list for vCPU {index}")]
    MsrList {
        /// The vCPU.
        index: u32,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(#[source] vmm_sys_util::errno::Error),
}

/// Where a vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// In 64-bit mode at `rip`, with this stack pointer and these argument registers.
    LongMode {
        /// Entry point.
        rip: u64,
        /// Stack pointer.
        rsp: u64,
        /// Argument registers of the boot protocol.
        args: regs::BootArgs,
    },
    /// Halted until the guest wakes it with INIT/SIPI (Linux application processors).
    WaitForSipi,
}

/// Creates vCPU `index` of `count` in `vm`, with CPUID, MSRs, FPU, LAPIC and its start state.
pub fn create(
    vm: &VmFd,
    host: &Host,
    index: u32,
    count: u32,
    start: Start,
) -> Result<VcpuFd, Error> {
    let setup = |what| {
        move |source| Error::Setup {
            index,
            what,
            source,
        }
    };
    let fd = vm.create_vcpu(u64::from(index)).map_err(setup("create"))?;

    let mut cpuid_entries = host.supported_cpuid().clone();
    // Indices and counts are below MAX_VCPUS (254), checked with the configuration.
    let identity = cpuid::VcpuIdentity {
        index: index as u8,
        count: count as u8,
        tsc_deadline: host.tsc_deadline(),
    };
    cpuid::filter(cpuid_entries.as_mut_slice(), identity);
    fd.set_cpuid2(&cpuid_entries).map_err(setup("CPUID"))?;

    let entries = msr::boot_msrs(host.msr_list());
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::MsrList { index })?;
    let set = fd.set_msrs(&msrs).map_err(setup("MSRs"))?;
    if set != entries.len() {
        return Err(Error::Msrs {
            index,
            set,
            wanted: entries.len(),
        });
    }

    fd.set_fpu(&regs::boot_fpu()).map_err(setup("FPU"))?;
    let mut lapic = fd.get_lapic().map_err(setup("LAPIC read"))?;
    regs::set_lint_modes(&mut lapic);
    fd.set_lapic(&lapic).map_err(setup("LAPIC"))?;

    if let Start::LongMode { rip, rsp, args } = start {
        let mut sregs = fd.get_sregs().map_err(setup("segment registers read"))?;
        regs::long_mode(&mut sregs);
        fd.set_sregs(&sregs).map_err(setup("segment registers"))?;
        fd.set_regs(&regs::entry_regs(rip, rsp, args))
            .map_err(setup("registers"))?;
        if index != 0 {
            let runnable = kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            };
            fd.set_mp_state(runnable).map_err(setup("MP state"))?;
        }
    }
    Ok(fd)
}

/// The signal that interrupts a vCPU thread's `KVM_RUN`.
pub fn kick_signal() -> c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {}

/// Installs the (empty) kick handler, once per process: the signal's only job is to make
/// `KVM_RUN` return `EINTR`.
pub fn install_kick_handler() -> Result<(), Error> {
    static INSTALLED: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick))
        .map_err(Error::KickHandler)
}

fn to_exit(exit: VcpuExit<'_>) -> Exit<'_> {
    match exit {
        VcpuExit::IoIn(port, data) => Exit::IoIn(port, data),
        VcpuExit::IoOut(port, data) => Exit::IoOut(port, data),
        VcpuExit::MmioRead(addr, data) => Exit::MmioRead(addr, data),
        VcpuExit::MmioWrite(addr, data) => Exit::MmioWrite(addr, data),
        VcpuExit::Hlt => Exit::Hlt,
        VcpuExit::Shutdown => Exit::Shutdown,
        VcpuExit::SystemEvent(kind, _) => Exit::SystemEvent(kind),
        VcpuExit::FailEntry(reason, _) => Exit::FailEntry(reason),
        VcpuExit::InternalError => Exit::InternalError,
        VcpuExit::Intr => Exit::Interrupted,
        other => Exit::Unexpected(format!("{other:?}")),
    }
}

/// Where the vCPU was and, after an internal error, KVM's sub-error code.
fn diagnose(fd: &mut VcpuFd) -> String {
    let rip = fd
        .get_regs()
        .map(|r| format!("rip={:#x}", r.rip))
        .unwrap_or_else(|e| format!("registers unreadable: {e}"));
    let run = fd.get_kvm_run();
    if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union
        // member KVM filled in.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        return format!(
            "{rip} suberror={} (1 = an instruction KVM's emulator cannot run)",
            internal.suberror
        );
    }
    rip
}

/// Stops the guest if the vCPU thread unwinds (a bug in the VMM): its other vCPUs would run
/// on, and the VMM would wait for a stop nobody reports.
struct StopOnPanic<'a> {
    state: &'a GuestState,
    index: u32,
}

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.state
                .request_stop(Stop::Failed(format!("vCPU {} thread panicked", self.index)));
        }
    }
}

/// Runs vCPU `index` of a guest until the guest stops; a stop decided here is reported to
/// `state`.
pub fn run(mut fd: VcpuFd, index: u32, state: Arc<GuestState>, devices: Arc<Devices>) {
    let _stop_on_panic = StopOnPanic {
        state: &state,
        index,
    };
    while !state.stopping() {
        let action = match fd.run() {
            Ok(exit) => exit::handle(to_exit(exit), &devices),
            Err(e) if matches!(e.errno(), libc::EINTR | libc::EAGAIN) => Action::Continue,
            Err(e) => Action::Stop(Stop::Failed(format!("KVM_RUN failed: {e}"))),
        };
        if let Action::Stop(stop) = action {
            if let Stop::Failed(why) = &stop {
                let where_ = diagnose(&mut fd);
                log::error!(
                    "{}: vCPU {index}: {why} ({where_}); stopping this guest",
                    devices.name()
                );
            }
            state.request_stop(stop);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::Event;

    #[test]
    fn a_panicking_vcpu_thread_stops_its_guest() {
        let (events, heard) = std::sync::mpsc::channel();
        let state = Arc::new(GuestState::new(3, events));
        let s = Arc::clone(&state);
        let ended = std::thread::spawn(move || {
            let _guard = StopOnPanic {
                state: &s,
                index: 1,
            };
            panic!("a bug");
        })
        .join();
        assert!(ended.is_err());
        assert!(state.stopping());
        assert!(matches!(state.stop_reason(), Some(Stop::Failed(why)) if why.contains("vCPU 1")));
        assert_eq!(heard.try_recv(), Ok(Event::GuestStopping(3)));
        // A vCPU thread that ends normally reports nothing through the guard.
        let (events, heard) = std::sync::mpsc::channel();
        let calm = GuestState::new(0, events);
        drop(StopOnPanic {
            state: &calm,
            index: 0,
        });
        assert!(!calm.stopping());
        assert!(heard.try_recv().is_err());
    }
}
