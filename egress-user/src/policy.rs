//! What a sandbox may reach. For now: the TCP destinations it may reach directly, without
//! the proxy (`--allow-tcp CIDR:PORT`, `--allow-port PORT`). Host rules build on this.

use std::{fmt, net::IpAddr, str::FromStr};

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
