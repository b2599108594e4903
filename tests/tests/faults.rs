//! Faults through the `vmm` binary, with real causes set up on the child process only:
//!
//! - EMFILE: `RLIMIT_NOFILE` lowered (prlimit) to the descriptors the VMM holds, so the pool's
//!   `memfd_create` fails;
//! - EFBIG: `RLIMIT_FSIZE` of 1 MiB with SIGXFSZ ignored, so the pool file cannot grow;
//! - EPERM: a seccomp filter denying `memfd_create` (as some sandboxes do);
//! - ENOMEM at the real `vm.max_map_count`: `vma_budget` set beyond what the process may map,
//!   so remaps run into the kernel's limit (no global setting is changed).
//!
//! In each, the guests keep running and answering, read back exactly their content, the engine
//! keeps merging what it still can (zero pages), the cause shows in the statistics (`degraded`,
//! `degraded_reasons`, `failures`, `pool_errors`, `pool_error`) and in the log, and where the
//! cause can be lifted the engine recovers by itself.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test

use std::os::unix::process::CommandExt;
use std::process::Command;

use serde_json::Value;
use test_guests::{filled_page_checksum, page_checksum};
use vmm_sys_util::tempdir::TempDir;
use vmm_tests::{
    ApiClient, DedupImages, Kinds, ProbeGuest, ProbeProtocol, Stream, VmmProcess, field, settled,
    temp_file_with,
};

const GUESTS: [&str; 2] = ["guest0", "guest1"];
const KINDS: Kinds = Kinds {
    dup: 0,
    shared: 16,
    unique: 16,
    zero: 0,
};
/// Where the guests write duplicates and zero pages during the fault.
const FILL_BASE: u64 = 0x60_0000;
const DUPS: u64 = 24;
const ZEROS: u64 = 16;

/// How a fault is set up on the `vmm` child.
struct Fault {
    /// Run in the child before exec (async-signal-safe calls only).
    pre_exec: Option<fn() -> std::io::Result<()>>,
    /// Applied to the running child once the engine has settled.
    now: Option<fn(&VmmProcess)>,
    /// Lifts the fault again (then the engine must recover).
    lift: Option<fn(&VmmProcess)>,
    /// What the pool error says.
    cause: &'static str,
}

