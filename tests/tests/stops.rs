//! Clean stops while the engine merges, and unmerging during heavy writing.
//!
//! - `vmm` (the binary) gets SIGTERM or SIGINT while merge batches are in flight (large images
//!   full of duplicates, the fastest knobs, guests writing): it exits with status 0, having
//!   written its final statistics.
//! - In-process (the `vmm` library with host writer threads rewriting guest pages that keep
//!   merging): stopping the guests and the services mid-merge leaves no writer blocked, and
//!   every page holds its last write.
//! - `POST /unmerge` while the guests fill pages in a loop, and `unmerge_all` while host threads
//!   write, lose nothing: every page holds its last write afterwards.
//! - A console reader that goes away (stdout a broken pipe) is warned about once; the guests
//!   keep running and the VMM stops cleanly.
//!
//! Times are printed, never asserted: every wait is only guarded against a hang.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test

mod in_process;

use std::cell::Cell;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use in_process::probe_guest;
use serde_json::Value;
use test_guests::filled_page_checksum;
use vm_memory::{Bytes, GuestAddress};
use vmm::config::VmmConfig;
use vmm::dedup::DedupConfig;
use vmm::dedup::settings::Settings;
use vmm::memory::GuestMem;
use vmm::monitor::MonitorConfig;
use vmm::services::{Merging, Services, ServicesConfig};
use vmm::{StopHandle, Vmm};
use vmm_sys_util::tempdir::TempDir;
use vmm_sys_util::tempfile::TempFile;
use vmm_tests::{
    ApiClient, CONTENT_BASE, CapturedConsole, HANG_GUARD, ProbeGuest, ProbeProtocol, field,
    pattern, temp_file_with, vmm_bin, wait_until,
};

const PAGE: usize = 4096;
/// The fastest merging: no pause between steps, small steps (many batches).
const FAST: &str = "sleep_millisecs=0,pages_to_scan=512";

/// A memory image of `size` bytes whose pages from [`CONTENT_BASE`] cycle through `contents`
/// distinct contents: many duplicates, merged in many batches.
fn dup_image(size: usize, contents: u64) -> TempFile {
    let pages: Vec<Vec<u8>> = (0..contents).map(|i| pattern(i + 7, PAGE)).collect();
    let mut image = vec![0u8; size];
    for (i, page) in image[CONTENT_BASE as usize..]
        .chunks_exact_mut(PAGE)
        .enumerate()
    {
        page.copy_from_slice(&pages[i % pages.len()]);
    }
    temp_file_with(&image)
}

/// `merge_attempts` of a statistics object.
fn attempts(stats: &Value) -> u64 {
    field(stats, "merge_attempts")
}

/// Waits until two statistics read in a row show `merge_attempts` rising: merge batches are
/// in flight.
fn wait_merging(what: &str, mut stats: impl FnMut() -> Value) {
    let last = Cell::new(attempts(&stats()));
    wait_until(
        what,
        || {
            let now = attempts(&stats());
            let rising = now > last.get();
            last.set(now);
            rising
        },
        || format!("merge_attempts stayed at {}", last.get()),
    );
}

/// Sends `signal` to a `vmm` with two probe guests on large images full of duplicates, while
/// merge batches are in flight and the guests write; it must exit with status 0.
fn signal_while_merging(signal: libc::c_int, name: &str) {
    let dir = TempDir::new().unwrap();
    let sock = dir.as_path().join("api.sock");
    let probe = ProbeGuest::new();
    let image = dup_image(128 << 20, 256);
    let mut vmm = probe.spawn(
        "128M",
        &[
            "--guests",
            "2",
            "--mem-image",
            image.as_path().to_str().unwrap(),
            "--dedup",
            "--dedup-opt",
            FAST,
            "--api-sock",
            sock.to_str().unwrap(),
        ],
    );
    vmm.wait_probes_ready(["guest0", "guest1"]);
    let api = ApiClient::ready(&sock);
    // The guests write pages the engine is merging (no waiting for their replies).
    for round in 0..4u64 {
        for page in 0..64u64 {
            let gpa = CONTENT_BASE + (round * 64 + page) * 3 * PAGE as u64;
            for g in ["guest0", "guest1"] {
                vmm.send_line(&format!("{g}: F {gpa:x} {:x}", 0x5157 + round));
            }
        }
    }
    wait_merging("merge batches in flight", || api.stats());
    let sent = Instant::now();
    vmm.signal(signal);
    let code = vmm.exit_code();
    eprintln!(
        "{name} while merging: exit {code} after {:?}",
        sent.elapsed()
    );
    assert_eq!(code, 0, "{}", vmm.transcript());
    vmm.wait_stderr("stats (final)");
    assert!(
        !sock.exists(),
        "the API socket is removed at exit:\n{}",
        vmm.transcript()
    );
}

