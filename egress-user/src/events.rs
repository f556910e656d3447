//! Refusals reported by the kernel programs through the ring buffer, turned into audit
//! records, counters and log lines.

use std::{net::SocketAddr, sync::Arc};

use aya::maps::{MapData, RingBuf};
use egress_common::{Event, EventKind};
use tokio::io::unix::AsyncFd;

use crate::{
    addr,
    audit::{Decision, KernelRecord, Record, Who},
    state::Shared,
};

/// Decodes one ring-buffer record; `None` for a record of the wrong size.
pub fn decode(bytes: &[u8]) -> Option<Event> {
    if bytes.len() != std::mem::size_of::<Event>() {
        return None;
    }
    let w = |i: usize| u32::from_ne_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap_or([0; 4]));
    let mut comm = [0u8; 16];
    comm.copy_from_slice(&bytes[40..56]);
    Some(Event {
        kind: w(0),
        sandbox: w(1),
        tgid: w(2),
        family: w(3),
        protocol: w(4),
        port: w(5),
        addr: [w(6), w(7), w(8), w(9)],
        comm,
    })
}

fn protocol_name(p: u32) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        255 => "raw".into(),
        262 => "mptcp".into(),
        p => p.to_string(),
    }
}

fn describe(kind: u32) -> &'static str {
    match EventKind::from_u32(kind) {
        Some(EventKind::DenyTcpConnect) => "tcp connect refused",
        Some(EventKind::DenyUdp) => "udp refused",
        Some(EventKind::DenyProtocol) => "socket protocol refused",
        Some(EventKind::DenyBind) => {
            "bind to a non-loopback address refused (the sandbox listens on loopback only; see --allow-inbound)"
        }
        Some(EventKind::DenySocket) => "socket type refused at creation (only TCP and UDP)",
        Some(EventKind::DenyNoSandbox) => "socket outside any sandbox refused",
        Some(EventKind::RecordFailed) => "original destination not recorded; proxy will refuse",
        None => "unknown kernel event",
    }
}

/// Logs and audits every kernel event until `stop` fires; then drains what is already in
/// the ring buffer, so that no refusal reported before shutdown is lost.
pub async fn run(
    ring: RingBuf<MapData>,
    shared: Arc<Shared>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for as long as
    // the AsyncFd (and so the registration) lives.
    #[allow(unsafe_code)]
    let mut fd =
        unsafe { AsyncFd::register(ring) }.map_err(|e| std::io::Error::other(e.to_string()))?;
    loop {
        let stopping = tokio::select! {
            r = fd.readable_mut() => {
                let mut guard = r?;
                drain(guard.get_inner_mut(), &shared);
                guard.clear_ready();
                false
            }
            _ = &mut stop => true,
        };
        if stopping {
            drain(fd.get_mut(), &shared);
            return Ok(());
        }
    }
}

fn drain(ring: &mut RingBuf<MapData>, shared: &Shared) {
    while let Some(item) = ring.next() {
        match decode(&item) {
            Some(ev) => {
                let dst = SocketAddr::new(addr::ip_from_mapped_words(&ev.addr), ev.port as u16);
                let refused = ev.kind != EventKind::RecordFailed as u32;
                if let Some(sb) = shared.registry.get(ev.sandbox).filter(|_| refused) {
                    sb.counters.kernel_denies.add(ev.protocol);
                }
                shared.audit.record(&Record::KernelDeny(KernelRecord {
                    who: Who::now(
                        shared.registry.name(ev.sandbox),
                        ev.tgid,
                        addr::comm(&ev.comm),
                    ),
                    protocol: protocol_name(ev.protocol),
                    // Refused at creation: there is no destination yet.
                    dst: if ev.kind == EventKind::DenySocket as u32 {
                        "-".into()
                    } else {
                        dst.to_string()
                    },
                    decision: if refused {
                        Decision::Deny
                    } else {
                        Decision::Error
                    },
                    reason: describe(ev.kind),
                }));
                tracing::warn!(
                    target: "egress::kernel",
                    sandbox = ev.sandbox,
                    pid = ev.tgid,
                    comm = %addr::comm(&ev.comm),
                    protocol = ev.protocol,
                    dst = %dst,
                    "{}",
                    describe(ev.kind)
                );
            }
            None => tracing::error!(len = item.len(), "malformed kernel event"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_the_kernel_writes() {
        let ev = Event {
            kind: 1,
            sandbox: 3,
            tgid: 42,
            family: 2,
            protocol: 6,
            port: 8443,
            addr: egress_common::v4_mapped(u32::from_ne_bytes([127, 0, 0, 2])),
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
        };
        let mut bytes = Vec::new();
        for w in [
            ev.kind,
            ev.sandbox,
            ev.tgid,
            ev.family,
            ev.protocol,
            ev.port,
        ] {
            bytes.extend_from_slice(&w.to_ne_bytes());
        }
        for w in ev.addr {
            bytes.extend_from_slice(&w.to_ne_bytes());
        }
        bytes.extend_from_slice(&ev.comm);
        assert_eq!(decode(&bytes), Some(ev));
        assert_eq!(decode(&bytes[1..]), None);
    }
}
