//! The whole `vmm` command line (the binary's clap parser and its translation into a plan,
//! compiled from `vmm/src/cli.rs`): any argument list gives a valid plan, help or version
//! text, or one line of usage error; never a panic.
#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmm::services::Merging;
use vmm_fuzz::check_message;

#[allow(dead_code)]
#[path = "../../vmm/src/cli.rs"]
mod cli;

const FLAGS: &[&str] = &[
    "--kernel",
    "--initrd",
    "--cmdline",
    "--flat",
    "--entry",
    "--mem",
    "--vcpus",
    "--guests",
    "--mem-image",
    "--dedup",
    "--dedup-opt",
    "--dedup-domain",
    "--dedup-tune",
    "--ksm",
    "--overcommit",
    "--stats-interval",
    "--stats-json",
    "--api-sock",
    "--help",
    "-h",
    "--version",
    "-V",
    "--",
    "-",
];

const WORDS: &[&str] = &[
    "0x100000",
    "1048576",
    "0x8000",
    "0x",
    "64M",
    "2M",
    "1M",
    "4097",
    "1T",
    "0",
    "1",
    "2",
    "254",
    "255",
    "256",
    "257",
    "4294967296",
    "fixed",
    "advisor",
    "pressure",
    "warn",
    "refuse",
    "10s",
    "500ms",
    "2m",
    "pages_to_scan=100",
    "max_page_sharing=1",
    "pressure_low_percent=50,pressure_high_percent=40",
    "tune=advisor,run=2",
    "a",
    "",
    " ",
    "tenant-a",
    "tab\tname",
    "new\nline",
    "/tmp/x",
    "x",
    "-x",
    "--mem=64M",
];

#[derive(Arbitrary, Debug)]
enum Val {
    Word(u8),
    Num(u64),
    Text(String),
}

#[derive(Arbitrary, Debug)]
enum Arg {
    Flag(u8),
    FlagEq(u8, Val),
    Val(Val),
    Raw(Vec<u8>),
}

fn val(v: &Val) -> String {
    match v {
        Val::Word(i) => WORDS[usize::from(*i) % WORDS.len()].to_string(),
        Val::Num(n) => n.to_string(),
        Val::Text(s) => s.clone(),
    }
}

fn arg(a: &Arg) -> OsString {
    match a {
        Arg::Flag(i) => FLAGS[usize::from(*i) % FLAGS.len()].into(),
        Arg::FlagEq(i, v) => format!("{}={}", FLAGS[usize::from(*i) % FLAGS.len()], val(v)).into(),
        Arg::Val(v) => val(v).into(),
        Arg::Raw(b) => OsString::from_vec(b.clone()),
    }
}

fuzz_target!(|args: Vec<Arg>| {
    let argv: Vec<OsString> = std::iter::once(OsString::from("vmm"))
        .chain(args.iter().map(arg))
        .collect();
    match cli::parse(argv.clone()) {
        Ok(cli::Parsed::Run(plan)) => {
            plan.vmm
                .validate()
                .unwrap_or_else(|e| panic!("{argv:?}: accepted an invalid guest config: {e}"));
            let guests = plan.vmm.guests.len();
            assert!((1..=256).contains(&guests), "{argv:?}: {guests} guests");
            let dedup = matches!(plan.services.merging, Merging::Dedup(_));
            assert!(plan.vmm.guests.iter().all(|g| g.track_dirty == dedup));
            if let Merging::Dedup(c) = &plan.services.merging {
                c.validate(guests)
                    .unwrap_or_else(|e| panic!("{argv:?}: accepted invalid dedup config: {e}"));
            }
        }
        Ok(cli::Parsed::Print(text)) => {
            assert!(!text.to_string().trim().is_empty(), "{argv:?}: empty help");
        }
        Err(message) => check_message(&format!("{argv:?}"), &message),
    }
});
