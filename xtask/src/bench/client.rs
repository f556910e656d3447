//! The harness's own load generator, for what wrk, h2load and curl cannot measure: latency
//! percentiles at a fixed open-loop rate, first visits to new server names, handshake rates
//! over many names, many idle connections held at once, and bare connects. It also holds the
//! reference relay that sits behind an iptables REDIRECT for the capture comparison.
//!
//! It runs as `xtask bench --internal JSON` inside the sandbox (as the unprivileged user),
//! prints progress markers and one `@@RESULT {json}` line.

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use rustls::{
    client::Resumption,
    pki_types::{pem::PemObject as _, CertificateDer, ServerName},
    ClientConfig, RootCertStore,
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsConnector;

use super::parse::{self, Summary};

pub mod hostile;

/// Longest any single connect, handshake or exchange may take before it counts as an error.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a TLS job connects, and what it trusts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Tls {
    /// The origin's address: the client connects here and the capture sends it elsewhere.
    pub addr: SocketAddr,
    /// CA to trust; `None` means the bundle in `SSL_CERT_FILE` (what `egress run` sets).
    pub ca: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "job", rename_all = "kebab-case")]
pub enum Job {
    /// Requests at a fixed rate regardless of how fast answers come.
    OpenLoop {
        tls: Tls,
        name: String,
        path: String,
        rate: f64,
        secs: f64,
        /// Reuse `conns` connections, or open a new one per request.
        keepalive: bool,
        conns: usize,
    },
    /// Alternates a connection to a never-seen name with one to a warm name.
    FirstVisit {
        tls: Tls,
        warm: String,
        /// New names are `{prefix}{i}.{domain}`.
        prefix: String,
        domain: String,
        path: String,
        count: usize,
        secs: f64,
    },
    /// TLS handshakes (no request) as fast as `concurrency` allows.
    Handshakes {
        tls: Tls,
        /// `Some(prefix)`: every handshake names a new host `{prefix}{i}.{domain}`; `None`:
        /// every handshake names `domain` itself.
        prefix: Option<String>,
        domain: String,
        count: usize,
        concurrency: usize,
        secs: f64,
    },
    /// Opens connections with one request each and holds them idle.
    Idle {
        tls: Tls,
        name: String,
        path: String,
        count: usize,
        concurrency: usize,
        secs: f64,
        hold_secs: f64,
    },
    /// Plain TCP connect, half-close, wait for the server's close: the redirect's own cost.
    Connect {
        addr: SocketAddr,
        concurrency: usize,
        secs: f64,
    },
    /// `cargo xtask soak`: a steady client alone, then beside hostile ones.
    Soak(hostile::Plan),
    /// Transparent byte relay: the original destination from SO_ORIGINAL_DST (or `fallback`
    /// when the connection was addressed to the relay itself). Runs until killed.
    Relay {
        listen: SocketAddr,
        fallback: SocketAddr,
    },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct OpenLoopResult {
    pub latency_us: Summary,
    pub errors: usize,
    pub sent: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FirstVisitResult {
    pub visits: usize,
    pub errors: usize,
    /// Medians in microseconds: TLS handshake done, and first response complete.
    pub new_handshake_us: f64,
    pub warm_handshake_us: f64,
    pub new_total_us: f64,
    pub warm_total_us: f64,
    /// Medians of the per-pair differences (new minus the warm visit right after it).
    pub extra_handshake_us: f64,
    pub extra_total_us: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CountResult {
    pub done: usize,
    pub errors: usize,
    pub secs: f64,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
}

impl CountResult {
    pub fn per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.done as f64 / self.secs
        } else {
            0.0
        }
    }
}

pub fn run(job_json: &str) -> Result<()> {
    let job: Job = serde_json::from_str(job_json).context("parsing the internal job")?;
    // Mirrors the proxies' single worker: the load generator is one thread too.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let out = match job {
        Job::OpenLoop {
            tls,
            name,
            path,
            rate,
            secs,
            keepalive,
            conns,
        } => {
            let c = Client::new(&tls, &name)?;
            serde_json::to_string(&rt.block_on(open_loop(c, path, rate, secs, keepalive, conns))?)?
        }
        Job::FirstVisit {
            tls,
            warm,
            prefix,
            domain,
            path,
            count,
            secs,
        } => {
            let c = Client::new(&tls, &warm)?;
            let r = rt.block_on(first_visit(c, &prefix, &domain, &path, count, secs))?;
            serde_json::to_string(&r)?
        }
        Job::Handshakes {
            tls,
            prefix,
            domain,
            count,
            concurrency,
            secs,
        } => {
            let c = Client::new(&tls, &domain)?;
            let r = rt.block_on(handshakes(c, prefix, domain, count, concurrency, secs));
            serde_json::to_string(&r)?
        }
        Job::Idle {
            tls,
            name,
            path,
            count,
            concurrency,
            secs,
            hold_secs,
        } => {
            let c = Client::new(&tls, &name)?;
            let r = rt.block_on(idle(c, path, count, concurrency, secs, hold_secs));
            serde_json::to_string(&r)?
        }
        Job::Connect {
            addr,
            concurrency,
            secs,
        } => serde_json::to_string(&rt.block_on(connect_loop(addr, concurrency, secs)))?,
        Job::Soak(plan) => serde_json::to_string(&hostile::run(plan)?)?,
        Job::Relay { listen, fallback } => {
            // One worker thread, like the proxies under test.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            rt.block_on(relay(listen, fallback))?;
            return Ok(());
        }
    };
    println!("@@RESULT {out}");
    Ok(())
}

