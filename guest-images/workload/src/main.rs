//! Guest workload.
fn main() {}
