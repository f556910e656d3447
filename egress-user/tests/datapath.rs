//! The data path in-process, without root: accept → kernel record → sniff → MITM → policy →
//! secrets → upstream → audit, with the kernel's tables replaced by [`MemRecords`].
//!
//! Each test builds the shared state, registers one or two sandboxes in the registry, binds
//! real listeners on loopback and drives real TLS clients through them to an HTTPS origin
//! with a CA of its own. The kernel's part (rewriting the connect and recording where it
//! was going) is played by inserting the record the kernel would have written before the
//! client connects. The privileged end-to-end tests prove the kernel's part.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use egress_tests::origin::{tls_client_config, Origin, TestCa};
use egress_user::{
    audit::{Audit, AuditWriter, Sink},
    listen::{Listeners, Ports, Sockets},
    netns::Connector,
    policy::{self, PolicyFlags},
    records::{sock_record, MemRecords},
    state::{Registry, SandboxState, Shared, UpstreamTls},
    tls,
    upstream::Pool,
};
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpSocket;

const SECRET: &str = "sk-real-value-0123456789";
const PLACEHOLDER: &str = "EGRESS_SECRET_TOKEN";

/// Two sandboxes' policies: `a` may reach a.test (and s.test with the secret, p.test spliced),
/// `b` only b.test. Both may reach loopback, where the origin lives.
fn policy_file(dir: &Path) -> PathBuf {
    let secret = dir.join("token");
    std::fs::write(&secret, SECRET).unwrap();
    let p = dir.join("policy.toml");
    std::fs::write(
        &p,
        format!(
            r#"
[defaults]
private_ok = ["127.0.0.0/8"]

[sandbox.agent-a]
allow = ["a.test", "s.test", "t.test"]
passthrough = ["p.test"]

[sandbox.agent-a.secrets.{PLACEHOLDER}]
file = "{}"
hosts = ["s.test"]

[sandbox.agent-b]
allow = ["b.test"]
"#,
            secret.display()
        ),
    )
    .unwrap();
    p
}

/// Everything one test needs: the shared state, the listeners, the origin and its CA.
struct Harness {
    shared: Arc<Shared>,
    records: Arc<MemRecords>,
    listeners: Arc<Listeners>,
    writer: Option<AuditWriter>,
    audit_path: PathBuf,
    origin: Origin,
    origin_ca: TestCa,
    egress_ca_pem: String,
    _dir: tempfile::TempDir,
}

/// The sandboxes every harness registers: (kernel id, name in the policy file).
const SANDBOXES: [(u32, &str); 2] = [(7, "agent-a"), (9, "agent-b")];

impl Harness {
    async fn start() -> Harness {
        tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let origin_ca = TestCa::new("datapath origin CA");
        let origin_ca_path = dir.path().join("origin-ca.pem");
        origin_ca.write_pem(&origin_ca_path);
        let origin = Origin::start(
            "127.0.0.1:0",
            Some(origin_ca.leaf(&["a.test", "b.test", "s.test", "t.test", "p.test"])),
        );
        let ca = Arc::new(
            tls::ca::CertificateAuthority::load_or_create(&dir.path().join("conf")).unwrap(),
        );
        let egress_ca_pem = ca.cert_pem().to_owned();
        let leaves = Arc::new(tls::mint::LeafCache::new(ca, 64).unwrap());
        let upstream = tls::upstream::client_config(
            None,
            &[origin_ca_path],
            vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        )
        .unwrap();
        let audit_path = dir.path().join("audit.jsonl");
        let (audit, writer) = Audit::open(Sink::File {
            path: audit_path.clone(),
            max_bytes: 1 << 30,
            keep: 1,
        })
        .unwrap();
        let records = Arc::new(MemRecords::default());
        let shared = Arc::new(Shared {
            registry: Registry::default(),
            audit,
            leaves,
            records: records.clone(),
            upstream_tls: UpstreamTls::new(upstream),
            audit_query: false,
            metrics: Default::default(),
        });
        let file = policy_file(dir.path());
        for (id, name) in SANDBOXES {
            let live = policy::compile(Some(&file), Some(name), &PolicyFlags::default()).unwrap();
            let pool = Pool::new(&shared.upstream_tls, Connector::Here);
            let resolvers = egress_user::dns::upstream::Upstreams::new(vec![]);
            let sb = SandboxState::new(id, name.to_owned(), live, pool, resolvers);
            shared.registry.insert(Arc::new(sb)).unwrap();
        }
        let sockets = Sockets::bind(Ports::Ephemeral).unwrap();
        let listeners = Listeners::serve(sockets, &shared, None).unwrap();
        Harness {
            shared,
            records,
            listeners,
            writer: Some(writer),
            audit_path,
            origin,
            origin_ca,
            egress_ca_pem,
            _dir: dir,
        }
    }

