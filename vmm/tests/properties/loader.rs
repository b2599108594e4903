//! The loaders' properties, shared by `vmm/tests/proptest_loaders.rs` and the `loader` fuzz
//! target (both include this file, and `properties/message.rs` as `crate::message`): a Linux
//! kernel with an initrd and a command line, a flat binary and a memory image go into a small
//! guest RAM the way `vmm` prepares a guest (configuration checked, memory image, then
//! `setup::prepare`). Never a panic; every error one clear line; what loads stays inside RAM
//! and off the boot structures below 1 MiB, and the kernel, initrd, command line and boot data
//! do not overlap. The targets bring the files (by path, with the bytes they hold); each check
//! panics when the property does not hold.

use std::path::Path;

use linux_loader::loader::bootparam::boot_params;
use vm_memory::{Bytes, GuestAddress};
use vmm::arch::x86_64::gdt;
use vmm::arch::x86_64::layout::{CMDLINE_ADDR, GDT_ADDR, HIMEM_START, PAGE_SIZE, ZERO_PAGE_ADDR};
use vmm::config::{Boot, GuestConfig};
use vmm::loader::{self, KernelFormat, LoadedKernel};
use vmm::memory::GuestRam;
use vmm::setup::{self, Entry};

use crate::message::one_line;

/// A loadable ELF segment the kernel was built with: `(paddr, filesz, memsz)`.
pub type Segment = (u64, u64, u64);

/// A Linux guest to prepare: its files and settings.
pub struct Linux<'a> {
    /// Guest RAM in bytes.
    pub mem: u64,
    /// The memory image loaded first, as `--mem-image` is.
    pub mem_image: Option<&'a Path>,
    /// The kernel's file.
    pub kernel: &'a Path,
    /// What the kernel's file holds.
    pub kernel_bytes: &'a [u8],
    /// The ELF segments the kernel was built with (empty when not known: raw bytes, a
    /// bzImage, or an ELF patched afterwards).
    pub segments: &'a [Segment],
    /// The initrd's file and what it holds.
    pub initrd: Option<(&'a Path, &'a [u8])>,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// vCPUs of the guest.
    pub vcpus: u32,
}

/// Reads `len` bytes of guest RAM at `addr`.
fn read(ram: &GuestRam, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    ram.memory()
        .read_slice(&mut buf, GuestAddress(addr))
        .unwrap_or_else(|e| panic!("reading {len} bytes at {addr:#x}: {e}"));
    buf
}

/// Asserts `got == want` naming the first differing offset (not both buffers: they can be
/// megabytes).
fn same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: byte {i:#x} of {:#x} is {:#04x}, not {:#04x}",
            want.len(),
            got[i],
            want[i]
        );
    }
}

/// Whether guest RAM from `from` up to `to` holds only zeros.
fn all_zero(ram: &GuestRam, from: u64, to: u64) -> bool {
    let mut a = from;
    while a < to {
        let n = (to - a).min(1 << 16);
        if read(ram, a, n as usize).iter().any(|&b| b != 0) {
            return false;
        }
        a += n;
    }
    true
}

/// The guest's RAM with its memory image loaded, as `vmm` makes it; `None` (after checking the
/// error line) when the configuration or the image is refused.
fn guest_ram(config: &GuestConfig, mem_image: Option<&Path>) -> Option<GuestRam> {
    if let Err(e) = config.validate() {
        one_line("validate", &e.to_string());
        return None;
    }
    let ram = GuestRam::new(config.mem, false).unwrap_or_else(|e| panic!("RAM: {e}"));
    if let Some(image) = mem_image
        && let Err(e) = ram.load_image(image)
    {
        one_line("load_image", &e.to_string());
        return None;
    }
    Some(ram)
}

/// Loads the kernel alone into fresh RAM of `mem` bytes: accepted, it lies inside RAM with
/// every segment (`.bss` included) above 1 MiB, its entry is in RAM above 1 MiB (a bzImage's
/// 0x200 past `code32_start`), and nothing below 1 MiB was written; refused, the error is one
/// line. Returns the loaded kernel.
fn check_kernel(mem: u64, path: &Path, segments: &[Segment]) -> Option<LoadedKernel> {
    let ram = GuestRam::new(mem, false).unwrap_or_else(|e| panic!("RAM: {e}"));
    match loader::load_kernel(ram.memory(), path) {
        Ok(k) => {
            assert!(
                k.entry >= HIMEM_START && k.entry < mem,
                "entry {:#x} below 1 MiB or outside RAM",
                k.entry
            );
            assert!(
                k.end <= mem,
                "kernel accepted though it ends at {:#x}, past RAM ({mem:#x})",
                k.end
            );
            assert!(
                all_zero(&ram, 0, HIMEM_START),
                "the kernel loader wrote below 1 MiB ({:?})",
                k.format
            );
            for &(paddr, filesz, memsz) in segments {
                assert!(
                    paddr >= HIMEM_START && paddr.saturating_add(memsz.max(filesz)) <= mem,
                    "segment at {paddr:#x} ({filesz:#x}/{memsz:#x} bytes) accepted in {mem:#x} of RAM"
                );
            }
            if k.format == KernelFormat::BzImage {
                assert_eq!(
                    k.entry,
                    u64::from(k.header.map_or(0, |h| h.code32_start)) + 0x200,
                    "bzImage entry"
                );
            }
            Some(k)
        }
        Err(e) => {
            one_line("load_kernel", &e.to_string());
            None
        }
    }
}

