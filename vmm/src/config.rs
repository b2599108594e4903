//! The typed configuration of a VMM process: its guests, how each boots, and the checks that
//! need no host resources.

use std::path::PathBuf;

use crate::arch::x86_64::layout::{HIMEM_START, MAX_MEM, MAX_VCPUS, MIN_MEM, PAGE_SIZE};

/// Kernel command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// Most guests one process runs.
pub const MAX_GUESTS: u32 = 256;

/// Errors in the configuration (all of them usage errors).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A size that does not parse.
    #[error("invalid size {0:?}: use bytes or a number with K, M, G or T (e.g. 64M, 1G)")]
    Size(String),
    /// An address that does not parse.
    #[error("invalid address {0:?}: use hex with 0x (e.g. 0x100000) or decimal")]
    Address(String),
    /// A memory size that is not a whole number of pages.
    #[error("--mem {0} is not a whole number of 4 KiB pages: use a multiple of 4096 bytes")]
    NotPageMultiple(u64),
    /// Too little memory.
    #[error("--mem {} is too small: a guest needs at least {}", format_size(*.mem), format_size(*.min))]
    MemTooSmall {
        /// Requested bytes.
        mem: u64,
        /// Smallest accepted.
        min: u64,
    },
    /// More memory than the boot page tables can map.
    #[error("--mem {} is too large: this VMM maps at most {} per guest", format_size(*.mem), format_size(*.max))]
    MemTooLarge {
        /// Requested bytes.
        mem: u64,
        /// Largest accepted.
        max: u64,
    },
    /// Zero vCPUs.
    #[error("--vcpus 0: a guest needs at least one vCPU")]
    NoVcpus,
    /// More vCPUs than xAPIC IDs allow.
    #[error("--vcpus {vcpus} is too many: at most {max} per guest")]
    TooManyVcpus {
        /// Requested vCPUs.
        vcpus: u32,
        /// Largest accepted.
        max: u32,
    },
    /// No guests, or too many.
    #[error("--guests {0}: give between 1 and {MAX_GUESTS}")]
    GuestCount(u32),
    /// A flat guest's entry below 1 MiB, where the boot structures live.
    #[error(
        "--entry {0:#x} is below 0x100000, where the VMM keeps its boot structures: load the flat binary at or above 0x100000"
    )]
    EntryTooLow(u64),
    /// A duration that does not parse.
    #[error(
        "invalid duration {0:?}: use seconds or a number with ms, s or m (e.g. 500ms, 10s, 2m, 0 \
         for off)"
    )]
    Duration(String),
    /// `--mem-image` given neither once nor once per guest.
    #[error(
        "--mem-image given {images} times for {guests} guests: give it once (every guest) or once per guest"
    )]
    ImageCount {
        /// Images given.
        images: usize,
        /// Guests.
        guests: u32,
    },
    /// `--flat` given neither once nor once per guest.
    #[error(
        "--flat given {images} times for {guests} guests: give it once (every guest) or once per guest"
    )]
    FlatCount {
        /// Binaries given.
        images: usize,
        /// Guests.
        guests: u32,
    },
}

/// How a guest starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// A Linux kernel (bzImage or ELF vmlinux) through the 64-bit boot protocol.
    Linux {
        /// The kernel image.
        kernel: PathBuf,
        /// An optional initramfs.
        initrd: Option<PathBuf>,
        /// The kernel command line.
        cmdline: String,
    },
    /// A raw binary loaded at `entry` and started there in 64-bit mode with identity paging
    /// over all guest RAM. Every vCPU starts at `entry` with `rdi` = its index, `rsi` = the
    /// vCPU count, `rdx` = the end of the identity map and its own small stack.
    Flat {
        /// The binary.
        image: PathBuf,
        /// Where it is loaded and where every vCPU starts.
        entry: u64,
    },
}

/// One guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    /// Name used in console prefixes and logs.
    pub name: String,
    /// RAM in bytes.
    pub mem: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// How it boots.
    pub boot: Boot,
    /// A raw file copied into guest RAM at start, from GPA 0 (RAM order: past 3 GiB it
    /// continues at 4 GiB). The kernel, initrd or flat binary and the boot structures are
    /// written over it.
    pub mem_image: Option<PathBuf>,
    /// Enables write tracking (KVM dirty log and vm-memory's write bitmap) for a
    /// deduplication engine.
    pub track_dirty: bool,
}

/// A whole VMM process: one or more independent guests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmConfig {
    /// The guests, in order.
    pub guests: Vec<GuestConfig>,
}

/// The name of guest `index`.
pub fn guest_name(index: u32) -> String {
    format!("guest{index}")
}

