//! The kernel half of egress: cgroup socket hooks that send a sandbox's TCP connects to the
//! proxy, remember where each one was going, and refuse every other way out.
//!
//! The programs are attached to each sandbox cgroup (they run for that cgroup and everything
//! below it), so sockets of other cgroups, the proxy's own among them, never reach this code.
//! Inside a sandbox the rule is fail closed: anything not understood is refused.
//!
//! DNS (UDP or TCP port 53, to any address) goes to the DNS listener, which answers only the
//! names the policy permits. A cgroup_skb program names the sender of each DNS datagram for
//! the listener, and with `--strict` drops any packet not bound for a listener or allowance.
#![no_std]
#![no_main]

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock_addr, BPF_SOCK_OPS_TCP_CONNECT_CB},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
            bpf_skb_ancestor_cgroup_id,
        },
    },
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, map, sock_ops},
    maps::{lpm_trie::Key, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockOpsContext},
    EbpfContext as _,
};
use egress_common::{
    is_v4_mapped, v4_mapped, Allow4, Allow6, Counter, DnsClient, DnsPeerKey, Event, EventKind,
    PortKey, Sandbox, SockKey, SockRecord, AF_INET, AF_INET6, ALLOW_FIXED_PREFIX, COUNTER_SLOTS,
    IPPROTO_TCP, IPPROTO_UDP, MAX_CGROUP_DEPTH, SANDBOX_STRICT,
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const DNS_PORT: u16 = 53;

#[map(name = "SANDBOXES")]
static SANDBOXES: HashMap<u64, Sandbox> = HashMap::with_max_entries(4096, 0);

#[map(name = "INTERCEPT_PORTS")]
static INTERCEPT_PORTS: HashMap<PortKey, u32> = HashMap::with_max_entries(16384, 0);

#[map(name = "ALLOW4")]
static ALLOW4: LpmTrie<Allow4, u32> = LpmTrie::with_max_entries(16384, 0);

#[map(name = "ALLOW6")]
static ALLOW6: LpmTrie<Allow6, u32> = LpmTrie::with_max_entries(16384, 0);

// LRU, never a plain hash: a full plain hash makes inserts fail, and the entries of a busy
// sandbox must age out rather than block new ones.
#[map(name = "ORIG_BY_COOKIE")]
static ORIG_BY_COOKIE: LruHashMap<u64, SockRecord> = LruHashMap::with_max_entries(65536, 0);

#[map(name = "ORIG_BY_TUPLE")]
static ORIG_BY_TUPLE: LruHashMap<SockKey, SockRecord> = LruHashMap::with_max_entries(65536, 0);

#[map(name = "DNS_BY_COOKIE")]
static DNS_BY_COOKIE: LruHashMap<u64, DnsClient> = LruHashMap::with_max_entries(65536, 0);

#[map(name = "DNS_PEERS")]
static DNS_PEERS: LruHashMap<DnsPeerKey, SockRecord> = LruHashMap::with_max_entries(65536, 0);

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[inline(always)]
fn count(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: a per-CPU slot is only touched by programs on this CPU, which do not
        // preempt each other.
        unsafe { *p += 1 };
    }
}

/// The deepest registered sandbox containing the current task's cgroup.
///
/// Programs run for the cgroup a socket was created in; that is the creating task's cgroup,
/// and a sandboxed task cannot leave its cgroup. A socket handed to a task outside every
/// sandbox finds nothing here and is refused.
#[inline(always)]
fn find_sandbox() -> Option<Sandbox> {
    // SAFETY: plain helper call with a scalar argument.
    find_sandbox_by(|level| unsafe { bpf_get_current_ancestor_cgroup_id(level) })
}

/// The deepest registered sandbox containing the cgroup of the socket that sent `skb`
/// (packets may be sent from softirq context, so not the current task's).
#[inline(always)]
fn find_sandbox_skb(skb: *mut __sk_buff) -> Option<Sandbox> {
    // SAFETY: the context pointer is valid for the whole program run.
    find_sandbox_by(|level| unsafe { bpf_skb_ancestor_cgroup_id(skb, level) })
}

