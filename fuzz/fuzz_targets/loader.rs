//! The image and kernel loaders: arbitrary bytes (or bzImage and ELF files built from
//! arbitrary header fields, then patched) as a Linux kernel with an initrd and a command line,
//! as a flat binary, and as a memory image, into a small guest RAM, the way `vmm` prepares a
//! guest (memory image, then `setup::prepare`). Never a panic; every error one clear line;
//! what loads stays inside RAM and off the boot structures below 1 MiB, and the kernel,
//! initrd, command line and boot data do not overlap.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use linux_loader::loader::bootparam::{boot_params, setup_header};
use vm_memory::{ByteValued, Bytes, GuestAddress};
use vmm::arch::x86_64::gdt;
use vmm::arch::x86_64::layout::{
    CMDLINE_ADDR, GDT_ADDR, HIMEM_START, MIN_MEM, PAGE_SIZE, ZERO_PAGE_ADDR,
};
use vmm::config::{Boot, GuestConfig};
use vmm::loader::{self, KernelFormat};
use vmm::memory::GuestRam;
use vmm::setup::{self, Entry};
use vmm_fuzz::{check_message, mem_file};

/// An ELF program header, from arbitrary fields.
#[derive(Arbitrary, Debug, Clone)]
struct Phdr {
    /// 0: PT_LOAD, 1: PT_NOTE, other: raw.
    kind: u8,
    raw_type: u32,
    /// Offset from 1 MiB in pages, or a raw address.
    paddr: Addr,
    offset: u32,
    filesz: u32,
    /// Added to `filesz`, or a raw size.
    memsz: Size,
}

