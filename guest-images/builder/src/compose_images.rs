//! `guest-images compose`: guest memory images from the files of real Debian packages and of the
//! built guest kernel and initramfs, with the expected dedup statistics in a JSON sidecar.
//!
//! The packages are fetched with `apt-get download` into the build's `.deb` cache (idempotent;
//! versions and sums go into the sidecar), unpacked, and every regular file becomes a
//! [`SourceFile`] named `package:/path`, in sorted order; `vmlinuz`, `vmlinux` and
//! `initramfs.cpio` from `guest-images build` join them as `guest-images:/NAME`. The layout and
//! statistics are [`crate::compose`]'s. A second run with the same inputs and parameters finds
//! the sidecar and the images in place and writes nothing.

use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::time::Instant;

use log::{info, warn};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::apt::{self, Apt};
use crate::build_images::{INITRAMFS, MANIFEST, VMLINUX, VMLINUZ};
use crate::compose::{self, GuestStats, Params, SourceFile, Totals};
use crate::manifest::{self, FileRecord, Manifest, PackageRecord};
use crate::progress::Progress;
use crate::units::format_size;

/// Packages composed by default: C and C++ runtimes, two interpreters, core tools.
pub const DEFAULT_PACKAGES: &[&str] = &[
    "libc6",
    "libstdc++6",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "perl-base",
    "coreutils",
];
/// Build outputs composed along with the packages.
pub const BUILD_FILES: &[&str] = &[VMLINUZ, VMLINUX, INITRAMFS];
/// The sidecar's file name in the destination folder.
pub const SIDECAR: &str = "compose.json";
/// Version of the sidecar format.
pub const SIDECAR_FORMAT: u32 = 1;

/// Errors from composing images.
#[derive(Debug, Error)]
pub enum Error {
    /// `guest-images build` has not run, or its outputs changed since.
    #[error(
        "{0} holds no complete build ({MANIFEST} missing, or an output it lists missing or \
         changed): run `guest-images build`, which rebuilds what is missing"
    )]
    NoBuild(PathBuf),
    /// A name given to `--packages` cannot be a Debian package's.
    #[error(
        "--packages: {0:?} is not a Debian package name (lowercase letters, digits, '+', '-' \
         and '.', starting with a letter or digit)"
    )]
    BadPackage(String),
    /// `--dest` is not a folder.
    #[error("--dest {0}: exists and is not a folder")]
    DestNotDir(PathBuf),
    /// A package step failed.
    #[error(transparent)]
    Apt(#[from] apt::Error),
    /// A manifest or output file could not be used.
    #[error(transparent)]
    Manifest(#[from] manifest::Error),
    /// The parameters or sources cannot be composed.
    #[error("cannot compose the images")]
    Compose(#[source] compose::Error),
    /// A file could not be read or written.
    #[error("cannot access {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// What to compose and where.
#[derive(Debug, Clone)]
pub struct ComposeConfig {
    /// The build's output folder (its manifest, outputs and `.deb` cache).
    pub out: PathBuf,
    /// Where the images and the sidecar go.
    pub dest: PathBuf,
    /// Debian packages whose files are composed.
    pub packages: Vec<String>,
    /// Layout parameters.
    pub params: Params,
    /// Compose even when the sidecar says the images are up to date.
    pub force: bool,
}

/// One image in the sidecar.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Guest index.
    pub guest: usize,
    /// File name in the destination folder.
    pub file: String,
    /// Expected figures of the image's body.
    #[serde(flatten)]
    pub stats: GuestStats,
}

/// Where the composed content came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sources {
    /// Debian packages, with versions and `.deb` sums.
    pub packages: Vec<PackageRecord>,
    /// Files from `guest-images build`.
    pub build_outputs: Vec<FileRecord>,
    /// Source files (non-empty regular files).
    pub files: u64,
    /// Pages they take, page-aligned.
    pub file_pages: u64,
}

/// The sidecar `compose.json`: parameters, sources and expected statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sidecar {
    /// [`SIDECAR_FORMAT`].
    pub format: u32,
    /// sha256 over the parameters and the sources' sums: equal means the same images.
    pub inputs_sha256: String,
    /// Page size of the statistics.
    pub page_size: u64,
    /// Size of each image in bytes.
    pub image_size: u64,
    /// Number of images.
    pub guests: usize,
    /// Layout seed.
    pub seed: u64,
    /// Unique fraction of the body pages.
    pub unique_fraction: f64,
    /// Zero fraction of the body pages.
    pub zero_fraction: f64,
    /// Bytes at the start of each image that are zero and not counted in the statistics.
    pub reserved_low_bytes: u64,
    /// Why they are reserved.
    pub reserved_low_note: String,
    /// The images, in guest order.
    pub images: Vec<ImageRecord>,
    /// Expected figures over all images.
    pub totals: Totals,
    /// Where the content came from.
    pub sources: Sources,
}

