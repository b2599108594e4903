//! A client of the `vmm` control API (`--api-sock`): HTTP/1.1 over a unix socket, one request
//! per connection (`Connection: close`), JSON bodies read with serde_json.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::wait_until;

/// The fields `GET /stats` documents at the top level and for every guest (besides `name` and
/// `domain` per guest, and `guests` at the top).
pub const STATS_FIELDS: &[&str] = &[
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "pages_scanned",
    "full_scans",
    "zero_pages",
    "cow_breaks",
    "general_profit",
    "bytes_saved",
];

/// A reply from the API.
#[derive(Debug, Clone)]
pub struct ApiReply {
    /// HTTP status.
    pub status: u16,
    /// Headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl ApiReply {
    /// The body as JSON.
    ///
    /// # Panics
    /// When it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("reply {} is not JSON ({e}): {:?}", self.status, self.body))
    }

    /// The value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `error` message of a JSON error reply.
    ///
    /// # Panics
    /// When the body is not `{"error": "..."}`.
    pub fn error(&self) -> String {
        let v = self.json();
        v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("reply {} has no error message: {v}", self.status))
            .to_string()
    }
}

/// Parses a whole HTTP/1.1 response.
///
/// # Panics
/// When it is not one.
pub fn parse_response(raw: &[u8]) -> ApiReply {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = match headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        Some(n) => body.get(..n).unwrap_or(body).to_string(),
        None => body.to_string(),
    };
    ApiReply {
        status,
        headers,
        body,
    }
}

/// A client of one VMM's API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    path: PathBuf,
}

impl ApiClient {
    /// A client of the socket at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// A client of the socket at `path`, once it accepts connections.
    ///
    /// # Panics
    /// When it does not within the hang guard.
    pub fn ready(path: impl Into<PathBuf>) -> Self {
        let api = Self::new(path);
        api.wait_ready();
        api
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits until the socket accepts connections.
    ///
    /// # Panics
    /// When it does not within the hang guard.
    pub fn wait_ready(&self) {
        wait_until(
            &format!("the API socket {}", self.path.display()),
            || UnixStream::connect(&self.path).is_ok(),
            String::new,
        );
    }

    /// Sends `raw` bytes as they are and returns the parsed response.
    ///
    /// # Panics
    /// When the socket cannot be used or the response does not parse.
    pub fn raw(&self, raw: &[u8]) -> ApiReply {
        let mut s = UnixStream::connect(&self.path)
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.path.display()));
        s.write_all(raw)
            .unwrap_or_else(|e| panic!("cannot send a request: {e}"));
        let mut out = Vec::new();
        s.read_to_end(&mut out)
            .unwrap_or_else(|e| panic!("cannot read the response: {e}"));
        parse_response(&out)
    }

    /// Sends `method path` with an optional JSON `body`.
    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> ApiReply {
        let body = body.unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.raw(request.as_bytes())
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> ApiReply {
        self.request("GET", path, None)
    }

    /// `GET /stats`, which must succeed.
    ///
    /// # Panics
    /// When it does not answer 200 with JSON.
    pub fn stats(&self) -> Value {
        let r = self.get("/stats");
        assert_eq!(r.status, 200, "GET /stats: {}", r.body);
        r.json()
    }

    /// `GET /config`, which must succeed.
    ///
    /// # Panics
    /// When it does not answer 200 with JSON.
    pub fn config(&self) -> Value {
        let r = self.get("/config");
        assert_eq!(r.status, 200, "GET /config: {}", r.body);
        r.json()
    }

    /// Waits until `GET /config` satisfies `done`, and returns it.
    ///
    /// # Panics
    /// When it does not within the hang guard.
    pub fn wait_config(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let last = RefCell::new(Value::Null);
        wait_until(
            what,
            || {
                let config = self.config();
                let ok = done(&config);
                *last.borrow_mut() = config;
                ok
            },
            || format!("config: {}", last.borrow()),
        );
        last.into_inner()
    }

    /// Waits until `GET /stats` satisfies `done`, and returns it.
    ///
    /// # Panics
    /// When it does not within the hang guard.
    pub fn wait_stats(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let last = RefCell::new(Value::Null);
        wait_until(
            what,
            || {
                let stats = self.stats();
                let ok = done(&stats);
                *last.borrow_mut() = stats;
                ok
            },
            || format!("stats: {}", last.borrow()),
        );
        last.into_inner()
    }

    /// `PATCH /config` with `body`.
    pub fn patch_config(&self, body: &str) -> ApiReply {
        self.request("PATCH", "/config", Some(body))
    }

    /// `PATCH /config` with `body`, which must succeed; returns the new config.
    ///
    /// # Panics
    /// When it does not answer 200.
    pub fn set(&self, body: &str) -> Value {
        let r = self.patch_config(body);
        assert_eq!(r.status, 200, "PATCH /config {body}: {}", r.body);
        r.json()
    }
}

