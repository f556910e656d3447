//! The HTTP side of the interceptor: serves HTTP/1.1 and HTTP/2 to the sandboxed client
//! (over intercepted TLS or plain on port 80), applies the host policy to every request, and
//! forwards allowed requests upstream with bodies streaming both ways.

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, upgrade::OnUpgrade};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use super::{
    decide::{self, DenyCode},
    metered::{Counted, Reported},
    Conn,
};
use crate::{
    audit::{self, Decision, Record, RequestRecord, TlsMode},
    policy::{hint::Fix, normalize_host, HostRule, SandboxPolicy},
    secrets::{self, Plan},
    upstream::{Ahead, Body, BoxError, PoolKey},
};

/// Per client connection: who it is and how it arrived.
pub struct ConnInfo {
    pub conn: Conn,
    /// SNI the client sent, when it arrived over TLS.
    pub sni: Option<String>,
    pub tls: bool,
    /// The upstream connection dialed while the client was still in its handshake, for
    /// the first request to claim.
    pub ahead: std::sync::Mutex<Option<Ahead>>,
    /// Where its requests go upstream.
    pool_key: PoolKey,
    /// The client and original destination as every request's audit record shows them,
    /// formatted once.
    client: String,
    orig_dst: String,
}

impl ConnInfo {
    pub fn new(conn: Conn, sni: Option<String>, tls: bool, ahead: Option<Ahead>) -> Self {
        // Upstream connections are pooled by destination and, over TLS, by the name the
        // client asked for (its SNI, or the address when it sent none): the upstream must
        // present a certificate for that name.
        let dst = conn.meta.orig_dst.0;
        let pool_key = if tls {
            PoolKey::tls(dst, sni.as_deref())
        } else {
            PoolKey {
                dst,
                tls_name: None,
            }
        };
        ConnInfo {
            client: conn.meta.client.to_string(),
            orig_dst: conn.meta.orig_dst.to_string(),
            conn,
            sni,
            tls,
            ahead: std::sync::Mutex::new(ahead),
            pool_key,
        }
    }
}

pub async fn serve<I>(io: I, conn: Arc<ConnInfo>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        // Boxed: HTTP/2 spawns a task per request around this future, and a pointer moves
        // more cheaply than the whole request state (some KiB) through that spawn.
        Box::pin(async move {
            // Back-pressure: a request starts only once the audit queue has room for its
            // record.
            conn.conn.shared.audit.wait_for_space().await;
            Ok::<_, Infallible>(handle(req, &conn).await)
        })
    });
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(super::HEADER_READ_TIMEOUT)
        .max_buf_size(super::MAX_HEADER_BYTES);
    // No HTTP/2 keep-alive PINGs: every client is a process on this kernel (its connect
    // was redirected here), so a client that dies has its connection closed by the kernel,
    // and the ping's bookkeeping (a lock and a timer reset per frame) cost 1.3 µs of CPU
    // per request, 6% of the HTTP/2 total.
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(super::MAX_HEADER_BYTES as u32);
    if let Err(e) = b
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .await
    {
        debug!(error = %e, "client connection ended with an error");
    }
}

fn full(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    r
}

/// The 403 a refused request gets: JSON naming the host, why, and what would allow it, plus
/// `X-Egress-Denied`.
pub fn denied(host: &str, reason: &str, hint: Option<&str>, code: DenyCode) -> Response<Body> {
    let mut body = serde_json::json!({ "error": "egress_denied", "host": host, "reason": reason });
    if let Some(h) = hint {
        body["hint"] = h.into();
    }
    let mut r = full(
        StatusCode::FORBIDDEN,
        "application/json",
        format!("{body}\n"),
    );
    r.headers_mut()
        .insert("x-egress-denied", HeaderValue::from_static(code.as_str()));
    r
}

fn upstream_failed(e: &crate::upstream::Error) -> Response<Body> {
    let mut r = full(
        e.status(),
        "text/plain; charset=utf-8",
        format!("egress: {}\n", crate::error_chain(e)),
    );
    r.headers_mut()
        .insert("x-egress-error", HeaderValue::from_static(e.kind()));
    r
}

