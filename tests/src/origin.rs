//! A fake upstream origin for the end-to-end tests of the TLS interceptor.
//!
//! The interceptor terminates the client's TLS and opens its own TLS connection to the real
//! destination, verifying it against `--upstream-ca`. This module owns both ends of that
//! second hop for the tests: a throwaway CA minted at runtime ([`TestCa`]) and an HTTPS
//! server ([`Origin`]) that answers a handful of routes exercising what proxies get wrong
//! (streaming, large bodies, upgrades, status codes) and records what it saw, SNI and TCP
//! peer included, so a test can assert on what actually reached the origin rather than on
//! what the client believes it sent. `/hold` answers only once the test calls
//! [`Origin::release`]: a request kept in flight for as long as the test needs.
//!
//! Tests are plain `#[test]` functions: the origin runs its own runtime on its own thread
//! and is torn down by `Drop`.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    thread::JoinHandle,
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::{header, HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt as _, Empty, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::{crypto::CryptoProvider, ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::{oneshot, Notify},
};
use tokio_rustls::TlsAcceptor;

use crate::TempDir;
use tokio_tungstenite::{
    tungstenite::{handshake::derive_accept_key, protocol::Role},
    WebSocketStream,
};

/// Number of events `/sse` sends, and the gap between them. The gap is long enough that a
/// proxy which buffers the stream shows up as events arriving together.
const SSE_EVENTS: u32 = 5;
const SSE_GAP: Duration = Duration::from_millis(200);

/// Frame size for `/bytes`; one shared zeroed buffer backs every frame so that a 1 GiB
/// response costs no allocation.
const ZERO_CHUNK: usize = 64 * 1024;
static ZEROS: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

/// The certificate chain and key an origin presents.
pub type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// The ring provider, also installed as the process default so that any other rustls user in
/// the test process agrees with it. Configs here name it explicitly so that they never depend
/// on which test happened to install a default first.
fn provider() -> Arc<CryptoProvider> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Arc::new(rustls::crypto::ring::default_provider())
}

fn p256_key() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .unwrap_or_else(|e| panic!("generating a P-256 test key failed: {e}"))
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "egress tests");
    dn
}

/// A certificate authority minted for one test run. Its certificate goes to egress as
/// `--upstream-ca`; its leaves go to [`Origin::start`].
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    /// A fresh self-signed ECDSA P-256 CA whose subject CN is `name`.
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, p256_key())
            .unwrap_or_else(|e| panic!("self-signing test CA {name:?} failed: {e}"));
        TestCa { issuer }
    }

    /// The CA certificate, PEM-encoded.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA certificate to `path` as PEM, mode 0644: egress may read it after
    /// dropping privileges, so the mode must not depend on the test's umask.
    pub fn write_pem(&self, path: &Path) {
        std::fs::write(path, self.cert_pem())
            .unwrap_or_else(|e| panic!("writing test CA to {}: {e}", path.display()));
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .unwrap_or_else(|e| panic!("chmod 0644 {}: {e}", path.display()));
    }

    /// A server leaf for `names`, signed by this CA. Each name is a DNS name or an IP
    /// literal (which becomes an IP SAN). The chain holds the leaf only: the CA is the trust
    /// anchor, and a real origin does not send its root either.
    pub fn leaf(&self, names: &[&str]) -> Identity {
        assert!(!names.is_empty(), "a test leaf needs at least one name");
        let sans: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(sans)
            .unwrap_or_else(|e| panic!("test leaf names {names:?} are not valid SANs: {e}"));
        params.distinguished_name = common_name(names[0]);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = p256_key();
        let cert = params
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| panic!("signing test leaf for {names:?} failed: {e}"));
        let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        (vec![cert.der().clone()], key)
    }
}

/// A leaf for `names` from a throwaway CA that nobody trusts: what an origin looks like when
/// it is not the one egress was told to expect.
pub fn self_signed_untrusted(names: &[&str]) -> Identity {
    TestCa::new("egress tests untrusted CA").leaf(names)
}

