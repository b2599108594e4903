//! The engine's dirty-page source for one guest: KVM's dirty log of the guest's memory slots
//! (pages the guest, or KVM on its behalf, wrote) OR'ed with vm-memory's write bitmap of the
//! region (pages the VMM itself wrote: memory images, boot structures, device data). Pages in
//! neither were not written since the previous pass, so the engine keeps their hash instead of
//! reading them again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use vm_dedup::DirtySource;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{DirtyLogReader, GuestMem};

/// ORs `from` into `into` for the first `pages` bits; returns how many of those bits are set in
/// `from`.
pub fn merge_bits(into: &mut [u64], from: &[u64], pages: usize) -> u64 {
    let mut count = 0;
    for (i, (dst, &src)) in into.iter_mut().zip(from).enumerate() {
        let first = i * 64;
        if first >= pages {
            break;
        }
        let mask = if pages - first >= 64 {
            u64::MAX
        } else {
            (1u64 << (pages - first)) - 1
        };
        let bits = src & mask;
        count += u64::from(bits.count_ones());
        *dst |= bits;
    }
    count
}

/// KVM dirty log plus vm-memory write bitmap of one guest.
///
/// It holds the guest's memory weakly: the engine, which owns this source, keeps the memory
/// alive while the guest is registered, and at exit the VMM lets go of the guests with
/// `Engine::release`, which copies every merged page back into private memory when anyone
/// else still holds it. A strong reference here would make every stop pay that copy for RAM
/// that is about to be freed.
#[derive(Debug)]
pub struct DirtyLog {
    reader: DirtyLogReader,
    memory: Weak<GuestMem>,
    reported: AtomicU64,
}

impl DirtyLog {
    /// A source reading `reader` (the guest's slots) and the write bitmaps of `memory` (while
    /// anyone else keeps it).
    pub fn new(reader: DirtyLogReader, memory: Arc<GuestMem>) -> Self {
        Self {
            reader,
            memory: Arc::downgrade(&memory),
            reported: AtomicU64::new(0),
        }
    }

    /// Pages reported written so far (KVM and VMM writes of a page in one pass count once).
    pub fn pages_reported(&self) -> u64 {
        self.reported.load(Ordering::Relaxed)
    }

    fn vmm_writes(&self, region: usize, gpa: GuestAddress) -> Option<Vec<u64>> {
        let memory = self.memory.upgrade()?;
        let r = memory.iter().nth(region)?;
        if r.start_addr() != gpa {
            return None;
        }
        let bitmap: &Option<AtomicBitmap> = MmapRegion::bitmap(r);
        bitmap.as_ref().map(AtomicBitmap::get_and_reset)
    }
}

impl DirtySource for DirtyLog {
    fn take_dirty(
        &self,
        region: usize,
        gpa: GuestAddress,
        pages: usize,
        dirty: &mut [u64],
    ) -> bool {
        let Some(vmm) = self.vmm_writes(region, gpa) else {
            log::warn!(
                "dedup: no write bitmap for the region at {:#x}: hashing every page",
                gpa.0
            );
            return false;
        };
        let kvm = match self.reader.read_slot(region) {
            Some(Ok(log)) if log.slot.guest_addr == gpa.0 => log.bitmap,
            Some(Ok(log)) => {
                log::warn!(
                    "dedup: slot {} is at {:#x}, not {:#x}: hashing every page",
                    log.slot.slot,
                    log.slot.guest_addr,
                    gpa.0
                );
                return false;
            }
            Some(Err(e)) => {
                log::warn!("dedup: {e}: hashing every page");
                return false;
            }
            None => return false,
        };
        merge_bits(dirty, &kvm, pages);
        merge_bits(dirty, &vmm, pages);
        let written = merge_bits(&mut vec![0; dirty.len()], dirty, pages);
        self.reported.fetch_add(written, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_ored_and_counted_up_to_the_page_count() {
        let mut into = vec![0b1000u64, 0];
        let from = [0b0011u64, u64::MAX];
        assert_eq!(merge_bits(&mut into, &from, 70), 2 + 6);
        assert_eq!(into, [0b1011, 0b11_1111]);
        // Bits past the last page and words past the end are ignored.
        let mut into = vec![0u64];
        assert_eq!(merge_bits(&mut into, &[u64::MAX, u64::MAX], 3), 3);
        assert_eq!(into, [0b111]);
        let mut into = vec![0u64; 2];
        assert_eq!(merge_bits(&mut into, &[1], 128), 1);
        assert_eq!(into, [1, 0]);
    }
}
