//! `--ksm`: guest RAM is marked `MADV_MERGEABLE` and left to kernel KSM, for comparison with
//! `--dedup`. The VMM does not change KSM's global settings: KSM merges only while
//! `/sys/kernel/mm/ksm/run` is 1. Its figures for this process come from /proc/self/ksm_stat
//! (and per guest from the `KSM:` lines of /proc/self/smaps); those the kernel keeps only for
//! the whole host (pages_shared, pages_unshared, pages_volatile, pages_scanned, full_scans,
//! cow_ksm) are reported as the kernel has them.

use std::io;

use vm_dedup::ksm;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::report::{Counts, GuestReport, Mode, PAGE_BYTES, Report};
use crate::vm::Guest;

/// Errors of `--ksm`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel has no KSM.
    #[error("--ksm: this kernel has no KSM ({} is missing)", ksm::KSM_DIR)]
    NotAvailable,
    /// madvise refused.
    #[error("--ksm: cannot mark {name}'s RAM mergeable: {source}")]
    Mark {
        /// The guest.
        name: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Guest RAM of one guest: host address ranges.
#[derive(Debug, Clone)]
struct GuestRanges {
    name: String,
    ranges: Vec<(u64, u64)>,
    pages: u64,
}

/// The guests of a process left to kernel KSM.
#[derive(Debug)]
pub struct KernelKsm {
    guests: Vec<GuestRanges>,
    cow_at_start: u64,
}

impl KernelKsm {
    /// Marks every guest's RAM mergeable. Warns when kernel KSM is not running.
    pub fn enable(guests: &[Guest]) -> Result<Self, Error> {
        if !ksm::available() {
            return Err(Error::NotAvailable);
        }
        let mut out = Vec::new();
        for g in guests {
            let mut ranges = Vec::new();
            for r in g.memory().iter() {
                let (addr, len) = (r.as_ptr(), r.len() as usize);
                // SAFETY: the region is guest RAM owned by this process and mapped for as long
                // as the guest's memory lives; MADV_MERGEABLE changes no content.
                unsafe { ksm::madvise_mergeable(addr, len) }.map_err(|source| Error::Mark {
                    name: g.name().to_string(),
                    source,
                })?;
                ranges.push((addr as u64, addr as u64 + len as u64));
            }
            out.push(GuestRanges {
                name: g.name().to_string(),
                pages: ranges.iter().map(|(a, b)| (b - a) / PAGE_BYTES).sum(),
                ranges,
            });
        }
        match ksm::read("run") {
            Ok(run) if run == "1" => {}
            Ok(run) => log::warn!(
                "--ksm: kernel KSM is not running (run={run}): nothing merges until `echo 1 > {}/run`",
                ksm::KSM_DIR
            ),
            Err(e) => log::warn!("--ksm: cannot read KSM's run state: {e}"),
        }
        Ok(Self {
            guests: out,
            cow_at_start: cow_ksm(),
        })
    }

    /// The kernel's figures for this process.
    pub fn report(&self) -> Report {
        let proc_stat = ksm::process_stat().unwrap_or_else(|e| {
            log::warn!("--ksm: {e}");
            ksm::ProcessKsmStat::default()
        });
        let global = ksm::stats().unwrap_or_else(|e| {
            log::warn!("--ksm: {e}");
            ksm::KsmStats::default()
        });
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_else(|e| {
            log::warn!("--ksm: cannot read /proc/self/smaps: {e}");
            String::new()
        });
        let counts = Counts {
            pages_shared: global.pages_shared,
            pages_sharing: proc_stat.merging_pages,
            pages_unshared: global.pages_unshared,
            pages_volatile: global.pages_volatile,
            pages_scanned: global.pages_scanned,
            full_scans: global.full_scans,
            zero_pages: proc_stat.zero_pages,
            cow_breaks: cow_ksm().saturating_sub(self.cow_at_start),
            general_profit: proc_stat.process_profit,
            bytes_saved: (proc_stat.merging_pages + proc_stat.zero_pages) * PAGE_BYTES,
        };
        let guests = self
            .guests
            .iter()
            .map(|g| {
                let sharing = ksm_kib_in(&smaps, &g.ranges) * 1024 / PAGE_BYTES;
                GuestReport {
                    name: g.name.clone(),
                    domain: String::new(),
                    counts: Counts {
                        pages_sharing: sharing,
                        bytes_saved: sharing * PAGE_BYTES,
                        general_profit: (sharing * PAGE_BYTES) as i64,
                        ..Counts::default()
                    },
                    pages: g.pages,
                    pages_dirty: 0,
                }
            })
            .collect();
        Report {
            mode: Mode::Ksm,
            counts,
            pages: self.guests.iter().map(|g| g.pages).sum(),
            engine: None,
            guests,
        }
    }
}

/// The host's count of copy-on-write breaks of KSM pages (`cow_ksm` in /proc/vmstat).
fn cow_ksm() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .ok()
        .and_then(|t| vmstat_field(&t, "cow_ksm"))
        .unwrap_or(0)
}

/// The value of `name` in /proc/vmstat's text.
pub fn vmstat_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The `KSM:` kilobytes of the mappings in smaps text that overlap any of `ranges`.
pub fn ksm_kib_in(smaps: &str, ranges: &[(u64, u64)]) -> u64 {
    let mut total = 0;
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((start, end)) = vma_header(line) {
            inside = ranges.iter().any(|&(a, b)| start < b && a < end);
        } else if inside && let Some(rest) = line.strip_prefix("KSM:") {
            total += rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// The address range of an smaps mapping header (`start-end perms offset dev inode [path]`).
fn vma_header(line: &str) -> Option<(u64, u64)> {
    let range = line.split_whitespace().next()?;
    let (a, b) = range.split_once('-')?;
    Some((
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
7f0000000000-7f0004000000 rw-p 00000000 00:00 0 
Size:              65536 kB
KSM:                 120 kB
VmFlags: rd wr mr mw me ac mg
7f0004000000-7f0004001000 rw-p 00000000 00:00 0 
Size:                  4 kB
KSM:                   4 kB
VmFlags: rd wr mr mw me ac
55b4f9094000-55b4f9096000 r--p 00000000 fe:00 247282                     /usr/bin/head
KSM:                   8 kB
";

    #[test]
    fn ksm_kilobytes_of_the_guest_mappings_only() {
        assert_eq!(
            ksm_kib_in(SMAPS, &[(0x7f00_0000_0000, 0x7f00_0400_0000)]),
            120
        );
        assert_eq!(
            ksm_kib_in(SMAPS, &[(0x7f00_0000_0000, 0x7f00_0400_1000)]),
            124
        );
        assert_eq!(ksm_kib_in(SMAPS, &[(0x1000, 0x2000)]), 0);
    }

    #[test]
    fn vmstat_fields_by_name() {
        let t = "nr_free_pages 100\ncow_ksm 343904\nksm_swpin_copy 0\n";
        assert_eq!(vmstat_field(t, "cow_ksm"), Some(343_904));
        assert_eq!(vmstat_field(t, "cow"), None);
    }
}
