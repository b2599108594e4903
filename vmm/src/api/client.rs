//! One client of the control API, on its own thread: its request is read within a deadline
//! for the whole request (not per read, so a client sending a byte now and then is cut off
//! too), answered, and the connection closed. A stopping server ends the wait at once.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::http;
use super::routes::{self, Reply};
use crate::control::Control;

/// How long a client may take to take each part of the reply.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest single wait for the client's bytes, so that a stopping server is noticed soon.
const TICK: Duration = Duration::from_millis(100);

/// How long a refused request's unread bytes are drained, in all, before the connection is
/// closed.
const LINGER: Duration = Duration::from_millis(500);

/// Most bytes drained from a refused request.
const LINGER_BYTES: usize = 1 << 20;

/// A client's connection while its request is read: reads end at the deadline, or as soon as
/// the server stops.
struct Client<'a> {
    stream: UnixStream,
    deadline: Instant,
    timeout: Duration,
    stopping: &'a AtomicBool,
}

impl Read for Client<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the VMM is stopping",
                ));
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the request was not complete within {} ms",
                        self.timeout.as_millis()
                    ),
                ));
            }
            self.stream.set_read_timeout(Some(left.min(TICK)))?;
            match self.stream.read(buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                result => return result,
            }
        }
    }
}

impl Write for Client<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// How a request was answered.
struct Answer {
    method: String,
    target: String,
    reply: Reply,
    /// Whether the client may still be sending a request that was refused unread.
    unread: bool,
}

/// Reads one request and answers it.
fn answer(client: &mut Client<'_>, control: &dyn Control) -> Option<Answer> {
    let (head, body) = match http::read_request(client) {
        Ok(Some(request)) => request,
        Ok(None) => return None,
        Err(reply) => {
            return Some(Answer {
                method: String::new(),
                target: String::new(),
                reply,
                unread: true,
            });
        }
    };
    let method = head.method.to_ascii_uppercase();
    let reply = catch_unwind(AssertUnwindSafe(|| {
        routes::handle(control, &method, &head.target, &body)
    }))
    .unwrap_or_else(|_| Reply::error(500, "internal error while handling the request"));
    Some(Answer {
        method,
        target: head.target,
        reply,
        unread: false,
    })
}

/// Reads and drops what the client still sends, for a short while in all: closing a unix
/// socket with unread data resets the connection, and the client could lose the reply it has
/// not read yet.
fn drain(stream: &mut UnixStream) {
    let until = Instant::now() + LINGER;
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < LINGER_BYTES {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

/// Serves one connection: the request must be complete within `timeout` of its start.
pub fn serve(stream: UnixStream, control: &dyn Control, timeout: Duration, stopping: &AtomicBool) {
    if let Err(e) = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)))
    {
        log::debug!("api: socket options: {e}");
    }
    let mut client = Client {
        stream,
        deadline: Instant::now() + timeout,
        timeout,
        stopping,
    };
    let Some(answer) = answer(&mut client, control) else {
        return;
    };
    log::debug!(
        "api: {} {} -> {}",
        answer.method,
        answer.target,
        answer.reply.status
    );
    if let Err(e) = http::write_reply(&mut client, &answer.reply, answer.method == "HEAD") {
        log::debug!("api: the client went away: {e}");
    }
    let mut stream = client.stream;
    if answer.unread {
        let _ = stream.shutdown(std::net::Shutdown::Write);
        drain(&mut stream);
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}
