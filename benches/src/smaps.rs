//! Reading a process's memory use from `/proc/PID/smaps` and `/proc/PID/smaps_rollup`.
//!
//! RSS counts a page shared by several mappings once per mapping, so process overhead is
//! measured with PSS (proportional set size), in KiB as the kernel reports it.

use std::fs;
use std::io;

/// One mapping of `/proc/PID/smaps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Permissions (`rw-p`).
    pub perms: String,
    /// Backing file or pseudo-name (`[heap]`, `[stack]`); empty for anonymous memory.
    pub name: String,
    /// The two-letter `VmFlags` (`rd`, `wr`, `nr` for no swap reservation, ...).
    pub flags: Vec<String>,
    /// Resident KiB.
    pub rss_kib: u64,
    /// Proportional KiB.
    pub pss_kib: u64,
}

impl Mapping {
    /// Size of the mapping in bytes.
    pub fn size(&self) -> u64 {
        self.end - self.start
    }

    /// Whether it is anonymous memory without a name.
    pub fn is_unnamed_anonymous(&self) -> bool {
        self.name.is_empty()
    }

    /// Whether it looks like guest RAM (or several guests' RAM merged into one mapping by the
    /// kernel): unnamed, private, read-write, without swap reservation (`MAP_NORESERVE`).
    pub fn looks_like_guest_ram(&self) -> bool {
        self.is_unnamed_anonymous() && self.perms == "rw-p" && self.flags.iter().any(|f| f == "nr")
    }
}

/// Parses the header line of a mapping (`start-end perms offset dev inode [name]`).
fn header(line: &str) -> Option<Mapping> {
    let mut fields = line.split_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?.to_string();
    // offset, dev and inode, then the optional name (which may contain spaces).
    for _ in 0..3 {
        fields.next()?;
    }
    let name = fields.collect::<Vec<_>>().join(" ");
    Some(Mapping {
        start,
        end,
        perms,
        name,
        flags: Vec::new(),
        rss_kib: 0,
        pss_kib: 0,
    })
}

/// The KiB of a `Key:   N kB` line whose key is `key`.
fn kib_field(line: &str, key: &str) -> Option<u64> {
    let rest = line.strip_prefix(key)?.strip_prefix(':')?;
    rest.trim().strip_suffix("kB")?.trim().parse().ok()
}

/// Parses the text of `/proc/PID/smaps`.
pub fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut mappings: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if let Some(current) = mappings.last_mut() {
            if let Some(kib) = kib_field(line, "Rss") {
                current.rss_kib = kib;
                continue;
            }
            if let Some(kib) = kib_field(line, "Pss") {
                current.pss_kib = kib;
                continue;
            }
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                current.flags = flags.split_whitespace().map(str::to_string).collect();
                continue;
            }
        }
        // Field lines start with a capitalised key; headers with a hex address range.
        if let Some(mapping) = header(line) {
            mappings.push(mapping);
        }
    }
    mappings
}

/// The process's total PSS in KiB from the text of `/proc/PID/smaps_rollup`.
pub fn rollup_pss_kib(text: &str) -> Option<u64> {
    text.lines().find_map(|l| kib_field(l, "Pss"))
}

/// Memory use of a running process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessMemory {
    /// Total PSS in KiB.
    pub pss_kib: u64,
    /// Every mapping.
    pub mappings: Vec<Mapping>,
}