/// Loads the kernel alone ([`check_kernel`]), then prepares the whole guest as `vmm` does.
/// Accepted, the guest starts at the kernel's entry (which `load_kernel` accepted too), the
/// command line is intact and NUL-terminated, the initrd is page-aligned, after the kernel's
/// end, inside RAM and intact (without one, `ramdisk_image` and `ramdisk_size` are 0), and a
/// bzImage's protected-mode kernel is intact after the initrd and boot data; refused, the
/// error is one line.
pub fn check_linux(case: &Linux<'_>) {
    let mem = case.mem;
    let loaded = check_kernel(mem, case.kernel, case.segments);
    let config = GuestConfig {
        name: "guest0".into(),
        mem,
        vcpus: case.vcpus,
        boot: Boot::Linux {
            kernel: case.kernel.to_path_buf(),
            initrd: case.initrd.map(|(p, _)| p.to_path_buf()),
            cmdline: case.cmdline.to_string(),
        },
        mem_image: None,
        track_dirty: false,
    };
    let Some(ram) = guest_ram(&config, case.mem_image) else {
        return;
    };
    match setup::prepare(&ram, &config) {
        Ok(Entry::Linux { rip }) => {
            let k =
                loaded.unwrap_or_else(|| panic!("prepare accepted a kernel load_kernel refused"));
            assert_eq!(rip, k.entry, "entry");
            let params: boot_params = ram
                .memory()
                .read_obj(GuestAddress(ZERO_PAGE_ADDR))
                .unwrap_or_else(|e| panic!("zero page: {e}"));
            let cmdline = case.cmdline.as_bytes();
            let cmd = read(&ram, CMDLINE_ADDR, cmdline.len() + 1);
            assert_eq!(&cmd[..cmdline.len()], cmdline, "command line");
            assert_eq!(cmd[cmdline.len()], 0, "command line not NUL-terminated");
            let (image, size) = (params.hdr.ramdisk_image, params.hdr.ramdisk_size);
            match case.initrd {
                Some((_, b)) => {
                    let (image, size) = (u64::from(image), u64::from(size));
                    assert_eq!(size, b.len() as u64, "ramdisk_size");
                    assert_eq!(
                        image % PAGE_SIZE,
                        0,
                        "initrd at {image:#x} not page aligned"
                    );
                    assert!(
                        image >= k.end,
                        "initrd at {image:#x} overlaps the kernel ending at {:#x}",
                        k.end
                    );
                    assert!(image + size <= mem, "initrd past RAM");
                    same("initrd bytes", &read(&ram, image, b.len()), b);
                }
                None => assert_eq!((image, size), (0, 0), "ramdisk without an initrd"),
            }
            if k.format == KernelFormat::BzImage {
                // The protected-mode kernel is intact after the initrd and boot data.
                let bytes = case.kernel_bytes;
                let sects = match bytes[0x1f1] {
                    0 => 4,
                    s => usize::from(s),
                };
                let body = &bytes[(sects + 1) * 512..];
                same(
                    "kernel body",
                    &read(&ram, k.end - body.len() as u64, body.len()),
                    body,
                );
            }
        }
        Ok(other) => panic!("a Linux guest started as {other:?}"),
        Err(e) => one_line("prepare", &e.to_string()),
    }
}

/// Prepares a flat guest of `mem` bytes (after the memory image, if any) with the binary
/// `image` at `path` loaded at `entry`. Accepted exactly when the binary fits (entry in RAM):
/// then the guest starts at `entry`, the binary is intact there and so is the boot GDT;
/// every error is one line.
pub fn check_flat(mem: u64, mem_image: Option<&Path>, path: &Path, entry: u64, image: &[u8]) {
    let config = GuestConfig {
        name: "guest0".into(),
        mem,
        vcpus: 1,
        boot: Boot::Flat {
            image: path.to_path_buf(),
            entry,
        },
        mem_image: None,
        track_dirty: false,
    };
    let Some(ram) = guest_ram(&config, mem_image) else {
        return;
    };
    match setup::prepare(&ram, &config) {
        Ok(Entry::Flat { rip, .. }) => {
            assert_eq!(rip, entry, "entry");
            assert!(
                entry < mem && entry + image.len() as u64 <= mem,
                "flat binary past RAM accepted"
            );
            same("flat binary bytes", &read(&ram, entry, image.len()), image);
            let table: Vec<u8> = gdt::boot_gdt()
                .iter()
                .flat_map(|d| d.to_le_bytes())
                .collect();
            assert_eq!(read(&ram, GDT_ADDR, table.len()), table, "GDT");
        }
        Ok(other) => panic!("a flat guest started as {other:?}"),
        Err(e) => {
            one_line("prepare", &e.to_string());
            assert!(
                entry >= mem || entry.saturating_add(image.len() as u64) > mem,
                "a flat binary that fits was refused: {e}"
            );
        }
    }
}

/// Loads the memory image `bytes` at `path` into fresh RAM of `mem` bytes: accepted exactly
/// when it fits, and then it lies intact at 0 with zeros after it; the error is one line.
pub fn check_image(mem: u64, path: &Path, bytes: &[u8]) {
    let ram = GuestRam::new(mem, false).unwrap_or_else(|e| panic!("RAM: {e}"));
    match ram.load_image(path) {
        Ok(()) => {
            assert!(
                bytes.len() as u64 <= mem,
                "an image larger than RAM was accepted"
            );
            same("image bytes", &read(&ram, 0, bytes.len()), bytes);
            assert!(
                all_zero(&ram, bytes.len() as u64, mem),
                "bytes past the image"
            );
        }
        Err(e) => {
            one_line("load_image", &e.to_string());
            assert!(
                bytes.len() as u64 > mem,
                "an image that fits was refused: {e}"
            );
        }
    }
}
