//! `guest-workload`: fills, verifies and churns memory inside a guest and prints
//! `WORKLOAD RESULT ...` lines (see the library's `report` module).
//!
//! Every operation first fills `--mib` MiB with the seeded content mix and prints an `op=fill`
//! line; `verify` then waits `--wait-secs` (time for the host to merge pages) and checks every page;
//! `churn` rewrites `--fraction` of the pages per second for `--secs` seconds, then checks every
//! page. Exit status: 0 when every check passed, 1 otherwise, 2 for usage errors.

use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use guest_workload::churn::ChurnSchedule;
use guest_workload::content::{ContentMix, ContentPlan, PAGE_SIZE, SplitMix64, key};
use guest_workload::report::ResultLine;

/// Interval between churn rounds.
const CHURN_TICK: Duration = Duration::from_millis(50);

#[derive(Debug, Parser)]
#[command(
    name = "guest-workload",
    version,
    about = "Fill, verify and churn guest memory"
)]
struct Cli {
    #[command(subcommand)]
    op: Op,
}

#[derive(Debug, Subcommand)]
enum Op {
    /// Fill memory with the content mix, then optionally hold it.
    Fill {
        #[command(flatten)]
        content: ContentArgs,
        /// Seconds to keep the memory after filling.
        #[arg(long, default_value_t = 0)]
        hold_secs: u64,
    },
    /// Fill, wait, then check every page.
    Verify {
        #[command(flatten)]
        content: ContentArgs,
        /// Seconds to wait between filling and checking.
        #[arg(long, default_value_t = 0)]
        wait_secs: u64,
    },
    /// Fill, rewrite a fraction of the pages per second, then check every page.
    Churn {
        #[command(flatten)]
        content: ContentArgs,
        /// Fraction of the pages rewritten per second.
        #[arg(long, default_value_t = 0.1)]
        fraction: f64,
        /// Seconds of churn.
        #[arg(long, default_value_t = 5)]
        secs: u64,
    },
}

#[derive(Debug, Args)]
struct ContentArgs {
    /// MiB of memory to fill.
    #[arg(long, default_value_t = 16)]
    mib: u64,
    /// Seed of the shared content and of the page placement.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Instance number: keeps unique pages unique across guests that share a seed.
    #[arg(long, default_value_t = 0)]
    instance: u64,
    /// Fraction of pages with unique content.
    #[arg(long, default_value_t = 0.25)]
    unique: f64,
    /// Fraction of all-zero pages.
    #[arg(long, default_value_t = 0.25)]
    zero: f64,
    /// Distinct contents shared by the duplicate pages.
    #[arg(long, default_value_t = 64)]
    dup_classes: u32,
}

/// What to do after the fill.
#[derive(Debug, Clone, Copy)]
enum After {
    Hold(Duration),
    Verify { wait: Duration },
    Churn { fraction: f64, time: Duration },
}

/// The typed configuration parsed from the command line.
#[derive(Debug)]
struct Config {
    mix: ContentMix,
    mib: u64,
    after: After,
}

impl From<Cli> for Config {
    fn from(cli: Cli) -> Self {
        let (c, after) = match cli.op {
            Op::Fill { content, hold_secs } => {
                (content, After::Hold(Duration::from_secs(hold_secs)))
            }
            Op::Verify { content, wait_secs } => (
                content,
                After::Verify {
                    wait: Duration::from_secs(wait_secs),
                },
            ),
            Op::Churn {
                content,
                fraction,
                secs,
            } => (
                content,
                After::Churn {
                    fraction,
                    time: Duration::from_secs(secs),
                },
            ),
        };
        Self {
            mix: ContentMix {
                seed: c.seed,
                instance: c.instance,
                unique: c.unique,
                zero: c.zero,
                dup_classes: c.dup_classes,
            },
            mib: c.mib,
            after,
        }
    }
}

/// One page of workload memory, page-aligned so that it is one guest page.
#[derive(Clone)]
#[repr(C, align(4096))]
struct Page([u8; PAGE_SIZE]);

/// The filled memory and the generation each page was last written with.
struct Region {
    plan: ContentPlan,
    pages: Vec<Page>,
    generations: Vec<u32>,
}

