//! Passthrough: splice the client to its original destination without decrypting. The
//! client sees the upstream's own certificate; egress sees only the SNI and byte counts.

use tokio::net::TcpStream;
use tracing::{info, warn};

use super::{prefixed::Prefixed, upstream, ConnMeta, Ctx};
use crate::audit::ConnectionRecord;

pub async fn splice(
    mut client: Prefixed<TcpStream>,
    meta: &ConnMeta,
    sni: &str,
    rule: &str,
    ctx: &Ctx,
) {
    let start = std::time::Instant::now();
    let mut up = match upstream::connect_tcp(meta.orig_dst.0).await {
        Ok(s) => s,
        Err(e) => {
            let error = crate::error_chain(&e);
            warn!(
                sni,
                rule, error, "passthrough upstream unreachable; connection closed"
            );
            let rec = ConnectionRecord {
                sni: Some(sni.to_owned()),
                decision: "passthrough",
                rule: rule.to_owned(),
                tls: "passthrough",
                duration_ms: start.elapsed().as_millis() as u64,
                error: Some(error),
                ..Default::default()
            };
            ctx.audit_connection(meta, rec);
            return;
        }
    };
    let r = tokio::io::copy_bidirectional(&mut client, &mut up).await;
    let (bytes_up, bytes_down, error) = match r {
        Ok((u, d)) => (u, d, String::new()),
        Err(e) => (0, 0, e.to_string()),
    };
    info!(
        sandbox = meta.sandbox,
        pid = meta.pid,
        comm = %meta.comm,
        client = %meta.client,
        orig_dst = %meta.orig_dst,
        sni,
        rule,
        decision = "passthrough",
        tls = "passthrough",
        bytes_up,
        bytes_down,
        duration_ms = start.elapsed().as_millis() as u64,
        error,
        "connection closed"
    );
    let rec = ConnectionRecord {
        sni: Some(sni.to_owned()),
        decision: "passthrough",
        rule: rule.to_owned(),
        tls: "passthrough",
        bytes_up,
        bytes_down,
        duration_ms: start.elapsed().as_millis() as u64,
        error: (!error.is_empty()).then_some(error),
        ..Default::default()
    };
    ctx.audit_connection(meta, rec);
}
