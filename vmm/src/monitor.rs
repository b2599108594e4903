//! Periodic statistics: every interval, a one-line summary to a line sink (the binary's
//! stderr) and the `GET /stats` object to a file (`--stats-json`), replaced atomically (written
//! to a temporary file in the same folder, then renamed over it), so readers never see half a
//! file. Both are also written once at start and once more at stop.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::control::Control;
use crate::report::Report;

/// Where summary lines go.
pub type LineSink = Box<dyn Fn(&str) + Send>;

/// Errors of the statistics writer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The statistics file cannot be written.
    #[error("cannot write --stats-json {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The thread could not be started.
    #[error("cannot start the statistics thread: {0}")]
    Thread(#[source] io::Error),
}

/// What to write, and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorConfig {
    /// Time between writes; zero: only at start and stop.
    pub interval: Duration,
    /// Whether to print the one-line summary.
    pub summary: bool,
    /// The statistics file, if any.
    pub stats_json: Option<PathBuf>,
}

/// Writes `text` to `path` atomically: a temporary file beside it, synced, then renamed. Only
/// a regular file is replaced: anything else at `path` (a device such as `/dev/null`, a socket,
/// a pipe, a symbolic link, a folder) is an error and stays as it is.
pub fn write_atomic(path: &Path, text: &str) -> io::Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && !meta.file_type().is_file()
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path exists and is not a regular file (a device, socket, pipe, link or \
             folder); remove it or choose another path",
        ));
    }
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        // Best effort: the temporary file may not even exist.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

struct Writer {
    control: Arc<dyn Control>,
    config: MonitorConfig,
    lines: LineSink,
}

impl Writer {
    fn write(&self, last: bool) -> Result<(), Error> {
        let report = self.control.stats();
        // The file first: printing the line may be what fails (a stderr that is gone).
        let written = self.write_file(&report);
        self.print(&report, last);
        written
    }

    fn print(&self, report: &Report, last: bool) {
        if self.config.summary {
            let tag = if last { " (final)" } else { "" };
            (self.lines)(&format!("stats{tag}: {}", report.summary()));
        }
    }

    fn write_file(&self, report: &Report) -> Result<(), Error> {
        let Some(path) = &self.config.stats_json else {
            return Ok(());
        };
        write_atomic(path, &report.to_json()).map_err(|source| Error::Write {
            path: path.clone(),
            source,
        })
    }
}

/// A running statistics writer.
pub struct Monitor {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<Writer>>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor").finish_non_exhaustive()
    }
}

impl Monitor {
    /// Writes the statistics once (a file that cannot be written is an error now rather than
    /// a warning every interval), then every `config.interval` on a thread.
    pub fn start(
        control: Arc<dyn Control>,
        config: MonitorConfig,
        lines: LineSink,
    ) -> Result<Self, Error> {
        let writer = Writer {
            control,
            config,
            lines,
        };
        // The file first: a path that cannot be written fails the start before any line.
        let report = writer.control.stats();
        writer.write_file(&report)?;
        writer.print(&report, false);
        let (stop, stopped) = mpsc::channel::<()>();
        let interval = writer.config.interval;
        let thread = thread::Builder::new()
            .name("stats".into())
            .spawn(move || {
                loop {
                    let wait = if interval.is_zero() {
                        stopped.recv().map_err(|_| RecvTimeoutError::Disconnected)
                    } else {
                        stopped.recv_timeout(interval)
                    };
                    match wait {
                        Err(RecvTimeoutError::Timeout) => {
                            if let Err(e) = writer.write(false) {
                                log::warn!("{e}");
                            }
                        }
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => return writer,
                    }
                }
            })
            .map_err(Error::Thread)?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops the thread and writes the final statistics.
    pub fn stop(mut self) -> Result<(), Error> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), Error> {
        if let Some(stop) = self.stop.take() {
            // The thread may have ended already; it then needs no telling.
            let _ = stop.send(());
        }
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(writer)) => writer.write(true),
            Some(Err(_)) => {
                log::error!("the statistics thread panicked");
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            log::warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::NoControl;
    use std::sync::Mutex;

    #[test]
    fn atomic_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("stats.json");
        write_atomic(&path, "one").unwrap();
        write_atomic(&path, "two").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        let names: Vec<_> = std::fs::read_dir(dir.as_path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        assert!(write_atomic(&dir.as_path().join("no/such/dir/f"), "x").is_err());
    }

    #[test]
    fn only_a_regular_file_is_replaced() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let socket = dir.as_path().join("api.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let link = dir.as_path().join("link");
        std::os::unix::fs::symlink("/dev/null", &link).unwrap();
        let folder = dir.as_path().join("folder");
        std::fs::create_dir(&folder).unwrap();
        for path in [&socket, &link, &folder] {
            let before = std::fs::symlink_metadata(path).unwrap().file_type();
            let e = write_atomic(path, "{}").unwrap_err();
            assert!(e.to_string().contains("not a regular file"), "{e}");
            assert_eq!(std::fs::symlink_metadata(path).unwrap().file_type(), before);
        }
        assert_eq!(
            std::fs::read_dir(dir.as_path()).unwrap().count(),
            3,
            "no file left behind"
        );
    }

    #[test]
    fn writes_at_start_and_final_at_stop() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("s.json");
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = Arc::clone(&lines);
        let control = Arc::new(NoControl {
            guests: vec![("guest0".into(), 16)],
        });
        let config = MonitorConfig {
            interval: Duration::ZERO,
            summary: true,
            stats_json: Some(path.clone()),
        };
        let m = Monitor::start(
            control,
            config,
            Box::new(move |l| sink.lock().unwrap().push(l.to_string())),
        )
        .unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["guests"][0]["name"], "guest0");
        m.stop().unwrap();
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].starts_with("stats: mode=none shared=0"),
            "{}",
            lines[0]
        );
        assert!(lines[1].starts_with("stats (final): "), "{}", lines[1]);
    }

    #[test]
    fn an_unwritable_file_is_an_error_at_start_before_any_line() {
        let config = MonitorConfig {
            interval: Duration::ZERO,
            summary: true,
            stats_json: Some("/nonexistent/dir/s.json".into()),
        };
        let control = Arc::new(NoControl { guests: vec![] });
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = Arc::clone(&lines);
        let e = Monitor::start(
            control,
            config,
            Box::new(move |l| sink.lock().unwrap().push(l.to_string())),
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/dir/s.json"), "{e}");
        assert_eq!(*lines.lock().unwrap(), Vec::<String>::new());
    }
}
