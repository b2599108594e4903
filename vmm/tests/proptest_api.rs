//! The control API's request handling as a property test (the `api` fuzz target's properties;
//! see docs/fuzzing.md), against a real `--dedup` engine whose guests' memory is filled,
//! scanned and written between requests: every bad request gets a 4xx with a JSON error of
//! one line, never a 5xx; refused changes change nothing; `GET /config` is what is in force;
//! the statistics add up and match the pages actually merged; memory keeps its content.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::sync::Arc;

use proptest::prelude::*;
use serde_json::{Map, Value};
use vm_dedup::{GuestConfig, GuestId};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::api::routes::{self, JSON};
use vmm::control::{Control, DedupControl};
use vmm::dedup::settings::{Settings, TUNE_KNOBS};
use vmm::dedup::{Dedup, DedupConfig};
use vmm::report::Report;

type Mem = GuestMemoryMmap<()>;
const PAGE: usize = 4096;

const METHODS: &[&str] = &[
    "GET",
    "PUT",
    "PATCH",
    "POST",
    "DELETE",
    "HEAD",
    "X",
    "G\nE\u{1}T",
];
const PATHS: &[&str] = &[
    "/stats",
    "/config",
    "/unmerge",
    "/metrics",
    "/config/",
    "/stats?x=1",
    "/",
    "",
    "/nope",
];
const VALUES: &[&str] = &[
    "0", "1", "2", "16", "64", "256", "512", "513", "65536", "auto", "fixed", "advisor",
    "pressure", "stop", "unmerge", "on", "", "-1", "1.5", "x",
];

fn page(seed: u8) -> Vec<u8> {
    let mut p = vec![0u8; PAGE];
    if seed != 0 {
        for (i, b) in p.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31) ^ seed;
        }
    }
    p
}

#[derive(Debug, Clone)]
enum Op {
    Request(String, String, Vec<u8>),
    Scan,
    Write(usize, usize, u8),
}

fn json_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => proptest::sample::select(VALUES).prop_map(Value::from),
        3 => (0u64..70_000).prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<bool>().prop_map(Value::from),
        1 => Just(Value::Null),
        1 => Just(Value::Array(vec![Value::from(1)])),
        1 => any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    let names: Vec<String> = vm_dedup::config::KNOBS
        .iter()
        .chain(TUNE_KNOBS)
        .map(|s| (*s).to_string())
        .collect();
    let key = prop_oneof![5 => proptest::sample::select(names), 1 => "[a-z_ ]{0,10}"];
    prop_oneof![
        4 => proptest::collection::vec((key, json_value()), 0..4).prop_map(|kv| {
            serde_json::to_vec(&Value::Object(kv.into_iter().collect::<Map<_, _>>())).unwrap()
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..40),
        1 => Just(b"[1]".to_vec()),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (proptest::sample::select(METHODS), proptest::sample::select(PATHS), body())
            .prop_map(|(m, p, b)| Op::Request(m.to_string(), p.to_string(), b)),
        2 => Just(Op::Scan),
        2 => (0usize..3, 0usize..16, 0u8..5).prop_map(|(g, p, s)| Op::Write(g, p, s)),
    ]
}

fn check_report(r: &Report) {
    let c = &r.counts;
    assert_eq!(c.bytes_saved, (c.pages_sharing + c.zero_pages) * 4096);
    let e = r.engine.unwrap();
    assert_eq!(
        c.general_profit,
        c.bytes_saved as i64 - e.metadata_bytes as i64
    );
    let sum = |f: fn(&vmm::report::GuestReport) -> u64| r.guests.iter().map(f).sum::<u64>();
    assert_eq!(sum(|g| g.counts.pages_shared), c.pages_shared);
    assert_eq!(sum(|g| g.counts.pages_sharing), c.pages_sharing);
    assert_eq!(sum(|g| g.counts.zero_pages), c.zero_pages);
    assert_eq!(sum(|g| g.counts.bytes_saved), c.bytes_saved);
    assert_eq!(sum(|g| g.pages), r.pages);
}

fn check_merged(dedup: &Dedup, ids: &[GuestId]) {
    let r = DedupControl(Arc::clone(dedup.shared())).stats();
    check_report(&r);
    let mut zero = 0;
    let mut slots = std::collections::HashMap::new();
    for &id in ids {
        for m in dedup.engine().merged_pages(id).unwrap() {
            match m.slot {
                None => zero += 1,
                Some(s) => *slots.entry(s).or_insert(0u64) += 1,
            }
        }
    }
    assert_eq!(r.counts.zero_pages, zero);
    assert_eq!(r.counts.pages_shared, slots.len() as u64);
    assert_eq!(
        r.counts.pages_shared + r.counts.pages_sharing,
        slots.values().sum::<u64>()
    );
}

