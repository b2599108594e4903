//! /proc/self/pagemap: `PAGEMAP_SCAN` (Linux 6.7) to learn which guest pages are present, file
//! backed (still sharing a pool page) or copy-on-write broken, and pagemap entries for host PFNs.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::{PAGE_SIZE, last_os_error};

/// The page is written (for a userfaultfd-registered range: not write-protected).
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// The page is a file page (for our remapped pages: still the pool's page).
pub const PAGE_IS_FILE: u64 = 1 << 2;
/// The page is present in memory.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// The page is swapped out.
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// The page maps the shared zero page.
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
const ALL_CATEGORIES: u64 = 0xff;

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

const PAGEMAP_SCAN: u64 =
    (3 << 30) | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | ((b'f' as u64) << 8) | 16;

/// A run of pages with the same categories.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRegion {
    /// First byte of the run.
    pub start: u64,
    /// One past the last byte of the run.
    pub end: u64,
    /// `PAGE_IS_*` bits.
    pub categories: u64,
}

/// An open /proc/self/pagemap.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Opens /proc/self/pagemap.
    pub fn open() -> io::Result<Self> {
        Ok(Pagemap {
            file: File::open("/proc/self/pagemap")?,
        })
    }

    /// Appends the categories of every page in `[start, end)`, as runs, to `out`.
    pub fn scan(&self, start: usize, end: usize, out: &mut Vec<PageRegion>) -> io::Result<()> {
        const CHUNK: usize = 512;
        let mut buf = [PageRegion::default(); CHUNK];
        let mut at = start as u64;
        while at < end as u64 {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: 0,
                start: at,
                end: end as u64,
                walk_end: 0,
                vec: buf.as_mut_ptr() as u64,
                vec_len: CHUNK as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: 0,
                category_anyof_mask: 0,
                return_mask: ALL_CATEGORIES,
            };
            // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len` regions into `buf`,
            // which has room for exactly that many; it only reads our own page tables.
            let n = unsafe { libc::ioctl(self.file.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
            if n < 0 {
                return Err(last_os_error());
            }
            out.extend_from_slice(&buf[..n as usize]);
            if arg.walk_end <= at {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            at = arg.walk_end;
        }
        Ok(())
    }

    /// The raw pagemap entry of the page at `addr` (bit 63 present, bits 0-54 PFN when readable).
    pub fn entry(&self, addr: usize) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.file
            .read_exact_at(&mut b, (addr / PAGE_SIZE * 8) as u64)?;
        Ok(u64::from_ne_bytes(b))
    }

    /// The host PFN of the page at `addr`, when present (needs CAP_SYS_ADMIN to be non-zero).
    pub fn pfn(&self, addr: usize) -> io::Result<Option<u64>> {
        let e = self.entry(addr)?;
        if e & (1 << 63) == 0 {
            return Ok(None);
        }
        Ok(Some(e & ((1 << 55) - 1)))
    }
}
