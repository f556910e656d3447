//! Forwarding sandbox queries to the host's resolvers: which servers (from resolv.conf or the
//! command line), and one exchange with them, hardened against spoofed replies.
//!
//! Each attempt uses a fresh socket on an ephemeral port, `connect`ed to the server so the
//! kernel drops datagrams from anyone else, and a fresh random query id. A reply counts only
//! if it carries that id and echoes the question; anything else is ignored until the
//! attempt's timeout. A truncated UDP reply is fetched again over TCP.

use std::{
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    path::{Path, PathBuf},
    time::Duration,
};

use hickory_proto::{
    op::{Header, Message, Query as Question},
    serialize::binary::{BinDecodable, BinDecoder},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::{timeout, timeout_at, Instant},
};

use super::message::HEADER_LEN;
use crate::netns::Connector;

/// Per-attempt timeout without `options timeout:` (glibc's default is 5 s; a sandboxed
/// program waiting on egress already waits on its own resolver timeout too).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Rounds over all servers without `options attempts:`.
pub const DEFAULT_ATTEMPTS: u32 = 2;
/// glibc reads at most this many `nameserver` lines (MAXNS); so does egress.
pub const MAX_SERVERS: usize = 3;
/// Queries larger than this go over TCP directly: it is the EDNS size that avoids IP
/// fragmentation, so a larger UDP query may not arrive at all.
pub const MAX_UDP_QUERY: usize = 1232;

const TIMEOUT_RANGE: (u64, u64) = (1, 5);
const ATTEMPTS_RANGE: (u32, u32) = (1, 3);
const DNS_PORT: u16 = 53;

/// The resolvers egress forwards to, and how patiently.
#[derive(Clone, Debug)]
pub struct Upstreams {
    servers: Vec<SocketAddr>,
    timeout: Duration,
    attempts: u32,
    /// Where the forwarding sockets are made (egress's namespace or a sandbox's).
    via: Connector,
}

impl PartialEq for Upstreams {
    fn eq(&self, other: &Self) -> bool {
        (&self.servers, self.timeout, self.attempts)
            == (&other.servers, other.timeout, other.attempts)
    }
}

impl Eq for Upstreams {}

/// Why the upstream list could not be read. The operator's doing: exit with EX_USAGE.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}; name resolvers with --dns-upstream", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} has no nameserver line; name resolvers with --dns-upstream", path.display())]
    NoServers { path: PathBuf },
    #[error("{}:{line}: nameserver: cannot parse address {text:?}", path.display())]
    BadServer {
        path: PathBuf,
        line: usize,
        text: String,
    },
}

/// Why a query got no usable reply. All are upstream failures except `BadQuery`, which is
/// the client's.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("query cannot be forwarded: {0}")]
    BadQuery(String),
    #[error("no upstream DNS servers configured")]
    NoServers,
    #[error("no reply from {servers} ({attempts} attempts, {timeout_ms} ms each)")]
    Timeout {
        servers: String,
        attempts: u32,
        timeout_ms: u64,
    },
    #[error("upstream {server}")]
    Io {
        server: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("upstream {server}: bad reply: {reason}")]
    BadReply { server: SocketAddr, reason: String },
}

/// How one attempt at one server ended, when it did not yield a reply.
enum Failure {
    Timeout,
    Error(ForwardError),
}

impl Upstreams {
    pub fn new(servers: Vec<SocketAddr>) -> Self {
        Upstreams {
            servers,
            timeout: DEFAULT_TIMEOUT,
            attempts: DEFAULT_ATTEMPTS,
            via: Connector::Here,
        }
    }

    /// Forwards through sockets made by `via` (for a sandbox in its own namespace, that
    /// namespace, where its resolvers are reachable).
    pub fn via(mut self, via: Connector) -> Self {
        self.via = via;
        self
    }

    /// Per-attempt timeout, unclamped (tests use a few hundred milliseconds).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Rounds over all servers, at least 1.
    pub fn with_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// `nameserver` lines (IPv4, IPv6 with an optional `%scope`), port 53;
    /// `options timeout:N attempts:N` (clamped to 1..=5 s and 1..=3). Other lines and
    /// comments (`#`, `;`) are ignored.
    pub fn from_resolv_conf(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_resolv_conf(path, &text)
    }

