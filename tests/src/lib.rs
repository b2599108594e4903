//! Shared harness for the integration tests in `tests/tests/`.
//!
//! Tests that need KVM start with `if !vmm_tests::require_kvm() { return; }`: on a host without an
//! accessible `/dev/kvm` they print a loud `skipped:` line and pass, unless `VMM_REQUIRE_KVM=1`
//! (set by CI), which turns the skip into a failure.

use std::fs::OpenOptions;
use std::path::PathBuf;

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
