//! The node daemon section: `egress daemon` with many sandboxes, each a fresh cgroup under a
//! cgroup the harness owns and in a network namespace of its own (the container case).
//!
//! The daemon runs in a namespace of its own holding only `lo` (its host-side listeners and
//! admin endpoint collide with nothing there), pins under a bench-owned `bpffs_dir`, and is
//! stopped with SIGTERM under `--detach-on-exit`, so it removes its sandboxes and pins itself.
//! Every cgroup, namespace and pin directory is also owned by a guard that removes it on
//! drop. The harness talks to the API over its unix socket with a few lines of HTTP/1.1 of
//! its own ([`Api`]), so an `add` is timed from connect to the answer's last byte and no
//! process start is in it.
//!
//! ```text
//!  node ns (lo)               sandbox ns 0                      origin ns
//!  egress daemon ──setns──▶   127.0.0.1:15001/15053 (egress)
//!  api.sock (run dir)         wrk as nobody ─ 198.18.0.2 ══veth══ 198.18.0.1 nginx :443
//!                             sandbox ns 1 … N-1: lo only, listeners bound by egress
//! ```

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use super::{
    install::{DOMAIN, ORIGIN_NAME},
    parse,
    peers::{self, Env},
    report::{DaemonResults, Rate},
    short_reason,
    sys::{self, Agent, CgroupTree, NetNs, PinDir, Proc, ProcReader},
};

/// The origin's address on the veth and the sandbox end's: RFC 2544's benchmarking range,
/// on a pair that exists only between two of the harness's namespaces.
const ORIGIN_VETH_IP: &str = "198.18.0.1";
const SANDBOX_VETH_IP: &str = "198.18.0.2";
/// The policy file's sandbox that every bench sandbox applies.
const POLICY: &str = "bench";
const BPFFS: &str = "/sys/fs/bpf";

/// How big and how long the section runs.
#[derive(Clone, Debug)]
pub struct Plan {
    pub sandboxes: usize,
    pub warmup_secs: u32,
    /// Keep-alive comparison: rounds of one wrk per arm, alternating which goes first.
    pub rounds: u32,
    pub secs: u32,
    pub conns: usize,
}

impl Plan {
    pub fn full() -> Self {
        Self {
            sandboxes: 100,
            warmup_secs: 2,
            rounds: 2,
            secs: 5,
            conns: 64,
        }
    }

    pub fn quick() -> Self {
        Self {
            warmup_secs: 1,
            rounds: 1,
            secs: 2,
            ..Self::full()
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} sandboxes, each its own cgroup and netns, added one after another; keep-alive: `wrk -t1 -c{}` on /1k, {} round(s) of {} s per arm after a {} s warm-up of each; daemon with TOKIO_WORKER_THREADS=1",
            self.sandboxes, self.conns, self.rounds, self.secs, self.warmup_secs
        )
    }
}

/// Everything the section creates. Fields drop in order: the origin first, the namespaces,
/// then the cgroups and last the pin directory (the daemon is stopped before all of them).
struct Topology {
    _origin: Proc,
    _node_ns: NetNs,
    sandboxes: Vec<NetNs>,
    _origin_ns: NetNs,
    cgroups: CgroupTree,
    pins: PinDir,
    node_ns_path: PathBuf,
    /// Each sandbox's cgroup relative to the cgroup2 root, as the API takes it.
    cgroup_names: Vec<String>,
    dir: PathBuf,
    hosts: PathBuf,
}

