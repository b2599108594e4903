//! The host's memory as /proc/meminfo tells it: RAM, swap and what is available now. Read for
//! the overcommit guardrail at start, by the memory-pressure tuner and by the memory guard
//! (which keeps the file open: see [`Reread`]).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
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

    /// Rereads /proc/meminfo (or a file in its format) kept open in `file`.
    pub fn reread(file: &mut Reread) -> Result<Self, Error> {
        let path = file.path().to_path_buf();
        let text = file.read().map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(text).map_err(|field| Error::Field { path, field })
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

/// A file kept open and reread from its start at every look: a look needs no new file
/// descriptor (it works while the process is out of them) and, after the first, no allocation.
#[derive(Debug)]
pub struct Reread {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
}

impl Reread {
    /// Opens `path`.
    pub fn open(path: impl Into<PathBuf>) -> io::Result<Self> {
        let path = path.into();
        let file = File::open(&path)?;
        Ok(Self {
            path,
            file,
            buf: Vec::with_capacity(4096),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole file as it is now.
    pub fn read(&mut self) -> io::Result<&str> {
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        loop {
            let n = self.file.read_at(&mut chunk, self.buf.len() as u64)?;
            if n == 0 {
                break;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        std::str::from_utf8(&self.buf)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
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
        let mut open = Reread::open(MEMINFO).unwrap();
        for _ in 0..2 {
            let again = HostMemory::reread(&mut open).unwrap();
            assert_eq!(again.mem_total, m.mem_total);
        }
    }

    #[test]
    fn reread_sees_changes_without_reopening() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("meminfo");
        std::fs::write(&path, SAMPLE).unwrap();
        let mut open = Reread::open(&path).unwrap();
        assert_eq!(HostMemory::reread(&mut open).unwrap().swap_total, 1 << 30);
        std::fs::write(
            &path,
            "MemTotal: 8 kB\nMemAvailable: 4 kB\nSwapTotal: 0 kB\n",
        )
        .unwrap();
        let m = HostMemory::reread(&mut open).unwrap();
        assert_eq!((m.mem_total, m.available_percent()), (8192, 50));
        std::fs::write(&path, "MemTotal: 8 kB\n").unwrap();
        assert!(matches!(
            HostMemory::reread(&mut open),
            Err(Error::Field {
                field: "MemAvailable",
                ..
            })
        ));
    }
}
