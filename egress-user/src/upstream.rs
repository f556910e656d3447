//! Connections to the original destinations (the HTTP upstream pool of each sandbox), from
//! egress's own cgroup (never redirected), in egress's network namespace or the sandbox's.
//!
//! HTTPS upstreams are verified against the system trust store plus any configured roots;
//! there is no insecure fallback. HTTP/2 or HTTP/1.1 is whatever the upstream picks by ALPN,
//! independently of the client side. Connections are pooled per (original destination, SNI).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    Request, Response,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use crate::{netns::Connector, state::UpstreamTls};

pub use crate::BoxError;
pub type Body = BoxBody<Bytes, BoxError>;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const TLS_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle HTTP/1.1 connections kept per pool key.
const MAX_IDLE_H1: usize = 32;

/// Why an upstream could not be used. Every variant maps to a 502 or 504 with this text.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to {dst} timed out after {CONNECT_TIMEOUT:?}")]
    ConnectTimeout { dst: SocketAddr },
    #[error("connecting to {dst} failed")]
    Connect {
        dst: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {dst} timed out")]
    TlsTimeout { dst: SocketAddr },
    #[error("TLS handshake with {server} at {dst} failed")]
    Tls {
        dst: SocketAddr,
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{server:?} is not a valid TLS server name")]
    ServerName { server: String },
    #[error("HTTP handshake with {dst} failed")]
    Handshake {
        dst: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("upstream request to {dst} failed")]
    Request {
        dst: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

impl Error {
    /// 504 for timeouts, 502 for everything else.
    pub fn status(&self) -> http::StatusCode {
        match self {
            Error::ConnectTimeout { .. } | Error::TlsTimeout { .. } => {
                http::StatusCode::GATEWAY_TIMEOUT
            }
            _ => http::StatusCode::BAD_GATEWAY,
        }
    }

    /// A short machine-readable reason for logs and the `X-Egress-Error` header.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::ConnectTimeout { .. } => "upstream-connect-timeout",
            Error::Connect { .. } => "upstream-connect-failed",
            Error::TlsTimeout { .. } => "upstream-tls-timeout",
            Error::Tls { .. } => "upstream-tls-failed",
            Error::ServerName { .. } => "upstream-bad-server-name",
            Error::Handshake { .. } => "upstream-http-handshake-failed",
            Error::Request { .. } => "upstream-request-failed",
        }
    }
}

async fn connect_tcp(via: &Connector, dst: SocketAddr) -> Result<TcpStream, Error> {
    let s = match tokio::time::timeout(CONNECT_TIMEOUT, via.tcp(dst)).await {
        Err(_) => return Err(Error::ConnectTimeout { dst }),
        Ok(Err(source)) => return Err(Error::Connect { dst, source }),
        Ok(Ok(s)) => s,
    };
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Which upstream a request goes to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub dst: SocketAddr,
    /// TLS server name (DNS name, or the IP when the client sent no SNI); `None` for plain
    /// HTTP.
    pub tls_name: Option<String>,
}

impl PoolKey {
    /// The key of an intercepted TLS connection: the upstream must present a certificate
    /// for the name the client asked for (its SNI), or for the address when it sent none.
    pub fn tls(dst: SocketAddr, sni: Option<&str>) -> Self {
        PoolKey {
            dst,
            tls_name: Some(sni.map_or_else(|| dst.ip().to_string(), str::to_owned)),
        }
    }
}

/// An upstream connection started before the request that needs it, while the client is
/// still in its TLS handshake: a first visit then waits for the slower of the two
/// handshakes, not for both in turn. Dropped unclaimed, the connection joins the pool.
pub struct Ahead {
    made: Option<tokio::sync::oneshot::Receiver<Result<Sender, Error>>>,
    pool: Arc<Pool>,
    key: PoolKey,
}

impl Ahead {
    /// Waits for the connection; `None` if its task is gone (the runtime shutting down).
    async fn claim(mut self) -> Option<Result<Sender, Error>> {
        // Awaited in place, so that a request cancelled meanwhile drops `self` with the
        // receiver in it and the connection still reaches the pool.
        let made = self.made.as_mut()?.await.ok();
        self.made = None;
        made
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        let Some(mut made) = self.made.take() else {
            return;
        };
        // Closed first, so the dialing task either sees the close (and checks its
        // connection in itself) or has already sent what is read here.
        made.close();
        if let Ok(Ok(s)) = made.try_recv() {
            self.pool.checkin(&self.key, s);
        }
    }
}

/// A pooled HTTP/2 connection and the certificate its upstream presented: other names it
/// covers may share the connection (RFC 9113 §9.1.1).
#[derive(Clone)]
pub(crate) struct H2 {
    send: http2::SendRequest<Body>,
    cert: Option<Arc<CertificateDer<'static>>>,
}

enum Entry {
    H2(H2),
    H1(Vec<http1::SendRequest<Body>>),
}

/// The upstream connection pool of one sandbox.
pub struct Pool {
    tls: tokio_rustls::TlsConnector,
    tls_h1_only: tokio_rustls::TlsConnector,
    /// Where upstream sockets are made (egress's namespace or the sandbox's); swapped when a
    /// sandbox's namespace changes (a restarted container).
    via: arc_swap::ArcSwap<Connector>,
    entries: Mutex<HashMap<PoolKey, Entry>>,
}

pub(crate) enum Sender {
    H1(http1::SendRequest<Body>),
    H2(H2),
}

impl Pool {
    /// Upstream sockets are made through `via`.
    pub fn new(tls: &UpstreamTls, via: Connector) -> Self {
        Self {
            tls: tls.any.clone().into(),
            tls_h1_only: tls.h1_only.clone().into(),
            via: arc_swap::ArcSwap::from_pointee(via),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// A plain TCP connection to `dst` (passthrough), made where this pool's are.
    pub async fn connect_tcp(&self, dst: SocketAddr) -> Result<TcpStream, Error> {
        connect_tcp(&self.via.load(), dst).await
    }

    /// Makes new connections through `via` from now on and forgets the pooled ones, which
    /// left from the old place.
    pub fn rebind(&self, via: Connector) {
        self.via.store(Arc::new(via));
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Starts connecting to `key` now, for a request still to come; `None` when a pooled
    /// connection would serve it already.
    pub fn dial_ahead(self: &Arc<Self>, key: PoolKey) -> Option<Ahead> {
        if self.has_ready(&key) {
            return None;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let pool = Arc::clone(self);
        let dial_key = key.clone();
        tokio::spawn(async move {
            let made = pool.connect(&dial_key, false).await;
            if let Err(Ok(s)) = tx.send(made) {
                // Its client went before a request, or the request found a pooled
                // connection: keep this one for the next.
                pool.checkin(&dial_key, s);
            }
        });
        Some(Ahead {
            made: Some(rx),
            pool: Arc::clone(self),
            key,
        })
    }

    /// Whether a request to `key` would find a pooled connection now, its own or an
    /// HTTP/2 connection it may share.
    pub fn has_ready(&self, key: &PoolKey) -> bool {
        let ready = {
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            match entries.get(key) {
                Some(Entry::H2(s)) => !s.send.is_closed(),
                Some(Entry::H1(idle)) => idle.iter().any(|s| !s.is_closed() && s.is_ready()),
                None => false,
            }
        };
        ready || self.shareable(key).is_some()
    }

    /// An open HTTP/2 connection to the same destination whose certificate, verified when
    /// it was made, also covers `key`'s name.
    fn shareable(&self, key: &PoolKey) -> Option<H2> {
        let name = ServerName::try_from(key.tls_name.as_deref()?).ok()?;
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.iter().find_map(|(k, e)| match e {
            Entry::H2(h2)
                if k.dst == key.dst
                    && k.tls_name.is_some()
                    && !h2.send.is_closed()
                    && h2.cert.as_deref().is_some_and(|c| covers(c, &name)) =>
            {
                Some(h2.clone())
            }
            _ => None,
        })
    }

    fn checkout(&self, key: &PoolKey) -> Option<Sender> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match entries.get_mut(key)? {
            Entry::H2(s) if !s.send.is_closed() => Some(Sender::H2(s.clone())),
            Entry::H2(_) => {
                entries.remove(key);
                None
            }
            Entry::H1(idle) => {
                idle.retain(|s| !s.is_closed());
                let i = idle.iter().position(|s| s.is_ready())?;
                Some(Sender::H1(idle.swap_remove(i)))
            }
        }
    }

    fn checkin(&self, key: &PoolKey, s: Sender) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match s {
            // An open HTTP/2 entry stays: it is this connection, checked out by the request
            // that now checks it in, or another one that serves as well. Not replacing it
            // spares a key copy and a map write for every request.
            Sender::H2(_) if matches!(entries.get(key), Some(Entry::H2(h)) if !h.send.is_closed()) =>
                {}
            Sender::H2(s) => {
                entries.insert(key.clone(), Entry::H2(s));
            }
            Sender::H1(s) => match entries
                .entry(key.clone())
                .or_insert_with(|| Entry::H1(Vec::new()))
            {
                Entry::H1(idle) if idle.len() < MAX_IDLE_H1 => idle.push(s),
                Entry::H1(_) => {}
                // An HTTP/2 connection appeared meanwhile; it serves everything.
                Entry::H2(_) => {}
            },
        }
    }

    /// Sends a request (URI and headers already in upstream form for either protocol; see
    /// [`prepare`]) and returns the response head with its body still streaming. A pooled
    /// connection goes first, then the one dialed `ahead`, then a new one.
    pub async fn send(
        &self,
        key: &PoolKey,
        req: Request<Body>,
        ahead: Option<Ahead>,
    ) -> Result<Response<Incoming>, Error> {
        if let Some(s) = self.checkout(key) {
            return self.send_on(key, s, req).await;
        }
        // Another name's HTTP/2 connection, when its certificate covers this one. Only for
        // requests without a body: a 421 (not served on that connection after all) is then
        // replayed on a connection of its own.
        if hyper::body::Body::is_end_stream(req.body()) {
            if let Some(mut shared) = self.shareable(key) {
                let req = prepare(req, http::Version::HTTP_2, key);
                let replay = head_only(&req);
                let resp = send_h2(&mut shared, req, key.dst).await?;
                if resp.status() != http::StatusCode::MISDIRECTED_REQUEST {
                    self.checkin(key, Sender::H2(shared));
                    return Ok(resp);
                }
                let s = self.connect(key, false).await?;
                return self.send_on(key, s, replay).await;
            }
        }
        // An unclaimed `ahead` joins the pool when dropped.
        let s = match ahead {
            Some(ahead) => match ahead.claim().await {
                Some(made) => made?,
                None => self.connect(key, false).await?,
            },
            None => self.connect(key, false).await?,
        };
        self.send_on(key, s, req).await
    }

    /// Sends on `sender` and returns it to the pool.
    async fn send_on(
        &self,
        key: &PoolKey,
        sender: Sender,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, Error> {
        let dst = key.dst;
        match sender {
            Sender::H2(mut s) => {
                let req = prepare(req, http::Version::HTTP_2, key);
                let resp = send_h2(&mut s, req, dst).await?;
                self.checkin(key, Sender::H2(s));
                Ok(resp)
            }
            Sender::H1(mut s) => {
                let req = prepare(req, http::Version::HTTP_11, key);
                let resp = s
                    .send_request(req)
                    .await
                    .map_err(|source| Error::Request { dst, source })?;
                // Busy until the body is read; checkout skips it until then.
                self.checkin(key, Sender::H1(s));
                Ok(resp)
            }
        }
    }

    /// Sends an upgrade request (WebSocket) on a fresh HTTP/1.1 connection that allows
    /// upgrades; never pooled.
    pub async fn send_upgrade(
        &self,
        key: &PoolKey,
        req: Request<Body>,
        ahead: Option<Ahead>,
    ) -> Result<Response<Incoming>, Error> {
        // Never upgraded: it joins the pool for the requests after this one.
        drop(ahead);
        let Sender::H1(mut s) = self.connect(key, true).await? else {
            unreachable!("connect(h1_only) yields HTTP/1.1")
        };
        let req = prepare(req, http::Version::HTTP_11, key);
        s.send_request(req).await.map_err(|source| Error::Request {
            dst: key.dst,
            source,
        })
    }

    /// Boxed: the dial's state (a TLS handshake) is large, and inline it would make every
    /// request's future that large, to be copied on each move, though most requests find a
    /// pooled connection.
    async fn connect(&self, key: &PoolKey, h1_only: bool) -> Result<Sender, Error> {
        Box::pin(self.dial(key, h1_only)).await
    }

    async fn dial(&self, key: &PoolKey, h1_only: bool) -> Result<Sender, Error> {
        let dst = key.dst;
        let tcp = connect_tcp(&self.via.load(), dst).await?;
        let Some(name) = &key.tls_name else {
            return h1(TokioIo::new(tcp), dst, h1_only).await;
        };
        let server = ServerName::try_from(name.clone()).map_err(|_| Error::ServerName {
            server: name.clone(),
        })?;
        let connector = if h1_only {
            &self.tls_h1_only
        } else {
            &self.tls
        };
        let tls = match tokio::time::timeout(TLS_TIMEOUT, connector.connect(server, tcp)).await {
            Err(_) => return Err(Error::TlsTimeout { dst }),
            Ok(Err(source)) => {
                return Err(Error::Tls {
                    dst,
                    server: name.clone(),
                    source,
                })
            }
            Ok(Ok(t)) => t,
        };
        let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| Arc::new(c.clone().into_owned()));
        if is_h2 && !h1_only {
            let (s, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(TokioIo::new(tls))
                .await
                .map_err(|source| Error::Handshake { dst, source })?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream h2 connection ended");
                }
            });
            Ok(Sender::H2(H2 { send: s, cert }))
        } else {
            h1(TokioIo::new(tls), dst, h1_only).await
        }
    }
}

async fn send_h2(
    h2: &mut H2,
    req: Request<Body>,
    dst: SocketAddr,
) -> Result<Response<Incoming>, Error> {
    h2.send
        .send_request(req)
        .await
        .map_err(|source| Error::Request { dst, source })
}

/// A copy of a request that has no body, to send again elsewhere.
fn head_only(req: &Request<Body>) -> Request<Body> {
    let mut copy = Request::new(Body::default());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// Whether `cert` (an end-entity certificate already verified for another name) is valid
/// for `name` too.
fn covers(cert: &CertificateDer<'_>, name: &ServerName<'_>) -> bool {
    webpki::EndEntityCert::try_from(cert)
        .is_ok_and(|c| c.verify_is_valid_for_subject_name(name).is_ok())
}

async fn h1<T>(io: TokioIo<T>, dst: SocketAddr, upgrades: bool) -> Result<Sender, Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (s, conn) = http1::Builder::new()
        .handshake(io)
        .await
        .map_err(|source| Error::Handshake { dst, source })?;
    tokio::spawn(async move {
        let r = if upgrades {
            conn.with_upgrades().await
        } else {
            conn.await
        };
        if let Err(e) = r {
            tracing::debug!(error = %e, "upstream h1 connection ended");
        }
    });
    Ok(Sender::H1(s))
}

/// Headers that describe one hop, not the message; never forwarded as they are. Named by
/// constant: removing by `&str` would parse the name anew on every request.
const HOP_BY_HOP: [http::HeaderName; 8] = [
    http::header::CONNECTION,
    http::HeaderName::from_static("keep-alive"),
    http::HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// Rewrites a request received from the client into the form the upstream protocol wants:
/// origin-form URI plus `Host` for HTTP/1.1, absolute URI (`:authority`) for HTTP/2.
pub fn prepare(req: Request<Body>, version: http::Version, key: &PoolKey) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    let upgrade =
        parts.headers.contains_key(http::header::UPGRADE) && version == http::Version::HTTP_11;
    if !upgrade {
        strip_hop_by_hop(&mut parts.headers, version);
    }
    let h2 = version == http::Version::HTTP_2;
    let scheme = if key.tls_name.is_some() {
        http::uri::Scheme::HTTPS
    } else {
        http::uri::Scheme::HTTP
    };
    // An HTTP/2 client's request is already in the form an HTTP/2 upstream wants.
    let as_is = h2 && parts.uri.scheme() == Some(&scheme) && parts.uri.authority().is_some();
    if !as_is {
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| key.dst.to_string());
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri = if h2 {
            format!("{scheme}://{authority}{path}").parse()
        } else {
            if !parts.headers.contains_key(http::header::HOST) {
                if let Ok(v) = http::HeaderValue::from_str(&authority) {
                    parts.headers.insert(http::header::HOST, v);
                }
            }
            path.parse()
        };
        parts.uri = uri.unwrap_or(parts.uri);
    }
    if h2 {
        parts.headers.remove(http::header::HOST);
    }
    parts.version = version;
    Request::from_parts(parts, body)
}

