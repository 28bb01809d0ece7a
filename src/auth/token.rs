//! Signed tokens: `?token=HEX&expires=UNIX_SECONDS` on a stream name (or on connect's app).
//!
//! `token` is the lowercase hex HMAC-SHA256, keyed with `auth.token_secret`, of
//!
//! ```text
//! APP "\n" STREAM "\n" EXPIRES "\n" ADDR
//! ```
//!
//! where ADDR is the client's IP address as text (an IPv4-mapped IPv6 address as plain
//! IPv4), or empty for a token any address may use. The check is constant-time (`hmac`'s
//! `verify_slice`), and the signature is checked before the expiry, so an expired answer
//! says the token was genuine. `rtmpgate token` mints one; so does the shell recipe in the
//! README.

use std::net::IpAddr;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::DenyReason;

type HmacSha256 = Hmac<Sha256>;

/// An address as signed: IPv4-mapped IPv6 addresses as their IPv4 form.
pub fn addr_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => v6.to_string(),
        },
        IpAddr::V4(v4) => v4.to_string(),
    }
}

fn mac(secret: &[u8], app: &str, stream: &str, expires: &str, addr: &str) -> HmacSha256 {
    // Any key length is accepted by HMAC; new_from_slice cannot fail for it.
    let mut m = match HmacSha256::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable_hmac(),
    };
    for (i, part) in [app, stream, expires, addr].iter().enumerate() {
        if i > 0 {
            m.update(b"\n");
        }
        m.update(part.as_bytes());
    }
    m
}

#[cold]
fn unreachable_hmac() -> HmacSha256 {
    // HMAC takes keys of any length; this is never reached. A fixed key keeps the function
    // total without a panic path.
    #[allow(clippy::expect_used)]
    HmacSha256::new_from_slice(b"-").expect("HMAC accepts any key length")
}

/// The token for `app`/`stream` valid until `expires` (Unix seconds), bound to `addr` if
/// given.
pub fn sign(secret: &[u8], app: &str, stream: &str, expires: u64, addr: Option<IpAddr>) -> String {
    let addr = addr.map(addr_text).unwrap_or_default();
    let tag = mac(secret, app, stream, &expires.to_string(), &addr)
        .finalize()
        .into_bytes();
    tag.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        let v = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        };
        *o = (v(*pair.first()?)? << 4) | v(*pair.get(1)?)?;
    }
    Some(out)
}

/// Checks a token for `app`/`stream` presented by `client`. With `bind_addr` only tokens
/// minted for the client's address pass; otherwise either kind does.
#[allow(clippy::too_many_arguments)]
pub fn verify(
    secret: &[u8],
    app: &str,
    stream: &str,
    expires: &str,
    token: &str,
    client: IpAddr,
    bind_addr: bool,
    now: u64,
) -> Result<(), DenyReason> {
    let Some(tag) = unhex(token) else {
        return Err(DenyReason::TokenInvalid);
    };
    // Only digits: "+60" or " 60" would parse elsewhere and sign differently.
    if expires.is_empty() || expires.len() > 20 || !expires.bytes().all(|c| c.is_ascii_digit()) {
        return Err(DenyReason::TokenInvalid);
    }
    let bound = mac(secret, app, stream, expires, &addr_text(client))
        .verify_slice(&tag)
        .is_ok();
    let open = !bind_addr
        && mac(secret, app, stream, expires, "")
            .verify_slice(&tag)
            .is_ok();
    if !(bound | open) {
        return Err(DenyReason::TokenInvalid);
    }
    match expires.parse::<u64>() {
        Ok(e) if e >= now => Ok(()),
        _ => Err(DenyReason::TokenExpired),
    }
}

/// `rtmpgate token ...`: prints `STREAM?token=HEX&expires=UNIX` for a publisher or player to
/// append to its URL. The secret comes from `--config FILE` (`[auth] token_secret`) or the
/// `RTMPGATE_TOKEN_SECRET` environment variable, never from the command line (where `ps`
/// would show it).
pub mod cli {
    use std::net::IpAddr;
    use std::path::PathBuf;

    use clap::Parser;

