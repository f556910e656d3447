//! Command-line surface. Parsing only: [`RunArgs::validate`] turns flags into a
//! [`RunConfig`] that the rest of the program trusts.

use std::{ffi::OsString, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::policy::{HostPattern, IpNet, PolicyFlags, TcpAllow};

const TOP_EXAMPLES: &str = "\
Examples:
  # Run curl in a sandbox; HTTP(S) goes through the proxy, everything else is refused
  sudo egress run -- curl -sS http://example.com/

  # Also let the sandbox reach a database directly, and isolate it in its own netns
  sudo egress run --allow-tcp 10.0.0.0/8:5432 --isolate-net -- ./agent

  # Clean up after runs that were killed with SIGKILL
  sudo egress gc";

const RUN_EXAMPLES: &str = "\
Examples:
  sudo egress run --allow pypi.org --allow files.pythonhosted.org -- pip download six
  sudo egress run --allow '*.github.com' --passthrough 'bank.example' -- ./agent
  sudo egress run --user alice --allow-port 22 -- git fetch
  sudo egress run --intercept-port 80 --intercept-port 8080 -- python3 agent.py
  sudo egress --log-format json --log-file /tmp/egress.log run --isolate-net -- ./agent
  sudo egress run --allow api.example.com --dns-pinning --strict -- ./agent
  sudo egress run --dns-upstream 10.0.0.2 --allow '*.internal.example' -- ./agent
  sudo egress run --allow-inbound 8080 -- python3 -m http.server 8080
  # Learn a policy from one run (warn mode), then enforce it
  sudo egress run --learn agent.toml -- ./agent
  sudo egress run --policy agent.toml -- ./agent
  # Clients that read only the system store (wget, Java, npm with a pinned cafile) get
  # the egress CA from the mounted copy; --no-ca-mount leaves them the host's store
  sudo egress run --allow repo.maven.apache.org -- ./mvnw package
  sudo egress run --no-ca-mount --allow pypi.org -- pip download six

What the sandbox may do:
  TCP to an intercepted port (80 and 443 unless --intercept-port is given) goes to the proxy.
  HTTPS is decrypted with a certificate from the egress CA, which the command trusts in two
  ways: SSL_CERT_FILE, SSL_CERT_DIR and friends point at a bundle of the system roots plus
  the CA (--no-ca-env turns them off), and in a mount namespace of its own the system trust
  store (/etc/ssl/certs, its bundle and hashed links, the RHEL and Alpine bundles, Java's
  cacerts) shows read-only copies with the CA added; the host's files are never changed
  (--no-ca-mount turns it off). Each request must name an --allow'ed host, else it
  gets a 403. --passthrough hosts are spliced without decryption. TCP to a destination allowed
  with --allow-tcp/--allow-port goes direct. DNS (UDP or TCP port 53, to any resolver)
  goes to egress's DNS listener, which answers only names the sandbox may reach (others get
  NXDOMAIN) by asking --dns-upstream or the host's resolvers. Everything else (other UDP,
  QUIC, DNS over TLS on 853, ICMP) is refused with EPERM and logged.

What the sandbox may listen on:
  Loopback only. A bind to 0.0.0.0 or :: is rewritten to 127.0.0.1 or ::1 (a dual-stack
  :: socket then serves IPv6 loopback only); a bind to another address is refused with
  EPERM and logged. Port 0 binds (clients picking a source address) pass. --allow-inbound
  PORT lets PORT bind on every address, so clients outside the sandbox can connect.

Host patterns: `example.com` (exactly), `*.example.com` (every subdomain, NOT example.com
itself), `*` (everything), an IP or CIDR (IP-literal hosts).

Exit status: the command's own (128+N if it died of signal N); 64 for usage errors, 69 when
the host lacks cgroup v2 or BPF support, 77 for missing privileges.";