    /// The parser behind [`Upstreams::from_resolv_conf`]; `path` is only for errors.
    pub fn parse_resolv_conf(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut up = Upstreams::new(Vec::new());
        for (i, line) in text.lines().enumerate() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    let Some(addr) = words.next() else {
                        return Err(ConfigError::BadServer {
                            path: path.to_owned(),
                            line: i + 1,
                            text: String::new(),
                        });
                    };
                    let server = parse_server(addr).ok_or_else(|| ConfigError::BadServer {
                        path: path.to_owned(),
                        line: i + 1,
                        text: addr.to_owned(),
                    })?;
                    if up.servers.len() < MAX_SERVERS && !up.servers.contains(&server) {
                        up.servers.push(server);
                    }
                }
                Some("options") => {
                    for opt in words {
                        if let Some(n) = opt.strip_prefix("timeout:") {
                            if let Ok(n) = n.parse::<u64>() {
                                let secs = n.clamp(TIMEOUT_RANGE.0, TIMEOUT_RANGE.1);
                                up.timeout = Duration::from_secs(secs);
                            }
                        } else if let Some(n) = opt.strip_prefix("attempts:") {
                            if let Ok(n) = n.parse::<u32>() {
                                up.attempts = n.clamp(ATTEMPTS_RANGE.0, ATTEMPTS_RANGE.1);
                            }
                        }
                    }
                }
                // Comments, blank lines, search/domain/sortlist: nothing egress needs.
                _ => {}
            }
        }
        if up.servers.is_empty() {
            return Err(ConfigError::NoServers {
                path: path.to_owned(),
            });
        }
        Ok(up)
    }

    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Forwards one query (raw wire bytes from the client, any id) and returns the reply with
    /// the client's id restored. Servers are tried in order, `attempts` rounds.
    pub async fn forward(&self, query: &[u8]) -> Result<Vec<u8>, ForwardError> {
        if query.len() > usize::from(u16::MAX) {
            return Err(ForwardError::BadQuery(format!(
                "{} bytes, longer than any DNS message",
                query.len()
            )));
        }
        let expected = Expected::from_query(query)?;
        if self.servers.is_empty() {
            return Err(ForwardError::NoServers);
        }
        let mut last_error = None;
        for _ in 0..self.attempts {
            for &server in &self.servers {
                let result = if query.len() > MAX_UDP_QUERY {
                    self.over_tcp(server, query, &expected).await
                } else {
                    self.over_udp(server, query, &expected).await
                };
                match result {
                    Ok(mut reply) => {
                        reply[..2].copy_from_slice(&query[..2]);
                        return Ok(reply);
                    }
                    Err(Failure::Timeout) => {
                        tracing::debug!(%server, "dns upstream timed out");
                    }
                    Err(Failure::Error(e)) => {
                        tracing::debug!(%server, error = %crate::error_chain(&e), "dns upstream failed");
                        last_error = Some(e);
                    }
                }
            }
        }
        Err(last_error.unwrap_or_else(|| ForwardError::Timeout {
            servers: ServerList(&self.servers).to_string(),
            attempts: self.attempts,
            timeout_ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
        }))
    }

    async fn over_udp(
        &self,
        server: SocketAddr,
        query: &[u8],
        expected: &Expected,
    ) -> Result<Vec<u8>, Failure> {
        let deadline = Instant::now() + self.timeout;
        let io_err = |source| Failure::Error(ForwardError::Io { server, source });
        let local: SocketAddr = match server.ip() {
            IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = self.via.udp(local).await.map_err(io_err)?;
        socket.connect(server).await.map_err(io_err)?;
        let id: u16 = rand::random();
        socket.send(&with_id(query, id)).await.map_err(io_err)?;
        let mut buf = vec![0u8; usize::from(u16::MAX)];
        loop {
            let n = match timeout_at(deadline, socket.recv(&mut buf)).await {
                Err(_) => return Err(Failure::Timeout),
                Ok(r) => r.map_err(io_err)?,
            };
            let reply = &buf[..n];
            if let Err(why) = expected.check(reply, id) {
                // Spoofing attempts and stale replies to earlier ids look alike: wait on.
                tracing::debug!(%server, why, "dns upstream: reply ignored");
                continue;
            }
            if reply[2] & 0x02 != 0 {
                return self.over_tcp(server, query, expected).await;
            }
            return Ok(reply.to_vec());
        }
    }

    async fn over_tcp(
        &self,
        server: SocketAddr,
        query: &[u8],
        expected: &Expected,
    ) -> Result<Vec<u8>, Failure> {
        let io_err = |source| Failure::Error(ForwardError::Io { server, source });
        let len = u16::try_from(query.len()).map_err(|_| {
            Failure::Error(ForwardError::BadQuery(format!(
                "{} bytes, too long for DNS over TCP",
                query.len()
            )))
        })?;
        let id: u16 = rand::random();
        let exchange = async {
            let mut stream = self.via.tcp(server).await?;
            let mut framed = Vec::with_capacity(query.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(&with_id(query, id));
            stream.write_all(&framed).await?;
            let reply_len = stream.read_u16().await?;
            let mut reply = vec![0u8; usize::from(reply_len)];
            stream.read_exact(&mut reply).await?;
            Ok::<_, io::Error>(reply)
        };
        let reply = match timeout(self.timeout, exchange).await {
            Err(_) => return Err(Failure::Timeout),
            Ok(r) => r.map_err(io_err)?,
        };
        // Nobody else can inject into this connection: a mismatch means a broken server.
        expected.check(&reply, id).map_err(|reason| {
            Failure::Error(ForwardError::BadReply {
                server,
                reason: reason.to_owned(),
            })
        })?;
        Ok(reply)
    }
}

/// What a reply must echo: the question section of the query.
struct Expected {
    questions: Vec<Question>,
}

impl Expected {
    fn from_query(query: &[u8]) -> Result<Self, ForwardError> {
        let (header, questions) = read_questions(query)
            .ok_or_else(|| ForwardError::BadQuery("question section does not decode".into()))?;
        if header.metadata.message_type != hickory_proto::op::MessageType::Query {
            return Err(ForwardError::BadQuery("QR bit set".into()));
        }
        Ok(Expected { questions })
    }

    fn check(&self, reply: &[u8], id: u16) -> Result<(), &'static str> {
        let (header, questions) = read_questions(reply).ok_or("does not decode")?;
        if header.metadata.id != id {
            return Err("wrong id");
        }
        if header.metadata.message_type != hickory_proto::op::MessageType::Response {
            return Err("QR bit clear");
        }
        // Name equality is case-insensitive: some resolvers do not echo the case they got.
        if questions != self.questions {
            return Err("question differs");
        }
        Ok(())
    }
}

