//! One guest's pages through the engine: what each is ([`Engine::page_info`],
//! [`Engine::merged_pages`], the pool's copy) and discarding them ([`Engine::discard`]).

use vm_memory::GuestAddress;

use crate::engine::{Engine, EngineError};
use crate::guest::GuestId;
use crate::meta::PageState;
use crate::sys::PAGE_SIZE;

/// What a page is, for tests and inspection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageInfo {
    /// The engine's state of the page.
    pub state: PageState,
    /// `(node, slot)` when mapped to a pool slot.
    pub slot: Option<(u8, u32)>,
    /// Host page frame number now mapped there (`None` when not present, 0 without
    /// CAP_SYS_ADMIN).
    pub host_pfn: Option<u64>,
    /// Host virtual address of the page.
    pub hva: usize,
}

/// A guest page that is merged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergedPage {
    /// Guest physical address.
    pub gpa: GuestAddress,
    /// `(node, slot)`, or `None` for the zero page.
    pub slot: Option<(u8, u32)>,
}

impl Engine {
    /// What the engine knows about the guest page at `gpa`, with its host PFN from pagemap.
    pub fn page_info(&self, id: GuestId, gpa: GuestAddress) -> Result<PageInfo, EngineError> {
        let st = self.state()?;
        let gi = st.guest_index(id).ok_or(EngineError::NoGuest(id))?;
        let g = st.guests[gi].as_ref().ok_or(EngineError::NoGuest(id))?;
        let r = g
            .regions
            .iter()
            .find(|r| gpa.0 >= r.gpa && gpa.0 < r.gpa + (r.pages * PAGE_SIZE) as u64)
            .ok_or(EngineError::NoAddress(gpa.0))?;
        let page = ((gpa.0 - r.gpa) / PAGE_SIZE as u64) as usize;
        let hva = r.hva + page * PAGE_SIZE;
        let meta = r.metas.get(page).copied().unwrap_or_default();
        let slot = (meta.state() == PageState::Merged)
            .then(|| (st.slots.node(meta.payload()), meta.payload()));
        Ok(PageInfo {
            state: if r.active() {
                meta.state()
            } else {
                PageState::Empty
            },
            slot,
            host_pfn: st.pagemap.pfn(hva).ok().flatten(),
            hva,
        })
    }

    /// Every merged page of a guest, in address order.
    pub fn merged_pages(&self, id: GuestId) -> Result<Vec<MergedPage>, EngineError> {
        let st = self.state()?;
        let gi = st.guest_index(id).ok_or(EngineError::NoGuest(id))?;
        let g = st.guests[gi].as_ref().ok_or(EngineError::NoGuest(id))?;
        let mut out = Vec::new();
        for r in &g.regions {
            for (i, m) in r.metas.iter().enumerate() {
                let slot = match m.state() {
                    PageState::Merged => Some((st.slots.node(m.payload()), m.payload())),
                    PageState::Zero => None,
                    _ => continue,
                };
                out.push(MergedPage {
                    gpa: GuestAddress(r.gpa + (i * PAGE_SIZE) as u64),
                    slot,
                });
            }
        }
        Ok(out)
    }

    /// Discards `[gpa, gpa + len)` of a guest (page aligned, within one region): it reads as
    /// zeros afterwards, merged pages included. Use this instead of `MADV_DONTNEED` for balloon
    /// and reset; nobody may access the range meanwhile (the guest is paused or gave it up).
    ///
    /// [`EngineError::Discard`] leaves the range as it was, except in one case the log reports:
    /// the kernel unmapped the range and could map nothing there again (memory exhausted).
    /// The range then is a hole, and the engine lets go of the region; its merged pages stay
    /// copy-on-write, and [`Engine::release`] ends the guest.
    pub fn discard(&self, id: GuestId, gpa: GuestAddress, len: u64) -> Result<(), EngineError> {
        let page = PAGE_SIZE as u64;
        if gpa.0 % page != 0 || len % page != 0 {
            return Err(EngineError::NoAddress(gpa.0));
        }
        let mut st = self.state()?;
        let gi = st.guest_index(id).ok_or(EngineError::NoGuest(id))?;
        let g = st.guests[gi].as_ref().ok_or(EngineError::NoGuest(id))?;
        let (ri, r) = g
            .regions
            .iter()
            .enumerate()
            .find(|(_, r)| {
                gpa.0 >= r.gpa
                    && gpa
                        .0
                        .checked_add(len)
                        .is_some_and(|end| end <= r.gpa + r.pages as u64 * page)
            })
            .ok_or(EngineError::NoAddress(gpa.0))?;
        let first = ((gpa.0 - r.gpa) / page) as usize;
        st.discard(gi, ri, first, (len / page) as usize, &self.inner.faults)?;
        st.stir();
        let unref = st.slots.unreferenced();
        st.release_slots(unref, &self.inner.faults);
        self.publish(&st);
        Ok(())
    }

    /// The pool's copy of a slot (for tests: it must never change while mapped).
    pub fn pool_page(&self, node: u8, slot: u32) -> Result<Vec<u8>, EngineError> {
        let st = self.state()?;
        st.pools
            .slot_bytes(node, slot)
            .map(<[u8]>::to_vec)
            .map_err(|_| EngineError::NoAddress(u64::from(slot)))
    }
}
