//! Same-page merging for guest memory, in userspace: kernel KSM's job, done by the VMM.
//!
//! The engine scans the guest memory it is given (any vm-memory [`GuestMemoryBackend`] of
//! private anonymous [`GuestRegionMmap`] regions, e.g. [`vm_memory::GuestMemoryMmap`]) in
//! parallel, finds pages with identical content through a 28-bit hash and a hashbrown index,
//! and merges them into one read-only copy per host NUMA node, kept in a sealed memfd pool.
//! A merge is never decided on a hash: each page is compared byte by byte with its copy while
//! a userfaultfd write-protect guard holds writers off, then remapped in place (same host
//! virtual address, so KVM memory slots never change; KVM follows through its MMU notifiers).
//! A later write, from a host thread or from a guest through a KVM write fault, gets a private
//! copy (copy-on-write): no other sharer and no pool page ever changes. All-zero pages are
//! dropped to the host zero page. Pages of different trust domains never share a copy, except
//! all-zero pages.
//!
//! Knobs and statistics carry kernel KSM's names ([`Config`], [`Stats`]). The [`ksm`] module
//! drives kernel KSM itself, for comparison.
//!
//! # Embedding in a VMM
//!
//! ```no_run
//! use std::sync::Arc;
//! use vm_dedup::{Config, Engine, GuestConfig};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Guest RAM as the VMM creates it (private anonymous mappings).
//! let ram = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)])?);
//!
//! // One engine per process, knobs by KSM's names.
//! let mut config = Config::default();
//! config.apply_options("pages_to_scan=16384,sleep_millisecs=10,max_page_sharing=256")?;
//! let engine = Engine::new(config)?;
//!
//! // Register each guest with a name and a trust domain. A dirty-page source built from KVM's
//! // dirty log and an exclusion source for in-flight I/O can be added with
//! // `GuestConfig::with_dirty_source` and `GuestConfig::with_exclusion_source`.
//! let guest = engine.register(GuestConfig::new("vm0", "tenant-a"), ram.clone())?;
//!
//! // Either scan in the background, paced by `pages_to_scan` and `sleep_millisecs`...
//! let scanner = engine.start()?;
//! // ... or run blocking passes: `engine.scan_pass()?`.
//! let stats = engine.stats();
//! println!("saved {} bytes, {} copy-on-write breaks", stats.bytes_saved, stats.cow_breaks);
//!
//! scanner.stop();
//! engine.unmerge_all()?;
//! engine.unregister(guest)?;
//! # Ok(())
//! # }
//! ```
//!
//! # Rules for the VMM
//! - Never discard registered guest memory with `MADV_DONTNEED` (balloon, reset): a merged
//!   page would read back the pool's content. Use [`Engine::discard`] instead.
//! - Never `mprotect`, `munmap` or `mremap` registered guest memory: unregister it first (the
//!   scan reads every page it is given, and a page it cannot read ends the process).
//! - Dropping the last handle to the engine with guests registered unmerges those whose memory
//!   lives on, as [`Engine::release`] does; unregistering them first says how it went.
//! - Pages pinned for device I/O cannot be seen from userspace: report them through an
//!   [`ExclusionSource`]. Memory shared with other processes (vhost-user) is not merged, nor
//!   is file-backed, hugetlb or read-only memory: [`Engine::register`] checks each region
//!   against /proc/self/smaps (a region over a raw pointer claims private anonymous memory
//!   whatever it maps) and leaves such regions alone.
//! - Give guest memory its attributes (`MADV_DONTDUMP`, `MADV_DONTFORK`, `mlock`, ...) before
//!   registering it: they are recorded then and given to every mapping the engine makes inside
//!   guest memory (merged pages, discarded memory, the region rebuilt by an unmerge); changes
//!   made while it is registered are not followed (change protection or attributes only
//!   after unregistering). Unmerging a locked region locks its rebuilt copy before it
//!   replaces the old one, which needs `RLIMIT_MEMLOCK` room for it (or `CAP_IPC_LOCK`).
//! - Each isolated merged page costs a VMA; the engine keeps within a budget derived from
//!   `vm.max_map_count` ([`Config::vma_budget`]), and when that cannot hold every merge it
//!   spends it on the longest runs first ([`demand`]).

pub mod backoff;
pub mod budget;
pub mod config;
pub mod demand;
pub mod engine;
pub mod fault;
pub mod guest;
pub mod hash;
pub mod hooks;
pub mod index;
pub mod ksm;
pub mod merge;
pub mod meta;
pub mod model;
pub mod numa;
pub mod pacing;
pub mod pages;
pub mod plan;
pub mod pool;
pub mod scan;
pub mod scanner;
pub mod slots;
pub mod stability;
pub mod stats;
pub mod sys;
pub mod unmerge;

mod account;
mod admit;
mod commit;
mod decide;
mod ids;
mod state;
mod step;

pub use config::{Config, ConfigError, RunMode};
pub use engine::{Engine, EngineError};
pub use fault::{FaultPoint, Faults};
pub use guest::{GuestConfig, GuestId};
pub use hooks::{DirtySource, ExclusionSource};
pub use meta::PageState;
pub use numa::{FakeTopology, HostTopology, Topology};
pub use pages::{MergedPage, PageInfo};
pub use scanner::Scanner;
pub use stats::{Failing, Failures, GuestStats, Stats};

#[doc(no_inline)]
pub use vm_memory::{GuestMemoryBackend, GuestRegionMmap};
