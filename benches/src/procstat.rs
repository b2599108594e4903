//! CPU time of a process (all its threads) from `/proc/PID/stat`.

use std::io;
use std::path::PathBuf;

/// Errors reading a process's CPU time.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read (the process may have exited).
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The file does not have the expected fields.
    #[error("unexpected content in {0}")]
    Parse(PathBuf),
}

/// `utime + stime` in clock ticks from the text of `/proc/PID/stat`.
///
/// The command name (field 2) is in parentheses and may hold spaces or parentheses itself, so
/// fields are counted after its last `)`: utime and stime (fields 14 and 15) are the 12th and
/// 13th after it.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, after) = stat.rsplit_once(')')?;
    let mut fields = after.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf reads a system constant and has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100)
}

/// CPU time used so far by process `pid` and all its threads (user + system), in seconds.
pub fn cpu_secs(pid: u32) -> Result<f64, Error> {
    let path = PathBuf::from(format!("/proc/{pid}/stat"));
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Read {
        path: path.clone(),
        source,
    })?;
    let ticks = parse_cpu_ticks(&text).ok_or(Error::Parse(path))?;
    Ok(ticks as f64 / ticks_per_second() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utime_and_stime_after_a_tricky_command_name() {
        let stat = "4242 (vmm (x) 1) S 1 4242 4242 0 -1 4194560 5000 0 3 0 250 125 0 0 20 0 5 0 \
                    100 1000 200 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(375));
        assert_eq!(parse_cpu_ticks("1 (short) S 1 2"), None);
        assert_eq!(parse_cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn this_process_has_a_cpu_time_and_a_missing_one_has_none() {
        let secs = cpu_secs(std::process::id()).unwrap();
        assert!(secs.is_finite() && secs >= 0.0);
        assert!(matches!(cpu_secs(u32::MAX), Err(Error::Read { .. })));
    }
}
