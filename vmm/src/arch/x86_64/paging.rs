//! Identity page tables for the 64-bit entry: 2 MiB pages covering every guest RAM address
//! and the 32-bit MMIO gap.

use super::layout::{GIB, LARGE_PAGE_SIZE, MMIO_GAP_END, PAGE_SIZE, PAGE_TABLES_END, PML4_ADDR};

/// Present and writable.
const PRESENT_RW: u64 = 0x3;
/// Present, writable, and a large (2 MiB) page.
const LARGE_PAGE: u64 = 0x83;
/// Entries per table.
const ENTRIES: u64 = 512;

/// Errors building the page tables.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tables for `end` do not fit in the page-table area.
    #[error(
        "guest RAM ending at {end:#x} needs {needed} bytes of boot page tables, only {room} fit"
    )]
    TooLarge {
        /// One past the highest address to map.
        end: u64,
        /// Bytes of page tables needed.
        needed: u64,
        /// Bytes available.
        room: u64,
    },
}

/// One past the last address the identity map for RAM ending at `end` covers: `end` (at least
/// 4 GiB, so the MMIO gap is mapped) rounded up to a GiB.
pub fn identity_map_end(end: u64) -> u64 {
    end.max(MMIO_GAP_END).next_multiple_of(GIB)
}

/// Builds the page tables identity-mapping `[0, identity_map_end(end))`, laid out to be written
/// at [`PML4_ADDR`]: the PML4, one PDPT, then one page directory per GiB. CR3 is
/// [`PML4_ADDR`].
pub fn identity_map(end: u64) -> Result<Vec<u8>, Error> {
    let gibs = identity_map_end(end) / GIB;
    let needed = (2 + gibs) * PAGE_SIZE;
    let room = PAGE_TABLES_END - PML4_ADDR;
    if needed > room || gibs > ENTRIES {
        return Err(Error::TooLarge { end, needed, room });
    }
    let pdpt_addr = PML4_ADDR + PAGE_SIZE;
    let pd_addr = |gib: u64| pdpt_addr + PAGE_SIZE * (1 + gib);

    let mut entries = vec![0u64; (needed / 8) as usize];
    entries[0] = pdpt_addr | PRESENT_RW;
    let pdpt = ENTRIES as usize;
    for gib in 0..gibs {
        entries[pdpt + gib as usize] = pd_addr(gib) | PRESENT_RW;
        let pd = (2 + gib) as usize * ENTRIES as usize;
        for i in 0..ENTRIES {
            entries[pd + i as usize] = (gib * GIB + i * LARGE_PAGE_SIZE) | LARGE_PAGE;
        }
    }
    Ok(entries.iter().flat_map(|e| e.to_le_bytes()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::MAX_MEM;
    use crate::arch::x86_64::layout::ram_end;

    /// Walks the tables as the MMU would and returns the physical address for `va`.
    fn translate(tables: &[u8], va: u64) -> Option<u64> {
        let entry = |table_addr: u64, index: u64| {
            let off = (table_addr - PML4_ADDR + index * 8) as usize;
            u64::from_le_bytes(tables[off..off + 8].try_into().unwrap())
        };
        let pml4e = entry(PML4_ADDR, (va >> 39) & 0x1ff);
        if pml4e & 1 == 0 {
            return None;
        }
        let pdpte = entry(pml4e & !0xfff, (va >> 30) & 0x1ff);
        if pdpte & 1 == 0 {
            return None;
        }
        let pde = entry(pdpte & !0xfff, (va >> 21) & 0x1ff);
        if pde & 0x81 != 0x81 {
            return None;
        }
        Some((pde & !0x1f_ffff & !(1 << 63)) | (va & 0x1f_ffff))
    }

    #[test]
    fn maps_low_memory_and_the_gap_identically() {
        let t = identity_map(64 << 20).unwrap();
        for va in [0, 0x10_0000, 0x3f_ffff, 0xfee0_0000, 0xffff_ffff] {
            assert_eq!(translate(&t, va), Some(va), "{va:#x}");
        }
        assert_eq!(translate(&t, MMIO_GAP_END), None);
        assert_eq!(identity_map_end(64 << 20), MMIO_GAP_END);
    }

    #[test]
    fn maps_ram_above_the_gap() {
        let end = ram_end(6 * GIB);
        let t = identity_map(end).unwrap();
        assert_eq!(translate(&t, end - 1), Some(end - 1));
        assert_eq!(translate(&t, identity_map_end(end)), None);
        assert_eq!(identity_map_end(end), 7 * GIB);
    }

    #[test]
    fn refuses_what_does_not_fit() {
        assert!(identity_map(ram_end(MAX_MEM)).is_ok());
        let err = identity_map(ram_end(MAX_MEM) + GIB).unwrap_err();
        assert!(err.to_string().contains("page tables"));
    }
}
