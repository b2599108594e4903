//! Option parsing: `--dedup-opt` strings (engine and tuner knobs, as `vmm` and the API apply
//! them), sizes (`--mem`), addresses (`--entry`), durations (`--stats-interval`) and tuning
//! modes. Never a panic; every error one clear line naming what was given; whatever parses
//! is in range and reads back the same through its text form.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vm_dedup::Config;
use vm_dedup::config::KNOBS;
use vmm::config::{format_size, parse_addr, parse_duration, parse_size};
use vmm::dedup::settings::{Settings, TUNE_KNOBS, TuneMode};
use vmm_fuzz::check_message;

/// Values worth trying for any knob.
const WORDS: &[&str] = &[
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

#[derive(Arbitrary, Debug)]
enum Name {
    Known(u8),
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Value {
    Word(u8),
    Num(u64),
    Signed(i64),
    Text(String),
}

#[derive(Arbitrary, Debug)]
struct Opt {
    name: Name,
    /// `None`: no `=value` at all.
    value: Option<Value>,
    spaces: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Each inner list is one `--dedup-opt`, joined with commas.
    opts: Vec<Vec<Opt>>,
    raw: String,
    size: String,
    number: u64,
    unit: u8,
    addr: String,
    duration: String,
    tune: String,
}

fn knob_name(n: &Name) -> String {
    let known: Vec<&str> = KNOBS.iter().chain(TUNE_KNOBS).copied().collect();
    match n {
        Name::Known(i) => known[usize::from(*i) % known.len()].to_string(),
        Name::Other(s) => s.clone(),
    }
}

fn value_text(v: &Value) -> String {
    match v {
        Value::Word(i) => WORDS[usize::from(*i) % WORDS.len()].to_string(),
        Value::Num(n) => n.to_string(),
        Value::Signed(n) => n.to_string(),
        Value::Text(s) => s.clone(),
    }
}

fn option_string(opts: &[Opt]) -> String {
    opts.iter()
        .map(|o| {
            let name = knob_name(&o.name);
            let pad = if o.spaces { " " } else { "" };
            match &o.value {
                Some(v) => format!("{pad}{name}{pad}={pad}{}", value_text(v)),
                None => name,
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Whatever parsed is valid and reads back the same through its text form.
fn check_settings(s: &Settings) {
    s.validate()
        .unwrap_or_else(|e| panic!("accepted settings do not validate: {e}: {s:?}"));
    let mut back = Settings::default();
    for (k, v) in s.knobs() {
        back.set(k, &v)
            .unwrap_or_else(|e| panic!("{k}={v} from knobs() is refused: {e}"));
    }
    assert_eq!(&back, s, "knobs do not round-trip");
}

fn check_options(input: &Input) {
    // As `vmm` applies repeated --dedup-opt: in order, stopping at the first error.
    let mut settings = Settings::default();
    for opts in &input.opts {
        let text = option_string(opts);
        match settings.apply_options(&text) {
            Ok(()) => check_settings(&settings),
            Err(e) => {
                check_message(&format!("--dedup-opt {text:?}"), &e.to_string());
                return;
            }
        }
    }

    let mut s = Settings::default();
    match s.apply_options(&input.raw) {
        Ok(()) => check_settings(&s),
        Err(e) => check_message(&format!("--dedup-opt {:?}", input.raw), &e.to_string()),
    }

    // The engine's own parser, as embedders use it.
    let mut c = Config::default();
    match c.apply_options(&input.raw) {
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
        Err(e) => check_message(&format!("engine options {:?}", input.raw), &e.to_string()),
    }
}

fn check_size(input: &Input) {
    match parse_size(&input.size) {
        Ok(n) => {
            assert_eq!(parse_size(&format_size(n)), Ok(n), "{:?}", input.size);
        }
        Err(e) => {
            let m = e.to_string();
            check_message("size", &m);
            assert!(m.contains(&format!("{:?}", input.size)), "{m}");
        }
    }
    // A number with a unit: the product, or an error when it overflows.
    let units: &[(&str, u32)] = &[
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
    let (unit, shift) = units[usize::from(input.unit) % units.len()];
    let text = format!("{}{unit}", input.number);
    let want = input.number.checked_mul(1u64 << shift);
    assert_eq!(parse_size(&text).ok(), want, "{text}");
}

fn check_addr(input: &Input) {
    match parse_addr(&input.addr) {
        Ok(a) => {
            assert_eq!(parse_addr(&format!("{a:#x}")), Ok(a));
            assert_eq!(parse_addr(&a.to_string()), Ok(a));
        }
        Err(e) => {
            let m = e.to_string();
            check_message("address", &m);
            assert!(m.contains(&format!("{:?}", input.addr)), "{m}");
        }
    }
    let n = input.number;
    assert_eq!(parse_addr(&format!("{n:#x}")), Ok(n));
    assert_eq!(
        parse_addr(&format!("{n:#X}").replacen("0X", "0x", 1)),
        Ok(n)
    );
}

fn check_duration(input: &Input) {
    match parse_duration(&input.duration) {
        Ok(d) => {
            let ms = format!("{}ms", d.as_millis());
            assert_eq!(parse_duration(&ms), Ok(d), "{:?}", input.duration);
        }
        Err(e) => {
            let m = e.to_string();
            check_message("duration", &m);
            assert!(m.contains(&format!("{:?}", input.duration)), "{m}");
        }
    }
    let n = input.number;
    let secs = parse_duration(&format!("{n}s")).ok();
    assert_eq!(
        secs,
        n.checked_mul(1000).map(std::time::Duration::from_millis)
    );
}

fn check_tune(input: &Input) {
    match input.tune.parse::<TuneMode>() {
        Ok(m) => assert_eq!(m.name(), input.tune.trim()),
        Err(e) => check_message("tune", &e.to_string()),
    }
}

fuzz_target!(|input: Input| {
    check_options(&input);
    check_size(&input);
    check_addr(&input);
    check_duration(&input);
    check_tune(&input);
});
