//! The guests a density run starts in one `vmm`: probe guests whose RAM starts as composed
//! images, or Linux guests (kernel + initramfs) whose workload fills memory, waits and verifies
//! it. Each kind says when its guests are ready and how their memory is checked afterwards.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use guest_workload::report::ResultLine;
use vmm_tests::{ProbeGuest, Stream, VmmProcess};

use crate::prepare::Images;
use crate::probe_vmm::{self, probe_args, wait_all_ready};

/// Errors checking the guests or stopping the VMM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The probe guests' check or stop failed.
    #[error(transparent)]
    Probe(#[from] probe_vmm::Error),
    /// The VMM running Linux guests did not exit cleanly after they did.
    #[error("vmm exited with status {0} after the Linux guests stopped")]
    Exit(i32),
}

/// RAM the Linux guests' kernel and unpacked initramfs are left besides the workload's memory.
pub const LINUX_HEADROOM: u64 = 128 << 20;

/// The workload's memory (MiB) in a Linux guest of `size` bytes: the rest after
/// [`LINUX_HEADROOM`], at least 16 MiB.
pub fn workload_mib(size: u64) -> u64 {
    (size.saturating_sub(LINUX_HEADROOM) >> 20).max(16)
}

/// The kernel command line of the Linux guests: the workload fills `mib` MiB (10% unique and
/// 10% zero pages, the rest duplicates of 64 contents), waits `wait_secs`, then checks every
/// page.
pub fn linux_cmdline(mib: u64, wait_secs: u64) -> String {
    format!(
        "console=ttyS0 reboot=k panic=1 \
         workload=verify,mib={mib},seed=1,unique=0.1,zero=0.1,wait-secs={wait_secs}"
    )
}

/// The guests of one run.
#[derive(Debug)]
pub enum Guests<'a> {
    /// Probe guests whose RAM starts as composed images.
    Probe {
        /// The probe binary.
        probe: &'a ProbeGuest,
        /// One image per guest.
        images: &'a Images,
        /// Pages per guest checksummed after the run.
        check_pages: usize,
    },
    /// Linux guests running the workload.
    Linux {
        /// `vmlinuz`.
        kernel: PathBuf,
        /// `initramfs.cpio`.
        initrd: PathBuf,
        /// How many.
        guests: usize,
        /// RAM of each, bytes.
        size: u64,
        /// Seconds between the fill and the check.
        wait_secs: u64,
    },
}

/// Whether `text` is a workload result line of operation `op` (behind any guest prefix).
fn is_result(text: &str, op: &str) -> bool {
    ResultLine::parse(text).is_some_and(|r| r.op() == Some(op))
}

