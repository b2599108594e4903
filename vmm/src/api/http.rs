//! The control API's HTTP/1.1 framing: one request per connection, a body only with
//! `Content-Length` (at most [`MAX_BODY`]), the reply with `Content-Length` and
//! `Connection: close`. The request line and headers are parsed by `httparse` (hyper's
//! parser); this module adds the limits: every request that cannot be served gets a 4xx with a
//! JSON error, and a declared body larger than the limit is refused before anything of it is
//! read or allocated.
//!
//! (It replaces tiny_http 0.12, which aborted the whole process on a request declaring a
//! huge `Content-Length`, by allocating that much to drain it, and never answered a request
//! line of `HTTP/2.0`; both found by the `api_http` fuzz target, docs/fuzzing.md.)

use std::io::{self, Read, Write};

use super::routes::{MAX_BODY, Reply};

/// Largest request line and headers accepted, in bytes.
pub const MAX_HEAD: usize = 16 << 10;

/// Most headers in a request.
const MAX_HEADERS: usize = 64;

/// A request's line and the headers that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The method as sent.
    pub method: String,
    /// The request target (path and query).
    pub target: String,
    /// The declared body length (0 without `Content-Length`).
    pub content_length: usize,
    /// Whether the client waits for `100 Continue` before sending the body.
    pub expect_continue: bool,
}

/// The reason phrase of a status.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Text from the client, made safe to quote in a one-line message.
fn quoted(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(64)]);
    format!("{:?}", text)
}

/// The first line of what the client sent, for error messages.
fn first_line(bytes: &[u8]) -> &[u8] {
    let end = bytes
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(bytes.len());
    bytes[..end].strip_suffix(b"\r").unwrap_or(&bytes[..end])
}

/// Parses the request line and headers at the start of `buf`: `Ok(None)` while they are
/// incomplete, else the head and the length of the bytes it took (blank line included).
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, Reply> {
    let bad = |m: String| Reply::error(400, m);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::Version) => {
            return Err(bad(format!(
                "unsupported HTTP version in {}: use HTTP/1.1",
                quoted(first_line(buf))
            )));
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Reply::error(
                431,
                format!("more than {MAX_HEADERS} header fields"),
            ));
        }
        Err(e) => {
            return Err(bad(format!(
                "not an HTTP/1.1 request ({e}) in {}; send e.g. GET /stats HTTP/1.1",
                quoted(first_line(buf))
            )));
        }
    };
    // A complete parse always has both; a request line without them is not one.
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Err(bad("not an HTTP request line".into()));
    };
    let mut content_length: Option<usize> = None;
    let mut expect_continue = false;
    for h in request.headers.iter() {
        let value = String::from_utf8_lossy(h.value).trim().to_string();
        if h.name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(format!(
                    "bad Content-Length {}",
                    quoted(value.as_bytes())
                )));
            }
            // Too many digits for usize: larger than any limit anyway.
            let n: usize = value.parse().unwrap_or(usize::MAX);
            if content_length.is_some_and(|c| c != n) {
                return Err(bad("conflicting Content-Length headers".into()));
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Reply::error(
                411,
                "send the body with Content-Length (no Transfer-Encoding)",
            ));
        } else if h.name.eq_ignore_ascii_case("expect") {
            if !value.eq_ignore_ascii_case("100-continue") {
                return Err(Reply::error(
                    417,
                    format!("unsupported Expect {}", quoted(value.as_bytes())),
                ));
            }
            expect_continue = true;
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > MAX_BODY {
        return Err(Reply::error(
            413,
            format!("body larger than {MAX_BODY} bytes"),
        ));
    }
    let head = Head {
        method: method.to_string(),
        target: target.to_string(),
        content_length,
        expect_continue,
    };
    Ok(Some((head, len)))
}

