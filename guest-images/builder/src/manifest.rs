//! `manifest.json`: the packages, inputs and outputs of a build, with their sha256 sums.
//!
//! The build is idempotent through it: when the resolved packages and the local inputs equal the
//! manifest's and every output file still has its recorded sum, nothing is downloaded or written.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Version of the manifest format.
pub const FORMAT: u32 = 1;

/// Errors from reading or writing a manifest or hashing a file.
#[derive(Debug, Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("cannot access {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The manifest is not valid JSON of the expected shape.
    #[error("{path} is not a valid manifest")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// A Debian package that went into the build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageRecord {
    /// Package name.
    pub name: String,
    /// Exact version.
    pub version: String,
    /// File name of the `.deb` in the cache.
    pub file: String,
    /// sha256 of the `.deb`, as the archive lists it and as checked after download.
    pub sha256: String,
}

/// A file used or written by the build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Name (relative to the output folder for outputs).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// sha256 in lowercase hex.
    pub sha256: String,
}

impl FileRecord {
    /// Records `data` under `name`.
    pub fn of_bytes(name: &str, data: &[u8]) -> Self {
        Self {
            name: name.to_owned(),
            size: data.len() as u64,
            sha256: sha256_hex(data),
        }
    }

    /// Whether `dir` holds this file with its recorded size and sum.
    pub fn matches_in(&self, dir: &Path) -> Result<bool, Error> {
        let path = dir.join(&self.name);
        match fs::metadata(&path) {
            Ok(m) if m.len() == self.size => {}
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err(&path)(e)),
        }
        Ok(sha256_file(&path)? == self.sha256)
    }
}

/// What a build used and wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`] of this file.
    pub format: u32,
    /// Kernel release of the image (`uname -r` in the guest), e.g. `6.1.0-48-cloud-amd64`.
    pub kernel_release: String,
    /// Debian packages, in a fixed order.
    pub packages: Vec<PackageRecord>,
    /// Local inputs (the workload binary, the `/init` script).
    pub inputs: Vec<FileRecord>,
    /// Files written to the output folder.
    pub outputs: Vec<FileRecord>,
}

impl Manifest {
    /// Reads the manifest at `path`; `Ok(None)` when there is none.
    pub fn load(path: &Path) -> Result<Option<Self>, Error> {
        match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| Error::Parse {
                    path: path.to_owned(),
                    source,
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// Writes the manifest to `path` atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let mut text = serde_json::to_string_pretty(self).map_err(|source| Error::Parse {
            path: path.to_owned(),
            source,
        })?;
        text.push('\n');
        write_atomic(path, text.as_bytes())
    }

    /// Whether this manifest records exactly these packages and inputs.
    pub fn same_sources(&self, packages: &[PackageRecord], inputs: &[FileRecord]) -> bool {
        self.format == FORMAT && self.packages == packages && self.inputs == inputs
    }

    /// Whether every recorded output exists in `dir` with its recorded size and sum.
    pub fn outputs_match(&self, dir: &Path) -> Result<bool, Error> {
        if self.outputs.is_empty() {
            return Ok(false);
        }
        for out in &self.outputs {
            if !out.matches_in(dir)? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// sha256 of `data` in lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of the file at `path` in lowercase hex, read in chunks.
pub fn sha256_file(path: &Path) -> Result<String, Error> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Writes `data` to `path` through a temporary file in the same folder and a rename, so that a
/// reader never sees a half-written file.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), Error> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, data).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("guest-images-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn sample(dir: &Path) -> Manifest {
        fs::write(dir.join("vmlinuz"), b"kernel bytes").unwrap();
        Manifest {
            format: FORMAT,
            kernel_release: "6.1.0-1-cloud-amd64".into(),
            packages: vec![PackageRecord {
                name: "busybox-static".into(),
                version: "1:1.35.0-4".into(),
                file: "busybox-static_1.35.0-4_amd64.deb".into(),
                sha256: "ab".repeat(32),
            }],
            inputs: vec![FileRecord::of_bytes("init", b"#!/bin/sh\n")],
            outputs: vec![FileRecord::of_bytes("vmlinuz", b"kernel bytes")],
        }
    }

    #[test]
    fn sha256_matches_known_vectors() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let dir = temp_dir("sha");
        let path = dir.join("f");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        fs::write(&path, &data).unwrap();
        assert_eq!(sha256_file(&path).unwrap(), sha256_hex(&data));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn saves_loads_and_checks_outputs() {
        let dir = temp_dir("manifest");
        let m = sample(&dir);
        let path = dir.join("manifest.json");
        assert!(Manifest::load(&path).unwrap().is_none());
        m.save(&path).unwrap();
        let loaded = Manifest::load(&path).unwrap().unwrap();
        assert_eq!(loaded, m);
        assert!(loaded.outputs_match(&dir).unwrap());
        assert!(loaded.same_sources(&m.packages, &m.inputs));

        let mut newer = m.packages.clone();
        newer[0].version = "1:1.36.0-1".into();
        assert!(!loaded.same_sources(&newer, &m.inputs));
        assert!(!loaded.same_sources(&m.packages, &[]));

        fs::write(dir.join("vmlinuz"), b"kernel bytez").unwrap();
        assert!(!loaded.outputs_match(&dir).unwrap());
        fs::remove_file(dir.join("vmlinuz")).unwrap();
        assert!(!loaded.outputs_match(&dir).unwrap());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn broken_manifests_are_reported() {
        let dir = temp_dir("broken");
        let path = dir.join("manifest.json");
        fs::write(&path, b"{\"format\": 1}").unwrap();
        assert!(matches!(Manifest::load(&path), Err(Error::Parse { .. })));
        fs::remove_dir_all(dir).unwrap();
    }
}
