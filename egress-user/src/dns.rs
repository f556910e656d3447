//! The DNS listener: every UDP and TCP port-53 query a sandbox sends, to whatever resolver,
//! lands here (the kernel rewrites the destination). Only names the sandbox's policy lets it
//! reach (allow or passthrough) are forwarded to the host's resolvers; every other name gets
//! NXDOMAIN, so a denied name cannot carry data out in its labels.
//!
//! Who asked comes from the kernel, never from the packet: for UDP the cgroup_skb program
//! names the sender of each datagram by its source port ([`crate::records::KernelRecords::dns_peer`]); for TCP the
//! connection is found by its 4-tuple like the proxy's. A query with no kernel record is
//! refused.
//!
//! Answers feed the sandbox's [`pins::Pins`], which DNS pinning checks connections against.

pub mod message;
pub mod pins;
pub mod tunnel;
pub mod upstream;

use std::{
    net::{IpAddr, SocketAddr},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use hickory_proto::op::ResponseCode;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
};
use tracing::{debug, warn};

use crate::{
    addr::{self, ClientAddr, ListenAddr},
    audit::{Decision, DnsRecord, Record, Who},
    netns,
    policy::{hint::Fix, HostDecision, Mode},
    records,
    state::{ListenStats, SandboxState, Shared},
};

/// Extended DNS Error info-code 15, "Blocked" (RFC 8914), sent with refusals to clients
/// that speak EDNS, so that `dig` shows why.
const EDE_BLOCKED: u16 = 15;
/// How long a TCP client may stay idle between queries.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Queries answered at once per listener; a flood waits instead of growing without bound.
const MAX_IN_FLIGHT: usize = 1024;
/// TCP connections served at once per listener; more are closed at once. Each holds at most
/// one query and one upstream socket at a time.
const MAX_TCP_CONNS: usize = 256;

/// One bound DNS listener: UDP and TCP on the same address and port.
#[derive(Debug)]
pub struct DnsSockets {
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
    netns: u64,
    addr: ListenAddr,
}