#[inline(always)]
fn find_sandbox_by(ancestor: impl Fn(i32) -> u64) -> Option<Sandbox> {
    // A reference, not a copy, while walking: an `Option<Sandbox>` left `None` may be
    // spilled with its payload uninitialised, which the verifier rejects.
    let mut found: Option<&Sandbox> = None;
    let mut level = 0;
    while level < MAX_CGROUP_DEPTH {
        let id = ancestor(level);
        if id == 0 {
            break;
        }
        // SAFETY: map values stay valid for the whole program run.
        if let Some(sb) = unsafe { SANDBOXES.get(id) } {
            found = Some(sb);
        }
        level += 1;
    }
    found.copied()
}

#[inline(always)]
fn tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[inline(always)]
fn comm() -> [u8; 16] {
    bpf_get_current_comm().unwrap_or([0; 16])
}

fn report(kind: EventKind, sandbox: u32, family: u32, protocol: u32, addr: [u32; 4], port: u16) {
    submit(Event {
        kind: kind as u32,
        sandbox,
        tgid: tgid(),
        family,
        protocol,
        port: port as u32,
        addr,
        comm: comm(),
    });
}

/// Counts a refusal and hands it to user space.
#[inline(always)]
fn submit(ev: Event) {
    count(Counter::Denied);
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(ev);
            entry.submit(0);
        }
        None => count(Counter::EventsLost),
    }
}

#[inline(always)]
fn intercepted(sandbox: u32, port: u16) -> bool {
    let key = PortKey {
        sandbox,
        port: port as u32,
    };
    // SAFETY: only presence is checked.
    unsafe { INTERCEPT_PORTS.get(key) }.is_some()
}

#[inline(always)]
fn allowed4(sandbox: u32, addr: u32, port: u16) -> bool {
    let key = Key::new(
        ALLOW_FIXED_PREFIX + 32,
        Allow4 {
            sandbox: sandbox.to_be(),
            port: (port as u32).to_be(),
            addr,
        },
    );
    ALLOW4.get(&key).is_some()
}

#[inline(always)]
fn allowed6(sandbox: u32, addr: [u32; 4], port: u16) -> bool {
    let key = Key::new(
        ALLOW_FIXED_PREFIX + 128,
        Allow6 {
            sandbox: sandbox.to_be(),
            port: (port as u32).to_be(),
            addr,
        },
    );
    ALLOW6.get(&key).is_some()
}

/// Saves where a socket was going, under its cookie. The caller rewrites regardless of the
/// outcome: a rewritten connect without an entry is refused by the proxy, never sent direct.
#[inline(always)]
fn record(ctx: &SockAddrContext, sb: &Sandbox, family: u32, addr: [u32; 4], port: u16) {
    // SAFETY: the context pointer is valid for the whole program run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = SockRecord {
        addr,
        port: port as u32,
        family,
        sandbox: sb.id,
        tgid: tgid(),
        comm: comm(),
    };
    if ORIG_BY_COOKIE.insert(cookie, orig, 0).is_err() {
        count(Counter::RecordFailed);
        report(
            EventKind::RecordFailed,
            sb.id,
            family,
            IPPROTO_TCP,
            addr,
            port,
        );
    } else {
        count(Counter::Redirected);
    }
}

