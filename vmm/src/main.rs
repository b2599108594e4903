//! The `vmm` command: parses the command line (module `cli`) into a guest configuration and a
//! services configuration, checks overcommit, and runs the guests with memory merging,
//! statistics and the control API.

mod cli;

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use vmm::hostmem::HostMemory;
use vmm::overcommit;
use vmm::services::Services;

/// Exit status for usage errors.
const USAGE: u8 = 2;
/// Exit status for runtime errors.
const RUNTIME: u8 = 1;

/// How long the VMM waits at exit for its last stderr lines to be taken.
const EXIT_DRAIN: Duration = Duration::from_secs(1);

/// Writes one line to stderr. A stderr that is gone (a closed terminal, a reader that went
/// away) loses the line rather than stopping the VMM (`eprintln!` would panic), and one that
/// is not drained never blocks it ([`vmm::stderr`]).
fn say(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(vmm::stderr::writer(), "vmm: {line}");
}

/// Prints one error line and returns the exit status.
fn fail(message: impl std::fmt::Display, status: u8) -> ExitCode {
    say(format_args!("error: {message}"));
    ExitCode::from(status)
}

fn main() -> ExitCode {
    // Before any thread starts: the engine's per-pass buffers go back to the host when freed.
    vmm::heap::return_large_frees();
    // Before any thread starts too (the stderr thread below included), so that every thread
    // inherits the blocked set and the signal thread alone takes these signals.
    let blocked = match vmm::signals::block_termination() {
        Ok(b) => b,
        Err(e) => return fail(format!("cannot block SIGINT/SIGTERM/SIGHUP: {e}"), RUNTIME),
    };
    let log = vmm::stderr::install();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .target(env_logger::Target::Pipe(Box::new(log)))
        .init();
    // Panic messages too (a panic caught inside the engine, say, is still reported).
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("<unnamed>");
        let trace = std::backtrace::Backtrace::capture();
        let mut err = vmm::stderr::writer();
        let _ = writeln!(err, "thread '{name}' {info}");
        if trace.status() == std::backtrace::BacktraceStatus::Captured {
            let _ = writeln!(err, "{trace}");
        }
    }));
    let status = run(blocked);
    vmm::stderr::drain(EXIT_DRAIN);
    status
}

fn run(blocked: vmm::signals::Blocked) -> ExitCode {
    let plan = match cli::parse(std::env::args_os()) {
        Ok(cli::Parsed::Run(plan)) => plan,
        Ok(cli::Parsed::Print(e)) => {
            // A closed stdout (e.g. `vmm --help | head`) is not an error worth reporting.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(message) => return fail(message, USAGE),
    };
    let committed = plan.vmm.guests.iter().map(|g| g.mem).sum();
    match HostMemory::read() {
        // A guest larger than the host's RAM is refused when the guests are built: one line.
        Ok(host) if plan.vmm.guests.iter().any(|g| g.mem > host.mem_total) => {}
        Ok(host) => match (overcommit::check(committed, &host), plan.overcommit) {
            (None, _) => {}
            (Some(o), overcommit::Policy::Warn) => say(format_args!("warning: {o}")),
            (Some(o), overcommit::Policy::Refuse) => {
                return fail(format!("--overcommit=refuse: {o}"), USAGE);
            }
        },
        Err(e) => log::warn!("overcommit not checked: {e}"),
    }
    let signals =
        match vmm::signals::Watcher::spawn(blocked, Box::new(|l| say(format_args!("{l}")))) {
            Ok(w) => w,
            Err(e) => return fail(format!("cannot start the signal thread: {e}"), RUNTIME),
        };
    let vmm = match vmm::Vmm::new(&plan.vmm) {
        Ok(vmm) => vmm,
        Err(e) => {
            let status = if e.is_usage() { USAGE } else { RUNTIME };
            return fail(e, status);
        }
    };
    // From here a signal stops the guests (at once if they have not started yet), so the
    // services below are stopped and cleaned up as after any run.
    signals.arm(vmm.stop_handle());
    let services =
        match Services::start(&vmm, &plan.services, Box::new(|l| say(format_args!("{l}")))) {
            Ok(s) => s,
            Err(e) => {
                let status = if e.is_usage() { USAGE } else { RUNTIME };
                return fail(e, status);
            }
        };
    if let Err(e) = vmm.console_input().spawn_stdin_reader() {
        return fail(
            format!("cannot start the console input thread: {e}"),
            RUNTIME,
        );
    }
    let ran = vmm.run();
    let stopped = services.stop();
    match (ran, stopped) {
        (Ok(status), Ok(())) => ExitCode::from(status),
        (Err(e), _) => fail(e, RUNTIME),
        (Ok(_), Err(e)) => fail(e, RUNTIME),
    }
}
