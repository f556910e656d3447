//! Refusals reported by the kernel programs through the ring buffer, turned into audit
//! records, counters and log lines; and the refusals the ring buffer had no room for (the
//! kernel's `EventsLost` counter), turned into `events_lost` records, so a burst that
//! overflows the ring is never lost silently.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use aya::maps::{MapData, RingBuf};
use egress_common::{Event, EventKind};
use tokio::io::unix::AsyncFd;

use crate::{
    addr,
    audit::{Decision, KernelRecord, LostRecord, Record, Who},
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

/// How often the kernel's count of lost events is read.
pub const LOST_POLL: Duration = Duration::from_secs(1);

/// Counts refusals the kernel could not report: reads the (cumulative) kernel counter and
/// says how many are new since the last look.
pub struct LostEvents<F> {
    read: F,
    last: u64,
    /// New since the reader started.
    total: u64,
}

impl<F: Fn() -> u64> LostEvents<F> {
    /// The counter's value now is the baseline: a pinned counter (the daemon's) carries
    /// what earlier processes already reported.
    pub fn new(read: F) -> Self {
        let last = read();
        LostEvents {
            read,
            last,
            total: 0,
        }
    }

    /// How many were lost since the last call, and since the start; `None` if none.
    fn poll(&mut self) -> Option<(u64, u64)> {
        let now = (self.read)();
        let count = now.saturating_sub(self.last);
        self.last = now;
        if count == 0 {
            return None;
        }
        self.total += count;
        Some((count, self.total))
    }

    /// Writes an `events_lost` record if the counter grew since the last call.
    pub fn check(&mut self, shared: &Shared) {
        let Some((count, _)) = self.poll() else {
            return;
        };
        shared
            .metrics
            .kernel_events_lost
            .fetch_add(count, std::sync::atomic::Ordering::Relaxed);
        tracing::error!(
            target: "egress::kernel",
            count,
            total = self.total,
            "kernel refusals lost: the ring buffer was full"
        );
        shared.audit.record(&Record::EventsLost(LostRecord {
            ts: crate::audit::now(),
            count,
            total: self.total,
            reason: "kernel ring buffer full",
        }));
    }
}

/// Logs and audits every kernel event until `stop` fires; then drains what is already in
/// the ring buffer, so that no refusal reported before shutdown is lost. Every
/// [`LOST_POLL`], and once more at the end, `lost` is read and any growth audited.
/// Before each batch the reader waits for room in the audit queue: while it waits the
/// ring fills and further refusals are counted as lost, never dropped unseen.
pub async fn run(
    ring: RingBuf<MapData>,
    shared: Arc<Shared>,
    lost: impl Fn() -> u64 + Send,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for as long as
    // the AsyncFd (and so the registration) lives.
    #[allow(unsafe_code)]
    let mut fd =
        unsafe { AsyncFd::register(ring) }.map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut lost = LostEvents::new(lost);
    let mut tick = tokio::time::interval(LOST_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            r = fd.readable_mut() => {
                shared.audit.wait_for_space().await;
                let mut guard = r?;
                drain(guard.get_inner_mut(), &shared);
                guard.clear_ready();
                false
            }
            _ = tick.tick() => {
                lost.check(&shared);
                false
            }
            _ = &mut stop => true,
        };
        if stopping {
            drain(fd.get_mut(), &shared);
            lost.check(&shared);
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
    fn lost_events_count_from_the_baseline() {
        let c = std::cell::Cell::new(5u64);
        let mut l = LostEvents::new(|| c.get());
        assert_eq!(l.poll(), None, "earlier losses are not ours");
        c.set(9);
        assert_eq!(l.poll(), Some((4, 4)));
        assert_eq!(l.poll(), None, "each loss is reported once");
        c.set(12);
        assert_eq!(l.poll(), Some((3, 7)));
    }

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
