//! Output to a stream (guest consoles to stdout; the log and the VMM's lines to stderr,
//! [`crate::stderr`]) without ever blocking the writer: writes go to a bounded queue that one
//! thread drains to the stream. A reader that is slow, stuck or gone (a pipe nobody reads, a
//! full disk) then costs dropped output, counted and reported, never a stalled vCPU, a stalled
//! neighbour guest or a stop that does not finish.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// Most bytes waiting for stdout; past it, output is dropped.
pub const QUEUE_BYTES: usize = 1 << 20;
/// Longest a flush waits for the queue to drain (a stuck reader must not hold up a stop).
pub const DRAIN_WAIT: Duration = Duration::from_secs(1);
/// Writes join the last queued chunk while it is shorter than this.
const CHUNK_BYTES: usize = 4096;
/// Most bytes the output thread takes for one write.
const BATCH_BYTES: usize = 64 << 10;

#[derive(Debug, Default)]
struct Queue {
    /// Output waiting, oldest first, each chunk with the source (guest) that wrote it.
    chunks: VecDeque<(usize, Vec<u8>)>,
    /// Bytes waiting or being written.
    bytes: usize,
    /// Bytes waiting, per source: when the queue is full, the source holding the most gives
    /// way (one guest's flood cannot crowd out another guest's lines).
    held: Vec<usize>,
    /// The source whose turn it is to be written.
    next: usize,
    /// Bytes dropped since the last warning (the queue was full or the writer failed).
    dropped: u64,
    /// The drain thread is writing a chunk it took.
    writing: bool,
}

impl Queue {
    /// Takes the output of the next source in turn that has some waiting, oldest first, up to
    /// [`BATCH_BYTES`]: sources take turns, so one guest's flood already queued delays another
    /// guest's line by one batch at most. (At most a batch at a time: what waits can still give
    /// way to another source, what is being written cannot.)
    fn take_batch(&mut self) -> Option<Vec<u8>> {
        let sources = self.held.len();
        let source = (0..sources)
            .map(|i| (self.next + i) % sources)
            .find(|&s| self.held[s] > 0)
            .or_else(|| self.chunks.front().map(|&(s, _)| s))?;
        self.next = source + 1;
        let mut batch = Vec::new();
        while batch.len() < BATCH_BYTES {
            let Some(at) = self.chunks.iter().position(|&(s, _)| s == source) else {
                break;
            };
            let Some((_, c)) = self.chunks.remove(at) else {
                break;
            };
            self.held[source] -= c.len();
            batch.extend_from_slice(&c);
        }
        Some(batch)
    }
}

#[derive(Debug, Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when bytes arrive and when the queue drains.
    changed: Condvar,
    /// Dropped output is reported in the stream itself, never through the log (the log's own
    /// forwarder: a warning there would come back to it).
    quiet: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The writing end: cheap, never blocks on the reader. Clones write to the same queue, as the
/// same source unless made with [`Forwarder::for_source`].
#[derive(Debug, Clone)]
pub struct Forwarder {
    shared: Arc<Shared>,
    /// Who writes through this end (a guest's index), for the queue's fair share.
    source: usize,
}

