//! Option parsing's properties, shared by `vmm/tests/proptest_options.rs` and the `options`
//! fuzz target (both include this file, and `properties/message.rs` as `crate::message`):
//! `--dedup-opt` strings (engine and tuner knobs, as `vmm` and the API apply them), sizes,
//! addresses, durations and tuning modes never panic, every error is one clear line naming
//! what was given, and whatever parses is in range and reads back the same through its text
//! form. Each check panics when the property does not hold.

use std::time::Duration;

use vm_dedup::Config;
use vm_dedup::config::KNOBS;
use vmm::config::{format_size, parse_addr, parse_duration, parse_size};
use vmm::dedup::settings::{Settings, TUNE_KNOBS, TuneMode};

use crate::message::one_line;

/// Values worth trying for any knob.
pub const WORDS: &[&str] = &[
    "0",
    "1",
    "2",
    "3",
    "16",
    "512",
    "513",
    "100",
    "101",
    "true",
    "false",
    "on",
    "off",
    "yes",
    "no",
    "stop",
    "run",
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
    "86400000",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "\u{0}",
    "١",
];

/// Size units with their shifts, as `parse_size` reads them.
pub const UNITS: &[(&str, u32)] = &[
    ("", 0),
    ("B", 0),
    ("k", 10),
    ("K", 10),
    ("KiB", 10),
    ("kb", 10),
    ("M", 20),
    ("MiB", 20),
    ("g", 30),
    ("GB", 30),
    ("T", 40),
    ("tib", 40),
];

/// Every knob name `--dedup-opt` knows: the engine's and the tuner's.
pub fn knob_names() -> Vec<&'static str> {
    KNOBS.iter().chain(TUNE_KNOBS).copied().collect()
}

/// Whatever parsed is valid and reads back the same through its text form.
pub fn check_settings(s: &Settings) {
    s.validate()
        .unwrap_or_else(|e| panic!("accepted settings do not validate: {e}: {s:?}"));
    let mut back = Settings::default();
    for (k, v) in s.knobs() {
        back.set(k, &v)
            .unwrap_or_else(|e| panic!("{k}={v} from knobs() is refused: {e}"));
    }
    assert_eq!(&back, s, "knobs do not round-trip");
}

/// Applies repeated `--dedup-opt` strings as `vmm` does: in order, stopping at the first error.
pub fn check_option_sequence(opts: &[String]) {
    let mut settings = Settings::default();
    for text in opts {
        match settings.apply_options(text) {
            Ok(()) => check_settings(&settings),
            Err(e) => {
                one_line(&format!("--dedup-opt {text:?}"), &e.to_string());
                return;
            }
        }
    }
}

/// The engine's own option parser, as embedders use it.
pub fn check_engine_options(text: &str) {
    let mut c = Config::default();
    match c.apply_options(text) {
        Ok(()) => {
            c.validate()
                .unwrap_or_else(|e| panic!("accepted config does not validate: {e}"));
            let mut back = Config::default();
            for k in KNOBS {
                let v = c.get(k).unwrap_or_else(|| panic!("no value for knob {k}"));
                back.set(k, &v)
                    .unwrap_or_else(|e| panic!("{k}={v} from get() is refused: {e}"));
            }
            assert_eq!(back, c, "engine knobs do not round-trip");
        }
        Err(e) => one_line(&format!("engine options {text:?}"), &e.to_string()),
    }
}

/// An error about `text` is one line and quotes it.
fn quotes(what: &str, text: &str, message: &str) {
    one_line(what, message);
    assert!(message.contains(&format!("{text:?}")), "{what}: {message}");
}

/// A size reads back through `format_size`, or says why not.
pub fn check_size(text: &str) {
    match parse_size(text) {
        Ok(n) => assert_eq!(parse_size(&format_size(n)), Ok(n), "{text:?}"),
        Err(e) => quotes("size", text, &e.to_string()),
    }
}

/// `n` with the unit `UNITS[unit % UNITS.len()]`: the product, or an error when it overflows.
pub fn check_size_number(n: u64, unit: usize) {
    let (u, shift) = UNITS[unit % UNITS.len()];
    let text = format!("{n}{u}");
    assert_eq!(
        parse_size(&text).ok(),
        n.checked_mul(1u64 << shift),
        "{text}"
    );
}

/// An address reads back in hex and decimal, or says why not.
pub fn check_addr(text: &str) {
    match parse_addr(text) {
        Ok(a) => {
            assert_eq!(parse_addr(&format!("{a:#x}")), Ok(a));
            assert_eq!(parse_addr(&a.to_string()), Ok(a));
        }
        Err(e) => quotes("address", text, &e.to_string()),
    }
}

/// Every u64 is an address, in hex (either case of digits) and decimal.
pub fn check_addr_number(n: u64) {
    assert_eq!(parse_addr(&format!("{n:#x}")), Ok(n));
    assert_eq!(
        parse_addr(&format!("{n:#X}").replacen("0X", "0x", 1)),
        Ok(n)
    );
    assert_eq!(parse_addr(&n.to_string()), Ok(n));
}

/// A duration reads back in milliseconds, or says why not.
pub fn check_duration(text: &str) {
    match parse_duration(text) {
        Ok(d) => {
            let ms = format!("{}ms", d.as_millis());
            assert_eq!(parse_duration(&ms), Ok(d), "{text:?}");
        }
        Err(e) => quotes("duration", text, &e.to_string()),
    }
}

/// `n` seconds: the duration, or an error when it overflows.
pub fn check_duration_number(n: u64) {
    let secs = parse_duration(&format!("{n}s")).ok();
    assert_eq!(secs, n.checked_mul(1000).map(Duration::from_millis));
}

/// A tuning mode is one of the names, or an error line.
pub fn check_tune(text: &str) {
    match text.parse::<TuneMode>() {
        Ok(m) => assert_eq!(m.name(), text.trim()),
        Err(e) => one_line("tune", &e.to_string()),
    }
}