impl ProcessMemory {
    /// Reads `/proc/pid/smaps_rollup` and `/proc/pid/smaps`.
    pub fn of(pid: u32) -> io::Result<Self> {
        let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
        let pss_kib = rollup_pss_kib(&rollup).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "no Pss line in smaps_rollup")
        })?;
        // A mapped file's path may be any bytes; only the fields before it are read.
        let smaps = fs::read(format!("/proc/{pid}/smaps"))?;
        Ok(Self {
            pss_kib,
            mappings: parse_smaps(&String::from_utf8_lossy(&smaps)),
        })
    }

    /// PSS in KiB of the address ranges `ranges` (sorted, not overlapping): the PSS of every
    /// mapping that overlaps them, less `outside_kib(start, end)` for each part of such a
    /// mapping outside them. The kernel merges guest RAM with adjacent anonymous memory of the
    /// same kind (a malloc arena's heap, another guest's RAM) into one mapping, so the ranges
    /// cannot be told apart by mapping alone; `outside_kib` measures what a part holds (the
    /// resident pages of private memory, from the pagemap).
    pub fn pss_within(
        &self,
        ranges: &[(u64, u64)],
        mut outside_kib: impl FnMut(u64, u64) -> u64,
    ) -> u64 {
        let mut kib = 0;
        for m in &self.mappings {
            let inside: Vec<(u64, u64)> = ranges
                .iter()
                .map(|&(s, e)| (s.max(m.start), e.min(m.end)))
                .filter(|&(s, e)| s < e)
                .collect();
            if inside.is_empty() {
                continue;
            }
            let mut outside = 0;
            let mut at = m.start;
            for &(s, e) in inside.iter().chain(&[(m.end, m.end)]) {
                if at < s {
                    outside += outside_kib(at, s);
                }
                at = at.max(e);
            }
            kib += m.pss_kib.saturating_sub(outside);
        }
        kib
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
5654cbdb6000-5654cbdb9000 r--p 00000000 fe:00 247749                     /usr/bin/vmm
Size:                 12 kB
Rss:                  12 kB
Pss:                   6 kB
Pss_Dirty:             0 kB
Swap:                  0 kB
SwapPss:               0 kB
VmFlags: rd mr mw me sd
7f0000000000-7f0004000000 rw-p 00000000 00:00 0 
Size:              65536 kB
Rss:                 216 kB
Pss:                 216 kB
VmFlags: rd wr mr mw me nr sd
7f1000000000-7f1008000000 rw-p 00000000 00:00 0 
Size:             131072 kB
Rss:                 100 kB
Pss:                 100 kB
VmFlags: rd wr mr mw me nr
7f2000000000-7f2004000000 ---p 00000000 00:00 0 
Size:              65536 kB
Rss:                   0 kB
Pss:                   0 kB
VmFlags: mr mw me nr
7f3000000000-7f3004000000 rw-p 00000000 00:00 0 
Size:              65536 kB
Rss:                   8 kB
Pss:                   8 kB
VmFlags: rd wr mr mw me ac
7ffd1000-7ffd2000 rw-p 00000000 00:00 0                          [stack]
Size:                  4 kB
Rss:                   4 kB
Pss:                   4 kB
7ffe0000-7ffe1000 r--p 00000000 fe:00 12 /tmp/a file with spaces
Rss:                   4 kB
Pss:                   1 kB
";

    #[test]
    fn mappings_with_their_names_and_sizes() {
        let maps = parse_smaps(SMAPS);
        assert_eq!(maps.len(), 7);
        assert_eq!(maps[0].name, "/usr/bin/vmm");
        assert_eq!(maps[0].perms, "r--p");
        assert_eq!(maps[0].flags, ["rd", "mr", "mw", "me", "sd"]);
        assert_eq!(
            (maps[0].size(), maps[0].rss_kib, maps[0].pss_kib),
            (0x3000, 12, 6)
        );
        assert!(maps[1].is_unnamed_anonymous());
        assert_eq!((maps[1].size(), maps[1].pss_kib), (64 << 20, 216));
        assert_eq!(maps[5].name, "[stack]");
        assert!(!maps[5].is_unnamed_anonymous());
        assert_eq!(maps[6].name, "/tmp/a file with spaces");
        assert_eq!(maps[6].pss_kib, 1);
        assert!(maps[6].flags.is_empty());
    }

    #[test]
    fn pss_dirty_and_swap_pss_are_not_pss() {
        let maps = parse_smaps(SMAPS);
        assert_eq!(maps[0].pss_kib, 6);
        assert_eq!(kib_field("Pss_Dirty:  7 kB", "Pss"), None);
        assert_eq!(kib_field("SwapPss:  7 kB", "Pss"), None);
    }

    #[test]
    fn rollup_total() {
        let rollup =
            "55-7f ---p 00000000 00:00 0  [rollup]\nRss: 1724 kB\nPss_Anon: 116 kB\nPss:  296 kB\n";
        assert_eq!(rollup_pss_kib(rollup), Some(296));
        assert_eq!(rollup_pss_kib("Rss: 1 kB\n"), None);
    }

    #[test]
    fn pss_within_ranges_leaves_out_what_merged_mappings_hold_outside_them() {
        let memory = ProcessMemory {
            pss_kib: 600,
            mappings: parse_smaps(SMAPS),
        };
        let mib = 1u64 << 20;
        let (a, b) = (0x7f00_0000_0000, 0x7f10_0000_0000);
        let mut asked = Vec::new();
        let mut outside = |s: u64, e: u64| {
            asked.push((s, e));
            (e - s) / mib
        };
        // The first 64M mapping whole; the second (128M) holds 64M of the ranges in two parts,
        // with 16M and 48M outside them (16 and 48 KiB by this measure).
        let ranges = [
            (a, a + 64 * mib),
            (b + 16 * mib, b + 48 * mib),
            (b + 48 * mib, b + 80 * mib),
        ];
        assert_eq!(
            memory.pss_within(&ranges, &mut outside),
            216 + 100 - 16 - 48
        );
        assert_eq!(asked, [(b, b + 16 * mib), (b + 80 * mib, b + 128 * mib)]);
        // Nothing in the ranges, nothing counted; a part larger than the PSS counts as all of it.
        assert_eq!(memory.pss_within(&[(0x1000, 0x2000)], |_, _| 0), 0);
        assert_eq!(memory.pss_within(&[(b, b + mib)], |_, _| 1000), 0);
    }

    #[test]
    fn this_process_has_mappings_and_pss() {
        let me = ProcessMemory::of(std::process::id()).unwrap();
        assert!(me.pss_kib > 0);
        assert!(me.mappings.iter().any(|m| m.name == "[stack]"));
    }
}
