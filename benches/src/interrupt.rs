//! Ctrl-C (SIGINT) as a flag that long-running loops check, so that they stop and let guards
//! (kernel KSM settings, cgroups, child processes) clean up instead of the process dying.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From now on SIGINT sets the flag that [`interrupted`] reads instead of ending the process.
pub fn catch_sigint() -> io::Result<()> {
    // SAFETY: sigaction is plain data; zeroed is a valid empty value, filled in below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t;
    action.sa_flags = libc::SA_RESTART;
    // SAFETY: `action.sa_mask` is a valid sigset_t to initialise; the handler only stores to
    // an atomic; a null old-action pointer is allowed.
    let rc = unsafe {
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether SIGINT arrived since [`catch_sigint`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigint_sets_the_flag_instead_of_ending_the_process() {
        catch_sigint().unwrap();
        assert!(!interrupted());
        // SAFETY: raise sends a signal to this thread; the handler above is installed.
        assert_eq!(unsafe { libc::raise(libc::SIGINT) }, 0);
        assert!(interrupted());
    }
}
