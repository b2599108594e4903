//! The little of ELF64 the builder needs: where a file's ELF content ends, and whether it asks
//! for a program interpreter (a dynamically linked executable does).

use thiserror::Error;

/// ELF identification bytes.
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// `p_type` of the program interpreter segment.
const PT_INTERP: u32 = 3;
/// `sh_type` of sections that take no file space.
const SHT_NOBITS: u32 = 8;

/// Errors from reading an ELF file.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// Not a little-endian 64-bit ELF file.
    #[error("not a little-endian ELF64 file")]
    NotElf64,
    /// A header or table lies outside the data.
    #[error("truncated ELF file: {0} out of bounds")]
    Truncated(&'static str),
}

/// What the builder reads from an ELF file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElfInfo {
    /// Bytes from the start covered by the ELF header, its tables, segments and sections.
    pub extent: u64,
    /// Whether a `PT_INTERP` segment names a dynamic loader.
    pub has_interp: bool,
}

fn u16_at(d: &[u8], off: usize, what: &'static str) -> Result<u16, Error> {
    d.get(off..off + 2)
        .and_then(|b| b.try_into().ok())
        .map(u16::from_le_bytes)
        .ok_or(Error::Truncated(what))
}

fn u32_at(d: &[u8], off: usize, what: &'static str) -> Result<u32, Error> {
    d.get(off..off + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(Error::Truncated(what))
}

fn u64_at(d: &[u8], off: usize, what: &'static str) -> Result<u64, Error> {
    d.get(off..off + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or(Error::Truncated(what))
}

/// Table location: offset, entry size, entry count.
fn table(
    d: &[u8],
    off: u64,
    entsize: u16,
    num: u16,
    what: &'static str,
) -> Result<(usize, usize, usize), Error> {
    let start = usize::try_from(off).map_err(|_| Error::Truncated(what))?;
    let (entsize, num) = (usize::from(entsize), usize::from(num));
    let end = start
        .checked_add(entsize * num)
        .ok_or(Error::Truncated(what))?;
    if num > 0 && end > d.len() {
        return Err(Error::Truncated(what));
    }
    Ok((start, entsize, num))
}

/// Reads the ELF64 headers of `data`.
pub fn inspect(data: &[u8]) -> Result<ElfInfo, Error> {
    if data.len() < 64 || &data[..4] != ELF_MAGIC || data[4] != 2 || data[5] != 1 {
        return Err(Error::NotElf64);
    }
    let phoff = u64_at(data, 0x20, "e_phoff")?;
    let shoff = u64_at(data, 0x28, "e_shoff")?;
    let ehsize = u16_at(data, 0x34, "e_ehsize")?;
    let (ph, phentsize, phnum) = table(
        data,
        phoff,
        u16_at(data, 0x36, "e_phentsize")?,
        u16_at(data, 0x38, "e_phnum")?,
        "program headers",
    )?;
    let (sh, shentsize, shnum) = table(
        data,
        shoff,
        u16_at(data, 0x3a, "e_shentsize")?,
        u16_at(data, 0x3c, "e_shnum")?,
        "section headers",
    )?;
    let mut extent = u64::from(ehsize)
        .max(phoff + (phentsize * phnum) as u64)
        .max(if shnum > 0 {
            shoff + (shentsize * shnum) as u64
        } else {
            0
        });
    let mut has_interp = false;
    for i in 0..phnum {
        let p = ph + i * phentsize;
        let p_type = u32_at(data, p, "p_type")?;
        let end =
            u64_at(data, p + 8, "p_offset")?.saturating_add(u64_at(data, p + 32, "p_filesz")?);
        has_interp |= p_type == PT_INTERP;
        extent = extent.max(end);
    }
    for i in 0..shnum {
        let s = sh + i * shentsize;
        if u32_at(data, s + 4, "sh_type")? != SHT_NOBITS {
            let end = u64_at(data, s + 0x18, "sh_offset")?.saturating_add(u64_at(
                data,
                s + 0x20,
                "sh_size",
            )?);
            extent = extent.max(end);
        }
    }
    if extent > data.len() as u64 {
        return Err(Error::Truncated("segment or section data"));
    }
    Ok(ElfInfo { extent, has_interp })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 file: header, `phnum` program headers (the first of type `first_type`)
    /// covering `body` bytes, one section header, then `trailing` junk bytes.
    pub(crate) fn tiny_elf(first_type: u32, body: usize, trailing: usize) -> Vec<u8> {
        let phoff = 64u64;
        let data_off = phoff + 56;
        let shoff = data_off + body as u64;
        let mut d = vec![0u8; shoff as usize + 64];
        d[..4].copy_from_slice(ELF_MAGIC);
        d[4] = 2;
        d[5] = 1;
        d[0x20..0x28].copy_from_slice(&phoff.to_le_bytes());
        d[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        d[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        d[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        d[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        d[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        d[0x3c..0x3e].copy_from_slice(&1u16.to_le_bytes());
        let p = phoff as usize;
        d[p..p + 4].copy_from_slice(&first_type.to_le_bytes());
        d[p + 8..p + 16].copy_from_slice(&data_off.to_le_bytes());
        d[p + 32..p + 40].copy_from_slice(&(body as u64).to_le_bytes());
        for (i, b) in d[data_off as usize..shoff as usize].iter_mut().enumerate() {
            *b = (i % 251) as u8 + 1;
        }
        d.extend(std::iter::repeat_n(0xee, trailing));
        d
    }

    #[test]
    fn extent_stops_at_the_last_table_and_ignores_trailing_data() {
        let elf = tiny_elf(1, 1000, 0);
        let len = elf.len() as u64;
        let info = inspect(&tiny_elf(1, 1000, 77)).unwrap();
        assert_eq!(info.extent, len);
        assert!(!info.has_interp);
    }

    #[test]
    fn interp_segment_is_detected() {
        assert!(inspect(&tiny_elf(PT_INTERP, 16, 0)).unwrap().has_interp);
    }

    #[test]
    fn bad_files_are_refused() {
        assert_eq!(inspect(b"not an elf file at all"), Err(Error::NotElf64));
        let mut elf32 = tiny_elf(1, 16, 0);
        elf32[4] = 1;
        assert_eq!(inspect(&elf32), Err(Error::NotElf64));
        let elf = tiny_elf(1, 1000, 0);
        assert!(matches!(
            inspect(&elf[..elf.len() - 10]),
            Err(Error::Truncated(_))
        ));
        assert!(matches!(inspect(&elf[..100]), Err(Error::Truncated(_))));
    }
}
