//! The control API's request handling (`vmm::api::routes::handle`, what the HTTP server calls
//! for every request) against a real `--dedup` engine whose guests' memory the target fills,
//! scans and writes between requests. Arbitrary methods, paths and bodies (knob objects with
//! arbitrary JSON values, or raw bytes). Every bad request gets a 4xx with a JSON
//! `{"error": "..."}` of one clear line, never a 5xx or a panic; changes are all or nothing;
//! `GET /config` is what is in force and reads back; the statistics add up (per guest and in
//! total, against the pages actually merged); guest memory keeps its content throughout.
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use vm_dedup::{GuestConfig, GuestId};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::api::routes::{self, JSON, PROMETHEUS, Reply};
use vmm::control::{Control, DedupControl};
use vmm::dedup::settings::{Settings, TUNE_KNOBS};
use vmm::dedup::{Dedup, DedupConfig};
use vmm::report::Report;
use vmm_fuzz::{PAGE, check_message, content};

type Mem = GuestMemoryMmap<()>;

const METHODS: &[&str] = &[
    "GET", "PUT", "PATCH", "POST", "DELETE", "HEAD", "OPTIONS", "get", "",
];
const PATHS: &[&str] = &[
    "/stats", "/config", "/unmerge", "/metrics", "/", "", "/stats/x", "//stats", "/Stats",
];
const SUFFIXES: &[&str] = &["", "/", "?pretty=1", "#frag", "//", "?", "/?a=b"];
const DOMAINS: &[&str] = &["default", "tenant-a", "tenant \"b\"", "c\\d", "é"];
const WORDS: &[&str] = &[
    "0", "1", "2", "16", "64", "256", "512", "513", "65535", "65536", "auto", "fixed", "advisor",
    "pressure", "stop", "run", "unmerge", "on", "off", "", " ", "-1", "1.5", "1e3", "x",
];

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

struct Guest {
    id: GuestId,
    mem: Arc<Mem>,
    seeds: Vec<u8>,
}

fn knob_names() -> Vec<&'static str> {
    vm_dedup::config::KNOBS
        .iter()
        .chain(TUNE_KNOBS)
        .copied()
        .collect()
}

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

fn error_of(r: &Reply) -> String {
    assert_eq!(r.content_type, JSON, "error reply not JSON: {r:?}");
    let v: Value =
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("error body {e}: {r:?}"));
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {r:?}"))
        .to_string();
    check_message(&format!("{} reply", r.status), &msg);
    msg
}

/// The statistics add up: per guest into the totals, bytes saved from pages.
fn check_report(r: &Report) {
    let c = &r.counts;
    assert_eq!(
        c.bytes_saved,
        (c.pages_sharing + c.zero_pages) * 4096,
        "bytes_saved"
    );
    let e = r
        .engine
        .unwrap_or_else(|| panic!("no engine details with --dedup"));
    assert_eq!(
        c.general_profit,
        c.bytes_saved as i64 - e.metadata_bytes as i64,
        "general_profit"
    );
    let sum = |f: fn(&vmm::report::GuestReport) -> u64| r.guests.iter().map(f).sum::<u64>();
    assert_eq!(
        sum(|g| g.counts.pages_shared),
        c.pages_shared,
        "pages_shared"
    );
    assert_eq!(
        sum(|g| g.counts.pages_sharing),
        c.pages_sharing,
        "pages_sharing"
    );
    assert_eq!(
        sum(|g| g.counts.pages_unshared),
        c.pages_unshared,
        "pages_unshared"
    );
    assert_eq!(
        sum(|g| g.counts.pages_volatile),
        c.pages_volatile,
        "pages_volatile"
    );
    assert_eq!(sum(|g| g.counts.zero_pages), c.zero_pages, "zero_pages");
    assert_eq!(sum(|g| g.counts.cow_breaks), c.cow_breaks, "cow_breaks");
    assert_eq!(sum(|g| g.counts.bytes_saved), c.bytes_saved, "bytes_saved");
    assert_eq!(sum(|g| g.pages), r.pages, "pages");
    for g in &r.guests {
        let gc = &g.counts;
        assert_eq!(
            gc.bytes_saved,
            (gc.pages_sharing + gc.zero_pages) * 4096,
            "guest bytes_saved"
        );
        assert_eq!(gc.full_scans, c.full_scans);
        assert!(
            gc.pages_sharing + gc.pages_shared + gc.zero_pages <= g.pages,
            "{g:?}"
        );
    }
}

