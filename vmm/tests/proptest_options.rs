//! Option parsing as property tests (the `options` fuzz target's properties, fast enough for
//! every test run; see docs/fuzzing.md): `--dedup-opt` strings, sizes, addresses and
//! durations never panic, every error is one clear line naming what was given, and whatever
//! parses is in range and reads back the same through its text form.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use proptest::prelude::*;
use vm_dedup::Config;
use vm_dedup::config::KNOBS;
use vmm::config::{format_size, parse_addr, parse_duration, parse_size};
use vmm::dedup::settings::{Settings, TUNE_KNOBS};

const VALUES: &[&str] = &[
    "0",
    "1",
    "2",
    "16",
    "512",
    "513",
    "100",
    "101",
    "true",
    "off",
    "yes",
    "stop",
    "unmerge",
    "auto",
    "fixed",
    "advisor",
    "pressure",
    "",
    " 1 ",
    "-1",
    "+1",
    "1e3",
    "1.5",
    "0x10",
    "65535",
    "65536",
    "1073741824",
    "1073741825",
    "3600000",
    "3600001",
    "18446744073709551616",
];

fn one_line(what: &str, message: &str) {
    assert!(!message.trim().is_empty(), "{what}: empty message");
    assert!(
        !message.chars().any(char::is_control),
        "{what}: {message:?}"
    );
}

fn name() -> impl Strategy<Value = String> {
    let known: Vec<String> = KNOBS
        .iter()
        .chain(TUNE_KNOBS)
        .map(|s| (*s).to_string())
        .collect();
    prop_oneof![
        4 => proptest::sample::select(known.clone()),
        1 => proptest::sample::select(known).prop_map(|k| format!("\t{k}\u{c} ")),
        1 => "[a-z_ =]{0,12}",
    ]
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(VALUES).prop_map(str::to_string),
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

fn check_settings(s: &Settings) {
    s.validate().unwrap();
    let mut back = Settings::default();
    for (k, v) in s.knobs() {
        back.set(k, &v)
            .unwrap_or_else(|e| panic!("{k}={v} from knobs(): {e}"));
    }
    assert_eq!(&back, s);
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
        let mut s = Settings::default();
        for o in &opts {
            match s.apply_options(o) {
                Ok(()) => check_settings(&s),
                Err(e) => {
                    one_line(o, &e.to_string());
                    break;
                }
            }
        }
        let mut c = Config::default();
        match c.apply_options(&opts[0]) {
            Ok(()) => {
                c.validate().unwrap();
                let mut back = Config::default();
                for k in KNOBS {
                    back.set(k, &c.get(k).unwrap()).unwrap();
                }
                prop_assert_eq!(back, c);
            }
            Err(e) => one_line(&opts[0], &e.to_string()),
        }
    }

    #[test]
    fn sizes_are_products_or_errors(n in any::<u64>(), unit in 0usize..12, text in any::<String>()) {
        let units = [("", 0), ("B", 0), ("k", 10), ("K", 10), ("KiB", 10), ("kb", 10),
                     ("M", 20), ("MiB", 20), ("g", 30), ("GB", 30), ("T", 40), ("tib", 40)];
        let (u, shift) = units[unit];
        prop_assert_eq!(parse_size(&format!("{n}{u}")).ok(), n.checked_mul(1 << shift));
        match parse_size(&text) {
            Ok(v) => prop_assert_eq!(parse_size(&format_size(v)), Ok(v)),
            Err(e) => {
                let (message, quoted) = (e.to_string(), format!("{text:?}"));
                one_line(&text, &message);
                prop_assert!(message.contains(&quoted), "{}", message);
            }
        }
    }

    #[test]
    fn addresses_and_durations_read_back(n in any::<u64>(), text in any::<String>()) {
        prop_assert_eq!(parse_addr(&format!("{n:#x}")), Ok(n));
        prop_assert_eq!(parse_addr(&n.to_string()), Ok(n));
        match parse_addr(&text) {
            Ok(a) => prop_assert_eq!(parse_addr(&format!("{a:#x}")), Ok(a)),
            Err(e) => one_line(&text, &e.to_string()),
        }
        let secs = parse_duration(&format!("{n}s")).ok();
        prop_assert_eq!(secs, n.checked_mul(1000).map(std::time::Duration::from_millis));
        match parse_duration(&text) {
            Ok(d) => prop_assert_eq!(parse_duration(&format!("{}ms", d.as_millis())), Ok(d)),
            Err(e) => one_line(&text, &e.to_string()),
        }
    }
}
