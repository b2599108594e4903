//! Loading what a guest runs: a Linux kernel (ELF vmlinux or bzImage, through linux-loader),
//! an initrd, or a flat binary.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{self, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::arch::x86_64::layout::HIMEM_START;
use crate::memory::GuestMem;

/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode kernel.
const BZIMAGE_ENTRY_64: u64 = 0x200;
/// `xloadflags`: the kernel has a 64-bit entry point.
const XLF_KERNEL_64: u16 = 1;
/// Offset of the "HdrS" magic in a bzImage.
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
/// Size of an ELF64 file header.
const ELF_HEADER_SIZE: usize = 64;
/// Size of an ELF64 program header.
const ELF_PHDR_SIZE: usize = 56;
/// ELF program header type of a loadable segment.
const PT_LOAD: u32 = 1;

/// Errors loading guest code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file cannot be opened or read.
    #[error("cannot read {what} {path}: {source}; check the path and its permissions")]
    Read {
        /// Which option named it.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The kernel file is neither an ELF nor a bzImage.
    #[error("--kernel {0} is not a Linux kernel: give an ELF vmlinux or a bzImage")]
    NotAKernel(PathBuf),
    /// linux-loader refused the kernel.
    #[error("cannot load --kernel {path}: {source}; is it an x86-64 kernel that fits in --mem?")]
    Kernel {
        /// The kernel.
        path: PathBuf,
        /// Cause.
        #[source]
        source: loader::Error,
    },
    /// An ELF segment outside guest RAM or below 1 MiB, where the boot structures live.
    #[error(
        "--kernel {path} has a segment of {len:#x} bytes at {addr:#x}, outside guest RAM from 0x100000: is it an x86-64 kernel that fits in --mem?"
    )]
    Segment {
        /// The kernel.
        path: PathBuf,
        /// The segment's physical address.
        addr: u64,
        /// Its size in memory.
        len: u64,
    },
    /// An ELF kernel without a loadable segment.
    #[error("--kernel {0} has no loadable segment: give an ELF vmlinux or a bzImage")]
    NoSegment(PathBuf),
    /// An entry point outside guest RAM.
    #[error(
        "--kernel {path}: its entry point {entry:#x} is not in guest RAM: is it an x86-64 kernel that fits in --mem?"
    )]
    EntryOutsideRam {
        /// The kernel.
        path: PathBuf,
        /// The entry point.
        entry: u64,
    },
    /// A bzImage without a 64-bit entry point.
    #[error("--kernel {0} has no 64-bit entry point: give a 64-bit kernel")]
    Not64Bit(PathBuf),
    /// A file does not fit in guest RAM where it must go.
    #[error(
        "{what} {path} ({len} bytes at {addr:#x}) does not fit in guest RAM: give the guest more --mem"
    )]
    DoesNotFit {
        /// Which option named it.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// Where it had to go.
        addr: u64,
    },
}

/// Kernel image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF `vmlinux`.
    Elf,
    /// A bzImage.
    BzImage,
}

/// Recognises a kernel from the first bytes of its file.
pub fn detect(head: &[u8]) -> Option<KernelFormat> {
    if head.starts_with(b"\x7fELF") {
        Some(KernelFormat::Elf)
    } else if head.get(BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4) == Some(b"HdrS") {
        Some(KernelFormat::BzImage)
    } else {
        None
    }
}

/// A kernel in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Its format.
    pub format: KernelFormat,
    /// The 64-bit entry point.
    pub entry: u64,
    /// One past its last byte in guest memory.
    pub end: u64,
    /// The bzImage setup header, for the zero page.
    pub header: Option<setup_header>,
}

