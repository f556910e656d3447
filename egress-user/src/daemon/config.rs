//! The daemon's config file (TOML) and the sandbox declaration shared by the config, the
//! runtime API and the persisted state.
//!
//! Every error names `FILE:LINE:COL: key: message`, as `egress policy check` does, and the
//! binary exits with EX_USAGE.
//!
//! ```toml
//! [daemon]
//! confdir = "/var/lib/egress"           # CA, state, default audit file
//! api = "/run/egress/api.sock"          # runtime API, mode 0600 root (api_group → 0660)
//! admin = "127.0.0.1:9464"              # /healthz /readyz /metrics
//! policy = "/etc/egress/policy.toml"    # named sandboxes; reloaded on change or SIGHUP
//! audit = "/var/lib/egress/audit.jsonl" # or "-" for stdout
//! audit_queue = "64MiB"                 # records held before new work waits for the writer
//! dns_upstreams = ["10.0.0.2"]          # default: each sandbox's own resolv.conf
//! drain_timeout = "10s"
//!
//! [[sandbox]]                           # static sandboxes, registered at start
//! name = "agent-a"
//! cgroup = "agents/a"                   # relative to the cgroup2 root, or absolute
//! policy = "agent"                      # a [sandbox.NAME] of the policy file (default: name)
//! netns = "/var/run/netns/a"            # optional; or pid = 1234 for that process's netns
//! ```

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::{
    audit::Sink,
    cli::{GuardName, TlsConfig, DEFAULT_CONFDIR, DEFAULT_INTERCEPT_PORTS},
    located::{child, index, Doc, Located},
};

pub const DEFAULT_API: &str = "/run/egress/api.sock";
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9464";
/// The proxy and DNS listener ports in every sandbox namespace.
pub const DEFAULT_PROXY_PORT: u16 = 15001;
pub const DEFAULT_DNS_PORT: u16 = 15053;
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often cgroups and namespaces of registered sandboxes are checked for changes.
pub const DEFAULT_RECHECK: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the daemon config {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] Located),
}

/// How a sandbox's network namespace is found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetnsSpec {
    /// The daemon's own: the sandbox shares the host's network.
    #[default]
    Host,
    /// A namespace file (`/var/run/netns/NAME`, `/proc/PID/ns/net`).
    Path(PathBuf),
    /// The namespace of this process, and later of whatever process is in the sandbox's
    /// cgroup (a restarted container gets a new one).
    Pid(u32),
}

/// Where a sandbox's upstream connections leave from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamFrom {
    /// Its own network namespace: its address, routes and the node's rules for it apply.
    #[default]
    Sandbox,
    /// The daemon's namespace.
    Host,
}

/// One sandbox as declared in the config or through the API, validated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxDecl {
    pub name: String,
    /// As given: relative to the cgroup2 root, or absolute.
    pub cgroup: String,
    /// The policy file's sandbox to apply; `None`: the one named like the sandbox.
    pub policy: Option<String>,
    pub netns: NetnsSpec,
    pub strict: bool,
    pub intercept_ports: Vec<u16>,
    pub upstream: UpstreamFrom,
    pub warn: bool,
    pub dns_pinning: bool,
    pub no_guard: Vec<GuardName>,
    /// Learn mode: warn, and write a policy of what the sandbox did to this file when it is
    /// removed or the daemon stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learn: Option<PathBuf>,
    /// Siblings of one parent domain before `*.parent` is suggested.
    #[serde(default = "default_wildcard_min")]
    pub learn_wildcard_min: usize,
    /// A Docker container to resolve into `cgroup` and `netns` (by its init pid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<String>,
    /// A Kubernetes pod (and optionally one of its containers) to resolve likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

/// A pod by UID, optionally narrowed to one container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

fn default_wildcard_min() -> usize {
    crate::learn::DEFAULT_WILDCARD_MIN
}

impl SandboxDecl {
    /// The policy file's sandbox this one applies.
    pub fn policy_name(&self) -> &str {
        self.policy.as_deref().unwrap_or(&self.name)
    }
}

