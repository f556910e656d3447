//! TLS termination toward the sandboxed client with a leaf minted for its SNI (or for the
//! destination IP when it sent none), then the HTTP service.

use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::warn;

use super::{
    http::{self, ConnInfo},
    prefixed::Prefixed,
    sniff::ClientHelloInfo,
    Conn,
};
use crate::{
    tls::mint::{server_config, LeafId},
    upstream::Ahead,
};

pub async fn intercept(
    stream: Prefixed<TcpStream>,
    conn: Conn,
    hello: ClientHelloInfo,
    ahead: Option<Ahead>,
) {
    let id = match &hello.sni {
        Some(sni) => LeafId::from_host(sni),
        None => LeafId::from(conn.meta.orig_dst.0.ip()),
    };
    // A minting failure aborts this handshake only; it is logged and counted, never a panic
    // and never a fallback to some other certificate.
    let cert = match conn.shared.leaves.get(&id) {
        Ok(c) => c,
        Err(e) => {
            warn!(leaf = %id, error = %crate::error_chain(&e), "certificate minting failed; handshake aborted");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(cert, &[b"h2", b"http/1.1"]));
    let tls = match tokio::time::timeout(super::HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            warn!(leaf = %id, error = %e, "client TLS handshake failed (does the client trust the egress CA?)");
            return;
        }
        Err(_) => {
            warn!(leaf = %id, "client TLS handshake timed out");
            return;
        }
    };
    http::serve(tls, Arc::new(ConnInfo::new(conn, hello.sni, true, ahead))).await;
}
