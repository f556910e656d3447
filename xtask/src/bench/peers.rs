//! The origin and the things compared in front of it: nothing (direct), egress, mitmproxy,
//! Squid, and the reference relay behind an iptables REDIRECT. A [`Session`] is one of them
//! running, with an agent shell for its clients.

use std::{
    fmt, fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result};

use super::{
    client,
    install::{Assets, DOMAIN, ORIGIN_IP, ORIGIN_NAME},
    sys::{self, Agent, NatRule, NetNs, Proc},
};

/// Where mitmproxy, Squid and the reference relay listen inside their namespace.
const MITMPROXY_PORT: u16 = 8080;
const SQUID_PORT: u16 = 3129;
const SQUID_HTTP_PORT: u16 = 3128;
pub const RELAY_PORT: u16 = 18080;
/// Every port a listener of the harness binds inside a namespace it made after traffic has
/// flowed there (the node daemon's fixed listener ports too). The namespaces hand out source
/// ports from 1024 up, so these are reserved: a connection left over from an earlier phase
/// must not hold one when its listener starts.
pub const LISTEN_PORTS: &[u16] = &[
    SQUID_HTTP_PORT,
    SQUID_PORT,
    MITMPROXY_PORT,
    15001,
    15053,
    RELAY_PORT,
];

/// Everything the sessions share.
pub struct Env {
    pub run_dir: PathBuf,
    pub hosts: PathBuf,
    pub assets: Assets,
    pub egress_bin: PathBuf,
    pub client_bin: PathBuf,
    pub mitmdump: PathBuf,
    pub egress_confdir: PathBuf,
    pub nobody: (u32, u32),
    pub proxy_user: (u32, u32),
    /// The open-file limit every process here runs with.
    pub nofile: u64,
}

impl Env {
    /// The shell command line that runs one internal client job.
    pub fn job(&self, job: &client::Job) -> Result<String> {
        let json = serde_json::to_string(job)?;
        Ok(format!(
            "{} bench --internal {}",
            sys::sh_quote(&self.client_bin.to_string_lossy()),
            sys::sh_quote(&json)
        ))
    }
}

/// Looks up a user's uid and gid.
pub fn user_ids(name: &str) -> Result<(u32, u32)> {
    let u = nix::unistd::User::from_name(name)?
        .with_context(|| format!("no user {name:?} on this machine"))?;
    Ok((u.uid.as_raw(), u.gid.as_raw()))
}

/// The hosts file every benchmark process sees: the origin and every name a first-visit or
/// minting phase will use (Squid checks each request's Host against its original destination).
pub fn write_hosts(path: &Path, fv: usize, mint: usize) -> Result<()> {
    let mut s = format!("127.0.0.1 localhost\n{ORIGIN_IP} {ORIGIN_NAME}\n");
    for i in 0..fv {
        s.push_str(&format!("{ORIGIN_IP} fv{i}.{DOMAIN}\n"));
    }
    for i in 0..mint {
        s.push_str(&format!("{ORIGIN_IP} mint{i}.{DOMAIN}\n"));
    }
    fs::write(path, s)?;
    sys::set_mode(path, 0o644)
}

/// nginx as the origin inside `ns`: one process, one worker, TLS 1.3 only, HTTP/1.1 and /2 on
/// 443, plain HTTP on 80.
pub fn start_origin(env: &Env, ns: &NetNs) -> Result<Proc> {
    start_origin_on(env, ns, ORIGIN_IP)
}

/// The same origin listening on `ip` (an address of `ns`).
pub fn start_origin_on(env: &Env, ns: &NetNs, ip: &str) -> Result<Proc> {
    let dir = env.run_dir.join(format!("nginx-{}", ns.name()));
    fs::create_dir_all(dir.join("tmp"))?;
    let conf = dir.join("nginx.conf");
    let a = &env.assets;
    fs::write(
        &conf,
        format!(
            r#"daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 100000;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 60000; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000000;
  keepalive_timeout 600s;
  client_body_temp_path {dir}/tmp;
  proxy_temp_path {dir}/tmp;
  fastcgi_temp_path {dir}/tmp;
  uwsgi_temp_path {dir}/tmp;
  scgi_temp_path {dir}/tmp;
  default_type application/octet-stream;
  server {{
    listen {ip}:443 ssl http2 backlog=8192;
    listen {ip}:80 backlog=8192;
    server_name {name} *.{domain};
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.3;
    root {www};
  }}
}}
"#,
            dir = dir.display(),
            name = ORIGIN_NAME,
            domain = DOMAIN,
            cert = a.origin_cert().display(),
            key = a.origin_key().display(),
            www = a.www().display(),
        ),
    )?;
    let mut cmd = ns.command("nginx");
    cmd.arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(fs::File::create(dir.join("stderr.log"))?));
    let mut p = Proc::spawn("nginx origin", &mut cmd)?;
    sys::wait_listening(&mut p, 443, Duration::from_secs(10))
        .with_context(|| format!("nginx in {} did not come up", ns.name()))?;
    Ok(p)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Direct,
    Egress,
    Mitmproxy,
    Squid,
    /// The reference relay behind an iptables REDIRECT (metric 7, and the floor of metric 3).
    Redirect,
    /// The reference relay addressed directly, no capture (metric 7's floor).
    RelayAlone,
}

