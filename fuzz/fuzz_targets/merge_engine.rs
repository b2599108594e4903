//! The real engine end to end against the reference model: guests of arbitrary layouts
//! (contents including near twins that differ in one byte, trust domains, one or two regions),
//! knobs, a pretend NUMA topology, forced hash collisions, failures injected at every
//! merge-commit step and pool operation, host writes between passes, and unmerge-all. After
//! every pass the mapping the engine reports (and the pool's bytes) passes
//! `vm_dedup::model::check` (no merge of different content, across domains for non-zero pages,
//! across nodes with merge_across_nodes=0, above max_page_sharing); every guest page reads
//! back what was written; the statistics count what is mapped.
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vm_dedup::fault::FAULT_POINTS;
use vm_dedup::model::{self, EngineGuest};
use vm_dedup::plan::Rules;
use vm_dedup::{Config, Engine, FakeTopology, GuestConfig, GuestId};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_fuzz::{PAGE, content};

type Mem = GuestMemoryMmap<()>;

#[derive(Arbitrary, Debug)]
struct GuestSpec {
    domain: u8,
    regions: Vec<u8>,
    seeds: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
enum Step {
    Pass,
    Write { guest: u8, page: u8, seed: u8 },
    Fault { point: u8, after: u8, times: u8 },
    Disarm,
    Unmerge,
}

#[derive(Arbitrary, Debug)]
struct Input {
    nodes: u8,
    stripe_pages: u8,
    use_zero_pages: bool,
    merge_across_nodes: bool,
    max_page_sharing: u8,
    batch_pages: u16,
    collide: bool,
    /// How many seeds the contents use (small: many duplicates).
    alphabet: u8,
    guests: Vec<GuestSpec>,
    steps: Vec<Step>,
}

struct Guest {
    id: GuestId,
    mem: Arc<Mem>,
    /// (gpa, seed) of every page, in order.
    pages: Vec<(u64, u8)>,
    domain: u16,
}

fn seed_of(raw: u8, alphabet: u8) -> u8 {
    // Seeds 0 (zero), 1.. and their near twins (128 + s).
    let s = raw % alphabet;
    if raw & 0x80 != 0 && s != 0 {
        s | 0x80
    } else {
        s
    }
}

/// Every guest page against the model and the statistics (`vm_dedup::model::check_engine`).
fn check(engine: &Engine, topo: &FakeTopology, rules: &Rules, guests: &[Guest]) {
    let pages: Vec<Vec<(u64, u64)>> = guests
        .iter()
        .map(|g| {
            g.pages
                .iter()
                .map(|&(gpa, seed)| (gpa, u64::from(seed)))
                .collect()
        })
        .collect();
    let observed: Vec<EngineGuest<'_, Mem>> = guests
        .iter()
        .zip(&pages)
        .map(|(g, pages)| EngineGuest {
            id: g.id,
            memory: &*g.mem,
            domain: g.domain,
            pages,
        })
        .collect();
    // Seeds are bytes: a content past 255 is no page of this target's.
    let bytes = |c: u64| u8::try_from(c).map_or_else(|_| vec![0xff; PAGE], content);
    if let Err(e) = model::check_engine(engine, topo, rules, &observed, bytes) {
        panic!("{e}");
    }
}

fuzz_target!(|input: Input| {
    let alphabet = input.alphabet % 8 + 1;
    let topo = FakeTopology::new(
        usize::from(input.nodes % 3) + 1,
        (usize::from(input.stripe_pages % 8) + 1) * PAGE,
    );
    let config = Config {
        threads: 1,
        use_zero_pages: input.use_zero_pages,
        merge_across_nodes: input.merge_across_nodes,
        max_page_sharing: u16::from(input.max_page_sharing % 6) + 2,
        batch_pages: 16 + usize::from(input.batch_pages % 497),
        ..Config::default()
    };
    let rules = Rules {
        use_zero_pages: config.use_zero_pages,
        merge_across_nodes: config.merge_across_nodes,
        max_page_sharing: config.max_page_sharing,
    };
    let engine = Engine::with_topology(config, Arc::new(topo.clone()))
        .unwrap_or_else(|e| panic!("engine: {e}"));
    engine.faults().set_collide_hashes(input.collide);

    let mut guests = Vec::new();
    for (i, spec) in input.guests.iter().take(3).enumerate() {
        let regions: Vec<usize> = spec
            .regions
            .iter()
            .take(2)
            .map(|r| usize::from(r % 24) + 1)
            .collect();
        if regions.is_empty() {
            continue;
        }
        let ranges: Vec<(GuestAddress, usize)> = regions
            .iter()
            .scan(0u64, |at, &n| {
                let start = *at;
                *at += ((n + 16) * PAGE) as u64;
                Some((GuestAddress(start), n * PAGE))
            })
            .collect();
        let mem = Arc::new(Mem::from_ranges(&ranges).unwrap_or_else(|e| panic!("memory: {e}")));
        let mut pages = Vec::new();
        let mut k = 0;
        for &(start, len) in &ranges {
            for p in 0..len / PAGE {
                let gpa = start.0 + (p * PAGE) as u64;
                let seed = seed_of(spec.seeds.get(k).copied().unwrap_or(0), alphabet);
                mem.write_slice(&content(seed), GuestAddress(gpa))
                    .unwrap_or_else(|e| panic!("fill: {e}"));
                pages.push((gpa, seed));
                k += 1;
            }
        }
        let domain = u16::from(spec.domain % 3);
        let id = engine
            .register(
                GuestConfig::new(format!("g{i}"), format!("d{domain}")),
                Arc::clone(&mem),
            )
            .unwrap_or_else(|e| panic!("register: {e}"));
        guests.push(Guest {
            id,
            mem,
            pages,
            domain,
        });
    }
    if guests.is_empty() {
        return;
    }

    for step in input.steps.iter().take(16) {
        match *step {
            Step::Pass => {
                engine
                    .scan_pass()
                    .unwrap_or_else(|e| panic!("scan_pass: {e}"));
                check(&engine, &topo, &rules, &guests);
            }
            Step::Write { guest, page, seed } => {
                let n = guests.len();
                let g = &mut guests[usize::from(guest) % n];
                let p = usize::from(page) % g.pages.len();
                let seed = seed_of(seed, alphabet);
                g.mem
                    .write_slice(&content(seed), GuestAddress(g.pages[p].0))
                    .unwrap_or_else(|e| panic!("write: {e}"));
                g.pages[p].1 = seed;
            }
            Step::Fault {
                point,
                after,
                times,
            } => {
                // Not the points that lose guest memory: the check reads it all.
                let point = FAULT_POINTS[usize::from(point) % FAULT_POINTS.len()];
                if !point.loses_memory() {
                    engine
                        .faults()
                        .arm(point, u64::from(after % 8), u64::from(times % 4) + 1);
                }
            }
            Step::Disarm => engine.faults().disarm_all(),
            Step::Unmerge => {
                // With pool or remap failures armed, unmerging may fail; contents must hold.
                let _ = engine.unmerge_all();
                check(&engine, &topo, &rules, &guests);
            }
        }
    }
    engine.faults().disarm_all();
    engine
        .scan_pass()
        .unwrap_or_else(|e| panic!("scan_pass: {e}"));
    check(&engine, &topo, &rules, &guests);
    for g in &guests {
        engine
            .unregister(g.id)
            .unwrap_or_else(|e| panic!("unregister: {e}"));
    }
});
