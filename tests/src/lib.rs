//! Shared harness for the integration tests in `tests/tests/`.
//!
//! Tests that need KVM start with `if !vmm_tests::require_kvm() { return; }`: on a host without an
//! accessible `/dev/kvm` they print a loud `skipped:` line and pass, unless `VMM_REQUIRE_KVM=1`
//! (set by CI), which turns the skip into a failure.
//!
//! [`VmmProcess`] runs the `vmm` binary as a child with its console on pipes; [`ProbeGuest`] and
//! [`ProbeConsole`] run the probe guest in it and speak its line protocol ([`ProbeProtocol`]):
//!
//! ```no_run
//! use vmm_tests::ProbeProtocol;
//!
//! let probe = vmm_tests::ProbeGuest::new();
//! let mut vmm = probe.spawn("16M", &["--vcpus", "2"]);
//! assert_eq!(vmm.probe().wait_ready(), 2);
//! vmm.probe().write(0x20_0000, 0x2a);
//! assert_eq!(vmm.probe().read(0x20_0000), 0x2a);
//! vmm.probe().exit(7);
//! assert_eq!(vmm.exit_code(), 7);
//! ```

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Instant;

mod api;
mod console;
mod images;
mod pagemap;
mod probe;
mod process;
mod protocol;
pub mod soak;

pub use api::{
    ApiClient, ApiReply, STATS_FIELDS, after_passes, assert_stats_shape, delta, field, guest_stats,
    settled,
};
pub use console::{CapturedConsole, ConsoleProbe};
pub use images::{CONTENT_BASE, DedupImages, Expected, Kinds};
pub use pagemap::{ProcessPages, pfns_visible, zero_pfn};
pub use probe::{ProbeConsole, ProbeGuest, pattern, temp_file_with, u64_at};
pub use process::{HANG_GUARD, Line, Stream, VmmProcess, join_cgroup_on_spawn};
pub use protocol::{ProbeProtocol, last_hex, reply_to};

/// The line printed when a KVM test is skipped.
pub const SKIP_LINE: &str = "skipped: /dev/kvm not accessible";

/// Returns `true` when `/dev/kvm` can be opened read-write.
///
/// Otherwise prints [`SKIP_LINE`] and returns `false`, or panics when the environment variable
/// `VMM_REQUIRE_KVM` is `1`.
pub fn require_kvm() -> bool {
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("VMM_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{SKIP_LINE} ({e}) and VMM_REQUIRE_KVM=1: KVM tests must run");
            }
            eprintln!("{SKIP_LINE} ({e})");
            false
        }
    }
}

/// Skips a test that needs a host feature this host lacks: prints `skipped: {why}`, or panics
/// when `VMM_REQUIRE_KVM` is `1` (as CI sets: its host has every feature the tests use, so a
/// skip there would hide lost coverage).
pub fn skip_for(why: &str) {
    if std::env::var("VMM_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("skipped: {why}, and VMM_REQUIRE_KVM=1: every test must run");
    }
    eprintln!("skipped: {why}");
}

/// Whether this host's KVM is `kvm_pvm` (shadow paging, guest code run by KVM's instruction
/// emulator: about a thousand times slower than hardware virtualization).
pub fn is_kvm_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Polls `done` every 10 ms until it returns `true`.
///
/// # Panics
/// When it is still `false` after [`HANG_GUARD`] (a guard against a hang, not a speed check),
/// with `what` and `details()` in the message.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool, details: impl Fn() -> String) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < HANG_GUARD,
            "{what} did not happen within {HANG_GUARD:?} (a hang guard)\n{}",
            details()
        );
        thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The `target/<profile>` folder this test executable was built into.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(|deps| deps.parent())
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Path of the `vmm` binary built by the same cargo invocation (or `VMM_BIN` when set).
///
/// # Panics
/// When the binary does not exist, with a message saying how to build it.
pub fn vmm_bin() -> PathBuf {
    let path = std::env::var_os("VMM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| profile_dir().join("vmm"));
    assert!(
        path.is_file(),
        "vmm binary not found at {}: run `cargo build -p vmm` (or set VMM_BIN)",
        path.display()
    );
    path
}

/// Root of the workspace checkout.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Folder holding the images written by `guest-images build` (or `VMM_GUEST_IMAGES` when set).
pub fn guest_images_dir() -> PathBuf {
    std::env::var_os("VMM_GUEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("guest-images").join("out"))
}
