//! Client addresses: networks (CIDRs) for trusted proxies and route source rules, and the address the
//! gateway decides a request comes from.
//!
//! Behind a load balancer or ingress, the TCP peer is the proxy, not the client. From a *trusted* proxy
//! (`trusted_proxies`) the client's `X-Forwarded-For` chain is believed, right to left, as far as it goes
//! through trusted proxies: the client is the rightmost address not in a trusted network (the de-facto
//! rule nginx's `real_ip_recursive` and RFC 7239 §5.2's "closest to the server" reading follow). What a
//! client wrote further left is its own claim and is dropped. From anyone else the chain is ignored and
//! replaced by the peer, as it always was.

use http::header::{HeaderMap, HeaderValue};
use std::net::IpAddr;
use std::str::FromStr;

/// An IP network, `10.0.0.0/8`, `2001:db8::/32`, or one address (`/32`, `/128` implied).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let t = s.trim();
        let bad = || format!("`{s}` is not a network like 10.0.0.0/8, 192.168.1.7 or 2001:db8::/32");
        let (addr, prefix) = match t.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (t, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// A list of networks, as settings and rules write it: `CIDR[,CIDR...]` (or a TOML list).
pub fn parse_list(s: &str) -> Result<Vec<Cidr>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(Cidr::from_str)
        .collect()
}

pub fn any_contains(nets: &[Cidr], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(ip))
}

/// Where a request comes from, as the gateway decided.
pub struct Origin {
    /// The client's address: the peer, or what a trusted proxy forwarded for it.
    pub client: IpAddr,
    /// `X-Forwarded-For` to send on, when it differs from the connection's own (a trusted proxy's chain,
    /// from the decided client on, with the peer appended).
    pub forwarded_for: Option<HeaderValue>,
}

/// Decides the client of a request from `peer` carrying `headers`.
pub fn origin(headers: &HeaderMap, peer: IpAddr, trusted: &[Cidr]) -> Origin {
    let untouched = Origin {
        client: peer,
        forwarded_for: None,
    };
    if trusted.is_empty() || !any_contains(trusted, peer) {
        return untouched;
    }
    // The chain, left (farthest) to right (nearest), over every X-Forwarded-For line.
    let chain: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut kept: Vec<IpAddr> = Vec::new();
    let mut client = peer;
    for entry in chain.iter().rev() {
        let Ok(ip) = entry.parse::<IpAddr>() else {
            break; // Garbage ends what can be believed.
        };
        kept.push(ip);
        client = ip;
        if !any_contains(trusted, ip) {
            break;
        }
    }
    if kept.is_empty() {
        return untouched;
    }
    kept.reverse();
    kept.push(peer);
    let text = kept.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    Origin {
        client,
        forwarded_for: HeaderValue::from_str(&text).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_contain_their_addresses_in_both_families() {
        let net: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains(ip("10.1.2.3")));
        assert!(net.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped");
        assert!(!net.contains(ip("11.0.0.1")));
        let one: Cidr = "192.168.1.7".parse().unwrap();
        assert!(one.contains(ip("192.168.1.7")) && !one.contains(ip("192.168.1.8")));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:1::5")) && !v6.contains(ip("2001:db9::1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "x", "10.0.0/8", "::/129", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(parse_list("10.0.0.0/8, 172.16.0.0/12").unwrap().len(), 2);
    }

    #[test]
    fn a_trusted_proxys_chain_is_believed_up_to_the_first_untrusted_address() {
        let trusted = parse_list("10.0.0.0/8").unwrap();
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert("x-forwarded-for", HeaderValue::from_str(v).unwrap());
            m
        };
        // Untrusted peer: the chain is its claim, not information.
        let o = origin(&h("1.2.3.4"), ip("203.0.113.9"), &trusted);
        assert_eq!(o.client, ip("203.0.113.9"));
        assert!(o.forwarded_for.is_none());
        // Trusted ingress in front: the client it saw, with what the client claimed dropped.
        let o = origin(&h("6.6.6.6, 198.51.100.7, 10.0.0.3"), ip("10.0.0.2"), &trusted);
        assert_eq!(o.client, ip("198.51.100.7"));
        assert_eq!(o.forwarded_for.unwrap(), "198.51.100.7, 10.0.0.3, 10.0.0.2");
        // Garbage ends the walk.
        let o = origin(&h("198.51.100.7, junk"), ip("10.0.0.2"), &trusted);
        assert_eq!(o.client, ip("10.0.0.2"));
        // No chain from a trusted peer: the peer is the client.
        let o = origin(&HeaderMap::new(), ip("10.0.0.2"), &trusted);
        assert_eq!(o.client, ip("10.0.0.2"));
        assert!(o.forwarded_for.is_none());
    }
}
