//! What the eBPF programs and user space must agree on: map and program names,
//! map capacities, the constants, flags, event kinds and counter slots both sides use, and
//! the `#[repr(C)]` types stored in the maps (`aya::Pod` for them behind the `user` feature).
//!
//! Each of those types is `#[repr(C)]` and made of `u64`, `u32` and `u8` fields (or arrays
//! and structs of them), with any padding spelled out as a `_pad` field, so both sides lay
//! it out byte for byte alike; the size assertions below fail the build of either side when
//! a layout drifts. Addresses are in network byte order, and a field that holds either
//! family stores IPv4 as `::ffff:a.b.c.d`. Ports are in host byte order, except in the LPM
//! trie keys ([`Allow4`], [`Allow6`]), whose sandbox id and port are big-endian so that the
//! prefix covers them.
#![no_std]

/// Map names, shared so that user space cannot look up a map the kernel side renamed, and
/// map capacities.
pub mod maps {
    /// cgroup id -> [`super::Sandbox`]. Only sockets whose cgroup is, or descends from, a key
    /// here are acted on.
    pub const SANDBOXES: &str = "SANDBOXES";
    /// Capacity of [`SANDBOXES`]: sandboxes registered at once, nested ones included.
    pub const SANDBOXES_MAX_ENTRIES: u32 = 4096;
    /// [`super::PortKey`] -> 1 for every TCP port that a sandbox redirects to its listener.
    pub const INTERCEPT_PORTS: &str = "INTERCEPT_PORTS";
    /// Capacity of [`INTERCEPT_PORTS`], over all sandboxes.
    pub const INTERCEPT_PORTS_MAX_ENTRIES: u32 = 16384;
    /// [`super::PortKey`] -> 1 for every port (TCP or UDP) a sandbox may bind on every
    /// address (`--allow-inbound`); every other bind is held to loopback.
    pub const INBOUND_PORTS: &str = "INBOUND_PORTS";
    /// Capacity of [`INBOUND_PORTS`], over all sandboxes.
    pub const INBOUND_PORTS_MAX_ENTRIES: u32 = 16384;
    /// LPM trie of [`super::Allow4`]: IPv4 CIDR:port pairs a sandbox may reach directly.
    pub const ALLOW4: &str = "ALLOW4";
    /// Capacity of [`ALLOW4`], over all sandboxes.
    pub const ALLOW4_MAX_ENTRIES: u32 = 16384;
    /// LPM trie of [`super::Allow6`]: IPv6 CIDR:port pairs a sandbox may reach directly.
    pub const ALLOW6: &str = "ALLOW6";
    /// Capacity of [`ALLOW6`], over all sandboxes.
    pub const ALLOW6_MAX_ENTRIES: u32 = 16384;
    /// socket cookie -> [`super::SockRecord`], written by connect4/6 before the rewrite.
    pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    /// Capacity of [`ORIG_BY_COOKIE`] (LRU: the oldest entries make way).
    pub const ORIG_BY_COOKIE_MAX_ENTRIES: u32 = 65536;
    /// [`super::SockKey`] -> [`super::SockRecord`], written by sockops once the 4-tuple exists.
    pub const ORIG_BY_TUPLE: &str = "ORIG_BY_TUPLE";
    /// Capacity of [`ORIG_BY_TUPLE`] (LRU).
    pub const ORIG_BY_TUPLE_MAX_ENTRIES: u32 = 65536;
    /// Ring buffer of [`super::Event`]s: what the kernel side refused (connects, sends,
    /// sockets, datagrams to port 0) or failed to record.
    pub const EVENTS: &str = "EVENTS";
    /// Size of [`EVENTS`] in bytes: a power of two and a whole number of pages, as the kernel
    /// requires.
    pub const EVENTS_BYTE_SIZE: u32 = 256 * 1024;
    /// Per-CPU array of `u64` counters indexed by [`super::Counter`], [`super::COUNTER_SLOTS`]
    /// of them.
    pub const COUNTERS: &str = "COUNTERS";
    /// socket cookie -> [`super::DnsClient`]: a UDP socket that sent to port 53, and where to.
    pub const DNS_BY_COOKIE: &str = "DNS_BY_COOKIE";
    /// Capacity of [`DNS_BY_COOKIE`] (LRU).
    pub const DNS_BY_COOKIE_MAX_ENTRIES: u32 = 65536;
    /// [`super::DnsPeerKey`] -> [`super::SockRecord`]: who is behind a query the DNS listener
    /// received, written by the cgroup_skb program as the datagram leaves the sandbox.
    pub const DNS_PEERS: &str = "DNS_PEERS";
    /// Capacity of [`DNS_PEERS`] (LRU).
    pub const DNS_PEERS_MAX_ENTRIES: u32 = 65536;
}

