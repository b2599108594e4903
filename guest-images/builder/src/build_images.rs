//! `guest-images build`: the Debian cloud kernel and an initramfs with busybox, `/init` and the
//! guest workload, recorded in `manifest.json`.
//!
//! Steps: build the static workload; resolve `linux-image-cloud-amd64` to its kernel package and
//! `busybox-static` to its candidate (apt-cache); stop there when `manifest.json` records the same
//! packages and inputs and every output still has its sum; otherwise fetch the `.deb` files into
//! `<out>/cache/debs` (kept: a later build downloads nothing), unpack them, and write `vmlinuz`,
//! `vmlinux`, `initramfs.cpio` and `manifest.json`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use log::{info, warn};
use thiserror::Error;

use crate::apt::{self, Apt, PackageInfo};
use crate::bzimage;
use crate::cpio;
use crate::initramfs::{self, INIT_SCRIPT};
use crate::manifest::{self, FORMAT, FileRecord, Manifest};
use crate::units::format_size;
use crate::workload_bin;

/// Metapackage that names the current Debian cloud kernel.
pub const KERNEL_META: &str = "linux-image-cloud-amd64";
/// Package with the static busybox.
pub const BUSYBOX: &str = "busybox-static";
/// Output: the kernel as Debian ships it (bzImage).
pub const VMLINUZ: &str = "vmlinuz";
/// Output: the ELF kernel extracted from the bzImage.
pub const VMLINUX: &str = "vmlinux";
/// Output: the initramfs (newc cpio, uncompressed).
pub const INITRAMFS: &str = "initramfs.cpio";
/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";

