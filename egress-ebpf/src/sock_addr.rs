//! connect, sendmsg, recvmsg and getpeername: where a sandbox's TCP connects and DNS sends
//! are redirected to its listeners and everything else is refused, and where a redirected
//! socket is shown the peer it asked for rather than the listener.

use core::ptr::read_volatile;

use aya_ebpf::{
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext as _,
};
use egress_common::{
    is_v4_mapped, v4_mapped, Counter, DnsClient, DnsPeerKey, EventKind, Sandbox, SockRecord,
    AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    event::{comm, report, tgid},
    maps::{count, DNS_BY_COOKIE, ORIG_BY_COOKIE},
    sandbox::{
        allowed4, allowed6, at_any_listener, at_listener, find_sandbox, intercepted, Listener,
    },
    ALLOW, DENY, SOCK_DGRAM, SOCK_STREAM,
};

const DNS_PORT: u16 = 53;

/// Saves where a socket was going, under its cookie. The caller rewrites regardless of the
/// outcome: a rewritten connect without an entry is refused by the proxy, never sent direct.
#[inline(always)]
fn record(ctx: &SockAddrContext, sb: &Sandbox, family: u32, addr: [u32; 4], port: u16) {
    // SAFETY: the context pointer is valid for the whole program run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = sock_record(sb, family, addr, port);
    if ORIG_BY_COOKIE.insert(cookie, orig, 0).is_err() {
        record_failed(sb, family, IPPROTO_TCP, addr, port);
    } else {
        count(Counter::Redirected);
    }
}

/// Where the current task's socket was going, for [`ORIG_BY_COOKIE`] or [`DNS_BY_COOKIE`].
#[inline(always)]
fn sock_record(sb: &Sandbox, family: u32, addr: [u32; 4], port: u16) -> SockRecord {
    SockRecord {
        addr,
        port: port as u32,
        family,
        sandbox: sb.id,
        tgid: tgid(),
        comm: comm(),
    }
}

/// Counts and reports a destination that could not be saved.
#[inline(always)]
fn record_failed(sb: &Sandbox, family: u32, protocol: u32, addr: [u32; 4], port: u16) {
    count(Counter::RecordFailed);
    report(EventKind::RecordFailed, sb.id, family, protocol, addr, port);
}

/// What to do with a connect or send whose destination is `addr:port`, given in v4-mapped
/// or native IPv6 form. Returns the verdict, rewriting the context when the connect is redirected.
#[inline(always)]
fn decide(ctx: &SockAddrContext, family: u32, addr: [u32; 4], port: u16, is_send: bool) -> i32 {
    let sa = ctx.sock_addr;
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
            rewrite(ctx, &sb, Listener::Dns, family, mapped);
            return ALLOW;
        }
        if at_listener(&sb, Listener::Dns, mapped, addr, port) {
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
    if at_any_listener(&sb, mapped, addr, port) {
        return ALLOW;
    }

    if port == DNS_PORT {
        record(ctx, &sb, family, addr, port);
        count(Counter::DnsRedirected);
        rewrite(ctx, &sb, Listener::Dns, family, mapped);
        return ALLOW;
    }
    if intercepted(sb.id, port) {
        record(ctx, &sb, family, addr, port);
        rewrite(ctx, &sb, Listener::Proxy, family, mapped);
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

/// Points a connect or send at the sandbox's `listener`, in the address form the socket
/// uses.
#[inline(always)]
fn rewrite(ctx: &SockAddrContext, sb: &Sandbox, listener: Listener, family: u32, mapped: bool) {
    let (port4, port6) = listener.ports(sb);
    if family == AF_INET {
        set_dest4(ctx, sb.listen4_addr, port4);
    } else if mapped {
        set_dest6(ctx, v4_mapped(sb.listen4_addr), port4);
    } else {
        set_dest6(ctx, sb.listen6_addr, port6);
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
        orig: sock_record(sb, family, addr, port),
        netns,
        peer: DnsPeerKey::default(),
    };
    // A socket that already sent keeps the key it was named under, for sock_release.
    // SAFETY: the value is copied out at once.
    if let Some(old) = unsafe { DNS_BY_COOKIE.get(cookie) } {
        client.peer = old.peer;
    }
    if DNS_BY_COOKIE.insert(cookie, client, 0).is_err() {
        record_failed(sb, family, IPPROTO_UDP, addr, port);
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

/// Sets the address of an IPv4 context: `ip` in network byte order, `port` in host order.
#[inline(always)]
fn set_dest4(ctx: &SockAddrContext, ip: u32, port: u32) {
    let sa = ctx.sock_addr;
    // SAFETY: whole-field writes, which the verifier allows in the connect, sendmsg,
    // recvmsg and getpeername programs that call this.
    unsafe {
        (*sa).user_ip4 = ip;
        (*sa).user_port = ((port as u16).to_be()) as u32;
    }
}

/// Sets the address of an IPv6 context: `addr` in network byte order, `port` in host order.
#[inline(always)]
fn set_dest6(ctx: &SockAddrContext, addr: [u32; 4], port: u32) {
    let sa = ctx.sock_addr;
    // SAFETY: whole-field 32-bit writes, which the verifier allows in the connect, sendmsg,
    // recvmsg and getpeername programs that call this.
    unsafe {
        (*sa).user_ip6[0] = addr[0];
        (*sa).user_ip6[1] = addr[1];
        (*sa).user_ip6[2] = addr[2];
        (*sa).user_ip6[3] = addr[3];
        (*sa).user_port = ((port as u16).to_be()) as u32;
    }
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

/// The resolver a DNS socket asked, when the datagram it receives (whose source `dest`
/// reads) comes from the sandbox's DNS listener.
#[inline(always)]
fn resolver_asked(
    ctx: &SockAddrContext,
    dest: impl Fn(&SockAddrContext) -> ([u32; 4], u16),
) -> Option<SockRecord> {
    // SAFETY: the context pointer is valid for the whole program run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let c = (unsafe { DNS_BY_COOKIE.get(cookie) }).copied()?;
    let sb = find_sandbox()?;
    let (addr, port) = dest(ctx);
    at_listener(&sb, Listener::Dns, is_v4_mapped(&addr), addr, port).then_some(c.orig)
}

/// A datagram from the DNS listener reads as coming from the resolver the program asked.
#[cgroup_sock_addr(recvmsg4)]
pub fn egress_recvmsg4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = resolver_asked(&ctx, dest4) {
        set_dest4(&ctx, orig.addr[3], orig.port);
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn egress_recvmsg6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = resolver_asked(&ctx, dest6) {
        set_dest6(&ctx, orig.addr, orig.port);
    }
    ALLOW
}

/// A redirected socket reports the peer it asked for, not the proxy.
#[cgroup_sock_addr(getpeername4)]
pub fn egress_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = orig_of(&ctx) {
        set_dest4(&ctx, orig.addr[3], orig.port);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn egress_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = orig_of(&ctx) {
        set_dest6(&ctx, orig.addr, orig.port);
    }
    ALLOW
}
