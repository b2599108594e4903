//! The probe guest's console when the VMM runs in-process (through the `vmm` library): output
//! captured in memory through a sink, input sent by a closure (e.g. around
//! `vmm::devices::console::ConsoleInput::send_line`).

use std::io::{self, Write};
use std::sync::{Arc, Mutex, PoisonError};

use crate::wait_until;

/// Console output of an in-process VMM, shared with the test.
#[derive(Debug, Clone, Default)]
pub struct CapturedConsole(Arc<Mutex<Vec<u8>>>);

impl Write for CapturedConsole {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl CapturedConsole {
    /// A sink for `vmm::Vmm::with_sink` writing here.
    pub fn sink(&self) -> Arc<Mutex<Box<dyn Write + Send>>> {
        Arc::new(Mutex::new(Box::new(self.clone())))
    }

    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }

    /// Complete lines written so far.
    pub fn lines(&self) -> Vec<String> {
        let text = self.text();
        let complete = text.rsplit_once('\n').map_or("", |(done, _)| done);
        complete.lines().map(str::to_string).collect()
    }

    /// Waits until a whole line equals `line`.
    ///
    /// # Panics
    /// When it does not come within the hang guard.
    pub fn wait_line(&self, line: &str) {
        wait_until(
            &format!("console line {line:?}"),
            || self.lines().iter().any(|l| l == line),
            || self.text(),
        );
    }

    /// The probe guest whose lines start with `prefix` (`""` for a single guest, `"guest0: "`
    /// for one of several), sending its input through `send`.
    pub fn probe<F: Fn(&str)>(&self, prefix: &str, send: F) -> ConsoleProbe<'_, F> {
        ConsoleProbe {
            console: self,
            prefix: prefix.to_string(),
            send,
        }
    }
}

/// One probe guest spoken to through a [`CapturedConsole`].
#[derive(Debug)]
pub struct ConsoleProbe<'a, F: Fn(&str)> {
    console: &'a CapturedConsole,
    prefix: String,
    send: F,
}

impl<F: Fn(&str)> ConsoleProbe<'_, F> {
    /// Sends `command` and returns the first reply line after it (without the prefix): `OK
    /// <letter> <gpa>[ value]` or `ERR ...`.
    ///
    /// # Panics
    /// When no reply comes within the hang guard.
    pub fn request(&self, command: &str) -> String {
        let mut words = command.split(' ');
        let ok = format!(
            "{}OK {} {}",
            self.prefix,
            words.next().unwrap_or_default(),
            words.next().unwrap_or_default()
        );
        let err = format!("{}ERR", self.prefix);
        let before = self.console.lines().len();
        (self.send)(&format!("{}{command}", self.prefix));
        let mut reply = None;
        wait_until(
            &format!("the reply to {command:?}"),
            || {
                reply = self.console.lines()[before..]
                    .iter()
                    .find(|l| *l == &ok || l.starts_with(&format!("{ok} ")) || l.starts_with(&err))
                    .cloned();
                reply.is_some()
            },
            || self.console.text(),
        );
        reply.unwrap_or_default()[self.prefix.len()..].to_string()
    }

    fn ok(&self, command: &str) -> String {
        let reply = self.request(command);
        assert!(
            reply.starts_with("OK "),
            "{command:?} failed: {reply}\n{}",
            self.console.text()
        );
        reply
    }

    fn last_hex(reply: &str) -> u64 {
        reply
            .rsplit(' ')
            .next()
            .and_then(|n| u64::from_str_radix(n, 16).ok())
            .unwrap_or_else(|| panic!("reply {reply:?} does not end with a hex number"))
    }

    /// The guest reads the u64 at `gpa`.
    pub fn read(&self, gpa: u64) -> u64 {
        Self::last_hex(&self.ok(&format!("R {gpa:x}")))
    }

    /// The guest writes the u64 `value` at `gpa`.
    pub fn write(&self, gpa: u64, value: u64) {
        self.ok(&format!("W {gpa:x} {value:x}"));
    }

    /// The guest's checksum of the page at `gpa`.
    pub fn checksum(&self, gpa: u64) -> u64 {
        Self::last_hex(&self.ok(&format!("C {gpa:x}")))
    }

    /// The guest fills the page at `gpa` with the u64 `value`.
    pub fn fill(&self, gpa: u64, value: u64) {
        self.ok(&format!("F {gpa:x} {value:x}"));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // test code
mod tests {
    use super::*;

    #[test]
    fn replies_are_taken_after_the_request() {
        let console = CapturedConsole::default();
        let mut writer = console.clone();
        writer.write_all(b"g0: OK R 10 1\n").unwrap();
        let answer = console.clone();
        let probe = console.probe("g0: ", move |line| {
            assert_eq!(line, "g0: R 10");
            answer
                .clone()
                .write_all(b"g1: OK R 10 5\ng0: OK R 10 2a\n")
                .unwrap();
        });
        assert_eq!(probe.read(0x10), 0x2a);
        assert_eq!(console.lines().len(), 3);
    }
}