/// The reply to a request that could not be read: 408 when the client took too long
/// (`TimedOut`), 503 when the server is stopping (`ConnectionAborted`), else 400.
fn read_failed(what: &str, e: &io::Error) -> Reply {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Reply::error(408, e.to_string()),
        io::ErrorKind::ConnectionAborted => Reply::error(503, e.to_string()),
        _ => Reply::error(400, format!("cannot read the {what}: {e}")),
    }
}

/// Reads one request from `stream`: `Ok(None)` when the client sent nothing, `Err` with the
/// reply for a request that cannot be served.
pub fn read_request(stream: &mut (impl Read + Write)) -> Result<Option<(Head, Vec<u8>)>, Reply> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (head, len) = loop {
        let too_large = || {
            Reply::error(
                431,
                format!("request line and headers larger than {MAX_HEAD} bytes"),
            )
        };
        if !buf.is_empty()
            && let Some((head, len)) = parse_head(&buf)?
        {
            if len > MAX_HEAD {
                return Err(too_large());
            }
            break (head, len);
        }
        if buf.len() > MAX_HEAD {
            return Err(too_large());
        }
        // Never more than one byte past the limit, so that the limit is exact.
        let room = (MAX_HEAD + 1 - buf.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]) {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err(Reply::error(400, "the request ended inside its headers")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_failed("request", &e)),
        }
    };
    let mut body = buf.split_off(len);
    if body.len() > head.content_length {
        return Err(Reply::error(
            400,
            format!(
                "more bytes than the headers and a body of Content-Length {}: send a body \
                 with its Content-Length, one request per connection",
                head.content_length
            ),
        ));
    }
    if head.expect_continue && body.len() < head.content_length {
        let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    let already = body.len();
    body.resize(head.content_length, 0);
    if let Err(e) = stream.read_exact(&mut body[already..]) {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            return Err(Reply::error(
                400,
                format!(
                    "the body ended before its Content-Length of {} bytes",
                    head.content_length
                ),
            ));
        }
        return Err(read_failed("body", &e));
    }
    Ok(Some((head, body)))
}