/// A sandbox as the API and the config spell it, before validation.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxRequest {
    pub name: Option<String>,
    pub cgroup: Option<String>,
    pub policy: Option<String>,
    pub netns: Option<String>,
    pub pid: Option<u32>,
    pub strict: Option<bool>,
    pub intercept_ports: Option<Vec<u16>>,
    pub upstream: Option<String>,
    pub warn: Option<bool>,
    pub dns_pinning: Option<bool>,
    pub no_guard: Option<Vec<String>>,
    pub learn: Option<String>,
    pub learn_wildcard_min: Option<usize>,
    pub docker: Option<String>,
    pub pod_uid: Option<String>,
    pub container: Option<String>,
}

/// A field that is wrong, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn field(field: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.to_owned(),
        message: message.into(),
    }
}

impl SandboxRequest {
    /// Checks every field on its own (whether the cgroup, netns or policy exist is the
    /// daemon's to check when it registers the sandbox).
    pub fn validate(self) -> Result<SandboxDecl, FieldError> {
        let name = self.name.ok_or_else(|| field("name", "required"))?;
        crate::policy::file::check_name(&name).map_err(|m| field("name", m))?;
        // Where the sandbox is: a cgroup, or a container or pod egress resolves into one.
        let cgroup = match (&self.cgroup, &self.docker, &self.pod_uid) {
            (Some(c), None, None) => {
                check_cgroup(c).map_err(|m| field("cgroup", m))?;
                c.clone()
            }
            (None, Some(d), None) if d.trim().is_empty() => {
                return Err(field("docker", "empty; give a container id or name"))
            }
            (None, None, Some(u)) => {
                crate::pods::normalize_uid(u).map_err(|e| field("pod_uid", e.to_string()))?;
                String::new()
            }
            (None, Some(_), None) => String::new(),
            (None, None, None) => {
                return Err(field(
                    "cgroup",
                    "required (or docker = CONTAINER, or pod_uid = UID)",
                ))
            }
            _ => {
                let which = if self.cgroup.is_some() {
                    "cgroup"
                } else {
                    "docker"
                };
                return Err(field(
                    which,
                    "give one of cgroup, docker and pod_uid: each names where the sandbox is",
                ));
            }
        };
        if self.container.is_some() && self.pod_uid.is_none() {
            return Err(field("container", "only with pod_uid"));
        }
        if (self.docker.is_some() || self.pod_uid.is_some())
            && (self.netns.is_some() || self.pid.is_some())
        {
            return Err(field(
                if self.netns.is_some() { "netns" } else { "pid" },
                "a container's or pod's network namespace is found from its processes; drop it",
            ));
        }
        if let Some(p) = &self.policy {
            crate::policy::file::check_name(p).map_err(|m| field("policy", m))?;
        }
        let netns = match (self.netns, self.pid) {
            (Some(_), Some(_)) => {
                return Err(field(
                    "netns",
                    "give netns or pid, not both: pid means that process's namespace",
                ))
            }
            (Some(p), None) if p.is_empty() || !p.starts_with('/') => {
                return Err(field(
                    "netns",
                    format!("{p:?} is not an absolute path such as /var/run/netns/NAME"),
                ))
            }
            (Some(p), None) => NetnsSpec::Path(p.into()),
            (None, Some(0)) => return Err(field("pid", "0 is not a process")),
            (None, Some(pid)) => NetnsSpec::Pid(pid),
            (None, None) => NetnsSpec::Host,
        };
        let mut intercept_ports = self
            .intercept_ports
            .unwrap_or_else(|| DEFAULT_INTERCEPT_PORTS.to_vec());
        if let Some(bad) = intercept_ports.iter().find(|p| **p == 0 || **p == 53) {
            return Err(field(
                "intercept_ports",
                format!(
                    "{bad} cannot be intercepted (0 is no port; 53 always goes to egress's DNS listener)"
                ),
            ));
        }
        if intercept_ports.is_empty() {
            return Err(field(
                "intercept_ports",
                "empty: at least one port (usually 80 and 443) goes through the proxy",
            ));
        }
        intercept_ports.sort_unstable();
        intercept_ports.dedup();
        let upstream = match self.upstream.as_deref() {
            None | Some("sandbox") => UpstreamFrom::Sandbox,
            Some("host") => UpstreamFrom::Host,
            Some(other) => {
                return Err(field(
                    "upstream",
                    format!("{other:?}: use \"sandbox\" (its own namespace) or \"host\""),
                ))
            }
        };
        let mut no_guard = Vec::new();
        for (i, g) in self.no_guard.unwrap_or_default().iter().enumerate() {
            let parsed = <GuardName as clap::ValueEnum>::from_str(g, false).map_err(|_| {
                field(
                    &index("no_guard", i),
                    format!("{g:?}: use private-ranges, domain-fronting or doh"),
                )
            })?;
            no_guard.push(parsed);
        }
        let learn = match self.learn {
            None => None,
            Some(f) => {
                let p = PathBuf::from(&f);
                if !p.is_absolute() {
                    return Err(field(
                        "learn",
                        format!(
                            "{f:?} is not an absolute path (the daemon's directory is not yours)"
                        ),
                    ));
                }
                crate::cli::check_learn_output(&p).map_err(|m| field("learn", m))?;
                Some(p)
            }
        };
        let learn_wildcard_min = match self.learn_wildcard_min {
            None => crate::learn::DEFAULT_WILDCARD_MIN,
            Some(n) if n >= 2 => n,
            Some(n) => {
                return Err(field(
                    "learn_wildcard_min",
                    format!("{n}: give a number of sibling names, 2 or more"),
                ))
            }
        };
        Ok(SandboxDecl {
            name,
            cgroup,
            policy: self.policy,
            netns,
            strict: self.strict.unwrap_or(false),
            intercept_ports,
            upstream,
            warn: self.warn.unwrap_or(false),
            dns_pinning: self.dns_pinning.unwrap_or(false),
            no_guard,
            learn,
            learn_wildcard_min,
            docker: self.docker,
            pod: self.pod_uid.map(|uid| PodRef {
                uid,
                container: self.container,
            }),
        })
    }
}

