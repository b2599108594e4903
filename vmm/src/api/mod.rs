//! The control API: HTTP/1.1 with JSON bodies over a unix socket (`--api-sock PATH`), one
//! request per connection ([`http`]). One thread accepts connections and hands each to one of
//! [`MAX_CLIENTS`] client threads started with the server (more clients wait in the socket's
//! backlog), so a slow or silent client holds up neither the others nor the VMM's stop, and
//! serving never needs a new thread ([`workers`]). The socket is made readable and writable by
//! its owner only, and is removed when the server stops. Requests and replies are in
//! [`routes`].

mod client;
pub mod http;
pub mod routes;
mod workers;

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::control::Control;
use workers::Workers;

/// How long a client may take to send its whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Most clients served at once: the client threads started with the server. A control API
/// has few clients at once, and a silent one is cut off after [`REQUEST_TIMEOUT`]; each thread
/// costs the process about 16 KiB (its stack and malloc arena).
pub const MAX_CLIENTS: usize = 4;

/// Event data of the listening socket and of the stop event.
const LISTENER: u64 = 0;
const STOP: u64 = 1;

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
    /// The server's event loop could not be set up.
    #[error("cannot set up the API's event loop: {0}")]
    Events(#[source] io::Error),
}

impl Error {
    /// Whether the user can fix it by choosing another path (a usage error).
    pub fn is_usage(&self) -> bool {
        !matches!(self, Error::Thread(_) | Error::Events(_))
    }
}

/// A running control API.
pub struct ApiServer {
    stopping: Arc<AtomicBool>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
    /// Device and inode of the socket file this server bound.
    socket: (u64, u64),
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The sockets of the servers running in this process, for [`remove_sockets_now`].
static BOUND: Mutex<Vec<(PathBuf, (u64, u64))>> = Mutex::new(Vec::new());

/// Whether `path` is still the socket file `(dev, ino)` (the path may have been removed, or
/// taken by something else).
fn still_ours(path: &Path, socket: (u64, u64)) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == socket)
}

/// Removes the socket files of every server still running, for an exit that runs no cleanup
/// (a second signal while stopping). The servers themselves are not stopped.
pub fn remove_sockets_now() {
    let bound = BOUND.lock().unwrap_or_else(PoisonError::into_inner);
    for (path, socket) in bound.iter() {
        if still_ours(path, *socket) {
            let _ = std::fs::remove_file(path);
        }
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
        Self::start_with(path, control, REQUEST_TIMEOUT)
    }

    /// As [`ApiServer::start`], with `timeout` for each whole request.
    fn start_with(
        path: &Path,
        control: Arc<dyn Control>,
        timeout: Duration,
    ) -> Result<Self, Error> {
        clear_path(path)?;
        let listen_err = |source| Error::Listen {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(listen_err)?;
        // What was bound, to remove only this socket at the stop.
        let bound = std::fs::symlink_metadata(path).map_err(listen_err)?;
        let started = (|| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(listen_err)?;
            listener.set_nonblocking(true).map_err(listen_err)?;
            let wake =
                EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::Events)?;
            let epoll = Epoll::new().map_err(Error::Events)?;
            for (fd, data) in [(listener.as_raw_fd(), LISTENER), (wake.as_raw_fd(), STOP)] {
                epoll
                    .ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, data),
                    )
                    .map_err(Error::Events)?;
            }
            let stopping = Arc::new(AtomicBool::new(false));
            let workers =
                Workers::start(MAX_CLIENTS, &control, timeout, &stopping).map_err(Error::Thread)?;
            let stop = Arc::clone(&stopping);
            let thread = thread::Builder::new()
                .name("api".into())
                .spawn(move || accept_loop(&listener, &epoll, &stop, workers))
                .map_err(Error::Thread)?;
            Ok((stopping, wake, thread))
        })();
        let (stopping, wake, thread) = started.inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        })?;
        log::info!("control API on {}", path.display());
        let socket = (bound.dev(), bound.ino());
        BOUND
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((path.to_path_buf(), socket));
        Ok(Self {
            stopping,
            wake,
            thread: Some(thread),
            path: path.to_path_buf(),
            socket,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops serving and removes the socket. Clients still sending a request are cut off; a
    /// request being answered is finished first. Dropping the server does the same, so a start
    /// that fails after the API is up leaves no socket behind.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stopping.store(true, Ordering::SeqCst);
        if let Err(e) = self.wake.write(1) {
            log::error!("api: cannot wake the server to stop it: {e}");
        }
        if thread.join().is_err() {
            log::error!("the API thread panicked");
        }
        BOUND
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(_, socket)| *socket != self.socket);
        // Only our socket: the path may have been removed, or taken by something else.
        if still_ours(&self.path, self.socket)
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            log::debug!("removing {}: {e}", self.path.display());
        }
    }
}

