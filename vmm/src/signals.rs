//! SIGINT and SIGTERM: blocked in every thread and taken by one watcher thread, which stops
//! every guest. For binaries; a library embedding the VMM keeps its own signal policy.

use std::io;
use std::thread::{self, JoinHandle};

use crate::vmm::StopHandle;

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t and the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
    }
    set
}

/// Blocks SIGINT and SIGTERM in the calling thread and every thread it starts afterwards.
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

/// Starts a thread that waits for SIGINT or SIGTERM (blocked with [`block_termination`]) and
/// then stops every guest.
pub fn spawn_watcher(stop: StopHandle) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let set = termination_set();
            let mut signal = 0;
            // SAFETY: `set` is initialised and `signal` is a valid place for the result.
            let rc = unsafe { libc::sigwait(&set, &mut signal) };
            if rc == 0 {
                log::info!("signal {signal}: stopping every guest");
                stop.stop_all();
            } else {
                log::error!(
                    "waiting for signals failed: {}",
                    io::Error::from_raw_os_error(rc)
                );
            }
        })
}
