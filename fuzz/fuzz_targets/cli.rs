//! The whole `vmm` command line (the binary's clap parser and its translation into a plan,
//! compiled from `vmm/src/cli.rs`): any argument list gives a valid plan, help or version
//! text, or one line of usage error; never a panic.
#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::message;

#[allow(dead_code)]
#[path = "../../vmm/src/cli.rs"]
mod cli;
#[path = "../../vmm/tests/properties/cli.rs"]
mod property;

use property::{FLAGS, WORDS};

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
    property::check(&argv);
});