/// Program names as they appear in the object file.
pub mod programs {
    pub const CONNECT4: &str = "egress_connect4";
    pub const CONNECT6: &str = "egress_connect6";
    pub const SENDMSG4: &str = "egress_sendmsg4";
    pub const SENDMSG6: &str = "egress_sendmsg6";
    pub const GETPEERNAME4: &str = "egress_getpeername4";
    pub const GETPEERNAME6: &str = "egress_getpeername6";
    pub const SOCKOPS: &str = "egress_sockops";
    pub const SOCK_RELEASE: &str = "egress_sock_release";
    pub const SOCK_CREATE: &str = "egress_sock_create";
    pub const RECVMSG4: &str = "egress_recvmsg4";
    pub const RECVMSG6: &str = "egress_recvmsg6";
    /// cgroup/bind4 and bind6: a sandbox listens on loopback only.
    pub const BIND4: &str = "egress_bind4";
    pub const BIND6: &str = "egress_bind6";
    /// cgroup_skb/egress: names the sender of each DNS datagram.
    pub const SKB: &str = "egress_skb";
    /// cgroup_skb/egress with the `--strict` backstop on top.
    pub const SKB_STRICT: &str = "egress_skb_strict";
}

/// How deep below the cgroup2 root the programs look for a registered sandbox.
pub const MAX_CGROUP_DEPTH: i32 = 32;

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;
pub const IPPROTO_TCP: u32 = 6;
pub const IPPROTO_UDP: u32 = 17;

/// One registered sandbox, keyed by the cgroup id (the inode of its cgroup2 directory).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sandbox {
    /// Identifier user space picked; echoed in [`SockRecord`] and [`Event`].
    pub id: u32,
    /// Proxy listener the sandbox's IPv4 connects are rewritten to (network byte order).
    pub listen4_addr: u32,
    /// Its port, host byte order.
    pub listen4_port: u32,
    /// Proxy listener for native IPv6 connects (network byte order words).
    pub listen6_addr: [u32; 4],
    /// Its port, host byte order.
    pub listen6_port: u32,
    /// DNS listener (UDP and TCP) on `listen4_addr`, host byte order.
    pub dns4_port: u32,
    /// DNS listener (UDP and TCP) on `listen6_addr`, host byte order.
    pub dns6_port: u32,
    /// [`SANDBOX_STRICT`] and future bits.
    pub flags: u32,
    pub _pad: u32,
}

/// [`Sandbox::flags`]: drop packets to anything but the listeners and allowances.
pub const SANDBOX_STRICT: u32 = 1;

/// Key of [`maps::INTERCEPT_PORTS`] and [`maps::INBOUND_PORTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortKey {
    pub sandbox: u32,
    pub port: u32,
}

/// Data part of an [`maps::ALLOW4`] key. The sandbox and port come first so that the LPM
/// prefix covers them whole (64 bits) and then the CIDR bits of `addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allow4 {
    /// Big-endian sandbox id.
    pub sandbox: u32,
    /// Big-endian port.
    pub port: u32,
    /// Network byte order.
    pub addr: u32,
}

/// Data part of an [`maps::ALLOW6`] key; see [`Allow4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allow6 {
    pub sandbox: u32,
    pub port: u32,
    pub addr: [u32; 4],
}

/// Bits of an LPM key that cover the sandbox id and port.
pub const ALLOW_FIXED_PREFIX: u32 = 64;

/// Where a redirected socket was really going.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRecord {
    /// Network byte order; an IPv4 destination is stored as `::ffff:a.b.c.d`.
    pub addr: [u32; 4],
    /// Host byte order.
    pub port: u32,
    /// Family of the socket that connected (`AF_INET` or `AF_INET6`), so that getpeername
    /// answers in the form the program used.
    pub family: u32,
    pub sandbox: u32,
    /// Thread-group id (the process id user space sees) of the connecting task.
    pub tgid: u32,
    pub comm: [u8; 16],
}

/// A UDP socket that sent to port 53: where it was going, and in which network namespace
/// (the cgroup_skb program that names the datagram's sender cannot ask the kernel).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsClient {
    pub orig: SockRecord,
    pub netns: u64,
    /// The [`maps::DNS_PEERS`] key this socket's datagrams were last named under, so that
    /// sock_release can delete it and a later owner of the port is not taken for this one.
    pub peer: DnsPeerKey,
}

/// Key of [`maps::DNS_PEERS`]: the source address and port of a query as the DNS listener
/// sees it, in the listener's network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsPeerKey {
    pub netns: u64,
    /// Network byte order; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u32; 4],
    /// Host byte order.
    pub port: u32,
    pub _pad: u32,
}

