//! VMA attributes of guest memory that a mapping made over it does not inherit: `madvise`
//! advice (`MADV_DONTDUMP`, `MADV_DONTFORK`, ...) and `mlock`. The engine records a region's
//! attributes when it is registered (from /proc/self/smaps) and gives them to every mapping it
//! makes inside guest memory: merged pages' pool mappings, discarded memory, and the rebuilt
//! region of an unmerge.

use std::io;

use super::last_os_error;
use super::mem::{self, Advice};

/// VmFlags that differ between a guarded region and a fresh mapping without mattering: the
/// userfaultfd modes (the engine's own, set again as needed) and soft-dirty.
const IGNORED_FLAGS: [&str; 4] = ["um", "uw", "ui", "sd"];

/// `flags` without those that never matter when comparing guest memory with a fresh mapping
/// (see [`IGNORED_FLAGS`]).
pub fn relevant(flags: &[String]) -> Vec<String> {
    flags
        .iter()
        .filter(|f| !IGNORED_FLAGS.contains(&f.as_str()))
        .cloned()
        .collect()
}

/// Every advice the engine reproduces, in bit order (the order of `Advice`'s variants).
const ADVICE: [Advice; 6] = [
    Advice::DontFork,
    Advice::DontDump,
    Advice::HugePage,
    Advice::NoHugePage,
    Advice::Mergeable,
    Advice::WipeOnFork,
];

// Each advice's bit is its variant's number: ADVICE lists them in that order.
const _: () = {
    let mut i = 0;
    while i < ADVICE.len() {
        assert!(ADVICE[i] as usize == i);
        i += 1;
    }
};

/// Bit of `mlock` (VmFlags `lo`).
const LOCKED: u8 = 1 << ADVICE.len();

/// Bit of `mlock2(MLOCK_ONFAULT)` (VmFlags `lf`, with `lo`): pages are locked as they are
/// faulted in, none allocated ahead.
const ON_FAULT: u8 = LOCKED << 1;

/// Advice that matters on a merged page's pool mapping: the others concern anonymous memory
/// only (huge pages, KSM, wipe-on-fork).
const FILE_ADVICE: [Advice; 2] = [Advice::DontFork, Advice::DontDump];

/// The attributes of a guest memory region that a new mapping must be given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attrs(u8);

fn bit(a: Advice) -> u8 {
    1 << a as u8
}

impl Attrs {
    /// No attribute: a plain mapping.
    pub const NONE: Attrs = Attrs(0);

    /// The attributes that the VmFlags mnemonics `flags` name (`dc`, `dd`, `hg`, `nh`, `mg`,
    /// `wf`, `lo`, `lf`); other mnemonics are not attributes.
    pub fn from_flags<S: AsRef<str>>(flags: &[S]) -> Attrs {
        let mut bits = 0;
        for f in flags {
            match f.as_ref() {
                "lo" => bits |= LOCKED,
                "lf" => bits |= ON_FAULT,
                f => {
                    if let Some(a) = Advice::for_flag(f) {
                        bits |= bit(a);
                    }
                }
            }
        }
        Attrs(bits)
    }

    /// Whether there is no attribute to give (the common case: nothing to do).
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether the memory is locked (`mlock`, or `mlock2(MLOCK_ONFAULT)`).
    pub fn locked(self) -> bool {
        self.0 & LOCKED != 0
    }

    /// Whether the memory is locked with every page present (`mlock`, not on fault).
    pub fn locked_ahead(self) -> bool {
        self.0 & (LOCKED | ON_FAULT) == LOCKED
    }

    /// Whether the attributes hold `advice`.
    pub fn has(self, advice: Advice) -> bool {
        self.0 & bit(advice) != 0
    }

    /// Gives a merged page's pool mapping `[addr, addr + len)` the attributes that matter there:
    /// `MADV_DONTDUMP`, `MADV_DONTFORK`, and a lock. The lock is taken on fault (VmFlags
    /// `lo lf`) and the pool pages are then mapped in for reading, which locks them all
    /// without breaking the sharing: a plain `mlock` faults a writable private mapping in for
    /// writing, which would give every merged page a private copy.
    pub fn apply_to_file(self, addr: usize, len: usize) -> io::Result<()> {
        for a in FILE_ADVICE.into_iter().filter(|&a| self.has(a)) {
            mem::advise(addr, len, a)?;
        }
        if self.locked() {
            lock_on_fault(addr, len)?;
            mem::populate_read(addr, len)?;
        }
        Ok(())
    }

