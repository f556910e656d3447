//! Refusals reported to user space through the `EVENTS` ring buffer, and the task they
//! are charged to.

use aya_ebpf::helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid};
use egress_common::{Counter, Event, EventKind};

use crate::maps::{count, EVENTS};

#[inline(always)]
pub(crate) fn tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[inline(always)]
pub(crate) fn comm() -> [u8; 16] {
    bpf_get_current_comm().unwrap_or([0; 16])
}

/// Reports a refusal by the current task.
pub(crate) fn report(
    kind: EventKind,
    sandbox: u32,
    family: u32,
    protocol: u32,
    addr: [u32; 4],
    port: u16,
) {
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
pub(crate) fn submit(ev: Event) {
    count(Counter::Denied);
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(ev);
            entry.submit(0);
        }
        None => count(Counter::EventsLost),
    }
}
