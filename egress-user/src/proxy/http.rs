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
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use super::{
    decide::{self, DenyCode},
    metered::{Counted, Reported},
    upstream::{Body, BoxError, PoolKey},
    Conn,
};
use crate::{
    audit::{self, Decision, Record, RequestRecord, TlsMode},
    policy::normalize_host,
    secrets,
};

/// Per client connection: who it is and how it arrived.
pub struct ConnInfo {
    pub conn: Conn,
    /// SNI the client sent, when it arrived over TLS.
    pub sni: Option<String>,
    pub tls: bool,
}

pub async fn serve<I>(io: I, conn: Arc<ConnInfo>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(req, &conn).await) }
    });
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(super::HEADER_READ_TIMEOUT)
        .max_buf_size(super::MAX_HEADER_BYTES);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(super::MAX_HEADER_BYTES as u32)
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)));
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

/// The 403 a refused request gets: JSON naming the host and why, plus `X-Egress-Denied`.
pub fn denied(host: &str, reason: &str, code: DenyCode) -> Response<Body> {
    let body = serde_json::json!({ "error": "egress_denied", "host": host, "reason": reason });
    let mut r = full(
        StatusCode::FORBIDDEN,
        "application/json",
        format!("{body}\n"),
    );
    r.headers_mut()
        .insert("x-egress-denied", HeaderValue::from_static(code.as_str()));
    r
}

