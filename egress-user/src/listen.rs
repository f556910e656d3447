//! The listeners of one network namespace: the proxy on TCP and the DNS listener on UDP and
//! TCP, each on 127.0.0.1 and, where loopback has IPv6, on [::1].
//!
//! Listeners are sandbox-agnostic: the kernel rewrites a sandbox's connects to the listeners
//! of the namespace that sandbox lives in, and every accepted connection or datagram names
//! its sandbox through the kernel's record. Sandboxes sharing a namespace (the containers of
//! a pod, or every host-namespace sandbox of the daemon) share one set.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    sync::Arc,
};

use tokio::task::JoinHandle;
use tracing::warn;

use crate::{
    dns::DnsSockets,
    netns::NetnsId,
    proxy::{self, Listener},
    state::{ListenStats, Shared},
};

#[derive(Debug, thiserror::Error)]
#[error("binding the {what} listener on {addr}")]
pub struct Error {
    pub what: &'static str,
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Which ports the listeners take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ports {
    /// Free ports the kernel picks (`egress run`: several runs share the host's ports).
    Ephemeral,
    /// The same ports in every namespace (the daemon: each namespace has its own ports, and
    /// a restarted daemon binds where the pinned programs still point).
    Fixed { proxy: u16, dns: u16 },
}

/// Bound, not yet served.
pub struct Sockets {
    proxy4: Listener,
    proxy6: Option<Listener>,
    dns4: DnsSockets,
    dns6: Option<DnsSockets>,
}

impl Sockets {
    /// Binds on loopback in the calling thread's network namespace.
    pub fn bind(ports: Ports) -> Result<Self, Error> {
        let proxy = |ip: std::net::IpAddr| {
            let addr = SocketAddr::new(
                ip,
                match ports {
                    Ports::Ephemeral => 0,
                    Ports::Fixed { proxy, .. } => proxy,
                },
            );
            std::net::TcpListener::bind(addr)
                .and_then(Listener::new)
                .map_err(|source| Error {
                    what: "proxy",
                    addr,
                    source,
                })
        };
        let dns = |ip: std::net::IpAddr| {
            let (r, addr) = match ports {
                Ports::Ephemeral => (DnsSockets::bind(ip), SocketAddr::new(ip, 0)),
                Ports::Fixed { dns, .. } => {
                    let addr = SocketAddr::new(ip, dns);
                    (DnsSockets::bind_at(addr), addr)
                }
            };
            r.map_err(|source| Error {
                what: "DNS",
                addr,
                source,
            })
        };
        let proxy4 = proxy(Ipv4Addr::LOCALHOST.into())?;
        let dns4 = dns(Ipv4Addr::LOCALHOST.into())?;
        let (proxy6, dns6) = match proxy(Ipv6Addr::LOCALHOST.into()) {
            Ok(l) => (Some(l), Some(dns(Ipv6Addr::LOCALHOST.into())?)),
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "no IPv6 loopback; IPv6 connects and queries will fail");
                (None, None)
            }
        };
        Ok(Sockets {
            proxy4,
            proxy6,
            dns4,
            dns6,
        })
    }
}

/// Where the kernel sends a namespace's connects and queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenAddrs {
    pub proxy4: SocketAddrV4,
    /// Port 0 when loopback has no IPv6: native IPv6 connects are then rewritten to a port
    /// nothing listens on, and fail.
    pub proxy6: SocketAddrV6,
    pub dns4_port: u16,
    pub dns6_port: u16,
}

/// Serving listeners. Dropping the last handle stops them.
pub struct Listeners {
    pub addrs: ListenAddrs,
    pub stats: Arc<ListenStats>,
    /// The namespace they live in; `None` for egress's own.
    pub netns: Option<NetnsId>,
    tasks: Vec<JoinHandle<()>>,
}

impl Listeners {
    /// Starts serving `sockets` (on the current tokio runtime).
    pub fn serve(
        sockets: Sockets,
        shared: &Arc<Shared>,
        netns: Option<NetnsId>,
    ) -> Result<Arc<Self>, Error> {
        let Sockets {
            proxy4,
            proxy6,
            dns4,
            dns6,
        } = sockets;
        let v4 = match proxy4.addr().0 {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
        };
        let v6 = match proxy6.as_ref().map(|l| l.addr().0) {
            Some(SocketAddr::V6(a)) => a,
            _ => SocketAddrV6::new(Ipv6Addr::LOCALHOST, 0, 0, 0),
        };
        let addrs = ListenAddrs {
            proxy4: v4,
            proxy6: v6,
            dns4_port: dns4.addr().0.port(),
            dns6_port: dns6.as_ref().map_or(0, |d| d.addr().0.port()),
        };
        let stats = Arc::new(ListenStats::default());
        let mut tasks = Vec::new();
        for l in std::iter::once(proxy4).chain(proxy6) {
            tasks.push(tokio::spawn(log_exit(
                "proxy listener",
                proxy::serve(l, shared.clone(), stats.clone()),
            )));
        }
        for d in std::iter::once(dns4).chain(dns6) {
            let addr = d.addr().0;
            tasks.extend(
                d.serve(shared.clone(), stats.clone())
                    .map_err(|source| Error {
                        what: "DNS",
                        addr,
                        source,
                    })?,
            );
        }
        Ok(Arc::new(Listeners {
            addrs,
            stats,
            netns,
            tasks,
        }))
    }
}

impl Listeners {
    /// Stops serving and waits until the sockets are closed, if `this` is the last handle:
    /// the same ports can then be bound again at once (a sandbox removed and added again).
    pub async fn close(this: Arc<Self>) {
        if let Ok(mut l) = Arc::try_unwrap(this) {
            let tasks = std::mem::take(&mut l.tasks);
            for t in &tasks {
                t.abort();
            }
            for t in tasks {
                let _ = t.await;
            }
        }
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn log_exit(what: &'static str, f: impl std::future::Future<Output = std::io::Result<()>>) {
    if let Err(e) = f.await {
        tracing::error!(error = %e, "{what} stopped");
    }
}
