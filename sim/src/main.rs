//! `dispatch-sim`: the deterministic simulator (filled by the simulator issue).
fn main() {}
