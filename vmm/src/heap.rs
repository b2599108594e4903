//! The process heap: large buffers go back to the host when they are freed.
//!
//! glibc serves allocations of 128 KiB and more with mappings of their own, but once such a
//! buffer is freed it raises that threshold (up to 32 MiB) and serves later large buffers from
//! its arenas, where freed memory mostly stays resident. The dedup engine allocates and frees
//! buffers of several MiB per pass while guests converge (candidate lists, plans); with the
//! threshold left to move they stayed in the VMM's memory for good (about 10 MiB of PSS with
//! 4 guests x 512 MiB). With the threshold fixed they go back to the host at each free, for a
//! few page faults per pass.

/// The size from which glibc maps allocations of their own: its default, kept fixed.
pub const MMAP_THRESHOLD: usize = 128 << 10;

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`], unless the user set malloc's behaviour
/// (`MALLOC_MMAP_THRESHOLD_` or `GLIBC_TUNABLES` in the environment). Returns whether it was
/// set; with another C library it does nothing and returns `false`.
pub fn return_large_frees() -> bool {
    let user_set = ["MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    !user_set && set_mmap_threshold(MMAP_THRESHOLD)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_mmap_threshold(bytes: usize) -> bool {
    let Ok(value) = libc::c_int::try_from(bytes) else {
        return false;
    };
    // SAFETY: mallopt only changes malloc's tuning; any value is accepted or refused (0).
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, value) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_mmap_threshold(_bytes: usize) -> bool {
    false
}
