//! Guests run by the `vmm` library inside the test process (not a `vmm` child), for tests that
//! reach into the engine or the guests' memory directly.

use std::path::Path;

use test_guests::LOAD_ADDRESS;
use vmm::config::{Boot, GuestConfig, guest_name};

/// Guest `index` (named as `vmm` names it) running the probe binary at `probe` with `mem` bytes
/// of RAM, one vCPU, RAM starting as `image` when given, and write tracking on (as `--dedup`
/// sets it up).
pub fn probe_guest(index: u32, mem: u64, probe: &Path, image: Option<&Path>) -> GuestConfig {
    GuestConfig {
        name: guest_name(index),
        mem,
        vcpus: 1,
        boot: Boot::Flat {
            image: probe.to_path_buf(),
            entry: LOAD_ADDRESS,
        },
        mem_image: image.map(Path::to_path_buf),
        track_dirty: true,
    }
}