#[test]
fn sigterm_while_merging_exits_with_status_0() {
    if !vmm_tests::require_kvm() {
        return;
    }
    signal_while_merging(libc::SIGTERM, "SIGTERM");
}

#[test]
fn sigint_while_merging_exits_with_status_0() {
    if !vmm_tests::require_kvm() {
        return;
    }
    signal_while_merging(libc::SIGINT, "SIGINT");
}

#[test]
fn unmerge_while_the_guests_fill_pages_loses_nothing() {
    if !vmm_tests::require_kvm() {
        return;
    }
    const PAGES: u64 = 48;
    const ROUNDS: u64 = 6;
    const GUESTS: [&str; 2] = ["guest0", "guest1"];
    let gpa = |page: u64| CONTENT_BASE + page * PAGE as u64;
    let value = |round: u64| 0xf111_0000 + round;
    let dir = TempDir::new().unwrap();
    let sock = dir.as_path().join("api.sock");
    let probe = ProbeGuest::new();
    let mut vmm = probe.spawn(
        "16M",
        &[
            "--guests",
            "2",
            "--dedup",
            "--dedup-opt",
            FAST,
            "--api-sock",
            sock.to_str().unwrap(),
        ],
    );
    vmm.wait_probes_ready(GUESTS);
    let api = ApiClient::ready(&sock);

    // Round 0, and its pages merged (equal in both guests).
    for g in GUESTS {
        for p in 0..PAGES {
            vmm.probe_of(g).fill(gpa(p), value(0));
        }
    }
    api.wait_stats("the filled pages to merge", |s| {
        field(s, "pages_sharing") >= 2 * PAGES - 1
    });
    // The other rounds, sent at once: the guests work through them while everything is
    // unmerged.
    for round in 1..ROUNDS {
        for p in 0..PAGES {
            for g in GUESTS {
                vmm.send_line(&format!("{g}: F {:x} {:x}", gpa(p), value(round)));
            }
        }
    }
    let reply = api.request("POST", "/unmerge", None);
    assert_eq!(reply.status, 200, "{}", reply.body);
    for _ in 1..ROUNDS {
        for p in 0..PAGES {
            for g in GUESTS {
                vmm.wait_line(&format!("{g}: OK F {:x}", gpa(p)));
            }
        }
    }
    let last = filled_page_checksum(value(ROUNDS - 1));
    for g in GUESTS {
        for p in 0..PAGES {
            assert_eq!(vmm.probe_of(g).checksum(gpa(p)), last, "{g} page {p}");
        }
    }
    let after = api.stats();
    assert_eq!(field(&after, "pages_sharing"), 0, "{after}");
    assert_eq!(field(&after, "pages_shared"), 0, "{after}");
    for g in GUESTS {
        vmm.probe_of(g).exit(0);
    }
    assert_eq!(vmm.exit_code(), 0, "{}", vmm.transcript());
}

/// Pages each host writer rewrites.
const WRITER_PAGES: u64 = 512;
/// Host writers per guest.
const WRITERS_PER_GUEST: u64 = 2;
/// Where the writers' pages start in guest memory.
const WRITERS_BASE: u64 = 0x100_0000;
/// Pause between two page writes, so that pages stay still long enough to merge.
const WRITE_PAUSE: Duration = Duration::from_micros(300);

/// One writer's result: guest, address and last value of each of its pages.
type LastWrites = Vec<(usize, u64, u64)>;

/// Host threads rewriting guest pages while the engine merges them. Each writer fills its
/// pages in turn with the u64 of its current round, so the pages of a round are equal across
/// writers and guests and merge between two writes; the next write hits a merged page (or one
/// under the merge guard).
struct Writers {
    stop: Arc<AtomicBool>,
    writes: Vec<Arc<AtomicU64>>,
    threads: Vec<JoinHandle<LastWrites>>,
}

