//! Building the static `guest-workload` binary that goes into the initramfs.
//!
//! `cargo build --release -p guest-workload --target x86_64-unknown-linux-gnu` in its own target
//! folder, with `-C target-feature=+crt-static -C relocation-model=static` (a static, non-PIE
//! executable: `file` says "statically linked"), symbols stripped, and the checkout and cargo
//! home paths remapped so the bytes do not depend on where the workspace lives. The explicit
//! `--target` keeps these flags away from build scripts and proc macros.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use log::info;
use thiserror::Error;

use crate::elf;

/// The guest's target triple.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Name of the workload package and binary.
pub const PACKAGE: &str = "guest-workload";

/// Errors from building or checking the workload binary.
#[derive(Debug, Error)]
pub enum Error {
    /// cargo could not be started.
    #[error("cannot run cargo to build {PACKAGE}")]
    Spawn(#[source] io::Error),
    /// cargo failed.
    #[error("cargo build of {PACKAGE} failed ({0}); see cargo's messages above")]
    Build(String),
    /// The binary could not be read.
    #[error("cannot read the workload binary {path}")]
    Read {
        /// The binary.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The binary is not an ELF executable.
    #[error("{path} is not an x86-64 ELF executable")]
    NotElf {
        /// The binary.
        path: PathBuf,
        /// The cause.
        #[source]
        source: elf::Error,
    },
    /// The binary needs a dynamic loader, which the initramfs does not have.
    #[error("{0} is dynamically linked; the initramfs needs a static binary")]
    NotStatic(PathBuf),
}

/// The folder cargo builds the static workload in: `$CARGO_TARGET_DIR/guest-workload-static`
/// when that variable is set, else `<workspace>/target/guest-workload-static`.
pub fn target_dir(workspace: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("guest-workload-static")
}

/// `CARGO_ENCODED_RUSTFLAGS` for the static build.
pub fn encoded_rustflags(workspace: &Path, cargo_home: Option<&Path>) -> OsString {
    let mut flags: Vec<OsString> = [
        "-C",
        "target-feature=+crt-static",
        "-C",
        "relocation-model=static",
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    let mut remap = |from: &Path, to: &str| {
        let mut arg = OsString::from("--remap-path-prefix=");
        arg.push(from.as_os_str());
        arg.push("=");
        arg.push(to);
        flags.push(arg);
    };
    remap(workspace, "/workspace");
    if let Some(home) = cargo_home {
        remap(home, "/cargo");
    }
    flags.join(&OsString::from("\u{1f}"))
}

fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
}

/// Builds the workload and returns the binary's path. cargo's progress goes to stderr.
pub fn build(workspace: &Path) -> Result<PathBuf, Error> {
    let target = target_dir(workspace);
    info!("building static {PACKAGE} in {}", target.display());
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "-p", PACKAGE, "--target", TARGET])
        .current_dir(workspace)
        .env("CARGO_TARGET_DIR", &target)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            encoded_rustflags(workspace, cargo_home().as_deref()),
        )
        .env_remove("RUSTFLAGS")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .stdout(Stdio::null());
    let status = cmd.status().map_err(Error::Spawn)?;
    if !status.success() {
        return Err(Error::Build(status.to_string()));
    }
    Ok(target.join(TARGET).join("release").join(PACKAGE))
}

/// Reads the binary at `path` and checks that it is a static ELF executable.
pub fn read_static(path: &Path) -> Result<Vec<u8>, Error> {
    let data = fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    let info = elf::inspect(&data).map_err(|source| Error::NotElf {
        path: path.to_owned(),
        source,
    })?;
    if info.has_interp {
        return Err(Error::NotStatic(path.to_owned()));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elf::tests::tiny_elf;

    #[test]
    fn rustflags_are_unit_separated_and_remap_paths() {
        let flags = encoded_rustflags(Path::new("/src/ws"), Some(Path::new("/home/u/.cargo")));
        let flags = flags.to_string_lossy().into_owned();
        let parts: Vec<&str> = flags.split('\u{1f}').collect();
        assert_eq!(
            parts,
            [
                "-C",
                "target-feature=+crt-static",
                "-C",
                "relocation-model=static",
                "--remap-path-prefix=/src/ws=/workspace",
                "--remap-path-prefix=/home/u/.cargo=/cargo",
            ]
        );
    }

    #[test]
    fn only_static_elf_binaries_are_accepted() {
        let dir = std::env::temp_dir().join(format!("guest-images-wl-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let stat = dir.join("static");
        let dynamic = dir.join("dynamic");
        let text = dir.join("text");
        fs::write(&stat, tiny_elf(1, 64, 0)).unwrap();
        fs::write(&dynamic, tiny_elf(3, 64, 0)).unwrap();
        fs::write(&text, b"#!/bin/sh\n").unwrap();
        assert!(read_static(&stat).is_ok());
        assert!(matches!(read_static(&dynamic), Err(Error::NotStatic(_))));
        assert!(matches!(read_static(&text), Err(Error::NotElf { .. })));
        assert!(matches!(
            read_static(&dir.join("missing")),
            Err(Error::Read { .. })
        ));
        fs::remove_dir_all(dir).unwrap();
    }
}
