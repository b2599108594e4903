//! placeholder, replaced by the crate's first real commit