/// The header and question section of a message, ignoring the rest (which may hold record
/// types hickory cannot decode; the caller gets the raw bytes anyway).
fn read_questions(buf: &[u8]) -> Option<(Header, Vec<Question>)> {
    if buf.len() < HEADER_LEN {
        return None;
    }
    let mut decoder = BinDecoder::new(buf);
    let header = Header::read(&mut decoder).ok()?;
    let questions = Message::read_queries(&mut decoder, usize::from(header.counts.queries)).ok()?;
    Some((header, questions))
}

fn with_id(query: &[u8], id: u16) -> Vec<u8> {
    let mut q = query.to_vec();
    q[..2].copy_from_slice(&id.to_be_bytes());
    q
}

/// A `nameserver` address: IPv4, or IPv6 with an optional `%scope` (a number or an
/// interface name).
fn parse_server(text: &str) -> Option<SocketAddr> {
    if let Ok(v4) = text.parse::<Ipv4Addr>() {
        return Some((v4, DNS_PORT).into());
    }
    let (addr, scope) = match text.split_once('%') {
        Some((a, s)) => (a, Some(s)),
        None => (text, None),
    };
    let v6 = addr.parse::<Ipv6Addr>().ok()?;
    let scope_id = match scope {
        None => 0,
        Some("") => return None,
        Some(s) => match s.parse::<u32>() {
            Ok(n) => n,
            // An interface missing now may appear later; without a scope the kernel picks
            // the route, which is right for everything but link-local servers.
            Err(_) => nix::net::if_::if_nametoindex(s).unwrap_or(0),
        },
    };
    Some(SocketAddr::V6(SocketAddrV6::new(v6, DNS_PORT, 0, scope_id)))
}

/// Servers for an error message: `10.0.0.2:53, [fe80::1%2]:53`.
struct ServerList<'a>(&'a [SocketAddr]);

