//! Configuration: TOML file plus command-line flags, merged into one validated `Config`.