fn check_cgroup(s: &str) -> Result<(), String> {
    if s.trim().is_empty() {
        return Err("empty; give a path relative to the cgroup2 root, e.g. agents/a".into());
    }
    if Path::new(s)
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(format!("{s:?} contains `..`"));
    }
    Ok(())
}

/// A validated daemon config.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub path: PathBuf,
    pub confdir: PathBuf,
    pub api: PathBuf,
    /// Group allowed on the API socket (mode 0660), with its gid.
    pub api_group: Option<(String, u32)>,
    pub admin: SocketAddr,
    pub policy: Option<PathBuf>,
    pub audit: Sink,
    pub audit_query: bool,
    /// Bytes of audit records queued before new work waits for the writer.
    pub audit_queue_bytes: u64,
    /// Empty: each sandbox's own resolvers.
    pub dns_upstreams: Vec<SocketAddr>,
    pub drain_timeout: Duration,
    pub recheck: Duration,
    /// Where maps and links are pinned; `None`: `<bpffs>/egress/daemon`.
    pub pin_root: Option<PathBuf>,
    pub proxy_port: u16,
    pub dns_port: u16,
    pub tls: TlsConfig,
    /// `[docker]`: enrol containers by label.
    pub docker: DockerConfig,
    pub sandboxes: Vec<SandboxDecl>,
}