/// Formats a byte count as [`parse_size`] reads it, in the largest binary unit that divides it
/// (`64M`, `3G`, `4097`).
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, 'T'), (30, 'G'), (20, 'M'), (10, 'K')] {
        if bytes != 0 && bytes % (1 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Parses a size: bytes (decimal or 0x hex) or a number with a binary suffix K, M, G or T
/// (optionally followed by `iB` or `B`, any case).
pub fn parse_size(text: &str) -> Result<u64, Error> {
    let bad = || Error::Size(text.to_string());
    let t = text.trim();
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_err(|_| bad());
    }
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(digits_end);
    let number: u64 = digits.parse().map_err(|_| bad())?;
    let suffix = suffix.to_ascii_lowercase();
    let unit = suffix
        .strip_suffix("ib")
        .or_else(|| suffix.strip_suffix('b'))
        .unwrap_or(&suffix);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(bad()),
    };
    number.checked_mul(1 << shift).ok_or_else(bad)
}

/// Parses a duration: seconds (`10`), or a number with `ms`, `s` or `m` (`500ms`, `10s`, `2m`).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, Error> {
    let bad = || Error::Duration(text.to_string());
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(digits_end);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let ms = match unit.trim() {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" | "min" => n.checked_mul(60_000),
        _ => None,
    }
    .ok_or_else(bad)?;
    Ok(std::time::Duration::from_millis(ms))
}

/// Parses a guest-physical address: `0x` hex or decimal.
pub fn parse_addr(text: &str) -> Result<u64, Error> {
    let t = text.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    }
    .map_err(|_| Error::Address(text.to_string()))
}

impl GuestConfig {
    /// Checks what can be checked without the host: memory size, vCPU count, flat entry.
    pub fn validate(&self) -> Result<(), Error> {
        if self.mem % PAGE_SIZE != 0 {
            return Err(Error::NotPageMultiple(self.mem));
        }
        if self.mem < MIN_MEM {
            return Err(Error::MemTooSmall {
                mem: self.mem,
                min: MIN_MEM,
            });
        }
        if self.mem > MAX_MEM {
            return Err(Error::MemTooLarge {
                mem: self.mem,
                max: MAX_MEM,
            });
        }
        if self.vcpus == 0 {
            return Err(Error::NoVcpus);
        }
        if self.vcpus > MAX_VCPUS {
            return Err(Error::TooManyVcpus {
                vcpus: self.vcpus,
                max: MAX_VCPUS,
            });
        }
        if let Boot::Flat { entry, .. } = self.boot
            && entry < HIMEM_START
        {
            return Err(Error::EntryTooLow(entry));
        }
        Ok(())
    }
}

impl VmmConfig {
    /// `count` guests like `template`, named `guest0`, `guest1`, ...; `images` gives the
    /// memory images: none, one for every guest, or one per guest in order.
    pub fn replicated(
        template: &GuestConfig,
        count: u32,
        images: &[PathBuf],
    ) -> Result<Self, Error> {
        if count == 0 || count > MAX_GUESTS {
            return Err(Error::GuestCount(count));
        }
        if images.len() > 1 && images.len() != count as usize {
            return Err(Error::ImageCount {
                images: images.len(),
                guests: count,
            });
        }
        let guests = (0..count)
            .map(|i| GuestConfig {
                name: guest_name(i),
                mem_image: match images {
                    [] => None,
                    [one] => Some(one.clone()),
                    many => Some(many[i as usize].clone()),
                },
                ..template.clone()
            })
            .collect();
        let config = Self { guests };
        config.validate()?;
        Ok(config)
    }

    /// Gives each flat guest its own binary: `images` is none or one (every guest keeps the one
    /// it has) or one per guest in order. Guests that boot a kernel are left as they are.
    pub fn with_flat_images(mut self, images: &[PathBuf]) -> Result<Self, Error> {
        if images.len() <= 1 {
            return Ok(self);
        }
        if images.len() != self.guests.len() {
            return Err(Error::FlatCount {
                images: images.len(),
                guests: u32::try_from(self.guests.len()).unwrap_or(u32::MAX),
            });
        }
        for (guest, path) in self.guests.iter_mut().zip(images) {
            if let Boot::Flat { image, .. } = &mut guest.boot {
                image.clone_from(path);
            }
        }
        Ok(self)
    }

