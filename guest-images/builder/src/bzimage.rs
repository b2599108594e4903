//! Extracting the ELF `vmlinux` from an LZ4-compressed bzImage.
//!
//! A bzImage's compressed payload is the kernel's `vmlinux.bin` (an ELF file, with the
//! relocation table appended when the kernel is relocatable), compressed with `lz4 -l` (LZ4's
//! legacy frame: the magic `02 21 4c 18`, then blocks of at most 8 MiB, each a little-endian
//! compressed size and an LZ4 block), followed by the 4-byte little-endian uncompressed size.
//! Boot protocol 2.08+ headers give the payload's exact offset and length; older or odd files
//! are handled by searching for the magic.

use std::ops::Range;

use thiserror::Error;

use crate::elf;

/// Magic of an LZ4 legacy frame.
pub const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
/// Uncompressed size of a full legacy block.
const LEGACY_BLOCK: usize = 8 << 20;
/// Largest compressed size a legacy block can have (LZ4_compressBound of 8 MiB).
const LEGACY_BLOCK_BOUND: usize = LEGACY_BLOCK + LEGACY_BLOCK / 255 + 16;

/// Offsets in the real-mode setup header (Documentation/arch/x86/boot.rst).
const SETUP_SECTS: usize = 0x1f1;
const HEADER_MAGIC_AT: usize = 0x202;
const VERSION_AT: usize = 0x206;
const PAYLOAD_OFFSET_AT: usize = 0x248;
const PAYLOAD_LENGTH_AT: usize = 0x24c;

/// Errors from extracting a kernel.
#[derive(Debug, Error)]
pub enum Error {
    /// No LZ4 legacy frame in the file.
    #[error("no LZ4 payload (magic 02 21 4c 18) in the bzImage: not an LZ4-compressed kernel")]
    NoLz4Payload,
    /// A block could not be decompressed.
    #[error("corrupt LZ4 block at payload offset {offset}")]
    Corrupt {
        /// Offset of the block in the payload.
        offset: usize,
        /// The decoder's complaint.
        #[source]
        source: lz4_flex::block::DecompressError,
    },
    /// The payload's trailing size does not match what was decompressed.
    #[error("decompressed {got} bytes but the bzImage says {expected}")]
    LengthMismatch {
        /// Size recorded after the payload.
        expected: u64,
        /// Size decompressed.
        got: u64,
    },
    /// The decompressed payload is not an ELF kernel.
    #[error("the decompressed payload is not an ELF vmlinux")]
    NotElf(#[source] elf::Error),
}

/// Where the compressed payload lies in a bzImage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    /// Byte range of the payload in the file.
    pub range: Range<usize>,
    /// Whether the range comes from the boot protocol header (exact, with the trailing size)
    /// rather than from searching for the magic (runs to the end of the file).
    pub from_header: bool,
}

fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    data.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
}

/// The payload range named by a boot protocol 2.08+ header, if it holds an LZ4 legacy frame.
fn payload_from_header(bz: &[u8]) -> Option<Range<usize>> {
    if bz.get(HEADER_MAGIC_AT..HEADER_MAGIC_AT + 4)? != b"HdrS" {
        return None;
    }
    let version = u16::from_le_bytes(bz.get(VERSION_AT..VERSION_AT + 2)?.try_into().ok()?);
    if version < 0x0208 {
        return None;
    }
    let sects = match *bz.get(SETUP_SECTS)? {
        0 => 4,
        n => usize::from(n),
    };
    let start = (sects + 1) * 512 + read_u32(bz, PAYLOAD_OFFSET_AT)? as usize;
    let end = start.checked_add(read_u32(bz, PAYLOAD_LENGTH_AT)? as usize)?;
    let payload = bz.get(start..end)?;
    (payload.len() > 8 && payload[..4] == LZ4_LEGACY_MAGIC).then_some(start..end)
}

/// Finds the LZ4 payload: from the setup header when it names one, else the first magic.
pub fn locate_lz4_payload(bz: &[u8]) -> Result<Payload, Error> {
    if let Some(range) = payload_from_header(bz) {
        return Ok(Payload {
            range,
            from_header: true,
        });
    }
    let start = bz
        .windows(4)
        .position(|w| w == LZ4_LEGACY_MAGIC)
        .ok_or(Error::NoLz4Payload)?;
    Ok(Payload {
        range: start..bz.len(),
        from_header: false,
    })
}

/// Decompresses an LZ4 legacy stream starting with the magic.
///
/// Decoding stops at the end of the data, or at a size field that cannot start a block (too
/// large, or past the end): that is how the trailing uncompressed size, or whatever follows a
/// payload found by searching, is left alone. Concatenated frames (a repeated magic) are joined.
pub fn decompress_lz4_legacy(data: &[u8]) -> Result<Vec<u8>, Error> {
    if data.len() < 4 || data[..4] != LZ4_LEGACY_MAGIC {
        return Err(Error::NoLz4Payload);
    }
    let mut out = Vec::new();
    let mut pos = 4;
    while let Some(size) = read_u32(data, pos) {
        if size.to_le_bytes() == LZ4_LEGACY_MAGIC {
            pos += 4;
            continue;
        }
        let size = size as usize;
        let start = pos + 4;
        if size == 0 || size > LEGACY_BLOCK_BOUND || start + size > data.len() {
            break;
        }
        let filled = out.len();
        out.resize(filled + LEGACY_BLOCK, 0);
        let n = lz4_flex::block::decompress_into(&data[start..start + size], &mut out[filled..])
            .map_err(|source| Error::Corrupt {
                offset: pos,
                source,
            })?;
        out.truncate(filled + n);
        pos = start + size;
    }
    Ok(out)
}