/// The `[docker]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerConfig {
    /// Follow the Docker Engine's events: a container started with `egress.policy=NAME` is
    /// registered, and removed when it dies.
    pub watch: bool,
    pub socket: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    daemon: Option<RawDaemon>,
    docker: Option<RawDocker>,
    #[serde(default)]
    sandbox: Vec<Spanned<RawSandbox>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    confdir: Option<Spanned<String>>,
    api: Option<Spanned<String>>,
    api_group: Option<Spanned<String>>,
    admin: Option<Spanned<String>>,
    policy: Option<Spanned<String>>,
    audit: Option<Spanned<String>>,
    audit_max_bytes: Option<u64>,
    audit_keep: Option<usize>,
    audit_query: Option<bool>,
    audit_queue: Option<Spanned<toml::Value>>,
    dns_upstreams: Option<Vec<Spanned<String>>>,
    drain_timeout: Option<Spanned<String>>,
    recheck_interval: Option<Spanned<String>>,
    bpffs_dir: Option<Spanned<String>>,
    proxy_port: Option<Spanned<u16>>,
    dns_port: Option<Spanned<u16>>,
    ca_cert: Option<Spanned<String>>,
    ca_key: Option<Spanned<String>>,
    upstream_ca: Option<Vec<Spanned<String>>>,
    upstream_trust_dir: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocker {
    watch: Option<bool>,
    socket: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSandbox {
    name: Option<Spanned<String>>,
    cgroup: Option<Spanned<String>>,
    policy: Option<Spanned<String>>,
    netns: Option<Spanned<String>>,
    pid: Option<Spanned<u32>>,
    strict: Option<Spanned<bool>>,
    intercept_ports: Option<Spanned<Vec<u16>>>,
    upstream: Option<Spanned<String>>,
    warn: Option<Spanned<bool>>,
    dns_pinning: Option<Spanned<bool>>,
    no_guard: Option<Spanned<Vec<String>>>,
    learn: Option<Spanned<String>>,
    learn_wildcard_min: Option<Spanned<usize>>,
    docker: Option<Spanned<String>>,
    pod_uid: Option<Spanned<String>>,
    container: Option<Spanned<String>>,
}

/// Reads and validates the daemon config at `path`.
pub fn load(path: &Path) -> Result<DaemonConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(parse(&text, path)?)
}

