//! Plain byte relay to the original destination, opened from egress's own cgroup (which is
//! never a sandbox, so the connect is not redirected again).

use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tracing::{info, warn};

use super::ConnMeta;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("upstream connect to {dst} timed out after {CONNECT_TIMEOUT:?}")]
    ConnectTimeout { dst: std::net::SocketAddr },
    #[error("upstream connect to {dst} failed")]
    Connect {
        dst: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

async fn connect(dst: std::net::SocketAddr) -> Result<TcpStream, Error> {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
        Err(_) => Err(Error::ConnectTimeout { dst }),
        Ok(Err(source)) => Err(Error::Connect { dst, source }),
        Ok(Ok(s)) => Ok(s),
    }
}

pub async fn relay(mut client: TcpStream, meta: &ConnMeta, start: Instant) {
    let dst = meta.orig_dst.0;
    let mut upstream = match connect(dst).await {
        Ok(s) => s,
        Err(e) => {
            warn!(
                sandbox = meta.sandbox,
                pid = meta.pid,
                comm = %meta.comm,
                client = %meta.client,
                orig_dst = %meta.orig_dst,
                error = %crate::error_chain(&e),
                "upstream unreachable; connection closed"
            );
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let (up, down, err) = match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => (up, down, None),
        Err(e) => (0, 0, Some(e.to_string())),
    };
    info!(
        sandbox = meta.sandbox,
        pid = meta.pid,
        comm = %meta.comm,
        client = %meta.client,
        orig_dst = %meta.orig_dst,
        bytes_up = up,
        bytes_down = down,
        duration_ms = start.elapsed().as_millis() as u64,
        error = err.as_deref().unwrap_or(""),
        "connection closed"
    );
}
