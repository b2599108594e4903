//! The control API's properties, shared by `vmm/tests/proptest_api.rs` and the `api` fuzz
//! target (both include this file, and `properties/message.rs` as `crate::message`): requests
//! to `vmm::api::routes::handle` (what the HTTP server calls for every request), interleaved
//! with engine passes and guest writes, on a real `--dedup` engine ([`Session`]). Every bad
//! request gets a 4xx with a JSON `{"error": "..."}` of one clear line, never a 5xx or a
//! panic: 404 only for unknown paths, 405 with an `Allow` that excludes the method, 400 and
//! 409 only where a request changes something; refused changes change nothing; a 200 change
//! applies exactly what was asked; `GET /config` is what is in force and reads back as valid
//! knobs; metrics lines are `name{labels} value`; the statistics add up (per guest and in
//! total, and against the pages the engine actually maps after a pass or an unmerge); guest
//! memory keeps its content throughout. Each check panics when the property does not hold.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use vm_dedup::config::KNOBS;
use vm_dedup::{GuestConfig, GuestId};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::api::routes::{self, JSON, PROMETHEUS, Reply};
use vmm::control::{Control, DedupControl};
use vmm::dedup::settings::{Settings, TUNE_KNOBS};
use vmm::dedup::{Dedup, DedupConfig};
use vmm::report::{Counts, PAGE_BYTES, Report};

use crate::message::one_line;

/// Size of a guest page.
pub const PAGE: usize = 4096;

/// Methods worth asking, some the API does not know or the server would not pass.
pub const METHODS: &[&str] = &[
    "GET",
    "PUT",
    "PATCH",
    "POST",
    "DELETE",
    "HEAD",
    "OPTIONS",
    "get",
    "",
    "X",
    "G\nE\u{1}T",
];

/// Paths worth asking: the endpoints and near misses.
pub const PATHS: &[&str] = &[
    "/stats", "/config", "/unmerge", "/metrics", "/", "", "/stats/x", "//stats", "/Stats", "/nope",
];

/// What may follow a path: slashes, queries, fragments.
pub const SUFFIXES: &[&str] = &["", "/", "?pretty=1", "#frag", "//", "?", "/?a=b"];

/// Trust domains for the guests, with characters that need escaping in JSON and metrics.
pub const DOMAINS: &[&str] = &["default", "tenant-a", "tenant \"b\"", "c\\d", "é"];

/// Values worth giving knobs.
pub const WORDS: &[&str] = &[
    "0", "1", "2", "16", "64", "256", "512", "513", "65535", "65536", "auto", "fixed", "advisor",
    "pressure", "stop", "run", "unmerge", "on", "off", "", " ", "-1", "1.5", "1e3", "x",
];

/// Every knob name the API knows: the engine's and the tuner's.
pub fn knob_names() -> Vec<&'static str> {
    KNOBS.iter().chain(TUNE_KNOBS).copied().collect()
}

/// One step of a session.
#[derive(Debug, Clone)]
pub enum Op {
    /// A request, as the HTTP layer hands it to `routes::handle` (the method is upper-cased
    /// first, as the server does).
    Request {
        /// The method.
        method: String,
        /// The request target: path, query, fragment.
        url: String,
        /// The body.
        body: Vec<u8>,
    },
    /// One engine pass.
    Scan,
    /// A guest write: page `page` (modulo the guest's pages) of guest `guest` (modulo the
    /// guests) gets the content of `seed`.
    Write {
        /// Which guest.
        guest: usize,
        /// Which page.
        page: usize,
        /// The content's seed.
        seed: u8,
    },
}

/// A guest of the session, with the seed of every page's content.
struct Guest {
    id: GuestId,
    mem: Arc<GuestMemoryMmap<()>>,
    seeds: Vec<u8>,
}

/// A `--dedup` engine with guests, the control the API serves, and what each guest page holds.
pub struct Session {
    control: DedupControl,
    guests: Vec<Guest>,
    dedup: Dedup,
    content: fn(u8) -> Vec<u8>,
}