impl DnsSockets {
    /// Binds UDP and TCP on one free port of `ip`, in the calling thread's network namespace.
    pub fn bind(ip: IpAddr) -> std::io::Result<Self> {
        let mut last = None;
        // The UDP port the kernel picks may be taken for TCP; try a few.
        for _ in 0..32 {
            let udp = std::net::UdpSocket::bind(SocketAddr::new(ip, 0))?;
            let addr = udp.local_addr()?;
            match Self::with_udp(udp, addr) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no free port")))
    }

    /// Binds UDP and TCP on `addr` exactly, in the calling thread's network namespace.
    pub fn bind_at(addr: SocketAddr) -> std::io::Result<Self> {
        let udp = std::net::UdpSocket::bind(addr)?;
        Self::with_udp(udp, addr)
    }

    fn with_udp(udp: std::net::UdpSocket, addr: SocketAddr) -> std::io::Result<Self> {
        let tcp = std::net::TcpListener::bind(addr)?;
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        let netns = netns::socket_netns_cookie(&tcp)?;
        Ok(Self {
            udp,
            tcp,
            netns,
            addr: ListenAddr(addr),
        })
    }

    pub fn addr(&self) -> ListenAddr {
        self.addr
    }

    /// Serves both sockets until the returned tasks are aborted. Each query runs on its
    /// sandbox's tracker, so that removing the sandbox lets it finish and write its record.
    pub fn serve(
        self,
        shared: Arc<Shared>,
        stats: Arc<ListenStats>,
    ) -> std::io::Result<[tokio::task::JoinHandle<()>; 2]> {
        let udp = Arc::new(UdpSocket::from_std(self.udp)?);
        let tcp = TcpListener::from_std(self.tcp)?;
        let (netns, addr) = (self.netns, self.addr);
        let u = tokio::spawn(serve_udp(udp, netns, addr, shared.clone(), stats.clone()));
        let t = tokio::spawn(serve_tcp(tcp, netns, addr, shared, stats));
        Ok([u, t])
    }
}

/// Who sent a query, as the kernel recorded it.
struct Asker {
    sandbox: Arc<SandboxState>,
    pid: u32,
    comm: String,
    client: ClientAddr,
    /// The resolver the program addressed.
    resolver: String,
    transport: &'static str,
}

impl Asker {
    fn new(
        rec: &egress_common::SockRecord,
        sandbox: Arc<SandboxState>,
        client: ClientAddr,
        transport: &'static str,
    ) -> Self {
        Asker {
            sandbox,
            pid: rec.tgid,
            comm: addr::comm(&rec.comm),
            client,
            resolver: addr::orig_dst(rec).to_string(),
            transport,
        }
    }
}

/// The sandbox a record names, or `None` (counted) when it is not registered.
fn sandbox_of(
    shared: &Shared,
    stats: &ListenStats,
    rec: &egress_common::SockRecord,
    client: ClientAddr,
) -> Option<Arc<SandboxState>> {
    let sb = shared.registry.get(rec.sandbox);
    if sb.is_none() {
        stats.unknown_sandbox.fetch_add(1, Ordering::Relaxed);
        warn!(%client, sandbox = rec.sandbox, "DNS query refused: its sandbox is not registered");
    }
    sb
}

async fn serve_udp(
    sock: Arc<UdpSocket>,
    netns: u64,
    listen: ListenAddr,
    shared: Arc<Shared>,
    stats: Arc<ListenStats>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                warn!(%listen, error = %e, "DNS receive failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let raw = buf[..n].to_vec();
        let client = ClientAddr::from_peer(peer);
        let rec = shared.records.dns_peer(&records::dns_peer_key(netns, peer));
        let Some(rec) = rec else {
            stats.dns_no_record.fetch_add(1, Ordering::Relaxed);
            warn!(%client, %listen, "DNS query refused: no kernel record of its sender");
            audit_unknown(&shared, client, "udp");
            if let Some(reply) = message::error_response(&raw, ResponseCode::Refused) {
                let _ = sock.send_to(&reply, peer).await;
            }
            continue;
        };
        let Some(sb) = sandbox_of(&shared, &stats, &rec, client) else {
            if let Some(reply) = message::error_response(&raw, ResponseCode::Refused) {
                let _ = sock.send_to(&reply, peer).await;
            }
            continue;
        };
        let asker = Asker::new(&rec, sb.clone(), client, "udp");
        let (shared, sock) = (shared.clone(), sock.clone());
        sb.spawn(async move {
            if let Some(reply) = answer(&shared, &asker, &raw).await {
                if let Err(e) = sock.send_to(&reply, peer).await {
                    debug!(client = %asker.client, error = %e, "DNS reply not sent");
                }
            }
            drop(permit);
        });
    }
}

async fn serve_tcp(
    listener: TcpListener,
    netns: u64,
    listen: ListenAddr,
    shared: Arc<Shared>,
    stats: Arc<ListenStats>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CONNS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(%listen, error = %e, "DNS accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let client = ClientAddr::from_peer(peer);
        let Some(rec) = shared
            .records
            .take_conn(&addr::sock_key(netns, client, listen))
        else {
            stats.dns_no_record.fetch_add(1, Ordering::Relaxed);
            warn!(%client, %listen, "DNS connection refused: no original destination recorded for it");
            audit_unknown(&shared, client, "tcp");
            continue;
        };
        let Some(sb) = sandbox_of(&shared, &stats, &rec, client) else {
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn!(%client, limit = MAX_TCP_CONNS, "DNS over TCP connection refused: too many open");
            continue;
        };
        let asker = Asker::new(&rec, sb.clone(), client, "tcp");
        let shared = shared.clone();
        sb.spawn(async move {
            serve_tcp_conn(stream, asker, &shared).await;
            drop(slot);
        });
    }
}

/// Queries on one TCP connection, each framed by a two-byte length, answered in order.
async fn serve_tcp_conn(mut stream: TcpStream, asker: Asker, shared: &Shared) {
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        // Allocated only once the length has arrived, and at most 64 KiB by the framing.
        let mut raw = vec![0u8; usize::from(u16::from_be_bytes(len))];
        match tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut raw)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let Some(reply) = answer(shared, &asker, &raw).await else {
            return;
        };
        let Ok(n) = u16::try_from(reply.len()) else {
            return;
        };
        let mut out = Vec::with_capacity(reply.len() + 2);
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&reply);
        if stream.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// The reply to one query (None: send nothing), with its audit record written.
