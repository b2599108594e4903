//! The memory cgroup this process runs in (cgroup v1 `memory` controller, or cgroup v2 with the
//! memory controller enabled), and its figures: usage, the working set (usage less inactive file
//! cache, which the kernel reclaims before it fails a charge), the effective limit (the lowest of
//! the cgroup's and its ancestors') and whether the kernel reports it out of memory.
//!
//! [`CgroupReader`] keeps the files open and rereads them from offset 0, so that a look needs no
//! new file descriptor (it keeps working when the process is out of descriptors) and allocates
//! nothing after the first.

use std::io;
use std::path::{Path, PathBuf};

use crate::hostmem::Reread;

/// Limits at or above this are "no limit" (cgroup v1 writes 2^63 less a page for none).
const UNLIMITED: u64 = 1 << 60;

/// Errors reading a memory cgroup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A file does not hold what it should.
    #[error("{path} has no readable {field}")]
    Field {
        /// The file.
        path: PathBuf,
        /// What is missing.
        field: &'static str,
    },
}

/// The cgroup hierarchy's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// cgroup v1, `memory` controller.
    V1,
    /// cgroup v2 (unified), memory controller enabled.
    V2,
}

impl Version {
    /// `v1` or `v2`.
    pub fn name(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// Where a process's memory cgroup is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// The hierarchy's version.
    pub version: Version,
    /// The cgroup's path inside its hierarchy (`/`, `/machine/vm1`).
    pub path: String,
    /// Where the hierarchy is mounted.
    pub mount: PathBuf,
    /// The cgroup's folder.
    pub dir: PathBuf,
}

/// The memory cgroup named by `/proc/self/cgroup`'s text `proc_cgroup`, found in the mounts
/// of `/proc/self/mountinfo`'s text `mountinfo`. A v1 `memory` hierarchy wins over v2; `None`
/// when neither is mounted.
pub fn locate(proc_cgroup: &str, mountinfo: &str) -> Option<Place> {
    let mut v1 = None;
    let mut v2 = None;
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2 = Some(path.to_string());
        } else if controllers.split(',').any(|c| c == "memory") {
            v1 = Some(path.to_string());
        }
    }
    let mut v1_mount = None;
    let mut v2_mount = None;
    for line in mountinfo.lines() {
        // id parent major:minor root mountpoint options [optional...] - fstype source superoptions
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let rights: Vec<&str> = right.split(' ').collect();
        let (Some(root), Some(point), Some(fstype)) =
            (fields.get(3), fields.get(4), rights.first())
        else {
            continue;
        };
        let supers = rights.get(2).copied().unwrap_or_default();
        match *fstype {
            "cgroup" if supers.split(',').any(|o| o == "memory") => {
                v1_mount.get_or_insert((root.to_string(), PathBuf::from(point)));
            }
            "cgroup2" => {
                v2_mount.get_or_insert((root.to_string(), PathBuf::from(point)));
            }
            _ => {}
        }
    }
    let place = |version, path: String, (root, mount): (String, PathBuf)| {
        let inside = path
            .strip_prefix(root.trim_end_matches('/'))
            .unwrap_or(&path)
            .trim_start_matches('/')
            .to_string();
        Place {
            version,
            dir: mount.join(inside),
            mount,
            path,
        }
    };
    match (v1.zip(v1_mount), v2.zip(v2_mount)) {
        (Some((p, m)), _) => Some(place(Version::V1, p, m)),
        (None, Some((p, m))) => Some(place(Version::V2, p, m)),
        (None, None) => None,
    }
}

/// One look at a memory cgroup, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Figures {
    /// Memory charged to the cgroup (v1 `memory.usage_in_bytes`, v2 `memory.current`).
    pub usage: u64,
    /// Inactive file cache inside `usage`, which reclaim frees first.
    pub inactive_file: u64,
    /// The effective limit: the lowest of the cgroup's and its ancestors'; `None` for none.
    pub limit: Option<u64>,
    /// The kernel reports the cgroup out of memory now (v1 `under_oom`).
    pub under_oom: bool,
    /// Out-of-memory events so far (v1 `oom_kill`, v2 `memory.events` `oom`).
    pub oom_events: u64,
}

