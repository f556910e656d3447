//! Wiring: what every sandbox shares ([`Node`]), and `egress run` as "build the node, add
//! one sandbox, run the command, remove the sandbox".
//!
//! [`build`] returns a [`Bound`] holding the real listener addresses, so tests can bind port
//! 0 and read back what was chosen.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::{
    addr::ListenAddr,
    audit::{Audit, AuditWriter, Decision},
    bpf::{self, Kernel},
    caps,
    cgroup::{self, SandboxCgroup},
    cli::{RunConfig, TlsConfig},
    command, dns, events, gc,
    listen::{self, Listeners, Ports, Sockets},
    netns::{self, Connector, NetNs},
    sandbox::{self, RunDir, Sandbox},
    state::{Registry, Shared, UpstreamTls},
    tls,
};

/// Leaf certificates kept; each new host beyond this evicts an old one.
const LEAF_CACHE_CAPACITY: usize = 16_384;

/// Environment variables that point common clients at the trust bundle. Each names a file
/// of the system roots plus the egress CA: several of them (npm's `cafile`, Cargo's,
/// Composer's) replace the client's roots rather than add to them.
const CA_FILE_VARS: &[&str] = &[
    // OpenSSL and what links it, Go, Python's ssl, Ruby, rustls-native-certs
    "SSL_CERT_FILE",
    "CURL_CA_BUNDLE",
    // Python requests (and pip, conda through it)
    "REQUESTS_CA_BUNDLE",
    "PIP_CERT",
    // Node and Bun add this to their built-in roots; npm, yarn 1 and pnpm read cafile
    "NODE_EXTRA_CA_CERTS",
    "npm_config_cafile",
    "GIT_SSL_CAINFO",
    "CARGO_HTTP_CAINFO",
    "NIX_SSL_CERT_FILE",
    // AWS CLI and SDKs
    "AWS_CA_BUNDLE",
    // httplib2 (gcloud, google-api-python-client)
    "HTTPLIB2_CA_CERTS",
    "DENO_CERT",
    // Ruby's Bundler
    "BUNDLE_SSL_CA_CERT",
    // PHP's Composer
    "COMPOSER_CAFILE",
    // Elixir's Hex
    "HEX_CACERTS_PATH",
    // gRPC's C core (Python, Ruby, PHP, C++)
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
    // Google Cloud SDK
    "CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE",
];
/// ... and at the hashed directory of the same roots (OpenSSL, Go).
const CA_DIR_VARS: &[&str] = &["SSL_CERT_DIR"];

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
    #[error(transparent)]
    Listen(#[from] listen::Error),
    #[error(transparent)]
    Command(#[from] command::Error),
    #[error(transparent)]
    Sandbox(#[from] sandbox::Error),
    #[error(transparent)]
    Ca(#[from] tls::ca::Error),
    #[error(transparent)]
    Trust(#[from] tls::trust::Error),
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
    #[error(transparent)]
    Learn(#[from] crate::learn::ReadError),
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
            Error::Command(e) => e.exit_code(),
            // A CA or trust file the operator named that cannot be used is a usage error.
            Error::Ca(_)
            | Error::UpstreamTls(_)
            | Error::Policy(_)
            | Error::DnsUpstream(_)
            | Error::Learn(_) => USAGE,
            _ => SOFTWARE,
        }
    }
}

/// How long shutdown waits for connections that are still being relayed.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Where the host's resolvers are listed, for DNS forwarding without --dns-upstream.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Sandbox id used by `egress run`, which has exactly one.
const RUN_SANDBOX_ID: u32 = 1;
/// Its name in audit records.
const RUN_SANDBOX_NAME: &str = "run";

/// What the sandboxes of one egress process share: the loaded programs, the CA and its leaf
/// cache, upstream TLS, the audit log and the reader of the kernel's refusals.
pub struct Node {
    pub shared: Arc<Shared>,
    pub kernel: Arc<Kernel>,
    audit_writer: std::sync::Mutex<Option<AuditWriter>>,
    events: std::sync::Mutex<Option<EventsTask>>,
}

type EventsTask = (tokio::sync::oneshot::Sender<()>, JoinHandle<()>);

/// What a [`Node`] is built from.
pub struct NodeConfig<'a> {
    pub tls: &'a TlsConfig,
    pub audit: crate::audit::Sink,
    pub audit_query: bool,
    /// Bytes of audit records queued before new work waits for the writer.
    pub audit_queue_bytes: u64,
    /// Where the kernel's maps and links are pinned.
    pub pin_root: PathBuf,
}

impl Node {
    /// Loads the CA, opens the audit log, loads the programs with their maps pinned under
    /// `pin_root`, and starts reading kernel events.
    pub fn build(cfg: NodeConfig<'_>) -> Result<Node, Error> {
        tls::install_crypto_provider();
        let ca = Arc::new(load_ca(cfg.tls)?);
        let leaves = Arc::new(tls::mint::LeafCache::new(ca, LEAF_CACHE_CAPACITY)?);
        let upstream = tls::upstream::client_config(
            cfg.tls.upstream_trust_dir.as_deref(),
            &cfg.tls.upstream_cas,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        )?;
        let (audit, audit_writer) = Audit::open_bounded(cfg.audit, cfg.audit_queue_bytes)?;
        let bpf::Loaded {
            kernel,
            records,
            events: ring,
        } = Kernel::load(&cfg.pin_root)?;
        let kernel = Arc::new(kernel);
        let shared = Arc::new(Shared {
            registry: Registry::default(),
            audit,
            leaves,
            records: Arc::new(records),
            upstream_tls: UpstreamTls::new(upstream),
            audit_query: cfg.audit_query,
            metrics: Default::default(),
        });
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let k = kernel.clone();
        let lost = move || k.counter(egress_common::Counter::EventsLost);
        let task = tokio::spawn(log_exit(
            "kernel events",
            events::run(ring, shared.clone(), lost, stop_rx),
        ));
        Ok(Node {
            shared,
            kernel,
            audit_writer: std::sync::Mutex::new(Some(audit_writer)),
            events: std::sync::Mutex::new(Some((stop, task))),
        })
    }

    /// Reads what is left in the kernel's ring buffer, then writes and fsyncs the audit
    /// log. Call once every sandbox is removed or released. Returns the audit records that
    /// could not be written.
    pub async fn shutdown(&self) -> u64 {
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((stop, task)) = events {
            let _ = stop.send(());
            if tokio::time::timeout(DRAIN_TIMEOUT, task).await.is_err() {
                warn!("kernel event reader did not finish draining");
            }
        }
        let writer = self
            .audit_writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(writer) = writer else {
            return 0;
        };
        let shared = self.shared.clone();
        let dropped = tokio::task::spawn_blocking(move || shared.audit.close(writer))
            .await
            .unwrap_or(0);
        if dropped > 0 {
            tracing::error!(dropped, "audit records could not be written");
        }
        dropped
    }
}

/// A ready `egress run` sandbox: cgroup, programs attached, proxy serving.
pub struct Bound {
    pub listen4: ListenAddr,
    pub listen6: ListenAddr,
    pub pin_dir: PathBuf,
    /// Environment for the sandboxed command (the CA trust bundle variables).
    pub env: Vec<(String, String)>,
    /// The trust-store mounts of the command's mount namespace (none with --no-ca-mount).
    pub mounts: Option<Arc<crate::mountns::Plan>>,
    node: Node,
    sandbox: Sandbox,
    cgroup: SandboxCgroup,
    netns: Option<NetNs>,
    reload: Option<JoinHandle<()>>,
}

pub async fn build(cfg: &RunConfig) -> Result<Bound, Error> {
    caps::require(caps::RUN_NEEDS)?;
    let cg_root = cgroup::find_cgroup2_mount(Path::new("/proc/self/mountinfo"))?;
    let bpffs = bpf::bpffs()?;
    gc::collect(&cg_root, &bpffs);

    let name = gc::run_name(std::process::id());
    let pin_dir = bpffs.join("egress").join(&name);

    let loaded = cfg.policy_file.as_deref().map(crate::reload::stamp);
    let live = crate::policy::compile(
        cfg.policy_file.as_deref(),
        cfg.sandbox.as_deref(),
        &cfg.flags,
    )?;
    let allow_tcp = live.sandbox.tcp.clone();
    let inbound = live.sandbox.inbound.clone();
    let resolvers = if cfg.dns_upstreams.is_empty() {
        dns::upstream::Upstreams::from_resolv_conf(Path::new(RESOLV_CONF))?
    } else {
        dns::upstream::Upstreams::new(cfg.dns_upstreams.clone())
    };
    if live.sandbox.allow.is_empty() && live.sandbox.passthrough.is_empty() {
        warn!(
            "no --allow or --passthrough given: every HTTP(S) request will be refused with a 403"
        );
    }
    let node = Node::build(NodeConfig {
        tls: &cfg.tls,
        audit: cfg.audit.clone(),
        audit_query: cfg.audit_query,
        audit_queue_bytes: cfg.audit_queue_bytes,
        pin_root: pin_dir.clone(),
    })?;

    // Per-run files the sandbox user must read: world-readable, removed with the sandbox.
    let run_dir = RunDir(std::env::temp_dir().join(format!("egress-{name}")));
    let io = |what, path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { what, path, source }
    };
    std::fs::create_dir_all(&run_dir.0).map_err(io("create", &run_dir.0))?;
    std::fs::set_permissions(
        &run_dir.0,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .map_err(io("chmod", &run_dir.0))?;
    let Trust { env, mounts } = trust_files(&cfg.tls, node.shared.leaves.ca(), &run_dir.0)?;

    let cgroup = SandboxCgroup::create(&cg_root, &name)?;
    let netns = if cfg.isolate_net {
        Some(NetNs::create_isolated()?)
    } else {
        None
    };
    let sockets = match &netns {
        Some(ns) => ns.run(|| Sockets::bind(Ports::Ephemeral))??,
        None => Sockets::bind(Ports::Ephemeral)?,
    };
    let listeners = Listeners::serve(sockets, &node.shared, netns.as_ref().map(NetNs::id))?;
    let addrs = listeners.addrs;
    info!(
        upstreams = ?resolvers.servers(),
        "DNS queries are forwarded to these resolvers"
    );
    let policy_name = cfg.sandbox.clone();
    if let Some((out, opts)) = &cfg.learn {
        node.shared.audit.start_learning(crate::learn::Session {
            learner: crate::learn::Learner::new(*opts),
            out: out.clone(),
            name: RUN_SANDBOX_NAME.to_owned(),
            command: crate::learn::command_line(),
        });
    }
    let sandbox = Sandbox::add(
        &node.shared,
        &node.kernel,
        sandbox::Config {
            id: RUN_SANDBOX_ID,
            name: RUN_SANDBOX_NAME.to_owned(),
            cgroup: cgroup.path().to_owned(),
            cgroup_id: cgroup.id(),
            policy: live,
            intercept_ports: cfg.intercept_ports.clone(),
            strict: cfg.strict,
            listeners,
            // Upstream connections leave from egress's own namespace: an isolated one
            // holds only `lo`.
            upstream: Connector::Here,
            resolvers,
            link_dir: pin_dir.join("sandbox"),
        },
        Some(run_dir),
    )?;
    let reload = cfg.policy_file.clone().map(|path| {
        let flags = cfg.flags.clone();
        let load = move |p: &Path| crate::policy::compile(Some(p), policy_name.as_deref(), &flags);
        let kernel_tcp = allow_tcp.clone();
        let kernel_inbound = inbound.clone();
        let on_swap = move |new: &crate::policy::LivePolicy| {
            if new.sandbox.tcp != kernel_tcp {
                warn!(
                    "the reloaded policy changes `tcp` allowances; those apply from the next start"
                );
            }
            if new.sandbox.inbound != kernel_inbound {
                warn!(
                    "the reloaded policy changes `inbound` ports; those apply from the next start"
                );
            }
        };
        tokio::spawn(crate::reload::watch(
            path,
            loaded.flatten(),
            sandbox.state().policy.clone(),
            load,
            on_swap,
        ))
    });
    let listen4 = ListenAddr(addrs.proxy4.into());
    let listen6 = ListenAddr(addrs.proxy6.into());
    info!(
        cgroup = %cgroup.path().display(),
        pin_dir = %pin_dir.display(),
        %listen4,
        %listen6,
        dns4_port = addrs.dns4_port,
        dns6_port = addrs.dns6_port,
        strict = cfg.strict,
        isolate_net = cfg.isolate_net,
        intercept_ports = ?cfg.intercept_ports,
        allow_tcp = ?allow_tcp.iter().map(ToString::to_string).collect::<Vec<_>>(),
        inbound = ?inbound,
        "sandbox ready"
    );
    Ok(Bound {
        listen4,
        listen6,
        pin_dir,
        env,
        mounts,
        node,
        sandbox,
        cgroup,
        netns,
        reload,
    })
}

impl Bound {
    pub fn cgroup(&self) -> &SandboxCgroup {
        &self.cgroup
    }

    pub fn netns(&self) -> Option<&NetNs> {
        self.netns.as_ref()
    }

    /// Kills what is left in the sandbox, then removes the sandbox (programs, rows, state,
    /// listeners) and shuts the node down. In that order: no process outlives the programs
    /// that confine it. Connections still being relayed get [`DRAIN_TIMEOUT`] to finish so
    /// their audit records are written.
    pub async fn shutdown(self) {
        let Bound {
            pin_dir,
            node,
            sandbox,
            cgroup,
            netns,
            reload,
            ..
        } = self;
        if let Err(e) = cgroup.destroy() {
            tracing::error!(error = %crate::error_chain(&e), "removing the sandbox cgroup failed");
        }
        if let Some(r) = reload {
            r.abort();
        }
        let state = sandbox.state().clone();
        let stats = sandbox.listeners().map(|l| l.stats.clone());
        let cut = sandbox.remove(DRAIN_TIMEOUT).await;
        if cut > 0 {
            warn!(
                open = cut,
                "connections still open after the drain timeout; cut off"
            );
        }
        let k = |c| node.kernel.counter(c);
        let (redirected, record_failed, denied, strict_dropped) = (
            k(egress_common::Counter::Redirected),
            k(egress_common::Counter::RecordFailed),
            k(egress_common::Counter::Denied),
            k(egress_common::Counter::StrictDropped),
        );
        node.shutdown().await;
        // Every record is in, the kernel's last refusals too.
        if let Some(s) = node.shared.audit.stop_learning(RUN_SANDBOX_NAME) {
            if let Err(e) = s.write() {
                tracing::error!(file = %s.out.display(), error = %e, "cannot write the learned policy");
            }
        }
        let events_lost = node
            .shared
            .metrics
            .kernel_events_lost
            .load(std::sync::atomic::Ordering::Relaxed);
        drop(netns);
        bpf::remove_pin_dir(&pin_dir);
        if let Some(parent) = pin_dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
        let c = &state.counters;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        info!(
            redirected,
            record_failed,
            denied,
            events_lost,
            strict_dropped,
            audit_queue_waits = node.shared.audit.queue_waits(),
            dns_queries = c.dns.total(),
            dns_refused = c.dns.get(Decision::Deny),
            dns_tunnel_suspects = get(&c.dns_tunnel_suspects),
            dns_upstream_failures = get(&c.dns_upstream_failures),
            dns_no_record = stats.map_or(0, |s| get(&s.dns_no_record)),
            "sandbox removed"
        );
    }
}

/// `egress run`: build the sandbox, run the command in it, tear it down.
pub async fn run(cfg: RunConfig) -> Result<u8, Error> {
    let bound = build(&cfg).await?;
    let status = command::run(
        &cfg.command,
        bound.cgroup(),
        bound.netns(),
        bound.mounts.clone(),
        &cfg.user,
        &bound.env,
        cfg.policy_file.is_some(),
    )
    .await;
    bound.shutdown().await;
    let status = status?;
    info!(status = %status, "command exited");
    Ok(command::exit_code(status))
}

/// How the command of `egress run` trusts the egress CA.
struct Trust {
    /// The CA variables.
    env: Vec<(String, String)>,
    /// The trust-store mounts of its mount namespace.
    mounts: Option<Arc<crate::mountns::Plan>>,
}

/// Writes what the command trusts egress through into `dir`: the CA variables (unless
/// --no-ca-env) and the copies to mount over the system trust store (unless --no-ca-mount).
fn trust_files(
    cfg: &TlsConfig,
    ca: &tls::ca::CertificateAuthority,
    dir: &Path,
) -> Result<Trust, Error> {
    if !cfg.ca_env && !cfg.ca_mount {
        return Ok(Trust {
            env: Vec::new(),
            mounts: None,
        });
    }
    let locations = if cfg.ca_mount {
        tls::trust::locate(&tls::trust::candidates())
    } else {
        Vec::new()
    };
    let files = tls::trust::TrustFiles::write(dir, ca, &locations)?;
    let mut env = Vec::new();
    if cfg.ca_env {
        let (file, certs) = (files.bundle.display(), files.cert_dir.display());
        env.extend(
            CA_FILE_VARS
                .iter()
                .map(|k| (k.to_string(), file.to_string())),
        );
        env.extend(
            CA_DIR_VARS
                .iter()
                .map(|k| (k.to_string(), certs.to_string())),
        );
    }
    if !cfg.ca_mount {
        return Ok(Trust { env, mounts: None });
    }
    info!(
        targets = ?files.mounts.iter().map(|m| m.target.display().to_string()).collect::<Vec<_>>(),
        "the command sees the system trust store with the egress CA added"
    );
    let plan = crate::mountns::Plan::new(&files.mounts).map_err(|e| Error::Io {
        what: "mount",
        path: dir.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    })?;
    Ok(Trust {
        env,
        mounts: Some(Arc::new(plan)),
    })
}

async fn log_exit(what: &'static str, f: impl std::future::Future<Output = std::io::Result<()>>) {
    if let Err(e) = f.await {
        tracing::error!(error = %e, "{what} stopped");
    }
}

/// `egress gc [--all]`.
pub fn gc(all: bool) -> Result<Vec<String>, Error> {
    caps::require(caps::RUN_NEEDS)?;
    let cg_root = cgroup::find_cgroup2_mount(Path::new("/proc/self/mountinfo"))?;
    let bpffs = bpf::bpffs()?;
    let mut removed = gc::collect(&cg_root, &bpffs);
    if all {
        removed.extend(gc::collect_daemon(&bpffs));
    }
    Ok(removed)
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

/// `egress policy suggest AUDIT`: the policy (printed, or written to `-o` and its path
/// printed), or the error naming the file and line (exit 64).
pub fn policy_suggest(args: &crate::cli::SuggestArgs) -> Result<String, Error> {
    use crate::learn;
    let opts = learn::Options {
        wildcard_min: args.learn_wildcard_min,
    };
    let learners = learn::read_audit(&args.audit, args.sandbox.as_deref(), opts)?;
    let mut text = learn::header("policy suggest", &learn::command_line());
    for (i, (name, l)) in learners.iter().enumerate() {
        if i > 0 {
            text.push('\n');
        }
        text.push_str(&l.render(name, ""));
    }
    match &args.output {
        None => Ok(text),
        Some(out) => {
            let io = |source| Error::Io {
                what: "write",
                path: out.clone(),
                source,
            };
            crate::cli::check_learn_output(out).map_err(|why| io(std::io::Error::other(why)))?;
            learn::write_atomically(out, &text).map_err(io)?;
            Ok(format!("{}\n", out.display()))
        }
    }
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