/// Sets the soft limit of `resource` of process `pid` (its hard limit stays).
fn prlimit(pid: u32, resource: libc::__rlimit_resource_t, value: u64) {
    let mut old = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit64 on our own child, reading its limit into `old`.
    let rc = unsafe { libc::prlimit64(pid as libc::pid_t, resource, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let new = libc::rlimit64 {
        rlim_cur: value.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: prlimit64 on our own child with a valid limit and no old-value pointer.
    let rc = unsafe { libc::prlimit64(pid as libc::pid_t, resource, &new, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// Descriptor numbers open in process `pid`.
fn open_fds(pid: u32) -> Vec<u64> {
    let mut fds: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    fds
}

/// Lowers the child's `RLIMIT_NOFILE` to its lowest free descriptor number: every descriptor
/// it holds stays valid, every new one fails with EMFILE. Descriptors opened for a moment
/// (reading /proc at the end of a pass) can hide a free number; the listing is repeated until
/// twenty in a row find no free number below the limit.
fn no_more_files(vmm: &VmmProcess) {
    let pid = vmm.pid();
    let lowest_free = |fds: &[u64]| (0..).find(|n| !fds.contains(n)).unwrap();
    let mut limit = lowest_free(&open_fds(pid));
    prlimit(pid, libc::RLIMIT_NOFILE, limit);
    let mut clean = 0;
    while clean < 20 {
        let free = lowest_free(&open_fds(pid));
        if free < limit {
            limit = free;
            prlimit(pid, libc::RLIMIT_NOFILE, limit);
            clean = 0;
        } else {
            clean += 1;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn files_again(vmm: &VmmProcess) {
    prlimit(vmm.pid(), libc::RLIMIT_NOFILE, 1024);
}

fn small_files() -> std::io::Result<()> {
    // SAFETY: async-signal-safe calls in the forked child: ignore SIGXFSZ (a file growing past
    // the limit then fails with EFBIG instead of killing the process) and limit file sizes.
    unsafe {
        if libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR {
            return Err(std::io::Error::last_os_error());
        }
        let limit = libc::rlimit {
            rlim_cur: 1 << 20,
            rlim_max: libc::RLIM_INFINITY,
        };
        if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn big_files(vmm: &VmmProcess) {
    prlimit(vmm.pid(), libc::RLIMIT_FSIZE, libc::RLIM64_INFINITY);
}

/// A seccomp filter: `memfd_create` fails with EPERM, every other system call is allowed.
#[cfg(target_arch = "x86_64")]
fn deny_memfd() -> std::io::Result<()> {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let filter = [
        op(LD_W_ABS, 0, 0, 4), // seccomp_data.arch
        op(JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
        op(LD_W_ABS, 0, 0, 0), // seccomp_data.nr
        op(JEQ_K, 0, 1, libc::SYS_memfd_create as u32),
        op(RET_K, 0, 0, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        op(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with a filter program that lives until the call returns (the kernel copies
    // it); async-signal-safe in the forked child.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The `vmm` child: two probe guests with their images, each in its own trust domain (so
/// nothing is merged, and no pool is needed, until the guests write duplicates).
fn spawn(
    probe: &ProbeGuest,
    images: &[String],
    sock: &std::path::Path,
    pre_exec: Option<fn() -> std::io::Result<()>>,
) -> VmmProcess {
    let mut args = probe.args(
        "16M",
        &[
            "--guests",
            "2",
            "--dedup",
            "--dedup-domain",
            "tenant-a",
            "--dedup-domain",
            "tenant-b",
            "--dedup-opt",
            "sleep_millisecs=10",
            "--stats-interval",
            "100ms",
            "--api-sock",
            sock.to_str().unwrap(),
        ],
    );
    for i in images {
        args.extend(["--mem-image".into(), i.into()]);
    }
    let mut command = Command::new(vmm_tests::vmm_bin());
    command.args(args);
    if let Some(f) = pre_exec {
        // SAFETY: `f` only makes async-signal-safe system calls.
        unsafe {
            command.pre_exec(f);
        }
    }
    VmmProcess::start(&mut command)
}

/// Every image page and every page the guests filled reads back as written, through the guests.
fn guests_read_their_content(vmm: &mut VmmProcess, layout: &DedupImages, filled: bool) {
    for (i, g) in GUESTS.into_iter().enumerate() {
        let mut guest = vmm.probe_of(g);
        for gpa in layout.all() {
            let want = page_checksum(layout.page(i, gpa));
            assert_eq!(guest.checksum(gpa), want, "{g} page {gpa:#x}");
        }
        if filled {
            for p in 0..DUPS + ZEROS {
                let (gpa, value) = fill_of(i, p);
                assert_eq!(
                    guest.checksum(gpa),
                    filled_page_checksum(value),
                    "{g} filled page {gpa:#x}"
                );
            }
        }
    }
}

/// The page `p` of guest `i`'s fill, and its value: duplicates first, then zero pages.
fn fill_of(i: usize, p: u64) -> (u64, u64) {
    let value = if p < DUPS { 0x5eed_0000 + i as u64 } else { 0 };
    (FILL_BASE + p * 4096, value)
}

/// The counters of the last summary line (`vmm: stats: ... zero=N ... degraded=...`).
fn summary_field(line: &str, name: &str) -> Option<String> {
    line.split(' ')
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .map(str::to_string)
}

fn reason_causes(stats: &Value) -> Vec<String> {
    stats["degraded_reasons"]
        .as_array()
        .unwrap_or_else(|| panic!("no degraded_reasons in {stats}"))
        .iter()
        .map(|r| r["cause"].as_str().unwrap().to_string())
        .collect()
}

fn pool_fault(fault: &Fault) {
    let dir = TempDir::new().unwrap();
    let probe = ProbeGuest::new();
    let layout = DedupImages::new(2, KINDS, 77);
    let files: Vec<_> = layout.images.iter().map(|i| temp_file_with(i)).collect();
    let images: Vec<String> = files
        .iter()
        .map(|f| f.as_path().to_str().unwrap().to_string())
        .collect();
    let sock = dir.as_path().join("api.sock");
    let mut vmm = spawn(&probe, &images, &sock, fault.pre_exec);
    vmm.wait_probes_ready(GUESTS);
    let api = ApiClient::ready(&sock);
    let before = settled(&api);
    assert_eq!(field(&before, "pages_shared"), 0, "{before}");
    if let Some(now) = fault.now {
        now(&vmm);
    }

    // The guests write duplicates (which need a pool copy) and zero pages (which do not).
    for (i, g) in GUESTS.into_iter().enumerate() {
        let mut guest = vmm.probe_of(g);
        for p in 0..DUPS + ZEROS {
            let (gpa, value) = fill_of(i, p);
            guest.fill(gpa, value);
        }
    }
    // The cause is logged, and the summary line says degraded while zero pages still merge.
    let logged = vmm.wait_stderr("dedup degraded: pool: ");
    assert!(logged.text.contains(fault.cause), "{}", logged.text);
    let zeros = 2 * ZEROS;
    vmm.wait_for(
        "a summary line: degraded=pool with the zero pages merged",
        |l| {
            l.stream == Stream::Stderr
                && l.text.starts_with("vmm: stats: ")
                && summary_field(&l.text, "degraded").is_some_and(|d| d.contains("pool"))
                && summary_field(&l.text, "zero").and_then(|z| z.parse::<u64>().ok()) >= Some(zeros)
        },
    );
    guests_read_their_content(&mut vmm, &layout, true);

    let Some(lift) = fault.lift else {
        // The cause stays: the statistics say so, and nothing but zero pages was merged.
        let s = api.stats();
        assert_eq!(s["degraded"], true, "{s}");
        assert!(reason_causes(&s).contains(&"pool".to_string()), "{s}");
        assert!(field(&s, "pool_errors") > 0, "{s}");
        assert!(field(&s["failures"], "pool") > 0, "{s}");
        assert!(
            s["pool_error"].as_str().unwrap().contains(fault.cause),
            "{s}"
        );
        assert_eq!(field(&s, "pages_shared"), 0, "{s}");
        assert!(field(&s, "zero_pages") >= zeros, "{s}");
        vmm.send_line("X 0");
        assert_eq!(vmm.exit_code(), 0, "{}", vmm.transcript());
        return;
    };
    // Once the cause is lifted the engine merges the duplicates and is no longer degraded;
    // the cause stays in the cumulative figures.
    lift(&vmm);
    let dups = 2 * (DUPS - 1);
    let s = api.wait_stats("the duplicates merged and the engine healthy", |s| {
        field(s, "pages_sharing") >= dups && s["degraded"] == false
    });
    assert!(field(&s, "pool_errors") > 0, "{s}");
    assert!(
        s["pool_error"].as_str().unwrap().contains(fault.cause),
        "{s}"
    );
    vmm.wait_stderr("dedup no longer degraded: pool");
    guests_read_their_content(&mut vmm, &layout, true);
    vmm.send_line("X 0");
    assert_eq!(vmm.exit_code(), 0, "{}", vmm.transcript());
}

#[test]
fn out_of_file_descriptors_the_pool_cannot_be_created_and_the_guests_run_on() {
    if !vmm_tests::require_kvm() {
        return;
    }
    pool_fault(&Fault {
        pre_exec: None,
        now: Some(no_more_files),
        lift: Some(files_again),
        cause: "Too many open files",
    });
}

#[test]
fn a_pool_that_cannot_grow_leaves_the_guests_running() {
    if !vmm_tests::require_kvm() {
        return;
    }
    pool_fault(&Fault {
        pre_exec: Some(small_files),
        now: None,
        lift: Some(big_files),
        cause: "File too large",
    });
}

#[cfg(target_arch = "x86_64")]
#[test]
fn memfd_creation_denied_leaves_the_engine_degraded_but_alive() {
    if !vmm_tests::require_kvm() {
        return;
    }
    pool_fault(&Fault {
        pre_exec: Some(deny_memfd),
        now: None,
        lift: None,
        cause: "Operation not permitted",
    });
}

/// The content of page `p` (from the start of guest RAM) of the VMA-limit image: every other
/// page above 2 MiB holds one common content, so each merged page is isolated between two
/// pages that are not merged and costs VMAs of its own.
fn alternating_page(p: usize) -> Vec<u8> {
    let words: Vec<u64> = if p % 2 == 0 {
        (0..512).map(|w| 0xd00d_0000_0000 + w).collect()
    } else {
        (0..512).map(|w| ((p as u64) << 20) | w).collect()
    };
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

#[test]
fn remaps_at_the_real_vma_limit_fail_with_enomem_and_the_guest_runs_on() {
    if !vmm_tests::require_kvm() {
        return;
    }
    // Enough isolated merges to need more mappings than vm.max_map_count allows: each costs
    // two (the remapped page and the split-off rest).
    let max_map_count: usize = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let low = 512;
    let pages = low + max_map_count + 16 * 1024;
    if pages > 1 << 18 {
        vmm_tests::skip_for(&format!(
            "vm.max_map_count is {max_map_count}: reaching it would take more than 1 GiB of \
             guest RAM"
        ));
        return;
    }
    let mem_mib = pages.div_ceil(256);
    let mut image = vec![0u8; mem_mib * 256 * 4096];
    for p in low..mem_mib * 256 {
        image[p * 4096..(p + 1) * 4096].copy_from_slice(&alternating_page(p));
    }
    let file = temp_file_with(&image);
    drop(image);
    let dir = TempDir::new().unwrap();
    let sock = dir.as_path().join("api.sock");
    let probe = ProbeGuest::new();
    let mem = format!("{mem_mib}M");
    let mut command = Command::new(vmm_tests::vmm_bin());
    command
        .args(probe.args(
            &mem,
            &[
                "--mem-image",
                file.as_path().to_str().unwrap(),
                "--dedup",
                // An operator's override beyond what the process may map.
                "--dedup-opt",
                "vma_budget=100000000",
                "--stats-interval",
                "500ms",
                "--api-sock",
                sock.to_str().unwrap(),
            ],
        ))
        // The engine warns at every failed remap; the VMM's own lines say it once.
        .env("RUST_LOG", "warn,vm_dedup=error");
    let mut vmm = VmmProcess::start(&mut command);
    vmm.probe().wait_ready();
    let api = ApiClient::ready(&sock);
    let s = api.wait_stats("remaps failing with ENOMEM", |s| {
        field(&s["failures"], "vma_limit") > 0
            && reason_causes(s).contains(&"vma_limit".to_string())
    });
    assert_eq!(s["degraded"], true, "{s}");
    assert!(field(&s, "pages_sharing") > 1000, "{s}");
    vmm.wait_stderr("dedup degraded: vma_limit: ");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", vmm.pid()))
        .unwrap()
        .lines()
        .count();
    assert!(
        maps + 16 >= max_map_count,
        "{maps} mappings of {max_map_count}"
    );

    // The guest reads its content, merged or not (a sample: the emulator is slow), and its
    // writes work: a merged page it writes gets its own copy, and pages it zeroes are dropped
    // to the zero page, which costs no mapping (only pages never merged: a page written after
    // a merge lives in a pool-file mapping, where dropping would bring back the pool's copy).
    let sample: Vec<usize> = (low..low + 64)
        .chain((low..mem_mib * 256).step_by(331))
        .chain(mem_mib * 256 - 64..mem_mib * 256)
        .collect();
    let mut guest = vmm.probe();
    for &p in &sample {
        let want = page_checksum(&alternating_page(p));
        assert_eq!(guest.checksum(p as u64 * 4096), want, "page {p}");
    }
    let written: Vec<u64> = (0..16).map(|k| (low as u64 + 2 * k) * 4096).collect();
    let zeroed: Vec<u64> = (0..32).map(|k| (low as u64 + 2 * k + 1) * 4096).collect();
    for &gpa in &written {
        guest.fill(gpa, 0xfeed);
    }
    for &gpa in &zeroed {
        guest.fill(gpa, 0);
    }
    let before = (field(&s, "zero_pages"), field(&s, "cow_breaks"));
    api.wait_stats("the zeroed pages dropped to the zero page", |s| {
        field(s, "zero_pages") >= before.0 + zeroed.len() as u64
            && field(s, "cow_breaks") >= before.1 + written.len() as u64
    });
    let mut guest = vmm.probe();
    for &gpa in &written {
        assert_eq!(guest.checksum(gpa), filled_page_checksum(0xfeed));
    }
    for &gpa in &zeroed {
        assert_eq!(guest.checksum(gpa), filled_page_checksum(0));
    }

    // Back to the automatic budget: the engine stops asking for mappings the kernel refuses.
    api.set(r#"{"vma_budget": "auto"}"#);
    let s = api.wait_stats("vma_limit to give way to vma_budget", |s| {
        let causes = reason_causes(s);
        causes.contains(&"vma_budget".to_string()) && !causes.contains(&"vma_limit".to_string())
    });
    assert!(field(&s, "vma_budget") < max_map_count as u64, "{s}");
    let mut guest = vmm.probe();
    for &p in sample.iter().step_by(7).filter(|&&p| p >= low + 64) {
        let want = page_checksum(&alternating_page(p));
        assert_eq!(guest.checksum(p as u64 * 4096), want, "page {p}");
    }
    guest.exit(0);
    assert_eq!(vmm.exit_code(), 0, "{}", vmm.transcript());
}
