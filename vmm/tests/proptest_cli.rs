//! The whole `vmm` command line as a property test (the `cli` fuzz target's property; see
//! docs/fuzzing.md): any argument list gives a valid plan, help or version text, or one line
//! of usage error, never a panic. Compiles the binary's own parser, `vmm/src/cli.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::ffi::OsString;

use proptest::prelude::*;

#[allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
#[path = "../src/cli.rs"]
mod cli;
#[path = "properties/message.rs"]
mod message;
#[path = "properties/cli.rs"]
mod property;

use property::{FLAGS, WORDS};

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
        let argv: Vec<OsString> = std::iter::once("vmm".to_string())
            .chain(if boot { flat_boot() } else { Vec::new() })
            .chain(args)
            .map(OsString::from)
            .collect();
        property::check(&argv);
    }
}
