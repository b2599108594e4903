//! The pool: sealed memfds per host NUMA node, their memory bound to that node, holding the
//! single copy of each merged content. Slots are written only while nobody maps them (a private
//! mapping does not snapshot the file) and punched only when nobody maps them any more. The files
//! can grow but never shrink (`F_SEAL_SHRINK`), so no sharer can ever fault on a truncated page.
//!
//! Each node's slots are spread over [`FILES_PER_NODE`] files in chunks of [`CHUNK_SLOTS`]
//! consecutive slots (chunk `c` in file `c % FILES_PER_NODE`): adding a page to a shmem file
//! takes that file's page-cache and inode locks, so parallel fills into one file queue behind
//! each other. Measured on 16 cores: 16 threads filling 186,764 slots took 12.4 us per slot
//! summed over threads into one file, 3.9 us spread over 8 files (2.1 and 1.6 us on one
//! thread). The planner never gives a run of up to a chunk's slots a stretch that crosses a
//! chunk (see `SlotTable::free_stretch`), so a run is still one remap of one file.
//!
//! Slots are filled with `UFFDIO_COPY` through a writable mapping registered for missing-page
//! faults (never touched otherwise), not with `pwrite`: a write to a shmem file holds the
//! file's inode lock, so parallel fills queued behind one another (measured on 16 cores: 23 us
//! per slot summed over threads, against 2.3 us on 2), while `UFFDIO_COPY` allocates, copies
//! and inserts each page under the page cache's own locks only, and does not zero the page
//! first. Where that is not available, `pwrite` is used.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;

use crate::fault::{FaultPoint, Faults};
use crate::meta::PAYLOAD_MASK;
use crate::numa::{Topology, TopologyError};
use crate::slots::CHUNK_SLOTS;
use crate::sys::PAGE_SIZE;
use crate::sys::mem::{self, FillView, ReadView};
use crate::sys::uffd::Uffd;

/// Files each node's slots are spread over.
pub const FILES_PER_NODE: usize = 8;
/// Address space reserved for each file's views: every slot the file can hold.
const VIEW_BYTES: usize = (PAYLOAD_MASK as usize + 1) * PAGE_SIZE / FILES_PER_NODE;
/// A pool file grows by this much at a time.
const GROW_BYTES: u64 = 16 << 20;

/// Where `slot` lives: its file among its node's, and its page in that file.
pub fn locate(slot: u32) -> (usize, u64) {
    let chunk = slot / CHUNK_SLOTS;
    let file = chunk as usize % FILES_PER_NODE;
    let page = u64::from(chunk / FILES_PER_NODE as u32) * u64::from(CHUNK_SLOTS)
        + u64::from(slot % CHUNK_SLOTS);
    (file, page)
}

/// The slot at page `page` of file `file` of a node (the inverse of [`locate`]), if any.
fn slot_at(file: usize, page: u64) -> Option<u32> {
    let chunk = (page / u64::from(CHUNK_SLOTS))
        .checked_mul(FILES_PER_NODE as u64)?
        .checked_add(file as u64)?;
    let slot = chunk
        .checked_mul(u64::from(CHUNK_SLOTS))?
        .checked_add(page % u64::from(CHUNK_SLOTS))?;
    u32::try_from(slot).ok().filter(|&s| s <= PAYLOAD_MASK)
}

/// Cuts `count` slots from `slot` on into pieces that each lie in one chunk (consecutive pages
/// of one file): `(first slot, slots)`.
pub fn pieces(slot: u32, count: u32) -> impl Iterator<Item = (u32, u32)> {
    let end = slot.saturating_add(count);
    let mut s = slot;
    std::iter::from_fn(move || {
        if s >= end {
            return None;
        }
        let n = (CHUNK_SLOTS - s % CHUNK_SLOTS).min(end - s);
        let piece = (s, n);
        s += n;
        Some(piece)
    })
}

