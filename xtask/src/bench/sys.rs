//! Processes, network namespaces, NAT rules and `/proc` readings, each owned by a guard that
//! undoes it on drop. Everything the harness starts is killed by its own pid; every rule it
//! adds lives inside a namespace it created.

use std::{
    collections::HashMap,
    ffi::OsStr,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

/// Runs `cmd` to completion and returns its stdout; fails with its stderr otherwise.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`output`] but stdout and stderr together, and never fails on the exit status.
pub fn output_lossy(cmd: &mut Command) -> String {
    match cmd.stdin(Stdio::null()).output() {
        Ok(o) => {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s
        }
        Err(e) => format!("{cmd:?}: {e}"),
    }
}

/// Raises this process's open-file limit as far as it may (every child inherits it) and
/// returns the soft limit now in force. Needed for the 10,000 idle connections held by the
/// client and by the proxy at once. Without CAP_SYS_RESOURCE only the soft limit can rise,
/// up to the hard one.
pub fn raise_nofile(want: u64) -> Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let nr_open = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(want);
    let target = want.min(nr_open);
    if hard < target && setrlimit(Resource::RLIMIT_NOFILE, target, target).is_ok() {
        return Ok(target);
    }
    let new = soft.max(target.min(hard));
    setrlimit(Resource::RLIMIT_NOFILE, new, hard).context("raising RLIMIT_NOFILE")?;
    Ok(new)
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has already exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early: {status}", self.name);
        }
        Ok(())
    }

    /// SIGTERM, a grace period, then SIGKILL. Returns whether it exited on its own.
    pub fn stop(&mut self, grace: Duration) -> bool {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return true;
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = kill(pid, Signal::SIGKILL);
        let _ = self.child.wait();
        false
    }

    /// Waits for the process to exit by itself (after its input closed, say).
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// A network namespace with only `lo`, deleted (with every process still in it) on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub const PREFIX: &'static str = "egbench-";

    pub fn create(name: &str) -> Result<Self> {
        output(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self {
            name: name.to_owned(),
        };
        output(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]))?;
        // Per-namespace settings: room for many short connections and deep accept queues.
        let reserved = super::peers::LISTEN_PORTS
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",");
        for (key, value) in [
            ("net.ipv4.ip_local_port_range", "1024 65535"),
            ("net.ipv4.ip_local_reserved_ports", reserved.as_str()),
            ("net.ipv4.tcp_tw_reuse", "1"),
            ("net.core.somaxconn", "8192"),
            ("net.ipv4.tcp_max_syn_backlog", "8192"),
        ] {
            output(
                ns.command("sysctl")
                    .args(["-q", "-w", &format!("{key}={value}")]),
            )?;
        }
        Ok(ns)
    }

    /// A namespace with `lo` up and nothing else: no sysctls, two commands. For the node
    /// daemon's many sandbox namespaces, where only the listeners egress binds live.
    pub fn create_bare(name: &str) -> Result<Self> {
        output(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self {
            name: name.to_owned(),
        };
        output(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's file, as `ip netns` mounts it.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// A veth pair between this namespace and `peer`, made inside this namespace (it never
    /// appears in the host's), each end up with a /30 address; it goes away with either
    /// namespace.
    pub fn veth_to(&self, peer: &NetNs, here: &str, there: &str) -> Result<()> {
        let ip = |ns: &str, args: &[&str]| output(Command::new("ip").arg("-n").arg(ns).args(args));
        ip(
            &self.name,
            &[
                "link", "add", "egb0", "type", "veth", "peer", "name", "egb1", "netns", &peer.name,
            ],
        )?;
        ip(
            &self.name,
            &["addr", "add", &format!("{here}/30"), "dev", "egb0"],
        )?;
        ip(
            &peer.name,
            &["addr", "add", &format!("{there}/30"), "dev", "egb1"],
        )?;
        ip(&self.name, &["link", "set", "egb0", "up"])?;
        ip(&peer.name, &["link", "set", "egb1", "up"])?;
        Ok(())
    }

    /// `program` run inside the namespace (network only; mounts are the host's).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        c
    }

    /// `program` run inside the namespace and in a private mount namespace where `hosts`
    /// replaces `/etc/hosts`, so clients resolve the benchmark names without DNS. The pid of
    /// the spawned process is the pid of `program` (each step `exec`s the next).
    pub fn command_with_hosts(&self, hosts: &Path, program: impl AsRef<OsStr>) -> Command {
        let mut c = self.command("unshare");
        c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount --bind "$0" /etc/hosts && exec "$@""#)
            .arg(hosts)
            .arg(program);
        c
    }

    /// Deletes namespaces left by earlier runs of this harness whose process is gone.
    pub fn remove_stale() {
        let Ok(list) = output(Command::new("ip").args(["netns", "list"])) else {
            return;
        };
        for line in list.lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            let Some(rest) = name.strip_prefix(Self::PREFIX) else {
                continue;
            };
            let owner: Option<u32> = rest.split('-').next().and_then(|p| p.parse().ok());
            if owner.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists()) {
                continue;
            }
            eprintln!("bench: removing stale namespace {name}");
            drop(Self {
                name: name.to_owned(),
            });
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Everything still in the namespace was started by this harness.
        for _ in 0..3 {
            let pids =
                output(Command::new("ip").args(["netns", "pids", &self.name])).unwrap_or_default();
            let pids: Vec<i32> = pids
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect();
            if pids.is_empty() {
                break;
            }
            for p in pids {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if let Err(e) = output(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("bench: {e}");
        }
    }
}

/// Where the cgroup2 hierarchy is mounted, from the text of `/proc/self/mountinfo`.
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

pub fn cgroup2_root() -> Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    parse_cgroup2_mount(&text).context("no cgroup2 hierarchy is mounted")
}

/// A cgroup directory the harness made, with child cgroups under it. On drop every process
/// still in them (started by the harness) is killed by pid, and the directories go.
pub struct CgroupTree {
    parent: PathBuf,
    children: Vec<PathBuf>,
}

impl CgroupTree {
    /// Creates `parent` and `parent/<name>` for every name.
    pub fn create(parent: PathBuf, names: &[String]) -> Result<Self> {
        fs::create_dir(&parent).with_context(|| format!("creating {}", parent.display()))?;
        let mut t = Self {
            parent,
            children: Vec::new(),
        };
        for n in names {
            let c = t.parent.join(n);
            fs::create_dir(&c).with_context(|| format!("creating {}", c.display()))?;
            t.children.push(c);
        }
        Ok(t)
    }

    /// Moves `pid` (and so everything it starts later) into child `i`.
    pub fn join(&self, i: usize, pid: u32) -> Result<()> {
        let procs = self.children[i].join("cgroup.procs");
        fs::write(&procs, pid.to_string())
            .with_context(|| format!("moving {pid} into {}", procs.display()))
    }

    /// Deletes the cgroups left by earlier runs whose process is gone (`<root>/<PREFIX><pid>`).
    /// A cgroup that still holds processes stays, with a warning.
    pub fn remove_stale(root: &Path) {
        for e in fs::read_dir(root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(owner) = name
                .strip_prefix(NetNs::PREFIX)
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if Path::new(&format!("/proc/{owner}")).exists() {
                continue;
            }
            eprintln!("bench: removing stale cgroup {}", e.path().display());
            for c in fs::read_dir(e.path()).into_iter().flatten().flatten() {
                if c.path().is_dir() {
                    let _ = fs::remove_dir(c.path());
                }
            }
            if let Err(err) = fs::remove_dir(e.path()) {
                eprintln!("bench: {}: {err}", e.path().display());
            }
        }
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        for c in self.children.iter().rev() {
            for _ in 0..3 {
                let pids: Vec<i32> = fs::read_to_string(c.join("cgroup.procs"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect();
                if pids.is_empty() {
                    break;
                }
                for p in pids {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            if let Err(e) = fs::remove_dir(c) {
                eprintln!("bench: removing {}: {e}", c.display());
            }
        }
        if let Err(e) = fs::remove_dir(&self.parent) {
            eprintln!("bench: removing {}: {e}", self.parent.display());
        }
    }
}

/// A directory of pinned BPF objects the harness had a daemon use, removed on drop if the
/// daemon left anything behind (unpinning the links detaches their programs).
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Deletes pin directories of earlier runs whose process is gone
    /// (`<bpffs>/<PREFIX><pid>`).
    pub fn remove_stale(bpffs: &Path) {
        for e in fs::read_dir(bpffs).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(owner) = name
                .strip_prefix(NetNs::PREFIX)
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{owner}")).exists() {
                eprintln!("bench: removing stale pins {}", e.path().display());
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if self.path.exists() {
            if let Err(e) = fs::remove_dir_all(&self.path) {
                eprintln!("bench: removing {}: {e}", self.path.display());
            }
        }
    }
}

/// One `iptables -t nat` rule inside a namespace, deleted on drop.
pub struct NatRule<'a> {
    ns: &'a NetNs,
    spec: Vec<String>,
}

impl<'a> NatRule<'a> {
    /// Redirects TCP connects by `uid` to `dport` onto local port `to_port`.
    pub fn redirect(ns: &'a NetNs, uid: u32, dport: u16, to_port: u16) -> Result<Self> {
        let spec: Vec<String> = [
            "OUTPUT",
            "-p",
            "tcp",
            "-m",
            "owner",
            "--uid-owner",
            &uid.to_string(),
            "--dport",
            &dport.to_string(),
            "-j",
            "REDIRECT",
            "--to-ports",
            &to_port.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        output(ns.command("iptables").args(["-t", "nat", "-A"]).args(&spec))?;
        Ok(Self { ns, spec })
    }
}

impl Drop for NatRule<'_> {
    fn drop(&mut self) {
        let _ = output(
            self.ns
                .command("iptables")
                .args(["-t", "nat", "-D"])
                .args(&self.spec),
        );
    }
}

/// A directory removed on drop unless [`TempDir::keep`] was called.
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    pub fn create(path: PathBuf) -> Result<Self> {
        if path.exists() {
            fs::remove_dir_all(&path)?;
        }
        fs::create_dir_all(&path)?;
        set_mode(&path, 0o755)?;
        Ok(Self { path, keep: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("bench: kept {} for inspection", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

pub fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// A long-lived `sh` that runs one command line at a time, as the user and in the cgroup and
/// namespaces it was started in, and streams each command's output back.
pub struct Agent {
    proc: Proc,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

/// The agent's loop. Commands get no stdin, so they cannot eat the command stream.
pub const AGENT_LOOP: &str = r#"echo @@AGENT-READY
while IFS= read -r line; do
  sh -c "$line" </dev/null 2>&1
  echo "@@EXIT $?"
done"#;

const EXIT_MARK: &str = "@@EXIT ";

/// What one agent command printed, and its exit code.
#[derive(Debug)]
pub struct CmdOutput {
    pub lines: Vec<String>,
    pub code: i32,
}

impl CmdOutput {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

impl Agent {
    /// Starts `cmd` (which must end in `sh -c AGENT_LOOP`) and waits until it is ready.
    pub fn start(name: &str, cmd: &mut Command, stderr: &Path, ready: Duration) -> Result<Self> {
        let err = fs::File::create(stderr)?;
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err));
        let mut proc = Proc::spawn(name, cmd)?;
        let stdin = proc.take_stdin().context("agent stdin")?;
        let stdout = proc.take_stdout().context("agent stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let agent = Self { proc, stdin, lines };
        let deadline = Instant::now() + ready;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match agent.lines.recv_timeout(left) {
                Ok(l) if l == "@@AGENT-READY" => return Ok(agent),
                Ok(_) => continue,
                Err(_) => {
                    let log = fs::read_to_string(stderr).unwrap_or_default();
                    bail!(
                        "{name} did not start within {ready:?}; its stderr:\n{}",
                        tail(&log, 30)
                    );
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Runs one shell command line, bounded by `limit` (enforced inside the agent with
    /// `timeout`, and here with a margin).
    pub fn run(&mut self, line: &str, limit: Duration) -> Result<CmdOutput> {
        self.run_with(line, limit, |_| {})
    }

    /// Like [`Agent::run`], calling `on_line` for every line as it arrives.
    pub fn run_with(
        &mut self,
        line: &str,
        limit: Duration,
        mut on_line: impl FnMut(&str),
    ) -> Result<CmdOutput> {
        let secs = limit.as_secs().max(1);
        let wrapped = format!("timeout -k 2 {secs} {line}");
        if wrapped.contains('\n') {
            bail!("agent command lines cannot contain a newline: {line:?}");
        }
        writeln!(self.stdin, "{wrapped}").context("writing to the agent")?;
        self.stdin.flush()?;
        let deadline = Instant::now() + limit + Duration::from_secs(10);
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if let Some(code) = l.strip_prefix(EXIT_MARK) {
                        let code = code.trim().parse().unwrap_or(-1);
                        return Ok(CmdOutput { lines, code });
                    }
                    on_line(&l);
                    lines.push(l);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("agent command did not finish in time: {line}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.proc.check_alive()?;
                    bail!("agent closed its output during: {line}");
                }
            }
        }
    }

    /// Closes the command stream so the agent (and whatever wraps it) exits by itself.
    pub fn finish(mut self, limit: Duration) {
        let Self {
            ref mut proc,
            stdin,
            ..
        } = self;
        drop(stdin);
        if proc.wait_timeout(limit).is_none() {
            proc.stop(Duration::from_secs(3));
        }
    }
}

/// Quotes `s` for `sh`.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// CPU time of a set of processes, in seconds, split user/system.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Cpu {
    pub user: f64,
    pub sys: f64,
}

impl Cpu {
    pub fn total(&self) -> f64 {
        self.user + self.sys
    }

    pub fn plus(&self, other: &Cpu) -> Cpu {
        Cpu {
            user: self.user + other.user,
            sys: self.sys + other.sys,
        }
    }

    pub fn since(&self, before: &Cpu) -> Cpu {
        Cpu {
            user: (self.user - before.user).max(0.0),
            sys: (self.sys - before.sys).max(0.0),
        }
    }
}

/// Clock ticks per second for `/proc/<pid>/stat`.
pub fn clock_ticks() -> f64 {
    output(Command::new("getconf").arg("CLK_TCK"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// `(ppid, utime, stime)` ticks from the text of `/proc/<pid>/stat`.
pub fn parse_stat(stat: &str) -> Option<(u32, u64, u64)> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
    Some((
        f.get(1)?.parse().ok()?,
        f.get(11)?.parse().ok()?,
        f.get(12)?.parse().ok()?,
    ))
}

/// Resident set size in KiB from the text of `/proc/<pid>/status`.
pub fn parse_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Reads process CPU and memory from `/proc`.
pub struct ProcReader {
    ticks: f64,
}

impl ProcReader {
    pub fn new() -> Self {
        Self {
            ticks: clock_ticks(),
        }
    }

    pub fn cpu(&self, pids: &[u32]) -> Cpu {
        let mut cpu = Cpu::default();
        for pid in pids {
            if let Some((_, u, s)) = fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .as_deref()
                .and_then(parse_stat)
            {
                cpu.user += u as f64 / self.ticks;
                cpu.sys += s as f64 / self.ticks;
            }
        }
        cpu
    }

    pub fn rss_kib(&self, pids: &[u32]) -> u64 {
        pids.iter()
            .filter_map(|pid| {
                fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .as_deref()
                    .and_then(parse_rss_kib)
            })
            .sum()
    }
}

/// `root` and all its descendants.
pub fn process_tree(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((ppid, _, _)) = fs::read_to_string(e.path().join("stat"))
                .ok()
                .as_deref()
                .and_then(parse_stat)
            {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend(c);
        }
        i += 1;
    }
    out
}

/// Machine-wide busy CPU seconds (all cores) from `/proc/stat`.
pub fn machine_busy_secs(ticks: f64) -> f64 {
    fs::read_to_string("/proc/stat")
        .ok()
        .as_deref()
        .and_then(parse_proc_stat_busy)
        .map(|t| t as f64 / ticks)
        .unwrap_or(0.0)
}

/// Busy ticks (everything but idle and iowait) from the `cpu` line of `/proc/stat`.
pub fn parse_proc_stat_busy(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user]
    let busy: u64 = v.iter().take(8).sum::<u64>() - v.get(3)? - v.get(4).unwrap_or(&0);
    Some(busy)
}

/// Whether a process's network namespace has a TCP socket listening on `port`
/// (from `/proc/<pid>/net/tcp`, which shows the namespace of `pid`).
pub fn listening(pid: u32, port: u16) -> bool {
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/tcp")) else {
        return false;
    };
    text.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3
            && f[3] == "0A"
            && f[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
                == Some(port)
    })
}

/// Waits until `pid`'s namespace listens on `port`.
pub fn wait_listening(proc: &mut Proc, port: u16, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        proc.check_alive()?;
        if listening(proc.pid(), port) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on port {port} after {limit:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_survive_odd_command_names() {
        let stat =
            "1234 (my (odd) prog) S 77 1234 1234 0 -1 4194560 100 0 0 0 250 31 0 0 20 0 3 0 99 0 0";
        assert_eq!(parse_stat(stat), Some((77, 250, 31)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn rss_is_read_from_status() {
        let status = "Name:\tegress\nVmPeak:\t  999 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_rss_kib(status), Some(12345));
        assert_eq!(parse_rss_kib("Name: x\n"), None);
    }

    #[test]
    fn busy_ticks_leave_out_idle_and_iowait() {
        let text = "cpu  10 1 5 100 7 2 3 0 0 0\ncpu0 5 0 2 50 3 1 1 0 0 0\n";
        assert_eq!(parse_proc_stat_busy(text), Some(10 + 1 + 5 + 2 + 3));
    }

    #[test]
    fn cpu_delta_is_per_field_and_never_negative() {
        let a = Cpu {
            user: 1.0,
            sys: 2.0,
        };
        let b = Cpu {
            user: 1.5,
            sys: 1.0,
        };
        assert_eq!(
            b.since(&a),
            Cpu {
                user: 0.5,
                sys: 0.0
            }
        );
        assert!((b.total() - 2.5).abs() < 1e-9);
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(sh_quote("plain-word_1.2"), "plain-word_1.2");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote(r#"{"k":"it's"}"#), r#"'{"k":"it'\''s"}'"#);
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn cgroup2_mount_is_found_among_v1_mounts() {
        let text = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/memory rw,nosuid shared:11 - cgroup cgroup rw,memory
";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            parse_cgroup2_mount("32 30 0:28 / /x rw - cgroup cgroup rw\n"),
            None
        );
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