/// Transparent egress control for sandboxes and agents, captured with eBPF.
#[derive(Debug, Parser)]
#[command(name = "egress", version, after_help = TOP_EXAMPLES, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "EGRESS_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Write logs to this file instead of standard error (appends).
    #[arg(long, global = true, value_name = "PATH", env = "EGRESS_LOG_FILE")]
    pub log_file: Option<PathBuf>,
    /// Log filter in RUST_LOG syntax, e.g. `info` or `egress=debug`.
    #[arg(
        long,
        global = true,
        value_name = "FILTER",
        env = "RUST_LOG",
        default_value = "info"
    )]
    pub log: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command in a fresh sandbox cgroup behind the proxy.
    #[command(after_help = RUN_EXAMPLES)]
    Run(Box<RunArgs>),
    /// Remove the cgroups and pinned eBPF state of runs that died without cleaning up.
    #[command(
        after_help = "Examples:\n  sudo egress gc\n  # Stop the daemon first: this also opens every sandbox it governed\n  sudo egress gc --all"
    )]
    Gc(GcArgs),
    /// Run the node daemon: one privileged egress that governs many sandboxes (existing
    /// cgroups, each possibly in its own network namespace), added and removed while it runs.
    #[command(after_help = DAEMON_EXAMPLES)]
    Daemon(DaemonArgs),
    /// Add, remove or list the daemon's sandboxes (through its API socket).
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Show whether the daemon is ready, what is pending, and its sandboxes.
    #[command(
        after_help = "Examples:\n  sudo egress status\n  sudo egress status --api /run/egress/api.sock"
    )]
    Status(ApiArgs),
    /// Manage the CA that signs intercepted connections' certificates.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Work with policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Show the audit log for a human: one line per record, filtered.
    #[command(
        after_help = "Examples:\n  egress log --decision deny\n  egress log /var/lib/egress/audit.jsonl --sandbox agent --host github.com\n  tail -f /var/lib/egress/audit.jsonl | egress log -"
    )]
    Log(LogViewArgs),
}

const DAEMON_EXAMPLES: &str = "\
Examples:
  # Validate a config (and the policy names it uses), then run the daemon
  sudo egress daemon check /etc/egress/daemon.toml
  sudo egress daemon --config /etc/egress/daemon.toml

  # Put a running container's cgroup under the `agent` policy, from its own netns
  sudo egress sandbox add agent-1 --cgroup docker/3f1c... --pid 4242 --policy agent
  sudo egress sandbox list
  sudo egress sandbox remove agent-1

  # Stop and leave nothing behind (sandboxes are no longer captured afterwards)
  sudo egress daemon --config /etc/egress/daemon.toml --detach-on-exit

A minimal config:
  [daemon]
  policy = \"/etc/egress/policy.toml\"
  [[sandbox]]
  name = \"agents\"
  cgroup = \"agents\"          # every child cgroup is captured too; the deepest sandbox wins
  policy = \"deny-all\"

SIGHUP (or a change to the policy file) reloads every sandbox's policy. SIGTERM drains and
stops; the pinned programs stay, so every sandbox stays closed until the daemon is back.";

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct DaemonArgs {
    #[command(subcommand)]
    pub check: Option<DaemonCommand>,
    /// The daemon's config file (TOML); see `egress daemon check`.
    #[arg(long, value_name = "FILE", required = true)]
    pub config: Option<PathBuf>,
    /// On exit, remove every sandbox from the kernel and delete the pins and state, instead
    /// of leaving every sandbox closed for the next daemon.
    #[arg(long)]
    pub detach_on_exit: bool,
    /// The CA and upstream trust; each flag wins over the config's key of the same name
    /// (`--upstream-ca` adds to the config's list).
    #[command(flatten)]
    pub trust: TrustArgs,
}

#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Validate a daemon config: prints a summary, or one error as FILE:LINE:COL: key:
    /// message (exit 64).
    Check {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

/// Where the daemon's API socket is.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// The daemon's API socket.
    #[arg(long, value_name = "PATH", env = "EGRESS_API", default_value = crate::daemon::config::DEFAULT_API)]
    pub api: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Put a cgroup (and everything below it) under a policy; returns once its next connect
    /// is captured.
    #[command(
        after_help = "Examples:\n  sudo egress sandbox add agent-a --cgroup agents/a --policy agent\n  sudo egress sandbox add web --cgroup docker/3f1c... --pid 4242 --strict\n  sudo egress sandbox add lab --cgroup lab --netns /var/run/netns/lab --upstream host\n  # Learn mode: the policy of what it did is written when it is removed\n  sudo egress sandbox add trial --cgroup agents/t --learn /var/lib/egress/trial.toml"
    )]
    Add(Box<SandboxAddArgs>),
    /// Remove a sandbox: its cgroup is no longer captured; its connections drain first.
    Remove {
        #[arg(value_name = "NAME")]
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the sandboxes, with their counters.
    List {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Debug, Args)]
