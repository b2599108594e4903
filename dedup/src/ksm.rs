//! Kernel KSM, for comparison and for `vmm --ksm`: its sysfs knobs and statistics, a guard that
//! restores the settings it found (also when unwinding from a panic), a lock file so that users
//! of kernel KSM never run at the same time, per-process figures from /proc/self/ksm_stat, the
//! CPU time of `ksmd`, and marking memory mergeable.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Where KSM's knobs live.
pub const KSM_DIR: &str = "/sys/kernel/mm/ksm";
/// The lock file serializing users of kernel KSM.
pub const LOCK_PATH: &str = "/tmp/vm-dedup-ksm.lock";

/// Knobs a [`KsmGuard`] saves and restores, in restore order (`run` last).
pub const SAVED_KNOBS: &[&str] = &[
    "advisor_mode",
    "advisor_max_cpu",
    "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
    "advisor_target_scan_time",
    "smart_scan",
    "pages_to_scan",
    "sleep_millisecs",
    "stable_node_chains_prune_millisecs",
    "use_zero_pages",
    "merge_across_nodes",
    "max_page_sharing",
    "run",
];

/// Knobs the kernel lets change only while no page is merged.
const NEED_UNMERGED: &[&str] = &["merge_across_nodes", "max_page_sharing"];

/// Errors from kernel KSM.
#[derive(Debug, thiserror::Error)]
pub enum KsmError {
    /// This kernel has no KSM.
    #[error("kernel KSM not available ({KSM_DIR} missing)")]
    NotAvailable,
    /// Reading or writing a file failed.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A file held something unexpected.
    #[error("unexpected content in {0}")]
    Parse(PathBuf),
    /// Taking the lock file failed.
    #[error("locking {LOCK_PATH}")]
    Lock(#[source] io::Error),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KsmError + '_ {
    move |source| KsmError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether kernel KSM exists here.
pub fn available() -> bool {
    Path::new(KSM_DIR).join("run").exists()
}

/// Reads a knob or statistic; a bracketed choice (`[none] scan-time`) reads as the choice.
pub fn read(name: &str) -> Result<String, KsmError> {
    let path = Path::new(KSM_DIR).join(name);
    let s = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let s = s.trim();
    if let (Some(a), Some(b)) = (s.find('['), s.find(']')) {
        if a < b {
            return Ok(s[a + 1..b].to_string());
        }
    }
    Ok(s.to_string())
}

/// Reads a numeric knob or statistic.
pub fn read_i64(name: &str) -> Result<i64, KsmError> {
    read(name)?
        .parse()
        .map_err(|_| KsmError::Parse(Path::new(KSM_DIR).join(name)))
}

/// Writes a knob.
pub fn write(name: &str, value: &str) -> Result<(), KsmError> {
    let path = Path::new(KSM_DIR).join(name);
    std::fs::write(&path, value).map_err(io_err(&path))
}

/// Kernel KSM's global statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KsmStats {
    /// Shared KSM pages.
    pub pages_shared: u64,
    /// Sites sharing them (pages saved).
    pub pages_sharing: u64,
    /// Unique pages tracked.
    pub pages_unshared: u64,
    /// Pages changing too fast.
    pub pages_volatile: u64,
    /// Pages scanned.
    pub pages_scanned: u64,
    /// Completed full scans.
    pub full_scans: u64,
    /// Pages merged into the zero page (`use_zero_pages`).
    pub ksm_zero_pages: u64,
    /// Bytes saved minus metadata.
    pub general_profit: i64,
}

impl KsmStats {
    /// Pages saved: `pages_sharing + ksm_zero_pages`.
    pub fn pages_saved(&self) -> u64 {
        self.pages_sharing + self.ksm_zero_pages
    }
}

/// Reads kernel KSM's statistics.
pub fn stats() -> Result<KsmStats, KsmError> {
    if !available() {
        return Err(KsmError::NotAvailable);
    }
    let u = |n: &str| read_i64(n).map(|v| v.max(0) as u64);
    Ok(KsmStats {
        pages_shared: u("pages_shared")?,
        pages_sharing: u("pages_sharing")?,
        pages_unshared: u("pages_unshared")?,
        pages_volatile: u("pages_volatile")?,
        pages_scanned: u("pages_scanned").unwrap_or(0),
        full_scans: u("full_scans")?,
        ksm_zero_pages: u("ksm_zero_pages").unwrap_or(0),
        general_profit: read_i64("general_profit").unwrap_or(0),
    })
}

/// This process's kernel KSM figures (/proc/self/ksm_stat).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessKsmStat {
    /// `ksm_rmap_items`.
    pub rmap_items: u64,
    /// `ksm_zero_pages`.
    pub zero_pages: u64,
    /// `ksm_merging_pages`.
    pub merging_pages: u64,
    /// `ksm_process_profit`.
    pub process_profit: i64,
}

