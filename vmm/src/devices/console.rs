//! The process console shared by all guests: guest output to one sink (stdout), prefixed with
//! the guest's name when several guests run, and input lines routed to guests by prefix.

use std::io::{self, BufRead, Read, Write};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};

use super::serial::SerialPort;

/// Longest output line kept before it is emitted without waiting for its newline.
const MAX_LINE: usize = 64 << 10;
/// Longest input line routed to a guest when several run (longer ones are dropped).
const MAX_INPUT_LINE: usize = 64 << 10;

/// Where guest output goes: one sink for the process, written a whole line at a time.
pub type Sink = Arc<Mutex<Box<dyn Write + Send>>>;

/// The serial port of one guest, shared by its vCPUs and the console input.
pub type SharedSerial = Arc<Mutex<SerialPort<ConsoleOut>>>;

/// The process's stdout for guest output: one bounded queue written by a thread of its own
/// ([`super::stdout::Forwarder`]), so that a slow or stuck reader costs dropped output, never
/// a blocked vCPU, with a lane per guest so that a guest flooding its console loses its own
/// output, not its neighbours' lines. Once stdout's reader has gone (a broken pipe), one
/// warning is logged and guest output is dropped from then on: the guests keep running.
#[derive(Debug)]
pub struct StdoutSinks(Option<super::stdout::Forwarder>);

impl StdoutSinks {
    /// Starts the output thread (without it, guests write to stdout directly, line by line).
    pub fn new() -> Self {
        match super::stdout::Forwarder::spawn(DropWhenClosed::new(io::stdout())) {
            Ok(f) => Self(Some(f)),
            Err(e) => {
                log::warn!(
                    "console: no output thread ({e}); guests write to stdout directly, line by \
                     line"
                );
                Self(None)
            }
        }
    }

    /// The sink of guest `index`.
    pub fn sink(&self, index: usize) -> Sink {
        match &self.0 {
            Some(f) => Arc::new(Mutex::new(Box::new(f.for_source(index)))),
            None => Arc::new(Mutex::new(Box::new(DropWhenClosed::new(io::stdout())))),
        }
    }
}

impl Default for StdoutSinks {
    fn default() -> Self {
        Self::new()
    }
}

/// A writer that stops writing once its reader has gone.
///
/// The first broken pipe (`EPIPE`: the other end of a pipe or socket closed) is logged once as
/// a warning; that write and every later one are dropped and reported as done, so that a
/// guest writing its console never sees an error and the log is not flooded. Other errors are
/// passed on.
#[derive(Debug)]
pub struct DropWhenClosed<W: Write> {
    inner: W,
    closed: bool,
}

impl<W: Write> DropWhenClosed<W> {
    /// Writes to `inner` until it reports a broken pipe.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            closed: false,
        }
    }

    /// Whether the reader has gone (output is being dropped).
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Turns a broken pipe into `done` (and the writer into a closed one).
    fn check<T>(&mut self, result: io::Result<T>, done: T) -> io::Result<T> {
        match result {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                log::warn!(
                    "console: output closed ({e}); guest console output is dropped from now on"
                );
                self.closed = true;
                Ok(done)
            }
            other => other,
        }
    }
}

impl<W: Write> Write for DropWhenClosed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.closed {
            return Ok(buf.len());
        }
        let result = self.inner.write(buf);
        self.check(result, buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        let result = self.inner.flush();
        self.check(result, ())
    }
}

/// One guest's console output.
pub struct ConsoleOut {
    sink: Sink,
    prefix: Option<String>,
    line: Vec<u8>,
    /// The line with its prefix, as it is written (kept to be reused).
    whole: Vec<u8>,
}

impl std::fmt::Debug for ConsoleOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleOut")
            .field("prefix", &self.prefix)
            .field("buffered", &self.line.len())
            .finish()
    }
}

impl ConsoleOut {
    /// Output passed through byte for byte (one guest).
    pub fn raw(sink: Sink) -> Self {
        Self {
            sink,
            prefix: None,
            line: Vec::new(),
            whole: Vec::new(),
        }
    }

    /// Output emitted line by line as `NAME: line` (several guests), carriage returns dropped
    /// and other control characters but tab shown as `?`.
    pub fn prefixed(sink: Sink, name: &str) -> Self {
        Self {
            sink,
            prefix: Some(format!("{name}: ")),
            line: Vec::new(),
            whole: Vec::new(),
        }
    }

    /// Writes the line out, unflushed (see [`ConsoleOut::finish`]). It is cleared even when the
    /// sink fails (the line is lost, not kept growing with everything the guest writes after
    /// it).
    fn emit(&mut self, newline: bool) -> io::Result<()> {
        // One write per line: guests may have sinks of their own on one stdout (a lane each
        // of one queue), and a line written in parts could interleave with another guest's.
        let prefix = self.prefix.as_deref().unwrap_or_default().as_bytes();
        self.whole.clear();
        self.whole.extend_from_slice(prefix);
        self.whole.extend_from_slice(&self.line);
        if newline {
            self.whole.push(b'\n');
        }
        self.line.clear();
        self.sink
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write_all(&self.whole)
    }

