//! Failure injection (cargo feature `fault-injection`, for tests only): every merge-commit step
//! and pool operation asks [`Faults`] before its system call, and an armed point makes it fail
//! with a realistic errno instead. Without the feature every check is a constant `Ok`.

use std::io;
#[cfg(feature = "fault-injection")]
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A place where a failure can be injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// Write-protecting a batch (`UFFDIO_WRITEPROTECT`).
    Protect,
    /// Remapping pages onto a pool slot (`mmap`), failing with EIO.
    Remap,
    /// Remapping at the VMA limit (`mmap` failing with ENOMEM).
    RemapNoMem,
    /// Remapping fails (ENOMEM) after the kernel unmapped the range (`mmap` before Linux 6.12
    /// unmaps first); the slot is mapped into the hole.
    RemapLate,
    /// Dropping a zero page (`MADV_DONTNEED`).
    ZeroPage,
    /// Removing write protection from pages not merged.
    Unprotect,
    /// Waking blocked writers (`UFFDIO_WAKE`).
    Wake,
    /// Registering remapped pages with userfaultfd again.
    Reregister,
    /// Creating a node's pool (`memfd_create` failing with EMFILE).
    PoolCreate,
    /// Growing a pool file (ENOSPC).
    PoolGrow,
    /// Filling a pool slot (`pwrite`).
    PoolFill,
    /// Punching a freed pool slot.
    PoolPunch,
    /// Unmerging: moving a guest page into the rebuilt mapping (`UFFDIO_MOVE`); the page is
    /// copied under write protection instead.
    UnmergeMove,
    /// Unmerging: moving the rebuilt mapping over guest memory (`mremap`); the rebuild is
    /// rolled back and the pages are made private where they are.
    UnmergeRemap,
    /// Unmerging: the move over guest memory fails (ENOMEM) after the kernel unmapped the
    /// guest's range (`mremap` unmaps its destination first); the rebuilt copy is moved in
    /// again.
    UnmergeRemapLate,
    /// Unmerging, after `UnmergeRemapLate`: moving the rebuilt copy in again fails too; the
    /// region's memory is lost (see [`FaultPoint::loses_memory`]).
    UnmergeRefill,
    /// Discarding merged pages: mapping fresh memory over them fails (ENOMEM) after the kernel
    /// unmapped the range (`mmap` before Linux 6.12 unmaps first); fresh memory is mapped
    /// into the hole.
    DiscardLate,
    /// Discarding, after `DiscardLate`: fresh memory cannot be mapped into the hole either; the
    /// region's memory is lost (see [`FaultPoint::loses_memory`]).
    DiscardRefill,
}

/// Every fault point.
pub const FAULT_POINTS: [FaultPoint; 18] = [
    FaultPoint::Protect,
    FaultPoint::Remap,
    FaultPoint::RemapNoMem,
    FaultPoint::RemapLate,
    FaultPoint::ZeroPage,
    FaultPoint::Unprotect,
    FaultPoint::Wake,
    FaultPoint::Reregister,
    FaultPoint::PoolCreate,
    FaultPoint::PoolGrow,
    FaultPoint::PoolFill,
    FaultPoint::PoolPunch,
    FaultPoint::UnmergeMove,
    FaultPoint::UnmergeRemap,
    FaultPoint::UnmergeRemapLate,
    FaultPoint::UnmergeRefill,
    FaultPoint::DiscardLate,
    FaultPoint::DiscardRefill,
];

impl FaultPoint {
    /// Whether a failure here loses guest memory for good (the engine keeps going without the
    /// region, but nothing may read it): tests that arm points at random leave it out.
    pub fn loses_memory(self) -> bool {
        matches!(self, FaultPoint::UnmergeRefill | FaultPoint::DiscardRefill)
    }

    fn errno(self) -> i32 {
        match self {
            FaultPoint::RemapNoMem
            | FaultPoint::RemapLate
            | FaultPoint::UnmergeRemapLate
            | FaultPoint::UnmergeRefill
            | FaultPoint::DiscardLate
            | FaultPoint::DiscardRefill => libc::ENOMEM,
            FaultPoint::PoolCreate => libc::EMFILE,
            FaultPoint::PoolGrow => libc::ENOSPC,
            _ => libc::EIO,
        }
    }

    #[cfg(feature = "fault-injection")]
    fn index(self) -> usize {
        FAULT_POINTS.iter().position(|&p| p == self).unwrap_or(0)
    }
}

