//! The control API: HTTP/1.1 with JSON bodies over a unix socket (`--api-sock PATH`), served by
//! tiny_http on one thread. The socket is made readable and writable by its owner only, and is
//! removed when the server stops. Requests and replies are in [`routes`].

pub mod routes;

use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use tiny_http::{Header, Request, Response, Server};

use crate::control::Control;
use routes::{MAX_BODY, Reply};

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
    /// The HTTP server could not be set up.
    #[error("--api-sock {path}: cannot serve HTTP: {message}")]
    Serve {
        /// The socket path.
        path: PathBuf,
        /// What tiny_http said.
        message: String,
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
    server: Arc<Server>,
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
        let server = Server::from_listener(listener, None).map_err(|e| Error::Serve {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let server = Arc::new(server);
        let serving = Arc::clone(&server);
        let thread = thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for request in serving.incoming_requests() {
                    serve(request, &*control);
                }
            })
            .map_err(Error::Thread)?;
        log::info!("control API on {}", path.display());
        Ok(Self {
            server,
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
        self.server.unblock();
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

/// Reads the body (at most [`MAX_BODY`] bytes) and answers one request.
fn answer(request: &mut Request, control: &dyn Control) -> Reply {
    if request.body_length().is_some_and(|n| n > MAX_BODY) {
        return Reply::error(413, format!("body larger than {MAX_BODY} bytes"));
    }
    let mut body = Vec::new();
    let limit = MAX_BODY as u64 + 1;
    if let Err(e) = request.as_reader().take(limit).read_to_end(&mut body) {
        return Reply::error(400, format!("cannot read the body: {e}"));
    }
    if body.len() > MAX_BODY {
        return Reply::error(413, format!("body larger than {MAX_BODY} bytes"));
    }
    let method = request.method().as_str().to_ascii_uppercase();
    let url = request.url().to_string();
    catch_unwind(AssertUnwindSafe(|| {
        routes::handle(control, &method, &url, &body)
    }))
    .unwrap_or_else(|_| Reply::error(500, "internal error while handling the request"))
}

fn serve(mut request: Request, control: &dyn Control) {
    let reply = answer(&mut request, control);
    log::debug!(
        "api: {} {} -> {}",
        request.method(),
        request.url(),
        reply.status
    );
    let mut response = Response::from_string(reply.body).with_status_code(reply.status);
    let headers = [
        Some(("Content-Type", reply.content_type)),
        reply.allow.map(|a| ("Allow", a)),
    ];
    for (name, value) in headers.into_iter().flatten() {
        if let Ok(h) = Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            response.add_header(h);
        }
    }
    if let Err(e) = request.respond(response) {
        log::debug!("api: the client went away: {e}");
    }
}