/// Most of a refused request's body read before the 403 goes out. Left unread, HTTP/2
/// ends the stream with RST_STREAM(NO_ERROR) right after the response, which some clients
/// (curl 7.88) report as a framing error instead of showing the 403. Bounded in size and
/// time; nothing read is forwarded anywhere.
async fn drain_refused_body(mut body: Incoming) {
    const LIMIT: usize = 1024 * 1024;
    const TIME: std::time::Duration = std::time::Duration::from_secs(2);
    let drain = async {
        let mut seen = 0;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > LIMIT {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(TIME, drain).await;
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == http::Version::HTTP_11
        && req.headers().contains_key(http::header::UPGRADE)
        && req
            .headers()
            .get_all(http::header::CONNECTION)
            .iter()
            .any(|v| {
                v.to_str()
                    .is_ok_and(|s| s.to_ascii_lowercase().contains("upgrade"))
            })
}

/// How one request ended, for its log and audit lines.
struct Outcome {
    decision: Decision,
    rule: String,
    reason: Option<String>,
    error: Option<String>,
}

/// A request egress turns away with a 403.
struct Refusal {
    code: DenyCode,
    reason: String,
    /// The rule that refused, when the policy did.
    rule: String,
    /// What would allow it.
    hint: Option<String>,
}

impl Refusal {
    /// A secret in the wrong place, or one that could not be substituted: no rule decided.
    fn secret(code: DenyCode, why: impl std::fmt::Display) -> Self {
        Refusal {
            code,
            reason: why.to_string(),
            rule: String::new(),
            hint: None,
        }
    }
}

/// A request the policy lets through: allowed, or (warn mode) refused but let pass.
struct Admitted<'p> {
    outcome: Outcome,
    /// The host rule whose header edits apply.
    host_rule: Option<&'p HostRule>,
}

/// Why forwarding brought back no response.
enum Unanswered {
    /// The body broke off because it carried a secret: a refusal, not an upstream failure.
    Refused(Refusal),
    Failed(crate::upstream::Error),
}

/// The phases of one request. Each refusal leaves through the same audit as a response, so
/// every request gets exactly one record.
async fn handle(mut req: Request<Incoming>, conn: &ConnInfo) -> Response<Body> {
    let mut audit = RequestAudit::begin(read_head(&req, conn), conn);
    let host = audit.host().to_owned();
    let live = conn.conn.sandbox.policy.load_full();
    let admitted = match judge(&req, conn, &live.sandbox, &host) {
        Ok(a) => a,
        Err(refusal) => {
            audit.decided = Some(Outcome {
                decision: Decision::Deny,
                rule: refusal.rule.clone(),
                reason: Some(refusal.reason.clone()),
                error: None,
            });
            drain_refused_body(req.into_body()).await;
            return audit.refuse(refusal);
        }
    };
    if let Some(rule) = admitted.host_rule {
        edit_headers(req.headers_mut(), rule);
    }
    let plan = live.secrets.plan(&host);
    let req = match substitute_head(req, &plan) {
        Ok(r) => r,
        Err(refusal) => return audit.refuse(refusal),
    };
    // From here the request may reach the upstream: should the client give up on it
    // before the answer (an HTTP/2 reset, a closed connection), it is still audited.
    audit.decided = Some(admitted.outcome);
    match forward(req, conn, &plan, audit.bytes_up.clone()).await {
        Ok(resp) => audit.finish_decided(resp, None),
        Err(Unanswered::Refused(refusal)) => audit.refuse(refusal),
        Err(Unanswered::Failed(e)) => {
            let error = Some(crate::error_chain(&e));
            audit.finish_decided(upstream_failed(&e), error)
        }
    }
}

/// Who sent the request, where to and what for, read before header edits or secret
/// substitution change the head: the audit record shows what the client sent.
fn read_head(req: &Request<Incoming>, conn: &ConnInfo) -> RequestRecord {
    let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
    RequestRecord {
        who: conn.conn.who(),
        client: conn.client.clone(),
        orig_dst: conn.orig_dst.clone(),
        sni: conn.sni.clone(),
        host: request_host(req, conn),
        method: req.method().to_string(),
        path: audit::redact_path(path_and_query, conn.conn.shared.audit_query),
        tls: if conn.tls {
            TlsMode::Mitm
        } else {
            TlsMode::Plain
        },
        ..Default::default()
    }
}

/// The host a request names, normalized: the URI's authority (HTTP/2, absolute-form), else
/// the Host header, else the SNI, else the address the client connected to.
fn request_host(req: &Request<Incoming>, conn: &ConnInfo) -> String {
    let named = req
        .uri()
        .authority()
        .map(|a| a.host())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .or(conn.sni.as_deref());
    match named {
        Some(name) => normalize_host(name).into_owned(),
        None => conn.conn.meta.orig_dst.0.ip().to_string(),
    }
}

/// The policy's verdict on the request; warn mode admits what it would have refused.
fn judge<'p>(
    req: &Request<Incoming>,
    conn: &ConnInfo,
    policy: &'p SandboxPolicy,
    host: &str,
) -> Result<Admitted<'p>, Refusal> {
    let sb = &conn.conn.sandbox;
    let dst = conn.conn.meta.orig_dst.0.ip();
    let verdict = decide::request(
        policy,
        &decide::Subject {
            sni: conn.sni.as_deref(),
            host,
            method: req.method(),
            path: req.uri().path(),
            headers: req.headers(),
            dst,
        },
        &|name| sb.pins.resolves_to(sb.id, name, dst),
    );
    if verdict.denied() {
        return Err(Refusal {
            // decide gives every refusal a code; the fallback only keeps a slip there a 403.
            code: verdict.code.unwrap_or(DenyCode::Policy),
            reason: verdict.reason.unwrap_or_default(),
            rule: verdict.rule,
            hint: verdict.hint,
        });
    }
    Ok(Admitted {
        outcome: Outcome {
            decision: verdict.decision,
            rule: verdict.rule,
            reason: verdict.reason,
            error: None,
        },
        host_rule: verdict.host_rule,
    })
}