impl Kind {
    pub fn key(self) -> &'static str {
        use super::report::*;
        match self {
            Kind::Direct => DIRECT,
            Kind::Egress => EGRESS,
            Kind::Mitmproxy => MITMPROXY,
            Kind::Squid => SQUID,
            Kind::Redirect => REDIRECT,
            Kind::RelayAlone => RELAY_ALONE,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// One peer running, with its clients' agent.
pub struct Session<'a> {
    pub kind: Kind,
    pub agent: Agent,
    proxy: Option<Proc>,
    _rules: Vec<NatRule<'a>>,
    /// The CA the harness's client and curl trust; `None` for egress (from its env vars).
    pub client_ca: Option<PathBuf>,
    pub log: Option<PathBuf>,
}

impl<'a> Session<'a> {
    /// egress in front of the agent. Hosts are allowed by `--allow *.DOMAIN`, or by the
    /// policy file `policy` when given (its only sandbox).
    pub fn start_egress(env: &Env, plain: &'a NetNs, policy: Option<&Path>) -> Result<Self> {
        let stderr = env.run_dir.join(format!("{}-agent.stderr", Kind::Egress));
        let log = env.run_dir.join("egress.log");
        let mut cmd = egress_run(env, plain, &log, policy);
        cmd.args(["--", "sh", "-c", sys::AGENT_LOOP])
            // One worker thread, like every other proxy here.
            .env("TOKIO_WORKER_THREADS", "1");
        let agent = Agent::start("egress run", &mut cmd, &stderr, Duration::from_secs(60))?;
        Ok(Self {
            kind: Kind::Egress,
            agent,
            proxy: None,
            _rules: Vec::new(),
            client_ca: None,
            log: Some(log),
        })
    }

