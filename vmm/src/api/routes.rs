//! The control API's requests and replies, without the HTTP server: a method, a URL and a body
//! in, a status, a content type and a body out. Every bad request gets a 4xx with a JSON
//! `{"error": "..."}` that says what is wrong.

use serde_json::{Map, Value, json};

use crate::control::{self, Control, Knobs};
use crate::metrics;
use crate::report::Report;

/// Largest request body accepted, in bytes.
pub const MAX_BODY: usize = 64 << 10;

/// JSON content type.
pub const JSON: &str = "application/json";
/// Prometheus text content type.
pub const PROMETHEUS: &str = "text/plain; version=0.0.4";

/// The endpoints, for error messages.
const ENDPOINTS: &str =
    "GET /stats, GET /config, PUT or PATCH /config, POST /unmerge, GET /metrics";

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Content type of `body`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
    /// Methods allowed, for a 405.
    pub allow: Option<&'static str>,
}

impl Reply {
    fn json(status: u16, value: &Value) -> Self {
        Self {
            status,
            content_type: JSON,
            body: format!("{value:#}\n"),
            allow: None,
        }
    }

    fn report(status: u16, report: &Report) -> Self {
        Self {
            status,
            content_type: JSON,
            body: report.to_json(),
            allow: None,
        }
    }

    /// An error reply: `{"error": message}`.
    pub fn error(status: u16, message: impl std::fmt::Display) -> Self {
        Self::json(status, &json!({ "error": message.to_string() }))
    }

    fn not_allowed(method: &str, path: &str, allow: &'static str) -> Self {
        // The method is the client's text: escape what would break the message's line.
        let method = method.escape_debug();
        Self {
            allow: Some(allow),
            ..Self::error(
                405,
                format!("{method} is not allowed on {path}: use {allow}"),
            )
        }
    }
}

fn control_error(e: control::Error) -> Reply {
    match e {
        control::Error::Invalid(m) => Reply::error(400, m),
        control::Error::Conflict(m) => Reply::error(409, m),
        control::Error::Failed(m) => Reply::error(500, m),
    }
}

/// Knobs as a JSON object: numbers as numbers, everything else as text.
fn knobs_json(mode: &str, knobs: &Knobs) -> Value {
    let mut m = Map::new();
    m.insert("mode".into(), Value::from(mode));
    for (k, v) in knobs {
        let value = v
            .parse::<i64>()
            .map_or_else(|_| Value::from(v.as_str()), Value::from);
        m.insert((*k).to_string(), value);
    }
    Value::Object(m)
}

/// Reads a `PUT`/`PATCH /config` body: a JSON object of knob names to numbers, strings or
/// booleans.
pub fn parse_changes(body: &[u8]) -> Result<Vec<(String, String)>, String> {
    let example = r#"send a JSON object of knobs, e.g. {"pages_to_scan": 1000, "run": 1}"#;
    let text = std::str::from_utf8(body).map_err(|_| format!("body is not UTF-8: {example}"))?;
    if text.trim().is_empty() {
        return Err(format!("empty body: {example}"));
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| format!("body is not valid JSON ({e}): {example}"))?;
    let Value::Object(map) = value else {
        return Err(format!("body is not a JSON object: {example}"));
    };
    if map.is_empty() {
        return Err(format!("no knobs given: {example}"));
    }
    map.into_iter()
        .map(|(k, v)| {
            let text = match v {
                Value::Number(n) => whole(&n)
                    .ok_or_else(|| format!("{k}: {n} is not a whole number of 0 or more"))?,
                Value::String(s) => s,
                // Flags take `true`/`false` as text too; other knobs refuse them.
                Value::Bool(b) => b.to_string(),
                _ => return Err(format!("{k}: give a number, a string or a boolean")),
            };
            Ok((k, text))
        })
        .collect()
}

/// A JSON number as a whole number's text: `1000`, `1e3` and `1000.0` all give `1000`.
fn whole(n: &serde_json::Number) -> Option<String> {
    if let Some(v) = n.as_u64() {
        return Some(v.to_string());
    }
    // Beyond 2^53 a float no longer holds every whole number.
    let f = n.as_f64()?;
    (f >= 0.0 && f.fract() == 0.0 && f <= 9_007_199_254_740_992.0).then(|| (f as u64).to_string())
}

