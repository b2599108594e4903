//! Taking [`Sample`]s of a running VMM: its PSS (`/proc/PID/smaps_rollup`), its cgroup's
//! memory, the CPU time of whatever merges (the VMM, and `ksmd` for kernel KSM) and the
//! merger's count of full scans, all relative to the moment its guests were ready.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use vm_dedup::ksm::{self, KsmError};

use crate::cgroup::{self, MemoryCgroup};
use crate::convergence::Sample;
use crate::procstat;
use crate::smaps::rollup_pss_kib;

/// Errors taking a sample.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// smaps_rollup could not be read or has no PSS.
    #[error("cannot read the PSS of process {pid}")]
    Pss {
        /// The process.
        pid: u32,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The process's CPU time could not be read.
    #[error(transparent)]
    Cpu(#[from] procstat::Error),
    /// The cgroup could not be read.
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
    /// Kernel KSM's figures could not be read.
    #[error("kernel KSM")]
    Ksm(#[source] KsmError),
}

/// Who merges, and so where CPU time and full scans are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Merger {
    /// Nobody: the VMM's CPU only, no scan count.
    None,
    /// Kernel KSM: the VMM's and `ksmd`'s CPU, KSM's `full_scans`.
    KernelKsm,
    /// The VMM's engine: its CPU, `full_scans` from the `--stats-json` file.
    Engine {
        /// The stats file.
        stats_json: PathBuf,
    },
}

/// The `full_scans` field of the VMM's stats JSON file, when it is there and complete.
pub fn stats_json_full_scans(path: &Path) -> Option<u64> {
    read_stats_json(path)?["full_scans"].as_u64()
}

/// The VMM's stats JSON file (`GET /stats`), when it is there and complete.
pub fn read_stats_json(path: &Path) -> Option<serde_json::Value> {
    let text = fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// The PSS of process `pid` in bytes.
pub fn pss_bytes(pid: u32) -> Result<u64, Error> {
    let pss = |source| Error::Pss { pid, source };
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).map_err(pss)?;
    let kib = rollup_pss_kib(&text)
        .ok_or_else(|| pss(io::Error::new(io::ErrorKind::InvalidData, "no Pss line")))?;
    Ok(kib * 1024)
}

/// Samples one VMM process from the moment its guests were ready.
#[derive(Debug)]
pub struct Sampler<'a> {
    pid: u32,
    ready: Instant,
    cgroup: Option<&'a MemoryCgroup>,
    merger: Merger,
    cpu_at_ready: f64,
    scans_at_ready: Option<u64>,
}

impl<'a> Sampler<'a> {
    /// Starts sampling process `pid` whose guests were all ready at `ready`: CPU time and full
    /// scans are counted from now (call it right after the ready moment).
    pub fn new(
        pid: u32,
        ready: Instant,
        cgroup: Option<&'a MemoryCgroup>,
        merger: Merger,
    ) -> Result<Self, Error> {
        let mut sampler = Self {
            pid,
            ready,
            cgroup,
            merger,
            cpu_at_ready: 0.0,
            scans_at_ready: None,
        };
        sampler.cpu_at_ready = sampler.cpu_total()?;
        sampler.scans_at_ready = sampler.full_scans_total()?;
        Ok(sampler)
    }

    /// CPU-seconds of the VMM (and `ksmd` for kernel KSM) since they started.
    fn cpu_total(&self) -> Result<f64, Error> {
        let vmm = procstat::cpu_secs(self.pid)?;
        let ksmd = match self.merger {
            Merger::KernelKsm => ksm::ksmd_cpu_ns().map_err(Error::Ksm)? as f64 / 1e9,
            _ => 0.0,
        };
        Ok(vmm + ksmd)
    }

    /// The merger's count of full scans, when it has one (and, for the engine, once its stats
    /// file exists).
    fn full_scans_total(&self) -> Result<Option<u64>, Error> {
        Ok(match &self.merger {
            Merger::None => None,
            Merger::KernelKsm => Some(ksm::stats().map_err(Error::Ksm)?.full_scans),
            Merger::Engine { stats_json } => stats_json_full_scans(stats_json),
        })
    }

    /// One sample now.
    pub fn sample(&mut self) -> Result<Sample, Error> {
        let t = self.ready.elapsed().as_secs_f64();
        let pss = pss_bytes(self.pid)?;
        let cgroup = match self.cgroup {
            Some(c) => Some(c.usage()?.without_file_cache()),
            None => None,
        };
        let cpu = self.cpu_total()? - self.cpu_at_ready;
        let scans = self.full_scans_total()?;
        if self.scans_at_ready.is_none() {
            // The engine's stats file may appear only after the ready moment: count from
            // the first value seen (never more passes than there were since ready).
            self.scans_at_ready = scans;
        }
        let full_scans = scans.map(|n| n - self.scans_at_ready.unwrap_or(0).min(n));
        Ok(Sample {
            t,
            pss,
            cgroup,
            cpu: cpu.max(0.0),
            full_scans,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_this_process() {
        let mut s = Sampler::new(std::process::id(), Instant::now(), None, Merger::None).unwrap();
        let a = s.sample().unwrap();
        assert!(a.pss > 0);
        assert!(a.t >= 0.0 && a.cpu >= 0.0);
        assert_eq!((a.cgroup, a.full_scans), (None, None));
        assert!(pss_bytes(u32::MAX).is_err());
    }

    #[test]
    fn full_scans_from_the_stats_file() {
        let dir = std::env::temp_dir().join(format!("vmm-benches-stats-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stats.json");
        assert_eq!(stats_json_full_scans(&path), None);
        fs::write(&path, r#"{"mode":"dedup","full_scans":3}"#).unwrap();
        assert_eq!(stats_json_full_scans(&path), Some(3));
        fs::write(&path, r#"{"mode":"dedup","full_sc"#).unwrap();
        assert_eq!(stats_json_full_scans(&path), None);
        fs::remove_dir_all(dir).unwrap();
    }
}