impl fmt::Display for ServerList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, sync::Arc, time::Instant as StdInstant};

    use hickory_proto::{
        op::{MessageType, OpCode},
        rr::{rdata::A, Name, RData, Record, RecordType},
    };
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, UdpSocket},
    };

    use super::*;

    fn path() -> &'static Path {
        Path::new("/etc/resolv.conf")
    }

    fn query(id: u16, qname: &str) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Question::query(
            Name::from_ascii(qname).expect("name"),
            RecordType::A,
        ));
        m.to_vec().expect("encode")
    }

    /// A reply to `query` with one A record per `ips`, the id and TC bit as given.
    fn answer(query: &[u8], id: u16, ips: &[Ipv4Addr], tc: bool) -> Vec<u8> {
        let q = Message::from_vec(query).expect("stub got a decodable query");
        let mut r = Message::response(id, OpCode::Query);
        r.metadata.recursion_desired = q.recursion_desired;
        r.metadata.recursion_available = true;
        r.metadata.truncation = tc;
        r.add_queries(q.queries.iter().cloned());
        for ip in ips {
            r.add_answer(Record::from_rdata(
                q.queries[0].name.clone(),
                60,
                RData::A(A(*ip)),
            ));
        }
        r.to_vec().expect("encode")
    }

    fn id_of(msg: &[u8]) -> u16 {
        u16::from_be_bytes([msg[0], msg[1]])
    }

    fn answers(reply: &[u8]) -> Vec<Ipv4Addr> {
        Message::from_vec(reply)
            .expect("reply decodes")
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    /// A UDP stub on 127.0.0.1 that hands each query to `respond` and sends what it returns.
    async fn udp_stub<F>(respond: F) -> (SocketAddr, Arc<UdpSocket>)
    where
        F: Fn(&[u8]) -> Vec<Vec<u8>> + Send + 'static,
    {
        let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind stub"));
        let addr = sock.local_addr().expect("stub addr");
        let s = sock.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            while let Ok((n, peer)) = s.recv_from(&mut buf).await {
                for reply in respond(&buf[..n]) {
                    let _ = s.send_to(&reply, peer).await;
                }
            }
        });
        (addr, sock)
    }

    const IP1: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const IP2: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

    #[test]
    fn parses_resolv_conf() {
        let text = "\
# generated by NetworkManager
; another comment
search corp.example
nameserver 10.0.0.2
nameserver   2001:db8::53
nameserver fe80::1%7
options ndots:2 timeout:9 attempts:0 rotate
";
        let up = Upstreams::parse_resolv_conf(path(), text).expect("parses");
        assert_eq!(
            up.servers(),
            &[
                "10.0.0.2:53".parse::<SocketAddr>().expect("addr"),
                "[2001:db8::53]:53".parse().expect("addr"),
                SocketAddr::V6(SocketAddrV6::new(
                    "fe80::1".parse().expect("addr"),
                    53,
                    0,
                    7
                )),
            ]
        );
        assert_eq!(up.timeout(), Duration::from_secs(5));
        assert_eq!(up.attempts(), 1);

        let up = Upstreams::parse_resolv_conf(path(), "nameserver 127.0.0.53\n").expect("ok");
        assert_eq!(up.timeout(), DEFAULT_TIMEOUT);
        assert_eq!(up.attempts(), DEFAULT_ATTEMPTS);

        let up = Upstreams::parse_resolv_conf(path(), "options timeout:0 attempts:2\nnameserver 1.1.1.1\nnameserver 8.8.8.8\nnameserver 9.9.9.9\nnameserver 1.0.0.1\n")
            .expect("ok");
        assert_eq!(up.timeout(), Duration::from_secs(1));
        assert_eq!(up.attempts(), 2);
        assert_eq!(up.servers().len(), MAX_SERVERS);
    }

    #[test]
    fn resolv_conf_errors_name_the_file() {
        let err = Upstreams::parse_resolv_conf(path(), "# nothing\nsearch example\n")
            .expect_err("no servers");
        assert!(matches!(err, ConfigError::NoServers { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("/etc/resolv.conf") && msg.contains("--dns-upstream"),
            "{msg}"
        );

        let err =
            Upstreams::parse_resolv_conf(path(), "nameserver 10.0.0.1\n\nnameserver dns.example\n")
                .expect_err("bad line");
        match &err {
            ConfigError::BadServer { line, text, .. } => {
                assert_eq!((*line, text.as_str()), (3, "dns.example"));
            }
            other => panic!("wrong error: {other:?}"),
        }
        assert!(err.to_string().starts_with("/etc/resolv.conf:3:"), "{err}");

        let err = Upstreams::from_resolv_conf(Path::new("/nonexistent/resolv.conf"))
            .expect_err("missing file");
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(err.to_string().contains("/nonexistent/resolv.conf"));
    }

    #[tokio::test]
    async fn forwards_and_restores_the_client_id() {
        let (addr, _stub) = udp_stub(|q| vec![answer(q, id_of(q), &[IP1], false)]).await;
        let up = Upstreams::new(vec![addr]);
        let reply = up
            .forward(&query(0xbeef, "www.example.com."))
            .await
            .expect("reply");
        assert_eq!(id_of(&reply), 0xbeef);
        assert_eq!(answers(&reply), vec![IP1]);
    }

    #[tokio::test]
    async fn ignores_replies_with_the_wrong_id_or_question() {
        let (addr, _stub) = udp_stub(|q| {
            let id = id_of(q);
            let other = query(id, "evil.example.");
            vec![
                answer(q, id ^ 0x5a5a, &[IP2], false),
                answer(&other, id, &[IP2], false),
                answer(q, id, &[IP1], false),
            ]
        })
        .await;
        let up = Upstreams::new(vec![addr]);
        let reply = up
            .forward(&query(7, "www.example.com."))
            .await
            .expect("reply");
        assert_eq!(id_of(&reply), 7);
        assert_eq!(answers(&reply), vec![IP1]);
    }

    #[tokio::test]
    async fn retries_truncated_replies_over_tcp() {
        // The TCP stub must share the UDP stub's port; retry if another test holds it.
        let (addr, _stub, listener) = loop {
            let (addr, stub) = udp_stub(|q| vec![answer(q, id_of(q), &[], true)]).await;
            if let Ok(l) = TcpListener::bind(addr).await {
                break (addr, stub, l);
            }
        };
        let full: Vec<Ipv4Addr> = (1..=60).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        let served = full.clone();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.expect("accept");
            let len = conn.read_u16().await.expect("length");
            let mut q = vec![0u8; usize::from(len)];
            conn.read_exact(&mut q).await.expect("query");
            let reply = answer(&q, id_of(&q), &served, false);
            let mut framed = u16::try_from(reply.len())
                .expect("fits")
                .to_be_bytes()
                .to_vec();
            framed.extend_from_slice(&reply);
            conn.write_all(&framed).await.expect("write");
        });
        let up = Upstreams::new(vec![addr]);
        let reply = up
            .forward(&query(0x0102, "big.example."))
            .await
            .expect("reply");
        assert_eq!(id_of(&reply), 0x0102);
        assert_eq!(answers(&reply), full);
        assert_eq!(reply[2] & 0x02, 0, "TC bit clear in the TCP reply");
    }

    #[tokio::test]
    async fn moves_on_from_a_silent_server() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let (addr, _stub) = udp_stub(|q| vec![answer(q, id_of(q), &[IP2], false)]).await;
        let up = Upstreams::new(vec![silent.local_addr().expect("addr"), addr])
            .with_timeout(Duration::from_millis(200));
        let start = StdInstant::now();
        let reply = up
            .forward(&query(1, "www.example.com."))
            .await
            .expect("reply");
        assert_eq!(answers(&reply), vec![IP2]);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(2),
            "took {took:?}"
        );
    }

    #[tokio::test]
    async fn fails_when_every_server_is_silent() {
        let a = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let b = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let up = Upstreams::new(vec![
            a.local_addr().expect("addr"),
            b.local_addr().expect("addr"),
        ])
        .with_timeout(Duration::from_millis(100))
        .with_attempts(2);
        let start = StdInstant::now();
        let err = up
            .forward(&query(1, "www.example.com."))
            .await
            .expect_err("no reply");
        assert!(matches!(err, ForwardError::Timeout { .. }), "{err:?}");
        assert!(err
            .to_string()
            .contains(&a.local_addr().expect("addr").to_string()));
        assert!(start.elapsed() >= Duration::from_millis(400));
    }

    #[tokio::test]
    async fn rejects_what_is_not_a_query() {
        let up = Upstreams::new(vec!["127.0.0.1:9".parse().expect("addr")]);
        assert!(matches!(
            up.forward(&[0u8; 5]).await,
            Err(ForwardError::BadQuery(_))
        ));
        let mut reply = query(1, "a.example.");
        reply[2] |= 0x80;
        assert!(matches!(
            up.forward(&reply).await,
            Err(ForwardError::BadQuery(_))
        ));
        let none = Upstreams::new(Vec::new());
        assert!(matches!(
            none.forward(&query(1, "a.example.")).await,
            Err(ForwardError::NoServers)
        ));
    }
}
