//! Wiring: everything `egress run` sets up, in order, and takes down in reverse.
//!
//! [`build`] returns a [`Bound`] holding the real listener addresses, so tests can bind port
//! 0 and read back what was chosen.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::{
    addr::ListenAddr,
    audit::{Audit, AuditWriter},
    bpf::{self, Kernel, Registration, SandboxSpec},
    caps,
    cgroup::{self, SandboxCgroup},
    cli::{RunConfig, TlsConfig},
    dns::{self, DnsSockets, DnsStats},
    events, gc,
    netns::{self, NetNs},
    proxy::{self, upstream::Pool, Ctx, Listener, Stats},
    sandbox, tls,
};

/// Leaf certificates kept; each new host beyond this evicts an old one.
const LEAF_CACHE_CAPACITY: usize = 16_384;

/// Environment variables that point common clients at the trust bundle.
const CA_ENV_VARS: &[&str] = &[
    "SSL_CERT_FILE",
    "CURL_CA_BUNDLE",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "PIP_CERT",
    "GIT_SSL_CAINFO",
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Caps(#[from] caps::Missing),
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
    #[error(transparent)]
    Bpf(#[from] bpf::Error),
    #[error(transparent)]
    Netns(#[from] netns::Error),
    #[error("binding the proxy listener on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Sandbox(#[from] sandbox::Error),
    #[error(transparent)]
    Ca(#[from] tls::ca::Error),
    #[error(transparent)]
    Mint(#[from] tls::mint::MintError),
    #[error(transparent)]
    UpstreamTls(#[from] tls::upstream::Error),
    #[error(transparent)]
    Audit(#[from] crate::audit::OpenError),
    #[error(transparent)]
    Policy(#[from] crate::policy::CompileError),
    #[error(transparent)]
    DnsUpstream(#[from] dns::upstream::ConfigError),
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        use crate::exit::*;
        match self {
            Error::Caps(_) => NOPERM,
            Error::Cgroup(cgroup::Error::NoMount { .. }) => UNAVAILABLE,
            Error::Bpf(bpf::Error::Load(_)) | Error::Bpf(bpf::Error::NotEmbedded) => UNAVAILABLE,
            Error::Sandbox(e) => e.exit_code(),
            // A CA or trust file the operator named that cannot be used is a usage error.
            Error::Ca(_) | Error::UpstreamTls(_) | Error::Policy(_) | Error::DnsUpstream(_) => {
                USAGE
            }
            _ => SOFTWARE,
        }
    }
}

/// How long shutdown waits for connections that are still being relayed.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Names remembered for DNS pinning, over all sandboxes.
const PIN_CAPACITY: usize = 65_536;
/// How long a DNS answer stays pinned at least, whatever its TTL: programs and their
/// connection pools keep addresses far longer than the TTL says.
const PIN_MIN_TTL: std::time::Duration = std::time::Duration::from_secs(3600);
/// Where the host's resolvers are listed, for DNS forwarding without --dns-upstream.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Sandbox id used by `egress run`, which has exactly one.
const RUN_SANDBOX_ID: u32 = 1;
/// Its name in audit records.
const RUN_SANDBOX_NAME: &str = "run";

/// A ready sandbox: cgroup, programs attached, proxy serving.
pub struct Bound {
    pub listen4: ListenAddr,
    pub listen6: ListenAddr,
    pub pin_dir: PathBuf,
    pub stats: Arc<Stats>,
    pub dns_stats: Arc<DnsStats>,
    /// Environment for the sandboxed command (the CA trust bundle variables).
    pub env: Vec<(String, String)>,
    run_dir: PathBuf,
    cgroup: Option<SandboxCgroup>,
    netns: Option<NetNs>,
    kernel: Kernel,
    registration: Option<Registration>,
    tasks: Vec<JoinHandle<()>>,
    conns: TaskTracker,
    ctx: Option<Arc<Ctx>>,
    audit: Option<(Audit, AuditWriter)>,
    events: Option<(tokio::sync::oneshot::Sender<()>, JoinHandle<()>)>,
}

pub async fn build(cfg: &RunConfig) -> Result<Bound, Error> {
    caps::require(caps::RUN_NEEDS)?;
    let cg_root = cgroup::find_cgroup2_mount(Path::new("/proc/self/mountinfo"))?;
    let bpffs = bpf::bpffs()?;
    gc::collect(&cg_root, &bpffs);

    let name = gc::run_name(std::process::id());
    let pin_dir = bpffs.join("egress").join(&name);

    tls::install_crypto_provider();
    let ca = Arc::new(load_ca(&cfg.tls)?);
    let leaves = Arc::new(tls::mint::LeafCache::new(ca.clone(), LEAF_CACHE_CAPACITY)?);
    let upstream = tls::upstream::client_config(
        cfg.tls.upstream_trust_dir.as_deref(),
        &cfg.tls.upstream_cas,
        vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    )?;
    let mut h1_only = (*upstream).clone();
    h1_only.alpn_protocols = vec![b"http/1.1".to_vec()];
    let (audit, audit_writer) = Audit::open(cfg.audit.clone())?;
    let sandbox_names =
        std::collections::HashMap::from([(RUN_SANDBOX_ID, RUN_SANDBOX_NAME.to_owned())]);
    let loaded = cfg.policy_file.as_deref().map(crate::reload::stamp);
    let live = crate::policy::compile(
        cfg.policy_file.as_deref(),
        cfg.sandbox.as_deref(),
        &cfg.flags,
    )?;
    let allow_tcp = live.sandbox.tcp.clone();
    let upstreams = if cfg.dns_upstreams.is_empty() {
        dns::upstream::Upstreams::from_resolv_conf(Path::new(RESOLV_CONF))?
    } else {
        dns::upstream::Upstreams::new(cfg.dns_upstreams.clone())
    };
    let nothing_allowed = live.sandbox.allow.is_empty() && live.sandbox.passthrough.is_empty();
    let policy = Arc::new(arc_swap::ArcSwap::from_pointee(live));
    let ctx = Arc::new(Ctx {
        policy: policy.clone(),
        leaves,
        pool: Pool::new(upstream, Arc::new(h1_only)),
        audit: audit.clone(),
        audit_query: cfg.audit_query,
        sandbox_names: sandbox_names.clone(),
        pins: Arc::new(dns::pins::Pins::new(PIN_CAPACITY, PIN_MIN_TTL)),
    });
    if nothing_allowed {
        warn!(
            "no --allow or --passthrough given: every HTTP(S) request will be refused with a 403"
        );
    }

    // Per-run files the sandbox user must read: world-readable, removed at shutdown.
    let run_dir = std::env::temp_dir().join(format!("egress-{name}"));
    let io = |what, path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { what, path, source }
    };
    std::fs::create_dir_all(&run_dir).map_err(io("create", &run_dir))?;
    std::fs::set_permissions(
        &run_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .map_err(io("chmod", &run_dir))?;
    let mut env = Vec::new();
    if cfg.tls.ca_env {
        let bundle = run_dir.join("ca-bundle.pem");
        ca.write_trust_bundle(&bundle)?;
        let b = bundle.display().to_string();
        env.extend(CA_ENV_VARS.iter().map(|k| (k.to_string(), b.clone())));
    }

    let cgroup = SandboxCgroup::create(&cg_root, &name)?;
    let netns = if cfg.isolate_net {
        Some(NetNs::create_isolated()?)
    } else {
        None
    };
    let Listeners { l4, l6, dns4, dns6 } = match &netns {
        Some(ns) => ns.run(bind_listeners)??,
        None => bind_listeners()?,
    };
    let (listen4, listen6) = (l4.addr(), l6.as_ref().map(Listener::addr));
    let (dns4_port, dns6_port) = (
        dns4.addr().0.port(),
        dns6.as_ref().map_or(0, |d| d.addr().0.port()),
    );

    let bpf::Loaded {
        mut kernel,
        orig_dst: table,
        dns_peers,
        events: ring,
    } = Kernel::load(&pin_dir)?;
    let table = Arc::new(table);
    let dns_stats = Arc::new(DnsStats::default());
    let stats = Arc::new(Stats::default());
    let conns = TaskTracker::new();
    let (stop_events, stop_rx) = tokio::sync::oneshot::channel();
    let events_task = tokio::spawn(log_exit(
        "kernel events",
        events::run(ring, audit.clone(), sandbox_names, stop_rx),
    ));
    let mut tasks = Vec::new();
    for l in std::iter::once(l4).chain(l6) {
        tasks.push(tokio::spawn(log_exit(
            "proxy listener",
            proxy::serve(l, table.clone(), stats.clone(), conns.clone(), ctx.clone()),
        )));
    }
    info!(
        upstreams = ?upstreams.servers(),
        "DNS queries are forwarded to these resolvers"
    );
    let dns = Arc::new(dns::Dns {
        upstreams,
        peers: Arc::new(dns_peers),
        orig_dst: table.clone(),
        ctx: ctx.clone(),
        stats: dns_stats.clone(),
    });
    for d in std::iter::once(dns4).chain(dns6) {
        let addr = d.addr();
        tasks.extend(
            d.serve(dns.clone(), conns.clone())
                .map_err(|source| Error::Listen {
                    addr: addr.0,
                    source,
                })?,
        );
    }

    let v4 = |a: ListenAddr| match a.0 {
        SocketAddr::V4(v) => v,
        SocketAddr::V6(_) => SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
    };
    // Without IPv6 on loopback, native IPv6 connects are rewritten to port 0 and fail.
    let listen6 = listen6.unwrap_or(ListenAddr(SocketAddr::from((Ipv6Addr::LOCALHOST, 0))));
    let v6 = match listen6.0 {
        SocketAddr::V6(v) => v,
        SocketAddr::V4(_) => SocketAddrV6::new(Ipv6Addr::LOCALHOST, 0, 0, 0),
    };
    let spec = SandboxSpec {
        id: RUN_SANDBOX_ID,
        listen4: v4(listen4),
        listen6: v6,
        dns4_port,
        dns6_port,
        intercept_ports: cfg.intercept_ports.clone(),
        allow_tcp: allow_tcp.clone(),
        strict: cfg.strict,
    };
    if let Some(path) = cfg.policy_file.clone() {
        let (name, flags) = (cfg.sandbox.clone(), cfg.flags.clone());
        let load = move |p: &Path| crate::policy::compile(Some(p), name.as_deref(), &flags);
        let kernel_tcp = allow_tcp.clone();
        let on_swap = move |new: &crate::policy::LivePolicy| {
            if new.sandbox.tcp != kernel_tcp {
                warn!(
                    "the reloaded policy changes `tcp` allowances; those apply from the next start"
                );
            }
        };
        tasks.push(tokio::spawn(crate::reload::watch(
            path,
            loaded.flatten(),
            policy,
            load,
            on_swap,
        )));
    }
    let registration =
        kernel.register(cgroup.path(), cgroup.id(), &spec, &pin_dir.join("sandbox"))?;
    info!(
        cgroup = %cgroup.path().display(),
        pin_dir = %pin_dir.display(),
        %listen4,
        %listen6,
        dns4_port,
        dns6_port,
        strict = cfg.strict,
        isolate_net = cfg.isolate_net,
        intercept_ports = ?cfg.intercept_ports,
        allow_tcp = ?allow_tcp.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "sandbox ready"
    );
    Ok(Bound {
        listen4,
        listen6,
        pin_dir,
        stats,
        dns_stats,
        env,
        run_dir,
        cgroup: Some(cgroup),
        netns,
        kernel,
        registration: Some(registration),
        tasks,
        conns,
        ctx: Some(ctx),
        audit: Some((audit, audit_writer)),
        events: Some((stop_events, events_task)),
    })
}

/// The proxy and DNS listeners of one sandbox, bound where the sandbox lives.
struct Listeners {
    l4: Listener,
    l6: Option<Listener>,
    dns4: DnsSockets,
    dns6: Option<DnsSockets>,
}

/// Binds the proxy on 127.0.0.1:0 and the DNS listener (UDP and TCP) on another port of
/// 127.0.0.1, and both again on [::1] where loopback has IPv6, in the calling thread's
/// netns.
fn bind_listeners() -> Result<Listeners, Error> {
    let bind = |addr: SocketAddr| {
        std::net::TcpListener::bind(addr)
            .and_then(Listener::new)
            .map_err(|source| Error::Listen { addr, source })
    };
    let bind_dns = |ip: std::net::IpAddr| {
        DnsSockets::bind(ip).map_err(|source| Error::Listen {
            addr: SocketAddr::new(ip, 0),
            source,
        })
    };
    let l4 = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    let dns4 = bind_dns(Ipv4Addr::LOCALHOST.into())?;
    let (l6, dns6) = match bind(SocketAddr::from((Ipv6Addr::LOCALHOST, 0))) {
        Ok(l) => (Some(l), Some(bind_dns(Ipv6Addr::LOCALHOST.into())?)),
        Err(e) => {
            warn!(error = %crate::error_chain(&e), "no IPv6 loopback; IPv6 connects and queries will fail");
            (None, None)
        }
    };
    Ok(Listeners { l4, l6, dns4, dns6 })
}

async fn log_exit(what: &'static str, f: impl std::future::Future<Output = std::io::Result<()>>) {
    if let Err(e) = f.await {
        tracing::error!(error = %e, "{what} stopped");
    }
}

impl Bound {
    pub fn cgroup(&self) -> &SandboxCgroup {
        self.cgroup
            .as_ref()
            .expect("cgroup is present until shutdown")
    }

    pub fn netns(&self) -> Option<&NetNs> {
        self.netns.as_ref()
    }

    /// Kills what is left in the sandbox, then removes programs, pins and listeners. In that
    /// order: no process outlives the programs that confine it. Connections still being
    /// relayed get [`DRAIN_TIMEOUT`] to finish so their log lines are written.
    pub async fn shutdown(mut self) {
        if let Some(cg) = self.cgroup.take() {
            if let Err(e) = cg.destroy() {
                tracing::error!(error = %crate::error_chain(&e), "removing the sandbox cgroup failed");
            }
        }
        for t in &self.tasks {
            t.abort();
        }
        // Aborted tasks drop their handles (audit among them) once they are polled again.
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        self.conns.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, self.conns.wait())
            .await
            .is_err()
        {
            warn!(
                open = self.conns.len(),
                "connections still open after the drain timeout; cut off"
            );
        }
        let redirected = self.kernel.counter(egress_common::Counter::Redirected);
        let record_failed = self.kernel.counter(egress_common::Counter::RecordFailed);
        let denied = self.kernel.counter(egress_common::Counter::Denied);
        let strict_dropped = self.kernel.counter(egress_common::Counter::StrictDropped);
        if let Some(reg) = self.registration.take() {
            self.kernel.unregister(reg);
        }
        // Refusals the kernel reported before the cgroup died are still in the ring buffer.
        if let Some((stop, task)) = self.events.take() {
            let _ = stop.send(());
            if tokio::time::timeout(DRAIN_TIMEOUT, task).await.is_err() {
                warn!("kernel event reader did not finish draining");
            }
        }
        // Every task holding an audit handle is gone now; drain and fsync the audit log.
        drop(self.ctx.take());
        if let Some((audit, writer)) = self.audit.take() {
            let dropped = tokio::task::spawn_blocking(move || audit.close(writer))
                .await
                .unwrap_or(0);
            if dropped > 0 {
                tracing::error!(dropped, "audit records could not be written");
            }
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
        bpf::remove_pin_dir(&self.pin_dir);
        if let Some(parent) = self.pin_dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
        let d = &self.dns_stats;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        info!(
            redirected,
            record_failed,
            denied,
            strict_dropped,
            dns_queries = get(&d.queries),
            dns_refused = get(&d.refused),
            dns_tunnel_suspects = get(&d.tunnel_suspects),
            dns_upstream_failures = get(&d.upstream_failures),
            dns_no_record = get(&d.no_record),
            "sandbox removed"
        );
    }
}

/// `egress run`: build the sandbox, run the command in it, tear it down.
pub async fn run(cfg: RunConfig) -> Result<u8, Error> {
    let bound = build(&cfg).await?;
    let status = sandbox::run(
        &cfg.command,
        bound.cgroup(),
        bound.netns(),
        &cfg.user,
        &bound.env,
        cfg.policy_file.is_some(),
    )
    .await;
    bound.shutdown().await;
    let status = status?;
    info!(status = %status, "command exited");
    Ok(sandbox::exit_code(status))
}

/// `egress gc`.
pub fn gc() -> Result<Vec<String>, Error> {
    caps::require(caps::RUN_NEEDS)?;
    let cg_root = cgroup::find_cgroup2_mount(Path::new("/proc/self/mountinfo"))?;
    let bpffs = bpf::bpffs()?;
    Ok(gc::collect(&cg_root, &bpffs))
}

fn load_ca(cfg: &TlsConfig) -> Result<tls::ca::CertificateAuthority, Error> {
    Ok(match &cfg.user_ca {
        Some((cert, key)) => tls::ca::CertificateAuthority::from_pem_files(cert, key)?,
        None => tls::ca::CertificateAuthority::load_or_create(&cfg.confdir)?,
    })
}

/// `egress ca ...`: prints what was asked for.
pub fn ca(cmd: crate::cli::CaCommand) -> Result<String, Error> {
    use crate::cli::CaCommand;
    tls::install_crypto_provider();
    let (CaCommand::Init(a)
    | CaCommand::Export(a)
    | CaCommand::Path(a)
    | CaCommand::Fingerprint(a)) = &cmd;
    let ca = tls::ca::CertificateAuthority::load_or_create(&a.confdir)?;
    let path = a.confdir.join("ca.pem");
    Ok(match cmd {
        CaCommand::Init(_) => format!(
            "{}\nSHA256 Fingerprint={}\n",
            path.display(),
            ca.fingerprint_sha256()
        ),
        CaCommand::Export(_) => ca.cert_pem().to_owned(),
        CaCommand::Path(_) => format!("{}\n", path.display()),
        CaCommand::Fingerprint(_) => format!("{}\n", ca.fingerprint_sha256()),
    })
}

/// `egress policy check FILE`: a one-line summary, or the error (exit 64).
pub fn policy_check(path: &Path) -> Result<String, Error> {
    let f = crate::policy::file::load(path).map_err(crate::policy::CompileError::from)?;
    let names: Vec<String> = f
        .sandboxes
        .values()
        .map(|s| {
            format!(
                "{} ({} allow, {} deny, {} passthrough, {} rules, {} secrets)",
                s.name,
                s.allow.len(),
                s.deny.len(),
                s.passthrough.len(),
                s.rules.len(),
                s.secrets.len()
            )
        })
        .collect();
    Ok(format!("{}: ok: {}\n", path.display(), names.join("; ")))
}
