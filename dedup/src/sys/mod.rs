//! The few places where the engine talks to the kernel directly: userfaultfd, mmap/madvise and
//! memfd, mlock, pagemap, NUMA queries and /proc. Everything above this module is safe Rust.

pub mod attrs;
pub mod mem;
pub mod numa;
pub mod pagemap;
pub mod procfs;
pub mod uffd;

/// Size of a base page on the hosts this engine supports (x86_64 and aarch64 with 4 KiB pages).
pub const PAGE_SIZE: usize = 4096;

/// `errno` of the last failed libc call on this thread, as an `io::Error`.
pub(crate) fn last_os_error() -> std::io::Error {
    std::io::Error::last_os_error()
}
