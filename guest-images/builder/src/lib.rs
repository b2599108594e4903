//! Guest images for the VMM, built reproducibly from Debian packages, and guest memory images
//! composed from real package files.
//!
//! - `guest-images build` ([`build_images`]): the current Debian cloud kernel (`vmlinuz`, and the
//!   ELF `vmlinux` extracted from it by [`bzimage`]), an initramfs ([`initramfs`], written by
//!   [`cpio`]) with busybox, `/init` and the static guest workload, and `manifest.json`
//!   ([`manifest`]).
//! - `guest-images compose` ([`compose_images`]): raw guest memory images holding package files
//!   at per-guest page offsets plus unique and zero pages, with the expected dedup statistics
//!   computed by the pure [`compose`] module.
//!
//! The pure parts work on bytes and need neither apt nor the network:
//!
//! ```
//! use guest_images::compose::{compose, Params, SourceFile};
//!
//! let files = vec![SourceFile { name: "pkg:/lib.so".into(), data: vec![0x5a; 3 * 4096] }];
//! let params = Params {
//!     guests: 2,
//!     image_size: 64 * 4096,
//!     unique: 0.25,
//!     zero: 0.25,
//!     seed: 7,
//!     reserved_low: 16 * 4096,
//! };
//! let c = compose(&files, params)?;
//! let totals = &c.stats().totals;
//! // two guests x 48 body pages: 12 unique and 12 zero each; the file pages are all one content
//! assert_eq!(totals.zero_pages, 24);
//! assert_eq!(totals.pages_shared, 1);
//! assert_eq!(totals.pages_sharing, 2 * 24 - 1);
//!
//! let mut image = std::io::Cursor::new(Vec::new());
//! c.write_image(0, &mut image, &mut |_| {})?;
//! assert_eq!(image.get_ref().len(), 64 * 4096);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod apt;
pub mod build_images;
pub mod bzimage;
pub mod compose;
pub mod compose_images;
pub mod cpio;
pub mod elf;
pub mod initramfs;
pub mod manifest;
pub mod progress;
pub mod units;
pub mod workload_bin;

use std::path::PathBuf;

/// The workspace root this crate was built from.
pub fn workspace_root() -> PathBuf {
    let builder = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    builder
        .parent()
        .and_then(|images| images.parent())
        .map(PathBuf::from)
        .unwrap_or(builder)
}

/// The default output folder: `guest-images/out` in the workspace.
pub fn default_out_dir() -> PathBuf {
    workspace_root().join("guest-images").join("out")
}
