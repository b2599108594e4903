//! The control API: HTTP/1.1 with JSON bodies over a unix socket (`--api-sock PATH`), one
//! request per connection, served on one thread ([`http`]). The socket is made readable and
//! writable by its owner only, and is removed when the server stops. Requests and replies are
//! in [`routes`].

pub mod http;
pub mod routes;

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::control::Control;
use routes::Reply;

/// How long a client may take to send its request, or to take the reply, per read or write.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a refused request's unread bytes are drained before the connection is closed.
const LINGER: Duration = Duration::from_millis(500);

/// Most bytes drained from a refused request.
const LINGER_BYTES: usize = 1 << 20;

/// Errors starting the control API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another process serves the socket.
    #[error("--api-sock {0}: another process is listening there; stop it or choose another path")]
    InUse(PathBuf),
    /// The path is taken by something that is not a socket.
    #[error(
        "--api-sock {0}: the path exists and is not a socket; remove it or choose another path"
    )]
    NotSocket(PathBuf),
    /// The socket could not be created.
    #[error("--api-sock {path}: cannot listen: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The server thread could not be started.
    #[error("cannot start the API thread: {0}")]
    Thread(#[source] io::Error),
}

impl Error {
    /// Whether the user can fix it by choosing another path (a usage error).
    pub fn is_usage(&self) -> bool {
        !matches!(self, Error::Thread(_))
    }
}

/// A running control API.
pub struct ApiServer {
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Removes a stale socket at `path` (one nobody listens on); refuses a live one or a file.
fn clear_path(path: &Path) -> Result<(), Error> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(Error::NotSocket(path.to_path_buf()));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(Error::InUse(path.to_path_buf()));
    }
    log::info!("--api-sock: removing stale socket {}", path.display());
    std::fs::remove_file(path).map_err(|source| Error::Listen {
        path: path.to_path_buf(),
        source,
    })
}

impl ApiServer {
    /// Listens on `path` and serves `control` until [`ApiServer::stop`].
    pub fn start(path: &Path, control: Arc<dyn Control>) -> Result<Self, Error> {
        clear_path(path)?;
        let listen_err = |source| Error::Listen {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(listen_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(listen_err)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&stopping);
        let thread = thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    match stream {
                        Ok(s) => serve(s, &*control),
                        Err(e) => log::debug!("api: accept: {e}"),
                    }
                }
            })
            .map_err(Error::Thread)?;
        log::info!("control API on {}", path.display());
        Ok(Self {
            stopping,
            thread: Some(thread),
            path: path.to_path_buf(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops serving and removes the socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // Wake the accept with a connection of our own.
        self.stopping.store(true, Ordering::SeqCst);
        if let Err(e) = UnixStream::connect(&self.path) {
            log::debug!("api: waking the server: {e}");
        }
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            log::error!("the API thread panicked");
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::debug!("removing {}: {e}", self.path.display());
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
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

/// Reads one request from `stream` and answers it.
fn answer(stream: &mut UnixStream, control: &dyn Control) -> Option<Answer> {
    let (head, body) = match http::read_request(stream) {
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

/// Reads and drops what the client still sends, for a short while: closing a unix socket with
/// unread data resets the connection, and the client could lose the reply it has not read yet.
fn drain(stream: &mut UnixStream) {
    if let Err(e) = stream.set_read_timeout(Some(LINGER)) {
        log::debug!("api: socket timeout: {e}");
    }
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < LINGER_BYTES {
        match io::Read::read(stream, &mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

fn serve(mut stream: UnixStream, control: &dyn Control) {
    for set in [UnixStream::set_read_timeout, UnixStream::set_write_timeout] {
        if let Err(e) = set(&stream, Some(CLIENT_TIMEOUT)) {
            log::debug!("api: socket timeout: {e}");
        }
    }
    let Some(answer) = answer(&mut stream, control) else {
        return;
    };
    log::debug!(
        "api: {} {} -> {}",
        answer.method,
        answer.target,
        answer.reply.status
    );
    if let Err(e) = http::write_reply(&mut stream, &answer.reply, answer.method == "HEAD") {
        log::debug!("api: the client went away: {e}");
    }
    if answer.unread {
        let _ = stream.shutdown(std::net::Shutdown::Write);
        drain(&mut stream);
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}
