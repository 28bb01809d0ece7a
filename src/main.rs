//! Command-line entry point: parse flags and config, set up logging, run until a signal.
fn main() {}