impl Topology {
    fn create(env: &Env, n: usize) -> Result<Self> {
        let t = Instant::now();
        let pid = std::process::id();
        let prefix = format!("{}{pid}", NetNs::PREFIX);
        let cg_root = sys::cgroup2_root()?;
        PinDir::remove_stale(Path::new(BPFFS));
        CgroupTree::remove_stale(&cg_root);
        let dir = env.run_dir.join("daemon");
        std::fs::create_dir_all(&dir)?;
        sys::set_mode(&dir, 0o755)?;
        let pins = PinDir::new(Path::new(BPFFS).join(&prefix));
        let names: Vec<String> = (0..n).map(|i| format!("sb{i}")).collect();
        let cgroups = CgroupTree::create(cg_root.join(&prefix), &names)?;
        let cgroup_names = names.iter().map(|s| format!("{prefix}/{s}")).collect();
        let origin_ns = NetNs::create(&format!("{prefix}-dorigin"))?;
        let mut sandboxes = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("{prefix}-dsb{i}");
            // Only the first carries traffic; it gets the harness's usual sysctls.
            sandboxes.push(if i == 0 {
                NetNs::create(&name)?
            } else {
                NetNs::create_bare(&name)?
            });
        }
        origin_ns.veth_to(&sandboxes[0], ORIGIN_VETH_IP, SANDBOX_VETH_IP)?;
        let node_ns = NetNs::create(&format!("{prefix}-dnode"))?;
        let hosts = dir.join("hosts");
        std::fs::write(
            &hosts,
            format!("127.0.0.1 localhost\n{ORIGIN_VETH_IP} {ORIGIN_NAME}\n"),
        )?;
        sys::set_mode(&hosts, 0o644)?;
        let origin = peers::start_origin_on(env, &origin_ns, ORIGIN_VETH_IP)?;
        eprintln!(
            "bench: daemon: {n} cgroups and namespaces, origin up in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        Ok(Self {
            _origin: origin,
            node_ns_path: node_ns.path(),
            _node_ns: node_ns,
            sandboxes,
            _origin_ns: origin_ns,
            cgroups,
            pins,
            cgroup_names,
            dir,
            hosts,
        })
    }

    fn node_command(&self, program: &Path) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.node_ns_path.display()))
            .arg("--")
            .arg(program);
        c
    }

    /// An agent as `nobody` in sandbox 0's namespace; `inside` also puts it in the
    /// sandbox's cgroup (before it starts anything).
    fn agent(&self, env: &Env, inside: bool) -> Result<Agent> {
        let which = if inside { "sandbox" } else { "direct" };
        let stderr = self.dir.join(format!("agent-{which}.stderr"));
        let agent = peers::nobody_agent_with(env, &self.sandboxes[0], &self.hosts, &stderr)?;
        if inside {
            self.cgroups.join(0, agent.pid())?;
        }
        Ok(agent)
    }
}

/// A running daemon, stopped (SIGTERM, so it detaches) on drop.
struct Daemon {
    proc: Proc,
    api: Api,
    log: PathBuf,
}