/// A rustls client config that trusts only the CA in `ca_pem`, with no ALPN, for tests that
/// talk TLS to something directly.
pub fn tls_client_config(ca_pem: &str) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.unwrap_or_else(|e| panic!("CA PEM does not parse: {e}"));
        roots
            .add(cert)
            .unwrap_or_else(|e| panic!("CA certificate is not a usable trust anchor: {e}"));
    }
    assert!(!roots.is_empty(), "CA PEM holds no certificate");
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("ring provider rejects the default TLS versions: {e}"))
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// One request as the origin received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenRequest {
    pub method: String,
    pub path_and_query: String,
    /// `"HTTP/1.1"`, `"HTTP/2.0"`, …
    pub version: String,
    /// The `Host` header, else the HTTP/2 `:authority`; empty when there was neither.
    pub host: String,
    /// In arrival order; values that are not UTF-8 are converted lossily.
    pub headers: Vec<(String, String)>,
    /// Request body bytes read so far. Final once the response has been fully read: the
    /// origin streams `/echo` rather than buffering it, so it counts as it goes.
    pub body_len: usize,
    /// The SNI of the TLS connection that carried the request; `None` over plain HTTP or when
    /// the client sent none (as for IP literals).
    pub sni: Option<String>,
    /// The TCP peer of the connection that carried the request: who actually connected (for
    /// a proxy, the address its upstream connection left from).
    pub peer: SocketAddr,
}

/// What the origin has seen, shared between its connections and the test.
#[derive(Default)]
struct Log {
    requests: Mutex<Vec<SeenRequest>>,
    /// The SNI of every TLS handshake that completed, in order.
    handshakes: Mutex<Vec<Option<String>>>,
    tls_failures: Mutex<Vec<String>>,
    /// Static content by path: a package index, a registry's documents and archives
    /// ([`Origin::serve_file`]).
    files: Mutex<HashMap<String, (String, Bytes)>>,
    /// `/hold` answers once this is set ([`Origin::release`]).
    released: AtomicBool,
    release: Notify,
}

impl Log {
    fn push(&self, seen: SeenRequest) -> usize {
        let mut requests = self.requests.lock().unwrap();
        requests.push(seen);
        requests.len() - 1
    }

    fn add_body(&self, idx: usize, n: usize) {
        self.requests.lock().unwrap()[idx].body_len += n;
    }