/// A TLS 1.3 client for one origin address. Resumption is off so that every connection pays
/// a full handshake, as wrk's and h2load's do.
#[derive(Clone)]
struct Client {
    addr: SocketAddr,
    connector: TlsConnector,
    name: String,
}

impl Client {
    fn new(tls: &Tls, name: &str) -> Result<Self> {
        let ca = match &tls.ca {
            Some(p) => p.clone(),
            None => std::env::var_os("SSL_CERT_FILE")
                .map(PathBuf::from)
                .context("no CA given and SSL_CERT_FILE is unset")?,
        };
        let config = client_config(&ca)?;
        Ok(Self {
            addr: tls.addr,
            connector: TlsConnector::from(config),
            name: name.to_owned(),
        })
    }

    async fn tls(
        &self,
        name: &str,
    ) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, Instant)> {
        let server = ServerName::try_from(name.to_owned())
            .with_context(|| format!("{name:?} is not a server name"))?;
        let tcp = timed(TcpStream::connect(self.addr)).await?;
        tcp.set_nodelay(true)?;
        let s = timed(self.connector.connect(server, tcp)).await?;
        Ok((s, Instant::now()))
    }
}

fn client_config(ca: &Path) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("reading {}", ca.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {}", ca.display()))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        bail!("no usable CA certificate in {}", ca.display());
    }
    let mut cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.resumption = Resumption::disabled();
    Ok(Arc::new(cfg))
}

async fn timed<T, E>(f: impl std::future::Future<Output = Result<T, E>>) -> Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => bail!("timed out after {OP_TIMEOUT:?}"),
    }
}

/// One HTTP/1.1 GET on an open connection; returns the body length.
async fn get<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    host: &str,
    path: &str,
    buf: &mut Vec<u8>,
) -> Result<u64> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: egress-bench\r\n\r\n");
    match tokio::time::timeout(OP_TIMEOUT, async {
        s.write_all(req.as_bytes()).await?;
        read_response(s, buf).await
    })
    .await
    {
        Ok(r) => r,
        Err(_) => bail!("no response within {OP_TIMEOUT:?}"),
    }
}

/// The parts of a response head the client needs.
#[derive(Debug, PartialEq)]
pub struct Head {
    pub status: u16,
    pub content_length: Option<u64>,
    pub chunked: bool,
    pub close: bool,
}