/// What to do with a connect or send whose destination is `addr:port`, given in v4-mapped
/// or native IPv6 form. Returns the verdict, rewriting `sa` when the connect is redirected.
#[inline(always)]
fn decide(ctx: &SockAddrContext, family: u32, addr: [u32; 4], port: u16, is_send: bool) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: reads of whole 32-bit context fields.
    let (ty, proto) = unsafe { ((*sa).type_, (*sa).protocol) };
    // glibc's source-address probe connects a UDP socket to port 0 and sends nothing. A
    // send on such a socket would go to port 0 unhooked: the cgroup_skb program drops it.
    if port == 0 && ty == SOCK_DGRAM && !is_send {
        return ALLOW;
    }
    let Some(sb) = find_sandbox() else {
        report(EventKind::DenyNoSandbox, 0, family, 0, addr, port);
        return DENY;
    };
    let mapped = is_v4_mapped(&addr);

    if ty == SOCK_DGRAM && proto == IPPROTO_UDP {
        // DNS, to whatever resolver, goes to the DNS listener; every other UDP destination
        // (QUIC among them) is refused.
        if port == DNS_PORT {
            record_dns(ctx, &sb, family, addr, port);
            rewrite(sa, &sb, family, mapped, sb.dns4_port, sb.dns6_port);
            return ALLOW;
        }
        if at_listener(&sb, mapped, addr, port, sb.dns4_port, sb.dns6_port) {
            // Straight at the DNS listener: no record of this socket, so the listener
            // refuses its queries.
            return ALLOW;
        }
        report(EventKind::DenyUdp, sb.id, family, proto, addr, port);
        return DENY;
    }
    if ty != SOCK_STREAM || proto != IPPROTO_TCP || is_send {
        report(EventKind::DenyProtocol, sb.id, family, proto, addr, port);
        return DENY;
    }

    // Already aimed at a listener: pass untouched; it refuses it for lack of an entry.
    if at_listener(&sb, mapped, addr, port, sb.listen4_port, sb.listen6_port)
        || at_listener(&sb, mapped, addr, port, sb.dns4_port, sb.dns6_port)
    {
        return ALLOW;
    }

    if port == DNS_PORT {
        record(ctx, &sb, family, addr, port);
        count(Counter::DnsRedirected);
        rewrite(sa, &sb, family, mapped, sb.dns4_port, sb.dns6_port);
        return ALLOW;
    }
    if intercepted(sb.id, port) {
        record(ctx, &sb, family, addr, port);
        rewrite(sa, &sb, family, mapped, sb.listen4_port, sb.listen6_port);
        return ALLOW;
    }

    let ok = if mapped {
        allowed4(sb.id, addr[3], port)
    } else {
        allowed6(sb.id, addr, port)
    };
    if ok {
        return ALLOW;
    }
    report(EventKind::DenyTcpConnect, sb.id, family, proto, addr, port);
    DENY
}

/// Whether `addr:port` is the sandbox's listener on `port4`/`port6`.
#[inline(always)]
fn at_listener(
    sb: &Sandbox,
    mapped: bool,
    addr: [u32; 4],
    port: u16,
    port4: u32,
    port6: u32,
) -> bool {
    if mapped {
        addr[3] == sb.listen4_addr && port as u32 == port4
    } else {
        addr == sb.listen6_addr && port as u32 == port6
    }
}

/// Points a connect or send at the sandbox's listener on `port4`/`port6`, in the address
/// form the socket uses.
#[inline(always)]
fn rewrite(
    sa: *mut bpf_sock_addr,
    sb: &Sandbox,
    family: u32,
    mapped: bool,
    port4: u32,
    port6: u32,
) {
    // SAFETY: whole-field writes to the context, which the verifier allows for connect and
    // sendmsg.
    unsafe {
        if family == AF_INET {
            (*sa).user_ip4 = sb.listen4_addr;
            (*sa).user_port = ((port4 as u16).to_be()) as u32;
        } else if mapped {
            let l = v4_mapped(sb.listen4_addr);
            (*sa).user_ip6[0] = l[0];
            (*sa).user_ip6[1] = l[1];
            (*sa).user_ip6[2] = l[2];
            (*sa).user_ip6[3] = l[3];
            (*sa).user_port = ((port4 as u16).to_be()) as u32;
        } else {
            (*sa).user_ip6[0] = sb.listen6_addr[0];
            (*sa).user_ip6[1] = sb.listen6_addr[1];
            (*sa).user_ip6[2] = sb.listen6_addr[2];
            (*sa).user_ip6[3] = sb.listen6_addr[3];
            (*sa).user_port = ((port6 as u16).to_be()) as u32;
        }
    }
}

