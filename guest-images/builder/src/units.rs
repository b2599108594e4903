//! Byte sizes on the command line (`512M`, `1G`, `4096`) and in messages.

use thiserror::Error;

/// Errors from parsing a size.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// Not a number with an optional K/M/G/T suffix.
    #[error("bad size {0:?}: expected a number with an optional K, M, G or T suffix (e.g. 512M)")]
    Syntax(String),
    /// Too large for 64 bits.
    #[error("size {0:?} is too large")]
    Overflow(String),
}

/// Parses `512M`, `512MiB`, `1g`, `64K`, `4096` or `4096B` into bytes (binary units).
pub fn parse_size(text: &str) -> Result<u64, Error> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(Error::Syntax(text.to_owned())),
    };
    let n: u64 = digits.parse().map_err(|_| Error::Syntax(text.to_owned()))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| Error::Overflow(text.to_owned()))
}

/// `bytes` in the largest binary unit that keeps one decimal, e.g. `26.7 MiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size(" 1g "), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
    }

    #[test]
    fn refuses_junk_and_overflow() {
        for bad in ["", "M", "12X", "1.5G", "-1", "0x10"] {
            assert!(matches!(parse_size(bad), Err(Error::Syntax(_))), "{bad}");
        }
        assert!(matches!(
            parse_size("99999999999T"),
            Err(Error::Overflow(_))
        ));
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(format_size(100), "100 B");
        assert_eq!(format_size(512 << 20), "512.0 MiB");
        assert_eq!(format_size(28_000_000), "26.7 MiB");
    }
}
