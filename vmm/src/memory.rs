//! Guest RAM: private anonymous mappings from vm-memory, registered with KVM as memory slots,
//! optionally with write tracking (KVM dirty log and vm-memory's write bitmap), and filled from
//! a memory image.

use std::fs::File;
use std::io::{self, Read};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::arch::x86_64::layout::{PAGE_SIZE, ram_offset_to_gpa, ram_ranges};

/// Guest memory as the VMM and a deduplication engine see it. The bitmap is present when write
/// tracking is on.
pub type GuestMem = GuestMemoryMmap<Option<AtomicBitmap>>;

/// Bytes read from a memory image at a time.
const IMAGE_CHUNK: usize = 1 << 20;

/// Errors setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// mmap of guest RAM failed.
    #[error("cannot map {size} bytes of guest RAM: {source}")]
    Map {
        /// Bytes requested.
        size: u64,
        /// Cause.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The regions could not be assembled.
    #[error("cannot assemble guest RAM regions: {0}")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    /// A region at an address that overflows.
    #[error("guest RAM region at {0:#x} overflows the address space")]
    Overflow(u64),
    /// KVM refused a memory slot.
    #[error("KVM refused memory slot {slot} ({size} bytes at {addr:#x}): {source}")]
    Slot {
        /// Slot number.
        slot: u32,
        /// Guest address.
        addr: u64,
        /// Size.
        size: u64,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Reading the dirty log failed.
    #[error("cannot read KVM's dirty log for slot {slot}: {source}")]
    DirtyLog {
        /// Slot number.
        slot: u32,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The memory image cannot be opened or read.
    #[error("cannot read --mem-image {path}: {source}; check the path and its permissions")]
    ImageRead {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The memory image is larger than guest RAM.
    #[error(
        "--mem-image {path} is {len} bytes, larger than the guest's {} of RAM: give the guest more --mem",
        crate::config::format_size(*.mem)
    )]
    ImageTooLarge {
        /// The image.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// Guest RAM.
        mem: u64,
    },
    /// The memory image is a stream (a pipe, a character device) with more data than guest RAM.
    #[error(
        "--mem-image {path} is a stream larger than the guest's {} of RAM: give the guest more --mem",
        crate::config::format_size(*.mem)
    )]
    StreamTooLarge {
        /// The image.
        path: PathBuf,
        /// Guest RAM.
        mem: u64,
    },
    /// Writing guest memory failed (an address outside RAM).
    #[error("cannot write guest memory at {addr:#x}: {source}")]
    Write {
        /// Guest address.
        addr: u64,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// One KVM memory slot backed by guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySlot {
    /// KVM slot number.
    pub slot: u32,
    /// First guest-physical address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address of the first byte.
    pub host_addr: u64,
}

/// Pages written by the guest since the previous read, for one slot.
#[derive(Debug, Clone)]
pub struct SlotDirtyLog {
    /// The slot.
    pub slot: MemorySlot,
    /// One bit per page of the slot, page 0 in bit 0 of word 0.
    pub bitmap: Vec<u64>,
}

/// A guest's RAM.
#[derive(Debug, Clone)]
pub struct GuestRam {
    mem: Arc<GuestMem>,
    size: u64,
    track_dirty: bool,
}

