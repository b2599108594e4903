//! CPU time and address-space facts from the kernel: thread CPU clocks, `vm.max_map_count`,
//! VMA counts and file mappings from /proc/self/maps, and VMA flags from /proc/self/smaps.

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

/// A file mapping as /proc/self/maps shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileMapping {
    /// Start address.
    pub start: usize,
    /// End address.
    pub end: usize,
    /// Offset in the file of the first byte.
    pub offset: u64,
    /// Device of the file (as `st_dev`).
    pub dev: u64,
    /// Inode number of the file.
    pub inode: u64,
}

/// The file mappings of this process that overlap any of `ranges` (whole, as the kernel lists
/// them).
pub fn file_mappings_in(ranges: &[(usize, usize)]) -> io::Result<Vec<FileMapping>> {
    let maps = read_lossy("/proc/self/maps")?;
    Ok(parse_file_mappings(&maps, ranges))
}

/// The text of a /proc file that names mapped files. A path is any bytes, not always UTF-8;
/// the parsers only read the fields before it, so an invalid byte in a path is replaced rather
/// than failing the whole read.
fn read_lossy(path: &str) -> io::Result<String> {
    let bytes = std::fs::read(path)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn parse_file_mappings(maps: &str, ranges: &[(usize, usize)]) -> Vec<FileMapping> {
    let mut out = Vec::new();
    for line in maps.lines() {
        // start-end perms offset dev inode [path]
        let mut fields = line.split_ascii_whitespace();
        let (Some(span), Some(_), Some(offset), Some(dev), Some(inode)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        let Some((start, end)) = span.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end), Ok(offset), Some(dev), Ok(inode)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
            u64::from_str_radix(offset, 16),
            parse_dev(dev),
            inode.parse::<u64>(),
        ) else {
            continue;
        };
        if inode != 0 && ranges.iter().any(|&(s, e)| start < e && s < end) {
            out.push(FileMapping {
                start,
                end,
                offset,
                dev,
                inode,
            });
        }
    }
    out
}

/// A device number as /proc/PID/maps writes it (`major:minor` in hex), as `st_dev`.
fn parse_dev(field: &str) -> Option<u64> {
    let (major, minor) = field.split_once(':')?;
    let major = u32::from_str_radix(major, 16).ok()?;
    let minor = u32::from_str_radix(minor, 16).ok()?;
    Some(libc::makedev(major, minor))
}

/// One VMA as /proc/self/smaps shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmaFlags {
    /// Start address.
    pub start: usize,
    /// End address.
    pub end: usize,
    /// Whether it maps a file (inode not 0: shared anonymous memory and hugetlb mappings
    /// included, `[heap]` and `[stack]` not).
    pub file: bool,
    /// Its permissions as /proc/self/maps writes them (`rw-p`, `r--s`, ...).
    pub perms: String,
    /// Its `VmFlags` mnemonics (`rd`, `wr`, `nr`, `uw`, ...), sorted.
    pub flags: Vec<String>,
}

impl VmaFlags {
    /// Whether the VMA is private (`p`), not shared (`s`).
    pub fn private(&self) -> bool {
        self.perms.as_bytes().get(3) == Some(&b'p')
    }

    /// Whether the VMA is readable and writable.
    pub fn read_write(&self) -> bool {
        self.perms.starts_with("rw")
    }

    /// Whether `VmFlags` holds `flag`.
    pub fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

/// The VMAs of this process that overlap `[start, end)`, with their flags.
pub fn vma_flags(start: usize, end: usize) -> io::Result<Vec<VmaFlags>> {
    Ok(Smaps::read()?.vmas(start, end))
}

/// One read of /proc/self/smaps, to look up the VMAs of several ranges (reading smaps walks
/// the page tables of every VMA of the process: read it once for all of them).
#[derive(Debug)]
pub struct Smaps(String);

impl Smaps {
    /// Reads /proc/self/smaps.
    pub fn read() -> io::Result<Smaps> {
        read_lossy("/proc/self/smaps").map(Smaps)
    }

