//! The guest CPUID: what KVM supports on this host, with the topology and identity of each
//! vCPU filled in and what the VMM does not provide hidden.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1: EBX holds the initial APIC ID (bits 24-31) and the logical processor count
/// (bits 16-23); ECX and EDX hold feature flags.
const LEAF_FEATURES: u32 = 0x1;
/// Leaf 4: deterministic cache parameters; EAX bits 26-31 hold cores per package - 1.
const LEAF_CACHE: u32 = 0x4;
/// Leaf 0xa: architectural performance monitoring (no virtual PMU is set up).
const LEAF_PMU: u32 = 0xa;
/// Leaf 0xb: extended topology.
const LEAF_TOPOLOGY: u32 = 0xb;
/// Leaf 0x1f: extended topology v2.
const LEAF_TOPOLOGY_V2: u32 = 0x1f;

/// Leaf 1 ECX: TSC-deadline timer.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;

/// Topology level types in leaves 0xb / 0x1f, ECX bits 8-15.
const LEVEL_SMT: u32 = 1;
/// Core level.
const LEVEL_CORE: u32 = 2;

/// What one vCPU needs to know to adjust the host-supported CPUID.
#[derive(Debug, Clone, Copy)]
pub struct VcpuIdentity {
    /// This vCPU's index, also its APIC ID.
    pub index: u8,
    /// vCPUs in the guest, all presented as cores of one package.
    pub count: u8,
    /// Whether the in-kernel LAPIC offers the TSC-deadline timer.
    pub tsc_deadline: bool,
}

/// Adjusts the host-supported `entries` for the vCPU `id`.
pub fn filter(entries: &mut [kvm_cpuid_entry2], id: VcpuIdentity) {
    let apic_id = u32::from(id.index);
    let count = u32::from(id.count.max(1));
    // Bits of the APIC ID that number the cores of the package.
    let core_bits = 32 - (count - 1).leading_zeros();

    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (count.min(255) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if id.tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            // Cache type 0 marks the end of the subleaves.
            LEAF_CACHE if e.eax & 0x1f != 0 => {
                e.eax = (e.eax & 0x03ff_ffff) | ((count - 1).min(63) << 26);
            }
            LEAF_PMU => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                let (eax, ebx, level) = match e.index {
                    0 => (0, 1, LEVEL_SMT),
                    1 => (core_bits, count, LEVEL_CORE),
                    _ => (0, 0, 0),
                };
                e.eax = eax;
                e.ebx = ebx;
                e.ecx = (level << 8) | (e.index & 0xff);
                e.edx = apic_id;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0x0000_00ff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn host() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(LEAF_FEATURES, 0),
            entry(LEAF_CACHE, 0),
            entry(LEAF_PMU, 0),
            entry(LEAF_TOPOLOGY, 0),
            entry(LEAF_TOPOLOGY, 1),
            entry(LEAF_TOPOLOGY, 2),
        ]
    }

    fn find(e: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *e.iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn leaf_1_carries_apic_id_count_and_hypervisor_bit() {
        let mut e = host();
        let id = VcpuIdentity {
            index: 2,
            count: 3,
            tsc_deadline: false,
        };
        filter(&mut e, id);
        let l1 = find(&e, LEAF_FEATURES, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 3);
        assert_eq!(l1.ebx & 0xffff, 0xffff);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(l1.ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_describes_one_package_of_cores() {
        let mut e = host();
        let id = VcpuIdentity {
            index: 4,
            count: 5,
            tsc_deadline: true,
        };
        filter(&mut e, id);
        let smt = find(&e, LEAF_TOPOLOGY, 0);
        let core = find(&e, LEAF_TOPOLOGY, 1);
        let end = find(&e, LEAF_TOPOLOGY, 2);
        assert_eq!(
            (smt.eax, smt.ebx, smt.ecx >> 8, smt.edx),
            (0, 1, LEVEL_SMT, 4)
        );
        assert_eq!((core.eax, core.ebx, core.ecx >> 8), (3, 5, LEVEL_CORE));
        assert_eq!((end.ebx, end.ecx, end.edx), (0, 2, 4));
        assert_eq!(find(&e, LEAF_CACHE, 0).eax >> 26, 4);
        assert_eq!(find(&e, LEAF_PMU, 0).eax, 0);
        assert_ne!(find(&e, LEAF_FEATURES, 0).ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn a_single_vcpu_has_no_core_bits() {
        let mut e = host();
        let id = VcpuIdentity {
            index: 0,
            count: 1,
            tsc_deadline: false,
        };
        filter(&mut e, id);
        assert_eq!(find(&e, LEAF_TOPOLOGY, 1).eax, 0);
        assert_eq!(find(&e, LEAF_FEATURES, 0).edx & EDX_HTT, 0);
    }
}
