//! The host's view of a process's memory, for tests that check which physical pages guests
//! share: `/proc/PID/pagemap` (host page frame numbers; visible to root only), `/proc/PID/maps`
//! and `/proc/PID/mem` (to find where a guest's RAM is mapped from a page of known content).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Bytes in a page.
const PAGE: u64 = 4096;
/// Pagemap entry: the page is present.
const PRESENT: u64 = 1 << 63;
/// Pagemap entry: the page frame number (bits 0-54).
const PFN_MASK: u64 = (1 << 55) - 1;

/// Host page frame numbers of `pages` pages from `hva` in the pagemap `file`: `None` for a page
/// that is not present. The PFN reads as 0 without CAP_SYS_ADMIN.
fn read_pfns(file: &File, hva: u64, pages: usize) -> io::Result<Vec<Option<u64>>> {
    let mut raw = vec![0u8; pages * 8];
    file.read_exact_at(&mut raw, hva / PAGE * 8)?;
    Ok(raw
        .chunks_exact(8)
        .map(|e| {
            let mut word = [0u8; 8];
            word.copy_from_slice(e);
            let entry = u64::from_le_bytes(word);
            (entry & PRESENT != 0).then_some(entry & PFN_MASK)
        })
        .collect())
}

/// The host zero page's frame number, from a page of this process that was only read; `None`
/// when PFNs are hidden (not root) or the page could not be mapped.
pub fn zero_pfn() -> Option<u64> {
    let len = PAGE as usize;
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return None;
    }
    // SAFETY: `addr` is a readable mapping of `len` bytes made above; the volatile read makes
    // the kernel map the zero page there.
    unsafe { std::ptr::read_volatile(addr.cast::<u8>()) };
    let pfn = File::open("/proc/self/pagemap")
        .and_then(|f| read_pfns(&f, addr as u64, 1))
        .ok()
        .and_then(|p| p[0])
        .filter(|&pfn| pfn != 0);
    // SAFETY: unmaps exactly the mapping made above, which nothing uses any more.
    unsafe { libc::munmap(addr, len) };
    pfn
}

/// Whether this process can see host page frame numbers (it runs as root): checked on the
/// zero page.
pub fn pfns_visible() -> bool {
    zero_pfn().is_some()
}

/// Another process's memory, seen from the host.
#[derive(Debug)]
pub struct ProcessPages {
    pid: u32,
    pagemap: File,
    mem: File,
}

impl ProcessPages {
    /// Opens the pagemap and memory of process `pid` (which must allow this process to trace
    /// it, as a parent running as root may).
    pub fn open(pid: u32) -> io::Result<Self> {
        Ok(Self {
            pid,
            pagemap: File::open(format!("/proc/{pid}/pagemap"))?,
            mem: File::open(format!("/proc/{pid}/mem"))?,
        })
    }

    /// Host page frame numbers of `pages` pages from `hva`; `None` for pages not present.
    pub fn pfns(&self, hva: u64, pages: usize) -> io::Result<Vec<Option<u64>>> {
        read_pfns(&self.pagemap, hva, pages)
    }

    /// Start and end of every private writable mapping (where guest RAM lives).
    fn writable_private_mappings(&self) -> io::Result<Vec<(u64, u64)>> {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid))?;
        Ok(maps
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let (range, perms) = (fields.next()?, fields.next()?);
                if !perms.starts_with("rw") || !perms.ends_with('p') {
                    return None;
                }
                let (start, end) = range.split_once('-')?;
                Some((
                    u64::from_str_radix(start, 16).ok()?,
                    u64::from_str_radix(end, 16).ok()?,
                ))
            })
            .collect())
    }

    /// Host virtual addresses of the present pages in private writable mappings whose content
    /// is `page`. Only present pages are read, so looking changes no mapping.
    pub fn find_page(&self, page: &[u8]) -> io::Result<Vec<u64>> {
        assert_eq!(page.len() as u64, PAGE, "find_page looks for whole pages");
        let mut found = Vec::new();
        let mut buf = vec![0u8; PAGE as usize];
        for (start, end) in self.writable_private_mappings()? {
            let pfns = self.pfns(start, ((end - start) / PAGE) as usize)?;
            for (i, _) in pfns.iter().enumerate().filter(|(_, p)| p.is_some()) {
                let hva = start + i as u64 * PAGE;
                // A page can go away between the two reads (the process runs): skip it then.
                if self.mem.read_exact_at(&mut buf, hva).is_ok() && buf == page {
                    found.push(hva);
                }
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // test code
mod tests {
    use super::*;

    #[test]
    fn a_page_of_this_process_is_found_where_it_is() {
        let mut page = vec![0u8; PAGE as usize * 2];
        let offset = page.as_ptr().align_offset(PAGE as usize);
        let marker = crate::pattern(0x5eed, PAGE as usize);
        page[offset..offset + PAGE as usize].copy_from_slice(&marker);
        let hva = page[offset..].as_ptr() as u64;
        let me = ProcessPages::open(std::process::id()).unwrap();
        let found = me.find_page(&marker).unwrap();
        assert!(found.contains(&hva), "{hva:#x} not in {found:x?}");
        let pfn = me.pfns(hva, 1).unwrap()[0];
        assert!(pfn.is_some(), "a written page is present");
        if pfns_visible() {
            assert_ne!(pfn, zero_pfn());
        }
    }
}
