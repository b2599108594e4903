//! Merge decisions against the reference model as property tests (the `merge_model` and
//! `merge_engine` fuzz targets' properties; see docs/fuzzing.md). The planner (run by
//! `model::simulate`) and the real engine (with a pretend NUMA topology, forced hash
//! collisions and injected failures) never merge what the model forbids: different content,
//! non-zero pages across trust domains, pages across nodes with merge_across_nodes=0, more
//! than max_page_sharing sharers, a non-zero page onto the zero page.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{PAGE, content, fill};
use proptest::prelude::*;
use vm_dedup::fault::FAULT_POINTS;
use vm_dedup::model::{self, EngineGuest, ModelPage};
use vm_dedup::plan::Rules;
use vm_dedup::{Config, Engine, FakeTopology, GuestConfig};
use vm_memory::{GuestAddress, GuestMemoryMmap};

fn rules() -> impl Strategy<Value = Rules> {
    (any::<bool>(), any::<bool>(), 2u16..10).prop_map(|(z, n, m)| Rules {
        use_zero_pages: z,
        merge_across_nodes: n,
        max_page_sharing: m,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn planner_never_merges_what_the_model_forbids(
        raw in proptest::collection::vec((0u64..8, 0u16..3, 0u8..3), 1..200),
        rules in rules(),
        hash_mode in 0u8..4,
        passes in 1usize..8,
        writes in proptest::collection::vec((0usize..8, 0usize..200, 0u64..8), 0..12),
    ) {
        let pages: Vec<ModelPage> = raw
            .iter()
            .map(|&(content, domain, node)| ModelPage { content, domain, node })
            .collect();
        let writes: Vec<_> = writes
            .into_iter()
            .map(|(pass, page, c)| (pass % passes, page % pages.len(), c))
            .collect();
        let hash = move |c: u64| match hash_mode {
            0 => c as u32,
            1 => (c % 3) as u32,
            2 => 7,
            _ => (c.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 36) as u32,
        };
        let sim = model::simulate(&pages, &rules, hash, passes, &writes);
        let checked = model::check(&sim.pages, &rules, &sim.mapping, &sim.slot_content);
        prop_assert!(checked.is_ok(), "{:?} with {:?}", checked, rules);
        let best = model::optimal_savings(&sim.pages, &rules);
        let got = model::savings(&sim.mapping);
        prop_assert!(got <= best);
        if hash_mode == 0 && writes.is_empty() && passes >= 3 {
            prop_assert_eq!(got, best, "{:?}", rules);
        }
    }
}

type Mem = GuestMemoryMmap<()>;

#[derive(Debug, Clone)]
enum Step {
    Pass,
    Write(usize, usize, u64),
    Fault(usize, u64, u64),
    Unmerge,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => Just(Step::Pass),
        3 => (0usize..3, 0usize..32, 0u64..5).prop_map(|(g, p, s)| Step::Write(g, p, s)),
        2 => (0usize..64, 0u64..6, 1u64..4).prop_map(|(f, a, t)| Step::Fault(f, a, t)),
        1 => Just(Step::Unmerge),
    ]
}

/// The engine's mapping of every page against the model, contents, and the statistics.
fn check_engine(
    engine: &Engine,
    topo: &FakeTopology,
    rules: &Rules,
    guests: &[(vm_dedup::GuestId, Arc<Mem>, Vec<u64>, u16)],
) {
    let pages: Vec<Vec<(u64, u64)>> = guests
        .iter()
        .map(|(_, _, seeds, _)| {
            (0..seeds.len())
                .map(|p| ((p * PAGE) as u64, seeds[p]))
                .collect()
        })
        .collect();
    let observed: Vec<EngineGuest<'_, Mem>> = guests
        .iter()
        .zip(&pages)
        .map(|((id, mem, _, domain), pages)| EngineGuest {
            id: *id,
            memory: &**mem,
            domain: *domain,
            pages,
        })
        .collect();
    let checked = model::check_engine(engine, topo, rules, &observed, content);
    assert!(checked.is_ok(), "{}", checked.unwrap_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn engine_never_merges_what_the_model_forbids(
        nodes in 1usize..3,
        stripe in 1usize..4,
        rules in rules(),
        collide in any::<bool>(),
        layout in proptest::collection::vec((0u16..3, proptest::collection::vec(0u64..5, 1..32)), 1..4),
        steps in proptest::collection::vec(step(), 1..10),
    ) {
        let topo = FakeTopology::new(nodes, stripe * PAGE);
        let config = Config {
            threads: 1,
            use_zero_pages: rules.use_zero_pages,
            merge_across_nodes: rules.merge_across_nodes,
            max_page_sharing: rules.max_page_sharing,
            ..Config::default()
        };
        let engine = Engine::with_topology(config, Arc::new(topo.clone())).unwrap();
        engine.faults().set_collide_hashes(collide);
        let mut guests = Vec::new();
        for (i, (domain, seeds)) in layout.iter().enumerate() {
            let mem = Arc::new(Mem::from_ranges(&[(GuestAddress(0), seeds.len() * PAGE)]).unwrap());
            for (p, &s) in seeds.iter().enumerate() {
                fill(&mem, p, s);
            }
            let id = engine
                .register(GuestConfig::new(format!("g{i}"), format!("d{domain}")), Arc::clone(&mem))
                .unwrap();
            guests.push((id, mem, seeds.clone(), *domain));
        }
        for s in &steps {
            match *s {
                Step::Pass => {
                    engine.scan_pass().unwrap();
                    check_engine(&engine, &topo, &rules, &guests);
                }
                Step::Write(g, p, seed) => {
                    let n = guests.len();
                    let (_, mem, seeds, _) = &mut guests[g % n];
                    let p = p % seeds.len();
                    fill(mem, p, seed);
                    seeds[p] = seed;
                }
                Step::Fault(f, after, times) => {
                    // Not the points that lose guest memory: the model reads it all.
                    let point = FAULT_POINTS[f % FAULT_POINTS.len()];
                    if !point.loses_memory() {
                        engine.faults().arm(point, after, times);
                    }
                }
                Step::Unmerge => {
                    let _ = engine.unmerge_all();
                    check_engine(&engine, &topo, &rules, &guests);
                }
            }
        }
        engine.faults().disarm_all();
        engine.scan_pass().unwrap();
        check_engine(&engine, &topo, &rules, &guests);
        for (id, ..) in &guests {
            engine.unregister(*id).unwrap();
        }
    }
}
