//! Scheduler benchmark (being written).
fn main() {}
