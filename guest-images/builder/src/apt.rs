//! Debian packages through the ordinary tools: `apt-cache` resolves names and versions,
//! `apt-get download` fetches `.deb` files into a cache, `dpkg-deb -x` unpacks them.
//!
//! `apt-get update` runs only when `apt-cache` cannot resolve a package (a fresh machine with no
//! package lists), once per [`Apt`], and says so in the log. Downloads are checked against the
//! sha256 that the package lists give, and a cached `.deb` with that sum is never fetched again.

use std::fs;
use std::io::{self, IsTerminal};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use log::{debug, info, warn};
use thiserror::Error;

use crate::manifest::{self, PackageRecord};

/// Phrases in apt's messages that mean the package archive could not be reached.
const UNREACHABLE_HINTS: &[&str] = &[
    "Could not resolve",
    "Temporary failure resolving",
    "Failed to fetch",
    "Could not connect",
    "Connection failed",
    "Connection timed out",
    "Network is unreachable",
    "No route to host",
    "Unable to connect",
];

/// Errors from the package tools.
#[derive(Debug, Error)]
pub enum Error {
    /// A tool is not installed.
    #[error("{tool} not found: guest-images needs Debian's apt-get, apt-cache and dpkg-deb")]
    MissingTool {
        /// The tool.
        tool: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The package archive could not be reached.
    #[error("the package archive is unreachable (`{command}`): {detail}")]
    Unreachable {
        /// The command that failed.
        command: String,
        /// apt's own message.
        detail: String,
    },
    /// A package is not known to apt, even after `apt-get update`.
    #[error("apt-cache cannot resolve {0} (even after apt-get update)")]
    Unresolved(String),
    /// A tool failed for another reason.
    #[error("{command} failed: {detail}")]
    Failed {
        /// The command line.
        command: String,
        /// Its message.
        detail: String,
    },
    /// A downloaded file does not have the sum the package lists give.
    #[error("{file} has sha256 {got}, the package lists say {expected}")]
    Checksum {
        /// The file.
        file: String,
        /// The expected sum.
        expected: String,
        /// The sum found.
        got: String,
    },
    /// A cache file or folder could not be used.
    #[error("cannot use the package cache at {path}")]
    Cache {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Hashing a downloaded file failed.
    #[error("cannot hash a downloaded package")]
    Hash(#[source] manifest::Error),
}

/// A package version as the package lists describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageInfo {
    /// Package name.
    pub name: String,
    /// Candidate version.
    pub version: String,
    /// Path of the `.deb` in the archive (`pool/main/...`).
    pub filename: String,
    /// sha256 of the `.deb`.
    pub sha256: String,
    /// Size of the `.deb` in bytes.
    pub size: u64,
}

impl PackageInfo {
    /// File name of the `.deb` (the last component of [`PackageInfo::filename`]).
    pub fn deb_name(&self) -> &str {
        self.filename.rsplit('/').next().unwrap_or(&self.filename)
    }

    /// The manifest record of this package.
    pub fn record(&self) -> PackageRecord {
        PackageRecord {
            name: self.name.clone(),
            version: self.version.clone(),
            file: self.deb_name().to_owned(),
            sha256: self.sha256.clone(),
        }
    }
}

/// The `.deb` files of `package` in `cache` (named `NAME_VERSION_ARCH.deb`, as `apt-get
/// download` and [`Apt::fetch`] name them).
fn cached_files(package: &str, cache: &Path) -> Result<Vec<PathBuf>, Error> {
    let cache_err = |source| Error::Cache {
        path: cache.to_owned(),
        source,
    };
    let entries = match fs::read_dir(cache) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(cache_err(e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(cache_err)?.path();
        let named = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".deb"))
            .is_some_and(|stem| {
                let mut parts = stem.split('_');
                parts.next() == Some(package) && parts.count() == 2
            });
        if named {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The value of `field` in `dpkg-deb --field` output.
pub fn parse_field<'a>(output: &'a str, field: &str) -> Option<&'a str> {
    output.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

impl Apt {
    /// The one `.deb` of `package` in `cache`, described from the file itself (name and
    /// version from its control fields, the sum from its bytes): for composing where the
    /// package lists cannot be read. `None` when the cache holds none; an error when it holds
    /// several (which one the lists would name cannot be told) or the file is of another
    /// package.
    pub fn cached(&self, package: &str, cache: &Path) -> Result<Option<PackageInfo>, Error> {
        let mut files = cached_files(package, cache)?;
        if files.len() > 1 {
            return Err(Error::Failed {
                command: format!("choosing the cached .deb of {package}"),
                detail: format!(
                    "{} versions in {}: keep the one to compose from",
                    files.len(),
                    cache.display()
                ),
            });
        }
        let Some(path) = files.pop() else {
            return Ok(None);
        };
        let mut cmd = Command::new("dpkg-deb");
        cmd.arg("--field").arg(&path).args(["Package", "Version"]);
        let out = run(&mut cmd)?;
        if !out.status.success() {
            return Err(failed(&cmd, &out));
        }
        let fields = String::from_utf8_lossy(&out.stdout);
        let (Some(name), Some(version)) = (
            parse_field(&fields, "Package"),
            parse_field(&fields, "Version"),
        ) else {
            return Err(Error::Failed {
                command: command_line(&cmd),
                detail: "no Package or Version field".into(),
            });
        };
        if name != package {
            return Err(Error::Failed {
                command: command_line(&cmd),
                detail: format!("the file holds {name}, not {package}"),
            });
        }
        let size = fs::metadata(&path)
            .map_err(|source| Error::Cache {
                path: path.clone(),
                source,
            })?
            .len();
        Ok(Some(PackageInfo {
            name: package.to_owned(),
            version: version.to_owned(),
            filename: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sha256: manifest::sha256_file(&path).map_err(Error::Hash)?,
            size,
        }))
    }
}

impl Error {
    /// Whether the package lists could not be read at all (no apt, or an unreachable archive),
    /// as opposed to a package they do not know.
    pub fn lists_unreadable(&self) -> bool {
        matches!(self, Error::MissingTool { .. } | Error::Unreachable { .. })
    }
}

/// The first `Depends:` of `apt-cache depends` output whose package starts with `prefix`.
pub fn parse_depends(output: &str, prefix: &str) -> Option<String> {
    output.lines().find_map(|line| {
        let dep = line.trim_start().strip_prefix("Depends:")?.trim();
        let dep = dep.trim_start_matches('<').trim_end_matches('>');
        dep.starts_with(prefix).then(|| dep.to_owned())
    })
}

/// The first stanza of `apt-cache show` output; `None` when a field is missing.
pub fn parse_show(output: &str) -> Option<PackageInfo> {
    let stanza = output.split("\n\n").find(|s| !s.trim().is_empty())?;
    let field = |name: &str| {
        stanza.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(':'))
                .map(|v| v.trim().to_owned())
        })
    };
    Some(PackageInfo {
        name: field("Package")?,
        version: field("Version")?,
        filename: field("Filename")?,
        sha256: field("SHA256")?.to_ascii_lowercase(),
        size: field("Size")?.parse().ok()?,
    })
}