impl Figures {
    /// Memory the kernel cannot simply reclaim: `usage` less inactive file cache.
    pub fn working_set(&self) -> u64 {
        self.usage.saturating_sub(self.inactive_file)
    }
}

/// The value of `key value` lines (as in `memory.stat`, `memory.oom_control`).
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// A limit file's value (`max` for none).
pub fn limit_value(text: &str) -> Option<u64> {
    let v = text.trim();
    if v == "max" {
        return None;
    }
    v.parse().ok().filter(|&n| n < UNLIMITED)
}

/// A cgroup file kept open.
#[derive(Debug)]
struct Source(Reread);

impl Source {
    fn open(path: PathBuf) -> Result<Self, Error> {
        Reread::open(&path)
            .map(Source)
            .map_err(|source| Error::Read { path, source })
    }

    fn path(&self) -> PathBuf {
        self.0.path().to_path_buf()
    }

    fn read(&mut self) -> Result<&str, Error> {
        let path = self.0.path().to_path_buf();
        self.0.read().map_err(|source| Error::Read { path, source })
    }

    fn number(&mut self) -> Result<u64, Error> {
        let path = self.path();
        self.read()?.trim().parse().map_err(|_| Error::Field {
            path,
            field: "number",
        })
    }
}

/// Reads one memory cgroup's figures, its files kept open.
#[derive(Debug)]
pub struct CgroupReader {
    place: Place,
    usage: Source,
    stat: Source,
    /// v1: `memory.oom_control`; v2: `memory.events`.
    events: Source,
    /// v2: `memory.max` of the cgroup and each ancestor below the mount.
    limits: Vec<Source>,
}

impl CgroupReader {
    /// Opens the files of the memory cgroup at `place`.
    pub fn open(place: Place) -> Result<Self, Error> {
        let at = |name: &str| Source::open(place.dir.join(name));
        let (usage, stat, events, limits) = match place.version {
            Version::V1 => (
                at("memory.usage_in_bytes")?,
                at("memory.stat")?,
                at("memory.oom_control")?,
                Vec::new(),
            ),
            Version::V2 => {
                let mut limits = Vec::new();
                let mut dir: &Path = &place.dir;
                while dir.starts_with(&place.mount) && dir != place.mount {
                    limits.push(Source::open(dir.join("memory.max"))?);
                    dir = dir.parent().unwrap_or(&place.mount);
                }
                (
                    at("memory.current")?,
                    at("memory.stat")?,
                    at("memory.events")?,
                    limits,
                )
            }
        };
        Ok(Self {
            place,
            usage,
            stat,
            events,
            limits,
        })
    }

    /// The memory cgroup of this process, if it is in one whose files can be read.
    pub fn of_this_process() -> Result<Option<Self>, Error> {
        let read = |p: &str| {
            std::fs::read_to_string(p).map_err(|source| Error::Read {
                path: p.into(),
                source,
            })
        };
        let Some(place) = locate(&read("/proc/self/cgroup")?, &read("/proc/self/mountinfo")?)
        else {
            return Ok(None);
        };
        // v2 without the memory controller in this cgroup, or the root cgroup: no files.
        let probe = match place.version {
            Version::V1 => "memory.usage_in_bytes",
            Version::V2 => "memory.current",
        };
        if !place.dir.join(probe).exists() {
            return Ok(None);
        }
        Self::open(place).map(Some)
    }

    /// Where the cgroup is.
    pub fn place(&self) -> &Place {
        &self.place
    }

