//! Ctrl-C (SIGINT) and SIGTERM as a flag that long-running loops check, so that they stop and
//! let guards (kernel KSM settings, cgroups, child processes) clean up instead of the process
//! dying; and children that die with this process when it is killed outright.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From now on SIGINT and SIGTERM set the flag that [`interrupted`] reads instead of ending
/// the process.
pub fn catch_termination() -> io::Result<()> {
    // SAFETY: sigaction is plain data; zeroed is a valid empty value, filled in below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    action.sa_flags = libc::SA_RESTART;
    // SAFETY: `action.sa_mask` is a valid sigset_t to initialise.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `action` is initialised and its handler only stores to an atomic; a null
        // old-action pointer is allowed.
        let rc = unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether SIGINT or SIGTERM arrived since [`catch_termination`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The process `command` starts gets SIGKILL when this thread ends (e.g. this process is
/// killed with SIGKILL), so that no guest outlives the benchmark.
pub fn die_with_parent(command: &mut Command) {
    // SAFETY: the hook only calls prctl, which is async-signal-safe, with constant arguments.
    unsafe {
        command.pre_exec(|| {
            let signal = libc::SIGKILL as libc::c_ulong;
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn termination_signals_set_the_flag_instead_of_ending_the_process() {
        catch_termination().unwrap();
        assert!(!interrupted());
        // SAFETY: raise sends a signal to this thread; the handler above is installed.
        assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
        assert!(interrupted());
    }

    #[test]
    fn children_learn_their_death_signal() {
        let mut command = Command::new("sh");
        command.args(["-c", "grep -q . /proc/self/status"]);
        die_with_parent(&mut command);
        assert!(command.status().unwrap().success());
    }
}
