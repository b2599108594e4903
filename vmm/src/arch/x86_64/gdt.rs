//! The boot GDT: flat 64-bit code and data segments and a TSS, and their decoding into the
//! segment registers KVM loads directly.

use kvm_bindings::kvm_segment;

/// Selector of the 64-bit code segment (Linux's `__BOOT_CS`).
pub const CODE_SELECTOR: u16 = 0x10;
/// Selector of the data segment (Linux's `__BOOT_DS`).
pub const DATA_SELECTOR: u16 = 0x18;
/// Selector of the TSS.
pub const TSS_SELECTOR: u16 = 0x20;

/// Access byte and flags nibble (`flags << 12 | access`) of the 64-bit code segment:
/// present, ring 0, execute/read, long mode, 4 KiB granularity.
const CODE64: u16 = 0xa09b;
/// Read/write data segment, 32-bit default size, 4 KiB granularity.
const DATA: u16 = 0xc093;
/// Busy 32/64-bit TSS, byte granularity.
const TSS: u16 = 0x008b;

/// Encodes one 8-byte segment descriptor. `flags` holds the access byte in bits 0-7 and the
/// flags nibble (G, D/B, L, AVL) in bits 12-15.
pub fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    (limit & 0xffff)
        | ((base & 0x00ff_ffff) << 16)
        | ((flags & 0x00ff) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((flags >> 12) & 0xf) << 52)
        | (((base >> 24) & 0xff) << 56)
}

/// The boot GDT, indexed by `selector / 8`.
pub fn boot_gdt() -> [u64; 5] {
    [
        0,
        0,
        descriptor(CODE64, 0, 0xf_ffff),
        descriptor(DATA, 0, 0xf_ffff),
        descriptor(TSS, 0, 0x67),
    ]
}

/// Decodes a descriptor into the segment register KVM loads for `selector`.
pub fn segment(descriptor: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| ((descriptor >> n) & 1) as u8;
    let base = ((descriptor >> 16) & 0x00ff_ffff) | ((descriptor >> 32) & 0xff00_0000);
    let raw_limit = ((descriptor & 0xffff) | ((descriptor >> 32) & 0xf_0000)) as u32;
    let granular = bit(55) == 1;
    let present = bit(47);
    kvm_segment {
        base,
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((descriptor >> 40) & 0xf) as u8,
        present,
        dpl: ((descriptor >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: u8::from(granular),
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_well_known_flat_descriptors() {
        assert_eq!(descriptor(CODE64, 0, 0xf_ffff), 0x00af_9b00_0000_ffff);
        assert_eq!(descriptor(DATA, 0, 0xf_ffff), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn decodes_what_it_encodes() {
        let d = descriptor(0xc093, 0x1234_5678, 0xa_bcde);
        let s = segment(d, 0x18);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcd_efff);
        assert_eq!((s.type_, s.s, s.present, s.dpl), (3, 1, 1, 0));
        assert_eq!((s.db, s.l, s.g, s.unusable), (1, 0, 1, 0));
    }

    #[test]
    fn code_segment_is_long_mode_and_tss_is_byte_granular() {
        let gdt = boot_gdt();
        let cs = segment(gdt[usize::from(CODE_SELECTOR / 8)], CODE_SELECTOR);
        assert_eq!((cs.l, cs.db, cs.type_), (1, 0, 0xb));
        let tr = segment(gdt[usize::from(TSS_SELECTOR / 8)], TSS_SELECTOR);
        assert_eq!((tr.limit, tr.g, tr.s, tr.type_), (0x67, 0, 0, 0xb));
        assert_eq!(segment(0, 0).unusable, 1);
    }
}
