//! The interceptor's data path: accept a redirected connection, find where it was going,
//! and hand it on.
//!
//! The original destination comes only from the kernel's record, found by the connection's
//! 4-tuple and deleted on first use. A connection with no record (a direct connect to the
//! listener, or a record the kernel failed to write) is closed and logged: never guessed.

pub mod relay;

use std::{sync::Arc, time::Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tracing::{info_span, warn, Instrument as _};

use crate::{
    addr::{self, ClientAddr, ListenAddr, OrigDst},
    bpf::OrigDstTable,
    netns,
};

/// What the kernel recorded about one redirected connection.
#[derive(Clone, Debug)]
pub struct ConnMeta {
    pub orig_dst: OrigDst,
    pub client: ClientAddr,
    pub sandbox: u32,
    pub pid: u32,
    pub comm: String,
}

/// A bound proxy listener and the namespace cookie its connections are keyed with.
#[derive(Debug)]
pub struct Listener {
    inner: std::net::TcpListener,
    netns: u64,
    addr: ListenAddr,
}

impl Listener {
    /// Wraps a bound std listener (bound in whatever namespace the sandbox lives in).
    pub fn new(inner: std::net::TcpListener) -> std::io::Result<Self> {
        inner.set_nonblocking(true)?;
        let netns = netns::socket_netns_cookie(&inner)?;
        let addr = ListenAddr(inner.local_addr()?);
        Ok(Self { inner, netns, addr })
    }

    pub fn addr(&self) -> ListenAddr {
        self.addr
    }
}

/// Counters of the data path, read by tests and, later, metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: std::sync::atomic::AtomicU64,
    pub no_orig_dst: std::sync::atomic::AtomicU64,
}

/// Accepts connections until the task is dropped.
///
/// Connection tasks go on `conns`, so that shutdown can let them finish (and write their log
/// lines) instead of cutting them off.
pub async fn serve(
    listener: Listener,
    table: Arc<OrigDstTable>,
    stats: Arc<Stats>,
    conns: TaskTracker,
) -> std::io::Result<()> {
    let Listener {
        inner,
        netns,
        addr: listen,
    } = listener;
    let inner = TcpListener::from_std(inner)?;
    let mut next_id: u64 = 0;
    loop {
        let (stream, peer) = match inner.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, keep serving.
                warn!(%listen, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        stats
            .accepted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        next_id += 1;
        let client = ClientAddr(std::net::SocketAddr::new(
            peer.ip().to_canonical(),
            peer.port(),
        ));
        let key = addr::sock_key(netns, client, listen);
        let Some(rec) = table.take(&key) else {
            stats
                .no_orig_dst
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            warn!(%client, %listen, "connection refused: no original destination recorded for it");
            drop(stream);
            continue;
        };
        let meta = ConnMeta {
            orig_dst: addr::orig_dst(&rec),
            client,
            sandbox: rec.sandbox,
            pid: rec.tgid,
            comm: addr::comm(&rec.comm),
        };
        let span = info_span!(
            "conn",
            id = next_id,
            sandbox = meta.sandbox,
            orig_dst = %meta.orig_dst,
        );
        conns.spawn(handle(stream, meta).instrument(span));
    }
}

async fn handle(stream: TcpStream, meta: ConnMeta) {
    let start = Instant::now();
    let _ = stream.set_nodelay(true);
    relay::relay(stream, &meta, start).await;
}