/// The result of a compose run.
#[derive(Debug, Clone)]
pub struct ComposeReport {
    /// The sidecar now in the destination folder.
    pub sidecar: Sidecar,
    /// `true` when the images were already there and nothing was written.
    pub up_to_date: bool,
}

/// File name of guest `g`'s image.
pub fn image_file(guest: usize) -> String {
    format!("guest-{guest}.img")
}

/// sha256 identifying the inputs of a composition.
fn inputs_key(params: &Params, packages: &[PackageRecord], build: &[FileRecord]) -> String {
    let text = format!(
        "format={SIDECAR_FORMAT} layout={} guests={} size={} unique={} zero={} seed={} reserved={}\n{}\n{}",
        compose::LAYOUT_VERSION,
        params.guests,
        params.image_size,
        params.unique,
        params.zero,
        params.seed,
        params.reserved_low,
        packages
            .iter()
            .map(|p| format!("{} {} {}", p.name, p.version, p.sha256))
            .collect::<Vec<_>>()
            .join("\n"),
        build
            .iter()
            .map(|f| format!("{} {}", f.name, f.sha256))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    manifest::sha256_hex(text.as_bytes())
}

/// Every non-empty regular file under `root`, in sorted path order, named `prefix:/path`.
pub fn collect_files(root: &Path, prefix: &str) -> Result<Vec<SourceFile>, Error> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let entries = fs::read_dir(&dir).map_err(io_err(&dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err(&dir))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(io_err(&path))?;
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                found.push(path);
            }
        }
    }
    found.sort();
    let mut files = Vec::with_capacity(found.len());
    for path in found {
        let data = fs::read(&path).map_err(io_err(&path))?;
        if data.is_empty() {
            continue;
        }
        let rel = path.strip_prefix(root).unwrap_or(&path);
        files.push(SourceFile {
            name: format!("{prefix}:/{}", rel.display()),
            data,
        });
    }
    Ok(files)
}

/// Whether the sidecar in `dest` describes images made from `key` that are all in place.
fn up_to_date(dest: &Path, key: &str, image_size: u64) -> Option<Sidecar> {
    let text = fs::read(dest.join(SIDECAR)).ok()?;
    let sidecar: Sidecar = serde_json::from_slice(&text).ok()?;
    let all_there = sidecar
        .images
        .iter()
        .all(|img| fs::metadata(dest.join(&img.file)).is_ok_and(|m| m.len() == image_size));
    (sidecar.format == SIDECAR_FORMAT && sidecar.inputs_sha256 == key && all_there)
        .then_some(sidecar)
}

