//! SIGINT, SIGTERM and SIGHUP: blocked in every thread and taken by one watcher thread, which
//! ends a start-up or stops every guest. For binaries; a library embedding the VMM keeps its
//! own signal policy.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use crate::monitor::LineSink;
use crate::vmm::StopHandle;

/// Whether `signal` is ignored (`SIG_IGN`), as `nohup` or a shell's background job leaves it.
fn ignored(signal: libc::c_int) -> bool {
    // SAFETY: sigaction is plain data; with a null new action, sigaction(2) only writes the
    // current one into `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

/// The termination signals this process takes, blocked in every thread: SIGINT, SIGTERM and
/// SIGHUP (a closed terminal), less those it was started with ignored (a blocked signal is
/// never discarded, so taking an ignored one would undo `nohup`).
#[derive(Clone, Copy)]
pub struct Blocked {
    set: libc::sigset_t,
    any: bool,
}

impl std::fmt::Debug for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blocked").field("any", &self.any).finish()
    }
}

/// Blocks the termination signals (see [`Blocked`]) in the calling thread and every thread it
/// starts afterwards. Call before any other thread exists.
pub fn block_termination() -> io::Result<Blocked> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    let mut any = false;
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        if !ignored(signal) {
            // SAFETY: `set` is initialised and `signal` is a valid signal number.
            unsafe { libc::sigaddset(&mut set, signal) };
            any = true;
        }
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(Blocked { set, any })
}

fn name(signal: libc::c_int) -> String {
    match signal {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        n => format!("signal {n}"),
    }
}

/// Waits for the termination signals [`block_termination`] blocked, on a thread of its own.
/// Until [`Watcher::arm`] the guests cannot run yet, and a signal ends the process at once
/// (status 0, as a stop): start-up may be stuck reading a memory image from a pipe or a slow
/// file system. Once armed, the first signal stops every guest, and a second one ends the
/// process at once (status 1), should the stop itself hang.
#[derive(Debug)]
pub struct Watcher {
    stop: Arc<Mutex<Option<StopHandle>>>,
}

impl Watcher {
    /// Starts the watcher thread for the `blocked` signals; what it has to say when it ends the
    /// process goes to `lines`.
    pub fn spawn(blocked: Blocked, lines: LineSink) -> io::Result<Self> {
        let stop: Arc<Mutex<Option<StopHandle>>> = Arc::default();
        if !blocked.any {
            return Ok(Self { stop });
        }
        let armed = Arc::clone(&stop);
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || watch(&blocked.set, &armed, &lines))?;
        Ok(Self { stop })
    }

    /// From now on a signal stops every guest through `stop`.
    pub fn arm(&self, stop: StopHandle) {
        *self.stop.lock().unwrap_or_else(PoisonError::into_inner) = Some(stop);
    }
}

/// How long an exit on a signal waits for its line to reach stderr.
const EXIT_DRAIN: std::time::Duration = std::time::Duration::from_millis(500);

fn watch(set: &libc::sigset_t, armed: &Mutex<Option<StopHandle>>, say: &LineSink) {
    let mut stopping = false;
    loop {
        let mut signal = 0;
        // SAFETY: `set` is initialised and `signal` is a valid place for the result.
        let rc = unsafe { libc::sigwait(set, &mut signal) };
        if rc != 0 {
            log::error!(
                "waiting for signals failed: {}",
                io::Error::from_raw_os_error(rc)
            );
            return;
        }
        let stop = armed.lock().unwrap_or_else(PoisonError::into_inner).clone();
        match stop {
            None => {
                say(&format!(
                    "{} while starting: stopped before any guest ran",
                    name(signal)
                ));
                crate::stderr::drain(EXIT_DRAIN);
                std::process::exit(0);
            }
            Some(_) if stopping => {
                say(&format!(
                    "{} again while stopping: exiting at once",
                    name(signal)
                ));
                // No cleanup runs from here on: the control API's socket goes now.
                crate::api::remove_sockets_now();
                crate::stderr::drain(EXIT_DRAIN);
                std::process::exit(1);
            }
            Some(stop) => {
                log::info!("{}: stopping every guest", name(signal));
                stop.stop_all();
                stopping = true;
            }
        }
    }
}
