//! The interceptor's data path: accept a redirected connection, find where it was going,
//! look at its first bytes, and hand it on.
//!
//! The original destination comes only from the kernel's record, found by the connection's
//! 4-tuple and deleted on first use. A connection with no record (a direct connect to the
//! listener, or a record the kernel failed to write) is closed and logged: never guessed.
//!
//! Then: a TLS ClientHello goes to [`passthrough`] (SNI on the passthrough list) or
//! [`mitm`]; plain HTTP goes straight to [`http`]; anything else is refused.

pub mod decide;
pub mod http;
pub mod metered;
pub mod mitm;
pub mod passthrough;
pub mod prefixed;
pub mod sniff;
pub mod upstream;

use std::{sync::Arc, time::Duration};

use bytes::BytesMut;
use tokio::{
    io::AsyncReadExt as _,
    net::{TcpListener, TcpStream},
};
use tokio_util::task::TaskTracker;
use tracing::{info_span, warn, Instrument as _};

use crate::{
    addr::{self, ClientAddr, ListenAddr, OrigDst},
    audit::{Audit, ConnectionRecord, Record},
    bpf::OrigDstTable,
    netns,
    policy::{HostDecision, LivePolicy},
    tls::mint::LeafCache,
};

/// How long a client may take to send enough bytes to tell TLS from HTTP.
pub const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head accepted (HTTP/1.1 buffer, HTTP/2 header list).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Bytes read while sniffing: the largest ClientHello the sniffer accepts plus its handshake
/// and record headers.
const MAX_SNIFF_BYTES: usize = sniff::MAX_CLIENT_HELLO + 64;

/// Everything the data path shares, immutable once built.
pub struct Ctx {
    /// The current policy; a reload swaps it, requests in flight keep the one they loaded.
    pub policy: Arc<arc_swap::ArcSwap<LivePolicy>>,
    pub leaves: Arc<LeafCache>,
    pub pool: upstream::Pool,
    pub audit: Audit,
    /// Log query strings in audit records (they often carry tokens; off by default).
    pub audit_query: bool,
    /// Sandbox id (as the kernel reports it) → name, for audit records.
    pub sandbox_names: std::collections::HashMap<u32, String>,
    /// What each sandbox's names resolved to through the DNS listener (DNS pinning).
    pub pins: Arc<crate::dns::pins::Pins>,
}

impl Ctx {
    pub fn sandbox_name(&self, id: u32) -> String {
        self.sandbox_names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }

    /// Records a connection-level outcome (passthrough, refused).
    pub fn audit_connection(&self, meta: &ConnMeta, rec: ConnectionRecord) {
        self.audit.record(&Record::Connection(ConnectionRecord {
            ts: crate::audit::now(),
            sandbox: self.sandbox_name(meta.sandbox),
            pid: meta.pid,
            comm: meta.comm.clone(),
            client: meta.client.to_string(),
            orig_dst: meta.orig_dst.to_string(),
            ..rec
        }));
    }
}

/// What the kernel recorded about one redirected connection.
#[derive(Clone, Debug)]
pub struct ConnMeta {
    pub orig_dst: OrigDst,
    pub client: ClientAddr,
    pub sandbox: u32,
    pub pid: u32,
    pub comm: String,
}

/// A bound proxy listener and the namespace cookie its connections are keyed with.
#[derive(Debug)]
pub struct Listener {
    inner: std::net::TcpListener,
    netns: u64,
    addr: ListenAddr,
}

impl Listener {
    /// Wraps a bound std listener (bound in whatever namespace the sandbox lives in).
    pub fn new(inner: std::net::TcpListener) -> std::io::Result<Self> {
        inner.set_nonblocking(true)?;
        let netns = netns::socket_netns_cookie(&inner)?;
        let addr = ListenAddr(inner.local_addr()?);
        Ok(Self { inner, netns, addr })
    }

    pub fn addr(&self) -> ListenAddr {
        self.addr
    }
}

/// Counters of the data path, read by tests and, later, metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: std::sync::atomic::AtomicU64,
    pub no_orig_dst: std::sync::atomic::AtomicU64,
}

