//! ACPI tables for Linux guests: RSDP, XSDT, FADT (hardware-reduced, with an i8042), an empty
//! DSDT and a MADT listing every vCPU's local APIC and the IOAPIC. Linux kernels without
//! MP-table support need the MADT to bring up more than one vCPU.

use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::{Aml, fadt, rsdp::Rsdp, sdt::Sdt, xsdt::XSDT};

use super::layout::{ACPI_END, IOAPIC_ADDR, LAPIC_ADDR};

const OEM_ID: [u8; 6] = *b"VMMDDP";
const OEM_REVISION: u32 = 1;
/// Table alignment inside the blob.
const ALIGN: u64 = 16;
/// MADT flags offset (after the 36-byte header and the local APIC address).
const MADT_FLAGS_OFFSET: usize = 40;
/// MADT flag: the platform also has dual 8259 PICs.
const MADT_PCAT_COMPAT: u32 = 1;
/// SDT checksum byte offset.
const CHECKSUM_OFFSET: usize = 9;
/// FADT IA-PC boot architecture flag: an 8042 keyboard controller is present.
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
/// FADT IA-PC boot architecture flag: no CMOS RTC.
const IAPC_BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;

/// Errors building the tables.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tables would run past the ACPI area.
    #[error("ACPI tables for {vcpus} vCPUs need {len} bytes, more than the {room} reserved")]
    TooLarge {
        /// vCPUs described.
        vcpus: u32,
        /// Bytes needed.
        len: u64,
        /// Bytes available.
        room: u64,
    },
}

/// The tables, laid out to be written at one guest address.
#[derive(Debug)]
pub struct AcpiTables {
    /// Where `bytes` goes.
    pub base: u64,
    /// The RSDP (at `base`) followed by every table it leads to.
    pub bytes: Vec<u8>,
}

impl AcpiTables {
    /// Guest address of the RSDP, for `boot_params.acpi_rsdp_addr`.
    pub fn rsdp_addr(&self) -> u64 {
        self.base
    }
}

fn aml_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// Recomputes an SDT's checksum after its bytes were patched.
fn fix_checksum(table: &mut [u8]) {
    table[CHECKSUM_OFFSET] = 0;
    let sum = table.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    table[CHECKSUM_OFFSET] = 0u8.wrapping_sub(sum);
}

fn dsdt() -> Vec<u8> {
    Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"VMMDSDT ", OEM_REVISION)
        .as_slice()
        .to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut builder = fadt::FADTBuilder::new(OEM_ID, *b"VMMFACP ", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(fadt::Flags::HwReducedAcpi)
        .flag(fadt::Flags::PwrButton)
        .flag(fadt::Flags::SlpButton);
    builder.iapc_boot_arch = (IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_NO_CMOS_RTC).into();
    aml_bytes(&builder.finalize())
}

fn madt(vcpus: u32) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"VMMMADT ",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..vcpus {
        // vCPU counts are checked against MAX_VCPUS (254) before tables are built.
        let id = id as u8;
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    let mut bytes = aml_bytes(&madt);
    bytes[MADT_FLAGS_OFFSET..MADT_FLAGS_OFFSET + 4]
        .copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    fix_checksum(&mut bytes);
    bytes
}

/// Builds the tables for a guest with `vcpus` vCPUs, to be written at `base`.
pub fn build(base: u64, vcpus: u32) -> Result<AcpiTables, Error> {
    let mut blob = vec![0u8; Rsdp::len()];
    let mut place = |table: Vec<u8>| {
        let offset = (blob.len() as u64).next_multiple_of(ALIGN);
        blob.resize(offset as usize, 0);
        blob.extend_from_slice(&table);
        (base + offset, table.len())
    };

    let (dsdt_addr, _) = place(dsdt());
    let (fadt_addr, _) = place(fadt(dsdt_addr));
    let (madt_addr, _) = place(madt(vcpus));
    let mut xsdt = XSDT::new(OEM_ID, *b"VMMXSDT ", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let (xsdt_addr, _) = place(aml_bytes(&xsdt));

    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    blob[..rsdp.len()].copy_from_slice(&rsdp);

    let room = ACPI_END.saturating_sub(base);
    let len = blob.len() as u64;
    if len > room {
        return Err(Error::TooLarge { vcpus, len, room });
    }
    Ok(AcpiTables { base, bytes: blob })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{ACPI_ADDR, MAX_VCPUS};

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// The table whose header is at guest address `addr`, checked for length and checksum.
    fn table<'a>(t: &'a AcpiTables, addr: u64, sig: &[u8; 4]) -> &'a [u8] {
        let off = (addr - t.base) as usize;
        assert_eq!(&t.bytes[off..off + 4], sig);
        let len = u32_at(&t.bytes, off + 4) as usize;
        let bytes = &t.bytes[off..off + len];
        assert_eq!(
            bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)),
            0,
            "checksum"
        );
        bytes
    }

    #[test]
    fn rsdp_leads_to_fadt_dsdt_and_madt() {
        let t = build(ACPI_ADDR, 3).unwrap();
        assert_eq!(&t.bytes[..8], b"RSD PTR ");
        assert_eq!(t.rsdp_addr(), ACPI_ADDR);
        let xsdt = table(&t, u64_at(&t.bytes, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 16);
        let fadt = table(&t, u64_at(xsdt, 36), b"FACP");
        table(&t, u64_at(fadt, 140), b"DSDT");
        let madt = table(&t, u64_at(xsdt, 44), b"APIC");
        assert_eq!(u32_at(madt, 36), LAPIC_ADDR);
        assert_eq!(u32_at(madt, 40), MADT_PCAT_COMPAT);
        // Three 8-byte local APIC entries, then the 12-byte IOAPIC entry.
        assert_eq!(madt.len(), 44 + 3 * 8 + 12);
        assert_eq!(&madt[44 + 2 * 8..44 + 2 * 8 + 4], &[0, 8, 2, 2]);
        assert_eq!(madt[44 + 3 * 8], 1);
    }

    #[test]
    fn the_largest_guest_fits_the_acpi_area() {
        assert!(build(ACPI_ADDR, MAX_VCPUS).is_ok());
        assert!(build(ACPI_END - 64, MAX_VCPUS).is_err());
    }
}