impl Forwarder {
    /// Starts the thread that writes what is queued to `out`; dropped output is logged.
    pub fn spawn<W: Write + Send + 'static>(out: W) -> io::Result<Self> {
        Self::start(out, "console-out", false)
    }

    /// As [`Forwarder::spawn`] for the log's own stream: dropped output is reported by a line
    /// written to `out` once it takes output again, never through the log.
    pub fn spawn_quiet<W: Write + Send + 'static>(out: W, name: &str) -> io::Result<Self> {
        Self::start(out, name, true)
    }

    fn start<W: Write + Send + 'static>(out: W, name: &str, quiet: bool) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            quiet,
            ..Shared::default()
        });
        let drain = Arc::clone(&shared);
        thread::Builder::new()
            .name(name.into())
            .spawn(move || run(&drain, out))?;
        Ok(Self { shared, source: 0 })
    }

    /// Another end of the same queue, for output of `source` (a guest's index): when the
    /// queue is full, the source holding the most of it gives way, so a guest flooding its
    /// console loses its own output, not its neighbours' lines.
    pub fn for_source(&self, source: usize) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            source,
        }
    }

    /// Waits until what was queued is written, at most `wait`; returns whether it was.
    pub fn drain(&self, wait: Duration) -> bool {
        let until = Instant::now() + wait;
        let mut q = self.shared.lock();
        while !q.chunks.is_empty() || q.writing {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            q = self
                .shared
                .changed
                .wait_timeout(q, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

/// Writes queued chunks to `out` until the process exits (the thread is never joined: a
/// stuck reader must not keep the process from exiting).
fn run<W: Write>(shared: &Shared, mut out: W) {
    loop {
        // One source's waiting output (up to BATCH_BYTES), in one write.
        let chunk = {
            let mut q = shared.lock();
            loop {
                if let Some(c) = q.take_batch() {
                    // `bytes` still counts it until it is written.
                    q.writing = true;
                    break c;
                }
                q.writing = false;
                shared.changed.notify_all();
                q = shared
                    .changed
                    .wait(q)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        let written = out.write_all(&chunk).and_then(|()| out.flush());
        let mut q = shared.lock();
        q.bytes -= chunk.len();
        if let Err(e) = written {
            if q.dropped == 0 && !shared.quiet {
                log::warn!("console: writing guest output failed ({e}); output is dropped");
            }
            q.dropped += chunk.len() as u64;
        } else if q.dropped > 0 && q.chunks.is_empty() {
            let dropped = std::mem::take(&mut q.dropped);
            if shared.quiet {
                drop(q);
                let _ = writeln!(
                    out,
                    "vmm: {dropped} bytes of this output were dropped (it could not keep up)"
                )
                .and_then(|()| out.flush());
            } else {
                log::warn!(
                    "console: {dropped} bytes of guest output were dropped (stdout could not \
                     keep up)"
                );
            }
        }
    }
}

impl Write for Forwarder {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut q = self.shared.lock();
        if q.held.len() <= self.source {
            q.held.resize(self.source + 1, 0);
        }
        // Larger than the whole queue: nothing may give way for it.
        if buf.len() > QUEUE_BYTES {
            q.dropped += buf.len() as u64;
            return Ok(buf.len());
        }
        while q.bytes + buf.len() > QUEUE_BYTES {
            if q.dropped == 0 && !self.shared.quiet {
                log::warn!("console: stdout is not keeping up; guest output is dropped");
            }
            // The source holding the most waiting output gives way: its oldest chunk goes, or,
            // when that is this writer, what it writes now.
            let hog = (0..q.held.len()).max_by_key(|&s| (q.held[s], s == self.source));
            let evict = hog
                .filter(|&h| h != self.source && q.held[h] > 0)
                .and_then(|h| q.chunks.iter().position(|&(s, _)| s == h));
            let Some(at) = evict else {
                q.dropped += buf.len() as u64;
                return Ok(buf.len());
            };
            if let Some((s, old)) = q.chunks.remove(at) {
                q.held[s] -= old.len();
                q.bytes -= old.len();
                q.dropped += old.len() as u64;
            }
        }
        q.bytes += buf.len();
        q.held[self.source] += buf.len();
        // Small writes (a serial port's bytes) join the last chunk of the same source.
        let source = self.source;
        match q.chunks.back_mut() {
            Some((s, last)) if *s == source && last.len() < CHUNK_BYTES => {
                last.extend_from_slice(buf);
            }
            _ => q.chunks.push_back((source, buf.to_vec())),
        }
        self.shared.changed.notify_all();
        Ok(buf.len())
    }

    /// Waits until what was queued is written, at most [`DRAIN_WAIT`] (a stuck reader must
    /// not hold up a stop). The output thread writes and flushes what is queued as it comes,
    /// so writers flush only when they end (`ConsoleOut::finish`), never per byte or line.
    fn flush(&mut self) -> io::Result<()> {
        if !self.drain(DRAIN_WAIT) && !self.shared.quiet {
            log::warn!("console: stdout did not take the queued guest output in time");
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A writer that blocks until the test lets it go, then records everything.
    #[derive(Clone, Default)]
    pub(crate) struct Gate {
        open: Arc<(Mutex<bool>, Condvar)>,
        seen: Arc<Mutex<Vec<u8>>>,
    }

    impl Gate {
        /// Lets the writer through from now on.
        pub(crate) fn open(&self) {
            let (lock, cv) = &*self.open;
            *lock.lock().unwrap() = true;
            cv.notify_all();
        }

        /// What went through, as text.
        pub(crate) fn seen(&self) -> String {
            String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
        }
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, cv) = &*self.open;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            self.seen.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_reader_never_blocks_the_writer_and_output_is_bounded() {
        let gate = Gate::default();
        let line = vec![b'x'; 4096];
        // Eight times what the queue holds, and a drain that gives up after its wait: all of
        // it returns while the reader is stuck (a writer that blocked would hang here until
        // the guard gives up; the gate opens only afterwards).
        let (done, wait) = std::sync::mpsc::channel();
        let writer = {
            let (gate, line) = (gate.clone(), line.clone());
            thread::spawn(move || {
                let mut f = Forwarder::spawn(gate).unwrap();
                for _ in 0..(8 * QUEUE_BYTES / line.len()) {
                    f.write_all(&line).unwrap();
                }
                let drained = f.drain(Duration::from_millis(100));
                let _ = done.send(());
                (f, drained)
            })
        };
        wait.recv_timeout(Duration::from_secs(60))
            .expect("writes blocked on a stuck reader");
        let (mut f, drained) = writer.join().unwrap();
        assert!(!drained);
        let q = f.shared.lock();
        assert!(q.bytes <= QUEUE_BYTES);
        assert!(q.dropped > 0);
        drop(q);
        // Once the reader reads, what was kept arrives in order.
        gate.open();
        assert!(f.drain(DRAIN_WAIT));
        assert_eq!(f.shared.lock().bytes, 0, "drained");
        f.write_all(b"end\n").unwrap();
        assert!(f.drain(DRAIN_WAIT));
        let seen = gate.seen();
        assert!(seen.ends_with("end\n"));
        assert!(seen.len() <= QUEUE_BYTES + line.len() + 4);
    }

    /// A writer that always fails as a full disk does (for the console's tests too).
    pub(crate) struct Full;

    impl Write for Full {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failing_reader_costs_dropped_output_only() {
        let mut f = Forwarder::spawn(Full).unwrap();
        for _ in 0..1000 {
            f.write_all(&[b'y'; 4096]).unwrap();
        }
        f.flush().unwrap();
        let q = f.shared.lock();
        assert!(q.bytes <= QUEUE_BYTES && q.dropped > 0);
    }

    #[test]
    fn a_quiet_forwarder_reports_dropped_output_in_its_stream() {
        let gate = Gate::default();
        let mut f = Forwarder::spawn_quiet(gate.clone(), "test-quiet").unwrap();
        let line = vec![b'x'; 4096];
        for _ in 0..(2 * QUEUE_BYTES / line.len()) {
            f.write_all(&line).unwrap();
        }
        assert!(f.shared.lock().dropped > 0);
        gate.open();
        assert!(f.drain(DRAIN_WAIT));
        f.write_all(b"after\n").unwrap();
        assert!(f.drain(DRAIN_WAIT));
        let seen = gate.seen();
        let tail = &seen[seen.len().saturating_sub(200)..];
        assert!(
            tail.ends_with("bytes of this output were dropped (it could not keep up)\nafter\n"),
            "{tail}"
        );
    }

    /// A stuck reader, and `bytes` written by source 0 in 4 KiB lines: the reader, ends for
    /// sources 0 and 1, and the line.
    fn flooded(bytes: usize) -> (Gate, Forwarder, Forwarder, Vec<u8>) {
        let gate = Gate::default();
        let first = Forwarder::spawn(gate.clone()).unwrap();
        let (mut flood, quiet) = (first.for_source(0), first.for_source(1));
        let line = vec![b'x'; 4096];
        for _ in 0..bytes / line.len() {
            flood.write_all(&line).unwrap();
        }
        (gate, flood, quiet, line)
    }

    #[test]
    fn a_source_flooding_the_queue_gives_way_to_the_others() {
        // Guest 0 fills the queue (and more) while the reader is stuck ...
        let (gate, mut flood, mut quiet, line) = flooded(2 * QUEUE_BYTES);
        // ... guest 1's lines still get in, and guest 0's own new output is what is dropped.
        for i in 0..10 {
            quiet
                .write_all(format!("guest1: line {i}\n").as_bytes())
                .unwrap();
            flood.write_all(&line).unwrap();
        }
        assert!(flood.shared.lock().bytes <= QUEUE_BYTES);
        gate.open();
        assert!(flood.drain(DRAIN_WAIT));
        let seen = gate.seen();
        for i in 0..10 {
            assert!(
                seen.contains(&format!("guest1: line {i}\n")),
                "line {i} lost"
            );
        }
    }

    #[test]
    fn sources_take_turns_so_a_line_waits_one_batch_at_most() {
        // Half the queue from guest 0, then a line from guest 1, while the reader is stuck.
        let (gate, flood, mut quiet, line) = flooded(QUEUE_BYTES / 2);
        quiet.write_all(b"guest1: hello\n").unwrap();
        gate.open();
        assert!(flood.drain(DRAIN_WAIT));
        let seen = gate.seen();
        let at = seen.find("guest1: hello").unwrap();
        // Behind the chunk being written when it came and one batch of guest 0's.
        assert!(at <= line.len() + BATCH_BYTES, "guest1's line at byte {at}");
        assert_eq!(seen.len(), QUEUE_BYTES / 2 + "guest1: hello\n".len());
    }
}
