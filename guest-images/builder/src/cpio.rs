//! A writer for `newc` cpio archives (the format Linux unpacks as an initramfs).
//!
//! Every entry gets uid/gid 0, mtime 0 and an inode number from a counter, so the same calls
//! always produce the same bytes. Paths are relative (`bin/busybox`, not `/bin/busybox`); parents
//! must be added before their children, as the kernel creates entries in archive order.

use std::io::{self, Write};

use thiserror::Error;

/// Magic of a `newc` header (no checksums).
const MAGIC: &[u8; 6] = b"070701";
/// Size of a `newc` header in bytes.
pub const HEADER_LEN: usize = 110;
/// Name of the entry that ends an archive.
pub const TRAILER: &str = "TRAILER!!!";

/// File type bits of `mode`.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Errors from writing an archive.
#[derive(Debug, Error)]
pub enum Error {
    /// The path is empty, absolute, contains `..` or `.` components, or a NUL byte.
    #[error("bad archive path {0:?}")]
    BadPath(String),
    /// A permission mode with bits outside `0o7777`.
    #[error("bad mode {mode:o} for {path}")]
    BadMode {
        /// The entry's path.
        path: String,
        /// The mode given.
        mode: u32,
    },
    /// The entry's data does not fit the format's 32-bit size field.
    #[error("{0} is too large for a cpio entry")]
    TooLarge(String),
    /// Writing to the output failed.
    #[error("cannot write the archive")]
    Io(#[source] io::Error),
}

/// Writes a `newc` archive entry by entry; call [`CpioWriter::finish`] to end it.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

fn check_path(path: &str) -> Result<(), Error> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\0')
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        Err(Error::BadPath(path.to_owned()))
    } else {
        Ok(())
    }
}

fn check_mode(path: &str, mode: u32) -> Result<(), Error> {
    if mode & !0o7777 == 0 {
        Ok(())
    } else {
        Err(Error::BadMode {
            path: path.to_owned(),
            mode,
        })
    }
}

/// Bytes of padding that bring `len` to a multiple of 4.
fn pad4(len: u64) -> usize {
    ((4 - len % 4) % 4) as usize
}

