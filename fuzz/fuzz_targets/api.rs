//! The control API's request handling (`vmm::api::routes::handle`, what the HTTP server calls
//! for every request) against a real `--dedup` engine whose guests' memory the target fills,
//! scans and writes between requests. Arbitrary methods, paths and bodies (knob objects with
//! arbitrary JSON values, or raw bytes). Every bad request gets a 4xx with a JSON
//! `{"error": "..."}` of one clear line, never a 5xx or a panic; changes are all or nothing;
//! `GET /config` is what is in force and reads back; the statistics add up (per guest and in
//! total, against the pages actually merged); guest memory keeps its content throughout. The
//! checks are shared with `vmm/tests/proptest_api.rs` (`vmm/tests/properties/api.rs`); this
//! target only makes the inputs.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use vmm_fuzz::{content, message};

#[path = "../../vmm/tests/properties/api.rs"]
mod property;

use property::{DOMAINS, METHODS, PATHS, SUFFIXES, Session, WORDS, knob_names};

#[derive(Arbitrary, Debug)]
enum Method {
    Known(u8),
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Path {
    Known(u8, u8),
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Json {
    Num(u64),
    Neg(i64),
    Float(f64),
    Word(u8),
    Str(String),
    Bool(bool),
    Null,
    List(Vec<u8>),
    Obj,
}

#[derive(Arbitrary, Debug)]
enum Key {
    Known(u8),
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Body {
    Empty,
    Knobs(Vec<(Key, Json)>),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Request {
        method: Method,
        path: Path,
        body: Body,
    },
    Scan,
    Write {
        guest: u8,
        page: u8,
        seed: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct GuestSpec {
    domain: u8,
    pages: u8,
    seeds: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    guests: Vec<GuestSpec>,
    ops: Vec<Op>,
}

/// The JSON value `v` stands for.
fn json(v: &Json) -> Value {
    match v {
        Json::Num(n) => Value::from(*n % 100_000),
        Json::Neg(n) => Value::from(*n),
        Json::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Json::Word(i) => Value::from(WORDS[usize::from(*i) % WORDS.len()]),
        Json::Str(s) => Value::from(s.as_str()),
        Json::Bool(b) => Value::from(*b),
        Json::Null => Value::Null,
        Json::List(l) => Value::from(l.clone()),
        Json::Obj => Value::Object(Map::new()),
    }
}

/// The body `b` stands for: nothing, a JSON object of knobs, or raw bytes.
fn body_bytes(b: &Body) -> Vec<u8> {
    let names = knob_names();
    match b {
        Body::Empty => Vec::new(),
        Body::Knobs(kv) => {
            let mut m = Map::new();
            for (k, v) in kv {
                let k = match k {
                    Key::Known(i) => names[usize::from(*i) % names.len()].to_string(),
                    Key::Other(s) => s.clone(),
                };
                m.insert(k, json(v));
            }
            serde_json::to_vec(&Value::Object(m)).unwrap_or_default()
        }
        Body::Raw(r) => r.clone(),
    }
}

/// The session step `o` stands for.
fn step(o: &Op) -> property::Op {
    match o {
        Op::Request { method, path, body } => property::Op::Request {
            method: match method {
                Method::Known(i) => METHODS[usize::from(*i) % METHODS.len()].to_string(),
                Method::Other(s) => s.clone(),
            },
            url: match path {
                Path::Known(p, s) => format!(
                    "{}{}",
                    PATHS[usize::from(*p) % PATHS.len()],
                    SUFFIXES[usize::from(*s) % SUFFIXES.len()]
                ),
                Path::Other(s) => s.clone(),
            },
            body: body_bytes(body),
        },
        Op::Scan => property::Op::Scan,
        &Op::Write { guest, page, seed } => property::Op::Write {
            guest: usize::from(guest),
            page: usize::from(page),
            seed: seed % 6,
        },
    }
}

fuzz_target!(|input: Input| {
    let guests: Vec<(&str, Vec<u8>)> = input
        .guests
        .iter()
        .take(3)
        .map(|spec| {
            let pages = usize::from(spec.pages % 24) + 1;
            let seeds = (0..pages)
                .map(|p| spec.seeds.get(p).map_or(0, |s| s % 6))
                .collect();
            (DOMAINS[usize::from(spec.domain) % DOMAINS.len()], seeds)
        })
        .collect();
    let mut session = Session::new(&guests, content);
    for o in input.ops.iter().take(24) {
        session.step(&step(o));
    }
    session.finish();
});
