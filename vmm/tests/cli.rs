//! The `vmm` command line: exit statuses, one-line errors, clean stops and signals.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use test_guests::{LOAD_ADDRESS, PROBE, RESET, TRIPLE_FAULT};
use vmm_sys_util::tempfile::TempFile;

/// Upper bound for a guest to start or stop; only guards against a hang.
const TIMEOUT: Duration = Duration::from_secs(120);

fn vmm() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
    cmd.stdin(Stdio::null());
    cmd
}

/// `vmm` running the flat binary `guest` (at [`LOAD_ADDRESS`]).
fn vmm_running(guest: &TempFile) -> Command {
    let mut cmd = vmm();
    let entry = format!("{LOAD_ADDRESS:#x}");
    cmd.args([
        "--flat",
        guest.as_path().to_str().unwrap(),
        "--entry",
        &entry,
    ]);
    cmd
}

fn file_with(bytes: &[u8]) -> TempFile {
    let f = TempFile::new().unwrap();
    f.as_file().write_all(bytes).unwrap();
    f
}

fn run(args: &[&str]) -> Output {
    vmm().args(args).output().unwrap()
}

/// Asserts a usage error: status 2 and one stderr line naming `expected`.
fn assert_usage_error(args: &[&str], expected: &str) {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.starts_with("vmm: error: "), "{args:?}: {stderr}");
    assert!(stderr.contains(expected), "{args:?}: {stderr}");
}

#[test]
fn usage_errors_are_one_line_and_exit_2() {
    let flat = ["--flat", "/unused", "--entry", "0x100000"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        flat.iter().chain(extra).copied().collect()
    };
    assert_usage_error(&["--frobnicate"], "--frobnicate");
    assert_usage_error(&[], "--kernel");
    assert_usage_error(&["--flat", "x"], "--entry");
    assert_usage_error(
        &["--kernel", "k", "--flat", "x", "--entry", "0x100000"],
        "cannot be used",
    );
    // Each boot source's own flags are refused with the other, not ignored.
    for (args, flags) in [
        (with(&["--initrd", "/unused"]), ["--initrd", "--flat"]),
        (
            with(&["--cmdline", "console=ttyS0"]),
            ["--cmdline", "--flat"],
        ),
        (
            vec!["--kernel", "/unused", "--entry", "0x100000"],
            ["--entry", "--kernel"],
        ),
    ] {
        for expected in ["cannot be used with", flags[0], flags[1]] {
            assert_usage_error(&args, expected);
        }
    }
    assert_usage_error(&["--initrd", "/unused"], "--kernel");
    assert_usage_error(&["--entry", "0x100000"], "--flat");
    assert_usage_error(&with(&["--mem", "1000"]), "4 KiB pages");
    assert_usage_error(&with(&["--mem", "64Q"]), "64Q");
    assert_usage_error(&with(&["--mem", "1M"]), "too small");
    assert_usage_error(&with(&["--mem", "1T"]), "too large");
    assert_usage_error(&with(&["--vcpus", "0"]), "--vcpus 0");
    assert_usage_error(&with(&["--vcpus", "999"]), "too many");
    assert_usage_error(&with(&["--guests", "0"]), "--guests 0");
    assert_usage_error(
        &with(&["--guests", "3", "--mem-image", "a", "--mem-image", "b"]),
        "once per guest",
    );
    assert_usage_error(
        &with(&["--guests", "3", "--flat", "b"]),
        "--flat given 2 times for 3 guests",
    );
    assert_usage_error(&with(&["--ksm", "--dedup"]), "cannot be used with");
    assert_usage_error(&with(&["--dedup-opt", "run=1"]), "--dedup");
    assert_usage_error(
        &with(&["--dedup", "--dedup-opt", "pages_to_scan=x"]),
        "--dedup-opt: bad value \"x\" for pages_to_scan",
    );
    assert_usage_error(
        &with(&["--dedup", "--dedup-opt", "frob=1"]),
        "unknown knob \"frob\"",
    );
    assert_usage_error(
        &with(&[
            "--dedup",
            "--dedup-opt",
            "pressure_low_percent=50,pressure_high_percent=10",
        ]),
        "pressure_low_percent must be below",
    );
    assert_usage_error(&with(&["--dedup", "--dedup-tune", "fast"]), "fast");
    assert_usage_error(
        &with(&[
            "--guests",
            "3",
            "--dedup",
            "--dedup-domain",
            "a",
            "--dedup-domain",
            "b",
        ]),
        "--dedup-domain given 2 times for 3 guests",
    );
    assert_usage_error(&with(&["--stats-interval", "1h"]), "ms, s or m");
    assert_usage_error(
        &with(&[
            "--dedup",
            "--dedup-tune",
            "advisor",
            "--dedup-opt",
            "tune=pressure",
        ]),
        "--dedup-tune advisor and --dedup-opt tune=pressure disagree",
    );
    assert_usage_error(&with(&["--overcommit", "maybe"]), "maybe");
    assert_usage_error(&["--flat", "x", "--entry", "0x1000"], "0x100000");
    assert_usage_error(&["--flat", "x", "--entry", "zz"], "zz");
}

