//! A reference model of merge decisions, for tests and fuzz targets: what a correct engine may
//! do with a set of pages (safety) and how much it can save at best (liveness), plus a
//! simulation that runs the engine's real planner, index and slot table against an in-memory
//! stand-in for guest memory, so that the two can be compared on any input, and a check of a
//! real engine's mapping and statistics against the model ([`check_engine`]).

use hashbrown::HashMap;
use vm_memory::{Bytes, GuestAddress};

use crate::engine::Engine;
use crate::guest::GuestId;
use crate::numa::Topology;
use crate::sys::PAGE_SIZE;

use crate::index::{ContentIndex, PageLoc};
use crate::meta::{Meta, PageState};
use crate::plan::{self, Candidate, PlanView, Rules, Target};
use crate::slots::SlotTable;
use crate::stability::{self, Observation};

/// One page of the model: its content (0 means all zeros), trust domain and node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelPage {
    /// Content; equal values mean equal bytes, 0 means all zeros.
    pub content: u64,
    /// Trust domain.
    pub domain: u16,
    /// NUMA node.
    pub node: u8,
}

/// What a page is mapped to at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// A private page.
    Private,
    /// The host zero page.
    Zero,
    /// A pool slot.
    Slot(u32),
}

/// A rule the mapping breaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// A page with non-zero content is mapped to the zero page.
    NonZeroOnZeroPage(usize),
    /// A page is mapped to a slot holding other content.
    WrongContent(usize),
    /// Two pages of different domains share a slot.
    AcrossDomains(u32),
    /// Two pages of different nodes share a slot while merging across nodes is off.
    AcrossNodes(u32),
    /// More pages share a slot than `max_page_sharing` allows.
    TooManySharers(u32),
}

/// Checks the safety rules of a final mapping; `slot_content` is what each slot holds.
pub fn check(
    pages: &[ModelPage],
    rules: &Rules,
    mapping: &[Mapping],
    slot_content: &HashMap<u32, u64>,
) -> Result<(), Violation> {
    let mut sharers: HashMap<u32, Vec<usize>> = HashMap::new();
    for (i, (p, m)) in pages.iter().zip(mapping).enumerate() {
        match *m {
            Mapping::Private => {}
            Mapping::Zero if p.content == 0 && rules.use_zero_pages => {}
            Mapping::Zero => return Err(Violation::NonZeroOnZeroPage(i)),
            Mapping::Slot(s) => {
                if slot_content.get(&s) != Some(&p.content) {
                    return Err(Violation::WrongContent(i));
                }
                sharers.entry(s).or_default().push(i);
            }
        }
    }
    for (s, members) in sharers {
        let first = pages[members[0]];
        if members.iter().any(|&i| pages[i].domain != first.domain) {
            return Err(Violation::AcrossDomains(s));
        }
        if !rules.merge_across_nodes && members.iter().any(|&i| pages[i].node != first.node) {
            return Err(Violation::AcrossNodes(s));
        }
        if members.len() > usize::from(rules.max_page_sharing.max(2)) {
            return Err(Violation::TooManySharers(s));
        }
    }
    Ok(())
}

/// Pages saved by a mapping: every zero page, and all but one sharer of each slot.
pub fn savings(mapping: &[Mapping]) -> u64 {
    let mut refs: HashMap<u32, u64> = HashMap::new();
    let mut zero = 0;
    for m in mapping {
        match m {
            Mapping::Zero => zero += 1,
            Mapping::Slot(s) => *refs.entry(*s).or_insert(0) += 1,
            Mapping::Private => {}
        }
    }
    zero + refs.values().map(|r| r - 1).sum::<u64>()
}

/// The most pages any correct engine can save on `pages`.
pub fn optimal_savings(pages: &[ModelPage], rules: &Rules) -> u64 {
    let mut groups: HashMap<(u64, u16, u8), u64> = HashMap::new();
    let mut zero = 0;
    for p in pages {
        if p.content == 0 && rules.use_zero_pages {
            zero += 1;
            continue;
        }
        let node = if rules.merge_across_nodes { 0 } else { p.node };
        *groups.entry((p.content, p.domain, node)).or_insert(0) += 1;
    }
    let max = u64::from(rules.max_page_sharing.max(2));
    zero + groups.values().map(|&c| c - c.div_ceil(max)).sum::<u64>()
}

