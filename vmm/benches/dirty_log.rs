//! How much scanning the dirty-page source saves (`cargo bench -p vmm --bench dirty_log`).
//!
//! Probe guests (default 2 x 256 MiB, `DIRTY_LOG_GUESTS`, `DIRTY_LOG_MIB`) get content from the
//! host: half of every guest's RAM unique pages, a quarter pages shared by all guests, the rest
//! untouched. The same guests are scanned twice, on fresh VMs: by the engine with the VMM's
//! dirty-page source (KVM dirty log OR vm-memory write bitmap) and by the engine without it.
//! After two passes (everything that can merge has merged), it measures idle passes, then
//! passes after the VMM rewrites 1% of the unique pages between passes. Printed: pages hashed
//! per pass, wall and CPU milliseconds per pass, and the ratios (without / with).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: a failed setup ends it

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use test_guests::{LOAD_ADDRESS, PROBE};
use vm_dedup::{Config, Engine};
use vm_memory::{Bytes, GuestAddress};
use vmm::Vmm;
use vmm::config::{Boot, GuestConfig, VmmConfig, guest_name};
use vmm::dedup::{Dedup, DedupConfig};
use vmm::memory::GuestMem;

const PAGE: usize = 4096;
/// Passes measured per scenario.
const PASSES: usize = 5;
/// Content starts here (the probe and the boot structures are below).
const BASE: u64 = 0x20_0000;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A page of seeded content (splitmix64 words).
fn page(seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
    (0..PAGE / 8)
        .flat_map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)).to_le_bytes()
        })
        .collect()
}

/// Per-pass figures of one scenario.
#[derive(Debug, Clone, Copy, Default)]
struct PassCost {
    hashed: f64,
    wall_ms: f64,
    cpu_ms: f64,
}

fn measure(engine: &Engine, mut between: impl FnMut(usize)) -> PassCost {
    let mut total = PassCost::default();
    for i in 0..PASSES {
        between(i);
        let s0 = engine.stats();
        let t0 = Instant::now();
        engine.scan_pass().unwrap();
        let wall = t0.elapsed();
        let s1 = engine.stats();
        total.hashed += (s1.pages_scanned - s0.pages_scanned) as f64;
        total.wall_ms += wall.as_secs_f64() * 1e3;
        total.cpu_ms += (s1.cpu_ns - s0.cpu_ns) as f64 / 1e6;
    }
    let n = PASSES as f64;
    PassCost {
        hashed: total.hashed / n,
        wall_ms: total.wall_ms / n,
        cpu_ms: total.cpu_ms / n,
    }
}

/// Idle and 1%-written pass costs for fresh guests, with or without the dirty-page source.
fn run(guests: u32, mib: u64, with_dirty_log: bool) -> (PassCost, PassCost) {
    let probe = std::env::temp_dir().join(format!("dirty-log-bench-probe-{}", std::process::id()));
    std::fs::write(&probe, PROBE).unwrap();
    let template = GuestConfig {
        name: guest_name(0),
        mem: mib << 20,
        vcpus: 1,
        boot: Boot::Flat {
            image: probe.clone(),
            entry: LOAD_ADDRESS,
        },
        mem_image: None,
        track_dirty: true,
    };
    let config = VmmConfig::replicated(&template, guests, &[]).unwrap();
    let console: Arc<Mutex<Box<dyn Write + Send>>> =
        Arc::new(Mutex::new(Box::new(std::io::sink())));
    let vmm = Vmm::with_sink(&config, console).unwrap();
    let memories: Vec<Arc<GuestMem>> = vmm
        .guests()
        .iter()
        .map(|g| Arc::clone(g.memory()))
        .collect();

    let content_pages = ((mib << 20) - BASE) as usize / PAGE;
    let unique = content_pages / 2;
    let shared = content_pages / 4;
    for (g, mem) in memories.iter().enumerate() {
        for p in 0..unique {
            let at = BASE + (p * PAGE) as u64;
            mem.write_slice(&page(((g as u64 + 1) << 32) + p as u64), GuestAddress(at))
                .unwrap();
        }
        for p in 0..shared {
            let at = BASE + ((unique + p) * PAGE) as u64;
            mem.write_slice(&page(p as u64), GuestAddress(at)).unwrap();
        }
    }

    let (engine, dedup) = if with_dirty_log {
        let dedup = Dedup::new(&DedupConfig::default(), vmm.guests()).unwrap();
        (dedup.engine().clone(), Some(dedup))
    } else {
        let engine = Engine::new(Config::default()).unwrap();
        for (g, mem) in vmm.guests().iter().zip(&memories) {
            engine
                .register(
                    vm_dedup::GuestConfig::new(g.name(), "default"),
                    Arc::clone(mem),
                )
                .unwrap();
        }
        (engine, None)
    };
    let stop = vmm.stop_handle();
    let running = thread::spawn(move || vmm.run());
    engine.scan_pass().unwrap();
    engine.scan_pass().unwrap();

    let idle = measure(&engine, |_| {});
    let rewrite = (unique / 100).max(1);
    let written = measure(&engine, |pass| {
        for (g, mem) in memories.iter().enumerate() {
            for k in 0..rewrite {
                let p = (k * 100 + pass) % unique;
                let at = BASE + (p * PAGE) as u64;
                let seed = (pass as u64 + 7) << 40 | (g as u64) << 32 | p as u64;
                mem.write_slice(&page(seed), GuestAddress(at)).unwrap();
            }
        }
    });

    stop.stop_all();
    running.join().unwrap().unwrap();
    if let Some(d) = dedup {
        d.shutdown().unwrap();
    }
    drop(engine);
    let _ = std::fs::remove_file(probe);
    (idle, written)
}

fn main() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("skipped: /dev/kvm not accessible");
        return;
    }
    let guests = env("DIRTY_LOG_GUESTS", 2) as u32;
    let mib = env("DIRTY_LOG_MIB", 256);
    eprintln!("dirty_log: {guests} guests x {mib} MiB, {PASSES} passes per scenario");
    let (idle_with, written_with) = run(guests, mib, true);
    eprintln!("dirty_log: with the dirty log done");
    let (idle_without, written_without) = run(guests, mib, false);

    println!("| scenario | dirty log | pages hashed / pass | wall ms / pass | CPU ms / pass |");
    println!("|---|---|---:|---:|---:|");
    for (name, with, without) in [
        ("idle", idle_with, idle_without),
        (
            "1% of unique pages rewritten",
            written_with,
            written_without,
        ),
    ] {
        for (label, c) in [("with", with), ("without", without)] {
            println!(
                "| {name} | {label} | {:.0} | {:.2} | {:.2} |",
                c.hashed, c.wall_ms, c.cpu_ms
            );
        }
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::INFINITY };
    println!(
        "RESULT idle_hashed_with={:.0} idle_hashed_without={:.0} idle_wall_ratio={:.1} \
         written_hashed_with={:.0} written_hashed_without={:.0} written_wall_ratio={:.1}",
        idle_with.hashed,
        idle_without.hashed,
        ratio(idle_without.wall_ms, idle_with.wall_ms),
        written_with.hashed,
        written_without.hashed,
        ratio(written_without.wall_ms, written_with.wall_ms),
    );
}
