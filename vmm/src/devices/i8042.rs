//! A minimal i8042 keyboard controller (ports 0x60 and 0x64) with no keyboard or mouse
//! attached. It answers the controller commands Linux's probe sends (command byte read and
//! write, self and interface tests, AUX loopback) at once instead of letting them time out,
//! and turns the reset commands into a guest reset request.

use std::collections::VecDeque;

/// Data port.
pub const DATA_PORT: u16 = 0x60;
/// Status (read) and command (write) port.
pub const COMMAND_PORT: u16 = 0x64;

/// Status: output buffer full.
const STATUS_OUTPUT_FULL: u8 = 1;
/// Status: system flag (mirrors the command byte's bit 2).
const STATUS_SYSTEM: u8 = 1 << 2;
/// Status: the last write was a command.
const STATUS_COMMAND: u8 = 1 << 3;

/// Most bytes waiting in the output buffer (a real controller holds one; a little more lets
/// a driver send a few commands before reading their replies). Replies beyond it are dropped,
/// so a guest sending commands without reading cannot grow the VMM's memory.
const MAX_OUTPUT: usize = 16;

/// Command byte: keyboard interrupt, system flag, scancode translation.
const INITIAL_COMMAND_BYTE: u8 = 0x45;
/// Command byte: system flag.
const CTR_SYSTEM: u8 = 1 << 2;
/// Command byte: keyboard disabled.
const CTR_KBD_DISABLED: u8 = 1 << 4;
/// Command byte: AUX disabled.
const CTR_AUX_DISABLED: u8 = 1 << 5;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_KBD_LOOP: u8 = 0xd2;
const CMD_AUX_LOOP: u8 = 0xd3;
const CMD_AUX_SEND: u8 = 0xd4;
const CMD_PULSE_RESET: u8 = 0xfe;

/// Self-test passed.
const SELF_TEST_OK: u8 = 0x55;
/// Keyboard interface test passed.
const KBD_TEST_OK: u8 = 0x00;
/// AUX interface test: clock line stuck low, i.e. no AUX port.
const AUX_TEST_ABSENT: u8 = 0x01;
/// Output port: reset line not asserted, A20 enabled.
const OUTPUT_PORT_DEFAULT: u8 = 0x03;
/// Output port bit 0: clearing it resets the CPU.
const OUTPUT_PORT_RESET_INACTIVE: u8 = 1;

/// What a guest access asks of the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The guest asked for a CPU reset (treated as a clean stop).
    Reset,
}