/// Validates a config document; `path` names the file in errors, and relative paths in it
/// are taken relative to its directory.
pub fn parse(text: &str, path: &Path) -> Result<DaemonConfig, Located> {
    let doc = Doc { text, path };
    let raw: RawFile = toml::from_str(text).map_err(|e| doc.toml_error(&e))?;
    let d = raw.daemon.unwrap_or_default();
    let base = path.parent().unwrap_or(Path::new("."));
    let file = |v: &Spanned<String>, key: &str| -> Result<PathBuf, Located> {
        if v.get_ref().is_empty() {
            return Err(doc.at(v, child("daemon", key), "empty path"));
        }
        Ok(base.join(v.get_ref()))
    };
    let opt_file =
        |v: &Option<Spanned<String>>, key: &str| v.as_ref().map(|v| file(v, key)).transpose();
    let confdir = opt_file(&d.confdir, "confdir")?.unwrap_or_else(|| DEFAULT_CONFDIR.into());
    let api = opt_file(&d.api, "api")?.unwrap_or_else(|| DEFAULT_API.into());
    let api_group = match &d.api_group {
        None => None,
        Some(g) => {
            let group = nix::unistd::Group::from_name(g.get_ref())
                .ok()
                .flatten()
                .ok_or_else(|| {
                    doc.at(
                        g,
                        "daemon.api_group".into(),
                        format!("no group named {:?} on this host", g.get_ref()),
                    )
                })?;
            Some((g.get_ref().clone(), group.gid.as_raw()))
        }
    };
    let admin = match &d.admin {
        None => DEFAULT_ADMIN.parse().expect("a valid default"),
        Some(a) => a.get_ref().parse::<SocketAddr>().map_err(|_| {
            doc.at(
                a,
                "daemon.admin".into(),
                format!("{:?} is not IP:PORT, e.g. 127.0.0.1:9464", a.get_ref()),
            )
        })?,
    };
    let policy = opt_file(&d.policy, "policy")?;
    let audit = match &d.audit {
        Some(a) if a.get_ref() == "-" => Sink::Stdout,
        a => Sink::File {
            path: opt_file(a, "audit")?.unwrap_or_else(|| confdir.join("audit.jsonl")),
            max_bytes: d.audit_max_bytes.unwrap_or(crate::audit::DEFAULT_MAX_BYTES),
            keep: d.audit_keep.unwrap_or(crate::audit::DEFAULT_KEEP),
        },
    };
    let audit_queue_bytes = match &d.audit_queue {
        None => crate::audit::DEFAULT_QUEUE_BYTES,
        Some(v) => match v.get_ref() {
            toml::Value::String(t) => crate::audit::parse_size(t),
            toml::Value::Integer(n) => crate::audit::parse_size(&n.to_string()),
            _ => Err("must be a size such as \"64MiB\" or a number of bytes".to_owned()),
        }
        .map_err(|m| doc.at(v, "daemon.audit_queue".into(), m))?,
    };
    let mut dns_upstreams = Vec::new();
    for (i, u) in d.dns_upstreams.iter().flatten().enumerate() {
        let a = crate::cli::parse_dns_upstream(u.get_ref())
            .map_err(|m| doc.at(u, index("daemon.dns_upstreams", i), m))?;
        dns_upstreams.push(a);
    }
    let duration = |v: &Option<Spanned<String>>, key: &str, default: Duration| match v {
        None => Ok(default),
        Some(s) => parse_duration(s.get_ref()).map_err(|m| doc.at(s, child("daemon", key), m)),
    };
    let drain_timeout = duration(&d.drain_timeout, "drain_timeout", DEFAULT_DRAIN_TIMEOUT)?;
    let recheck = duration(&d.recheck_interval, "recheck_interval", DEFAULT_RECHECK)?;
    if recheck.is_zero() {
        let s = d.recheck_interval.as_ref().expect("zero only when given");
        return Err(doc.at(s, "daemon.recheck_interval".into(), "must be more than 0"));
    }
    let port = |v: &Option<Spanned<u16>>, key: &str, default: u16| match v {
        None => Ok(default),
        Some(p) if *p.get_ref() == 0 || *p.get_ref() == 53 => Err(doc.at(
            p,
            child("daemon", key),
            format!("{} cannot be a listener port", p.get_ref()),
        )),
        Some(p) => Ok(*p.get_ref()),
    };
    let proxy_port = port(&d.proxy_port, "proxy_port", DEFAULT_PROXY_PORT)?;
    let dns_port = port(&d.dns_port, "dns_port", DEFAULT_DNS_PORT)?;
    if proxy_port == dns_port {
        let at = d
            .dns_port
            .as_ref()
            .or(d.proxy_port.as_ref())
            .expect("equal ports were given");
        return Err(doc.at(at, "daemon.dns_port".into(), "must differ from proxy_port"));
    }
    let user_ca = match (&d.ca_cert, &d.ca_key) {
        (Some(c), Some(k)) => Some((file(c, "ca_cert")?, file(k, "ca_key")?)),
        (None, None) => None,
        (Some(c), None) => return Err(doc.at(c, "daemon.ca_cert".into(), "needs ca_key too")),
        (None, Some(k)) => return Err(doc.at(k, "daemon.ca_key".into(), "needs ca_cert too")),
    };
    let mut upstream_cas = Vec::new();
    for (i, c) in d.upstream_ca.iter().flatten().enumerate() {
        upstream_cas.push(file(c, &index("upstream_ca", i))?);
    }
    let tls = TlsConfig {
        confdir: confdir.clone(),
        user_ca,
        upstream_trust_dir: opt_file(&d.upstream_trust_dir, "upstream_trust_dir")?,
        upstream_cas,
        ca_env: false,
        ca_mount: false,
    };
    let mut sandboxes: Vec<SandboxDecl> = Vec::new();
    let mut names = BTreeSet::new();
    for (i, s) in raw.sandbox.into_iter().enumerate() {
        let key = index("sandbox", i);
        let span = s.span();
        let s = s.into_inner();
        let name_at = s.name.clone();
        let req = SandboxRequest {
            name: s.name.as_ref().map(|v| v.get_ref().clone()),
            cgroup: s.cgroup.as_ref().map(|v| v.get_ref().clone()),
            policy: s.policy.as_ref().map(|v| v.get_ref().clone()),
            netns: s.netns.as_ref().map(|v| v.get_ref().clone()),
            pid: s.pid.as_ref().map(|v| *v.get_ref()),
            strict: s.strict.as_ref().map(|v| *v.get_ref()),
            intercept_ports: s.intercept_ports.as_ref().map(|v| v.get_ref().clone()),
            upstream: s.upstream.as_ref().map(|v| v.get_ref().clone()),
            warn: s.warn.as_ref().map(|v| *v.get_ref()),
            dns_pinning: s.dns_pinning.as_ref().map(|v| *v.get_ref()),
            no_guard: s.no_guard.as_ref().map(|v| v.get_ref().clone()),
            learn: s.learn.as_ref().map(|v| v.get_ref().clone()),
            learn_wildcard_min: s.learn_wildcard_min.as_ref().map(|v| *v.get_ref()),
            docker: s.docker.as_ref().map(|v| v.get_ref().clone()),
            pod_uid: s.pod_uid.as_ref().map(|v| v.get_ref().clone()),
            container: s.container.as_ref().map(|v| v.get_ref().clone()),
        };
        let decl = req.validate().map_err(|e| {
            // Point at the offending value where there is one, else at the table.
            let first = e.field.split(['.', '[']).next().unwrap_or("");
            let at = match first {
                "name" => s.name.as_ref().map(|v| v.span()),
                "cgroup" => s.cgroup.as_ref().map(|v| v.span()),
                "policy" => s.policy.as_ref().map(|v| v.span()),
                "netns" => s.netns.as_ref().map(|v| v.span()),
                "pid" => s.pid.as_ref().map(|v| v.span()),
                "intercept_ports" => s.intercept_ports.as_ref().map(|v| v.span()),
                "upstream" => s.upstream.as_ref().map(|v| v.span()),
                "no_guard" => s.no_guard.as_ref().map(|v| v.span()),
                "learn" => s.learn.as_ref().map(|v| v.span()),
                "learn_wildcard_min" => s.learn_wildcard_min.as_ref().map(|v| v.span()),
                "docker" => s.docker.as_ref().map(|v| v.span()),
                "pod_uid" => s.pod_uid.as_ref().map(|v| v.span()),
                "container" => s.container.as_ref().map(|v| v.span()),
                _ => None,
            };
            doc.error(
                at.unwrap_or(span.clone()),
                Some(format!("{key}.{}", e.field)),
                e.message,
            )
        })?;
        if !names.insert(decl.name.clone()) {
            let at = name_at.expect("a validated sandbox has a name");
            return Err(doc.at(
                &at,
                format!("{key}.name"),
                format!("a sandbox named {:?} is declared twice", decl.name),
            ));
        }
        sandboxes.push(decl);
    }
    Ok(DaemonConfig {
        path: path.to_owned(),
        confdir,
        api,
        api_group,
        admin,
        policy,
        audit,
        audit_query: d.audit_query.unwrap_or(false),
        audit_queue_bytes,
        dns_upstreams,
        drain_timeout,
        recheck,
        pin_root: opt_file(&d.bpffs_dir, "bpffs_dir")?,
        proxy_port,
        dns_port,
        tls,
        docker: DockerConfig {
            watch: raw.docker.as_ref().and_then(|d| d.watch).unwrap_or(false),
            socket: match raw.docker.as_ref().and_then(|d| d.socket.as_ref()) {
                Some(s) if s.get_ref().is_empty() => {
                    return Err(doc.at(s, "docker.socket".into(), "empty path"))
                }
                Some(s) => base.join(s.get_ref()),
                None => crate::docker::DEFAULT_SOCKET.into(),
            },
        },
        sandboxes,
    })
}