#[test]
fn bad_files_are_usage_errors() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let text = file_with(b"#!/bin/sh\necho not a kernel\n");
    let text = text.as_path().to_str().unwrap();
    let probe = file_with(PROBE);
    let probe = probe.as_path().to_str().unwrap();
    let big = file_with(&vec![1u8; 3 << 20]);
    let big = big.as_path().to_str().unwrap();

    assert_usage_error(
        &["--kernel", "/nonexistent/vmlinux"],
        "/nonexistent/vmlinux",
    );
    assert_usage_error(&["--kernel", text], "not a Linux kernel");
    assert_usage_error(
        &["--flat", "/nonexistent/p", "--entry", "0x100000"],
        "/nonexistent/p",
    );
    let image_args = [
        "--flat",
        probe,
        "--entry",
        "0x100000",
        "--mem",
        "2M",
        "--mem-image",
        big,
    ];
    assert_usage_error(&image_args, "larger than the guest's 2M");
    // Guests are built several at once; the error is the first failing guest's, in order.
    let small = file_with(&[1u8; 4096]);
    let small = small.as_path().to_str().unwrap();
    let mut several = vec!["--guests", "4", "--flat", probe, "--entry", "0x100000"];
    several.extend(["--mem", "2M", "--mem-image", small, "--mem-image", big]);
    several.extend(["--mem-image", "/nonexistent/c", "--mem-image", big]);
    let out = run(&several);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("vmm: error: guest1: --mem-image "),
        "{stderr}"
    );
    assert!(stderr.contains("larger than the guest's 2M"), "{stderr}");
    let probe_args = |flag, value| ["--flat", probe, "--entry", "0x100000", flag, value];
    assert_usage_error(&probe_args("--api-sock", text), "is not a socket");
    assert_usage_error(
        &probe_args("--stats-json", "/nonexistent/dir/stats.json"),
        "cannot write --stats-json /nonexistent/dir/stats.json",
    );
    assert_usage_error(
        &["--flat", big, "--entry", "0x100000", "--mem", "2M"],
        "does not fit",
    );
    // A guest larger than the host's RAM: one line, without the overcommit warning first.
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let host_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    if host_kib < 100 << 20 {
        assert_usage_error(
            &[
                "--flat", probe, "--entry", "0x100000", "--mem", "100G", "--guests", "4",
            ],
            "--mem 100G is larger than this host's",
        );
    }
    // A socket, device, link or folder at the --stats-json path is refused and left alone.
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let link = dir.as_path().join("stats.json");
    std::os::unix::fs::symlink("/dev/null", &link).unwrap();
    assert_usage_error(
        &probe_args("--stats-json", link.to_str().unwrap()),
        "is not a regular file",
    );
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // A usage error found after the API is up removes its socket all the same.
    let sock = dir.as_path().join("api.sock");
    let mut args = probe_args("--api-sock", sock.to_str().unwrap()).to_vec();
    args.extend(["--stats-json", "/dev/null"]);
    assert_usage_error(&args, "--stats-json /dev/null");
    assert!(!sock.exists(), "the API's socket was left behind");
}

#[test]
fn help_documents_the_default_trust_domain() {
    let out = run(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{help}");
    let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        flat.contains("default: one domain, \"default\", for the whole process"),
        "{help}"
    );
    assert!(flat.contains("docs/security.md"), "{help}");
}