pub struct SandboxAddArgs {
    #[arg(value_name = "NAME")]
    pub name: String,
    /// The cgroup, relative to the cgroup2 root (or absolute).
    #[arg(long, value_name = "PATH", required_unless_present_any = ["docker", "pod_uid"], conflicts_with_all = ["docker", "pod_uid"])]
    pub cgroup: Option<String>,
    /// A running Docker container (id or name): its cgroup and network namespace.
    #[arg(long, value_name = "CONTAINER", conflicts_with_all = ["pod_uid", "netns", "pid"])]
    pub docker: Option<String>,
    /// A Kubernetes pod on this node, by UID: its cgroup (every container of the pod) and
    /// network namespace, found in /proc.
    #[arg(long, value_name = "UID", conflicts_with_all = ["netns", "pid"])]
    pub pod_uid: Option<String>,
    /// With --pod-uid: only this container of the pod (id or id prefix).
    #[arg(long, value_name = "ID", requires = "pod_uid")]
    pub container: Option<String>,
    /// The policy file's sandbox to apply (default: NAME).
    #[arg(long, value_name = "NAME")]
    pub policy: Option<String>,
    /// The sandbox's network namespace, e.g. /var/run/netns/NAME.
    #[arg(long, value_name = "PATH", conflicts_with = "pid")]
    pub netns: Option<String>,
    /// A process whose network namespace is the sandbox's (a container's init).
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
    /// Drop, in the kernel, any packet not bound for egress or an allowance.
    #[arg(long)]
    pub strict: bool,
    /// TCP port sent through the proxy (repeatable; default 80 and 443).
    #[arg(long = "intercept-port", value_name = "PORT")]
    pub intercept_ports: Vec<u16>,
    /// Where upstream connections leave from: the sandbox's namespace, or the daemon's.
    #[arg(long, value_name = "FROM", value_parser = ["sandbox", "host"])]
    pub upstream: Option<String>,
    /// Warn mode: log what would be refused, and let it through.
    #[arg(long)]
    pub warn: bool,
    /// Refuse connections whose SNI/Host did not resolve to their IP through egress.
    #[arg(long)]
    pub dns_pinning: bool,
    /// Turn a default guard off (repeatable).
    #[arg(long = "no-guard", value_name = "GUARD", value_enum)]
    pub no_guard: Vec<GuardName>,
    /// Learn mode: warn, and write a policy of what the sandbox did to FILE when it is
    /// removed or the daemon stops.
    #[arg(long, value_name = "FILE")]
    pub learn: Option<PathBuf>,
    /// With --learn: siblings of one parent domain before `*.parent` is suggested.
    #[arg(long, value_name = "N", requires = "learn", value_parser = parse_wildcard_min)]
    pub learn_wildcard_min: Option<usize>,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Also remove the daemon's pinned programs and maps (every sandbox it governed is no
    /// longer captured). Stop the daemon first.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct LogViewArgs {
    /// Audit file to read, or `-` for standard input. Default: audit.jsonl in the confdir.
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
    #[arg(long, env = "EGRESS_CONFDIR", default_value = DEFAULT_CONFDIR, value_name = "DIR")]
    pub confdir: PathBuf,
    /// Only this sandbox.
    #[arg(long)]
    pub sandbox: Option<String>,
    /// Only this decision: allow, deny, warn, passthrough, error.
    #[arg(long)]
    pub decision: Option<String>,
    /// Only records whose host, SNI or destination contains this text.
    #[arg(long)]
    pub host: Option<String>,
    /// Only this kind of record: request, connection, kernel_deny, dns.
    #[arg(long)]
    pub event: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the CA in the config directory if there is none; print its path and fingerprint.
    Init(CaArgs),
    /// Print the CA certificate (PEM), e.g. to bake into a container image.
    Export(CaArgs),
    /// Print the path of the CA certificate.
    Path(CaArgs),
    /// Print the SHA-256 fingerprint of the CA certificate.
    Fingerprint(CaArgs),
}