impl Guests<'_> {
    /// Number of guests.
    pub fn count(&self) -> usize {
        match self {
            Guests::Probe { images, .. } => images.files.len(),
            Guests::Linux { guests, .. } => *guests,
        }
    }

    /// RAM of each guest, bytes.
    pub fn size(&self) -> u64 {
        match self {
            Guests::Probe { images, .. } => images.size(),
            Guests::Linux { size, .. } => *size,
        }
    }

    /// The `vmm` arguments starting them, followed by `extra`.
    pub fn args(&self, extra: &[String]) -> Vec<OsString> {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        match self {
            Guests::Probe { probe, images, .. } => probe_args(probe, images, &extra),
            Guests::Linux {
                kernel,
                initrd,
                guests,
                size,
                wait_secs,
            } => {
                let mut args: Vec<OsString> = vec![
                    "--kernel".into(),
                    kernel.into(),
                    "--initrd".into(),
                    initrd.into(),
                    "--cmdline".into(),
                    linux_cmdline(workload_mib(*size), *wait_secs).into(),
                    "--mem".into(),
                    format!("{}K", size >> 10).into(),
                    "--guests".into(),
                    guests.to_string().into(),
                ];
                args.extend(extra.iter().map(OsString::from));
                args
            }
        }
    }

    /// Waits until every guest is ready (the probes' `PROBE READY`, the workload's fill
    /// result); returns when the last one was.
    ///
    /// # Panics
    /// When a guest is not ready within the harness's hang guard.
    pub fn wait_ready(&self, vmm: &mut VmmProcess) -> Instant {
        match self {
            Guests::Probe { images, .. } => wait_all_ready(vmm, images.files.len()),
            Guests::Linux {
                guests, wait_secs, ..
            } => {
                let mut last = vmm.spawned_at();
                for _ in 0..*guests {
                    let line = vmm.wait_for_within(
                        "a workload fill result",
                        Duration::from_secs(120 + wait_secs),
                        |l| l.stream == Stream::Stdout && is_result(&l.text, "fill"),
                    );
                    last = last.max(line.at);
                }
                last
            }
        }
    }

    /// Checks the guests' memory and stops the VMM (probes: checksums of sampled pages against
    /// the images, then `X 0`; Linux: the workload's own check of every page, after which the
    /// guests stop). Returns the pages checked and how many were bad.
    ///
    /// # Panics
    /// When a reply does not come within the harness's hang guard.
    pub fn check_and_stop(&self, mut vmm: VmmProcess) -> Result<(usize, usize), Error> {
        match self {
            Guests::Probe {
                images,
                check_pages,
                ..
            } => {
                let check = probe_vmm::check_pages(&mut vmm, images, *check_pages, 1)?;
                for (guest, gpa) in &check.bad {
                    log::error!("page {gpa:#x} of guest {guest} differs from its image");
                }
                probe_vmm::stop(vmm)?;
                Ok((check.checked, check.bad.len()))
            }
            Guests::Linux {
                guests, wait_secs, ..
            } => {
                let (mut pages, mut bad) = (0, 0);
                for _ in 0..*guests {
                    let line = vmm.wait_for_within(
                        "a workload verify result",
                        Duration::from_secs(120 + wait_secs),
                        |l| l.stream == Stream::Stdout && is_result(&l.text, "verify"),
                    );
                    let result = ResultLine::parse(&line.text);
                    let number = |k: &str| -> usize {
                        result
                            .as_ref()
                            .and_then(|r| r.get(k))
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0)
                    };
                    pages += number("pages");
                    bad += number("bad_pages");
                    if result.as_ref().and_then(|r| r.get("ok")) != Some("1") {
                        log::error!("workload check failed: {}", line.text);
                        bad = bad.max(1);
                    }
                }
                match vmm.exit_code() {
                    0 => Ok((pages, bad)),
                    status => Err(Error::Exit(status)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_guests_leave_room_for_the_kernel() {
        assert_eq!(workload_mib(512 << 20), 384);
        assert_eq!(workload_mib(64 << 20), 16);
        let cmdline = linux_cmdline(384, 65);
        assert!(cmdline.starts_with("console=ttyS0 "));
        assert!(
            cmdline.ends_with(" workload=verify,mib=384,seed=1,unique=0.1,zero=0.1,wait-secs=65")
        );
    }

    #[test]
    fn linux_arguments() {
        let g = Guests::Linux {
            kernel: "/i/vmlinuz".into(),
            initrd: "/i/initramfs.cpio".into(),
            guests: 4,
            size: 512 << 20,
            wait_secs: 10,
        };
        assert_eq!((g.count(), g.size()), (4, 512 << 20));
        let args = g.args(&["--dedup".into()]);
        assert_eq!(args[0], "--kernel");
        assert_eq!(args[6..], ["--mem", "524288K", "--guests", "4", "--dedup"]);
    }

    #[test]
    fn result_lines_behind_guest_prefixes() {
        let fill = "guest1: WORKLOAD RESULT op=fill mib=64 pages=16384 ok=1";
        assert!(is_result(fill, "fill"));
        assert!(!is_result(fill, "verify"));
        assert!(!is_result("guest1: WORKLOAD START op=fill", "fill"));
    }
}
