//! The state the data path reads: what every sandbox shares ([`Shared`]: audit, leaf cache,
//! upstream TLS, the kernel's records) and the [`Registry`] of sandboxes, each with its own
//! live policy, DNS pins, counters and upstream pool ([`SandboxState`]).
//!
//! The proxy, the DNS listener and the kernel event reader all import this module; none of
//! them imports another. A connection finds its sandbox once, by the id the kernel wrote
//! into its record, and keeps that `Arc` for its whole life, so removing a sandbox never
//! pulls state from under a request in flight.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    audit::{Audit, Decision},
    dns::{self, pins::Pins},
    policy::LivePolicy,
    records::KernelRecords,
    tls::mint::LeafCache,
    upstream::Pool,
};

/// Names remembered for DNS pinning, per sandbox.
pub const PIN_CAPACITY: usize = 16_384;
/// How long a DNS answer stays pinned at least, whatever its TTL: programs and their
/// connection pools keep addresses far longer than the TTL says.
pub const PIN_MIN_TTL: Duration = Duration::from_secs(3600);

/// What every sandbox shares. Immutable once built, apart from the registry's contents.
pub struct Shared {
    pub registry: Registry,
    pub audit: Audit,
    pub leaves: Arc<LeafCache>,
    /// The kernel's records of redirected sockets.
    pub records: Arc<dyn KernelRecords>,
    /// Client configurations for upstream TLS, shared by every sandbox's pool.
    pub upstream_tls: UpstreamTls,
    /// Log query strings in audit records (they often carry tokens; off by default).
    pub audit_query: bool,
    /// What the data path observes for `/metrics`.
    pub metrics: Arc<crate::admin::DataMetrics>,
}

/// The rustls client configurations upstream connections use.
#[derive(Clone)]
pub struct UpstreamTls {
    /// Offers `h2` and `http/1.1`.
    pub any: Arc<rustls::ClientConfig>,
    /// Offers only `http/1.1`, for upgrades (WebSocket), which need a connection of their
    /// own.
    pub h1_only: Arc<rustls::ClientConfig>,
}

impl UpstreamTls {
    pub fn new(any: Arc<rustls::ClientConfig>) -> Self {
        let mut h1 = (*any).clone();
        h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self {
            any,
            h1_only: Arc::new(h1),
        }
    }
}

/// One sandbox's data-path state.
pub struct SandboxState {
    /// The id the kernel writes into every record of this sandbox.
    pub id: u32,
    pub name: String,
    /// The current policy; a reload swaps it, requests in flight keep the one they loaded.
    pub policy: Arc<ArcSwap<LivePolicy>>,
    /// What this sandbox's names resolved to through the DNS listener (DNS pinning).
    pub pins: Pins,
    pub counters: Counters,
    /// Upstream connections, leaving from wherever this sandbox's traffic should leave.
    pub pool: Arc<Pool>,
    /// Resolvers that permitted DNS queries are forwarded to; swapped with the pool's
    /// connector when the sandbox's namespace changes.
    pub resolvers: ArcSwap<dns::upstream::Upstreams>,
    /// Every connection and query task of this sandbox, so removal can drain them.
    pub conns: TaskTracker,
    /// Fired when the drain deadline passes: tasks still running stop.
    pub cut: CancellationToken,
}

impl SandboxState {
    pub fn new(
        id: u32,
        name: String,
        policy: LivePolicy,
        pool: Pool,
        resolvers: dns::upstream::Upstreams,
    ) -> Self {
        Self {
            id,
            name,
            policy: Arc::new(ArcSwap::from_pointee(policy)),
            pins: Pins::new(PIN_CAPACITY, PIN_MIN_TTL),
            counters: Counters::default(),
            pool: Arc::new(pool),
            resolvers: ArcSwap::from_pointee(resolvers),
            conns: TaskTracker::new(),
            cut: CancellationToken::new(),
        }
    }