impl Session {
    /// A `--dedup` engine (one thread) with a guest `guest0`, `guest1`, ... per
    /// `(domain, seeds)`: one page per seed, holding `content(seed)`.
    pub fn new(guests: &[(&str, Vec<u8>)], content: fn(u8) -> Vec<u8>) -> Self {
        let mut config = DedupConfig::default();
        config.settings.engine.threads = 1;
        let dedup = Dedup::new(&config, &[]).unwrap_or_else(|e| panic!("engine: {e}"));
        let guests = guests
            .iter()
            .enumerate()
            .map(|(i, (domain, seeds))| {
                let mem = Arc::new(
                    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), seeds.len() * PAGE)])
                        .unwrap_or_else(|e| panic!("memory: {e}")),
                );
                for (p, &s) in seeds.iter().enumerate() {
                    mem.write_slice(&content(s), GuestAddress((p * PAGE) as u64))
                        .unwrap_or_else(|e| panic!("fill: {e}"));
                }
                let id = dedup
                    .engine()
                    .register(
                        GuestConfig::new(format!("guest{i}"), *domain),
                        Arc::clone(&mem),
                    )
                    .unwrap_or_else(|e| panic!("register: {e}"));
                Guest {
                    id,
                    mem,
                    seeds: seeds.clone(),
                }
            })
            .collect();
        let control = DedupControl(Arc::clone(dedup.shared()));
        Self {
            control,
            guests,
            dedup,
            content,
        }
    }

    /// Runs `op` and checks what follows it: the request's reply ([`check_request`]), the
    /// statistics against the engine after a pass or a `POST /unmerge`, and after every step
    /// the guests' memory and the statistics adding up.
    pub fn step(&mut self, op: &Op) {
        match op {
            Op::Request { method, url, body } => {
                let method = method.to_ascii_uppercase();
                check_request(&self.control, &method, url, body);
                if path_of(url) == "/unmerge" && method == "POST" {
                    self.check_against_engine();
                }
            }
            Op::Scan => {
                self.dedup
                    .engine()
                    .scan_pass()
                    .unwrap_or_else(|e| panic!("scan_pass: {e}"));
                self.check_against_engine();
            }
            &Op::Write { guest, page, seed } => {
                if !self.guests.is_empty() {
                    let n = self.guests.len();
                    let g = &mut self.guests[guest % n];
                    let p = page % g.seeds.len();
                    g.mem
                        .write_slice(&(self.content)(seed), GuestAddress((p * PAGE) as u64))
                        .unwrap_or_else(|e| panic!("write: {e}"));
                    g.seeds[p] = seed;
                }
            }
        }
        self.check_contents();
        check_report(&self.control.stats());
    }

    /// Unregisters every guest.
    pub fn finish(self) {
        for g in &self.guests {
            self.dedup
                .engine()
                .unregister(g.id)
                .unwrap_or_else(|e| panic!("unregister: {e}"));
        }
    }

    /// Every guest page reads back the content written last.
    fn check_contents(&self) {
        let mut buf = vec![0u8; PAGE];
        for (gi, g) in self.guests.iter().enumerate() {
            for (p, &s) in g.seeds.iter().enumerate() {
                g.mem
                    .read_slice(&mut buf, GuestAddress((p * PAGE) as u64))
                    .unwrap_or_else(|e| panic!("read: {e}"));
                assert!(
                    buf == (self.content)(s),
                    "guest {gi} page {p} lost its content (seed {s})"
                );
            }
        }
    }

    /// The statistics add up ([`check_report`]) and match the pages the engine actually
    /// maps: zero pages, copies in use, pages mapped to copies.
    fn check_against_engine(&self) {
        let r = self.control.stats();
        check_report(&r);
        let mut zero = 0u64;
        let mut slots = HashMap::new();
        for g in &self.guests {
            for m in self
                .dedup
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
}

/// The path of a request target as the routes read it: before any query or fragment, without
/// trailing slashes (but `/` itself).
fn path_of(url: &str) -> &str {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    }
}

/// The message of an error reply, which must be JSON `{"error": "..."}` of one clear line.
pub fn error_of(r: &Reply) -> String {
    assert_eq!(r.content_type, JSON, "error reply not JSON: {r:?}");
    let v: Value =
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("error body {e}: {r:?}"));
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {r:?}"))
        .to_string();
    one_line(&format!("{} reply", r.status), &msg);
    msg
}

