//! Helpers for the VMM benchmarks in `benches/benches/` and the demo (`src/bin/demo.rs`): order
//! statistics of repeated runs, process memory from `/proc/PID/smaps`, and for the density
//! benchmark the pieces it measures with.
//!
//! `cargo bench -p vmm-benches --bench startup` measures the time from starting `vmm` to the
//! probe guest's first console line, and the VMM's memory beyond guest RAM (PSS).
//!
//! `cargo bench -p vmm-benches --bench density` runs the same guests with no merging, kernel
//! KSM (defaults and max rate) and this VMM's engine (defaults and fastest) one after the
//! other and compares host memory over time, time to 95% of the final savings, CPU-seconds
//! and final savings ([`convergence`], [`report`], [`plot`] and [`modes`] are its pure parts;
//! [`prepare`], [`guest_sets`], [`probe_vmm`], [`sampler`], [`cgroup`], [`procstat`] and
//! [`interrupt`] talk to the system).
//! `cargo run --release -p vmm-benches --bin demo` shows `vmm --dedup` on 4 guests.
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

pub mod cgroup;
pub mod convergence;
pub mod guest_sets;
pub mod interrupt;
pub mod modes;
pub mod plot;
pub mod prepare;
pub mod probe_vmm;
pub mod procstat;
pub mod report;
pub mod sampler;
pub mod smaps;
pub mod summary;

/// `error` and its causes on one line, `: `-separated, for a binary's last message.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn errors_print_with_their_causes() {
        let io = std::io::Error::other("disk on fire");
        let outer = super::prepare::Error::Read {
            path: "/x".into(),
            source: io,
        };
        assert_eq!(super::error_chain(&outer), "cannot read /x: disk on fire");
    }
}