    /// Runs a connection or query task of this sandbox: tracked for draining, counted as
    /// active, and stopped when the sandbox is cut off.
    pub fn spawn<F>(self: &Arc<Self>, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let sb = self.clone();
        sb.counters.active.fetch_add(1, Ordering::Relaxed);
        self.conns.spawn(async move {
            tokio::select! {
                () = task => {}
                () = sb.cut.cancelled() => {}
            }
            sb.counters.active.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// Stops taking work and waits up to `deadline` for the tasks in flight; cuts off what
    /// is left. Returns how many were cut off.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.conns.close();
        if tokio::time::timeout(deadline, self.conns.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let open = self.conns.len();
        self.cut.cancel();
        self.conns.wait().await;
        open
    }
}

/// Counts of one kind of outcome, by decision.
#[derive(Debug, Default)]
pub struct DecisionCounts([AtomicU64; Decision::COUNT]);

impl DecisionCounts {
    pub fn add(&self, d: Decision) {
        self.0[d as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, d: Decision) -> u64 {
        self.0[d as usize].load(Ordering::Relaxed)
    }

    /// Every decision with its count, for reports.
    pub fn all(&self) -> impl Iterator<Item = (Decision, u64)> + '_ {
        Decision::ALL.iter().map(|&d| (d, self.get(d)))
    }

    pub fn total(&self) -> u64 {
        self.0.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// A sandbox's counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// HTTP requests, by decision.
    pub requests: DecisionCounts,
    /// Connections judged before any request (passthrough, refused), by decision.
    pub connections: DecisionCounts,
    /// DNS queries, by decision.
    pub dns: DecisionCounts,
    /// Connects and sends the kernel refused, by protocol.
    pub kernel_denies: ProtocolCounts,
    /// Queried names that looked like tunnelling (long or high-entropy labels), refused or
    /// (under an allowed wildcard) answered.
    pub dns_tunnel_suspects: AtomicU64,
    pub dns_upstream_failures: AtomicU64,
    /// Connections and queries being served now.
    pub active: AtomicU64,
}

/// Kernel refusals by protocol.
#[derive(Debug, Default)]
pub struct ProtocolCounts {
    pub tcp: AtomicU64,
    pub udp: AtomicU64,
    /// Sockets of other types and protocols (ICMP, SCTP, MPTCP, raw), refused at creation.
    pub other: AtomicU64,
}

impl ProtocolCounts {
    pub fn add(&self, protocol: u32) {
        let c = match protocol {
            egress_common::IPPROTO_TCP => &self.tcp,
            egress_common::IPPROTO_UDP => &self.udp,
            _ => &self.other,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn total(&self) -> u64 {
        [&self.tcp, &self.udp, &self.other]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// The sandboxes the data path serves, by kernel id. Reads are lock-free (one per
/// connection); writes (add, remove) are rare and serialised.
#[derive(Default)]
pub struct Registry {
    by_id: ArcSwap<HashMap<u32, Arc<SandboxState>>>,
    write: Mutex<()>,
    /// Names of every sandbox ever registered, so that late records (kernel events read
    /// after a removal) still name their sandbox. Ids are never reused within a process.
    names: Mutex<HashMap<u32, String>>,
}

#[derive(Debug, thiserror::Error)]
#[error("a sandbox with id {id} is already registered ({name})")]
pub struct DuplicateId {
    pub id: u32,
    pub name: String,
}

impl Registry {
    pub fn get(&self, id: u32) -> Option<Arc<SandboxState>> {
        self.by_id.load().get(&id).cloned()
    }

    pub fn insert(&self, sb: Arc<SandboxState>) -> Result<(), DuplicateId> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.by_id.load();
        if let Some(old) = cur.get(&sb.id) {
            return Err(DuplicateId {
                id: sb.id,
                name: old.name.clone(),
            });
        }
        let mut next = HashMap::clone(&cur);
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sb.id, sb.name.clone());
        next.insert(sb.id, sb);
        self.by_id.store(Arc::new(next));
        Ok(())
    }

    pub fn remove(&self, id: u32) -> Option<Arc<SandboxState>> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.by_id.load();
        cur.get(&id)?;
        let mut next = HashMap::clone(&cur);
        let gone = next.remove(&id);
        self.by_id.store(Arc::new(next));
        gone
    }

    /// The name of sandbox `id`, also after its removal; the id itself if never seen.
    pub fn name(&self, id: u32) -> String {
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }

    /// Every registered sandbox, by id.
    pub fn all(&self) -> Vec<Arc<SandboxState>> {
        let mut v: Vec<_> = self.by_id.load().values().cloned().collect();
        v.sort_by_key(|s| s.id);
        v
    }

    pub fn len(&self) -> usize {
        self.by_id.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Counters of one set of listeners: what arrived before any sandbox was known.
#[derive(Debug, Default)]
pub struct ListenStats {
    /// Proxy connections accepted.
    pub accepted: AtomicU64,
    /// Proxy connections refused for lack of a kernel record.
    pub no_orig_dst: AtomicU64,
    /// DNS datagrams or connections refused for lack of a kernel record.
    pub dns_no_record: AtomicU64,
    /// Records naming a sandbox that is not (or no longer) registered.
    pub unknown_sandbox: AtomicU64,
}
