//! The image and kernel loaders: arbitrary bytes (or bzImage and ELF files built from
//! arbitrary header fields, then patched) as a Linux kernel with an initrd and a command line,
//! as a flat binary, and as a memory image, into a small guest RAM, the way `vmm` prepares a
//! guest (memory image, then `setup::prepare`). Never a panic; every error one clear line;
//! what loads stays inside RAM and off the boot structures below 1 MiB, and the kernel,
//! initrd, command line and boot data do not overlap. The checks are shared with
//! `vmm/tests/proptest_loaders.rs` (`vmm/tests/properties/loader.rs`); this target only makes
//! the inputs.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use linux_loader::loader::bootparam::setup_header;
use vm_memory::ByteValued;
use vmm::arch::x86_64::layout::{HIMEM_START, MIN_MEM, PAGE_SIZE};
use vmm_fuzz::{mem_file, message};

#[path = "../../vmm/tests/properties/loader.rs"]
mod property;

use property::{Linux, Segment, check_flat, check_image, check_linux};

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

/// The address `a` stands for: pages above 1 MiB (with a small offset), or as it is.
fn addr(a: &Addr) -> u64 {
    match *a {
        Addr::Himem(pages, off) => {
            HIMEM_START + u64::from(pages % 2048) * PAGE_SIZE + u64::from(off % 16)
        }
        Addr::Low(a) => u64::from(a),
        Addr::Raw(a) => a,
    }
}

/// Writes each `(offset, byte)` of `patches` that falls inside `bytes`.
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
) -> (Vec<u8>, Vec<Segment>) {
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

/// A bzImage with the given setup-header fields (the setup sectors zeroed), then `payload` as
/// its protected-mode kernel, then patched.
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

/// The kernel's bytes for `kernel`, with the ELF segments it was built with.
fn kernel_bytes(kernel: &Kernel) -> (Vec<u8>, Vec<Segment>) {
    match kernel {
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
    }
}

fuzz_target!(|input: Input| {
    let mem = MIN_MEM + u64::from(input.extra_pages % 1536) * PAGE_SIZE;
    // The memory image's file, made only for the cases that load one.
    let mem_image = || input.mem_image.as_deref().map(|b| mem_file("image", b));
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
            let (bytes, segments) = kernel_bytes(&kernel);
            let initrd_path = initrd.as_deref().map(|b| mem_file("initrd", b));
            check_linux(&Linux {
                mem,
                mem_image: mem_image().as_deref(),
                kernel: &mem_file("kernel", &bytes),
                kernel_bytes: &bytes,
                segments: &segments,
                initrd: initrd_path.as_deref().zip(initrd.as_deref()),
                cmdline: &cmdline,
                vcpus: u32::from(vcpus % 8) + 1,
            });
        }
        Case::Flat { entry, image } => {
            let path = mem_file("flat", &image);
            check_flat(mem, mem_image().as_deref(), &path, addr(&entry), &image);
        }
        Case::Image { image, at_page } => {
            let mut bytes = vec![0u8; usize::from(at_page % 2048) * PAGE_SIZE as usize];
            bytes.extend_from_slice(&image);
            check_image(mem, &mem_file("image", &bytes), &bytes);
        }
    }
});