impl Writers {
    fn start(memories: &[Arc<GuestMem>]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut writes = Vec::new();
        let mut threads = Vec::new();
        for (guest, memory) in memories.iter().enumerate() {
            for w in 0..WRITERS_PER_GUEST {
                let (memory, stop) = (Arc::clone(memory), Arc::clone(&stop));
                let count = Arc::new(AtomicU64::new(0));
                writes.push(Arc::clone(&count));
                let first = WRITERS_BASE + w * WRITER_PAGES * PAGE as u64;
                threads.push(thread::spawn(move || {
                    let mut last = vec![0u64; WRITER_PAGES as usize];
                    let mut round = 1u64;
                    while !stop.load(Ordering::Acquire) {
                        for (p, last) in last.iter_mut().enumerate() {
                            let value = 0x7772_0000_0000 | round;
                            let page: Vec<u8> =
                                value.to_le_bytes().into_iter().cycle().take(PAGE).collect();
                            let gpa = first + (p * PAGE) as u64;
                            memory.write_slice(&page, GuestAddress(gpa)).unwrap();
                            *last = value;
                            count.fetch_add(1, Ordering::Release);
                            if stop.load(Ordering::Acquire) {
                                break;
                            }
                            thread::sleep(WRITE_PAUSE);
                        }
                        round += 1;
                    }
                    last.iter()
                        .enumerate()
                        .filter(|(_, v)| **v != 0)
                        .map(|(p, v)| (guest, first + (p * PAGE) as u64, *v))
                        .collect()
                }));
            }
        }
        Self {
            stop,
            writes,
            threads,
        }
    }

    fn counts(&self) -> Vec<u64> {
        self.writes
            .iter()
            .map(|c| c.load(Ordering::Acquire))
            .collect()
    }

    /// Waits until every writer has written `more` pages beyond what it had written now: no
    /// writer is blocked.
    fn wait_progress(&self, what: &str, more: u64) {
        let from = self.counts();
        wait_until(
            what,
            || self.counts().iter().zip(&from).all(|(n, f)| *n >= f + more),
            || format!("writes from {from:?} to {:?}", self.counts()),
        );
    }

    /// Stops the writers and returns what each page should hold. Every writer must finish.
    fn finish(self) -> LastWrites {
        self.stop.store(true, Ordering::Release);
        let counts = self.counts();
        wait_until(
            "every writer to finish",
            || self.threads.iter().all(JoinHandle::is_finished),
            || format!("writes {counts:?}"),
        );
        self.threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    }
}

/// Asserts that every page holds its last write.
fn assert_last_writes(memories: &[Arc<GuestMem>], last: &LastWrites) {
    assert_eq!(
        last.len() as u64,
        memories.len() as u64 * WRITERS_PER_GUEST * WRITER_PAGES
    );
    let mut page = vec![0u8; PAGE];
    for &(guest, gpa, value) in last {
        memories[guest]
            .read_slice(&mut page, GuestAddress(gpa))
            .unwrap();
        let bad = page
            .chunks_exact(8)
            .position(|w| u64::from_le_bytes(w.try_into().unwrap()) != value);
        assert_eq!(
            bad, None,
            "guest{guest} page {gpa:#x} lost its last write {value:#x}"
        );
    }
}

/// Two probe guests in this process with `image`, merged by the engine with the fastest knobs.
struct InProcess {
    running: JoinHandle<Result<u8, vmm::Error>>,
    stop: StopHandle,
    services: Services,
    memories: Vec<Arc<GuestMem>>,
    _console: CapturedConsole,
}

impl InProcess {
    fn start(probe: &Path, image: &Path) -> Self {
        let guests = (0..2)
            .map(|i| probe_guest(i, 64 << 20, probe, Some(image)))
            .collect();
        let console = CapturedConsole::default();
        let vmm = Vmm::with_sink(&VmmConfig { guests }, console.sink()).unwrap();
        let mut settings = Settings::default();
        settings.apply_options(FAST).unwrap();
        let config = ServicesConfig {
            merging: Merging::Dedup(DedupConfig {
                settings,
                domains: Vec::new(),
            }),
            monitor: MonitorConfig {
                interval: Duration::ZERO,
                summary: false,
                stats_json: None,
            },
            api_sock: None,
        };
        let services = Services::start(&vmm, &config, Box::new(|_| {})).unwrap();
        let memories = vmm.guests().iter().map(|g| g.memory().clone()).collect();
        let stop = vmm.stop_handle();
        let running = thread::spawn(move || vmm.run());
        for g in ["guest0", "guest1"] {
            console.wait_line(&format!("{g}: PROBE READY vcpus=1"));
        }
        Self {
            running,
            stop,
            services,
            memories,
            _console: console,
        }
    }

    fn stats(&self) -> Value {
        serde_json::to_value(self.services.control().stats()).unwrap()
    }

    /// Waits until the writers' pages keep merging and breaking: merge batches in flight,
    /// copy-on-write breaks counted.
    fn wait_writes_hit_merged_pages(&self) {
        wait_until(
            "writes to merged pages",
            || field(&self.stats(), "cow_breaks") > 0,
            || format!("{}", self.stats()),
        );
        wait_merging("merge batches in flight", || self.stats());
    }

