//! Concurrent writers: threads write sequence numbers into pages while the engine merges as
//! fast as it can; at the end every page holds its last write. At least 100,000 merge attempts,
//! no lost write.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;

const PAGES: usize = 4096;
const WRITERS: usize = 2;
const TARGET_ATTEMPTS: u64 = 100_000;

/// Every page is the same except its first word: 0 (mergeable) or a sequence number.
fn base() -> Vec<u8> {
    content(42)
}

#[test]
fn concurrent_writers_lose_nothing() {
    let mem = memory(PAGES);
    for p in 0..PAGES {
        fill(&mem, p, 42);
        // SAFETY: the test's own guest memory.
        unsafe { (page_ptr(&mem, p) as *mut u64).write_volatile(0) };
    }
    let mut cfg = fast_config();
    cfg.set("batch_pages", "64").unwrap();
    let (engine, _) = engine_with(cfg, &[("stress", "d", mem.clone())]);
    let stop = Arc::new(AtomicBool::new(false));
    let addrs: Vec<usize> = (0..PAGES).map(|p| page_ptr(&mem, p) as usize).collect();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let stop = stop.clone();
            let addrs = addrs.clone();
            std::thread::spawn(move || {
                let mine: Vec<usize> = (w..PAGES).step_by(WRITERS).collect();
                let mut last = vec![0u64; PAGES];
                let mut seq = (w as u64 + 1) << 40;
                let mut x = 0x2545_F491_4F6C_DD1Du64 ^ w as u64;
                let mut writes = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let p = mine[(x as usize) % mine.len()];
                    // Half the writes make the page mergeable again, half make it unique.
                    let v = if x & 1 == 0 {
                        0
                    } else {
                        seq += 1;
                        seq
                    };
                    // SAFETY: the page belongs to this writer; the memory outlives the thread.
                    unsafe { (addrs[p] as *mut u64).write_volatile(v) };
                    last[p] = v;
                    writes += 1;
                    if writes % 64 == 0 {
                        std::thread::yield_now();
                    }
                }
                (mine, last, writes)
            })
        })
        .collect();

    let mut passes = 0;
    while engine.stats().merge_attempts < TARGET_ATTEMPTS && passes < 10_000 {
        engine.scan_pass().unwrap();
        passes += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let mut lost = 0;
    let mut total_writes = 0;
    let rest = &base()[8..];
    for h in writers {
        let (mine, last, writes) = h.join().unwrap();
        total_writes += writes;
        for p in mine {
            // SAFETY: the test's own guest memory; writers have stopped.
            let v = unsafe { (addrs[p] as *const u64).read_volatile() };
            if v != last[p] || &read(&mem, p)[8..] != rest {
                lost += 1;
            }
        }
    }
    let s = engine.stats();
    eprintln!(
        "passes {passes}, writes {total_writes}, attempts {}, merges {}, guarded writes {}, \
         cow breaks {}, refused {:?}",
        s.merge_attempts, s.merges, s.guarded_writes, s.cow_breaks, s.failures
    );
    assert_eq!(lost, 0, "lost writes");
    assert!(s.merge_attempts >= TARGET_ATTEMPTS);
    assert!(s.merges > 0 && s.cow_breaks > 0);
    // After the writers stop, everything still consistent converges.
    engine.scan_pass().unwrap();
    engine.scan_pass().unwrap();
    for p in 0..PAGES {
        assert_eq!(&read(&mem, p)[8..], rest);
    }
}
