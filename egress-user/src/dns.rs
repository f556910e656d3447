//! The DNS listener: every UDP and TCP port-53 query a sandbox sends, to whatever resolver,
//! lands here (the kernel rewrites the destination). Only names the sandbox's policy lets it
//! reach (allow or passthrough) are forwarded to the host's resolvers; every other name gets
//! NXDOMAIN, so a denied name cannot carry data out in its labels.
//!
//! Who asked comes from the kernel, never from the packet: for UDP the cgroup_skb program
//! names the sender of each datagram by its source port ([`bpf::DnsPeerTable`]); for TCP the
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
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use hickory_proto::op::ResponseCode;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::{
    addr::{self, ClientAddr, ListenAddr},
    audit::{DnsRecord, Record},
    bpf::{DnsPeerTable, OrigDstTable},
    netns,
    policy::{HostDecision, Mode},
    proxy::Ctx,
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

/// Counters of the DNS listener, reported at shutdown.
#[derive(Debug, Default)]
pub struct DnsStats {
    pub queries: AtomicU64,
    pub refused: AtomicU64,
    /// Queried names that looked like tunnelling (long or high-entropy labels), refused
    /// or (under an allowed wildcard) answered.
    pub tunnel_suspects: AtomicU64,
    pub upstream_failures: AtomicU64,
    /// Datagrams or connections with no kernel record of their sender.
    pub no_record: AtomicU64,
}

/// Everything the DNS listener needs.
pub struct Dns {
    pub upstreams: upstream::Upstreams,
    pub peers: Arc<DnsPeerTable>,
    pub orig_dst: Arc<OrigDstTable>,
    pub ctx: Arc<Ctx>,
    pub stats: Arc<DnsStats>,
}

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
            match std::net::TcpListener::bind(addr) {
                Ok(tcp) => {
                    udp.set_nonblocking(true)?;
                    tcp.set_nonblocking(true)?;
                    let netns = netns::socket_netns_cookie(&tcp)?;
                    return Ok(Self {
                        udp,
                        tcp,
                        netns,
                        addr: ListenAddr(addr),
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no free port")))
    }

    pub fn addr(&self) -> ListenAddr {
        self.addr
    }

    /// Serves both sockets until the returned tasks are aborted. Each query runs on `conns`,
    /// so that shutdown lets it finish and write its audit record.
    pub fn serve(
        self,
        dns: Arc<Dns>,
        conns: TaskTracker,
    ) -> std::io::Result<[tokio::task::JoinHandle<()>; 2]> {
        let udp = Arc::new(UdpSocket::from_std(self.udp)?);
        let tcp = TcpListener::from_std(self.tcp)?;
        let (netns, addr) = (self.netns, self.addr);
        let u = tokio::spawn(serve_udp(udp, netns, addr, dns.clone(), conns.clone()));
        let t = tokio::spawn(serve_tcp(tcp, netns, addr, dns, conns));
        Ok([u, t])
    }
}

/// Who sent a query, as the kernel recorded it.
struct Asker {
    sandbox: u32,
    pid: u32,
    comm: String,
    client: ClientAddr,
    /// The resolver the program addressed.
    resolver: String,
    transport: &'static str,
}

impl Asker {
    fn new(rec: &egress_common::SockRecord, client: ClientAddr, transport: &'static str) -> Self {
        Asker {
            sandbox: rec.sandbox,
            pid: rec.tgid,
            comm: addr::comm(&rec.comm),
            client,
            resolver: addr::orig_dst(rec).to_string(),
            transport,
        }
    }
}

async fn serve_udp(
    sock: Arc<UdpSocket>,
    netns: u64,
    listen: ListenAddr,
    dns: Arc<Dns>,
    conns: TaskTracker,
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
        let Some(rec) = dns.peers.get(netns, peer) else {
            dns.stats.no_record.fetch_add(1, Ordering::Relaxed);
            warn!(%client, %listen, "DNS query refused: no kernel record of its sender");
            dns.audit_unknown(client, "udp");
            if let Some(reply) = message::error_response(&raw, ResponseCode::Refused) {
                let _ = sock.send_to(&reply, peer).await;
            }
            continue;
        };
        let asker = Asker::new(&rec, client, "udp");
        let (dns, sock) = (dns.clone(), sock.clone());
        conns.spawn(async move {
            if let Some(reply) = dns.answer(&asker, &raw).await {
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
    dns: Arc<Dns>,
    conns: TaskTracker,
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
        let Some(rec) = dns.orig_dst.take(&addr::sock_key(netns, client, listen)) else {
            dns.stats.no_record.fetch_add(1, Ordering::Relaxed);
            warn!(%client, %listen, "DNS connection refused: no original destination recorded for it");
            dns.audit_unknown(client, "tcp");
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn!(%client, limit = MAX_TCP_CONNS, "DNS over TCP connection refused: too many open");
            continue;
        };
        let asker = Asker::new(&rec, client, "tcp");
        let dns = dns.clone();
        conns.spawn(async move {
            serve_tcp_conn(stream, asker, dns).await;
            drop(slot);
        });
    }
}

/// Queries on one TCP connection, each framed by a two-byte length, answered in order.
async fn serve_tcp_conn(mut stream: TcpStream, asker: Asker, dns: Arc<Dns>) {
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
        let Some(reply) = dns.answer(&asker, &raw).await else {
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

impl Dns {
    /// The reply to one query (None: send nothing), with its audit record written.
    async fn answer(&self, who: &Asker, raw: &[u8]) -> Option<Vec<u8>> {
        let start = Instant::now();
        self.stats.queries.fetch_add(1, Ordering::Relaxed);
        let mut rec = DnsRecord {
            ts: crate::audit::now(),
            sandbox: self.ctx.sandbox_name(who.sandbox),
            pid: who.pid,
            comm: who.comm.clone(),
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
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                rec.decision = "deny";
                rec.rcode = message::rcode_name(code);
                rec.reason = Some(format!("not a query egress answers: {e}"));
                self.finish(rec, start);
                return message::error_response(raw, code);
            }
        };
        rec.name = q.name.clone();
        rec.qtype = q.qtype_name.clone();
        // Flagged whatever the verdict: under an allowed wildcard the labels still reach
        // that domain's servers, and the operator should see it.
        rec.suspect = tunnel::suspicion(&q.name);
        if rec.suspect.is_some() {
            self.stats.tunnel_suspects.fetch_add(1, Ordering::Relaxed);
        }

        let live = self.ctx.policy.load_full();
        let refusal = match live.sandbox.host_decision(&q.name) {
            HostDecision::Allow { rule } | HostDecision::Passthrough { rule } => {
                rec.rule = rule;
                None
            }
            HostDecision::Deny { reason, rule } => {
                rec.rule = rule;
                Some(reason)
            }
        };
        if let Some(reason) = refusal {
            rec.reason = Some(reason.to_owned());
            if live.sandbox.mode != Mode::Warn {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                rec.decision = "deny";
                rec.rcode = message::rcode_name(ResponseCode::NXDomain);
                self.finish(rec, start);
                let text = format!("egress: {reason}");
                return Some(message::refuse(
                    &q,
                    ResponseCode::NXDomain,
                    Some((EDE_BLOCKED, &text)),
                ));
            }
            rec.decision = "warn";
        } else {
            rec.decision = "allow";
        }

        let reply = match self.upstreams.forward(&q.raw).await {
            Ok(r) => r,
            Err(e) => {
                self.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
                rec.rcode = message::rcode_name(ResponseCode::ServFail);
                rec.error = Some(e.to_string());
                self.finish(rec, start);
                return Some(message::refuse(&q, ResponseCode::ServFail, None));
            }
        };
        match message::inspect_response(&reply, &q) {
            Ok(a) => {
                self.ctx.pins.record(who.sandbox, &q.name, &a.addrs);
                rec.rcode = a.rcode;
                rec.answers = a.addrs.iter().map(|(ip, _)| ip.to_string()).collect();
            }
            Err(e) => {
                // The upstream module already matched id and question; this is a reply
                // hickory cannot read. Pass it on, but pin nothing from it.
                rec.error = Some(format!("unreadable upstream reply: {e}"));
            }
        }
        self.finish(rec, start);
        Some(if who.transport == "udp" {
            message::truncate_for_udp(&reply, message::udp_limit(&q))
        } else {
            reply
        })
    }

    /// The audit record of a query or connection refused for lack of a kernel record.
    fn audit_unknown(&self, client: ClientAddr, transport: &'static str) {
        self.ctx.audit.record(&Record::Dns(DnsRecord {
            ts: crate::audit::now(),
            client: client.to_string(),
            transport,
            decision: "deny",
            rcode: message::rcode_name(ResponseCode::Refused),
            reason: Some("no kernel record of the sender; not a redirected query".into()),
            ..Default::default()
        }));
    }

    fn finish(&self, mut rec: DnsRecord, start: Instant) {
        rec.duration_ms = start.elapsed().as_millis() as u64;
        debug!(
            sandbox = %rec.sandbox,
            pid = rec.pid,
            comm = %rec.comm,
            name = %rec.name,
            qtype = %rec.qtype,
            decision = rec.decision,
            rcode = %rec.rcode,
            "dns"
        );
        self.ctx.audit.record(&Record::Dns(rec));
    }
}