/// Saves, under the socket's cookie, the resolver a UDP socket sent to: recvmsg and
/// getpeername answer with it, and the cgroup_skb program hands it to the listener with
/// each datagram. The send is rewritten even if this fails; the listener then refuses.
#[inline(always)]
fn record_dns(ctx: &SockAddrContext, sb: &Sandbox, family: u32, addr: [u32; 4], port: u16) {
    // SAFETY: the context pointer is valid for the whole program run.
    let (cookie, netns) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_netns_cookie(ctx.as_ptr()),
        )
    };
    let mut client = DnsClient {
        orig: SockRecord {
            addr,
            port: port as u32,
            family,
            sandbox: sb.id,
            tgid: tgid(),
            comm: comm(),
        },
        netns,
        peer: DnsPeerKey::default(),
    };
    // A socket that already sent keeps the key it was named under, for sock_release.
    // SAFETY: the value is copied out at once.
    if let Some(old) = unsafe { DNS_BY_COOKIE.get(cookie) } {
        client.peer = old.peer;
    }
    if DNS_BY_COOKIE.insert(cookie, client, 0).is_err() {
        count(Counter::RecordFailed);
        report(
            EventKind::RecordFailed,
            sb.id,
            family,
            IPPROTO_UDP,
            addr,
            port,
        );
    } else {
        count(Counter::DnsRedirected);
    }
}

