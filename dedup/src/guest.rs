//! Registered guests: their memory regions, per-page metadata, userfaultfd guards and hooks.

use std::any::Any;
use std::io;
use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::hooks::{DirtySource, ExclusionSource};
use crate::meta::Meta;
use crate::sys::PAGE_SIZE;
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
}

impl Region {
    pub fn addr(&self, page: u32) -> usize {
        self.hva + page as usize * PAGE_SIZE
    }

    pub fn active(&self) -> bool {
        self.uffd.is_some()
    }

    /// Replaces the region's userfaultfd: closing the old one wakes every thread it held and
    /// clears its protection. Without a new one the region is no longer merged.
    pub fn replace_guard(&mut self) {
        let len = self.pages * PAGE_SIZE;
        self.uffd = None;
        self.unregistered.clear();
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

/// Why a region is left alone, `None` when it is private anonymous memory the engine may remap.
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

/// Builds the regions of a guest memory, registering the suitable ones with a userfaultfd each.
pub(crate) fn regions_of<M, B>(memory: &M) -> io::Result<Vec<Region>>
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
            out.push(Region {
                gpa,
                hva,
                pages,
                metas: Vec::new(),
                uffd: None,
                unregistered: crate::merge::Ranges::new(),
                dirty: None,
            });
            continue;
        }
        let uffd = Uffd::open()?;
        uffd.register(hva, pages * PAGE_SIZE)?;
        out.push(Region {
            gpa,
            hva,
            pages,
            metas: vec![Meta::NEW; pages],
            uffd: Some(uffd),
            unregistered: crate::merge::Ranges::new(),
            dirty: None,
        });
    }
    Ok(out)
}

/// Keeps a guest memory alive as long as the engine holds it.
pub(crate) fn keep_alive<M: Send + Sync + 'static>(m: Arc<M>) -> Arc<dyn Any + Send + Sync> {
    m
}
