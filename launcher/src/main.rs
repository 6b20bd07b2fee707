//! `mla-launch`: spawns and supervises training ranks.
fn main() {}
