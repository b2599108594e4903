//! The probe guest's serial line protocol (see `docs/architecture.md`), whatever carries it: a
//! command goes out as one line (after the guest's prefix when there are several guests), and its
//! reply is the first line after it that reads `OK <letter> <gpa>[ value]` for that command or
//! `ERR ...`. [`crate::ProbeConsole`] speaks it to a `vmm` child, [`crate::ConsoleProbe`] to an
//! in-process VMM.

/// Speaking to one probe guest.
pub trait ProbeProtocol {
    /// Sends `command` and returns its reply without the guest prefix.
    ///
    /// # Panics
    /// When no reply comes within the hang guard.
    fn request(&mut self, command: &str) -> String;

    /// The console output so far, for failure messages.
    fn transcript(&self) -> String;

    /// Like [`ProbeProtocol::request`], but the reply must be `OK`.
    ///
    /// # Panics
    /// When it is not.
    fn ok(&mut self, command: &str) -> String {
        let reply = self.request(command);
        assert!(
            reply.starts_with("OK "),
            "{command:?} failed: {reply}\noutput:\n{}",
            self.transcript()
        );
        reply
    }

    /// The guest reads the u64 at `gpa`.
    fn read(&mut self, gpa: u64) -> u64 {
        last_hex(&self.ok(&format!("R {gpa:x}")))
    }

    /// The guest writes the u64 `value` at `gpa`.
    fn write(&mut self, gpa: u64, value: u64) {
        self.ok(&format!("W {gpa:x} {value:x}"));
    }

    /// The guest's checksum ([`test_guests::page_checksum`]) of the page at `gpa`.
    fn checksum(&mut self, gpa: u64) -> u64 {
        last_hex(&self.ok(&format!("C {gpa:x}")))
    }

    /// The guest fills the page at `gpa` with the u64 `value`.
    fn fill(&mut self, gpa: u64, value: u64) {
        self.ok(&format!("F {gpa:x} {value:x}"));
    }
}

/// A test for the reply to `command` from the guest whose lines start with `prefix`: the line
/// (prefix included) is `OK` for the command's letter and address, or `ERR`.
pub fn reply_to(prefix: &str, command: &str) -> impl Fn(&str) -> bool + use<> {
    let mut words = command.split(' ');
    let ok = format!(
        "{prefix}OK {} {}",
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default()
    );
    let ok_with = format!("{ok} ");
    let err = format!("{prefix}ERR");
    move |line: &str| line == ok || line.starts_with(&ok_with) || line.starts_with(&err)
}

/// Parses the hex number that ends a reply.
///
/// # Panics
/// When the reply does not end with one.
pub fn last_hex(reply: &str) -> u64 {
    reply
        .rsplit(' ')
        .next()
        .and_then(|n| u64::from_str_radix(n, 16).ok())
        .unwrap_or_else(|| panic!("reply {reply:?} does not end with a hex number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_end_in_hex() {
        assert_eq!(last_hex("OK R 200000 abc"), 0xabc);
        assert_eq!(last_hex("OK C 1000 ffffffffffffffff"), u64::MAX);
    }

    #[test]
    #[should_panic(expected = "does not end with a hex number")]
    fn replies_without_a_number_are_refused() {
        last_hex("OK W 200000 zz");
    }

    #[test]
    fn a_reply_names_the_command_and_the_guest() {
        let is = reply_to("g1: ", "R 10");
        assert!(is("g1: OK R 10 2a"));
        assert!(is("g1: ERR bad address"));
        assert!(!is("g0: OK R 10 2a"));
        assert!(!is("g1: OK R 100 2a"));
        assert!(!is("g1: OK W 10"));
        let is = reply_to("", "W 20 5");
        assert!(is("OK W 20"));
        assert!(!is("OK W 200"));
    }
}
