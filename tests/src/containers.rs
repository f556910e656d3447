//! Harness for the tests with a real container runtime: Debian's `docker.io` (dockerd,
//! containerd, runc).
//!
//! - [`engine`]: a Docker engine on `/var/run/docker.sock`. When none answers, the first test
//!   starts `dockerd` itself (no default bridge, no iptables rules, nothing outside the
//!   test's own networks) and stops it, by its pid, when the test binary exits.
//! - [`test_image`]: an image built here with no registry: `docker import` of a root
//!   filesystem copied from the host's own files (sh, curl, dig, python3 and its standard
//!   library, and every library `ldd` lists for them). [`Image::with_ca`] bakes a CA into
//!   the system trust store of a copy.
//! - [`Network`]: a bridge network of the test's own on a /24 of 198.19.192.0/18; its
//!   gateway is the host's address on it, where the test's origins and resolver listen.
//! - [`Container`]: `docker run -d`, removed with `docker rm -f` on drop.
//!
//! Everything is removed by `Drop` guards (containers, networks, derived images) or, for what
//! the whole binary shares (the engine it started, the base image), when it exits.
#![allow(unsafe_code)]

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use crate::{require_root, TempDir};

/// The socket the engine listens on, and where `egress daemon` looks by default.
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// The Docker CLI that matches Debian's engine. A newer client elsewhere on PATH may insist
/// on plugins (buildx) this engine's version does not need.
pub fn docker_cli() -> &'static str {
    if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    }
}

