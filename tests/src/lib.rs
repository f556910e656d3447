//! Harness for the privileged end-to-end tests: the real `egress` binary loads the real
//! programs into the running kernel, and real clients run inside its sandboxes.
//!
//! Every test fails loudly when it cannot run (no root, no binary); nothing returns early
//! looking green. Skipping is only possible through `EGRESS_SKIP_PRIVILEGED=1` in
//! `cargo xtask test`, which says so in capitals.
#![allow(unsafe_code)]

pub mod containers;
pub mod daemon;
pub mod dns;
pub mod origin;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;

/// The `egress` binary under test, built by `cargo xtask test` with its eBPF object.
pub fn egress_bin() -> PathBuf {
    let p = std::env::var_os("EGRESS_BIN").unwrap_or_else(|| {
        panic!(
            "EGRESS_BIN is not set: run the privileged tests through `cargo xtask test`, which \
             builds egress with its eBPF object"
        )
    });
    PathBuf::from(p)
}

/// The sandboxed test client, built next to this test binary.
pub fn testclient() -> PathBuf {
    let bin = egress_bin();
    let p = bin.with_file_name("egress-testclient");
    assert!(
        p.is_file(),
        "{} is missing; `cargo xtask test` builds it",
        p.display()
    );
    p
}

/// Panics unless the process can load BPF programs: these tests are the proof that the
/// capture works, so they never skip themselves.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the privileged end-to-end tests need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN); \
         run `sudo cargo xtask test`, or set EGRESS_SKIP_PRIVILEGED=1 to skip them knowingly"
    );
}

/// The cgroup2 mount, from mountinfo (never assumed).
pub fn cgroup2_root() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let dash = f.iter().position(|x| *x == "-")?;
            (f.get(dash + 1) == Some(&"cgroup2")).then(|| PathBuf::from(f[4]))
        })
        .expect("no cgroup2 mount on this host")
}

/// Every new `egress run` garbage-collects dead runs first, which (correctly) kills the
/// sandbox a SIGKILL test leaves behind on purpose. That test holds this lock while its
/// orphan is alive; [`Egress::spawn`] waits for it, so no egress starts meanwhile.
pub static NO_NEW_EGRESS: Mutex<()> = Mutex::new(());

/// A unique scratch directory, world-readable so that the sandbox user can see flag files.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "egress-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        Self(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `egress` process, logging JSON to a file the test reads.
pub struct Egress {
    child: Option<Child>,
    log: PathBuf,
    _dir: TempDir,
    stdout: Arc<Mutex<String>>,
    stdout_thread: Option<JoinHandle<()>>,
    stderr: Arc<Mutex<String>>,
    stderr_thread: Option<JoinHandle<()>>,
}

/// What an `egress` process left behind once it exited.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub logs: Vec<Value>,
    /// The audit log (JSON lines) egress wrote to its default place in the confdir.
    pub audit: Vec<Value>,
}

impl Finished {
    /// The first JSON object printed by the sandboxed test client.
    pub fn client_json(&self) -> Value {
        self.stdout
            .lines()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
            .unwrap_or_else(|| panic!("no JSON from the test client; {self:#?}"))
    }

    /// Audit records of one kind (`request`, `connection`, `kernel_deny`).
    pub fn audit_of(&self, event: &str) -> Vec<&Value> {
        self.audit.iter().filter(|v| v["event"] == event).collect()
    }

    pub fn log_with(&self, message: &str) -> Vec<&Value> {
        self.logs
            .iter()
            .filter(|v| v["message"] == message)
            .collect()
    }
}

impl Egress {
    /// `egress --log-format json --log-file F run ARGS -- CMD`.
    pub fn run(run_args: &[&str], cmd: &[&str]) -> Self {
        Self::spawn(&["run"], run_args, cmd)
    }

