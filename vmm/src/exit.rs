//! What each vCPU exit means for its guest. Pure decisions over the guest's devices: the
//! vCPU loop turns KVM's exits into [`Exit`]s and acts on the returned [`Action`].

use std::fmt;

use crate::devices::{Devices, Request};

/// `KVM_SYSTEM_EVENT_SHUTDOWN`.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
/// `KVM_SYSTEM_EVENT_RESET`.
const SYSTEM_EVENT_RESET: u32 = 2;
/// `KVM_SYSTEM_EVENT_CRASH`.
const SYSTEM_EVENT_CRASH: u32 = 3;

/// Status of a guest that stopped because it failed.
pub const FAILED_STATUS: u8 = 1;

/// A vCPU exit, as far as the VMM cares.
#[derive(Debug)]
pub enum Exit<'a> {
    /// Port read; fill the data.
    IoIn(u16, &'a mut [u8]),
    /// Port write.
    IoOut(u16, &'a [u8]),
    /// MMIO read; fill the data.
    MmioRead(u64, &'a mut [u8]),
    /// MMIO write.
    MmioWrite(u64, &'a [u8]),
    /// `HLT` reached userspace (only without an in-kernel LAPIC).
    Hlt,
    /// Triple fault.
    Shutdown,
    /// A system event (`KVM_SYSTEM_EVENT_*`).
    SystemEvent(u32),
    /// KVM failed to enter the guest; hardware reason.
    FailEntry(u64),
    /// KVM internal error (e.g. an instruction its emulator cannot run).
    InternalError,
    /// Interrupted by a signal; the loop checks whether it must stop.
    Interrupted,
    /// Anything else.
    Unexpected(String),
}

/// Why a guest stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The guest wrote its status to the debug-exit port.
    DebugExit(u8),
    /// The guest reset itself through the i8042 or a reset event.
    Reset,
    /// Triple fault, or a shutdown event.
    Shutdown,
    /// The VMM was asked to stop it (signal, or the host application).
    Requested,
    /// The guest failed (KVM error, crash event, unexpected exit).
    Failed(String),
}

impl Stop {
    /// The guest's exit status: the debug-exit byte, [`FAILED_STATUS`] on failure, 0
    /// otherwise.
    pub fn status(&self) -> u8 {
        match self {
            Stop::DebugExit(status) => *status,
            Stop::Failed(_) => FAILED_STATUS,
            Stop::Reset | Stop::Shutdown | Stop::Requested => 0,
        }
    }
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::DebugExit(status) => write!(f, "debug exit with status {status}"),
            Stop::Reset => write!(f, "reset by the guest"),
            Stop::Shutdown => write!(f, "shut down (triple fault or shutdown event)"),
            Stop::Requested => write!(f, "stopped on request"),
            Stop::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// What the vCPU loop does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run the vCPU again.
    Continue,
    /// Stop the whole guest.
    Stop(Stop),
}

/// Decides what `exit` means, doing the device access it carries.
pub fn handle(exit: Exit<'_>, devices: &Devices) -> Action {
    match exit {
        Exit::IoIn(port, data) => {
            devices.pio_read(port, data);
            Action::Continue
        }
        Exit::IoOut(port, data) => match devices.pio_write(port, data) {
            None => Action::Continue,
            Some(Request::DebugExit(status)) => Action::Stop(Stop::DebugExit(status)),
            Some(Request::Reset) => Action::Stop(Stop::Reset),
        },
        Exit::MmioRead(addr, data) => {
            devices.mmio_read(addr, data);
            Action::Continue
        }
        Exit::MmioWrite(addr, data) => {
            devices.mmio_write(addr, data);
            Action::Continue
        }
        Exit::Hlt | Exit::Interrupted => Action::Continue,
        Exit::Shutdown => Action::Stop(Stop::Shutdown),
        Exit::SystemEvent(SYSTEM_EVENT_SHUTDOWN) => Action::Stop(Stop::Shutdown),
        Exit::SystemEvent(SYSTEM_EVENT_RESET) => Action::Stop(Stop::Reset),
        Exit::SystemEvent(SYSTEM_EVENT_CRASH) => {
            Action::Stop(Stop::Failed("the guest reported a crash".into()))
        }
        Exit::SystemEvent(other) => {
            Action::Stop(Stop::Failed(format!("unknown system event {other}")))
        }
        Exit::FailEntry(reason) => Action::Stop(Stop::Failed(format!(
            "KVM could not enter the guest (hardware reason {reason:#x})"
        ))),
        Exit::InternalError => Action::Stop(Stop::Failed("KVM internal error".into())),
        Exit::Unexpected(what) => Action::Stop(Stop::Failed(format!("unexpected exit {what}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::console::{ConsoleOut, Sink};
    use crate::devices::serial::{IrqLine, SerialPort};
    use crate::devices::{DEBUG_EXIT_PORT, i8042};
    use std::sync::{Arc, Mutex};

    fn devices() -> Devices {
        let sink: Sink = Arc::new(Mutex::new(Box::new(std::io::sink())));
        let serial = SerialPort::new(IrqLine::new().unwrap(), ConsoleOut::raw(sink));
        Devices::new("g", Arc::new(Mutex::new(serial)))
    }

    #[test]
    fn debug_exit_stops_with_its_status() {
        let d = devices();
        let action = handle(Exit::IoOut(DEBUG_EXIT_PORT, &[3]), &d);
        assert_eq!(action, Action::Stop(Stop::DebugExit(3)));
        assert_eq!(Stop::DebugExit(3).status(), 3);
    }

    #[test]
    fn resets_and_shutdowns_are_clean_stops() {
        let d = devices();
        let reset = handle(Exit::IoOut(i8042::COMMAND_PORT, &[0xfe]), &d);
        assert_eq!(reset, Action::Stop(Stop::Reset));
        assert_eq!(handle(Exit::Shutdown, &d), Action::Stop(Stop::Shutdown));
        assert_eq!(handle(Exit::SystemEvent(2), &d), Action::Stop(Stop::Reset));
        for stop in [Stop::Reset, Stop::Shutdown, Stop::Requested] {
            assert_eq!(stop.status(), 0);
        }
    }

    #[test]
    fn kvm_failures_stop_the_guest_as_failed() {
        let d = devices();
        for exit in [
            Exit::InternalError,
            Exit::FailEntry(0x21),
            Exit::SystemEvent(3),
            Exit::Unexpected("Debug".into()),
        ] {
            match handle(exit, &d) {
                Action::Stop(stop @ Stop::Failed(_)) => assert_eq!(stop.status(), FAILED_STATUS),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn device_accesses_continue() {
        let d = devices();
        let mut data = [0u8; 2];
        assert_eq!(handle(Exit::IoIn(0x1234, &mut data), &d), Action::Continue);
        assert_eq!(data, [0xff, 0xff]);
        assert_eq!(handle(Exit::MmioWrite(0x1000, &[1]), &d), Action::Continue);
        assert_eq!(handle(Exit::Interrupted, &d), Action::Continue);
    }
}
