//! max_page_sharing, the VMA budget and merge_across_nodes with a fake two-node topology.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::*;
use vm_dedup::{Engine, FakeTopology, GuestConfig};

#[test]
fn max_page_sharing_caps_sharers() {
    let a = memory(40);
    fill_all(&a, &[77; 40]);
    let mut cfg = fast_config();
    cfg.set("max_page_sharing", "4").unwrap();
    let (engine, ids) = engine_with(cfg, &[("a", "d", a.clone())]);
    engine.scan_pass().unwrap();
    let s = engine.scan_pass().unwrap();
    assert_eq!(s.pages_shared, 10);
    assert_eq!(s.pages_sharing, 30);
    let mut per_slot: HashMap<(u8, u32), usize> = HashMap::new();
    for p in engine.merged_pages(ids[0]).unwrap() {
        *per_slot.entry(p.slot.unwrap()).or_default() += 1;
    }
    assert_eq!(per_slot.len(), 10);
    assert!(per_slot.values().all(|&n| n <= 4));
    assert_contents(&a, &[77; 40]);
}

/// Guests "a" and "b" in one domain, filled with `seeds_a` and `seeds_b`, in an engine with
/// a VMA budget of `budget`.
fn pair_with_budget(seeds_a: &[u64], seeds_b: &[u64], budget: u64) -> (Engine, Arc<Mem>, Arc<Mem>) {
    let a = memory(seeds_a.len());
    let b = memory(seeds_b.len());
    fill_all(&a, seeds_a);
    fill_all(&b, seeds_b);
    let mut cfg = fast_config();
    cfg.set("vma_budget", &budget.to_string()).unwrap();
    let (engine, _) = engine_with(cfg, &[("a", "d", a.clone()), ("b", "d", b.clone())]);
    (engine, a, b)
}

#[test]
fn vma_budget_is_never_exceeded() {
    let _serial = serial();
    // Isolated duplicates (every other page) cost VMAs; zero pages cost none.
    let pages = 600;
    let seeds: Vec<u64> = (0..pages as u64)
        .map(|i| match i % 4 {
            0 => 10 + i,
            1 => 5000 + i,
            2 => 0,
            _ => 9000 + i,
        })
        .collect();
    let seeds_b: Vec<u64> = seeds
        .iter()
        .map(|&s| if s >= 5000 { s + 100_000 } else { s })
        .collect();
    let budget = 40;
    let (engine, a, b) = pair_with_budget(&seeds, &seeds_b, budget);
    for _ in 0..3 {
        let s = engine.scan_pass().unwrap();
        assert!(s.vmas_used <= budget, "{} VMAs used", s.vmas_used);
    }
    let s = engine.stats();
    let real = guest_vmas(&[&a, &b]);
    assert!(real <= budget, "{real} VMAs in guest memory");
    assert!(s.vma_budget_reached);
    assert!(s.failures.vma_budget > 0);
    assert_eq!(s.vma_budget, budget);
    assert_eq!(
        s.zero_pages,
        2 * pages as u64 / 4,
        "zero pages continue past the budget"
    );
    assert!(s.pages_sharing > 0 && s.pages_sharing < pages as u64 / 4);
    assert_contents(&a, &seeds);
    assert_contents(&b, &seeds_b);
}

#[test]
fn vma_budget_counts_again_instead_of_refusing_on_charges() {
    let _serial = serial();
    // Guest b holds guest a's pages swapped in pairs: each of b's pages is a remap of its own,
    // next to another merged page, so it adds one VMA while the budget charges two. The
    // charges of one pass pass the budget; the VMAs it ends with stay under its tight mark.
    let pages = 512;
    let seeds: Vec<u64> = (0..pages as u64).map(|i| 40_000 + i).collect();
    let swapped: Vec<u64> = (0..pages).map(|i| seeds[i ^ 1]).collect();
    let budget = 700;
    let (engine, a, b) = pair_with_budget(&seeds, &swapped, budget);
    // Two passes in steps of 32 pages: the first looks, the second merges.
    for _ in 0..2 {
        while !engine.step(32).unwrap() {}
    }
    let s = engine.stats();
    assert_eq!(s.failures.vma_budget, 0, "refused on charges: {s:?}");
    assert_eq!(s.pages_sharing, pages as u64, "{s:?}");
    let real = guest_vmas(&[&a, &b]);
    assert!(
        real > budget / 2,
        "{real} VMAs: the layout costs one per page of b"
    );
    assert!(
        real <= budget && s.vmas_used <= budget,
        "{real} / {}",
        s.vmas_used
    );
    assert_contents(&a, &seeds);
    assert_contents(&b, &swapped);
}

