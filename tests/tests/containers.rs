//! Docker containers under `egress daemon`, with a real container runtime (Debian's
//! `docker.io`: dockerd, containerd, runc) and the real kernel.
//!
//! Each test has its own bridge network; the host's address on it (the gateway) holds the
//! test's HTTPS origin (443), a plain TCP server (8080) and the resolver the containers'
//! embedded DNS forwards to (53). Containers run a locally built image as `nobody`. The
//! harness (`egress_tests::containers`) starts dockerd when none runs and removes everything
//! the tests made. Every test name starts with `containers`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    process::Command,
};

use egress_tests::{
    containers::{docker_output, egress_image, remove_v1_parents, test_image, Container, Network},
    daemon::{wait_for, Cgroup, Daemon, DaemonSpec},
    dns::StubResolver,
    egress_bin,
    origin::{Origin, OriginCa},
    TempDir, Upstream,
};
use serde_json::{json, Value};

const ALLOWED: &str = "allowed.test";
const DENIED: &str = "denied.test";
const POLICY: &str = "[sandbox.agent]\nallow = [\"allowed.test\"]\n";

/// Where a container finds the daemon's CA when it is bind-mounted, and the variables that
/// point clients at it: the ones `egress run` sets.
const CA_IN_CONTAINER: &str = "/etc/egress/ca.pem";
const CA_ENV_VARS: &[&str] = &[
    "SSL_CERT_FILE",
    "CURL_CA_BUNDLE",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "PIP_CERT",
    "GIT_SSL_CAINFO",
];

/// The host side of one test's network: an HTTPS origin for both names, a plain server on
/// 8080 and the resolver behind the containers' embedded DNS, all on the gateway.
struct Host {
    ca: OriginCa,
    origin: Origin,
    other: Upstream,
    stub: StubResolver,
    // Last: the listeners above stop by connecting to the gateway, which goes with it.
    net: Network,
}

impl Host {
    fn new() -> Host {
        let net = Network::create();
        let gw = net.gateway;
        let stub = StubResolver::start_on(
            SocketAddr::new(gw.into(), 53),
            &[(ALLOWED, gw.into()), (DENIED, gw.into())],
        );
        let ca = OriginCa::new();
        let origin = ca.origin(gw, &[ALLOWED, DENIED]);
        let other = Upstream::start(&format!("{gw}:8080"));
        Host {
            ca,
            origin,
            other,
            stub,
            net,
        }
    }

    fn gw(&self) -> Ipv4Addr {
        self.net.gateway
    }

    /// `docker run` options for a container on this network, as `nobody`, whose resolver
    /// (Docker's embedded DNS) forwards to the test's.
    fn run_args(&self) -> Vec<String> {
        vec![
            "--network".into(),
            self.net.name.clone(),
            "--dns".into(),
            self.gw().to_string(),
            "--user".into(),
            "65534:65534".into(),
        ]
    }

    fn daemon(&self, policy: &str, extra: &str) -> Daemon {
        Daemon::start(DaemonSpec {
            policy: policy.into(),
            daemon: vec![self.ca.daemon_line()],
            sandboxes: extra.into(),
            ..Default::default()
        })
    }
}

/// `-v DIR:/etc/egress:ro` and `-e VAR=/etc/egress/ca.pem` for every CA variable: the CA
/// bind-mounted at run time.
fn ca_mount_args(dir: &Path) -> Vec<String> {
    let mut args = vec![
        "-v".to_owned(),
        format!(
            "{}:{}:ro",
            dir.display(),
            Path::new(CA_IN_CONTAINER).parent().unwrap().display()
        ),
    ];
    for var in CA_ENV_VARS {
        args.push("-e".into());
        args.push(format!("{var}={CA_IN_CONTAINER}"));
    }
    args
}

/// A world-readable directory holding the daemon's CA as `ca.pem`, for bind mounts.
fn ca_dir(d: &Daemon) -> TempDir {
    let dir = TempDir::new("ca-mount");
    std::fs::copy(d.ca_for_clients(), dir.path("ca.pem")).unwrap();
    set_mode(&dir.0, 0o755);
    set_mode(&dir.path("ca.pem"), 0o644);
    dir
}

fn set_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
}

