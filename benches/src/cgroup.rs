//! A memory cgroup of its own for a child process, so that its memory can be read as the kernel
//! charges it (KSM pages, the dedup pool's shared memory and kernel memory included), then
//! removed.
//!
//! cgroup v1 (a `cgroup` mount with the `memory` controller) and v2 (a `cgroup2` mount whose
//! `cgroup.subtree_control` enables `memory`) are both used as found; nothing is mounted or
//! enabled here. The child joins the cgroup between `fork` and `exec`, so every page it ever
//! touches is charged to it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

/// Errors creating, joining or reading a cgroup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A cgroup file or folder could not be used.
    #[error("cgroup {path}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A cgroup file does not hold what it should.
    #[error("unexpected content in {0}")]
    Parse(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// Which cgroup interface the memory controller is used through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// cgroup v1: `memory.usage_in_bytes`.
    V1,
    /// cgroup v2: `memory.current`.
    V2,
}

impl Version {
    /// The file holding the cgroup's charged bytes.
    fn usage_file(self) -> &'static str {
        match self {
            Version::V1 => "memory.usage_in_bytes",
            Version::V2 => "memory.current",
        }
    }

    /// Short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Version::V1 => "cgroup v1",
            Version::V2 => "cgroup v2",
        }
    }
}

/// The mount points of `/proc/self/mounts` text where a memory controller may be: the v1
/// `cgroup` mounts with the `memory` option, then every `cgroup2` mount.
pub fn memory_mounts(mounts: &str) -> Vec<(Version, PathBuf)> {
    let mut v1 = Vec::new();
    let mut v2 = Vec::new();
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, dir, kind, options, ..] = fields[..] else {
            continue;
        };
        match kind {
            "cgroup" if options.split(',').any(|o| o == "memory") => {
                v1.push((Version::V1, PathBuf::from(dir)));
            }
            "cgroup2" => v2.push((Version::V2, PathBuf::from(dir))),
            _ => {}
        }
    }
    v1.extend(v2);
    v1
}

/// The value of `key` in a `memory.stat` text (`key value` lines).
pub fn stat_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        if k == key {
            v.trim().parse().ok()
        } else {
            None
        }
    })
}

/// What the cgroup's memory counters say, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Everything charged (`memory.usage_in_bytes` or `memory.current`).
    pub charged: u64,
    /// Of which file cache (`active_file + inactive_file`: reading the images charges their
    /// page cache; shared memory such as a memfd is on the anonymous lists and not in this).
    pub file_cache: u64,
}

impl Usage {
    /// Charged memory other than file cache: anonymous and shared memory, kernel memory.
    pub fn without_file_cache(&self) -> u64 {
        self.charged.saturating_sub(self.file_cache)
    }
}

/// A memory cgroup created for one child process, removed when dropped.
#[derive(Debug)]
pub struct MemoryCgroup {
    path: PathBuf,
    version: Version,
    procs: File,
}

impl MemoryCgroup {
    /// Creates cgroup `name` under the first usable memory controller; `Ok(None)` when this
    /// host has none (no v1 memory mount, and no v2 mount with `memory` enabled for children).
    pub fn create(name: &str) -> Result<Option<Self>, Error> {
        let mounts_path = Path::new("/proc/self/mounts");
        let mounts = fs::read_to_string(mounts_path).map_err(io_err(mounts_path))?;
        for (version, root) in memory_mounts(&mounts) {
            if version == Version::V2 {
                let control = fs::read_to_string(root.join("cgroup.subtree_control"));
                if !control.is_ok_and(|c| c.split_whitespace().any(|w| w == "memory")) {
                    continue;
                }
            }
            let path = root.join(name);
            match fs::create_dir(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
            let procs_path = path.join("cgroup.procs");
            let procs = OpenOptions::new()
                .write(true)
                .open(&procs_path)
                .map_err(io_err(&procs_path))?;
            return Ok(Some(Self {
                path,
                version,
                procs,
            }));
        }
        Ok(None)
    }

    /// The cgroup's folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The interface in use.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Makes the process that `command` starts join this cgroup before it runs `exec`.
    ///
    /// # Errors
    /// When the cgroup's `cgroup.procs` descriptor cannot be duplicated.
    pub fn join_on_spawn(&self, command: &mut Command) -> Result<(), Error> {
        let procs = self.path.join("cgroup.procs");
        vmm_tests::join_cgroup_on_spawn(command, &self.procs).map_err(io_err(&procs))
    }

    /// The cgroup's memory now.
    pub fn usage(&self) -> Result<Usage, Error> {
        let usage_path = self.path.join(self.version.usage_file());
        let text = fs::read_to_string(&usage_path).map_err(io_err(&usage_path))?;
        let charged = text
            .trim()
            .parse()
            .map_err(|_| Error::Parse(usage_path.clone()))?;
        let stat_path = self.path.join("memory.stat");
        let stat = fs::read_to_string(&stat_path).map_err(io_err(&stat_path))?;
        let file_cache = ["active_file", "inactive_file"]
            .iter()
            .map(|k| stat_field(&stat, k).ok_or_else(|| Error::Parse(stat_path.clone())))
            .sum::<Result<u64, Error>>()?;
        Ok(Usage {
            charged,
            file_cache,
        })
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // The child may still be exiting: its cgroup cannot be removed until it is gone.
        for _ in 0..100 {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
        if let Err(e) = fs::remove_dir(&self.path) {
            log::warn!("cannot remove cgroup {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
sysfs /sys sysfs rw,nosuid 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0
cgroup /sys/fs/cgroup/memorybw cgroup rw,memorybw 0 0
";

    #[test]
    fn v1_memory_mounts_come_before_v2_mounts() {
        assert_eq!(
            memory_mounts(MOUNTS),
            [
                (Version::V1, PathBuf::from("/sys/fs/cgroup/memory")),
                (Version::V2, PathBuf::from("/sys/fs/cgroup/unified")),
            ]
        );
        assert!(memory_mounts("proc /proc proc rw 0 0\n").is_empty());
    }

    #[test]
    fn memory_stat_fields() {
        let stat = "cache 4096\nrss 8192\nactive_file 100\ninactive_file 20\nshmem 7\n";
        assert_eq!(stat_field(stat, "active_file"), Some(100));
        assert_eq!(stat_field(stat, "inactive_file"), Some(20));
        assert_eq!(stat_field(stat, "file"), None);
        let usage = Usage {
            charged: 1000,
            file_cache: 120,
        };
        assert_eq!(usage.without_file_cache(), 880);
    }

    #[test]
    fn a_child_is_charged_to_its_own_cgroup() {
        let name = format!("vmm-benches-test-{}", std::process::id());
        let Some(cgroup) = MemoryCgroup::create(&name).unwrap() else {
            eprintln!("skipped: no usable memory cgroup controller");
            return;
        };
        let path = cgroup.path().to_owned();
        let mut command = Command::new("sh");
        command.args(["-c", "cat /proc/self/cgroup"]);
        cgroup.join_on_spawn(&mut command).unwrap();
        let out = command.output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&name), "{text}");
        assert!(cgroup.usage().is_ok());
        drop(cgroup);
        assert!(!path.exists());
    }
}
