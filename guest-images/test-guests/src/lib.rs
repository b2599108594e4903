//! Tiny purpose-built test guests, assembled from source (`asm/*.S`) by `build.rs` with GNU
//! binutils. Each guest is a flat 64-bit binary for `vmm --flat FILE --entry 0x100000`; the code
//! is position independent, so any load address inside guest RAM works.
//!
//! The guests rely on the VMM's flat boot convention: every vCPU enters at the entry point in
//! long mode with identity paging and interrupts off, `rdi` = vCPU index, `rsi` = vCPU count,
//! `rdx` = end of the identity-mapped range.
//!
//! # The probe guest
//!
//! [`PROBE`] takes commands on the serial console, one per line, numbers in hex without `0x`:
//!
//! | command | effect | reply |
//! |---|---|---|
//! | `R gpa` | read the u64 at `gpa` | `OK R gpa value` |
//! | `W gpa value` | write the u64 at `gpa` | `OK W gpa` |
//! | `C gpa` | checksum the 4 KiB page at `gpa` ([`page_checksum`]) | `OK C gpa sum` |
//! | `F gpa value` | fill the 4 KiB page at `gpa` with the u64 `value` | `OK F gpa` |
//! | `X status` | write `status` to the debug-exit port 0xf4 | none (the guest stops) |
//!
//! Replies print numbers in lowercase hex without leading zeros (`format!("{:x}")`). Errors are
//! `ERR syntax`, `ERR align` (`R`/`W` need 8-byte, `C`/`F` 4 KiB alignment), `ERR range`
//! (address past the identity map, status above `ff`), `ERR unknown command` and
//! `ERR line too long`. At start vCPU 0 waits (bounded) for the other vCPUs to check in and
//! prints `PROBE READY vcpus=N` with the number of vCPUs that did, in decimal.
//!
//! A host test writes the probe to a file, runs it, and predicts the guest's replies:
//!
//! ```
//! use test_guests::{filled_page_checksum, page_checksum, PAGE_SIZE, PROBE};
//!
//! let probe_file = std::env::temp_dir().join("probe-doc.bin");
//! std::fs::write(&probe_file, PROBE).unwrap();
//! // `vmm --flat <probe_file> --entry 0x100000 --mem 16M`, then send "F 200000 2a" and
//! // "C 200000": the guest answers "OK C 200000 <sum>" with
//! let sum = filled_page_checksum(0x2a);
//! let page: Vec<u8> = std::iter::repeat(0x2au64.to_le_bytes()).take(PAGE_SIZE / 8).flatten().collect();
//! assert_eq!(sum, page_checksum(&page));
//! assert_eq!(format!("OK C 200000 {sum:x}").split(' ').count(), 4);
//! ```

/// Size of the page that the probe's `C` and `F` commands work on.
pub const PAGE_SIZE: usize = 4096;

/// Guest-physical address the guests are linked for and the tests load them at.
pub const LOAD_ADDRESS: u64 = 0x10_0000;

/// The probe guest (see the crate documentation for its protocol).
pub static PROBE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe.bin"));

/// Prints `RESETTING`, then resets the machine through the i8042 (command 0xfe on port 0x64).
pub static RESET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/reset.bin"));

/// Prints `FAULTING`, then triple-faults (undefined instruction with an empty IDT).
pub static TRIPLE_FAULT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/triple_fault.bin"));

/// A guest that does what a guest should not, to check that the VMM survives it.
///
/// It prints `HOSTILE READY` and waits for one input line. Then, with interrupts off, it writes
/// garbage to and reads every I/O port except the debug-exit port (bytes everywhere, words and
/// dwords at every 64th port, string I/O, an i8042 command flood whose replies it never reads),
/// then writes and reads unmapped MMIO above RAM and in the MMIO gap, then takes #UD, #GP and
/// #PF faults that its IDT resumes after, and finally triple-faults. Each phase ends with a
/// console line:
///
/// | line | meaning |
/// |---|---|
/// | `HOSTILE PORTS DONE` | the port phase is over |
/// | `HOSTILE MMIO DONE and=<hex>` | AND of every qword read from unmapped MMIO ([`HOSTILE_MMIO_AND`] when unhandled reads return all ones) |
/// | `HOSTILE FAULTS ud=<hex> gp=<hex> pf=<hex>` | faults taken ([`HOSTILE_FAULTS`] when each one was delivered to the guest) |
/// | `HOSTILE TRIPLE FAULT` | the empty IDT is loaded and `ud2` executed next |
///
/// The line before `HOSTILE PORTS DONE` holds whatever garbage the port phase wrote to the
/// UART's data register.
pub static HOSTILE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hostile.bin"));

/// What [`HOSTILE`] reports when every unmapped MMIO read returned all ones.
pub const HOSTILE_MMIO_AND: u64 = u64::MAX;

/// The faults [`HOSTILE`] takes: undefined opcodes (#UD), non-canonical accesses (#GP) and
/// accesses past the identity map (#PF).
pub const HOSTILE_FAULTS: (u64, u64, u64) = (10, 1, 1);

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The checksum the probe's `C` command computes: FNV-1a over the page's little-endian u64
/// words (not bytes).
///
/// The guest always sums a whole 4 KiB page; for other lengths this sums the whole words of
/// `page` and then the trailing bytes zero-padded to a word.
pub fn page_checksum(page: &[u8]) -> u64 {
    let mut words = page.chunks_exact(8);
    let mut sum = FNV_OFFSET;
    for word in words.by_ref() {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(word);
        sum = (sum ^ u64::from_le_bytes(bytes)).wrapping_mul(FNV_PRIME);
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut bytes = [0u8; 8];
        bytes[..rest.len()].copy_from_slice(rest);
        sum = (sum ^ u64::from_le_bytes(bytes)).wrapping_mul(FNV_PRIME);
    }
    sum
}

/// The checksum of a page filled with the u64 `value` (what `F gpa value` then `C gpa` reports).
pub fn filled_page_checksum(value: u64) -> u64 {
    (0..PAGE_SIZE / 8).fold(FNV_OFFSET, |sum, _| (sum ^ value).wrapping_mul(FNV_PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_filled_page_matches_the_byte_form() {
        let value = 0x0123_4567_89ab_cdef_u64;
        let page: Vec<u8> = (0..PAGE_SIZE / 8)
            .flat_map(|_| value.to_le_bytes())
            .collect();
        assert_eq!(page_checksum(&page), filled_page_checksum(value));
    }

    #[test]
    fn checksum_depends_on_word_order_and_content() {
        let mut page = vec![0u8; PAGE_SIZE];
        let zero = page_checksum(&page);
        page[8] = 1;
        let second_word = page_checksum(&page);
        page[8] = 0;
        page[16] = 1;
        let third_word = page_checksum(&page);
        assert_ne!(zero, second_word);
        assert_ne!(second_word, third_word);
    }

    #[test]
    fn checksum_of_a_short_slice_zero_pads_the_last_word() {
        assert_eq!(
            page_checksum(&[1, 2, 3]),
            page_checksum(&[1, 2, 3, 0, 0, 0, 0, 0])
        );
        assert_eq!(page_checksum(&[]), FNV_OFFSET);
    }

    #[test]
    fn guests_are_flat_code_not_elf() {
        for guest in [PROBE, RESET, TRIPLE_FAULT, HOSTILE] {
            assert!(!guest.is_empty());
            assert_ne!(&guest[..4], b"\x7fELF");
        }
        // The probe starts with `test rdi, rdi` (48 85 ff): vCPU 0 runs the command loop.
        assert_eq!(&PROBE[..3], &[0x48, 0x85, 0xff]);
    }
}