/// The controller.
#[derive(Debug)]
pub struct I8042 {
    command_byte: u8,
    status: u8,
    output: VecDeque<u8>,
    last_output: u8,
    awaiting_data: Option<u8>,
}

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl I8042 {
    /// A controller after power-on.
    pub fn new() -> Self {
        Self {
            command_byte: INITIAL_COMMAND_BYTE,
            status: STATUS_SYSTEM,
            output: VecDeque::new(),
            last_output: 0,
            awaiting_data: None,
        }
    }

    fn push(&mut self, byte: u8) {
        if self.output.len() < MAX_OUTPUT {
            self.output.push_back(byte);
        } else {
            log::debug!("i8042: output buffer full, dropped {byte:#x}");
        }
    }

    /// Guest read of `port` (0x60 or 0x64).
    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            DATA_PORT => {
                if let Some(b) = self.output.pop_front() {
                    self.last_output = b;
                }
                self.last_output
            }
            _ => {
                let full = if self.output.is_empty() {
                    0
                } else {
                    STATUS_OUTPUT_FULL
                };
                self.status | full
            }
        }
    }

    /// Guest write of `value` to `port` (0x60 or 0x64).
    pub fn write(&mut self, port: u16, value: u8) -> Option<Effect> {
        if port == COMMAND_PORT {
            self.status |= STATUS_COMMAND;
            return self.command(value);
        }
        self.status &= !STATUS_COMMAND;
        match self.awaiting_data.take() {
            Some(CMD_WRITE_CTR) => {
                self.command_byte = value;
                self.status = (self.status & !STATUS_SYSTEM) | (value & CTR_SYSTEM);
            }
            Some(CMD_WRITE_OUTPUT_PORT) if value & OUTPUT_PORT_RESET_INACTIVE == 0 => {
                return Some(Effect::Reset);
            }
            // Loopback: the byte comes back as if the device had sent it. The AUX loop answers
            // without the AUX-data status bit, so a probe sees at once that no AUX port exists.
            Some(CMD_KBD_LOOP | CMD_AUX_LOOP) => self.push(value),
            // Bytes for the keyboard or the mouse: nothing is attached.
            _ => {}
        }
        None
    }

    fn command(&mut self, command: u8) -> Option<Effect> {
        match command {
            CMD_READ_CTR => self.push(self.command_byte),
            CMD_AUX_DISABLE => self.command_byte |= CTR_AUX_DISABLED,
            CMD_AUX_ENABLE => self.command_byte &= !CTR_AUX_DISABLED,
            CMD_AUX_TEST => self.push(AUX_TEST_ABSENT),
            CMD_SELF_TEST => self.push(SELF_TEST_OK),
            CMD_KBD_TEST => self.push(KBD_TEST_OK),
            CMD_KBD_DISABLE => self.command_byte |= CTR_KBD_DISABLED,
            CMD_KBD_ENABLE => self.command_byte &= !CTR_KBD_DISABLED,
            CMD_READ_OUTPUT_PORT => self.push(OUTPUT_PORT_DEFAULT),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT | CMD_KBD_LOOP | CMD_AUX_LOOP | CMD_AUX_SEND => {
                self.awaiting_data = Some(command);
            }
            CMD_PULSE_RESET => return Some(Effect::Reset),
            other => log::debug!("i8042: ignored command {other:#x}"),
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command_reply(k: &mut I8042, command: u8) -> Option<u8> {
        assert_eq!(k.write(COMMAND_PORT, command), None);
        (k.read(COMMAND_PORT) & STATUS_OUTPUT_FULL != 0).then(|| k.read(DATA_PORT))
    }

    #[test]
    fn answers_the_linux_probe() {
        let mut k = I8042::new();
        assert_eq!(command_reply(&mut k, CMD_SELF_TEST), Some(SELF_TEST_OK));
        assert_eq!(
            command_reply(&mut k, CMD_READ_CTR),
            Some(INITIAL_COMMAND_BYTE)
        );
        k.write(COMMAND_PORT, CMD_WRITE_CTR);
        k.write(DATA_PORT, 0x47);
        assert_eq!(command_reply(&mut k, CMD_READ_CTR), Some(0x47));
        assert_eq!(command_reply(&mut k, CMD_KBD_TEST), Some(KBD_TEST_OK));
        assert_eq!(command_reply(&mut k, CMD_AUX_TEST), Some(AUX_TEST_ABSENT));
        assert_eq!(k.read(COMMAND_PORT) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn aux_loop_echoes_without_claiming_aux_data() {
        let mut k = I8042::new();
        k.write(COMMAND_PORT, CMD_AUX_LOOP);
        k.write(DATA_PORT, 0x5a);
        let status = k.read(COMMAND_PORT);
        assert_eq!(status & STATUS_OUTPUT_FULL, STATUS_OUTPUT_FULL);
        assert_eq!(status & 0x20, 0);
        assert_eq!(k.read(DATA_PORT), 0x5a);
    }

    #[test]
    fn aux_enable_and_disable_show_in_the_command_byte() {
        let mut k = I8042::new();
        k.write(COMMAND_PORT, CMD_AUX_DISABLE);
        assert_eq!(
            command_reply(&mut k, CMD_READ_CTR).unwrap() & CTR_AUX_DISABLED,
            CTR_AUX_DISABLED
        );
        k.write(COMMAND_PORT, CMD_AUX_ENABLE);
        assert_eq!(
            command_reply(&mut k, CMD_READ_CTR).unwrap() & CTR_AUX_DISABLED,
            0
        );
    }

    #[test]
    fn reset_commands_request_a_reset() {
        let mut k = I8042::new();
        assert_eq!(k.write(COMMAND_PORT, CMD_PULSE_RESET), Some(Effect::Reset));
        k.write(COMMAND_PORT, CMD_WRITE_OUTPUT_PORT);
        assert_eq!(k.write(DATA_PORT, 0x02), Some(Effect::Reset));
        k.write(COMMAND_PORT, CMD_WRITE_OUTPUT_PORT);
        assert_eq!(k.write(DATA_PORT, 0x03), None);
    }

    #[test]
    fn replies_nobody_reads_do_not_pile_up() {
        let mut k = I8042::new();
        for _ in 0..10_000 {
            assert_eq!(k.write(COMMAND_PORT, CMD_SELF_TEST), None);
        }
        assert_eq!(k.output.len(), MAX_OUTPUT);
        let mut replies = 0;
        while k.read(COMMAND_PORT) & STATUS_OUTPUT_FULL != 0 {
            assert_eq!(k.read(DATA_PORT), SELF_TEST_OK);
            replies += 1;
        }
        assert_eq!(replies, MAX_OUTPUT);
        assert_eq!(command_reply(&mut k, CMD_KBD_TEST), Some(KBD_TEST_OK));
    }

    #[test]
    fn keyboard_bytes_are_dropped() {
        let mut k = I8042::new();
        assert_eq!(k.write(DATA_PORT, 0xff), None);
        assert_eq!(k.read(COMMAND_PORT) & STATUS_OUTPUT_FULL, 0);
    }
}