    /// Gives fresh anonymous memory `[addr, addr + len)` every attribute: all advice, and the
    /// lock as the region had it (`mlock`, which maps every page in, or on fault).
    pub fn apply_to_anonymous(self, addr: usize, len: usize) -> io::Result<()> {
        self.apply_to_scratch(addr, len)?;
        self.lock_scratch(addr, len)
    }

    /// First half of [`Attrs::apply_to_anonymous`], for a mapping that pages will be moved
    /// into (`UFFDIO_MOVE` wants both sides locked or neither): all advice, and a lock on
    /// fault, which allocates nothing ahead.
    pub fn apply_to_scratch(self, addr: usize, len: usize) -> io::Result<()> {
        for a in ADVICE.into_iter().filter(|&a| self.has(a)) {
            mem::advise(addr, len, a)?;
        }
        if self.locked() {
            lock_on_fault(addr, len)?;
        }
        Ok(())
    }

    /// Second half of [`Attrs::apply_to_anonymous`]: memory locked with `mlock` (not on fault)
    /// is locked so again, which maps in every page not present yet (VmFlags `lo` without
    /// `lf`).
    pub fn lock_scratch(self, addr: usize, len: usize) -> io::Result<()> {
        if self.locked_ahead() {
            lock(addr, len)?;
        }
        Ok(())
    }
}

/// Locks `[addr, addr + len)` in memory, mapping in every page not present (`mlock`).
pub fn lock(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: mlock only changes how the range's pages are kept in memory and faults them in
    // (a private page for writing, which keeps its content); on a bad range it fails.
    let rc = unsafe { libc::mlock(addr as *const libc::c_void, len) };
    if rc != 0 {
        return Err(last_os_error());
    }
    Ok(())
}

/// Locks `[addr, addr + len)` in memory as its pages are faulted in (`mlock2` with
/// `MLOCK_ONFAULT`): the pages present now are locked, the others when they appear. The VMA
/// shows `lo` in smaps, as after `mlock`.
pub fn lock_on_fault(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: mlock2 only changes how the range's pages are kept in memory (never their
    // content or the mapping); on a bad range it fails without effect.
    let rc = unsafe { libc::mlock2(addr as *const libc::c_void, len, libc::MLOCK_ONFAULT) };
    if rc != 0 {
        return Err(last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_from_vm_flags() {
        let a = Attrs::from_flags(&["rd", "wr", "dd", "lo", "mr", "dc"]);
        assert!(a.has(Advice::DontDump) && a.has(Advice::DontFork) && a.locked());
        assert!(!a.has(Advice::HugePage) && !a.has(Advice::WipeOnFork));
        let plain = Attrs::from_flags(&["rd", "wr", "mr", "mw", "me", "nr", "uw"]);
        assert!(plain.is_empty() && plain == Attrs::NONE);
        assert!(Attrs::from_flags(&["hg"]).has(Advice::HugePage));
        assert!(!Attrs::from_flags(&["hg"]).locked());
        assert!(a.locked_ahead());
        let on_fault = Attrs::from_flags(&["lo", "lf"]);
        assert!(on_fault.locked() && !on_fault.locked_ahead());
    }

    #[test]
    fn uffd_flags_do_not_count() {
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(relevant(&f(&["rd", "uw", "wr", "um"])), f(&["rd", "wr"]));
    }

    #[test]
    fn attributes_on_a_fresh_mapping() {
        let len = 4 * crate::sys::PAGE_SIZE;
        let scratch = mem::Scratch::new(len).unwrap();
        let attrs = Attrs::from_flags(&["dd", "dc"]);
        attrs.apply_to_anonymous(scratch.addr(), len).unwrap();
        let v = crate::sys::procfs::vma_flags(scratch.addr(), scratch.addr() + len).unwrap();
        assert!(v.iter().all(|v| v.has("dd") && v.has("dc") && !v.has("lo")));
    }
}
