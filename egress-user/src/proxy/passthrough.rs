//! Passthrough: splice the client to its original destination without decrypting. The
//! client sees the upstream's own certificate; egress sees only the SNI and byte counts.

use tokio::net::TcpStream;
use tracing::{info, warn};

use super::{prefixed::Prefixed, Conn};
use crate::audit::{ConnectionRecord, Decision, TlsMode};

pub async fn splice(mut client: Prefixed<TcpStream>, conn: &Conn, sni: &str, rule: &str) {
    let start = std::time::Instant::now();
    let meta = &conn.meta;
    let mut up = match conn.sandbox.pool.connect_tcp(meta.orig_dst.0).await {
        Ok(s) => s,
        Err(e) => {
            let error = crate::error_chain(&e);
            warn!(
                sni,
                rule, error, "passthrough upstream unreachable; connection closed"
            );
            let rec = ConnectionRecord {
                sni: Some(sni.to_owned()),
                decision: Decision::Passthrough,
                rule: rule.to_owned(),
                tls: TlsMode::Passthrough,
                duration_ms: start.elapsed().as_millis() as u64,
                error: Some(error),
                ..Default::default()
            };
            conn.audit_connection(rec);
            return;
        }
    };
    let r = tokio::io::copy_bidirectional(&mut client, &mut up).await;
    let (bytes_up, bytes_down, error) = match r {
        Ok((u, d)) => (u, d, String::new()),
        Err(e) => (0, 0, e.to_string()),
    };
    info!(
        sandbox = %conn.sandbox.name,
        pid = meta.pid,
        comm = %meta.comm,
        client = %meta.client,
        orig_dst = %meta.orig_dst,
        sni,
        rule,
        decision = Decision::Passthrough.as_str(),
        tls = TlsMode::Passthrough.as_str(),
        bytes_up,
        bytes_down,
        duration_ms = start.elapsed().as_millis() as u64,
        error,
        "connection closed"
    );
    let rec = ConnectionRecord {
        sni: Some(sni.to_owned()),
        decision: Decision::Passthrough,
        rule: rule.to_owned(),
        tls: TlsMode::Passthrough,
        bytes_up,
        bytes_down,
        duration_ms: start.elapsed().as_millis() as u64,
        error: (!error.is_empty()).then_some(error),
        ..Default::default()
    };
    conn.audit_connection(rec);
}