/// Parses the text of /proc/PID/ksm_stat.
pub fn parse_ksm_stat(text: &str) -> ProcessKsmStat {
    let mut s = ProcessKsmStat::default();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(k), Some(v)) = (it.next(), it.next()) else {
            continue;
        };
        let n: i64 = v.parse().unwrap_or(0);
        match k {
            "ksm_rmap_items" => s.rmap_items = n.max(0) as u64,
            "ksm_zero_pages" => s.zero_pages = n.max(0) as u64,
            "ksm_merging_pages" => s.merging_pages = n.max(0) as u64,
            "ksm_process_profit" => s.process_profit = n,
            _ => {}
        }
    }
    s
}

/// Reads /proc/self/ksm_stat.
pub fn process_stat() -> Result<ProcessKsmStat, KsmError> {
    read_process_stat(Path::new("/proc/self/ksm_stat"))
}

/// Reads /proc/PID/ksm_stat of process `pid`.
pub fn process_stat_of(pid: u32) -> Result<ProcessKsmStat, KsmError> {
    read_process_stat(&Path::new("/proc").join(pid.to_string()).join("ksm_stat"))
}

fn read_process_stat(path: &Path) -> Result<ProcessKsmStat, KsmError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    Ok(parse_ksm_stat(&text))
}

impl ProcessKsmStat {
    /// Bytes of kernel memory KSM spends on the process as the kernel counts them in
    /// `ksm_process_profit` (its reverse-map items): the merged and zero pages' bytes less the
    /// profit. Kernel memory, so outside the process's PSS.
    pub fn metadata_bytes(&self, page_size: u64) -> u64 {
        let saved = (self.merging_pages + self.zero_pages).saturating_mul(page_size);
        i64::try_from(saved)
            .unwrap_or(i64::MAX)
            .saturating_sub(self.process_profit)
            .max(0) as u64
    }
}

/// CPU time `ksmd` has used, in nanoseconds.
pub fn ksmd_cpu_ns() -> Result<u64, KsmError> {
    let proc = Path::new("/proc");
    let dir = std::fs::read_dir(proc).map_err(io_err(proc))?;
    for e in dir.flatten() {
        let comm = e.path().join("comm");
        if std::fs::read_to_string(&comm).is_ok_and(|c| c.trim() == "ksmd") {
            let stat = e.path().join("stat");
            let text = std::fs::read_to_string(&stat).map_err(io_err(&stat))?;
            let after = text
                .rsplit_once(')')
                .map(|(_, r)| r)
                .ok_or_else(|| KsmError::Parse(stat.clone()))?;
            let f: Vec<&str> = after.split_whitespace().collect();
            // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the command name.
            let ticks: u64 = f
                .get(11..13)
                .ok_or_else(|| KsmError::Parse(stat.clone()))?
                .iter()
                .map(|v| v.parse::<u64>().unwrap_or(0))
                .sum();
            // SAFETY: sysconf has no memory effects.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
            return Ok(ticks * 1_000_000_000 / hz);
        }
    }
    Err(KsmError::NotAvailable)
}

/// Marks `[addr, addr + len)` mergeable for kernel KSM (`MADV_MERGEABLE`).
///
/// # Safety
/// The range must be memory this process owns; the advice changes no content.
pub unsafe fn madvise_mergeable(addr: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: the caller guarantees the range is ours; MADV_MERGEABLE never changes content.
    let rc = unsafe { libc::madvise(addr.cast(), len, libc::MADV_MERGEABLE) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An exclusive hold on kernel KSM across processes (an `flock` on [`LOCK_PATH`]).
#[derive(Debug)]
pub struct KsmLock {
    _file: File,
}

impl KsmLock {
    /// Waits until no other process holds the lock, then takes it.
    pub fn acquire() -> Result<KsmLock, KsmError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(LOCK_PATH)
            .map_err(KsmError::Lock)?;
        loop {
            // SAFETY: flock on a descriptor we own; it only takes an advisory lock.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(KsmLock { _file: file });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(KsmError::Lock(e));
            }
        }
    }
}