    /// The VMAs that overlap `[start, end)`, in address order. smaps is read in pieces, between
    /// which other threads may change the address space: a VMA of a range nobody changes is
    /// never missing, but a VMA that grew or shrank meanwhile may be listed twice, overlapping.
    pub fn vmas(&self, start: usize, end: usize) -> Vec<VmaFlags> {
        parse_smaps(&self.0, start, end)
    }
}

fn parse_smaps(smaps: &str, start: usize, end: usize) -> Vec<VmaFlags> {
    let mut out = Vec::new();
    let mut current: Option<VmaFlags> = None;
    for line in smaps.lines() {
        if let Some(rest) = line.strip_prefix("VmFlags:") {
            if let Some(mut v) = current.take() {
                v.flags = rest.split_whitespace().map(str::to_string).collect();
                v.flags.sort();
                out.push(v);
            }
            continue;
        }
        let Some(range) = line.split_whitespace().next() else {
            continue;
        };
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            continue;
        };
        current = None;
        if a < end && b > start {
            let mut fields = line.split_whitespace();
            let perms = fields.nth(1).unwrap_or("");
            let inode = fields.nth(2).unwrap_or("0");
            current = Some(VmaFlags {
                start: a,
                end: b,
                file: inode != "0",
                perms: perms.to_string(),
                flags: Vec::new(),
            });
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_mappings_inside_ranges() {
        let maps = "\
7f0000000000-7f0000002000 rw-p 00000000 00:00 0 \n\
7f0000002000-7f0000003000 r--p 00005000 00:01 4242                       /memfd:vm-dedup-pool (deleted)\n\
7f0000003000-7f0000004000 rw-p 00000000 00:00 0 \n\
7f1000000000-7f1000001000 r--p 00000000 00:01 4242                       /memfd:vm-dedup-pool (deleted)\n\
garbage\n";
        let got = parse_file_mappings(maps, &[(0x7f00_0000_0000, 0x7f00_0000_4000)]);
        // A mapping that starts before a range and reaches into it overlaps it too.
        let late = parse_file_mappings(maps, &[(0x7f00_0000_2800, 0x7f00_0000_2c00)]);
        assert_eq!(late, got);
        assert_eq!(
            got,
            [FileMapping {
                start: 0x7f00_0000_2000,
                end: 0x7f00_0000_3000,
                offset: 0x5000,
                dev: libc::makedev(0, 1),
                inode: 4242,
            }]
        );
    }

    #[test]
    fn smaps_flags_of_overlapping_vmas() {
        let smaps = "\
1000-3000 rw-p 00000000 00:00 0 
Size:                  8 kB
VmFlags: rd wr mr mw me nr uw 
3000-4000 rw-p 00000000 00:01 4242                       /memfd:vm-dedup-pool (deleted)
Size:                  4 kB
VmFlags: rd wr mr mw me 
4000-5000 r--p 00000000 00:00 0 
VmFlags: rd mr 
";
        let v = parse_smaps(smaps, 0x2000, 0x4000);
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].start, v[0].end, v[0].file), (0x1000, 0x3000, false));
        assert_eq!(v[0].flags, ["me", "mr", "mw", "nr", "rd", "uw", "wr"]);
        assert!(v[0].private() && v[0].read_write() && v[0].has("nr") && !v[0].has("lo"));
        assert!(v[1].file);
        assert_eq!(v[1].perms, "rw-p");
        assert_eq!(v[1].flags.len(), 5);
        assert!(parse_smaps(smaps, 0x5000, 0x6000).is_empty());
    }

    #[test]
    fn vmas_of_a_fresh_mapping() {
        let v: Vec<u8> = vec![1; 1 << 20];
        let a = v.as_ptr() as usize;
        let here = vma_flags(a, a + 1).unwrap();
        // Other tests map and unmap meanwhile, and smaps is read in pieces between which
        // neighbouring VMAs can merge or split: the same VMA may show up twice, never not at all.
        assert!(!here.is_empty());
        for v in &here {
            assert!(v.start <= a && a < v.end, "{:#x}-{:#x}", v.start, v.end);
            assert!(v.flags.iter().any(|f| f == "rd"));
        }
    }
}
