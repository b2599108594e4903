//! Registered guests: their memory regions, per-page metadata, userfaultfd guards and hooks.

use std::any::Any;
use std::io;
use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::hooks::{DirtySource, ExclusionSource};
use crate::meta::Meta;
use crate::sys::PAGE_SIZE;
use crate::sys::attrs::{self, Attrs};
use crate::sys::procfs::{Smaps, VmaFlags};
use crate::sys::uffd::Uffd;

/// Identifies a registered guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GuestId(pub u32);

/// How to register a guest.
#[derive(Clone)]
pub struct GuestConfig {
    /// Name shown in statistics.
    pub name: String,
    /// Trust domain: non-zero pages never merge across domains.
    pub domain: String,
    /// Which pages were written since the last pass (e.g. from KVM's dirty log).
    pub dirty: Option<Arc<dyn DirtySource>>,
    /// Which pages have device I/O in flight.
    pub exclusion: Option<Arc<dyn ExclusionSource>>,
}

impl std::fmt::Debug for GuestConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestConfig")
            .field("name", &self.name)
            .field("domain", &self.domain)
            .field("dirty", &self.dirty.is_some())
            .field("exclusion", &self.exclusion.is_some())
            .finish()
    }
}

impl GuestConfig {
    /// A guest named `name` in trust domain `domain`, without hooks.
    pub fn new(name: impl Into<String>, domain: impl Into<String>) -> Self {
        GuestConfig {
            name: name.into(),
            domain: domain.into(),
            dirty: None,
            exclusion: None,
        }
    }

    /// Adds a dirty-page source.
    pub fn with_dirty_source(mut self, source: Arc<dyn DirtySource>) -> Self {
        self.dirty = Some(source);
        self
    }

    /// Adds an exclusion source.
    pub fn with_exclusion_source(mut self, source: Arc<dyn ExclusionSource>) -> Self {
        self.exclusion = Some(source);
        self
    }
}

/// One guest memory region.
#[derive(Debug)]
pub(crate) struct Region {
    pub gpa: u64,
    pub hva: usize,
    pub pages: usize,
    /// Empty for skipped regions.
    pub metas: Vec<Meta>,
    /// `None` for regions that are not private anonymous memory: never touched.
    pub uffd: Option<Uffd>,
    /// Ranges not registered with `uffd` (remapped pages), see `merge::RegionGuard`.
    pub unregistered: crate::merge::Ranges,
    /// Dirty bitmap of the current pass (`None`: unknown, hash everything).
    pub dirty: Option<Vec<u64>>,
    /// Attributes of the region's memory at registration (`MADV_DONTDUMP`, `mlock`, ...),
    /// given to every mapping the engine makes inside it.
    pub attrs: Attrs,
    /// The region's VmFlags at registration, less those that never matter (see
    /// [`attrs::relevant`]): what a rebuilt region must have.
    pub vma_flags: Vec<String>,
}

impl Region {
    pub fn addr(&self, page: u32) -> usize {
        self.hva + page as usize * PAGE_SIZE
    }

    pub fn active(&self) -> bool {
        self.uffd.is_some()
    }

    /// Lets go of the region: the engine never reads, scans nor merges it again. Closing its
    /// userfaultfd wakes every thread it held and clears its protection.
    pub fn let_go(&mut self) {
        self.uffd = None;
        self.unregistered.clear();
    }

    /// Replaces the region's userfaultfd: closing the old one wakes every thread it held and
    /// clears its protection. Without a new one the region is no longer merged.
    pub fn replace_guard(&mut self) {
        let len = self.pages * PAGE_SIZE;
        self.let_go();
        match Uffd::open().and_then(|u| u.register(self.hva, len).map(|()| u)) {
            Ok(u) => self.uffd = Some(u),
            Err(e) => log::error!("vm-dedup: region at {:#x} left unguarded: {e}", self.hva),
        }
    }
}

/// A registered guest.
pub(crate) struct Guest {
    pub id: GuestId,
    pub name: String,
    pub domain: u16,
    pub regions: Vec<Region>,
    /// The engine's hold on the guest memory (never read: dropping it may unmap the memory).
    pub _keep: Arc<dyn Any + Send + Sync>,
    pub dirty: Option<Arc<dyn DirtySource>>,
    pub exclusion: Option<Arc<dyn ExclusionSource>>,
    pub pages_scanned: u64,
    pub cow_breaks: u64,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("regions", &self.regions.len())
            .finish()
    }
}

