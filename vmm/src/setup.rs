//! Prepares a guest's memory for its first instruction: loads the kernel and initrd or the
//! flat binary, writes the boot structures (GDT, page tables, and for Linux the command line,
//! ACPI tables and zero page), and says where each vCPU starts.

use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::arch::x86_64::layout::{
    ACPI_ADDR, BOOT_STACK_TOP, CMDLINE_ADDR, CMDLINE_MAX, GDT_ADDR, PML4_ADDR, ZERO_PAGE_ADDR,
    flat_stack_top, ram_end,
};
use crate::arch::x86_64::regs::BootArgs;
use crate::arch::x86_64::{acpi, boot, gdt, paging};
use crate::config::{Boot, GuestConfig};
use crate::loader::{self, SourceFile};
use crate::memory::{self, GuestRam};
use crate::vcpu::Start;

/// Errors preparing guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading guest code failed.
    #[error(transparent)]
    Load(#[from] loader::Error),
    /// Writing guest memory failed.
    #[error(transparent)]
    Memory(#[from] memory::Error),
    /// Boot data does not fit.
    #[error(transparent)]
    Boot(#[from] boot::Error),
    /// Page tables do not fit.
    #[error(transparent)]
    Paging(#[from] paging::Error),
    /// ACPI tables do not fit.
    #[error(transparent)]
    Acpi(#[from] acpi::Error),
    /// The command line holds a NUL byte.
    #[error("--cmdline holds a NUL byte: remove it")]
    CmdlineNul,
    /// The zero page could not be written.
    #[error("cannot write the zero page: {0}")]
    ZeroPage(#[source] vm_memory::GuestMemoryError),
}

/// Where the vCPUs of a prepared guest start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Linux: vCPU 0 at `rip` with the zero page in `rsi`; the others wait for INIT/SIPI.
    Linux {
        /// The kernel's 64-bit entry point.
        rip: u64,
    },
    /// Flat: every vCPU at `rip` with its index in `rdi`, the vCPU count in `rsi`, the end of
    /// the identity map in `rdx`, and its own stack.
    Flat {
        /// Where the binary was loaded.
        rip: u64,
        /// One past the last identity-mapped address.
        map_end: u64,
    },
}

impl Entry {
    /// The start state of vCPU `index` of `count`.
    pub fn start(&self, index: u32, count: u32) -> Start {
        match *self {
            Entry::Linux { rip } if index == 0 => Start::LongMode {
                rip,
                rsp: BOOT_STACK_TOP,
                args: BootArgs {
                    rsi: ZERO_PAGE_ADDR,
                    ..BootArgs::default()
                },
            },
            Entry::Linux { .. } => Start::WaitForSipi,
            Entry::Flat { rip, map_end } => Start::LongMode {
                rip,
                rsp: flat_stack_top(index),
                args: BootArgs {
                    rdi: u64::from(index),
                    rsi: u64::from(count),
                    rdx: map_end,
                },
            },
        }
    }
}

/// Loads what `config` boots into `ram` (already holding the memory image, if any) and writes
/// the boot structures.
pub fn prepare(ram: &GuestRam, config: &GuestConfig) -> Result<Entry, Error> {
    let entry = match &config.boot {
        Boot::Linux {
            kernel,
            initrd,
            cmdline,
        } => prepare_linux(ram, config, kernel, initrd.as_deref(), cmdline)?,
        Boot::Flat { image, entry } => {
            let file = SourceFile::open("--flat", image)?;
            // An empty binary loads nowhere; its entry point must still be guest RAM.
            if !ram.memory().address_in_range(GuestAddress(*entry)) {
                return Err(Error::Load(loader::Error::DoesNotFit {
                    what: "--flat",
                    path: image.clone(),
                    len: file.len(),
                    addr: *entry,
                }));
            }
            file.load(ram.memory(), *entry)?;
            Entry::Flat {
                rip: *entry,
                map_end: paging::identity_map_end(ram_end(ram.size())),
            }
        }
    };
    let table: Vec<u8> = gdt::boot_gdt()
        .iter()
        .flat_map(|d| d.to_le_bytes())
        .collect();
    ram.write(GDT_ADDR, &table)?;
    ram.write(PML4_ADDR, &paging::identity_map(ram_end(ram.size()))?)?;
    Ok(entry)
}

fn prepare_linux(
    ram: &GuestRam,
    config: &GuestConfig,
    kernel_path: &Path,
    initrd_path: Option<&Path>,
    cmdline: &str,
) -> Result<Entry, Error> {
    let kernel = loader::load_kernel(ram.memory(), kernel_path)?;
    let header = kernel.header.as_ref();

    if cmdline.contains('\0') {
        return Err(Error::CmdlineNul);
    }
    boot::check_cmdline(cmdline, header)?;
    let mut cmdline_bytes = cmdline.as_bytes().to_vec();
    cmdline_bytes.push(0);
    if cmdline_bytes.len() as u64 > CMDLINE_MAX {
        return Err(Error::Boot(boot::Error::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX as u32,
        }));
    }
    ram.write(CMDLINE_ADDR, &cmdline_bytes)?;

    let initrd = match initrd_path {
        Some(path) => {
            let file = SourceFile::open("--initrd", path)?;
            let size = file.len();
            let addr = boot::initrd_addr(ram.size(), kernel.end, size, header)?;
            file.load(ram.memory(), addr)?;
            Some((addr, size))
        }
        None => None,
    };

    let tables = acpi::build(ACPI_ADDR, config.vcpus)?;
    ram.write(tables.base, &tables.bytes)?;

    let params = boot::boot_params(&boot::BootInfo {
        header,
        mem: ram.size(),
        cmdline_addr: CMDLINE_ADDR,
        cmdline_len: cmdline_bytes.len() as u32,
        initrd,
        rsdp_addr: tables.rsdp_addr(),
    });
    ram.memory()
        .write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(Error::ZeroPage)?;
    Ok(Entry::Linux { rip: kernel.entry })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::HIMEM_START;
    use crate::config::guest_name;
    use std::io::Write;

    fn flat_config(image: &Path, entry: u64) -> GuestConfig {
        GuestConfig {
            name: guest_name(0),
            mem: 4 << 20,
            vcpus: 2,
            boot: Boot::Flat {
                image: image.to_path_buf(),
                entry,
            },
            mem_image: None,
            track_dirty: false,
        }
    }

    #[test]
    fn flat_guests_get_code_gdt_and_page_tables() {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        f.as_file().write_all(&[0xe6, 0xf4]).unwrap();
        let ram = GuestRam::new(4 << 20, false).unwrap();
        let entry = prepare(&ram, &flat_config(f.as_path(), HIMEM_START)).unwrap();
        assert_eq!(
            entry,
            Entry::Flat {
                rip: HIMEM_START,
                map_end: 1 << 32
            }
        );
        let code: [u8; 2] = ram.memory().read_obj(GuestAddress(HIMEM_START)).unwrap();
        assert_eq!(code, [0xe6, 0xf4]);
        let code_desc: u64 = ram
            .memory()
            .read_obj(GuestAddress(GDT_ADDR + 0x10))
            .unwrap();
        assert_eq!(code_desc, 0x00af_9b00_0000_ffff);
        let pml4e: u64 = ram.memory().read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4e & !0xfff, PML4_ADDR + 0x1000);
    }

    #[test]
    fn flat_vcpus_start_together_with_their_index_and_own_stack() {
        let e = Entry::Flat {
            rip: 0x10_0000,
            map_end: 1 << 32,
        };
        let args = BootArgs {
            rdi: 1,
            rsi: 2,
            rdx: 1 << 32,
        };
        assert_eq!(
            e.start(1, 2),
            Start::LongMode {
                rip: 0x10_0000,
                rsp: flat_stack_top(1),
                args
            }
        );
        let linux = Entry::Linux { rip: 0x100_0000 };
        assert_eq!(linux.start(1, 2), Start::WaitForSipi);
        match linux.start(0, 2) {
            Start::LongMode { args, .. } => assert_eq!(args.rsi, ZERO_PAGE_ADDR),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn empty_flat_binary_needs_its_entry_in_ram() {
        // Found by the loader fuzz target: an empty --flat file with --entry past the end of
        // RAM was accepted, and the vCPUs would have started outside RAM.
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let ram = GuestRam::new(4 << 20, false).unwrap();
        let err = prepare(&ram, &flat_config(f.as_path(), 8 << 20)).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        let err = prepare(&ram, &flat_config(f.as_path(), 4 << 20)).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        assert!(prepare(&ram, &flat_config(f.as_path(), (4 << 20) - 1)).is_ok());
    }

    #[test]
    fn flat_binary_past_the_end_of_ram_is_refused() {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        f.as_file().write_all(&[0x90; 16]).unwrap();
        let ram = GuestRam::new(4 << 20, false).unwrap();
        let err = prepare(&ram, &flat_config(f.as_path(), (4 << 20) - 8)).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }
}