/// Errors from a build.
#[derive(Debug, Error)]
pub enum Error {
    /// A package step failed.
    #[error(transparent)]
    Apt(#[from] apt::Error),
    /// The workload binary could not be built or used.
    #[error(transparent)]
    Workload(#[from] workload_bin::Error),
    /// The manifest or an output could not be read or written.
    #[error(transparent)]
    Manifest(#[from] manifest::Error),
    /// The kernel package holds no `/boot/vmlinuz-*`, or several.
    #[error("{0} does not hold exactly one /boot/vmlinuz-*")]
    NoKernel(String),
    /// A file in an unpacked package could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The ELF kernel could not be extracted.
    #[error("cannot extract vmlinux from {0}")]
    Vmlinux(String, #[source] bzimage::Error),
    /// The initramfs could not be written.
    #[error("cannot build the initramfs")]
    Initramfs(#[source] cpio::Error),
    /// An output derived again from another does not have its recorded sum.
    #[error(
        "{0} extracted again differs from the one the manifest records: run `guest-images build`"
    )]
    Restored(&'static str),
}

/// What to build and where.
#[derive(Debug, Clone)]
pub struct BuildConfig {
    /// Output folder (`guest-images/out`).
    pub out: PathBuf,
    /// Workspace root, where the workload is built.
    pub workspace: PathBuf,
    /// A prebuilt static workload binary to use instead of building one.
    pub workload_bin: Option<PathBuf>,
}

/// The result of a build.
#[derive(Debug, Clone)]
pub struct BuildReport {
    /// The manifest of the outputs now in the output folder.
    pub manifest: Manifest,
    /// `true` when the outputs already matched and nothing was written.
    pub up_to_date: bool,
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

/// The kernel and busybox packages that a build uses now.
fn resolve(apt: &mut Apt) -> Result<[PackageInfo; 2], apt::Error> {
    let kernel = apt.depends(KERNEL_META, "linux-image-")?;
    Ok([apt.show(&kernel)?, apt.show(BUSYBOX)?])
}

/// The single `boot/vmlinuz-*` under `root` and its kernel release.
fn find_vmlinuz(root: &Path, package: &str) -> Result<(PathBuf, String), Error> {
    let boot = root.join("boot");
    let entries = fs::read_dir(&boot).map_err(|source| Error::Read {
        path: boot.clone(),
        source,
    })?;
    let found: Vec<(PathBuf, String)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let release = name.strip_prefix("vmlinuz-")?.to_owned();
            Some((e.path(), release))
        })
        .collect();
    match <[_; 1]>::try_from(found) {
        Ok([one]) => Ok(one),
        Err(_) => Err(Error::NoKernel(package.to_owned())),
    }
}

/// Whether the previous manifest still describes the outputs for these sources.
fn still_valid(
    previous: Option<&Manifest>,
    out: &Path,
    packages: Option<&[manifest::PackageRecord]>,
    inputs: &[FileRecord],
) -> Result<bool, Error> {
    let Some(prev) = previous else {
        return Ok(false);
    };
    let sources = match packages {
        Some(p) => prev.same_sources(p, inputs),
        None => prev.format == FORMAT && prev.inputs == inputs,
    };
    Ok(sources && prev.outputs_match(out)?)
}

/// Writes `vmlinux` again from `vmlinuz` when the manifest in `out` records both, `vmlinuz` is
/// there as recorded and `vmlinux` is missing or of another size (it is derived from
/// `vmlinuz`: 50 MiB that a copy of the outputs need not carry; a file of the recorded size is
/// left for [`Manifest::outputs_match`] to judge). The result must have the recorded sum.
/// Returns whether it wrote `vmlinux`.
pub fn restore_vmlinux(out: &Path) -> Result<bool, Error> {
    let Some(manifest) = Manifest::load(&out.join(MANIFEST))? else {
        return Ok(false);
    };
    let record = |name: &str| manifest.outputs.iter().find(|o| o.name == name);
    let (Some(zrec), Some(xrec)) = (record(VMLINUZ), record(VMLINUX)) else {
        return Ok(false);
    };
    let present = fs::metadata(out.join(VMLINUX)).is_ok_and(|m| m.len() == xrec.size);
    if present || !zrec.matches_in(out)? {
        return Ok(false);
    }
    let vmlinuz = read(&out.join(VMLINUZ))?;
    let vmlinux =
        bzimage::extract_vmlinux(&vmlinuz).map_err(|e| Error::Vmlinux(VMLINUZ.to_owned(), e))?;
    if FileRecord::of_bytes(VMLINUX, &vmlinux) != *xrec {
        return Err(Error::Restored(VMLINUX));
    }
    manifest::write_atomic(&out.join(VMLINUX), &vmlinux)?;
    info!("wrote {VMLINUX} again from {VMLINUZ}");
    Ok(true)
}

/// Runs the build.
pub fn build(config: &BuildConfig) -> Result<BuildReport, Error> {
    let out = &config.out;
    fs::create_dir_all(out).map_err(|source| manifest::Error::Io {
        path: out.clone(),
        source,
    })?;
    let workload_path = match &config.workload_bin {
        Some(p) => p.clone(),
        None => workload_bin::build(&config.workspace)?,
    };
    let workload = workload_bin::read_static(&workload_path)?;
    let inputs = vec![
        FileRecord::of_bytes("guest-workload", &workload),
        FileRecord::of_bytes("init", INIT_SCRIPT.as_bytes()),
    ];
    let manifest_path = out.join(MANIFEST);
    if let Err(e) = restore_vmlinux(out) {
        warn!("{e}");
    }
    let previous = Manifest::load(&manifest_path).unwrap_or_else(|e| {
        warn!("ignoring the old manifest: {e}");
        None
    });

    let mut apt = Apt::new();
    let [kernel, busybox] = match resolve(&mut apt) {
        Ok(found) => found,
        Err(e) => {
            if let Some(prev) = &previous
                && still_valid(Some(prev), out, None, &inputs)?
            {
                warn!("{e}; keeping the images that {MANIFEST} records");
                return Ok(BuildReport {
                    manifest: prev.clone(),
                    up_to_date: true,
                });
            }
            return Err(e.into());
        }
    };
    let packages = vec![kernel.record(), busybox.record()];
    if let Some(prev) = &previous
        && still_valid(Some(prev), out, Some(&packages), &inputs)?
    {
        info!("{} is up to date: nothing to download", out.display());
        return Ok(BuildReport {
            manifest: prev.clone(),
            up_to_date: true,
        });
    }

    let cache = out.join("cache").join("debs");
    let kernel_deb = apt.fetch(&kernel, &cache)?;
    let busybox_deb = apt.fetch(&busybox, &cache)?;
    let work = out.join("cache").join("extract");
    info!("unpacking {}", kernel.deb_name());
    let kernel_root = work.join("kernel");
    apt.extract(&kernel_deb, &kernel_root)?;
    let (vmlinuz_path, release) = find_vmlinuz(&kernel_root, &kernel.name)?;
    let vmlinuz = read(&vmlinuz_path)?;
    let busybox_root = work.join("busybox");
    apt.extract(&busybox_deb, &busybox_root)?;
    let busybox_bin = read(&busybox_root.join("bin").join("busybox"))?;

    info!("extracting vmlinux from vmlinuz-{release}");
    let vmlinux = bzimage::extract_vmlinux(&vmlinuz)
        .map_err(|e| Error::Vmlinux(format!("vmlinuz-{release}"), e))?;
    let initramfs = initramfs::build(&initramfs::Contents {
        busybox: &busybox_bin,
        workload: &workload,
        init: INIT_SCRIPT,
    })
    .map_err(Error::Initramfs)?;

    let mut outputs = Vec::new();
    for (name, data) in [
        (VMLINUZ, &vmlinuz),
        (VMLINUX, &vmlinux),
        (INITRAMFS, &initramfs),
    ] {
        manifest::write_atomic(&out.join(name), data)?;
        info!("wrote {name} ({})", format_size(data.len() as u64));
        outputs.push(FileRecord::of_bytes(name, data));
    }
    let manifest = Manifest {
        format: FORMAT,
        kernel_release: release,
        packages,
        inputs,
        outputs,
    };
    manifest.save(&manifest_path)?;
    if let Err(e) = fs::remove_dir_all(&work) {
        warn!("cannot remove {}: {e}", work.display());
    }
    Ok(BuildReport {
        manifest,
        up_to_date: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_one_kernel_in_boot() {
        let dir = std::env::temp_dir().join(format!("guest-images-boot-{}", std::process::id()));
        let boot = dir.join("boot");
        fs::create_dir_all(&boot).unwrap();
        fs::write(boot.join("config-6.1.0-9-cloud-amd64"), b"").unwrap();
        fs::write(boot.join("System.map-6.1.0-9-cloud-amd64"), b"").unwrap();
        assert!(matches!(find_vmlinuz(&dir, "k"), Err(Error::NoKernel(_))));
        fs::write(boot.join("vmlinuz-6.1.0-9-cloud-amd64"), b"bz").unwrap();
        let (path, release) = find_vmlinuz(&dir, "k").unwrap();
        assert_eq!(release, "6.1.0-9-cloud-amd64");
        assert_eq!(path, boot.join("vmlinuz-6.1.0-9-cloud-amd64"));
        fs::write(boot.join("vmlinuz-6.1.0-10-cloud-amd64"), b"bz").unwrap();
        assert!(matches!(find_vmlinuz(&dir, "k"), Err(Error::NoKernel(_))));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn vmlinux_is_written_again_from_vmlinuz() {
        use crate::bzimage::tests::{fake_bzimage, kernel_like, legacy_frame};
        let dir = std::env::temp_dir().join(format!("guest-images-restore-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (elf, content) = kernel_like(512);
        let vmlinuz = fake_bzimage(&legacy_frame(&content, 65536), true);
        let mut manifest = Manifest {
            format: FORMAT,
            kernel_release: "6.1.0-9-cloud-amd64".into(),
            packages: Vec::new(),
            inputs: Vec::new(),
            outputs: vec![
                FileRecord::of_bytes(VMLINUZ, &vmlinuz),
                FileRecord::of_bytes(VMLINUX, &elf),
            ],
        };
        manifest.save(&dir.join(MANIFEST)).unwrap();
        fs::write(dir.join(VMLINUZ), &vmlinuz).unwrap();
        assert!(!manifest.outputs_match(&dir).unwrap());
        assert!(restore_vmlinux(&dir).unwrap());
        assert_eq!(fs::read(dir.join(VMLINUX)).unwrap(), elf);
        assert!(manifest.outputs_match(&dir).unwrap());
        assert!(!restore_vmlinux(&dir).unwrap(), "nothing to do");
        // Not from a vmlinuz other than the recorded one.
        fs::remove_file(dir.join(VMLINUX)).unwrap();
        fs::write(dir.join(VMLINUZ), b"bz").unwrap();
        assert!(!restore_vmlinux(&dir).unwrap());
        assert!(!dir.join(VMLINUX).exists());
        // A result without the recorded sum is refused.
        fs::write(dir.join(VMLINUZ), &vmlinuz).unwrap();
        manifest.outputs[1] = FileRecord::of_bytes(VMLINUX, b"another kernel");
        manifest.save(&dir.join(MANIFEST)).unwrap();
        assert!(matches!(
            restore_vmlinux(&dir),
            Err(Error::Restored(VMLINUX))
        ));
        assert!(!dir.join(VMLINUX).exists());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_changed_input_or_output_invalidates_the_manifest() {
        let dir = std::env::temp_dir().join(format!("guest-images-valid-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(VMLINUZ), b"bz").unwrap();
        let inputs = vec![FileRecord::of_bytes("init", b"x")];
        let packages = vec![manifest::PackageRecord {
            name: "k".into(),
            version: "1".into(),
            file: "k_1_amd64.deb".into(),
            sha256: "00".into(),
        }];
        let m = Manifest {
            format: FORMAT,
            kernel_release: "r".into(),
            packages: packages.clone(),
            inputs: inputs.clone(),
            outputs: vec![FileRecord::of_bytes(VMLINUZ, b"bz")],
        };
        assert!(!still_valid(None, &dir, Some(&packages), &inputs).unwrap());
        assert!(still_valid(Some(&m), &dir, Some(&packages), &inputs).unwrap());
        assert!(still_valid(Some(&m), &dir, None, &inputs).unwrap());
        let other_inputs = vec![FileRecord::of_bytes("init", b"y")];
        assert!(!still_valid(Some(&m), &dir, Some(&packages), &other_inputs).unwrap());
        assert!(!still_valid(Some(&m), &dir, None, &other_inputs).unwrap());
        assert!(!still_valid(Some(&m), &dir, Some(&[]), &inputs).unwrap());
        fs::write(dir.join(VMLINUZ), b"changed").unwrap();
        assert!(!still_valid(Some(&m), &dir, Some(&packages), &inputs).unwrap());
        fs::remove_dir_all(dir).unwrap();
    }
}