/// Blocks of 64 pages: a run of 32 pages that guest b shares with a at the same offsets, then
/// 16 shared pages each between two unique ones (`unique` tells a's from b's).
fn blocks(count: u64, unique: u64) -> Vec<u64> {
    (0..count)
        .flat_map(|blk| {
            (0..64u64).map(move |i| {
                let seed = 1_000 + blk * 64 + i;
                if i < 32 || i % 2 == 0 {
                    seed
                } else {
                    seed + unique
                }
            })
        })
        .collect()
}

#[test]
fn a_short_vma_budget_goes_to_the_longest_runs_first() {
    let _serial = serial();
    // Every block offers 32 pages for two remaps in one run, and 16 pages for 32 remaps in
    // single pages; the budget holds about a tenth of all the remaps. Merging in address
    // order spends it on whatever comes first; longest first, it goes to the runs.
    let count = 32;
    let (seeds_a, seeds_b) = (blocks(count, 100_000), blocks(count, 200_000));
    let budget = 300;
    let (engine, a, b) = pair_with_budget(&seeds_a, &seeds_b, budget);
    // Passes in steps of 64 pages: the first looks, the others merge.
    for _ in 0..4 {
        while !engine.step(64).unwrap() {}
    }
    let s = engine.stats();
    assert!(
        s.vmas_used <= budget && guest_vmas(&[&a, &b]) <= budget,
        "{s:?}"
    );
    assert!(
        s.failures.vma_budget > 0,
        "the budget held merges back: {s:?}"
    );
    let runs = 32 * count;
    // Single pages fit in the room the runs leave, not much more.
    assert!(
        s.pages_sharing >= runs * 7 / 8 && s.pages_sharing <= runs + 16 * count / 4,
        "{} pages of b merged, {runs} of them in runs: {s:?}",
        s.pages_sharing
    );
    assert_contents(&a, &seeds_a);
    assert_contents(&b, &seeds_b);
}

#[test]
fn a_merge_too_big_for_the_budget_is_made_in_part() {
    let _serial = serial();
    // Eight guests hold the same 32-page block: its slots' eight runs need 16 VMAs together,
    // the budget leaves room for 10. The block is merged in part (its donor's run and the
    // longest others that fit), not refused whole. (Guests 0 and 1 also share 4 pages.)
    let mems: Vec<Arc<Mem>> = (0..8).map(|_| memory(64)).collect();
    let seeds: Vec<Vec<u64>> = (0..8u64)
        .map(|g| {
            (0..64u64)
                .map(|i| match i {
                    0..32 => 500 + i,
                    40..44 if g < 2 => 900 + i,
                    _ => 10_000 * (g + 1) + i,
                })
                .collect()
        })
        .collect();
    for (m, s) in mems.iter().zip(&seeds) {
        fill_all(m, s);
    }
    let mut cfg = fast_config();
    cfg.set("vma_budget", "18").unwrap();
    let names: Vec<String> = (0..8).map(|g| format!("g{g}")).collect();
    let guests: Vec<(&str, &str, Arc<Mem>)> = names
        .iter()
        .zip(&mems)
        .map(|(n, m)| (n.as_str(), "d", m.clone()))
        .collect();
    let (engine, _) = engine_with(cfg, &guests);
    for _ in 0..3 {
        engine.scan_pass().unwrap();
    }
    let s = engine.stats();
    assert!(s.pages_sharing >= 2 * 32, "{s:?}");
    let all: Vec<&Mem> = mems.iter().map(|m| &**m).collect();
    assert!(s.vmas_used <= 18 && guest_vmas(&all) <= 18, "{s:?}");
    for (m, s) in mems.iter().zip(&seeds) {
        assert_contents(m, s);
    }
}

#[test]
fn merge_across_nodes_off_keeps_nodes_apart() {
    let pages = 64;
    let a = memory(pages);
    let b = memory(pages);
    // Seven contents over alternating nodes: every content has copies on both nodes.
    let seeds: Vec<u64> = (0..pages as u64).map(|i| 300 + i % 7).collect();
    fill_all(&a, &seeds);
    fill_all(&b, &seeds);
    let topo = Arc::new(FakeTopology::new(2, PAGE));
    for across in [false, true] {
        let mut cfg = fast_config();
        cfg.set("merge_across_nodes", if across { "1" } else { "0" })
            .unwrap();
        let engine = Engine::with_topology(cfg, topo.clone()).unwrap();
        let ids = [
            engine
                .register(GuestConfig::new("a", "d"), a.clone())
                .unwrap(),
            engine
                .register(GuestConfig::new("b", "d"), b.clone())
                .unwrap(),
        ];
        engine.scan_pass().unwrap();
        let s = engine.scan_pass().unwrap();
        let mut nodes_of_slot: HashMap<(u8, u32), Vec<u8>> = HashMap::new();
        for (id, mem) in [(ids[0], &a), (ids[1], &b)] {
            for p in engine.merged_pages(id).unwrap() {
                let node = topo.node_of(page_ptr(mem, (p.gpa.0 as usize) / PAGE) as usize);
                nodes_of_slot.entry(p.slot.unwrap()).or_default().push(node);
            }
        }
        let mixed = nodes_of_slot
            .iter()
            .filter(|(_, n)| n.iter().any(|&x| x != n[0]))
            .count();
        if across {
            assert_eq!(s.pages_shared, 7);
            assert!(mixed > 0);
        } else {
            assert_eq!(mixed, 0, "a copy is shared across nodes");
            assert_eq!(s.pages_shared, 14);
            for ((node, _), n) in &nodes_of_slot {
                assert!(n.iter().all(|x| x == node), "copy lives on its pages' node");
            }
        }
        assert_eq!(s.pages_sharing, 2 * pages as u64 - s.pages_shared);
        engine.unmerge_all().unwrap();
        assert_contents(&a, &seeds);
        assert_contents(&b, &seeds);
    }
}

