//! CPU time and address-space facts from the kernel: thread CPU clocks, `vm.max_map_count`,
//! and VMA counts from /proc/self/maps.

use std::io;

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// CPU time consumed by the calling thread, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time consumed by the whole process, in nanoseconds.
pub fn process_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// `vm.max_map_count`.
pub fn max_map_count() -> io::Result<u64> {
    let s = std::fs::read_to_string("/proc/sys/vm/max_map_count")?;
    s.trim()
        .parse()
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// Counts the VMAs of this process, and how many of them lie inside any of `ranges`
/// (`(start, end)` byte ranges, sorted or not).
pub fn count_vmas(ranges: &[(usize, usize)]) -> io::Result<(usize, usize)> {
    let maps = std::fs::read("/proc/self/maps")?;
    let mut total = 0;
    let mut inside = 0;
    for line in maps.split(|&b| b == b'\n') {
        if line.is_empty() {
            continue;
        }
        total += 1;
        let Some(start) = parse_hex_prefix(line) else {
            continue;
        };
        if ranges.iter().any(|&(s, e)| start >= s && start < e) {
            inside += 1;
        }
    }
    Ok((total, inside))
}

fn parse_hex_prefix(line: &[u8]) -> Option<usize> {
    let mut v: usize = 0;
    for &b in line {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'-' => return Some(v),
            _ => return None,
        };
        v = v.checked_mul(16)?.checked_add(d as usize)?;
    }
    None
}

/// Proportional set size of this process in bytes, from /proc/self/smaps_rollup.
pub fn pss_bytes() -> io::Result<u64> {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup")?;
    for line in s.lines() {
        if let Some(rest) = line.strip_prefix("Pss:") {
            let kb: u64 = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
            return Ok(kb * 1024);
        }
    }
    Err(io::Error::from(io::ErrorKind::NotFound))
}
