//! The overcommit guardrail: guest RAM committed by the process against host RAM plus swap.
//!
//! Merged pages can be unshared by the guests at any time (every write to a merged page gets a
//! private copy), so memory that merging saved is never a reserve to start more guests on. The
//! KSM guidance this project started from asks for enough swap for the committed RAM even
//! without merging; a process whose guests commit more than RAM + swap can be killed by the
//! OOM killer as soon as they write.

use crate::hostmem::HostMemory;
use crate::report::human_bytes;

/// What to do when guests commit more RAM than the host has (RAM + swap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Start anyway and print a warning.
    #[default]
    Warn,
    /// Refuse to start (a usage error).
    Refuse,
}

/// Guests commit more memory than the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the guests commit {} of RAM, more than this host's {} of RAM + {} of swap; merged pages can be unshared by the guests at any time, so give less --mem or fewer --guests, or add swap",
    human_bytes((*.committed).into()),
    human_bytes((*.ram).into()),
    human_bytes((*.swap).into())
)]
pub struct Overcommit {
    /// Guest RAM of every guest of the process, in bytes.
    pub committed: u64,
    /// Host RAM.
    pub ram: u64,
    /// Host swap.
    pub swap: u64,
}

/// Compares `committed` bytes of guest RAM with the host's RAM + swap: `Some` when it is more.
pub fn check(committed: u64, host: &HostMemory) -> Option<Overcommit> {
    let capacity = host.mem_total.saturating_add(host.swap_total);
    (committed > capacity).then_some(Overcommit {
        committed,
        ram: host.mem_total,
        swap: host.swap_total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(ram: u64, swap: u64) -> HostMemory {
        HostMemory {
            mem_total: ram,
            mem_available: ram / 2,
            swap_total: swap,
        }
    }

    #[test]
    fn within_ram_plus_swap_is_fine() {
        assert_eq!(check(8 << 30, &host(8 << 30, 0)), None);
        assert_eq!(check(12 << 30, &host(8 << 30, 4 << 30)), None);
    }

    #[test]
    fn beyond_ram_plus_swap_is_reported_with_sizes() {
        let o = check(36 << 30, &host(24 << 30, 1 << 30)).unwrap();
        assert_eq!(
            o,
            Overcommit {
                committed: 36 << 30,
                ram: 24 << 30,
                swap: 1 << 30
            }
        );
        let text = o.to_string();
        assert!(text.contains("36.0GiB") && text.contains("24.0GiB") && text.contains("1.0GiB"));
        assert!(!text.contains('\n'));
    }
}
