//! The Linux 64-bit boot protocol: the E820 map, where the initrd goes, and the zero page
//! (`boot_params`).

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use super::layout::{EBDA_START, HIMEM_START, MMIO_GAP_START, PAGE_SIZE, ram_ranges};

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// `boot_flag` magic.
const BOOT_FLAG: u16 = 0xaa55;
/// `header` magic: "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;
/// Loader type "undefined" (not one of the registered boot loaders).
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Physical alignment the kernel was built for when the image does not say (16 MiB).
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// Highest initrd address a kernel without a setup header accepts.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
/// Command-line size a kernel without a setup header accepts (x86 `COMMAND_LINE_SIZE`).
const DEFAULT_CMDLINE_SIZE: u32 = 2048;
/// Boot protocol version from which `cmdline_size` is present in the setup header.
const PROTOCOL_CMDLINE_SIZE: u16 = 0x206;
/// Command-line size of kernels older than that protocol.
const OLD_CMDLINE_SIZE: u32 = 255;

/// Errors laying out the boot data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error(
        "the initrd ({size} bytes) does not fit in guest RAM between the kernel end ({kernel_end:#x}) and {top:#x}; give the guest more --mem"
    )]
    InitrdTooLarge {
        /// Initrd size.
        size: u64,
        /// First free address after the kernel.
        kernel_end: u64,
        /// Highest address the initrd may end at.
        top: u64,
    },
    /// The command line is longer than the kernel accepts.
    #[error(
        "the kernel command line is {len} bytes, this kernel accepts at most {max}; shorten --cmdline"
    )]
    CmdlineTooLong {
        /// Its length, without the terminating NUL.
        len: usize,
        /// The kernel's limit, NUL included.
        max: u32,
    },
}

/// The E820 map of a guest with `mem` bytes of RAM: low RAM up to the EBDA, the EBDA and BIOS
/// area reserved, then RAM from 1 MiB (split around the MMIO gap).
pub fn e820_map(mem: u64) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, kind: u32| boot_e820_entry {
        addr,
        size,
        r#type: kind,
    };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, len) in ram_ranges(mem) {
        let start_at = start.max(HIMEM_START);
        let end = start + len;
        if end > start_at {
            map.push(entry(start_at, end - start_at, E820_RAM));
        }
    }
    map
}

/// Largest command line (NUL included) the kernel with `header` accepts.
pub fn cmdline_limit(header: Option<&setup_header>) -> u32 {
    match header {
        Some(h) if h.version >= PROTOCOL_CMDLINE_SIZE => h.cmdline_size,
        Some(_) => OLD_CMDLINE_SIZE,
        None => DEFAULT_CMDLINE_SIZE,
    }
}

/// Checks that `cmdline` (without its NUL) fits the kernel's limit.
pub fn check_cmdline(cmdline: &str, header: Option<&setup_header>) -> Result<(), Error> {
    let max = cmdline_limit(header);
    if cmdline.len() + 1 > max as usize {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    Ok(())
}

/// Where an initrd of `size` bytes goes: as high as possible in RAM below the MMIO gap and the
/// kernel's `initrd_addr_max`, page-aligned, above `kernel_end`.
pub fn initrd_addr(
    mem: u64,
    kernel_end: u64,
    size: u64,
    header: Option<&setup_header>,
) -> Result<u64, Error> {
    let addr_max = header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&max| max != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let top = mem.min(MMIO_GAP_START).min(addr_max + 1);
    let kernel_end = kernel_end.next_multiple_of(PAGE_SIZE);
    let addr = top
        .checked_sub(size)
        .map(|addr| addr & !(PAGE_SIZE - 1))
        .filter(|&addr| addr >= kernel_end)
        .ok_or(Error::InitrdTooLarge {
            size,
            kernel_end,
            top,
        })?;
    Ok(addr)
}

/// What goes into the zero page.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo<'a> {
    /// The bzImage's setup header (`None` for an ELF vmlinux).
    pub header: Option<&'a setup_header>,
    /// Guest RAM size.
    pub mem: u64,
    /// Address of the NUL-terminated command line.
    pub cmdline_addr: u64,
    /// Command-line length, NUL included.
    pub cmdline_len: u32,
    /// Initrd address and size.
    pub initrd: Option<(u64, u64)>,
    /// Address of the ACPI RSDP.
    pub rsdp_addr: u64,
}