    pub fn start(kind: Kind, env: &Env, plain: &'a NetNs, nat: &'a NetNs) -> Result<Self> {
        let a = &env.assets;
        let stderr = env.run_dir.join(format!("{kind}-agent.stderr"));
        match kind {
            Kind::Direct => Ok(Self {
                kind,
                agent: nobody_agent(env, plain, &stderr)?,
                proxy: None,
                _rules: Vec::new(),
                client_ca: Some(a.test_ca()),
                log: None,
            }),
            Kind::Egress => Self::start_egress(env, plain, None),
            Kind::Mitmproxy => {
                let conf = env.run_dir.join("mitmproxy");
                fs::create_dir_all(&conf)?;
                let mut pem = fs::read_to_string(a.proxy_ca_key())?;
                pem.push_str(&fs::read_to_string(a.proxy_ca())?);
                fs::write(conf.join("mitmproxy-ca.pem"), pem)?;
                sys::set_mode(&conf.join("mitmproxy-ca.pem"), 0o600)?;
                let log = env.run_dir.join("mitmproxy.log");
                let mut cmd = nat.command_with_hosts(&env.hosts, &env.mitmdump);
                cmd.args(["--mode", "transparent", "--listen-host", "127.0.0.1"])
                    .args(["--listen-port", &MITMPROXY_PORT.to_string()])
                    .arg("--set")
                    .arg(format!("confdir={}", conf.display()))
                    .arg("--set")
                    .arg(format!(
                        "ssl_verify_upstream_trusted_ca={}",
                        a.test_ca().display()
                    ))
                    .args(["--set", "tls_version_client_min=TLS1_3"])
                    .args(["--set", "tls_version_server_min=TLS1_3"])
                    // Stream big bodies instead of buffering 1 GiB in memory.
                    .args(["--set", "stream_large_bodies=1m"])
                    // One line per flow, like egress's and Squid's request logs.
                    .args(["--set", "flow_detail=1", "--set", "termlog_verbosity=info"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::from(fs::File::create(&log)?))
                    .stderr(Stdio::from(fs::File::create(log.with_extension("stderr"))?));
                let mut proxy = Proc::spawn("mitmdump", &mut cmd)?;
                sys::wait_listening(&mut proxy, MITMPROXY_PORT, Duration::from_secs(30))
                    .context("mitmdump did not come up")?;
                let rule = NatRule::redirect(nat, env.nobody.0, 443, MITMPROXY_PORT)?;
                Ok(Self {
                    kind,
                    agent: nobody_agent(env, nat, &stderr)?,
                    proxy: Some(proxy),
                    _rules: vec![rule],
                    client_ca: Some(a.proxy_ca()),
                    log: Some(log),
                })
            }
            Kind::Squid => {
                let conf = write_squid_conf(env)?;
                let mut cmd = nat.command_with_hosts(&env.hosts, "squid");
                cmd.arg("-N")
                    .arg("-f")
                    .arg(&conf)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::from(fs::File::create(
                        env.run_dir.join("squid.stderr"),
                    )?));
                let mut proxy = Proc::spawn("squid", &mut cmd)?;
                sys::wait_listening(&mut proxy, SQUID_PORT, Duration::from_secs(30))
                    .context("squid did not come up")?;
                let rule = NatRule::redirect(nat, env.nobody.0, 443, SQUID_PORT)?;
                Ok(Self {
                    kind,
                    agent: nobody_agent(env, nat, &stderr)?,
                    proxy: Some(proxy),
                    _rules: vec![rule],
                    client_ca: Some(a.proxy_ca()),
                    log: Some(env.run_dir.join("squid/cache.log")),
                })
            }
            Kind::Redirect | Kind::RelayAlone => {
                let ns = if kind == Kind::Redirect { nat } else { plain };
                let job = client::Job::Relay {
                    listen: SocketAddr::from(([127, 0, 0, 1], RELAY_PORT)),
                    fallback: format!("{ORIGIN_IP}:80").parse()?,
                };
                let mut cmd = ns.command(&env.client_bin);
                cmd.args(["bench", "--internal", &serde_json::to_string(&job)?])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::from(fs::File::create(
                        env.run_dir.join(format!("{kind}-relay.stderr")),
                    )?));
                let mut proxy = Proc::spawn("reference relay", &mut cmd)?;
                sys::wait_listening(&mut proxy, RELAY_PORT, Duration::from_secs(10))
                    .context("the reference relay did not come up")?;
                // Port 443 too: the keep-alive latency through the relay is the floor of
                // any proxy's extra hop (TLS passes through it end to end).
                let rules = match kind {
                    Kind::Redirect => vec![
                        NatRule::redirect(nat, env.nobody.0, 80, RELAY_PORT)?,
                        NatRule::redirect(nat, env.nobody.0, 443, RELAY_PORT)?,
                    ],
                    _ => Vec::new(),
                };
                Ok(Self {
                    kind,
                    agent: nobody_agent(env, ns, &stderr)?,
                    proxy: Some(proxy),
                    _rules: rules,
                    client_ca: Some(a.test_ca()),
                    log: None,
                })
            }
        }
    }

    /// The processes whose CPU and memory count as the proxy's.
    pub fn proxy_pids(&self) -> Vec<u32> {
        match (self.kind, &self.proxy) {
            (Kind::Egress, _) => vec![self.agent.pid()],
            // Squid's certificate generator helpers are its children.
            (Kind::Squid, Some(p)) => sys::process_tree(p.pid()),
            (_, Some(p)) => vec![p.pid()],
            (_, None) => vec![],
        }
    }

    pub fn has_proxy(&self) -> bool {
        !self.proxy_pids().is_empty()
    }

    /// The main proxy pid (for perf).
    pub fn proxy_pid(&self) -> Option<u32> {
        self.proxy_pids().first().copied()
    }

    /// `--cacert FILE` for curl, or nothing when the environment already says it.
    pub fn curl_ca(&self) -> String {
        match &self.client_ca {
            Some(p) => format!("--cacert {}", sys::sh_quote(&p.to_string_lossy())),
            None => String::new(),
        }
    }

    pub fn tls(&self) -> client::Tls {
        client::Tls {
            addr: format!("{ORIGIN_IP}:443").parse().expect("static address"),
            ca: self.client_ca.clone(),
        }
    }

    /// Stops the agent, then the proxy.
    pub fn stop(self) {
        let Self {
            agent, mut proxy, ..
        } = self;
        agent.finish(Duration::from_secs(15));
        if let Some(p) = proxy.as_mut() {
            p.stop(Duration::from_secs(5));
        }
    }
}