    async fn released(&self) {
        loop {
            // Created before the check: a release between the check and the await still
            // wakes it.
            let notified = self.release.notified();
            if self.released.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }
}

/// An HTTP origin on a loopback address, HTTPS when given an [`Identity`]. It runs on its own
/// multi-thread runtime on a background thread; dropping it closes the listener and every
/// connection and joins that thread.
pub struct Origin {
    addr: SocketAddr,
    log: Arc<Log>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Origin {
    /// Binds `addr` (port 0 picks one; read it back with [`Origin::addr`]) and starts serving.
    /// With TLS, ALPN offers `h2` and `http/1.1`; without, it speaks HTTP/1.1.
    pub fn start(addr: &str, tls: Option<Identity>) -> Origin {
        let acceptor = tls.map(|(chain, key)| {
            let mut config = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap_or_else(|e| panic!("ring provider rejects the default TLS versions: {e}"))
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap_or_else(|e| panic!("origin certificate and key are not usable: {e}"));
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            TlsAcceptor::from(Arc::new(config))
        });

        // Bind here rather than on the runtime so that a bind failure panics in the test
        // that asked for it, and the real port is known before `start` returns.
        let listener = std::net::TcpListener::bind(addr)
            .unwrap_or_else(|e| panic!("origin cannot bind {addr}: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("origin listener has no local address: {e}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("origin listener cannot be made nonblocking: {e}"));

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("origin-worker")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("origin runtime: {e}"));

        let log = Arc::new(Log::default());
        let (stop, stopped) = oneshot::channel();
        let serve_log = log.clone();
        let thread = std::thread::Builder::new()
            .name(format!("origin-{addr}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener)
                        .unwrap_or_else(|e| panic!("origin listener: {e}"));
                    tokio::select! {
                        () = accept_loop(listener, acceptor, serve_log) => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime outside any async context cancels every connection
                // task and joins the workers, so no socket outlives the `Origin`.
                drop(runtime);
            })
            .unwrap_or_else(|e| panic!("spawning the origin thread: {e}"));

        Origin {
            addr,
            log,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.log.requests.lock().unwrap().clone()
    }

    /// How many requests arrived so far (without copying them).
    pub fn request_count(&self) -> usize {
        self.log.requests.lock().unwrap().len()
    }

    /// Lets every `/hold` request, waiting or still to come, answer.
    pub fn release(&self) {
        self.log.released.store(true, Ordering::SeqCst);
        self.log.release.notify_waiters();
    }

    /// The server names of the TLS handshakes completed so far (`None` without SNI): one per
    /// connection a client made, whether or not it sent a request on it.
    pub fn handshakes(&self) -> Vec<Option<String>> {
        self.log.handshakes.lock().unwrap().clone()
    }

    /// Serves `body` for `GET path` and its length for `HEAD path` (the path alone: any query
    /// is ignored) from now on, with
    /// `content_type`. Static content a client fetches: a package index, a registry's
    /// documents, the archives they point to.
    pub fn serve_file(&self, path: &str, content_type: &str, body: impl Into<Bytes>) {
        self.log
            .files
            .lock()
            .unwrap()
            .insert(path.to_owned(), (content_type.to_owned(), body.into()));
    }

    /// TLS handshakes that failed, as rustls described them. Lets a test tell "egress refused
    /// the origin's certificate" apart from "egress never connected".
    pub fn tls_failures(&self) -> Vec<String> {
        self.log.tls_failures.lock().unwrap().clone()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // A second panic while unwinding would abort and hide the test's own message.
            if thread.join().is_err() && !std::thread::panicking() {
                panic!("origin on {} panicked", self.addr);
            }
        }
    }
}

async fn accept_loop(listener: TcpListener, tls: Option<TlsAcceptor>, log: Arc<Log>) {
    let http = auto::Builder::new(TokioExecutor::new());
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(_) => {
                // Typically EMFILE; back off rather than spin until a descriptor frees up.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (http, tls, log) = (http.clone(), tls.clone(), log.clone());
        tokio::spawn(async move {
            match tls {
                None => serve_connection(http, tcp, None, peer, log).await,
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(stream) => {
                        let sni = stream.get_ref().1.server_name().map(str::to_owned);
                        log.handshakes.lock().unwrap().push(sni.clone());
                        serve_connection(http, stream, sni, peer, log).await;
                    }
                    Err(e) => log.tls_failures.lock().unwrap().push(e.to_string()),
                },
            }
        });
    }
}

async fn serve_connection<S>(
    http: auto::Builder<TokioExecutor>,
    stream: S,
    sni: Option<String>,
    peer: SocketAddr,
    log: Arc<Log>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let (sni, log) = (sni.clone(), log.clone());
        async move { Ok::<_, Infallible>(route(req, sni, peer, &log).await) }
    });
    // The peer going away mid-request is routine for a test origin, not an error to report.
    let _ = http
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await;
}

type ResBody = UnsyncBoxBody<Bytes, hyper::Error>;

