//! The `vmm` command: parses the command line into a [`VmmConfig`] and runs the guests.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{ArgGroup, Parser};
use vmm::config::{self, Boot, DEFAULT_CMDLINE, GuestConfig, VmmConfig};

/// Exit status for usage errors.
const USAGE: u8 = 2;
/// Exit status for runtime errors.
const RUNTIME: u8 = 1;

/// Runs Linux kernels or flat binaries as KVM guests; the serial console is stdin/stdout.
#[derive(Debug, Parser)]
#[command(name = "vmm", version)]
#[command(group(ArgGroup::new("boot").required(true).args(["kernel", "flat"])))]
struct Cli {
    /// Linux kernel to boot: a bzImage or an ELF vmlinux.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initramfs for the kernel.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", requires = "kernel", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Raw binary loaded at --entry and started there in 64-bit mode with identity paging;
    /// every vCPU starts there with rdi = its index and rsi = the vCPU count.
    #[arg(long, value_name = "PATH", requires = "entry")]
    flat: Option<PathBuf>,
    /// Guest-physical load and start address of --flat (at least 0x100000).
    #[arg(long, value_name = "GPA", value_parser = parse_addr, requires = "flat")]
    entry: Option<u64>,
    /// Guest RAM per guest: bytes or a number with K, M, G (whole 4 KiB pages).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "256M")]
    mem: u64,
    /// vCPUs per guest.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u32,
    /// Independent guests in this process; their console lines are prefixed "guestI: ".
    #[arg(long, value_name = "N", default_value_t = 1)]
    guests: u32,
    /// Raw file copied into guest RAM from GPA 0 at start; once for every guest, or repeated
    /// once per guest.
    #[arg(long = "mem-image", value_name = "PATH")]
    mem_images: Vec<PathBuf>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    config::parse_size(s).map_err(|e| e.to_string())
}

fn parse_addr(s: &str) -> Result<u64, String> {
    config::parse_addr(s).map_err(|e| e.to_string())
}

impl Cli {
    fn into_config(self) -> Result<VmmConfig, config::Error> {
        let boot = match (self.kernel, self.flat, self.entry) {
            (Some(kernel), _, _) => Boot::Linux {
                kernel,
                initrd: self.initrd,
                cmdline: self.cmdline,
            },
            (None, Some(image), Some(entry)) => Boot::Flat { image, entry },
            // clap requires --kernel or --flat with --entry.
            (None, _, _) => unreachable!("clap enforces a boot source"),
        };
        let template = GuestConfig {
            name: config::guest_name(0),
            mem: self.mem,
            vcpus: self.vcpus,
            boot,
            mem_image: None,
            track_dirty: false,
        };
        VmmConfig::replicated(&template, self.guests, &self.mem_images)
    }
}

/// clap's error message on one line: its first paragraph (the error and, for missing
/// arguments, their list), without the `error: ` tag.
fn one_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let paragraph: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let joined = paragraph.join(" ");
    joined
        .strip_prefix("error: ")
        .unwrap_or(&joined)
        .to_string()
}

/// Prints one error line and returns the exit status.
fn fail(message: impl std::fmt::Display, status: u8) -> ExitCode {
    eprintln!("vmm: error: {message}");
    ExitCode::from(status)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();

    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            print!("{e}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            return fail(
                format!("{}; run `vmm --help` for usage", one_line(&e)),
                USAGE,
            );
        }
    };
    let config = match cli.into_config() {
        Ok(config) => config,
        Err(e) => return fail(e, USAGE),
    };
    if let Err(e) = vmm::signals::block_termination() {
        return fail(format!("cannot block SIGINT/SIGTERM: {e}"), RUNTIME);
    }
    let vmm = match vmm::Vmm::new(&config) {
        Ok(vmm) => vmm,
        Err(e) => {
            let status = if e.is_usage() { USAGE } else { RUNTIME };
            return fail(e, status);
        }
    };
    if let Err(e) = vmm::signals::spawn_watcher(vmm.stop_handle()) {
        return fail(format!("cannot start the signal thread: {e}"), RUNTIME);
    }
    if let Err(e) = vmm.console_input().spawn_stdin_reader() {
        return fail(
            format!("cannot start the console input thread: {e}"),
            RUNTIME,
        );
    }
    match vmm.run() {
        Ok(status) => ExitCode::from(status),
        Err(e) => fail(e, RUNTIME),
    }
}
