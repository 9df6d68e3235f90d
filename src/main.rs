//! The `arvados-dispatch-cloud` command.
fn main() {}
