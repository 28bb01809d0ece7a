//! The hub of live streams: publishers, players, GOP cache and fan-out.