/// After a pass or an unmerge the statistics match the pages actually merged.
fn check_against_engine(dedup: &Dedup, guests: &[Guest]) {
    let r = DedupControl(Arc::clone(dedup.shared())).stats();
    check_report(&r);
    let mut zero = 0u64;
    let mut slots = std::collections::HashMap::new();
    for g in guests {
        for m in dedup
            .engine()
            .merged_pages(g.id)
            .unwrap_or_else(|e| panic!("merged_pages: {e}"))
        {
            match m.slot {
                None => zero += 1,
                Some(s) => *slots.entry(s).or_insert(0u64) += 1,
            }
        }
    }
    let mapped: u64 = slots.values().sum();
    assert_eq!(
        r.counts.zero_pages, zero,
        "zero_pages against the engine's pages"
    );
    assert_eq!(
        r.counts.pages_shared,
        slots.len() as u64,
        "pages_shared against the slots in use"
    );
    assert_eq!(
        r.counts.pages_shared + r.counts.pages_sharing,
        mapped,
        "pages mapped to copies"
    );
}

fn check_contents(guests: &[Guest]) {
    let mut buf = vec![0u8; PAGE];
    for (gi, g) in guests.iter().enumerate() {
        for (p, &s) in g.seeds.iter().enumerate() {
            g.mem
                .read_slice(&mut buf, GuestAddress((p * PAGE) as u64))
                .unwrap_or_else(|e| panic!("read: {e}"));
            assert!(
                buf == content(s),
                "guest {gi} page {p} lost its content (seed {s})"
            );
        }
    }
}

fn request(control: &DedupControl, method: &str, url: &str, body: &[u8]) {
    let before = control.0.settings();
    let reply = routes::handle(control, method, url, body);
    let after = control.0.settings();
    assert!(
        (200..500).contains(&reply.status),
        "{method} {url:?} {:?}: status {}: {}",
        String::from_utf8_lossy(body),
        reply.status,
        reply.body
    );
    let path = url.split(['?', '#']).next().unwrap_or_default();
    let path = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    let changes_config = matches!((path, method), ("/config", "PUT" | "PATCH"));
    if reply.status >= 400 {
        let msg = error_of(&reply);
        match reply.status {
            404 => assert!(
                !["/stats", "/config", "/unmerge", "/metrics"].contains(&path),
                "{msg}"
            ),
            405 => {
                let allow = reply.allow.unwrap_or_else(|| panic!("405 without Allow"));
                assert!(
                    !allow.split(", ").any(|m| m == method),
                    "{method} in Allow {allow}"
                );
            }
            400 | 409 => assert!(
                changes_config || path == "/unmerge",
                "{method} {path}: {msg}"
            ),
            s => panic!("unexpected status {s}: {msg}"),
        }
        if reply.status != 200 {
            assert_eq!(before, after, "a refused request changed knobs: {msg}");
        }
        return;
    }
    assert_eq!(reply.status, 200);
    match path {
        "/metrics" => {
            assert_eq!(reply.content_type, PROMETHEUS);
            for line in reply.body.lines().filter(|l| !l.starts_with('#')) {
                let (name, value) = line
                    .rsplit_once(' ')
                    .unwrap_or_else(|| panic!("metrics line {line:?}"));
                assert!(
                    name.starts_with("vmm_") && name.ends_with('}'),
                    "metrics line {line:?}"
                );
                assert!(value.parse::<i128>().is_ok(), "metrics value {line:?}");
            }
        }
        "/stats" | "/unmerge" => {
            let v: Value =
                serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("stats JSON: {e}"));
            assert_eq!(v["mode"], "dedup");
            let (sharing, zero, saved) = (&v["pages_sharing"], &v["zero_pages"], &v["bytes_saved"]);
            assert_eq!(
                saved.as_u64(),
                Some((sharing.as_u64().unwrap_or(0) + zero.as_u64().unwrap_or(0)) * 4096)
            );
        }
        "/config" => {
            let v: Value =
                serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("config JSON: {e}"));
            let obj = v
                .as_object()
                .unwrap_or_else(|| panic!("config not an object"));
            assert_eq!(obj.get("mode"), Some(&Value::from("dedup")));
            // What the reply lists is what is in force, and reads back as valid knobs.
            let mut back = Settings::default();
            for (k, val) in obj.iter().filter(|(k, _)| *k != "mode") {
                let text = match val {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                back.set(k, &text)
                    .unwrap_or_else(|e| panic!("{k}={text} from GET /config: {e}"));
            }
            back.validate()
                .unwrap_or_else(|e| panic!("config in force is invalid: {e}"));
            assert_eq!(back, after, "GET /config is not what is in force");
            if changes_config {
                // All of the change, as the settings parser reads it.
                let mut want = before.clone();
                for (k, v) in routes::parse_changes(body).unwrap_or_default() {
                    want.set(&k, &v)
                        .unwrap_or_else(|e| panic!("accepted {k}={v}: {e}"));
                }
                assert_eq!(want, after, "PATCH applied something else");
            } else {
                assert_eq!(before, after);
            }
        }
        p => panic!("200 for {p:?}"),
    }
}

