//! The admin endpoint of the daemon, on loopback by default: `/healthz` (the process runs),
//! `/readyz` (everything it must do before it governs its sandboxes is done, and it is not
//! draining), `/metrics` (Prometheus, through `prometheus-client`).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::ConstCounter,
        gauge::ConstGauge,
        histogram::{exponential_buckets, Histogram},
        MetricType,
    },
    registry::{Registry, Unit},
};
use tokio::net::TcpListener;

use crate::{bpf::Kernel, state::Shared};

/// What keeps the daemon from being ready, and whether it is draining.
#[derive(Debug, Default)]
pub struct Readiness {
    pending: Mutex<BTreeMap<String, String>>,
    draining: AtomicBool,
}

impl Readiness {
    /// Marks `key` pending, with a message for `/readyz`.
    pub fn pending(&self, key: impl Into<String>, why: impl Into<String>) {
        self.lock().insert(key.into(), why.into());
    }

    pub fn done(&self, key: &str) {
        self.lock().remove(key);
    }

    /// Done with every key starting with `prefix`.
    pub fn done_prefix(&self, prefix: &str) {
        self.lock().retain(|k, _| !k.starts_with(prefix));
    }

    pub fn draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// `Ok` when ready; else what is pending, one line each.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut why: Vec<String> = self.lock().values().cloned().collect();
        if self.draining.load(Ordering::SeqCst) {
            why.insert(0, "draining: shutting down".into());
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Metrics observed on the data path itself (the rest is read from counters at scrape time).
#[derive(Debug)]
pub struct DataMetrics {
    /// Seconds from a request's head to the end of its response body.
    pub request_duration: Histogram,
    /// Kernel refusals the ring buffer had no room for, as audited by this process
    /// (`events_lost` records).
    pub kernel_events_lost: std::sync::atomic::AtomicU64,
}

impl Default for DataMetrics {
    fn default() -> Self {
        DataMetrics {
            request_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            kernel_events_lost: Default::default(),
        }
    }
}

/// Reads every per-sandbox and process counter at scrape time.
struct Counters {
    shared: Arc<Shared>,
    kernel: Option<Arc<Kernel>>,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counters")
            .field("kernel", &self.kernel)
            .finish()
    }
}

type Labels<'a> = [(&'static str, &'a str); 2];

fn family<'a, T: EncodeMetric>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl IntoIterator<Item = (Labels<'a>, T)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in series {
        v.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn single<T: EncodeMetric>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: T,
) -> Result<(), std::fmt::Error> {
    let m = enc.encode_descriptor(name, help, None, v.metric_type())?;
    v.encode(m)
}