/// One of the figures, read from a guest's or the total counts.
type Field = fn(&Counts) -> u64;

/// The figures summed over the guests into the totals, by name.
const SUMMED: &[(&str, Field)] = &[
    ("pages_shared", |c| c.pages_shared),
    ("pages_sharing", |c| c.pages_sharing),
    ("pages_unshared", |c| c.pages_unshared),
    ("pages_volatile", |c| c.pages_volatile),
    ("zero_pages", |c| c.zero_pages),
    ("cow_breaks", |c| c.cow_breaks),
    ("bytes_saved", |c| c.bytes_saved),
];

/// The statistics add up: `bytes_saved` from the pages, `general_profit` from it and the
/// metadata, per guest into the totals, and each guest's merged pages within its own.
pub fn check_report(r: &Report) {
    let c = &r.counts;
    let saved = |c: &Counts| (c.pages_sharing + c.zero_pages) * PAGE_BYTES;
    assert_eq!(c.bytes_saved, saved(c), "bytes_saved");
    let e = r
        .engine
        .unwrap_or_else(|| panic!("no engine details with --dedup"));
    assert_eq!(
        c.general_profit,
        c.bytes_saved as i64 - e.metadata_bytes as i64,
        "general_profit"
    );
    for (name, field) in SUMMED {
        let sum: u64 = r.guests.iter().map(|g| field(&g.counts)).sum();
        assert_eq!(sum, field(c), "{name} summed over the guests");
    }
    let pages: u64 = r.guests.iter().map(|g| g.pages).sum();
    assert_eq!(pages, r.pages, "pages");
    for g in &r.guests {
        let gc = &g.counts;
        assert_eq!(gc.bytes_saved, saved(gc), "guest bytes_saved");
        assert_eq!(gc.full_scans, c.full_scans, "guest full_scans");
        assert!(
            gc.pages_sharing + gc.pages_shared + gc.zero_pages <= g.pages,
            "{g:?}"
        );
    }
}

/// Sends one request (method as the server hands it over) and checks the reply: a status below
/// 500; an error is JSON of one line ([`error_of`]), 404 only for unknown paths, 405 with an
/// `Allow` that excludes the method, 400 or 409 only for a change, and changes nothing; a 200
/// is metrics lines `name{labels} value` (a whole number, or a finite one for seconds),
/// statistics that add up in JSON, or the knobs in force, which read back as valid and, after
/// a change, are exactly the change asked.
pub fn check_request(control: &DedupControl, method: &str, url: &str, body: &[u8]) {
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
    let path = path_of(url);
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
        assert_eq!(before, after, "a refused request changed knobs: {msg}");
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
                // Figures are whole numbers; times in seconds (`vmm_figures_age_seconds`)
                // have decimals.
                let seconds = name
                    .split('{')
                    .next()
                    .is_some_and(|n| n.ends_with("_seconds"));
                let number = if seconds {
                    value.parse::<f64>().is_ok_and(f64::is_finite)
                } else {
                    value.parse::<i128>().is_ok()
                };
                assert!(number, "metrics value {line:?}");
            }
        }
        "/stats" | "/unmerge" => {
            let v: Value =
                serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("stats JSON: {e}"));
            assert_eq!(v["mode"], "dedup");
            let (sharing, zero, saved) = (&v["pages_sharing"], &v["zero_pages"], &v["bytes_saved"]);
            assert_eq!(
                saved.as_u64(),
                Some((sharing.as_u64().unwrap_or(0) + zero.as_u64().unwrap_or(0)) * PAGE_BYTES),
                "bytes_saved in {path}"
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
                let changes = routes::parse_changes(body)
                    .unwrap_or_else(|e| panic!("a change was applied from a bad body: {e}"));
                for (k, v) in changes {
                    want.set(&k, &v)
                        .unwrap_or_else(|e| panic!("accepted {k}={v}: {e}"));
                }
                assert_eq!(want, after, "the change applied is not the one asked");
            } else {
                assert_eq!(before, after, "{method} /config changed knobs");
            }
        }
        p => panic!("200 for {p:?}"),
    }
}