#[derive(Debug, Args)]
pub struct CaArgs {
    /// Directory holding the CA (ca.pem, ca-key.pem with mode 0600).
    #[arg(long, env = "EGRESS_CONFDIR", default_value = DEFAULT_CONFDIR, value_name = "DIR")]
    pub confdir: PathBuf,
}

pub const DEFAULT_CONFDIR: &str = "/var/lib/egress";

/// The CA egress signs with and the roots it trusts upstream: flags of `egress run` and
/// `egress daemon` alike.
#[derive(Debug, Args)]
pub struct TrustArgs {
    /// Use this CA certificate (PEM) instead of the one in the confdir; needs --ca-key.
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// Private key (PEM) of --ca-cert.
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Extra trusted roots for upstream servers: an OpenSSL-style directory of PEM files.
    #[arg(long, value_name = "DIR")]
    pub upstream_trust_dir: Option<PathBuf>,
    /// Extra trusted root(s) for upstream servers, PEM (repeatable).
    #[arg(long = "upstream-ca", value_name = "FILE")]
    pub upstream_cas: Vec<PathBuf>,
}

/// TLS settings shared by everything that intercepts.
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// Directory holding the egress CA; created with a new CA on first use.
    #[arg(long, env = "EGRESS_CONFDIR", default_value = DEFAULT_CONFDIR, value_name = "DIR")]
    pub confdir: PathBuf,
    #[command(flatten)]
    pub trust: TrustArgs,
    /// Do not set SSL_CERT_FILE, SSL_CERT_DIR, CURL_CA_BUNDLE, REQUESTS_CA_BUNDLE,
    /// NODE_EXTRA_CA_CERTS, npm_config_cafile and the other CA variables for the command.
    #[arg(long)]
    pub no_ca_env: bool,
    /// Do not show the command the system trust store with the egress CA added (a mount
    /// namespace of its own with read-only copies over /etc/ssl/certs, the distributions'
    /// bundles and Java's cacerts). Clients that ignore the CA variables then fail TLS.
    #[arg(long)]
    pub no_ca_mount: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Policy file (TOML). Changes to it, or SIGHUP, reload it for new requests; see
    /// `egress policy check`.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Which sandbox of the policy file to apply (needed when it defines several).
    #[arg(long, value_name = "NAME", requires = "policy")]
    pub sandbox: Option<String>,
    /// Let requests to this host through the proxy (repeatable). Everything else gets a 403.
    #[arg(long, value_name = "HOST")]
    pub allow: Vec<HostPattern>,
    /// Refuse this host even if allowed (repeatable; deny wins).
    #[arg(long, value_name = "HOST")]
    pub deny: Vec<HostPattern>,
    /// Warn mode: log what would be refused, and let it through.
    #[arg(long)]
    pub warn: bool,
    /// Learn mode: run in warn mode and, when the command exits, write to FILE a commented
    /// policy allowing what it did (hosts, methods and paths, tcp destinations); see
    /// `egress policy suggest` for the same from an audit log.
    #[arg(long, value_name = "FILE")]
    pub learn: Option<PathBuf>,
    /// With --learn: suggest `*.parent` once this many sibling names of one parent domain
    /// were seen (never over a one-label parent such as `com`).
    #[arg(long, value_name = "N", requires = "learn", default_value_t = crate::learn::DEFAULT_WILDCARD_MIN, value_parser = parse_wildcard_min)]
    pub learn_wildcard_min: usize,
    /// Turn off a guard that is on by default: `private-ranges` (refuse loopback,
    /// link-local, metadata and private destinations), `domain-fronting` (refuse requests
    /// whose TLS server name and Host differ) or `doh` (refuse well-known DNS-over-HTTPS
    /// resolvers and DNS messages over HTTP). Repeatable.
    #[arg(long = "no-guard", value_name = "GUARD", value_enum)]
    pub no_guard: Vec<GuardName>,
    /// Destinations exempt from the private-range guard, e.g. 10.0.0.0/8 (repeatable).
    #[arg(long = "private-ok", value_name = "CIDR")]
    pub private_ok: Vec<IpNet>,
    /// Splice TLS to this host without decrypting it (repeatable); the client sees the real
    /// certificate.
    #[arg(long, value_name = "HOST")]
    pub passthrough: Vec<HostPattern>,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub audit: AuditArgs,
    /// TCP port whose connects are sent through the proxy (repeatable). Default: 80 and 443.
    #[arg(long = "intercept-port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub intercept_ports: Vec<u16>,
    /// Let the sandbox connect directly, to any address, on this TCP port (repeatable).
    #[arg(long = "allow-port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub allow_ports: Vec<u16>,
    /// Let the sandbox connect directly to CIDR:PORT, e.g. 10.0.0.0/8:5432, 192.0.2.7:22,
    /// [2001:db8::/32]:443 (repeatable).
    #[arg(long = "allow-tcp", value_name = "CIDR:PORT")]
    pub allow_tcp: Vec<TcpAllow>,
    /// Let the sandbox listen on this port (TCP or UDP) on every address, so clients outside
    /// it can connect (repeatable; policy key `inbound`). Without it, binds are held to
    /// loopback: 0.0.0.0 and :: become 127.0.0.1 and ::1, other addresses get EPERM.
    #[arg(long = "allow-inbound", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub allow_inbound: Vec<u16>,
    /// Give the command a fresh network namespace holding only `lo`; the proxy listens inside
    /// it, so the proxy is the only way out.
    #[arg(long)]
    pub isolate_net: bool,
    /// Resolver the DNS listener forwards permitted queries to: IP or IP:PORT, [IPv6]:PORT
    /// (repeatable, tried in order). Default: the nameservers of /etc/resolv.conf.
    #[arg(long = "dns-upstream", value_name = "ADDR", value_parser = parse_dns_upstream)]
    pub dns_upstreams: Vec<std::net::SocketAddr>,
    /// DNS pinning: refuse a connection whose TLS server name or Host did not resolve,
    /// through egress's DNS, to the address the client connected to (policy key
    /// `dns_pinning`).
    #[arg(long)]
    pub dns_pinning: bool,
    /// Also drop, in the kernel, every packet from the sandbox whose destination is neither
    /// egress's listeners nor an --allow-tcp allowance (a backstop behind the socket hooks;
    /// a server in the sandbox cannot answer outside clients then).
    #[arg(long)]
    pub strict: bool,
    /// Run the command as this user (name or uid). Default: the user who invoked sudo
    /// ($SUDO_UID), else `nobody`. Root is refused: it could detach the sandbox.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// The command to run, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuardName {
    PrivateRanges,
    DomainFronting,
    Doh,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file: prints its sandboxes, or one error with line and column (exit 64).
    Check {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Write a policy allowing what an audit log (JSONL, from --audit) shows each sandbox
    /// doing: the same builder as `egress run --learn`.
    #[command(after_help = SUGGEST_EXAMPLES)]
    Suggest(SuggestArgs),
}