impl GuestRam {
    /// Maps `size` bytes of RAM (private, anonymous, not reserved), laid out around the MMIO
    /// gap; with `track_dirty`, each region gets a vm-memory write bitmap.
    pub fn new(size: u64, track_dirty: bool) -> Result<Self, Error> {
        let regions = ram_ranges(size)
            .into_iter()
            .map(|(start, len)| {
                let bitmap = track_dirty.then(|| {
                    let page = NonZeroUsize::MIN.saturating_add(PAGE_SIZE as usize - 1);
                    AtomicBitmap::new(len as usize, page)
                });
                let mapping = MmapRegionBuilder::new_with_bitmap(len as usize, bitmap)
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
                    .build()
                    .map_err(|source| Error::Map { size: len, source })?;
                GuestRegionMmap::new(mapping, GuestAddress(start)).ok_or(Error::Overflow(start))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mem = GuestMem::from_regions(regions).map_err(Error::Regions)?;
        Ok(Self {
            mem: Arc::new(mem),
            size,
            track_dirty,
        })
    }

    /// The memory, shared with whoever else works on it.
    pub fn memory(&self) -> &Arc<GuestMem> {
        &self.mem
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether write tracking is on.
    pub fn tracks_dirty(&self) -> bool {
        self.track_dirty
    }

    /// Writes `bytes` at guest address `addr`.
    pub fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), Error> {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|source| Error::Write { addr, source })
    }

    /// Copies a raw image into RAM from its first byte, skipping all-zero pages (fresh RAM
    /// already reads as zero, and skipping them leaves them unallocated). The image may be a
    /// stream (a pipe, a character device), read to its end: one with more data than RAM is
    /// refused like a regular file larger than RAM.
    pub fn load_image(&self, path: &Path) -> Result<(), Error> {
        let read_err = |source| Error::ImageRead {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        // A stream's length reads as 0: only reading it tells.
        let stream = !meta.is_file();
        if !stream && meta.len() > self.size {
            return Err(Error::ImageTooLarge {
                path: path.to_path_buf(),
                len: meta.len(),
                mem: self.size,
            });
        }
        let mut buf = vec![0u8; IMAGE_CHUNK];
        let mut offset = 0u64;
        while offset < self.size {
            // Never past the end of RAM: the last chunk is cut to what is left.
            let left = usize::try_from(self.size - offset).unwrap_or(usize::MAX);
            let want = buf.len().min(left);
            let filled = read_full(&mut file, &mut buf[..want]).map_err(read_err)?;
            for (i, page) in buf[..filled].chunks(PAGE_SIZE as usize).enumerate() {
                if !vm_dedup::hash::is_zero(page) {
                    let at = offset + i as u64 * PAGE_SIZE;
                    self.write(ram_offset_to_gpa(at), page)?;
                }
            }
            offset += filled as u64;
            if filled < want {
                return Ok(());
            }
        }
        if stream && read_full(&mut file, &mut [0u8; 1]).map_err(read_err)? > 0 {
            return Err(Error::StreamTooLarge {
                path: path.to_path_buf(),
                mem: self.size,
            });
        }
        Ok(())
    }

    /// The KVM slots this RAM needs, one per region, numbered from 0.
    pub fn slots(&self) -> Vec<MemorySlot> {
        self.mem
            .iter()
            .enumerate()
            .map(|(slot, region)| MemorySlot {
                slot: slot as u32,
                guest_addr: region.start_addr().0,
                size: region.len(),
                host_addr: region.as_ptr() as u64,
            })
            .collect()
    }

    /// Registers every region with `vm` (with dirty logging when tracking is on).
    pub fn register(&self, vm: &VmFd) -> Result<Vec<MemorySlot>, Error> {
        let flags = if self.track_dirty {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        let slots = self.slots();
        for s in &slots {
            let region = kvm_userspace_memory_region {
                slot: s.slot,
                flags,
                guest_phys_addr: s.guest_addr,
                memory_size: s.size,
                userspace_addr: s.host_addr,
            };
            // SAFETY: `host_addr..host_addr + size` is a live mapping owned by `self.mem`, and
            // the `Arc` in `self` (kept by the guest for as long as its VM fd exists) keeps it
            // mapped while KVM may access it.
            unsafe { vm.set_user_memory_region(region) }.map_err(|source| Error::Slot {
                slot: s.slot,
                addr: s.guest_addr,
                size: s.size,
                source,
            })?;
        }
        Ok(slots)
    }
}

/// Reads a guest's KVM dirty log, from any thread, while the guest runs.
#[derive(Debug, Clone)]
pub struct DirtyLogReader {
    vm: Arc<VmFd>,
    slots: Vec<MemorySlot>,
}

impl DirtyLogReader {
    /// A reader for the `slots` of `vm` (registered with dirty logging).
    pub fn new(vm: Arc<VmFd>, slots: Vec<MemorySlot>) -> Self {
        Self { vm, slots }
    }

    /// The slots it reads, in the order of the guest's RAM regions.
    pub fn slots(&self) -> &[MemorySlot] {
        &self.slots
    }

    /// Returns and clears, per slot, the pages the guest wrote since the previous call.
    pub fn read(&self) -> Result<Vec<SlotDirtyLog>, Error> {
        self.slots.iter().map(|&slot| self.read_one(slot)).collect()
    }

    /// Returns and clears the pages the guest wrote in the `index`-th slot (the `index`-th RAM
    /// region) since the previous read of that slot; `None` when there is no such slot.
    pub fn read_slot(&self, index: usize) -> Option<Result<SlotDirtyLog, Error>> {
        self.slots.get(index).map(|&slot| self.read_one(slot))
    }

    fn read_one(&self, slot: MemorySlot) -> Result<SlotDirtyLog, Error> {
        self.vm
            .get_dirty_log(slot.slot, slot.size as usize)
            .map(|bitmap| SlotDirtyLog { slot, bitmap })
            .map_err(|source| Error::DirtyLog {
                slot: slot.slot,
                source,
            })
    }
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{GIB, MMIO_GAP_END, MMIO_GAP_START};
    use std::io::Write;
    use vm_memory::bitmap::Bitmap;

    fn temp_file(bytes: &[u8]) -> (vmm_sys_util::tempfile::TempFile, PathBuf) {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        f.as_file().write_all(bytes).unwrap();
        let path = f.as_path().to_path_buf();
        (f, path)
    }

    fn read_u8(ram: &GuestRam, addr: u64) -> u8 {
        ram.memory().read_obj(GuestAddress(addr)).unwrap()
    }

    #[test]
    fn large_ram_is_split_around_the_gap() {
        let ram = GuestRam::new(4 * GIB, false).unwrap();
        let slots = ram.slots();
        assert_eq!(slots.len(), 2);
        assert_eq!((slots[0].guest_addr, slots[0].size), (0, MMIO_GAP_START));
        assert_eq!((slots[1].guest_addr, slots[1].size), (MMIO_GAP_END, GIB));
        assert!(ram.memory().iter().all(|r| r.bitmap().is_none()));
    }

    #[test]
    fn tracking_adds_a_write_bitmap() {
        let ram = GuestRam::new(4 << 20, true).unwrap();
        assert!(ram.tracks_dirty());
        ram.write(0x3000, &[1]).unwrap();
        let region = ram.memory().iter().next().unwrap();
        assert!(region.bitmap().dirty_at(0x3000));
        assert!(!region.bitmap().dirty_at(0x4000));
    }

    #[test]
    fn image_is_copied_from_address_zero() {
        let mut image = vec![0u8; 3 * PAGE_SIZE as usize + 10];
        image[5] = 0xaa;
        image[3 * PAGE_SIZE as usize + 9] = 0xbb;
        let (_f, path) = temp_file(&image);
        let ram = GuestRam::new(4 << 20, false).unwrap();
        ram.load_image(&path).unwrap();
        assert_eq!(read_u8(&ram, 5), 0xaa);
        assert_eq!(read_u8(&ram, 3 * PAGE_SIZE + 9), 0xbb);
        assert_eq!(read_u8(&ram, PAGE_SIZE), 0);
    }

    #[test]
    fn image_larger_than_ram_is_refused() {
        let (_f, path) = temp_file(&vec![1u8; (2 << 20) + 1]);
        let ram = GuestRam::new(2 << 20, false).unwrap();
        let err = ram.load_image(&path).unwrap_err();
        assert!(matches!(err, Error::ImageTooLarge { .. }), "{err}");
        assert!(err.to_string().contains("--mem"));
    }

    /// Loads `len` bytes of 0xab streamed through a pipe into `mem` bytes of RAM.
    fn load_stream(mem: u64, len: usize) -> (GuestRam, Result<(), Error>) {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let fifo = dir.as_path().join("image");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) with a valid NUL-terminated path and mode.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let to = fifo.clone();
        let writer = std::thread::spawn(move || {
            let mut pipe = File::options().write(true).open(to).unwrap();
            // The reader stops at RAM's end plus a byte: the rest cannot be written.
            let _ = pipe.write_all(&vec![0xabu8; len]);
        });
        let ram = GuestRam::new(mem, false).unwrap();
        let loaded = ram.load_image(&fifo);
        writer.join().unwrap();
        (ram, loaded)
    }

    #[test]
    fn a_stream_image_fills_ram_and_no_further() {
        // RAM not a whole number of read chunks: the last chunk is cut short.
        let mem = (2 << 20) + PAGE_SIZE;
        for len in [PAGE_SIZE as usize + 7, mem as usize] {
            let (ram, loaded) = load_stream(mem, len);
            loaded.unwrap();
            assert_eq!(read_u8(&ram, len as u64 - 1), 0xab);
            assert_eq!(
                read_u8(&ram, mem - 1),
                if len as u64 == mem { 0xab } else { 0 }
            );
        }
    }

    #[test]
    fn a_stream_image_larger_than_ram_is_refused() {
        for mem in [2 << 20, (2 << 20) + PAGE_SIZE] {
            let (_ram, loaded) = load_stream(mem, mem as usize + 1);
            let err = loaded.unwrap_err();
            assert!(matches!(err, Error::StreamTooLarge { .. }), "{err}");
            assert!(err.to_string().contains("larger than the guest's"), "{err}");
        }
    }

    #[test]
    fn missing_image_says_which_file() {
        let ram = GuestRam::new(2 << 20, false).unwrap();
        let err = ram.load_image(Path::new("/nonexistent/image")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/image"), "{err}");
    }
}