impl Collector for Counters {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let sandboxes = self.shared.registry.all();
        let by_decision = |pick: fn(&crate::state::Counters) -> &crate::state::DecisionCounts| {
            sandboxes
                .iter()
                .flat_map(move |s| {
                    let c = pick(&s.counters);
                    c.all().filter(|(_, n)| *n > 0).map(move |(d, n)| {
                        (
                            [("sandbox", s.name.as_str()), ("decision", d.as_str())],
                            ConstCounter::new(n),
                        )
                    })
                })
                .collect::<Vec<_>>()
        };
        family(
            &mut enc,
            "egress_requests",
            "HTTP requests, by sandbox and decision",
            MetricType::Counter,
            by_decision(|c| &c.requests),
        )?;
        family(
            &mut enc,
            "egress_connections",
            "Connections judged before any request (passthrough, refused), by sandbox and decision",
            MetricType::Counter,
            by_decision(|c| &c.connections),
        )?;
        family(
            &mut enc,
            "egress_dns_queries",
            "DNS queries, by sandbox and decision",
            MetricType::Counter,
            by_decision(|c| &c.dns),
        )?;
        let kernel: Vec<_> = sandboxes
            .iter()
            .flat_map(|s| {
                let k = &s.counters.kernel_denies;
                [("tcp", &k.tcp), ("udp", &k.udp), ("other", &k.other)]
                    .into_iter()
                    .map(move |(p, c)| {
                        (
                            [("sandbox", s.name.as_str()), ("protocol", p)],
                            ConstCounter::new(c.load(Relaxed)),
                        )
                    })
            })
            .collect();
        family(
            &mut enc,
            "egress_kernel_denies",
            "Connects, sends and sockets the kernel refused, by sandbox and protocol",
            MetricType::Counter,
            kernel,
        )?;
        let mut m = enc.encode_descriptor(
            "egress_active_connections",
            "Connections and DNS queries being served, by sandbox",
            None,
            MetricType::Gauge,
        )?;
        for s in &sandboxes {
            let v = i64::try_from(s.counters.active.load(Relaxed)).unwrap_or(i64::MAX);
            ConstGauge::new(v).encode(m.encode_family(&[("sandbox", s.name.as_str())])?)?;
        }
        let leaves = &self.shared.leaves;
        single(
            &mut enc,
            "egress_leaf_cache_hits",
            "TLS handshakes served with a cached leaf certificate",
            ConstCounter::new(leaves.hits()),
        )?;
        single(
            &mut enc,
            "egress_leaf_cache_misses",
            "TLS handshakes that had to mint a leaf certificate",
            ConstCounter::new(leaves.minted() + leaves.failures()),
        )?;
        single(
            &mut enc,
            "egress_audit_records_written",
            "Audit records written",
            ConstCounter::new(self.shared.audit.written()),
        )?;
        single(
            &mut enc,
            "egress_audit_records_lost",
            "Audit records that could not be written",
            ConstCounter::new(self.shared.audit.dropped()),
        )?;
        // The kernel's own counters live in a pinned map: they keep counting across
        // daemon restarts.
        use egress_common::Counter as K;
        let k = |c: K| self.kernel.as_ref().map_or(0, |k| k.counter(c));
        for (name, help, c) in [
            (
                "egress_kernel_events_lost",
                "Kernel refusals not reported because the ring buffer was full",
                K::EventsLost,
            ),
            (
                "egress_kernel_redirected",
                "Connects the kernel sent to a proxy listener, all sandboxes",
                K::Redirected,
            ),
            (
                "egress_kernel_dns_redirected",
                "DNS queries the kernel sent to a DNS listener, all sandboxes",
                K::DnsRedirected,
            ),
            (
                "egress_kernel_record_failed",
                "Redirected connects whose original destination could not be recorded",
                K::RecordFailed,
            ),
            (
                "egress_kernel_refused",
                "Connects, sends and sockets the kernel refused, all sandboxes",
                K::Denied,
            ),
            (
                "egress_kernel_strict_dropped",
                "Packets the --strict backstop dropped, all sandboxes",
                K::StrictDropped,
            ),
        ] {
            single(&mut enc, name, help, ConstCounter::new(k(c)))?;
        }
        single(
            &mut enc,
            "egress_sandboxes",
            "Sandboxes registered",
            ConstGauge::new(i64::try_from(sandboxes.len()).unwrap_or(i64::MAX)),
        )?;
        Ok(())
    }
}

/// The Prometheus registry of one process.
pub fn registry(shared: &Arc<Shared>, kernel: Option<Arc<Kernel>>) -> Registry {
    let mut r = Registry::default();
    r.register_with_unit(
        "egress_request_duration",
        "Time from a request's head to the end of its response body",
        Unit::Seconds,
        shared.metrics.request_duration.clone(),
    );
    r.register_collector(Box::new(Counters {
        shared: shared.clone(),
        kernel,
    }));
    r
}

/// The metrics registry, set once the programs are loaded; `/metrics` answers 503 before.
pub type MetricsSlot = Arc<std::sync::OnceLock<Arc<Registry>>>;

/// Serves `/healthz`, `/readyz` and `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, ready: Arc<Readiness>, metrics: MetricsSlot) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let (ready, metrics) = (ready.clone(), metrics.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let r = route(&req, &ready, &metrics);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn route(
    req: &Request<Incoming>,
    ready: &Readiness,
    metrics: &MetricsSlot,
) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "GET only\n".into());
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" => match ready.check() {
            Ok(()) => text(StatusCode::OK, PLAIN, "ready\n".into()),
            Err(why) => {
                let mut body = String::from("not ready, pending:\n");
                for w in why {
                    body.push_str("- ");
                    body.push_str(&w);
                    body.push('\n');
                }
                text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, body)
            }
        },
        "/metrics" => {
            let Some(metrics) = metrics.get() else {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    "not ready: the programs are loading\n".into(),
                );
            };
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, metrics) {
                Ok(()) => text(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    out,
                ),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, PLAIN, format!("{e}\n")),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found; try /healthz, /readyz or /metrics\n".into(),
        ),
    }
}

/// Binds the admin address (before anything slow, so `/healthz` answers while loading).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