#[inline(always)]
fn dest4(ctx: &SockAddrContext) -> ([u32; 4], u16) {
    // SAFETY: whole 32-bit field reads, as the verifier requires.
    let (ip, port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    (v4_mapped(ip), u16::from_be(port as u16))
}

#[inline(always)]
fn dest6(ctx: &SockAddrContext) -> ([u32; 4], u16) {
    let sa = ctx.sock_addr;
    // SAFETY: element-by-element 32-bit volatile reads of user_ip6, as the verifier requires.
    unsafe {
        (
            [
                read_volatile(&(*sa).user_ip6[0]),
                read_volatile(&(*sa).user_ip6[1]),
                read_volatile(&(*sa).user_ip6[2]),
                read_volatile(&(*sa).user_ip6[3]),
            ],
            u16::from_be((*sa).user_port as u16),
        )
    }
}

#[cgroup_sock_addr(connect4)]
pub fn egress_connect4(ctx: SockAddrContext) -> i32 {
    let (addr, port) = dest4(&ctx);
    decide(&ctx, AF_INET, addr, port, false)
}

#[cgroup_sock_addr(connect6)]
pub fn egress_connect6(ctx: SockAddrContext) -> i32 {
    let (addr, port) = dest6(&ctx);
    decide(&ctx, AF_INET6, addr, port, false)
}

/// Unconnected sends (`sendto`/`sendmsg` with an address): UDP only reaches here.
#[cgroup_sock_addr(sendmsg4)]
pub fn egress_sendmsg4(ctx: SockAddrContext) -> i32 {
    let (addr, port) = dest4(&ctx);
    decide(&ctx, AF_INET, addr, port, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn egress_sendmsg6(ctx: SockAddrContext) -> i32 {
    let (addr, port) = dest6(&ctx);
    decide(&ctx, AF_INET6, addr, port, true)
}

/// Where a redirected socket (TCP, or UDP to a resolver) was going.
#[inline(always)]
fn orig_of(ctx: &SockAddrContext) -> Option<SockRecord> {
    // SAFETY: the context pointer is valid for the whole program run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the values are copied out at once.
    unsafe {
        if let Some(orig) = ORIG_BY_COOKIE.get(cookie) {
            return Some(*orig);
        }
        DNS_BY_COOKIE.get(cookie).map(|c| c.orig)
    }
}

/// A datagram from the DNS listener reads as coming from the resolver the program asked.
#[cgroup_sock_addr(recvmsg4)]
pub fn egress_recvmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let Some(c) = (unsafe { DNS_BY_COOKIE.get(cookie) }).copied() else {
        return ALLOW;
    };
    let Some(sb) = find_sandbox() else {
        return ALLOW;
    };
    let (addr, port) = dest4(&ctx);
    if at_listener(&sb, true, addr, port, sb.dns4_port, sb.dns6_port) {
        // SAFETY: whole-field writes, allowed for recvmsg.
        unsafe {
            (*ctx.sock_addr).user_ip4 = c.orig.addr[3];
            (*ctx.sock_addr).user_port = ((c.orig.port as u16).to_be()) as u32;
        }
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn egress_recvmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let Some(c) = (unsafe { DNS_BY_COOKIE.get(cookie) }).copied() else {
        return ALLOW;
    };
    let Some(sb) = find_sandbox() else {
        return ALLOW;
    };
    let (addr, port) = dest6(&ctx);
    let mapped = is_v4_mapped(&addr);
    if at_listener(&sb, mapped, addr, port, sb.dns4_port, sb.dns6_port) {
        let a = c.orig.addr;
        let sa = ctx.sock_addr;
        // SAFETY: whole-field writes, allowed for recvmsg.
        unsafe {
            (*sa).user_ip6[0] = a[0];
            (*sa).user_ip6[1] = a[1];
            (*sa).user_ip6[2] = a[2];
            (*sa).user_ip6[3] = a[3];
            (*sa).user_port = ((c.orig.port as u16).to_be()) as u32;
        }
    }
    ALLOW
}

/// A redirected socket reports the peer it asked for, not the proxy.
#[cgroup_sock_addr(getpeername4)]
pub fn egress_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = orig_of(&ctx) {
        let (ip, port) = (orig.addr[3], orig.port);
        // SAFETY: whole-field writes, allowed for getpeername.
        unsafe {
            (*ctx.sock_addr).user_ip4 = ip;
            (*ctx.sock_addr).user_port = ((port as u16).to_be()) as u32;
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn egress_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = orig_of(&ctx) {
        let (a, port) = (orig.addr, orig.port);
        let sa = ctx.sock_addr;
        // SAFETY: whole-field writes, allowed for getpeername.
        unsafe {
            (*sa).user_ip6[0] = a[0];
            (*sa).user_ip6[1] = a[1];
            (*sa).user_ip6[2] = a[2];
            (*sa).user_ip6[3] = a[3];
            (*sa).user_port = ((port as u16).to_be()) as u32;
        }
    }
    ALLOW
}

/// Re-keys a redirected connection by its 4-tuple once the kernel has picked the source
/// port, so that the proxy can find it from `accept`'s peer and local addresses.
#[sock_ops]
pub fn egress_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 1;
    }
    // SAFETY: the context pointer is valid for the whole program run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(cookie) }).copied() else {
        return 1;
    };
    // SAFETY: the context pointer is valid for the whole program run.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = if ctx.family() == AF_INET {
        SockKey {
            netns,
            src_addr: v4_mapped(ctx.local_ip4()),
            dst_addr: v4_mapped(ctx.remote_ip4()),
            src_port: ctx.local_port(),
            dst_port: u32::from_be(ctx.remote_port()),
        }
    } else {
        let ops = ctx.ops;
        // SAFETY: element-by-element 32-bit volatile reads: the verifier rejects the 64-bit
        // loads a plain array copy compiles to.
        let (src, dst) = unsafe {
            (
                [
                    read_volatile(&(*ops).local_ip6[0]),
                    read_volatile(&(*ops).local_ip6[1]),
                    read_volatile(&(*ops).local_ip6[2]),
                    read_volatile(&(*ops).local_ip6[3]),
                ],
                [
                    read_volatile(&(*ops).remote_ip6[0]),
                    read_volatile(&(*ops).remote_ip6[1]),
                    read_volatile(&(*ops).remote_ip6[2]),
                    read_volatile(&(*ops).remote_ip6[3]),
                ],
            )
        };
        SockKey {
            netns,
            src_addr: src,
            dst_addr: dst,
            src_port: ctx.local_port(),
            dst_port: u32::from_be(ctx.remote_port()),
        }
    };
    if ORIG_BY_TUPLE.insert(key, orig, 0).is_err() {
        count(Counter::RecordFailed);
    }
    1
}

