//! Rendezvous (highest random weight) hashing, shared by the relay's `balance = "hash"`
//! groups and edge mode's choice of origin: each server scores `weight / -ln(u)`, `u` a
//! uniform draw in (0, 1) from a fixed hash of the stream key and the server's URL, and the
//! highest score wins. Every gateway computes the same order without talking to the others
//! (the configured order does not matter), a server gets its weight's share of the
//! streams, and when one is down only its streams move, each to its own next-highest server.

/// A 64-bit hash of `key` and `id` that never changes between runs, builds or machines
/// (FNV-1a, then the splitmix64 finalizer so that nearby inputs land far apart).
fn stable_hash(key: &str, id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key.as_bytes().iter().chain(&[0u8]).chain(id.as_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A backend's rendezvous score for a stream: `weight / -ln(u)`, u uniform in (0, 1), so
/// that the highest score falls on each backend with probability weight / total.
pub fn hrw_score(key: &str, id: &str, weight: u32) -> f64 {
    // The top 53 bits as a double strictly inside (0, 1).
    let u = ((stable_hash(key, id) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(weight.max(1)) / -u.ln()
}

/// The key a hash group balances on: the app and the stream name, each without its
/// `?query` (tokens differ between a publisher and its players).
pub fn stream_key(app: &str, stream: &str) -> String {
    let strip = |s: &str| s.split('?').next().unwrap_or_default().to_string();
    format!("{}/{}", strip(app), strip(stream))
}
