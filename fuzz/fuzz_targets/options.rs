//! Option parsing: `--dedup-opt` strings (engine and tuner knobs, as `vmm` and the API apply
//! them), sizes (`--mem`), addresses (`--entry`), durations (`--stats-interval`) and tuning
//! modes. Never a panic; every error one clear line naming what was given; whatever parses
//! is in range and reads back the same through its text form.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::message;

#[path = "../../vmm/tests/properties/options.rs"]
mod options;

use options::{
    WORDS, check_addr, check_addr_number, check_duration, check_duration_number,
    check_engine_options, check_option_sequence, check_size, check_size_number, check_tune,
    knob_names,
};

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
    let known = knob_names();
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

fuzz_target!(|input: Input| {
    let opts: Vec<String> = input.opts.iter().map(|o| option_string(o)).collect();
    check_option_sequence(&opts);
    check_option_sequence(std::slice::from_ref(&input.raw));
    check_engine_options(&input.raw);
    check_size(&input.size);
    check_size_number(input.number, usize::from(input.unit));
    check_addr(&input.addr);
    check_addr_number(input.number);
    check_duration(&input.duration);
    check_duration_number(input.number);
    check_tune(&input.tune);
});
