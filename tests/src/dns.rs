//! A stub upstream resolver for the DNS tests: what egress forwards permitted queries to.
//!
//! It answers A and AAAA from a fixed table over UDP and TCP on one port (on loopback unless
//! told otherwise), and records every question it receives, so a test can prove that a denied
//! name never left egress rather than trusting what the sandboxed client believes happened.
//! It runs on plain threads and stops on `Drop`.
#![forbid(unsafe_code)]

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use hickory_proto::{
    op::{Edns, Message, MessageType, Metadata, ResponseCode},
    rr::{
        rdata::{A, AAAA},
        RData, Record, RecordType,
    },
};

/// TTL of every answer.
pub const TTL: u32 = 60;

/// How often the serving threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

/// One question as the stub received it: lower-case name without the final dot, the query
/// type as `dig` prints it (`"A"`, `"AAAA"`, …), and `"udp"` or `"tcp"`.
pub type SeenQuery = (String, String, &'static str);

struct State {
    /// Lower-case names without the final dot.
    records: Vec<(String, IpAddr)>,
    seen: Mutex<Vec<SeenQuery>>,
    truncate_udp: AtomicBool,
    stop: AtomicBool,
}

/// A resolver on 127.0.0.1 (or another address of the test's) answering from a table; UDP
/// and TCP share the port.
pub struct StubResolver {
    addr: SocketAddr,
    state: Arc<State>,
    threads: Vec<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl StubResolver {
    /// Serves `records` (a name may appear several times, once per address). A known name
    /// asked for another type gets NOERROR with no answers; an unknown name gets NXDOMAIN.
    pub fn start(records: &[(&str, IpAddr)]) -> StubResolver {
        Self::start_at(IpAddr::from([127, 0, 0, 1]), records)
    }

    /// Like [`StubResolver::start`], on `ip` (an address of a veth the test made, so that a
    /// sandbox's own network namespace can reach it).
    pub fn start_at(ip: IpAddr, records: &[(&str, IpAddr)]) -> StubResolver {
        Self::serve(bind_pair(ip), records)
    }

    /// Like [`StubResolver::start_at`], on a given port: `ip:53` for clients (such as Docker's
    /// `--dns`) that cannot be told a port.
    pub fn start_on(addr: SocketAddr, records: &[(&str, IpAddr)]) -> StubResolver {
        let udp = UdpSocket::bind(addr)
            .unwrap_or_else(|e| panic!("stub resolver cannot bind UDP on {addr}: {e}"));
        let tcp = TcpListener::bind(addr)
            .unwrap_or_else(|e| panic!("stub resolver cannot bind TCP on {addr}: {e}"));
        Self::serve((udp, tcp), records)
    }

    fn serve((udp, tcp): (UdpSocket, TcpListener), records: &[(&str, IpAddr)]) -> StubResolver {
        let addr = udp
            .local_addr()
            .unwrap_or_else(|e| panic!("stub resolver UDP socket has no address: {e}"));
        udp.set_read_timeout(Some(POLL))
            .unwrap_or_else(|e| panic!("stub resolver UDP read timeout: {e}"));
        tcp.set_nonblocking(true)
            .unwrap_or_else(|e| panic!("stub resolver TCP listener nonblocking: {e}"));
        let state = Arc::new(State {
            records: records
                .iter()
                .map(|(name, ip)| (normalize(name), *ip))
                .collect(),
            seen: Mutex::new(Vec::new()),
            truncate_udp: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let connections = Arc::new(Mutex::new(Vec::new()));

        let s = state.clone();
        let udp_thread = std::thread::Builder::new()
            .name(format!("stub-dns-udp-{addr}"))
            .spawn(move || serve_udp(&udp, &s))
            .unwrap_or_else(|e| panic!("spawning the stub resolver UDP thread: {e}"));
        let (s, c) = (state.clone(), connections.clone());
        let tcp_thread = std::thread::Builder::new()
            .name(format!("stub-dns-tcp-{addr}"))
            .spawn(move || serve_tcp(&tcp, &s, &c))
            .unwrap_or_else(|e| panic!("spawning the stub resolver TCP thread: {e}"));

        StubResolver {
            addr,
            state,
            threads: vec![udp_thread, tcp_thread],
            connections,
        }
    }

    /// The address for `--dns-upstream`: the same port serves UDP and TCP.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every question received so far, in arrival order.
    pub fn queries(&self) -> Vec<SeenQuery> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Whether any question so far named `name` (case-insensitive, final dot ignored).
    pub fn saw(&self, name: &str) -> bool {
        let name = normalize(name);
        self.queries().iter().any(|(n, _, _)| *n == name)
    }

    /// With `true`, every UDP answer is empty and has TC set, as from a server whose answer
    /// does not fit: the asker must retry over TCP to get it.
    pub fn set_truncate_udp(&self, on: bool) {
        self.state.truncate_udp.store(on, Ordering::SeqCst);
    }
}

impl Drop for StubResolver {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        let mut panicked = false;
        for t in self.threads.drain(..) {
            panicked |= t.join().is_err();
        }
        let connections: Vec<_> = self.connections.lock().unwrap().drain(..).collect();
        for t in connections {
            panicked |= t.join().is_err();
        }
        // A second panic while unwinding would abort and hide the test's own message.
        if panicked && !std::thread::panicking() {
            panic!("stub resolver on {} panicked", self.addr);
        }
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// UDP on an ephemeral port, then TCP on the same one. Another process may hold that TCP
/// port already; then try again with a fresh UDP port.
fn bind_pair(ip: IpAddr) -> (UdpSocket, TcpListener) {
    let mut last = None;
    for _ in 0..50 {
        let udp = UdpSocket::bind(SocketAddr::new(ip, 0))
            .unwrap_or_else(|e| panic!("stub resolver cannot bind UDP on {ip}: {e}"));
        let addr = udp.local_addr().unwrap();
        match TcpListener::bind(addr) {
            Ok(tcp) => return (udp, tcp),
            Err(e) if e.kind() == ErrorKind::AddrInUse => last = Some(e),
            Err(e) => panic!("stub resolver cannot bind TCP on {addr}: {e}"),
        }
    }
    panic!("stub resolver found no port free for both UDP and TCP in 50 tries: {last:?}")
}

fn serve_udp(sock: &UdpSocket, state: &State) {
    let mut buf = [0u8; 65535];
    while !state.stop.load(Ordering::SeqCst) {
        let (n, peer) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            // ICMP errors from earlier replies surface here; they concern nobody now.
            Err(_) => continue,
        };
        let truncate = state.truncate_udp.load(Ordering::SeqCst);
        if let Some(reply) = answer(&buf[..n], state, "udp", truncate) {
            let _ = sock.send_to(&reply, peer);
        }
    }
}

fn serve_tcp(listener: &TcpListener, state: &Arc<State>, conns: &Mutex<Vec<JoinHandle<()>>>) {
    while !state.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let s = state.clone();
                let t = std::thread::spawn(move || serve_tcp_conn(stream, &s));
                conns.lock().unwrap().push(t);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
            // Typically EMFILE; back off rather than spin.
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// RFC 1035 4.2.2: each message is preceded by its length in two bytes; a client may send
/// several on one connection.
fn serve_tcp_conn(mut stream: TcpStream, state: &State) {
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    while !state.stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
        while pending.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([pending[0], pending[1]]));
            if pending.len() < 2 + len {
                break;
            }
            let msg: Vec<u8> = pending.drain(..2 + len).skip(2).collect();
            let Some(reply) = answer(&msg, state, "tcp", false) else {
                return;
            };
            let Ok(len) = u16::try_from(reply.len()) else {
                return;
            };
            let mut framed = len.to_be_bytes().to_vec();
            framed.extend_from_slice(&reply);
            if stream.write_all(&framed).is_err() {
                return;
            }
        }
    }
}

/// The reply to one query message, or `None` for something that is not a query.
fn answer(query: &[u8], state: &State, transport: &'static str, truncate: bool) -> Option<Vec<u8>> {
    let req = Message::from_vec(query).ok()?;
    if req.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut reply = Message::response(req.metadata.id, req.metadata.op_code);
    reply.metadata = Metadata::response_from_request(&req.metadata);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_available = true;
    if req.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        reply.set_edns(edns);
    }
    let mut rcode = ResponseCode::NoError;
    for q in &req.queries {
        let name = normalize(&q.name().to_ascii());
        let qtype = q.query_type();
        state
            .seen
            .lock()
            .unwrap()
            .push((name.clone(), qtype.to_string(), transport));
        reply.add_query(q.clone());
        let mut known = false;
        for (_, ip) in state.records.iter().filter(|(n, _)| *n == name) {
            known = true;
            let rdata = match (qtype, ip) {
                (RecordType::A, IpAddr::V4(v4)) => RData::A(A(*v4)),
                (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(*v6)),
                _ => continue,
            };
            if !truncate {
                reply.add_answer(Record::from_rdata(q.name().clone(), TTL, rdata));
            }
        }
        if !known {
            rcode = ResponseCode::NXDomain;
        }
    }
    reply.metadata.response_code = rcode;
    reply.metadata.truncation = truncate;
    Some(
        reply
            .to_vec()
            .unwrap_or_else(|e| panic!("stub resolver cannot encode its reply: {e}")),
    )
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hickory_proto::{
        op::Query,
        rr::{Name, RecordType},
    };

    use super::*;

    const GOOD4: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 99, 2));
    const GOOD4B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 99, 3));
    const GOOD6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

    fn stub() -> StubResolver {
        StubResolver::start(&[
            ("good.stub.test", GOOD4),
            ("Good.Stub.Test.", GOOD4B),
            ("good.stub.test", GOOD6),
            ("v6only.stub.test", GOOD6),
        ])
    }

    fn query(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = true;
        let name = Name::from_ascii(name).unwrap_or_else(|e| panic!("test name {name:?}: {e}"));
        m.add_query(Query::query(name, qtype));
        m.to_vec().expect("encode test query")
    }

    fn udp_ask(stub: &StubResolver, id: u16, name: &str, qtype: RecordType) -> Message {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        sock.send_to(&query(id, name, qtype), stub.addr())
            .unwrap_or_else(|e| panic!("send to stub {}: {e}", stub.addr()));
        let mut buf = [0u8; 4096];
        let (n, from) = sock
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("no UDP answer from the stub for {name} {qtype}: {e}"));
        assert_eq!(from, stub.addr(), "the answer comes from the stub's port");
        let reply = Message::from_vec(&buf[..n]).expect("stub reply parses");
        assert_eq!(reply.metadata.id, id, "reply id matches the query");
        assert_eq!(reply.metadata.message_type, MessageType::Response);
        reply
    }

    fn tcp_ask(conn: &mut TcpStream, id: u16, name: &str, qtype: RecordType) -> Message {
        let q = query(id, name, qtype);
        let mut framed = u16::try_from(q.len()).unwrap().to_be_bytes().to_vec();
        framed.extend_from_slice(&q);
        conn.write_all(&framed).expect("write TCP query");
        let mut len = [0u8; 2];
        conn.read_exact(&mut len)
            .unwrap_or_else(|e| panic!("no TCP answer length for {name}: {e}"));
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
        conn.read_exact(&mut body)
            .unwrap_or_else(|e| panic!("short TCP answer for {name}: {e}"));
        let reply = Message::from_vec(&body).expect("stub TCP reply parses");
        assert_eq!(reply.metadata.id, id, "reply id matches the query");
        reply
    }

    fn addrs(m: &Message) -> Vec<IpAddr> {
        m.answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                other => panic!("unexpected record in the answer: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn udp_a_query_gets_every_address_of_the_name() {
        let stub = stub();
        let reply = udp_ask(&stub, 0x1234, "good.stub.test", RecordType::A);
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert_eq!(addrs(&reply), [GOOD4, GOOD4B], "{reply:?}");
        assert!(reply.answers.iter().all(|r| r.ttl == TTL), "{reply:?}");
        assert!(!reply.metadata.truncation);
        assert_eq!(reply.queries.len(), 1, "the question is echoed");
        assert_eq!(
            stub.queries(),
            [("good.stub.test".to_owned(), "A".to_owned(), "udp")]
        );
    }

    #[test]
    fn udp_aaaa_query_and_case_insensitive_names() {
        let stub = stub();
        let reply = udp_ask(&stub, 7, "GOOD.stub.TEST.", RecordType::AAAA);
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert_eq!(addrs(&reply), [GOOD6], "{reply:?}");
        assert!(stub.saw("good.stub.test"), "{:?}", stub.queries());
        assert_eq!(stub.queries()[0].1, "AAAA");
    }

    #[test]
    fn known_name_of_another_type_is_nodata_and_unknown_is_nxdomain() {
        let stub = stub();
        let reply = udp_ask(&stub, 1, "v6only.stub.test", RecordType::A);
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert!(reply.answers.is_empty(), "{reply:?}");
        let reply = udp_ask(&stub, 2, "good.stub.test", RecordType::TXT);
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert!(reply.answers.is_empty(), "{reply:?}");
        let reply = udp_ask(&stub, 3, "nope.stub.test", RecordType::A);
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
        assert!(reply.answers.is_empty(), "{reply:?}");
        assert_eq!(
            stub.queries(),
            [
                ("v6only.stub.test".to_owned(), "A".to_owned(), "udp"),
                ("good.stub.test".to_owned(), "TXT".to_owned(), "udp"),
                ("nope.stub.test".to_owned(), "A".to_owned(), "udp"),
            ]
        );
    }

    #[test]
    fn tcp_on_the_same_port_answers_several_queries_per_connection() {
        let stub = stub();
        let mut conn = TcpStream::connect(stub.addr())
            .unwrap_or_else(|e| panic!("TCP connect to the stub on {}: {e}", stub.addr()));
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let a = tcp_ask(&mut conn, 10, "good.stub.test", RecordType::A);
        assert_eq!(addrs(&a), [GOOD4, GOOD4B], "{a:?}");
        let nx = tcp_ask(&mut conn, 11, "nope.stub.test", RecordType::AAAA);
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(
            stub.queries(),
            [
                ("good.stub.test".to_owned(), "A".to_owned(), "tcp"),
                ("nope.stub.test".to_owned(), "AAAA".to_owned(), "tcp"),
            ]
        );
    }

    #[test]
    fn truncate_mode_sends_udp_askers_to_tcp() {
        let stub = stub();
        stub.set_truncate_udp(true);
        let reply = udp_ask(&stub, 20, "good.stub.test", RecordType::A);
        assert!(reply.metadata.truncation, "TC must be set: {reply:?}");
        assert!(reply.answers.is_empty(), "{reply:?}");
        let mut conn = TcpStream::connect(stub.addr()).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let full = tcp_ask(&mut conn, 21, "good.stub.test", RecordType::A);
        assert!(!full.metadata.truncation, "{full:?}");
        assert_eq!(addrs(&full), [GOOD4, GOOD4B], "{full:?}");
        stub.set_truncate_udp(false);
        let reply = udp_ask(&stub, 22, "good.stub.test", RecordType::A);
        assert!(!reply.metadata.truncation, "{reply:?}");
        assert_eq!(addrs(&reply).len(), 2, "{reply:?}");
    }

    #[test]
    fn edns_queries_get_an_opt_record_back() {
        let stub = stub();
        let mut m = Message::query();
        m.metadata.id = 30;
        m.add_query(Query::query(
            Name::from_ascii("good.stub.test").unwrap(),
            RecordType::A,
        ));
        m.set_edns(Edns::new());
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        sock.send_to(&m.to_vec().unwrap(), stub.addr()).unwrap();
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("answer to an EDNS query");
        let reply = Message::from_vec(&buf[..n]).unwrap();
        assert!(reply.edns.is_some(), "{reply:?}");
        assert_eq!(addrs(&reply).len(), 2, "{reply:?}");
    }

    #[test]
    fn garbage_is_ignored_and_the_stub_keeps_serving() {
        let stub = stub();
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.send_to(b"\x00\x01garbage", stub.addr()).unwrap();
        let mut conn = TcpStream::connect(stub.addr()).unwrap();
        conn.write_all(b"\x00\x03abc").unwrap();
        let reply = udp_ask(&stub, 40, "good.stub.test", RecordType::A);
        assert_eq!(addrs(&reply).len(), 2, "{reply:?}");
        assert_eq!(stub.queries().len(), 1, "{:?}", stub.queries());
    }

    #[test]
    fn drop_releases_both_ports() {
        let stub = stub();
        let mut conn = TcpStream::connect(stub.addr()).unwrap();
        conn.write_all(b"\x00").unwrap();
        let addr = stub.addr();
        drop(stub);
        UdpSocket::bind(addr)
            .unwrap_or_else(|e| panic!("UDP {addr} still bound after the stub dropped: {e}"));
        TcpListener::bind(addr)
            .unwrap_or_else(|e| panic!("TCP {addr} still bound after the stub dropped: {e}"));
    }
}
