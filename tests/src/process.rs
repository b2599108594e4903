//! A `vmm` process run as a child: its console on pipes, lines sent to its stdin, output lines
//! awaited with a hang guard, and the process killed when the handle is dropped.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use crate::vmm_bin;

/// Default upper bound for one wait: only a guard against a hang, never a speed check.
pub const HANG_GUARD: Duration = Duration::from_secs(120);

/// Makes the process that `command` starts join a cgroup before it runs `exec`: the child writes
/// its pid to `procs`, the cgroup's `cgroup.procs` opened for writing. The hook keeps its own
/// duplicate of the descriptor (close-on-exec) for as long as `command` lives, so every page the
/// child ever touches is charged to the cgroup.
///
/// # Errors
/// When the descriptor cannot be duplicated.
pub fn join_cgroup_on_spawn(command: &mut Command, procs: &File) -> io::Result<()> {
    let procs = procs.try_clone()?;
    let hook = move || -> io::Result<()> {
        // Only async-signal-safe calls between fork and exec: no allocation, so the pid is
        // formatted into a stack buffer.
        // SAFETY: getpid has no preconditions.
        let mut pid = unsafe { libc::getpid() }.unsigned_abs();
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (pid % 10) as u8;
            pid /= 10;
            if pid == 0 {
                break;
            }
        }
        let text = &digits[at..];
        // SAFETY: the descriptor is owned by this hook, so open in the forked child; `text` is
        // a valid buffer of `text.len()` bytes.
        let written = unsafe { libc::write(procs.as_raw_fd(), text.as_ptr().cast(), text.len()) };
        if written == text.len() as isize {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: the hook only calls getpid and write (async-signal-safe) and touches no memory
    // but its stack and the descriptor it owns.
    unsafe {
        command.pre_exec(hook);
    }
    Ok(())
}

/// Which output stream of the child a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The console (guest output).
    Stdout,
    /// The VMM's own messages and log.
    Stderr,
}

/// One output line of the child.
#[derive(Debug, Clone)]
pub struct Line {
    /// Where it came from.
    pub stream: Stream,
    /// Its text, without the newline.
    pub text: String,
    /// When the test read it.
    pub at: Instant,
}

/// A running `vmm` child with piped stdin, stdout and stderr.
///
/// Every output line is kept in a transcript, which failure messages show. Each line can be
/// matched by one wait ([`VmmProcess::wait_for`]); lines that no wait has taken yet stay
/// available, so the order in which a test waits for lines of different guests does not matter.
#[derive(Debug)]
pub struct VmmProcess {
    child: Child,
    spawned_at: Instant,
    stdin: Option<ChildStdin>,
    lines: Receiver<Line>,
    transcript: Vec<(Line, bool)>,
    streams_open: bool,
    status: Option<ExitStatus>,
}