/// A TCP connection's 4-tuple as sockops sees it from the client side, qualified by the
/// network namespace so that identical loopback tuples in two isolated sandboxes stay apart.
/// IPv4 addresses are stored v4-mapped so that one map serves both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// `bpf_get_netns_cookie` in the kernel, `SO_NETNS_COOKIE` of the listener in user space.
    pub netns: u64,
    pub src_addr: [u32; 4],
    pub dst_addr: [u32; 4],
    /// Host byte order.
    pub src_port: u32,
    /// Host byte order.
    pub dst_port: u32,
}

/// What an [`Event`] reports.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A TCP connect to a port that is neither intercepted nor allowed.
    DenyTcpConnect = 1,
    /// A UDP connect or send to a port that is not allowed.
    DenyUdp = 2,
    /// A socket of another type or protocol (SCTP, ICMP, MPTCP...).
    DenyProtocol = 3,
    /// A socket in a sandbox subtree whose task is in no registered sandbox (for example a
    /// socket handed to an outside process): refused, never guessed.
    DenyNoSandbox = 4,
    /// The original destination could not be recorded; the connect was still rewritten, so
    /// the proxy refuses it for lack of an entry.
    RecordFailed = 5,
    /// A socket that is neither TCP nor UDP (ICMP ping, raw, SCTP, MPTCP) refused at creation.
    DenySocket = 6,
    /// A bind to a specific non-loopback address on a port not allowed inbound.
    DenyBind = 7,
}

impl EventKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::DenyTcpConnect,
            2 => Self::DenyUdp,
            3 => Self::DenyProtocol,
            4 => Self::DenyNoSandbox,
            5 => Self::RecordFailed,
            6 => Self::DenySocket,
            7 => Self::DenyBind,
            _ => return None,
        })
    }
}

/// A kernel-side refusal, sent to user space through [`maps::EVENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub kind: u32,
    pub sandbox: u32,
    pub tgid: u32,
    pub family: u32,
    pub protocol: u32,
    /// Host byte order.
    pub port: u32,
    /// Network byte order, IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u32; 4],
    pub comm: [u8; 16],
}

/// Indexes into [`maps::COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    Redirected = 0,
    RecordFailed = 1,
    Denied = 2,
    EventsLost = 3,
    /// DNS queries (UDP sends and TCP connects to port 53) sent to the DNS listener.
    DnsRedirected = 4,
    /// Packets the `--strict` backstop dropped.
    StrictDropped = 5,
}

pub const COUNTER_SLOTS: u32 = 6;

/// `::ffff:a.b.c.d` for an IPv4 address in network byte order.
#[inline(always)]
pub const fn v4_mapped(addr_be: u32) -> [u32; 4] {
    [0, 0, 0xffff_u32.to_be(), addr_be]
}

/// Whether `addr` (network-order words) is `::ffff:a.b.c.d`.
#[inline(always)]
pub const fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == 0xffff_u32.to_be()
}

// The layouts both sides depend on, checked whenever either side builds: a field added,
// removed, resized or left to implicit padding changes a size here.
const _: () = assert!(size_of::<Sandbox>() == 12 * 4);
const _: () = assert!(size_of::<PortKey>() == 8);
const _: () = assert!(size_of::<Allow4>() == 12);
const _: () = assert!(size_of::<Allow6>() == 24);
const _: () = assert!(size_of::<SockRecord>() == 8 * 4 + 16);
const _: () = assert!(size_of::<SockKey>() == 48);
const _: () = assert!(size_of::<DnsPeerKey>() == 32);
const _: () = assert!(size_of::<DnsClient>() == 8 * 4 + 16 + 8 + 32);
const _: () = assert!(size_of::<Event>() == 10 * 4 + 16);
// The kernel refuses a ring buffer whose size is not a power of two and a whole number of
// pages; a power of two of at least one page is both (pages are 4 KiB on x86-64).
const _: () = assert!(maps::EVENTS_BYTE_SIZE.is_power_of_two() && maps::EVENTS_BYTE_SIZE >= 4096);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is #[repr(C)], made of integer fields (and arrays and structs of
    // them) with no implicit padding (see the size assertions above), so every bit pattern
    // is a valid value.
    unsafe impl aya::Pod for super::Sandbox {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Allow4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Allow6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: as above (u64 fields first or 8-aligned, explicit padding).
    unsafe impl aya::Pod for super::DnsClient {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DnsPeerKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapping_round_trips() {
        let a = u32::from_be_bytes([10, 1, 2, 3]).to_be();
        let m = v4_mapped(a);
        assert!(is_v4_mapped(&m));
        assert_eq!(m[3], a);
        assert!(!is_v4_mapped(&[0, 0, 0, 1u32.to_be()]));
    }
}