fuzz_target!(|input: Input| {
    let mut config = DedupConfig::default();
    config.settings.engine.threads = 1;
    let dedup = Dedup::new(&config, &[]).unwrap_or_else(|e| panic!("engine: {e}"));
    let mut guests = Vec::new();
    for (i, spec) in input.guests.iter().take(3).enumerate() {
        let pages = usize::from(spec.pages % 24) + 1;
        let mem = Arc::new(
            Mem::from_ranges(&[(GuestAddress(0), pages * PAGE)])
                .unwrap_or_else(|e| panic!("memory: {e}")),
        );
        let seeds: Vec<u8> = (0..pages)
            .map(|p| spec.seeds.get(p).map_or(0, |s| s % 6))
            .collect();
        for (p, &s) in seeds.iter().enumerate() {
            mem.write_slice(&content(s), GuestAddress((p * PAGE) as u64))
                .unwrap_or_else(|e| panic!("fill: {e}"));
        }
        let domain = DOMAINS[usize::from(spec.domain) % DOMAINS.len()];
        let id = dedup
            .engine()
            .register(
                GuestConfig::new(format!("guest{i}"), domain),
                Arc::clone(&mem),
            )
            .unwrap_or_else(|e| panic!("register: {e}"));
        guests.push(Guest { id, mem, seeds });
    }
    let control = DedupControl(Arc::clone(dedup.shared()));
    for op in input.ops.iter().take(24) {
        match op {
            Op::Request { method, path, body } => {
                let method = match method {
                    Method::Known(i) => METHODS[usize::from(*i) % METHODS.len()].to_string(),
                    Method::Other(s) => s.clone(),
                };
                let url = match path {
                    Path::Known(p, s) => format!(
                        "{}{}",
                        PATHS[usize::from(*p) % PATHS.len()],
                        SUFFIXES[usize::from(*s) % SUFFIXES.len()]
                    ),
                    Path::Other(s) => s.clone(),
                };
                // As the server hands them over: the method upper-cased.
                let method = method.to_ascii_uppercase();
                let unmerge =
                    matches!(url.split(['?', '#']).next(), Some("/unmerge" | "/unmerge/"))
                        && method == "POST";
                request(&control, &method, &url, &body_bytes(body));
                if unmerge {
                    check_against_engine(&dedup, &guests);
                }
            }
            Op::Scan => match dedup.engine().scan_pass() {
                Ok(_) => check_against_engine(&dedup, &guests),
                Err(e) => panic!("scan_pass: {e}"),
            },
            Op::Write { guest, page, seed } => {
                if guests.is_empty() {
                    continue;
                }
                let n = guests.len();
                let g = &mut guests[usize::from(*guest) % n];
                let p = usize::from(*page) % g.seeds.len();
                let s = seed % 6;
                g.mem
                    .write_slice(&content(s), GuestAddress((p * PAGE) as u64))
                    .unwrap_or_else(|e| panic!("write: {e}"));
                g.seeds[p] = s;
            }
        }
        check_contents(&guests);
        check_report(&control.stats());
    }
    for g in guests {
        dedup
            .engine()
            .unregister(g.id)
            .unwrap_or_else(|e| panic!("unregister: {e}"));
    }
});
