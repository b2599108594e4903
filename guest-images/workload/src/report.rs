//! Machine-readable result lines that the workload prints on the console.
//!
//! A line is `WORKLOAD RESULT op=<op> key=value ...`: space-separated `key=value` fields, the first
//! always `op`. [`ResultLine::parse`] finds the prefix anywhere in a line, so host tests can read
//! lines that the VMM prefixed with a guest name.

use std::fmt;

/// Prefix of every result line.
pub const RESULT_PREFIX: &str = "WORKLOAD RESULT";

/// One result line: ordered `key=value` fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultLine {
    fields: Vec<(String, String)>,
}

/// Makes a key or value printable as one token (no spaces, no `=` in keys).
fn token(text: &str, is_key: bool) -> String {
    text.chars()
        .map(|c| {
            if c.is_whitespace() || (is_key && c == '=') {
                '_'
            } else {
                c
            }
        })
        .collect()
}

impl ResultLine {
    /// A line for operation `op`.
    pub fn new(op: &str) -> Self {
        Self {
            fields: vec![("op".to_owned(), token(op, false))],
        }
    }

    /// Appends `key=value`.
    #[must_use]
    pub fn field(mut self, key: &str, value: impl fmt::Display) -> Self {
        self.fields
            .push((token(key, true), token(&value.to_string(), false)));
        self
    }

    /// The value of the first field named `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The operation this line reports.
    pub fn op(&self) -> Option<&str> {
        self.get("op")
    }

    /// Parses the result line contained in `line`, if any.
    pub fn parse(line: &str) -> Option<Self> {
        let start = line.find(RESULT_PREFIX)?;
        let rest = &line[start + RESULT_PREFIX.len()..];
        let mut fields = Vec::new();
        for tok in rest.split_whitespace() {
            let (k, v) = tok.split_once('=')?;
            fields.push((k.to_owned(), v.to_owned()));
        }
        match fields.first() {
            Some((k, _)) if k == "op" => Some(Self { fields }),
            _ => None,
        }
    }
}

impl fmt::Display for ResultLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(RESULT_PREFIX)?;
        for (k, v) in &self.fields {
            write!(f, " {k}={v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_back() {
        let line = ResultLine::new("fill").field("mib", 64).field("ok", 1);
        let text = line.to_string();
        assert_eq!(text, "WORKLOAD RESULT op=fill mib=64 ok=1");
        let parsed = ResultLine::parse(&text).unwrap();
        assert_eq!(parsed, line);
        assert_eq!(parsed.op(), Some("fill"));
        assert_eq!(parsed.get("mib"), Some("64"));
        assert_eq!(parsed.get("missing"), None);
    }

    #[test]
    fn parses_after_a_guest_prefix_and_rejects_junk() {
        let parsed = ResultLine::parse("g1: WORKLOAD RESULT op=verify ok=0").unwrap();
        assert_eq!(parsed.get("ok"), Some("0"));
        assert_eq!(ResultLine::parse("WORKLOAD RESULT mib=1"), None);
        assert_eq!(ResultLine::parse("WORKLOAD RESULT op=fill garbage"), None);
        assert_eq!(ResultLine::parse("hello"), None);
    }

    #[test]
    fn values_with_spaces_stay_one_token() {
        let line = ResultLine::new("fill").field("a b=c", "x y");
        assert_eq!(line.to_string(), "WORKLOAD RESULT op=fill a_b_c=x_y");
        assert_eq!(ResultLine::parse(&line.to_string()).unwrap(), line);
    }
}
