//! Shared by the handshake and rtmpe fuzz targets: turning arbitrary fuzzer bytes into
//! handshake packets of the exact lengths, so the digest and key searches run.

pub const C0C1: usize = 1 + 1536;
pub const S0S1S2: usize = 1 + 2 * 1536;

/// `rest` cut or zero-padded to `N` bytes, with its version byte set to `first`.
pub fn padded<const N: usize>(first: u8, rest: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; N];
    let n = rest.len().min(N);
    v[..n].copy_from_slice(&rest[..n]);
    v[0] = first;
    v
}
