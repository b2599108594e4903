//! The probe guest's console when the VMM runs in-process (through the `vmm` library): output
//! captured in memory through a sink, input sent by a closure (e.g. around
//! `vmm::devices::console::ConsoleInput::send_line`).

use std::io::{self, Write};
use std::sync::{Arc, Mutex, PoisonError};

use crate::protocol::{ProbeProtocol, reply_to};
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

impl<F: Fn(&str)> ProbeProtocol for ConsoleProbe<'_, F> {
    fn request(&mut self, command: &str) -> String {
        let is_reply = reply_to(&self.prefix, command);
        let before = self.console.lines().len();
        (self.send)(&format!("{}{command}", self.prefix));
        let mut reply = None;
        wait_until(
            &format!("the reply to {command:?}"),
            || {
                reply = self.console.lines()[before..]
                    .iter()
                    .find(|l| is_reply(l))
                    .cloned();
                reply.is_some()
            },
            || self.console.text(),
        );
        reply.unwrap_or_default()[self.prefix.len()..].to_string()
    }

    fn transcript(&self) -> String {
        self.console.text()
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
        let mut probe = console.probe("g0: ", move |line| {
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
