//! `cargo xtask`: set-up, fetch, demo, test.
fn main() {}