    /// Emits a last unterminated line, if any (when the guest stops). The sink is not flushed
    /// here: stdout's writes reach it from a thread of their own
    /// ([`super::stdout::Forwarder`]), a flush waits for them, and the sink is shared by every
    /// guest; the VMM flushes it once, when every guest has stopped.
    pub fn finish(&mut self) -> io::Result<()> {
        if self.prefix.is_some() && !self.line.is_empty() {
            self.emit(true)?;
        }
        Ok(())
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.prefix.is_none() {
            let mut sink = self.sink.lock().unwrap_or_else(PoisonError::into_inner);
            sink.write_all(buf)?;
            return Ok(buf.len());
        }
        for &byte in buf {
            match byte {
                b'\n' => {
                    self.emit(true)?;
                    continue;
                }
                // The end of "\r\n" lines; alone it would let a guest write over its prefix.
                b'\r' => continue,
                // Other control characters (escape sequences) would reach the operator's
                // terminal, where a guest could pass its lines off as another guest's.
                b'\t' => self.line.push(byte),
                0..=0x1f | 0x7f => self.line.push(b'?'),
                _ => self.line.push(byte),
            }
            if self.line.len() >= MAX_LINE {
                self.emit(true)?;
            }
        }
        Ok(buf.len())
    }

    /// Nothing to do: the UART flushes after every byte, and the sink is flushed once, by
    /// `Vmm::run`, when every guest has stopped.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where an input line goes. Lines are bytes: a guest's console takes any, UTF-8 or not.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// To guest `index`, with its `NAME: ` prefix stripped.
    Guest(usize, &'a [u8]),
    /// To every guest, unchanged.
    All(&'a [u8]),
}

/// Routes `line`: `NAME: text` goes to guest NAME as `text`, anything else to every guest.
pub fn route<'a>(names: &[String], line: &'a [u8]) -> Route<'a> {
    if let Some(colon) = line.iter().position(|&b| b == b':')
        && let Some(index) = names.iter().position(|n| n.as_bytes() == &line[..colon])
    {
        let rest = &line[colon + 1..];
        return Route::Guest(index, rest.strip_prefix(b" ").unwrap_or(rest));
    }
    Route::All(line)
}

/// Feeds console input to the guests' serial ports.
#[derive(Clone)]
pub struct ConsoleInput {
    names: Vec<String>,
    ports: Vec<SharedSerial>,
}

impl std::fmt::Debug for ConsoleInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleInput")
            .field("names", &self.names)
            .finish()
    }
}

fn send(port: &SharedSerial, bytes: &[u8]) {
    port.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .enqueue_input(bytes);
}

impl ConsoleInput {
    /// Input for the guests `names`, whose serial ports are `ports` (same order).
    pub fn new(names: Vec<String>, ports: Vec<SharedSerial>) -> Self {
        Self { names, ports }
    }

    /// Sends one input line (without its newline) where [`route`] says, newline-terminated.
    pub fn send_line(&self, line: impl AsRef<[u8]>) {
        let (ports, text) = match route(&self.names, line.as_ref()) {
            Route::Guest(i, text) => (&self.ports[i..=i], text),
            Route::All(text) => (&self.ports[..], text),
        };
        let mut bytes = text.to_vec();
        bytes.push(b'\n');
        ports.iter().for_each(|p| send(p, &bytes));
    }

    /// Sends raw bytes to every guest.
    pub fn send_raw(&self, bytes: &[u8]) {
        self.ports.iter().for_each(|p| send(p, bytes));
    }