/// Handles one request.
pub fn handle(control: &dyn Control, method: &str, url: &str, body: &[u8]) -> Reply {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    let path = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    match (path, method) {
        ("/stats", "GET") => Reply::report(200, &control.stats()),
        ("/stats", m) => Reply::not_allowed(m, path, "GET"),
        ("/config", "GET") => Reply::json(
            200,
            &knobs_json(control.stats().mode.name(), &control.config()),
        ),
        ("/config", "PUT" | "PATCH") => match parse_changes(body) {
            Ok(changes) => match control.update(&changes) {
                Ok(knobs) => Reply::json(200, &knobs_json(control.stats().mode.name(), &knobs)),
                Err(e) => control_error(e),
            },
            Err(m) => Reply::error(400, m),
        },
        ("/config", m) => Reply::not_allowed(m, path, "GET, PUT, PATCH"),
        ("/unmerge", "POST") => match control.unmerge_all() {
            Ok(report) => Reply::report(200, &report),
            Err(e) => control_error(e),
        },
        ("/unmerge", m) => Reply::not_allowed(m, path, "POST"),
        ("/metrics", "GET") => Reply {
            status: 200,
            content_type: PROMETHEUS,
            body: metrics::render(&control.stats()),
            allow: None,
        },
        ("/metrics", m) => Reply::not_allowed(m, path, "GET"),
        (p, _) => Reply::error(404, format!("no endpoint {p:?}; endpoints: {ENDPOINTS}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Counts, Mode};
    use std::sync::Mutex;

    /// A control that keeps one knob and counts unmerges.
    #[derive(Default)]
    struct Fake {
        pages_to_scan: Mutex<u64>,
        unmerged: Mutex<u32>,
    }

    impl Control for Fake {
        fn stats(&self) -> Report {
            Report {
                mode: Mode::Dedup,
                counts: Counts {
                    pages_sharing: 42,
                    ..Counts::default()
                },
                ..Report::default()
            }
        }
        fn config(&self) -> Knobs {
            vec![
                (
                    "pages_to_scan",
                    self.pages_to_scan.lock().unwrap().to_string(),
                ),
                ("vma_budget", "auto".into()),
            ]
        }
        fn update(&self, changes: &[(String, String)]) -> Result<Knobs, control::Error> {
            for (k, v) in changes {
                match k.as_str() {
                    "pages_to_scan" => {
                        *self.pages_to_scan.lock().unwrap() = v
                            .parse()
                            .map_err(|_| control::Error::Invalid(format!("bad value {v:?}")))?;
                    }
                    "max_page_sharing" => {
                        return Err(control::Error::Conflict("busy".into()));
                    }
                    _ => return Err(control::Error::Invalid(format!("unknown knob {k:?}"))),
                }
            }
            Ok(self.config())
        }
        fn unmerge_all(&self) -> Result<Report, control::Error> {
            *self.unmerged.lock().unwrap() += 1;
            Ok(self.stats())
        }
    }

    fn body(r: &Reply) -> Value {
        serde_json::from_str(&r.body).unwrap()
    }

    #[test]
    fn stats_config_metrics_and_unmerge() {
        let f = Fake::default();
        let r = handle(&f, "GET", "/stats", b"");
        assert_eq!((r.status, r.content_type), (200, JSON));
        assert_eq!(body(&r)["pages_sharing"], 42);
        assert_eq!(handle(&f, "GET", "/stats?pretty=1", b"").status, 200);
        assert_eq!(handle(&f, "GET", "/stats/", b"").status, 200);

        let r = handle(&f, "GET", "/config", b"");
        assert_eq!(
            body(&r),
            json!({"mode": "dedup", "pages_to_scan": 0, "vma_budget": "auto"})
        );

        let r = handle(&f, "PATCH", "/config", br#"{"pages_to_scan": 1000}"#);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(body(&r)["pages_to_scan"], 1000);
        let r = handle(&f, "PUT", "/config", br#"{"pages_to_scan": "77"}"#);
        assert_eq!(body(&r)["pages_to_scan"], 77);

        let r = handle(&f, "POST", "/unmerge", b"");
        assert_eq!(r.status, 200);
        assert_eq!(*f.unmerged.lock().unwrap(), 1);

        let r = handle(&f, "GET", "/metrics", b"");
        assert_eq!((r.status, r.content_type), (200, PROMETHEUS));
        assert!(r.body.contains("vmm_pages_sharing{mode=\"dedup\""));
    }

    #[test]
    fn bad_requests_get_4xx_with_a_message() {
        let f = Fake::default();
        let cases: &[(&str, &str, &[u8], u16, &str)] = &[
            ("GET", "/nope", b"", 404, "endpoints: GET /stats"),
            ("GET", "", b"", 404, "endpoints"),
            ("DELETE", "/stats", b"", 405, "use GET"),
            ("GET", "/unmerge", b"", 405, "use POST"),
            ("POST", "/config", b"{}", 405, "GET, PUT, PATCH"),
            ("PATCH", "/config", b"", 400, "empty body"),
            ("PATCH", "/config", b"{not json", 400, "not valid JSON"),
            ("PATCH", "/config", b"[1, 2]", 400, "not a JSON object"),
            ("PATCH", "/config", b"{}", 400, "no knobs"),
            ("PATCH", "/config", b"\xff\xfe", 400, "not UTF-8"),
            (
                "PATCH",
                "/config",
                br#"{"pages_to_scan": null}"#,
                400,
                "pages_to_scan",
            ),
            (
                "PATCH",
                "/config",
                br#"{"pages_to_scan": [1]}"#,
                400,
                "a number",
            ),
            (
                "PATCH",
                "/config",
                br#"{"pages_to_scan": "x"}"#,
                400,
                "bad value",
            ),
            ("PATCH", "/config", br#"{"frob": 1}"#, 400, "unknown knob"),
            (
                "PATCH",
                "/config",
                br#"{"max_page_sharing": 2}"#,
                409,
                "busy",
            ),
        ];
        for &(method, url, b, status, says) in cases {
            let r = handle(&f, method, url, b);
            assert_eq!(r.status, status, "{method} {url}: {}", r.body);
            assert_eq!(r.content_type, JSON);
            let msg = body(&r)["error"].as_str().unwrap().to_string();
            assert!(msg.contains(says), "{method} {url}: {msg}");
        }
        let r = handle(&f, "PUT", "/unmerge", b"");
        assert_eq!(r.allow, Some("POST"));
        // Found by the api_http fuzz target: a method holding a newline went into the message
        // as it was.
        let r = handle(&f, "\u{1}/\n", "/stats", b"");
        assert_eq!(r.status, 405);
        let msg = body(&r)["error"].as_str().unwrap().to_string();
        assert!(!msg.chars().any(char::is_control), "{msg:?}");
        assert!(
            msg.starts_with("\\u{1}/\\n is not allowed on /stats"),
            "{msg:?}"
        );
    }

    #[test]
    fn booleans_stay_booleans_and_numbers_must_be_whole() {
        // Flags take true/false as text (vm_dedup::Config parses them); a number knob does not.
        let c = parse_changes(br#"{"use_zero_pages": false, "merge_across_nodes": true}"#).unwrap();
        assert!(c.contains(&("use_zero_pages".into(), "false".into())));
        assert!(c.contains(&("merge_across_nodes".into(), "true".into())));
        let mut engine = vm_dedup::Config::default();
        for (k, v) in &c {
            engine.set(k, v).unwrap();
        }
        assert!(!engine.use_zero_pages && engine.merge_across_nodes);
        let c = parse_changes(br#"{"pages_to_scan": true}"#).unwrap();
        assert!(engine.set(&c[0].0, &c[0].1).is_err());
        for (body, want) in [
            (&br#"{"pages_to_scan": 1e3}"#[..], "1000"),
            (br#"{"pages_to_scan": 1000.0}"#, "1000"),
            (
                br#"{"pages_to_scan": 18446744073709551615}"#,
                "18446744073709551615",
            ),
        ] {
            assert_eq!(parse_changes(body).unwrap()[0].1, want);
        }
        for body in [
            &br#"{"pages_to_scan": 1.5}"#[..],
            br#"{"pages_to_scan": -1}"#,
            br#"{"pages_to_scan": 1e300}"#,
        ] {
            let e = parse_changes(body).unwrap_err();
            assert!(e.contains("not a whole number"), "{e}");
        }
    }
}
