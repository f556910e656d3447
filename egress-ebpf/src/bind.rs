//! bind4 and bind6: a sandbox listens on loopback only, so nothing outside the host (or
//! the sandbox's network namespace) can connect in and read what it serves.
//!
//! - Loopback (`127.0.0.0/8`, `::1`, `::ffff:127.x.y.z`) binds pass.
//! - Port 0 binds pass whatever the address: they pick an ephemeral port, as clients do
//!   before a connect (`curl --interface`) or a UDP send (`bind(0.0.0.0:0)`); rewriting them
//!   to loopback would break those clients' sends off the host.
//! - A port allowed inbound (`--allow-inbound`, policy `inbound`) binds as asked.
//! - A wildcard (`0.0.0.0`, `::`, `::ffff:0.0.0.0`) is rewritten to loopback in the same
//!   form (`127.0.0.1`, `::1`, `::ffff:127.0.0.1`), so dev servers keep working locally.
//! - Any other address is refused with `EPERM` and reported.

use core::ptr::read_volatile;

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use egress_common::{is_v4_mapped, EventKind, AF_INET, AF_INET6};

use crate::{
    event::report,
    sandbox::{find_sandbox, inbound_allowed},
    ALLOW, DENY,
};

/// 127.0.0.1 in network byte order.
const LOOPBACK4: u32 = u32::from_be_bytes([127, 0, 0, 1]).to_be();

/// What to do with a bind.
enum Bind {
    Pass,
    /// Rewrite the address to loopback.
    Loopback,
    Refuse,
}

/// Judges a bind to `addr:port` (IPv4 as `::ffff:a.b.c.d`), reporting a refusal.
#[inline(always)]
fn judge(ctx: &SockAddrContext, family: u32, addr: [u32; 4], port: u16) -> Bind {
    let mapped = is_v4_mapped(&addr);
    let loopback = if mapped {
        u32::from_be(addr[3]) >> 24 == 127
    } else {
        addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == 1u32.to_be()
    };
    if loopback || port == 0 {
        return Bind::Pass;
    }
    // SAFETY: a whole 32-bit context field read.
    let proto = unsafe { (*ctx.sock_addr).protocol };
    let Some(sb) = find_sandbox() else {
        report(EventKind::DenyNoSandbox, 0, family, proto, addr, port);
        return Bind::Refuse;
    };
    if inbound_allowed(sb.id, port) {
        return Bind::Pass;
    }
    let wildcard = if mapped {
        addr[3] == 0
    } else {
        addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == 0
    };
    if wildcard {
        return Bind::Loopback;
    }
    report(EventKind::DenyBind, sb.id, family, proto, addr, port);
    Bind::Refuse
}

#[cgroup_sock_addr(bind4)]
pub fn egress_bind4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: whole 32-bit field reads, as the verifier requires.
    let (ip, port) = unsafe { ((*sa).user_ip4, u16::from_be((*sa).user_port as u16)) };
    match judge(&ctx, AF_INET, egress_common::v4_mapped(ip), port) {
        Bind::Pass => ALLOW,
        Bind::Loopback => {
            // SAFETY: a whole-field write, which the verifier allows in bind4.
            unsafe { (*sa).user_ip4 = LOOPBACK4 };
            ALLOW
        }
        Bind::Refuse => DENY,
    }
}

#[cgroup_sock_addr(bind6)]
pub fn egress_bind6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: element-by-element 32-bit volatile reads of user_ip6, as the verifier requires.
    let (addr, port) = unsafe {
        (
            [
                read_volatile(&(*sa).user_ip6[0]),
                read_volatile(&(*sa).user_ip6[1]),
                read_volatile(&(*sa).user_ip6[2]),
                read_volatile(&(*sa).user_ip6[3]),
            ],
            u16::from_be((*sa).user_port as u16),
        )
    };
    match judge(&ctx, AF_INET6, addr, port) {
        Bind::Pass => ALLOW,
        Bind::Loopback => {
            // `::` becomes `::1` (a dual-stack socket then serves IPv6 loopback only);
            // `::ffff:0.0.0.0` becomes `::ffff:127.0.0.1`.
            let last = if is_v4_mapped(&addr) {
                LOOPBACK4
            } else {
                1u32.to_be()
            };
            // SAFETY: a whole-field 32-bit write, which the verifier allows in bind6; the
            // first three words stay as they are (zero, or the v4-mapped prefix).
            unsafe { (*sa).user_ip6[3] = last };
            ALLOW
        }
        Bind::Refuse => DENY,
    }
}