#[test]
fn reset_and_triple_fault_stop_the_guest_with_status_0() {
    if !vmm_tests::require_kvm() {
        return;
    }
    for (guest, says) in [(RESET, "RESETTING"), (TRIPLE_FAULT, "FAULTING")] {
        let f = file_with(guest);
        let entry = format!("{LOAD_ADDRESS:#x}");
        let out = run(&[
            "--flat",
            f.as_path().to_str().unwrap(),
            "--entry",
            &entry,
            "--mem",
            "16M",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{says}: {stdout}");
        assert!(stdout.contains(says), "{stdout}");
    }
}

#[test]
fn each_guest_runs_its_own_flat_binary() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let (fault, reset) = (file_with(TRIPLE_FAULT), file_with(RESET));
    let entry = format!("{LOAD_ADDRESS:#x}");
    let out = run(&[
        "--guests",
        "2",
        "--flat",
        fault.as_path().to_str().unwrap(),
        "--flat",
        reset.as_path().to_str().unwrap(),
        "--entry",
        &entry,
        "--mem",
        "16M",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.contains(&"guest0: FAULTING"), "{stdout}");
    assert!(lines.contains(&"guest1: RESETTING"), "{stdout}");
    assert!(!stdout.contains("guest0: RESETTING"), "{stdout}");
    assert!(!stdout.contains("guest1: FAULTING"), "{stdout}");
}

#[test]
fn sigterm_stops_every_guest_with_status_0() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let f = file_with(PROBE);
    let mut child = vmm_running(&f)
        .args(["--mem", "16M", "--guests", "2", "--vcpus", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Signal once both guests are up (and so the VMM's signal handling is in place).
    let stdout = child.stdout.take().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let reader = thread::spawn(move || {
        let mut ready = 0;
        for line in BufReader::new(stdout).lines() {
            if line.unwrap().ends_with("PROBE READY vcpus=2") {
                ready += 1;
                if ready == 2 {
                    ready_tx.send(()).unwrap();
                }
            }
        }
    });
    ready_rx
        .recv_timeout(TIMEOUT)
        .expect("guests did not start");
    // SAFETY: kill(2) on our own child's pid with a valid signal number.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = signalled_exit(&mut child, libc::SIGTERM);
    assert_eq!(status.code(), Some(0));
    reader.join().unwrap();
}

/// Waits for `child` to exit after `signal`; kills it and fails if it does not.
fn signalled_exit(child: &mut std::process::Child, signal: libc::c_int) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            panic!("vmm did not stop on signal {signal}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Whether process `pid` has a thread named `name`.
fn has_thread(pid: u32, name: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .any(|comm| comm.trim() == name)
        })
        .unwrap_or(false)
}

#[test]
fn a_signal_ends_a_start_stuck_reading_a_memory_image() {
    if !vmm_tests::require_kvm() {
        return;
    }
    // A pipe nobody writes to: opening it to read the image blocks for good.
    let dir = std::env::temp_dir().join(format!("vmm-cli-fifo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("image");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a valid NUL-terminated path and mode.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let f = file_with(PROBE);
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        let mut child = vmm_running(&f)
            .args(["--mem", "16M", "--mem-image", fifo.to_str().unwrap()])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !has_thread(child.id(), "signals") {
            assert!(start.elapsed() < TIMEOUT, "no signal thread");
            thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let status = signalled_exit(&mut child, signal);
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(0), "{stderr}");
        assert!(
            stderr.contains("while starting: stopped before any guest ran"),
            "{stderr}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_stream_memory_image_longer_than_ram_is_a_usage_error() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let fifo = dir.as_path().join("image");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a valid NUL-terminated path and mode.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let f = file_with(PROBE);
    // RAM not a whole number of the 1 MiB read chunks, and one byte more than it.
    let mem = (2 << 20) + 4096;
    let to = fifo.clone();
    let writer = thread::spawn(move || {
        let mut pipe = std::fs::File::options().write(true).open(to).unwrap();
        // The VMM stops reading a byte past RAM: the rest cannot be written.
        let _ = pipe.write_all(&vec![0xabu8; mem + 1]);
    });
    let args = [
        "--flat",
        f.as_path().to_str().unwrap(),
        "--entry",
        "0x100000",
        "--mem",
        "2052K",
        "--mem-image",
        fifo.to_str().unwrap(),
    ];
    assert_usage_error(&args, "is a stream larger than the guest's");
    writer.join().unwrap();
}

#[test]
fn an_ignored_sighup_stays_ignored_and_a_lost_stderr_stops_nothing() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let f = file_with(PROBE);
    let entry = format!("{LOAD_ADDRESS:#x}");
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let stats = dir.as_path().join("stats.json");
    // As `nohup` starts it: SIGHUP ignored. Its stderr is a pipe nobody reads any more.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("trap '' HUP; exec \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_vmm"))
        .args(["--flat", f.as_path().to_str().unwrap(), "--entry", &entry])
        .args(["--mem", "16M", "--dedup", "--stats-interval", "0"])
        .args(["--stats-json", stats.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let stdout = child.stdout.take().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if line.unwrap().ends_with("PROBE READY vcpus=1") {
                let _ = ready_tx.send(());
            }
        }
    });
    ready_rx.recv_timeout(TIMEOUT).expect("guest did not start");
    let written = |stats: &std::path::Path| std::fs::read_to_string(stats).unwrap_or_default();
    let first = written(&stats);
    assert!(first.contains("\"mode\": \"dedup\""), "{first}");
    std::fs::remove_file(&stats).unwrap();
    // SAFETY: kill(2) on our own child's pid with a valid signal number.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGHUP) }, 0);
    thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "an ignored SIGHUP stopped the vmm"
    );
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = signalled_exit(&mut child, libc::SIGTERM);
    // The final line could not be printed; the final statistics were written all the same.
    assert_eq!(status.code(), Some(0));
    assert!(written(&stats).contains("\"mode\": \"dedup\""));
    reader.join().unwrap();
}

/// A pipe whose buffer is already full, and which nobody reads: its write end, and the read
/// end to keep open (a write blocks rather than failing with EPIPE).
fn full_pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    let made = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
    assert_eq!(made, 0);
    // SAFETY: pipe2 just returned these two descriptors, owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let chunk = [b'#'; 4096];
    // SAFETY: writes from a valid buffer to our own pipe, non-blocking until it is full.
    while unsafe { libc::write(write.as_raw_fd(), chunk.as_ptr().cast(), chunk.len()) } > 0 {}
    // Blocking again, as a terminal paused with Ctrl-S or a pager nobody scrolls.
    // SAFETY: F_SETFL on our own descriptor.
    let blocking = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETFL, 0) };
    assert_eq!(blocking, 0);
    (write, read)
}

