//! The `jetfn` command-line tool.

fn main() {}