/// `docker ARGS`, which must succeed; returns its standard output, trimmed.
pub fn docker(args: &[&str]) -> String {
    let out = docker_output(args);
    assert!(
        out.status.success(),
        "`docker {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `docker ARGS`, whatever it returns.
pub fn docker_output(args: &[&str]) -> Output {
    engine();
    Command::new(docker_cli())
        .args(args)
        .env("DOCKER_BUILDKIT", "0")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", docker_cli()))
}

fn unique() -> usize {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

// ---- the engine ----

/// What this test binary made that outlives any one test, undone when it exits.
#[derive(Default)]
struct Leftovers {
    /// The dockerd this binary started, if it had to.
    dockerd: Option<Child>,
    dockerd_log: Option<PathBuf>,
    images: Vec<String>,
}

static LEFTOVERS: Mutex<Leftovers> = Mutex::new(Leftovers {
    dockerd: None,
    dockerd_log: None,
    images: Vec::new(),
});

fn engine_answers() -> bool {
    Command::new(docker_cli())
        .args(["version", "--format", "{{.Server.Version}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The engine: the one already answering on [`DOCKER_SOCKET`], else a `dockerd` started now.
/// Panics, saying why, when neither works: these tests never pass without a runtime.
pub fn engine() {
    static ENGINE: OnceLock<()> = OnceLock::new();
    ENGINE.get_or_init(|| {
        require_root();
        if engine_answers() {
            return;
        }
        let dockerd = ["/usr/sbin/dockerd", "/usr/bin/dockerd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or_else(|| {
                panic!("no dockerd and no engine on {DOCKER_SOCKET}: `cargo xtask setup` installs docker.io")
            });
        let log = std::env::temp_dir().join(format!("egress-test-dockerd-{}.log", std::process::id()));
        let out = std::fs::File::create(&log).unwrap();
        // No default bridge and no iptables rules: the tests make their own networks and
        // only ever talk to the host's address on them, so the host is left as it was.
        let child = Command::new(dockerd)
            .args([
                "--host",
                &format!("unix://{DOCKER_SOCKET}"),
                "--bridge=none",
                "--iptables=false",
                "--ip-masq=false",
            ])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {dockerd}: {e}"));
        {
            let mut l = LEFTOVERS.lock().unwrap();
            l.dockerd = Some(child);
            l.dockerd_log = Some(log.clone());
        }
        clean_up_at_exit_once();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !engine_answers() {
            let exited = LEFTOVERS.lock().unwrap().dockerd.as_mut().unwrap().try_wait();
            if !matches!(exited, Ok(None)) || Instant::now() > deadline {
                panic!(
                    "dockerd did not come up ({exited:?}); its log {}:\n{}",
                    log.display(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
}

/// Makes sure [`clean_up_at_exit`] runs when the test binary exits.
fn clean_up_at_exit_once() {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    // SAFETY: registers a plain `extern "C"` function with no arguments, as atexit wants.
    REGISTERED.call_once(|| unsafe {
        libc::atexit(clean_up_at_exit);
    });
}

extern "C" fn clean_up_at_exit() {
    let Ok(mut l) = LEFTOVERS.lock() else { return };
    for image in std::mem::take(&mut l.images) {
        let _ = Command::new(docker_cli())
            .args(["rmi", "-f", &image])
            .output();
    }
    if let Some(mut child) = l.dockerd.take() {
        // Only the dockerd this binary started, by its own pid; it stops its containers.
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(log) = l.dockerd_log.take() {
            let _ = std::fs::remove_file(log);
        }
    }
}

// ---- images ----

/// A locally built image.
pub struct Image {
    pub tag: String,
    remove_on_drop: bool,
}

impl Drop for Image {
    fn drop(&mut self) {
        if self.remove_on_drop {
            let _ = docker_output(&["rmi", "-f", &self.tag]);
        }
    }
}

/// The binaries the test image holds, with everything `ldd` says they need.
const IMAGE_BINARIES: &[&str] = &[
    "/bin/sh",
    "/bin/cat",
    "/bin/sleep",
    "/usr/bin/curl",
    "/usr/bin/dig",
    "/usr/bin/python3",
];

/// The test image: sh, cat, sleep, curl, dig and python3 from the host, as `nobody` can run
/// them, with no CA in its trust store. Built once per test binary, removed at its exit.
pub fn test_image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| {
        engine();
        let dir = TempDir::new("image");
        let root = dir.path("root");
        assemble_rootfs(&root);
        let tag = format!("egress-test-base:{}", std::process::id());
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .expect("tar");
        let out = Command::new(docker_cli())
            .args(["import", "-", &tag])
            .stdin(tar.stdout.take().unwrap())
            .output()
            .expect("docker import");
        let tarred = tar.wait().expect("tar");
        assert!(
            tarred.success() && out.status.success(),
            "tar ({tarred}) | docker import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LEFTOVERS.lock().unwrap().images.push(tag.clone());
        clean_up_at_exit_once();
        Image {
            tag,
            remove_on_drop: false,
        }
    })
}

/// egress's own image, built with `deploy/docker/Dockerfile` from the context
/// `cargo xtask test` assembles (`EGRESS_IMAGE_CONTEXT`, as `cargo xtask image` does).
/// Built once per test binary, removed at its exit.
pub fn egress_image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let ctx = std::env::var_os("EGRESS_IMAGE_CONTEXT").unwrap_or_else(|| {
            panic!(
                "EGRESS_IMAGE_CONTEXT is not set: run the container tests through \
                 `cargo xtask test`, which assembles egress's image context"
            )
        });
        let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/docker/Dockerfile");
        let tag = format!("egress-test-egress:{}", std::process::id());
        docker(&[
            "build",
            "-q",
            "-t",
            &tag,
            "-f",
            dockerfile.to_str().unwrap(),
            Path::new(&ctx).to_str().unwrap(),
        ]);
        LEFTOVERS.lock().unwrap().images.push(tag.clone());
        clean_up_at_exit_once();
        tag
    })
}

impl Image {
    /// A copy of this image whose system trust store (`/etc/ssl/certs/ca-certificates.crt`,
    /// where curl, OpenSSL and Python look by default) holds `ca_pem`: the CA "baked into
    /// the image". Built with `docker build` from this local image, so no registry is asked.
    pub fn with_ca(&self, ca_pem: &Path) -> Image {
        let dir = TempDir::new("image-ca");
        std::fs::copy(ca_pem, dir.path("egress-ca.pem")).unwrap();
        std::fs::write(
            dir.path("Dockerfile"),
            format!(
                "FROM {}\nCOPY egress-ca.pem /etc/ssl/certs/ca-certificates.crt\n",
                self.tag
            ),
        )
        .unwrap();
        let tag = format!("egress-test-ca:{}-{}", std::process::id(), unique());
        docker(&["build", "-q", "-t", &tag, dir.0.to_str().unwrap()]);
        Image {
            tag,
            remove_on_drop: true,
        }
    }
}

/// Copies the binaries, their libraries, Python's standard library and a minimal `/etc`
/// into `root`.
fn assemble_rootfs(root: &Path) {
    let python = std::fs::canonicalize("/usr/bin/python3").expect("/usr/bin/python3");
    let python_version = python.file_name().unwrap().to_str().unwrap().to_owned();
    let stdlib = Path::new("/usr/lib").join(&python_version);
    let mut objects: Vec<PathBuf> = IMAGE_BINARIES.iter().map(PathBuf::from).collect();
    objects.push(python.clone());
    for e in std::fs::read_dir(stdlib.join("lib-dynload"))
        .unwrap()
        .flatten()
    {
        objects.push(e.path());
    }
    let mut files: Vec<PathBuf> = IMAGE_BINARIES.iter().map(PathBuf::from).collect();
    files.push(python.clone());
    files.extend(ldd(&objects));
    for f in &files {
        copy_into(root, f);
    }
    // Python finds its standard library next to its own name.
    let link = root.join("usr/bin/python3");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&python_version, &link).unwrap();
    copy_tree(&stdlib, &root.join(stdlib.strip_prefix("/").unwrap()));
    let etc = root.join("etc");
    std::fs::create_dir_all(etc.join("ssl/certs")).unwrap();
    std::fs::write(
        etc.join("passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(etc.join("group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    std::fs::write(etc.join("nsswitch.conf"), "hosts: files dns\n").unwrap();
    let tmp = root.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
}

/// Every library `ldd` lists for `objects`, and the dynamic loader.
fn ldd(objects: &[PathBuf]) -> Vec<PathBuf> {
    let out = Command::new("ldd").args(objects).output().expect("ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs: Vec<PathBuf> = text
        .lines()
        .filter(|l| l.starts_with('\t'))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let first = words.next()?;
            match words.next() {
                Some("=>") => words.next().filter(|p| p.starts_with('/')),
                _ => Some(first).filter(|p| p.starts_with('/')),
            }
        })
        .map(PathBuf::from)
        .collect();
    libs.push("/lib64/ld-linux-x86-64.so.2".into());
    libs.sort();
    libs.dedup();
    libs
}

/// Copies `file` (following links) to the same path under `root`.
fn copy_into(root: &Path, file: &Path) {
    let dst = root.join(file.strip_prefix("/").unwrap());
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    std::fs::copy(file, &dst)
        .unwrap_or_else(|e| panic!("copy {} into the image: {e}", file.display()));
}

/// Copies a directory tree, leaving out the test suite and byte-code caches.
fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        let name = e.file_name();
        if name == "test" || name == "__pycache__" {
            continue;
        }
        let (from, to) = (e.path(), dst.join(&name));
        let t = e.file_type().unwrap();
        if t.is_dir() {
            copy_tree(&from, &to);
        } else if t.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from).unwrap(), &to).unwrap();
        } else {
            std::fs::copy(&from, &to).unwrap();
        }
    }
}

// ---- networks ----

/// A bridge network of the test's own. Its gateway is the host's address on the bridge:
/// the containers reach the host's listeners there, and nothing else.
pub struct Network {
    pub name: String,
    pub gateway: Ipv4Addr,
}

impl Network {
    /// A /24 of 198.19.192.0/18, placed by pid and count so concurrent tests differ.
    pub fn create() -> Network {
        engine();
        let n = unique();
        let third = 192 + (std::process::id() as usize * 4 + n) % 64;
        let name = format!("egress-test-{}-{n}", std::process::id());
        let gateway = Ipv4Addr::new(198, 19, third as u8, 1);
        docker(&[
            "network",
            "create",
            "--driver",
            "bridge",
            "--subnet",
            &format!("198.19.{third}.0/24"),
            "--gateway",
            &gateway.to_string(),
            &name,
        ]);
        Network { name, gateway }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = docker_output(&["network", "rm", &self.name]);
    }
}

// ---- containers ----

/// A container this test started (`docker run -d`); `docker rm -f` on drop.
pub struct Container {
    pub id: String,
    pub name: String,
}

impl Container {
    /// `docker run -d --name <unique> ARGS…` (ARGS: options, the image, its command).
    pub fn run(tag: &str, args: &[&str]) -> Container {
        let name = format!("egress-test-{}-{tag}-{}", std::process::id(), unique());
        let id = docker(&[&["run", "-d", "--name", &name][..], args].concat());
        Container { id, name }
    }

    /// The host pid of its first process.
    pub fn pid(&self) -> u32 {
        let pid = docker(&["inspect", "-f", "{{.State.Pid}}", &self.id]);
        pid.parse()
            .unwrap_or_else(|_| panic!("container {}: State.Pid {pid:?}", self.name))
    }

    /// Its cgroup, relative to the cgroup2 root, from its first process's `/proc/PID/cgroup`.
    pub fn cgroup(&self) -> String {
        let text = std::fs::read_to_string(format!("/proc/{}/cgroup", self.pid())).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("0::/"))
            .unwrap_or_else(|| panic!("container {}: no cgroup2 line in {text}", self.name))
            .to_owned()
    }

    /// Its address on `net`.
    pub fn ip(&self, net: &Network) -> Ipv4Addr {
        let ip = docker(&[
            "inspect",
            "-f",
            &format!(
                "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
                net.name
            ),
            &self.id,
        ]);
        ip.parse().unwrap_or_else(|_| {
            panic!(
                "container {} has no address on {}: {ip:?}",
                self.name, net.name
            )
        })
    }

    /// `docker exec CONTAINER ARGV…` to completion.
    pub fn exec(&self, argv: &[&str]) -> Output {
        docker_output(&[&["exec", &self.id][..], argv].concat())
    }

    /// `docker exec -d`: started in the container and left running.
    pub fn exec_detached(&self, argv: &[&str]) {
        docker(&[&["exec", "-d", &self.id][..], argv].concat());
    }

    /// Whether the engine still knows it.
    pub fn exists(&self) -> bool {
        docker_output(&["inspect", &self.id]).status.success()
    }

    /// `docker rm -f`, now.
    pub fn remove(&self) {
        docker(&["rm", "-f", &self.id]);
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker_output(&["rm", "-f", &self.id]);
    }
}

/// Removes `<parent>` from every cgroup v1 hierarchy (read from `/proc/mounts`), where the
/// engine made it for a container run with `--cgroup-parent`: on a hybrid host it makes one
/// per v1 controller besides the one in the unified hierarchy. Call once its containers are
/// gone.
pub fn remove_v1_parents(parent: &str) {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 2 && f[2] == "cgroup" {
            let _ = std::fs::remove_dir(Path::new(f[1]).join(parent));
        }
    }
}