    pub fn spawn(sub: &[&str], run_args: &[&str], cmd: &[&str]) -> Self {
        require_root();
        drop(NO_NEW_EGRESS.lock().unwrap_or_else(|p| p.into_inner()));
        let dir = TempDir::new("egress");
        let log = dir.path("egress.log");
        let mut c = Command::new(egress_bin());
        // A CA of its own per process, unless the test names a --confdir.
        c.env("EGRESS_CONFDIR", dir.path("conf"));
        c.args(["--log-format", "json", "--log", "debug", "--log-file"])
            .arg(&log)
            .args(sub)
            .args(["--user", "nobody"])
            .args(run_args)
            .arg("--")
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {c:?}: {e}"));
        let (stdout, stdout_thread) = collect(child.stdout.take().unwrap());
        let (stderr, stderr_thread) = collect(child.stderr.take().unwrap());
        Self {
            child: Some(child),
            log,
            _dir: dir,
            stdout,
            stdout_thread: Some(stdout_thread),
            stderr,
            stderr_thread: Some(stderr_thread),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn logs(&self) -> Vec<Value> {
        read_json_lines(&self.log)
    }

    /// Waits until a log line with this message shows up, and returns it.
    pub fn wait_log(&mut self, message: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = self.logs().into_iter().find(|v| v["message"] == message) {
                return v;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "egress exited ({status}) before logging {message:?}; stderr: {}; log: {:#?}",
                    self.stderr.lock().unwrap(),
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for log {message:?}: {:#?}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the sandboxed command has printed a line on stdout.
    pub fn wait_stdout_line(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(l) = self.stdout.lock().unwrap().lines().next() {
                return l.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no output from the sandboxed command"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The sandbox's `sandbox ready` record: cgroup, pin_dir, listeners.
    pub fn ready(&mut self) -> Value {
        self.wait_log("sandbox ready")
    }

    /// Waits for egress to exit (60 s at most) and collects everything.
    pub fn finish(mut self) -> Finished {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("egress did not exit within 60 s; log: {:#?}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.stdout_thread.take().unwrap().join().unwrap();
        self.stderr_thread.take().unwrap().join().unwrap();
        let stdout = self.stdout.lock().unwrap().clone();
        let stderr = self.stderr.lock().unwrap().clone();
        let audit = read_json_lines(&self._dir.path("conf").join("audit.jsonl"));
        Finished {
            status,
            stdout,
            stderr,
            logs: self.logs(),
            audit,
        }
    }

    /// SIGKILL egress itself, leaving the sandbox behind as a crash would.
    pub fn kill9(&mut self) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        child.kill().unwrap();
        child.wait().unwrap()
    }
}

impl Drop for Egress {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Only the process this test started, by its own handle.
            let _ = c.kill();
            let _ = c.wait();
            gc();
        }
    }
}

/// `egress gc`: removes the cgroups and pins of dead runs (for example a killed test's).
pub fn gc() -> std::process::Output {
    Command::new(egress_bin())
        .arg("gc")
        .output()
        .expect("egress gc")
}

fn collect(mut r: impl std::io::Read + Send + 'static) -> (Arc<Mutex<String>>, JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    let t = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => b
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk[..n])),
            }
        }
    });
    (buf, t)
}

pub fn read_json_lines(p: &Path) -> Vec<Value> {
    let Ok(f) = std::fs::File::open(p) else {
        return Vec::new();
    };
    BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect()
}

/// A loopback HTTP/1.x origin that answers every request with `hello from ADDR` and counts
/// connections and peers. Stops on drop.
pub struct Upstream {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    pub accepted: Arc<AtomicUsize>,
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    pub fn start(addr: &str) -> Self {
        let listener =
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind upstream {addr}: {e}"));
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (s, a, p) = (stop.clone(), accepted.clone(), peers.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                a.fetch_add(1, Ordering::SeqCst);
                if let Ok(peer) = conn.peer_addr() {
                    p.lock().unwrap().push(peer);
                }
                std::thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let body = format!("hello from {addr}");
                    let _ = write!(
                        conn,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                });
            }
        });
        Self {
            addr,
            stop,
            accepted,
            peers,
            thread: Some(thread),
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The accepted count once it reaches `n`. A client's connect() returns when the kernel
    /// has queued the connection, before this listener's thread has accepted and counted it.
    pub fn wait_accepted(&self, n: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.accepted() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.accepted()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Number of entries in a pinned hash map of a live run.
pub fn pinned_map_len<K: aya::Pod, V: aya::Pod>(path: &Path) -> usize {
    let data = aya::maps::MapData::from_pin(path)
        .unwrap_or_else(|e| panic!("open pinned {}: {e}", path.display()));
    let map = aya::maps::Map::from_map_data(data).unwrap();
    let map: aya::maps::HashMap<_, K, V> = aya::maps::HashMap::try_from(map).unwrap();
    map.keys().count()
}

/// Sum over CPUs of one slot of the pinned per-CPU counter array.
pub fn pinned_counter(path: &Path, slot: egress_common::Counter) -> u64 {
    let data = aya::maps::MapData::from_pin(path)
        .unwrap_or_else(|e| panic!("open pinned {}: {e}", path.display()));
    let map = aya::maps::Map::from_map_data(data).unwrap();
    let arr: aya::maps::PerCpuArray<_, u64> = aya::maps::PerCpuArray::try_from(map).unwrap();
    arr.get(&(slot as u32), 0).unwrap().iter().sum()
}

/// Creates `path` (a flag file the sandboxed client waits for) with `contents`.
pub fn touch(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
