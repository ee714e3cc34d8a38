//! The `zhijian` command.
fn main() {}