#[test]
fn a_stdout_and_stderr_nobody_drains_hold_up_neither_the_guests_nor_the_stop() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let f = file_with(PROBE);
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let stats = dir.as_path().join("stats.json");
    let (write, _read) = full_pipe();
    let mut child = vmm_running(&f)
        .env("RUST_LOG", "debug")
        .args([
            "--mem",
            "16M",
            "--guests",
            "2",
            "--dedup",
            "--stats-interval",
            "1",
        ])
        .args(["--stats-json", stats.to_str().unwrap()])
        .stdout(write.try_clone().unwrap())
        .stderr(write)
        .spawn()
        .unwrap();
    // The guests run and the monitor goes on (it writes the file after its stderr line).
    let passes = |s: &str| -> u64 {
        s.split("\"full_scans\": ")
            .nth(1)
            .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let start = Instant::now();
    while passes(&std::fs::read_to_string(&stats).unwrap_or_default()) < 2 {
        assert!(
            start.elapsed() < TIMEOUT,
            "the vmm made no progress with its output stuck"
        );
        assert!(child.try_wait().unwrap().is_none(), "the vmm exited");
        thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill(2) on our own child's pid with a valid signal number.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    assert_eq!(signalled_exit(&mut child, libc::SIGTERM).code(), Some(0));
}

#[test]
fn a_second_signal_while_stopping_exits_at_once_and_removes_the_api_socket() {
    if !vmm_tests::require_kvm() {
        return;
    }
    let f = file_with(PROBE);
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let sock = dir.as_path().join("api.sock");
    // A stdout nobody drains keeps the stop going for a while (its last flush waits).
    let (write, _read) = full_pipe();
    let mut child = vmm_running(&f)
        .args([
            "--mem",
            "16M",
            "--dedup",
            "--api-sock",
            sock.to_str().unwrap(),
        ])
        .stdout(write)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < TIMEOUT, "no API socket");
        thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child's pid with a valid signal number.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    thread::sleep(Duration::from_millis(300));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = signalled_exit(&mut child, libc::SIGTERM);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("again while stopping"), "{stderr}");
    assert!(!sock.exists(), "the API socket was left behind");
}
