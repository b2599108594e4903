//! What a benchmark or the demo needs before it starts guests: the release `vmm` binary, the
//! guest kernel and initramfs (`guest-images build`, only when missing) and composed guest
//! memory images (`guest-images compose`, idempotent), through the `guest-images` library.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use guest_images::build_images::{self, BuildConfig, MANIFEST};
use guest_images::compose::{DEFAULT_RESERVED_LOW, Params};
use guest_images::compose_images::{self, ComposeConfig, DEFAULT_PACKAGES, Sidecar};
use guest_images::manifest::{self, Manifest};
use guest_images::units::format_size;
use test_guests::PAGE_SIZE;

/// Errors preparing binaries and images.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Cargo could not be run.
    #[error("cannot run {cargo}")]
    Cargo {
        /// The cargo command.
        cargo: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `cargo build` failed.
    #[error("`cargo build --release -p vmm` failed ({0})")]
    BuildFailed(String),
    /// Cargo built no `vmm` executable.
    #[error("`cargo build --release -p vmm` named no vmm executable")]
    NoExecutable,
    /// The build manifest could not be read.
    #[error(transparent)]
    Manifest(#[from] manifest::Error),
    /// `guest-images build` failed.
    #[error("building the guest images")]
    Build(#[source] build_images::Error),
    /// `guest-images compose` failed.
    #[error("composing the guest memory images")]
    Compose(#[source] compose_images::Error),
    /// An image could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// The release `vmm` binary: `VMM_BIN` when set, else built with `cargo build --release -p vmm`
/// (the `cargo` running this program, `$CARGO`, when there is one) and found in cargo's own
/// report of what it built, wherever the target folder is.
pub fn release_vmm() -> Result<PathBuf, Error> {
    if let Some(path) = std::env::var_os("VMM_BIN") {
        return Ok(PathBuf::from(path));
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let name = cargo.to_string_lossy().into_owned();
    eprintln!("building the release vmm binary (cargo build --release -p vmm) ...");
    let mut child = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "-p",
            "vmm",
            "--bin",
            "vmm",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(vmm_tests::workspace_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Cargo {
            cargo: name.clone(),
            source,
        })?;
    let mut executable = None;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line.map_err(|source| Error::Cargo {
                cargo: name.clone(),
                source,
            })?;
            if let Some(path) = vmm_executable(&line) {
                executable = Some(path);
            }
        }
    }
    let status = child.wait().map_err(|source| Error::Cargo {
        cargo: name.clone(),
        source,
    })?;
    if !status.success() {
        return Err(Error::BuildFailed(status.to_string()));
    }
    executable.ok_or(Error::NoExecutable)
}

/// The executable of the `vmm` binary named by one line of cargo's JSON messages, if any.
pub fn vmm_executable(line: &str) -> Option<PathBuf> {
    let message: serde_json::Value = serde_json::from_str(line).ok()?;
    let target = &message["target"];
    let is_vmm_bin = message["reason"] == "compiler-artifact"
        && target["name"] == "vmm"
        && target["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|k| k == "bin"));
    if !is_vmm_bin {
        return None;
    }
    message["executable"].as_str().map(PathBuf::from)
}

/// The folder `guest-images build` writes to (`guest-images/out`, or `VMM_GUEST_IMAGES`).
pub fn images_dir() -> PathBuf {
    vmm_tests::guest_images_dir()
}

/// Builds the guest kernel and initramfs unless a valid build is already in `out`; returns
/// whether it built.
pub fn build_images_if_missing(out: &Path) -> Result<bool, Error> {
    // A copy of the outputs may leave out vmlinux, which vmlinuz holds. Failing that, the
    // check below finds the build invalid and builds again.
    if let Err(e) = build_images::restore_vmlinux(out) {
        eprintln!("warning: {e}");
    }
    let valid = Manifest::load(&out.join(MANIFEST))?
        .map(|m| m.outputs_match(out))
        .transpose()?
        .unwrap_or(false);
    if valid {
        return Ok(false);
    }
    eprintln!(
        "building the guest images in {} (guest-images build) ...",
        out.display()
    );
    build_images::build(&BuildConfig {
        out: out.to_owned(),
        workspace: vmm_tests::workspace_root(),
        workload_bin: None,
    })
    .map_err(Error::Build)?;
    Ok(true)
}

/// Composed guest memory images, one per guest.
#[derive(Debug, Clone)]
pub struct Images {
    /// Their folder.
    pub dir: PathBuf,
    /// The image files, in guest order.
    pub files: Vec<PathBuf>,
    /// What `compose.json` says about them.
    pub sidecar: Sidecar,
}

impl Images {
    /// Size of each image in bytes (the guests' RAM).
    pub fn size(&self) -> u64 {
        self.sidecar.image_size
    }

    /// Reads guest `guest`'s page at `gpa` from its image.
    pub fn page(&self, guest: usize, gpa: u64) -> Result<Vec<u8>, Error> {
        let path = &self.files[guest];
        let read = |source| Error::Read {
            path: path.clone(),
            source,
        };
        let file = File::open(path).map_err(read)?;
        let mut page = vec![0u8; PAGE_SIZE];
        file.read_exact_at(&mut page, gpa).map_err(read)?;
        Ok(page)
    }
}

/// Folder of the images for `guests` guests of `size` bytes: their own per size, so that
/// compositions with other parameters (`guest-images compose` writes to `out/compose`) never
/// replace them while a benchmark reads them.
pub fn compose_dir(out: &Path, guests: usize, size: u64) -> PathBuf {
    let size = if size % (1 << 20) == 0 {
        format!("{}M", size >> 20)
    } else {
        format!("{}K", size >> 10)
    };
    out.join(format!("compose-{guests}x{size}"))
}

/// Builds the guest images if missing, then composes `guests` images of `size` bytes each
/// with the default mix (10% unique, 10% zero pages, seed 1; nothing is written when they
/// are up to date).
pub fn compose(guests: usize, size: u64) -> Result<Images, Error> {
    let out = images_dir();
    build_images_if_missing(&out)?;
    let dest = compose_dir(&out, guests, size);
    eprintln!(
        "composing {guests} x {} guest images in {} (guest-images compose) ...",
        format_size(size),
        dest.display()
    );
    let report = compose_images::compose_images(&ComposeConfig {
        out,
        dest: dest.clone(),
        packages: DEFAULT_PACKAGES.iter().map(|p| p.to_string()).collect(),
        params: Params {
            guests,
            image_size: size,
            unique: 0.1,
            zero: 0.1,
            seed: 1,
            reserved_low: DEFAULT_RESERVED_LOW,
        },
        force: false,
    })
    .map_err(Error::Compose)?;
    let files = report
        .sidecar
        .images
        .iter()
        .map(|i| dest.join(&i.file))
        .collect();
    Ok(Images {
        dir: dest,
        files,
        sidecar: report.sidecar,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_names_the_vmm_executable() {
        let line = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/vmm#0.1.0","target":{"kind":["bin"],"crate_types":["bin"],"name":"vmm","src_path":"/w/vmm/src/main.rs"},"executable":"/w/target/release/vmm","fresh":true}"#;
        assert_eq!(
            vmm_executable(line),
            Some(PathBuf::from("/w/target/release/vmm"))
        );
        let lib = line.replace(r#"["bin"]"#, r#"["lib"]"#);
        assert_eq!(vmm_executable(&lib), None);
        let other = line.replace(r#""name":"vmm""#, r#""name":"vm-dedup""#);
        assert_eq!(vmm_executable(&other), None);
        assert_eq!(
            vmm_executable(r#"{"reason":"build-finished","success":true}"#),
            None
        );
        assert_eq!(vmm_executable("not json"), None);
    }

    #[test]
    fn a_folder_per_composition_size() {
        let out = Path::new("/o");
        assert_eq!(
            compose_dir(out, 4, 512 << 20),
            PathBuf::from("/o/compose-4x512M")
        );
        assert_eq!(
            compose_dir(out, 2, 1 << 30),
            PathBuf::from("/o/compose-2x1024M")
        );
        assert_eq!(
            compose_dir(out, 1, (1 << 30) + 4096),
            PathBuf::from("/o/compose-1x1048580K")
        );
    }
}
