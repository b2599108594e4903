//! `guest-images`: builds the guest kernel and initramfs (`build`) and composes guest memory
//! images from real package files (`compose`). See `guest-images/README.md`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use guest_images::build_images::{self, BuildConfig, BuildReport};
use guest_images::compose::{DEFAULT_RESERVED_LOW, Params};
use guest_images::compose_images::{self, ComposeConfig, ComposeReport, DEFAULT_PACKAGES, SIDECAR};
use guest_images::units::{format_size, parse_size};

#[derive(Debug, Parser)]
#[command(name = "guest-images", version, about = "Guest images for the vmm")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build vmlinuz, vmlinux and initramfs.cpio from Debian packages, with manifest.json.
    Build {
        /// Output folder [default: guest-images/out in the workspace].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Use this static guest-workload binary instead of building one.
        #[arg(long)]
        workload_bin: Option<PathBuf>,
    },
    /// Compose raw guest memory images from real package files, with a JSON sidecar of the
    /// expected duplicate, zero and unique pages.
    Compose {
        /// The build's output folder [default: guest-images/out in the workspace].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Folder for the images and compose.json [default: OUT/compose].
        #[arg(long)]
        dest: Option<PathBuf>,
        /// Number of guest images.
        #[arg(long, default_value_t = 4)]
        guests: usize,
        /// Size of each image (whole pages, e.g. 512M, 1G).
        #[arg(long, default_value = "512M", value_parser = size_arg)]
        size: u64,
        /// Fraction of each image's pages (above the reserved 2 MiB) with unique content.
        #[arg(long, default_value_t = 0.1)]
        unique: f64,
        /// Fraction of each image's pages (above the reserved 2 MiB) that are zero.
        #[arg(long, default_value_t = 0.1)]
        zero: f64,
        /// Seed of the per-guest layouts and of the unique content.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Debian packages whose files are composed (comma-separated).
        #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_PACKAGES.iter().map(|p| p.to_string()))]
        packages: Vec<String>,
        /// Write the images even when compose.json says they are up to date.
        #[arg(long)]
        force: bool,
    },
}

fn size_arg(text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

/// The typed configuration of one run.
#[derive(Debug)]
enum Config {
    Build(BuildConfig),
    Compose(ComposeConfig),
}

impl From<Cli> for Config {
    fn from(cli: Cli) -> Self {
        match cli.command {
            Cmd::Build { out, workload_bin } => Config::Build(BuildConfig {
                out: out.unwrap_or_else(guest_images::default_out_dir),
                workspace: guest_images::workspace_root(),
                workload_bin,
            }),
            Cmd::Compose {
                out,
                dest,
                guests,
                size,
                unique,
                zero,
                seed,
                packages,
                force,
            } => {
                let out = out.unwrap_or_else(guest_images::default_out_dir);
                Config::Compose(ComposeConfig {
                    dest: dest.unwrap_or_else(|| out.join("compose")),
                    out,
                    packages,
                    params: Params {
                        guests,
                        image_size: size,
                        unique,
                        zero,
                        seed,
                        reserved_low: DEFAULT_RESERVED_LOW,
                    },
                    force,
                })
            }
        }
    }
}

fn print_build(config: &BuildConfig, report: &BuildReport, started: Instant) {
    let m = &report.manifest;
    if report.up_to_date {
        println!("{}: up to date", config.out.display());
    } else {
        println!(
            "built {} in {:.1} s",
            config.out.display(),
            started.elapsed().as_secs_f64()
        );
    }
    println!("  kernel release {}", m.kernel_release);
    for p in &m.packages {
        println!("  package {} {}", p.name, p.version);
    }
    for o in &m.outputs {
        println!(
            "  {:<15} {:>10}  sha256 {}",
            o.name,
            format_size(o.size),
            o.sha256
        );
    }
}

fn print_compose(config: &ComposeConfig, report: &ComposeReport) {
    let s = &report.sidecar;
    let state = if report.up_to_date {
        "up to date"
    } else {
        "composed"
    };
    println!(
        "{state}: {} x {} images in {} ({SIDECAR} has the figures)",
        s.guests,
        format_size(s.image_size),
        config.dest.display()
    );
    println!(
        "  sources: {} files, {} pages from {} packages and the guest kernel/initramfs",
        s.sources.files,
        s.sources.file_pages,
        s.sources.packages.len()
    );
    println!(
        "  first {} of each image: zeros, not counted (the VMM writes there)",
        format_size(s.reserved_low_bytes)
    );
    println!("  image          pages   file  unique    zero  distinct  dup-within  dup-across");
    for img in &s.images {
        let g = &img.stats;
        println!(
            "  {:<12} {:>7} {:>6} {:>7} {:>7} {:>9} {:>11} {:>11}",
            img.file,
            g.pages,
            g.file_pages,
            g.unique_pages,
            g.zero_pages,
            g.distinct_nonzero,
            g.dup_within_guest,
            g.dup_across_guests
        );
    }
    let t = &s.totals;
    println!(
        "  expected: pages_shared {} pages_sharing {} pages_unshared {} zero_pages {}",
        t.pages_shared, t.pages_sharing, t.pages_unshared, t.zero_pages
    );
    println!(
        "  a full merge saves {} of {} ({:.1}%)",
        format_size(t.bytes_saved),
        format_size(t.pages * s.page_size),
        100.0 * t.pages_saved as f64 / t.pages.max(1) as f64
    );
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| writeln!(buf, "guest-images: {}", record.args()))
        .init();
    let config = Config::from(Cli::parse());
    if let Config::Compose(c) = &config
        && let Err(e) = c.params.body_pages()
    {
        eprintln!("guest-images: error: {e}");
        return ExitCode::from(2);
    }
    let started = Instant::now();
    let result: Result<(), Box<dyn std::error::Error>> = match &config {
        Config::Build(c) => build_images::build(c)
            .map(|r| print_build(c, &r, started))
            .map_err(Into::into),
        Config::Compose(c) => compose_images::compose_images(c)
            .map(|r| print_compose(c, &r))
            .map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("guest-images: error: {e}");
            let mut cause = e.source();
            while let Some(c) = cause {
                eprintln!("  caused by: {c}");
                cause = c.source();
            }
            ExitCode::FAILURE
        }
    }
}
