//! The image and kernel loaders as property tests (the `loader` fuzz target's properties; see
//! docs/fuzzing.md): ELF kernels with arbitrary program headers, bzImages with arbitrary setup
//! headers, raw bytes, initrds, flat binaries and memory images, into a small guest RAM.
//! Never a panic; every error one line; what loads stays inside RAM and above the boot
//! structures, and the kernel, initrd, command line and boot data do not overlap. The checks
//! are shared with the fuzz target (`properties/loader.rs`); this file only makes the inputs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::io::Write;
use std::path::PathBuf;

use linux_loader::loader::bootparam::setup_header;
use proptest::prelude::*;
use vm_memory::ByteValued;
use vmm::arch::x86_64::layout::{HIMEM_START, MIN_MEM, PAGE_SIZE};
use vmm_sys_util::tempfile::TempFile;

#[path = "properties/message.rs"]
mod message;
#[path = "properties/loader.rs"]
mod property;

use property::{Linux, Segment, check_flat, check_image, check_linux};

/// A temporary file holding `bytes`, and its path (the file goes when it is dropped).
fn file(bytes: &[u8]) -> (TempFile, PathBuf) {
    let f = TempFile::new().unwrap();
    f.as_file().write_all(bytes).unwrap();
    let p = f.as_path().to_path_buf();
    (f, p)
}

/// A program header: (type, paddr, filesz, memsz, offset into the payload).
type Phdr = (u32, u64, u64, u64, u64);

/// Program headers: mostly loadable, mostly above 1 MiB, sometimes anywhere.
fn phdr() -> impl Strategy<Value = Phdr> {
    let paddr = prop_oneof![
        4 => (0u64..2048, 0u64..16).prop_map(|(p, o)| HIMEM_START + p * PAGE_SIZE + o),
        1 => 0u64..HIMEM_START,
        1 => any::<u64>(),
    ];
    let memsz_extra = prop_oneof![4 => 0u64..(4 << 20), 1 => any::<u64>()];
    (
        prop_oneof![4 => Just(1u32), 1 => Just(4u32), 1 => any::<u32>()],
        paddr,
        0u64..4096,
        memsz_extra,
        0u64..4096,
    )
        .prop_map(|(t, paddr, filesz, extra, off)| {
            (t, paddr, filesz, filesz.saturating_add(extra), off)
        })
}