fn request(control: &DedupControl, method: &str, url: &str, body: &[u8]) {
    let before = control.0.settings();
    let reply = routes::handle(control, method, url, body);
    let after = control.0.settings();
    assert!(
        (200..500).contains(&reply.status),
        "{method} {url} {:?}: {} {}",
        String::from_utf8_lossy(body),
        reply.status,
        reply.body
    );
    if reply.status >= 400 {
        assert_eq!(reply.content_type, JSON);
        let v: Value = serde_json::from_str(&reply.body).unwrap();
        let msg = v["error"].as_str().unwrap();
        assert!(
            !msg.is_empty() && !msg.chars().any(char::is_control),
            "{msg:?}"
        );
        assert_eq!(before, after, "a refused request changed knobs: {msg}");
        return;
    }
    let path = url.split('?').next().unwrap().trim_end_matches('/');
    if path == "/config" {
        let v: Value = serde_json::from_str(&reply.body).unwrap();
        let mut back = Settings::default();
        for (k, val) in v.as_object().unwrap().iter().filter(|(k, _)| *k != "mode") {
            let text = val.as_str().map_or_else(|| val.to_string(), str::to_string);
            back.set(k, &text).unwrap();
        }
        assert_eq!(back, after, "GET /config is not what is in force");
        if method != "GET" {
            let mut want = before;
            for (k, v) in routes::parse_changes(body).unwrap() {
                want.set(&k, &v).unwrap();
            }
            assert_eq!(want, after, "the change applied is not the one asked");
        }
    }
}

/// A client connection: the request bytes in, the reply out.
struct Conn(std::io::Cursor<Vec<u8>>, Vec<u8>);

impl std::io::Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl std::io::Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.1.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn head_text() -> impl Strategy<Value = Vec<u8>> {
    let line = prop_oneof![
        proptest::sample::select(vec![
            "GET /stats HTTP/1.1",
            "PATCH /config HTTP/1.1",
            "GET /stats HTTP/2.0",
            "GET /stats",
            "get /x HTTP/1.0",
            "",
        ])
        .prop_map(str::to_string),
        "[ -~]{0,30}",
    ];
    let header = prop_oneof![
        proptest::sample::select(vec![
            "Content-Length: 2",
            "Content-Length: 99999999999999999999",
            "Content-Length: x",
            "Content-Length: 70000",
            "Transfer-Encoding: chunked",
            "Expect: 100-continue",
            "Expect: other",
            "Host: localhost",
            "no colon",
        ])
        .prop_map(str::to_string),
        "[ -~]{0,20}",
    ];
    (
        line,
        proptest::collection::vec(header, 0..4),
        proptest::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(|(l, hs, body)| {
            let mut out = format!("{l}\r\n{}\r\n", hs.join("\r\n")).into_bytes();
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&body);
            out
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// The API's HTTP layer (the `api_http` fuzz target's properties, without the socket):
    /// any bytes give a request or a 4xx with a JSON error of one line.
    #[test]
    fn any_bytes_give_a_request_or_a_4xx(
        bytes in prop_oneof![head_text(), proptest::collection::vec(any::<u8>(), 0..200)],
    ) {
        let mut conn = Conn(std::io::Cursor::new(bytes), Vec::new());
        match vmm::api::http::read_request(&mut conn) {
            Ok(Some((head, body))) => {
                prop_assert_eq!(body.len(), head.content_length);
                prop_assert!(head.content_length <= routes::MAX_BODY);
            }
            Ok(None) => {}
            Err(reply) => {
                prop_assert!((400..500).contains(&reply.status), "{}", reply.status);
                let v: Value = serde_json::from_str(&reply.body).unwrap();
                let msg = v["error"].as_str().unwrap();
                prop_assert!(!msg.is_empty() && !msg.chars().any(char::is_control), "{:?}", msg);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn requests_get_answers_and_stats_add_up(
        layout in proptest::collection::vec((0u8..3, proptest::collection::vec(0u8..5, 1..16)), 1..4),
        ops in proptest::collection::vec(op(), 1..16),
    ) {
        let mut config = DedupConfig::default();
        config.settings.engine.threads = 1;
        let dedup = Dedup::new(&config, &[]).unwrap();
        let mut guests: Vec<(GuestId, Arc<Mem>, Vec<u8>)> = Vec::new();
        for (i, (domain, seeds)) in layout.iter().enumerate() {
            let mem = Arc::new(Mem::from_ranges(&[(GuestAddress(0), seeds.len() * PAGE)]).unwrap());
            for (p, &s) in seeds.iter().enumerate() {
                mem.write_slice(&page(s), GuestAddress((p * PAGE) as u64)).unwrap();
            }
            let id = dedup
                .engine()
                .register(GuestConfig::new(format!("guest{i}"), format!("d{domain}")), Arc::clone(&mem))
                .unwrap();
            guests.push((id, mem, seeds.clone()));
        }
        let ids: Vec<GuestId> = guests.iter().map(|g| g.0).collect();
        let control = DedupControl(Arc::clone(dedup.shared()));
        for op in &ops {
            match op {
                Op::Request(m, u, b) => {
                    request(&control, m, u, b);
                    if m == "POST" && u == "/unmerge" {
                        check_merged(&dedup, &ids);
                    }
                }
                Op::Scan => {
                    dedup.engine().scan_pass().unwrap();
                    check_merged(&dedup, &ids);
                }
                Op::Write(g, p, s) => {
                    let (_, mem, seeds) = &mut guests[g % ids.len()];
                    let p = p % seeds.len();
                    mem.write_slice(&page(*s), GuestAddress((p * PAGE) as u64)).unwrap();
                    seeds[p] = *s;
                }
            }
            for (_, mem, seeds) in &guests {
                let mut buf = vec![0u8; PAGE];
                for (p, &s) in seeds.iter().enumerate() {
                    mem.read_slice(&mut buf, GuestAddress((p * PAGE) as u64)).unwrap();
                    prop_assert!(buf == page(s), "page {} lost its content", p);
                }
            }
            check_report(&control.stats());
        }
        for id in ids {
            dedup.engine().unregister(id).unwrap();
        }
    }
}
