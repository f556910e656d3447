//! sockops: the 4-tuple under which the proxy finds a redirected connection.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::BPF_SOCK_OPS_TCP_CONNECT_CB,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
    EbpfContext as _,
};
use egress_common::{v4_mapped, Counter, SockKey, AF_INET};

use crate::maps::{count, ORIG_BY_COOKIE, ORIG_BY_TUPLE};

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
