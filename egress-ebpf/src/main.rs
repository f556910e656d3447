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
//!
//! - [`sock_addr`]: connect, sendmsg, recvmsg and getpeername, where the verdicts are made.
//! - [`bind`]: binds, held to loopback unless the port is allowed inbound.
//! - [`sockops`]: re-keys a redirected connection by its 4-tuple.
//! - [`sock`]: socket creation and release.
//! - [`skb`]: the cgroup_skb programs that read the packets leaving a sandbox.
//! - [`maps`], [`sandbox`] and [`event`]: what those programs share.
#![no_std]
#![no_main]

mod bind;
mod event;
mod maps;
mod sandbox;
mod skb;
mod sock;
mod sock_addr;
mod sockops;

// Verdicts of the cgroup socket programs, and the socket types they let through.
const ALLOW: i32 = 1;
const DENY: i32 = 0;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