/// Parses a response head (without the final blank line).
pub fn parse_head(head: &[u8]) -> Result<Head> {
    let text = std::str::from_utf8(head).context("response head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    match parts.next() {
        Some(v) if v.starts_with("HTTP/1.") => {}
        _ => bail!("not an HTTP/1.x status line: {status_line:?}"),
    }
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status code in {status_line:?}"))?;
    let mut head = Head {
        status,
        content_length: None,
        chunked: false,
        close: false,
    };
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
        match k.as_str() {
            "content-length" => head.content_length = Some(v.parse().context("content-length")?),
            "transfer-encoding" => head.chunked = v.split(',').any(|t| t.trim() == "chunked"),
            "connection" => head.close = v.split(',').any(|t| t.trim() == "close"),
            _ => {}
        }
    }
    Ok(head)
}

/// Incremental decoder of a chunked body: feed it bytes, it says when the body is over.
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
    line: Vec<u8>,
    pub body: u64,
}

#[derive(Debug, Default, Clone, Copy)]
enum ChunkState {
    /// Reading a chunk-size line.
    #[default]
    Size,
    /// Skipping chunk data plus its CRLF: this many bytes left.
    Data(u64),
    /// After the zero-size chunk: trailer lines until a blank one.
    Trailer,
    Done,
}

impl Chunked {
    /// Consumes `data`; returns true once the last chunk and the trailer are in.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<bool> {
        while !data.is_empty() {
            match self.state {
                ChunkState::Done => break,
                ChunkState::Data(left) => {
                    let take = left.min(data.len() as u64);
                    data = &data[take as usize..];
                    self.state = match left - take {
                        0 => ChunkState::Size,
                        n => ChunkState::Data(n),
                    };
                }
                ChunkState::Size | ChunkState::Trailer => {
                    let Some(p) = data.iter().position(|&b| b == b'\n') else {
                        self.line.extend_from_slice(data);
                        if self.line.len() > 8192 {
                            bail!("chunk size or trailer line too long");
                        }
                        break;
                    };
                    self.line.extend_from_slice(&data[..p]);
                    data = &data[p + 1..];
                    let raw = std::mem::take(&mut self.line);
                    let line = std::str::from_utf8(&raw).context("chunk line is not UTF-8")?;
                    let line = line.strip_suffix('\r').unwrap_or(line);
                    self.state = match self.state {
                        ChunkState::Size => {
                            let hex = line.split(';').next().unwrap_or("").trim();
                            let size = u64::from_str_radix(hex, 16)
                                .with_context(|| format!("bad chunk size line {line:?}"))?;
                            self.body += size;
                            match size {
                                0 => ChunkState::Trailer,
                                n => ChunkState::Data(n + 2),
                            }
                        }
                        _ if line.is_empty() => ChunkState::Done,
                        other => other,
                    };
                }
            }
        }
        Ok(matches!(self.state, ChunkState::Done))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn read_response<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> Result<u64> {
    buf.clear();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(p) = find(buf, b"\r\n\r\n") {
            break p;
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before the response head");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = parse_head(&buf[..head_end])?;
    if head.status != 200 {
        bail!("HTTP status {}", head.status);
    }
    let mut rest = buf.split_off(head_end + 4);
    if head.chunked {
        let mut dec = Chunked::default();
        let mut done = dec.feed(&rest)?;
        while !done {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                bail!("connection closed inside a chunked body");
            }
            done = dec.feed(&chunk[..n])?;
        }
        return Ok(dec.body);
    }
    let len = head
        .content_length
        .context("response with neither Content-Length nor chunked")?;
    let mut have = rest.len() as u64;
    rest.clear();
    while have < len {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed after {have} of {len} body bytes");
        }
        have += n as u64;
    }
    Ok(len)
}

