//! The probe guest (`test_guests::PROBE`) run by a `vmm` child, and its serial line protocol
//! (see `docs/architecture.md`) spoken from the test.

use std::ffi::OsString;
use std::io::Write;
use std::path::Path;

use test_guests::{LOAD_ADDRESS, PROBE};
use vmm_sys_util::tempfile::TempFile;

use crate::process::{Line, Stream, VmmProcess};
use crate::protocol::{ProbeProtocol, reply_to};

/// A temporary file holding `bytes`.
///
/// # Panics
/// When the file cannot be created or written.
pub fn temp_file_with(bytes: &[u8]) -> TempFile {
    let file = TempFile::new().unwrap_or_else(|e| panic!("cannot create a temporary file: {e}"));
    file.as_file()
        .write_all(bytes)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", file.as_path().display()));
    file
}

/// `len` bytes of seeded pseudo-random content (splitmix64 words): every 8-byte word differs
/// from its neighbours and from the same word under another seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        bytes.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// The little-endian u64 at byte `offset` of `bytes`.
///
/// # Panics
/// When `bytes` ends before `offset + 8`.
pub fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(word)
}

/// The probe guest in a temporary file, for `vmm --flat`.
#[derive(Debug)]
pub struct ProbeGuest {
    file: TempFile,
}

impl ProbeGuest {
    /// Writes the probe to a temporary file.
    ///
    /// # Panics
    /// When the file cannot be written.
    pub fn new() -> Self {
        Self {
            file: temp_file_with(PROBE),
        }
    }

    /// The file holding the probe.
    pub fn path(&self) -> &Path {
        self.file.as_path()
    }

    /// `vmm` arguments running the probe with `mem` of RAM per guest, followed by `extra`.
    pub fn args(&self, mem: &str, extra: &[&str]) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--flat".into(),
            self.path().into(),
            "--entry".into(),
            format!("{LOAD_ADDRESS:#x}").into(),
            "--mem".into(),
            mem.into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        args
    }

    /// Starts `vmm` running the probe with `mem` of RAM per guest and `extra` arguments.
    pub fn spawn(&self, mem: &str, extra: &[&str]) -> VmmProcess {
        VmmProcess::spawn(self.args(mem, extra))
    }
}

impl Default for ProbeGuest {
    fn default() -> Self {
        Self::new()
    }
}

/// The console of one probe guest in a [`VmmProcess`]: sends commands, waits for their
/// replies (numbers in hex, as the probe prints them).
#[derive(Debug)]
pub struct ProbeConsole<'a> {
    vmm: &'a mut VmmProcess,
    prefix: String,
}

impl VmmProcess {
    /// The console of the only guest (no line prefixes).
    pub fn probe(&mut self) -> ProbeConsole<'_> {
        ProbeConsole {
            vmm: self,
            prefix: String::new(),
        }
    }

    /// The console of guest `name` of several (lines prefixed `name: `).
    pub fn probe_of(&mut self, name: &str) -> ProbeConsole<'_> {
        ProbeConsole {
            vmm: self,
            prefix: format!("{name}: "),
        }
    }

    /// Waits until each probe guest of `names` (several guests, lines prefixed) is ready.
    ///
    /// # Panics
    /// When one is not within the hang guard.
    pub fn wait_probes_ready<S: AsRef<str>>(&mut self, names: impl IntoIterator<Item = S>) {
        for name in names {
            self.probe_of(name.as_ref()).wait_ready();
        }
    }
}

impl ProbeProtocol for ProbeConsole<'_> {
    fn request(&mut self, command: &str) -> String {
        self.vmm.send_line(&format!("{}{command}", self.prefix));
        let (what, matches) = self.awaited_reply(command);
        let line = self.vmm.wait_for(&what, matches);
        line.text[self.prefix.len()..].to_string()
    }

    fn transcript(&self) -> String {
        self.vmm.transcript()
    }
}

impl ProbeConsole<'_> {
    /// Waits for `PROBE READY vcpus=N` and returns N.
    ///
    /// # Panics
    /// When it does not come (hang guard) or N does not parse.
    pub fn wait_ready(&mut self) -> u32 {
        let start = format!("{}PROBE READY vcpus=", self.prefix);
        let line = self.vmm.wait_for(&format!("{start:?}"), |l| {
            l.stream == Stream::Stdout && l.text.starts_with(&start)
        });
        line.text[start.len()..]
            .parse()
            .unwrap_or_else(|e| panic!("bad ready line {:?}: {e}", line.text))
    }

    /// Like [`ProbeProtocol::request`], but returns `None` when the VMM exits before it
    /// replies (or before the command could be sent).
    pub fn try_request(&mut self, command: &str) -> Option<String> {
        if !self.vmm.try_send_line(&format!("{}{command}", self.prefix)) {
            return None;
        }
        let (what, matches) = self.awaited_reply(command);
        let line = self.vmm.wait_for_or_exit(&what, matches)?;
        Some(line.text[self.prefix.len()..].to_string())
    }

    /// What the reply to `command` is called, and a test for it.
    fn awaited_reply(&self, command: &str) -> (String, impl FnMut(&Line) -> bool + use<>) {
        let is_reply = reply_to(&self.prefix, command);
        let matches = move |l: &Line| l.stream == Stream::Stdout && is_reply(&l.text);
        (format!("the reply to {command:?}"), matches)
    }

    /// The guest writes `status` to the debug-exit port, which stops it (no reply).
    pub fn exit(&mut self, status: u8) {
        self.vmm.send_line(&format!("{}X {status:x}", self.prefix));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_seeded_and_word_distinct() {
        let a = pattern(1, 4096);
        assert_eq!(a.len(), 4096);
        assert_eq!(a, pattern(1, 4096));
        assert_ne!(a, pattern(2, 4096));
        assert_eq!(pattern(1, 13), a[..13]);
        let words: std::collections::HashSet<u64> = (0..512).map(|i| u64_at(&a, i * 8)).collect();
        assert_eq!(words.len(), 512);
    }

    #[test]
    fn probe_args_name_the_file_and_entry() {
        let probe = ProbeGuest::new();
        let args = probe.args("16M", &["--vcpus", "2"]);
        assert_eq!(args[0], "--flat");
        assert_eq!(std::fs::read(&args[1]).ok().as_deref(), Some(PROBE));
        assert_eq!(
            args[2..],
            ["--entry", "0x100000", "--mem", "16M", "--vcpus", "2"]
        );
    }
}
