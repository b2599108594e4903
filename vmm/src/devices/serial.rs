//! The 16550 UART at 0x3f8 (vm-superio), its interrupt through an eventfd, and the input
//! queued for it beyond the UART's own FIFO.

use std::collections::VecDeque;
use std::io::{self, Write};

use vm_superio::{Serial, Trigger, serial::NoEvents};
use vmm_sys_util::eventfd::EventFd;

/// First I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Last I/O port of COM1.
pub const COM1_LAST: u16 = COM1_BASE + 7;
/// COM1's interrupt line (IOAPIC pin / GSI).
pub const COM1_GSI: u32 = 4;

/// Largest input backlog kept per guest; older input is dropped past it.
const MAX_PENDING_INPUT: usize = 1 << 20;

/// Errors of the serial port.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The interrupt eventfd cannot be created.
    #[error("cannot create the serial interrupt eventfd: {0}")]
    EventFd(#[source] io::Error),
}

/// Raises the UART's interrupt by writing to an eventfd registered as a KVM irqfd.
#[derive(Debug)]
pub struct IrqLine(EventFd);

impl IrqLine {
    /// A new, unregistered line.
    pub fn new() -> Result<Self, Error> {
        EventFd::new(libc::EFD_NONBLOCK)
            .map(Self)
            .map_err(Error::EventFd)
    }

    /// The eventfd to register with KVM.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A UART plus the guest input not yet accepted by its FIFO.
#[derive(Debug)]
pub struct SerialPort<W: Write> {
    uart: Serial<IrqLine, NoEvents, W>,
    pending: VecDeque<u8>,
    /// Whether the last register write failed: a run of failures is logged once.
    failing: bool,
    /// Input bytes dropped since the guest last took its input (logged once per run of drops).
    dropped_input: u64,
}

impl<W: Write> SerialPort<W> {
    /// A UART writing the guest's output to `out`.
    pub fn new(irq: IrqLine, out: W) -> Self {
        Self {
            uart: Serial::new(irq, out),
            pending: VecDeque::new(),
            failing: false,
            dropped_input: 0,
        }
    }

    /// The interrupt line.
    pub fn irq(&self) -> &IrqLine {
        self.uart.interrupt_evt()
    }

    /// The output sink.
    pub fn output_mut(&mut self) -> &mut W {
        self.uart.writer_mut()
    }

    /// Guest read of register `offset`.
    pub fn read(&mut self, offset: u8) -> u8 {
        let value = self.uart.read(offset);
        self.refill();
        value
    }

    /// Guest write of register `offset`. A failure (of the output or the interrupt) is logged
    /// as a warning when it starts a run of failures, at debug level while the run lasts: a
    /// guest writing its console byte by byte cannot flood the log.
    pub fn write(&mut self, offset: u8, value: u8) {
        match self.uart.write(offset, value) {
            Ok(()) => self.failing = false,
            Err(e) if !self.failing => {
                self.failing = true;
                log::warn!(
                    "serial: write to register {offset} failed: {e}; further failures are logged at debug level until a write succeeds"
                );
            }
            Err(e) => log::debug!("serial: write to register {offset} failed: {e}"),
        }
    }

    /// Whether the last register write failed.
    pub fn failing(&self) -> bool {
        self.failing
    }

    /// Queues input for the guest; it enters the UART FIFO as the guest drains it.
    pub fn enqueue_input(&mut self, bytes: &[u8]) {
        self.pending.extend(bytes);
        let excess = self.pending.len().saturating_sub(MAX_PENDING_INPUT);
        if excess > 0 {
            if self.dropped_input == 0 {
                log::warn!("serial: guest is not reading its console; input is dropped");
            }
            self.dropped_input += excess as u64;
            self.pending.drain(..excess);
        }
        self.refill();
    }

    /// Input bytes not yet in the FIFO.
    pub fn pending_input(&self) -> usize {
        self.pending.len()
    }

    /// Moves pending input into the FIFO as far as it has room.
    fn refill(&mut self) {
        let room = self.uart.fifo_capacity().min(self.pending.len());
        if room == 0 {
            return;
        }
        // Caught up (half the queue read since it overflowed): the run of drops is over.
        if self.dropped_input > 0 && self.pending.len() < MAX_PENDING_INPUT / 2 {
            log::warn!(
                "serial: guest reads its console again; {} input bytes were dropped",
                self.dropped_input
            );
            self.dropped_input = 0;
        }
        let chunk: Vec<u8> = self.pending.drain(..room).collect();
        if let Err(e) = self.uart.enqueue_raw_bytes(&chunk) {
            log::warn!("serial: cannot queue input: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATA: u8 = 0;
    const IER: u8 = 1;
    const LSR: u8 = 5;
    const LSR_DATA_READY: u8 = 1;

    fn port() -> SerialPort<Vec<u8>> {
        SerialPort::new(IrqLine::new().unwrap(), Vec::new())
    }

    #[test]
    fn guest_output_reaches_the_sink() {
        let mut p = port();
        for b in b"hi\n" {
            p.write(DATA, *b);
        }
        assert_eq!(p.output_mut().as_slice(), b"hi\n");
    }

    /// Output that fails while `fail` is set.
    struct Flaky(std::rc::Rc<std::cell::Cell<bool>>);

    impl Write for Flaky {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.0.get() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_run_of_output_failures_is_one_state_until_a_write_succeeds() {
        let fail = std::rc::Rc::new(std::cell::Cell::new(true));
        let mut p = SerialPort::new(IrqLine::new().unwrap(), Flaky(fail.clone()));
        p.write(DATA, b'a');
        assert!(p.failing());
        p.write(DATA, b'b');
        assert!(p.failing());
        fail.set(false);
        p.write(DATA, b'c');
        assert!(!p.failing());
    }

    #[test]
    fn long_input_is_delivered_in_order_through_the_small_fifo() {
        let mut p = port();
        let input: Vec<u8> = (0..200u32).map(|i| (i % 251) as u8).collect();
        p.enqueue_input(&input);
        assert!(p.pending_input() > 0);
        let mut got = Vec::new();
        while p.read(LSR) & LSR_DATA_READY != 0 {
            got.push(p.read(DATA));
        }
        assert_eq!(got, input);
        assert_eq!(p.pending_input(), 0);
    }

    #[test]
    fn input_raises_the_interrupt_when_enabled() {
        let mut p = port();
        p.write(IER, 1);
        while p.irq().eventfd().read().is_ok() {}
        p.enqueue_input(b"x");
        assert!(p.irq().eventfd().read().unwrap() >= 1);
    }

    #[test]
    fn input_the_guest_does_not_read_is_bounded_and_its_drops_are_one_run() {
        let mut p = port();
        let chunk = vec![b'z'; 64 << 10];
        for _ in 0..(2 * MAX_PENDING_INPUT / chunk.len()) {
            p.enqueue_input(&chunk);
        }
        assert!(p.pending_input() <= MAX_PENDING_INPUT);
        let dropped = p.dropped_input;
        assert!(dropped >= (MAX_PENDING_INPUT - 64) as u64, "{dropped}");
        // Reading a little does not end the run (no log line per byte read)...
        p.read(DATA);
        assert_eq!(p.dropped_input, dropped);
        // ... catching up does.
        while p.pending_input() >= MAX_PENDING_INPUT / 2 {
            p.read(DATA);
        }
        p.read(DATA);
        assert_eq!(p.dropped_input, 0);
    }
}