fn edit_headers(h: &mut http::HeaderMap, rule: &HostRule) {
    for name in &rule.remove_headers {
        h.remove(name);
    }
    for (name, value) in &rule.set_headers {
        h.insert(name.clone(), value.clone());
    }
    for (name, value) in &rule.add_headers {
        h.append(name.clone(), value.clone());
    }
}

/// Secrets in the head: placeholders become real values toward authorized hosts only; a
/// placeholder or a real value bound anywhere else is refused, whatever the mode. It sees the
/// head after the host rule's edits: a value a rule sets is checked like one the client sent.
fn substitute_head(req: Request<Incoming>, plan: &Plan) -> Result<Request<Incoming>, Refusal> {
    if plan.is_noop() {
        return Ok(req);
    }
    let (mut parts, body) = req.into_parts();
    if let Err(e) = plan.apply_head(&mut parts) {
        let code = match e {
            secrets::ApplyError::Violation(_) => DenyCode::SecretNotAuthorized,
            _ => DenyCode::SecretSubstitutionFailed,
        };
        return Err(Refusal::secret(code, &e));
    }
    // Substitution may change the body's length; it is framed anew.
    if plan.rewrites_body() {
        parts.headers.remove(http::header::CONTENT_LENGTH);
    }
    Ok(Request::from_parts(parts, body))
}

