//! One chunk of a scan step, run on a worker thread: read the chunk's page categories with
//! `PAGEMAP_SCAN`, notice merged pages that a write made private (copy-on-write breaks), hash
//! the private present pages that need it, apply the stability rule, and list the stable ones
//! as merge candidates.
//!
//! When the guest's dirty-page source says that no page of the chunk was written and every
//! page was looked at before, nothing can have changed (a copy-on-write break, a zero page
//! filled, a page populated: each is a write), so the pagemap query is skipped, except on
//! the passes that verify everything (see `Chunk::trust_clean`).

use std::sync::OnceLock;

use crate::backoff::{Tally, Trouble};
use crate::hash::{is_zero, page_hash};
use crate::index::PageLoc;
use crate::meta::{Meta, PageState, short_hash};
use crate::numa::Topology;
use crate::plan::Candidate;
use crate::stability::{self, Observation};
use crate::sys::PAGE_SIZE;
use crate::sys::pagemap::{
    PAGE_IS_FILE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PageRegion, Pagemap,
};
use crate::sys::procfs::thread_cpu_ns;

/// Pages per chunk: the unit of parallel work.
pub const CHUNK_PAGES: usize = 512;

/// The 28-bit hash of an all-zero page.
pub fn zero_hash() -> u32 {
    static ZERO: OnceLock<u32> = OnceLock::new();
    *ZERO.get_or_init(|| short_hash(page_hash(&[0u8; PAGE_SIZE])))
}

/// Whether a merged page's `PAGEMAP_SCAN` categories show a private page of its own (a write
/// copied it): an anonymous page, present, swapped out or being migrated. A pool page stays a
/// file page while the kernel migrates it (its migration entry counts as swapped, with the
/// file bit), and a page not present still maps its slot: neither is a break, or the slot could
/// be punched while the page still maps it.
pub fn copied_on_write(categories: u64) -> bool {
    categories & (PAGE_IS_PRESENT | PAGE_IS_SWAPPED) != 0 && categories & PAGE_IS_FILE == 0
}

/// A chunk of one region.
#[derive(Debug)]
pub struct Chunk<'a> {
    /// Guest number.
    pub guest: u16,
    /// Region number.
    pub region: u16,
    /// Page index of `metas[0]` in the region.
    pub first: u32,
    /// Host address of the region.
    pub hva: usize,
    /// Trust domain of the guest.
    pub domain: u16,
    /// Metadata of the chunk's pages.
    pub metas: &'a mut [Meta],
    /// The region's dirty bitmap for this pass, when the guest has a dirty-page source.
    pub dirty: Option<&'a [u64]>,
    /// Whether a chunk that the dirty bitmap reports unwritten may skip the pagemap query
    /// (false on the passes that verify every page with pagemap).
    pub trust_clean: bool,
}

/// What scanning a chunk found.
#[derive(Debug, Default)]
pub struct ChunkOut {
    /// Stable private pages.
    pub cands: Vec<Candidate>,
    /// For each candidate: it was not stable before this look (it is new to the planner).
    pub fresh: Vec<bool>,
    /// Slots that lost a sharer to a write.
    pub broken_slots: Vec<u32>,
    /// Zero pages written since they were dropped.
    pub zero_broken: u64,
    /// Pages hashed.
    pub scanned: u64,
    /// CPU time spent.
    pub cpu_ns: u64,
    /// The pagemap query failed: the chunk was left untouched.
    pub failed: bool,
    /// Failures (pagemap or NUMA queries), logged by the engine.
    pub tally: Tally,
}

fn page_slice<'a>(addr: usize) -> &'a [u8] {
    // SAFETY: `addr` is a present page of registered guest memory, mapped for as long as the
    // engine holds the guest. Guest writes may race with this read; the bytes only feed a hash
    // or a zero check, and nothing is merged without a comparison under write protection.
    unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE_SIZE) }
}

/// Whether the dirty bitmap reports no page of the chunk written and every page of it was looked
/// at before.
fn unwritten(c: &Chunk<'_>) -> bool {
    let Some(d) = c.dirty else {
        return false;
    };
    let first = c.first as usize;
    let clean = (first..first + c.metas.len())
        .all(|p| d.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) == 0));
    clean && c.metas.iter().all(|m| m.state() != PageState::New)
}

/// A chunk where nothing was written: merged, zero and empty pages stay as they are; pages with
/// a hash are clean, so stable.
fn idle_chunk(c: &mut Chunk<'_>, out: &mut ChunkOut) {
    let zero = zero_hash();
    let start = c.hva + c.first as usize * PAGE_SIZE;
    for (i, meta) in c.metas.iter_mut().enumerate() {
        let m = *meta;
        if !m.has_hash() {
            continue;
        }
        let next = stability::observe(m, Observation::Clean);
        *meta = next;
        let loc = PageLoc {
            guest: c.guest,
            region: c.region,
            page: c.first + i as u32,
        };
        offer(m, next, loc, c.domain, start + i * PAGE_SIZE, zero, out);
    }
}

