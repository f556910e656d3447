//! Host, IP network and TCP destination patterns, and the host normalisation they match
//! against: the vocabulary shared by the policy, the secrets (which hosts a secret may go
//! to), the kernel maps (`bpf`) and the DNS listener. It imports nothing else from this
//! crate, so any module can use it without an import cycle.

use std::{borrow::Cow, fmt, net::IpAddr, str::FromStr};

mod list;
pub use list::HostList;

/// One host pattern.
///
/// `*.example.com` matches every name below `example.com` (`a.example.com`,
/// `a.b.example.com`) but **not** `example.com` itself: list the apex separately if it is
/// wanted. A bare `*` matches every host. IP literals and CIDRs match IP-literal hosts (an
/// HTTPS request to an IP with no SNI, or `Host: 192.0.2.7`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    Any,
    Exact(String),
    /// `*.suffix`: stored as `.suffix`.
    Subdomains(String),
    Net(IpNet),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{input:?} is not a host pattern ({why}); examples: api.openai.com, *.github.com, 10.0.0.0/8"
)]
pub struct HostPatternError {
    input: String,
    why: &'static str,
}

impl FromStr for HostPattern {
    type Err = HostPatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| HostPatternError {
            input: s.to_owned(),
            why,
        };
        let t = s.trim().trim_end_matches('.').to_ascii_lowercase();
        if t == "*" {
            return Ok(HostPattern::Any);
        }
        if let Ok(ip) = t.parse::<IpAddr>() {
            let prefix = if ip.is_ipv4() { 32 } else { 128 };
            return Ok(HostPattern::Net(IpNet { addr: ip, prefix }));
        }
        if let Some((a, p)) = t.split_once('/') {
            let addr: IpAddr = a.parse().map_err(|_| err("not an IP network"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix = p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| err("bad prefix length"))?;
            return Ok(HostPattern::Net(IpNet {
                addr: mask(addr, prefix),
                prefix,
            }));
        }
        let (wild, name) = match t.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, t.as_str()),
        };
        if name.is_empty() || name.len() > 253 {
            return Err(err("empty or too long"));
        }
        if name.contains('*') {
            return Err(err(
                "`*` is only allowed as a whole leading label, as in *.example.com",
            ));
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !name.split('.').all(label_ok) {
            return Err(err(
                "a name is letters, digits, `-` and `_` in dot-separated labels",
            ));
        }
        Ok(if wild {
            HostPattern::Subdomains(format!(".{name}"))
        } else {
            HostPattern::Exact(name.to_owned())
        })
    }
}

impl HostPattern {
    /// Whether `host` (already lowercased, no port, no trailing dot) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(n) => n == host,
            HostPattern::Subdomains(suffix) => {
                host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
            HostPattern::Net(net) => {
                may_be_ip(host)
                    && host
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<IpAddr>()
                        .is_ok_and(|ip| net.contains(ip.to_canonical()))
            }
        }
    }
}

/// False for a host that cannot be an IP literal: an IPv6 address has a colon, and an IPv4
/// address ends in a digit, which a DNS name almost never does (no top-level domain does).
/// It spares the IP parse for every name, per IP pattern and per request.
fn may_be_ip(host: &str) -> bool {
    host.contains(':') || host.as_bytes().last().is_some_and(u8::is_ascii_digit)
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Any => f.write_str("*"),
            HostPattern::Exact(n) => f.write_str(n),
            HostPattern::Subdomains(s) => write!(f, "*{s}"),
            HostPattern::Net(n) => write!(f, "{}/{}", n.addr, n.prefix),
        }
    }
}

/// Normalises a host from SNI or a Host header: lowercase, no port, no trailing dot.
pub fn normalize_host(raw: &str) -> Cow<'_, str> {
    let h = raw.trim();
    let h = if let Some(rest) = h.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or(rest)
    } else if h.matches(':').count() == 1 {
        h.split(':').next().unwrap_or(h)
    } else {
        h
    };
    let h = h.trim_end_matches('.');
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(h.to_ascii_lowercase())
    } else {
        Cow::Borrowed(h)
    }
}

impl FromStr for IpNet {
    type Err = HostPatternError;

    /// `10.0.0.0/8`, `fd00::/8`, or a single address.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<HostPattern>() {
            Ok(HostPattern::Net(n)) => Ok(n),
            _ => Err(HostPatternError {
                input: s.to_owned(),
                why: "not an IP address or CIDR",
            }),
        }
    }
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                mask(ip, self.prefix) == self.addr
            }
            _ => false,
        }
    }
}

/// An IP network: an address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

/// One direct TCP allowance: any address in `net`, on `port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpAllow {
    pub net: IpNet,
    pub port: u16,
}