    /// Validates every guest.
    pub fn validate(&self) -> Result<(), Error> {
        let count = u32::try_from(self.guests.len()).unwrap_or(u32::MAX);
        if count == 0 || count > MAX_GUESTS {
            return Err(Error::GuestCount(count));
        }
        self.guests.iter().try_for_each(GuestConfig::validate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(mem: u64, vcpus: u32) -> GuestConfig {
        GuestConfig {
            name: guest_name(0),
            mem,
            vcpus,
            boot: Boot::Flat {
                image: "probe.bin".into(),
                entry: 0x10_0000,
            },
            mem_image: None,
            track_dirty: false,
        }
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("16kb"), Ok(16 << 10));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("512B"), Ok(512));
    }

    #[test]
    fn sizes_format_in_the_largest_whole_unit() {
        assert_eq!(format_size(64 << 20), "64M");
        assert_eq!(format_size(3 << 30), "3G");
        assert_eq!(format_size(1536 << 10), "1536K");
        assert_eq!(format_size(4097), "4097");
        assert_eq!(format_size(0), "0");
        for n in [4096, 64 << 20, 5 << 40, 12345] {
            assert_eq!(parse_size(&format_size(n)), Ok(n));
        }
    }

    #[test]
    fn bad_sizes_are_refused() {
        for bad in [
            "",
            "M",
            "12Q",
            "1.5G",
            "-1",
            "99999999999999999999",
            "20000000T",
            "5x",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_parse_in_seconds_or_with_units() {
        use std::time::Duration;
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "s", "1.5s", "-1", "10h", "99999999999999999999"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn addresses_parse_as_hex_or_decimal() {
        assert_eq!(parse_addr("0x100000"), Ok(0x10_0000));
        assert_eq!(parse_addr("1048576"), Ok(0x10_0000));
        assert!(parse_addr("0xZZ").is_err());
    }

    #[test]
    fn guest_checks() {
        assert_eq!(flat(64 << 20, 1).validate(), Ok(()));
        assert_eq!(
            flat((64 << 20) + 1, 1).validate(),
            Err(Error::NotPageMultiple((64 << 20) + 1))
        );
        assert!(matches!(
            flat(1 << 20, 1).validate(),
            Err(Error::MemTooSmall { .. })
        ));
        assert!(matches!(
            flat(MAX_MEM + PAGE_SIZE, 1).validate(),
            Err(Error::MemTooLarge { .. })
        ));
        assert_eq!(flat(64 << 20, 0).validate(), Err(Error::NoVcpus));
        assert!(matches!(
            flat(64 << 20, 255).validate(),
            Err(Error::TooManyVcpus { .. })
        ));
        let mut low = flat(64 << 20, 1);
        low.boot = Boot::Flat {
            image: "x".into(),
            entry: 0x8000,
        };
        assert_eq!(low.validate(), Err(Error::EntryTooLow(0x8000)));
    }

    #[test]
    fn replication_names_guests_and_hands_out_images() {
        let t = flat(64 << 20, 1);
        let c = VmmConfig::replicated(&t, 3, &["a".into()]).unwrap();
        let names: Vec<_> = c.guests.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["guest0", "guest1", "guest2"]);
        assert!(c.guests.iter().all(|g| g.mem_image == Some("a".into())));

        let c = VmmConfig::replicated(&t, 2, &["a".into(), "b".into()]).unwrap();
        assert_eq!(c.guests[1].mem_image, Some("b".into()));

        assert_eq!(
            VmmConfig::replicated(&t, 3, &["a".into(), "b".into()]),
            Err(Error::ImageCount {
                images: 2,
                guests: 3
            })
        );
        assert_eq!(VmmConfig::replicated(&t, 0, &[]), Err(Error::GuestCount(0)));
    }

    #[test]
    fn flat_binaries_are_one_for_all_or_one_per_guest() {
        let t = flat(64 << 20, 1);
        let image = |g: &GuestConfig| match &g.boot {
            Boot::Flat { image, entry } => (image.clone(), *entry),
            Boot::Linux { .. } => panic!("not flat"),
        };
        let three = || VmmConfig::replicated(&t, 3, &[]).unwrap();
        let same = three().with_flat_images(&["probe.bin".into()]).unwrap();
        assert_eq!(same, three());
        assert_eq!(three().with_flat_images(&[]).unwrap(), three());

        let each = three()
            .with_flat_images(&["a".into(), "b".into(), "c".into()])
            .unwrap();
        let got: Vec<_> = each.guests.iter().map(image).collect();
        assert_eq!(
            got,
            [
                ("a".into(), 0x10_0000),
                ("b".into(), 0x10_0000),
                ("c".into(), 0x10_0000)
            ]
        );
        let e = three()
            .with_flat_images(&["a".into(), "b".into()])
            .unwrap_err();
        assert_eq!(
            e,
            Error::FlatCount {
                images: 2,
                guests: 3
            }
        );
        assert!(e.to_string().contains("once per guest"), "{e}");
    }
}