/// An x86-64 ELF: the image and its loadable segments (paddr, filesz, memsz).
fn elf(entry: u64, phdrs: &[Phdr], payload: &[u8]) -> (Vec<u8>, Vec<Segment>) {
    let data_at = 64 + 56 * phdrs.len() as u64;
    let mut out = vec![0u8; 64];
    out[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    out[16..18].copy_from_slice(&2u16.to_le_bytes());
    out[18..20].copy_from_slice(&0x3eu16.to_le_bytes());
    out[20..24].copy_from_slice(&1u32.to_le_bytes());
    out[24..32].copy_from_slice(&entry.to_le_bytes());
    out[32..40].copy_from_slice(&64u64.to_le_bytes());
    out[52..54].copy_from_slice(&64u16.to_le_bytes());
    out[54..56].copy_from_slice(&56u16.to_le_bytes());
    out[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
    let mut loads = Vec::new();
    for &(t, paddr, filesz, memsz, off) in phdrs {
        let filesz = filesz % (payload.len() as u64 + 1);
        let offset = data_at + off % (payload.len() as u64 + 1);
        let mut h = [0u8; 56];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&offset.to_le_bytes());
        h[16..24].copy_from_slice(&paddr.to_le_bytes());
        h[24..32].copy_from_slice(&paddr.to_le_bytes());
        h[32..40].copy_from_slice(&filesz.to_le_bytes());
        h[40..48].copy_from_slice(&memsz.max(filesz).to_le_bytes());
        out.extend_from_slice(&h);
        if t == 1 && filesz > 0 {
            loads.push((paddr, filesz, memsz.max(filesz)));
        }
    }
    out.extend_from_slice(payload);
    (out, loads)
}

/// A bzImage with the given setup-header fields (the setup sectors zeroed), then `payload` as
/// its protected-mode kernel.
fn bzimage(
    setup_sects: u8,
    code32_start: u32,
    xloadflags: u16,
    initrd_addr_max: u32,
    payload: &[u8],
) -> Vec<u8> {
    let sects = if setup_sects == 0 {
        4
    } else {
        usize::from(setup_sects)
    };
    let mut out = vec![0u8; (sects + 1) * 512];
    let h = setup_header {
        setup_sects,
        boot_flag: 0xaa55,
        header: 0x5372_6448,
        version: 0x20f,
        loadflags: 1,
        code32_start,
        xloadflags,
        initrd_addr_max,
        cmdline_size: 2048,
        ..Default::default()
    };
    let hb = h.as_slice();
    out[0x1f1..0x1f1 + hb.len()].copy_from_slice(hb);
    out.extend_from_slice(payload);
    out
}

/// A kernel to build: an ELF (entry, program headers, payload), a bzImage (setup sectors,
/// `code32_start`, `xloadflags`, `initrd_addr_max`, payload) or raw bytes.
#[derive(Debug, Clone)]
enum Kernel {
    Elf(u64, Vec<Phdr>, Vec<u8>),
    BzImage(u8, u32, u16, u32, Vec<u8>),
    Raw(Vec<u8>),
}

/// Kernels: mostly ELFs and bzImages with plausible fields, sometimes raw bytes.
fn kernel() -> impl Strategy<Value = Kernel> {
    let payload = proptest::collection::vec(any::<u8>(), 0..8192);
    prop_oneof![
        3 => (
            prop_oneof![3 => HIMEM_START..HIMEM_START + (8 << 20), 1 => any::<u64>()],
            proptest::collection::vec(phdr(), 0..4),
            payload.clone(),
        )
            .prop_map(|(e, p, b)| Kernel::Elf(e, p, b)),
        2 => (
            0u8..8,
            prop_oneof![3 => (HIMEM_START as u32)..(8 << 20), 1 => any::<u32>()],
            any::<u16>(),
            prop_oneof![Just(0u32), any::<u32>()],
            payload.clone(),
        )
            .prop_map(|(s, c, x, m, b)| Kernel::BzImage(s, c, x, m, b)),
        1 => payload.prop_map(Kernel::Raw),
    ]
}

/// The kernel's bytes for `kernel`, with the ELF segments it was built with.
fn kernel_bytes(kernel: &Kernel) -> (Vec<u8>, Vec<Segment>) {
    match kernel {
        Kernel::Elf(e, p, b) => elf(*e, p, b),
        Kernel::BzImage(s, c, x, m, b) => (bzimage(*s, *c, *x, *m, b), Vec::new()),
        Kernel::Raw(b) => (b.clone(), Vec::new()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn kernels_load_inside_ram_or_say_why(
        extra_pages in 0u64..1536,
        kernel in kernel(),
        initrd in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20000)),
        cmdline in "[ -~]{0,64}",
        mem_image in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8192)),
        vcpus in 1u32..=8,
    ) {
        let (bytes, segments) = kernel_bytes(&kernel);
        let (_kf, kernel_path) = file(&bytes);
        let initrd_file = initrd.as_deref().map(file);
        let image_file = mem_image.as_deref().map(file);
        check_linux(&Linux {
            mem: MIN_MEM + extra_pages * PAGE_SIZE,
            mem_image: image_file.as_ref().map(|(_, p)| p.as_path()),
            kernel: &kernel_path,
            kernel_bytes: &bytes,
            segments: &segments,
            initrd: initrd_file.as_ref().map(|(_, p)| p.as_path()).zip(initrd.as_deref()),
            cmdline: &cmdline,
            vcpus,
        });
    }

    #[test]
    fn flat_binaries_and_images_fit_or_say_why(
        extra_pages in 0u64..1536,
        entry in prop_oneof![3 => HIMEM_START..(8 << 20), 1 => any::<u64>()],
        bytes in proptest::collection::vec(any::<u8>(), 0..20000),
        at_page in 0usize..2048,
        mem_image in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8192)),
    ) {
        let mem = MIN_MEM + extra_pages * PAGE_SIZE;
        let (_f, path) = file(&bytes);
        let image_file = mem_image.as_deref().map(file);
        check_flat(mem, image_file.as_ref().map(|(_, p)| p.as_path()), &path, entry, &bytes);
        let mut image = vec![0u8; at_page * PAGE_SIZE as usize];
        image.extend_from_slice(&bytes);
        let (_f, path) = file(&image);
        check_image(mem, &path, &image);
    }
}
