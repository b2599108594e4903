//! Initial vCPU register state for the 64-bit entry: general registers, segment and control
//! registers, FPU, and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_sregs};

use super::gdt::{self, CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use super::layout::{GDT_ADDR, IDT_ADDR, PML4_ADDR};

/// CR0: protected mode.
const CR0_PE: u64 = 1;
/// CR0: extension type (always 1 on modern CPUs).
const CR0_ET: u64 = 1 << 4;
/// CR0: paging.
const CR0_PG: u64 = 1 << 31;
/// CR4: physical address extension.
const CR4_PAE: u64 = 1 << 5;
/// EFER: long mode enable.
const EFER_LME: u64 = 1 << 8;
/// EFER: long mode active.
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set; interrupts stay disabled.
const RFLAGS_RESERVED: u64 = 0x2;

/// Offset of LVT LINT0 in the local APIC register page.
const APIC_LVT0: usize = 0x350;
/// Offset of LVT LINT1 in the local APIC register page.
const APIC_LVT1: usize = 0x360;
/// Delivery-mode bits of an LVT entry.
const APIC_DELIVERY_MASK: u32 = 0x700;
/// ExtINT delivery: LINT0 passes the legacy PIC's interrupts through.
const APIC_MODE_EXTINT: u32 = 0x700;
/// NMI delivery on LINT1.
const APIC_MODE_NMI: u32 = 0x400;

/// Argument registers of a boot protocol: Linux gets its zero page in `rsi`; flat guests get
/// their vCPU index in `rdi`, the vCPU count in `rsi` and the end of the identity map in `rdx`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootArgs {
    /// `rdi`.
    pub rdi: u64,
    /// `rsi`.
    pub rsi: u64,
    /// `rdx`.
    pub rdx: u64,
}

/// General registers at the entry point `rip`, with stack pointer `rsp`, interrupts off.
pub fn entry_regs(rip: u64, rsp: u64, args: BootArgs) -> kvm_regs {
    kvm_regs {
        rip,
        rsp,
        rbp: rsp,
        rdi: args.rdi,
        rsi: args.rsi,
        rdx: args.rdx,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    }
}

/// Puts `sregs` in 64-bit mode: the boot GDT's flat segments, an empty IDT, identity paging
/// rooted at [`PML4_ADDR`].
pub fn long_mode(sregs: &mut kvm_sregs) {
    let table = gdt::boot_gdt();
    let seg = |selector: u16| gdt::segment(table[usize::from(selector / 8)], selector);
    let data = seg(DATA_SELECTOR);

    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 0;
    sregs.cs = seg(CODE_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = seg(TSS_SELECTOR);

    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// The FPU state after `FNINIT`, with SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = |i: usize| lapic.regs[offset + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = byte as _;
    }
}

/// Wires LINT0 as ExtINT (the legacy PIC) and LINT1 as NMI, as firmware does on a PC.
pub fn set_lint_modes(lapic: &mut kvm_lapic_state) {
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let value = (lapic_reg(lapic, offset) & !APIC_DELIVERY_MASK) | mode;
        set_lapic_reg(lapic, offset, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_sets_paging_and_flat_segments() {
        let mut s = kvm_sregs::default();
        long_mode(&mut s);
        assert_eq!(s.cr3, PML4_ADDR);
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((s.cs.selector, s.cs.l, s.cs.present), (CODE_SELECTOR, 1, 1));
        assert_eq!(
            (s.ss.selector, s.ds.selector),
            (DATA_SELECTOR, DATA_SELECTOR)
        );
        assert_eq!(s.gdt.limit, 39);
    }

    #[test]
    fn entry_regs_keep_interrupts_off() {
        let args = BootArgs {
            rdi: 3,
            rsi: 0x7000,
            rdx: 1 << 32,
        };
        let r = entry_regs(0x10_0000, 0x8ff0, args);
        assert_eq!((r.rip, r.rsp, r.rsi, r.rdi), (0x10_0000, 0x8ff0, 0x7000, 3));
        assert_eq!(r.rdx, 1 << 32);
        assert_eq!(r.rflags & 0x200, 0);
    }

    #[test]
    fn lint_pins_get_extint_and_nmi_and_keep_other_bits() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, APIC_LVT0, 0x1_0000 | 0x100);
        set_lint_modes(&mut lapic);
        assert_eq!(lapic_reg(&lapic, APIC_LVT0), 0x1_0000 | APIC_MODE_EXTINT);
        assert_eq!(lapic_reg(&lapic, APIC_LVT1), APIC_MODE_NMI);
    }
}
