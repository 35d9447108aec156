//! Client addresses as the relay counts them: rate limits, the connection cap per address
//! and NIP-86 `blockip` all treat an IPv6 client as its /64 prefix (one subscriber usually
//! holds a whole /64 and could otherwise take a fresh address for every connection), an
//! IPv4 client as its address, and an IPv4-mapped IPv6 address as the IPv4 address.

use std::net::{IpAddr, Ipv6Addr};

/// The key an address is counted under: `192.0.2.7`, or `2001:db8:1:2::/64`.
pub fn address_key(ip: IpAddr) -> String {
    match canonical_ip(ip) {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("{}/64", prefix_range(v6).0),
    }
}

/// An IPv4-mapped IPv6 address as its IPv4 address, so `::ffff:1.2.3.4` and `1.2.3.4` are
/// one client.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The first and last address of the /64 holding `ip`.
pub fn prefix_range(ip: Ipv6Addr) -> (Ipv6Addr, Ipv6Addr) {
    let bits = u128::from(ip);
    let mask: u128 = !0 << 64;
    (Ipv6Addr::from(bits & mask), Ipv6Addr::from(bits | !mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_counts_by_its_64_prefix() {
        let key = |s: &str| address_key(s.parse().expect("an address"));
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:bbbb::9"), key("2001:db8:1:2::1"));
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
        let (lo, hi) = prefix_range("2001:db8:1:2:aaaa::1".parse().expect("v6"));
        assert_eq!(lo.to_string(), "2001:db8:1:2::");
        assert_eq!(hi.to_string(), "2001:db8:1:2:ffff:ffff:ffff:ffff");
    }
}
