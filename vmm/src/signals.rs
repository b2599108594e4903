//! SIGINT, SIGTERM and SIGHUP: blocked in every thread and taken by one watcher thread, which ends a
//! start-up or stops every guest. For binaries; a library embedding the VMM keeps its own
//! signal policy.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use crate::vmm::StopHandle;

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t and the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        // A closed terminal: stop cleanly too (under `nohup` it stays ignored, never pending).
        libc::sigaddset(&mut set, libc::SIGHUP);
    }
    set
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread and every thread it starts afterwards.
/// Call before any other thread exists.
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

/// Waits for SIGINT, SIGTERM or SIGHUP (blocked with [`block_termination`]) on a thread of its own.
/// Until [`Watcher::arm`] the guests cannot run yet, and the signal ends the process at once
/// (status 0, as a stop): start-up may be stuck reading a memory image from a pipe or a slow
/// file system. Once armed, the signal stops every guest.
#[derive(Debug)]
pub struct Watcher {
    stop: Arc<Mutex<Option<StopHandle>>>,
}

impl Watcher {
    /// Starts the watcher thread.
    pub fn spawn() -> io::Result<Self> {
        let stop: Arc<Mutex<Option<StopHandle>>> = Arc::default();
        let armed = Arc::clone(&stop);
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let set = termination_set();
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
                match armed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_ref()
                {
                    Some(stop) => {
                        log::info!("{}: stopping every guest", name(signal));
                        stop.stop_all();
                    }
                    None => {
                        eprintln!(
                            "vmm: {} while starting: stopped before any guest ran",
                            name(signal)
                        );
                        std::process::exit(0);
                    }
                }
            })?;
        Ok(Self { stop })
    }

    /// From now on a signal stops every guest through `stop`.
    pub fn arm(&self, stop: StopHandle) {
        *self.stop.lock().unwrap_or_else(PoisonError::into_inner) = Some(stop);
    }
}