const SUGGEST_EXAMPLES: &str = "\
Examples:
  # What did the agent do last time? A policy for it, on standard output
  egress policy suggest /var/lib/egress/audit.jsonl --sandbox agent

  # Written to a file, then checked
  egress policy suggest audit.jsonl -o agent.toml && egress policy check agent.toml

  # Suggest *.example.com only once 5 of its names were seen
  egress policy suggest audit.jsonl --learn-wildcard-min 5

Without --sandbox, every sandbox of the log gets its own [sandbox.NAME] section
(`egress run` records its sandbox as `run`).";

#[derive(Debug, Args)]
pub struct SuggestArgs {
    /// Audit log (JSON lines), or `-` for standard input.
    #[arg(value_name = "AUDIT.jsonl")]
    pub audit: PathBuf,
    /// Only this sandbox's records.
    #[arg(long, value_name = "NAME")]
    pub sandbox: Option<String>,
    /// Write the policy here (atomically) instead of standard output.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Suggest `*.parent` once this many sibling names of one parent domain were seen.
    #[arg(long, value_name = "N", default_value_t = crate::learn::DEFAULT_WILDCARD_MIN, value_parser = parse_wildcard_min)]
    pub learn_wildcard_min: usize,
}

fn parse_wildcard_min(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 2 => Ok(n),
        _ => Err(format!(
            "{s:?}: give a number of sibling names, 2 or more (a wildcard over one name is that name)"
        )),
    }
}

