//! Helpers shared by the fuzz targets in `fuzz_targets/`: checks on error messages, files in
//! memory that loaders can open by path, and page contents for the engine targets.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;

/// Size of a guest page.
pub const PAGE: usize = 4096;

/// The error-message rule the VMM's property tests check too (`vmm/tests/properties`).
#[path = "../../vmm/tests/properties/message.rs"]
pub mod message;

/// Asserts that `message` is a clear error for the user: not empty, one line without control
/// characters.
pub use message::one_line as check_message;

/// Files kept in memory (memfds), reachable by path as `/proc/self/fd/N`, so that loaders that
/// open files by path can be fed bytes without touching the disk.
static FILES: Mutex<Option<HashMap<&'static str, File>>> = Mutex::new(None);

/// Replaces the content of the in-memory file `name` with `bytes` and returns its path.
pub fn mem_file(name: &'static str, bytes: &[u8]) -> PathBuf {
    let mut files = FILES.lock().unwrap_or_else(|p| p.into_inner());
    let files = files.get_or_insert_with(HashMap::new);
    let file = files.entry(name).or_insert_with(|| {
        let cname = std::ffi::CString::new(name).unwrap_or_default();
        // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        File::from(unsafe { OwnedFd::from_raw_fd(fd) })
    });
    file.set_len(0)
        .unwrap_or_else(|e| panic!("truncating {name}: {e}"));
    file.write_all_at(bytes, 0)
        .unwrap_or_else(|e| panic!("writing {name}: {e}"));
    let _ = file.flush();
    PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(file)
    ))
}

/// Deterministic content of a page for `seed`: seed 0 is all zeros; seeds 1 to 127 are
/// pseudo-random pages; seed `128 + s` is the page of seed `s % 128` with its last byte
/// changed (a near twin, equal to it but for one byte). Different seeds below 256 always give
/// different bytes.
pub fn content(seed: u8) -> Vec<u8> {
    let mut out = vec![0u8; PAGE];
    let base = seed & 0x7f;
    if base != 0 {
        let mut x = u64::from(base).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for chunk in out.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_ne_bytes());
        }
    }
    if seed & 0x80 != 0 {
        out[PAGE - 1] ^= 0x5a;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_differ_by_seed() {
        let all: Vec<Vec<u8>> = (0..=255u8).map(content).collect();
        for a in 0..256 {
            for b in a + 1..256 {
                assert_ne!(all[a], all[b], "{a} {b}");
            }
        }
    }
}