impl Region {
    /// Allocates and fills the region page by page (every page is written, zero pages too).
    fn fill(plan: ContentPlan) -> Result<Self, String> {
        let n = plan.pages();
        let mut pages: Vec<Page> = Vec::new();
        pages
            .try_reserve_exact(n)
            .map_err(|e| format!("cannot allocate {n} pages: {e}"))?;
        for i in 0..n {
            pages.push(Page([0; PAGE_SIZE]));
            plan.fill_page(i, 0, &mut pages[i].0);
        }
        Ok(Self {
            plan,
            pages,
            generations: vec![0; n],
        })
    }

    /// Rewrites `page` with its next generation.
    fn rewrite(&mut self, page: usize) {
        self.generations[page] += 1;
        let generation = self.generations[page];
        self.plan
            .fill_page(page, generation, &mut self.pages[page].0);
    }

    /// Checks every page; returns the number of bad pages and the first one.
    fn verify(&self) -> (usize, Option<usize>) {
        let mut bad = 0;
        let mut first = None;
        for (i, page) in self.pages.iter().enumerate() {
            if !self.plan.check_page(i, self.generations[i], &page.0) {
                bad += 1;
                first.get_or_insert(i);
            }
        }
        (bad, first)
    }
}

fn print_line(line: ResultLine) {
    println!("{line}");
}

fn verify_line(region: &Region, mib: u64, started: Instant) -> (ResultLine, bool) {
    let (bad, first) = region.verify();
    let mut line = ResultLine::new("verify")
        .field("mib", mib)
        .field("pages", region.pages.len())
        .field("bad_pages", bad);
    if let Some(page) = first {
        line = line.field("first_bad_page", page);
    }
    let line = line
        .field("ms", started.elapsed().as_millis())
        .field("ok", u8::from(bad == 0));
    (line, bad == 0)
}

fn run(config: Config) -> Result<bool, String> {
    let pages = usize::try_from(config.mib * (1 << 20) / PAGE_SIZE as u64)
        .map_err(|_| format!("{} MiB does not fit in memory", config.mib))?;
    let plan = ContentPlan::new(config.mix, pages).map_err(|e| e.to_string())?;
    let counts = plan.counts();
    let started = Instant::now();
    let mut region = Region::fill(plan)?;
    print_line(
        ResultLine::new("fill")
            .field("mib", config.mib)
            .field("pages", pages)
            .field("dup_pages", counts.duplicate)
            .field("dup_classes", counts.dup_classes_used)
            .field("unique_pages", counts.unique)
            .field("zero_pages", counts.zero)
            .field("seed", config.mix.seed)
            .field("instance", config.mix.instance)
            .field("ms", started.elapsed().as_millis())
            .field("ok", 1),
    );
    match config.after {
        After::Hold(time) => {
            thread::sleep(time);
            Ok(true)
        }
        After::Verify { wait } => {
            thread::sleep(wait);
            let (line, ok) = verify_line(&region, config.mib, Instant::now());
            print_line(line);
            Ok(ok)
        }
        After::Churn { fraction, time } => {
            let mut schedule = ChurnSchedule::new(pages, fraction).map_err(|e| e.to_string())?;
            let mut rng = SplitMix64::new(key(&[config.mix.seed, config.mix.instance, 0xc4]));
            let start = Instant::now();
            loop {
                let elapsed = start.elapsed().min(time);
                for _ in 0..schedule.due(elapsed) {
                    if pages > 0 {
                        region.rewrite(rng.below(pages as u64) as usize);
                    }
                }
                if elapsed >= time {
                    break;
                }
                thread::sleep(CHURN_TICK.min(time - elapsed));
            }
            print_line(
                ResultLine::new("churn")
                    .field("mib", config.mib)
                    .field("pages", pages)
                    .field("fraction", fraction)
                    .field("secs", time.as_secs())
                    .field("pages_written", schedule.written())
                    .field("ms", start.elapsed().as_millis())
                    .field("ok", 1),
            );
            let (line, ok) = verify_line(&region, config.mib, Instant::now());
            print_line(line);
            Ok(ok)
        }
    }
}

fn main() -> ExitCode {
    let config = Config::from(Cli::parse());
    match run(config) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("guest-workload: {e}");
            ExitCode::FAILURE
        }
    }
}