/// Builds the zero page.
pub fn boot_params(info: &BootInfo<'_>) -> boot_params {
    let mut params = boot_params::default();
    match info.header {
        Some(h) => params.hdr = *h,
        None => {
            params.hdr.boot_flag = BOOT_FLAG;
            params.hdr.header = HDRS_MAGIC;
            params.hdr.kernel_alignment = DEFAULT_KERNEL_ALIGNMENT;
        }
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    // Addresses below 4 GiB by the layout (command line at CMDLINE_ADDR, initrd below the gap).
    params.hdr.cmd_line_ptr = info.cmdline_addr as u32;
    params.hdr.cmdline_size = info.cmdline_len;
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = info.rsdp_addr;
    let map = e820_map(info.mem);
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    params
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{GIB, MMIO_GAP_END};

    fn ranges(map: &[boot_e820_entry]) -> Vec<(u64, u64, u32)> {
        map.iter().map(|e| (e.addr, e.size, e.r#type)).collect()
    }

    #[test]
    fn e820_reserves_the_bios_area_and_skips_the_gap() {
        assert_eq!(
            ranges(&e820_map(64 << 20)),
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM),
            ]
        );
        let big = ranges(&e820_map(4 * GIB));
        assert_eq!(big.len(), 4);
        assert_eq!(
            big[2],
            (HIMEM_START, MMIO_GAP_START - HIMEM_START, E820_RAM)
        );
        assert_eq!(big[3], (MMIO_GAP_END, GIB, E820_RAM));
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let addr = initrd_addr(64 << 20, 0x200_0000, 0x1234, None).unwrap();
        assert_eq!(addr, (64 << 20) - 0x2000);
        let mut h = setup_header {
            initrd_addr_max: 0x37ff_ffff,
            ..Default::default()
        };
        let addr = initrd_addr(4 * GIB, 0x200_0000, 0x1000, Some(&h)).unwrap();
        assert_eq!(addr, 0x3800_0000 - 0x1000);
        h.initrd_addr_max = 0;
        let addr = initrd_addr(4 * GIB, 0x200_0000, 0x1000, Some(&h)).unwrap();
        assert_eq!(addr, 0x8000_0000 - 0x1000);
    }

    #[test]
    fn initrd_that_overlaps_the_kernel_is_refused() {
        let err = initrd_addr(32 << 20, 0x100_0000, 20 << 20, None).unwrap_err();
        assert!(err.to_string().contains("--mem"), "{err}");
        assert!(initrd_addr(32 << 20, 0, 64 << 20, None).is_err());
    }

    #[test]
    fn cmdline_limit_follows_the_protocol_version() {
        let mut h = setup_header {
            version: 0x20f,
            cmdline_size: 100,
            ..Default::default()
        };
        assert!(check_cmdline(&"x".repeat(99), Some(&h)).is_ok());
        assert!(check_cmdline(&"x".repeat(100), Some(&h)).is_err());
        h.version = 0x205;
        assert_eq!(cmdline_limit(Some(&h)), 255);
        assert_eq!(cmdline_limit(None), 2048);
    }

    #[test]
    fn zero_page_has_magic_cmdline_initrd_rsdp_and_e820() {
        let info = BootInfo {
            header: None,
            mem: 64 << 20,
            cmdline_addr: 0x7_0000,
            cmdline_len: 10,
            initrd: Some((0x300_0000, 0x1000)),
            rsdp_addr: 0xe_0000,
        };
        let p = boot_params(&info);
        let (flag, magic, ptr) = (p.hdr.boot_flag, p.hdr.header, p.hdr.cmd_line_ptr);
        assert_eq!((flag, magic, ptr), (BOOT_FLAG, HDRS_MAGIC, 0x7_0000));
        let (image, size) = (p.hdr.ramdisk_image, p.hdr.ramdisk_size);
        assert_eq!((image, size), (0x300_0000, 0x1000));
        let rsdp = p.acpi_rsdp_addr;
        assert_eq!(rsdp, 0xe_0000);
        assert_eq!(p.e820_entries, 3);
        assert_eq!(p.hdr.type_of_loader, LOADER_TYPE_UNDEFINED);
    }

    #[test]
    fn zero_page_keeps_the_bzimage_header() {
        let h = setup_header {
            version: 0x20f,
            xloadflags: 0x7f,
            code32_start: 0x10_0000,
            ..Default::default()
        };
        let info = BootInfo {
            header: Some(&h),
            mem: 64 << 20,
            cmdline_addr: 0x7_0000,
            cmdline_len: 1,
            initrd: None,
            rsdp_addr: 0,
        };
        let p = boot_params(&info);
        let (version, xl, ramdisk) = (p.hdr.version, p.hdr.xloadflags, p.hdr.ramdisk_image);
        assert_eq!((version, xl, ramdisk), (0x20f, 0x7f, 0));
    }
}
