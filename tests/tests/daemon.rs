//! `egress daemon` end to end: one daemon governing several sandboxes (a cgroup each, most
//! in a network namespace of their own with a veth to the host), real clients inside them,
//! origins on the host side of the veths, and the operator's side: the API over its unix
//! socket, `/readyz` and `/metrics`, kill -9 and restart, `egress daemon check`.
//!
//! Every test owns its cgroups, namespaces, veths (a /30 of 198.18.0.0/15 each), ports and
//! pin directory (see `egress_tests::daemon`), so the tests run in parallel. Every test name
//! starts with `daemon` so that `cargo xtask test daemon` selects them.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::Command,
};

use egress_tests::{
    daemon::{run_in, Cgroup, Daemon, DaemonSpec, Netns},
    dns::StubResolver,
    egress_bin,
    origin::{Origin, TestCa},
    TempDir,
};
use serde_json::{json, Value};

const PY: &str = "/usr/bin/python3";
const DIG: &str = "/usr/bin/dig";

fn need(bin: &str) {
    assert!(
        Path::new(bin).exists(),
        "{bin} is required by this test and missing; `cargo xtask setup` installs it"
    );
}

/// The test CA the origins' leaves come from, written where the daemon reads it
/// (`upstream_ca`).
struct OriginCa {
    ca: TestCa,
    file: PathBuf,
    _dir: TempDir,
}

impl OriginCa {
    fn new() -> Self {
        let dir = TempDir::new("origin-ca");
        let ca = TestCa::new("egress daemon tests origin CA");
        let file = dir.path("origin-ca.pem");
        ca.write_pem(&file);
        OriginCa {
            ca,
            file,
            _dir: dir,
        }
    }

    /// The `[daemon]` line that makes egress trust the origins.
    fn daemon_line(&self) -> String {
        format!("upstream_ca = [\"{}\"]", self.file.display())
    }

    /// An HTTPS origin on `ip:443` with a leaf for `names`.
    fn origin(&self, ip: Ipv4Addr, names: &[&str]) -> Origin {
        Origin::start(&format!("{ip}:443"), Some(self.ca.leaf(names)))
    }
}

/// What a sandboxed curl got: the HTTP status (0 when there was no HTTP answer), the body,
/// and curl's stderr.
#[derive(Debug)]
struct Fetched {
    status: u16,
    body: String,
    stderr: String,
}