#[test]
fn vmas_made_by_discards_count_against_the_budget() {
    let _serial = serial();
    let seeds: Vec<u64> = (1..=64).collect();
    let (a, b, c) = (memory(64), memory(64), memory(64));
    fill_all(&a, &seeds);
    fill_all(&b, &seeds);
    let (engine, ids) = engine_of(&[&a, &b, &c]);
    engine.scan_pass().unwrap();
    let s = engine.scan_pass().unwrap();
    assert_eq!(s.pages_sharing, 64);
    engine
        .set_knob("vma_budget", &(s.vmas_used + 12).to_string())
        .unwrap();
    // A balloon takes every other page of a's first half: each splits a's merged run.
    for p in (1..40).step_by(2) {
        engine
            .discard(ids[0], page_gpa(&a, p), PAGE as u64)
            .unwrap();
    }
    let after_discards = guest_vmas(&[&a, &b, &c]);
    let s = engine.stats();
    assert!(
        s.vmas_used >= after_discards && after_discards > s.vma_budget,
        "the budget knows of the discards' {after_discards} VMAs: {s:?}"
    );
    // Five isolated pages of c could join existing slots, but the budget is spent.
    for p in [0, 8, 16, 24, 32] {
        fill(&c, p, 50 + p as u64 / 8);
    }
    engine.scan_pass().unwrap();
    let s = engine.scan_pass().unwrap();
    assert!(s.failures.vma_budget > 0, "{s:?}");
    assert_eq!(s.guests[2].pages_sharing, 0);
    assert!(guest_vmas(&[&a, &b, &c]) <= after_discards);
    for p in (1..40).step_by(2) {
        assert!(read(&a, p).iter().all(|&x| x == 0), "discarded page {p}");
    }
}

/// A topology whose answers the test changes: pages move between two nodes.
#[derive(Debug, Default)]
struct Moving(std::sync::Mutex<HashMap<usize, u8>>);

impl vm_dedup::Topology for Moving {
    fn node_count(&self) -> usize {
        2
    }

    fn nodes_of(
        &self,
        addrs: &[usize],
        out: &mut [u8],
    ) -> Result<(), vm_dedup::numa::TopologyError> {
        let m = self.0.lock().unwrap();
        for (o, a) in out.iter_mut().zip(addrs) {
            *o = m.get(a).copied().unwrap_or(0);
        }
        Ok(())
    }

    fn bind(&self, _: u8, _: usize, _: usize) -> Result<(), vm_dedup::numa::TopologyError> {
        Ok(())
    }
}

#[test]
fn merge_across_nodes_off_checks_the_partners_node_now() {
    // Page 0 is indexed while on node 0, then the kernel moves it to node 1 and page 1 (same
    // content) to node 0: they must not share a slot.
    let topo = Arc::new(Moving::default());
    let mem = memory(2);
    fill_all(&mem, &[7, 7]);
    let (p0, p1) = (page_ptr(&mem, 0) as usize, page_ptr(&mem, 1) as usize);
    topo.0.lock().unwrap().insert(p1, 1);
    let mut cfg = fast_config();
    cfg.set("merge_across_nodes", "0").unwrap();
    let engine = Engine::with_topology(cfg, topo.clone()).unwrap();
    let id = engine
        .register(GuestConfig::new("g", "d"), mem.clone())
        .unwrap();
    engine.scan_pass().unwrap();
    assert!(!engine.step(1).unwrap(), "page 0 indexed on node 0");
    {
        let mut m = topo.0.lock().unwrap();
        m.insert(p0, 1);
        m.insert(p1, 0);
    }
    while !engine.step(1).unwrap() {}
    assert!(engine.merged_pages(id).unwrap().is_empty());
    // Once both are seen on one node, they merge there.
    topo.0.lock().unwrap().insert(p0, 0);
    engine.scan_pass().unwrap();
    engine.scan_pass().unwrap();
    assert_eq!(engine.merged_pages(id).unwrap().len(), 2);
    assert_contents(&mem, &[7, 7]);
}
