//! Per-page metadata: 4 bytes per guest page: a "remapped" flag (the page lies in a mapping of
//! a pool file, where `MADV_DONTNEED` would bring back pool content instead of zeros), a state
//! and a 28-bit payload (the page's hash while it is private, its pool slot while it is merged).

/// State of one guest page, as the engine last saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageState {
    /// Not looked at yet (or its merge was broken and it must be looked at again).
    New = 0,
    /// Hashed once; stable only if the next look finds the same hash.
    Unstable = 1,
    /// Its content changed between two looks.
    Volatile = 2,
    /// Same content on two consecutive looks: a merge candidate, not shared with anyone yet.
    Stable = 3,
    /// Mapped to a pool slot (payload: the slot).
    Merged = 4,
    /// Dropped to the host zero page.
    Zero = 5,
    /// Not present in memory (never touched or discarded): nothing to save.
    Empty = 6,
}

/// Number of [`PageState`] values, for per-state counters.
pub const STATES: usize = 7;

const PAYLOAD_BITS: u32 = 28;
const STATE_MASK: u32 = 0x7;
const REMAPPED: u32 = 1 << 31;
/// Largest payload: hashes are truncated to it, slot numbers must stay below it.
pub const PAYLOAD_MASK: u32 = (1 << PAYLOAD_BITS) - 1;

/// Packed metadata of one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct Meta(pub u32);

impl Meta {
    /// A page not looked at yet.
    pub const NEW: Meta = Meta(0);

    /// Packs a state and a payload (truncated to 28 bits), flag clear.
    pub fn new(state: PageState, payload: u32) -> Meta {
        Meta(((state as u32) << PAYLOAD_BITS) | (payload & PAYLOAD_MASK))
    }

    /// The same state and payload, keeping `self`'s remapped flag.
    pub fn with(self, state: PageState, payload: u32) -> Meta {
        Meta((self.0 & REMAPPED) | Meta::new(state, payload).0)
    }

    /// Sets the remapped flag.
    pub fn remapped_now(self) -> Meta {
        Meta(self.0 | REMAPPED)
    }

    /// The same state and payload, flag clear: the page is in anonymous memory again.
    pub fn anonymous(self) -> Meta {
        Meta(self.0 & !REMAPPED)
    }

    /// Whether the page ever was remapped onto a pool file.
    pub fn remapped(self) -> bool {
        self.0 & REMAPPED != 0
    }

    /// The page's state.
    pub fn state(self) -> PageState {
        match (self.0 >> PAYLOAD_BITS) & STATE_MASK {
            1 => PageState::Unstable,
            2 => PageState::Volatile,
            3 => PageState::Stable,
            4 => PageState::Merged,
            5 => PageState::Zero,
            6 => PageState::Empty,
            _ => PageState::New,
        }
    }

    /// The payload: the 28-bit hash, or the slot of a merged page.
    pub fn payload(self) -> u32 {
        self.0 & PAYLOAD_MASK
    }

    /// Whether the payload holds a hash of the current content.
    pub fn has_hash(self) -> bool {
        matches!(
            self.state(),
            PageState::Unstable | PageState::Volatile | PageState::Stable
        )
    }
}

/// Truncates a 64-bit page hash to the 28 bits kept per page.
pub fn short_hash(h: u64) -> u32 {
    (h >> 36) as u32 & PAYLOAD_MASK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_every_state_and_payload() {
        for s in [
            PageState::New,
            PageState::Unstable,
            PageState::Volatile,
            PageState::Stable,
            PageState::Merged,
            PageState::Zero,
            PageState::Empty,
        ] {
            let m = Meta::new(s, 0xfff_ffff);
            assert_eq!(m.state(), s);
            assert_eq!(m.payload(), 0xfff_ffff);
            assert_eq!(Meta::new(s, 0x1234_5678).payload(), 0x234_5678);
        }
        assert_eq!(std::mem::size_of::<Meta>(), 4);
        let r = Meta::new(PageState::Merged, 5).remapped_now();
        assert!(r.remapped());
        assert_eq!(r.state(), PageState::Merged);
        let n = r.with(PageState::New, 0);
        assert!(n.remapped() && n.state() == PageState::New && n.payload() == 0);
        assert!(!Meta::new(PageState::Stable, 1).remapped());
        assert_eq!(r.anonymous(), Meta::new(PageState::Merged, 5));
    }

    #[test]
    fn short_hash_uses_top_bits() {
        assert_eq!(short_hash(u64::MAX), PAYLOAD_MASK);
        assert_eq!(short_hash(1 << 36), 1);
        assert_eq!(short_hash((1 << 36) - 1), 0);
    }
}
