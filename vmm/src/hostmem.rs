//! The host's memory as /proc/meminfo tells it: RAM, swap and what is available now. Read for
//! the overcommit guardrail at start and by the memory-pressure tuner.

use std::io;
use std::path::{Path, PathBuf};

/// Where the kernel reports memory figures.
pub const MEMINFO: &str = "/proc/meminfo";

/// Errors reading the host's memory figures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A needed line is missing or does not parse.
    #[error("{path} has no readable {field} line")]
    Field {
        /// The file.
        path: PathBuf,
        /// The missing field.
        field: &'static str,
    },
}

/// The host's memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMemory {
    /// RAM (`MemTotal`).
    pub mem_total: u64,
    /// RAM available for new work without swapping (`MemAvailable`).
    pub mem_available: u64,
    /// Swap space (`SwapTotal`).
    pub swap_total: u64,
}

impl HostMemory {
    /// Reads /proc/meminfo.
    pub fn read() -> Result<Self, Error> {
        Self::read_from(Path::new(MEMINFO))
    }

    /// Reads a file in /proc/meminfo's format.
    pub fn read_from(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|field| Error::Field {
            path: path.to_path_buf(),
            field,
        })
    }

    /// Parses /proc/meminfo's text; the error names the first missing field.
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        let field = |name: &'static str| field_bytes(text, name).ok_or(name);
        Ok(Self {
            mem_total: field("MemTotal")?,
            mem_available: field("MemAvailable")?,
            swap_total: field("SwapTotal")?,
        })
    }

    /// `mem_available` as a percentage of `mem_total` (0 to 100).
    pub fn available_percent(&self) -> u32 {
        if self.mem_total == 0 {
            return 0;
        }
        let pct = u128::from(self.mem_available) * 100 / u128::from(self.mem_total);
        pct.min(100) as u32
    }
}

/// The value of a `Name:   123 kB` line, in bytes.
fn field_bytes(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, rest) = line.split_once(':')?;
        if key.trim() != name {
            return None;
        }
        let mut words = rest.split_whitespace();
        let value: u64 = words.next()?.parse().ok()?;
        match words.next() {
            Some("kB") => value.checked_mul(1024),
            None => Some(value),
            Some(_) => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "MemTotal:       24731708 kB\nMemFree:        17296116 kB\n\
                          MemAvailable:   12365853 kB\nSwapTotal:       1048576 kB\n\
                          HugePages_Total:       0\n";

    #[test]
    fn parses_meminfo_in_bytes() {
        let m = HostMemory::parse(SAMPLE).unwrap();
        assert_eq!(m.mem_total, 24_731_708 * 1024);
        assert_eq!(m.mem_available, 12_365_853 * 1024);
        assert_eq!(m.swap_total, 1 << 30);
        assert_eq!(m.available_percent(), 49);
    }

    #[test]
    fn missing_fields_are_named() {
        assert_eq!(HostMemory::parse("MemTotal: 10 kB\n"), Err("MemAvailable"));
        assert_eq!(
            HostMemory::parse("MemTotal: x kB\nMemAvailable: 1 kB\nSwapTotal: 0 kB\n"),
            Err("MemTotal")
        );
    }

    #[test]
    fn reads_this_host() {
        let m = HostMemory::read().unwrap();
        assert!(m.mem_total > 0 && m.mem_available <= m.mem_total);
    }
}
