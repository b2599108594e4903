//! x86-64 specifics: the guest physical layout and everything written into guest memory or
//! vCPU registers before the first instruction runs.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod msr;
pub mod paging;
pub mod regs;
