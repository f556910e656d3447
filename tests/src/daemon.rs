//! Harness for the privileged end-to-end tests of `egress daemon`.
//!
//! - [`Daemon`]: the real daemon with a config of the test's, its own pin directory on bpffs,
//!   its own listener ports, admin port and API socket. Started, killed, restarted and
//!   talked to (with `curl`) as an operator would.
//! - [`Cgroup`] and [`Netns`]: the sandboxes a daemon governs. A netns comes with a veth pair
//!   to the host on a /30 of 198.18.0.0/15 of its own, so the host side can play the origin.
//! - [`sandboxed`]: starts a real client the way a sandbox's processes start: moved into the
//!   cgroup before it opens any socket, inside the sandbox's netns, as `nobody`.
//!
//! Every test owns what it makes, down to the ports, and `Drop` removes it: processes (only
//! the ones the test started, by handle or by their own cgroup), the daemon and its pins,
//! veths, namespaces, cgroups. Declare cgroups and namespaces first and the daemon and the
//! clients after them, so that they go in the reverse order.
#![allow(unsafe_code)]

use std::{
    fs::File,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket},
    os::{
        fd::AsRawFd as _,
        unix::{fs::MetadataExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use egress_common::{Allow4, PortKey, Sandbox};
use serde_json::Value;

use crate::{cgroup2_root, egress_bin, read_json_lines, require_root, TempDir};

/// The unprivileged user (and group) every sandboxed command runs as.
pub const NOBODY: u32 = 65534;

/// How long a wait for something the daemon or a client does may take before the test says
/// what it was waiting for and fails.
pub const PATIENCE: Duration = Duration::from_secs(30);

fn unique() -> usize {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Polls `f` every 20 ms until it returns `Ok`, for at most [`PATIENCE`]; then panics naming
/// `what` and the last `Err` (what `f` saw instead).
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) => assert!(
                Instant::now() < deadline,
                "timed out after {PATIENCE:?} waiting for {what}; last seen: {last}"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- cgroups ----

/// A cgroup of the test, under the cgroup2 root. Dropping it kills whatever is still in it
/// (only processes the test put there) and removes it with everything below it.
pub struct Cgroup {
    path: PathBuf,
    rel: String,
}

impl Cgroup {
    /// Creates `<cgroup2>/egress-test-<pid>-<tag>-<n>`.
    pub fn new(tag: &str) -> Cgroup {
        let cg = Cgroup::planned(tag);
        cg.create();
        cg
    }

    /// Names a cgroup without creating it yet ([`Cgroup::create`]).
    pub fn planned(tag: &str) -> Cgroup {
        require_root();
        let rel = format!("egress-test-{}-{tag}-{}", std::process::id(), unique());
        Cgroup {
            path: cgroup2_root().join(&rel),
            rel,
        }
    }

    pub fn create(&self) {
        std::fs::create_dir(&self.path)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", self.path.display()));
    }

    /// Creates a child cgroup `name` below this one.
    pub fn child(&self, name: &str) -> Cgroup {
        let cg = Cgroup {
            path: self.path.join(name),
            rel: format!("{}/{name}", self.rel),
        };
        cg.create();
        cg
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path relative to the cgroup2 root, as a sandbox's `cgroup` is given.
    pub fn rel(&self) -> &str {
        &self.rel
    }

    /// The cgroup id: the inode of its directory, which keys the SANDBOXES map.
    pub fn id(&self) -> u64 {
        std::fs::metadata(&self.path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.path.display()))
            .ino()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if !self.path.exists() {
            return;
        }
        // Everything in it was started by this test; cgroup.kill reaches the whole subtree.
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(self.path.join("cgroup.events"))
            .is_ok_and(|e| e.contains("populated 1"))
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        remove_cgroup_tree(&self.path);
    }
}

fn remove_cgroup_tree(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

// ---- network namespaces ----

/// A named network namespace (`ip netns add`) with `lo` up and a veth pair to the host:
/// `host_ip` on the host side, `sandbox_ip` inside, on a /30 no other test uses.
pub struct Netns {
    pub name: String,
    /// `/var/run/netns/NAME`, what a sandbox's `netns` names.
    pub path: PathBuf,
    pub host_ip: Ipv4Addr,
    pub sandbox_ip: Ipv4Addr,
    host_if: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (iproute2): {e}"));
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    pub fn with_veth() -> Netns {
        require_root();
        let pid = std::process::id();
        let n = unique();
        // 32 subnets per test process, placed by pid, so concurrent test binaries differ too.
        let index = (pid as usize % 1024) * 32 + n % 32;
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + 4 * index as u32;
        let name = format!("egress-test-{pid}-{n}");
        let host_if = format!("eg{pid:x}h{n}");
        let sandbox_if = format!("eg{pid:x}s{n}");
        ip(&["netns", "add", &name]);
        let ns = Netns {
            path: PathBuf::from("/var/run/netns").join(&name),
            name,
            host_ip: Ipv4Addr::from(base + 1),
            sandbox_ip: Ipv4Addr::from(base + 2),
            host_if,
        };
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &sandbox_if,
            "netns",
            &ns.name,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ]);
        ip(&["link", "set", &ns.host_if, "up"]);
        let inside = |args: &[&str]| ip(&[&["-n", &ns.name][..], args].concat());
        inside(&[
            "addr",
            "add",
            &format!("{}/30", ns.sandbox_ip),
            "dev",
            &sandbox_if,
        ]);
        inside(&["link", "set", &sandbox_if, "up"]);
        inside(&["link", "set", "lo", "up"]);
        ns
    }

    /// Routes `dst` (an address on the host, such as another namespace's host side) through
    /// this namespace's veth.
    pub fn route_to(&self, dst: Ipv4Addr) {
        ip(&[
            "-n",
            &self.name,
            "route",
            "add",
            &format!("{dst}/32"),
            "via",
            &self.host_ip.to_string(),
        ]);
    }

    /// `host_ip:port`.
    pub fn host(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.host_ip.into(), port)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting one end of a veth deletes both; the namespace goes once nothing holds it.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

// ---- sandboxed commands ----

/// Makes `cmd` start the way a sandbox's process does: it joins `cgroup` before `exec` (so
/// its every socket belongs to the sandbox), enters `netns` if given, and drops to
/// `nobody` with no way back, in `/` with `HOME=/`.
pub fn sandboxed<'a>(
    cmd: &'a mut Command,
    cgroup: &Cgroup,
    netns: Option<&Netns>,
) -> &'a mut Command {
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.path().join("cgroup.procs"))
        .unwrap_or_else(|e| panic!("cannot open {}/cgroup.procs: {e}", cgroup.path().display()));
    let ns = netns.map(|n| {
        File::open(&n.path).unwrap_or_else(|e| panic!("cannot open {}: {e}", n.path.display()))
    });
    cmd.current_dir("/").env("HOME", "/");
    // SAFETY: between fork and exec the closure makes only async-signal-safe system calls
    // (write, setns, setgroups, setgid, setuid, prctl) on descriptors it owns; it allocates
    // nothing.
    unsafe {
        cmd.pre_exec(move || {
            // "0" moves the writing process itself.
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(ns) = &ns {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            let groups = [NOBODY];
            if libc::setgroups(1, groups.as_ptr()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
                || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Runs `argv` in the sandbox to completion and returns what it printed.
pub fn run_in(cgroup: &Cgroup, netns: Option<&Netns>, argv: &[&str]) -> Output {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]);
    sandboxed(&mut cmd, cgroup, netns)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {argv:?} in {}: {e}", cgroup.rel()))
}

/// A sandboxed process that runs in the background; killed (by its handle) on drop.
pub struct Background {
    child: Option<Child>,
    what: String,
}

impl Background {
    /// Starts `argv` in the sandbox with stdout and stderr going to `out` and `out.err`.
    pub fn start(cgroup: &Cgroup, netns: Option<&Netns>, argv: &[&str], out: &Path) -> Self {
        let stdout = File::create(out).unwrap();
        let stderr = File::create(out.with_extension("err")).unwrap();
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = sandboxed(&mut cmd, cgroup, netns)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {argv:?} in {}: {e}", cgroup.rel()));
        Background {
            child: Some(child),
            what: format!("{argv:?}"),
        }
    }

    /// Waits for it to exit on its own.
    pub fn wait(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let what = self.what.clone();
        wait_for(&format!("{what} to exit"), || match child.try_wait() {
            Ok(Some(s)) => Ok(s),
            Ok(None) => Err("still running".into()),
            Err(e) => Err(e.to_string()),
        })
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---- the daemon ----

/// What a test puts in its daemon's config; the harness adds the paths and ports that must
/// be the test's own.
#[derive(Clone, Debug, Default)]
pub struct DaemonSpec {
    /// The policy file (`[sandbox.NAME]` tables).
    pub policy: String,
    /// More `key = value` lines for `[daemon]`.
    pub daemon: Vec<String>,
    /// `[[sandbox]]` tables.
    pub sandboxes: String,
    /// Start the daemon inside this cgroup rather than the test's.
    pub cgroup: Option<PathBuf>,
    /// More arguments for `egress daemon` (`--detach-on-exit`).
    pub args: Vec<String>,
    /// Run the daemon from this image (egress's own) in a privileged container that
    /// shares the host's pids, network and cgroups, as `deploy/docker/compose.yaml` does.
    pub image: Option<String>,
}

/// A running (or stopped) `egress daemon`.
pub struct Daemon {
    dir: TempDir,
    pub config: PathBuf,
    pub api: PathBuf,
    pub confdir: PathBuf,
    pub audit: PathBuf,
    /// The bpffs directory its maps and links are pinned under.
    pub pin_root: PathBuf,
    pub proxy_port: u16,
    pub dns_port: u16,
    cgroup: Option<PathBuf>,
    args: Vec<String>,
    /// With [`DaemonSpec::image`]: the image, and the name of the container it runs in.
    image: Option<(String, String)>,
    child: Option<Child>,
    /// How many times it was started; each start logs to its own file.
    starts: usize,
    admin: Option<SocketAddr>,
}

/// Two ports (proxy, DNS) free on 127.0.0.1 and [::1] for TCP and UDP, below the ephemeral
/// range, taken from a block of this test process so that concurrent daemons never collide.
fn free_ports() -> (u16, u16) {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let base = 10_000 + (std::process::id() as usize % 1000) * 20;
    let free = |p: u16| {
        [
            IpAddr::from(Ipv4Addr::LOCALHOST),
            IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        ]
        .iter()
        .all(|ip| {
            let a = SocketAddr::new(*ip, p);
            TcpListener::bind(a).is_ok() && UdpSocket::bind(a).is_ok()
        })
    };
    let pick = || {
        for _ in 0..20 {
            let p = (base + NEXT.fetch_add(1, Ordering::Relaxed) % 20) as u16;
            if free(p) {
                return p;
            }
        }
        panic!("no free port left in {base}..{}", base + 20);
    };
    (pick(), pick())
}

impl Daemon {
    /// Writes the config and starts the daemon; returns once its API answers.
    pub fn start(spec: DaemonSpec) -> Daemon {
        require_root();
        let dir = TempDir::new("daemon");
        let (proxy_port, dns_port) = free_ports();
        let pin_root = PathBuf::from(format!(
            "/sys/fs/bpf/egress-test-{}-{}",
            std::process::id(),
            unique()
        ));
        let mut d = Daemon {
            config: dir.path("daemon.toml"),
            api: dir.path("api.sock"),
            confdir: dir.path("conf"),
            audit: dir.path("audit.jsonl"),
            pin_root,
            proxy_port,
            dns_port,
            cgroup: spec.cgroup.clone(),
            args: spec.args.clone(),
            image: spec.image.clone().map(|i| {
                let name = format!("egress-test-daemon-{}-{}", std::process::id(), unique());
                (i, name)
            }),
            child: None,
            starts: 0,
            admin: None,
            dir,
        };
        let policy = d.dir.path("policy.toml");
        std::fs::write(&policy, &spec.policy).unwrap();
        let mut text = format!(
            "[daemon]\n\
             confdir = \"{}\"\n\
             api = \"{}\"\n\
             admin = \"127.0.0.1:0\"\n\
             policy = \"{}\"\n\
             audit = \"{}\"\n\
             bpffs_dir = \"{}\"\n\
             proxy_port = {proxy_port}\n\
             dns_port = {dns_port}\n",
            d.confdir.display(),
            d.api.display(),
            policy.display(),
            d.audit.display(),
            d.pin_root.display(),
        );
        for line in &spec.daemon {
            text.push_str(line);
            text.push('\n');
        }
        text.push('\n');
        text.push_str(&spec.sandboxes);
        std::fs::write(&d.config, text).unwrap();
        d.spawn();
        d
    }

    /// A file in the daemon's scratch directory (world-writable, so sandboxed clients can
    /// write there too).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path(name)
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path(&format!("daemon-{}.log", self.starts))
    }

    /// Starts the daemon (again) with the same config and waits until its API answers.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "the daemon is already running");
        self.starts += 1;
        self.admin = None;
        let stderr = File::create(self.dir.path(&format!("daemon-{}.err", self.starts))).unwrap();
        let stdout = File::create(self.dir.path(&format!("daemon-{}.out", self.starts))).unwrap();
        let mut c = match &self.image {
            None => Command::new(egress_bin()),
            Some((image, name)) => {
                // Every path the test gives it (config, sockets, audit, CAs) is under the
                // temp dir, mounted at the same place.
                let tmp = std::env::temp_dir();
                let mut c = Command::new(crate::containers::docker_cli());
                // The capabilities deploy/docker/compose.yaml gives, and no others. (Docker
                // 20.10 cannot name CAP_BPF; CAP_SYS_ADMIN covers bpf(2).)
                c.args(["run", "--rm", "--name", name, "--cap-drop", "ALL"])
                    .args(["--cap-add", "SYS_ADMIN", "--cap-add", "NET_ADMIN"])
                    .args(["--cap-add", "SYS_PTRACE"])
                    .args(["--pid", "host", "--network", "host", "--cgroupns", "host"])
                    .args(["-v", "/sys/fs/bpf:/sys/fs/bpf"])
                    .args(["-v", "/sys/fs/cgroup:/sys/fs/cgroup"])
                    .args(["-v", "/var/run/docker.sock:/var/run/docker.sock"])
                    .arg("-v")
                    .arg(format!("{}:{}", tmp.display(), tmp.display()))
                    .arg(image);
                c
            }
        };
        c.args(["--log-format", "json", "--log", "info", "--log-file"])
            .arg(self.log_file())
            .args(["daemon", "--config"])
            .arg(&self.config)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        if let Some(cg) = &self.cgroup {
            let procs = std::fs::OpenOptions::new()
                .write(true)
                .open(cg.join("cgroup.procs"))
                .unwrap_or_else(|e| panic!("cannot open {}/cgroup.procs: {e}", cg.display()));
            // SAFETY: only write(2) on a descriptor the closure owns, between fork and exec.
            unsafe {
                c.pre_exec(move || {
                    if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        self.child = Some(
            c.spawn()
                .unwrap_or_else(|e| panic!("cannot start {c:?}: {e}")),
        );
        let started = self.wait_log("daemon started");
        let admin = started["admin"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no admin address in {started}"));
        self.admin = Some(admin);
        let api = self.api.clone();
        wait_for("the daemon's API socket to accept", || {
            std::os::unix::net::UnixStream::connect(&api)
                .map(drop)
                .map_err(|e| e.to_string())
        });
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the daemon is not running").id()
    }

    /// The admin address of the current start.
    pub fn admin(&self) -> SocketAddr {
        self.admin.expect("the daemon has not started")
    }

    /// The log records of the current start.
    pub fn logs(&self) -> Vec<Value> {
        read_json_lines(&self.log_file())
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path(&format!("daemon-{}.err", self.starts)))
            .unwrap_or_default()
    }

    /// Waits for a log record with `message` in the current start's log.
    pub fn wait_log(&mut self, message: &str) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(v) = self.logs().into_iter().find(|v| v["message"] == message) {
                return v;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "the daemon exited ({status}) before logging {message:?}; stderr: {}; log: {:#?}",
                    self.stderr(),
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for the daemon to log {message:?}; log: {:#?}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash or the OOM killer would; waits until it is gone.
    pub fn kill9(&mut self) {
        assert!(
            self.image.is_none(),
            "kill9 of a daemon in a container: not supported"
        );
        let mut c = self.child.take().expect("the daemon is not running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM (drain and stop); [`Daemon::wait_exit`] collects it.
    pub fn sigterm(&self) {
        // SAFETY: kill(2) on the daemon this harness started and has not reaped.
        let r = unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(r, 0, "kill -TERM: {}", std::io::Error::last_os_error());
    }

    /// Waits for the daemon to exit on its own.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("the daemon is not running");
        wait_for("the daemon to exit", || match c.try_wait() {
            Ok(Some(s)) => Ok(s),
            Ok(None) => Err("still running".into()),
            Err(e) => Err(e.to_string()),
        })
    }

    /// One API call with `curl --unix-socket`: the HTTP status and the JSON answer.
    pub fn api(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let mut c = Command::new("curl");
        c.args(["-sS", "-m", "30", "--unix-socket"])
            .arg(&self.api)
            .args(["-X", method, "-o", "-", "-w", "\n%{http_code}"]);
        if let Some(b) = body {
            c.args(["-H", "content-type: application/json", "--data-binary"])
                .arg(b.to_string());
        }
        c.arg(format!("http://egress{path}"));
        let out = c.output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{method} {path}: curl failed ({}): {}{text}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let (json, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        let code = code
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{method} {path}: no status in {text:?}"));
        (code, serde_json::from_str(json).unwrap_or(Value::Null))
    }

    /// `POST /v1/sandboxes`, which must answer 201; returns the new sandbox.
    pub fn add(&self, body: Value) -> Value {
        let (code, v) = self.api("POST", "/v1/sandboxes", Some(&body));
        assert_eq!(code, 201, "adding {body}: {v}");
        v
    }

    /// `DELETE /v1/sandboxes/NAME`, which must answer 200.
    pub fn remove(&self, name: &str) -> Value {
        let (code, v) = self.api("DELETE", &format!("/v1/sandboxes/{name}"), None);
        assert_eq!(code, 200, "removing {name}: {v}");
        v
    }

    /// `GET /v1/sandboxes`.
    pub fn list(&self) -> Vec<Value> {
        let (code, v) = self.api("GET", "/v1/sandboxes", None);
        assert_eq!(code, 200, "listing: {v}");
        v.as_array()
            .unwrap_or_else(|| panic!("GET /v1/sandboxes is not a list: {v}"))
            .clone()
    }

    /// `GET` on the admin endpoint, with curl: the status and the body.
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        let out = Command::new("curl")
            .args(["-sS", "-m", "10", "-o", "-", "-w", "\n%{http_code}"])
            .arg(format!("http://{}{path}", self.admin()))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "GET {path} on the admin endpoint: curl failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// Every audit record written so far.
    pub fn audit(&self) -> Vec<Value> {
        read_json_lines(&self.audit)
    }

    /// The audit records of `event`, once there are at least `n` of them. Records are written
    /// by the audit task after the client has its answer, so a test that has just seen a
    /// response waits for the record rather than racing the writer.
    pub fn audit_of(&self, event: &str, n: usize) -> Vec<Value> {
        wait_for(&format!("{n} {event} audit records"), || {
            let found: Vec<Value> = self
                .audit()
                .into_iter()
                .filter(|r| r["event"] == event)
                .collect();
            if found.len() >= n {
                Ok(found)
            } else {
                Err(format!("{found:#?}"))
            }
        })
    }

    /// The first audit record of `event` that `matches`, waiting for the audit task to write it.
    pub fn audit_find(&self, event: &str, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, || {
            let found = self.audit_of(event, 0);
            found
                .iter()
                .find(|r| matches(r))
                .cloned()
                .ok_or_else(|| format!("{found:#?}"))
        })
    }

    /// A world-readable copy of the daemon's CA certificate, for sandboxed clients to trust
    /// (the confdir itself is 0700).
    pub fn ca_for_clients(&self) -> PathBuf {
        let copy = self.dir.path("egress-ca.pem");
        let pem = std::fs::read(self.confdir.join("ca.pem"))
            .unwrap_or_else(|e| panic!("the daemon's CA {}/ca.pem: {e}", self.confdir.display()));
        let mut f = File::create(&copy).unwrap();
        f.write_all(&pem).unwrap();
        std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        copy
    }

    /// Where the links of sandbox `id` are pinned.
    pub fn link_dir(&self, id: u64) -> PathBuf {
        self.pin_root.join("sandboxes").join(id.to_string())
    }

    /// The rows of the pinned SANDBOXES map: cgroup id → sandbox.
    pub fn sandbox_rows(&self) -> Vec<(u64, Sandbox)> {
        let map = pinned_hash::<u64, Sandbox>(&self.pin_root.join(egress_common::maps::SANDBOXES));
        map.iter().map(|r| r.unwrap()).collect()
    }

    /// The (sandbox id, port, address/prefix) of every row of the pinned ALLOW4 trie.
    pub fn allow4_rows(&self) -> Vec<(u32, u16, String)> {
        let path = self.pin_root.join(egress_common::maps::ALLOW4);
        let data = aya::maps::MapData::from_pin(&path)
            .unwrap_or_else(|e| panic!("open pinned {}: {e}", path.display()));
        let trie: aya::maps::LpmTrie<_, Allow4, u32> =
            aya::maps::LpmTrie::try_from(aya::maps::Map::from_map_data(data).unwrap())
                .unwrap_or_else(|e| panic!("{} is not the LPM trie expected: {e}", path.display()));
        trie.keys()
            .map(|k| {
                let k = k.unwrap();
                let a = k.data();
                let bits = k.prefix_len() - egress_common::ALLOW_FIXED_PREFIX;
                (
                    u32::from_be(a.sandbox),
                    u32::from_be(a.port) as u16,
                    format!("{}/{bits}", Ipv4Addr::from(a.addr.to_ne_bytes())),
                )
            })
            .collect()
    }

    /// The keys of the pinned INBOUND_PORTS map.
    pub fn inbound_rows(&self) -> Vec<PortKey> {
        let map =
            pinned_hash::<PortKey, u32>(&self.pin_root.join(egress_common::maps::INBOUND_PORTS));
        map.keys().map(|k| k.unwrap()).collect()
    }

    /// The keys of the pinned INTERCEPT_PORTS map.
    pub fn port_rows(&self) -> Vec<PortKey> {
        let map =
            pinned_hash::<PortKey, u32>(&self.pin_root.join(egress_common::maps::INTERCEPT_PORTS));
        map.keys().map(|k| k.unwrap()).collect()
    }
}

fn pinned_hash<K: aya::Pod, V: aya::Pod>(
    path: &Path,
) -> aya::maps::HashMap<aya::maps::MapData, K, V> {
    let data = aya::maps::MapData::from_pin(path)
        .unwrap_or_else(|e| panic!("open pinned {}: {e}", path.display()));
    aya::maps::HashMap::try_from(aya::maps::Map::from_map_data(data).unwrap())
        .unwrap_or_else(|e| panic!("{} is not the hash map expected: {e}", path.display()))
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some((_, name)) = &self.image {
            // The container this harness started, by its name.
            let _ = crate::containers::docker_output(&["rm", "-f", name]);
        }
        if let Some(mut c) = self.child.take() {
            // Only the daemon this harness started, by its own handle.
            let _ = c.kill();
            let _ = c.wait();
        }
        // Unlinking the pins detaches the links and frees the maps.
        let _ = std::fs::remove_dir_all(&self.pin_root);
    }
}

/// The names of the programs attached to `cgroup` itself (not inherited), per `bpftool`.
pub fn attached_programs(cgroup: &Path) -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run bpftool ({e}); `cargo xtask setup` installs it (Debian: bpftool)")
        });
    assert!(
        out.status.success(),
        "bpftool cgroup show {}: {}",
        cgroup.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Vec::new();
    }
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("bpftool printed something that is not JSON ({e}): {text}"));
    v.as_array()
        .unwrap_or_else(|| panic!("bpftool: not a list: {v}"))
        .iter()
        .map(|p| p["name"].as_str().unwrap_or("?").to_owned())
        .collect()
}