/// Forwards the lines of `stream` to `lines` until it ends.
fn forward(stream: impl Read + Send + 'static, kind: Stream, lines: Sender<Line>) {
    thread::spawn(move || {
        for text in BufReader::new(stream).lines() {
            let Ok(text) = text else { break };
            let line = Line {
                stream: kind,
                text,
                at: Instant::now(),
            };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
}

impl VmmProcess {
    /// Runs the `vmm` binary of this build ([`vmm_bin`]) with `args`.
    ///
    /// # Panics
    /// When the binary is missing or cannot be started.
    pub fn spawn<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::start(Command::new(vmm_bin()).args(args))
    }

    /// Runs `command` (a `vmm` command line) with its stdin, stdout and stderr piped.
    ///
    /// # Panics
    /// When it cannot be started.
    pub fn start(command: &mut Command) -> Self {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawned_at = Instant::now();
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let (sender, lines) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            forward(out, Stream::Stdout, sender.clone());
        }
        if let Some(err) = child.stderr.take() {
            forward(err, Stream::Stderr, sender);
        }
        Self {
            stdin: child.stdin.take(),
            child,
            spawned_at,
            lines,
            transcript: Vec::new(),
            streams_open: true,
            status: None,
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When the child was started (just before `spawn`).
    pub fn spawned_at(&self) -> Instant {
        self.spawned_at
    }

    /// Everything the child printed so far, stderr lines marked `[stderr]`.
    pub fn transcript(&self) -> String {
        let mut text = String::new();
        for (line, _) in &self.transcript {
            let tag = match line.stream {
                Stream::Stdout => "",
                Stream::Stderr => "[stderr] ",
            };
            // Writing to a String cannot fail.
            let _ = writeln!(text, "{tag}{}", line.text);
        }
        text
    }

    /// Sends `line` and a newline to the child's stdin (its console input).
    ///
    /// # Panics
    /// When the child's stdin is closed.
    pub fn send_line(&mut self, line: &str) {
        let sent = match self.stdin.as_mut() {
            Some(stdin) => stdin
                .write_all(format!("{line}\n").as_bytes())
                .and_then(|()| stdin.flush()),
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        };
        if let Err(e) = sent {
            panic!(
                "cannot send {line:?} to vmm: {e}\noutput so far:\n{}",
                self.transcript()
            );
        }
    }

    /// Like [`VmmProcess::send_line`], but returns `false` instead of panicking when the
    /// child's stdin is closed (the child has exited).
    pub fn try_send_line(&mut self, line: &str) -> bool {
        self.stdin.as_mut().is_some_and(|stdin| {
            stdin
                .write_all(format!("{line}\n").as_bytes())
                .and_then(|()| stdin.flush())
                .is_ok()
        })
    }

    /// Closes the child's stdin (end of console input).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Moves lines that have arrived into the transcript, waiting at most until `deadline`
    /// for the first one. Returns `false` once both output streams have ended.
    fn collect(&mut self, deadline: Instant) -> bool {
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(wait) {
            Ok(line) => self.transcript.push((line, false)),
            Err(RecvTimeoutError::Timeout) => return true,
            Err(RecvTimeoutError::Disconnected) => {
                self.streams_open = false;
                return false;
            }
        }
        while let Ok(line) = self.lines.try_recv() {
            self.transcript.push((line, false));
        }
        true
    }

    /// Takes the first line not taken by an earlier wait that satisfies `matches`, waiting
    /// up to `within` for it.
    ///
    /// # Panics
    /// When no such line arrives in time or the child's output ends first, with `what` and
    /// the transcript in the message.
    pub fn wait_for_within(
        &mut self,
        what: &str,
        within: Duration,
        mut matches: impl FnMut(&Line) -> bool,
    ) -> Line {
        let deadline = Instant::now() + within;
        let mut checked = 0;
        loop {
            if let Some(offset) = self.transcript[checked..]
                .iter()
                .position(|(line, taken)| !taken && matches(line))
            {
                let entry = &mut self.transcript[checked + offset];
                entry.1 = true;
                return entry.0.clone();
            }
            checked = self.transcript.len();
            if !self.streams_open {
                panic!(
                    "vmm's output ended before {what}; exit: {:?}\noutput:\n{}",
                    self.child.try_wait().ok().flatten(),
                    self.transcript()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "no {what} within {within:?} (a hang guard)\noutput so far:\n{}",
                    self.transcript()
                );
            }
            self.collect(deadline);
        }
    }

    /// Like [`VmmProcess::wait_for`], but returns `None` instead of panicking when the child's
    /// output ends first (the child has exited).
    ///
    /// # Panics
    /// When neither happens within [`HANG_GUARD`].
    pub fn wait_for_or_exit(
        &mut self,
        what: &str,
        mut matches: impl FnMut(&Line) -> bool,
    ) -> Option<Line> {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            if let Some(entry) = self
                .transcript
                .iter_mut()
                .find(|(line, taken)| !taken && matches(line))
            {
                entry.1 = true;
                return Some(entry.0.clone());
            }
            if !self.streams_open {
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {HANG_GUARD:?} (a hang guard)\noutput so far:\n{}",
                self.transcript()
            );
            self.collect(deadline);
        }
    }

    /// [`VmmProcess::wait_for_within`] with the default [`HANG_GUARD`].
    pub fn wait_for(&mut self, what: &str, matches: impl FnMut(&Line) -> bool) -> Line {
        self.wait_for_within(what, HANG_GUARD, matches)
    }

    /// Waits for a console (stdout) line equal to `text`.
    pub fn wait_line(&mut self, text: &str) -> Line {
        self.wait_for(&format!("console line {text:?}"), |l| {
            l.stream == Stream::Stdout && l.text == text
        })
    }

    /// Waits for a stderr line containing `text`.
    pub fn wait_stderr(&mut self, text: &str) -> Line {
        self.wait_for(&format!("stderr line with {text:?}"), |l| {
            l.stream == Stream::Stderr && l.text.contains(text)
        })
    }

    /// Sends `signal` to the child.
    ///
    /// # Panics
    /// When the signal cannot be sent.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).unwrap_or(libc::pid_t::MAX);
        // SAFETY: kill(2) with our own child's pid (not yet reaped: the handle is alive and
        // only `wait_exit` and `drop` reap it) and a signal number from libc.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// Waits for the child to exit (within [`HANG_GUARD`]) and for the rest of its output.
    ///
    /// # Panics
    /// When it does not exit in time.
    pub fn wait_exit(&mut self) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let deadline = Instant::now() + HANG_GUARD;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    self.collect(Instant::now() + Duration::from_millis(10));
                }
                Ok(None) => panic!(
                    "vmm did not exit within {HANG_GUARD:?} (a hang guard)\noutput:\n{}",
                    self.transcript()
                ),
                Err(e) => panic!("cannot wait for vmm: {e}"),
            }
        };
        self.status = Some(status);
        while self.streams_open && Instant::now() < deadline && self.collect(deadline) {}
        status
    }

    /// Waits for the child to exit and returns its exit code.
    ///
    /// # Panics
    /// When it does not exit in time or was killed by a signal.
    pub fn exit_code(&mut self) -> i32 {
        let status = self.wait_exit();
        status
            .code()
            .unwrap_or_else(|| panic!("vmm was killed ({status})\noutput:\n{}", self.transcript()))
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if self.status.is_none() {
            // The child may have exited already; then both calls fail harmlessly.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