/// Removes the hop-by-hop headers, and those `Connection` names. HTTP/2 keeps `TE: trailers`,
/// the one form it allows.
fn strip_hop_by_hop(headers: &mut http::HeaderMap, version: http::Version) {
    let named: Vec<http::HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| http::HeaderName::from_bytes(s.trim().as_bytes()).ok())
        .collect();
    let keep_te = version == http::Version::HTTP_2
        && headers
            .get(http::header::TE)
            .is_some_and(|te| te.as_bytes() == b"trailers");
    for name in named.iter().chain(&HOP_BY_HOP) {
        if !(keep_te && name == http::header::TE) {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt as _, Empty};

    fn body() -> Body {
        Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed()
    }

    fn key(tls: bool) -> PoolKey {
        PoolKey {
            dst: "192.0.2.1:443".parse().unwrap(),
            tls_name: tls.then(|| "example.com".into()),
        }
    }

    #[test]
    fn h2_client_request_to_h1_upstream_gets_host_and_origin_form() {
        let req = Request::builder()
            .version(http::Version::HTTP_2)
            .uri("https://example.com/a?b=1")
            .body(body())
            .unwrap();
        let r = prepare(req, http::Version::HTTP_11, &key(true));
        assert_eq!(r.uri(), "/a?b=1");
        assert_eq!(r.headers()[http::header::HOST], "example.com");
        assert_eq!(r.version(), http::Version::HTTP_11);
    }

    #[test]
    fn h1_client_request_to_h2_upstream_gets_authority_and_loses_hop_headers() {
        let req = Request::builder()
            .uri("/x")
            .header("host", "example.com")
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("x-kept", "1")
            .body(body())
            .unwrap();
        let r = prepare(req, http::Version::HTTP_2, &key(true));
        assert_eq!(r.uri(), "https://example.com/x");
        assert!(r.headers().get("host").is_none());
        assert!(r.headers().get("x-hop").is_none());
        assert!(r.headers().get("connection").is_none());
        assert!(r.headers().get("keep-alive").is_none());
        assert_eq!(r.headers()["x-kept"], "1");
    }

    #[test]
    fn h2_client_request_to_h2_upstream_keeps_its_uri_and_te_trailers_only() {
        let h2 = |te: &str, uri: &str| {
            let req = Request::builder()
                .version(http::Version::HTTP_2)
                .uri(uri)
                .header("te", te)
                .header("proxy-authorization", "Basic x")
                .body(body())
                .unwrap();
            prepare(req, http::Version::HTTP_2, &key(true))
        };
        let r = h2("trailers", "https://example.com/a?b=1");
        assert_eq!(r.uri(), "https://example.com/a?b=1");
        assert_eq!(r.headers()["te"], "trailers");
        assert!(r.headers().get("proxy-authorization").is_none());
        assert!(h2("gzip", "https://example.com/")
            .headers()
            .get("te")
            .is_none());
        // The scheme follows the upstream leg, whatever the client said.
        assert_eq!(
            h2("trailers", "http://example.com/p").uri(),
            "https://example.com/p"
        );
    }

    #[test]
    fn upgrade_requests_keep_their_upgrade_headers() {
        let req = Request::builder()
            .uri("/ws")
            .header("host", "example.com")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .body(body())
            .unwrap();
        let r = prepare(req, http::Version::HTTP_11, &key(true));
        assert_eq!(r.headers()["upgrade"], "websocket");
        assert_eq!(r.headers()["connection"], "Upgrade");
    }
}
