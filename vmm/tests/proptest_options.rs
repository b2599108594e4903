//! Option parsing as property tests (the `options` fuzz target's properties, fast enough for
//! every test run; see docs/fuzzing.md): `--dedup-opt` strings, sizes, addresses and
//! durations never panic, every error is one clear line naming what was given, and whatever
//! parses is in range and reads back the same through its text form.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use proptest::prelude::*;
use vmm::dedup::settings::Settings;

#[path = "properties/message.rs"]
mod message;
#[path = "properties/options.rs"]
mod options;

use options::{
    UNITS, WORDS, check_addr, check_addr_number, check_duration, check_duration_number,
    check_engine_options, check_option_sequence, check_size, check_size_number, check_tune,
    knob_names,
};

fn name() -> impl Strategy<Value = String> {
    let known: Vec<String> = knob_names().into_iter().map(str::to_string).collect();
    prop_oneof![
        4 => proptest::sample::select(known.clone()),
        1 => proptest::sample::select(known).prop_map(|k| format!("\t{k}\u{c} ")),
        1 => "[a-z_ =]{0,12}",
    ]
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(WORDS).prop_map(str::to_string),
        2 => any::<u64>().prop_map(|n| n.to_string()),
        1 => any::<String>(),
    ]
}

fn option_string() -> impl Strategy<Value = String> {
    proptest::collection::vec((name(), proptest::option::weighted(0.9, value())), 0..6).prop_map(
        |opts| {
            opts.into_iter()
                .map(|(n, v)| v.map_or_else(|| n.clone(), |v| format!("{n}={v}")))
                .collect::<Vec<_>>()
                .join(",")
        },
    )
}

#[test]
fn errors_name_the_knob_without_the_whitespace_around_it() {
    // Found by the options fuzz target: a tuner knob's error repeated the form feeds and tabs
    // around its name, control characters and all.
    let mut s = Settings::default();
    let e = s
        .apply_options("advisor_target_scan_ms\u{c}\t=off")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "bad value \"off\" for advisor_target_scan_ms: not a number"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn dedup_options_parse_or_say_why(opts in proptest::collection::vec(option_string(), 1..4)) {
        check_option_sequence(&opts);
        check_engine_options(&opts[0]);
    }

    #[test]
    fn sizes_are_products_or_errors(n in any::<u64>(), unit in 0..UNITS.len(), text in any::<String>()) {
        check_size_number(n, unit);
        check_size(&text);
    }

    #[test]
    fn addresses_durations_and_modes_read_back(n in any::<u64>(), text in any::<String>()) {
        check_addr_number(n);
        check_addr(&text);
        check_duration_number(n);
        check_duration(&text);
        check_tune(&text);
    }
}
