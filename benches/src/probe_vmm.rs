//! A `vmm` child running probe guests whose RAM starts as composed images: its command line,
//! waiting for every guest to be ready, checking guest pages against the images through the
//! probe's `C` command, and stopping it cleanly.

use std::ffi::OsString;
use std::time::Instant;

use test_guests::{PAGE_SIZE, page_checksum};
use vmm_tests::{ProbeGuest, ProbeProtocol, Stream, VmmProcess};

use crate::prepare::{self, Images};

/// Errors talking to the probe guests.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An image page could not be read.
    #[error(transparent)]
    Image(#[from] prepare::Error),
    /// The VMM did not stop cleanly.
    #[error("vmm exited with status {status} instead of 0; its last output:\n{tail}")]
    Exit {
        /// Its exit status.
        status: i32,
        /// The end of its output.
        tail: String,
    },
}

/// `vmm` arguments for one probe guest per image (each guest's RAM the image's size, loaded
/// from its image), followed by `extra`.
pub fn probe_args(probe: &ProbeGuest, images: &Images, extra: &[&str]) -> Vec<OsString> {
    let mem = format!("{}K", images.size() >> 10);
    let guests = images.files.len().to_string();
    let mut args: Vec<OsString> = probe.args(&mem, &["--guests", &guests]);
    for file in &images.files {
        args.push("--mem-image".into());
        args.push(file.into());
    }
    args.extend(extra.iter().map(OsString::from));
    args
}

/// Name of guest `index` of `guests` as its console lines show it (`None`: no prefix, as with
/// a single guest).
pub fn guest_prefix(index: usize, guests: usize) -> Option<String> {
    (guests > 1).then(|| format!("guest{index}"))
}

/// Waits until all `guests` probes print `PROBE READY`; returns when the last line came.
pub fn wait_all_ready(vmm: &mut VmmProcess, guests: usize) -> Instant {
    let mut last = vmm.spawned_at();
    for _ in 0..guests {
        let line = vmm.wait_for("a PROBE READY line", |l| {
            l.stream == Stream::Stdout && l.text.contains("PROBE READY vcpus=")
        });
        last = last.max(line.at);
    }
    last
}

/// `count` distinct guest addresses of pages in `[reserved_low, size)`, spread pseudo-randomly
/// (the same for the same `seed`), in increasing order.
pub fn sample_gpas(size: u64, reserved_low: u64, count: usize, seed: u64) -> Vec<u64> {
    let page = PAGE_SIZE as u64;
    let first = reserved_low.div_ceil(page);
    let pages = (size / page).saturating_sub(first);
    let count = count.min(usize::try_from(pages).unwrap_or(usize::MAX));
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut picked = std::collections::BTreeSet::new();
    while picked.len() < count {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        picked.insert(first + state % pages);
    }
    picked.into_iter().map(|p| p * page).collect()
}

/// The outcome of checking guest pages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageCheck {
    /// Pages checked.
    pub checked: usize,
    /// `(guest, gpa)` of the pages whose guest checksum did not match the image.
    pub bad: Vec<(usize, u64)>,
}

/// Asks every guest for the checksum of `per_guest` of its pages (above the images' reserved
/// low memory, where the VMM and the probe live) and compares it with the image's page.
pub fn check_pages(
    vmm: &mut VmmProcess,
    images: &Images,
    per_guest: usize,
    seed: u64,
) -> Result<PageCheck, Error> {
    let guests = images.files.len();
    let mut result = PageCheck::default();
    for guest in 0..guests {
        let gpas = sample_gpas(
            images.size(),
            images.sidecar.reserved_low_bytes,
            per_guest,
            seed ^ guest as u64,
        );
        for gpa in gpas {
            let want = page_checksum(&images.page(guest, gpa)?);
            let got = match guest_prefix(guest, guests) {
                Some(name) => vmm.probe_of(&name).checksum(gpa),
                None => vmm.probe().checksum(gpa),
            };
            result.checked += 1;
            if got != want {
                result.bad.push((guest, gpa));
            }
        }
    }
    Ok(result)
}

/// Stops every probe (`X 0` to all guests) and checks that the VMM exits with status 0.
pub fn stop(mut vmm: VmmProcess) -> Result<(), Error> {
    vmm.send_line("X 0");
    match vmm.exit_code() {
        0 => Ok(()),
        status => {
            let transcript = vmm.transcript();
            let lines: Vec<&str> = transcript.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            Err(Error::Exit { status, tail })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampled_pages_are_distinct_aligned_and_above_reserved_memory() {
        let gpas = sample_gpas(64 << 20, 2 << 20, 100, 7);
        assert_eq!(gpas.len(), 100);
        assert!(gpas.windows(2).all(|w| w[0] < w[1]));
        assert!(
            gpas.iter()
                .all(|&g| g % 4096 == 0 && (2 << 20..64 << 20).contains(&g))
        );
        assert_eq!(gpas, sample_gpas(64 << 20, 2 << 20, 100, 7));
        assert_ne!(gpas, sample_gpas(64 << 20, 2 << 20, 100, 8));
        // Asking for more pages than there are gives them all.
        let all = sample_gpas(4 * 4096, 4096, 10, 1);
        assert_eq!(all, [4096, 8192, 12288]);
        assert!(sample_gpas(4096, 4096, 5, 1).is_empty());
    }

    #[test]
    fn console_prefixes_only_with_several_guests() {
        assert_eq!(guest_prefix(0, 1), None);
        assert_eq!(guest_prefix(2, 4).as_deref(), Some("guest2"));
    }
}