#[derive(Arbitrary, Debug, Clone)]
enum Addr {
    Himem(u16, u16),
    Low(u32),
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone)]
enum Size {
    Extra(u32),
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum Kernel {
    Raw(Vec<u8>),
    Elf {
        entry: Addr,
        phdrs: Vec<Phdr>,
        payload: Vec<u8>,
        patches: Vec<(u16, u8)>,
    },
    BzImage {
        setup_sects: u8,
        version: u16,
        loadflags: u8,
        code32_start: Addr,
        xloadflags: u16,
        initrd_addr_max: u32,
        cmdline_size: u32,
        payload: Vec<u8>,
        patches: Vec<(u16, u8)>,
    },
}

#[derive(Arbitrary, Debug)]
enum Case {
    Linux {
        kernel: Kernel,
        initrd: Option<Vec<u8>>,
        /// Extra bytes of initrd, all 0x11 (to reach sizes near RAM's).
        initrd_pad: u32,
        cmdline: String,
        long_cmdline: u16,
        vcpus: u8,
    },
    Flat {
        entry: Addr,
        image: Vec<u8>,
    },
    Image {
        image: Vec<u8>,
        /// Where in the image to put `image` (the rest is zeros), in pages.
        at_page: u16,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// RAM beyond the 2 MiB minimum, in pages (up to 6 MiB more).
    extra_pages: u16,
    /// A memory image loaded first, as `--mem-image` is.
    mem_image: Option<Vec<u8>>,
    case: Case,
}

fn addr(a: &Addr) -> u64 {
    match *a {
        Addr::Himem(pages, off) => {
            HIMEM_START + u64::from(pages % 2048) * PAGE_SIZE + u64::from(off % 16)
        }
        Addr::Low(a) => u64::from(a),
        Addr::Raw(a) => a,
    }
}

fn patch(bytes: &mut [u8], patches: &[(u16, u8)]) {
    for &(at, b) in patches {
        if let Some(x) = bytes.get_mut(usize::from(at)) {
            *x = b;
        }
    }
}

/// A 64-bit little-endian x86-64 ELF with the given program headers.
fn elf(
    entry: u64,
    phdrs: &[Phdr],
    payload: &[u8],
    patches: &[(u16, u8)],
) -> (Vec<u8>, Vec<(u64, u64, u64)>) {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let phdrs = &phdrs[..phdrs.len().min(8)];
    let data_at = EHDR + PHDR * phdrs.len();
    let mut out = vec![0u8; EHDR];
    out[..4].copy_from_slice(b"\x7fELF");
    out[4] = 2; // 64-bit
    out[5] = 1; // little endian
    out[6] = 1; // version
    out[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    out[20..24].copy_from_slice(&1u32.to_le_bytes());
    out[24..32].copy_from_slice(&entry.to_le_bytes());
    out[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    out[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes());
    out[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes());
    out[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
    out[58..60].copy_from_slice(&64u16.to_le_bytes());
    let mut loads = Vec::new();
    for p in phdrs {
        let p_type: u32 = match p.kind % 4 {
            0 | 1 => 1,
            2 => 4,
            _ => p.raw_type,
        };
        let filesz = u64::from(p.filesz) % (payload.len() as u64 + 1);
        let offset = if p.offset & 1 == 0 {
            data_at as u64 + u64::from(p.offset >> 1) % (payload.len() as u64 + 1)
        } else {
            u64::from(p.offset)
        };
        let memsz = match p.memsz {
            Size::Extra(e) => filesz + u64::from(e % (1 << 22)),
            Size::Raw(s) => s,
        };
        let paddr = addr(&p.paddr);
        let mut h = [0u8; PHDR];
        h[0..4].copy_from_slice(&p_type.to_le_bytes());
        h[4..8].copy_from_slice(&7u32.to_le_bytes());
        h[8..16].copy_from_slice(&offset.to_le_bytes());
        h[16..24].copy_from_slice(&paddr.to_le_bytes());
        h[24..32].copy_from_slice(&paddr.to_le_bytes());
        h[32..40].copy_from_slice(&filesz.to_le_bytes());
        h[40..48].copy_from_slice(&memsz.to_le_bytes());
        h[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
        out.extend_from_slice(&h);
        if p_type == 1 && filesz > 0 {
            loads.push((paddr, filesz, memsz));
        }
    }
    out.extend_from_slice(payload);
    patch(&mut out, patches);
    // Patches may have changed the headers: report segments only for an unpatched image.
    if !patches.is_empty() {
        loads.clear();
    }
    (out, loads)
}

#[allow(clippy::too_many_arguments)]
fn bzimage(
    setup_sects: u8,
    version: u16,
    loadflags: u8,
    code32_start: u64,
    xloadflags: u16,
    initrd_addr_max: u32,
    cmdline_size: u32,
    payload: &[u8],
    patches: &[(u16, u8)],
) -> Vec<u8> {
    let sects = if setup_sects == 0 {
        4
    } else {
        usize::from(setup_sects % 16)
    };
    let mut out = vec![0u8; (sects + 1) * 512];
    let h = setup_header {
        setup_sects,
        boot_flag: 0xaa55,
        header: 0x5372_6448,
        version,
        loadflags,
        code32_start: code32_start as u32,
        xloadflags,
        initrd_addr_max,
        cmdline_size,
        ..Default::default()
    };
    let hb = h.as_slice();
    let end = (0x1f1 + hb.len()).min(out.len());
    out[0x1f1..end].copy_from_slice(&hb[..end - 0x1f1]);
    out.extend_from_slice(payload);
    patch(&mut out, patches);
    out
}

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

fn linux(
    mem: u64,
    mem_image: Option<&[u8]>,
    kernel: &Kernel,
    initrd: Option<Vec<u8>>,
    cmdline: String,
    vcpus: u8,
) {
    let (bytes, loads) = match kernel {
        Kernel::Raw(b) => (b.clone(), Vec::new()),
        Kernel::Elf {
            entry,
            phdrs,
            payload,
            patches,
        } => elf(addr(entry), phdrs, payload, patches),
        Kernel::BzImage {
            setup_sects,
            version,
            loadflags,
            code32_start,
            xloadflags,
            initrd_addr_max,
            cmdline_size,
            payload,
            patches,
        } => (
            bzimage(
                *setup_sects,
                *version,
                *loadflags,
                addr(code32_start),
                *xloadflags,
                *initrd_addr_max,
                *cmdline_size,
                payload,
                patches,
            ),
            Vec::new(),
        ),
    };
    let kernel_path = mem_file("kernel", &bytes);

    // The kernel alone, into fresh RAM: inside RAM, above the boot structures.
    let ram = GuestRam::new(mem, false).unwrap_or_else(|e| panic!("RAM: {e}"));
    let loaded = match loader::load_kernel(ram.memory(), &kernel_path) {
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
            for &(paddr, filesz, memsz) in &loads {
                assert!(
                    paddr >= HIMEM_START && paddr.saturating_add(memsz.max(filesz)) <= mem,
                    "segment at {paddr:#x} ({filesz:#x}/{memsz:#x} bytes) accepted in {mem:#x} of RAM"
                );
            }
            if k.format == KernelFormat::BzImage {
                assert_eq!(
                    k.entry,
                    u64::from(k.header.map_or(0, |h| h.code32_start)) + 0x200
                );
            }
            Some(k)
        }
        Err(e) => {
            check_message("load_kernel", &e.to_string());
            None
        }
    };

    // The whole guest, as `vmm` prepares it.
    let initrd_path = initrd.as_ref().map(|b| mem_file("initrd", b));
    let config = GuestConfig {
        name: "guest0".into(),
        mem,
        vcpus: u32::from(vcpus % 8) + 1,
        boot: Boot::Linux {
            kernel: kernel_path,
            initrd: initrd_path,
            cmdline: cmdline.clone(),
        },
        mem_image: None,
        track_dirty: false,
    };
    let Some(ram) = guest_ram(&config, mem_image) else {
        return;
    };
    match setup::prepare(&ram, &config) {
        Ok(Entry::Linux { rip }) => {
            let k =
                loaded.unwrap_or_else(|| panic!("prepare accepted a kernel load_kernel refused"));
            assert_eq!(rip, k.entry);
            let params: boot_params = ram
                .memory()
                .read_obj(GuestAddress(ZERO_PAGE_ADDR))
                .unwrap_or_else(|e| panic!("zero page: {e}"));
            let cmd = read(&ram, CMDLINE_ADDR, cmdline.len() + 1);
            assert_eq!(&cmd[..cmdline.len()], cmdline.as_bytes(), "command line");
            assert_eq!(cmd[cmdline.len()], 0);
            let (image, size) = (params.hdr.ramdisk_image, params.hdr.ramdisk_size);
            match &initrd {
                Some(b) => {
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
                None => assert_eq!((image, size), (0, 0)),
            }
            if k.format == KernelFormat::BzImage {
                // The protected-mode kernel is intact after the initrd and boot data.
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
        Err(e) => check_message("prepare", &e.to_string()),
    }
}

/// The guest's RAM with its memory image loaded, as `vmm` makes it; `None` (after checking the
/// error line) when the configuration or the image is refused.
fn guest_ram(config: &GuestConfig, mem_image: Option<&[u8]>) -> Option<GuestRam> {
    if let Err(e) = config.validate() {
        check_message("validate", &e.to_string());
        return None;
    }
    let ram = GuestRam::new(config.mem, false).unwrap_or_else(|e| panic!("RAM: {e}"));
    if let Some(image) = mem_image
        && let Err(e) = ram.load_image(&mem_file("image", image))
    {
        check_message("load_image", &e.to_string());
        return None;
    }
    Some(ram)
}

fn flat(mem: u64, mem_image: Option<&[u8]>, entry: u64, image: &[u8]) {
    let path = mem_file("flat", image);
    let config = GuestConfig {
        name: "guest0".into(),
        mem,
        vcpus: 1,
        boot: Boot::Flat { image: path, entry },
        mem_image: None,
        track_dirty: false,
    };
    let Some(ram) = guest_ram(&config, mem_image) else {
        return;
    };
    match setup::prepare(&ram, &config) {
        Ok(Entry::Flat { rip, .. }) => {
            assert_eq!(rip, entry);
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
            check_message("prepare", &e.to_string());
            assert!(
                entry >= mem || entry.saturating_add(image.len() as u64) > mem,
                "a flat binary that fits was refused: {e}"
            );
        }
    }
}

fn image(mem: u64, image: &[u8], at_page: u16) {
    let at = usize::from(at_page % 2048) * PAGE_SIZE as usize;
    let mut bytes = vec![0u8; at];
    bytes.extend_from_slice(image);
    let ram = GuestRam::new(mem, false).unwrap_or_else(|e| panic!("RAM: {e}"));
    match ram.load_image(&mem_file("image", &bytes)) {
        Ok(()) => {
            assert!(
                bytes.len() as u64 <= mem,
                "an image larger than RAM was accepted"
            );
            same("image bytes", &read(&ram, 0, bytes.len()), &bytes);
            assert!(
                all_zero(&ram, bytes.len() as u64, mem),
                "bytes past the image"
            );
        }
        Err(e) => {
            check_message("load_image", &e.to_string());
            assert!(
                bytes.len() as u64 > mem,
                "an image that fits was refused: {e}"
            );
        }
    }
}

fuzz_target!(|input: Input| {
    let mem = MIN_MEM + u64::from(input.extra_pages % 1536) * PAGE_SIZE;
    let mem_image = input.mem_image.as_deref();
    match input.case {
        Case::Linux {
            kernel,
            initrd,
            initrd_pad,
            cmdline,
            long_cmdline,
            vcpus,
        } => {
            let initrd = initrd.map(|mut b| {
                b.resize(b.len() + (initrd_pad % (8 << 20)) as usize, 0x11);
                b
            });
            let cmdline = if long_cmdline > 60000 {
                format!("{cmdline}{}", "x".repeat(usize::from(long_cmdline)))
            } else {
                cmdline
            };
            linux(mem, mem_image, &kernel, initrd, cmdline, vcpus);
        }
        Case::Flat {
            entry,
            image: bytes,
        } => flat(mem, mem_image, addr(&entry), &bytes),
        Case::Image {
            image: bytes,
            at_page,
        } => image(mem, &bytes, at_page),
    }
});
