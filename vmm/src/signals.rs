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

/// SIGINT, SIGTERM and SIGHUP (a closed terminal), less those the process was started with
/// ignored: a blocked signal is never discarded, so taking an ignored one would undo `nohup`.
fn termination_signals() -> Vec<libc::c_int> {
    [libc::SIGINT, libc::SIGTERM, libc::SIGHUP]
        .into_iter()
        .filter(|&s| !ignored(s))
        .collect()
}

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for signal in termination_signals() {
        // SAFETY: `set` is initialised and `signal` is a valid signal number.
        unsafe { libc::sigaddset(&mut set, signal) };
    }
    set
}

/// Blocks SIGINT, SIGTERM and SIGHUP (those not ignored) in the calling thread and every
/// thread it starts afterwards. Call before any other thread exists.
pub fn block_termination() -> io::Result<()> {
    let set = termination_set();
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

fn name(signal: libc::c_int) -> String {
    match signal {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        n => format!("signal {n}"),
    }
}

/// Waits for SIGINT, SIGTERM or SIGHUP (blocked with [`block_termination`]; those the process
/// was started with ignored stay ignored) on a thread of its own. Until [`Watcher::arm`] the
/// guests cannot run yet, and a signal ends the process at once (status 0, as a stop): start-up
/// may be stuck reading a memory image from a pipe or a slow file system. Once armed, the first
/// signal stops every guest, and a second one ends the process at once (status 1), should the
/// stop itself hang.
#[derive(Debug)]
pub struct Watcher {
    stop: Arc<Mutex<Option<StopHandle>>>,
}

impl Watcher {
    /// Starts the watcher thread; what it has to say when it ends the process goes to `lines`.
    pub fn spawn(lines: LineSink) -> io::Result<Self> {
        let stop: Arc<Mutex<Option<StopHandle>>> = Arc::default();
        if termination_signals().is_empty() {
            return Ok(Self { stop });
        }
        let armed = Arc::clone(&stop);
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || watch(&armed, &lines))?;
        Ok(Self { stop })
    }

    /// From now on a signal stops every guest through `stop`.
    pub fn arm(&self, stop: StopHandle) {
        *self.stop.lock().unwrap_or_else(PoisonError::into_inner) = Some(stop);
    }
}

fn watch(armed: &Mutex<Option<StopHandle>>, say: &LineSink) {
    let set = termination_set();
    let mut stopping = false;
    loop {
        let mut signal = 0;
        // SAFETY: `set` is initialised and `signal` is a valid place for the result.
        let rc = unsafe { libc::sigwait(&set, &mut signal) };
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
                std::process::exit(0);
            }
            Some(_) if stopping => {
                say(&format!(
                    "{} again while stopping: exiting at once",
                    name(signal)
                ));
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
