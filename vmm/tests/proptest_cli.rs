//! The whole `vmm` command line as a property test (the `cli` fuzz target's property; see
//! docs/fuzzing.md): any argument list gives a valid plan, help or version text, or one line
//! of usage error, never a panic. Compiles the binary's own parser, `vmm/src/cli.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use proptest::prelude::*;
use vmm::services::Merging;

#[allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
#[path = "../src/cli.rs"]
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
    "--version",
    "--",
];

const WORDS: &[&str] = &[
    "0x100000",
    "0x8000",
    "64M",
    "2M",
    "1M",
    "4097",
    "1T",
    "0",
    "1",
    "2",
    "255",
    "256",
    "257",
    "fixed",
    "advisor",
    "warn",
    "refuse",
    "10s",
    "500ms",
    "pages_to_scan=100",
    "max_page_sharing=1",
    "pressure_low_percent=50,pressure_high_percent=40",
    "a",
    "",
    "tenant-a",
    "new\nline",
    "/tmp/x",
];

fn arg() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(FLAGS).prop_map(str::to_string),
        4 => proptest::sample::select(WORDS).prop_map(str::to_string),
        1 => (proptest::sample::select(FLAGS), proptest::sample::select(WORDS))
            .prop_map(|(f, w)| format!("{f}={w}")),
        1 => any::<String>(),
    ]
}

fn flat_boot() -> Vec<String> {
    ["--flat", "/unused", "--entry", "0x100000"]
        .map(str::to_string)
        .to_vec()
}

fn usage_error(args: &[&str]) -> String {
    let argv = std::iter::once("vmm").chain(args.iter().copied());
    match cli::parse(argv) {
        Err(message) => message,
        Ok(other) => panic!("{args:?}: {other:?}"),
    }
}

#[test]
fn control_characters_in_arguments_are_escaped() {
    // Found by the cli fuzz target: a carriage return in an argument went into the error
    // line as it was, and the terminal overwrote the start of the line.
    let m = usage_error(&["\u{90}\r--frob"]);
    assert!(!m.chars().any(char::is_control), "{m:?}");
    assert!(m.contains("\\r--frob"), "{m:?}");
    let m = usage_error(&["--flat", "x", "--entry", "0x100000", "--mem", "1\x1b[2J"]);
    assert!(!m.chars().any(char::is_control), "{m:?}");
}

#[test]
fn blank_lines_in_arguments_do_not_cut_the_message() {
    // Found by the cli fuzz target: the message ended at the first blank line, inside the
    // argument, and lost the flag it was given to.
    let m = usage_error(&["--flat", "x", "--entry", "0x100000", "--mem", "1\n\n2"]);
    assert!(m.contains("--mem"), "{m:?}");
    assert!(m.ends_with("; run `vmm --help` for usage"), "{m:?}");
    let m = usage_error(&["--flat", "x"]);
    assert!(m.contains("--entry"), "{m:?}");
    assert!(!m.contains("Usage"), "{m:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(768))]

    #[test]
    fn any_command_line_gives_a_plan_or_one_line(
        boot in any::<bool>(),
        args in proptest::collection::vec(arg(), 0..10),
    ) {
        let argv: Vec<String> = std::iter::once("vmm".to_string())
            .chain(if boot { flat_boot() } else { Vec::new() })
            .chain(args)
            .collect();
        match cli::parse(argv.clone()) {
            Ok(cli::Parsed::Run(plan)) => {
                plan.vmm.validate().unwrap_or_else(|e| panic!("{argv:?}: {e}"));
                let guests = plan.vmm.guests.len();
                prop_assert!((1..=256).contains(&guests));
                let dedup = matches!(plan.services.merging, Merging::Dedup(_));
                prop_assert!(plan.vmm.guests.iter().all(|g| g.track_dirty == dedup));
                if let Merging::Dedup(c) = &plan.services.merging {
                    c.validate(guests).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
                }
            }
            Ok(cli::Parsed::Print(text)) => prop_assert!(!text.to_string().trim().is_empty()),
            Err(message) => {
                prop_assert!(!message.trim().is_empty(), "{:?}", argv);
                prop_assert!(!message.chars().any(char::is_control), "{:?}: {:?}", argv, message);
            }
        }
    }
}
