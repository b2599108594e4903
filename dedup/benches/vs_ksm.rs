//! Comparison with kernel KSM (lands in a later commit).
fn main() {}