/// Writes one image to `path` (replacing it); `progress` is told the image's pages done.
fn write_image(
    c: &compose::Composition<'_>,
    guest: usize,
    path: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<(), Error> {
    // Per process: two composes into one folder must not write the same temporary file.
    let tmp = path.with_extension(format!("{}{}", &TMP_MARKER[1..], std::process::id()));
    let file = File::create(&tmp).map_err(io_err(&tmp))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    c.write_image(guest, &mut out, progress)
        .map_err(io_err(&tmp))?;
    drop(out);
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Whether `name` can be a Debian package's name (Debian Policy 5.6.7), so that nothing else
/// reaches `apt`.
fn is_package_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.len() >= 2
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

/// Removes the images of guests `guests` and up from `dest`: a folder composed before for
/// more guests keeps no image that `compose.json` does not list.
fn remove_images_from(dest: &Path, guests: usize) {
    for guest in guests.. {
        let path = dest.join(image_file(guest));
        match fs::remove_file(&path) {
            Ok(()) => info!("removed {}: not one of the {guests} guests", path.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => break,
            Err(e) => {
                warn!("cannot remove {}: {e}", path.display());
                break;
            }
        }
    }
}

/// Folders of `cache` where a compose extracts packages: the prefix, then its process id.
const EXTRACT_PREFIX: &str = "extract-compose-";

/// What an image's temporary file adds to its name, before the composing process's id.
const TMP_MARKER: &str = ".img.tmp";

/// Removes from `dir` the files and folders that composes no longer running left: named with
/// `marker` followed by the process id (an extraction folder, a temporary image).
fn remove_stale(dir: &Path, marker: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split_once(marker))
            .and_then(|(_, p)| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        if let Err(e) = removed {
            warn!("cannot remove {}: {e}", path.display());
        }
    }
}

/// Runs the composition.
pub fn compose_images(config: &ComposeConfig) -> Result<ComposeReport, Error> {
    let started = Instant::now();
    config.params.body_pages().map_err(Error::Compose)?;
    if let Some(bad) = config.packages.iter().find(|p| !is_package_name(p)) {
        return Err(Error::BadPackage(bad.clone()));
    }
    if config.dest.exists() && !config.dest.is_dir() {
        return Err(Error::DestNotDir(config.dest.clone()));
    }
    let build = Manifest::load(&config.out.join(MANIFEST))?
        .filter(|m| m.outputs_match(&config.out).unwrap_or(false))
        .ok_or_else(|| Error::NoBuild(config.out.clone()))?;
    let build_outputs: Vec<FileRecord> = BUILD_FILES
        .iter()
        .filter_map(|name| build.outputs.iter().find(|o| o.name == *name).cloned())
        .collect();
    if build_outputs.len() != BUILD_FILES.len() {
        return Err(Error::NoBuild(config.out.clone()));
    }

    let mut apt = Apt::new();
    let cache = config.out.join("cache").join("debs");
    let mut infos = Vec::new();
    for name in &config.packages {
        let info = match apt.show(name) {
            Ok(info) => info,
            // No package lists (no apt, or no network): the cached .deb, as it is.
            Err(e) if e.lists_unreadable() => match apt.cached(name, &cache)? {
                Some(info) => {
                    warn!("{e}; composing from the cached {}", info.deb_name());
                    info
                }
                None => return Err(e.into()),
            },
            Err(e) => return Err(e.into()),
        };
        infos.push(info);
    }
    let packages: Vec<PackageRecord> = infos.iter().map(|i| i.record()).collect();
    let key = inputs_key(&config.params, &packages, &build_outputs);
    if !config.force
        && let Some(sidecar) = up_to_date(&config.dest, &key, config.params.image_size)
    {
        info!(
            "{} is up to date: nothing to compose",
            config.dest.display()
        );
        return Ok(ComposeReport {
            sidecar,
            up_to_date: true,
        });
    }

    // Per process, so that composes sharing one output folder do not delete each other's
    // files; what killed runs left behind goes first.
    remove_stale(&config.out.join("cache"), EXTRACT_PREFIX);
    remove_stale(&config.dest, TMP_MARKER);
    let work = config
        .out
        .join("cache")
        .join(format!("{EXTRACT_PREFIX}{}", std::process::id()));
    let mut files = Vec::new();
    for info in &infos {
        let deb = apt.fetch(info, &cache)?;
        let root = work.join(&info.name);
        apt.extract(&deb, &root)?;
        files.extend(collect_files(&root, &info.name)?);
    }
    if let Err(e) = fs::remove_dir_all(&work) {
        warn!("cannot remove {}: {e}", work.display());
    }
    for name in BUILD_FILES {
        let path = config.out.join(name);
        let data = fs::read(&path).map_err(io_err(&path))?;
        files.push(SourceFile {
            name: format!("guest-images:/{name}"),
            data,
        });
    }
    let file_pages: u64 = files.iter().map(SourceFile::pages).sum();
    info!(
        "composing {} files ({}) into {} x {}",
        files.len(),
        format_size(file_pages * 4096),
        config.params.guests,
        format_size(config.params.image_size)
    );

    let composition = compose::compose(&files, config.params.clone()).map_err(Error::Compose)?;
    fs::create_dir_all(&config.dest).map_err(io_err(&config.dest))?;
    let _ = fs::remove_file(config.dest.join(SIDECAR));
    let mut images = Vec::new();
    let image_pages = config.params.image_size / 4096;
    let mut progress = Progress::new("writing images", image_pages * config.params.guests as u64);
    for (guest, stats) in composition.stats().guests.iter().enumerate() {
        let file = image_file(guest);
        let before = image_pages * guest as u64;
        write_image(
            &composition,
            guest,
            &config.dest.join(&file),
            &mut |pages| progress.update(before + pages),
        )?;
        images.push(ImageRecord {
            guest,
            file,
            stats: stats.clone(),
        });
    }
    remove_images_from(&config.dest, config.params.guests);
    let p = composition.params();
    let sidecar = Sidecar {
        format: SIDECAR_FORMAT,
        inputs_sha256: key,
        page_size: 4096,
        image_size: p.image_size,
        guests: p.guests,
        seed: p.seed,
        unique_fraction: p.unique,
        zero_fraction: p.zero,
        reserved_low_bytes: p.reserved_low,
        reserved_low_note: format!(
            "the first {} of every image are zeros and not counted in the statistics: the VMM \
             writes its boot structures or the test guest there",
            format_size(p.reserved_low)
        ),
        images,
        totals: composition.stats().totals.clone(),
        sources: Sources {
            packages,
            build_outputs,
            files: files.len() as u64,
            file_pages,
        },
    };
    let mut text = serde_json::to_string_pretty(&sidecar).map_err(|e| Error::Io {
        path: config.dest.join(SIDECAR),
        source: io::Error::other(e),
    })?;
    text.push('\n');
    manifest::write_atomic(&config.dest.join(SIDECAR), text.as_bytes())?;
    info!("composed in {:.1} s", started.elapsed().as_secs_f64());
    Ok(ComposeReport {
        sidecar,
        up_to_date: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params {
            guests: 2,
            image_size: 64 * 4096,
            unique: 0.1,
            zero: 0.1,
            seed: 1,
            reserved_low: 8 * 4096,
        }
    }

    #[test]
    fn inputs_key_changes_with_every_input() {
        let pkgs = vec![PackageRecord {
            name: "libc6".into(),
            version: "2.36".into(),
            file: "libc6.deb".into(),
            sha256: "aa".into(),
        }];
        let build = vec![FileRecord::of_bytes("vmlinux", b"k")];
        let base = inputs_key(&params(), &pkgs, &build);
        assert_eq!(base, inputs_key(&params(), &pkgs, &build));
        let seeded = Params {
            seed: 2,
            ..params()
        };
        assert_ne!(base, inputs_key(&seeded, &pkgs, &build));
        let mut newer = pkgs.clone();
        newer[0].version = "2.37".into();
        assert_ne!(base, inputs_key(&params(), &newer, &build));
        let rebuilt = vec![FileRecord::of_bytes("vmlinux", b"k2")];
        assert_ne!(base, inputs_key(&params(), &pkgs, &rebuilt));
    }

    #[test]
    fn collects_regular_files_sorted_and_named_by_package() {
        let root = std::env::temp_dir().join(format!("guest-images-files-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("usr/lib")).unwrap();
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::write(root.join("usr/lib/libz.so"), b"zzz").unwrap();
        fs::write(root.join("bin/true"), b"tt").unwrap();
        fs::write(root.join("bin/empty"), b"").unwrap();
        std::os::unix::fs::symlink("true", root.join("bin/link")).unwrap();
        let files = collect_files(&root, "pkg").unwrap();
        let names: Vec<_> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["pkg:/bin/true", "pkg:/usr/lib/libz.so"]);
        assert_eq!(files[1].data, b"zzz");
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn sidecar_round_trips_and_up_to_date_needs_every_image() {
        let dest = std::env::temp_dir().join(format!("guest-images-side-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dest);
        fs::create_dir_all(&dest).unwrap();
        let files = vec![SourceFile {
            name: "p:/f".into(),
            data: vec![7; 10_000],
        }];
        let c = compose::compose(&files, params()).unwrap();
        let sidecar = Sidecar {
            format: SIDECAR_FORMAT,
            inputs_sha256: "k".into(),
            page_size: 4096,
            image_size: params().image_size,
            guests: 2,
            seed: 1,
            unique_fraction: 0.1,
            zero_fraction: 0.1,
            reserved_low_bytes: params().reserved_low,
            reserved_low_note: "n".into(),
            images: (0..2)
                .map(|g| ImageRecord {
                    guest: g,
                    file: image_file(g),
                    stats: c.stats().guests[g].clone(),
                })
                .collect(),
            totals: c.stats().totals.clone(),
            sources: Sources {
                packages: vec![],
                build_outputs: vec![],
                files: 1,
                file_pages: 3,
            },
        };
        let text = serde_json::to_string(&sidecar).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        // per-image figures sit flat in each image object
        assert!(value["images"][0]["dup_within_guest"].is_u64());
        assert!(value["totals"]["pages_sharing"].is_u64());
        fs::write(dest.join(SIDECAR), &text).unwrap();
        assert!(up_to_date(&dest, "k", params().image_size).is_none());
        for g in 0..2 {
            write_image(&c, g, &dest.join(image_file(g)), &mut |_| {}).unwrap();
        }
        assert_eq!(up_to_date(&dest, "k", params().image_size), Some(sidecar));
        assert!(up_to_date(&dest, "other", params().image_size).is_none());
        fs::write(dest.join(image_file(1)), b"short").unwrap();
        assert!(up_to_date(&dest, "k", params().image_size).is_none());
        fs::remove_dir_all(dest).unwrap();
    }

    #[test]
    fn only_what_finished_composes_left_is_removed() {
        let dir = std::env::temp_dir().join(format!("gi-stale-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        // No process has an id this high (pid_max is at most 2^22).
        let gone = 999_999_999u32;
        let own = std::process::id();
        let names = [
            format!("{EXTRACT_PREFIX}{gone}"),
            format!("{EXTRACT_PREFIX}{own}"),
            format!("guest-0{TMP_MARKER}{gone}"),
            format!("guest-1{TMP_MARKER}{own}"),
            "guest-0.img".to_string(),
        ];
        fs::create_dir(dir.join(&names[0])).unwrap();
        fs::write(dir.join(&names[0]).join("f"), b"x").unwrap();
        fs::create_dir(dir.join(&names[1])).unwrap();
        for name in &names[2..] {
            fs::write(dir.join(name), b"x").unwrap();
        }
        remove_stale(&dir, EXTRACT_PREFIX);
        remove_stale(&dir, TMP_MARKER);
        let left = |name: &String| dir.join(name).exists();
        assert!(!left(&names[0]) && !left(&names[2]), "stale ones removed");
        assert!(
            left(&names[1]) && left(&names[3]) && left(&names[4]),
            "the rest kept"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn package_names_follow_debian_policy() {
        for good in [
            "libc6",
            "libstdc++6",
            "python3.11-minimal",
            "perl-base",
            "0ad",
        ] {
            assert!(is_package_name(good), "{good}");
        }
        for bad in ["", "a", "-x", "Libc6", "libc6 ", "lib c", "../x", "x;y"] {
            assert!(!is_package_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn images_beyond_the_guest_count_are_removed() {
        let dir = std::env::temp_dir().join(format!("gi-extra-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        for guest in 0..4 {
            fs::write(dir.join(image_file(guest)), b"x").unwrap();
        }
        remove_images_from(&dir, 2);
        let left: Vec<bool> = (0..4).map(|g| dir.join(image_file(g)).exists()).collect();
        assert_eq!(left, [true, true, false, false]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
