//! The emulated devices of one guest, behind one port-I/O dispatcher: the COM1 UART, the
//! i8042 and the debug-exit port. Ports and MMIO no device handles behave as on a PC with
//! nothing there: reads return all ones, writes are dropped.

pub mod console;
pub mod i8042;
pub mod serial;
pub mod stdout;

use std::sync::{Mutex, PoisonError};

use console::SharedSerial;
use i8042::I8042;
use serial::{COM1_BASE, COM1_LAST};

/// Debug-exit port: a byte written here stops the guest with that byte as its status.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// POST-code port, written by Linux as an I/O delay; silently ignored.
const POST_CODE_PORT: u16 = 0x80;

/// What a device access asks of the vCPU loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// The guest wrote `status` to the debug-exit port.
    DebugExit(u8),
    /// The guest asked for a reset through the i8042.
    Reset,
}

/// The devices of one guest, shared by its vCPUs.
#[derive(Debug)]
pub struct Devices {
    name: String,
    serial: SharedSerial,
    i8042: Mutex<I8042>,
}

impl Devices {
    /// Devices of guest `name` with its serial port.
    pub fn new(name: &str, serial: SharedSerial) -> Self {
        Self {
            name: name.to_string(),
            serial,
            i8042: Mutex::new(I8042::new()),
        }
    }

    /// The guest's serial port.
    pub fn serial(&self) -> &SharedSerial {
        &self.serial
    }

    /// The guest's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A guest `in` from `port`. Multi-byte accesses to the byte-wide devices are taken as
    /// repeated byte accesses to the same port (`rep insb`).
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            COM1_BASE..=COM1_LAST => {
                let mut serial = self.serial.lock().unwrap_or_else(PoisonError::into_inner);
                let offset = (port - COM1_BASE) as u8;
                data.iter_mut().for_each(|b| *b = serial.read(offset));
            }
            i8042::DATA_PORT | i8042::COMMAND_PORT => {
                let mut kbd = self.i8042.lock().unwrap_or_else(PoisonError::into_inner);
                data.iter_mut().for_each(|b| *b = kbd.read(port));
            }
            _ => {
                log::debug!(
                    "{}: unhandled port read {port:#x} ({} bytes)",
                    self.name,
                    data.len()
                );
                data.fill(0xff);
            }
        }
    }

    /// A guest `out` to `port`; returns what the guest asked for, if anything. Multi-byte
    /// accesses to the byte-wide devices are taken as repeated byte accesses (`rep outsb`).
    pub fn pio_write(&self, port: u16, data: &[u8]) -> Option<Request> {
        match port {
            COM1_BASE..=COM1_LAST => {
                let mut serial = self.serial.lock().unwrap_or_else(PoisonError::into_inner);
                let offset = (port - COM1_BASE) as u8;
                data.iter().for_each(|&b| serial.write(offset, b));
                None
            }
            i8042::DATA_PORT | i8042::COMMAND_PORT => {
                let mut kbd = self.i8042.lock().unwrap_or_else(PoisonError::into_inner);
                data.iter()
                    .filter_map(|&b| kbd.write(port, b))
                    .last()
                    .map(|i8042::Effect::Reset| Request::Reset)
            }
            DEBUG_EXIT_PORT => data.first().map(|&status| Request::DebugExit(status)),
            POST_CODE_PORT => None,
            _ => {
                log::debug!("{}: unhandled port write {port:#x} {data:02x?}", self.name);
                None
            }
        }
    }

    /// A guest MMIO read nothing handles: all ones.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        log::debug!(
            "{}: unhandled MMIO read {addr:#x} ({} bytes)",
            self.name,
            data.len()
        );
        data.fill(0xff);
    }

    /// A guest MMIO write nothing handles: dropped.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        log::debug!("{}: unhandled MMIO write {addr:#x} {data:02x?}", self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::console::{ConsoleOut, Sink};
    use super::serial::{IrqLine, SerialPort};
    use super::*;
    use std::io::Write;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Collect(Arc<Mutex<Vec<u8>>>);

    impl Write for Collect {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn devices() -> (Devices, Collect) {
        let out = Collect::default();
        let sink: Sink = Arc::new(Mutex::new(Box::new(out.clone())));
        let serial = SerialPort::new(IrqLine::new().unwrap(), ConsoleOut::raw(sink));
        (Devices::new("g", Arc::new(Mutex::new(serial))), out)
    }

    #[test]
    fn debug_exit_carries_the_status_byte() {
        let (d, _) = devices();
        assert_eq!(
            d.pio_write(DEBUG_EXIT_PORT, &[42]),
            Some(Request::DebugExit(42))
        );
        assert_eq!(
            d.pio_write(DEBUG_EXIT_PORT, &[7, 0, 0, 0]),
            Some(Request::DebugExit(7))
        );
    }

    #[test]
    fn serial_output_and_rep_outsb_reach_the_console() {
        let (d, out) = devices();
        assert_eq!(d.pio_write(COM1_BASE, b"o"), None);
        d.pio_write(COM1_BASE, b"k\n");
        assert_eq!(out.0.lock().unwrap().as_slice(), b"ok\n");
    }

    #[test]
    fn unhandled_ports_and_mmio_read_all_ones() {
        let (d, _) = devices();
        let mut data = [0u8; 4];
        d.pio_read(0xcfc, &mut data);
        assert_eq!(data, [0xff; 4]);
        assert_eq!(d.pio_write(0xcf8, &[0, 0, 0, 0x80]), None);
        let mut data = [0u8; 8];
        d.mmio_read(0xd000_0000, &mut data);
        assert_eq!(data, [0xff; 8]);
    }

    #[test]
    fn i8042_reset_becomes_a_reset_request() {
        let (d, _) = devices();
        assert_eq!(
            d.pio_write(i8042::COMMAND_PORT, &[0xfe]),
            Some(Request::Reset)
        );
        let mut status = [0u8];
        d.pio_read(i8042::COMMAND_PORT, &mut status);
        assert_eq!(status[0] & 1, 0);
    }

    #[test]
    fn serial_scratch_register_round_trips() {
        let (d, _) = devices();
        d.pio_write(COM1_BASE + 7, &[0x5a]);
        let mut v = [0u8];
        d.pio_read(COM1_BASE + 7, &mut v);
        assert_eq!(v[0], 0x5a);
    }
}
