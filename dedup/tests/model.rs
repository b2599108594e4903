//! The engine's merge decisions against the reference model, on many random layouts: never a
//! wrong merge (content, domain, node, sharing cap, zero pages), and the optimum reached when
//! nothing is written. Runs the real planner, index and slot table (see `vm_dedup::model`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use vm_dedup::model::{self, ModelPage};
use vm_dedup::plan::Rules;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[test]
fn planner_matches_the_model_on_random_layouts() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for case in 0..400 {
        let n = 1 + rng.below(300) as usize;
        let contents = 1 + rng.below(12);
        let pages: Vec<ModelPage> = (0..n)
            .map(|_| ModelPage {
                content: rng.below(contents),
                domain: rng.below(3) as u16,
                node: rng.below(2) as u8,
            })
            .collect();
        let rules = Rules {
            use_zero_pages: rng.below(2) == 0,
            merge_across_nodes: rng.below(2) == 0,
            max_page_sharing: 2 + rng.below(6) as u16,
        };
        // Hash: exact, colliding into few buckets, or all equal.
        let mode = rng.below(3);
        let hash = move |c: u64| match mode {
            0 => (c.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 36) as u32,
            1 => (c % 3) as u32,
            _ => 7,
        };
        let writes: Vec<(usize, usize, u64)> = if case % 2 == 0 {
            Vec::new()
        } else {
            (0..rng.below(20))
                .map(|_| {
                    (
                        1 + rng.below(4) as usize,
                        rng.below(n as u64) as usize,
                        rng.below(contents),
                    )
                })
                .collect()
        };
        let sim = model::simulate(&pages, &rules, hash, 10, &writes);
        model::check(&sim.pages, &rules, &sim.mapping, &sim.slot_content)
            .unwrap_or_else(|v| panic!("case {case}: {v:?} with {rules:?}"));
        let best = model::optimal_savings(&sim.pages, &rules);
        let got = model::savings(&sim.mapping);
        assert!(got <= best, "case {case}: saved {got} > optimum {best}");
        if writes.is_empty() && mode == 0 {
            assert_eq!(got, best, "case {case}: {rules:?}");
        }
        if writes.is_empty() && mode == 1 {
            // Heavy collisions (3 hash values for up to 12 contents) cost some savings: a
            // colliding page planned onto a copy by hash holds a place until its comparison
            // fails, and a lone partner trusted by hash may leave a copy with one sharer.
            assert!(
                got * 4 >= best * 3,
                "case {case}: saved {got} of {best}, {rules:?}"
            );
        }
    }
}
