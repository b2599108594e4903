//! `vmm::heap`: with the mmap threshold fixed, a large buffer freed after another one was freed
//! leaves the process's resident memory (glibc would otherwise have raised the threshold at the
//! first free and kept the second buffer in its heap). Its own test binary: malloc's settings
//! are process-wide.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

/// Resident pages of this process (/proc/self/statm), in bytes.
fn resident() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn large_buffers_go_back_to_the_host_when_freed() {
    assert!(vmm::heap::return_large_frees());
    const SIZE: usize = 8 << 20;
    // The first large free is the one after which glibc would raise its threshold.
    drop(std::hint::black_box(vec![1u8; SIZE]));
    let buffer = std::hint::black_box(vec![1u8; SIZE]);
    let with = resident();
    drop(buffer);
    let without = resident();
    assert!(
        with.saturating_sub(without) >= (SIZE as u64) * 3 / 4,
        "freeing {SIZE} bytes gave back {} bytes",
        with.saturating_sub(without)
    );
}