    #[derive(Parser, Debug)]
    #[command(
        name = "rtmpgate token",
        about = "Mint a signed token for a stream: prints STREAM?token=HEX&expires=UNIX. The \
                 secret is read from --config (auth.token_secret) or RTMPGATE_TOKEN_SECRET."
    )]
    pub struct TokenArgs {
        /// The application (the first path element of the RTMP URL, e.g. live).
        #[arg(long)]
        pub app: String,
        /// The stream name (what follows the app in the URL).
        #[arg(long)]
        pub stream: String,
        /// Seconds from now the token is valid for (negative: already expired, for tests).
        #[arg(long, default_value_t = 3600, allow_negative_numbers = true)]
        pub ttl: i64,
        /// Bind the token to this client address (it then works from there only).
        #[arg(long)]
        pub addr: Option<IpAddr>,
        /// The config file whose [auth] token_secret signs the token.
        #[arg(long, value_name = "FILE")]
        pub config: Option<PathBuf>,
    }

    /// Runs the subcommand with the arguments after `token`; returns the process exit code.
    pub fn main(args: impl IntoIterator<Item = String>) -> u8 {
        let a = match TokenArgs::try_parse_from(args) {
            Ok(a) => a,
            Err(e) => {
                let _ = e.print();
                return if e.use_stderr() { 2 } else { 0 };
            }
        };
        let secret = match secret(&a) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("rtmpgate token: {e}");
                return 2;
            }
        };
        let now = super::super::unix_now();
        let expires = if a.ttl >= 0 {
            now.saturating_add(a.ttl.unsigned_abs())
        } else {
            now.saturating_sub(a.ttl.unsigned_abs())
        };
        let tok = super::sign(secret.as_bytes(), &a.app, &a.stream, expires, a.addr);
        println!("{}?token={tok}&expires={expires}", a.stream);
        0
    }

    fn secret(a: &TokenArgs) -> Result<String, String> {
        if let Some(path) = &a.config {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            // Only the one key is read (the rest is checked when the gateway loads it).
            let table: toml::Table = toml::from_str(&text)
                .map_err(|e| format!("{}: {}", path.display(), e.to_string().trim_end()))?;
            return table
                .get("auth")
                .and_then(|a| a.get("token_secret"))
                .and_then(toml::Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| format!("{} has no [auth] token_secret; add one", path.display()));
        }
        std::env::var("RTMPGATE_TOKEN_SECRET").map_err(|_| {
            "no secret: pass --config FILE (with [auth] token_secret) or set RTMPGATE_TOKEN_SECRET"
                .to_owned()
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const K: &[u8] = b"0123456789abcdef";

    #[test]
    fn sign_then_verify_with_and_without_address() {
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let open = sign(K, "live", "cam", 100, None);
        assert_eq!(open.len(), 64);
        assert_eq!(
            verify(K, "live", "cam", "100", &open, other, false, 100),
            Ok(())
        );
        assert_eq!(
            verify(K, "live", "cam", "100", &open, other, true, 100),
            Err(DenyReason::TokenInvalid)
        );
        let bound = sign(K, "live", "cam", 100, Some(a));
        assert_eq!(
            verify(K, "live", "cam", "100", &bound, mapped, true, 50),
            Ok(())
        );
        assert_eq!(
            verify(K, "live", "cam", "100", &bound, other, false, 50),
            Err(DenyReason::TokenInvalid)
        );
        assert_eq!(
            verify(K, "live", "cam", "100", &open, a, false, 101),
            Err(DenyReason::TokenExpired)
        );
        // Upper-case hex is the same token.
        assert_eq!(
            verify(K, "live", "cam", "100", &open.to_uppercase(), a, false, 1),
            Ok(())
        );
    }

    #[test]
    fn anything_changed_is_invalid() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let t = sign(K, "live", "cam", 100, None);
        let bad =
            |app, stream, exp: &str, tok: &str| verify(K, app, stream, exp, tok, ip, false, 0);
        assert_eq!(
            bad("live2", "cam", "100", &t),
            Err(DenyReason::TokenInvalid)
        );
        assert_eq!(
            bad("live", "cam2", "100", &t),
            Err(DenyReason::TokenInvalid)
        );
        assert_eq!(bad("live", "cam", "101", &t), Err(DenyReason::TokenInvalid));
        assert_eq!(
            bad("live", "cam", "+100", &t),
            Err(DenyReason::TokenInvalid)
        );
        assert_eq!(
            bad("live", "cam", "100", &t[..63]),
            Err(DenyReason::TokenInvalid)
        );
        assert_eq!(
            bad("live", "cam", "100", "zz"),
            Err(DenyReason::TokenInvalid)
        );
        let flipped = format!("{}{}", &t[..63], if t.ends_with('0') { "1" } else { "0" });
        assert_eq!(
            bad("live", "cam", "100", &flipped),
            Err(DenyReason::TokenInvalid)
        );
        assert_ne!(sign(b"another-secret-00", "live", "cam", 100, None), t);
    }

    #[test]
    fn known_vector() {
        // printf 'live\ncam1\n1700000000\n' | openssl dgst -sha256 -hmac 0123456789abcdef
        assert_eq!(
            sign(K, "live", "cam1", 1_700_000_000, None),
            "a311c28c03c23c27d9bddbd62a4f3e89d3a6e215cf26ce9397725900a4311815"
        );
    }
}
