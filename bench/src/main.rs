//! fleetq-bench (being written).
fn main() {}
