//! The host side: opening `/dev/kvm` with errors that say what to do, the capabilities this
//! VMM needs, and what the host offers guests (CPUID, MSRs, vCPU limit, RAM).

use std::fs;
use std::path::Path;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

/// Where KVM lives.
pub const KVM_PATH: &str = "/dev/kvm";
/// Present when KVM is `kvm_pvm` (no hardware virtualization: guests run in KVM's emulator).
const PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// Errors about the host.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No `/dev/kvm`.
    #[error(
        "{KVM_PATH} does not exist: this host has no KVM; load the kvm module (kvm_intel, kvm_amd or kvm_pvm) or use a host with virtualization"
    )]
    NoKvm,
    /// Not allowed to open it.
    #[error(
        "permission denied opening {KVM_PATH}: run as root or add your user to the group that owns {KVM_PATH} (usually kvm)"
    )]
    Permission,
    /// Any other failure opening it.
    #[error("cannot open {KVM_PATH}: {0}")]
    Open(#[source] kvm_ioctls::Error),
    /// A capability this VMM needs is missing.
    #[error("this host's KVM lacks {0}, which this VMM needs; use a newer kernel")]
    MissingCap(&'static str),
    /// A host query failed.
    #[error("cannot query KVM for {what}: {source}")]
    Query {
        /// What was asked.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// An open KVM and what it offers.
#[derive(Debug)]
pub struct Host {
    kvm: Kvm,
    max_vcpus: u32,
    cpuid: CpuId,
    msrs: Vec<u32>,
    tsc_deadline: bool,
    mem_total: Option<u64>,
}

impl Host {
    /// Opens `/dev/kvm` and checks the capabilities the VMM needs.
    pub fn open() -> Result<Self, Error> {
        let kvm = Kvm::new().map_err(|e| match e.errno() {
            libc::ENOENT | libc::ENODEV | libc::ENXIO => Error::NoKvm,
            libc::EACCES | libc::EPERM => Error::Permission,
            _ => Error::Open(e),
        })?;
        for (cap, name) in [
            (Cap::Irqchip, "an in-kernel irqchip"),
            (Cap::Pit2, "an in-kernel PIT"),
            (Cap::Irqfd, "irqfd"),
            (Cap::UserMemory, "user memory slots"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::MissingCap(name));
            }
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| Error::Query {
                what: "supported CPUID",
                source,
            })?;
        let msrs = kvm
            .get_msr_index_list()
            .map_err(|source| Error::Query {
                what: "its MSR list",
                source,
            })?
            .as_slice()
            .to_vec();
        let max_vcpus = u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX);
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        let mem_total = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| parse_mem_total(&m));
        Ok(Self {
            kvm,
            max_vcpus,
            cpuid,
            msrs,
            tsc_deadline,
            mem_total,
        })
    }

    /// The KVM handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Most vCPUs KVM runs in one VM.
    pub fn max_vcpus(&self) -> u32 {
        self.max_vcpus
    }

    /// CPUID KVM can give guests.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.cpuid
    }

    /// MSRs KVM lets guests have.
    pub fn msr_list(&self) -> &[u32] {
        &self.msrs
    }

    /// Whether the in-kernel LAPIC has the TSC-deadline timer.
    pub fn tsc_deadline(&self) -> bool {
        self.tsc_deadline
    }

    /// Host RAM in bytes, when `/proc/meminfo` says.
    pub fn mem_total(&self) -> Option<u64> {
        self.mem_total
    }
}

/// Whether KVM here is `kvm_pvm`: guest code runs in KVM's instruction emulator, very slowly.
pub fn is_pvm() -> bool {
    Path::new(PVM_MODULE).exists()
}

/// `MemTotal` from the text of `/proc/meminfo`, in bytes.
pub fn parse_mem_total(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_parses_from_meminfo() {
        let text = "MemTotal:       24567892 kB\nMemFree:        123 kB\n";
        assert_eq!(parse_mem_total(text), Some(24_567_892 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: lots\n"), None);
    }

    #[test]
    fn opening_kvm_works_or_says_why() {
        match Host::open() {
            Ok(host) => {
                assert!(host.max_vcpus() >= 1);
                assert!(!host.supported_cpuid().as_slice().is_empty());
            }
            Err(e) => assert!(e.to_string().contains(KVM_PATH), "{e}"),
        }
    }
}