/// The fields of one header that vary between entries.
struct Header<'a> {
    ino: u32,
    mode: u32,
    nlink: u32,
    size: u32,
    rdev: (u32, u32),
    name: &'a str,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive written to `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.out.write_all(bytes).map_err(Error::Io)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<(), Error> {
        let n = pad4(self.written);
        self.put(&[0u8; 3][..n])
    }

    fn entry(&mut self, h: &Header<'_>, data: &[u8]) -> Result<(), Error> {
        let namesize = h.name.len() + 1;
        let fields = [
            h.ino, h.mode, 0, 0, h.nlink, 0, h.size, 0, 0, h.rdev.0, h.rdev.1,
        ];
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        for field in fields {
            header.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        // namesize fits: paths come from our own code and are short
        header.extend_from_slice(format!("{namesize:08x}").as_bytes());
        header.extend_from_slice(b"00000000");
        self.put(&header)?;
        self.put(h.name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn add(
        &mut self,
        path: &str,
        kind: u32,
        perm: u32,
        data: &[u8],
        rdev: (u32, u32),
    ) -> Result<(), Error> {
        check_path(path)?;
        check_mode(path, perm)?;
        let size = u32::try_from(data.len()).map_err(|_| Error::TooLarge(path.to_owned()))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if kind == S_IFDIR { 2 } else { 1 };
        let header = Header {
            ino,
            mode: kind | perm,
            nlink,
            size,
            rdev,
            name: path,
        };
        self.entry(&header, data)
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), Error> {
        self.add(path, S_IFDIR, perm, &[], (0, 0))
    }

    /// Adds a regular file holding `data`.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<(), Error> {
        self.add(path, S_IFREG, perm, data, (0, 0))
    }

    /// Adds a symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), Error> {
        self.add(path, S_IFLNK, 0o777, target.as_bytes(), (0, 0))
    }

    /// Adds a character device node.
    pub fn char_device(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), Error> {
        self.add(path, S_IFCHR, perm, &[], (major, minor))
    }

    /// Writes the trailer, pads the archive to a multiple of 512 bytes and returns the output.
    pub fn finish(mut self) -> Result<W, Error> {
        let trailer = Header {
            ino: 0,
            mode: 0,
            nlink: 1,
            size: 0,
            rdev: (0, 0),
            name: TRAILER,
        };
        self.entry(&trailer, &[])?;
        let tail = ((512 - self.written % 512) % 512) as usize;
        self.put(&vec![0u8; tail])?;
        self.out.flush().map_err(Error::Io)?;
        Ok(self.out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One entry read back from an archive.
    #[derive(Debug, PartialEq, Eq)]
    pub(crate) struct Entry {
        pub(crate) name: String,
        pub(crate) ino: u32,
        pub(crate) mode: u32,
        pub(crate) uid: u32,
        pub(crate) gid: u32,
        pub(crate) nlink: u32,
        pub(crate) mtime: u32,
        pub(crate) rdev: (u32, u32),
        pub(crate) data: Vec<u8>,
    }

    /// A strict reader for the archives this module writes (tests only).
    pub(crate) fn read_all(archive: &[u8]) -> Vec<Entry> {
        let mut pos = 0;
        let mut entries = Vec::new();
        loop {
            assert_eq!(pos % 4, 0, "header not 4-aligned");
            let h = &archive[pos..pos + HEADER_LEN];
            assert_eq!(&h[..6], MAGIC);
            let field = |i: usize| {
                let s = std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let namesize = field(11) as usize;
            let name_start = pos + HEADER_LEN;
            let name = std::str::from_utf8(&archive[name_start..name_start + namesize - 1])
                .unwrap()
                .to_owned();
            assert_eq!(archive[name_start + namesize - 1], 0);
            let data_start = (name_start + namesize).next_multiple_of(4);
            let size = field(6) as usize;
            let data = archive[data_start..data_start + size].to_vec();
            pos = (data_start + size).next_multiple_of(4);
            if name == TRAILER {
                assert_eq!(archive.len() % 512, 0);
                assert!(archive[pos..].iter().all(|&b| b == 0));
                return entries;
            }
            assert_eq!(field(12), 0, "check field");
            entries.push(Entry {
                name,
                ino: field(0),
                mode: field(1),
                uid: field(2),
                gid: field(3),
                nlink: field(4),
                mtime: field(5),
                rdev: (field(9), field(10)),
                data,
            });
        }
    }

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("bin/hello", 0o755, b"hello world").unwrap();
        w.symlink("bin/sh", "hello").unwrap();
        w.char_device("console", 0o600, 5, 1).unwrap();
        w.file("init", 0o644, b"").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn first_header_has_the_exact_newc_layout() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("a", 0o644, b"xyz").unwrap();
        let bytes = w.finish().unwrap();
        let expected_header = concat!(
            "070701", "00000001", "000081a4", "00000000", "00000000", "00000001", "00000000",
            "00000003", "00000000", "00000000", "00000000", "00000000", "00000002", "00000000",
        );
        assert_eq!(&bytes[..HEADER_LEN], expected_header.as_bytes());
        // name "a\0" then padding to 4 (110 + 2 = 112), then data and its padding
        assert_eq!(&bytes[110..112], b"a\0");
        assert_eq!(&bytes[112..116], b"xyz\0");
        assert_eq!(&bytes[116..122], b"070701");
    }

    #[test]
    fn entries_read_back_with_fixed_metadata() {
        let entries = read_all(&sample());
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["bin", "bin/hello", "bin/sh", "console", "init"]);
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e.ino, i as u32 + 1);
            assert_eq!((e.uid, e.gid, e.mtime), (0, 0, 0));
        }
        assert_eq!(entries[0].mode, 0o040_755);
        assert_eq!(entries[0].nlink, 2);
        assert_eq!(entries[1].mode, 0o100_755);
        assert_eq!(entries[1].data, b"hello world");
        assert_eq!(entries[2].mode, 0o120_777);
        assert_eq!(entries[2].data, b"hello");
        assert_eq!(entries[3].mode, 0o020_600);
        assert_eq!(entries[3].rdev, (5, 1));
        assert!(entries[4].data.is_empty());
    }

    #[test]
    fn output_is_reproducible() {
        assert_eq!(sample(), sample());
    }

    #[test]
    fn bad_paths_and_modes_are_refused() {
        let mut w = CpioWriter::new(Vec::new());
        for path in ["", "/abs", "a/../b", "a//b", "./a", "a/", "nul\0"] {
            assert!(
                matches!(w.file(path, 0o644, b""), Err(Error::BadPath(_))),
                "{path:?}"
            );
        }
        assert!(matches!(
            w.file("a", 0o100_644, b""),
            Err(Error::BadMode { .. })
        ));
        assert_eq!(w.written(), 0);
    }

    #[test]
    fn write_errors_are_reported() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut w = CpioWriter::new(Broken);
        assert!(matches!(w.dir("x", 0o755), Err(Error::Io(_))));
    }
}