async fn route(
    mut req: Request<Incoming>,
    sni: Option<String>,
    peer: SocketAddr,
    log: &Arc<Log>,
) -> Response<ResBody> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    // Whether the request names the server its connection was opened for.
    let own_connection = sni.as_deref() == Some(host.split(':').next().unwrap_or_default());
    let idx = log.push(SeenRequest {
        method: req.method().to_string(),
        path_and_query: req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_owned(), |p| p.to_string()),
        version: format!("{:?}", req.version()),
        host: host.clone(),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| {
                let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                (k.as_str().to_owned(), v)
            })
            .collect(),
        body_len: 0,
        sni,
        peer,
    });

    // These two consume the request themselves: the upgrade needs the request, and echo
    // streams its body back instead of draining it first.
    if req.uri().path() == "/ws" && req.method() == Method::GET {
        return websocket(&mut req);
    }
    if req.uri().path() == "/echo" && req.method() == Method::POST {
        return echo(req, idx, log.clone());
    }

    let (parts, mut body) = req.into_parts();
    // Count (without keeping) whatever body came along, so `body_len` is right for every
    // route and a pipelined HTTP/1.1 connection stays in sync.
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            log.add_body(idx, data.len());
        }
    }

    let path = parts.uri.path();
    if parts.method == Method::GET || parts.method == Method::HEAD {
        let file = log.files.lock().unwrap().get(path).cloned();
        if let Some((content_type, body)) = file {
            if parts.method == Method::HEAD {
                // No body at all: over HTTP/2, hyper would send it as DATA.
                let mut res = empty(StatusCode::OK);
                let h = res.headers_mut();
                h.insert(header::CONTENT_TYPE, content_type.parse().unwrap());
                h.insert(header::CONTENT_LENGTH, body.len().into());
                return res;
            }
            return full(StatusCode::OK, &content_type, body);
        }
    }
    match (&parts.method, path) {
        (&Method::GET, "/hello") => {
            full(StatusCode::OK, "text/plain", format!("hello from {host}"))
        }
        (&Method::GET, "/sse") => sse(),
        // A server that serves each name only on connections opened for it: 421 to a
        // request that shared another name's connection.
        (&Method::GET, "/own-connection") if !own_connection => {
            empty(StatusCode::MISDIRECTED_REQUEST)
        }
        (&Method::GET, "/own-connection") => {
            full(StatusCode::OK, "text/plain", format!("{host} on its own"))
        }
        // `npm ping` asks the registry this; any JSON object is a pong.
        (&Method::GET, "/-/ping") => full(StatusCode::OK, "application/json", "{}"),
        (&Method::GET, "/hold") => {
            log.released().await;
            full(StatusCode::OK, "text/plain", "released")
        }
        (&Method::GET, "/bytes") => bytes(parts.uri.query()),
        (&Method::GET, _) if path.starts_with("/status/") => status(&path["/status/".len()..]),
        _ => empty(StatusCode::NOT_FOUND),
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<ResBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(
            Full::new(body.into())
                .map_err(|e| match e {})
                .boxed_unsync(),
        )
        .unwrap()
}

fn empty(status: StatusCode) -> Response<ResBody> {
    Response::builder()
        .status(status)
        .body(Empty::new().map_err(|e| match e {}).boxed_unsync())
        .unwrap()
}