/// Errors from pool operations.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No node with that number.
    #[error("no NUMA node {0}")]
    NoNode(u8),
    /// `memfd_create` or sealing failed.
    #[error("creating the pool of node {node}")]
    Create {
        /// Node.
        node: u8,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Mapping the pool's view failed.
    #[error("mapping the pool of node {node}")]
    Map {
        /// Node.
        node: u8,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Binding the pool to its node failed.
    #[error("binding the pool")]
    Bind(#[source] TopologyError),
    /// Growing the pool file failed.
    #[error("growing the pool of node {node}")]
    Grow {
        /// Node.
        node: u8,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Writing a slot failed.
    #[error("filling pool slot {slot}")]
    Fill {
        /// Slot.
        slot: u32,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Punching a slot failed.
    #[error("punching pool slot {slot}")]
    Punch {
        /// Slot.
        slot: u32,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The pool of that node was never created.
    #[error("the pool of node {0} does not exist")]
    Missing(u8),
}

/// One pool file, its read-only view, and where slots are filled.
#[derive(Debug)]
struct PoolFile {
    fd: OwnedFd,
    view: ReadView,
    /// The fill mapping and its userfaultfd (`None`: filled with `pwrite`).
    filler: Option<(FillView, Uffd)>,
    size: u64,
    /// Device and inode number of the file (how /proc/self/maps names its mappings).
    dev: u64,
    inode: u64,
}

/// One node's pool: its files, chunk `c` of its slots in file `c % FILES_PER_NODE`.
#[derive(Debug)]
struct NodePool {
    files: Vec<PoolFile>,
}

/// All node pools, created on first use.
#[derive(Debug)]
pub struct Pools {
    nodes: Vec<Option<NodePool>>,
    /// The most recent failure, with its cause (for the statistics).
    last_error: Mutex<Option<String>>,
}

impl PoolError {
    /// The error and its causes on one line, e.g. `growing the pool of node 0: File too large
    /// (os error 27)`.
    pub fn describe(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            text.push_str(": ");
            text.push_str(&c.to_string());
            cause = c.source();
        }
        text
    }
}

impl Pools {
    /// Pools for `node_count` nodes, none created yet.
    pub fn new(node_count: usize) -> Self {
        Pools {
            nodes: (0..node_count.max(1)).map(|_| None).collect(),
            last_error: Mutex::new(None),
        }
    }

    /// Remembers `e` as the most recent failure and passes it on.
    fn note<T>(&self, r: Result<T, PoolError>) -> Result<T, PoolError> {
        if let Err(e) = &r {
            let mut last = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
            *last = Some(e.describe());
        }
        r
    }

    /// The most recent failure of a pool operation, with its cause, if any failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes sure the pool of `node` exists and can hold slot `last_slot`.
    pub fn ensure(
        &mut self,
        node: u8,
        last_slot: u32,
        topology: &dyn Topology,
        faults: &Faults,
    ) -> Result<(), PoolError> {
        let r = self.ensure_inner(node, last_slot, topology, faults);
        self.note(r)
    }

    fn ensure_inner(
        &mut self,
        node: u8,
        last_slot: u32,
        topology: &dyn Topology,
        faults: &Faults,
    ) -> Result<(), PoolError> {
        let entry = self
            .nodes
            .get_mut(usize::from(node))
            .ok_or(PoolError::NoNode(node))?;
        if entry.is_none() {
            *entry = Some(create(node, topology, faults)?);
        }
        let pool = entry.as_mut().ok_or(PoolError::Missing(node))?;
        let last_chunk = last_slot / CHUNK_SLOTS;
        for (f, file) in pool.files.iter_mut().enumerate() {
            // The highest slot up to `last_slot` that lives in this file, if any.
            let f = f as u32;
            if f > last_chunk {
                continue;
            }
            let chunk = last_chunk - (last_chunk - f) % FILES_PER_NODE as u32;
            let highest = if chunk == last_chunk {
                last_slot
            } else {
                chunk * CHUNK_SLOTS + CHUNK_SLOTS - 1
            };
            let need = (locate(highest).1 + 1) * PAGE_SIZE as u64;
            if need > file.size {
                let size = need.div_ceil(GROW_BYTES) * GROW_BYTES;
                faults
                    .check(FaultPoint::PoolGrow)
                    .and_then(|()| mem::set_len(file.fd.as_fd(), size))
                    .map_err(|source| PoolError::Grow { node, source })?;
                file.size = size;
            }
        }
        Ok(())
    }

    fn get(&self, node: u8) -> Result<&NodePool, PoolError> {
        self.nodes
            .get(usize::from(node))
            .and_then(Option::as_ref)
            .ok_or(PoolError::Missing(node))
    }

    /// The file of `node` holding `slot`, and the slot's byte offset in it.
    fn file_of(&self, node: u8, slot: u32) -> Result<(&PoolFile, u64), PoolError> {
        let (f, page) = locate(slot);
        let file = self
            .get(node)?
            .files
            .get(f)
            .ok_or(PoolError::Missing(node))?;
        Ok((file, page * PAGE_SIZE as u64))
    }

    /// Writes `src` (whole pages) into consecutive free slots from `slot` on (holes in the file:
    /// new or punched slots), and maps them into the read-only view (so the guarded comparisons
    /// that follow do not fault).
    pub fn fill(&self, node: u8, slot: u32, src: &[u8], faults: &Faults) -> Result<(), PoolError> {
        let count = u32::try_from(src.len() / PAGE_SIZE).unwrap_or(u32::MAX);
        for (s, n) in pieces(slot, count) {
            let (file, off) = self.note(self.file_of(node, s))?;
            let at = (s - slot) as usize * PAGE_SIZE;
            let src = &src[at..at + n as usize * PAGE_SIZE];
            let written = faults
                .check(FaultPoint::PoolFill)
                .and_then(|()| match &file.filler {
                    // A free slot that holds a page (a read of the hole through the view
                    // allocates one) is written over instead: nobody maps it.
                    Some((view, uffd)) => copy_in(view, uffd, src, off as usize).or_else(|e| {
                        if e.raw_os_error() == Some(libc::EEXIST) {
                            mem::write_at(file.fd.as_fd(), src, off)
                        } else {
                            Err(e)
                        }
                    }),
                    None => mem::write_at(file.fd.as_fd(), src, off),
                })
                .map_err(|source| PoolError::Fill { slot: s, source });
            self.note(written)?;
            if let Err(e) = mem::populate_read(file.view.addr() + off as usize, src.len()) {
                log::debug!("vm-dedup: populating the pool view: {e}");
            }
        }
        Ok(())
    }

    /// The pool's copy of `slot`, read-only.
    ///
    /// The slot must have been filled (see [`Pools::fill`]); it never changes while mapped.
    pub fn slot_bytes(&self, node: u8, slot: u32) -> Result<&[u8], PoolError> {
        let (file, off) = self.file_of(node, slot)?;
        let off = off as usize;
        if (off + PAGE_SIZE) as u64 > file.size || off + PAGE_SIZE > file.view.len() {
            return Err(PoolError::Missing(node));
        }
        // SAFETY: the view maps the whole file read-only and `off + PAGE_SIZE` lies within both
        // the view and the file, so the page is readable; slots are not written while they can
        // be compared against (the engine fills a slot before any comparison with it).
        Ok(unsafe { std::slice::from_raw_parts((file.view.addr() + off) as *const u8, PAGE_SIZE) })
    }

    /// The pool file of `node` holding `slot`, and the slot's byte offset in it, for remapping
    /// guest pages onto it. The slots after it in the same chunk (see [`pieces`]) follow it in
    /// the file.
    pub fn mapping(&self, node: u8, slot: u32) -> Result<(BorrowedFd<'_>, u64), PoolError> {
        let (file, off) = self.file_of(node, slot)?;
        Ok((file.fd.as_fd(), off))
    }

    /// Frees the memory of `count` slots from `slot` on. Only for slots nobody maps.
    pub fn punch(&self, node: u8, slot: u32, count: u32, faults: &Faults) -> Result<(), PoolError> {
        for (s, n) in pieces(slot, count) {
            let (file, off) = self.note(self.file_of(node, s))?;
            let punched = faults
                .check(FaultPoint::PoolPunch)
                .and_then(|()| {
                    mem::punch_hole(file.fd.as_fd(), off, u64::from(n) * PAGE_SIZE as u64)
                })
                .map_err(|source| PoolError::Punch { slot: s, source });
            self.note(punched)?;
        }
        Ok(())
    }

    /// Whether the pool of `node` exists.
    pub fn exists(&self, node: u8) -> bool {
        self.get(node).is_ok()
    }

    /// Whether the file `(dev, inode)` is one of the pools' files.
    pub fn is_pool_file(&self, dev: u64, inode: u64) -> bool {
        self.file_index(dev, inode).is_some()
    }

    /// The slots of `pages` pages from byte offset `offset` of the pool file `(dev, inode)` (as
    /// /proc/self/maps names a mapping of it); none if that is not a pool file.
    pub fn slots_mapped(
        &self,
        dev: u64,
        inode: u64,
        offset: u64,
        pages: u64,
    ) -> impl Iterator<Item = u32> {
        let first = offset / PAGE_SIZE as u64;
        self.file_index(dev, inode).into_iter().flat_map(move |f| {
            (first..first.saturating_add(pages)).filter_map(move |p| slot_at(f, p))
        })
    }

    /// Which of its node's files `(dev, inode)` is.
    fn file_index(&self, dev: u64, inode: u64) -> Option<usize> {
        self.nodes.iter().flatten().find_map(|p| {
            p.files
                .iter()
                .position(|f| f.dev == dev && f.inode == inode)
        })
    }
}

fn create(node: u8, topology: &dyn Topology, faults: &Faults) -> Result<NodePool, PoolError> {
    let files = (0..FILES_PER_NODE)
        .map(|_| create_file(node, topology, faults))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(NodePool { files })
}

fn create_file(node: u8, topology: &dyn Topology, faults: &Faults) -> Result<PoolFile, PoolError> {
    let name = c"vm-dedup-pool";
    let fd = faults
        .check(FaultPoint::PoolCreate)
        .and_then(|()| mem::memfd_create(name))
        .map_err(|source| PoolError::Create { node, source })?;
    mem::add_seals(fd.as_fd(), libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL)
        .map_err(|source| PoolError::Create { node, source })?;
    let view =
        ReadView::new(fd.as_fd(), VIEW_BYTES).map_err(|source| PoolError::Map { node, source })?;
    topology
        .bind(node, view.addr(), view.len())
        .map_err(PoolError::Bind)?;
    let filler = FillView::new(fd.as_fd(), VIEW_BYTES)
        .and_then(|v| {
            let u = Uffd::open_for_shmem()?;
            u.register_missing_only(v.addr(), v.len())?;
            Ok((v, u))
        })
        .map_err(|e| log::info!("vm-dedup: pool slots filled with pwrite: {e}"))
        .ok();
    let (dev, inode) = fd
        .try_clone()
        .and_then(|f| std::fs::File::from(f).metadata())
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        })
        .map_err(|source| PoolError::Create { node, source })?;
    Ok(PoolFile {
        fd,
        view,
        filler,
        size: 0,
        dev,
        inode,
    })
}

/// Copies `src` into the holes at `off` of the file behind `view`.
fn copy_in(view: &FillView, uffd: &Uffd, src: &[u8], off: usize) -> io::Result<()> {
    if off + src.len() > view.len() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut done = 0;
    let mut again = 0;
    while done < src.len() {
        let (n, r) = uffd.copy_pages(
            view.addr() + off + done,
            src.as_ptr() as usize + done,
            src.len() - done,
        );
        done += n;
        match r {
            Ok(()) => break,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && (n > 0 || again < 100) => {
                again += 1;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numa::HostTopology;

    #[test]
    fn fill_read_punch() {
        let topo = HostTopology::new().unwrap();
        let faults = Faults::default();
        let mut pools = Pools::new(1);
        assert!(pools.slot_bytes(0, 0).is_err());
        pools.ensure(0, 3, &topo, &faults).unwrap();
        let mut src = vec![0u8; 2 * PAGE_SIZE];
        src[..PAGE_SIZE].fill(7);
        src[PAGE_SIZE..].fill(9);
        pools.fill(0, 2, &src, &faults).unwrap();
        assert!(pools.slot_bytes(0, 2).unwrap().iter().all(|&b| b == 7));
        assert!(pools.slot_bytes(0, 3).unwrap().iter().all(|&b| b == 9));
        assert!(
            pools
                .get(0)
                .unwrap()
                .files
                .iter()
                .all(|f| f.filler.is_some()),
            "filled with UFFDIO_COPY on this kernel"
        );
        pools.punch(0, 2, 2, &faults).unwrap();
        assert!(pools.slot_bytes(0, 2).unwrap().iter().all(|&b| b == 0));
        // A punched slot can be filled anew: a hole again, or a page if it was read meanwhile
        // (as above).
        pools.fill(0, 2, &src[PAGE_SIZE..], &faults).unwrap();
        assert!(pools.slot_bytes(0, 2).unwrap().iter().all(|&b| b == 9));
        pools.punch(0, 2, 1, &faults).unwrap();
        pools.fill(0, 2, &src[..PAGE_SIZE], &faults).unwrap();
        assert!(pools.slot_bytes(0, 2).unwrap().iter().all(|&b| b == 7));
        assert_eq!(pools.last_error(), None);
        assert!(pools.ensure(1, 0, &topo, &faults).is_err());
        assert_eq!(pools.last_error().as_deref(), Some("no NUMA node 1"));
    }

    #[test]
    fn chunks_go_round_the_files_and_back() {
        assert_eq!(locate(0), (0, 0));
        assert_eq!(locate(CHUNK_SLOTS - 1), (0, u64::from(CHUNK_SLOTS) - 1));
        assert_eq!(locate(CHUNK_SLOTS), (1, 0));
        let round = CHUNK_SLOTS * FILES_PER_NODE as u32;
        assert_eq!(locate(round + 5), (0, u64::from(CHUNK_SLOTS) + 5));
        for slot in [0, 1, 511, 512, 4095, 4096, 4097, 123_457, PAYLOAD_MASK] {
            let (f, page) = locate(slot);
            assert_eq!(slot_at(f, page), Some(slot));
        }
        assert_eq!(slot_at(FILES_PER_NODE - 1, u64::MAX / 2), None);
        assert_eq!(
            pieces(CHUNK_SLOTS - 2, 5).collect::<Vec<_>>(),
            [(CHUNK_SLOTS - 2, 2), (CHUNK_SLOTS, 3)]
        );
        assert_eq!(pieces(7, 3).collect::<Vec<_>>(), [(7, 3)]);
        assert_eq!(pieces(7, 0).count(), 0);
    }

    #[test]
    fn fills_and_punches_across_files() {
        let topo = HostTopology::new().unwrap();
        let faults = Faults::default();
        let mut pools = Pools::new(1);
        // Two slots at the end of chunk 0 (file 0) and two at the start of chunk 1 (file 1).
        let first = CHUNK_SLOTS - 2;
        pools.ensure(0, first + 3, &topo, &faults).unwrap();
        let mut src = vec![0u8; 4 * PAGE_SIZE];
        for (i, page) in src.chunks_mut(PAGE_SIZE).enumerate() {
            page.fill(i as u8 + 1);
        }
        pools.fill(0, first, &src, &faults).unwrap();
        for i in 0..4u32 {
            let bytes = pools.slot_bytes(0, first + i).unwrap();
            assert!(
                bytes.iter().all(|&b| b == i as u8 + 1),
                "slot {}",
                first + i
            );
        }
        let (fd0, off0) = pools.mapping(0, first).unwrap();
        let (fd1, off1) = pools.mapping(0, CHUNK_SLOTS).unwrap();
        assert_ne!(
            std::os::fd::AsRawFd::as_raw_fd(&fd0),
            std::os::fd::AsRawFd::as_raw_fd(&fd1)
        );
        assert_eq!(off0, u64::from(first) * PAGE_SIZE as u64);
        assert_eq!(off1, 0);
        // Mappings of each file name their slots by device, inode and offset.
        let files: Vec<(u64, u64)> = pools
            .get(0)
            .unwrap()
            .files
            .iter()
            .map(|f| (f.dev, f.inode))
            .collect();
        let slots = |(dev, inode), offset, pages| {
            pools
                .slots_mapped(dev, inode, offset, pages)
                .collect::<Vec<_>>()
        };
        assert_eq!(slots(files[1], 0, 2), [CHUNK_SLOTS, CHUNK_SLOTS + 1]);
        assert_eq!(slots(files[0], off0, 2), [first, first + 1]);
        let (dev, inode) = files[FILES_PER_NODE - 1];
        assert!(pools.is_pool_file(dev, inode));
        // The same inode number on another device is another file.
        assert!(!pools.is_pool_file(dev ^ 1, inode));
        assert!(slots((dev, 0), 0, 2).is_empty());
        pools.punch(0, first, 4, &faults).unwrap();
        for i in 0..4 {
            assert!(
                pools
                    .slot_bytes(0, first + i)
                    .unwrap()
                    .iter()
                    .all(|&b| b == 0)
            );
        }
    }

    #[test]
    fn last_error_names_the_os_cause() {
        let e = PoolError::Grow {
            node: 0,
            source: io::Error::from_raw_os_error(libc::EFBIG),
        };
        let text = e.describe();
        assert!(text.starts_with("growing the pool of node 0: "), "{text}");
        assert!(text.contains("os error 27"), "{text}");
    }
}