fn upstream_failed(e: &super::upstream::Error) -> Response<Body> {
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

impl Outcome {
    fn deny(reason: &str) -> Self {
        Outcome {
            decision: Decision::Deny,
            rule: String::new(),
            reason: Some(reason.to_owned()),
            error: None,
        }
    }
}

async fn handle(mut req: Request<Incoming>, conn: &ConnInfo) -> Response<Body> {
    let start = Instant::now();
    let (shared, sb) = (&conn.conn.shared, &conn.conn.sandbox);
    let meta = &conn.conn.meta;
    let orig_ip = meta.orig_dst.0.ip().to_string();
    let raw_host = req
        .uri()
        .authority()
        .map(|a| a.host().to_owned())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .or_else(|| conn.sni.clone())
        .unwrap_or_else(|| orig_ip.clone());
    let host = normalize_host(&raw_host);
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_owned();
    let record = RequestRecord {
        who: conn.conn.who(),
        client: meta.client.to_string(),
        orig_dst: meta.orig_dst.to_string(),
        sni: conn.sni.clone(),
        host: host.clone(),
        method: req.method().to_string(),
        path: audit::redact_path(&path_and_query, shared.audit_query),
        tls: if conn.tls {
            TlsMode::Mitm
        } else {
            TlsMode::Plain
        },
        ..Default::default()
    };
    let bytes_up = Arc::new(AtomicU64::new(0));

    // One audit record when the body ends; the tracing line (at debug: the audit log is the
    // record, and formatting both cost 15-20% of CPU in benchmarks) when the head is known.
    let finish = |resp: Response<Body>, out: Outcome| -> Response<Body> {
        let mut rec = record.clone();
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
        let (shared, sb, up) = (shared.clone(), sb.clone(), bytes_up.clone());
        resp.map(move |body| {
            Reported::new(
                body,
                Box::new(move |down, complete| {
                    rec.bytes_up = up.load(Ordering::Relaxed);
                    rec.bytes_down = down;
                    rec.duration_ms = start.elapsed().as_millis() as u64;
                    if !complete && rec.error.is_none() {
                        rec.error = Some("response body cut off".into());
                    }
                    sb.counters.requests.add(rec.decision);
                    shared.audit.record(&Record::Request(rec));
                }),
            )
            .boxed()
        })
    };

    let live = sb.policy.load_full();
    let dst = meta.orig_dst.0.ip();
    let verdict = decide::request(
        &live.sandbox,
        &decide::Subject {
            sni: conn.sni.as_deref(),
            host: &host,
            method: req.method(),
            path: req.uri().path(),
            headers: req.headers(),
            dst,
        },
        &|name| sb.pins.resolves_to(sb.id, name, dst),
    );
    if verdict.denied() {
        let reason = verdict.reason.clone().unwrap_or_default();
        let shown = if matches!(verdict.code, Some(DenyCode::HostNotAllowed | DenyCode::Doh)) {
            conn.sni.as_deref().unwrap_or(&host)
        } else {
            &host
        };
        let out = Outcome {
            decision: Decision::Deny,
            rule: verdict.rule,
            reason: Some(reason.clone()),
            error: None,
        };
        drain_refused_body(req.into_body()).await;
        // decide gives every refusal a code; the fallback only keeps a slip there a 403.
        let code = verdict.code.unwrap_or(DenyCode::Policy);
        return finish(denied(shown, &reason, code), out);
    }
    let rule = verdict.rule.clone();
    let outcome = || Outcome {
        decision: verdict.decision,
        rule: rule.clone(),
        reason: verdict.reason.clone(),
        error: None,
    };

    if let Some(r) = verdict.host_rule {
        let h = req.headers_mut();
        for name in &r.remove_headers {
            h.remove(name);
        }
        for (name, value) in &r.set_headers {
            h.insert(name.clone(), value.clone());
        }
        for (name, value) in &r.add_headers {
            h.append(name.clone(), value.clone());
        }
    }

    // Secrets: placeholders become real values toward authorized hosts only; a placeholder
    // or a real value bound anywhere else is refused, whatever the mode.
    let plan = live.secrets.plan(&host);
    let (mut parts, body) = req.into_parts();
    let mut violation = None;
    if !plan.is_noop() {
        match plan.apply_head(&mut parts) {
            Ok(_) => {}
            Err(secrets::ApplyError::Violation(v)) => {
                let reason = v.to_string();
                let out = Outcome::deny(&reason);
                return finish(denied(&host, &reason, DenyCode::SecretNotAuthorized), out);
            }
            Err(e) => {
                let reason = e.to_string();
                let out = Outcome::deny(&reason);
                return finish(
                    denied(&host, &reason, DenyCode::SecretSubstitutionFailed),
                    out,
                );
            }
        }
        if plan.rewrites_body() {
            parts.headers.remove(http::header::CONTENT_LENGTH);
        }
    }
    let mut req = Request::from_parts(parts, body);

    let key = PoolKey {
        dst: meta.orig_dst.0,
        tls_name: conn
            .tls
            .then(|| conn.sni.clone().unwrap_or_else(|| orig_ip.clone())),
    };
    let upgrade = is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let req = req.map(|b| {
        let counted = Counted::new(b.map_err(BoxError::from).boxed(), bytes_up.clone());
        if plan.is_noop() {
            counted.boxed()
        } else {
            let scanned = plan.wrap_body(counted);
            violation = Some(scanned.violation_handle());
            scanned.boxed()
        }
    });
    let sent = if upgrade {
        sb.pool.send_upgrade(&key, req).await
    } else {
        sb.pool.send(&key, req).await
    };
    let mut resp = match sent {
        Ok(r) => r,
        Err(e) => {
            // A body that broke off because it carried a secret is a refusal, not an
            // upstream failure.
            if let Some(v) = violation.as_ref().and_then(|h| h.get()) {
                let reason = v.to_string();
                let out = Outcome::deny(&reason);
                return finish(denied(&host, &reason, DenyCode::SecretNotAuthorized), out);
            }
            let mut out = outcome();
            out.error = Some(crate::error_chain(&e));
            return finish(upstream_failed(&e), out);
        }
    };
    if let Some(client_upgrade) =
        client_upgrade.filter(|_| resp.status() == StatusCode::SWITCHING_PROTOCOLS)
    {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((c, u)) => {
                    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                    let r = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                    debug!(result = ?r, "upgraded connection closed");
                }
                Err(e) => warn!(error = %e, "upgrade failed"),
            }
        });
    }
    finish(resp.map(|b| b.map_err(BoxError::from).boxed()), outcome())
}
