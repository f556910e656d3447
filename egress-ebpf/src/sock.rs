//! Socket creation and release: only TCP and UDP sockets come into being in a sandbox, and
//! what the other programs recorded about a socket goes with it.

use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock, programs::SockContext,
    EbpfContext as _,
};
use egress_common::{EventKind, AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    event::report,
    maps::{DNS_BY_COOKIE, DNS_PEERS, ORIG_BY_COOKIE},
    sandbox::find_sandbox,
    ALLOW, DENY, SOCK_DGRAM, SOCK_STREAM,
};

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
