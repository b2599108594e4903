//! The README's main job: `vmm --dedup` on 4 guests whose RAM holds real Debian package files,
//! showing host memory going down while the engine merges.
//!
//! `cargo run --release -p vmm-benches --bin demo [-- --guests 4 --size 512M]` builds what it
//! needs (the release `vmm`; the guest images through the `guest-images` library when missing;
//! one composed memory image per guest), starts
//! `vmm --guests 4 --mem 512M --flat <probe> --entry 0x100000 --mem-image ... --dedup
//! --stats-json ...`, prints the guests' host memory (PSS of the VMM) when they are ready and
//! every second while it converges, then the savings and the time they took, has every guest
//! checksum a sample of its pages (the probe's `C` command) against its image, and stops the
//! VMM.

use std::error::Error;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::process::{Command, ExitCode};
use std::thread;
use std::time::Duration;

use clap::Parser;
use guest_images::units::parse_size;
use vmm_benches::convergence::{Plateau, Sample, savings, time_to_fraction};
use vmm_benches::interrupt::{catch_termination, die_with_parent, interrupted};
use vmm_benches::prepare;
use vmm_benches::probe_vmm::{self, check_pages, probe_args, wait_all_ready};
use vmm_benches::sampler::{Merger, Sampler, read_stats_json};
use vmm_tests::{ProbeGuest, VmmProcess, temp_file_with};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const MIB: f64 = (1u64 << 20) as f64;

fn size_arg(text: &str) -> std::result::Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

/// vmm --dedup on guests holding real package files: memory before, while and after merging.
#[derive(Debug, Parser)]
#[command(name = "demo")]
struct Cli {
    /// Guests.
    #[arg(long, default_value_t = 4)]
    guests: usize,
    /// RAM of each guest (e.g. 512M); its image is composed to this size.
    #[arg(long, default_value = "512M", value_parser = size_arg)]
    size: u64,
    /// Longest wait for memory to settle, in seconds.
    #[arg(long, default_value_t = 40)]
    timeout_secs: u64,
    /// Pages per guest checked against the image after merging.
    #[arg(long, default_value_t = 16)]
    check_pages: usize,
}

/// `/dev/kvm` must be usable; a clear message otherwise.
fn check_kvm() -> Result<()> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| {
            format!(
                "/dev/kvm is not accessible ({e}): the demo runs real KVM guests; load the kvm \
                 module and run it as a user who may open /dev/kvm"
            )
            .into()
        })
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / MIB)
}

fn line(s: &Sample, before: u64, engine_saved: Option<u64>) -> String {
    let mut text = format!(
        "  {:5.1} s  host memory {:>9}  saved {:>9}",
        s.t,
        mib(s.pss),
        mib(savings(before, s.pss).max(0).unsigned_abs())
    );
    if let Some(bytes) = engine_saved {
        let _ = write!(text, "  (engine: {} merged)", mib(bytes));
    }
    text
}

fn run(cli: &Cli) -> Result<()> {
    if cli.guests == 0 || cli.size % 4096 != 0 || cli.size < (16 << 20) {
        return Err(
            "--guests must be at least 1 and --size whole 4 KiB pages, at least 16M".into(),
        );
    }
    check_kvm()?;
    let vmm_bin = prepare::release_vmm()?;
    let images = prepare::compose(cli.guests, cli.size)?;
    let probe = ProbeGuest::new();
    // Removed when the demo ends, however it ends (the VMM replaces it at each interval).
    let stats_file = temp_file_with(&[]);
    let stats_json = stats_file.as_path();
    let stats_arg = stats_json.display().to_string();
    let args = probe_args(
        &probe,
        &images,
        &[
            "--dedup",
            "--stats-json",
            &stats_arg,
            "--stats-interval",
            "1s",
        ],
    );
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    println!("$ vmm {}", shown.join(" "));
    let guest_ram = cli.guests as u64 * cli.size;
    let mut command = Command::new(&vmm_bin);
    command.args(&args);
    die_with_parent(&mut command);
    // From here Ctrl-C ends the demo through the flag, so that the VMM is stopped and the
    // temporary files are removed.
    catch_termination()?;
    let mut vmm = VmmProcess::start(&mut command);
    let ready = wait_all_ready(&mut vmm, cli.guests);
    let mut sampler = Sampler::new(
        vmm.pid(),
        ready,
        None,
        Merger::Engine {
            stats_json: stats_json.to_path_buf(),
        },
    )?;
    let engine_saved = || read_stats_json(stats_json).and_then(|v| v["bytes_saved"].as_u64());
    let first = sampler.sample()?;
    let before = first.pss;
    println!(
        "{} guests x {} ready: {} of guest RAM, {} of it present (zero pages are not loaded); \
         host memory of the guests (PSS of the vmm process) before merging: {}",
        cli.guests,
        mib(cli.size),
        mib(guest_ram),
        mib(images
            .sidecar
            .images
            .iter()
            .map(|i| i.stats.pages - i.stats.zero_pages)
            .sum::<u64>()
            * 4096),
        mib(before)
    );
    let mut samples = vec![first];
    let plateau = Plateau::default();
    let converged = loop {
        // Half-second samples for the plateau rule, a line every second.
        thread::sleep(Duration::from_millis(500));
        if interrupted() {
            return Err("interrupted (SIGINT or SIGTERM)".into());
        }
        let s = sampler.sample()?;
        samples.push(s);
        if samples.len() % 2 == 1 {
            println!("{}", line(&s, before, engine_saved()));
        }
        if plateau.reached(&samples) {
            break true;
        }
        if s.t >= cli.timeout_secs as f64 {
            break false;
        }
    };
    let last = samples.last().copied().unwrap_or(first);
    let saved = savings(before, last.pss);
    let t95 = time_to_fraction(&samples, before, 0.95);
    println!("{}", line(&last, before, engine_saved()));
    println!(
        "saved {} of {} ({:.1}% of guest RAM): host memory {} -> {}; 95% of it within {}, {} \
         after {:.1} s; the vmm used {:.1} CPU-seconds since the guests were ready",
        mib(saved.max(0).unsigned_abs()),
        mib(guest_ram),
        100.0 * saved as f64 / guest_ram as f64,
        mib(before),
        mib(last.pss),
        t95.map_or_else(|| "-".into(), |c| format!("{:.1} s", c.t)),
        if converged {
            "settled"
        } else if saved > 0 {
            "still going down"
        } else {
            "not merged yet"
        },
        last.t,
        last.cpu
    );
    let check = check_pages(&mut vmm, &images, cli.check_pages, 7)?;
    if check.bad.is_empty() {
        println!(
            "verified {} pages ({} per guest) through the guests: each matches its image",
            check.checked,
            check.checked / images.files.len().max(1)
        );
    } else {
        return Err(format!(
            "{} of {} pages read by the guests differ from their images: {:?}",
            check.bad.len(),
            check.checked,
            check.bad
        )
        .into());
    }
    probe_vmm::stop(vmm)?;
    println!("vmm stopped cleanly");
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| writeln!(buf, "demo: {}", record.args()))
        .init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: error: {}", vmm_benches::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