/// Five events, each its own body frame, so that every event reaches the wire as soon as it
/// is produced; a proxy that waits for more data before forwarding delays them visibly.
fn sse() -> Response<ResBody> {
    let events = futures_util::stream::unfold(0, |i| async move {
        if i == SSE_EVENTS {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(SSE_GAP).await;
        }
        let event = Bytes::from(format!("data: event {i}\n\n"));
        Some((Ok::<_, Infallible>(Frame::data(event)), i + 1))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(
            StreamBody::new(events)
                .map_err(|e| match e {})
                .boxed_unsync(),
        )
        .unwrap()
}

fn bytes(query: Option<&str>) -> Response<ResBody> {
    let n = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("n="))
        .and_then(|n| n.parse::<u64>().ok());
    let Some(n) = n else {
        return full(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "/bytes needs ?n=<length>".to_owned(),
        );
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, n)
        .body(
            Zeros { remaining: n }
                .map_err(|e| match e {})
                .boxed_unsync(),
        )
        .unwrap()
}

/// `remaining` zero bytes in frames borrowed from [`ZEROS`].
struct Zeros {
    remaining: u64,
}

impl Body for Zeros {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = usize::try_from(self.remaining).map_or(ZERO_CHUNK, |r| r.min(ZERO_CHUNK));
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&ZEROS[..n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

fn echo(req: Request<Incoming>, idx: usize, log: Arc<Log>) -> Response<ResBody> {
    let body = req.into_body().map_frame(move |frame| {
        if let Some(data) = frame.data_ref() {
            log.add_body(idx, data.len());
        }
        frame
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(body.boxed_unsync())
        .unwrap()
}

/// Whether any `name` header lists `token` (comma-separated, case-insensitive), as
/// `Connection: keep-alive, Upgrade` does.
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// RFC 6455 handshake over HTTP/1.1 Upgrade, then echo every data message until close.
fn websocket(req: &mut Request<Incoming>) -> Response<ResBody> {
    let bad = |why: &str| full(StatusCode::BAD_REQUEST, "text/plain", why.to_owned());
    if req.version() != Version::HTTP_11 {
        return bad("websocket needs an HTTP/1.1 Upgrade");
    }
    let headers = req.headers();
    if !has_token(headers, header::UPGRADE, "websocket")
        || !has_token(headers, header::CONNECTION, "upgrade")
    {
        return bad("missing Upgrade: websocket / Connection: Upgrade");
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v != "13")
    {
        return bad("Sec-WebSocket-Version must be 13");
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return bad("missing Sec-WebSocket-Key");
    };
    let accept = derive_accept_key(key.as_bytes());

    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        // Pings and the close reply are queued by tungstenite itself and flushed by the next
        // read, so only data messages need handling; the loop ends once the close completes.
        while let Some(Ok(msg)) = ws.next().await {
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });

    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Empty::new().map_err(|e| match e {}).boxed_unsync())
        .unwrap()
}

fn status(code: &str) -> Response<ResBody> {
    match code.parse::<u16>().ok().filter(|c| (200..=599).contains(c)) {
        Some(c) => empty(StatusCode::from_u16(c).unwrap()),
        None => full(
            StatusCode::BAD_REQUEST,
            "text/plain",
            format!("/status/{code}: want a code in 200..=599"),
        ),
    }
}

/// An HTTPS [`Origin`] on `IP:443` with a leaf from its own [`TestCa`], the PEM file
/// `egress run --upstream-ca` should trust, and a scratch directory for the test's files.
/// One per test, each on its own loopback address.
pub struct Site {
    pub origin: Origin,
    pub ca_file: PathBuf,
    pub dir: TempDir,
    pub ip: String,
}

impl Site {
    /// Serves on `ip:443` a certificate for `names` and `ip`; `tag` names the scratch
    /// directory.
    pub fn start(tag: &str, ip: &str, names: &[&str]) -> Site {
        let dir = TempDir::new(tag);
        let ca = TestCa::new("egress-test-origin-ca");
        let ca_file = dir.path("origin-ca.pem");
        ca.write_pem(&ca_file);
        let mut sans = names.to_vec();
        sans.push(ip);
        let origin = Origin::start(&format!("{ip}:443"), Some(ca.leaf(&sans)));
        Site {
            origin,
            ca_file,
            dir,
            ip: ip.to_owned(),
        }
    }

    /// `egress run` flags: trust the origin's CA upstream and open the private-range guard
    /// for loopback, then `extra`.
    pub fn args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec![
            "--upstream-ca",
            self.ca_file.to_str().unwrap(),
            "--private-ok",
            "127.0.0.0/8",
        ];
        v.extend_from_slice(extra);
        v
    }

    /// A curl `--resolve` entry sending `name` to this origin.
    pub fn resolve(&self, name: &str) -> String {
        format!("{name}:443:{}", self.ip)
    }
}

/// The test CA the origins' leaves come from, written where the daemon reads it
/// (`upstream_ca`).
pub struct OriginCa {
    pub ca: TestCa,
    pub file: std::path::PathBuf,
    _dir: TempDir,
}

impl OriginCa {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        let dir = TempDir::new("origin-ca");
        let ca = TestCa::new("egress daemon tests origin CA");
        let file = dir.path("origin-ca.pem");
        ca.write_pem(&file);
        OriginCa {
            ca,
            file,
            _dir: dir,
        }
    }

    /// The `[daemon]` line that makes egress trust the origins.
    pub fn daemon_line(&self) -> String {
        format!("upstream_ca = [\"{}\"]", self.file.display())
    }

    /// An HTTPS origin on `ip:443` with a leaf for `names`.
    pub fn origin(&self, ip: std::net::Ipv4Addr, names: &[&str]) -> Origin {
        Origin::start(&format!("{ip}:443"), Some(self.ca.leaf(names)))
    }
}

#[cfg(test)]
mod tests {
    use std::{future::Future, time::Instant};

    use http_body_util::BodyExt as _;
    use hyper::client::conn::{http1, http2};
    use rustls_pki_types::ServerName;
    use tokio::net::TcpStream;
    use tokio_rustls::{client::TlsStream, TlsConnector};
    use tokio_tungstenite::tungstenite::Message;

    use super::*;

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("test client runtime")
            .block_on(f)
    }

    fn origin(ca: &TestCa) -> Origin {
        Origin::start("127.0.0.1:0", Some(ca.leaf(&["localhost", "127.0.0.1"])))
    }

    async fn connect(
        origin: &Origin,
        ca: &TestCa,
        name: &str,
        alpn: &[&[u8]],
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let mut config = (*tls_client_config(&ca.cert_pem())).clone();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tcp = TcpStream::connect(origin.addr())
            .await
            .unwrap_or_else(|e| panic!("TCP connect to origin {}: {e}", origin.addr()));
        let name = ServerName::try_from(name.to_owned()).expect("test server name");
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
    }

    /// An HTTP/1.1 request over a fresh TLS connection named `localhost`.
    async fn h1<B>(origin: &Origin, ca: &TestCa, req: Request<B>) -> Response<Incoming>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let tls = connect(origin, ca, "localhost", &[])
            .await
            .expect("TLS handshake with the origin");
        let (mut sender, conn) = http1::handshake(TokioIo::new(tls))
            .await
            .expect("HTTP/1.1 handshake with the origin");
        tokio::spawn(conn);
        sender
            .send_request(req)
            .await
            .expect("HTTP/1.1 request to the origin")
    }

    fn get(path: &str) -> Request<Empty<Bytes>> {
        Request::get(path)
            .header(header::HOST, "localhost")
            .body(Empty::new())
            .unwrap()
    }

    async fn body_string(res: Response<Incoming>) -> String {
        let body = res.into_body().collect().await.expect("response body");
        String::from_utf8(body.to_bytes().to_vec()).expect("response body is UTF-8")
    }

    #[test]
    fn hello_over_http1_records_sni_and_host() {
        let ca = TestCa::new("origin test CA");
        let origin = origin(&ca);
        let body = block_on(async {
            let res = h1(&origin, &ca, get("/hello?x=1")).await;
            assert_eq!(res.status(), StatusCode::OK, "GET /hello status");
            body_string(res).await
        });
        assert_eq!(body, "hello from localhost", "GET /hello body");

        let seen = origin.requests();
        assert_eq!(
            seen.len(),
            1,
            "origin should have seen one request: {seen:?}"
        );
        let r = &seen[0];
        assert_eq!(r.method, "GET");
        assert_eq!(r.path_and_query, "/hello?x=1");
        assert_eq!(r.version, "HTTP/1.1");
        assert_eq!(r.host, "localhost");
        assert_eq!(r.sni.as_deref(), Some("localhost"), "SNI not recorded");
        assert_eq!(
            r.peer.ip().to_string(),
            "127.0.0.1",
            "the TCP peer is the client's address"
        );
        assert!(
            r.headers
                .iter()
                .any(|(k, v)| k == "host" && v == "localhost"),
            "Host missing from recorded headers: {:?}",
            r.headers
        );
    }

    #[test]
    fn hello_over_h2_by_ip_has_authority_and_no_sni() {
        let ca = TestCa::new("origin test CA");
        let origin = origin(&ca);
        let authority = origin.addr().to_string();
        let body = block_on(async {
            // An IP literal checks the IP SAN, and clients send no SNI for one.
            let tls = connect(&origin, &ca, "127.0.0.1", &[b"h2"])
                .await
                .expect("TLS handshake by IP (IP SAN)");
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN");
            let (mut sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .expect("HTTP/2 handshake with the origin");
            tokio::spawn(conn);
            let req = Request::get(format!("https://{authority}/hello"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            let res = sender.send_request(req).await.expect("HTTP/2 request");
            assert_eq!(res.status(), StatusCode::OK, "GET /hello over h2 status");
            body_string(res).await
        });
        assert_eq!(
            body,
            format!("hello from {authority}"),
            "host from :authority"
        );
        let r = &origin.requests()[0];
        assert_eq!(r.version, "HTTP/2.0");
        assert_eq!(r.host, authority);
        assert_eq!(r.sni, None, "no SNI is sent for an IP literal");
    }

    #[test]
    fn sse_events_arrive_spaced() {
        let ca = TestCa::new("origin test CA");
        let origin = origin(&ca);
        let (text, arrivals) = block_on(async {
            let res = h1(&origin, &ca, get("/sse")).await;
            assert_eq!(
                res.headers()[header::CONTENT_TYPE],
                "text/event-stream",
                "/sse content type"
            );
            let start = Instant::now();
            let mut body = res.into_body();
            let (mut text, mut arrivals) = (String::new(), Vec::new());
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.expect("SSE body frame").into_data() {
                    text.push_str(std::str::from_utf8(&data).expect("SSE is UTF-8"));
                    arrivals.push(start.elapsed());
                }
            }
            (text, arrivals)
        });
        let want: String = (0..SSE_EVENTS)
            .map(|i| format!("data: event {i}\n\n"))
            .collect();
        assert_eq!(text, want, "SSE stream content");
        assert_eq!(
            arrivals.len(),
            SSE_EVENTS as usize,
            "one frame per event: {arrivals:?}"
        );
        let (first, last) = (arrivals[0], arrivals[arrivals.len() - 1]);
        assert!(first < SSE_GAP, "first event was held back: {arrivals:?}");
        assert!(
            last - first >= SSE_GAP * 3,
            "events arrived bunched rather than spaced: {arrivals:?}"
        );
    }

    #[test]
    fn bytes_streams_exact_length() {
        const N: usize = 10 * 1024 * 1024;
        let ca = TestCa::new("origin test CA");
        let origin = origin(&ca);
        let (declared, total, nonzero) = block_on(async {
            let res = h1(&origin, &ca, get(&format!("/bytes?n={N}"))).await;
            assert_eq!(res.status(), StatusCode::OK, "/bytes status");
            let declared = res.headers()[header::CONTENT_LENGTH]
                .to_str()
                .unwrap()
                .to_owned();
            let mut body = res.into_body();
            let (mut total, mut nonzero) = (0, false);
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.expect("/bytes body frame").into_data() {
                    total += data.len();
                    nonzero |= data.iter().any(|b| *b != 0);
                }
            }
            (declared, total, nonzero)
        });
        assert_eq!(declared, N.to_string(), "/bytes Content-Length");
        assert_eq!(total, N, "/bytes body length");
        assert!(!nonzero, "/bytes body should be all zeros");
    }

    #[test]
    fn echo_streams_body_back() {
        let ca = TestCa::new("origin test CA");
        let origin = origin(&ca);
        let payload: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let echoed = block_on(async {
            let req = Request::post("/echo")
                .header(header::HOST, "localhost")
                .body(Full::new(Bytes::from(payload.clone())))
                .unwrap();
            let res = h1(&origin, &ca, req).await;
            assert_eq!(res.status(), StatusCode::OK, "/echo status");
            res.into_body()
                .collect()
                .await
                .expect("/echo body")
                .to_bytes()
        });
        assert!(
            echoed == payload,
            "/echo returned {} different bytes",
            echoed.len()
        );
        assert_eq!(
            origin.requests()[0].body_len,
            payload.len(),
            "recorded body_len"
        );
    }

    #[test]
    fn websocket_echoes_messages() {
        let ca = TestCa::new("origin test CA");
        let origin = origin(&ca);
        block_on(async {
            let tls = connect(&origin, &ca, "localhost", &[b"http/1.1"])
                .await
                .expect("TLS handshake with the origin");
            let (mut ws, res) = tokio_tungstenite::client_async("wss://localhost/ws", tls)
                .await
                .expect("WebSocket handshake with /ws");
            assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
            for msg in [
                Message::text("hello ws"),
                Message::binary(vec![0u8, 1, 2, 255]),
            ] {
                ws.send(msg.clone()).await.expect("WebSocket send");
                let back = ws
                    .next()
                    .await
                    .expect("WebSocket closed before echoing")
                    .expect("WebSocket read");
                assert_eq!(back, msg, "WebSocket echo");
            }
            ws.close(None).await.expect("WebSocket close");
        });
        assert_eq!(origin.requests()[0].path_and_query, "/ws");
    }

    #[test]
    fn hold_answers_only_once_released() {
        let ca = TestCa::new("origin test CA");
        let origin = origin(&ca);
        block_on(async {
            let held = tokio::spawn({
                let (addr, pem) = (origin.addr(), ca.cert_pem());
                async move {
                    let config = tls_client_config(&pem);
                    let tcp = TcpStream::connect(addr).await.expect("TCP connect");
                    let name = ServerName::try_from("localhost").unwrap();
                    let tls = TlsConnector::from(config)
                        .connect(name, tcp)
                        .await
                        .expect("TLS handshake");
                    let (mut sender, conn) = http1::handshake(TokioIo::new(tls))
                        .await
                        .expect("HTTP/1.1 handshake");
                    tokio::spawn(conn);
                    let res = sender.send_request(get("/hold")).await.expect("request");
                    (res.status(), body_string(res).await)
                }
            });
            let deadline = Instant::now() + Duration::from_secs(10);
            while origin.request_count() == 0 {
                assert!(Instant::now() < deadline, "/hold never reached the origin");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!held.is_finished(), "/hold answered before the release");
            origin.release();
            let (status, body) = held.await.expect("the held request's task");
            assert_eq!(status, StatusCode::OK, "/hold status");
            assert_eq!(body, "released");
            // Once released, later requests answer at once.
            let res = h1(&origin, &ca, get("/hold")).await;
            assert_eq!(body_string(res).await, "released");
        });
    }

    #[test]
    fn status_and_not_found() {
        let ca = TestCa::new("origin test CA");
        let origin = origin(&ca);
        block_on(async {
            let cases = [
                ("/status/503", 503),
                ("/status/204", 204),
                ("/nope", 404),
                ("/status/x", 400),
            ];
            for (path, want) in cases {
                let res = h1(&origin, &ca, get(path)).await;
                assert_eq!(res.status().as_u16(), want, "GET {path}");
            }
        });
    }

    #[test]
    fn untrusted_leaf_is_rejected_and_recorded() {
        let ca = TestCa::new("origin test CA");
        let origin = Origin::start("127.0.0.1:0", Some(self_signed_untrusted(&["localhost"])));
        let err = block_on(connect(&origin, &ca, "localhost", &[]))
            .expect_err("a leaf from another CA must not verify against the test CA");
        assert!(
            err.to_string().contains("UnknownIssuer"),
            "expected an unknown-issuer failure, got: {err}"
        );
        // The origin notices the client's alert on its own task, after the client gave up.
        let deadline = Instant::now() + Duration::from_secs(2);
        while origin.tls_failures().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !origin.tls_failures().is_empty(),
            "origin did not record the failed handshake"
        );
        assert!(
            origin.requests().is_empty(),
            "no request should have got through"
        );
    }

    #[test]
    fn plain_http_origin() {
        let origin = Origin::start("127.0.0.1:0", None);
        let body = block_on(async {
            let tcp = TcpStream::connect(origin.addr())
                .await
                .expect("TCP connect");
            let (mut sender, conn) = http1::handshake(TokioIo::new(tcp))
                .await
                .expect("HTTP/1.1 handshake");
            tokio::spawn(conn);
            let res = sender.send_request(get("/hello")).await.expect("request");
            body_string(res).await
        });
        assert_eq!(body, "hello from localhost");
        assert_eq!(origin.requests()[0].sni, None, "plain HTTP has no SNI");
    }

    #[test]
    fn drop_releases_the_port() {
        let origin = Origin::start("127.0.0.1:0", None);
        let addr = origin.addr();
        drop(origin);
        std::net::TcpListener::bind(addr)
            .unwrap_or_else(|e| panic!("port {addr} still bound after the origin dropped: {e}"));
    }

    #[test]
    fn ca_pem_is_written_world_readable_and_parses() {
        let ca = TestCa::new("origin test CA");
        let dir = TempDir::new("origin-ca");
        let path = dir.path("ca.pem");
        ca.write_pem(&path);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "CA file mode is {mode:o}");
        let pem = std::fs::read_to_string(&path).unwrap();
        assert_eq!(pem, ca.cert_pem(), "written PEM differs from cert_pem()");
        tls_client_config(&pem);
    }
}