/// How long accepting pauses after it failed.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts clients until the server stops and hands each to a free client thread; while all
/// [`MAX_CLIENTS`] are busy, new clients wait in the backlog. Returns once every client thread
/// has ended.
fn accept_loop(
    listener: &UnixListener,
    epoll: &Epoll,
    stopping: &AtomicBool,
    mut workers: Workers,
) {
    let mut listening = true;
    // Accepting failed (out of file descriptors, say): wait until then before trying again.
    let mut backoff: Option<Instant> = None;
    let mut events = [EpollEvent::default(); 2];
    while !stopping.load(Ordering::SeqCst) {
        backoff = backoff.filter(|&until| Instant::now() < until);
        let pause = workers.all_busy() || backoff.is_some();
        if pause == listening {
            // While paused, waiting connections must not wake this loop over and over.
            let interest = if pause {
                EventSet::empty()
            } else {
                EventSet::IN
            };
            let changed = epoll.ctl(
                ControlOperation::Modify,
                listener.as_raw_fd(),
                EpollEvent::new(interest, LISTENER),
            );
            if let Err(e) = changed {
                log::error!("api: waiting for clients: {e}; the API stops");
                break;
            }
            listening = !pause;
        }
        // While paused, look again every so often.
        let wait_ms = if pause { 20 } else { -1 };
        match epoll.wait(wait_ms, &mut events) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("api: waiting for clients: {e}; the API stops");
                break;
            }
        }
        while listening && !workers.all_busy() && !stopping.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((stream, _)) => workers.serve(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("api: accepting a client: {e}; trying again in 100 ms");
                    backoff = Some(Instant::now() + ACCEPT_BACKOFF);
                    break;
                }
            }
        }
    }
    workers.stop();
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::{Mutex, mpsc};

    use super::*;
    use crate::control::NoControl;

    /// These tests count the process's client threads: one at a time.
    static SERIAL: Mutex<()> = Mutex::new(());

    const GET: &[u8] = b"GET /stats HTTP/1.1\r\n\r\n";

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn socket_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vmm-api-{}-{name}.sock", std::process::id()))
    }

    fn control() -> Arc<dyn Control> {
        Arc::new(NoControl {
            guests: vec![("guest0".into(), 16)],
        })
    }

    fn connect(path: &Path) -> UnixStream {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    /// Runs `f` on a thread and fails if it has not returned within 20 s: a hang, not a speed
    /// check.
    fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{what} hung"))
    }

    /// Sends `request` and returns the reply.
    fn ask(path: &Path, request: &[u8]) -> String {
        let mut s = connect(path);
        s.write_all(request).unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        reply
    }

    fn status(reply: &str) -> u16 {
        reply
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }

    fn client_threads() -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|comm| comm.trim() == "api-client")
            .count()
    }

    #[test]
    fn stop_returns_when_the_socket_file_was_removed() {
        let _serial = serial();
        let path = socket_path("removed");
        let server = ApiServer::start(&path, control()).unwrap();
        assert_eq!(status(&ask(&path, GET)), 200);
        std::fs::remove_file(&path).unwrap();
        within("stopping", move || server.stop());
    }

    #[test]
    fn dropping_the_server_removes_its_socket() {
        let _serial = serial();
        let path = socket_path("dropped");
        let server = ApiServer::start(&path, control()).unwrap();
        assert!(path.exists());
        within("dropping", move || drop(server));
        assert!(!path.exists(), "the socket is removed");
    }

    #[test]
    fn silent_clients_hold_up_neither_others_nor_the_stop() {
        let _serial = serial();
        let path = socket_path("silent");
        let server = ApiServer::start_with(&path, control(), Duration::from_secs(600)).unwrap();
        let mut idle: Vec<UnixStream> = (1..MAX_CLIENTS).map(|_| connect(&path)).collect();
        idle[0].write_all(b"GET /st").unwrap();
        let p = path.clone();
        let reply = within("a request behind silent clients", move || ask(&p, GET));
        assert_eq!(status(&reply), 200, "{reply}");
        within("stopping with silent clients", move || server.stop());
        for mut c in idle {
            let mut reply = String::new();
            let _ = c.read_to_string(&mut reply);
            assert!(reply.is_empty() || status(&reply) == 503, "{reply}");
        }
        assert!(!path.exists(), "the socket is removed");
    }

    #[test]
    fn a_request_not_complete_by_its_deadline_gets_408() {
        let _serial = serial();
        let path = socket_path("late");
        let server = ApiServer::start_with(&path, control(), Duration::from_millis(300)).unwrap();
        let p = path.clone();
        let reply = within("a client sending a byte at a time", move || {
            let mut reader = connect(&p);
            let mut writer = reader.try_clone().unwrap();
            writer.write_all(b"GET /stats HTTP/1.1\r\nX: ").unwrap();
            // Each read of the server's is quick; the whole request is never done.
            let dripping = thread::spawn(move || {
                while writer.write_all(b"a").is_ok() {
                    thread::sleep(Duration::from_millis(20));
                }
            });
            let mut reply = String::new();
            let _ = reader.read_to_string(&mut reply);
            let _ = reader.shutdown(std::net::Shutdown::Both);
            dripping.join().unwrap();
            reply
        });
        assert_eq!(status(&reply), 408, "{reply}");
        assert!(reply.contains("not complete within 300 ms"), "{reply}");
        server.stop();
    }

    #[test]
    fn at_most_max_clients_are_served_at_once_and_the_rest_wait_their_turn() {
        let _serial = serial();
        let path = socket_path("cap");
        let server = ApiServer::start_with(&path, control(), Duration::from_secs(600)).unwrap();
        // The client threads exist from the start: serving never starts a thread.
        within("the client threads starting", || {
            while client_threads() < MAX_CLIENTS {
                thread::sleep(Duration::from_millis(10));
            }
        });
        let idle: Vec<UnixStream> = (0..MAX_CLIENTS).map(|_| connect(&path)).collect();
        let mut waiting = connect(&path);
        waiting.write_all(GET).unwrap();
        // Every client thread waits on a silent client: the request waits its turn.
        waiting
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut byte = [0u8; 1];
        let early = waiting.read(&mut byte);
        assert!(
            early
                .as_ref()
                .is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock),
            "answered while every client thread was busy: {early:?}"
        );
        assert_eq!(client_threads(), MAX_CLIENTS);
        drop(idle);
        waiting
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut reply = String::new();
        waiting.read_to_string(&mut reply).unwrap();
        assert_eq!(status(&reply), 200, "{reply}");
        server.stop();
        assert_eq!(client_threads(), 0);
    }
}