/// One guest registered with a real engine, as a model test sees it.
#[derive(Debug)]
pub struct EngineGuest<'a, M> {
    /// The guest's id in the engine.
    pub id: GuestId,
    /// Its memory, as registered.
    pub memory: &'a M,
    /// Its trust domain.
    pub domain: u16,
    /// Every page to check: guest address and content (as in [`ModelPage::content`]).
    pub pages: &'a [(u64, u64)],
}

/// Checks a real engine against the model: every page of `guests` still reads back the bytes
/// of its content (`bytes(content)`), the engine's mapping of them (from
/// [`Engine::merged_pages`], the pool's bytes for slots, `topology` for nodes) breaks none of
/// [`check`]'s rules, and the statistics count what is mapped (`zero_pages`, `pages_shared`,
/// `pages_shared + pages_sharing`). The error says what is wrong.
pub fn check_engine<M>(
    engine: &Engine,
    topology: &dyn Topology,
    rules: &Rules,
    guests: &[EngineGuest<'_, M>],
    bytes: impl Fn(u64) -> Vec<u8>,
) -> Result<(), String>
where
    M: Bytes<GuestAddress>,
    M::E: std::fmt::Debug,
{
    let mut pages = Vec::new();
    let mut mapping = Vec::new();
    let mut slot_content: HashMap<u32, u64> = HashMap::new();
    let mut content_of: HashMap<Vec<u8>, u64> = HashMap::new();
    let mut buf = vec![0u8; PAGE_SIZE];
    for (gi, g) in guests.iter().enumerate() {
        let merged: HashMap<u64, Option<(u8, u32)>> = engine
            .merged_pages(g.id)
            .map_err(|e| format!("merged_pages of guest {gi}: {e}"))?
            .into_iter()
            .map(|m| (m.gpa.0, m.slot))
            .collect();
        for &(gpa, content) in g.pages {
            let want = bytes(content);
            g.memory
                .read_slice(&mut buf, GuestAddress(gpa))
                .map_err(|e| format!("reading guest {gi} at {gpa:#x}: {e:?}"))?;
            if buf != want {
                return Err(format!(
                    "guest {gi} page {gpa:#x} lost its content ({content})"
                ));
            }
            content_of.entry(want).or_insert(content);
            let hva = engine
                .page_info(g.id, GuestAddress(gpa))
                .map_err(|e| format!("page_info of guest {gi} at {gpa:#x}: {e}"))?
                .hva;
            let mut node = [0u8];
            topology
                .nodes_of(&[hva], &mut node)
                .map_err(|e| format!("node of {hva:#x}: {e}"))?;
            pages.push(ModelPage {
                content,
                domain: g.domain,
                node: node[0],
            });
            // Per node, the copy is on the pages' node too (`check` sees only that the sharers
            // agree with each other).
            if let Some(&Some((pool, _))) = merged.get(&gpa) {
                if !rules.merge_across_nodes && pool != node[0] {
                    return Err(format!(
                        "guest {gi} page {gpa:#x} on node {} maps a pool page of node {pool}",
                        node[0]
                    ));
                }
            }
            mapping.push(match merged.get(&gpa) {
                None => Mapping::Private,
                Some(None) => Mapping::Zero,
                Some(&Some((node, slot))) => Mapping::Slot(u32::from(node) << 24 | slot),
            });
        }
    }
    // Each mapped slot's content, read from the pool once per slot.
    for m in &mapping {
        if let &Mapping::Slot(key) = m {
            if slot_content.contains_key(&key) {
                continue;
            }
            let (node, slot) = ((key >> 24) as u8, key & 0xff_ffff);
            let held = engine
                .pool_page(node, slot)
                .map_err(|e| format!("pool_page({node}, {slot}): {e}"))?;
            slot_content.insert(key, content_of.get(&held).copied().unwrap_or(u64::MAX));
        }
    }
    check(&pages, rules, &mapping, &slot_content)
        .map_err(|v| format!("wrong merge: {v:?} with {rules:?}"))?;
    let s = engine.stats();
    let zero = mapping.iter().filter(|m| **m == Mapping::Zero).count() as u64;
    let mapped = mapping
        .iter()
        .filter(|m| matches!(m, Mapping::Slot(_)))
        .count() as u64;
    let counted = [
        ("zero_pages", s.zero_pages, zero),
        // The slots mapped are the keys of `slot_content`.
        ("pages_shared", s.pages_shared, slot_content.len() as u64),
        (
            "pages_shared + pages_sharing",
            s.pages_shared + s.pages_sharing,
            mapped,
        ),
    ];
    match counted.iter().find(|(_, stat, seen)| stat != seen) {
        Some((name, stat, seen)) => Err(format!("{name} is {stat}, {seen} mapped")),
        None => Ok(()),
    }
}

/// The result of a simulation.
#[derive(Clone, Debug, Default)]
pub struct Simulation {
    /// Final content of each page.
    pub pages: Vec<ModelPage>,
    /// Final mapping of each page.
    pub mapping: Vec<Mapping>,
    /// Content of each live slot.
    pub slot_content: HashMap<u32, u64>,
    /// Merges that were planned but refused because the bytes differed.
    pub refused: u64,
}

struct SimView<'a> {
    metas: &'a [Meta],
    content: &'a [u64],
    slot_content: &'a HashMap<u32, u64>,
    distrusted: &'a hashbrown::HashSet<usize>,
}