/// The most telling line of apt's error output: the first that says the archive could not be
/// reached, else the first error (`E:`), else the last line.
pub fn failure_detail(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let unreachable = |l: &&&str| UNREACHABLE_HINTS.iter().any(|h| l.contains(h));
    lines
        .iter()
        .find(|l| l.starts_with("E:") && unreachable(l))
        .or_else(|| lines.iter().find(unreachable))
        .or_else(|| lines.iter().find(|l| l.starts_with("E:")))
        .or(lines.last())
        .map_or_else(|| "no message".to_owned(), |l| (*l).to_owned())
}

/// Whether apt's error output says the archive could not be reached.
pub fn looks_unreachable(stderr: &str) -> bool {
    UNREACHABLE_HINTS.iter().any(|h| stderr.contains(h))
}

fn command_line(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` with captured output; a missing program is [`Error::MissingTool`].
fn run(cmd: &mut Command) -> Result<Output, Error> {
    debug!("running {}", command_line(cmd));
    cmd.env("LC_ALL", "C")
        .output()
        .map_err(|source| Error::MissingTool {
            tool: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })
}

/// Sends a child's stdout to our stderr (progress for the user, stdout stays clean).
fn progress_to_stderr(cmd: &mut Command) {
    if let Ok(fd) = io::stderr().as_fd().try_clone_to_owned() {
        cmd.stdout(Stdio::from(fd));
    }
}

fn failed(cmd: &Command, out: &Output) -> Error {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let detail = failure_detail(&stderr);
    if looks_unreachable(&stderr) {
        Error::Unreachable {
            command: command_line(cmd),
            detail,
        }
    } else {
        Error::Failed {
            command: command_line(cmd),
            detail,
        }
    }
}

/// The package tools, remembering whether `apt-get update` already ran.
#[derive(Debug, Default)]
pub struct Apt {
    updated: bool,
}

impl Apt {
    /// A fresh handle; `apt-get update` has not run.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `apt-get update` once, when a package could not be resolved.
    fn update_once(&mut self, package: &str) -> Result<bool, Error> {
        if self.updated {
            return Ok(false);
        }
        self.updated = true;
        warn!("apt-cache cannot resolve {package}: running apt-get update");
        let mut cmd = Command::new("apt-get");
        cmd.arg("update");
        let out = run(&mut cmd)?;
        if !out.status.success() || looks_unreachable(&String::from_utf8_lossy(&out.stderr)) {
            return Err(failed(&cmd, &out));
        }
        Ok(true)
    }

    /// Runs an `apt-cache` query, updating the lists once when it resolves nothing.
    fn query<T>(
        &mut self,
        package: &str,
        args: &[&str],
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<T, Error> {
        loop {
            let mut cmd = Command::new("apt-cache");
            cmd.args(args).arg(package);
            let out = run(&mut cmd)?;
            let parsed = out
                .status
                .success()
                .then(|| parse(&String::from_utf8_lossy(&out.stdout)))
                .flatten();
            if let Some(value) = parsed {
                return Ok(value);
            }
            if !self.update_once(package)? {
                return Err(Error::Unresolved(package.to_owned()));
            }
        }
    }

    /// The package that the metapackage `meta` depends on whose name starts with `prefix`.
    pub fn depends(&mut self, meta: &str, prefix: &str) -> Result<String, Error> {
        self.query(meta, &["depends"], |out| parse_depends(out, prefix))
    }

    /// The candidate version of `package`.
    pub fn show(&mut self, package: &str) -> Result<PackageInfo, Error> {
        self.query(package, &["show", "--no-all-versions"], parse_show)
    }

    /// The `.deb` of `info` in `cache`: taken from the cache when its sum matches, else fetched
    /// with `apt-get download` and checked.
    pub fn fetch(&self, info: &PackageInfo, cache: &Path) -> Result<PathBuf, Error> {
        let cache_err = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Cache { path, source }
        };
        let dest = cache.join(info.deb_name());
        if dest.is_file() && manifest::sha256_file(&dest).map_err(Error::Hash)? == info.sha256 {
            info!("{} {}: in the cache", info.name, info.version);
            return Ok(dest);
        }
        let partial = cache.join(format!("partial-{}", info.name));
        let _ = fs::remove_dir_all(&partial);
        fs::create_dir_all(&partial).map_err(cache_err(&partial))?;
        info!(
            "downloading {} {} ({:.1} MB)",
            info.name,
            info.version,
            info.size as f64 / 1e6
        );
        let mut cmd = Command::new("apt-get");
        cmd.arg("download")
            .arg(format!("{}={}", info.name, info.version))
            .current_dir(&partial);
        if !io::stderr().is_terminal() {
            cmd.arg("-q");
        }
        progress_to_stderr(&mut cmd);
        debug!("running {}", command_line(&cmd));
        let out = cmd
            .env("LC_ALL", "C")
            .stderr(Stdio::piped())
            .output()
            .map_err(|source| Error::MissingTool {
                tool: "apt-get".into(),
                source,
            })?;
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            debug!("apt-get: {line}");
        }
        if !out.status.success() {
            return Err(failed(&cmd, &out));
        }
        let got_file = fs::read_dir(&partial)
            .map_err(cache_err(&partial))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .ok_or_else(|| Error::Failed {
                command: command_line(&cmd),
                detail: "no .deb file was written".into(),
            })?;
        let got = manifest::sha256_file(&got_file).map_err(Error::Hash)?;
        if got != info.sha256 {
            return Err(Error::Checksum {
                file: info.deb_name().to_owned(),
                expected: info.sha256.clone(),
                got,
            });
        }
        fs::rename(&got_file, &dest).map_err(cache_err(&dest))?;
        let _ = fs::remove_dir_all(&partial);
        Ok(dest)
    }

    /// Unpacks the files of `deb` into `dir` (created; emptied first) with `dpkg-deb -x`.
    pub fn extract(&self, deb: &Path, dir: &Path) -> Result<(), Error> {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).map_err(|source| Error::Cache {
            path: dir.to_owned(),
            source,
        })?;
        let mut cmd = Command::new("dpkg-deb");
        cmd.arg("-x").arg(deb).arg(dir);
        let out = run(&mut cmd)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(failed(&cmd, &out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPENDS: &str = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-48-cloud-amd64\n";

    const SHOW: &str = "\
Package: busybox-static
Source: busybox (1:1.35.0-4+deb12u1)
Version: 1:1.35.0-4+deb12u1+b1
Installed-Size: 2024
Description: Standalone rescue shell with tons of builtin utilities
Tag: admin::recovery, interface::shell, role::program, scope::utility,
 use::login, works-with::file
Filename: pool/main/b/busybox/busybox-static_1.35.0-4+deb12u1+b1_amd64.deb
Size: 928188
MD5sum: f6f1b0b4181aead8e1a5b1258f63f501
SHA256: 3D3FDBE91D4660C873E14B092C213FE81C1DA6362DAA236EB25D0171EB108744

Package: busybox-static
Version: 1:1.30.0-1
Filename: pool/old.deb
Size: 1
SHA256: 00
";

    /// Builds a `.deb` of `package` `version` with `dpkg-deb --build` at `path`.
    fn build_deb(package: &str, version: &str, path: &Path) {
        let root = path.with_extension("root");
        fs::create_dir_all(root.join("DEBIAN")).unwrap();
        fs::write(
            root.join("DEBIAN/control"),
            format!(
                "Package: {package}\nVersion: {version}\nArchitecture: amd64\n\
                 Maintainer: test <test@example.org>\nDescription: test package\n"
            ),
        )
        .unwrap();
        let out = Command::new("dpkg-deb")
            .arg("--build")
            .arg(&root)
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn cached_debs_are_described_from_their_control_fields() {
        let dir = std::env::temp_dir().join(format!("guest-images-cached-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let apt = Apt::new();
        assert_eq!(apt.cached("perl-base", &dir.join("none")).unwrap(), None);
        // As `apt-get download` names it: the pool's file name, without the epoch.
        let deb = dir.join("perl-base_5.36.0-7_amd64.deb");
        build_deb("perl-base", "1:5.36.0-7", &deb);
        build_deb("perl", "5.36.0-7", &dir.join("perl_5.36.0-7_amd64.deb"));
        fs::write(dir.join("perl-base.txt"), b"").unwrap();
        let info = apt.cached("perl-base", &dir).unwrap().unwrap();
        assert_eq!(info.name, "perl-base");
        assert_eq!(
            info.version, "1:5.36.0-7",
            "the epoch, from the control fields"
        );
        assert_eq!(info.deb_name(), "perl-base_5.36.0-7_amd64.deb");
        assert_eq!(info.sha256, manifest::sha256_file(&deb).unwrap());
        assert_eq!(info.size, fs::metadata(&deb).unwrap().len());
        assert_eq!(apt.cached("coreutils", &dir).unwrap(), None);
        // Two versions: which one the lists would name cannot be told.
        build_deb(
            "perl-base",
            "5.36.0-8",
            &dir.join("perl-base_5.36.0-8_amd64.deb"),
        );
        assert!(apt.cached("perl-base", &dir).is_err());
        // A file named for one package that holds another.
        build_deb("libc6", "2.36", &dir.join("coreutils_9.1-1_amd64.deb"));
        assert!(apt.cached("coreutils", &dir).is_err());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn control_fields_are_read_by_name() {
        let fields = "Package: perl-base\nVersion: 1:5.36.0-7\n";
        assert_eq!(parse_field(fields, "Package"), Some("perl-base"));
        assert_eq!(parse_field(fields, "Version"), Some("1:5.36.0-7"));
        assert_eq!(parse_field(fields, "Vers"), None);
        assert_eq!(parse_field(fields, "Architecture"), None);
    }

    #[test]
    fn only_unreadable_lists_let_the_cache_stand_in() {
        let missing = Error::MissingTool {
            tool: "apt-cache".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert!(missing.lists_unreadable());
        let unreachable = Error::Unreachable {
            command: "apt-get update".into(),
            detail: "Could not resolve".into(),
        };
        assert!(unreachable.lists_unreadable());
        assert!(!Error::Unresolved("python3.11-minimal".into()).lists_unreadable());
    }

    #[test]
    fn depends_picks_the_kernel_image() {
        assert_eq!(
            parse_depends(DEPENDS, "linux-image-").as_deref(),
            Some("linux-image-6.1.0-48-cloud-amd64")
        );
        assert_eq!(parse_depends(DEPENDS, "linux-headers-"), None);
        assert_eq!(parse_depends("", "linux-image-"), None);
        let virtual_dep = "meta\n  Depends: <linux-image-6.1.0-9-cloud-amd64>\n";
        assert_eq!(
            parse_depends(virtual_dep, "linux-image-").as_deref(),
            Some("linux-image-6.1.0-9-cloud-amd64")
        );
    }

    #[test]
    fn show_reads_the_first_stanza() {
        let info = parse_show(SHOW).unwrap();
        assert_eq!(info.name, "busybox-static");
        assert_eq!(info.version, "1:1.35.0-4+deb12u1+b1");
        assert_eq!(
            info.deb_name(),
            "busybox-static_1.35.0-4+deb12u1+b1_amd64.deb"
        );
        assert_eq!(info.size, 928_188);
        assert_eq!(
            info.sha256,
            "3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744"
        );
        let rec = info.record();
        assert_eq!(rec.file, info.deb_name());
        assert_eq!(rec.version, info.version);
    }

    #[test]
    fn show_without_required_fields_is_none() {
        assert_eq!(parse_show(""), None);
        assert_eq!(parse_show("Package: x\nVersion: 1\n"), None);
        assert_eq!(
            parse_show("Package: x\nVersion: 1\nFilename: a.deb\nSHA256: 00\nSize: big\n"),
            None
        );
    }

    #[test]
    fn failures_are_classified() {
        let offline = "Err:1 http://deb.debian.org/debian bookworm/main amd64 x 1\n  \
                       Temporary failure resolving 'deb.debian.org'\n\
                       E: Failed to fetch http://deb.debian.org/debian/pool/x.deb  \
                       Temporary failure resolving 'deb.debian.org'\n";
        assert!(looks_unreachable(offline));
        assert!(failure_detail(offline).starts_with("E: Failed to fetch"));
        let missing = "E: Can't select candidate version from package x as it has no candidate\n";
        assert!(!looks_unreachable(missing));
        assert_eq!(failure_detail(missing), missing.trim());
        assert_eq!(failure_detail("warning one\nlast words\n"), "last words");
        let update = "W: Failed to fetch http://deb.debian.org/dists/InRelease  Could not connect\n\
                      W: Some index files failed to download.\n";
        assert!(failure_detail(update).starts_with("W: Failed to fetch"));
        let mixed = "E: Unable to locate package x\nW: Failed to fetch y\n";
        assert_eq!(failure_detail(mixed), "W: Failed to fetch y");
        assert_eq!(failure_detail(""), "no message");
    }
}