/// The cookie entry lives until the socket is released, since getpeername needs it.
#[cgroup_sock(sock_release)]
pub fn egress_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = ORIG_BY_COOKIE.remove(cookie);
    // SAFETY: the value is copied out at once.
    if let Some(c) = (unsafe { DNS_BY_COOKIE.get(cookie) }).copied() {
        if c.peer.port != 0 {
            let _ = DNS_PEERS.remove(c.peer);
        }
        let _ = DNS_BY_COOKIE.remove(cookie);
    }
    ALLOW
}

/// Only TCP and UDP sockets may be created in a sandbox: ICMP ping sockets, raw sockets,
/// SCTP and MPTCP would each be a way out that no connect or sendmsg hook sees.
#[cgroup_sock(sock_create)]
pub fn egress_sock_create(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: whole 32-bit field reads of the socket being created.
    let (family, ty, proto) = unsafe { ((*sk).family, (*sk).type_, (*sk).protocol) };
    if family != AF_INET && family != AF_INET6 {
        return ALLOW;
    }
    if (ty == SOCK_STREAM && proto == IPPROTO_TCP) || (ty == SOCK_DGRAM && proto == IPPROTO_UDP) {
        return ALLOW;
    }
    let sandbox = find_sandbox().map(|sb| sb.id).unwrap_or(0);
    report(EventKind::DenySocket, sandbox, family, proto, [0; 4], 0);
    DENY
}

const PASS_SKB: i32 = 1;
const DROP_SKB: i32 = 0;

/// Tells the DNS listener who sent each datagram: a connected UDP socket's source port is
/// only known once it sends, so connect4/6 cannot. Keyed by the packet's source address
/// (what the listener sees; an unbound socket has none of its own) and port.
#[inline(always)]
fn name_dns_sender(ctx: &SkBuffContext) {
    // SAFETY: the context pointer is valid for the whole program run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(c) = DNS_BY_COOKIE.get_ptr_mut(cookie) else {
        return;
    };
    let Some(addr) = packet_addr(ctx, End::Source) else {
        return;
    };
    // SAFETY: the pointer stays valid for the program run; fields are copied.
    let (netns, orig) = unsafe { ((*c).netns, (*c).orig) };
    let key = DnsPeerKey {
        netns,
        addr,
        port: ctx.skb.local_port(),
        _pad: 0,
    };
    if DNS_PEERS.insert(key, orig, 0).is_err() {
        count(Counter::RecordFailed);
        return;
    }
    // SAFETY: as above; a whole-struct store into the map value.
    unsafe { (*c).peer = key };
}

/// Which address of the IP header [`packet_addr`] reads.
#[derive(Clone, Copy)]
enum End {
    Source,
    Destination,
}

/// An address from the IP header, IPv4 as `::ffff:a.b.c.d`.
#[inline(always)]
fn packet_addr(ctx: &SkBuffContext, end: End) -> Option<[u32; 4]> {
    let first = ctx.load::<u8>(0).ok()?;
    let (v4, v6) = match end {
        End::Source => (12, 8),
        End::Destination => (16, 24),
    };
    match first >> 4 {
        4 => Some(v4_mapped(ctx.load::<u32>(v4).ok()?)),
        6 => Some([
            ctx.load::<u32>(v6).ok()?,
            ctx.load::<u32>(v6 + 4).ok()?,
            ctx.load::<u32>(v6 + 8).ok()?,
            ctx.load::<u32>(v6 + 12).ok()?,
        ]),
        _ => None,
    }
}

/// A UDP datagram to port 0: only a socket connected to port 0 (allowed for glibc's
/// address-selection probe, which never sends) can emit one, past every sendmsg hook.
#[inline(always)]
fn udp_to_port_zero(ctx: &SkBuffContext) -> bool {
    let Ok(first) = ctx.load::<u8>(0) else {
        return false;
    };
    let (proto, port_at) = match first >> 4 {
        4 => (ctx.load::<u8>(9), ((first & 0x0f) as usize) * 4 + 2),
        6 => (ctx.load::<u8>(6), 42),
        _ => return false,
    };
    proto == Ok(IPPROTO_UDP_U8) && ctx.load::<u16>(port_at) == Ok(0)
}