fn open(what: &'static str, path: &Path) -> Result<File, Error> {
    File::open(path).map_err(|source| Error::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(mem: &GuestMem, path: &Path) -> Result<LoadedKernel, Error> {
    let mut file = open("--kernel", path)?;
    let mut head = Vec::with_capacity(BZIMAGE_MAGIC_OFFSET + 4);
    (&mut file)
        .take(BZIMAGE_MAGIC_OFFSET as u64 + 4)
        .read_to_end(&mut head)
        .map_err(|source| Error::Read {
            what: "--kernel",
            path: path.to_path_buf(),
            source,
        })?;
    let format = detect(&head).ok_or_else(|| Error::NotAKernel(path.to_path_buf()))?;
    if format == KernelFormat::Elf {
        check_elf_segments(mem, &mut file, path)?;
    }
    let himem = Some(GuestAddress(HIMEM_START));
    let result = match format {
        KernelFormat::Elf => loader::Elf::load(mem, None, &mut file, himem),
        KernelFormat::BzImage => loader::BzImage::load(mem, None, &mut file, himem),
    }
    .map_err(|source| Error::Kernel {
        path: path.to_path_buf(),
        source,
    })?;
    let entry = match format {
        KernelFormat::Elf => result.kernel_load.0,
        KernelFormat::BzImage => {
            let xloadflags = result.setup_header.map(|h| h.xloadflags).unwrap_or(0);
            if xloadflags & XLF_KERNEL_64 == 0 {
                return Err(Error::Not64Bit(path.to_path_buf()));
            }
            result.kernel_load.0 + BZIMAGE_ENTRY_64
        }
    };
    // linux-loader accepts an empty bzImage body at any `code32_start`, or an ELF entry point
    // past its segments: the vCPU would start outside RAM.
    if !mem.address_in_range(GuestAddress(entry)) {
        return Err(Error::EntryOutsideRam {
            path: path.to_path_buf(),
            entry,
        });
    }
    Ok(LoadedKernel {
        format,
        entry,
        end: result.kernel_end,
        header: result.setup_header,
    })
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Checks, before anything is written, that an ELF kernel has a loadable segment and that
/// every one (its whole size in memory, `.bss` included) lies in guest RAM at or above 1 MiB:
/// linux-loader checks only the entry point, and would load segments over the boot
/// structures, accept a kernel whose `.bss` ends past RAM, or one with nothing to load.
/// Headers it cannot read are left to linux-loader.
fn check_elf_segments(mem: &GuestMem, file: &mut File, path: &Path) -> Result<(), Error> {
    let read_err = |source| Error::Read {
        what: "--kernel",
        path: path.to_path_buf(),
        source,
    };
    let mut ehdr = [0u8; ELF_HEADER_SIZE];
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    if file.read_exact(&mut ehdr).is_err() {
        return Ok(());
    }
    let phoff = u64_at(&ehdr, 32);
    let phentsize = u16::from_le_bytes([ehdr[54], ehdr[55]]);
    let phnum = u16::from_le_bytes([ehdr[56], ehdr[57]]);
    if usize::from(phentsize) != ELF_PHDR_SIZE || file.seek(SeekFrom::Start(phoff)).is_err() {
        return Ok(());
    }
    let mut loadable = 0;
    for _ in 0..phnum {
        let mut ph = [0u8; ELF_PHDR_SIZE];
        if file.read_exact(&mut ph).is_err() {
            return Ok(());
        }
        let p_type = u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]);
        let (paddr, filesz, memsz) = (u64_at(&ph, 24), u64_at(&ph, 32), u64_at(&ph, 40));
        // linux-loader loads PT_LOAD segments with file content, to `paddr`.
        if p_type != PT_LOAD || filesz == 0 {
            continue;
        }
        let len = filesz.max(memsz);
        let fits = usize::try_from(len)
            .is_ok_and(|n| paddr >= HIMEM_START && mem.check_range(GuestAddress(paddr), n));
        if !fits {
            return Err(Error::Segment {
                path: path.to_path_buf(),
                addr: paddr,
                len,
            });
        }
        loadable += 1;
    }
    // Without one, nothing is loaded and the kernel "ends" at 0: the initrd would go below
    // 1 MiB, over the boot structures.
    if loadable == 0 {
        return Err(Error::NoSegment(path.to_path_buf()));
    }
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    Ok(())
}

/// A file to be copied whole into guest memory.
#[derive(Debug)]
pub struct SourceFile {
    what: &'static str,
    path: PathBuf,
    file: File,
    len: u64,
}

impl SourceFile {
    /// Opens the file at `path`; `what` names the option that gave it, for messages.
    pub fn open(what: &'static str, path: &Path) -> Result<Self, Error> {
        let file = open(what, path)?;
        let len = file.metadata().map_err(|source| Error::Read {
            what,
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            what,
            path: path.to_path_buf(),
            file,
            len: len.len(),
        })
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies it into `mem` at `addr`.
    pub fn load(mut self, mem: &GuestMem, addr: u64) -> Result<(), Error> {
        let does_not_fit = |path: PathBuf| Error::DoesNotFit {
            what: self.what,
            path,
            len: self.len,
            addr,
        };
        let count = usize::try_from(self.len).map_err(|_| does_not_fit(self.path.clone()))?;
        mem.read_exact_volatile_from(GuestAddress(addr), &mut self.file, count)
            .map_err(|e| match e {
                vm_memory::GuestMemoryError::IOError(source) => Error::Read {
                    what: self.what,
                    path: self.path.clone(),
                    source,
                },
                _ => does_not_fit(self.path.clone()),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use std::io::Write;

    #[test]
    fn recognises_elf_and_bzimage() {
        assert_eq!(detect(b"\x7fELF\x02\x01"), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect(b"#!/bin/sh\n"), None);
        assert_eq!(detect(&[]), None);
    }

    #[test]
    fn a_text_file_is_not_a_kernel() {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        f.as_file().write_all(b"hello, not a kernel\n").unwrap();
        let ram = GuestRam::new(4 << 20, false).unwrap();
        let err = load_kernel(ram.memory(), f.as_path()).unwrap_err();
        assert!(matches!(err, Error::NotAKernel(_)), "{err}");
    }

    #[test]
    fn a_truncated_elf_is_refused_with_its_path() {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        f.as_file().write_all(b"\x7fELF\x02\x01\x01").unwrap();
        let ram = GuestRam::new(4 << 20, false).unwrap();
        let err = load_kernel(ram.memory(), f.as_path()).unwrap_err();
        assert!(matches!(err, Error::Kernel { .. }), "{err}");
        assert!(err.to_string().contains(&f.as_path().display().to_string()));
    }

    /// An ELF with one loadable segment of `filesz` bytes (`memsz` in memory) at `paddr`,
    /// entry point at 1 MiB.
    fn elf_with_segment(paddr: u64, filesz: u64, memsz: u64) -> Vec<u8> {
        let mut out = vec![0u8; ELF_HEADER_SIZE + ELF_PHDR_SIZE];
        out[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
        out[16..18].copy_from_slice(&2u16.to_le_bytes());
        out[18..20].copy_from_slice(&0x3eu16.to_le_bytes());
        out[24..32].copy_from_slice(&HIMEM_START.to_le_bytes());
        out[32..40].copy_from_slice(&(ELF_HEADER_SIZE as u64).to_le_bytes());
        out[54..56].copy_from_slice(&(ELF_PHDR_SIZE as u16).to_le_bytes());
        out[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = &mut out[ELF_HEADER_SIZE..];
        ph[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        ph[8..16].copy_from_slice(&((ELF_HEADER_SIZE + ELF_PHDR_SIZE) as u64).to_le_bytes());
        ph[24..32].copy_from_slice(&paddr.to_le_bytes());
        ph[32..40].copy_from_slice(&filesz.to_le_bytes());
        ph[40..48].copy_from_slice(&memsz.to_le_bytes());
        out.resize(out.len() + filesz as usize, 0x90);
        out
    }

    fn load_elf(bytes: &[u8], mem: u64) -> (Result<LoadedKernel, Error>, GuestRam) {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        f.as_file().write_all(bytes).unwrap();
        let ram = GuestRam::new(mem, false).unwrap();
        (load_kernel(ram.memory(), f.as_path()), ram)
    }

    #[test]
    fn elf_segments_must_fit_in_ram_bss_included() {
        // Found by the loader fuzz target: a .bss past the end of RAM was accepted.
        let (r, _) = load_elf(&elf_with_segment(HIMEM_START, 16, 4 << 20), 4 << 20);
        let err = r.unwrap_err();
        assert!(matches!(err, Error::Segment { .. }), "{err}");
        assert!(err.to_string().contains("--mem"), "{err}");
        // A .bss ending at 2^64 - 1 no longer reaches the initrd placement (it overflowed).
        let (r, _) = load_elf(
            &elf_with_segment(HIMEM_START, 16, u64::MAX - HIMEM_START),
            4 << 20,
        );
        assert!(matches!(r, Err(Error::Segment { .. })));
        let (r, _) = load_elf(&elf_with_segment(HIMEM_START, 16, 1 << 20), 4 << 20);
        assert_eq!(r.unwrap().end, HIMEM_START + (1 << 20));
    }

    #[test]
    fn elf_segments_below_1mib_are_refused_before_loading() {
        // Found by the loader fuzz target: segments were loaded over the zero page and page
        // tables (linux-loader checks only the entry point).
        let (r, ram) = load_elf(&elf_with_segment(0x7000, 64, 64), 4 << 20);
        let err = r.unwrap_err();
        assert!(matches!(err, Error::Segment { addr: 0x7000, .. }), "{err}");
        let mut low = [0u8; 64];
        ram.memory()
            .read_slice(&mut low, GuestAddress(0x7000))
            .unwrap();
        assert_eq!(low, [0u8; 64], "nothing was written");
    }

    #[test]
    fn an_elf_without_loadable_segments_is_refused() {
        // Found by the loader fuzz target: with nothing loaded the kernel "ended" at 0 and the
        // initrd went below 1 MiB, where the ACPI tables then overwrote it.
        let mut elf = elf_with_segment(HIMEM_START, 0, 0);
        elf[56..58].copy_from_slice(&0u16.to_le_bytes());
        let (r, _) = load_elf(&elf, 4 << 20);
        assert!(matches!(r, Err(Error::NoSegment(_))), "{r:?}");
        let (r, _) = load_elf(&elf_with_segment(HIMEM_START, 0, 4096), 4 << 20);
        assert!(matches!(r, Err(Error::NoSegment(_))), "{r:?}");
    }

    #[test]
    fn the_entry_point_must_be_in_ram() {
        // Found by the loader fuzz target: a bzImage with an empty body and code32_start past
        // the end of RAM was accepted (linux-loader reads its 0 bytes "successfully").
        let h = setup_header {
            setup_sects: 1,
            header: 0x5372_6448,
            version: 0x20f,
            loadflags: 1,
            code32_start: 0x8d3f_08cc,
            xloadflags: XLF_KERNEL_64,
            ..Default::default()
        };
        let mut bz = vec![0u8; 1024];
        let hb = vm_memory::ByteValued::as_slice(&h);
        bz[0x1f1..0x1f1 + hb.len()].copy_from_slice(hb);
        let (r, _) = load_elf(&bz, 4 << 20);
        let err = r.unwrap_err();
        assert!(matches!(err, Error::EntryOutsideRam { .. }), "{err}");
        // An ELF whose entry point lies past its segments and RAM.
        let mut elf = elf_with_segment(HIMEM_START, 16, 16);
        elf[24..32].copy_from_slice(&(8u64 << 20).to_le_bytes());
        let (r, _) = load_elf(&elf, 4 << 20);
        assert!(matches!(r, Err(Error::EntryOutsideRam { entry, .. }) if entry == 8 << 20));
    }

    #[test]
    fn files_load_where_asked_and_must_fit() {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        f.as_file().write_all(&[0x90, 0xf4]).unwrap();
        let ram = GuestRam::new(2 << 20, false).unwrap();
        let src = SourceFile::open("--flat", f.as_path()).unwrap();
        assert_eq!(src.len(), 2);
        src.load(ram.memory(), 0x10_0000).unwrap();
        let b: u8 = ram.memory().read_obj(GuestAddress(0x10_0001)).unwrap();
        assert_eq!(b, 0xf4);
        let src = SourceFile::open("--flat", f.as_path()).unwrap();
        let err = src.load(ram.memory(), (2 << 20) - 1).unwrap_err();
        assert!(matches!(err, Error::DoesNotFit { .. }), "{err}");
    }
}