/// Why a region is left alone by what vm-memory says of it, `None` when it claims to be private
/// anonymous memory (which [`kernel_view`] then checks).
pub(crate) fn unsuitable<B: Bitmap>(r: &GuestRegionMmap<B>) -> Option<&'static str> {
    if r.file_offset().is_some() {
        return Some("file-backed");
    }
    let flags = r.flags();
    if flags & libc::MAP_SHARED != 0 || flags & libc::MAP_PRIVATE == 0 {
        return Some("shared");
    }
    if flags & libc::MAP_HUGETLB != 0 {
        return Some("hugetlb");
    }
    if r.as_ptr() as usize % PAGE_SIZE != 0 || r.size() % PAGE_SIZE != 0 {
        return Some("not page aligned");
    }
    None
}

/// What the kernel says about the memory `[start, end)` of a region, from its VMAs in
/// /proc/self/smaps (`vmas`, in address order, possibly overlapping): its relevant VmFlags
/// (see [`attrs::relevant`]) when the engine may remap it, else why not. vm-memory's flags and
/// file offset cannot be trusted for this: a region built over a raw pointer
/// (`MmapRegionBuilder::with_raw_mmap_pointer`) says private anonymous whatever it maps.
pub(crate) fn kernel_view(
    vmas: &[VmaFlags],
    start: usize,
    end: usize,
) -> Result<Vec<String>, String> {
    const WHERE: &str = "(per /proc/self/smaps)";
    let mut covered = start;
    let mut flags: Option<Vec<String>> = None;
    for v in vmas {
        if v.start > covered {
            break;
        }
        covered = covered.max(v.end);
        let why = if !v.private() {
            "shared"
        } else if v.has("ht") {
            "hugetlb"
        } else if v.file {
            "file-backed"
        } else if v.has("io") || v.has("pf") {
            "I/O or PFN-mapped"
        } else if !v.read_write() {
            if v.perms.starts_with('r') {
                "read-only"
            } else {
                "inaccessible or write-only"
            }
        } else {
            ""
        };
        if !why.is_empty() {
            return Err(format!("{why} {WHERE}"));
        }
        let f = attrs::relevant(&v.flags);
        match &flags {
            Some(w) if *w != f => {
                return Err(format!(
                    "of VMAs whose flags differ ({w:?} and {f:?}) {WHERE}, which could never be \
                     rebuilt as one mapping"
                ));
            }
            Some(_) => {}
            None => flags = Some(f),
        }
    }
    match flags {
        Some(f) if covered >= end => Ok(f),
        _ => Err(format!("not mapped in full {WHERE}")),
    }
}

fn skipped(gpa: u64, hva: usize, pages: usize) -> Region {
    Region {
        gpa,
        hva,
        pages,
        metas: Vec::new(),
        uffd: None,
        unregistered: crate::merge::Ranges::new(),
        dirty: None,
        attrs: Attrs::NONE,
        vma_flags: Vec::new(),
    }
}

/// Builds the regions of a guest memory, registering the suitable ones with a userfaultfd each.
/// A region is suitable when vm-memory says it is private anonymous memory and the kernel
/// (`smaps`, read before any region is registered) agrees; its attributes are recorded then.
pub(crate) fn regions_of<M, B>(memory: &M, smaps: &Smaps) -> io::Result<Vec<Region>>
where
    M: GuestMemoryBackend<R = GuestRegionMmap<B>>,
    B: Bitmap,
{
    let mut out = Vec::new();
    for r in memory.iter() {
        let hva = r.as_ptr() as usize;
        let pages = r.size() / PAGE_SIZE;
        let gpa = r.start_addr().0;
        if let Some(why) = unsuitable(r) {
            log::info!("vm-dedup: leaving {why} region at {gpa:#x} alone");
            out.push(skipped(gpa, hva, pages));
            continue;
        }
        let len = pages * PAGE_SIZE;
        let vma_flags = match kernel_view(&smaps.vmas(hva, hva + len), hva, hva + len) {
            Ok(f) => f,
            Err(why) => {
                log::info!("vm-dedup: leaving region at {gpa:#x} alone: {why}");
                out.push(skipped(gpa, hva, pages));
                continue;
            }
        };
        let attrs = Attrs::from_flags(&vma_flags);
        if !attrs.is_empty() {
            log::debug!("vm-dedup: region at {gpa:#x} has attributes {vma_flags:?}");
        }
        let uffd = Uffd::open()?;
        uffd.register(hva, len)?;
        out.push(Region {
            gpa,
            hva,
            pages,
            metas: vec![Meta::NEW; pages],
            uffd: Some(uffd),
            unregistered: crate::merge::Ranges::new(),
            dirty: None,
            attrs,
            vma_flags,
        });
    }
    Ok(out)
}