/// Armed failures of one engine.
#[derive(Debug, Default)]
pub struct Faults {
    #[cfg(feature = "fault-injection")]
    skip: [AtomicU64; FAULT_POINTS.len()],
    #[cfg(feature = "fault-injection")]
    fail: [AtomicU64; FAULT_POINTS.len()],
    #[cfg(feature = "fault-injection")]
    injected: [AtomicU64; FAULT_POINTS.len()],
    #[cfg(feature = "fault-injection")]
    collide: AtomicBool,
}

impl Faults {
    /// Makes `point` fail `times` times, after letting `after` calls through.
    #[cfg(feature = "fault-injection")]
    pub fn arm(&self, point: FaultPoint, after: u64, times: u64) {
        let i = point.index();
        self.skip[i].store(after, Ordering::SeqCst);
        self.fail[i].store(times, Ordering::SeqCst);
    }

    /// Disarms every point.
    #[cfg(feature = "fault-injection")]
    pub fn disarm_all(&self) {
        for p in FAULT_POINTS {
            self.arm(p, 0, 0);
        }
    }

    /// How many failures were injected at `point`.
    #[cfg(feature = "fault-injection")]
    pub fn injected(&self, point: FaultPoint) -> u64 {
        self.injected[point.index()].load(Ordering::SeqCst)
    }

    /// Makes every page hash equal, so that only byte comparison separates contents.
    #[cfg(feature = "fault-injection")]
    pub fn set_collide_hashes(&self, on: bool) {
        self.collide.store(on, Ordering::SeqCst);
    }

    /// Whether every page hash is forced equal.
    pub fn collide_hashes(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        {
            self.collide.load(Ordering::Relaxed)
        }
        #[cfg(not(feature = "fault-injection"))]
        {
            false
        }
    }

    /// As [`Faults::check`], for a step that the kernel can fail after unmapping its range
    /// (`mmap`'s and `mremap`'s destination): an injected failure unmaps `[addr, addr + len)`
    /// first, as the kernel's late failure does.
    ///
    /// # Safety
    /// The range must be memory the caller owns that nobody may read or write until the caller
    /// maps it again (guest memory under the write-protect guard, its content kept elsewhere).
    #[cfg_attr(not(feature = "fault-injection"), allow(unused_variables))]
    pub unsafe fn check_late(&self, point: FaultPoint, addr: usize, len: usize) -> io::Result<()> {
        self.check(point).inspect_err(|_| {
            #[cfg(feature = "fault-injection")]
            // SAFETY: the caller owns the range and nothing uses it until it is mapped again.
            let _ = unsafe { crate::sys::mem::unmap(addr, len) };
        })
    }

    /// `Err` with the point's errno when a failure is armed there.
    #[cfg_attr(not(feature = "fault-injection"), allow(unused_variables))]
    pub fn check(&self, point: FaultPoint) -> io::Result<()> {
        #[cfg(feature = "fault-injection")]
        {
            let i = point.index();
            if self.fail[i].load(Ordering::Relaxed) == 0 {
                return Ok(());
            }
            let take = |c: &AtomicU64| {
                c.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
                    .is_ok()
            };
            if take(&self.skip[i]) {
                return Ok(());
            }
            if take(&self.fail[i]) {
                self.injected[i].fetch_add(1, Ordering::SeqCst);
                return Err(io::Error::from_raw_os_error(point.errno()));
            }
            Ok(())
        }
        #[cfg(not(feature = "fault-injection"))]
        {
            let _ = point.errno();
            Ok(())
        }
    }
}

#[cfg(all(test, feature = "fault-injection"))]
mod tests {
    use super::*;

    #[test]
    fn armed_point_fails_after_skips() {
        let f = Faults::default();
        assert!(f.check(FaultPoint::Remap).is_ok());
        f.arm(FaultPoint::Remap, 1, 2);
        assert!(f.check(FaultPoint::Remap).is_ok());
        assert!(f.check(FaultPoint::Protect).is_ok());
        let e = f.check(FaultPoint::Remap).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(f.check(FaultPoint::Remap).is_err());
        assert!(f.check(FaultPoint::Remap).is_ok());
        assert_eq!(f.injected(FaultPoint::Remap), 2);
        f.arm(FaultPoint::RemapNoMem, 0, 1);
        assert_eq!(
            f.check(FaultPoint::RemapNoMem).unwrap_err().raw_os_error(),
            Some(libc::ENOMEM)
        );
    }
}
