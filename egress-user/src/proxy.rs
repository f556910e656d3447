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

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use bytes::BytesMut;
use tokio::{
    io::AsyncReadExt as _,
    net::{TcpListener, TcpStream},
};
use tracing::{debug, info_span, warn, Instrument as _};

use crate::{
    addr::{self, ClientAddr, ListenAddr, OrigDst},
    audit::{ConnectionRecord, Decision, Record, TlsMode, Who},
    netns,
    policy::HostDecision,
    state::{ListenStats, SandboxState, Shared},
    upstream,
};

/// How long a client may take, in all, to send enough bytes to tell TLS from HTTP.
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

/// One redirected connection: who made it and where it was going (from the kernel's
/// record), the sandbox it belongs to, and what every sandbox shares.
pub struct Conn {
    pub shared: Arc<Shared>,
    pub sandbox: Arc<SandboxState>,
    pub meta: ConnMeta,
}

impl Conn {
    /// Who made this connection, stamped now, for its audit records.
    pub fn who(&self) -> Who {
        Who::now(
            self.sandbox.name.clone(),
            self.meta.pid,
            self.meta.comm.clone(),
        )
    }

    /// Records a connection-level outcome (passthrough, refused).
    pub fn audit_connection(&self, rec: ConnectionRecord) {
        let meta = &self.meta;
        self.sandbox.counters.connections.add(rec.decision);
        self.shared
            .audit
            .record(&Record::Connection(ConnectionRecord {
                who: self.who(),
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

impl ConnMeta {
    pub fn new(rec: &egress_common::SockRecord, client: ClientAddr) -> Self {
        ConnMeta {
            orig_dst: addr::orig_dst(rec),
            client,
            sandbox: rec.sandbox,
            pid: rec.tgid,
            comm: addr::comm(&rec.comm),
        }
    }
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

/// Accepts connections until the task is dropped, and hands each to the sandbox the
/// kernel's record names. Connection tasks run on that sandbox's tracker, so removing it
/// drains exactly its connections.
pub async fn serve(
    listener: Listener,
    shared: Arc<Shared>,
    stats: Arc<ListenStats>,
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
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        next_id += 1;
        let client = ClientAddr::from_peer(peer);
        let key = addr::sock_key(netns, client, listen);
        let Some(rec) = shared.records.take_conn(&key) else {
            stats.no_orig_dst.fetch_add(1, Ordering::Relaxed);
            warn!(%client, %listen, "connection refused: no original destination recorded for it");
            // Nothing is known but the client: no sandbox, process or destination. The
            // record is queued before the close, so whoever sees the close finds it.
            audit_refused(
                &shared,
                Who::now(String::new(), 0, String::new()),
                client,
                None,
                REASON_NO_RECORD,
            );
            drop(stream);
            continue;
        };
        let meta = ConnMeta::new(&rec, client);
        let Some(sandbox) = shared.registry.get(meta.sandbox) else {
            stats.unknown_sandbox.fetch_add(1, Ordering::Relaxed);
            warn!(%client, %listen, sandbox = meta.sandbox, "connection refused: its sandbox is not registered");
            let who = Who::now(
                shared.registry.name(meta.sandbox),
                meta.pid,
                meta.comm.clone(),
            );
            audit_refused(
                &shared,
                who,
                client,
                Some(meta.orig_dst),
                REASON_UNKNOWN_SANDBOX,
            );
            drop(stream);
            continue;
        };
        let span = info_span!(
            "conn",
            id = next_id,
            sandbox = %sandbox.name,
            orig_dst = %meta.orig_dst,
        );
        let conn = Conn {
            shared: shared.clone(),
            sandbox: sandbox.clone(),
            meta,
        };
        sandbox.spawn(handle(stream, conn).instrument(span));
    }
}

/// Why a connection was refused before any sandbox could serve it.
pub const REASON_NO_RECORD: &str =
    "no original destination recorded for this connection (a direct connect to the listener, or a record the kernel failed to write)";
pub const REASON_UNKNOWN_SANDBOX: &str =
    "the kernel's record names a sandbox that is not registered";
/// A client that connected and closed (or reset) without sending anything.
pub const REASON_CLOSED_EARLY: &str = "closed by the client before its first byte";

/// The audit record of a connection refused at accept, before it had a sandbox to count
/// it. Unknown fields stay empty (and pid 0), as in a DNS query without a kernel record.
fn audit_refused(
    shared: &Shared,
    who: Who,
    client: ClientAddr,
    orig_dst: Option<OrigDst>,
    reason: &str,
) {
    shared.audit.record(&Record::Connection(ConnectionRecord {
        who,
        client: client.to_string(),
        orig_dst: orig_dst.map(|d| d.to_string()).unwrap_or_default(),
        decision: Decision::Deny,
        reason: Some(reason.into()),
        ..Default::default()
    }));
}

/// Starts the upstream connection of an allowed server name while the client's handshake
/// runs, when the checks that need only the name and the destination pass (DNS pinning,
/// DoH addresses, private destinations). The request itself is judged as always before
/// anything is sent on it.
fn dial_ahead(
    conn: &Conn,
    policy: &crate::policy::SandboxPolicy,
    name: &str,
    sni: Option<&str>,
) -> Option<upstream::Ahead> {
    let dst = conn.meta.orig_dst.0;
    let sb = &conn.sandbox;
    let resolved = |n: &str| sb.pins.resolves_to(sb.id, n, dst.ip());
    if decide::connection_refusal(policy, name, dst.ip(), &resolved).is_some() {
        return None;
    }
    sb.pool.dial_ahead(upstream::PoolKey::tls(dst, sni))
}

async fn handle(mut stream: TcpStream, conn: Conn) {
    conn.shared.audit.wait_for_space().await;
    let _ = stream.set_nodelay(true);
    let start = std::time::Instant::now();
    let mut buf = BytesMut::with_capacity(2048);
    // One deadline for the whole sniff, not one per read: a client trickling its hello a
    // byte at a time (TLS slowloris) must not hold the connection for hours.
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    let kind = loop {
        let read = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await;
        match read {
            Err(_) => break Err("no TLS ClientHello or HTTP request within the sniff timeout"),
            Ok(r @ (Err(_) | Ok(0))) if buf.is_empty() => {
                // Not a refusal: nothing was asked. Recorded all the same, so that every
                // accepted connection leaves a line.
                debug!(error = ?r.err(), "{REASON_CLOSED_EARLY}");
                conn.audit_connection(ConnectionRecord {
                    decision: Decision::Error,
                    reason: Some(REASON_CLOSED_EARLY.into()),
                    duration_ms: start.elapsed().as_millis() as u64,
                    ..Default::default()
                });
                return;
            }
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
            let meta = &conn.meta;
            warn!(
                sandbox = %conn.sandbox.name,
                pid = meta.pid,
                comm = %meta.comm,
                client = %meta.client,
                orig_dst = %meta.orig_dst,
                decision = Decision::Deny.as_str(),
                reason,
                "connection refused"
            );
            conn.audit_connection(ConnectionRecord {
                decision: Decision::Deny,
                reason: Some(reason.into()),
                ..Default::default()
            });
            return;
        }
    };
    let stream = prefixed::Prefixed::new(buf.freeze(), stream);
    match kind {
        sniff::Sniff::Tls(hello) => {
            let name = hello
                .sni
                .clone()
                .unwrap_or_else(|| conn.meta.orig_dst.0.ip().to_string());
            let live = conn.sandbox.policy.load_full();
            match live.sandbox.host_decision(&name) {
                HostDecision::Passthrough { rule } => {
                    let dst = conn.meta.orig_dst.0.ip();
                    let sb = &conn.sandbox;
                    let resolved = |n: &str| sb.pins.resolves_to(sb.id, n, dst);
                    if let Some(reason) =
                        decide::connection_refusal(&live.sandbox, &name, dst, &resolved)
                    {
                        warn!(sni = %name, reason, "passthrough connection refused");
                        conn.audit_connection(ConnectionRecord {
                            sni: Some(name.clone()),
                            decision: Decision::Deny,
                            rule,
                            reason: Some(reason),
                            tls: TlsMode::Passthrough,
                            ..Default::default()
                        });
                        return;
                    }
                    passthrough::splice(stream, &conn, &name, &rule).await
                }
                HostDecision::Allow { .. } => {
                    let ahead = dial_ahead(&conn, &live.sandbox, &name, hello.sni.as_deref());
                    mitm::intercept(stream, conn, hello, ahead).await
                }
                // Denied names are intercepted too, so that the client gets a readable 403.
                HostDecision::Deny { .. } => mitm::intercept(stream, conn, hello, None).await,
            }
        }
        sniff::Sniff::Http => {
            let info = http::ConnInfo::new(conn, None, false, None);
            http::serve(stream, Arc::new(info)).await
        }
        sniff::Sniff::NeedMore | sniff::Sniff::Other => {}
    }
}