/// Keeps a guest memory alive as long as the engine holds it.
pub(crate) fn keep_alive<M: Send + Sync + 'static>(m: Arc<M>) -> Arc<dyn Any + Send + Sync> {
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vma(start: usize, end: usize, perms: &str, file: bool, flags: &[&str]) -> VmaFlags {
        let mut flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
        flags.sort();
        VmaFlags {
            start,
            end,
            file,
            perms: perms.to_string(),
            flags,
        }
    }

    const RW: [&str; 6] = ["rd", "wr", "mr", "mw", "me", "nr"];

    #[test]
    fn the_kernel_decides_what_is_private_anonymous_memory() {
        let ok = vma(0x1000, 0x5000, "rw-p", false, &RW);
        let f = kernel_view(std::slice::from_ref(&ok), 0x2000, 0x4000).unwrap();
        assert!(f.contains(&"wr".to_string()));
        let why = |v: VmaFlags| kernel_view(&[v], 0x2000, 0x4000).unwrap_err();
        assert!(why(vma(0x1000, 0x5000, "rw-s", true, &RW)).starts_with("shared"));
        let mut ht = RW.to_vec();
        ht.push("ht");
        assert!(why(vma(0x1000, 0x5000, "rw-p", true, &ht)).starts_with("hugetlb"));
        assert!(why(vma(0x1000, 0x5000, "rw-p", true, &RW)).starts_with("file-backed"));
        let mut pf = RW.to_vec();
        pf.push("pf");
        assert!(why(vma(0x1000, 0x5000, "rw-p", false, &pf)).starts_with("I/O"));
        assert!(why(vma(0x1000, 0x5000, "r--p", false, &["rd"])).starts_with("read-only"));
        assert!(why(vma(0x1000, 0x5000, "---p", false, &[])).starts_with("inaccessible"));
        // A hole, or an end not covered.
        let a = vma(0x1000, 0x2800, "rw-p", false, &RW);
        let b = vma(0x3000, 0x5000, "rw-p", false, &RW);
        assert!(
            kernel_view(&[a.clone(), b.clone()], 0x2000, 0x4000)
                .unwrap_err()
                .starts_with("not mapped")
        );
        assert!(kernel_view(&[a], 0x2000, 0x4000).is_err());
        assert!(kernel_view(&[], 0x2000, 0x4000).is_err());
        // Split VMAs with the same flags are one region; listed twice (smaps read in pieces)
        // as well. Flags that differ are not.
        let c = vma(0x1000, 0x3000, "rw-p", false, &RW);
        let d = vma(0x3000, 0x5000, "rw-p", false, &RW);
        assert!(kernel_view(&[c.clone(), c.clone(), d], 0x2000, 0x4000).is_ok());
        let mut dd = RW.to_vec();
        dd.push("dd");
        let e = vma(0x3000, 0x5000, "rw-p", false, &dd);
        assert!(
            kernel_view(&[c, e], 0x2000, 0x4000)
                .unwrap_err()
                .contains("differ")
        );
        // The engine's own userfaultfd flags do not count.
        let mut uw = RW.to_vec();
        uw.push("uw");
        assert_eq!(
            kernel_view(&[vma(0x1000, 0x5000, "rw-p", false, &uw)], 0x2000, 0x4000).unwrap(),
            f
        );
    }
}