impl TcpAllow {
    /// Every address of both families on `port`.
    pub fn any_address(port: u16) -> [TcpAllow; 2] {
        [
            TcpAllow {
                net: IpNet {
                    addr: IpAddr::from([0u8; 4]),
                    prefix: 0,
                },
                port,
            },
            TcpAllow {
                net: IpNet {
                    addr: IpAddr::from([0u16; 8]),
                    prefix: 0,
                },
                port,
            },
        ]
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not CIDR:PORT ({why}); examples: 10.0.0.0/8:5432, 192.0.2.7:22, [2001:db8::/32]:443")]
pub struct ParseError {
    input: String,
    why: &'static str,
}

impl FromStr for TcpAllow {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| ParseError {
            input: s.to_owned(),
            why,
        };
        let (net, port) = if let Some(rest) = s.strip_prefix('[') {
            let (net, port) = rest
                .split_once("]:")
                .ok_or_else(|| err("IPv6 needs [ADDR/LEN]:PORT"))?;
            (net, port)
        } else {
            s.rsplit_once(':').ok_or_else(|| err("missing :PORT"))?
        };
        let port: u16 = port
            .parse()
            .map_err(|_| err("port is not a number from 1 to 65535"))?;
        if port == 0 {
            return Err(err("port is not a number from 1 to 65535"));
        }
        let (addr, prefix) = match net.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (net, None),
        };
        if !s.starts_with('[') && addr.contains(':') {
            return Err(err("IPv6 needs [ADDR/LEN]:PORT"));
        }
        let addr: IpAddr = addr.parse().map_err(|_| err("not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| err("bad prefix length"))?,
            None => max,
        };
        let addr = mask(addr, prefix);
        Ok(TcpAllow {
            net: IpNet { addr, prefix },
            port,
        })
    }
}

/// Clears the host bits, so that `10.1.2.3/8` is stored as `10.0.0.0/8`.
fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::from((u32::from(a) & m).to_be_bytes())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::from((u128::from(a) & m).to_be_bytes())
        }
    }
}

impl fmt::Display for TcpAllow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.net.addr {
            IpAddr::V4(a) => write!(f, "{a}/{}:{}", self.net.prefix, self.port),
            IpAddr::V6(a) => write!(f, "[{a}/{}]:{}", self.net.prefix, self.port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The shortcut never turns away a host that parses as an IP: any address, in any
        /// of its spellings, still reaches the parse.
        #[test]
        fn every_ip_literal_may_be_an_ip(v4 in proptest::prelude::any::<[u8; 4]>(), v6 in proptest::prelude::any::<[u16; 8]>(), bracket in proptest::prelude::any::<bool>()) {
            let v4 = std::net::Ipv4Addr::from(v4);
            let v6 = std::net::Ipv6Addr::from(v6);
            for ip in [IpAddr::V4(v4), IpAddr::V6(v6), IpAddr::V6(v4.to_ipv6_mapped())] {
                let text = match (ip, bracket) {
                    (IpAddr::V6(_), true) => format!("[{ip}]"),
                    _ => ip.to_string(),
                };
                proptest::prop_assert!(may_be_ip(&text), "{text}");
            }
        }

        /// Whatever the string, a host that parses as an IP gets past the shortcut.
        #[test]
        fn no_parseable_host_is_skipped(h in "[0-9a-f:.\\[\\]]{0,45}") {
            let parses = h.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok();
            proptest::prop_assert!(!parses || may_be_ip(&h), "{h}");
        }
    }

    #[test]
    fn names_skip_the_ip_parse() {
        assert!(!may_be_ip("api.example.com"));
        assert!(!may_be_ip("1password.com"));
        assert!(may_be_ip("192.0.2.7"));
        assert!(may_be_ip("[2001:db8::1]"));
        assert!(!pat("10.0.0.0/8").matches("example.com"));
    }

    fn pat(s: &str) -> HostPattern {
        s.parse().unwrap()
    }

    #[test]
    fn wildcard_matches_subdomains_but_not_the_apex() {
        let p = pat("*.example.com");
        assert!(p.matches("a.example.com"));
        assert!(p.matches("a.b.example.com"));
        assert!(
            !p.matches("example.com"),
            "documented: the apex needs its own entry"
        );
        assert!(!p.matches("badexample.com"));
        assert!(!p.matches("example.com.evil.net"));
    }

    #[test]
    fn exact_ip_cidr_and_any() {
        assert!(pat("PyPI.org.").matches("pypi.org"));
        assert!(!pat("pypi.org").matches("files.pypi.org"));
        assert!(pat("127.0.0.0/8").matches("127.1.2.3"));
        assert!(pat("::1").matches("[::1]"));
        assert!(!pat("10.0.0.0/8").matches("11.0.0.1"));
        assert!(pat("*").matches("anything.at.all"));
    }

    #[test]
    fn bad_patterns_are_refused_with_examples() {
        for bad in [
            "",
            "a.*.com",
            "exa mple.com",
            "10.0.0.0/40",
            "*foo.com",
            "a..b",
        ] {
            let e = bad.parse::<HostPattern>().unwrap_err();
            assert!(e.to_string().contains("examples:"), "{bad}: {e}");
        }
    }

    #[test]
    fn hosts_are_normalised() {
        assert_eq!(normalize_host("Example.COM:443"), "example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[::1]:8443"), "::1");
        assert_eq!(normalize_host("::1"), "::1");
    }

    #[test]
    fn parses_v4_cidr_and_host() {
        let a: TcpAllow = "10.1.2.3/8:5432".parse().unwrap();
        assert_eq!(a.to_string(), "10.0.0.0/8:5432");
        let h: TcpAllow = "192.0.2.7:22".parse().unwrap();
        assert_eq!(h.to_string(), "192.0.2.7/32:22");
    }

    #[test]
    fn parses_v6() {
        let a: TcpAllow = "[2001:db8::5/32]:443".parse().unwrap();
        assert_eq!(a.to_string(), "[2001:db8::/32]:443");
        let h: TcpAllow = "[::1]:22".parse().unwrap();
        assert_eq!(h.net.prefix, 128);
        let z: TcpAllow = "[::/0]:22".parse().unwrap();
        assert_eq!(z.net.prefix, 0);
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        for bad in [
            "",
            "10.0.0.1",
            "10.0.0.1:0",
            "10.0.0.1:70000",
            "10.0.0.0/33:1",
            "host:22",
            "::1:22",
            "[::1/129]:22",
            "10.0.0.1/x:2",
        ] {
            let e = bad.parse::<TcpAllow>().unwrap_err();
            assert!(e.to_string().contains("CIDR:PORT"), "{bad}: {e}");
        }
    }
}
