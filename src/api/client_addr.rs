//! Who the client is (contract §8): the TCP peer, or, when the peer is one of
//! `TRUSTED_PROXIES`, the address that peer forwarded in `X-Forwarded-For`; and the address
//! a per-client table keys on.
//!
//! The rule is the spoof-resistant one: the header is read from the right, skipping the
//! trusted proxies' own entries, and the first address that is not a trusted proxy is the
//! client. Anything to its left was written by that client (or by proxies we know nothing
//! of) and may be forged. An untrusted peer's header is ignored entirely. `Forwarded`
//! (RFC 7239) is not read: the contract names `X-Forwarded-For`, which every common proxy
//! and load balancer sends, and reading two headers would let a client add one the proxy
//! does not overwrite.
//!
//! The connection caps (`MAX_CONNECTIONS_PER_CLIENT`) are applied at accept, before any
//! header exists, so they see the TCP peer only: behind a proxy they count the proxy's
//! connections.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use axum::{
    extract::ConnectInfo,
    http::{Extensions, HeaderMap},
};

use crate::config::Cidr;

const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// The peers whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default)]
pub(super) struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    pub(super) fn new(ranges: Vec<Cidr>) -> TrustedProxies {
        TrustedProxies(ranges)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|range| range.contains(ip))
    }

    /// The client's address for a request from `peer` with `headers`.
    pub(super) fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        // The nearest hop known so far: if the header runs out, or holds something that is
        // not an address, the last trusted hop is the best the service can tell.
        let mut client = peer;
        // Several header lines are one list, in order (RFC 9110 §5.3): read the last first.
        for line in headers.get_all(X_FORWARDED_FOR).iter().rev() {
            let Ok(line) = line.to_str() else {
                return client;
            };
            for entry in line.rsplit(',').map(str::trim) {
                if entry.is_empty() {
                    continue;
                }
                let Some(ip) = forwarded_ip(entry) else {
                    return client;
                };
                client = ip;
                if !self.trusts(ip) {
                    return ip;
                }
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry: an address, with or without a port (some load balancers
/// add it), IPv6 with or without brackets.
fn forwarded_ip(entry: &str) -> Option<IpAddr> {
    let ip = entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()
        .or_else(|| {
            entry
                .strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<Ipv6Addr>()
                .ok()
                .map(IpAddr::V6)
        })?;
    Some(ip.to_canonical())
}

/// The TCP peer's address (the server puts it in every request's extensions).
pub(super) fn peer(extensions: &Extensions) -> IpAddr {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip())
}

/// The address a per-client table (rate limits, the wrong-key throttle) keeps an entry
/// for: IPv4 as is (also when mapped into IPv6), IPv6 by its /64, since one host usually
/// holds a whole /64 and could otherwise rotate through it.
pub(super) fn identity(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn proxies(list: &str) -> TrustedProxies {
        TrustedProxies::new(list.split(',').map(|c| c.parse().unwrap()).collect())
    }

    fn xff(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for line in lines {
            h.append(X_FORWARDED_FOR, HeaderValue::from_str(line).unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peers_header_is_ignored() {
        let none = TrustedProxies::default();
        assert_eq!(
            none.client(ip("192.0.2.1"), &xff(&["203.0.113.9"])),
            ip("192.0.2.1")
        );
        let some = proxies("10.0.0.0/8");
        assert_eq!(
            some.client(ip("192.0.2.1"), &xff(&["203.0.113.9"])),
            ip("192.0.2.1")
        );
    }

    #[test]
    fn the_rightmost_untrusted_address_is_the_client() {
        let p = proxies("10.0.0.0/8,192.0.2.1");
        let from_proxy = |lines: &[&str]| p.client(ip("10.0.0.5"), &xff(lines));
        assert_eq!(from_proxy(&["203.0.113.9"]), ip("203.0.113.9"));
        // A forged entry on the left is the client's own writing: skipped.
        assert_eq!(from_proxy(&["6.6.6.6, 203.0.113.9"]), ip("203.0.113.9"));
        // Trusted hops on the right are skipped, across header lines too.
        assert_eq!(
            from_proxy(&["203.0.113.9, 10.1.1.1", "192.0.2.1"]),
            ip("203.0.113.9")
        );
        assert_eq!(from_proxy(&["6.6.6.6", "203.0.113.9"]), ip("203.0.113.9"));
        // Ports and brackets, as some load balancers write them.
        assert_eq!(from_proxy(&["203.0.113.9:4711"]), ip("203.0.113.9"));
        assert_eq!(from_proxy(&["[2001:db8::7]:443"]), ip("2001:db8::7"));
        assert_eq!(from_proxy(&["[2001:db8::7]"]), ip("2001:db8::7"));
        assert_eq!(from_proxy(&["2001:db8::7"]), ip("2001:db8::7"));
        assert_eq!(from_proxy(&["::ffff:203.0.113.9"]), ip("203.0.113.9"));
    }

    #[test]
    fn without_a_usable_entry_the_last_trusted_hop_is_the_client() {
        let p = proxies("10.0.0.0/8");
        let from_proxy = |lines: &[&str]| p.client(ip("10.0.0.5"), &xff(lines));
        assert_eq!(from_proxy(&[]), ip("10.0.0.5"));
        assert_eq!(from_proxy(&[""]), ip("10.0.0.5"));
        assert_eq!(from_proxy(&["10.9.9.9"]), ip("10.9.9.9"));
        // Garbage stops the walk: nothing to its left can be believed.
        assert_eq!(from_proxy(&["203.0.113.9, unknown"]), ip("10.0.0.5"));
        assert_eq!(from_proxy(&["203.0.113.9, junk, 10.2.2.2"]), ip("10.2.2.2"));
        // A mapped IPv4 peer is the IPv4 address, trusted as such.
        assert_eq!(
            p.client(ip("::ffff:10.0.0.5"), &xff(&["203.0.113.9"])),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn identities_group_ipv6_by_64() {
        assert_eq!(identity(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(identity(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(identity(ip("2001:db8:1:2:ffff::9")), ip("2001:db8:1:2::"));
    }
}
