//! The maps the programs share with user space, and the counter helper.
//!
//! Names and capacities are fixed by `egress_common`, which user space reads too.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use egress_common::{
    maps::{
        ALLOW4_MAX_ENTRIES, ALLOW6_MAX_ENTRIES, DNS_BY_COOKIE_MAX_ENTRIES, DNS_PEERS_MAX_ENTRIES,
        EVENTS_BYTE_SIZE, INBOUND_PORTS_MAX_ENTRIES, INTERCEPT_PORTS_MAX_ENTRIES,
        ORIG_BY_COOKIE_MAX_ENTRIES, ORIG_BY_TUPLE_MAX_ENTRIES, SANDBOXES_MAX_ENTRIES,
    },
    Allow4, Allow6, Counter, DnsClient, DnsPeerKey, PortKey, Sandbox, SockKey, SockRecord,
    COUNTER_SLOTS,
};

#[map(name = "SANDBOXES")]
pub(crate) static SANDBOXES: HashMap<u64, Sandbox> =
    HashMap::with_max_entries(SANDBOXES_MAX_ENTRIES, 0);

#[map(name = "INTERCEPT_PORTS")]
pub(crate) static INTERCEPT_PORTS: HashMap<PortKey, u32> =
    HashMap::with_max_entries(INTERCEPT_PORTS_MAX_ENTRIES, 0);

#[map(name = "INBOUND_PORTS")]
pub(crate) static INBOUND_PORTS: HashMap<PortKey, u32> =
    HashMap::with_max_entries(INBOUND_PORTS_MAX_ENTRIES, 0);

#[map(name = "ALLOW4")]
pub(crate) static ALLOW4: LpmTrie<Allow4, u32> = LpmTrie::with_max_entries(ALLOW4_MAX_ENTRIES, 0);

#[map(name = "ALLOW6")]
pub(crate) static ALLOW6: LpmTrie<Allow6, u32> = LpmTrie::with_max_entries(ALLOW6_MAX_ENTRIES, 0);

// LRU, never a plain hash: a full plain hash makes inserts fail, and the entries of a busy
// sandbox must age out rather than block new ones.
#[map(name = "ORIG_BY_COOKIE")]
pub(crate) static ORIG_BY_COOKIE: LruHashMap<u64, SockRecord> =
    LruHashMap::with_max_entries(ORIG_BY_COOKIE_MAX_ENTRIES, 0);

#[map(name = "ORIG_BY_TUPLE")]
pub(crate) static ORIG_BY_TUPLE: LruHashMap<SockKey, SockRecord> =
    LruHashMap::with_max_entries(ORIG_BY_TUPLE_MAX_ENTRIES, 0);

#[map(name = "DNS_BY_COOKIE")]
pub(crate) static DNS_BY_COOKIE: LruHashMap<u64, DnsClient> =
    LruHashMap::with_max_entries(DNS_BY_COOKIE_MAX_ENTRIES, 0);

#[map(name = "DNS_PEERS")]
pub(crate) static DNS_PEERS: LruHashMap<DnsPeerKey, SockRecord> =
    LruHashMap::with_max_entries(DNS_PEERS_MAX_ENTRIES, 0);

#[map(name = "EVENTS")]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTE_SIZE, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[inline(always)]
pub(crate) fn count(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: a per-CPU slot is only touched by programs on this CPU, which do not
        // preempt each other.
        unsafe { *p += 1 };
    }
}