/// Extracts the ELF `vmlinux` from a bzImage, trimmed to the ELF file's own extent (the
/// relocation table that follows it in the payload is dropped).
pub fn extract_vmlinux(bz: &[u8]) -> Result<Vec<u8>, Error> {
    let payload = locate_lz4_payload(bz)?;
    let data = &bz[payload.range.clone()];
    let mut out = decompress_lz4_legacy(data)?;
    if payload.from_header {
        let expected = u64::from(read_u32(data, data.len() - 4).unwrap_or(0));
        if expected != out.len() as u64 {
            return Err(Error::LengthMismatch {
                expected,
                got: out.len() as u64,
            });
        }
    }
    let info = elf::inspect(&out).map_err(Error::NotElf)?;
    out.truncate(info.extent as usize);
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::elf::tests::tiny_elf;

    /// `lz4 -l` framing of `data` with blocks of `block` bytes, plus the trailing size.
    pub(crate) fn legacy_frame(data: &[u8], block: usize) -> Vec<u8> {
        let mut f = LZ4_LEGACY_MAGIC.to_vec();
        for chunk in data.chunks(block) {
            let c = lz4_flex::block::compress(chunk);
            f.extend_from_slice(&(c.len() as u32).to_le_bytes());
            f.extend_from_slice(&c);
        }
        f.extend_from_slice(&(data.len() as u32).to_le_bytes());
        f
    }

    /// A bzImage-shaped file: setup sectors with a 2.15 header, some code, the payload, a tail.
    pub(crate) fn fake_bzimage(payload: &[u8], with_header: bool) -> Vec<u8> {
        let setup_sects = 3u8;
        let code_before = 700usize;
        let mut bz = vec![0u8; (usize::from(setup_sects) + 1) * 512 + code_before];
        if with_header {
            bz[SETUP_SECTS] = setup_sects;
            bz[HEADER_MAGIC_AT..HEADER_MAGIC_AT + 4].copy_from_slice(b"HdrS");
            bz[VERSION_AT..VERSION_AT + 2].copy_from_slice(&0x020fu16.to_le_bytes());
            bz[PAYLOAD_OFFSET_AT..PAYLOAD_OFFSET_AT + 4]
                .copy_from_slice(&(code_before as u32).to_le_bytes());
            bz[PAYLOAD_LENGTH_AT..PAYLOAD_LENGTH_AT + 4]
                .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        }
        bz.extend_from_slice(payload);
        bz.extend_from_slice(&[0x5a; 333]);
        bz
    }

    pub(crate) fn kernel_like(trailing: usize) -> (Vec<u8>, Vec<u8>) {
        let elf = tiny_elf(1, 200_000, 0);
        let mut with_relocs = elf.clone();
        with_relocs.extend((0..trailing).map(|i| (i * 7) as u8));
        (elf, with_relocs)
    }

    #[test]
    fn header_names_the_payload_exactly() {
        let (elf, content) = kernel_like(4096);
        let frame = legacy_frame(&content, 65536);
        let bz = fake_bzimage(&frame, true);
        let p = locate_lz4_payload(&bz).unwrap();
        assert!(p.from_header);
        assert_eq!(p.range.len(), frame.len());
        assert_eq!(&bz[p.range.clone()], &frame[..]);
        assert_eq!(extract_vmlinux(&bz).unwrap(), elf);
    }

    #[test]
    fn without_a_header_the_magic_is_searched() {
        let (elf, content) = kernel_like(100);
        let frame = legacy_frame(&content, 1 << 20);
        let bz = fake_bzimage(&frame, false);
        let p = locate_lz4_payload(&bz).unwrap();
        assert!(!p.from_header);
        assert_eq!(p.range.start, 4 * 512 + 700);
        assert_eq!(p.range.end, bz.len());
        assert_eq!(extract_vmlinux(&bz).unwrap(), elf);
    }

    #[test]
    fn multi_block_streams_and_concatenated_frames_decode() {
        let data: Vec<u8> = (0..300_000u32)
            .flat_map(|i| (i / 3).to_le_bytes())
            .collect();
        let mut frame = legacy_frame(&data[..500_000], 100_000);
        frame.truncate(frame.len() - 4);
        let second = legacy_frame(&data[500_000..], 100_000);
        frame.extend_from_slice(&second);
        assert_eq!(decompress_lz4_legacy(&frame).unwrap(), data);
    }

    #[test]
    fn wrong_trailing_size_is_refused() {
        let (_, content) = kernel_like(0);
        let mut frame = legacy_frame(&content, 65536);
        let n = frame.len();
        frame[n - 4..].copy_from_slice(&1234u32.to_le_bytes());
        let bz = fake_bzimage(&frame, true);
        assert!(matches!(
            extract_vmlinux(&bz),
            Err(Error::LengthMismatch { expected: 1234, .. })
        ));
    }

    #[test]
    fn corrupt_or_missing_payloads_are_refused() {
        assert!(matches!(
            extract_vmlinux(&[0u8; 4096]),
            Err(Error::NoLz4Payload)
        ));
        let (_, content) = kernel_like(0);
        let mut frame = legacy_frame(&content, 65536);
        // a literal run longer than the block: the decoder must refuse it
        frame[8] = 0xff;
        frame[9] = 0xff;
        let bz = fake_bzimage(&frame, true);
        assert!(matches!(extract_vmlinux(&bz), Err(Error::Corrupt { .. })));
        let not_elf = legacy_frame(&[0x11u8; 5000], 4096);
        assert!(matches!(
            extract_vmlinux(&fake_bzimage(&not_elf, true)),
            Err(Error::NotElf(_))
        ));
    }
}
