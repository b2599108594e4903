//! Scan throughput (placeholder until the bench lands in the next commit).
fn main() {}
