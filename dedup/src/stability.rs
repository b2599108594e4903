//! The stability rule: a page is a merge candidate only when its content is known not to have
//! changed since the previous look, either because its hash is the same on two consecutive
//! passes or because the dirty-page source says nobody wrote it.

use crate::meta::{Meta, PageState};

/// What a pass learnt about a private, present page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observation {
    /// The page was hashed; `written` is true when the dirty-page source reported a write.
    Hashed {
        /// 28-bit hash of the content.
        hash: u32,
        /// Reported written since the previous pass.
        written: bool,
    },
    /// The dirty-page source says the page was not written since the previous pass.
    Clean,
}

/// Whether a page must be hashed this pass (`false`: its previous hash is still exact).
pub fn needs_hash(prev: Meta, dirty_known: bool, written: bool) -> bool {
    !(dirty_known && !written && prev.has_hash())
}

/// Applies the rule: the page's next metadata. `prev` must not be merged or zero.
pub fn observe(prev: Meta, obs: Observation) -> Meta {
    match obs {
        Observation::Clean if prev.has_hash() => prev.with(PageState::Stable, prev.payload()),
        Observation::Clean => prev,
        Observation::Hashed { hash, written } => {
            if !prev.has_hash() {
                prev.with(PageState::Unstable, hash)
            } else if written || prev.payload() != hash {
                prev.with(PageState::Volatile, hash)
            } else {
                prev.with(PageState::Stable, hash)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashed(hash: u32) -> Observation {
        Observation::Hashed {
            hash,
            written: false,
        }
    }

    #[test]
    fn same_hash_twice_is_stable() {
        let m = observe(Meta::NEW, hashed(7));
        assert_eq!(m.state(), PageState::Unstable);
        let m = observe(m, hashed(7));
        assert_eq!(m.state(), PageState::Stable);
        assert_eq!(m.payload(), 7);
        assert_eq!(observe(m, hashed(7)).state(), PageState::Stable);
    }

    #[test]
    fn changed_hash_is_volatile_then_needs_two_equal_looks() {
        let m = observe(observe(Meta::NEW, hashed(1)), hashed(2));
        assert_eq!(m.state(), PageState::Volatile);
        assert_eq!(m.payload(), 2);
        assert_eq!(observe(m, hashed(2)).state(), PageState::Stable);
        let stable = observe(observe(Meta::NEW, hashed(3)), hashed(3));
        assert_eq!(observe(stable, hashed(4)).state(), PageState::Volatile);
    }

    #[test]
    fn dirty_log_decides_without_hashing() {
        let m = observe(Meta::NEW, hashed(9));
        assert!(!needs_hash(m, true, false));
        assert!(needs_hash(m, true, true));
        assert!(needs_hash(m, false, false));
        assert!(needs_hash(Meta::NEW, true, false));
        assert_eq!(observe(m, Observation::Clean).state(), PageState::Stable);
        assert_eq!(observe(Meta::NEW, Observation::Clean), Meta::NEW);
        let written = observe(
            m,
            Observation::Hashed {
                hash: 9,
                written: true,
            },
        );
        assert_eq!(written.state(), PageState::Volatile);
    }
}
