//! The cgroup_skb programs, which read each packet leaving a sandbox from its IP header:
//! they name the sender of DNS datagrams, drop UDP to port 0, and under `--strict` drop
//! whatever is bound for neither a listener nor an allowance.

use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::cgroup_skb, programs::SkBuffContext,
    EbpfContext as _,
};
use egress_common::{
    is_v4_mapped, v4_mapped, Counter, DnsPeerKey, Event, EventKind, Sandbox, AF_INET, AF_INET6,
    IPPROTO_UDP, SANDBOX_STRICT,
};

use crate::{
    event::submit,
    maps::{count, DNS_BY_COOKIE, DNS_PEERS},
    sandbox::{allowed4, allowed6, at_any_listener, find_sandbox_skb, inbound_allowed},
};

const PASS_SKB: i32 = 1;
const DROP_SKB: i32 = 0;
// The IP header's protocol byte.
const IPPROTO_TCP_U8: u8 = 6;
const IPPROTO_UDP_U8: u8 = 17;

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

/// The `--strict` backstop: a packet from a sandbox socket leaves only for a listener or a
/// TCP allowance, or from a port allowed inbound (the replies of a server the sandbox may
/// run). The socket hooks already refuse everything else; this catches whatever
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
            let (Ok(sport), Ok(port)) = (ctx.load::<u16>(ihl), ctx.load::<u16>(ihl + 2)) else {
                return false;
            };
            let port = u16::from_be(port);
            let addr = v4_mapped(dst);
            inbound_allowed(sb.id, u16::from_be(sport))
                || at_any_listener(sb, true, addr, port)
                || (proto == IPPROTO_TCP_U8 && allowed4(sb.id, dst, port))
        }
        6 => {
            let Ok(next) = ctx.load::<u8>(6) else {
                return false;
            };
            if next != IPPROTO_TCP_U8 && next != IPPROTO_UDP_U8 {
                return false;
            }
            let (Ok(a0), Ok(a1), Ok(a2), Ok(a3), Ok(sport), Ok(port)) = (
                ctx.load::<u32>(24),
                ctx.load::<u32>(28),
                ctx.load::<u32>(32),
                ctx.load::<u32>(36),
                ctx.load::<u16>(40),
                ctx.load::<u16>(42),
            ) else {
                return false;
            };
            let addr = [a0, a1, a2, a3];
            let port = u16::from_be(port);
            inbound_allowed(sb.id, u16::from_be(sport))
                || at_any_listener(sb, false, addr, port)
                || (next == IPPROTO_TCP_U8 && allowed6(sb.id, addr, port))
        }
        _ => false,
    }
}