/// Offers the page at `loc` (mapped at `addr`) as a merge candidate when its look left it
/// stable (`was` before the look, `next` after), noting whether it just became stable.
fn offer(
    was: Meta,
    next: Meta,
    loc: PageLoc,
    domain: u16,
    addr: usize,
    zero: u32,
    out: &mut ChunkOut,
) {
    if next.state() != PageState::Stable {
        return;
    }
    out.fresh.push(was.state() != PageState::Stable);
    let is_zero_page = next.payload() == zero && !next.remapped() && is_zero(page_slice(addr));
    out.cands.push(Candidate {
        loc,
        hash: next.payload(),
        domain,
        node: 0,
        zero: is_zero_page,
    });
}

/// Reads the chunk's page categories and looks at every page; false when the pagemap query
/// failed (the chunk is left untouched).
fn scan_pages(c: &mut Chunk<'_>, pagemap: &Pagemap, collide: bool, out: &mut ChunkOut) -> bool {
    let start = c.hva + c.first as usize * PAGE_SIZE;
    let end = start + c.metas.len() * PAGE_SIZE;
    let mut cats: Vec<PageRegion> = Vec::with_capacity(16);
    if let Err(e) = pagemap.scan(start, end, &mut cats) {
        out.tally
            .add(Trouble::Scan, &format_args!("PAGEMAP_SCAN: {e}"));
        out.failed = true;
        return false;
    }
    let zero = zero_hash();
    let mut ri = 0;
    for (i, meta) in c.metas.iter_mut().enumerate() {
        let addr = start + i * PAGE_SIZE;
        while ri < cats.len() && cats[ri].end as usize <= addr {
            ri += 1;
        }
        let cat = cats
            .get(ri)
            .filter(|r| r.start as usize <= addr)
            .map_or(0, |r| r.categories);
        let present = cat & PAGE_IS_PRESENT != 0;
        let m = *meta;
        match m.state() {
            PageState::Merged => {
                if copied_on_write(cat) {
                    out.broken_slots.push(m.payload());
                    *meta = m.with(PageState::New, 0);
                }
                continue;
            }
            PageState::Zero => {
                if present && cat & PAGE_IS_PFNZERO == 0 {
                    out.zero_broken += 1;
                    *meta = m.with(PageState::New, 0);
                }
                continue;
            }
            _ => {}
        }
        if cat & PAGE_IS_SWAPPED != 0 {
            continue;
        }
        if !present || cat & PAGE_IS_PFNZERO != 0 {
            // Nothing in memory, or the shared zero page already: nothing to save. (A page of
            // a pool mapping that is not present still reads pool content; it was counted as
            // merged above, so only anonymous pages get here.)
            *meta = m.with(PageState::Empty, 0);
            continue;
        }
        let page = c.first as usize + i;
        let written = c.dirty.is_some_and(|d| {
            d.get(page / 64)
                .is_some_and(|w| w & (1 << (page % 64)) != 0)
        });
        let m = if m.state() == PageState::Empty {
            m.with(PageState::New, 0)
        } else {
            m
        };
        let next = if stability::needs_hash(m, c.dirty.is_some(), written) {
            out.scanned += 1;
            let hash = if collide {
                zero
            } else {
                short_hash(page_hash(page_slice(addr)))
            };
            stability::observe(m, Observation::Hashed { hash, written })
        } else {
            stability::observe(m, Observation::Clean)
        };
        *meta = next;
        let loc = PageLoc {
            guest: c.guest,
            region: c.region,
            page: page as u32,
        };
        offer(m, next, loc, c.domain, addr, zero, out);
    }
    true
}

/// Scans one chunk.
pub fn scan_chunk(
    c: &mut Chunk<'_>,
    pagemap: &Pagemap,
    topology: &dyn Topology,
    collide: bool,
) -> ChunkOut {
    let cpu0 = thread_cpu_ns();
    let mut out = ChunkOut::default();
    if c.trust_clean && unwritten(c) {
        idle_chunk(c, &mut out);
    } else if !scan_pages(c, pagemap, collide, &mut out) {
        return out;
    }
    if topology.node_count() > 1 && !out.cands.is_empty() {
        let addrs: Vec<usize> = out
            .cands
            .iter()
            .map(|k| c.hva + k.loc.page as usize * PAGE_SIZE)
            .collect();
        let mut nodes = vec![0u8; addrs.len()];
        match topology.nodes_of(&addrs, &mut nodes) {
            Ok(()) => {
                for (k, n) in out.cands.iter_mut().zip(nodes) {
                    k.node = n;
                }
            }
            Err(e) => {
                out.tally.add(
                    Trouble::Scan,
                    &format_args!("NUMA query, chunk skipped: {e}"),
                );
                out.cands.clear();
                out.fresh.clear();
            }
        }
    }
    out.cpu_ns = thread_cpu_ns().saturating_sub(cpu0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_anonymous_page_is_a_copy_on_write_break() {
        // Pool page mapped, or not mapped yet: still merged.
        assert!(!copied_on_write(PAGE_IS_PRESENT | PAGE_IS_FILE));
        assert!(!copied_on_write(0));
        // The pool page in migration: a swap entry of a file page.
        assert!(!copied_on_write(PAGE_IS_SWAPPED | PAGE_IS_FILE));
        // A private copy: present, swapped out or in migration.
        assert!(copied_on_write(PAGE_IS_PRESENT));
        assert!(copied_on_write(PAGE_IS_SWAPPED));
    }
}