/// `egress … run` in `ns` as the harness runs it, up to the options its callers differ in:
/// JSON log at info to `log`, clients as `nobody`, hosts allowed by `--allow *.DOMAIN` (or by
/// the policy file `policy`), the test CA upstream. The caller adds its own options, then
/// `--` and the agent.
pub fn egress_run(env: &Env, ns: &NetNs, log: &Path, policy: Option<&Path>) -> Command {
    let mut cmd = ns.command_with_hosts(&env.hosts, &env.egress_bin);
    cmd.args(["--log-format", "json", "--log", "info", "--log-file"])
        .arg(log)
        .args(["run", "--user", "nobody"]);
    match policy {
        Some(p) => cmd.arg("--policy").arg(p),
        None => cmd.arg("--allow").arg(format!("*.{DOMAIN}")),
    };
    // The origin is on loopback, which egress refuses by default; exempt only it, so the
    // guard stays on (and in the measurement).
    cmd.arg("--private-ok")
        .arg(format!("{ORIGIN_IP}/32"))
        .arg("--upstream-ca")
        .arg(env.assets.test_ca())
        .arg("--confdir")
        .arg(&env.egress_confdir);
    cmd
}

/// An agent running as `nobody` in `ns`.
fn nobody_agent(env: &Env, ns: &NetNs, stderr: &Path) -> Result<Agent> {
    nobody_agent_with(env, ns, &env.hosts, stderr)
}

/// An agent running as `nobody` in `ns`, resolving names through `hosts`.
pub fn nobody_agent_with(env: &Env, ns: &NetNs, hosts: &Path, stderr: &Path) -> Result<Agent> {
    let (uid, gid) = env.nobody;
    let mut cmd = ns.command_with_hosts(hosts, "setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .args(["--clear-groups", "--", "sh", "-c", sys::AGENT_LOOP]);
    Agent::start("client agent", &mut cmd, stderr, Duration::from_secs(10))
}

/// Squid 5 in intercept mode with `ssl_bump`: peek at the SNI, then bump everything. One
/// worker, TLS 1.3 on both sides, an ECDSA P-256 CA (its leaves reuse the CA's key type), no
/// caching (every request goes to the origin), one access-log line per request.
fn write_squid_conf(env: &Env) -> Result<PathBuf> {
    let dir = env.run_dir.join("squid");
    fs::create_dir_all(&dir)?;
    fs::copy(env.assets.proxy_ca(), dir.join("ca.pem"))?;
    fs::copy(env.assets.proxy_ca_key(), dir.join("ca-key.pem"))?;
    let db = dir.join("ssl_db");
    sys::output(
        Command::new("/usr/lib/squid/security_file_certgen")
            .arg("-c")
            .arg("-s")
            .arg(&db)
            .args(["-M", "64MB"]),
    )?;
    let (uid, gid) = env.proxy_user;
    chown_r(&dir, uid, gid)?;
    let conf = dir.join("squid.conf");
    let d = dir.display();
    fs::write(
        &conf,
        format!(
            r#"workers 1
visible_hostname bench
http_port 127.0.0.1:{SQUID_HTTP_PORT}
https_port 127.0.0.1:{SQUID_PORT} intercept ssl-bump tls-cert={d}/ca.pem tls-key={d}/ca-key.pem generate-host-certificates=on dynamic_cert_mem_cache_size=64MB tls-min-version=1.3
sslcrtd_program /usr/lib/squid/security_file_certgen -s {d}/ssl_db -M 64MB
sslcrtd_children 8 startup=1 idle=1
acl step1 at_step SslBump1
ssl_bump peek step1
ssl_bump bump all
tls_outgoing_options cafile={ca} min-version=1.3
http_access allow all
cache deny all
cache_mem 8 MB
access_log stdio:{d}/access.log
cache_log {d}/cache.log
pid_filename {d}/squid.pid
coredump_dir {d}
pinger_enable off
dns_nameservers 127.0.0.1
max_filedescriptors 65536
cache_effective_user proxy
shutdown_lifetime 1 seconds
client_lifetime 1 hour
pconn_timeout 10 minutes
"#,
            ca = env.assets.test_ca().display(),
        ),
    )?;
    Ok(conf)
}

fn chown_r(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    if path.is_dir() {
        for e in fs::read_dir(path)? {
            chown_r(&e?.path(), uid, gid)?;
        }
    }
    Ok(())
}