/// The user the sandboxed command runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// Where the audit log goes.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Audit log file (JSON lines), or `-` for standard output. Default: audit.jsonl in the
    /// --confdir.
    #[arg(long, value_name = "FILE|-")]
    pub audit: Option<PathBuf>,
    /// Rotate the audit file when it would grow past this many bytes (a regular file only:
    /// a device or a FIFO is never rotated).
    #[arg(long, value_name = "BYTES", default_value_t = crate::audit::DEFAULT_MAX_BYTES)]
    pub audit_max_bytes: u64,
    /// Rotated audit files kept (audit.jsonl.1 … .N).
    #[arg(long, value_name = "N", default_value_t = crate::audit::DEFAULT_KEEP)]
    pub audit_keep: usize,
    /// Keep query strings in audit records (redacted by default: they often carry tokens).
    #[arg(long)]
    pub audit_query: bool,
    /// Audit records held in memory (bytes of JSON, e.g. 64MiB) before new requests wait
    /// for the audit writer to catch up.
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = crate::audit::parse_size)]
    pub audit_queue: u64,
}

impl AuditArgs {
    pub fn sink(&self, confdir: &std::path::Path) -> crate::audit::Sink {
        match &self.audit {
            Some(p) if p.as_os_str() == "-" => crate::audit::Sink::Stdout,
            p => crate::audit::Sink::File {
                path: p.clone().unwrap_or_else(|| confdir.join("audit.jsonl")),
                max_bytes: self.audit_max_bytes,
                keep: self.audit_keep,
            },
        }
    }
}

/// Validated TLS settings.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    pub confdir: PathBuf,
    pub user_ca: Option<(PathBuf, PathBuf)>,
    pub upstream_trust_dir: Option<PathBuf>,
    pub upstream_cas: Vec<PathBuf>,
    pub ca_env: bool,
    /// Mount the trust-store copies in the command's own mount namespace (`egress run`).
    pub ca_mount: bool,
}

impl TlsArgs {
    pub fn validate(self) -> TlsConfig {
        TlsConfig {
            confdir: self.confdir,
            user_ca: self.trust.ca_cert.zip(self.trust.ca_key),
            upstream_trust_dir: self.trust.upstream_trust_dir,
            upstream_cas: self.trust.upstream_cas,
            ca_env: !self.no_ca_env,
            ca_mount: !self.no_ca_mount,
        }
    }
}

/// A validated `egress run`.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub policy_file: Option<PathBuf>,
    pub sandbox: Option<String>,
    pub flags: PolicyFlags,
    pub tls: TlsConfig,
    pub audit: crate::audit::Sink,
    pub audit_query: bool,
    pub audit_queue_bytes: u64,
    pub intercept_ports: Vec<u16>,
    pub isolate_net: bool,
    /// Empty: the nameservers of /etc/resolv.conf.
    pub dns_upstreams: Vec<std::net::SocketAddr>,
    pub strict: bool,
    pub user: SandboxUser,
    pub command: Vec<OsString>,
    /// `--learn`: where the learned policy goes, and its options.
    pub learn: Option<(PathBuf, crate::learn::Options)>,
}

/// A flag that parsed but makes no sense; reported with the flag's name, exit code 64.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: {why}")]
pub struct UsageError {
    pub flag: &'static str,
    pub why: String,
}

pub const DEFAULT_INTERCEPT_PORTS: [u16; 2] = [80, 443];

