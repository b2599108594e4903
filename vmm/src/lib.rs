//! A minimal KVM virtual machine monitor for x86-64 hosts, built on the rust-vmm crates.
//!
//! It runs one or more independent guests in one process: a Linux kernel (bzImage or ELF
//! vmlinux, with an optional initrd) through the 64-bit boot protocol, or a flat binary
//! started in 64-bit mode with identity paging. Each guest has its own RAM (vm-memory,
//! registered as KVM memory slots), in-kernel irqchip and PIT, a 16550 serial console, an
//! i8042 and a debug-exit port (0xf4) that stops the guest with the byte written there.
//!
//! Beside the guests, [`services::Services`] runs what the `vmm` binary offers: memory merging
//! by one [`vm_dedup`] engine for all guests, fed by each guest's KVM dirty log ([`dedup`]), or
//! by kernel KSM ([`kernel_ksm`]); periodic statistics ([`monitor`], [`report`]); and the
//! control API over a unix socket ([`api`]). `docs/api.md` is the user reference.
//!
//! ```no_run
//! use vmm::config::{Boot, GuestConfig, VmmConfig};
//!
//! let guest = GuestConfig {
//!     name: vmm::config::guest_name(0),
//!     mem: 64 << 20,
//!     vcpus: 1,
//!     boot: Boot::Flat { image: "probe.bin".into(), entry: 0x10_0000 },
//!     mem_image: None,
//!     track_dirty: false,
//! };
//! let config = VmmConfig::replicated(&guest, 2, &[])?;
//! let vmm = vmm::Vmm::new(&config)?;
//! let memory = vmm.guests()[0].memory().clone(); // what a dedup engine would scan
//! let status = vmm.run()?;
//! # drop(memory);
//! # let _ = status;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod api;
pub mod arch;
pub mod cgroup;
pub mod config;
pub mod control;
pub mod dedup;
pub mod devices;
pub mod exit;
pub mod heap;
pub mod hostmem;
pub mod kernel_ksm;
pub mod kvm;
pub mod loader;
pub mod memory;
pub mod metrics;
pub mod monitor;
pub mod overcommit;
pub mod report;
pub mod services;
pub mod setup;
pub mod signals;
pub mod stderr;
pub mod vcpu;
pub mod vm;
mod vmm;

pub use vmm::{Error, StopHandle, Vmm};