impl Daemon {
    fn start(env: &Env, topo: &Topology) -> Result<Self> {
        let dir = &topo.dir;
        let q = |p: &Path| format!("{:?}", p.to_string_lossy());
        let policy = dir.join("policy.toml");
        std::fs::write(
            &policy,
            format!("[sandbox.{POLICY}]\nallow = [\"*.{DOMAIN}\"]\n"),
        )?;
        let api = dir.join("api.sock");
        let config = dir.join("daemon.toml");
        let a = &env.assets;
        std::fs::write(
            &config,
            format!(
                "[daemon]\nconfdir = {}\napi = {}\nadmin = \"127.0.0.1:9464\"\npolicy = {}\naudit = {}\n\
                 drain_timeout = \"2s\"\nbpffs_dir = {}\nca_cert = {}\nca_key = {}\nupstream_ca = [{}]\n",
                q(&dir.join("confdir")),
                q(&api),
                q(&policy),
                q(&dir.join("audit.jsonl")),
                q(topo.pins.path()),
                q(&a.proxy_ca()),
                q(&a.proxy_ca_key()),
                q(&a.test_ca()),
            ),
        )?;
        let log = dir.join("daemon.log");
        let stderr = dir.join("daemon.stderr");
        let mut cmd = topo.node_command(&env.egress_bin);
        cmd.args(["--log-format", "json", "--log", "info", "--log-file"])
            .arg(&log)
            .args(["daemon", "--config"])
            .arg(&config)
            .arg("--detach-on-exit")
            .env("TOKIO_WORKER_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&stderr)?))
            .stderr(Stdio::from(std::fs::File::create(&stderr)?));
        let mut d = Self {
            proc: Proc::spawn("egress daemon", &mut cmd)?,
            api: Api { path: api },
            log,
        };
        let t = Instant::now();
        let limit = Duration::from_secs(60);
        loop {
            if let Err(e) = d.proc.check_alive() {
                let text = std::fs::read_to_string(&stderr).unwrap_or_default()
                    + &std::fs::read_to_string(&d.log).unwrap_or_default();
                bail!("{e}; its output:\n{}", sys::tail(&text, 20));
            }
            if d.api.path.exists() {
                if let Ok((200, v)) = d.api.call("GET", "/v1/status", None) {
                    if v["ready"] == true {
                        break;
                    }
                }
            }
            if t.elapsed() > limit {
                bail!("the daemon was not ready after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("bench: daemon: ready in {:.1} s", t.elapsed().as_secs_f64());
        Ok(d)
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Adds sandbox `i`; returns how long the API took.
    fn add(&self, topo: &Topology, i: usize) -> Result<Duration> {
        let body = json!({
            "name": format!("sb{i}"),
            "cgroup": topo.cgroup_names[i],
            "policy": POLICY,
            "netns": topo.sandboxes[i].path(),
        });
        let t = Instant::now();
        let (status, v) = self.api.call("POST", "/v1/sandboxes", Some(&body))?;
        let took = t.elapsed();
        if status != 201 {
            bail!("adding sb{i}: HTTP {status}: {v}");
        }
        Ok(took)
    }

    fn remove(&self, i: usize) -> Result<Duration> {
        let t = Instant::now();
        let (status, v) = self
            .api
            .call("DELETE", &format!("/v1/sandboxes/sb{i}"), None)?;
        let took = t.elapsed();
        if status != 200 {
            bail!("removing sb{i}: HTTP {status}: {v}");
        }
        Ok(took)
    }

    /// Allowed requests the daemon counted for sandbox `name`.
    fn allowed(&self, name: &str) -> Result<u64> {
        let (status, v) = self.api.call("GET", "/v1/sandboxes", None)?;
        if status != 200 {
            bail!("listing sandboxes: HTTP {status}: {v}");
        }
        v.as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == name))
            .and_then(|s| s["counters"]["requests"]["allow"].as_u64())
            .with_context(|| format!("no request counters for {name} in {v}"))
    }

    /// SIGTERM, then a wait for the drain and detach. Fails if it had to be killed or left
    /// its pins behind (the guards remove them either way).
    fn stop(mut self, pins: &Path) -> Result<()> {
        if !self.proc.stop(Duration::from_secs(30)) {
            bail!("the daemon did not exit within 30 s of SIGTERM and was killed");
        }
        if pins.exists() {
            bail!(
                "the daemon exited under --detach-on-exit but left {} behind",
                pins.display()
            );
        }
        Ok(())
    }
}

/// `--smoke`: the daemon starts, takes one netns sandbox, one request goes through it with
/// the daemon's certificate, and the sandbox goes again.
pub fn smoke(env: &Env) -> Result<String> {
    let topo = Topology::create(env, 1)?;
    let daemon = Daemon::start(env, &topo)?;
    let add = daemon.add(&topo, 0)?;
    let mut inside = topo.agent(env, true)?;
    let c = curl_through(&mut inside, &env.assets.proxy_ca())
        .context("a request from the sandbox, through the daemon")?;
    inside.finish(Duration::from_secs(5));
    let allowed = daemon.allowed("sb0")?;
    if allowed == 0 {
        bail!("the daemon counted no allowed request for sb0");
    }
    let remove = daemon.remove(0)?;
    let pins = topo.pins.path().to_owned();
    daemon.stop(&pins)?;
    Ok(format!(
        "add {:.1} ms, curl HTTP {} with the daemon's certificate, remove {:.1} ms",
        add.as_secs_f64() * 1e3,
        c.status,
        remove.as_secs_f64() * 1e3
    ))
}

/// The whole section. What fails is recorded as the reason its cells are empty; remarks go
/// to `notes`.
pub fn measure(
    env: &Env,
    plan: &Plan,
    reader: &ProcReader,
    notes: &mut Vec<String>,
) -> DaemonResults {
    let t = Instant::now();
    let mut r = DaemonResults {
        sandboxes: plan.sandboxes,
        ka_conns: plan.conns,
        ..Default::default()
    };
    if let Err(e) = measure_into(env, plan, reader, &mut r, notes) {
        let msg = format!("{e:#}");
        eprintln!("bench: daemon: {}", sys::tail(&msg, 5));
        r.missing.insert("section".into(), short_reason(&msg));
    }
    r.secs = t.elapsed().as_secs_f64();
    r
}

fn measure_into(
    env: &Env,
    plan: &Plan,
    reader: &ProcReader,
    r: &mut DaemonResults,
    notes: &mut Vec<String>,
) -> Result<()> {
    let n = plan.sandboxes;
    let topo = Topology::create(env, n)?;
    let daemon = Daemon::start(env, &topo)?;
    let settle = || std::thread::sleep(Duration::from_millis(500));
    let pid = daemon.pid();
    settle();
    r.rss_started_kib = Some(reader.rss_kib(&[pid]));
    let threads0 = threads(pid);

    let mut adds = Vec::with_capacity(n);
    for i in 0..n {
        match daemon.add(&topo, i) {
            Ok(d) => adds.push(d.as_secs_f64() * 1e6),
            Err(e) => {
                r.missing
                    .insert("add".into(), short_reason(&format!("{e:#}")));
                return Err(e);
            }
        }
    }
    r.add_us = Some(parse::summarize(&mut adds));
    settle();
    r.rss_added_kib = Some(reader.rss_kib(&[pid]));
    notes.push(format!(
        "Node daemon: {} threads when started, {} with {n} netns sandboxes.",
        threads0.map_or("?".into(), |t| t.to_string()),
        threads(pid).map_or("?".into(), |t| t.to_string()),
    ));

    if let Err(e) = keepalive(env, &topo, &daemon, plan, reader, r, notes) {
        let msg = format!("{e:#}");
        eprintln!("bench: daemon: keep-alive: {}", sys::tail(&msg, 5));
        r.missing.insert("keepalive".into(), short_reason(&msg));
    }
    settle();
    r.rss_traffic_kib = Some(reader.rss_kib(&[pid]));

    let mut removes = Vec::with_capacity(n);
    for i in 0..n {
        match daemon.remove(i) {
            Ok(d) => removes.push(d.as_secs_f64() * 1e6),
            Err(e) => {
                r.missing
                    .insert("remove".into(), short_reason(&format!("{e:#}")));
                break;
            }
        }
    }
    if removes.len() == n {
        r.remove_us = Some(parse::summarize(&mut removes));
        settle();
        r.rss_removed_kib = Some(reader.rss_kib(&[pid]));
    }
    let log = daemon.log.clone();
    if let Err(e) = daemon.stop(topo.pins.path()) {
        notes.push(format!("Node daemon: {e:#}"));
    }
    notes.extend(log_summary(&log));
    Ok(())
}

/// Keep-alive HTTPS from sandbox 0's namespace, through the sandbox and direct.
fn keepalive(
    env: &Env,
    topo: &Topology,
    daemon: &Daemon,
    plan: &Plan,
    reader: &ProcReader,
    r: &mut DaemonResults,
    notes: &mut Vec<String>,
) -> Result<()> {
    let mut inside = topo.agent(env, true)?;
    let mut direct = topo.agent(env, false)?;
    // The sandbox's answer must carry the daemon's certificate, the direct one the origin's:
    // wrk verifies nothing, so this is what says which path each arm takes.
    curl_through(&mut inside, &env.assets.proxy_ca()).context("through the sandbox")?;
    curl_through(&mut direct, &env.assets.test_ca()).context("direct")?;
    let url = format!("https://{ORIGIN_NAME}/1k");
    let wrk = |secs: u32| format!("wrk -t1 -c{} -d{secs}s --timeout 10s {url}", plan.conns);
    let limit = |secs: u32| Duration::from_secs(u64::from(secs) + 20);
    for a in [&mut inside, &mut direct] {
        a.run(&wrk(plan.warmup_secs), limit(plan.warmup_secs))?;
    }
    let counted0 = daemon.allowed("sb0")?;
    let (mut through, mut straight) = (Rate::default(), Rate::default());
    for round in 0..plan.rounds {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for sandboxed in order {
            let agent = if sandboxed { &mut inside } else { &mut direct };
            let cpu0 = reader.cpu(&[daemon.pid()]);
            let out = agent.run(&wrk(plan.secs), limit(plan.secs))?;
            let spent = reader.cpu(&[daemon.pid()]).since(&cpu0);
            let w = parse::wrk(&out.text())
                .with_context(|| format!("wrk output:\n{}", sys::tail(&out.text(), 10)))?;
            if w.requests == 0 {
                bail!("no request succeeded:\n{}", out.text());
            }
            let run = Rate {
                count: w.requests,
                secs: w.secs,
                errors: w.errors,
                cpu: sandboxed.then_some(spent),
                machine_cpu_s: None,
            };
            if sandboxed {
                through.absorb(&run);
            } else {
                straight.absorb(&run);
            }
        }
    }
    let counted = daemon.allowed("sb0")?.saturating_sub(counted0);
    r.counted_requests = Some(counted);
    if counted == 0 {
        bail!("the daemon counted none of wrk's requests through the sandbox");
    }
    notes.push(format!(
        "Node daemon: wrk completed {} requests through the sandbox; the daemon counted {counted} allowed requests for it.",
        through.count
    ));
    r.ka_sandbox = Some(through);
    r.ka_direct = Some(straight);
    inside.finish(Duration::from_secs(5));
    direct.finish(Duration::from_secs(5));
    Ok(())
}

/// One curl of /1k that must succeed trusting only `ca`.
fn curl_through(agent: &mut Agent, ca: &Path) -> Result<parse::Curl> {
    let url = format!("https://{ORIGIN_NAME}/1k");
    let cmd = format!(
        "curl -sS -o /dev/null --max-time 10 --cacert {} -w '%{{http_code}} %{{size_download}} %{{time_total}}\\n' {url}",
        sys::sh_quote(&ca.to_string_lossy())
    );
    let out = agent.run(&cmd, Duration::from_secs(15))?;
    let c = parse::curl(&out.text());
    match c {
        Ok(c) if out.code == 0 && c.status == 200 => Ok(c),
        _ => bail!("curl {url}: exit {}, output:\n{}", out.code, out.text()),
    }
}

/// `Threads:` of a process.
fn threads(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
}

/// Counts of the daemon's warnings and errors, with the messages.
fn log_summary(log: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(log) else {
        return vec![format!("Node daemon: log {} unreadable", log.display())];
    };
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let level = v["level"].as_str().unwrap_or("");
        if level == "WARN" || level == "ERROR" {
            let msg = v["fields"]["message"]
                .as_str()
                .or(v["message"].as_str())
                .unwrap_or("");
            *counts.entry(format!("{level} {msg}")).or_default() += 1;
        }
    }
    counts
        .iter()
        .take(8)
        .map(|(m, n)| format!("Node daemon log: {n} × `{}`", short_reason(m)))
        .collect()
}

/// The daemon's API socket, spoken to with HTTP/1.1, one connection per request.
struct Api {
    path: PathBuf,
}

impl Api {
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut s = UnixStream::connect(&self.path)
            .with_context(|| format!("connecting to {}", self.path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        s.set_write_timeout(Some(Duration::from_secs(60)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: egress\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        s.flush()?;
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 8192];
        loop {
            let n = s.read(&mut chunk).context("reading the API's answer")?;
            buf.extend_from_slice(&chunk[..n]);
            if let Some((status, body)) = parse_response(&buf, n == 0)? {
                let v = if body.iter().all(u8::is_ascii_whitespace) {
                    Value::Null
                } else {
                    serde_json::from_slice(body).with_context(|| {
                        format!(
                            "the API answered {status} with no JSON: {}",
                            String::from_utf8_lossy(body)
                        )
                    })?
                };
                return Ok((status, v));
            }
        }
    }
}

/// The status and body of an HTTP/1.1 response in `buf`, or `None` while it is incomplete
/// (`eof`: nothing more will come).
fn parse_response(buf: &[u8], eof: bool) -> Result<Option<(u16, &[u8])>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if eof {
            bail!("the API closed the connection mid-answer");
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).context("answer head")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP status line: {status_line:?}"))?;
    let mut len = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        if k.eq_ignore_ascii_case("content-length") {
            len = Some(v.trim().parse::<usize>().context("Content-Length")?);
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            bail!("the API answered with Transfer-Encoding {}", v.trim());
        }
    }
    let body = &buf[end + 4..];
    Ok(match len {
        Some(n) if body.len() >= n => Some((status, &body[..n])),
        Some(_) if eof => bail!("the API closed the connection mid-body"),
        None if eof => Some((status, body)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_complete_by_length_or_eof() {
        let full = b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: 8\r\n\r\n{\"a\":1}\nEXTRA";
        let (status, body) = parse_response(full, false).unwrap().unwrap();
        assert_eq!((status, body), (201, &b"{\"a\":1}\n"[..]));
        // The head, or the body, not all there yet.
        assert!(parse_response(&full[..20], false).unwrap().is_none());
        assert!(parse_response(&full[..80], false).unwrap().is_none());
        assert!(parse_response(&full[..80], true).is_err());
        // No length: the body runs to the end of the stream.
        let open = b"HTTP/1.1 404 Not Found\r\n\r\n{}";
        assert!(parse_response(open, false).unwrap().is_none());
        assert_eq!(parse_response(open, true).unwrap(), Some((404, &b"{}"[..])));
        assert!(parse_response(b"garbage\r\n\r\n", true).is_err());
        assert!(parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false
        )
        .is_err());
    }

    #[test]
    fn plans_keep_a_hundred_sandboxes() {
        assert_eq!(Plan::full().sandboxes, 100);
        assert_eq!(Plan::quick().sandboxes, 100);
        assert!(Plan::quick().describe().contains("100 sandboxes"));
    }
}