    fn listen(&self) -> SocketAddr {
        self.listeners.addrs.proxy4.into()
    }

    /// A TCP connection to the proxy listener that the "kernel" recorded as sandbox `id`'s
    /// connect to the origin, or unrecorded with `id == None`.
    async fn connect(&self, id: Option<u32>) -> tokio::net::TcpStream {
        self.connect_to(id, self.origin.addr()).await
    }

    /// As [`Harness::connect`], recorded as a connect to `dst`.
    async fn connect_to(&self, id: Option<u32>, dst: SocketAddr) -> tokio::net::TcpStream {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let client = sock.local_addr().unwrap();
        if let Some(id) = id {
            let netns = egress_user::netns::socket_netns_cookie(&sock).unwrap();
            let rec = sock_record(id, dst, 4242, "agent-tool");
            self.records.insert_conn(netns, client, self.listen(), rec);
        }
        sock.connect(self.listen()).await.unwrap()
    }

    /// One HTTPS request from sandbox `id` for `https://{sni}{path}` through the proxy, over
    /// HTTP/2 or HTTP/1.1, with optional extra headers. Returns status and body.
    async fn https(
        &self,
        id: u32,
        sni: &str,
        path: &str,
        h2: bool,
        headers: &[(&str, &str)],
    ) -> (StatusCode, String) {
        self.https_to(self.origin.addr(), id, sni, path, h2, headers)
            .await
    }

