//! mmap, madvise and memfd: remapping guest pages onto pool slots, zero pages, and the pool's
//! backing file.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::last_os_error;

/// `MADV_POPULATE_WRITE` (Linux 5.14): fault pages in as if written, breaking copy-on-write
/// without changing their content.
const MADV_POPULATE_WRITE: i32 = 23;

/// Maps `len` bytes of `fd` at `offset` over `[addr, addr + len)`, private and copy-on-write.
///
/// # Safety
/// `[addr, addr + len)` must be memory the caller owns (guest memory registered with the engine)
/// whose current content equals the file range, so that no reader can observe the switch.
pub unsafe fn map_private_fixed(
    addr: usize,
    len: usize,
    fd: BorrowedFd<'_>,
    offset: u64,
) -> io::Result<()> {
    // SAFETY: the caller guarantees the range is ours to replace; MAP_FIXED replaces exactly
    // `[addr, addr + len)` and nothing else.
    unsafe { map_private(addr, len, fd, offset, libc::MAP_FIXED) }
}

/// Maps `len` bytes of `fd` at `offset` into the hole `[addr, addr + len)`, private and
/// copy-on-write; fails with EEXIST if anything is mapped there.
///
/// # Safety
/// The hole must be where the caller's memory was, whose content equalled the file range.
pub unsafe fn map_private_into_hole(
    addr: usize,
    len: usize,
    fd: BorrowedFd<'_>,
    offset: u64,
) -> io::Result<()> {
    // SAFETY: MAP_FIXED_NOREPLACE replaces nothing: the call maps the hole or fails (a kernel
    // that ignores the flag maps elsewhere, undone in `map_private`).
    unsafe { map_private(addr, len, fd, offset, libc::MAP_FIXED_NOREPLACE) }
}

/// # Safety
/// As [`map_private_fixed`] for `MAP_FIXED`, or [`map_private_into_hole`] for
/// `MAP_FIXED_NOREPLACE`.
unsafe fn map_private(
    addr: usize,
    len: usize,
    fd: BorrowedFd<'_>,
    offset: u64,
    fixed: libc::c_int,
) -> io::Result<()> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: the caller guarantees the range is its to map over (see the two callers).
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | fixed | libc::MAP_NORESERVE,
            fd.as_raw_fd(),
            off,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(last_os_error());
    }
    if p as usize != addr {
        // SAFETY: `p` is the mapping just made elsewhere, which nothing else knows of.
        unsafe { libc::munmap(p, len) };
        return Err(io::Error::from_raw_os_error(libc::EEXIST));
    }
    Ok(())
}

/// Replaces `[addr, addr + len)` with fresh private anonymous memory (reads as zeros).
///
/// # Safety
/// The range must be memory the caller owns and whose content may be discarded.
pub unsafe fn map_anonymous_fixed(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the caller owns the range and gives up its content; MAP_FIXED replaces exactly it.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(last_os_error());
    }
    Ok(())
}

/// Claims the hole `[addr, addr + len)` with an inaccessible placeholder mapping
/// (`PROT_NONE`, `MAP_FIXED_NOREPLACE`), so that nothing else is mapped there before the caller
/// moves memory over it; `EEXIST` if anything is mapped there already.
pub fn claim_hole(addr: usize, len: usize) -> io::Result<()> {
    anonymous_into_hole(addr, len, libc::PROT_NONE)
}

/// Maps fresh private anonymous memory (reads as zeros) into the hole `[addr, addr + len)`;
/// `EEXIST` if anything is mapped there already.
pub fn fill_hole(addr: usize, len: usize) -> io::Result<()> {
    anonymous_into_hole(addr, len, libc::PROT_READ | libc::PROT_WRITE)
}

/// Maps private anonymous memory with `prot` into the hole `[addr, addr + len)`.
fn anonymous_into_hole(addr: usize, len: usize, prot: libc::c_int) -> io::Result<()> {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces a mapping: the call either maps the hole or
    // fails (a kernel that ignores the flag maps elsewhere, undone below).
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            prot,
            libc::MAP_PRIVATE
                | libc::MAP_ANONYMOUS
                | libc::MAP_FIXED_NOREPLACE
                | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(last_os_error());
    }
    if p as usize != addr {
        // SAFETY: `p` is the mapping just made, which nothing else knows of.
        unsafe { libc::munmap(p, len) };
        return Err(io::Error::from_raw_os_error(libc::EEXIST));
    }
    Ok(())
}

