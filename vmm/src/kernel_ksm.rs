//! `--ksm`: guest RAM is marked `MADV_MERGEABLE` and left to kernel KSM, for comparison with
//! `--dedup`. The VMM does not change KSM's global settings: KSM merges only while
//! `/sys/kernel/mm/ksm/run` is 1. Its figures for this process come from /proc/self/ksm_stat;
//! those the kernel keeps only for the whole host (pages_shared, pages_unshared,
//! pages_volatile, pages_scanned, full_scans, cow_ksm) are reported as the kernel has them.
//!
//! The kernel keeps no per-guest figures, and the `KSM:` lines of smaps are per mapping, while
//! the RAM of several guests often sits in one mapping (the kernel joins adjacent ones). A
//! guest's `pages_sharing` is therefore counted from /proc/self/pagemap: its present pages that
//! are not exclusively mapped (a KSM page mapped more than once), less those mapping the zero
//! page (PAGEMAP_SCAN's `PFNZERO`), which a read of untouched memory maps too.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use vm_dedup::ksm;
use vm_dedup::sys::pagemap::{PAGE_IS_PFNZERO, PageRegion, Pagemap};
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
                let sharing = guest_sharing(&g.ranges).unwrap_or_else(|e| {
                    log::warn!("--ksm: cannot read {}'s page mappings: {e}", g.name);
                    0
                });
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
            health: None,
            guests,
        }
    }
}

/// Pagemap bits: page present, page exclusively mapped.
const PM_PRESENT: u64 = 1 << 63;
const PM_MMAP_EXCLUSIVE: u64 = 1 << 56;
/// Pagemap entries read at a time.
const PAGEMAP_CHUNK: usize = 4096;

/// How many of `entries` (pagemap entries) are present pages mapped more than once.
pub fn shared_entries(entries: &[u64]) -> u64 {
    entries
        .iter()
        .filter(|&&e| e & PM_PRESENT != 0 && e & PM_MMAP_EXCLUSIVE == 0)
        .count() as u64
}

/// Pages of `[start, end)` ranges mapped more than once, less zero-page mappings.
fn guest_sharing(ranges: &[(u64, u64)]) -> io::Result<u64> {
    let pagemap = File::open("/proc/self/pagemap")?;
    let scanner = Pagemap::open()?;
    let mut buf = vec![0u8; PAGEMAP_CHUNK * 8];
    let mut shared = 0;
    let mut zero = 0;
    for &(start, end) in ranges {
        let pages = ((end - start) / PAGE_BYTES) as usize;
        let mut done = 0;
        while done < pages {
            let n = PAGEMAP_CHUNK.min(pages - done);
            let offset = (start / PAGE_BYTES + done as u64) * 8;
            pagemap.read_exact_at(&mut buf[..n * 8], offset)?;
            let entries: Vec<u64> = buf[..n * 8]
                .chunks_exact(8)
                .map(|b| u64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect();
            shared += shared_entries(&entries);
            done += n;
        }
        let mut runs: Vec<PageRegion> = Vec::new();
        scanner.scan(start as usize, end as usize, &mut runs)?;
        zero += runs
            .iter()
            .filter(|r| r.categories & PAGE_IS_PFNZERO != 0)
            .map(|r| (r.end - r.start) / PAGE_BYTES)
            .sum::<u64>();
    }
    Ok(shared.saturating_sub(zero))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_entries_are_present_and_not_exclusive() {
        let present = PM_PRESENT | 1234;
        let entries = [
            present,
            present | PM_MMAP_EXCLUSIVE,
            0,
            PM_MMAP_EXCLUSIVE,
            present,
        ];
        assert_eq!(shared_entries(&entries), 2);
    }

    #[test]
    fn vmstat_fields_by_name() {
        let t = "nr_free_pages 100\ncow_ksm 343904\nksm_swpin_copy 0\n";
        assert_eq!(vmstat_field(t, "cow_ksm"), Some(343_904));
        assert_eq!(vmstat_field(t, "cow"), None);
    }
}
