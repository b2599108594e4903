//! The initramfs: busybox, the `/init` script and the guest workload in a `newc` archive.

use crate::cpio::{self, CpioWriter};

/// The `/init` script put in the initramfs.
pub const INIT_SCRIPT: &str = include_str!("init.sh");

/// Folders of the initramfs, parents first.
const DIRS: &[&str] = &[
    "bin", "dev", "etc", "proc", "root", "sbin", "sys", "tmp", "usr", "usr/bin", "usr/sbin",
];

/// What goes into the initramfs.
#[derive(Debug, Clone, Copy)]
pub struct Contents<'a> {
    /// The static busybox binary (from `busybox-static`).
    pub busybox: &'a [u8],
    /// The static `guest-workload` binary.
    pub workload: &'a [u8],
    /// The `/init` script.
    pub init: &'a str,
}

/// Builds the archive. The same contents always give the same bytes.
///
/// Layout: the folders in `DIRS`, `/bin/busybox`, `/bin/sh` -> `busybox`,
/// `/bin/guest-workload`, `/init`, and the device nodes `/dev/console` and `/dev/null`, which
/// the kernel needs before `/init` mounts devtmpfs (it opens `/dev/console` for init's stdio).
pub fn build(contents: &Contents<'_>) -> Result<Vec<u8>, cpio::Error> {
    let mut w = CpioWriter::new(Vec::new());
    for dir in DIRS {
        w.dir(dir, 0o755)?;
    }
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.char_device("dev/null", 0o666, 1, 3)?;
    w.file("bin/busybox", 0o755, contents.busybox)?;
    w.symlink("bin/sh", "busybox")?;
    w.file("bin/guest-workload", 0o755, contents.workload)?;
    w.file("init", 0o755, contents.init.as_bytes())?;
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::tests::read_all;

    fn sample() -> Vec<u8> {
        build(&Contents {
            busybox: b"BUSYBOX",
            workload: b"WORKLOAD",
            init: INIT_SCRIPT,
        })
        .unwrap()
    }

    #[test]
    fn holds_busybox_init_and_workload() {
        let entries = read_all(&sample());
        let find = |name: &str| entries.iter().find(|e| e.name == name).unwrap();
        assert_eq!(find("bin/busybox").data, b"BUSYBOX");
        assert_eq!(find("bin/guest-workload").data, b"WORKLOAD");
        assert_eq!(find("bin/guest-workload").mode, 0o100_755);
        assert_eq!(find("init").data, INIT_SCRIPT.as_bytes());
        assert_eq!(find("init").mode, 0o100_755);
        assert_eq!(find("bin/sh").data, b"busybox");
        assert_eq!(find("dev/console").rdev, (5, 1));
        // parents come before children
        for (i, e) in entries.iter().enumerate() {
            if let Some((parent, _)) = e.name.rsplit_once('/') {
                assert!(entries[..i].iter().any(|p| p.name == parent), "{}", e.name);
            }
        }
    }

    #[test]
    fn is_byte_reproducible() {
        assert_eq!(sample(), sample());
    }

    /// Runs the init script's functions in the host's `sh` (dash on Debian; busybox ash in
    /// the guest speaks the same POSIX subset).
    fn init_functions(call: &str) -> String {
        let dir = std::env::temp_dir().join(format!("guest-images-init-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("init");
        std::fs::write(&script, INIT_SCRIPT).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(". {}; {call}", script.display()))
            .env("INIT_FUNCTIONS_ONLY", "1")
            .output()
            .unwrap();
        std::fs::remove_dir_all(dir).unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim_end().to_owned()
    }

    #[test]
    fn init_turns_the_command_line_into_workload_arguments() {
        let cmdline = "console=ttyS0 workload=churn,mib=8,fraction=0.5,secs=3 quiet";
        assert_eq!(
            init_functions(&format!("workload_args \"$(workload_spec '{cmdline}')\"")),
            "churn --mib 8 --fraction 0.5 --secs 3"
        );
        assert_eq!(
            init_functions("workload_args \"$(workload_spec 'console=ttyS0')\""),
            "verify --mib 16"
        );
        assert_eq!(init_functions("workload_args shell"), "shell");
        assert_eq!(
            init_functions("workload_args fill,hold-secs=60"),
            "fill --hold-secs 60"
        );
    }

    #[test]
    fn init_runs_the_workload_and_stops_the_guest() {
        assert!(INIT_SCRIPT.starts_with("#!/bin/sh\n"));
        assert!(INIT_SCRIPT.contains("\n/bin/guest-workload \"$@\"\n"));
        assert!(INIT_SCRIPT.contains("\nreboot -f\n"));
    }
}
