//! Scan throughput: page hash candidates on the same memory (the engine uses xxh3-64), the
//! engine's first pass (hashing) with one thread and with all cores, and the phases of a pass
//! that merges. Memory size: `SCAN_MIB` (2048).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use vm_dedup::{Config, Engine, GuestConfig};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const PAGE: usize = 4096;

fn memory(mib: usize, dup_every: u64) -> Arc<GuestMemoryMmap<()>> {
    let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mib << 20)]).unwrap();
    let r = m.iter().next().unwrap();
    // SAFETY: our own fresh mapping of `mib` MiB.
    let bytes = unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), mib << 20) };
    for (i, page) in bytes.chunks_exact_mut(PAGE).enumerate() {
        let id = if dup_every > 0 {
            i as u64 % dup_every
        } else {
            i as u64
        } + 1;
        let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for w in page.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_ne_bytes());
        }
    }
    Arc::new(m)
}

fn word_sum(page: &[u8]) -> u64 {
    let mut acc = [0u64; 4];
    for c in page.chunks_exact(32) {
        for (k, a) in acc.iter_mut().enumerate() {
            let w = u64::from_ne_bytes(c[k * 8..k * 8 + 8].try_into().unwrap());
            *a = a
                .wrapping_add(w)
                .rotate_left(7)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15 | 1);
        }
    }
    acc.iter()
        .fold(0, |h, &a| (h ^ a).wrapping_mul(0xff51_afd7_ed55_8ccd))
}

fn hash_rate(name: &str, bytes: &[u8], f: impl Fn(&[u8]) -> u64) {
    let t = Instant::now();
    let mut x = 0u64;
    for p in bytes.chunks_exact(PAGE) {
        x ^= f(p);
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "hash {name:<10} {:>6.2} GB/s (1 thread) [{x:x}]",
        bytes.len() as f64 / s / 1e9
    );
}

fn config(threads: usize) -> Config {
    let mut c = Config::default();
    c.apply_options(&format!(
        "pages_to_scan=65536,sleep_millisecs=0,threads={threads}"
    ))
    .unwrap();
    c
}

fn main() {
    let mib: usize = std::env::var("SCAN_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let gb = (mib << 20) as f64 / 1e9;
    let mem = memory(mib, 0);
    {
        let r = mem.iter().next().unwrap();
        // SAFETY: our own mapping, read only here.
        let bytes = unsafe { std::slice::from_raw_parts(r.as_ptr(), mib << 20) };
        hash_rate("xxh3_64", bytes, xxhash_rust::xxh3::xxh3_64);
        hash_rate("page_hash", bytes, vm_dedup::hash::page_hash);
        hash_rate("word_sum", bytes, word_sum);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for threads in [1, cores] {
        let engine = Engine::new(config(threads)).unwrap();
        engine
            .register(GuestConfig::new("g", "d"), mem.clone())
            .unwrap();
        let t = Instant::now();
        let s = engine.scan_pass().unwrap();
        let secs = t.elapsed().as_secs_f64();
        println!(
            "engine first pass, {threads} thread(s): {:.2} GB/s ({:.2} GB/s per core), CPU {:.2} s",
            gb / secs,
            gb / secs / threads as f64,
            s.cpu_ns as f64 / 1e9
        );
        let t = Instant::now();
        engine.scan_pass().unwrap();
        println!(
            "engine second pass (all unique, indexing), {threads} thread(s): {:.2} GB/s",
            gb / t.elapsed().as_secs_f64()
        );
    }
    drop(mem);
    // A pass that merges: half the pages are duplicates of 1/64 of the others.
    let mem = memory(mib / 2, 4096);
    let engine = Engine::new(config(0)).unwrap();
    engine
        .register(GuestConfig::new("g", "d"), mem.clone())
        .unwrap();
    engine.scan_pass().unwrap();
    let t = Instant::now();
    let s = engine.scan_pass().unwrap();
    println!(
        "merging pass over {} MiB: {:.2} s, {} merges, phases {:?}",
        mib / 2,
        t.elapsed().as_secs_f64(),
        s.merges,
        s.phases
    );
}
