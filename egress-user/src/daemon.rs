//! `egress daemon`: one privileged process per node that puts existing cgroups under
//! policy. Sandboxes are registered from the config at start and through the runtime API
//! while it runs; each may live in its own network namespace (a container), where its
//! listeners are created and from where its upstream connections leave.
//!
//! The daemon is [`app::Node`] plus a table of [`Sandbox`] handles. Adding one is: check the
//! request, resolve its cgroup and namespace, compile its policy, get (or create) the
//! listeners of its namespace, register it, persist the table. Removing it undoes exactly
//! that.
//!
//! Every map and link is pinned under one bpffs directory. While no daemon runs, every
//! sandbox stays captured: its connects to intercepted ports hit a closed listener and
//! everything else is refused. A daemon starting again re-adopts them: it reuses the pinned
//! maps whose layout still fits, swaps the program behind each pinned link in one step, and
//! binds the listeners again in each sandbox's namespace, with no new `add`.

pub mod api;
pub mod config;
pub mod persist;

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Weak},
    time::Duration,
};

use serde::Serialize;
use tokio::{signal::unix::SignalKind, sync::Mutex};
use tracing::{error, info, warn};

use crate::{
    admin::{self, Readiness},
    app::{self, Node, NodeConfig},
    audit::Decision,
    bpf, caps, cgroup,
    cli::GuardName,
    dns::upstream::Upstreams,
    listen::{self, Listeners, Ports, Sockets},
    netns::{Connector, NetNs, NetnsId, Worker},
    policy::{self, CompileError, LivePolicy, PolicyFlags},
    sandbox::{self, Sandbox},
    state::{SandboxState, Shared},
};
use config::{DaemonConfig, NetnsSpec, SandboxDecl, UpstreamFrom};
use persist::{Saved, Source};

