//! The threads that serve API clients, started with the server: serving a client never needs a
//! new thread. A degraded engine can take the process to its map limit (`vm.max_map_count`),
//! where a new thread's stack cannot be mapped, and Rust's runtime aborts the whole process
//! when a new thread's signal stack cannot be; the API must keep working exactly then.

use std::io;
use std::os::unix::net::UnixStream;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::client;
use crate::control::Control;

/// A fixed set of client threads fed from one queue.
pub struct Workers {
    hand: Option<mpsc::Sender<UnixStream>>,
    busy: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `count` threads serving clients of `control`, each request within `timeout`.
    pub fn start(
        count: usize,
        control: &Arc<dyn Control>,
        timeout: Duration,
        stopping: &Arc<AtomicBool>,
    ) -> io::Result<Self> {
        let (hand, take) = mpsc::channel::<UnixStream>();
        let take = Arc::new(Mutex::new(take));
        let mut workers = Self {
            hand: Some(hand),
            busy: Arc::new(AtomicUsize::new(0)),
            threads: Vec::with_capacity(count),
        };
        for _ in 0..count {
            let (take, busy) = (Arc::clone(&take), Arc::clone(&workers.busy));
            let (control, stopping) = (Arc::clone(control), Arc::clone(stopping));
            let thread = thread::Builder::new()
                .name("api-client".into())
                .spawn(move || {
                    // The thread's malloc arena is made now, while the process can still map.
                    std::hint::black_box(Vec::<u8>::with_capacity(64));
                    loop {
                        let next = take.lock().unwrap_or_else(PoisonError::into_inner).recv();
                        let Ok(stream) = next else {
                            break;
                        };
                        let served = catch_unwind(AssertUnwindSafe(|| {
                            client::serve(stream, &*control, timeout, &stopping);
                        }));
                        if served.is_err() {
                            log::error!("api: serving a client panicked");
                        }
                        busy.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            match thread {
                Ok(t) => workers.threads.push(t),
                Err(e) => {
                    workers.stop();
                    return Err(e);
                }
            }
        }
        Ok(workers)
    }

    /// Whether every thread is serving a client.
    pub fn all_busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst) >= self.threads.len()
    }

    /// Hands `stream` to the next free thread (to call only when not [`Workers::all_busy`]).
    pub fn serve(&self, stream: UnixStream) {
        self.busy.fetch_add(1, Ordering::SeqCst);
        let sent = self.hand.as_ref().map(|h| h.send(stream));
        if !matches!(sent, Some(Ok(()))) {
            // Only after `stop`; the stream is dropped, closing the connection.
            self.busy.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Lets every thread finish its client, then ends them.
    pub fn stop(&mut self) {
        self.hand = None;
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("an API client thread panicked");
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}