async fn open_loop(
    client: Client,
    path: String,
    rate: f64,
    secs: f64,
    keepalive: bool,
    conns: usize,
) -> Result<OpenLoopResult> {
    let total = (rate * secs).round().max(1.0) as usize;
    let samples = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let errors = Arc::new(AtomicUsize::new(0));
    // A plain thread keeps the schedule (nanosleep is far finer than tokio's millisecond
    // timer). Each request's latency runs from the moment it was released, so time spent
    // waiting for a free connection counts, as it must in an open-loop test.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let mut tasks = tokio::task::JoinSet::new();
    let client = Arc::new(client);
    let path = Arc::new(path);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    if keepalive {
        let mut opened = Vec::new();
        for _ in 0..conns.max(1) {
            opened.push(client.tls(&client.name).await?.0);
        }
        for mut s in opened {
            let (client, path, rx, samples, errors) = (
                client.clone(),
                path.clone(),
                rx.clone(),
                samples.clone(),
                errors.clone(),
            );
            tasks.spawn(async move {
                let mut buf = Vec::with_capacity(4096);
                loop {
                    let Some(released) = rx.lock().await.recv().await else {
                        break;
                    };
                    match get(&mut s, &client.name, &path, &mut buf).await {
                        Ok(_) => push(&samples, released.elapsed()),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            match client.tls(&client.name).await {
                                Ok((fresh, _)) => s = fresh,
                                Err(_) => break,
                            }
                        }
                    }
                }
            });
        }
    } else {
        let (client, path, rx, samples, errors) = (
            client.clone(),
            path.clone(),
            rx.clone(),
            samples.clone(),
            errors.clone(),
        );
        tasks.spawn(async move {
            let mut each = tokio::task::JoinSet::new();
            while let Some(released) = rx.lock().await.recv().await {
                let (client, path, samples, errors) = (
                    client.clone(),
                    path.clone(),
                    samples.clone(),
                    errors.clone(),
                );
                each.spawn(async move {
                    let r = async {
                        let (mut s, _) = client.tls(&client.name).await?;
                        get(&mut s, &client.name, &path, &mut Vec::new()).await
                    }
                    .await;
                    match r {
                        Ok(_) => push(&samples, released.elapsed()),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            while each.join_next().await.is_some() {}
        });
    }
    let scheduler = std::thread::spawn(move || {
        let start = Instant::now() + Duration::from_millis(20);
        for i in 0..total {
            let at = start + Duration::from_secs_f64(i as f64 / rate);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if tx.send(Instant::now()).is_err() {
                break;
            }
        }
    });
    let limit = Duration::from_secs_f64(secs) + OP_TIMEOUT + Duration::from_secs(5);
    let all = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(limit, all).await.is_err() {
        tasks.abort_all();
    }
    let _ = scheduler.join();
    let mut v = samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let errors = errors.load(Ordering::Relaxed) + total.saturating_sub(v.len()).min(total);
    Ok(OpenLoopResult {
        latency_us: parse::summarize(&mut v),
        errors: errors.min(total),
        sent: total,
    })
}

fn push(samples: &Mutex<Vec<f64>>, d: Duration) {
    samples
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(d.as_secs_f64() * 1e6);
}

/// Connect, handshake, one GET, close: returns (handshake, total) in microseconds.
async fn visit(client: &Client, name: &str, path: &str) -> Result<(f64, f64)> {
    let t0 = Instant::now();
    let (mut s, shaken) = client.tls(name).await?;
    get(&mut s, name, path, &mut Vec::new()).await?;
    let done = Instant::now();
    Ok((
        (shaken - t0).as_secs_f64() * 1e6,
        (done - t0).as_secs_f64() * 1e6,
    ))
}

async fn first_visit(
    client: Client,
    prefix: &str,
    domain: &str,
    path: &str,
    count: usize,
    secs: f64,
) -> Result<FirstVisitResult> {
    let warm = client.name.clone();
    for _ in 0..5 {
        visit(&client, &warm, path).await?;
    }
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let (mut nh, mut wh, mut nt, mut wt, mut dh, mut dt) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut errors = 0;
    for i in 0..count {
        if Instant::now() >= deadline {
            break;
        }
        let name = format!("{prefix}{i}.{domain}");
        match (
            visit(&client, &name, path).await,
            visit(&client, &warm, path).await,
        ) {
            (Ok((a, b)), Ok((c, d))) => {
                nh.push(a);
                nt.push(b);
                wh.push(c);
                wt.push(d);
                dh.push(a - c);
                dt.push(b - d);
            }
            _ => errors += 1,
        }
    }
    use parse::median;
    Ok(FirstVisitResult {
        visits: nh.len(),
        errors,
        new_handshake_us: median(&nh),
        warm_handshake_us: median(&wh),
        new_total_us: median(&nt),
        warm_total_us: median(&wt),
        extra_handshake_us: median(&dh),
        extra_total_us: median(&dt),
    })
}

/// Shared bookkeeping of the counting jobs.
#[derive(Default)]
struct Tally {
    done: AtomicUsize,
    errors: AtomicUsize,
    first_error: Mutex<Option<String>>,
}

impl Tally {
    fn error(&self, e: &anyhow::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(format!("{e:#}"));
        }
    }

    fn result(&self, secs: f64) -> CountResult {
        CountResult {
            done: self.done.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            secs,
            first_error: self
                .first_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

async fn handshakes(
    client: Client,
    prefix: Option<String>,
    domain: String,
    count: usize,
    concurrency: usize,
    secs: f64,
) -> CountResult {
    let tally = Arc::new(Tally::default());
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = tokio::task::JoinSet::new();
    let (client, prefix, domain) = (Arc::new(client), Arc::new(prefix), Arc::new(domain));
    for _ in 0..concurrency.max(1) {
        let (client, prefix, domain, tally, next) = (
            client.clone(),
            prefix.clone(),
            domain.clone(),
            tally.clone(),
            next.clone(),
        );
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count || Instant::now() >= deadline {
                    break;
                }
                let name = match prefix.as_deref() {
                    Some(p) => format!("{p}{i}.{domain}"),
                    None => domain.to_string(),
                };
                match client.tls(&name).await {
                    Ok(_) => {
                        tally.done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tally.error(&e),
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    tally.result(start.elapsed().as_secs_f64())
}

async fn idle(
    client: Client,
    path: String,
    count: usize,
    concurrency: usize,
    secs: f64,
    hold_secs: f64,
) -> CountResult {
    let tally = Arc::new(Tally::default());
    let next = Arc::new(AtomicUsize::new(0));
    let held = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = tokio::task::JoinSet::new();
    let (client, path) = (Arc::new(client), Arc::new(path));
    for _ in 0..concurrency.max(1) {
        let (client, path, tally, next, held) = (
            client.clone(),
            path.clone(),
            tally.clone(),
            next.clone(),
            held.clone(),
        );
        tasks.spawn(async move {
            let mut buf = Vec::with_capacity(4096);
            loop {
                if next.fetch_add(1, Ordering::Relaxed) >= count || Instant::now() >= deadline {
                    break;
                }
                let r = async {
                    let (mut s, _) = client.tls(&client.name).await?;
                    get(&mut s, &client.name, &path, &mut buf).await?;
                    Ok::<_, anyhow::Error>(s)
                }
                .await;
                match r {
                    Ok(s) => {
                        // Keep only the socket: the proxy still holds a live TLS session and
                        // an idle keep-alive connection, while this client stays small.
                        let (tcp, _) = s.into_inner();
                        held.lock().unwrap_or_else(|e| e.into_inner()).push(tcp);
                        tally.done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tally.error(&e),
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let result = tally.result(start.elapsed().as_secs_f64());
    println!("@@HELD {}", result.done);
    let _ = std::io::stdout().flush();
    tokio::time::sleep(Duration::from_secs_f64(hold_secs)).await;
    drop(held);
    result
}

async fn connect_loop(addr: SocketAddr, concurrency: usize, secs: f64) -> CountResult {
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let tally = tally.clone();
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let r = async {
                    let mut s = timed(TcpStream::connect(addr)).await?;
                    // FIN first, then wait for the acceptor's close: the connection has
                    // been through the capture and reached the user-space acceptor.
                    s.shutdown().await?;
                    let mut b = [0u8; 64];
                    loop {
                        match timed(s.read(&mut b)).await? {
                            0 => break,
                            _ => continue,
                        }
                    }
                    Ok::<_, anyhow::Error>(())
                }
                .await;
                match r {
                    Ok(()) => {
                        tally.done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tally.error(&e),
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    tally.result(start.elapsed().as_secs_f64())
}

/// The original destination iptables recorded for `s`, if it was redirected.
fn original_dst(s: &TcpStream) -> Option<SocketAddr> {
    let sa = nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::OriginalDst).ok()?;
    Some(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    )))
}

async fn relay(listen: SocketAddr, fallback: SocketAddr) -> Result<()> {
    let l = TcpListener::bind(listen).await?;
    let listen = l.local_addr()?;
    loop {
        let (mut client, _) = match l.accept().await {
            Ok(x) => x,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            let dst = original_dst(&client)
                .filter(|d| *d != listen)
                .unwrap_or(fallback);
            // Like egress: read the first bytes before choosing and dialling the upstream.
            let mut first = vec![0u8; 2048];
            let n = match tokio::time::timeout(OP_TIMEOUT, client.read(&mut first)).await {
                Ok(Ok(n)) if n > 0 => n,
                _ => return,
            };
            let Ok(Ok(mut up)) = tokio::time::timeout(OP_TIMEOUT, TcpStream::connect(dst)).await
            else {
                return;
            };
            let _ = up.set_nodelay(true);
            if up.write_all(&first[..n]).await.is_err() {
                return;
            }
            let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_heads() {
        let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\nConnection: close")
            .expect("head");
        assert_eq!(
            h,
            Head {
                status: 200,
                content_length: Some(1024),
                chunked: false,
                close: true
            }
        );
        let h = parse_head(b"HTTP/1.1 403 Forbidden\r\ntransfer-encoding: gzip, Chunked")
            .expect("head");
        assert_eq!((h.status, h.chunked, h.content_length), (403, true, None));
        assert!(parse_head(b"SSH-2.0-OpenSSH").is_err());
        assert!(parse_head(b"HTTP/1.1 abc").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x").is_err());
    }

    #[test]
    fn chunked_body_in_one_piece() {
        let mut d = Chunked::default();
        assert!(d
            .feed(b"4\r\nwiki\r\n5;ext=1\r\npedia\r\n0\r\n\r\n")
            .expect("decode"));
        assert_eq!(d.body, 9);
    }

    #[test]
    fn chunked_body_at_every_split() {
        let wire = b"a\r\n0123456789\r\n3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n";
        for cut in 0..=wire.len() {
            let mut d = Chunked::default();
            let first = d.feed(&wire[..cut]).expect("first part");
            let done = first || d.feed(&wire[cut..]).expect("second part");
            assert!(done, "not done when split at {cut}");
            assert_eq!(d.body, 13, "split at {cut}");
        }
        // Byte by byte.
        let mut d = Chunked::default();
        let mut done = false;
        for b in wire.iter() {
            done = d.feed(std::slice::from_ref(b)).expect("byte");
        }
        assert!(done);
        assert_eq!(d.body, 13);
    }

    #[test]
    fn chunked_body_incomplete_and_bad() {
        let mut d = Chunked::default();
        assert!(!d.feed(b"4\r\nwik").expect("partial"));
        assert!(Chunked::default().feed(b"zz\r\n").is_err());
    }

    #[test]
    fn jobs_round_trip_as_json() {
        let j = Job::Connect {
            addr: "127.0.0.2:80".parse().expect("addr"),
            concurrency: 8,
            secs: 1.5,
        };
        let s = serde_json::to_string(&j).expect("json");
        assert!(s.contains("\"job\":\"connect\""), "{s}");
        assert!(matches!(
            serde_json::from_str::<Job>(&s).expect("back"),
            Job::Connect { concurrency: 8, .. }
        ));
    }

    #[test]
    fn count_rate() {
        let r = CountResult {
            done: 50,
            secs: 2.0,
            ..Default::default()
        };
        assert_eq!(r.per_sec(), 25.0);
        assert_eq!(CountResult::default().per_sec(), 0.0);
    }
}
