//! userfaultfd in write-protect mode: the guard that keeps writers out of a page while it is
//! compared and remapped.
//!
//! Only `UFFD_FEATURE_PAGEFAULT_FLAG_WP` and `UFFD_FEATURE_WP_UNPOPULATED` are negotiated: asking
//! for unmap or remove events would make the engine's own `mmap(MAP_FIXED)` and `MADV_DONTNEED`
//! wait for their own events.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::last_os_error;

const UFFD_API: u64 = 0xAA;
const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const REGISTER_MODE_MISSING: u64 = 1 << 0;
const REGISTER_MODE_WP: u64 = 1 << 1;
const MOVE_MODE_DONTWAKE: u64 = 1 << 0;
const MOVE_MODE_ALLOW_SRC_HOLES: u64 = 1 << 1;
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
const EVENT_PAGEFAULT: u8 = 0x12;

const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (0xAA << 8) | nr
}
const IOC_WRITE_READ: u64 = 3;
const IOC_READ: u64 = 2;
const UFFDIO_API: u64 = ioc(IOC_WRITE_READ, 0x3F, 24);
const UFFDIO_REGISTER: u64 = ioc(IOC_WRITE_READ, 0x00, 32);
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0x01, 16);
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, 16);
const UFFDIO_COPY: u64 = ioc(IOC_WRITE_READ, 0x03, 40);
const UFFDIO_MOVE: u64 = ioc(IOC_WRITE_READ, 0x05, 40);
const UFFDIO_WRITEPROTECT: u64 = ioc(IOC_WRITE_READ, 0x06, 24);

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffdio_move` and `struct uffdio_copy` (same layout: the last field returns how
/// many bytes were done, or a negative errno).
#[repr(C)]
struct UffdioMove {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    done: i64,
}

/// One `struct uffd_msg` (32 bytes); only the page-fault variant is used.
#[repr(C)]
#[derive(Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    arg: u64,
}

/// A userfaultfd opened for write-protect faults, non-blocking.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// Opens a userfaultfd and negotiates write-protect faults, including on unpopulated pages.
    pub fn open() -> io::Result<Self> {
        Self::open_with(FEATURE_PAGEFAULT_FLAG_WP | FEATURE_WP_UNPOPULATED)
    }

    /// Opens a userfaultfd for missing-page faults on shared memory (`memfd`), for filling pages
    /// with [`Uffd::copy_pages`] through a mapping registered with
    /// [`Uffd::register_missing_only`].
    pub fn open_for_shmem() -> io::Result<Self> {
        Self::open_with(FEATURE_MISSING_SHMEM)
    }

    fn open_with(features: u64) -> io::Result<Self> {
        // SAFETY: userfaultfd(2) takes only flags and returns a new descriptor or -1.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(last_os_error());
        }
        let raw = i32::try_from(raw).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        // SAFETY: `raw` is a descriptor the kernel just returned to us and nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly one `struct uffdio_api`, which `api` is.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
        if rc != 0 {
            return Err(last_os_error());
        }
        Ok(Uffd { fd })
    }

    fn ioctl<T>(&self, request: u64, arg: &mut T) -> io::Result<()> {
        // SAFETY: every caller passes the argument struct that `request` is defined with; the
        // kernel touches only that struct and the page tables of our own address space.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), request as _, arg as *mut T) };
        if rc != 0 {
            return Err(last_os_error());
        }
        Ok(())
    }

    /// Registers `[addr, addr + len)` for write-protect faults.
    pub fn register(&self, addr: usize, len: usize) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: range(addr, len),
            mode: REGISTER_MODE_WP,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut reg)
    }

    /// Registers `[addr, addr + len)` (anonymous memory) for missing-page faults as well as
    /// write-protect faults: any access to a page that is not present blocks until woken.
    pub fn register_missing(&self, addr: usize, len: usize) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: range(addr, len),
            mode: REGISTER_MODE_MISSING | REGISTER_MODE_WP,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut reg)
    }

    /// Registers `[addr, addr + len)` for missing-page faults only.
    pub fn register_missing_only(&self, addr: usize, len: usize) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: range(addr, len),
            mode: REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut reg)
    }

    /// Moves the anonymous pages of `[src, src + len)` to `[dst, dst + len)` (`UFFDIO_MOVE`,
    /// Linux 6.8), without copying and without waking anyone; holes in the source are skipped.
    /// `dst` must be registered with this userfaultfd and hold no pages. Returns how many bytes
    /// were moved, and the error that stopped the move before `len` (`EAGAIN` after partial
    /// progress).
    pub fn move_pages(&self, dst: usize, src: usize, len: usize) -> (usize, io::Result<()>) {
        self.fill(
            UFFDIO_MOVE,
            dst,
            src,
            len,
            MOVE_MODE_DONTWAKE | MOVE_MODE_ALLOW_SRC_HOLES,
        )
    }

    /// Copies `[src, src + len)` into the missing pages `[dst, dst + len)` of a range registered
    /// for missing-page faults (`UFFDIO_COPY`), without waking anyone. Returns the bytes copied,
    /// and the error that stopped the copy before `len`.
    pub fn copy_pages(&self, dst: usize, src: usize, len: usize) -> (usize, io::Result<()>) {
        const COPY_MODE_DONTWAKE: u64 = 1 << 0;
        self.fill(UFFDIO_COPY, dst, src, len, COPY_MODE_DONTWAKE)
    }

    fn fill(
        &self,
        request: u64,
        dst: usize,
        src: usize,
        len: usize,
        mode: u64,
    ) -> (usize, io::Result<()>) {
        let mut arg = UffdioMove {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode,
            done: 0,
        };
        match self.ioctl(request, &mut arg) {
            Ok(()) => (len, Ok(())),
            Err(e) => (usize::try_from(arg.done).unwrap_or(0).min(len), Err(e)),
        }
    }

    /// Unregisters `[addr, addr + len)`; threads blocked on it are woken.
    pub fn unregister(&self, addr: usize, len: usize) -> io::Result<()> {
        let mut r = range(addr, len);
        self.ioctl(UFFDIO_UNREGISTER, &mut r)
    }

    /// Write-protects `[addr, addr + len)`: writers block until it is un-protected and woken.
    pub fn protect(&self, addr: usize, len: usize) -> io::Result<()> {
        let mut wp = UffdioWriteprotect {
            range: range(addr, len),
            mode: WRITEPROTECT_MODE_WP,
        };
        self.ioctl(UFFDIO_WRITEPROTECT, &mut wp)
    }

    /// Removes write protection from `[addr, addr + len)` without waking blocked writers.
    pub fn unprotect_nowake(&self, addr: usize, len: usize) -> io::Result<()> {
        let mut wp = UffdioWriteprotect {
            range: range(addr, len),
            mode: WRITEPROTECT_MODE_DONTWAKE,
        };
        self.ioctl(UFFDIO_WRITEPROTECT, &mut wp)
    }

    /// Removes write protection from `[addr, addr + len)` and wakes the writers blocked there.
    pub fn unprotect(&self, addr: usize, len: usize) -> io::Result<()> {
        let mut wp = UffdioWriteprotect {
            range: range(addr, len),
            mode: 0,
        };
        self.ioctl(UFFDIO_WRITEPROTECT, &mut wp)
    }

    /// Wakes the threads blocked on faults in `[addr, addr + len)`.
    pub fn wake(&self, addr: usize, len: usize) -> io::Result<()> {
        let mut r = range(addr, len);
        self.ioctl(UFFDIO_WAKE, &mut r)
    }

    /// Reads every pending write-protect fault message and appends the faulting addresses.
    pub fn drain(&self, out: &mut Vec<usize>) -> io::Result<()> {
        const BATCH: usize = 32;
        let mut msgs = [UffdMsg {
            event: 0,
            reserved1: 0,
            reserved2: 0,
            reserved3: 0,
            flags: 0,
            address: 0,
            arg: 0,
        }; BATCH];
        loop {
            let bytes = std::mem::size_of_val(&msgs);
            // SAFETY: `msgs` is a writable buffer of `bytes` bytes; the kernel writes whole
            // `uffd_msg` records into it.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), msgs.as_mut_ptr().cast(), bytes) };
            if n < 0 {
                let err = last_os_error();
                return match err.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(()),
                    Some(libc::EINTR) => continue,
                    _ => Err(err),
                };
            }
            let count = n as usize / std::mem::size_of::<UffdMsg>();
            for msg in &msgs[..count] {
                if msg.event == EVENT_PAGEFAULT {
                    out.push(msg.address as usize);
                }
            }
            if count < BATCH {
                return Ok(());
            }
        }
    }
}

fn range(addr: usize, len: usize) -> UffdioRange {
    UffdioRange {
        start: addr as u64,
        len: len as u64,
    }
}