/// Holds the KSM lock and restores every knob it found when dropped (also during a panic).
#[derive(Debug)]
pub struct KsmGuard {
    saved: Vec<(String, String)>,
    _lock: KsmLock,
}

impl KsmGuard {
    /// Takes the lock and saves the current settings.
    pub fn acquire() -> Result<KsmGuard, KsmError> {
        if !available() {
            return Err(KsmError::NotAvailable);
        }
        let lock = KsmLock::acquire()?;
        let mut saved = Vec::new();
        for &k in SAVED_KNOBS {
            if let Ok(v) = read(k) {
                saved.push((k.to_string(), v));
            }
        }
        Ok(KsmGuard { saved, _lock: lock })
    }

    /// The settings found at acquisition.
    pub fn saved(&self) -> &[(String, String)] {
        &self.saved
    }

    /// Writes a knob; knobs that need no merged pages get them unmerged first (`run=2`).
    pub fn set(&self, name: &str, value: &str) -> Result<(), KsmError> {
        match write(name, value) {
            Err(KsmError::Io { source, .. })
                if NEED_UNMERGED.contains(&name) && source.raw_os_error() == Some(libc::EBUSY) =>
            {
                write("run", "2")?;
                write(name, value)
            }
            r => r,
        }
    }

    /// Unmerges everything kernel KSM merged (`run=2`, synchronous) and stops it.
    pub fn unmerge_all(&self) -> Result<(), KsmError> {
        write("run", "2")?;
        write("run", "0")
    }

    /// Restores the saved settings; returns the first error but tries every knob.
    pub fn restore(&self) -> Result<(), KsmError> {
        let mut first = None;
        let changed_locked = self.saved.iter().any(|(k, v)| {
            NEED_UNMERGED.contains(&k.as_str()) && read(k).is_ok_and(|now| now != *v)
        });
        if changed_locked {
            if let Err(e) = write("run", "2") {
                first.get_or_insert(e);
            }
        }
        for (k, v) in &self.saved {
            if read(k).is_ok_and(|now| now == *v) {
                continue;
            }
            if let Err(e) = write(k, v) {
                log::warn!("vm-dedup: restoring KSM {k}={v}: {e}");
                first.get_or_insert(e);
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for KsmGuard {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            log::error!("vm-dedup: restoring kernel KSM settings: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ksm_stat() {
        let s = parse_ksm_stat(
            "ksm_rmap_items 10\nksm_zero_pages 2\nksm_merging_pages 7\nksm_process_profit -40\n\
             ksm_merge_any: no\nksm_mergeable: yes\n",
        );
        assert_eq!(
            s,
            ProcessKsmStat {
                rmap_items: 10,
                zero_pages: 2,
                merging_pages: 7,
                process_profit: -40,
            }
        );
        // 9 pages of 100 bytes saved, a profit of -40: 940 bytes of reverse-map items.
        assert_eq!(s.metadata_bytes(100), 940);
        let profitable = ProcessKsmStat {
            process_profit: 8192 * 3,
            merging_pages: 4,
            ..ProcessKsmStat::default()
        };
        assert_eq!(profitable.metadata_bytes(8192), 8192);
        assert_eq!(ProcessKsmStat::default().metadata_bytes(4096), 0);
    }

    #[test]
    fn guard_restores_what_it_found_even_on_panic() {
        let writable = std::fs::OpenOptions::new()
            .write(true)
            .open(Path::new(KSM_DIR).join("pages_to_scan"))
            .is_ok();
        if !available() || !writable {
            eprintln!("skipped: kernel KSM not available or not writable");
            return;
        }
        let before: Vec<(String, String)> = {
            let _lock = KsmLock::acquire().unwrap();
            SAVED_KNOBS
                .iter()
                .filter_map(|k| read(k).ok().map(|v| (k.to_string(), v)))
                .collect()
        };
        let r = std::panic::catch_unwind(|| {
            let g = KsmGuard::acquire().unwrap();
            let old = read("pages_to_scan").unwrap();
            let new = if old == "1234" { "1235" } else { "1234" };
            g.set("pages_to_scan", new).unwrap();
            g.set("sleep_millisecs", "7").unwrap();
            assert_eq!(read("pages_to_scan").unwrap(), new);
            panic!("simulated failure while holding the guard");
        });
        assert!(r.is_err());
        let _lock = KsmLock::acquire().unwrap();
        for (k, v) in before {
            assert_eq!(read(&k).unwrap(), v, "{k} restored");
        }
    }
}
