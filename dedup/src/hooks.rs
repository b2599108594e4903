//! Hooks the VMM can give the engine for each guest: which pages were written since the last
//! pass (from KVM's dirty log and its own writes), and which pages must not be merged right now
//! (device I/O in flight).
//!
//! A hook that panics does not take the engine down with it: the panic is caught where the
//! engine calls the hook (the engine's locks are not poisoned, and no page is left
//! write-protected), logged, and answered in the safe way: a dirty source that panics "cannot
//! tell" (every page of the region is hashed), an exclusion source that panics excludes the
//! page (it is not merged).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::GuestAddress;

/// Tells which pages of a guest region were written since the previous call.
pub trait DirtySource: Send + Sync {
    /// Sets bit `i % 64` of `dirty[i / 64]` for every page `i` of region `region` (index in the
    /// guest memory's region order, starting at `gpa`, `pages` pages long) written since the
    /// previous call for that region, and forgets them. `dirty` comes zeroed. Returns `false`
    /// when it cannot tell, in which case every page is hashed (as when it panics).
    fn take_dirty(&self, region: usize, gpa: GuestAddress, pages: usize, dirty: &mut [u64])
    -> bool;
}

/// Tells which pages must not be merged now.
pub trait ExclusionSource: Send + Sync {
    /// Whether the page at `gpa` has device I/O in flight (pinned by a device or a host
    /// thread doing direct I/O). Asked while the page is write-protected: the answer must not
    /// wait for anything a thread writing guest memory may hold (that writer may be blocked on
    /// this very page), so keep it to atomics or a lock no writer holds while writing. A panic
    /// counts as `true`.
    fn is_excluded(&self, gpa: GuestAddress) -> bool;
}

/// Panics of hooks caught so far (in the whole process), for rate-limited logging.
static PANICS: AtomicU64 = AtomicU64::new(0);

/// Logs the first panic of a hook and then every 1024th, with the count and what the engine
/// does instead (`instead`).
fn log_panic(what: &str, gpa: GuestAddress, instead: &str) {
    let n = PANICS.fetch_add(1, Ordering::Relaxed) + 1;
    if n == 1 || n % 1024 == 0 {
        log::error!(
            "vm-dedup: {what} panicked at {:#x} ({n} hook panics so far); {instead}",
            gpa.0
        );
    }
}

/// Asks `source` which pages of a region of `pages` pages at `gpa` were written: `None` when
/// it cannot tell (or panics).
pub(crate) fn take_dirty(
    source: &dyn DirtySource,
    region: usize,
    gpa: GuestAddress,
    pages: usize,
) -> Option<Vec<u64>> {
    let mut bitmap = vec![0u64; pages.div_ceil(64)];
    let known = catch_unwind(AssertUnwindSafe(|| {
        source.take_dirty(region, gpa, pages, &mut bitmap)
    }))
    .unwrap_or_else(|_| {
        log_panic(
            "a dirty-page source",
            gpa,
            "hashing every page of the region",
        );
        false
    });
    known.then_some(bitmap)
}

/// Asks `source` whether the page at `gpa` must not be merged now (`true` when it panics).
pub(crate) fn is_excluded(source: &dyn ExclusionSource, gpa: GuestAddress) -> bool {
    catch_unwind(AssertUnwindSafe(|| source.is_excluded(gpa))).unwrap_or_else(|_| {
        log_panic("an exclusion source", gpa, "the page is not merged");
        true
    })
}