impl RunArgs {
    pub fn validate(self) -> Result<RunConfig, UsageError> {
        let mut intercept_ports = if self.intercept_ports.is_empty() {
            DEFAULT_INTERCEPT_PORTS.to_vec()
        } else {
            self.intercept_ports
        };
        intercept_ports.sort_unstable();
        intercept_ports.dedup();

        let mut allow_tcp = self.allow_tcp;
        for p in self.allow_ports {
            allow_tcp.extend(TcpAllow::any_address(p));
        }
        if let Some(a) = allow_tcp.iter().find(|a| intercept_ports.contains(&a.port)) {
            return Err(UsageError {
                flag: "--allow-tcp/--allow-port",
                why: format!(
                    "port {} is intercepted, so connects to it always go through the proxy; \
                     drop the allowance or pass --intercept-port without it",
                    a.port
                ),
            });
        }
        if intercept_ports.contains(&53) || allow_tcp.iter().any(|a| a.port == 53) {
            return Err(UsageError {
                flag: "--intercept-port/--allow-tcp/--allow-port",
                why: "port 53 always goes to egress's DNS listener".into(),
            });
        }
        if self.command.first().is_none_or(|c| c.is_empty()) {
            return Err(UsageError {
                flag: "CMD",
                why: "no command given after --".into(),
            });
        }
        let user = resolve_user(self.user.as_deref())?;
        if let Some(out) = &self.learn {
            check_learn_output(out).map_err(|why| UsageError {
                flag: "--learn",
                why,
            })?;
        }
        let learn = self.learn.map(|out| {
            (
                out,
                crate::learn::Options {
                    wildcard_min: self.learn_wildcard_min,
                },
            )
        });
        Ok(RunConfig {
            policy_file: self.policy,
            sandbox: self.sandbox,
            flags: PolicyFlags {
                allow: self.allow,
                deny: self.deny,
                passthrough: self.passthrough,
                tcp: allow_tcp,
                inbound: self.allow_inbound,
                private_ok: self.private_ok,
                warn: self.warn || learn.is_some(),
                no_private_guard: self.no_guard.contains(&GuardName::PrivateRanges),
                no_fronting_guard: self.no_guard.contains(&GuardName::DomainFronting),
                no_doh_guard: self.no_guard.contains(&GuardName::Doh),
                dns_pinning: self.dns_pinning,
                audience: crate::policy::hint::Audience::Run { file: false },
            },
            audit: self.audit.sink(&self.tls.confdir),
            audit_query: self.audit.audit_query,
            audit_queue_bytes: self.audit.audit_queue,
            tls: self.tls.validate(),
            intercept_ports,
            isolate_net: self.isolate_net,
            dns_upstreams: self.dns_upstreams,
            strict: self.strict,
            user,
            command: self.command,
            learn,
        })
    }
}

/// Where a learned policy may go: a file (not a directory) in an existing directory.
pub fn check_learn_output(out: &std::path::Path) -> Result<(), String> {
    if out.is_dir() {
        return Err(format!(
            "{} is a directory; name the policy file to write",
            out.display()
        ));
    }
    match out.parent() {
        Some(d) if !d.as_os_str().is_empty() && !d.is_dir() => Err(format!(
            "{}: its directory {} does not exist",
            out.display(),
            d.display()
        )),
        _ => Ok(()),
    }
}

/// `IP`, `IP:PORT` or `[IPv6]:PORT`; port 53 when none is given.
pub fn parse_dns_upstream(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, 53));
    }
    s.parse().map_err(|_| {
        format!("{s:?} is not a resolver address; examples: 10.0.0.2, 127.0.0.1:5353, [2001:db8::53]:53")
    })
}

