//! The sandbox a socket or packet belongs to, and what that sandbox may reach: its
//! listeners, its intercepted ports and its direct allowances.

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::generated::{bpf_get_current_ancestor_cgroup_id, bpf_skb_ancestor_cgroup_id},
    maps::lpm_trie::Key,
};
use egress_common::{Allow4, Allow6, PortKey, Sandbox, ALLOW_FIXED_PREFIX, MAX_CGROUP_DEPTH};

use crate::maps::{ALLOW4, ALLOW6, INBOUND_PORTS, INTERCEPT_PORTS, SANDBOXES};

/// The deepest registered sandbox containing the current task's cgroup.
///
/// Programs run for the cgroup a socket was created in; that is the creating task's cgroup,
/// and a sandboxed task cannot leave its cgroup. A socket handed to a task outside every
/// sandbox finds nothing here and is refused.
#[inline(always)]
pub(crate) fn find_sandbox() -> Option<Sandbox> {
    // SAFETY: plain helper call with a scalar argument.
    find_sandbox_by(|level| unsafe { bpf_get_current_ancestor_cgroup_id(level) })
}

/// The deepest registered sandbox containing the cgroup of the socket that sent `skb`
/// (packets may be sent from softirq context, so not the current task's).
#[inline(always)]
pub(crate) fn find_sandbox_skb(skb: *mut __sk_buff) -> Option<Sandbox> {
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
pub(crate) fn intercepted(sandbox: u32, port: u16) -> bool {
    let key = PortKey {
        sandbox,
        port: port as u32,
    };
    // SAFETY: only presence is checked.
    unsafe { INTERCEPT_PORTS.get(key) }.is_some()
}

/// Whether the sandbox may bind `port` on every address (`--allow-inbound`).
#[inline(always)]
pub(crate) fn inbound_allowed(sandbox: u32, port: u16) -> bool {
    let key = PortKey {
        sandbox,
        port: port as u32,
    };
    // SAFETY: only presence is checked.
    unsafe { INBOUND_PORTS.get(key) }.is_some()
}

#[inline(always)]
pub(crate) fn allowed4(sandbox: u32, addr: u32, port: u16) -> bool {
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
pub(crate) fn allowed6(sandbox: u32, addr: [u32; 4], port: u16) -> bool {
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

/// One of a sandbox's listeners, both on its `listen4_addr` and `listen6_addr`.
#[derive(Clone, Copy)]
pub(crate) enum Listener {
    /// The TLS-intercepting proxy, for the intercepted TCP ports.
    Proxy,
    /// The DNS listener (UDP and TCP), for port 53.
    Dns,
}

impl Listener {
    /// This listener's (IPv4, IPv6) ports in `sb`, host byte order.
    #[inline(always)]
    pub(crate) fn ports(self, sb: &Sandbox) -> (u32, u32) {
        match self {
            Self::Proxy => (sb.listen4_port, sb.listen6_port),
            Self::Dns => (sb.dns4_port, sb.dns6_port),
        }
    }
}

/// Whether `addr:port` is the sandbox's `listener`.
#[inline(always)]
pub(crate) fn at_listener(
    sb: &Sandbox,
    listener: Listener,
    mapped: bool,
    addr: [u32; 4],
    port: u16,
) -> bool {
    let (port4, port6) = listener.ports(sb);
    if mapped {
        addr[3] == sb.listen4_addr && port as u32 == port4
    } else {
        addr == sb.listen6_addr && port as u32 == port6
    }
}

/// Whether `addr:port` is either of the sandbox's listeners.
#[inline(always)]
pub(crate) fn at_any_listener(sb: &Sandbox, mapped: bool, addr: [u32; 4], port: u16) -> bool {
    at_listener(sb, Listener::Proxy, mapped, addr, port)
        || at_listener(sb, Listener::Dns, mapped, addr, port)
}
