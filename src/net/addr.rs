//! Client addresses: address ranges (`trusted_proxies`), and the group an address is
//! counted under for per-address limits (IPv6 cut to a prefix).

use std::fmt;
use std::net::IpAddr;

/// An address range that does not parse: the setting that held it, and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct CidrError {
    pub key: String,
    pub message: String,
}

/// An address range: `10.0.0.0/8`, `2001:db8::/32`, or one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `ADDR/PREFIX` or `ADDR`; `key` names the setting in the error.
    pub fn parse(key: &str, text: &str) -> Result<Cidr, CidrError> {
        let bad = |why: &str| {
            CidrError {
            key: key.to_string(),
            message: format!("{text:?} {why}; write an address range such as 10.0.0.0/8, 2001:db8::/32 or 192.0.2.7"),
        }
        };
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text.trim(), None),
        };
        let net: IpAddr = addr.parse().map_err(|_| bad("is not an IP address"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| bad(&format!("has a prefix length that is not 0 to {max}")))?,
            None => max,
        };
        Ok(Cidr {
            net: mask(net, prefix),
            prefix,
        })
    }

    /// True when `ip` is in the range (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        ip.is_ipv4() == self.net.is_ipv4() && mask(ip, self.prefix) == self.net
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// `ip` with all but its first `prefix` bits cleared.
fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let m = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            IpAddr::V4((u32::from(v4) & m).into())
        }
        IpAddr::V6(v6) => {
            let m = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            IpAddr::V6((u128::from(v6) & m).into())
        }
    }
}

/// The key an address is counted under: IPv4 as it is (an IPv4-mapped IPv6 address too),
/// IPv6 cut to its first `v6_prefix` bits.
pub fn group(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => mask(ip, v6_prefix),
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_is_grouped_by_prefix_and_mapped_ipv4_is_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(group(a, 64), group(b, 64));
        assert_ne!(group(a, 64), group(c, 64));
        assert_eq!(group(a, 128), a);
        assert_eq!(group(a, 0), "::".parse::<IpAddr>().unwrap());
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(group(mapped, 64), "192.0.2.7".parse::<IpAddr>().unwrap());
    }
}