/// Writes `reply` (without a body for `HEAD`) and asks the client to close.
pub fn write_reply(stream: &mut impl Write, reply: &Reply, head_only: bool) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reason(reply.status),
        reply.content_type,
        reply.body.len()
    );
    if let Some(allow) = reply.allow {
        out.push_str(&format!("Allow: {allow}\r\n"));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if !head_only {
        bytes.extend_from_slice(reply.body.as_bytes());
    }
    stream.write_all(&bytes)?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A client connection: what it sends, and what the server writes back.
    struct Conn {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Conn {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Conn {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn conn(bytes: &[u8]) -> Conn {
        Conn {
            input: Cursor::new(bytes.to_vec()),
            output: Vec::new(),
        }
    }

    fn status(bytes: &[u8]) -> u16 {
        match read_request(&mut conn(bytes)) {
            Ok(Some(_)) => 200,
            Ok(None) => 0,
            Err(r) => r.status,
        }
    }

    #[test]
    fn reads_a_request_with_its_body() {
        let mut c = conn(b"PATCH /config HTTP/1.1\r\nHost: x\r\ncontent-length: 4\r\n\r\n{\"a\"");
        let (head, body) = read_request(&mut c).unwrap().unwrap();
        assert_eq!(
            (head.method.as_str(), head.target.as_str()),
            ("PATCH", "/config")
        );
        assert_eq!(body, b"{\"a\"");
        let mut c =
            conn(b"PUT /config HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}");
        assert!(read_request(&mut c).unwrap().is_some());
        assert!(
            c.output.is_empty(),
            "the body came with the headers: no 100 needed"
        );
        assert_eq!(status(b""), 0);
    }

    #[test]
    fn huge_or_bad_requests_get_4xx_without_reading_the_body() {
        // Found by the api_http fuzz target: tiny_http aborted the process allocating this.
        assert_eq!(
            status(b"GET /stats HTTP/1.1\r\nContent-Length: 3940786861181440\r\n\r\n"),
            413
        );
        assert_eq!(
            status(b"GET /stats HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            413
        );
        // tiny_http never answered these.
        assert_eq!(status(b"GET /stats HTTP/2.0\r\n\r\n"), 400);
        assert_eq!(status(b"GET /stats HTTP/3.0\r\n\r\n"), 400);
        assert_eq!(status(b"GET /stats\r\n\r\n"), 400);
        assert_eq!(status(b"\x01/\n /stats HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"GET /stats HTTP/1.1\r\nbad header\r\n\r\n"), 400);
        assert_eq!(
            status(b"GET /stats HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"GET /stats HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"PUT /config HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(status(b"GET /stats HTTP/1.1\r\nExpect: x\r\n\r\n"), 417);
        assert_eq!(
            status(b"GET /stats HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"),
            400
        );
        assert_eq!(
            status(b"GET /stats HTTP/1.1\r\n\r\nGET /stats HTTP/1.1\r\n\r\n"),
            400
        );
        assert_eq!(status(b"GET /stats HTTP/1.1\r\nHost"), 400);
        assert_eq!(status(&[b'a'; MAX_HEAD + 8]), 431);
        // The limit is exact: headers of MAX_HEAD bytes pass, one byte more does not.
        let sized = |total: usize| {
            let start = b"GET /stats HTTP/1.1\r\nX: ";
            let mut r = start.to_vec();
            r.resize(total - 4, b'a');
            r.extend_from_slice(b"\r\n\r\n");
            r
        };
        assert_eq!(status(&sized(MAX_HEAD)), 200);
        assert_eq!(status(&sized(MAX_HEAD + 1)), 431);
        // A short body says what was missing.
        let Err(r) = read_request(&mut conn(
            b"PUT /config HTTP/1.1\r\nContent-Length: 9\r\n\r\n{}",
        )) else {
            panic!("a short body was accepted");
        };
        assert!(
            r.body.contains("before its Content-Length of 9 bytes"),
            "{}",
            r.body
        );
        for bytes in [
            &b"GET /stats HTTP/2.0\r\n\r\n"[..],
            b"\x1b[2J / HTTP/1.1\r\n\r\n",
        ] {
            let Err(r) = read_request(&mut conn(bytes)) else {
                panic!("accepted {bytes:?}");
            };
            assert!(
                !r.body.contains('\u{1b}') && r.body.contains("error"),
                "{}",
                r.body
            );
        }
    }

    /// A connection whose reads fail with `kind` once `input` is used up.
    struct Failing {
        input: Cursor<Vec<u8>>,
        kind: io::ErrorKind,
    }

    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.input.read(buf)? {
                0 => Err(io::Error::new(self.kind, "stopped")),
                n => Ok(n),
            }
        }
    }

    impl Write for Failing {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_late_request_gets_408_and_a_stopping_server_503() {
        for (kind, want) in [
            (io::ErrorKind::TimedOut, 408),
            (io::ErrorKind::ConnectionAborted, 503),
            (io::ErrorKind::ConnectionReset, 400),
        ] {
            for sent in [
                &b"GET /st"[..],
                b"PUT /config HTTP/1.1\r\nContent-Length: 9\r\n\r\n{",
            ] {
                let mut c = Failing {
                    input: Cursor::new(sent.to_vec()),
                    kind,
                };
                let Err(r) = read_request(&mut c) else {
                    panic!("{kind:?}: accepted");
                };
                assert_eq!(r.status, want, "{kind:?}: {}", r.body);
            }
        }
    }

    #[test]
    fn replies_carry_length_allow_and_close() {
        let mut reply = Reply::error(405, "no");
        reply.allow = Some("GET");
        let mut out = Vec::new();
        write_reply(&mut out, &reply, false).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nAllow: GET\r\n") && text.contains("Connection: close"));
        assert!(text.ends_with(&reply.body));
        let mut out = Vec::new();
        write_reply(&mut out, &reply, true).unwrap();
        assert!(String::from_utf8(out).unwrap().ends_with("\r\n\r\n"));
    }
}