fn run(image: &str, tag: &str, opts: &[String], cmd: &[&str]) -> Container {
    let mut args: Vec<&str> = opts.iter().map(String::as_str).collect();
    args.push(image);
    args.extend_from_slice(cmd);
    Container::run(tag, &args)
}

/// What curl in the container got: the HTTP status (0 without an HTTP answer), the body and
/// curl's stderr.
#[derive(Debug)]
struct Fetched {
    status: u16,
    body: String,
    stderr: String,
}

/// `curl https://HOST/PATH` in the container, trusting what the container trusts; with
/// `resolve`, HOST is pinned to that address instead of asking DNS.
fn curl(c: &Container, host: &str, resolve: Option<Ipv4Addr>, path: &str) -> Fetched {
    let pin = resolve.map(|ip| format!("{host}:443:{ip}"));
    let mut argv = vec!["curl", "-sS", "-m", "20", "-o", "-", "-w", "\n%{http_code}"];
    if let Some(p) = &pin {
        argv.extend(["--resolve", p]);
    }
    let url = format!("https://{host}{path}");
    argv.push(&url);
    let out = c.exec(&argv);
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Fetched {
        status: code.trim().parse().unwrap_or(0),
        body: body.to_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Python that connects to ADDR PORT… in turn and prints, per port, `PORT ok` or
/// `PORT ERRNO-NAME`.
const CONNECT: &str = r#"
import errno, socket, sys
for port in sys.argv[2:]:
    s = socket.socket()
    s.settimeout(10)
    try:
        s.connect((sys.argv[1], int(port)))
        print(port, "ok", flush=True)
    except OSError as e:
        print(port, errno.errorcode.get(e.errno, str(e)), flush=True)
    finally:
        s.close()
"#;

/// Connects from the container to `ip:port` and returns `ok` or the errno's name.
fn connect(c: &Container, ip: Ipv4Addr, port: u16) -> String {
    let out = c.exec(&["python3", "-c", CONNECT, &ip.to_string(), &port.to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .unwrap_or_else(|| {
            panic!(
                "connect to {ip}:{port} printed nothing: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_owned()
}

/// `dig NAME A` in the container, through its own resolv.conf (Docker's 127.0.0.11): the
/// status and the addresses, or `("no answer", [])`.
fn dig(c: &Container, name: &str) -> (String, Vec<String>) {
    let out = c.exec(&[
        "dig",
        "+tries=1",
        "+time=3",
        "+noall",
        "+comments",
        "+answer",
        name,
        "A",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let Some(status) = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
    else {
        return ("no answer".into(), Vec::new());
    };
    let answers = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
        .collect();
    (status.to_owned(), answers)
}

/// `egress sandbox add/remove/list …` against this daemon's API; the exit code and stdout.
fn cli(d: &Daemon, args: &[&str]) -> (i32, String) {
    let out = Command::new(egress_bin())
        .args(args)
        .arg("--api")
        .arg(&d.api)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn listed(d: &Daemon, name: &str) -> Option<Value> {
    d.list().into_iter().find(|s| s["name"] == name)
}

/// Waits until the daemon lists sandbox `name` as active, and returns it.
fn wait_active(d: &Daemon, name: &str) -> Value {
    wait_for(&format!("sandbox {name} to be active"), || {
        listed(d, name)
            .filter(|s| s["state"] == "active")
            .ok_or_else(|| format!("{:?}", d.list()))
    })
}

#[test]
fn containers_enrolled_with_docker_are_captured_and_audited() {
    let host = Host::new();
    let gw = host.gw();
    let d = host.daemon(POLICY, "");
    let ca = ca_dir(&d);
    let mut opts = host.run_args();
    opts.extend(ca_mount_args(&ca.0));
    let c = run(&test_image().tag, "enrolled", &opts, &["sleep", "600"]);
    let c_ip = c.ip(&host.net);

    // Before enrolment the container reaches the host directly: what follows is egress's.
    assert_eq!(connect(&c, gw, 8080), "ok", "before enrolment");
    let reached = host.other.wait_accepted(1);

    let (code, out) = cli(
        &d,
        &[
            "sandbox", "add", "agent-1", "--docker", &c.name, "--policy", "agent",
        ],
    );
    assert_eq!(code, 0, "egress sandbox add --docker: {out}");
    let info = listed(&d, "agent-1").unwrap_or_else(|| panic!("not listed: {:?}", d.list()));
    assert_eq!(info["state"], "active", "{info}");
    assert_eq!(info["source"], "api", "{info}");
    assert!(
        info["cgroup"].as_str().unwrap().ends_with(&c.cgroup()),
        "the container's cgroup {}: {info}",
        c.cgroup()
    );

    // HTTPS to an allowed name, resolved through the container's own resolver, through the
    // MITM with the bind-mounted CA; the upstream leaves from the container's netns.
    let ok = curl(&c, ALLOWED, None, "/hello");
    assert_eq!(
        (ok.status, ok.body.as_str()),
        (200, "hello from allowed.test"),
        "curl said: {}",
        ok.stderr
    );
    let seen = host.origin.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].peer.ip(),
        IpAddr::V4(c_ip),
        "the upstream connection must leave from the container's netns: {seen:?}"
    );
    // A denied host: 403 from egress, nothing at the origin.
    let denied = curl(&c, DENIED, Some(gw), "/hello");
    assert_eq!(denied.status, 403, "{denied:?}");
    assert_eq!(host.origin.request_count(), 1);
    // Another port: refused in the kernel.
    assert_eq!(connect(&c, gw, 8080), "EPERM");
    assert_eq!(host.other.accepted(), reached, "8080 was reached");

    // DNS to the container's resolver is filtered: the denied name never leaves egress.
    let (status, answers) = dig(&c, DENIED);
    assert_eq!(
        (status.as_str(), answers.len()),
        ("NXDOMAIN", 0),
        "{answers:?}"
    );
    assert!(
        !host.stub.saw(DENIED),
        "a denied name reached the resolver: {:?}",
        host.stub.queries()
    );
    let (status, answers) = dig(&c, ALLOWED);
    assert_eq!(
        (status.as_str(), answers),
        ("NOERROR", vec![gw.to_string()])
    );

    // Python (urllib trusts SSL_CERT_FILE) stays alive after its request, so that the
    // audited pid can be checked against the container's cgroup.
    c.exec_detached(&[
        "python3",
        "-c",
        "import urllib.request, time\n\
         urllib.request.urlopen('https://allowed.test/status/200').read()\n\
         time.sleep(300)",
    ]);
    let rec = d.audit_find("request", "the audit record of python's request", |r| {
        r["path"] == "/status/200"
    });
    assert_eq!(rec["sandbox"], "agent-1", "{rec:#}");
    assert_eq!(rec["decision"], "allow", "{rec:#}");
    assert_eq!(rec["comm"], "python3", "{rec:#}");
    let pid = rec["pid"].as_u64().unwrap();
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cg.contains(&c.id),
        "audited pid {pid} is not in the container: {cg}"
    );
    for (host_name, decision, comm) in [(ALLOWED, "allow", "curl"), (DENIED, "deny", "curl")] {
        d.audit_find(
            "request",
            &format!("the {decision} record of {host_name}"),
            |r| {
                r["host"] == host_name
                    && r["decision"] == decision
                    && r["sandbox"] == "agent-1"
                    && r["comm"] == comm
                    && r["pid"].as_u64().is_some_and(|p| p > 1)
            },
        );
    }
    // dig sends from its worker thread, whose comm is `isc-net-NNNN`.
    d.audit_find("dns", "the dns deny record of dig", |r| {
        r["sandbox"] == "agent-1"
            && r["decision"] == "deny"
            && r["name"].as_str().is_some_and(|n| n.starts_with(DENIED))
            && r["comm"]
                .as_str()
                .is_some_and(|c| c == "dig" || c.starts_with("isc-net"))
    });

    // Removed through the CLI: the container is no longer captured.
    let (code, out) = cli(&d, &["sandbox", "remove", "agent-1"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(connect(&c, gw, 8080), "ok", "after removal");
}

/// The sandbox ids, cgroup rows, port rows and ALLOW4 rows the daemon's pinned maps hold.
fn kernel_rows(d: &Daemon) -> (usize, usize, usize) {
    (
        d.sandbox_rows().len(),
        d.port_rows().len(),
        d.allow4_rows().len(),
    )
}

#[test]
fn containers_labelled_are_enrolled_by_the_watcher_and_leave_nothing_once_removed() {
    let host = Host::new();
    let gw = host.gw();
    // The containers mount this directory from their start; the CA lands in it once the
    // daemon has made one.
    let ca = TempDir::new("ca-mount");
    set_mode(&ca.0, 0o755);
    let mut opts = host.run_args();
    opts.extend(ca_mount_args(&ca.0));
    opts.extend(["--label".into(), "egress.policy=agent".into()]);
    // One container runs before the daemon starts (found by the first listing), one starts
    // after (found on the event stream).
    let early = run(&test_image().tag, "early", &opts, &["sleep", "600"]);
    let d = host.daemon(POLICY, "[docker]\nwatch = true\n");
    std::fs::copy(d.ca_for_clients(), ca.path("ca.pem")).unwrap();
    set_mode(&ca.path("ca.pem"), 0o644);
    let late = run(&test_image().tag, "late", &opts, &["sleep", "600"]);

    let mut ids = Vec::new();
    for c in [&early, &late] {
        let info = wait_active(&d, &c.name);
        assert_eq!(info["source"], "docker", "{info}");
        assert_eq!(info["policy"], "agent", "{info}");
        ids.push(info["id"].as_u64().unwrap());

        let ok = curl(c, ALLOWED, None, "/hello");
        assert_eq!(ok.status, 200, "{}: {ok:?}", c.name);
        let denied = curl(c, DENIED, Some(gw), "/hello");
        assert_eq!(denied.status, 403, "{}: {denied:?}", c.name);
        assert_eq!(connect(c, gw, 8080), "EPERM", "{}", c.name);
    }
    assert_eq!(host.other.accepted(), 0);
    let (rows, ports, allows) = kernel_rows(&d);
    assert_eq!(rows, 2, "one SANDBOXES row per container");
    assert!(
        ports > 0 && allows == 0,
        "{ports} port rows, {allows} ALLOW4 rows"
    );
    for id in &ids {
        assert!(d.link_dir(*id).exists(), "links of sandbox {id} are pinned");
    }

    // `docker rm -f` (die, destroy): the daemon lets go, and nothing of either remains.
    early.remove();
    late.remove();
    wait_for("both sandboxes to be removed", || {
        let left = d.list();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    });
    assert_eq!(kernel_rows(&d), (0, 0, 0), "rows left in the pinned maps");
    for id in &ids {
        assert!(
            !d.link_dir(*id).exists(),
            "links of sandbox {id} are still pinned at {}",
            d.link_dir(*id).display()
        );
    }
    let state = std::fs::read_to_string(d.confdir.join("daemon-state.json")).unwrap();
    let state: Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["sandboxes"], json!([]), "{state:#}");
}

/// Removes the engine's `--cgroup-parent` directories from the cgroup v1 hierarchies; declared
/// after the parent cgroup and before the containers, so it runs once they are gone.
struct V1Parents(String);

impl Drop for V1Parents {
    fn drop(&mut self) {
        remove_v1_parents(&self.0);
    }
}

#[test]
fn containers_under_a_deny_all_cgroup_parent_are_refused_from_their_first_connect() {
    let host = Host::new();
    let gw = host.gw();
    let parent = Cgroup::new("agents");
    let _v1 = V1Parents(parent.rel().to_owned());
    let policy = format!("{POLICY}\n[sandbox.deny-all]\n");
    let d = host.daemon(
        &policy,
        &format!(
            "[docker]\nwatch = true\n\n\
             [[sandbox]]\nname = \"agents\"\ncgroup = \"{}\"\npolicy = \"deny-all\"\n",
            parent.rel()
        ),
    );
    assert_eq!(d.admin_get("/readyz").0, 200, "the parent is held");
    let mut opts = host.run_args();
    opts.extend(["--cgroup-parent".into(), format!("/{}", parent.rel())]);

    // Not enrolled at all: its very first instruction connects, and is refused.
    let mut args: Vec<&str> = vec!["run", "--rm"];
    args.extend(opts.iter().map(String::as_str));
    let gw_s = gw.to_string();
    args.extend([
        test_image().tag.as_str(),
        "python3",
        "-c",
        CONNECT,
        &gw_s,
        "8080",
        "443",
        "80",
    ]);
    let out = docker_output(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        ["8080 EPERM", "443 ECONNREFUSED", "80 ECONNREFUSED"],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(host.other.accepted(), 0);
    assert_eq!(host.origin.request_count(), 0);
    assert!(host.origin.tls_failures().is_empty());

    // Labelled, with the CA baked into its image: enrolled below the parent, and served.
    let baked = test_image().with_ca(&d.ca_for_clients());
    opts.extend(["--label".into(), "egress.policy=agent".into()]);
    let c = run(&baked.tag, "labelled", &opts, &["sleep", "600"]);
    assert!(
        c.cgroup().starts_with(&format!("{}/", parent.rel())),
        "{} is not below {}",
        c.cgroup(),
        parent.rel()
    );
    wait_active(&d, &c.name);
    let ok = curl(&c, ALLOWED, None, "/hello");
    assert_eq!(
        ok.status, 200,
        "with the CA from the image's trust store: {ok:?}"
    );
    let denied = curl(&c, DENIED, Some(gw), "/hello");
    assert_eq!(denied.status, 403, "{denied:?}");
    assert_eq!(connect(&c, gw, 8080), "EPERM");
    assert_eq!(host.other.accepted(), 0);
}

#[test]
fn containers_stay_closed_while_the_daemon_is_down_and_a_restart_readopts_them() {
    let host = Host::new();
    let gw = host.gw();
    let mut d = host.daemon(POLICY, "");
    let baked = test_image().with_ca(&d.ca_for_clients());
    let c = run(&baked.tag, "survivor", &host.run_args(), &["sleep", "600"]);
    let id = d.add(json!({"name": "survivor", "docker": c.name, "policy": "agent"}))["id"]
        .as_u64()
        .unwrap();
    assert_eq!(curl(&c, ALLOWED, None, "/hello").status, 200);

    d.kill9();
    let (served, reached, asked) = (
        host.origin.request_count(),
        host.other.accepted(),
        host.stub.queries().len(),
    );
    let down = curl(&c, ALLOWED, Some(gw), "/hello");
    assert_eq!(down.status, 0, "answered with no daemon: {down:?}");
    assert_eq!(connect(&c, gw, 443), "ECONNREFUSED");
    assert_eq!(connect(&c, gw, 8080), "EPERM");
    assert_eq!(dig(&c, ALLOWED).0, "no answer");
    assert_eq!(
        (
            host.origin.request_count(),
            host.other.accepted(),
            host.stub.queries().len()
        ),
        (served, reached, asked),
        "something left the container while the daemon was down"
    );

    d.spawn();
    let info = wait_active(&d, "survivor");
    assert_eq!(info["id"].as_u64(), Some(id), "{info}");
    assert_eq!(info["adopted"], true, "{info}");
    assert_eq!(curl(&c, ALLOWED, None, "/hello").status, 200);
    assert_eq!(dig(&c, ALLOWED), ("NOERROR".into(), vec![gw.to_string()]));
    assert_eq!(connect(&c, gw, 8080), "EPERM");
}

#[test]
fn containers_egress_run_from_its_own_image_enrols_a_labelled_container() {
    let host = Host::new();
    let gw = host.gw();
    // The daemon in a container of egress's image, started as deploy/docker/compose.yaml
    // starts it (privileged; the host's pids, network and cgroups; bpffs and the Docker
    // socket mounted).
    let d = Daemon::start(DaemonSpec {
        policy: POLICY.into(),
        daemon: vec![host.ca.daemon_line()],
        sandboxes: "[docker]\nwatch = true\n".into(),
        image: Some(egress_image().into()),
        ..Default::default()
    });
    let baked = test_image().with_ca(&d.ca_for_clients());
    let mut opts = host.run_args();
    opts.extend(["--label".into(), "egress.policy=agent".into()]);
    let c = run(&baked.tag, "agent", &opts, &["sleep", "600"]);
    wait_active(&d, &c.name);
    let ok = curl(&c, ALLOWED, None, "/hello");
    assert_eq!(
        (ok.status, ok.body.as_str()),
        (200, "hello from allowed.test"),
        "{ok:?}"
    );
    assert_eq!(curl(&c, DENIED, Some(gw), "/hello").status, 403);
    assert_eq!(connect(&c, gw, 8080), "EPERM");
    assert_eq!(host.other.accepted(), 0);
    assert_eq!(
        host.origin.requests()[0].peer.ip(),
        IpAddr::V4(c.ip(&host.net)),
        "the upstream connection must leave from the agent's netns"
    );
    d.audit_find("request", "the audit record of curl's request", |r| {
        r["sandbox"] == c.name.as_str() && r["comm"] == "curl" && r["status"] == 200
    });
}