/// `10s`, `500ms`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 10s, 500ms or 2m"))?;
    Ok(match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{s:?} is not a duration such as 10s, 500ms or 2m")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> DaemonConfig {
        parse(text, Path::new("/etc/egress/daemon.toml")).unwrap_or_else(|e| panic!("{e}"))
    }

    fn parse_err(text: &str) -> String {
        parse(text, Path::new("/etc/egress/daemon.toml"))
            .map(|_| ())
            .expect_err("should not validate")
            .to_string()
    }

    #[test]
    fn the_documented_example_validates() {
        let c = parse_ok(
            r#"
[daemon]
confdir = "/var/lib/egress"
api = "/run/egress/api.sock"
admin = "127.0.0.1:9464"
policy = "/etc/egress/policy.toml"
audit = "/var/lib/egress/audit.jsonl"
dns_upstreams = ["10.0.0.2"]
drain_timeout = "10s"

[[sandbox]]
name = "agent-a"
cgroup = "agents/a"
policy = "agent"
netns = "/var/run/netns/a"

[[sandbox]]
name = "agent-b"
cgroup = "/sys/fs/cgroup/agents/b"
pid = 1234
strict = true
upstream = "host"
intercept_ports = [443, 80, 8080, 443]
no_guard = ["doh"]
"#,
        );
        assert_eq!(c.drain_timeout, Duration::from_secs(10));
        assert_eq!(c.dns_upstreams, vec!["10.0.0.2:53".parse().unwrap()]);
        assert_eq!(c.sandboxes.len(), 2);
        let a = &c.sandboxes[0];
        assert_eq!(a.policy_name(), "agent");
        assert_eq!(a.netns, NetnsSpec::Path("/var/run/netns/a".into()));
        assert_eq!(a.intercept_ports, vec![80, 443]);
        assert_eq!(a.upstream, UpstreamFrom::Sandbox);
        let b = &c.sandboxes[1];
        assert_eq!(b.policy_name(), "agent-b");
        assert_eq!(b.netns, NetnsSpec::Pid(1234));
        assert_eq!(b.intercept_ports, vec![80, 443, 8080]);
        assert_eq!(b.no_guard, vec![GuardName::Doh]);
        assert!(b.strict);
        assert_eq!(b.upstream, UpstreamFrom::Host);
    }

    #[test]
    fn the_audit_queue_takes_a_size_or_bytes() {
        assert_eq!(
            parse_ok("").audit_queue_bytes,
            crate::audit::DEFAULT_QUEUE_BYTES
        );
        let c = parse_ok("[daemon]\naudit_queue = \"8MiB\"\n");
        assert_eq!(c.audit_queue_bytes, 8 << 20);
        let c = parse_ok("[daemon]\naudit_queue = 65536\n");
        assert_eq!(c.audit_queue_bytes, 65536);
    }

    #[test]
    fn defaults_fill_an_empty_file() {
        let c = parse_ok("");
        assert_eq!(c.api, PathBuf::from(DEFAULT_API));
        assert_eq!(c.admin.to_string(), DEFAULT_ADMIN);
        assert_eq!(
            (c.proxy_port, c.dns_port),
            (DEFAULT_PROXY_PORT, DEFAULT_DNS_PORT)
        );
        assert!(c.sandboxes.is_empty());
        assert_eq!(
            c.audit,
            Sink::File {
                path: PathBuf::from(DEFAULT_CONFDIR).join("audit.jsonl"),
                max_bytes: crate::audit::DEFAULT_MAX_BYTES,
                keep: crate::audit::DEFAULT_KEEP
            }
        );
    }

    #[test]
    fn errors_name_file_line_column_and_key() {
        let cases: &[(&str, &str)] = &[
            (
                "[daemon]\nadmin = \"localhost\"\n",
                "/etc/egress/daemon.toml:2:9: daemon.admin: \"localhost\" is not IP:PORT",
            ),
            (
                "[daemon]\ndrain_timeout = \"soon\"\n",
                "/etc/egress/daemon.toml:2:17: daemon.drain_timeout:",
            ),
            (
                "[daemon]\naudit_queue = \"lots\"\n",
                "/etc/egress/daemon.toml:2:15: daemon.audit_queue: \"lots\" is not a size",
            ),
            (
                "[daemon]\naudit_queue = 0\n",
                "/etc/egress/daemon.toml:2:15: daemon.audit_queue: \"0\": must be between",
            ),
            (
                "[daemon]\nproxy_port = 15001\ndns_port = 15001\n",
                "/etc/egress/daemon.toml:3:12: daemon.dns_port: must differ",
            ),
            (
                "[daemon]\nbogus = 1\n",
                "/etc/egress/daemon.toml:2:1: daemon.bogus: unknown field",
            ),
            (
                "[[sandbox]]\nname = \"Bad Name\"\ncgroup = \"x\"\n",
                "/etc/egress/daemon.toml:2:8: sandbox[0].name:",
            ),
            (
                "[[sandbox]]\nname = \"a\"\n",
                "/etc/egress/daemon.toml:1:1: sandbox[0].cgroup: required",
            ),
            (
                "[[sandbox]]\nname = \"a\"\ncgroup = \"x\"\nnetns = \"/n\"\npid = 3\n",
                "/etc/egress/daemon.toml:4:9: sandbox[0].netns: give netns or pid",
            ),
            (
                "[[sandbox]]\nname = \"a\"\ncgroup = \"x\"\nintercept_ports = [443, 53]\n",
                "/etc/egress/daemon.toml:4:19: sandbox[0].intercept_ports: 53 cannot",
            ),
            (
                "[[sandbox]]\nname = \"a\"\ncgroup = \"x\"\nupstream = \"elsewhere\"\n",
                "/etc/egress/daemon.toml:4:12: sandbox[0].upstream:",
            ),
            (
                "[[sandbox]]\nname = \"a\"\ncgroup = \"x\"\n[[sandbox]]\nname = \"a\"\ncgroup = \"y\"\n",
                "/etc/egress/daemon.toml:5:8: sandbox[1].name: a sandbox named \"a\" is declared twice",
            ),
            (
                "[[sandbox]]\nname = \"a\"\ncgroup = \"../x\"\n",
                "/etc/egress/daemon.toml:3:10: sandbox[0].cgroup:",
            ),
            (
                "[daemon]\napi_group = \"no-such-group-egress\"\n",
                "/etc/egress/daemon.toml:2:13: daemon.api_group: no group named",
            ),
        ];
        for (text, want) in cases {
            let got = parse_err(text);
            assert!(
                got.starts_with(want),
                "{text:?}\n got: {got}\nwant: {want}…"
            );
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("10 parsecs").is_err());
    }

    #[test]
    fn api_requests_name_the_bad_field() {
        let bad = |r: SandboxRequest| r.validate().unwrap_err().field;
        let ok = SandboxRequest {
            name: Some("a".into()),
            cgroup: Some("agents/a".into()),
            ..Default::default()
        };
        assert!(ok.clone().validate().is_ok());
        assert_eq!(
            bad(SandboxRequest {
                name: None,
                ..ok.clone()
            }),
            "name"
        );
        assert_eq!(
            bad(SandboxRequest {
                cgroup: Some(String::new()),
                ..ok.clone()
            }),
            "cgroup"
        );
        assert_eq!(
            bad(SandboxRequest {
                pid: Some(0),
                ..ok.clone()
            }),
            "pid"
        );
        assert_eq!(
            bad(SandboxRequest {
                netns: Some("rel".into()),
                ..ok.clone()
            }),
            "netns"
        );
        assert_eq!(
            bad(SandboxRequest {
                no_guard: Some(vec!["doh".into(), "x".into()]),
                ..ok.clone()
            }),
            "no_guard[1]"
        );
        assert_eq!(
            bad(SandboxRequest {
                policy: Some("A B".into()),
                ..ok
            }),
            "policy"
        );
    }
}