    /// Reads the figures now.
    pub fn read(&mut self) -> Result<Figures, Error> {
        let usage = self.usage.number()?;
        let stat_path = self.stat.path();
        let missing = |field| Error::Field {
            path: stat_path.clone(),
            field,
        };
        match self.place.version {
            Version::V1 => {
                let stat = self.stat.read()?;
                let inactive_file =
                    keyed(stat, "total_inactive_file").ok_or_else(|| missing("inactive"))?;
                let limit = keyed(stat, "hierarchical_memory_limit")
                    .ok_or_else(|| missing("hierarchical_memory_limit"))?;
                let oom = self.events.read()?;
                Ok(Figures {
                    usage,
                    inactive_file,
                    limit: (limit < UNLIMITED).then_some(limit),
                    under_oom: keyed(oom, "under_oom").unwrap_or(0) != 0,
                    oom_events: keyed(oom, "oom_kill").unwrap_or(0),
                })
            }
            Version::V2 => {
                let inactive_file = keyed(self.stat.read()?, "inactive_file")
                    .ok_or_else(|| missing("inactive_file"))?;
                let oom_events = keyed(self.events.read()?, "oom").unwrap_or(0);
                let mut limit: Option<u64> = None;
                for s in &mut self.limits {
                    if let Some(l) = limit_value(s.read()?) {
                        limit = Some(limit.map_or(l, |m| m.min(l)));
                    }
                }
                Ok(Figures {
                    usage,
                    inactive_file,
                    limit,
                    under_oom: false,
                    oom_events,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
24 31 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
35 24 0:30 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
40 35 0:35 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
41 35 0:36 / /sys/fs/cgroup/cpu rw,relatime shared:16 - cgroup cgroup rw,cpu
";

    #[test]
    fn v1_memory_wins_and_is_found_under_its_mount() {
        let cg = "9:name=systemd:/\n4:memory:/tenants/vm1\n1:cpu:/\n0::/\n";
        let p = locate(cg, MOUNTINFO).unwrap();
        assert_eq!(p.version, Version::V1);
        assert_eq!(p.path, "/tenants/vm1");
        assert_eq!(p.dir, PathBuf::from("/sys/fs/cgroup/memory/tenants/vm1"));
    }

    #[test]
    fn v2_alone_and_mount_roots_inside_containers() {
        let p = locate("0::/system.slice/vmm.service\n", MOUNTINFO).unwrap();
        assert_eq!(p.version, Version::V2);
        assert_eq!(
            p.dir,
            PathBuf::from("/sys/fs/cgroup/unified/system.slice/vmm.service")
        );
        // A container sees its own cgroup as the mount's root.
        let mi = "50 40 0:40 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let p = locate("0::/docker/abc/inner\n", mi).unwrap();
        assert_eq!(p.dir, PathBuf::from("/sys/fs/cgroup/inner"));
        assert_eq!(
            locate("0::/\n", "1 0 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }

    #[test]
    fn figures_parse_and_unlimited_is_none() {
        let stat = "cache 100\nrss 200\nhierarchical_memory_limit 9223372036854771712\n\
                    total_inactive_file 4096\n";
        assert_eq!(keyed(stat, "total_inactive_file"), Some(4096));
        assert_eq!(keyed(stat, "inactive"), None);
        assert_eq!(
            keyed("oom_kill_disable 1\nunder_oom 0\n", "under_oom"),
            Some(0)
        );
        assert_eq!(limit_value("max\n"), None);
        assert_eq!(limit_value("1048576\n"), Some(1 << 20));
        assert_eq!(limit_value("9223372036854771712"), None);
        let f = Figures {
            usage: 10,
            inactive_file: 4,
            limit: None,
            under_oom: false,
            oom_events: 0,
        };
        assert_eq!(f.working_set(), 6);
    }

    #[test]
    fn this_process_reads_consistent_figures() {
        // Wherever the tests run: either no readable memory cgroup, or figures that add up.
        if let Some(mut r) = CgroupReader::of_this_process().unwrap() {
            let a = r.read().unwrap();
            let b = r.read().unwrap();
            assert!(a.usage > 0 && b.usage > 0, "{a:?}");
            assert!(a.working_set() <= a.usage);
            if let Some(l) = a.limit {
                assert!(l > 0);
            }
        }
    }
}