/// Sends the request upstream with its body counted and (with secrets) scanned as it
/// streams, and bridges the two sides of an upgrade (WebSocket) once the upstream agrees.
async fn forward(
    mut req: Request<Incoming>,
    conn: &ConnInfo,
    plan: &Plan,
    bytes_up: Arc<AtomicU64>,
) -> Result<Response<Body>, Unanswered> {
    let key = &conn.pool_key;
    let upgrade = is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let client_h2 = parts.version == http::Version::HTTP_2;
    let counted = Counted::new(body.map_err(BoxError::from).boxed(), bytes_up);
    let (body, violation) = if plan.is_noop() {
        (counted.boxed(), None)
    } else {
        let scanned = plan.wrap_body(counted);
        let violation = scanned.violation_handle();
        (scanned.boxed(), Some(violation))
    };
    let req = Request::from_parts(parts, body);
    let pool = &conn.conn.sandbox.pool;
    let ahead = conn.ahead.lock().unwrap_or_else(|p| p.into_inner()).take();
    let sent = if upgrade {
        pool.send_upgrade(key, req, ahead).await
    } else {
        pool.send(key, req, ahead).await
    };
    let mut resp = sent.map_err(|e| match violation.as_ref().and_then(|h| h.get()) {
        Some(v) => Unanswered::Refused(Refusal::secret(DenyCode::SecretNotAuthorized, v)),
        None => Unanswered::Failed(e),
    })?;
    if let Some(client_upgrade) =
        client_upgrade.filter(|_| resp.status() == StatusCode::SWITCHING_PROTOCOLS)
    {
        bridge(client_upgrade, hyper::upgrade::on(&mut resp));
    }
    if client_h2 {
        never_index_date(resp.headers_mut());
    }
    Ok(resp.map(|b| b.map_err(BoxError::from).boxed()))
}

/// Sends an HTTP/2 response's `Date` as a literal the client does not index. h2's HPACK
/// encoder chains every value a header name has in the dynamic table and walks that chain,
/// oldest first, comparing values before each response. `Date` gets a new value every
/// second, so on a long-lived connection the chain grows by one stale date a second until
/// the table is full of them. Over one 80 s HTTP/2 load at a fixed 12,800 req/s (two runs
/// each), egress took 22.7-25.3 µs of CPU per request in each 10 s interval, the later ones
/// highest; never indexed, 18.6-23.6, mostly under 22. The cost is the literal's bytes (some
/// 22, Huffman-coded) in every response.
fn never_index_date(headers: &mut http::HeaderMap) {
    if let Some(date) = headers.get_mut(http::header::DATE) {
        date.set_sensitive(true);
    }
}

/// Copies bytes both ways once client and upstream have both switched protocols.
fn bridge(client: OnUpgrade, upstream: OnUpgrade) {
    tokio::spawn(async move {
        match tokio::try_join!(client, upstream) {
            Ok((c, u)) => {
                let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                let r = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                debug!(result = ?r, "upgraded connection closed");
            }
            Err(e) => warn!(error = %e, "upgrade failed"),
        }
    });
}

/// A request's one audit record: begun from its head, completed with its outcome when the
/// response head is known, and written when the response body ends or is cut off, so that
/// it carries the bytes both ways and the whole duration. Dropped unfinished (the client
/// cancelled the request before its answer), it is written as it stands.
struct RequestAudit<'a> {
    conn: &'a ConnInfo,
    /// Taken when finished; still here on drop means the request was cancelled.
    rec: Option<RequestRecord>,
    start: Instant,
    /// Request body bytes sent upstream, counted as they stream.
    bytes_up: Arc<AtomicU64>,
    /// The outcome decided so far.
    decided: Option<Outcome>,
}

/// The error of a request that ended before its answer: its client gave up on it (an HTTP/2
/// reset, a closed connection), or egress cut the connection off (a drain timeout).
const CANCELLED: &str =
    "ended before the response: the client went away or the connection was cut off";

impl<'a> RequestAudit<'a> {
    fn begin(rec: RequestRecord, conn: &'a ConnInfo) -> Self {
        RequestAudit {
            conn,
            rec: Some(rec),
            start: Instant::now(),
            bytes_up: Arc::new(AtomicU64::new(0)),
            decided: None,
        }
    }

    fn host(&self) -> &str {
        self.rec.as_ref().map_or("", |r| r.host.as_str())
    }