/// Accepts connections until the task is dropped.
///
/// Connection tasks go on `conns`, so that shutdown can let them finish (and write their log
/// lines) instead of cutting them off.
pub async fn serve(
    listener: Listener,
    table: Arc<OrigDstTable>,
    stats: Arc<Stats>,
    conns: TaskTracker,
    ctx: Arc<Ctx>,
) -> std::io::Result<()> {
    let Listener {
        inner,
        netns,
        addr: listen,
    } = listener;
    let inner = TcpListener::from_std(inner)?;
    let mut next_id: u64 = 0;
    loop {
        let (stream, peer) = match inner.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, keep serving.
                warn!(%listen, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        stats
            .accepted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        next_id += 1;
        let client = ClientAddr::from_peer(peer);
        let key = addr::sock_key(netns, client, listen);
        let Some(rec) = table.take(&key) else {
            stats
                .no_orig_dst
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            warn!(%client, %listen, "connection refused: no original destination recorded for it");
            drop(stream);
            continue;
        };
        let meta = ConnMeta {
            orig_dst: addr::orig_dst(&rec),
            client,
            sandbox: rec.sandbox,
            pid: rec.tgid,
            comm: addr::comm(&rec.comm),
        };
        let span = info_span!(
            "conn",
            id = next_id,
            sandbox = meta.sandbox,
            orig_dst = %meta.orig_dst,
        );
        conns.spawn(handle(stream, meta, ctx.clone()).instrument(span));
    }
}

async fn handle(mut stream: TcpStream, meta: ConnMeta, ctx: Arc<Ctx>) {
    let _ = stream.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(2048);
    let kind = loop {
        let read = tokio::time::timeout(SNIFF_TIMEOUT, stream.read_buf(&mut buf)).await;
        match read {
            Err(_) => break Err("no TLS ClientHello or HTTP request within the sniff timeout"),
            Ok(Err(_)) | Ok(Ok(0)) if buf.is_empty() => return,
            Ok(Err(_)) | Ok(Ok(0)) => {
                break Err("connection closed before a complete ClientHello or request line")
            }
            Ok(Ok(_)) => {}
        }
        match sniff::classify(&buf) {
            sniff::Sniff::NeedMore if buf.len() < MAX_SNIFF_BYTES => continue,
            sniff::Sniff::NeedMore => break Err("ClientHello too large"),
            sniff::Sniff::Other => break Err("neither TLS nor HTTP"),
            other => break Ok(other),
        }
    };
    let kind = match kind {
        Ok(k) => k,
        Err(reason) => {
            warn!(
                sandbox = meta.sandbox,
                pid = meta.pid,
                comm = %meta.comm,
                client = %meta.client,
                orig_dst = %meta.orig_dst,
                decision = "deny",
                reason,
                "connection refused"
            );
            let rec = ConnectionRecord {
                decision: "deny",
                reason: Some(reason.into()),
                ..Default::default()
            };
            ctx.audit_connection(&meta, rec);
            return;
        }
    };
    let stream = prefixed::Prefixed::new(buf.freeze(), stream);
    match kind {
        sniff::Sniff::Tls(hello) => {
            let name = hello
                .sni
                .clone()
                .unwrap_or_else(|| meta.orig_dst.0.ip().to_string());
            let live = ctx.policy.load_full();
            match live.sandbox.host_decision(&name) {
                HostDecision::Passthrough { rule } => {
                    let dst = meta.orig_dst.0.ip();
                    let resolved = |n: &str| ctx.pins.resolves_to(meta.sandbox, n, dst);
                    if let Some(reason) =
                        decide::connection_refusal(&live.sandbox, &name, dst, &resolved)
                    {
                        warn!(sni = %name, reason, "passthrough connection refused");
                        let rec = ConnectionRecord {
                            sni: Some(name.clone()),
                            decision: "deny",
                            rule,
                            reason: Some(reason),
                            tls: "passthrough",
                            ..Default::default()
                        };
                        ctx.audit_connection(&meta, rec);
                        return;
                    }
                    passthrough::splice(stream, &meta, &name, &rule, &ctx).await
                }
                // Denied names are intercepted too, so that the client gets a readable 403.
                HostDecision::Allow { .. } | HostDecision::Deny { .. } => {
                    mitm::intercept(stream, ctx, meta, hello).await
                }
            }
        }
        sniff::Sniff::Http => {
            let conn = http::ConnInfo {
                meta,
                sni: None,
                tls: false,
            };
            http::serve(stream, ctx, Arc::new(conn)).await
        }
        sniff::Sniff::NeedMore | sniff::Sniff::Other => {}
    }
}