    /// As [`Harness::https`], to the origin at `dst`.
    async fn https_to(
        &self,
        dst: SocketAddr,
        id: u32,
        sni: &str,
        path: &str,
        h2: bool,
        headers: &[(&str, &str)],
    ) -> (StatusCode, String) {
        let tcp = self.connect_to(Some(id), dst).await;
        let tls = self
            .tls(tcp, sni, if h2 { b"h2" } else { b"http/1.1" })
            .await;
        let mut req = Request::get(format!("https://{sni}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if !h2 {
            req = req.header("host", sni);
        }
        let req = req.body(Empty::<Bytes>::new()).unwrap();
        let io = TokioIo::new(tls);
        let resp = if h2 {
            let (mut s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(c);
            s.send_request(req).await.unwrap()
        } else {
            let (mut s, c) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(c);
            s.send_request(req).await.unwrap()
        };
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// A TLS client, trusting egress's CA, on `tcp` as `sni`, offering one ALPN protocol.
    async fn tls(
        &self,
        tcp: tokio::net::TcpStream,
        sni: &str,
        alpn: &[u8],
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let mut cfg = (*tls_client_config(&self.egress_ca_pem)).clone();
        cfg.alpn_protocols = vec![alpn.to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(sni.to_owned().try_into().unwrap(), tcp)
            .await
            .unwrap_or_else(|e| panic!("TLS to the proxy as {sni}: {e}"))
    }

    /// Drains every sandbox's tasks and closes the audit; returns its records.
    async fn finish(mut self) -> Vec<Value> {
        for sb in self.shared.registry.all() {
            sb.drain(Duration::from_secs(5)).await;
        }
        let writer = self.writer.take().unwrap();
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.audit.close(writer))
            .await
            .unwrap();
        std::fs::read_to_string(&self.audit_path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn requests(audit: &[Value]) -> Vec<&Value> {
    audit.iter().filter(|r| r["event"] == "request").collect()
}

fn connections(audit: &[Value]) -> Vec<&Value> {
    audit
        .iter()
        .filter(|r| r["event"] == "connection")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_connection_is_judged_and_audited_by_its_own_sandbox() {
    let h = Harness::start().await;
    let (a_status, a_body) = h.https(7, "a.test", "/hello", false, &[]).await;
    assert_eq!(a_status, StatusCode::OK, "{a_body}");
    assert_eq!(a_body, "hello from a.test");
    // The same host from the other sandbox: b's policy does not allow it.
    let (b_status, b_body) = h.https(9, "a.test", "/hello", false, &[]).await;
    assert_eq!(b_status, StatusCode::FORBIDDEN, "{b_body}");
    assert!(b_body.contains("egress_denied"), "{b_body}");
    // And b's own host works for b but not for a.
    assert_eq!(
        h.https(9, "b.test", "/hello", true, &[]).await.0,
        StatusCode::OK
    );
    assert_eq!(
        h.https(7, "b.test", "/hello", true, &[]).await.0,
        StatusCode::FORBIDDEN
    );
    let counts: Vec<(u64, u64)> = SANDBOXES
        .iter()
        .map(|(id, _)| {
            let c = &h.shared.registry.get(*id).unwrap().counters.requests;
            (
                c.get(egress_user::audit::Decision::Allow),
                c.get(egress_user::audit::Decision::Deny),
            )
        })
        .collect();
    let audit = h.finish().await;
    let got: Vec<(String, String, String, String)> = requests(&audit)
        .iter()
        .map(|r| {
            (
                r["sandbox"].as_str().unwrap().to_owned(),
                r["host"].as_str().unwrap().to_owned(),
                r["decision"].as_str().unwrap().to_owned(),
                r["comm"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want = [
        ("agent-a", "a.test", "allow"),
        ("agent-b", "a.test", "deny"),
        ("agent-b", "b.test", "allow"),
        ("agent-a", "b.test", "deny"),
    ];
    assert_eq!(got.len(), want.len(), "{audit:#?}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!((g.0.as_str(), g.1.as_str(), g.2.as_str()), w, "{audit:#?}");
        assert_eq!(g.3, "agent-tool", "the comm comes from the kernel record");
    }
    assert_eq!(counts, vec![(1, 1), (1, 1)], "per-sandbox counters");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_reach_the_origin_with_the_right_sni() {
    let h = Harness::start().await;
    for h2 in [false, true] {
        let (s, body) = h.https(7, "a.test", "/hello", h2, &[]).await;
        assert_eq!((s, body.as_str()), (StatusCode::OK, "hello from a.test"));
    }
    let seen = h.origin.requests();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert!(
        seen.iter().all(|r| r.sni.as_deref() == Some("a.test")),
        "{seen:#?}"
    );
    assert!(
        seen.iter().all(|r| r.path_and_query == "/hello"),
        "{seen:#?}"
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_is_swapped_toward_its_host_and_refused_elsewhere() {
    let h = Harness::start().await;
    let auth = format!("Bearer {PLACEHOLDER}");
    let (s, body) = h
        .https(7, "s.test", "/hello", false, &[("authorization", &auth)])
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    // Toward another allowed host the placeholder is refused, and never forwarded.
    let (s, body) = h
        .https(7, "t.test", "/hello", false, &[("authorization", &auth)])
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    // So is the real value.
    let real = format!("Bearer {SECRET}");
    let (s, _) = h
        .https(7, "t.test", "/hello", true, &[("authorization", &real)])
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let seen = h.origin.requests();
    assert_eq!(
        seen.len(),
        1,
        "only the authorized request got through: {seen:#?}"
    );
    let got = seen[0]
        .headers
        .iter()
        .find(|(k, _)| k == "authorization")
        .map(|(_, v)| v.clone());
    assert_eq!(
        got.as_deref(),
        Some(real.as_str()),
        "the origin sees the real value"
    );
    let audit = h.finish().await;
    let text = serde_json::to_string(&audit).unwrap();
    assert!(
        !text.contains(SECRET),
        "the secret never reaches the audit log"
    );
    let reqs = requests(&audit);
    assert_eq!(reqs.len(), 3);
    assert_eq!(reqs[1]["decision"], "deny");
    assert_eq!(reqs[2]["decision"], "deny");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passthrough_host_is_spliced_with_the_origins_certificate() {
    let h = Harness::start().await;
    let tcp = h.connect(Some(7)).await;
    // Trusting only the origin's CA: the egress CA would not do, so this handshake proves
    // the bytes were spliced to the origin, not intercepted.
    let mut cfg = (*tls_client_config(&h.origin_ca.cert_pem())).clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("p.test".try_into().unwrap(), tcp)
        .await
        .expect("TLS straight to the origin");
    let (mut s, c) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(c);
    let resp = s
        .send_request(
            Request::get("/hello")
                .header("host", "p.test")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    drop(resp);
    drop(s);
    let audit = h.finish().await;
    let conns: Vec<&Value> = audit
        .iter()
        .filter(|r| r["event"] == "connection")
        .collect();
    assert_eq!(conns.len(), 1, "{audit:#?}");
    assert_eq!(conns[0]["decision"], "passthrough");
    assert_eq!(conns[0]["sandbox"], "agent-a");
    assert!(
        requests(&audit).is_empty(),
        "nothing was decrypted: {audit:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_a_kernel_record_is_closed_unserved() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let h = Harness::start().await;
    let mut tcp = h.connect(None).await;
    let _ = tcp
        .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf))
        .await
        .expect("the proxy closes the connection")
        .unwrap_or(0);
    assert_eq!(
        n,
        0,
        "nothing is served: {:?}",
        String::from_utf8_lossy(&buf)
    );
    let stats = h.listeners.stats.clone();
    assert_eq!(
        stats.no_orig_dst.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(h.records.pending_conns(), 0);
    assert!(h.origin.requests().is_empty());
    let client = tcp.local_addr().unwrap().to_string();
    let audit = h.finish().await;
    let conns = connections(&audit);
    assert_eq!(conns.len(), 1, "one connection record: {audit:#?}");
    let c = conns[0];
    assert_eq!(c["decision"], "deny");
    assert_eq!(c["client"], client.as_str());
    assert!(
        c["reason"]
            .as_str()
            .unwrap()
            .starts_with("no original destination recorded"),
        "{c}"
    );
    // Nothing else is known about it.
    assert_eq!(
        (&c["sandbox"], &c["pid"], &c["comm"], &c["orig_dst"]),
        (
            &Value::from(""),
            &Value::from(0),
            &Value::from(""),
            &Value::from("")
        ),
        "{c}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_naming_an_unregistered_sandbox_is_refused() {
    let h = Harness::start().await;
    let removed = h.shared.registry.remove(9).expect("b was registered");
    removed.drain(Duration::from_secs(1)).await;
    let tcp = h.connect(Some(9)).await;
    let mut cfg = (*tls_client_config(&h.egress_ca_pem)).clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let r = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("b.test".try_into().unwrap(), tcp)
        .await;
    assert!(r.is_err(), "a removed sandbox's connection is not served");
    assert_eq!(
        h.listeners
            .stats
            .unknown_sandbox
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        h.shared.registry.name(9),
        "agent-b",
        "its name is remembered"
    );
    let h_origin = h.origin.addr();
    let audit = h.finish().await;
    let conns = connections(&audit);
    assert_eq!(conns.len(), 1, "one connection record: {audit:#?}");
    let c = conns[0];
    assert_eq!(c["decision"], "deny");
    assert_eq!(c["sandbox"], "agent-b", "named by the id in the record");
    assert_eq!(
        (&c["pid"], &c["comm"]),
        (&Value::from(4242), &Value::from("agent-tool"))
    );
    assert_eq!(c["orig_dst"], h_origin.to_string());
    assert!(
        c["reason"].as_str().unwrap().contains("not registered"),
        "{c}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_before_its_first_byte_is_audited() {
    let h = Harness::start().await;
    let tcp = h.connect(Some(7)).await;
    let client = tcp.local_addr().unwrap().to_string();
    drop(tcp);
    // And one reset rather than closed (SO_LINGER 0).
    let tcp = h.connect(Some(7)).await;
    let reset_client = tcp.local_addr().unwrap().to_string();
    // A zero linger resets at once on drop; it never blocks, which is what the
    // deprecation warns about.
    #[allow(deprecated)]
    tcp.set_linger(Some(Duration::ZERO)).unwrap();
    drop(tcp);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let origin = h.origin.addr().to_string();
    let sb = h.shared.registry.get(7).unwrap();
    while sb.counters.connections.total() < 2 {
        assert!(std::time::Instant::now() < deadline, "not recorded in 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let audit = h.finish().await;
    let conns = connections(&audit);
    assert_eq!(conns.len(), 2, "{audit:#?}");
    let mut clients: Vec<&str> = conns
        .iter()
        .map(|c| c["client"].as_str().unwrap())
        .collect();
    clients.sort();
    let mut want = vec![client.as_str(), reset_client.as_str()];
    want.sort();
    assert_eq!(clients, want);
    for c in conns {
        assert_eq!(c["decision"], "error", "{c}");
        assert_eq!(c["reason"], "closed by the client before its first byte");
        assert_eq!(c["sandbox"], "agent-a");
        assert_eq!(c["pid"], 4242);
        assert_eq!(c["comm"], "agent-tool");
        assert_eq!(c["orig_dst"], origin.as_str());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_trickled_byte_by_byte_is_cut_off_at_the_sniff_deadline() {
    use egress_user::proxy::SNIFF_TIMEOUT;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let h = Harness::start().await;
    let mut tcp = h.connect(Some(SANDBOXES[0].0)).await;
    let start = std::time::Instant::now();
    // A record header and handshake header announcing a 508-byte hello, then its bytes one
    // every 500 ms: every read arrives well within the sniff timeout, the whole hello never
    // does (TLS slowloris).
    let mut closed_after = None;
    let head = [0x16u8, 3, 1, 2, 0, 1, 0, 1, 0xfc];
    for b in head.into_iter().chain(std::iter::repeat(0)) {
        if tcp.write_all(&[b]).await.is_err() {
            closed_after = Some(start.elapsed());
            break;
        }
        let mut buf = [0u8; 64];
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(500), tcp.read(&mut buf)).await {
            assert!(
                !matches!(r, Ok(n) if n > 0),
                "egress answered a partial hello"
            );
            closed_after = Some(start.elapsed());
            break;
        }
        if start.elapsed() > SNIFF_TIMEOUT * 3 {
            break;
        }
    }
    let closed = closed_after.expect("still open after three sniff timeouts");
    assert!(
        closed >= SNIFF_TIMEOUT && closed < SNIFF_TIMEOUT + Duration::from_secs(3),
        "closed after {closed:?}, the sniff timeout is {SNIFF_TIMEOUT:?}"
    );
    let audit = h.finish().await;
    let conns = connections(&audit);
    assert_eq!(conns.len(), 1, "{audit:#?}");
    assert_eq!(conns[0]["decision"], "deny");
    assert_eq!(
        conns[0]["reason"],
        "no TLS ClientHello or HTTP request within the sniff timeout"
    );
}

/// A request the client gives up on after egress forwarded it (an HTTP/2 reset, or the
/// connection closed) still leaves its one audit record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cancelled_after_it_was_forwarded_is_audited_once() {
    let h = Harness::start().await;
    for h2 in [true, false] {
        let before = h.origin.request_count();
        let tcp = h.connect(Some(7)).await;
        let mut cfg = (*tls_client_config(&h.egress_ca_pem)).clone();
        cfg.alpn_protocols = vec![if h2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect("a.test".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let req = Request::get("https://a.test/hold")
            .header("host", "a.test")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let io = TokioIo::new(tls);
        let pending = if h2 {
            let (mut s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            let conn = tokio::spawn(c);
            let resp = tokio::spawn(async move { s.send_request(req).await });
            (resp, conn)
        } else {
            let (mut s, c) = hyper::client::conn::http1::handshake(io).await.unwrap();
            let conn = tokio::spawn(c);
            let resp = tokio::spawn(async move { s.send_request(req).await });
            (resp, conn)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while h.origin.request_count() == before {
            assert!(
                std::time::Instant::now() < deadline,
                "/hold never reached the origin"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Over HTTP/2 dropping the response future resets the stream; over HTTP/1.1 the
        // connection goes.
        pending.0.abort();
        if !h2 {
            pending.1.abort();
        }
        let _ = pending.0.await;
        if !h2 {
            let _ = pending.1.await;
        }
    }
    h.origin.release();
    let audit = h.finish().await;
    let reqs = requests(&audit);
    assert_eq!(
        reqs.len(),
        2,
        "one record per cancelled request: {audit:#?}"
    );
    for r in reqs {
        assert_eq!(r["path"], "/hold", "{r:#}");
        assert_eq!(r["decision"], "allow", "{r:#}");
        assert_eq!(r["rule"], "a.test", "{r:#}");
        assert_eq!(
            r["error"],
            "ended before the response: the client went away or the connection was cut off",
            "{r:#}"
        );
    }
}

/// Counts the origin's completed TLS handshakes for `name`.
fn handshakes(origin: &Origin, name: &str) -> usize {
    origin
        .handshakes()
        .iter()
        .filter(|s| s.as_deref() == Some(name))
        .count()
}

/// The upstream connection of an allowed name is made while the client is still in its
/// TLS handshake, not after its first request; the first request then uses it, and one
/// left unclaimed serves the next client. A denied name gets no upstream connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_name_is_dialed_during_the_client_handshake_and_the_connection_is_used() {
    use tokio::io::AsyncWriteExt as _;
    let h = Harness::start().await;
    // An origin of its own, with a certificate for t.test alone: no connection to it can
    // be shared with another name.
    let other = Origin::start("127.0.0.1:0", Some(h.origin_ca.leaf(&["t.test"])));
    // A client that sends its ClientHello for t.test and nothing more: the handshake with
    // egress never completes.
    let mut stalled = h.connect_to(Some(7), other.addr()).await;
    let mut hello = Vec::new();
    rustls::ClientConnection::new(
        tls_client_config(&h.egress_ca_pem),
        "t.test".try_into().unwrap(),
    )
    .unwrap()
    .write_tls(&mut hello)
    .unwrap();
    stalled.write_all(&hello).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while handshakes(&other, "t.test") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no upstream handshake for t.test while its client was in its handshake: {:?}",
            other.handshakes()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(stalled);

    // The unclaimed connection joins the pool once egress sees the client go, and the
    // next client's request rides on it.
    let sb = h.shared.registry.get(7).unwrap();
    let key = egress_user::upstream::PoolKey::tls(other.addr(), Some("t.test"));
    while !sb.pool.has_ready(&key) {
        assert!(
            std::time::Instant::now() < deadline,
            "the connection dialed for the stalled client never joined the pool"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (status, _) = h
        .https_to(other.addr(), 7, "t.test", "/hello", false, &[])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(handshakes(&other, "t.test"), 1, "{:?}", other.handshakes());

    // A first request claims the connection dialed for it rather than making another.
    let (status, _) = h.https(7, "a.test", "/hello", true, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        handshakes(&h.origin, "a.test"),
        1,
        "{:?}",
        h.origin.handshakes()
    );

    // b.test is not agent-a's: a 403, and nothing dialed toward it.
    let (status, _) = h.https(7, "b.test", "/hello", true, &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = h.https(7, "a.test", "/hello", true, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        handshakes(&h.origin, "b.test"),
        0,
        "{:?}",
        h.origin.handshakes()
    );
    h.finish().await;
}

/// A new name shares an HTTP/2 upstream connection to the same destination whose
/// certificate covers it, with no dial of its own; a 421 from the upstream sends the
/// request again on a connection of its own; a certificate that does not cover the name
/// is never shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_name_shares_an_http2_upstream_connection_its_certificate_covers() {
    let h = Harness::start().await;
    // The origin's one certificate covers a.test, t.test and s.test.
    let (status, _) = h.https(7, "a.test", "/hello", true, &[]).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = h.https(7, "t.test", "/hello", false, &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "hello from t.test")
    );
    assert_eq!(
        h.origin.handshakes(),
        [Some("a.test".to_owned())],
        "t.test dialed a connection of its own"
    );
    let seen = h.origin.requests();
    assert_eq!(seen[1].host, "t.test", "{seen:#?}");
    assert_eq!(seen[1].sni.as_deref(), Some("a.test"), "{seen:#?}");

    // An upstream that serves s.test only on its own connection answers 421 on the shared
    // one; the client sees the answer from its own.
    let (status, body) = h.https(7, "s.test", "/own-connection", true, &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "s.test on its own")
    );
    let tries: Vec<_> = h
        .origin
        .requests()
        .into_iter()
        .filter(|r| r.path_and_query == "/own-connection")
        .map(|r| r.sni)
        .collect();
    assert_eq!(tries.len(), 2, "{tries:?}");
    assert_ne!(tries[0].as_deref(), Some("s.test"), "{tries:?}");
    assert_eq!(tries[1].as_deref(), Some("s.test"), "{tries:?}");
    assert_eq!(handshakes(&h.origin, "s.test"), 1);

    // Another destination, whose certificate names t.test alone: a.test is not carried on
    // its connection, and its own dial fails verification.
    let other = Origin::start("127.0.0.1:0", Some(h.origin_ca.leaf(&["t.test"])));
    let (status, _) = h
        .https_to(other.addr(), 7, "t.test", "/hello", true, &[])
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = h
        .https_to(other.addr(), 7, "a.test", "/hello", true, &[])
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(
        other.requests().iter().all(|r| r.host != "a.test"),
        "{:#?}",
        other.requests()
    );
    h.finish().await;
}

/// One HPACK representation as sent (RFC 7541 §6).
#[derive(Debug, PartialEq)]
enum Field {
    /// A whole field from the tables, by its index.
    Indexed(u64),
    /// A literal added to the dynamic table; each literal names its field's name by table
    /// index, 0 for a literal name.
    Incremental(u64),
    WithoutIndexing(u64),
    NeverIndexed(u64),
    /// A dynamic table size update, with the new size.
    SizeUpdate(u64),
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1), from `b[*i]` on.
fn hpack_int(b: &[u8], i: &mut usize, n: u32) -> u64 {
    let mask = (1u64 << n) - 1;
    let mut v = u64::from(b[*i]) & mask;
    *i += 1;
    if v == mask {
        let mut shift = 0;
        loop {
            let byte = b[*i];
            *i += 1;
            v += u64::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
    }
    v
}

/// The fields of one header block, each with its representation (RFC 7541 §6); string
/// contents are skipped.
fn hpack_fields(b: &[u8]) -> Vec<Field> {
    let skip_string = |i: &mut usize| {
        let len = hpack_int(b, i, 7) as usize;
        *i += len;
    };
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let first = b[i];
        let field = if first & 0x80 != 0 {
            Field::Indexed(hpack_int(b, &mut i, 7))
        } else if first & 0xc0 == 0x40 {
            Field::Incremental(hpack_int(b, &mut i, 6))
        } else if first & 0xe0 == 0x20 {
            out.push(Field::SizeUpdate(hpack_int(b, &mut i, 5)));
            continue;
        } else if first & 0xf0 == 0x10 {
            Field::NeverIndexed(hpack_int(b, &mut i, 4))
        } else {
            Field::WithoutIndexing(hpack_int(b, &mut i, 4))
        };
        if let Field::Incremental(n) | Field::WithoutIndexing(n) | Field::NeverIndexed(n) = field {
            if n == 0 {
                skip_string(&mut i);
            }
            skip_string(&mut i);
        }
        out.push(field);
    }
    out
}

/// Toward an HTTP/2 client the origin's `Date` goes out as a never-indexed literal, so that
/// its changing values do not pile up in the connection's HPACK table (see
/// `never_index_date`). Read off the wire: two requests on one connection, raw frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_response_date_is_sent_as_a_never_indexed_literal() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const HEADERS: u8 = 0x1;
    const SETTINGS: u8 = 0x4;
    const DATE: u64 = 33; // `date` in HPACK's static table
    let h = Harness::start().await;
    let tcp = h.connect(Some(7)).await;
    let mut tls = h.tls(tcp, "a.test", b"h2").await;
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    };
    // GET https://a.test/hello: :method GET and :scheme https from the static table,
    // :path and :authority as literals that are not indexed.
    let mut block = vec![0x82, 0x87, 0x04, 6];
    block.extend(b"/hello");
    block.extend([0x01, 6]);
    block.extend(b"a.test");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    for stream in [1, 3] {
        // END_STREAM | END_HEADERS
        out.extend(frame(HEADERS, 0x5, stream, &block));
    }
    tls.write_all(&out).await.unwrap();

    let mut blocks = Vec::new();
    let read = async {
        while blocks.len() < 2 {
            let mut head = [0u8; 9];
            tls.read_exact(&mut head).await.unwrap();
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            tls.read_exact(&mut payload).await.unwrap();
            match head[3] {
                HEADERS => {
                    assert_eq!(head[4] & 0x4, 0x4, "one HEADERS frame, no CONTINUATION");
                    assert_eq!(head[4] & 0x28, 0, "no padding or priority");
                    blocks.push(payload);
                }
                SETTINGS if head[4] & 0x1 == 0 => {
                    tls.write_all(&frame(SETTINGS, 0x1, 0, &[])).await.unwrap();
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("two responses within 10 s");
    for (n, block) in blocks.iter().enumerate() {
        let fields = hpack_fields(block);
        assert_eq!(fields[0], Field::Indexed(8), "response {n}: :status 200");
        assert!(
            fields.contains(&Field::NeverIndexed(DATE)),
            "response {n}: date is not a never-indexed literal: {fields:?}"
        );
    }
    drop(tls);
    h.finish().await;
}