    /// Stops the guests, then the services (scanner, engine), each guarded against a hang.
    fn stop(self) {
        let started = Instant::now();
        self.stop.stop_all();
        wait_until(
            "the guests to stop",
            || self.running.is_finished(),
            String::new,
        );
        assert_eq!(self.running.join().unwrap().unwrap(), 0);
        let services = self.services;
        let stopping = thread::spawn(move || services.stop());
        wait_until(
            "the services to stop",
            || stopping.is_finished(),
            String::new,
        );
        stopping.join().unwrap().unwrap();
        eprintln!("guests and services stopped in {:?}", started.elapsed());
    }
}

#[test]
fn stopping_in_process_while_merging_leaves_no_writer_blocked() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let probe = ProbeGuest::new();
    let image = dup_image(64 << 20, 64);
    let vm = InProcess::start(probe.path(), image.as_path());
    let memories = vm.memories.clone();
    let writers = Writers::start(&memories);
    vm.wait_writes_hit_merged_pages();

    vm.stop();
    // The engine is gone: every writer goes on writing, none is left blocked on a page the
    // engine had write-protected.
    writers.wait_progress("every writer to go on after the stop", 2 * WRITER_PAGES);
    let last = writers.finish();
    assert_last_writes(&memories, &last);
}

#[test]
fn unmerge_all_while_host_threads_write_loses_nothing() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let probe = ProbeGuest::new();
    let image = dup_image(64 << 20, 64);
    let vm = InProcess::start(probe.path(), image.as_path());
    let writers = Writers::start(&vm.memories);
    vm.wait_writes_hit_merged_pages();

    let after = vm.services.control().unmerge_all().unwrap();
    assert_eq!(after.counts.pages_sharing, 0, "{after:?}");
    writers.wait_progress("every writer to go on after unmerging", WRITER_PAGES);
    let last = writers.finish();
    assert_last_writes(&vm.memories, &last);
    let stats = vm.stats();
    assert_eq!(field(&stats, "pages_shared"), 0, "{stats}");
    vm.stop();
}

#[test]
fn the_engine_is_the_only_extra_holder_of_guest_memory() {
    // `Engine::release` (the VMM's exit) turns merged pages back into private ones (a copy of
    // every merged page) when anyone else still holds the guest's memory. When the guests have stopped,
    // the engine must hold the last reference, or every stop pays that copy, in time and in
    // memory, for RAM that is about to be freed.
    if !vmm_tests::require_kvm() {
        return;
    }
    let probe = ProbeGuest::new();
    let guest = probe_guest(0, 16 << 20, probe.path(), None);
    let config = VmmConfig::replicated(&guest, 2, &[]).unwrap();
    let vmm = Vmm::with_sink(&config, CapturedConsole::default().sink()).unwrap();
    let holders = |vmm: &Vmm| -> Vec<usize> {
        vmm.guests()
            .iter()
            .map(|g| Arc::strong_count(g.memory()))
            .collect()
    };
    let before = holders(&vmm);
    let dedup = vmm::dedup::Dedup::new(&DedupConfig::default(), vmm.guests()).unwrap();
    let registered = holders(&vmm);
    for (b, r) in before.iter().zip(&registered) {
        assert_eq!(
            *r,
            b + 1,
            "holders before {before:?}, registered {registered:?}"
        );
    }
    dedup.shutdown().unwrap();
    assert_eq!(holders(&vmm), before);
}

#[test]
fn a_closed_console_reader_is_warned_about_once() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let probe = ProbeGuest::new();
    let mut child = Command::new(vmm_bin())
        .args(probe.args("16M", &[]))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before the guest says anything.
    drop(child.stdout.take());
    let mut stderr = child.stderr.take().unwrap();
    let log = thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).unwrap();
        text
    });
    let mut stdin = child.stdin.take().unwrap();
    // Every command makes the guest print a reply nobody reads; the exit status proves that
    // the guest ran them all.
    for i in 0..50u64 {
        writeln!(stdin, "W {:x} {i:x}", CONTENT_BASE + i * 8).unwrap();
    }
    writeln!(stdin, "X 7").unwrap();
    stdin.flush().unwrap();
    let deadline = Instant::now() + HANG_GUARD;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "vmm did not exit (a hang guard)");
        thread::sleep(Duration::from_millis(10));
    };
    let log = log.join().unwrap();
    assert_eq!(status.code(), Some(7), "{log}");
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("output closed"), "{log}");
}
