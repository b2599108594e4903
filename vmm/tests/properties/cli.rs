//! The `vmm` command line's property, shared by `vmm/tests/proptest_cli.rs` and the `cli` fuzz
//! target (both include this file, and compile the binary's parser `vmm/src/cli.rs` as
//! `crate::cli` and `properties/message.rs` as `crate::message`): any argument list gives a
//! valid plan, help or version text, or one line of usage error; never a panic.

use std::ffi::OsString;

use vmm::services::Merging;

use crate::cli;
use crate::message::one_line;

/// Flags worth combining.
pub const FLAGS: &[&str] = &[
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

/// Values worth giving them: limits, units, knobs, names and paths.
pub const WORDS: &[&str] = &[
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

/// Parses `argv` (program name first) as the binary does and panics unless the result keeps
/// the property.
pub fn check(argv: &[OsString]) {
    match cli::parse(argv.to_vec()) {
        Ok(cli::Parsed::Run(plan)) => {
            plan.vmm
                .validate()
                .unwrap_or_else(|e| panic!("{argv:?}: accepted an invalid guest config: {e}"));
            let guests = plan.vmm.guests.len();
            assert!((1..=256).contains(&guests), "{argv:?}: {guests} guests");
            let dedup = matches!(plan.services.merging, Merging::Dedup(_));
            assert!(
                plan.vmm.guests.iter().all(|g| g.track_dirty == dedup),
                "{argv:?}: dirty tracking does not follow --dedup"
            );
            if let Merging::Dedup(c) = &plan.services.merging {
                c.validate(guests)
                    .unwrap_or_else(|e| panic!("{argv:?}: accepted invalid dedup config: {e}"));
            }
        }
        Ok(cli::Parsed::Print(text)) => {
            assert!(!text.to_string().trim().is_empty(), "{argv:?}: empty help");
        }
        Err(message) => one_line(&format!("{argv:?}"), &message),
    }
}
