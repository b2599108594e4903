//! Hooks the VMM can give the engine for each guest: which pages were written since the last
//! pass (from KVM's dirty log and its own writes), and which pages must not be merged right now
//! (device I/O in flight).

use vm_memory::GuestAddress;

/// Tells which pages of a guest region were written since the previous call.
pub trait DirtySource: Send + Sync {
    /// Sets bit `i % 64` of `dirty[i / 64]` for every page `i` of region `region` (index in the
    /// guest memory's region order, starting at `gpa`, `pages` pages long) written since the
    /// previous call for that region, and forgets them. `dirty` comes zeroed. Returns `false`
    /// when it cannot tell, in which case every page is hashed.
    fn take_dirty(&self, region: usize, gpa: GuestAddress, pages: usize, dirty: &mut [u64])
    -> bool;
}

/// Tells which pages must not be merged now.
pub trait ExclusionSource: Send + Sync {
    /// Whether the page at `gpa` has device I/O in flight (pinned by a device or a host
    /// thread doing direct I/O). Asked while the page is write-protected: the answer must not
    /// wait for anything a thread writing guest memory may hold (that writer may be blocked on
    /// this very page), so keep it to atomics or a lock no writer holds while writing.
    fn is_excluded(&self, gpa: GuestAddress) -> bool;
}