fn resolve_user(flag: Option<&str>) -> Result<SandboxUser, UsageError> {
    use nix::unistd::{Uid, User};
    let err = |why: String| UsageError {
        flag: "--user",
        why,
    };
    let user = match flag {
        Some(s) => {
            let by_name = User::from_name(s).map_err(|e| err(format!("looking up {s:?}: {e}")))?;
            let by_uid = || {
                s.parse::<u32>()
                    .ok()
                    .and_then(|u| User::from_uid(Uid::from_raw(u)).ok().flatten())
            };
            by_name
                .or_else(by_uid)
                .ok_or_else(|| err(format!("no such user {s:?}")))?
        }
        None => match std::env::var("SUDO_UID")
            .ok()
            .and_then(|u| u.parse::<u32>().ok())
        {
            Some(uid) => User::from_uid(Uid::from_raw(uid))
                .ok()
                .flatten()
                .ok_or_else(|| err(format!("SUDO_UID={uid} names no user; pass --user")))?,
            None => User::from_name("nobody")
                .ok()
                .flatten()
                .ok_or_else(|| err("no `nobody` user on this host; pass --user".into()))?,
        },
    };
    if user.uid.is_root() {
        return Err(err(
            "refusing to run the command as root: root can detach the eBPF programs and leave \
             the sandbox cgroup; pick an unprivileged user"
                .into(),
        ));
    }
    Ok(SandboxUser {
        name: user.name,
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        home: user.dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("egress").chain(args.iter().copied()))
    }

    fn run_args(args: &[&str]) -> RunArgs {
        match parse(args).unwrap().command {
            Command::Run(r) => *r,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn dns_upstreams_take_a_default_port_and_refuse_names() {
        let c = run_args(&[
            "run",
            "--user",
            "nobody",
            "--dns-upstream",
            "10.0.0.2",
            "--dns-upstream",
            "127.0.0.1:5353",
            "--dns-upstream",
            "[2001:db8::53]:53",
            "--",
            "true",
        ])
        .validate()
        .unwrap();
        let want: Vec<std::net::SocketAddr> =
            ["10.0.0.2:53", "127.0.0.1:5353", "[2001:db8::53]:53"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect();
        assert_eq!(c.dns_upstreams, want);
        let e = parse(&["run", "--dns-upstream", "dns.example", "--", "true"]).unwrap_err();
        assert!(e.to_string().contains("--dns-upstream"), "{e}");
        assert!(e.to_string().contains("examples:"), "{e}");
    }

    #[test]
    fn port_53_cannot_be_intercepted_or_allowed() {
        for flags in [["--intercept-port", "53"], ["--allow-port", "53"]] {
            let mut args = vec!["run", "--user", "nobody"];
            args.extend(flags);
            args.extend(["--", "true"]);
            let e = run_args(&args).validate().unwrap_err();
            assert!(e.why.contains("DNS listener"), "{e}");
        }
    }

    #[test]
    fn defaults_intercept_80_and_443() {
        let c = run_args(&["run", "--user", "nobody", "--", "true"])
            .validate()
            .unwrap();
        assert_eq!(c.intercept_ports, vec![80, 443]);
        assert!(c.flags.tcp.is_empty());
        assert_eq!(c.user.name, "nobody");
    }

    #[test]
    fn allow_port_means_any_address_of_both_families() {
        let c = run_args(&[
            "run",
            "--user",
            "nobody",
            "--allow-port",
            "22",
            "--",
            "true",
        ])
        .validate()
        .unwrap();
        assert_eq!(c.flags.tcp.len(), 2);
        assert!(c
            .flags
            .tcp
            .iter()
            .all(|a| a.port == 22 && a.net.prefix == 0));
    }

    #[test]
    fn allow_inbound_reaches_the_policy_flags() {
        let c = run_args(&[
            "run",
            "--user",
            "nobody",
            "--allow-inbound",
            "8080",
            "--allow-inbound",
            "9000",
            "--",
            "true",
        ])
        .validate()
        .unwrap();
        assert_eq!(c.flags.inbound, [8080, 9000]);
        assert!(parse(&["run", "--allow-inbound", "0", "--", "true"]).is_err());
        let e = parse(&["run", "--help"]).unwrap_err().to_string();
        assert!(e.contains("--allow-inbound 8080"), "{e}");
    }

    #[test]
    fn unknown_flag_and_missing_command_are_usage_errors() {
        assert!(parse(&["run", "--bogus", "--", "true"]).is_err());
        assert!(parse(&["run"]).is_err());
        assert!(parse(&["run", "--"]).is_err());
        assert!(parse(&["run", "--allow-tcp", "nonsense", "--", "true"]).is_err());
        assert!(parse(&["run", "--intercept-port", "0", "--", "true"]).is_err());
    }

    #[test]
    fn root_and_unknown_users_are_refused() {
        let e = run_args(&["run", "--user", "root", "--", "true"])
            .validate()
            .unwrap_err();
        assert_eq!(e.flag, "--user");
        let e = run_args(&["run", "--user", "no-such-user-egress", "--", "true"])
            .validate()
            .unwrap_err();
        assert!(e.why.contains("no such user"), "{e}");
    }

    #[test]
    fn allowing_an_intercepted_port_is_contradictory() {
        let e = run_args(&[
            "run",
            "--user",
            "nobody",
            "--allow-port",
            "443",
            "--",
            "true",
        ])
        .validate()
        .unwrap_err();
        assert!(e.why.contains("443"), "{e}");
    }

    #[test]
    fn help_has_examples() {
        let e = parse(&["run", "--help"]).unwrap_err();
        assert!(e.to_string().contains("Examples:"));
    }
}