    /// The 403 for a refusal, audited as a denial.
    fn refuse(self, r: Refusal) -> Response<Body> {
        // A refused TLS server name is what the client asked for; show it rather than the
        // Host header.
        let shown = match r.code {
            DenyCode::HostNotAllowed | DenyCode::Doh => {
                self.conn.sni.as_deref().unwrap_or(self.host())
            }
            _ => self.host(),
        };
        let hint = r.hint.or_else(|| {
            (r.code == DenyCode::SecretNotAuthorized)
                .then(|| Fix::Secret.hint(&self.conn.conn.sandbox.policy.load().sandbox))
        });
        let resp = denied(shown, &r.reason, hint.as_deref(), r.code);
        let out = Outcome {
            decision: Decision::Deny,
            rule: r.rule,
            reason: Some(r.reason),
            error: None,
        };
        self.finish(resp, out)
    }

    /// Finishes with the outcome decided before forwarding, and the upstream's error if any.
    fn finish_decided(mut self, resp: Response<Body>, error: Option<String>) -> Response<Body> {
        let decided = self.decided.take().expect("decided before forwarding");
        let out = Outcome {
            error: error.or(decided.error),
            ..decided
        };
        self.finish(resp, out)
    }

    /// The tracing line goes out now, at debug: the audit log is the record, and formatting
    /// both cost 15-20% of CPU in benchmarks.
    fn finish(mut self, resp: Response<Body>, out: Outcome) -> Response<Body> {
        let mut rec = self.rec.take().expect("a request is finished once");
        let (start, bytes_up, conn) = (self.start, self.bytes_up.clone(), self.conn);
        let (shared, sb, meta) = (&conn.conn.shared, &conn.conn.sandbox, &conn.conn.meta);
        rec.status = resp.status().as_u16();
        rec.decision = out.decision;
        rec.rule = out.rule;
        rec.reason = out.reason;
        rec.error = out.error;
        debug!(
            sandbox = %sb.name,
            pid = meta.pid,
            comm = %meta.comm,
            client = %meta.client,
            orig_dst = %meta.orig_dst,
            sni = conn.sni.as_deref().unwrap_or(""),
            host = %rec.host,
            method = %rec.method,
            path = %rec.path,
            status = rec.status,
            decision = %rec.decision,
            rule = %rec.rule,
            tls = rec.tls.as_str(),
            duration_ms = start.elapsed().as_millis() as u64,
            error = rec.error.as_deref().or(rec.reason.as_deref()).unwrap_or(""),
            "request"
        );
        let (shared, sb) = (shared.clone(), sb.clone());
        resp.map(move |body| {
            Reported::new(
                body,
                Box::new(move |down, complete| {
                    rec.bytes_up = bytes_up.load(Ordering::Relaxed);
                    rec.bytes_down = down;
                    let elapsed = start.elapsed();
                    rec.duration_ms = elapsed.as_millis() as u64;
                    shared
                        .metrics
                        .request_duration
                        .observe(elapsed.as_secs_f64());
                    if !complete && rec.error.is_none() {
                        rec.error = Some("response body cut off".into());
                    }
                    sb.counters.requests.add(rec.decision);
                    shared.audit.record(&Record::Request(rec));
                }),
            )
            .boxed()
        })
    }
}

impl Drop for RequestAudit<'_> {
    fn drop(&mut self) {
        let Some(mut rec) = self.rec.take() else {
            return;
        };
        let (shared, sb) = (&self.conn.conn.shared, &self.conn.conn.sandbox);
        let decided = self.decided.take();
        rec.decision = decided.as_ref().map_or(Decision::Error, |o| o.decision);
        if let Some(o) = decided {
            rec.rule = o.rule;
            rec.reason = o.reason;
        }
        rec.error = Some(CANCELLED.into());
        rec.bytes_up = self.bytes_up.load(Ordering::Relaxed);
        rec.duration_ms = self.start.elapsed().as_millis() as u64;
        debug!(sandbox = %sb.name, host = %rec.host, path = %rec.path, "{CANCELLED}");
        sb.counters.requests.add(rec.decision);
        shared.audit.record(&Record::Request(rec));
    }
}