/// Drops and reports a datagram to port 0. Packets may leave from softirq context, so the
/// report carries the sandbox and destination but no pid or comm.
#[inline(always)]
fn refuse_port_zero(ctx: &SkBuffContext) -> i32 {
    let dst = packet_addr(ctx, End::Destination).unwrap_or([0; 4]);
    submit(Event {
        kind: EventKind::DenyUdp as u32,
        sandbox: find_sandbox_skb(ctx.skb.skb).map(|sb| sb.id).unwrap_or(0),
        tgid: 0,
        family: if is_v4_mapped(&dst) {
            AF_INET
        } else {
            AF_INET6
        },
        protocol: IPPROTO_UDP,
        port: 0,
        addr: dst,
        comm: [0; 16],
    });
    DROP_SKB
}

#[cgroup_skb(egress)]
pub fn egress_skb(ctx: SkBuffContext) -> i32 {
    if udp_to_port_zero(&ctx) {
        return refuse_port_zero(&ctx);
    }
    name_dns_sender(&ctx);
    PASS_SKB
}

const IPPROTO_TCP_U8: u8 = 6;
const IPPROTO_UDP_U8: u8 = 17;

/// The `--strict` backstop: a packet from a sandbox socket leaves only for a listener or a
/// TCP allowance. The socket hooks already refuse everything else; this catches whatever
/// they might miss (a kernel path without a hook, a bug), and counts it.
#[cgroup_skb(egress)]
pub fn egress_skb_strict(ctx: SkBuffContext) -> i32 {
    if udp_to_port_zero(&ctx) {
        return refuse_port_zero(&ctx);
    }
    name_dns_sender(&ctx);
    let skb = ctx.skb.skb;
    let Some(sb) = find_sandbox_skb(skb) else {
        return PASS_SKB;
    };
    if sb.flags & SANDBOX_STRICT == 0 || strict_allows(&ctx, &sb) {
        return PASS_SKB;
    }
    count(Counter::StrictDropped);
    DROP_SKB
}

#[inline(always)]
fn strict_allows(ctx: &SkBuffContext, sb: &Sandbox) -> bool {
    // cgroup_skb sees the packet from its network header.
    let Ok(first) = ctx.load::<u8>(0) else {
        return false;
    };
    match first >> 4 {
        4 => {
            let (Ok(proto), Ok(dst)) = (ctx.load::<u8>(9), ctx.load::<u32>(16)) else {
                return false;
            };
            let ihl = ((first & 0x0f) as usize) * 4;
            if proto != IPPROTO_TCP_U8 && proto != IPPROTO_UDP_U8 {
                return false;
            }
            let Ok(port) = ctx.load::<u16>(ihl + 2) else {
                return false;
            };
            let port = u16::from_be(port);
            let addr = v4_mapped(dst);
            at_listener(sb, true, addr, port, sb.listen4_port, sb.listen6_port)
                || at_listener(sb, true, addr, port, sb.dns4_port, sb.dns6_port)
                || (proto == IPPROTO_TCP_U8 && allowed4(sb.id, dst, port))
        }
        6 => {
            let Ok(next) = ctx.load::<u8>(6) else {
                return false;
            };
            if next != IPPROTO_TCP_U8 && next != IPPROTO_UDP_U8 {
                return false;
            }
            let (Ok(a0), Ok(a1), Ok(a2), Ok(a3), Ok(port)) = (
                ctx.load::<u32>(24),
                ctx.load::<u32>(28),
                ctx.load::<u32>(32),
                ctx.load::<u32>(36),
                ctx.load::<u16>(42),
            ) else {
                return false;
            };
            let addr = [a0, a1, a2, a3];
            let port = u16::from_be(port);
            at_listener(sb, false, addr, port, sb.listen4_port, sb.listen6_port)
                || at_listener(sb, false, addr, port, sb.dns4_port, sb.dns6_port)
                || (next == IPPROTO_TCP_U8 && allowed6(sb.id, addr, port))
        }
        _ => false,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
