//! The addresses a transparent proxy juggles, kept apart by type.
//!
//! Mixing up the client's address, the listener's and the original destination is the classic
//! bug of this field, so each has its own newtype.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use egress_common::SockKey;

/// Where the sandboxed program asked to connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrigDst(pub SocketAddr);

/// The sandboxed end of an accepted connection (its source address and port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// The proxy listener address the kernel rewrote the connect to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenAddr(pub SocketAddr);

macro_rules! display_inner {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    )*};
}
display_inner!(OrigDst, ClientAddr, ListenAddr);

impl ClientAddr {
    /// A peer as `accept`/`recv_from` report it, with v4-mapped IPv6 made IPv4, which is how
    /// the kernel's records and the audit log spell it.
    pub fn from_peer(peer: SocketAddr) -> Self {
        ClientAddr(SocketAddr::new(peer.ip().to_canonical(), peer.port()))
    }
}

/// Network-order words of an IPv6 address, as the kernel's `__u32 [4]` fields hold them.
pub fn v6_words(ip: &Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The inverse of [`v6_words`].
pub fn ip_from_words(w: &[u32; 4]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

/// Any address in the 16-byte form the maps use: IPv4 becomes `::ffff:a.b.c.d`.
pub fn mapped_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => v6_words(&v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => v6_words(&v6),
    }
}

/// Decodes map words to an address, turning `::ffff:a.b.c.d` back into IPv4.
pub fn ip_from_mapped_words(w: &[u32; 4]) -> IpAddr {
    ip_from_words(w).to_canonical()
}

/// The key sockops stored for a connection, rebuilt from what `accept` returns.
pub fn sock_key(netns: u64, client: ClientAddr, listen: ListenAddr) -> SockKey {
    SockKey {
        netns,
        src_addr: mapped_words(client.0.ip().to_canonical()),
        dst_addr: mapped_words(listen.0.ip().to_canonical()),
        src_port: client.0.port().into(),
        dst_port: listen.0.port().into(),
    }
}

/// The original destination recorded by connect4/6.
pub fn orig_dst(o: &egress_common::SockRecord) -> OrigDst {
    OrigDst(SocketAddr::new(
        ip_from_mapped_words(&o.addr),
        o.port as u16,
    ))
}

/// A kernel `comm` (NUL-padded) as text.
pub fn comm(c: &[u8; 16]) -> String {
    let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
    String::from_utf8_lossy(&c[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn words_round_trip() {
        let ip: Ipv6Addr = "2001:db8::1:2".parse().unwrap();
        assert_eq!(ip_from_words(&v6_words(&ip)), ip);
    }

    #[test]
    fn v4_is_stored_mapped_and_decoded_back() {
        let w = mapped_words(Ipv4Addr::new(127, 0, 0, 2).into());
        assert_eq!(
            w,
            egress_common::v4_mapped(u32::from_ne_bytes([127, 0, 0, 2]))
        );
        assert_eq!(
            ip_from_mapped_words(&w),
            IpAddr::from(Ipv4Addr::new(127, 0, 0, 2))
        );
    }

    #[test]
    fn accepted_mapped_peer_matches_plain_v4_key() {
        let l = ListenAddr("127.0.0.1:9000".parse().unwrap());
        let a = sock_key(7, ClientAddr("127.0.0.1:40000".parse().unwrap()), l);
        let b = sock_key(
            7,
            ClientAddr("[::ffff:127.0.0.1]:40000".parse().unwrap()),
            l,
        );
        assert_eq!(a, b);
        assert_eq!(a.src_port, 40000);
        assert_eq!(a.dst_port, 9000);
    }

    #[test]
    fn comm_stops_at_nul() {
        let mut c = [0u8; 16];
        c[..4].copy_from_slice(b"curl");
        assert_eq!(comm(&c), "curl");
        assert_eq!(comm(&[b'x'; 16]), "x".repeat(16));
    }
}