impl PlanView for SimView<'_> {
    fn stable_hash(&self, loc: PageLoc) -> Option<u32> {
        let m = self.metas.get(loc.page as usize)?;
        (m.state() == PageState::Stable).then(|| m.payload())
    }
    fn same_content(&self, a: PageLoc, b: PageLoc) -> bool {
        self.content[a.page as usize] == self.content[b.page as usize]
    }
    fn matches_slot(&self, loc: PageLoc, _node: u8, slot: u32) -> bool {
        self.slot_content.get(&slot) == Some(&self.content[loc.page as usize])
    }
    fn distrusted(&self, loc: PageLoc) -> bool {
        self.distrusted.contains(&(loc.page as usize))
    }
}

/// Runs `passes` full passes of the engine's planner over `pages`, whose hash is `hash(content)`
/// (make it collide to test that collisions never merge different content). Before pass `n`,
/// every `(n, page, content)` in `writes` changes a page, breaking its merge as a guest write
/// would. The commit is emulated exactly: a merge happens only when the bytes are equal.
pub fn simulate(
    pages: &[ModelPage],
    rules: &Rules,
    hash: impl Fn(u64) -> u32,
    passes: usize,
    writes: &[(usize, usize, u64)],
) -> Simulation {
    let mut content: Vec<u64> = pages.iter().map(|p| p.content).collect();
    let mut metas = vec![Meta::NEW; pages.len()];
    let mut mapping = vec![Mapping::Private; pages.len()];
    let mut slot_content: HashMap<u32, u64> = HashMap::new();
    let mut slots = SlotTable::new();
    let mut index = ContentIndex::new();
    index.number_region(0, 0, 0, pages.len() as u32);
    let mut refused = 0;
    let mut distrusted: hashbrown::HashSet<usize> = hashbrown::HashSet::new();
    for pass in 0..passes {
        for &(_, page, value) in writes.iter().filter(|w| w.0 == pass) {
            let Some(c) = content.get_mut(page) else {
                continue;
            };
            *c = value;
            if let Mapping::Slot(s) = mapping[page] {
                if slots.dec(s) == 0 {
                    slot_content.remove(&s);
                    plan::release(s, rules, &mut index, &mut slots);
                }
            }
            mapping[page] = Mapping::Private;
            metas[page] = Meta::NEW;
        }
        index.clear_pages();
        let mut cands = Vec::new();
        for (i, m) in metas.iter_mut().enumerate() {
            if matches!(m.state(), PageState::Merged | PageState::Zero) {
                continue;
            }
            let obs = Observation::Hashed {
                hash: hash(content[i]) & crate::meta::PAYLOAD_MASK,
                written: false,
            };
            *m = stability::observe(*m, obs);
            if m.state() == PageState::Stable {
                cands.push(Candidate {
                    loc: PageLoc {
                        guest: 0,
                        region: 0,
                        page: i as u32,
                    },
                    hash: m.payload(),
                    domain: pages[i].domain,
                    node: pages[i].node,
                    zero: content[i] == 0,
                });
            }
        }
        let view = SimView {
            metas: &metas,
            content: &content,
            slot_content: &slot_content,
            distrusted: &distrusted,
        };
        let p = plan::plan(&cands, rules, &mut index, &mut slots, &view);
        for n in &p.new_slots {
            slot_content.insert(n.slot, content[n.donor.page as usize]);
        }
        let merged: Vec<bool> = p
            .assigns
            .iter()
            .map(|a| {
                let c = content[a.loc.page as usize];
                match a.target {
                    Target::Zero => c == 0,
                    Target::Slot(s) => slot_content.get(&s) == Some(&c),
                }
            })
            .collect();
        for (a, &ok) in p.assigns.iter().zip(&merged) {
            let i = a.loc.page as usize;
            if !ok {
                refused += 1;
                distrusted.insert(i);
                continue;
            }
            distrusted.remove(&i);
            match a.target {
                Target::Zero => {
                    mapping[i] = Mapping::Zero;
                    metas[i] = Meta::new(PageState::Zero, 0);
                }
                Target::Slot(s) => {
                    mapping[i] = Mapping::Slot(s);
                    metas[i] = Meta::new(PageState::Merged, s);
                }
            }
        }
        for s in plan::settle(&p, &merged, &mut slots) {
            slot_content.remove(&s);
            plan::release(s, rules, &mut index, &mut slots);
        }
    }
    let final_pages = pages
        .iter()
        .zip(&content)
        .map(|(p, &c)| ModelPage { content: c, ..*p })
        .collect();
    Simulation {
        pages: final_pages,
        mapping,
        slot_content,
        refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(content: u64, domain: u16, node: u8) -> ModelPage {
        ModelPage {
            content,
            domain,
            node,
        }
    }

    const RULES: Rules = Rules {
        use_zero_pages: true,
        merge_across_nodes: false,
        max_page_sharing: 3,
    };

    #[test]
    fn model_counts_groups_and_zero_pages() {
        let pages = [
            page(0, 0, 0),
            page(0, 1, 1),
            page(5, 0, 0),
            page(5, 0, 0),
            page(5, 0, 0),
            page(5, 0, 0),
            page(5, 0, 1),
            page(5, 1, 0),
        ];
        // zero: 2; (5,d0,n0) x4 with max 3 -> 2 saved; others alone.
        assert_eq!(optimal_savings(&pages, &RULES), 4);
    }

    #[test]
    fn check_catches_each_violation() {
        let pages = [page(1, 0, 0), page(1, 1, 0), page(2, 0, 1)];
        let content: HashMap<u32, u64> = [(0, 1), (1, 2)].into_iter().collect();
        let m = |a, b, c| [a, b, c];
        use Mapping::*;
        assert_eq!(
            check(&pages, &RULES, &m(Zero, Private, Private), &content),
            Err(Violation::NonZeroOnZeroPage(0))
        );
        assert_eq!(
            check(&pages, &RULES, &m(Slot(1), Private, Private), &content),
            Err(Violation::WrongContent(0))
        );
        assert_eq!(
            check(&pages, &RULES, &m(Slot(0), Slot(0), Private), &content),
            Err(Violation::AcrossDomains(0))
        );
        let pages2 = [page(1, 0, 0), page(1, 0, 1), page(2, 0, 1)];
        assert_eq!(
            check(&pages2, &RULES, &m(Slot(0), Slot(0), Private), &content),
            Err(Violation::AcrossNodes(0))
        );
        let pages3 = [page(1, 0, 0); 4];
        let map4 = [Slot(0); 4];
        assert_eq!(
            check(&pages3, &RULES, &map4, &content),
            Err(Violation::TooManySharers(0))
        );
        assert_eq!(savings(&map4), 3);
    }

    #[test]
    fn simulation_reaches_the_optimum_safely() {
        let pages: Vec<ModelPage> = (0..40)
            .map(|i| page(i % 5, (i % 2) as u16, (i % 3 == 0) as u8))
            .collect();
        let sim = simulate(&pages, &RULES, |c| (c * 7919) as u32, 3, &[]);
        check(&sim.pages, &RULES, &sim.mapping, &sim.slot_content).unwrap();
        assert_eq!(savings(&sim.mapping), optimal_savings(&pages, &RULES));
    }
}
