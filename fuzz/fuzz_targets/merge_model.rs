//! The engine's merge decisions (its real planner, content index and slot table, run by
//! `vm_dedup::model::simulate`) against the reference model, on arbitrary layouts: contents,
//! trust domains, NUMA nodes, knobs (`use_zero_pages`, `merge_across_nodes`,
//! `max_page_sharing`), hash functions from exact to all-colliding, and guest writes between
//! passes. The planner never merges what the model forbids (different content, across domains
//! for non-zero pages, across nodes with merge_across_nodes=0, above max_page_sharing, a
//! non-zero page onto the zero page), never saves more than the optimum, and reaches it when
//! hashes are exact and nothing is written.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vm_dedup::model::{self, ModelPage};
use vm_dedup::plan::Rules;

#[derive(Arbitrary, Debug)]
struct Page {
    content: u8,
    domain: u8,
    node: u8,
}

#[derive(Arbitrary, Debug)]
enum Hash {
    /// Different contents, different hashes.
    Exact,
    /// Contents fall into `n + 1` buckets.
    Buckets(u8),
    /// Every content hashes the same.
    All,
    /// A table from the input.
    Table(Vec<u32>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    pages: Vec<Page>,
    contents: u8,
    domains: u8,
    nodes: u8,
    use_zero_pages: bool,
    merge_across_nodes: bool,
    max_page_sharing: u16,
    hash: Hash,
    passes: u8,
    /// (pass, page, content)
    writes: Vec<(u8, u16, u8)>,
}

fuzz_target!(|input: Input| {
    let contents = u64::from(input.contents % 16) + 1;
    let domains = u16::from(input.domains % 4) + 1;
    let nodes = input.nodes % 4 + 1;
    let pages: Vec<ModelPage> = input
        .pages
        .iter()
        .take(512)
        .map(|p| ModelPage {
            content: u64::from(p.content) % contents,
            domain: u16::from(p.domain) % domains,
            node: p.node % nodes,
        })
        .collect();
    if pages.is_empty() {
        return;
    }
    let rules = Rules {
        use_zero_pages: input.use_zero_pages,
        merge_across_nodes: input.merge_across_nodes,
        max_page_sharing: 2 + input.max_page_sharing % 64,
    };
    let passes = usize::from(input.passes % 12) + 1;
    let writes: Vec<(usize, usize, u64)> = input
        .writes
        .iter()
        .take(64)
        .map(|&(pass, page, c)| {
            (
                usize::from(pass) % passes,
                usize::from(page) % pages.len(),
                u64::from(c) % contents,
            )
        })
        .collect();
    let exact = matches!(input.hash, Hash::Exact);
    let hash = |c: u64| -> u32 {
        match &input.hash {
            Hash::Exact => c as u32,
            Hash::Buckets(n) => (c % (u64::from(*n % 8) + 1)) as u32,
            Hash::All => 7,
            Hash::Table(t) if t.is_empty() => 0,
            Hash::Table(t) => t[c as usize % t.len()],
        }
    };
    let sim = model::simulate(&pages, &rules, hash, passes, &writes);
    if let Err(v) = model::check(&sim.pages, &rules, &sim.mapping, &sim.slot_content) {
        panic!("wrong merge: {v:?} with {rules:?}");
    }
    let best = model::optimal_savings(&sim.pages, &rules);
    let got = model::savings(&sim.mapping);
    assert!(got <= best, "saved {got} > optimum {best}");
    // With exact hashes and nothing written, three passes reach the optimum (two looks to be
    // stable, one to merge onto what the second planned).
    if exact && writes.is_empty() && passes >= 3 {
        assert_eq!(
            got, best,
            "not optimal after {passes} passes with {rules:?}"
        );
    }
    if exact {
        assert_eq!(
            sim.refused, 0,
            "exact hashes, yet merges refused on comparison"
        );
    }
});
