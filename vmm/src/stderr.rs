//! The process's stderr, for log records and the VMM's own lines, written through a
//! [`Forwarder`] of its own: a stderr nobody drains (a terminal paused with Ctrl-S, a pager not
//! scrolled, a stalled log collector) costs dropped lines, never a blocked vCPU, a stop that
//! does not finish, or a second signal that cannot end the process.
//!
//! The binary calls [`install`] first; until then (and if its thread cannot start) lines go to
//! stderr directly.

use std::io::{self, Write};
use std::sync::OnceLock;
use std::time::Duration;

use crate::devices::stdout::Forwarder;

/// The stderr thread's queue, once [`install`]ed (`None` inside: it could not start).
static FORWARDER: OnceLock<Option<Forwarder>> = OnceLock::new();

/// Starts the thread that writes stderr; returns a writer for the logger. Later calls return
/// another writer to the same thread.
pub fn install() -> Writer {
    FORWARDER.get_or_init(|| {
        Forwarder::spawn_quiet(io::stderr(), "stderr-out")
            .map_err(|e| {
                let _ = writeln!(
                    io::stderr(),
                    "vmm: no stderr thread ({e}): writing directly"
                );
            })
            .ok()
    });
    writer()
}

/// The stderr thread's queue, if it runs.
fn forwarder() -> Option<Forwarder> {
    FORWARDER.get().cloned().flatten()
}

/// A writer to the process's stderr (through the thread once [`install`]ed).
pub fn writer() -> Writer {
    Writer(forwarder())
}

/// Waits until what was written is on stderr, at most `wait` (before the process exits);
/// returns whether it was.
pub fn drain(wait: Duration) -> bool {
    forwarder().is_none_or(|f| f.drain(wait))
}

/// Writes to stderr without ever blocking on its reader. Its `flush` does not wait either
/// (the logger flushes after every record): [`drain`] does, with a bound.
#[derive(Debug, Clone)]
pub struct Writer(Option<Forwarder>);

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.0 {
            Some(f) => f.write(buf),
            None => io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &self.0 {
            Some(_) => Ok(()),
            None => io::stderr().flush(),
        }
    }
}
