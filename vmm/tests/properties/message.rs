//! The rule every error message of the VMM keeps, checked by the property tests in
//! `vmm/tests/` and the fuzz targets in `fuzz/` (both include this file): one clear line.

/// Panics unless `message` is a clear error for the user: not empty, one line without
/// control characters. `what` says what was given, for the panic message.
pub fn one_line(what: &str, message: &str) {
    assert!(!message.trim().is_empty(), "{what}: empty error message");
    assert!(
        !message.chars().any(char::is_control),
        "{what}: control characters (a line break, an escape) in the message: {message:?}"
    );
}
