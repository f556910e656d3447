//! What the kernel recorded about redirected sockets, as the data path reads it.
//!
//! The proxy and the DNS listener learn who a connection or datagram belongs to (sandbox,
//! pid, comm) and where it was going only from these records, never from the traffic. The
//! kernel maps sit behind [`KernelRecords`] so the whole data path also runs in-process
//! without root against [`MemRecords`], the way the unit tests drive it.

use std::{collections::HashMap, net::SocketAddr, sync::Mutex};

use egress_common::{DnsPeerKey, SockKey, SockRecord};

use crate::addr::{self, ClientAddr, ListenAddr};

/// The two lookups the data path makes into the kernel's tables.
pub trait KernelRecords: Send + Sync {
    /// The record of an accepted TCP connection, deleted on the way out: one record serves
    /// exactly one connection, so a stale one can never be matched twice.
    fn take_conn(&self, key: &SockKey) -> Option<SockRecord>;

    /// The sender of a DNS datagram. Kept: a UDP socket sends many queries, and the kernel
    /// deletes the entry when the socket is released.
    fn dns_peer(&self, key: &DnsPeerKey) -> Option<SockRecord>;
}

/// The key under which the kernel names a DNS datagram's sender: the datagram's source as
/// the listener in namespace `netns` sees it.
pub fn dns_peer_key(netns: u64, peer: SocketAddr) -> DnsPeerKey {
    DnsPeerKey {
        netns,
        addr: addr::mapped_words(peer.ip().to_canonical()),
        port: peer.port().into(),
        _pad: 0,
    }
}

/// In-memory records, for running the data path without a kernel.
#[derive(Default)]
pub struct MemRecords {
    conns: Mutex<HashMap<SockKey, SockRecord>>,
    peers: Mutex<HashMap<DnsPeerKey, SockRecord>>,
}

impl MemRecords {
    /// Records a redirected TCP connection as sockops would: by (netns, client, listener).
    pub fn insert_conn(&self, netns: u64, client: SocketAddr, listen: SocketAddr, r: SockRecord) {
        let key = addr::sock_key(netns, ClientAddr::from_peer(client), ListenAddr(listen));
        lock(&self.conns).insert(key, r);
    }

    /// Names the sender of DNS datagrams from `peer` as the cgroup_skb program would.
    pub fn insert_dns_peer(&self, netns: u64, peer: SocketAddr, r: SockRecord) {
        lock(&self.peers).insert(dns_peer_key(netns, peer), r);
    }

    /// Records not yet taken.
    pub fn pending_conns(&self) -> usize {
        lock(&self.conns).len()
    }
}

impl KernelRecords for MemRecords {
    fn take_conn(&self, key: &SockKey) -> Option<SockRecord> {
        lock(&self.conns).remove(key)
    }

    fn dns_peer(&self, key: &DnsPeerKey) -> Option<SockRecord> {
        lock(&self.peers).get(key).copied()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A record as the kernel writes it, for tests and in-process callers.
pub fn sock_record(sandbox: u32, dst: SocketAddr, pid: u32, comm: &str) -> SockRecord {
    let mut c = [0u8; 16];
    for (d, s) in c.iter_mut().zip(comm.bytes().take(15)) {
        *d = s;
    }
    SockRecord {
        addr: addr::mapped_words(dst.ip()),
        port: dst.port().into(),
        family: if dst.is_ipv4() {
            egress_common::AF_INET
        } else {
            egress_common::AF_INET6
        },
        sandbox,
        tgid: pid,
        comm: c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_record_is_taken_once() {
        let m = MemRecords::default();
        let (client, listen) = (
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:9000".parse().unwrap(),
        );
        let r = sock_record(3, "192.0.2.7:443".parse().unwrap(), 42, "curl");
        m.insert_conn(7, client, listen, r);
        let key = addr::sock_key(7, ClientAddr(client), ListenAddr(listen));
        assert_eq!(m.take_conn(&key), Some(r));
        assert_eq!(m.take_conn(&key), None);
        assert_eq!(addr::comm(&r.comm), "curl");
        assert_eq!(addr::orig_dst(&r).to_string(), "192.0.2.7:443");
    }

    #[test]
    fn a_dns_peer_is_kept_and_mapped_peers_match() {
        let m = MemRecords::default();
        let r = sock_record(1, "192.0.2.53:53".parse().unwrap(), 9, "dig");
        m.insert_dns_peer(5, "127.0.0.1:5353".parse().unwrap(), r);
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5353".parse().unwrap();
        assert_eq!(m.dns_peer(&dns_peer_key(5, mapped)), Some(r));
        assert_eq!(m.dns_peer(&dns_peer_key(5, mapped)), Some(r));
        assert_eq!(m.dns_peer(&dns_peer_key(6, mapped)), None);
    }
}
