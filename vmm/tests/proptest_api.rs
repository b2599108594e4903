//! The control API's request handling as a property test (the `api` fuzz target's properties;
//! see docs/fuzzing.md), against a real `--dedup` engine whose guests' memory is filled,
//! scanned and written between requests: every bad request gets a 4xx with a JSON error of
//! one line, never a 5xx; refused changes change nothing; `GET /config` is what is in force;
//! the statistics add up and match the pages actually merged; memory keeps its content. The
//! checks are shared with the fuzz target (`properties/api.rs`); this file only makes the
//! inputs. Also the HTTP layer without the socket (the `api_http` target's properties).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use proptest::prelude::*;
use serde_json::{Map, Value};
use vmm::api::routes;

#[path = "properties/message.rs"]
mod message;
#[path = "properties/api.rs"]
mod property;

use property::{DOMAINS, METHODS, Op, PAGE, PATHS, SUFFIXES, Session, WORDS, knob_names};

/// The content of a page for `seed`: zeros for 0, else a pattern of its own.
fn page(seed: u8) -> Vec<u8> {
    let mut p = vec![0u8; PAGE];
    if seed != 0 {
        for (i, b) in p.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31) ^ seed;
        }
    }
    p
}

/// Knob values: words worth trying, numbers, and JSON of every other kind.
fn json_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => proptest::sample::select(WORDS).prop_map(Value::from),
        3 => (0u64..70_000).prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<bool>().prop_map(Value::from),
        1 => Just(Value::Null),
        1 => Just(Value::Array(vec![Value::from(1)])),
        1 => any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
    ]
}

/// Request bodies: mostly JSON objects of knobs, sometimes bytes or a JSON array.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let key = prop_oneof![
        5 => proptest::sample::select(knob_names()).prop_map(str::to_string),
        1 => "[a-z_ ]{0,10}",
    ];
    prop_oneof![
        4 => proptest::collection::vec((key, json_value()), 0..4).prop_map(|kv| {
            serde_json::to_vec(&Value::Object(kv.into_iter().collect::<Map<_, _>>())).unwrap()
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..40),
        1 => Just(b"[1]".to_vec()),
    ]
}

/// Steps: mostly requests to the endpoints and near misses, passes and guest writes.
fn op() -> impl Strategy<Value = Op> {
    let method = prop_oneof![
        5 => proptest::sample::select(METHODS).prop_map(str::to_string),
        1 => "[ -~]{0,8}",
    ];
    let url = prop_oneof![
        5 => (proptest::sample::select(PATHS), proptest::sample::select(SUFFIXES))
            .prop_map(|(p, s)| format!("{p}{s}")),
        1 => "[ -~]{0,16}",
    ];
    prop_oneof![
        5 => (method, url, body()).prop_map(|(method, url, body)| Op::Request { method, url, body }),
        2 => Just(Op::Scan),
        2 => (0usize..3, 0usize..16, 0u8..5).prop_map(|(guest, page, seed)| Op::Write { guest, page, seed }),
    ]
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

/// Request heads: known request lines and headers (huge, bad and unsupported lengths,
/// chunked, `Expect`) or printable junk, then a few body bytes.
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
                property::error_of(&reply);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn requests_get_answers_and_stats_add_up(
        layout in proptest::collection::vec(
            (proptest::sample::select(DOMAINS), proptest::collection::vec(0u8..5, 1..16)),
            1..4,
        ),
        ops in proptest::collection::vec(op(), 1..16),
    ) {
        let mut session = Session::new(&layout, page);
        for op in &ops {
            session.step(op);
        }
        session.finish();
    }
}
