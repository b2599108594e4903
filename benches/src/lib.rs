//! Helpers for the VMM benchmarks in `benches/benches/`: order statistics of repeated runs and
//! process memory from `/proc/PID/smaps`.
//!
//! `cargo bench -p vmm-benches --bench startup` measures the time from starting `vmm` to the
//! probe guest's first console line, and the VMM's memory beyond guest RAM (PSS).
//!
//! ```
//! use std::time::Duration;
//! use vmm_benches::summary::Summary;
//!
//! let runs = [Duration::from_millis(15), Duration::from_millis(12), Duration::from_millis(30)];
//! let s = Summary::of(&runs).unwrap();
//! assert_eq!((s.median, s.p90), (Duration::from_millis(15), Duration::from_millis(30)));
//! let me = vmm_benches::smaps::ProcessMemory::of(std::process::id()).unwrap();
//! assert!(me.pss_kib > 0);
//! ```

pub mod smaps;
pub mod summary;