    /// Forwards `input` until it ends: byte for byte with one guest, line by line (routed by
    /// prefix) with several.
    pub fn forward(&self, input: impl Read) -> io::Result<()> {
        let mut reader = io::BufReader::new(input);
        if self.ports.len() == 1 {
            let mut buf = [0u8; 4096];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => self.send_raw(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        // Lines are read MAX_INPUT_LINE bytes at most: a longer one (input that is not lines,
        // e.g. a file of binary data) is dropped up to its newline, not held in memory.
        let mut line = Vec::new();
        let mut dropping = false;
        loop {
            line.clear();
            let read = (&mut reader)
                .take(MAX_INPUT_LINE as u64)
                .read_until(b'\n', &mut line)?;
            if read == 0 {
                return Ok(());
            }
            let whole = line.last() == Some(&b'\n');
            if dropping || (!whole && line.len() >= MAX_INPUT_LINE) {
                if !dropping {
                    log::warn!(
                        "console: dropped an input line longer than {} KiB",
                        MAX_INPUT_LINE >> 10
                    );
                }
                dropping = !whole;
                continue;
            }
            let end = line.strip_suffix(b"\n").unwrap_or(&line);
            self.send_line(end.strip_suffix(b"\r").unwrap_or(end));
        }
    }

    /// Forwards the process's stdin on a background thread.
    pub fn spawn_stdin_reader(self) -> io::Result<JoinHandle<()>> {
        thread::Builder::new()
            .name("console-in".into())
            .spawn(move || {
                if let Err(e) = self.forward(io::stdin().lock()) {
                    log::warn!("console: reading stdin failed: {e}");
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::IrqLine;

    /// A sink whose contents, and how often it was flushed, the test can read.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>, Arc<std::sync::atomic::AtomicUsize>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
    }

    fn sink() -> (Sink, Shared) {
        let shared = Shared::default();
        (Arc::new(Mutex::new(Box::new(shared.clone()))), shared)
    }

    fn text(s: &Shared) -> String {
        String::from_utf8(s.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn prefixed_lines_carry_no_control_characters() {
        let (sink, out) = sink();
        let mut a = ConsoleOut::prefixed(sink, "guest0");
        a.write_all(b"boot\r\n\rguest1: fake\x1b[2K\ttab\x07\n")
            .unwrap();
        assert_eq!(text(&out), "guest0: boot\nguest0: guest1: fake?[2K\ttab?\n");
    }

    #[test]
    fn a_guest_never_flushes_the_sink() {
        // The process's sink (`stdout::Forwarder`) waits on a flush for a reader that may be
        // stuck, up to `DRAIN_WAIT`: the UART's flush per byte must never reach it.
        let (sink, out) = sink();
        for mut w in [
            ConsoleOut::raw(sink.clone()),
            ConsoleOut::prefixed(sink.clone(), "guest0"),
        ] {
            for &b in b"login: ok\n".iter().cycle().take(200) {
                w.write_all(&[b]).unwrap();
                w.flush().unwrap();
            }
        }
        let want = "login: ok\n".repeat(20) + &"guest0: login: ok\n".repeat(20);
        assert_eq!(text(&out), want);
        // Nor does the end of a guest (the sink is shared: its flush would hold up the others).
        let mut last = ConsoleOut::prefixed(sink, "guest1");
        last.write_all(b"bye").unwrap();
        last.finish().unwrap();
        assert_eq!(out.1.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert_eq!(text(&out), want + "guest1: bye\n");
    }

    #[test]
    fn a_failing_sink_never_lets_a_line_grow() {
        let sink: Sink = Arc::new(Mutex::new(Box::new(crate::devices::stdout::tests::Full)));
        let mut out = ConsoleOut::prefixed(sink, "guest0");
        for _ in 0..1024 {
            let _ = out.write(&[b'z'; 4096]);
            assert!(out.line.len() < MAX_LINE, "{} bytes kept", out.line.len());
        }
    }

    #[test]
    fn several_guests_get_whole_prefixed_lines() {
        let (sink, out) = sink();
        let mut a = ConsoleOut::prefixed(sink.clone(), "guest0");
        let mut b = ConsoleOut::prefixed(sink, "guest1");
        a.write_all(b"hel").unwrap();
        b.write_all(b"world\n").unwrap();
        a.write_all(b"lo\npartial").unwrap();
        assert_eq!(text(&out), "guest1: world\nguest0: hello\n");
        a.finish().unwrap();
        assert_eq!(
            text(&out),
            "guest1: world\nguest0: hello\nguest0: partial\n"
        );
    }

    /// A writer whose reader has gone, counting the calls that reach it.
    #[derive(Default)]
    struct Broken {
        calls: usize,
        kind: Option<io::ErrorKind>,
    }

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            self.calls += 1;
            Err(self.kind.unwrap_or(io::ErrorKind::BrokenPipe).into())
        }
        fn flush(&mut self) -> io::Result<()> {
            self.calls += 1;
            Err(self.kind.unwrap_or(io::ErrorKind::BrokenPipe).into())
        }
    }

    #[test]
    fn output_after_a_broken_pipe_is_dropped_without_errors() {
        let mut w = DropWhenClosed::new(Broken::default());
        assert!(!w.closed());
        for _ in 0..100 {
            assert_eq!(w.write(b"guest0: hello\n").unwrap(), 14);
            w.flush().unwrap();
        }
        assert!(w.closed());
        assert_eq!(w.inner.calls, 1, "the closed writer is not written again");

        let mut other = DropWhenClosed::new(Broken {
            kind: Some(io::ErrorKind::WouldBlock),
            ..Broken::default()
        });
        assert!(other.write(b"x").is_err());
        assert!(other.write(b"x").is_err());
        assert!(!other.closed());
        assert_eq!(other.inner.calls, 2);
    }

    #[test]
    fn output_through_a_working_writer_arrives() {
        let out = Shared::default();
        let mut w = DropWhenClosed::new(out.clone());
        w.write_all(b"ok\n").unwrap();
        w.flush().unwrap();
        assert_eq!(text(&out), "ok\n");
        assert!(!w.closed());
    }

    #[test]
    fn one_guest_passes_bytes_through() {
        let (sink, out) = sink();
        let mut a = ConsoleOut::raw(sink);
        a.write_all(b"login: ").unwrap();
        assert_eq!(text(&out), "login: ");
    }

    #[test]
    fn input_lines_route_by_prefix() {
        let names = vec!["guest0".to_string(), "guest1".to_string()];
        assert_eq!(route(&names, b"guest1: R 1000"), Route::Guest(1, b"R 1000"));
        assert_eq!(route(&names, b"guest0:X 0"), Route::Guest(0, b"X 0"));
        assert_eq!(route(&names, b"guest7: hi"), Route::All(b"guest7: hi"));
        assert_eq!(route(&names, b"C 2000"), Route::All(b"C 2000"));
        assert_eq!(
            route(&names, b"guest1: \xe9t\xe9"),
            Route::Guest(1, b"\xe9t\xe9")
        );
    }

    fn drain(port: &SharedSerial) -> Vec<u8> {
        let mut p = port.lock().unwrap();
        let mut got = Vec::new();
        while p.read(5) & 1 != 0 {
            got.push(p.read(0));
        }
        got
    }

    /// Console input for two guests, and their serial ports.
    fn two_guests_input() -> (ConsoleInput, Vec<SharedSerial>) {
        let (sink, _) = sink();
        let ports: Vec<SharedSerial> = (0..2)
            .map(|i| {
                let out = ConsoleOut::prefixed(sink.clone(), &format!("guest{i}"));
                Arc::new(Mutex::new(SerialPort::new(IrqLine::new().unwrap(), out)))
            })
            .collect();
        let names = vec!["guest0".into(), "guest1".into()];
        (ConsoleInput::new(names, ports.clone()), ports)
    }

    #[test]
    fn forwarded_input_reaches_the_right_serial_ports() {
        let (input, ports) = two_guests_input();
        input
            .forward(&b"guest1: W 10 5\nboth\r\nguest0: \xe9\xff\nguest1: R 8\n"[..])
            .unwrap();
        // Bytes that are not UTF-8 pass through, and the lines after them too.
        assert_eq!(drain(&ports[0]), b"both\n\xe9\xff\n");
        assert_eq!(drain(&ports[1]), b"W 10 5\nboth\nR 8\n");
    }

    #[test]
    fn an_input_line_too_long_to_route_is_dropped_not_kept() {
        let (input, ports) = two_guests_input();
        // Three times the limit without a newline, then an ordinary line; and a line of
        // exactly the limit (with its newline just past it), then another.
        let mut data = b"guest1: ".to_vec();
        data.extend(std::iter::repeat_n(b'z', 3 * MAX_INPUT_LINE));
        data.extend(b"\nguest1: after\n");
        data.extend(std::iter::repeat_n(b'y', MAX_INPUT_LINE));
        data.extend(b"\nguest0: last\n");
        input.forward(&data[..]).unwrap();
        assert_eq!(drain(&ports[1]), b"after\n");
        assert_eq!(drain(&ports[0]), b"last\n");
    }

    #[test]
    fn guests_on_lanes_of_one_stdout_never_mix_their_lines() {
        let gate = crate::devices::stdout::tests::Gate::default();
        gate.open();
        let forwarder = crate::devices::stdout::Forwarder::spawn(gate.clone()).unwrap();
        let writers: Vec<_> = (0..2)
            .map(|g| {
                let sink: Sink = Arc::new(Mutex::new(Box::new(forwarder.for_source(g))));
                let mut out = ConsoleOut::prefixed(sink, &format!("guest{g}"));
                thread::spawn(move || {
                    // As the UART does: a write per byte.
                    for i in 0..300 {
                        for b in format!("OK F {i:x}\n").bytes() {
                            out.write_all(&[b]).unwrap();
                        }
                    }
                })
            })
            .collect();
        writers.into_iter().for_each(|w| w.join().unwrap());
        let mut f = forwarder;
        f.flush().unwrap();
        let seen = gate.seen();
        let lines: Vec<&str> = seen.lines().collect();
        assert_eq!(lines.len(), 600);
        for g in 0..2 {
            let mine: Vec<&str> = lines
                .iter()
                .filter_map(|l| l.strip_prefix(&format!("guest{g}: ")))
                .collect();
            let want: Vec<String> = (0..300).map(|i| format!("OK F {i:x}")).collect();
            assert_eq!(mine, want, "guest{g}'s lines");
        }
    }
}
