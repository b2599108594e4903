//! The control API over its real socket: arbitrary bytes, or HTTP requests built from arbitrary
//! methods, paths, versions, headers (Content-Length, Transfer-Encoding, Expect, ...) and
//! bodies up to past the 64 KiB limit, sent to a running `ApiServer` serving a `--dedup`
//! engine. Every response is one well-formed HTTP/1.1 reply with a status below 500, and every
//! 4xx carries a JSON `{"error": "..."}` of one clear line; the server never hangs, never
//! panics and never aborts (tiny_http, used before, did on a huge Content-Length).
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmm::api::ApiServer;
use vmm::control::DedupControl;
use vmm::dedup::{Dedup, DedupConfig};
use vmm_fuzz::check_message;

const METHODS: &[&str] = &[
    "GET", "PUT", "PATCH", "POST", "DELETE", "HEAD", "OPTIONS", "get", "G E T", "",
];
const PATHS: &[&str] = &[
    "/stats",
    "/config",
    "/unmerge",
    "/metrics",
    "/",
    "*",
    "http://localhost/stats",
    "/config?x=1",
    "%2fstats",
    "",
];
const VERSIONS: &[&str] = &[
    "HTTP/1.1",
    "HTTP/1.0",
    "HTTP/2.0",
    "HTTP/0.9",
    "HTTP/1.2",
    "",
    "http/1.1",
    "HTTP/1.1 extra",
];
const HEADERS: &[&str] = &[
    "Content-Length",
    "Transfer-Encoding",
    "Expect",
    "Connection",
    "Host",
    "Content-Type",
    "Accept",
    "Upgrade",
    "X-Long",
];
const VALUES: &[&str] = &[
    "0",
    "1",
    "10",
    "65536",
    "65537",
    "18446744073709551615",
    "18446744073709551616",
    "-1",
    "chunked",
    "gzip",
    "identity",
    "chunked, gzip",
    "100-continue",
    "close",
    "keep-alive",
    "application/json",
    "",
    " ",
    "h2c",
    "localhost",
];

#[derive(Arbitrary, Debug)]
enum Text {
    Known(u8),
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Length {
    Exact,
    Missing,
    Value(u64),
}

#[derive(Arbitrary, Debug)]
struct Request {
    method: Text,
    path: Text,
    version: Text,
    headers: Vec<(Text, Text)>,
    length: Length,
    chunked: bool,
    body: Vec<u8>,
    /// Extra body bytes (`{`-filled), to pass the 64 KiB limit.
    pad: u32,
}

#[derive(Arbitrary, Debug)]
enum Input {
    Raw(Vec<u8>),
    Requests(Vec<Request>),
}

fn pick(t: &Text, list: &[&str]) -> String {
    match t {
        Text::Known(i) => list[usize::from(*i) % list.len()].to_string(),
        Text::Other(s) => s.clone(),
    }
}

fn encode(r: &Request) -> Vec<u8> {
    let mut body = r.body.clone();
    body.resize(body.len() + (r.pad % (80 << 10)) as usize, b'{');
    let mut out = format!(
        "{} {} {}\r\n",
        pick(&r.method, METHODS),
        pick(&r.path, PATHS),
        pick(&r.version, VERSIONS)
    )
    .into_bytes();
    for (k, v) in r.headers.iter().take(16) {
        out.extend_from_slice(format!("{}: {}\r\n", pick(k, HEADERS), pick(v, VALUES)).as_bytes());
    }
    if r.chunked {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
        for chunk in body.chunks(7000) {
            out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            out.extend_from_slice(chunk);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        return out;
    }
    match r.length {
        Length::Exact => {
            out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes())
        }
        Length::Missing => {}
        Length::Value(n) => out.extend_from_slice(format!("Content-Length: {n}\r\n").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    out
}

struct Served {
    path: PathBuf,
    _server: ApiServer,
    _dedup: Dedup,
}

fn server() -> &'static Served {
    static SERVED: OnceLock<Served> = OnceLock::new();
    SERVED.get_or_init(|| {
        let mut config = DedupConfig::default();
        config.settings.engine.threads = 1;
        let dedup = Dedup::new(&config, &[]).unwrap_or_else(|e| panic!("engine: {e}"));
        let control = Arc::new(DedupControl(Arc::clone(dedup.shared())));
        let path = std::env::temp_dir().join(format!("vmm-fuzz-api-{}.sock", std::process::id()));
        let server = ApiServer::start(&path, control).unwrap_or_else(|e| panic!("server: {e}"));
        Served {
            path,
            _server: server,
            _dedup: dedup,
        }
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Checks every response in `data`; returns how many there were.
fn check_responses(sent: &[u8], mut data: &[u8]) -> usize {
    let mut n = 0;
    while !data.is_empty() {
        let head_end = find(data, b"\r\n\r\n").unwrap_or_else(|| {
            panic!(
                "truncated response head: {:?}",
                String::from_utf8_lossy(data)
            )
        });
        let head = String::from_utf8_lossy(&data[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        // tiny_http echoes the request's version, 0.9 included.
        assert!(
            version.starts_with("HTTP/"),
            "bad status line {status_line:?}"
        );
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut length = 0usize;
        let mut json = false;
        for l in lines {
            let (k, v) = l.split_once(':').unwrap_or((l, ""));
            if k.eq_ignore_ascii_case("content-length") {
                length = v
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("bad length {l:?}"));
            }
            if k.eq_ignore_ascii_case("content-type") && v.trim() == "application/json" {
                json = true;
            }
        }
        let body_start = head_end + 4;
        if (100..200).contains(&status) {
            // An interim reply (100 Continue): no body, the real one follows.
            data = &data[body_start..];
            continue;
        }
        let rest = &data[body_start..];
        // A reply to HEAD has the length of a body it does not carry.
        let bodiless = rest.is_empty() || rest.starts_with(b"HTTP/");
        let length = if bodiless { 0 } else { length };
        let body_end = (body_start + length).min(data.len());
        let body = &data[body_start..body_end];
        assert!(
            status < 500,
            "status {status} for {:?}: {}",
            String::from_utf8_lossy(&sent[..sent.len().min(600)]),
            String::from_utf8_lossy(body)
        );
        assert!(status < 400 || json, "a {status} without a JSON error");
        if status >= 400 && !bodiless {
            let v: serde_json::Value =
                serde_json::from_slice(body).unwrap_or_else(|e| panic!("error body: {e}"));
            let msg = v["error"]
                .as_str()
                .unwrap_or_else(|| panic!("no error field: {v}"));
            check_message(&format!("status {status}"), msg);
        }
        data = &data[body_end..];
        n += 1;
    }
    n
}

fuzz_target!(|input: Input| {
    let served = server();
    let bytes = match &input {
        Input::Raw(b) => b.clone(),
        Input::Requests(rs) => rs.iter().take(4).flat_map(encode).collect(),
    };
    let mut s = UnixStream::connect(&served.path).unwrap_or_else(|e| panic!("connect: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap_or_default();
    s.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap_or_default();
    // The server may answer (413) and close before reading everything.
    let _ = s.write_all(&bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut reply = Vec::new();
    match s.read_to_end(&mut reply) {
        Ok(_) => {}
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            panic!(
                "no answer within 10 s to {:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(600)])
            )
        }
        Err(_) => {} // reset by the server after an early answer
    }
    let n = check_responses(&bytes, &reply);
    assert!(n <= 1, "{n} replies on one connection");
});