/// Where the host's resolvers are listed.
const RESOLV_CONF: &str = "/etc/resolv.conf";
/// What `egress daemon` needs beyond `egress run` (which drops to a user): reading other
/// processes' namespaces.
const DAEMON_NEEDS: &[(&str, u32)] = &[
    ("CAP_SYS_ADMIN", 21),
    ("CAP_NET_ADMIN", 12),
    ("CAP_BPF", 39),
    ("CAP_SYS_PTRACE", 19),
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
    App(#[from] app::Error),
    #[error(transparent)]
    Listen(#[from] listen::Error),
    #[error(transparent)]
    Persist(#[from] persist::Error),
    #[error("binding the admin endpoint on {addr}")]
    Admin {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving the API on {}", path.display())]
    Api {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Policy(#[from] CompileError),
    #[error("another egress daemon uses {} (pid {pid}); stop it first, or give this one another confdir", path.display())]
    AlreadyRunning { path: PathBuf, pid: String },
    #[error("cannot listen for signals")]
    Signal(#[source] std::io::Error),
    #[error("cannot lock {}", path.display())]
    Lock {
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
            Error::App(e) => e.exit_code(),
            Error::Admin { .. } | Error::Api { .. } | Error::Policy(_) => USAGE,
            Error::AlreadyRunning { .. } => UNAVAILABLE,
            _ => SOFTWARE,
        }
    }
}

/// Why a sandbox could not be added, for the API: an HTTP status and the field to blame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{field}: {message}")]
pub struct AddError {
    #[serde(skip)]
    pub status: u16,
    pub field: String,
    pub message: String,
}

fn bad(field: &str, message: impl Into<String>) -> AddError {
    AddError {
        status: 400,
        field: field.to_owned(),
        message: message.into(),
    }
}

fn conflict(field: &str, message: impl Into<String>) -> AddError {
    AddError {
        status: 409,
        ..bad(field, message)
    }
}

fn internal(field: &str, message: impl Into<String>) -> AddError {
    AddError {
        status: 500,
        ..bad(field, message)
    }
}

/// One network namespace the daemon serves: the listeners bound inside it, and a thread
/// inside it that makes upstream sockets there.
pub struct Net {
    pub id: NetnsId,
    listeners: Arc<Listeners>,
    worker: Option<Arc<Worker>>,
}

impl Net {
    fn connector(&self) -> Connector {
        self.worker.clone().map_or(Connector::Here, Connector::In)
    }
}

/// A registered sandbox.
struct Entry {
    saved: Saved,
    net: Arc<Net>,
    sandbox: Sandbox,
}

/// A sandbox the daemon must serve but cannot yet: a static one whose cgroup does not exist
/// yet, or one whose re-adoption failed. Retried at every re-check.
struct Pending {
    saved: Option<Saved>,
    decl: SandboxDecl,
    source: Source,
    why: String,
}

#[derive(Default)]
struct Table {
    entries: BTreeMap<String, Entry>,
    pending: BTreeMap<String, Pending>,
    next_id: u32,
}

/// The daemon. Cheap to clone.
#[derive(Clone)]
pub struct Daemon {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: DaemonConfig,
    node: Node,
    cg_root: PathBuf,
    pin_root: PathBuf,
    /// This process's cgroup: a sandbox may not contain it.
    own_cgroup: PathBuf,
    host: Arc<Net>,
    nets: std::sync::Mutex<HashMap<NetnsId, Weak<Net>>>,
    table: Mutex<Table>,
    ready: Arc<Readiness>,
    state_path: PathBuf,
    /// Held for the daemon's life: one daemon per confdir (its state and pins).
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// What `GET /v1/sandboxes` shows of one sandbox.
#[derive(Clone, Debug, Serialize)]
pub struct SandboxInfo {
    pub name: String,
    pub id: u32,
    pub state: &'static str,
    pub cgroup: PathBuf,
    pub policy: String,
    pub netns: String,
    pub upstream: UpstreamFrom,
    pub strict: bool,
    pub intercept_ports: Vec<u16>,
    pub source: Source,
    pub adopted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
    pub counters: CountersView,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CountersView {
    pub requests: BTreeMap<&'static str, u64>,
    pub connections: BTreeMap<&'static str, u64>,
    pub dns_queries: BTreeMap<&'static str, u64>,
    pub kernel_denies: u64,
    pub active_connections: u64,
}

impl CountersView {
    fn of(s: &SandboxState) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let map = |c: &crate::state::DecisionCounts| {
            c.all()
                .filter(|(d, n)| *n > 0 || matches!(d, Decision::Allow | Decision::Deny))
                .map(|(d, n)| (d.as_str(), n))
                .collect()
        };
        CountersView {
            requests: map(&s.counters.requests),
            connections: map(&s.counters.connections),
            dns_queries: map(&s.counters.dns),
            kernel_denies: s.counters.kernel_denies.total(),
            active_connections: s.counters.active.load(Relaxed),
        }
    }
}

/// What a running daemon hands back: where it listens, and how to stop it.
pub struct Bound {
    pub daemon: Daemon,
    pub admin: std::net::SocketAddr,
}

impl Daemon {
    /// Starts the daemon: admin endpoint first (so `/healthz` answers while it loads), then
    /// the programs (re-using pinned maps), the host listeners, re-adoption of what the state
    /// and the config name, the API, and the background re-check.
    pub async fn start(cfg: DaemonConfig) -> Result<Bound, Error> {
        caps::require(DAEMON_NEEDS)?;
        let lock = lock_confdir(&cfg.confdir)?;
        let ready = Arc::new(Readiness::default());
        ready.pending("1-programs", "loading the eBPF programs");
        ready.pending("2-ca", "loading the CA");
        ready.pending("3-listeners", "binding the listeners");
        ready.pending("4-adoption", "re-adopting pinned sandboxes");
        let admin = admin::bind(cfg.admin)
            .await
            .map_err(|source| Error::Admin {
                addr: cfg.admin,
                source,
            })?;
        let admin_addr = admin.local_addr().map_err(|source| Error::Admin {
            addr: cfg.admin,
            source,
        })?;
        let metrics_slot = admin::MetricsSlot::default();
        {
            let (ready, slot) = (ready.clone(), metrics_slot.clone());
            tokio::spawn(async move {
                admin::serve(admin, ready, slot).await;
            });
        }

        let cg_root = cgroup::find_cgroup2_mount(Path::new("/proc/self/mountinfo"))?;
        let pin_root = match &cfg.pin_root {
            Some(p) => p.clone(),
            None => bpf::bpffs()?.join("egress").join("daemon"),
        };
        if cfg.pin_root.is_some() {
            // A custom directory still has to live on bpffs; mount the default one if no
            // bpffs is mounted at all, so the error below is about the path, not the mount.
            let _ = bpf::bpffs();
        }
        let own = cgroup::cgroup_of(std::process::id())?;
        let own_cgroup = cg_root.join(own.trim_start_matches('/'));
        let node = Node::build(NodeConfig {
            tls: &cfg.tls,
            audit: cfg.audit.clone(),
            audit_query: cfg.audit_query,
            audit_queue_bytes: cfg.audit_queue_bytes,
            pin_root: pin_root.clone(),
        })?;
        ready.done("1-programs");
        ready.done("2-ca");
        let ports = Ports::Fixed {
            proxy: cfg.proxy_port,
            dns: cfg.dns_port,
        };
        let host_id = NetnsId::current().map_err(|e| {
            Error::Listen(listen::Error {
                what: "proxy",
                addr: std::net::SocketAddr::from(([127, 0, 0, 1], cfg.proxy_port)),
                source: e,
            })
        })?;
        let listeners = Listeners::serve(Sockets::bind(ports)?, &node.shared, None)?;
        ready.done("3-listeners");
        let registry = Arc::new(admin::registry(&node.shared, Some(node.kernel.clone())));
        let _ = metrics_slot.set(registry);
        let state_path = cfg.confdir.join(persist::FILE_NAME);
        let inner = Arc::new(Inner {
            node,
            cg_root,
            pin_root,
            own_cgroup,
            host: Arc::new(Net {
                id: host_id,
                listeners,
                worker: None,
            }),
            nets: Default::default(),
            table: Mutex::new(Table::default()),
            ready: ready.clone(),
            state_path,
            _lock: lock,
            cfg,
        });
        let daemon = Daemon { inner };
        daemon.adopt().await?;
        ready.done("4-adoption");
        info!(
            admin = %admin_addr,
            api = %daemon.inner.cfg.api.display(),
            pin_root = %daemon.inner.pin_root.display(),
            sandboxes = daemon.inner.node.shared.registry.len(),
            "daemon started"
        );
        Ok(Bound {
            daemon,
            admin: admin_addr,
        })
    }

    pub fn config(&self) -> &DaemonConfig {
        &self.inner.cfg
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.inner.node.shared
    }

    pub fn ready(&self) -> &Arc<Readiness> {
        &self.inner.ready
    }

    /// Re-registers what the state file and the config name, taking over pinned links.
    async fn adopt(&self) -> Result<(), Error> {
        let inner = &self.inner;
        let state = persist::load(&inner.state_path)?;
        let mut table = inner.table.lock().await;
        table.next_id = state
            .next_id
            .max(inner.node.kernel.max_sandbox_id().saturating_add(1))
            .max(1);
        let mut saved: BTreeMap<String, Saved> = state
            .sandboxes
            .into_iter()
            .map(|s| (s.decl.name.clone(), s))
            .collect();
        // The config's sandboxes, taking over a saved one of the same name and cgroup.
        for decl in inner.cfg.sandboxes.clone() {
            let prior = match saved.remove(&decl.name) {
                // Same name, same cgroup (whoever added it): take its links over.
                Some(s) if s.decl.cgroup == decl.cgroup => Some(s),
                Some(s) => {
                    warn!(sandbox = %decl.name, old = %s.cgroup_path.display(), "the config now declares this sandbox on another cgroup; the old one is no longer captured");
                    inner
                        .node
                        .kernel
                        .purge(s.id, s.cgroup_id, &self.link_dir(s.id));
                    None
                }
                None => None,
            };
            self.add_locked(&mut table, decl, Source::Config, prior)
                .await;
        }
        for (_, s) in saved {
            if s.source == Source::Config {
                // Dropped from the config while the daemon was down.
                info!(sandbox = %s.decl.name, "no longer in the config; removing it");
                inner
                    .node
                    .kernel
                    .purge(s.id, s.cgroup_id, &self.link_dir(s.id));
                continue;
            }
            self.add_locked(&mut table, s.decl.clone(), Source::Api, Some(s))
                .await;
        }
        self.persist(&table).map_err(Error::Persist)?;
        self.report_orphans(&table);
        Ok(())
    }

    /// Pinned link directories no sandbox of the table owns: left in place (they keep
    /// their cgroups closed) and reported.
    fn report_orphans(&self, table: &Table) {
        let dir = self.inner.pin_root.join("sandboxes");
        let known: Vec<u32> = table
            .entries
            .values()
            .map(|e| e.saved.id)
            .chain(
                table
                    .pending
                    .values()
                    .filter_map(|p| p.saved.as_ref().map(|s| s.id)),
            )
            .collect();
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let id = e.file_name().to_string_lossy().parse::<u32>().ok();
            if id.is_none_or(|id| !known.contains(&id)) {
                warn!(pin = %e.path().display(), "pinned links of an unknown sandbox; left in place (their cgroup stays closed); `egress gc --all` removes them");
            }
        }
    }

    fn link_dir(&self, id: u32) -> PathBuf {
        self.inner.pin_root.join("sandboxes").join(id.to_string())
    }

    /// Adds a sandbox through the API.
    pub async fn add(&self, decl: SandboxDecl) -> Result<SandboxInfo, AddError> {
        self.add_from(decl, Source::Api).await
    }

    /// Adds a sandbox from `source`.
    pub async fn add_from(
        &self,
        decl: SandboxDecl,
        source: Source,
    ) -> Result<SandboxInfo, AddError> {
        let mut table = self.inner.table.lock().await;
        if table.entries.contains_key(&decl.name) || table.pending.contains_key(&decl.name) {
            return Err(conflict(
                "name",
                format!("a sandbox named {:?} is already registered", decl.name),
            ));
        }
        let name = decl.name.clone();
        self.try_add(&mut table, decl, source, None).await?;
        if let Err(e) = self.persist(&table) {
            if let Some(entry) = table.entries.remove(&name) {
                entry.sandbox.remove(Duration::ZERO).await;
            }
            return Err(internal("state", crate::error_chain(&e)));
        }
        Ok(self.info(table.entries.get(&name).expect("just added")))
    }

    /// Adds (or re-adopts) a sandbox; one that cannot be served yet goes to `pending`.
    async fn add_locked(
        &self,
        table: &mut Table,
        decl: SandboxDecl,
        source: Source,
        prior: Option<Saved>,
    ) {
        let name = decl.name.clone();
        match self
            .try_add(table, decl.clone(), source, prior.clone())
            .await
        {
            Ok(()) => {
                table.pending.remove(&name);
                self.inner.ready.done(&pending_key(&name));
            }
            Err(e) => {
                // The cgroup of a saved sandbox is gone: nothing left to capture. One the
                // config declares waits for its cgroup to come back.
                let mut prior = prior;
                if let Some(s) = prior.take_if(|s| !cgroup_alive(s)) {
                    info!(sandbox = %name, cgroup = %s.cgroup_path.display(), "cgroup vanished; removing the sandbox");
                    self.inner
                        .node
                        .kernel
                        .purge(s.id, s.cgroup_id, &self.link_dir(s.id));
                    if source != Source::Config {
                        table.pending.remove(&name);
                        self.inner.ready.done(&pending_key(&name));
                        return;
                    }
                }
                warn!(sandbox = %name, error = %e, "sandbox not served yet; retrying at every re-check");
                // Only the config's sandboxes hold up readiness: an API sandbox that cannot
                // be re-adopted stays closed (its pins stay) and is listed as pending.
                if source == Source::Config {
                    self.inner
                        .ready
                        .pending(pending_key(&name), format!("sandbox {name}: {e}"));
                }
                table.pending.insert(
                    name,
                    Pending {
                        saved: prior,
                        decl,
                        source,
                        why: e.to_string(),
                    },
                );
            }
        }
    }

    async fn try_add(
        &self,
        table: &mut Table,
        decl: SandboxDecl,
        source: Source,
        prior: Option<Saved>,
    ) -> Result<(), AddError> {
        let inner = &self.inner;
        let decl = self.resolve_target(decl).await?;
        if let Some(id) = &decl.docker {
            if let Some(other) = table
                .entries
                .values()
                .find(|e| e.saved.decl.docker.as_ref() == Some(id))
            {
                return Err(conflict(
                    "docker",
                    format!(
                        "container {id} is already sandbox {:?}",
                        other.saved.decl.name
                    ),
                ));
            }
        }
        let cgroup_path = self.resolve_cgroup(&decl.cgroup)?;
        let cgroup_id =
            cgroup::cgroup_id(&cgroup_path).map_err(|e| bad("cgroup", crate::error_chain(&e)))?;
        if let Some(other) = table
            .entries
            .values()
            .find(|e| e.saved.cgroup_id == cgroup_id)
        {
            return Err(conflict(
                "cgroup",
                format!(
                    "{} is already the cgroup of sandbox {:?}",
                    cgroup_path.display(),
                    other.saved.decl.name
                ),
            ));
        }
        if inner.own_cgroup.starts_with(&cgroup_path) {
            return Err(bad(
                "cgroup",
                format!(
                    "{} contains egress itself ({}); egress must never be in a sandbox",
                    cgroup_path.display(),
                    inner.own_cgroup.display()
                ),
            ));
        }
        let policy = self.compile(&decl)?;
        let (net, resolv_pid) = self.net_for(&decl, &cgroup_path).await?;
        let resolvers = self.resolvers(&decl, resolv_pid);
        // A saved sandbox keeps its id, so its pinned links and rows are taken over; one
        // whose cgroup was made anew under the same path is a new sandbox.
        let id = match prior.as_ref() {
            Some(s) if s.cgroup_id == cgroup_id => s.id,
            Some(s) => {
                inner
                    .node
                    .kernel
                    .purge(s.id, s.cgroup_id, &self.link_dir(s.id));
                next_id(table)
            }
            None => next_id(table),
        };
        let upstream = match decl.upstream {
            UpstreamFrom::Sandbox => net.connector(),
            UpstreamFrom::Host => Connector::Here,
        };
        let sandbox = Sandbox::add(
            &inner.node.shared,
            &inner.node.kernel,
            sandbox::Config {
                id,
                name: decl.name.clone(),
                cgroup: cgroup_path.clone(),
                cgroup_id,
                policy,
                intercept_ports: decl.intercept_ports.clone(),
                strict: decl.strict,
                listeners: net.listeners.clone(),
                upstream,
                resolvers,
                link_dir: self.link_dir(id),
            },
            None,
        )
        .map_err(|e| internal("cgroup", crate::error_chain(&e)))?;
        info!(
            sandbox = %decl.name,
            id,
            cgroup = %cgroup_path.display(),
            netns = %net.id,
            adopted_links = sandbox.adopted_links(),
            "sandbox registered"
        );
        if let Some(out) = &decl.learn {
            inner
                .node
                .shared
                .audit
                .start_learning(crate::learn::Session {
                    learner: crate::learn::Learner::new(crate::learn::Options {
                        wildcard_min: decl.learn_wildcard_min,
                    }),
                    out: out.clone(),
                    name: decl.name.clone(),
                    command: format!("egress daemon, sandbox {} (learn = {:?})", decl.name, out),
                });
        }
        table.entries.insert(
            decl.name.clone(),
            Entry {
                saved: Saved {
                    id,
                    source,
                    cgroup_path,
                    cgroup_id,
                    decl,
                },
                net,
                sandbox,
            },
        );
        Ok(())
    }

    /// A sandbox named by a Docker container or a pod gets that container's (pod's) cgroup
    /// and, through its init (pause) process, its network namespace.
    async fn resolve_target(&self, mut decl: SandboxDecl) -> Result<SandboxDecl, AddError> {
        let pid = if let Some(c) = decl.docker.clone() {
            let docker = crate::docker::Docker::new(&self.inner.cfg.docker.socket);
            let found = docker.inspect(&c).await.map_err(|e| match e {
                crate::docker::Error::NoSuchContainer { .. } => bad("docker", e.to_string()),
                other => AddError {
                    status: 502,
                    ..bad("docker", crate::error_chain(&other))
                },
            })?;
            if !found.running || found.pid == 0 {
                return Err(bad("docker", format!("container {c} is not running")));
            }
            decl.docker = Some(found.id);
            found.pid
        } else if let Some(p) = decl.pod.clone() {
            let found = crate::pods::find(Path::new("/proc"), &p.uid, p.container.as_deref())
                .map_err(|e| {
                    bad(
                        if p.container.is_some() {
                            "container"
                        } else {
                            "pod_uid"
                        },
                        e.to_string(),
                    )
                })?;
            decl.cgroup = found.cgroup;
            decl.netns = NetnsSpec::Pid(found.pid);
            return Ok(decl);
        } else {
            return Ok(decl);
        };
        let cg = cgroup::cgroup_of(pid).map_err(|e| bad("docker", crate::error_chain(&e)))?;
        decl.cgroup = cg.trim_start_matches('/').to_owned();
        decl.netns = NetnsSpec::Pid(pid);
        Ok(decl)
    }

    /// An absolute cgroup path under the cgroup2 root, or one relative to it; it must exist.
    fn resolve_cgroup(&self, given: &str) -> Result<PathBuf, AddError> {
        let root = &self.inner.cg_root;
        let p = Path::new(given);
        let path = if p.is_absolute() {
            if !p.starts_with(root) {
                return Err(bad(
                    "cgroup",
                    format!(
                        "{given} is not under the cgroup2 mount {}; give a path below it, or one relative to it",
                        root.display()
                    ),
                ));
            }
            p.to_owned()
        } else {
            root.join(given.trim_start_matches('/'))
        };
        if !path.join("cgroup.procs").is_file() {
            return Err(bad(
                "cgroup",
                format!("{} does not exist (or is not a cgroup)", path.display()),
            ));
        }
        Ok(path)
    }

    fn compile(&self, decl: &SandboxDecl) -> Result<LivePolicy, AddError> {
        let file = self.inner.cfg.policy.as_deref();
        if file.is_none() && decl.policy.is_some() {
            return Err(bad(
                "policy",
                "the daemon has no policy file ([daemon] policy); a sandbox without one refuses everything",
            ));
        }
        policy::compile(file, Some(decl.policy_name()), &flags(decl)).map_err(|e| match e {
            CompileError::NoSuchSandbox { .. } => bad("policy", e.to_string()),
            other => bad("policy", crate::error_chain(&other)),
        })
    }

    /// The namespace a sandbox lives in, with its listeners (bound on first use), and a pid
    /// inside it whose resolv.conf describes its resolvers.
    async fn net_for(
        &self,
        decl: &SandboxDecl,
        cgroup: &Path,
    ) -> Result<(Arc<Net>, Option<u32>), AddError> {
        let (ns, pid) = match &decl.netns {
            NetnsSpec::Host => return Ok((self.inner.host.clone(), None)),
            NetnsSpec::Path(p) => (
                NetNs::open(p).map_err(|e| bad("netns", crate::error_chain(&e)))?,
                first_pid(cgroup),
            ),
            NetnsSpec::Pid(pid) => {
                // The process given, or (once it is gone) any process of the sandbox.
                let pid = if Path::new(&format!("/proc/{pid}")).exists() {
                    let inside = cgroup::cgroup_of(*pid)
                        .map(|c| self.inner.cg_root.join(c.trim_start_matches('/')))
                        .is_ok_and(|c| c.starts_with(cgroup));
                    if !inside {
                        return Err(bad(
                            "pid",
                            format!(
                                "process {pid} is not in {} or below it; give a process of the sandbox (a container's init)",
                                cgroup.display()
                            ),
                        ));
                    }
                    *pid
                } else {
                    first_pid(cgroup).ok_or_else(|| {
                        bad("pid", format!("process {pid} does not exist, and no process is in the sandbox's cgroup"))
                    })?
                };
                (
                    NetNs::of_pid(pid).map_err(|e| bad("pid", crate::error_chain(&e)))?,
                    Some(pid),
                )
            }
        };
        let field = if matches!(decl.netns, NetnsSpec::Pid(_)) {
            "pid"
        } else {
            "netns"
        };
        Ok((self.net(ns).await.map_err(|e| bad(field, e))?, pid))
    }

    /// The listeners of namespace `ns`, bound there on first use.
    async fn net(&self, ns: NetNs) -> Result<Arc<Net>, String> {
        let id = ns.id();
        if id == self.inner.host.id {
            return Ok(self.inner.host.clone());
        }
        if let Some(n) = lock(&self.inner.nets).get(&id).and_then(Weak::upgrade) {
            return Ok(n);
        }
        let worker = Arc::new(Worker::start(&ns).map_err(|e| crate::error_chain(&e))?);
        let ports = Ports::Fixed {
            proxy: self.inner.cfg.proxy_port,
            dns: self.inner.cfg.dns_port,
        };
        let mut sockets = worker
            .run(move || Sockets::bind(ports))
            .await
            .map_err(|e| crate::error_chain(&e))?;
        if let Err(e) = &sockets {
            // A namespace made with `ip netns add` starts with `lo` down.
            if e.source.kind() == std::io::ErrorKind::AddrNotAvailable {
                ns.loopback_up().map_err(|e| crate::error_chain(&e))?;
                sockets = worker
                    .run(move || Sockets::bind(ports))
                    .await
                    .map_err(|e| crate::error_chain(&e))?;
            }
        }
        let sockets = sockets.map_err(|e| {
            format!(
                "{} in {id}: {}",
                crate::error_chain(&e),
                "is something else in that namespace on the daemon's ports?"
            )
        })?;
        let listeners = Listeners::serve(sockets, &self.inner.node.shared, Some(id))
            .map_err(|e| crate::error_chain(&e))?;
        let net = Arc::new(Net {
            id,
            listeners,
            worker: Some(worker),
        });
        lock(&self.inner.nets).insert(id, Arc::downgrade(&net));
        info!(netns = %id, "listeners bound in the namespace");
        Ok(net)
    }

    /// The resolvers a sandbox's permitted queries go to: the config's, else the sandbox's
    /// own resolv.conf (its processes' view), else the host's.
    fn resolvers(&self, decl: &SandboxDecl, pid: Option<u32>) -> Upstreams {
        if !self.inner.cfg.dns_upstreams.is_empty() {
            return Upstreams::new(self.inner.cfg.dns_upstreams.clone());
        }
        let mut candidates = Vec::new();
        if decl.upstream == UpstreamFrom::Sandbox {
            if let Some(pid) = pid {
                candidates.push(PathBuf::from(format!("/proc/{pid}/root/etc/resolv.conf")));
            }
            if let NetnsSpec::Path(p) = &decl.netns {
                if let Some(name) = p.file_name() {
                    candidates.push(Path::new("/etc/netns").join(name).join("resolv.conf"));
                }
            }
        }
        candidates.push(RESOLV_CONF.into());
        for c in &candidates {
            if let Ok(u) = Upstreams::from_resolv_conf(c) {
                return u;
            }
        }
        warn!(sandbox = %decl.name, "no usable resolv.conf; its DNS queries will fail (set [daemon] dns_upstreams)");
        Upstreams::new(Vec::new())
    }

    /// Removes a sandbox: programs and rows, then its connections drain for up to the
    /// drain timeout.
    pub async fn remove(&self, name: &str) -> Result<RemoveReport, AddError> {
        let (entry, pending) = {
            let mut table = self.inner.table.lock().await;
            let entry = table.entries.remove(name);
            let pending = table.pending.remove(name);
            if entry.is_none() && pending.is_none() {
                return Err(AddError {
                    status: 404,
                    ..bad("name", format!("no sandbox named {name:?}"))
                });
            }
            self.inner.ready.done(&pending_key(name));
            if let Err(e) = self.persist(&table) {
                error!(error = %crate::error_chain(&e), "could not persist the removal");
            }
            (entry, pending)
        };
        if let Some(s) = pending.and_then(|p| p.saved) {
            self.inner
                .node
                .kernel
                .purge(s.id, s.cgroup_id, &self.link_dir(s.id));
        }
        let cut = match entry {
            Some(e) => {
                let cut = e.sandbox.remove(self.inner.cfg.drain_timeout).await;
                close_net(e.net).await;
                cut
            }
            None => 0,
        };
        self.finish_learning(name);
        info!(sandbox = name, cut, "sandbox removed");
        Ok(RemoveReport {
            name: name.to_owned(),
            cut_off: cut,
        })
    }

    /// The sandbox a Docker container was enrolled as, if any.
    pub async fn by_container(&self, id: &str) -> Option<String> {
        let table = self.inner.table.lock().await;
        table
            .entries
            .values()
            .find(|e| e.saved.decl.docker.as_deref() == Some(id))
            .map(|e| e.saved.decl.name.clone())
    }

    /// Every sandbox, registered or pending.
    pub async fn list(&self) -> Vec<SandboxInfo> {
        let table = self.inner.table.lock().await;
        let mut v: Vec<SandboxInfo> = table.entries.values().map(|e| self.info(e)).collect();
        for (name, p) in &table.pending {
            v.push(SandboxInfo {
                name: name.clone(),
                id: p.saved.as_ref().map_or(0, |s| s.id),
                state: "pending",
                cgroup: p.decl.cgroup.clone().into(),
                policy: p.decl.policy_name().to_owned(),
                netns: "-".into(),
                upstream: p.decl.upstream,
                strict: p.decl.strict,
                intercept_ports: p.decl.intercept_ports.clone(),
                source: p.source,
                adopted: false,
                pending: Some(p.why.clone()),
                counters: CountersView::default(),
            });
        }
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn info(&self, e: &Entry) -> SandboxInfo {
        let d = &e.saved.decl;
        SandboxInfo {
            name: d.name.clone(),
            id: e.saved.id,
            state: "active",
            cgroup: e.saved.cgroup_path.clone(),
            policy: d.policy_name().to_owned(),
            netns: if Arc::ptr_eq(&e.net, &self.inner.host) {
                "host".into()
            } else {
                e.net.id.to_string()
            },
            upstream: d.upstream,
            strict: d.strict,
            intercept_ports: d.intercept_ports.clone(),
            source: e.saved.source,
            adopted: e.sandbox.adopted_links() > 0,
            pending: None,
            counters: CountersView::of(e.sandbox.state()),
        }
    }

    /// Compiles every sandbox's policy again from the policy file; a sandbox whose policy
    /// does not compile keeps its old one.
    pub async fn reload(&self) -> ReloadReport {
        let mut table = self.inner.table.lock().await;
        let mut report = ReloadReport::default();
        for e in table.entries.values_mut() {
            match self.compile(&e.saved.decl) {
                Ok(p) => {
                    let tcp = p.sandbox.tcp.clone();
                    let inbound = p.sandbox.inbound.clone();
                    e.sandbox.state().policy.store(Arc::new(p));
                    if let Err(err) = e.sandbox.set_allow(&tcp) {
                        report.errors.push(format!(
                            "{}: tcp allowances: {}",
                            e.saved.decl.name,
                            crate::error_chain(&err)
                        ));
                    }
                    if let Err(err) = e.sandbox.set_inbound(&inbound) {
                        report.errors.push(format!(
                            "{}: inbound ports: {}",
                            e.saved.decl.name,
                            crate::error_chain(&err)
                        ));
                    }
                    report.reloaded += 1;
                }
                Err(err) => report
                    .errors
                    .push(format!("{}: {}", e.saved.decl.name, err.message)),
            }
        }
        drop(table);
        if report.errors.is_empty() {
            info!(sandboxes = report.reloaded, "policy reloaded");
        } else {
            error!(errors = ?report.errors, "policy reload failed for some sandboxes; they keep their previous policy");
        }
        report
    }

    /// Brings the table in line with the world: removes sandboxes whose cgroup vanished,
    /// moves sandboxes whose namespace changed (a restarted container) to listeners in the
    /// new one, and retries pending ones.
    pub async fn recheck(&self) {
        let mut table = self.inner.table.lock().await;
        let mut gone = Vec::new();
        let mut moved = Vec::new();
        for (name, e) in &table.entries {
            if !cgroup_alive(&e.saved) {
                gone.push(name.clone());
                continue;
            }
            let now = match &e.saved.decl.netns {
                NetnsSpec::Host => continue,
                NetnsSpec::Path(p) => NetnsId::of_path(p)
                    .ok()
                    .map(|id| (id, first_pid(&e.saved.cgroup_path))),
                NetnsSpec::Pid(_) => first_pid(&e.saved.cgroup_path).and_then(|pid| {
                    NetnsId::of_path(Path::new(&format!("/proc/{pid}/ns/net")))
                        .ok()
                        .map(|id| (id, Some(pid)))
                }),
            };
            if let Some((id, pid)) = now.filter(|(id, _)| *id != e.net.id) {
                moved.push((name.clone(), id, pid));
            }
        }
        let mut removed = Vec::new();
        for name in gone {
            if let Some(e) = table.entries.remove(&name) {
                info!(sandbox = %name, cgroup = %e.saved.cgroup_path.display(), "cgroup vanished; removing the sandbox");
                if e.saved.source == Source::Config {
                    // The config still declares it: registered again once the cgroup is
                    // back (the pending retry below, and every re-check after).
                    let why = format!("cgroup {} is gone", e.saved.cgroup_path.display());
                    self.inner
                        .ready
                        .pending(pending_key(&name), format!("sandbox {name}: {why}"));
                    table.pending.insert(
                        name.clone(),
                        Pending {
                            saved: None,
                            decl: e.saved.decl.clone(),
                            source: Source::Config,
                            why,
                        },
                    );
                }
                removed.push(e);
            }
        }
        for (name, id, pid) in moved {
            let Some(e) = table.entries.get_mut(&name) else {
                continue;
            };
            let path = match (&e.saved.decl.netns, pid) {
                (NetnsSpec::Path(p), _) => p.clone(),
                (_, Some(pid)) => PathBuf::from(format!("/proc/{pid}/ns/net")),
                _ => continue,
            };
            let ns = match NetNs::open(&path) {
                Ok(ns) if ns.id() == id => ns,
                _ => continue,
            };
            match self.net(ns).await {
                Ok(net) => {
                    info!(sandbox = %name, from = %e.net.id, to = %net.id, "the sandbox's network namespace changed; listeners bound in the new one");
                    let decl = e.saved.decl.clone();
                    let upstream = match decl.upstream {
                        UpstreamFrom::Sandbox => net.connector(),
                        UpstreamFrom::Host => Connector::Here,
                    };
                    let resolvers = self.resolvers(&decl, pid);
                    e.sandbox.rebind(net.listeners.clone(), upstream, resolvers);
                    e.net = net;
                }
                Err(err) => {
                    warn!(sandbox = %name, error = %err, "the sandbox's network namespace changed, but listeners could not be bound there")
                }
            }
        }
        let pending: Vec<Pending> = std::mem::take(&mut table.pending).into_values().collect();
        for p in pending {
            self.add_locked(&mut table, p.decl, p.source, p.saved).await;
        }
        if let Err(e) = self.persist(&table) {
            error!(error = %crate::error_chain(&e), "could not persist the daemon state");
        }
        drop(table);
        for e in removed {
            e.sandbox.remove(Duration::ZERO).await;
            close_net(e.net).await;
            self.finish_learning(&e.saved.decl.name);
        }
    }

    /// Writes the learned policy of a sandbox in learn mode, once it is gone.
    fn finish_learning(&self, name: &str) {
        if let Some(s) = self.inner.node.shared.audit.stop_learning(name) {
            if let Err(e) = s.write() {
                error!(sandbox = name, file = %s.out.display(), error = %e, "cannot write the learned policy");
            }
        }
    }

    fn persist(&self, table: &Table) -> Result<(), persist::Error> {
        let mut sandboxes: Vec<Saved> = table.entries.values().map(|e| e.saved.clone()).collect();
        sandboxes.extend(table.pending.values().filter_map(|p| p.saved.clone()));
        sandboxes.sort_by_key(|s| s.id);
        persist::store(
            &self.inner.state_path,
            &persist::State {
                version: 0,
                next_id: table.next_id,
                sandboxes,
            },
        )
    }

    /// Stops serving: `/readyz` answers 503, then every sandbox drains up to the drain
    /// timeout. With `detach`, every sandbox is also removed from the kernel (its cgroup is
    /// no longer captured) and the pins and state are deleted; without, the pins stay and
    /// every sandbox stays closed until a daemon runs again. Then the kernel's last events
    /// are read and the audit log is fsynced.
    pub async fn shutdown(&self, detach: bool) -> u64 {
        self.inner.ready.draining();
        let entries: Vec<Entry> = {
            let mut table = self.inner.table.lock().await;
            if detach {
                let _ = std::fs::remove_file(&self.inner.state_path);
            }
            std::mem::take(&mut table.entries).into_values().collect()
        };
        let drain = self.inner.cfg.drain_timeout;
        let mut tasks = Vec::new();
        for e in entries {
            tasks.push(tokio::spawn(async move {
                let name = e.saved.decl.name.clone();
                let cut = if detach {
                    e.sandbox.remove(drain).await
                } else {
                    e.sandbox.release(drain).await
                };
                if cut > 0 {
                    warn!(sandbox = %name, cut, "connections cut off after the drain timeout");
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        if detach {
            let table = self.inner.table.lock().await;
            for p in table.pending.values() {
                if let Some(s) = &p.saved {
                    self.inner
                        .node
                        .kernel
                        .purge(s.id, s.cgroup_id, &self.link_dir(s.id));
                }
            }
        }
        let dropped = self.inner.node.shutdown().await;
        for s in self.inner.node.shared.audit.stop_all_learning() {
            if let Err(e) = s.write() {
                error!(sandbox = %s.name, file = %s.out.display(), error = %e, "cannot write the learned policy");
            }
        }
        if detach {
            bpf::remove_pin_dir(&self.inner.pin_root);
        }
        dropped
    }
}

/// What `DELETE /v1/sandboxes/NAME` answers.
#[derive(Clone, Debug, Serialize)]
pub struct RemoveReport {
    pub name: String,
    /// Connections still open at the drain deadline, cut off.
    pub cut_off: usize,
}

/// What `POST /v1/reload` answers.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReloadReport {
    pub reloaded: usize,
    pub errors: Vec<String>,
}

/// Takes `<confdir>/daemon.lock`, so that a second daemon on the same state and pins
/// refuses to start instead of taking over the first one's sandboxes.
fn lock_confdir(confdir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, Error> {
    use std::io::{Read as _, Seek as _, Write as _};
    let path = confdir.join("daemon.lock");
    let err = |source| Error::Lock {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(confdir).map_err(err)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(err)?;
    let mut f = match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((mut f, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            return Err(Error::AlreadyRunning {
                path,
                pid: pid.trim().to_owned(),
            });
        }
        Err((_, e)) => return Err(err(e.into())),
    };
    f.set_len(0).map_err(err)?;
    f.rewind().map_err(err)?;
    write!(f, "{}", std::process::id()).map_err(err)?;
    Ok(f)
}

/// Stops the listeners of a namespace no sandbox uses any more, and waits until their
/// sockets are closed.
async fn close_net(net: Arc<Net>) {
    if let Ok(net) = Arc::try_unwrap(net) {
        Listeners::close(net.listeners).await;
    }
}

fn pending_key(name: &str) -> String {
    format!("5-sandbox-{name}")
}

fn next_id(table: &mut Table) -> u32 {
    let id = table.next_id.max(1);
    table.next_id = id + 1;
    id
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn flags(decl: &SandboxDecl) -> PolicyFlags {
    PolicyFlags {
        warn: decl.warn || decl.learn.is_some(),
        dns_pinning: decl.dns_pinning,
        no_private_guard: decl.no_guard.contains(&GuardName::PrivateRanges),
        no_fronting_guard: decl.no_guard.contains(&GuardName::DomainFronting),
        no_doh_guard: decl.no_guard.contains(&GuardName::Doh),
        ..Default::default()
    }
}

/// Whether a saved sandbox's cgroup is still the one it was registered on.
fn cgroup_alive(s: &Saved) -> bool {
    cgroup::cgroup_id(&s.cgroup_path).is_ok_and(|id| id == s.cgroup_id)
}

/// A process in the cgroup subtree, if any.
fn first_pid(cgroup: &Path) -> Option<u32> {
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).ok()?;
    if let Some(pid) = procs.lines().find_map(|l| l.trim().parse().ok()) {
        return Some(pid);
    }
    std::fs::read_dir(cgroup)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| first_pid(&e.path()))
}

/// `egress daemon`: runs until SIGTERM or SIGINT; SIGHUP (or a change of the policy file)
/// reloads the policy.
pub async fn run(cfg: DaemonConfig, detach_on_exit: bool) -> Result<u8, Error> {
    let api_path = cfg.api.clone();
    let api_group = cfg.api_group.clone();
    let recheck = cfg.recheck;
    let policy_file = cfg.policy.clone();
    let docker_watch = cfg.docker.watch;
    let bound = Daemon::start(cfg).await?;
    let daemon = bound.daemon;
    let api =
        api::bind(&api_path, api_group.as_ref().map(|g| g.1)).map_err(|source| Error::Api {
            path: api_path.clone(),
            source,
        })?;
    let api_task = tokio::spawn(api::serve(api, daemon.clone(), api_group.map(|g| g.1)));
    let recheck_task = {
        let d = daemon.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(recheck);
            tick.tick().await;
            loop {
                tick.tick().await;
                d.recheck().await;
            }
        })
    };
    let reload_task = policy_file.map(|path| {
        let d = daemon.clone();
        tokio::spawn(watch_policy(path, d))
    });
    let docker_task = docker_watch.then(|| {
        daemon
            .ready()
            .pending("6-docker", "enrolling the running labelled containers");
        tokio::spawn(watch_docker(daemon.clone()))
    });
    // systemd (Type=notify): ready when /readyz would say so.
    let notify_task = {
        let ready = daemon.ready().clone();
        tokio::spawn(async move {
            loop {
                if ready.check().is_ok() {
                    crate::notify::notify("READY=1");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut term = tokio::signal::unix::signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).map_err(Error::Signal)?;
    let sig = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = sig, "shutting down");
    daemon.ready().draining();
    notify_task.abort();
    crate::notify::notify("STOPPING=1");
    api_task.abort();
    let _ = api_task.await;
    let _ = std::fs::remove_file(&api_path);
    recheck_task.abort();
    let _ = recheck_task.await;
    for t in reload_task.into_iter().chain(docker_task) {
        t.abort();
        let _ = t.await;
    }
    let dropped = daemon.shutdown(detach_on_exit).await;
    let shared = &daemon.inner.node.shared;
    info!(
        audit_dropped = dropped,
        events_lost = shared
            .metrics
            .kernel_events_lost
            .load(std::sync::atomic::Ordering::Relaxed),
        audit_queue_waits = shared.audit.queue_waits(),
        detached = detach_on_exit,
        "daemon stopped"
    );
    Ok(if dropped > 0 {
        crate::exit::SOFTWARE
    } else {
        0
    })
}

/// Enrols every running container labelled `egress.policy=NAME`, then follows the event
/// stream: a labelled container is registered when it starts and removed when it dies or is
/// destroyed. Reconnects with backoff; each reconnection lists again, so nothing started
/// meanwhile is missed.
async fn watch_docker(daemon: Daemon) {
    let docker = crate::docker::Docker::new(&daemon.inner.cfg.docker.socket);
    let label = crate::docker::POLICY_LABEL;
    let mut backoff = Duration::from_millis(500);
    loop {
        match docker.running_with_label(label).await {
            Ok(ids) => {
                for id in ids {
                    enrol(&daemon, &docker, &id).await;
                }
                daemon.ready().done("6-docker");
                backoff = Duration::from_millis(500);
                let d = daemon.clone();
                let dk = docker.clone();
                let r = docker
                    .follow_events(label, async move |ev: crate::docker::Event| {
                        match ev.action.as_str() {
                            "start" => enrol(&d, &dk, &ev.actor.id).await,
                            "die" | "destroy" => {
                                if let Some(name) = d.by_container(&ev.actor.id).await {
                                    info!(sandbox = %name, container = %ev.actor.id, event = %ev.action, "container stopped; removing its sandbox");
                                    let _ = d.remove(&name).await;
                                }
                            }
                            _ => {}
                        }
                    })
                    .await;
                if let Err(e) = r {
                    warn!(error = %crate::error_chain(&e), "docker event stream failed; reconnecting");
                }
            }
            Err(e) => {
                daemon
                    .ready()
                    .pending("6-docker", format!("docker: {}", crate::error_chain(&e)));
                warn!(error = %crate::error_chain(&e), retry_in = ?backoff, "cannot list docker containers");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Registers a labelled container as a sandbox, unless it already is one.
async fn enrol(daemon: &Daemon, docker: &crate::docker::Docker, id: &str) {
    if daemon.by_container(id).await.is_some() {
        return;
    }
    let c = match docker.inspect(id).await {
        Ok(c) if c.running => c,
        Ok(_) => return,
        Err(e) => {
            warn!(container = id, error = %crate::error_chain(&e), "cannot inspect a labelled container");
            return;
        }
    };
    let Some(policy) = c.labels.get(crate::docker::POLICY_LABEL).cloned() else {
        return;
    };
    let mut name = crate::docker::sandbox_name(&c);
    if daemon.list().await.iter().any(|s| s.name == name) {
        name = format!("{}-{}", &name[..name.len().min(51)], &c.id[..12]);
    }
    let req = config::SandboxRequest {
        name: Some(name.clone()),
        docker: Some(c.id.clone()),
        policy: Some(policy),
        ..Default::default()
    };
    let decl = match req.validate() {
        Ok(d) => d,
        Err(e) => {
            warn!(container = %c.id, error = %e, "labelled container not enrolled");
            return;
        }
    };
    match daemon.add_from(decl, Source::Docker).await {
        Ok(info) => {
            info!(sandbox = %info.name, container = %c.id, policy = %info.policy, "container enrolled")
        }
        Err(e) => {
            warn!(container = %c.id, sandbox = %name, error = %e, "labelled container not enrolled")
        }
    }
}

/// Reloads every sandbox's policy on SIGHUP or when the policy file changes.
async fn watch_policy(path: PathBuf, daemon: Daemon) {
    let mut hup = match tokio::signal::unix::signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            error!(error = %e, "cannot listen for SIGHUP; reload on file change only");
            None
        }
    };
    let mut last = crate::reload::stamp(&path);
    let mut tick = tokio::time::interval(crate::reload::POLL_INTERVAL);
    loop {
        let hup_recv = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = hup_recv => {}
            _ = tick.tick() => {
                let now = crate::reload::stamp(&path);
                if now == last { continue; }
                last = now;
            }
        }
        daemon.reload().await;
    }
}

/// `egress daemon check FILE`: validates the config and the policy names it uses.
pub fn check(path: &Path) -> Result<String, CheckError> {
    let cfg = config::load(path)?;
    let policy = match &cfg.policy {
        Some(p) => Some(policy::file::load(p).map_err(CompileError::from)?),
        None => None,
    };
    for s in &cfg.sandboxes {
        if let Some(f) = &policy {
            if !f.sandboxes.contains_key(s.policy_name()) {
                let have: Vec<&str> = f.sandboxes.keys().map(String::as_str).collect();
                return Err(CheckError::UnknownPolicy {
                    config: path.to_owned(),
                    sandbox: s.name.clone(),
                    policy: s.policy_name().to_owned(),
                    file: cfg.policy.clone().unwrap_or_default(),
                    have: have.join(", "),
                });
            }
        } else if s.policy.is_some() {
            return Err(CheckError::NoPolicyFile {
                config: path.to_owned(),
                sandbox: s.name.clone(),
            });
        }
    }
    let names: Vec<&str> = cfg.sandboxes.iter().map(|s| s.name.as_str()).collect();
    Ok(format!(
        "{}: ok: {} static sandbox(es){}{}; api {}; admin {}\n",
        path.display(),
        names.len(),
        if names.is_empty() {
            String::new()
        } else {
            format!(" ({})", names.join(", "))
        },
        cfg.policy
            .as_ref()
            .map(|p| format!("; policy {}", p.display()))
            .unwrap_or_default(),
        cfg.api.display(),
        cfg.admin
    ))
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Policy(#[from] CompileError),
    #[error("{}: sandbox {sandbox:?}: policy {policy:?} is not a sandbox of {} (it has: {have})", config.display(), file.display())]
    UnknownPolicy {
        config: PathBuf,
        sandbox: String,
        policy: String,
        file: PathBuf,
        have: String,
    },
    #[error("{}: sandbox {sandbox:?} names a policy, but [daemon] has no policy file", config.display())]
    NoPolicyFile { config: PathBuf, sandbox: String },
}