/// Whether every page of `[addr, addr + len)` is mapped (`msync` reports a hole with ENOMEM).
pub fn is_mapped(addr: usize, len: usize) -> bool {
    // SAFETY: `msync` with `MS_ASYNC` only looks the range up: it changes no mapping and no
    // byte, whatever the range is.
    unsafe { libc::msync(addr as *mut libc::c_void, len, libc::MS_ASYNC) == 0 }
}

/// Unmaps `[addr, addr + len)`.
///
/// # Safety
/// The range must be memory the caller owns, which nothing uses until it is mapped again.
#[cfg(feature = "fault-injection")]
pub unsafe fn unmap(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the caller owns the range and nothing uses it.
    if unsafe { libc::munmap(addr as *mut libc::c_void, len) } != 0 {
        return Err(last_os_error());
    }
    Ok(())
}

/// A private anonymous mapping at an address the kernel chooses, where guest memory is rebuilt
/// before it is moved over the guest's range ([`Scratch::move_over`]); unmapped on drop unless
/// it was moved.
#[derive(Debug)]
pub struct Scratch {
    addr: usize,
    len: usize,
}

impl Scratch {
    /// Maps `len` bytes of private anonymous memory, with the flags `GuestMemoryMmap` uses
    /// for guest RAM (`MAP_NORESERVE`).
    pub fn new(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh mapping chosen by the kernel; it replaces nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(last_os_error());
        }
        Ok(Scratch {
            addr: p as usize,
            len,
        })
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Moves the whole mapping, pages included, over `[dst, dst + len)` (`mremap` with
    /// `MREMAP_FIXED`): in one step the range holds what the scratch held. On failure the
    /// scratch is given back unchanged.
    ///
    /// # Safety
    /// `[dst, dst + len)` must be memory the caller owns whose readers may see the scratch's
    /// content from now on (it holds the same bytes, or the writers are held off).
    pub unsafe fn move_over(self, dst: usize) -> Result<(), (Scratch, io::Error)> {
        // SAFETY: the source is this scratch mapping, owned by `self`; the caller owns the
        // destination, which MREMAP_FIXED replaces exactly.
        let p = unsafe {
            libc::mremap(
                self.addr as *mut libc::c_void,
                self.len,
                self.len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                dst as *mut libc::c_void,
            )
        };
        if p == libc::MAP_FAILED {
            return Err((self, last_os_error()));
        }
        std::mem::forget(self);
        Ok(())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` is the mapping this scratch created and still owns.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// Advice that changes how a mapping is treated, never its content; used to give a rebuilt
/// mapping the flags of the one it replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Advice {
    /// `MADV_DONTFORK` (`dc` in smaps' VmFlags).
    DontFork,
    /// `MADV_DONTDUMP` (`dd`).
    DontDump,
    /// `MADV_HUGEPAGE` (`hg`).
    HugePage,
    /// `MADV_NOHUGEPAGE` (`nh`).
    NoHugePage,
    /// `MADV_MERGEABLE` (`mg`).
    Mergeable,
    /// `MADV_WIPEONFORK` (`wf`).
    WipeOnFork,
}

impl Advice {
    /// The advice that sets the VmFlags mnemonic `flag`, if any.
    pub fn for_flag(flag: &str) -> Option<Advice> {
        Some(match flag {
            "dc" => Advice::DontFork,
            "dd" => Advice::DontDump,
            "hg" => Advice::HugePage,
            "nh" => Advice::NoHugePage,
            "mg" => Advice::Mergeable,
            "wf" => Advice::WipeOnFork,
            _ => return None,
        })
    }
}

/// Gives `[addr, addr + len)` an [`Advice`].
pub fn advise(addr: usize, len: usize, advice: Advice) -> io::Result<()> {
    let a = match advice {
        Advice::DontFork => libc::MADV_DONTFORK,
        Advice::DontDump => libc::MADV_DONTDUMP,
        Advice::HugePage => libc::MADV_HUGEPAGE,
        Advice::NoHugePage => libc::MADV_NOHUGEPAGE,
        Advice::Mergeable => libc::MADV_MERGEABLE,
        Advice::WipeOnFork => libc::MADV_WIPEONFORK,
    };
    // SAFETY: every `Advice` only changes how the mapping is treated (fork, core dumps,
    // huge pages, KSM), never its content; on a bad range madvise fails without effect.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, a) };
    if rc != 0 {
        return Err(last_os_error());
    }
    Ok(())
}

/// Drops the pages of `[addr, addr + len)`; anonymous memory reads back as the zero page.
///
/// # Safety
/// The range must be private anonymous memory owned by the caller whose content is all zeros.
pub unsafe fn dont_need(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the caller guarantees the range is ours and already all zeros, so dropping its
    // pages changes nothing a reader can see.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(last_os_error());
    }
    Ok(())
}

/// Faults `[addr, addr + len)` in writable: every shared page gets a private copy with the same
/// content. Concurrent writers are safe: no byte changes.
pub fn populate_write(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: MADV_POPULATE_WRITE never changes memory content; on an unmapped or read-only
    // range it fails with an error instead of touching anything.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, MADV_POPULATE_WRITE) };
    if rc != 0 {
        return Err(last_os_error());
    }
    Ok(())
}

/// Maps the pages of `[addr, addr + len)` in (`MADV_POPULATE_READ`): later reads do not fault.
pub fn populate_read(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: MADV_POPULATE_READ only faults pages in for reading; it changes no content.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, 22) };
    if rc != 0 {
        return Err(last_os_error());
    }
    Ok(())
}

/// Creates a memfd that allows sealing.
pub fn memfd_create(name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string; memfd_create returns a new descriptor.
    let raw =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(last_os_error());
    }
    // SAFETY: `raw` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Adds `seals` (`F_SEAL_*`) to a memfd.
pub fn add_seals(fd: BorrowedFd<'_>, seals: i32) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS takes an int and only changes the file's seal set.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    if rc != 0 {
        return Err(last_os_error());
    }
    Ok(())
}

/// Sets the size of a file.
pub fn set_len(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: ftruncate only changes the size of the file behind `fd`.
    let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), len) };
    if rc != 0 {
        return Err(last_os_error());
    }
    Ok(())
}

/// Writes all of `buf` at `offset`.
pub fn write_at(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let off = libc::off_t::try_from(offset + done as u64)
            .map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let rest = &buf[done..];
        // SAFETY: `rest` is a readable buffer of `rest.len()` bytes.
        let n = unsafe { libc::pwrite(fd.as_raw_fd(), rest.as_ptr().cast(), rest.len(), off) };
        if n < 0 {
            let err = last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        done += n as usize;
    }
    Ok(())
}

/// Frees the file pages of `[offset, offset + len)`, keeping the file size.
pub fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: fallocate only changes the file behind `fd`.
    let rc = unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if rc != 0 {
        return Err(last_os_error());
    }
    Ok(())
}

/// A shared mapping of a whole file range from offset 0, unmapped on drop.
#[derive(Debug)]
struct FileMapping {
    addr: usize,
    len: usize,
}

impl FileMapping {
    /// Maps `len` bytes of `fd` shared with protection `prot`, without reserving swap.
    fn new(fd: BorrowedFd<'_>, len: usize, prot: libc::c_int) -> io::Result<Self> {
        // SAFETY: a fresh mapping chosen by the kernel; it replaces nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(last_os_error());
        }
        Ok(FileMapping {
            addr: p as usize,
            len,
        })
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` is the mapping this value created and still owns.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// A read-only shared view of a file, unmapped on drop.
#[derive(Debug)]
pub struct ReadView(FileMapping);

/// A writable shared mapping of a file that user code never reads or writes: the target of
/// `UFFDIO_COPY` into the file's holes. Unmapped on drop.
#[derive(Debug)]
pub struct FillView(FileMapping);

impl ReadView {
    /// Maps `len` bytes of `fd` shared and read-only (beyond the file end reads fault, so the
    /// caller reads only what the file holds).
    pub fn new(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        FileMapping::new(fd, len, libc::PROT_READ).map(ReadView)
    }
}

impl FillView {
    /// Maps `len` bytes of `fd` shared and writable.
    pub fn new(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        FileMapping::new(fd, len, libc::PROT_READ | libc::PROT_WRITE).map(FillView)
    }
}

macro_rules! mapping_accessors {
    ($($view:ty),*) => {$(
        impl $view {
            /// Start address of the mapping.
            pub fn addr(&self) -> usize {
                self.0.addr
            }

            /// Length of the mapping in bytes.
            pub fn len(&self) -> usize {
                self.0.len
            }

            /// Whether the mapping is empty.
            pub fn is_empty(&self) -> bool {
                self.0.len == 0
            }
        }
    )*};
}
mapping_accessors!(ReadView, FillView);