/// `curl https://HOST/PATH` inside the sandbox, with HOST resolved to `ip` by curl itself and
/// the daemon's CA (`egress_ca`) as the only trust anchor.
fn curl_https(
    cg: &Cgroup,
    ns: Option<&Netns>,
    egress_ca: &Path,
    host: &str,
    ip: Ipv4Addr,
    path: &str,
) -> Fetched {
    let out = run_in(
        cg,
        ns,
        &[
            "curl",
            "-sS",
            "-m",
            "20",
            "--cacert",
            egress_ca.to_str().unwrap(),
            "--resolve",
            &format!("{host}:443:{ip}"),
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            &format!("https://{host}{path}"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Fetched {
        status: code.trim().parse().unwrap_or(0),
        body: body.to_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `dig @server NAME A` inside the sandbox: the status (`NOERROR`, `NXDOMAIN`, …) and the
/// addresses answered.
fn dig(cg: &Cgroup, ns: &Netns, server: Ipv4Addr, name: &str) -> (String, Vec<String>) {
    let out = run_in(
        cg,
        Some(ns),
        &[
            DIG,
            "+tries=1",
            "+time=5",
            "+noall",
            "+comments",
            "+answer",
            &format!("@{server}"),
            name,
            "A",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| {
            panic!(
                "dig {name} in {} printed no status: {text}{}",
                cg.rel(),
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_owned();
    let answers = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
        .collect();
    (status, answers)
}

/// The audit records of one kind (`request`, `dns`, `kernel_deny`, …).
fn audit_of(d: &Daemon, event: &str) -> Vec<Value> {
    d.audit()
        .into_iter()
        .filter(|r| r["event"] == event)
        .collect()
}

// 1. One daemon, two sandboxes, two policies: each sandbox's requests and DNS queries are
//    judged by its own policy, audited under its own name, and leave from its own netns.
#[test]
fn daemon_serves_two_sandboxes_each_under_its_own_policy() {
    need(DIG);
    let (cg_a, cg_b) = (Cgroup::new("a"), Cgroup::new("b"));
    let (ns_a, ns_b) = (Netns::with_veth(), Netns::with_veth());
    // One resolver for the node, on A's host side; B reaches it through its own veth.
    let stub = StubResolver::start_at(
        IpAddr::V4(ns_a.host_ip),
        &[
            ("a-only.test", ns_a.host_ip.into()),
            ("b-only.test", ns_b.host_ip.into()),
        ],
    );
    ns_b.route_to(ns_a.host_ip);
    let ca = OriginCa::new();
    let names = ["a-only.test", "b-only.test"];
    let origin_a = ca.origin(ns_a.host_ip, &names);
    let origin_b = ca.origin(ns_b.host_ip, &names);
    let d = Daemon::start(DaemonSpec {
        policy: "[sandbox.only-a]\nallow = [\"a-only.test\"]\n\n\
                 [sandbox.only-b]\nallow = [\"b-only.test\"]\n"
            .into(),
        daemon: vec![
            ca.daemon_line(),
            format!("dns_upstreams = [\"{}\"]", stub.addr()),
        ],
        ..Default::default()
    });
    for (name, cg, ns) in [("a", &cg_a, &ns_a), ("b", &cg_b, &ns_b)] {
        let added = d.add(json!({
            "name": name,
            "cgroup": cg.rel(),
            "policy": format!("only-{name}"),
            "netns": ns.path,
        }));
        assert_eq!(added["state"], "active", "{added}");
        assert_eq!(added["cgroup"], cg.path().to_str().unwrap(), "{added}");
    }
    let egress_ca = d.ca_for_clients();

    // HTTPS: the same two URLs from each sandbox; each allows only its own host.
    for (me, cg, ns, mine, theirs) in [
        ("a", &cg_a, &ns_a, "a-only.test", "b-only.test"),
        ("b", &cg_b, &ns_b, "b-only.test", "a-only.test"),
    ] {
        let ok = curl_https(cg, Some(ns), &egress_ca, mine, ns.host_ip, "/hello");
        assert_eq!(
            (ok.status, ok.body.as_str()),
            (200, format!("hello from {mine}").as_str()),
            "sandbox {me} fetching its allowed host {mine}; curl said: {}",
            ok.stderr
        );
        let denied = curl_https(cg, Some(ns), &egress_ca, theirs, ns.host_ip, "/hello");
        assert_eq!(
            denied.status, 403,
            "sandbox {me} fetching {theirs}, which only the other sandbox may reach: {denied:?}"
        );
    }
    // Each origin saw exactly the one allowed request, from its sandbox's own address: the
    // upstream connection was made inside the sandbox's namespace.
    for (origin, host, ns) in [
        (&origin_a, "a-only.test", &ns_a),
        (&origin_b, "b-only.test", &ns_b),
    ] {
        let seen = origin.requests();
        assert_eq!(seen.len(), 1, "origin on {}: {seen:?}", origin.addr());
        assert_eq!(seen[0].host, host, "{seen:?}");
        assert_eq!(
            seen[0].peer.ip(),
            IpAddr::V4(ns.sandbox_ip),
            "the upstream connection must leave from the sandbox's netns: {seen:?}"
        );
    }
    // Audited under the sandbox that made the request.
    let requests = audit_of(&d, "request");
    for (sandbox, host, decision, status) in [
        ("a", "a-only.test", "allow", 200),
        ("a", "b-only.test", "deny", 403),
        ("b", "b-only.test", "allow", 200),
        ("b", "a-only.test", "deny", 403),
    ] {
        let found: Vec<&Value> = requests
            .iter()
            .filter(|r| r["sandbox"] == sandbox && r["host"] == host)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "one audit record of sandbox {sandbox} for {host}: {requests:#?}"
        );
        assert_eq!(found[0]["decision"], decision, "{:#}", found[0]);
        assert_eq!(found[0]["status"], status, "{:#}", found[0]);
        assert_eq!(found[0]["comm"], "curl", "{:#}", found[0]);
    }
    assert_eq!(requests.len(), 4, "{requests:#?}");

    // DNS: each sandbox's policy decides which names resolve. The denied names are asked
    // first, so the stub having seen neither proves no denied query left egress.
    for (cg, ns, theirs) in [(&cg_a, &ns_a, "b-only.test"), (&cg_b, &ns_b, "a-only.test")] {
        let (status, answers) = dig(cg, ns, ns.host_ip, theirs);
        assert_eq!(
            (status.as_str(), answers.len()),
            ("NXDOMAIN", 0),
            "{theirs} from {}: {answers:?}",
            cg.rel()
        );
    }
    assert!(
        stub.queries().is_empty(),
        "denied names reached the upstream resolver: {:?}",
        stub.queries()
    );
    for (cg, ns, mine, want) in [
        (&cg_a, &ns_a, "a-only.test", ns_a.host_ip),
        (&cg_b, &ns_b, "b-only.test", ns_b.host_ip),
    ] {
        let (status, answers) = dig(cg, ns, ns.host_ip, mine);
        assert_eq!(status, "NOERROR", "{mine} from {}: {answers:?}", cg.rel());
        assert_eq!(answers, vec![want.to_string()], "{mine} from {}", cg.rel());
        assert!(
            stub.saw(mine),
            "{mine} was answered without asking upstream"
        );
    }
    // getaddrinfo through the system resolver (whatever resolv.conf names) lands there too.
    let out = run_in(
        &cg_a,
        Some(&ns_a),
        &[
            PY,
            "-c",
            "import socket; print(socket.getaddrinfo('a-only.test', 443, socket.AF_INET)[0][4][0])",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        ns_a.host_ip.to_string(),
        "getaddrinfo in sandbox a: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dns = audit_of(&d, "dns");
    for (sandbox, name, decision) in [
        ("a", "b-only.test", "deny"),
        ("b", "a-only.test", "deny"),
        ("a", "a-only.test", "allow"),
        ("b", "b-only.test", "allow"),
    ] {
        assert!(
            dns.iter().any(|r| r["sandbox"] == sandbox
                && r["name"].as_str().map(|n| n.trim_end_matches('.')) == Some(name)
                && r["decision"] == decision),
            "no dns audit record ({sandbox}, {name}, {decision}): {dns:#?}"
        );
    }
}

// 7. `egress daemon check`: a good config passes; a bad one is named by file, line and
//    column, with exit code 64.
#[test]
fn daemon_check_passes_a_good_config_and_locates_errors() {
    let dir = TempDir::new("daemon-check");
    let policy = dir.path("policy.toml");
    std::fs::write(&policy, "[sandbox.agent]\nallow = [\"example.com\"]\n").unwrap();
    let check = |name: &str, text: &str| {
        let path = dir.path(name);
        std::fs::write(&path, text).unwrap();
        let out = Command::new(egress_bin())
            .args(["daemon", "check"])
            .arg(&path)
            .output()
            .unwrap();
        (
            path.display().to_string(),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let daemon = format!("[daemon]\npolicy = \"{}\"\n", policy.display());

    let (path, code, stdout, stderr) = check(
        "good.toml",
        &format!(
            "{daemon}\n[[sandbox]]\nname = \"a\"\ncgroup = \"agents/a\"\npolicy = \"agent\"\n"
        ),
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.starts_with(&format!("{path}: ok: 1 static sandbox(es) (a)")),
        "{stdout}"
    );

    for (name, text, want) in [
        (
            "admin.toml",
            format!("{daemon}admin = \"localhost\"\n"),
            ":3:9: daemon.admin: \"localhost\" is not IP:PORT".to_owned(),
        ),
        (
            "unknown-key.toml",
            format!("{daemon}\n[[sandbox]]\nname = \"a\"\ncgroup = \"a\"\ncolour = \"red\"\n"),
            ":7:1: sandbox[0].colour: unknown field".to_owned(),
        ),
        (
            "duration.toml",
            format!("{daemon}drain_timeout = \"soon\"\n"),
            ":3:17: daemon.drain_timeout:".to_owned(),
        ),
    ] {
        let (path, code, stdout, stderr) = check(name, &text);
        assert_eq!(code, Some(64), "{name}: {stdout}{stderr}");
        assert!(
            stderr.contains(&format!("{path}{want}")),
            "{name}: want {path}{want}, got: {stderr}"
        );
    }

    // A policy name the policy file does not define.
    let (_, code, _, stderr) = check(
        "no-such-policy.toml",
        &format!("{daemon}\n[[sandbox]]\nname = \"a\"\ncgroup = \"a\"\npolicy = \"nope\"\n"),
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("sandbox \"a\"") && stderr.contains("\"nope\"") && stderr.contains("agent"),
        "{stderr}"
    );
    // An error inside the policy file is located in the policy file.
    let bad_policy = dir.path("bad-policy.toml");
    std::fs::write(&bad_policy, "[sandbox.agent]\nallow = [\"exa mple.com\"]\n").unwrap();
    let (_, code, _, stderr) = check(
        "bad-policy-ref.toml",
        &format!("[daemon]\npolicy = \"{}\"\n", bad_policy.display()),
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:2:", bad_policy.display())),
        "the policy file's own line: {stderr}"
    );
}