async fn answer(shared: &Shared, who: &Asker, raw: &[u8]) -> Option<Vec<u8>> {
    shared.audit.wait_for_space().await;
    let start = Instant::now();
    let sb = &who.sandbox;
    let finish = |mut rec: DnsRecord| {
        rec.duration_ms = start.elapsed().as_millis() as u64;
        sb.counters.dns.add(rec.decision);
        debug!(
            sandbox = %rec.who.sandbox,
            pid = rec.who.pid,
            comm = %rec.who.comm,
            name = %rec.name,
            qtype = %rec.qtype,
            decision = %rec.decision,
            rcode = %rec.rcode,
            "dns"
        );
        shared.audit.record(&Record::Dns(rec));
    };
    let mut rec = DnsRecord {
        who: Who::now(sb.name.clone(), who.pid, who.comm.clone()),
        client: who.client.to_string(),
        resolver: who.resolver.clone(),
        transport: who.transport,
        ..Default::default()
    };
    let q = match message::parse_query(raw) {
        Ok(q) => q,
        Err(message::ParseError::NotAQuery) => return None,
        Err(e) => {
            let code = match e {
                message::ParseError::Unsupported { .. } => ResponseCode::NotImp,
                _ => ResponseCode::FormErr,
            };
            rec.decision = Decision::Deny;
            rec.rcode = message::rcode_name(code);
            rec.reason = Some(format!("not a query egress answers: {e}"));
            finish(rec);
            return message::error_response(raw, code);
        }
    };
    rec.name = q.name.clone();
    rec.qtype = q.qtype_name.clone();
    // Flagged whatever the verdict: under an allowed wildcard the labels still reach
    // that domain's servers, and the operator should see it.
    rec.suspect = tunnel::suspicion(&q.name);
    if rec.suspect.is_some() {
        sb.counters
            .dns_tunnel_suspects
            .fetch_add(1, Ordering::Relaxed);
    }

    let live = sb.policy.load_full();
    let refusal = match live.sandbox.host_decision(&q.name) {
        HostDecision::Allow { rule } | HostDecision::Passthrough { rule } => {
            rec.rule = rule;
            None
        }
        HostDecision::Deny { reason, rule } => {
            let fix = Fix::for_host(&q.name, &rule);
            rec.rule = rule;
            Some((reason, fix))
        }
    };
    if let Some((reason, fix)) = refusal {
        rec.reason = Some(reason.to_owned());
        if live.sandbox.mode != Mode::Warn {
            rec.decision = Decision::Deny;
            rec.rcode = message::rcode_name(ResponseCode::NXDomain);
            finish(rec);
            let text = format!("egress: {reason}; {}", fix.hint(&live.sandbox));
            return Some(message::refuse(
                &q,
                ResponseCode::NXDomain,
                Some((EDE_BLOCKED, &text)),
            ));
        }
        rec.decision = Decision::Warn;
    } else {
        rec.decision = Decision::Allow;
    }

    let reply = match sb.resolvers.load().forward(&q.raw).await {
        Ok(r) => r,
        Err(e) => {
            sb.counters
                .dns_upstream_failures
                .fetch_add(1, Ordering::Relaxed);
            rec.rcode = message::rcode_name(ResponseCode::ServFail);
            rec.error = Some(e.to_string());
            finish(rec);
            return Some(message::refuse(&q, ResponseCode::ServFail, None));
        }
    };
    match message::inspect_response(&reply, &q) {
        Ok(a) => {
            sb.pins.record(sb.id, &q.name, &a.addrs);
            rec.rcode = a.rcode;
            rec.answers = a.addrs.iter().map(|(ip, _)| ip.to_string()).collect();
        }
        Err(e) => {
            // The upstream module already matched id and question; this is a reply
            // hickory cannot read. Pass it on, but pin nothing from it.
            rec.error = Some(format!("unreadable upstream reply: {e}"));
        }
    }
    finish(rec);
    Some(if who.transport == "udp" {
        message::truncate_for_udp(&reply, message::udp_limit(&q))
    } else {
        reply
    })
}

/// The audit record of a query or connection refused for lack of a kernel record.
fn audit_unknown(shared: &Shared, client: ClientAddr, transport: &'static str) {
    shared.audit.record(&Record::Dns(DnsRecord {
        who: Who {
            ts: crate::audit::now(),
            ..Default::default()
        },
        client: client.to_string(),
        transport,
        decision: Decision::Deny,
        rcode: message::rcode_name(ResponseCode::Refused),
        reason: Some("no kernel record of the sender; not a redirected query".into()),
        ..Default::default()
    }));
}