/// Field `name` of a statistics object as an unsigned number.
///
/// # Panics
/// When it is missing or not an unsigned number.
pub fn field(stats: &Value, name: &str) -> u64 {
    stats[name]
        .as_u64()
        .unwrap_or_else(|| panic!("{name} is not an unsigned number in {stats}"))
}

/// How much field `name` grew (or shrank) from `before` to `after`.
///
/// # Panics
/// When it is missing or not an unsigned number in either.
pub fn delta(after: &Value, before: &Value, name: &str) -> i64 {
    field(after, name) as i64 - field(before, name) as i64
}

/// The statistics of guest `name` in a `GET /stats` object.
///
/// # Panics
/// When there is no such guest.
pub fn guest_stats<'a>(stats: &'a Value, name: &str) -> &'a Value {
    stats["guests"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["name"] == name))
        .unwrap_or_else(|| panic!("no guest {name} in {stats}"))
}

/// Asserts that a statistics object has every documented field, at the top and per guest.
///
/// # Panics
/// When a field is missing or has the wrong type.
pub fn assert_stats_shape(stats: &Value) {
    for f in STATS_FIELDS {
        assert!(
            stats[f].is_u64() || (*f == "general_profit" && stats[f].is_i64()),
            "top-level {f} missing or not a number in {stats}"
        );
    }
    let guests = stats["guests"]
        .as_array()
        .unwrap_or_else(|| panic!("no guests list in {stats}"));
    assert!(!guests.is_empty(), "empty guests list in {stats}");
    for g in guests {
        assert!(g["name"].is_string(), "guest without a name: {g}");
        assert!(g["domain"].is_string(), "guest without a domain: {g}");
        for f in STATS_FIELDS {
            assert!(
                g[f].is_u64() || (*f == "general_profit" && g[f].is_i64()),
                "guest {f} missing or not a number in {g}"
            );
        }
    }
}

/// Waits until the engine has completed `passes` more full scans than in `since`, and returns
/// the statistics then.
///
/// # Panics
/// When it does not happen within the hang guard.
pub fn after_passes(api: &ApiClient, since: &Value, passes: u64) -> Value {
    let target = field(since, "full_scans") + passes;
    let last = RefCell::new(since.clone());
    wait_until(
        &format!("{passes} more full scans"),
        || {
            let now = api.stats();
            let done = field(&now, "full_scans") >= target;
            *last.borrow_mut() = now;
            done
        },
        || format!("{}", last.borrow()),
    );
    last.into_inner()
}

/// Waits until the merge figures stay the same across two full scans in a row, and returns
/// the statistics then.
///
/// # Panics
/// When they do not settle within the hang guard.
pub fn settled(api: &ApiClient) -> Value {
    let figures = |s: &Value| {
        [
            "pages_shared",
            "pages_sharing",
            "pages_unshared",
            "pages_volatile",
            "zero_pages",
            "cow_breaks",
        ]
        .map(|f| field(s, f))
    };
    let last = RefCell::new(api.stats());
    wait_until(
        "merge figures to settle",
        || {
            let before = last.borrow().clone();
            let after = after_passes(api, &before, 2);
            let same = figures(&before) == figures(&after);
            *last.borrow_mut() = after;
            same
        },
        || format!("{}", last.borrow()),
    );
    last.into_inner()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // test code
mod tests {
    use super::*;

    #[test]
    fn responses_parse_with_status_headers_and_body() {
        let r = parse_response(
            b"HTTP/1.1 405 Method Not Allowed\r\nContent-Type: application/json\r\nAllow: GET\r\n\
              Content-Length: 15\r\n\r\n{\"error\": \"x\"}\n",
        );
        assert_eq!(r.status, 405);
        assert_eq!(r.header("allow"), Some("GET"));
        assert_eq!(r.header("Content-Type"), Some("application/json"));
        assert_eq!(r.error(), "x");
    }

    #[test]
    fn stats_shape_is_checked() {
        let mut v = serde_json::json!({"guests": [{"name": "g", "domain": "d"}]});
        for f in STATS_FIELDS {
            v[f] = 0.into();
            v["guests"][0][f] = 0.into();
        }
        v["general_profit"] = (-5).into();
        assert_stats_shape(&v);
        v["guests"][0].as_object_mut().unwrap().remove("cow_breaks");
        assert!(std::panic::catch_unwind(|| assert_stats_shape(&v)).is_err());
    }
}
