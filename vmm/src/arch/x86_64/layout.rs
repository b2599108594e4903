//! Guest physical address layout.
//!
//! ```text
//! 0x0000_0500  GDT (flat 64-bit code and data, TSS)
//! 0x0000_0600  IDT (empty)
//! 0x0000_7000  Linux zero page (boot_params)
//! 0x0000_8ff0  initial stack of the Linux boot vCPU
//! 0x0000_9000  identity page tables: PML4, PDPT, one page directory per GiB (2 MiB pages)
//! 0x0007_0000  kernel command line (64 KiB at most)
//! 0x0008_0000  flat guests: one 512-byte stack per vCPU, vCPU i's top at 0xa_0000 - i * 0x200
//! 0x000e_0000  ACPI tables (RSDP first), Linux boots only
//! 0x0010_0000  kernel, or where flat guests are loaded (--entry must be at or above this)
//! 0xc000_0000  MMIO gap up to 4 GiB: IOAPIC, LAPIC, KVM's TSS and identity-map pages
//! 0x1_0000_0000  RAM beyond the first 3 GiB
//! ```

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 0x1000;
/// One gibibyte.
pub const GIB: u64 = 1 << 30;
/// Size of the large pages used by the boot identity map.
pub const LARGE_PAGE_SIZE: u64 = 0x20_0000;

/// Where the GDT is written.
pub const GDT_ADDR: u64 = 0x500;
/// Where the (empty) IDT is.
pub const IDT_ADDR: u64 = 0x600;
/// Where the Linux zero page (`boot_params`) is written.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of the vCPU that boots Linux.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Where the PML4 of the identity map is; the PDPT and page directories follow it.
pub const PML4_ADDR: u64 = 0x9000;
/// End of the space reserved for the identity-map page tables.
pub const PAGE_TABLES_END: u64 = 0x7_0000;
/// Where the kernel command line is written.
pub const CMDLINE_ADDR: u64 = 0x7_0000;
/// Largest command line, terminating NUL included, that fits at [`CMDLINE_ADDR`].
pub const CMDLINE_MAX: u64 = 0x1_0000;
/// Top of the first flat-guest vCPU stack; vCPU `i` gets `FLAT_STACKS_TOP - i * FLAT_STACK_SIZE`.
pub const FLAT_STACKS_TOP: u64 = 0xa_0000;
/// Size of each flat-guest vCPU stack.
pub const FLAT_STACK_SIZE: u64 = 0x200;
/// Start of the extended BIOS data area, reserved in the E820 map up to [`HIMEM_START`].
pub const EBDA_START: u64 = 0x9_fc00;
/// Where the ACPI tables are written (inside the legacy RSDP search window).
pub const ACPI_ADDR: u64 = 0xe_0000;
/// End of the ACPI area.
pub const ACPI_END: u64 = 0x10_0000;
/// Start of high memory: kernels and flat guests load here or above.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap (RAM stops here and resumes at [`MMIO_GAP_END`]).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Address of the IOAPIC.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Address of the local APICs.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// The three pages KVM needs for its TSS (inside the MMIO gap).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// The page KVM needs for its identity map (inside the MMIO gap).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Smallest guest RAM: room for the boot structures below 1 MiB and a little above.
pub const MIN_MEM: u64 = 2 << 20;
/// Largest number of vCPUs per guest (xAPIC IDs are 8 bits, 255 is broadcast).
pub const MAX_VCPUS: u32 = 254;

/// Number of page directories (one per GiB) that fit in the page-table area.
const MAX_PAGE_DIRECTORIES: u64 = (PAGE_TABLES_END - PML4_ADDR) / PAGE_SIZE - 2;

/// Largest guest RAM the boot identity map can cover.
pub const MAX_MEM: u64 = MAX_PAGE_DIRECTORIES * GIB - (MMIO_GAP_END - MMIO_GAP_START);

// The boot areas do not overlap, and the identity map covers guests far larger than tests use.
const _: () = {
    assert!(GDT_ADDR + 5 * 8 <= IDT_ADDR);
    assert!(ZERO_PAGE_ADDR + PAGE_SIZE <= BOOT_STACK_TOP);
    assert!(BOOT_STACK_TOP < PML4_ADDR);
    assert!(PAGE_TABLES_END <= CMDLINE_ADDR);
    assert!(ACPI_END <= HIMEM_START);
    assert!(MAX_MEM > 64 * GIB);
};

/// The guest-physical RAM ranges `(start, len)` of a guest with `mem` bytes of RAM: up to
/// 3 GiB from address 0, the rest from 4 GiB.
pub fn ram_ranges(mem: u64) -> Vec<(u64, u64)> {
    let low = mem.min(MMIO_GAP_START);
    let mut ranges = vec![(0, low)];
    if mem > low {
        ranges.push((MMIO_GAP_END, mem - low));
    }
    ranges
}

/// One past the highest guest-physical RAM address of a guest with `mem` bytes of RAM.
pub fn ram_end(mem: u64) -> u64 {
    ram_ranges(mem)
        .last()
        .map(|&(start, len)| start + len)
        .unwrap_or(0)
}

/// The guest-physical address of byte `offset` of guest RAM, counting RAM bytes in address
/// order (so offsets past 3 GiB land above the MMIO gap).
pub fn ram_offset_to_gpa(offset: u64) -> u64 {
    if offset < MMIO_GAP_START {
        offset
    } else {
        offset - MMIO_GAP_START + MMIO_GAP_END
    }
}

/// Stack pointer given to vCPU `index` of a flat guest.
pub fn flat_stack_top(index: u32) -> u64 {
    FLAT_STACKS_TOP - u64::from(index) * FLAT_STACK_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guests_have_one_range() {
        assert_eq!(ram_ranges(64 << 20), vec![(0, 64 << 20)]);
        assert_eq!(ram_end(64 << 20), 64 << 20);
    }

    #[test]
    fn large_guests_continue_above_the_gap() {
        let mem = 5 * GIB;
        assert_eq!(
            ram_ranges(mem),
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, 2 * GIB)]
        );
        assert_eq!(ram_end(mem), MMIO_GAP_END + 2 * GIB);
        assert_eq!(ram_end(MMIO_GAP_START), MMIO_GAP_START);
    }

    #[test]
    fn ram_offsets_skip_the_gap() {
        assert_eq!(ram_offset_to_gpa(0x1000), 0x1000);
        assert_eq!(ram_offset_to_gpa(MMIO_GAP_START), MMIO_GAP_END);
        assert_eq!(ram_offset_to_gpa(MMIO_GAP_START + 5), MMIO_GAP_END + 5);
    }

    #[test]
    fn flat_stacks_stay_between_cmdline_and_ebda_top() {
        assert_eq!(flat_stack_top(0), FLAT_STACKS_TOP);
        let lowest = flat_stack_top(MAX_VCPUS - 1) - FLAT_STACK_SIZE;
        assert!(lowest >= CMDLINE_ADDR + CMDLINE_MAX);
    }
}
