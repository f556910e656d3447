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

use egress_common::Counter;
use egress_tests::{
    daemon::{
        attached_programs, run_in, wait_for, Background, Cgroup, Daemon, DaemonSpec, Netns, NOBODY,
    },
    dns::StubResolver,
    egress_bin,
    origin::{Origin, OriginCa},
    pinned_counter, testclient, touch, TempDir, Upstream,
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
    let requests = d.audit_of("request", 4);
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
    for (sandbox, name, decision) in [
        ("a", "b-only.test", "deny"),
        ("b", "a-only.test", "deny"),
        ("a", "a-only.test", "allow"),
        ("b", "b-only.test", "allow"),
    ] {
        d.audit_find(
            "dns",
            &format!("the dns audit record ({sandbox}, {name}, {decision})"),
            |r| {
                r["sandbox"] == sandbox
                    && r["name"].as_str().map(|n| n.trim_end_matches('.')) == Some(name)
                    && r["decision"] == decision
            },
        );
    }
}

/// Waits until `file` holds at least `n` lines, and returns them.
fn wait_lines(file: &Path, n: usize) -> Vec<String> {
    wait_for(&format!("{n} lines in {}", file.display()), || {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.len() >= n {
            Ok(lines)
        } else {
            Err(format!(
                "{lines:?}; stderr: {}",
                std::fs::read_to_string(file.with_extension("err")).unwrap_or_default()
            ))
        }
    })
}

// 2. A parent registered deny-all catches a child cgroup created afterwards from its first
//    connect; registering the child with its own policy takes effect from its next request,
//    and removing it hands the child back to the parent.
#[test]
fn daemon_parent_deny_all_holds_a_new_child_until_the_child_is_registered() {
    let parent = Cgroup::new("parent");
    let ns = Netns::with_veth();
    let ca = OriginCa::new();
    let origin = ca.origin(ns.host_ip, &["origin.test"]);
    // Something listens on a port the kernel must refuse, so only the hook can stop it.
    let side = Upstream::start(&ns.host(8080).to_string());
    let d = Daemon::start(DaemonSpec {
        policy: "[sandbox.deny-all]\n\n[sandbox.child]\nallow = [\"origin.test\"]\n".into(),
        daemon: vec![ca.daemon_line()],
        ..Default::default()
    });
    d.add(json!({
        "name": "parent",
        "cgroup": parent.rel(),
        "policy": "deny-all",
        "netns": ns.path,
    }));
    // Made after the parent was registered, and never registered itself (yet).
    let child = parent.child("child");
    let egress_ca = d.ca_for_clients();
    let go = d.path("go");
    let again = d.path("again");
    let out = d.path("child.out");
    let url = "https://origin.test/hello";
    let curl = format!(
        "curl -sS -m 20 --cacert {} --resolve origin.test:443:{} -o /dev/null -w '%{{http_code}}\\n' {url}",
        egress_ca.display(),
        ns.host_ip
    );
    // One process, started in the child: its first connect, then a request; then (once the
    // child is registered) another request; then (once it is removed) another.
    let script = format!(
        "{tc} connect-err {side}; {curl}; \
         while [ ! -e {go} ]; do sleep 0.02; done; {curl}; {tc} connect-err {side}; \
         while [ ! -e {again} ]; do sleep 0.02; done; {curl}",
        tc = testclient().display(),
        side = ns.host(8080),
        go = go.display(),
        again = again.display(),
    );
    let shell = Background::start(&child, Some(&ns), &["sh", "-c", &script], &out);
    let lines = wait_lines(&out, 2);
    let first: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(
        first["errno"],
        libc::EPERM,
        "the child's very first connect must be refused by the parent's programs: {first}"
    );
    assert_eq!(
        lines[1], "403",
        "the parent's deny-all policy applies to the child"
    );

    let added = d.add(json!({
        "name": "child",
        "cgroup": child.rel(),
        "policy": "child",
        "netns": ns.path,
    }));
    assert_eq!(added["cgroup"], child.path().to_str().unwrap(), "{added}");
    touch(&go, "");
    let lines = wait_lines(&out, 4);
    assert_eq!(
        lines[2], "200",
        "the same process's next request is under the child's own policy"
    );
    let after: Value = serde_json::from_str(&lines[3]).unwrap();
    assert_eq!(
        after["errno"],
        libc::EPERM,
        "the child's policy opens no TCP port: {after}"
    );

    d.remove("child");
    touch(&again, "");
    let lines = wait_lines(&out, 5);
    assert_eq!(lines[4], "403", "removed, the child is the parent's again");
    assert!(shell.wait().success(), "the sandboxed shell failed");

    assert_eq!(side.accepted(), 0, "a refused connect reached the listener");
    let seen = origin.requests();
    assert_eq!(
        seen.len(),
        1,
        "only the allowed request reaches the origin: {seen:?}"
    );
    assert_eq!(seen[0].peer.ip(), IpAddr::V4(ns.sandbox_ip), "{seen:?}");
    let decisions: Vec<(String, String)> = d
        .audit_of("request", 3)
        .iter()
        .map(|r| {
            (
                r["sandbox"].as_str().unwrap_or("?").to_owned(),
                r["decision"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect();
    let want = [("parent", "deny"), ("child", "allow"), ("parent", "deny")]
        .map(|(s, d)| (s.to_owned(), d.to_owned()));
    assert_eq!(
        decisions, want,
        "requests audited under the deepest registered sandbox"
    );
    // Kernel refusals reach the audit through a ring buffer: give the reader a moment.
    for sandbox in ["parent", "child"] {
        wait_for(&format!("the kernel_deny record of {sandbox}"), || {
            let denies = d.audit_of("kernel_deny", 0);
            denies
                .iter()
                .any(|r| r["sandbox"] == sandbox && r["dst"] == ns.host(8080).to_string())
                .then_some(())
                .ok_or_else(|| format!("{denies:#?}"))
        });
    }
}

/// A keep-alive HTTPS client for load: WORKERS threads, each sending `GET /hello` to
/// https://origin.test (at IP:443) over one connection for 50 requests, then a new one,
/// until the STOP file exists; then one JSON line with the counts and the first errors. It
/// trusts only the egress CA, so a request that bypassed the proxy would fail.
const LOAD_CLIENT: &str = r#"
import http.client, json, os, socket, ssl, sys, threading, time
ip, stop, ca, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ctx = ssl.create_default_context(cafile=ca)
class Conn(http.client.HTTPSConnection):
    def connect(self):
        sock = socket.create_connection((ip, 443), self.timeout)
        self.sock = ctx.wrap_socket(sock, server_hostname='origin.test')
lock = threading.Lock()
stats = {'ok': 0, 'failed': 0, 'connections': 0, 'errors': []}
def work():
    conn, used = None, 0
    while not os.path.exists(stop):
        try:
            if conn is None:
                conn, used = Conn('origin.test', 443, timeout=10, context=ctx), 0
                with lock:
                    stats['connections'] += 1
            conn.request('GET', '/hello')
            r = conn.getresponse()
            body = r.read()
            with lock:
                if r.status == 200 and body == b'hello from origin.test':
                    stats['ok'] += 1
                else:
                    stats['failed'] += 1
                    stats['errors'].append('%d %r' % (r.status, body[:200]))
            used += 1
            if used >= 50 or r.will_close:
                conn.close()
                conn = None
        except Exception as e:
            with lock:
                stats['failed'] += 1
                stats['errors'].append(repr(e))
            if conn is not None:
                conn.close()
            conn = None
t0 = time.monotonic()
threads = [threading.Thread(target=work) for _ in range(workers)]
for t in threads:
    t.start()
for t in threads:
    t.join()
stats['seconds'] = time.monotonic() - t0
stats['errors'] = stats['errors'][:20]
print(json.dumps(stats), flush=True)
"#;

/// Waits until `up` has accepted `n` connections (its accept loop runs on its own thread,
/// a little after the client's connect returned), then checks that it is exactly `n`.
fn wait_accepted(up: &Upstream, n: usize, what: &str) {
    assert_eq!(up.wait_accepted(n), n, "{what}");
}

/// What `egress-testclient connect-err ADDR` says from inside a sandbox.
fn connect_err(cg: &Cgroup, ns: Option<&Netns>, addr: &str) -> Value {
    let tc = testclient();
    let out = run_in(cg, ns, &[tc.to_str().unwrap(), "connect-err", addr]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "testclient connect-err {addr}: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

// 3. Sandbox B is added and removed 20 times while sandbox A is under steady load, every
//    other time in A's own netns (sharing its listeners, as the containers of a pod do): A
//    loses no request, and every removal leaves nothing of B in the kernel.
#[test]
fn daemon_adds_and_removes_a_sandbox_under_load_without_disturbing_another() {
    need(PY);
    let (cg_a, cg_b) = (Cgroup::new("loaded"), Cgroup::new("churned"));
    let (ns_a, ns_b) = (Netns::with_veth(), Netns::with_veth());
    let ca = OriginCa::new();
    let origin = ca.origin(ns_a.host_ip, &["origin.test"]);
    let side_a = Upstream::start(&ns_a.host(8080).to_string());
    let side_b = Upstream::start(&ns_b.host(8080).to_string());
    let d = Daemon::start(DaemonSpec {
        policy: "[sandbox.a]\nallow = [\"origin.test\"]\n\n[sandbox.b]\n".into(),
        daemon: vec![ca.daemon_line()],
        ..Default::default()
    });
    let a = d.add(json!({"name": "a", "cgroup": cg_a.rel(), "netns": ns_a.path}));
    let egress_ca = d.ca_for_clients();
    let stop = d.path("stop");
    let out = d.path("load.out");
    let load = Background::start(
        &cg_a,
        Some(&ns_a),
        &[
            PY,
            "-c",
            LOAD_CLIENT,
            &ns_a.host_ip.to_string(),
            stop.to_str().unwrap(),
            egress_ca.to_str().unwrap(),
            "2",
        ],
        &out,
    );
    wait_for("the load in sandbox a to get going", || {
        let n = origin.request_count();
        if n >= 100 {
            Ok(())
        } else {
            Err(format!(
                "{n} requests; client stderr: {}",
                std::fs::read_to_string(out.with_extension("err")).unwrap_or_default()
            ))
        }
    });
    let started = std::time::Instant::now();
    let during = origin.request_count();
    let mut ids = Vec::new();
    for round in 0..20 {
        let before = origin.request_count();
        let ns = if round % 2 == 0 { &ns_b } else { &ns_a };
        let b_side = ns.host(8080).to_string();
        let b = d.add(json!({"name": "b", "cgroup": cg_b.rel(), "netns": ns.path}));
        let id = b["id"].as_u64().unwrap_or_else(|| panic!("no id: {b}"));
        ids.push(id);
        let programs = attached_programs(cg_b.path());
        assert!(
            programs.iter().any(|p| p == "egress_connect4"),
            "round {round}: B registered, yet its cgroup has {programs:?}"
        );
        let refused = connect_err(&cg_b, Some(ns), &b_side);
        assert_eq!(
            refused["errno"],
            libc::EPERM,
            "round {round}: B registered: {refused}"
        );

        d.remove("b");
        let programs = attached_programs(cg_b.path());
        assert!(
            programs.is_empty(),
            "round {round}: B removed, yet {programs:?} stay attached"
        );
        assert!(
            !d.link_dir(id).exists(),
            "round {round}: the link pins of B (id {id}) outlived it"
        );
        let rows = d.sandbox_rows();
        assert!(
            rows.iter()
                .all(|(cg, s)| *cg != cg_b.id() && u64::from(s.id) != id),
            "round {round}: a SANDBOXES row of B (id {id}) outlived it: {rows:?}"
        );
        let ports = d.port_rows();
        assert!(
            ports.iter().all(|k| u64::from(k.sandbox) != id),
            "round {round}: INTERCEPT_PORTS rows of B (id {id}) outlived it: {ports:?}"
        );
        let open = connect_err(&cg_b, Some(ns), &b_side);
        assert_eq!(
            open["ok"], true,
            "round {round}: B removed, its cgroup is not captured any more: {open}"
        );
        // The load kept flowing through this round.
        wait_for(&format!("round {round}: requests from sandbox a"), || {
            let n = origin.request_count();
            if n > before {
                Ok(())
            } else {
                Err(format!("{n} requests"))
            }
        });
    }
    let churn = origin.request_count() - during;
    let churn_secs = started.elapsed().as_secs_f64();
    touch(&stop, "");
    assert!(
        load.wait().success(),
        "the load client failed: {}",
        std::fs::read_to_string(out.with_extension("err")).unwrap_or_default()
    );
    let stats: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap())
        .unwrap_or_else(|e| panic!("load client output: {e}"));
    eprintln!(
        "sandbox a under load: {stats}; {churn} requests in {churn_secs:.1} s of add/remove ({:.0}/s)",
        churn as f64 / churn_secs
    );
    assert_eq!(
        stats["failed"], 0,
        "requests of sandbox a failed while b came and went: {stats}"
    );
    assert_eq!(
        stats["ok"].as_u64(),
        Some(origin.request_count() as u64),
        "every request the client counted reached the origin: {stats}"
    );
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "a new id for every registration, never reused: {ids:?}"
    );
    for side in [&side_a, &side_b] {
        wait_accepted(
            side,
            10,
            "B reached its listener exactly when not registered",
        );
    }
    // A is intact: its row, its ports, its programs.
    let a_id = a["id"].as_u64().unwrap();
    assert!(d
        .sandbox_rows()
        .iter()
        .any(|(cg, s)| *cg == cg_a.id() && u64::from(s.id) == a_id));
    assert_eq!(
        d.port_rows()
            .iter()
            .filter(|k| u64::from(k.sandbox) == a_id)
            .count(),
        2,
        "A's intercepted ports (80, 443)"
    );
    assert!(!attached_programs(cg_a.path()).is_empty());
    let list = d.list();
    assert_eq!(list.len(), 1, "{list:#?}");
    let ok = stats["ok"].as_u64().unwrap_or(0) as usize;
    let audited = wait_for("an audit record for every request of sandbox a", || {
        let n = d
            .audit_of("request", 0)
            .iter()
            .filter(|r| r["sandbox"] == "a" && r["decision"] == "allow")
            .count();
        if n >= ok {
            Ok(n)
        } else {
            Err(format!("{n} of {ok}"))
        }
    });
    assert_eq!(
        Some(audited as u64),
        stats["ok"].as_u64(),
        "one audit record per request of sandbox a"
    );
    assert_eq!(
        list[0]["counters"]["requests"]["allow"], stats["ok"],
        "{:#}",
        list[0]
    );
}

/// Tries HOST:80 (a plain HTTP request, Host: origin.test) then HOST:8080 (a bare connect),
/// over and over until the STOP file exists; one JSON line per attempt: port, ok, errno.
const CONNECT_LOOP: &str = r#"
import json, os, socket, sys, time
host, stop = sys.argv[1], sys.argv[2]
while not os.path.exists(stop):
    for port in (80, 8080):
        rec = {'port': port, 'ok': False}
        try:
            s = socket.create_connection((host, port), timeout=5)
            try:
                if port == 80:
                    s.sendall(b'GET / HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n\r\n')
                    data = b''
                    while True:
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    rec['ok'] = data.startswith(b'HTTP/1.1 200') and b'hello from' in data
                    rec['head'] = data[:60].decode('latin-1')
                else:
                    rec['ok'] = True
            finally:
                s.close()
        except OSError as e:
            rec['errno'] = e.errno
            rec['error'] = str(e)
        print(json.dumps(rec), flush=True)
    time.sleep(0.01)
"#;

fn attempts(file: &Path) -> Vec<Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits until `file` holds at least `n` attempts on each port after the first `skip`.
fn wait_attempts(file: &Path, skip: usize, n: usize) -> Vec<Value> {
    wait_for(
        &format!("{n} attempts on each port after the first {skip}"),
        || {
            let all = attempts(file);
            let tail = all.get(skip..).unwrap_or_default().to_vec();
            let on = |p: u16| tail.iter().filter(|r| r["port"] == p).count();
            if on(80) >= n && on(8080) >= n {
                Ok(tail)
            } else {
                Err(format!("{} attempts in all: {:?}", all.len(), all.last()))
            }
        },
    )
}

/// The value of one sample line (`NAME VALUE` or `NAME{…} VALUE`) of a `/metrics` scrape.
fn scraped(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

// 4. kill -9 of the daemon leaves its sandbox closed (intercepted ports refused, others
//    EPERM, nothing reaches the origins); a restart with the same config takes the sandbox
//    back without a new `add`, and the pinned kernel counters keep counting.
#[test]
fn daemon_killed_leaves_sandboxes_closed_and_a_restart_takes_them_back() {
    need(PY);
    need(DIG);
    let cg = Cgroup::new("survivor");
    let ns = Netns::with_veth();
    let up80 = Upstream::start(&ns.host(80).to_string());
    let up8080 = Upstream::start(&ns.host(8080).to_string());
    let stub = StubResolver::start_at(
        IpAddr::V4(ns.host_ip),
        &[("origin.test", ns.host_ip.into())],
    );
    let mut d = Daemon::start(DaemonSpec {
        policy: "[sandbox.s]\nallow = [\"origin.test\"]\n".into(),
        daemon: vec![format!("dns_upstreams = [\"{}\"]", stub.addr())],
        ..Default::default()
    });
    let id = d.add(json!({"name": "s", "cgroup": cg.rel(), "netns": ns.path}))["id"]
        .as_u64()
        .unwrap();
    let stop = d.path("stop");
    let out = d.path("attempts.out");
    let client = Background::start(
        &cg,
        Some(&ns),
        &[
            PY,
            "-c",
            CONNECT_LOOP,
            &ns.host_ip.to_string(),
            stop.to_str().unwrap(),
        ],
        &out,
    );
    // Served: port 80 through the proxy, 8080 refused by the kernel.
    let up = wait_attempts(&out, 0, 3);
    assert!(
        up.iter().all(|r| if r["port"] == 80 {
            r["ok"] == true
        } else {
            r["errno"] == libc::EPERM
        }),
        "with the daemon up: {up:#?}"
    );
    let counters = d.pin_root.join(egress_common::maps::COUNTERS);
    let redirected_up = pinned_counter(&counters, Counter::Redirected);

    d.kill9();
    let killed_at = attempts(&out).len();
    // At most one attempt was under way at the kill; every later one started without a
    // daemon.
    let skip = killed_at + 1;
    wait_attempts(&out, skip, 5);
    let reached = (up80.accepted(), up8080.accepted());
    let down = wait_attempts(&out, skip, 30);
    assert_eq!(
        (up80.accepted(), up8080.accepted()),
        reached,
        "connections reached the origins while the daemon was down"
    );
    assert_eq!(up8080.accepted(), 0, "port 8080 was never allowed");
    for r in &down {
        let want = if r["port"] == 80 {
            libc::ECONNREFUSED
        } else {
            libc::EPERM
        };
        assert!(
            r["ok"] == false && r["errno"] == want,
            "with the daemon down, every attempt must fail with errno {want}: {r}"
        );
    }
    let redirected_down = pinned_counter(&counters, Counter::Redirected);
    assert!(
        redirected_down > redirected_up,
        "the pinned programs kept redirecting port 80 while the daemon was down \
         ({redirected_up} then {redirected_down})"
    );
    assert!(d.link_dir(id).exists(), "the link pins outlive the daemon");
    assert!(
        !attached_programs(cg.path()).is_empty(),
        "programs stay attached"
    );
    // DNS too: the query lands on a closed port in the sandbox's netns, never upstream.
    let out_dns = run_in(
        &cg,
        Some(&ns),
        &[
            DIG,
            "+tries=1",
            "+time=2",
            &format!("@{}", ns.host_ip),
            "origin.test",
            "A",
        ],
    );
    let text = String::from_utf8_lossy(&out_dns.stdout);
    assert!(
        !text.contains("status:"),
        "a DNS answer with no daemon: {text}"
    );
    assert!(
        stub.queries().is_empty(),
        "a query reached the resolver: {:?}",
        stub.queries()
    );

    // Same config, no `add`: the sandbox is taken back.
    d.spawn();
    let registered = d.wait_log("sandbox registered");
    assert!(
        registered["adopted_links"].as_u64() > Some(0),
        "the pinned links are taken over: {registered}"
    );
    let list = d.list();
    assert_eq!(list.len(), 1, "{list:#?}");
    assert_eq!(
        (
            &list[0]["name"],
            &list[0]["state"],
            list[0]["id"].as_u64(),
            &list[0]["adopted"]
        ),
        (&json!("s"), &json!("active"), Some(id), &json!(true)),
        "{:#}",
        list[0]
    );
    wait_for("/readyz to answer 200 after the restart", || {
        let (code, body) = d.admin_get("/readyz");
        (code == 200).then_some(()).ok_or(format!("{code} {body}"))
    });
    let back_at = attempts(&out).len();
    wait_for("a request through the restarted daemon", || {
        let all = attempts(&out);
        all.get(back_at..)
            .unwrap_or_default()
            .iter()
            .any(|r| r["port"] == 80 && r["ok"] == true)
            .then_some(())
            .ok_or(format!("{:?}", all.last()))
    });
    assert!(up80.accepted() > reached.0, "the origin is reached again");
    assert_eq!(
        dig(&cg, &ns, ns.host_ip, "origin.test"),
        ("NOERROR".to_owned(), vec![ns.host_ip.to_string()]),
        "DNS is served again in the sandbox's netns"
    );
    assert_eq!(up8080.accepted(), 0, "port 8080 was never allowed");
    let redirected_back = pinned_counter(&counters, Counter::Redirected);
    assert!(
        redirected_back > redirected_down,
        "the counter kept counting across the restart ({redirected_down} then {redirected_back})"
    );
    let (code, metrics) = d.admin_get("/metrics");
    assert_eq!(code, 200, "{metrics}");
    let exported = scraped(&metrics, "egress_kernel_redirected_total")
        .unwrap_or_else(|| panic!("no egress_kernel_redirected_total in {metrics}"));
    assert!(
        exported >= redirected_down as f64,
        "/metrics reads the pinned counter, not a fresh one: {exported} < {redirected_down}"
    );
    touch(&stop, "");
    assert!(client.wait().success(), "the sandboxed loop failed");
    d.audit_find(
        "request",
        "requests after the restart audited under the sandbox's name",
        |r| r["sandbox"] == "s" && r["decision"] == "allow",
    );
}

/// Parses an OpenMetrics text (stdin) with prometheus_client's own parser, which rejects
/// what a Prometheus scrape would; prints `{family: {type, samples: [[name, labels, value]]}}`.
const PARSE_METRICS: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    out[fam.name] = {'type': fam.type, 'samples': [[s.name, s.labels, s.value] for s in fam.samples]}
print(json.dumps(out))
"#;

/// A `/metrics` scrape as parsed by `prometheus_client`.
struct Metrics(Value);

impl Metrics {
    fn scrape(d: &Daemon) -> Metrics {
        let (code, text) = d.admin_get("/metrics");
        assert_eq!(code, 200, "/metrics: {text}");
        let mut py = Command::new(PY)
            .args(["-c", PARSE_METRICS])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        py.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = py.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "prometheus_client's OpenMetrics parser rejects the scrape: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        Metrics(serde_json::from_slice(&out.stdout).unwrap())
    }

    fn family(&self, name: &str, kind: &str) -> &Value {
        let f = &self.0[name];
        assert_eq!(f["type"], kind, "family {name}: {:#}", self.0);
        f
    }

    /// The value of sample `sample` of family `family` whose labels include `labels`.
    fn get(&self, family: &str, kind: &str, sample: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.family(family, kind)["samples"]
            .as_array()?
            .iter()
            .find(|s| s[0] == sample && labels.iter().all(|(k, v)| s[1][*k] == *v))
            .and_then(|s| s[2].as_f64())
    }

    fn counter(&self, family: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(family, "counter", &format!("{family}_total"), labels)
            .unwrap_or(0.0)
    }
}

// 5. `/readyz` answers 503 while a static sandbox's cgroup does not exist, naming it, and 200
//    once it does; 503 again while draining on SIGTERM, with a request in flight that still
//    completes. `/metrics` passes prometheus_client's parser and counts the traffic.
#[test]
fn daemon_readiness_follows_static_sandboxes_and_draining_and_metrics_parse() {
    need(PY);
    need(DIG);
    let ns = Netns::with_veth();
    let cg = Cgroup::planned("late");
    let stub = StubResolver::start_at(
        IpAddr::V4(ns.host_ip),
        &[
            ("origin.test", ns.host_ip.into()),
            ("denied.test", ns.host_ip.into()),
        ],
    );
    let ca = OriginCa::new();
    let origin = ca.origin(ns.host_ip, &["origin.test", "denied.test"]);
    let side = Upstream::start(&ns.host(8080).to_string());
    let mut d = Daemon::start(DaemonSpec {
        policy: "[sandbox.late]\nallow = [\"origin.test\"]\n".into(),
        daemon: vec![
            ca.daemon_line(),
            format!("dns_upstreams = [\"{}\"]", stub.addr()),
            "recheck_interval = \"1s\"".into(),
            "drain_timeout = \"60s\"".into(),
        ],
        sandboxes: format!(
            "[[sandbox]]\nname = \"late\"\ncgroup = \"{}\"\nnetns = \"{}\"\n",
            cg.rel(),
            ns.path.display()
        ),
        ..Default::default()
    });
    assert_eq!(
        d.admin_get("/healthz").0,
        200,
        "/healthz answers while not ready"
    );
    let (code, body) = d.admin_get("/readyz");
    assert_eq!(
        code, 503,
        "the static sandbox's cgroup does not exist yet: {body}"
    );
    assert!(
        body.contains("sandbox late") && body.contains(cg.rel()) && body.contains("does not exist"),
        "/readyz names what it waits for: {body}"
    );
    let (_, status) = d.api("GET", "/v1/status", None);
    assert_eq!(status["ready"], false, "{status}");
    let cli = Command::new(egress_bin())
        .args(["status", "--api"])
        .arg(&d.api)
        .output()
        .unwrap();
    let cli_out = String::from_utf8_lossy(&cli.stdout);
    assert!(
        cli.status.success()
            && cli_out.starts_with("not ready")
            && cli_out.contains("sandbox late"),
        "egress status: {cli:?}"
    );

    cg.create();
    wait_for("/readyz to answer 200 once the cgroup exists", || {
        let (code, body) = d.admin_get("/readyz");
        (code == 200).then_some(()).ok_or(format!("{code} {body}"))
    });
    let list = d.list();
    assert_eq!(
        (&list[0]["name"], &list[0]["state"]),
        (&json!("late"), &json!("active")),
        "{list:#?}"
    );
    let id = list[0]["id"].as_u64().unwrap();

    let m0 = Metrics::scrape(&d);
    let egress_ca = d.ca_for_clients();
    for _ in 0..2 {
        let ok = curl_https(
            &cg,
            Some(&ns),
            &egress_ca,
            "origin.test",
            ns.host_ip,
            "/hello",
        );
        assert_eq!(ok.status, 200, "{ok:?}");
    }
    let denied = curl_https(
        &cg,
        Some(&ns),
        &egress_ca,
        "denied.test",
        ns.host_ip,
        "/hello",
    );
    assert_eq!(denied.status, 403, "{denied:?}");
    let refused = connect_err(&cg, Some(&ns), &ns.host(8080).to_string());
    assert_eq!(refused["errno"], libc::EPERM, "{refused}");
    assert_eq!(dig(&cg, &ns, ns.host_ip, "origin.test").0, "NOERROR");
    assert_eq!(dig(&cg, &ns, ns.host_ip, "denied.test").0, "NXDOMAIN");
    assert_eq!(side.accepted(), 0);

    // Kernel refusals arrive through the ring buffer, a little later.
    let late = [("sandbox", "late")];
    let m1 = wait_for("the kernel refusal in /metrics", || {
        let m = Metrics::scrape(&d);
        let n = m.counter(
            "egress_kernel_denies",
            &[("sandbox", "late"), ("protocol", "tcp")],
        );
        if n >= 1.0 {
            Ok(m)
        } else {
            Err(format!("{:#}", m.0))
        }
    });
    let allow = [("sandbox", "late"), ("decision", "allow")];
    let deny = [("sandbox", "late"), ("decision", "deny")];
    assert_eq!(m1.counter("egress_requests", &allow), 2.0, "{:#}", m1.0);
    assert_eq!(m1.counter("egress_requests", &deny), 1.0, "{:#}", m1.0);
    assert!(
        m1.counter("egress_dns_queries", &allow) >= 1.0,
        "{:#}",
        m1.0
    );
    assert!(m1.counter("egress_dns_queries", &deny) >= 1.0, "{:#}", m1.0);
    assert_eq!(
        m1.get(
            "egress_active_connections",
            "gauge",
            "egress_active_connections",
            &late
        ),
        Some(0.0),
        "nothing in flight: {:#}",
        m1.0
    );
    let count = |m: &Metrics| {
        m.get(
            "egress_request_duration_seconds",
            "histogram",
            "egress_request_duration_seconds_count",
            &[],
        )
        .unwrap_or_else(|| panic!("no egress_request_duration_seconds_count: {:#}", m.0))
    };
    assert!(
        count(&m1) >= count(&m0) + 3.0,
        "every request is timed: {:#}",
        m1.0
    );
    assert!(
        m1.family("egress_request_duration_seconds", "histogram")["samples"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s[0] == "egress_request_duration_seconds_bucket" && s[1]["le"] == "+Inf"),
        "histogram buckets: {:#}",
        m1.0
    );
    // One leaf minted for origin.test (and one for denied.test), then reused.
    assert!(
        m1.counter("egress_leaf_cache_misses", &[]) >= 1.0,
        "{:#}",
        m1.0
    );
    assert!(
        m1.counter("egress_leaf_cache_hits", &[]) >= 1.0,
        "{:#}",
        m1.0
    );
    assert!(
        m1.counter("egress_audit_records_written", &[])
            >= m0.counter("egress_audit_records_written", &[]) + 3.0,
        "{:#}",
        m1.0
    );
    assert_eq!(
        m1.counter("egress_audit_records_lost", &[]),
        0.0,
        "{:#}",
        m1.0
    );
    assert_eq!(
        m1.counter("egress_kernel_events_lost", &[]),
        0.0,
        "{:#}",
        m1.0
    );
    assert_eq!(
        m1.get("egress_sandboxes", "gauge", "egress_sandboxes", &[]),
        Some(1.0),
        "{:#}",
        m1.0
    );

    // Draining: a request held open by the origin, then SIGTERM.
    let out = d.path("hold.out");
    let held = Background::start(
        &cg,
        Some(&ns),
        &[
            "curl",
            "-sS",
            "-m",
            "60",
            "--cacert",
            egress_ca.to_str().unwrap(),
            "--resolve",
            &format!("origin.test:443:{}", ns.host_ip),
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "https://origin.test/hold",
        ],
        &out,
    );
    wait_for("the held request to reach the origin", || {
        origin
            .requests()
            .iter()
            .any(|r| r.path_and_query == "/hold")
            .then_some(())
            .ok_or("not yet".to_owned())
    });
    let m2 = Metrics::scrape(&d);
    assert_eq!(
        m2.get(
            "egress_active_connections",
            "gauge",
            "egress_active_connections",
            &late
        ),
        Some(1.0),
        "the held request is in flight: {:#}",
        m2.0
    );
    d.sigterm();
    wait_for("/readyz to answer 503 while draining", || {
        let (code, body) = d.admin_get("/readyz");
        (code == 503 && body.contains("draining"))
            .then_some(())
            .ok_or(format!("{code} {body}"))
    });
    origin.release();
    assert!(
        held.wait().success(),
        "the held request failed while draining"
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "released\n200",
        "the request in flight completes during the drain"
    );
    let status = d.wait_exit();
    assert!(
        status.success(),
        "the daemon's exit after draining: {status}; {}",
        d.stderr()
    );

    // SIGTERM leaves the pins: the sandbox stays closed until a daemon runs again, and the
    // next one takes it back (a static sandbox, from the config and the state file).
    assert!(d.link_dir(id).exists(), "SIGTERM removed the link pins");
    assert!(
        !attached_programs(cg.path()).is_empty(),
        "SIGTERM detached the programs"
    );
    let seen = origin.request_count();
    let closed = curl_https(
        &cg,
        Some(&ns),
        &egress_ca,
        "origin.test",
        ns.host_ip,
        "/hello",
    );
    assert_eq!(closed.status, 0, "no daemon, no answer: {closed:?}");
    assert_eq!(
        origin.request_count(),
        seen,
        "a request went out with no daemon"
    );
    d.spawn();
    wait_for("/readyz to answer 200 after the restart", || {
        let (code, body) = d.admin_get("/readyz");
        (code == 200).then_some(()).ok_or(format!("{code} {body}"))
    });
    let list = d.list();
    assert_eq!(
        (
            &list[0]["name"],
            list[0]["id"].as_u64(),
            &list[0]["adopted"]
        ),
        (&json!("late"), Some(id), &json!(true)),
        "{list:#?}"
    );
    let ok = curl_https(
        &cg,
        Some(&ns),
        &egress_ca,
        "origin.test",
        ns.host_ip,
        "/hello",
    );
    assert_eq!(ok.status, 200, "after the restart: {ok:?}");
}

/// The sandboxes as listed, without their counters (which traffic changes).
fn registered(d: &Daemon) -> Vec<Value> {
    let mut list = d.list();
    for s in &mut list {
        s.as_object_mut().unwrap().remove("counters");
    }
    list
}

// 6. The API refuses bad input with a 4xx naming the field and changes nothing; it serves
//    only root; and a sandboxed process reaches neither the API socket nor the admin port.
#[test]
fn daemon_api_refuses_bad_input_outsiders_and_sandboxes() {
    need(PY);
    let home = Cgroup::new("daemon-home");
    let (cg_a, cg_free) = (Cgroup::new("a"), Cgroup::new("free"));
    let d = Daemon::start(DaemonSpec {
        policy: "[sandbox.a]\nallow = [\"origin.test\"]\n".into(),
        cgroup: Some(home.path().to_owned()),
        ..Default::default()
    });
    // In the host's namespace: the admin port is on its loopback.
    d.add(json!({"name": "a", "cgroup": cg_a.rel()}));
    let before = registered(&d);
    let not_a_netns = d.path("not-a-netns");
    std::fs::write(&not_a_netns, "").unwrap();
    let missing = format!("egress-test-{}-no-such-cgroup", std::process::id());
    let cases = [
        (
            "an unknown cgroup",
            json!({"name": "x", "cgroup": missing, "policy": "a"}),
            400,
            "cgroup",
        ),
        (
            "an unknown policy",
            json!({"name": "x", "cgroup": cg_free.rel(), "policy": "nope"}),
            400,
            "policy",
        ),
        (
            "a duplicate name",
            json!({"name": "a", "cgroup": cg_free.rel()}),
            409,
            "name",
        ),
        (
            "a netns that cannot be entered",
            json!({"name": "x", "cgroup": cg_free.rel(), "policy": "a", "netns": not_a_netns}),
            400,
            "netns",
        ),
        (
            "a cgroup another sandbox owns",
            json!({"name": "x", "cgroup": cg_a.rel(), "policy": "a"}),
            409,
            "cgroup",
        ),
        (
            "a missing name",
            json!({"cgroup": cg_free.rel()}),
            400,
            "name",
        ),
        (
            "an unknown field",
            json!({"name": "x", "cgroup": cg_free.rel(), "colour": "red"}),
            400,
            "colour",
        ),
        (
            "the cgroup the daemon runs in",
            json!({"name": "x", "cgroup": home.rel(), "policy": "a"}),
            400,
            "cgroup",
        ),
        (
            "a pid outside the cgroup",
            json!({"name": "x", "cgroup": cg_free.rel(), "policy": "a", "pid": std::process::id()}),
            400,
            "pid",
        ),
    ];
    for (what, body, status, field) in cases {
        let (code, v) = d.api("POST", "/v1/sandboxes", Some(&body));
        assert_eq!(code, status, "{what}: {v}");
        assert_eq!(v["field"], field, "{what}: {v}");
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: an error message: {v}"
        );
        assert_eq!(registered(&d), before, "{what} changed the sandboxes");
        for cg in [&cg_free, &home] {
            let p = attached_programs(cg.path());
            assert!(p.is_empty(), "{what} left programs on {}: {p:?}", cg.rel());
        }
    }
    let (code, v) = d.api("DELETE", "/v1/sandboxes/nope", None);
    assert_eq!((code, &v["field"]), (404, &json!("name")), "{v}");
    assert_eq!(registered(&d), before);
    // The CLI says the same, with EX_USAGE.
    let out = Command::new(egress_bin())
        .args(["sandbox", "add", "x", "--cgroup", &missing, "--api"])
        .arg(&d.api)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cgroup"),
        "{out:?}"
    );

    // No daemon behind the socket: EX_UNAVAILABLE.
    let out = Command::new(egress_bin())
        .args(["sandbox", "list", "--api"])
        .arg(d.path("no-such.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{out:?}");

    // Not root: the socket itself refuses, and the CLI says so with EX_NOPERM.
    use std::os::unix::process::CommandExt as _;
    let out = Command::new("curl")
        .args(["-sS", "--unix-socket"])
        .arg(&d.api)
        .arg("http://egress/v1/sandboxes")
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    // curl does not print why; the CLI below maps exactly EACCES to its exit code 77.
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl as nobody must not connect: {out:?}"
    );
    let out = Command::new(egress_bin())
        .args(["sandbox", "list", "--api"])
        .arg(&d.api)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(77),
        "egress sandbox list as nobody: {out:?}"
    );
    // From inside a sandbox: the admin port is refused by the kernel, the socket by its mode.
    let admin = d.admin().to_string();
    let refused = connect_err(&cg_a, None, &admin);
    assert_eq!(
        refused["errno"],
        libc::EPERM,
        "the admin port from sandbox a: {refused}"
    );
    let out = run_in(
        &cg_a,
        None,
        &[
            PY,
            "-c",
            "import socket, sys\n\
             s = socket.socket(socket.AF_UNIX)\n\
             try:\n    s.connect(sys.argv[1]); print(0)\n\
             except OSError as e:\n    print(e.errno)",
            d.api.to_str().unwrap(),
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        libc::EACCES.to_string(),
        "the API socket from sandbox a: {out:?}"
    );
    wait_for("the kernel_deny record of the admin port", || {
        let denies = d.audit_of("kernel_deny", 0);
        denies
            .iter()
            .any(|r| r["sandbox"] == "a" && r["dst"] == admin)
            .then_some(())
            .ok_or(format!("{denies:#?}"))
    });
    assert_eq!(registered(&d), before);
    // Should the socket's mode ever let others in, the daemon still checks who connected.
    std::fs::set_permissions(&d.api, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let out = Command::new("curl")
        .args(["-sS", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(&d.api)
        .args(["-X", "POST", "--data-binary"])
        .arg(json!({"name": "x", "cgroup": cg_free.rel(), "policy": "a"}).to_string())
        .arg("http://egress/v1/sandboxes")
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or_default();
    assert_eq!(
        code, "403",
        "a caller that is not root, past the socket's mode: {text}"
    );
    let body: Value = serde_json::from_str(body).unwrap_or_default();
    assert_eq!(body["field"], "caller", "{text}");
    let out = Command::new(egress_bin())
        .args(["sandbox", "list", "--api"])
        .arg(&d.api)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(77),
        "past the socket's mode: {out:?}"
    );
    assert_eq!(registered(&d), before);
    assert!(attached_programs(cg_free.path()).is_empty());
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

// 8. `--detach-on-exit`: on SIGTERM the daemon removes every sandbox from the kernel, its
//    pins and its state; the cgroups are no longer captured.
#[test]
fn daemon_detach_on_exit_removes_every_sandbox_and_its_pins() {
    let (cg_static, cg_api) = (Cgroup::new("static"), Cgroup::new("api"));
    let ns = Netns::with_veth();
    let side = Upstream::start(&ns.host(8080).to_string());
    let mut d = Daemon::start(DaemonSpec {
        policy: "[sandbox.s]\n\n[sandbox.t]\n".into(),
        sandboxes: format!(
            "[[sandbox]]\nname = \"s\"\ncgroup = \"{}\"\nnetns = \"{}\"\n",
            cg_static.rel(),
            ns.path.display()
        ),
        args: vec!["--detach-on-exit".into()],
        ..Default::default()
    });
    d.add(json!({"name": "t", "cgroup": cg_api.rel(), "netns": ns.path}));
    let state = d.confdir.join("daemon-state.json");
    assert!(state.exists(), "the state file is written");
    for cg in [&cg_static, &cg_api] {
        assert_eq!(
            connect_err(cg, Some(&ns), &ns.host(8080).to_string())["errno"],
            libc::EPERM,
            "{} is captured",
            cg.rel()
        );
    }
    d.sigterm();
    let status = d.wait_exit();
    assert!(status.success(), "{status}: {}", d.stderr());
    assert!(
        !d.pin_root.exists(),
        "the pins outlive a detaching daemon: {:?}",
        std::fs::read_dir(&d.pin_root).map(|r| r.flatten().map(|e| e.path()).collect::<Vec<_>>())
    );
    assert!(
        !state.exists(),
        "the state file outlives a detaching daemon"
    );
    for cg in [&cg_static, &cg_api] {
        let p = attached_programs(cg.path());
        assert!(p.is_empty(), "{} still has {p:?}", cg.rel());
        assert_eq!(
            connect_err(cg, Some(&ns), &ns.host(8080).to_string())["ok"],
            true,
            "{} is no longer captured",
            cg.rel()
        );
    }
    wait_accepted(&side, 2, "each cgroup, uncaptured, reached the listener");
}

// 9. The daemon follows the world: a sandbox whose cgroup is removed is dropped at the next
//    re-check with all it had in the kernel; a changed policy file applies from the next
//    request on `POST /v1/reload` and on SIGHUP, and an invalid one keeps the last good one.
#[test]
fn daemon_drops_vanished_cgroups_and_reloads_policies() {
    let (cg_gone, cg_kept) = (Cgroup::new("vanishing"), Cgroup::new("reloaded"));
    let ns = Netns::with_veth();
    let ca = OriginCa::new();
    let _origin = ca.origin(ns.host_ip, &["origin.test"]);
    let d = Daemon::start(DaemonSpec {
        policy: "[sandbox.v]\n\n[sandbox.r]\nallow = [\"origin.test\"]\n".into(),
        daemon: vec![ca.daemon_line(), "recheck_interval = \"1s\"".into()],
        ..Default::default()
    });
    let gone = d.add(json!({"name": "v", "cgroup": cg_gone.rel(), "netns": ns.path}));
    let gone_id = gone["id"].as_u64().unwrap();
    let gone_cgroup = cg_gone.id();
    d.add(json!({"name": "r", "cgroup": cg_kept.rel(), "netns": ns.path}));
    std::fs::remove_dir(cg_gone.path()).unwrap();
    wait_for(
        "the re-check to drop the sandbox whose cgroup vanished",
        || {
            let list = d.list();
            (list.len() == 1 && list[0]["name"] == "r")
                .then_some(())
                .ok_or(format!("{list:#?}"))
        },
    );
    assert!(!d.link_dir(gone_id).exists(), "its link pins stay");
    let rows = d.sandbox_rows();
    assert!(
        rows.iter()
            .all(|(cg, s)| *cg != gone_cgroup && u64::from(s.id) != gone_id),
        "its SANDBOXES row stays: {rows:?}"
    );
    assert!(
        d.port_rows()
            .iter()
            .all(|k| u64::from(k.sandbox) != gone_id),
        "its INTERCEPT_PORTS rows stay"
    );
    let state = std::fs::read_to_string(d.confdir.join("daemon-state.json")).unwrap();
    assert!(
        !state.contains(cg_gone.rel()),
        "still in the state: {state}"
    );

    // Reload.
    let egress_ca = d.ca_for_clients();
    let fetch = || {
        curl_https(
            &cg_kept,
            Some(&ns),
            &egress_ca,
            "origin.test",
            ns.host_ip,
            "/hello",
        )
        .status
    };
    assert_eq!(fetch(), 200);
    let policy = d.path("policy.toml");
    std::fs::write(
        &policy,
        "[sandbox.v]\n\n[sandbox.r]\nallow = [\"other.test\"]\n",
    )
    .unwrap();
    let (code, report) = d.api("POST", "/v1/reload", None);
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["errors"], json!([]), "{report}");
    assert_eq!(
        fetch(),
        403,
        "after POST /v1/reload, origin.test is no longer allowed"
    );
    // Broken: the last good policy stays.
    std::fs::write(&policy, "[sandbox.r]\nallow = [\"origin test\"]\n").unwrap();
    let (code, report) = d.api("POST", "/v1/reload", None);
    assert_eq!(code, 200, "{report}");
    assert!(
        report["errors"].as_array().is_some_and(|e| !e.is_empty()),
        "an invalid policy file is reported: {report}"
    );
    assert_eq!(fetch(), 403, "an invalid policy file changes nothing");
    // SIGHUP (or the daemon noticing the change itself).
    std::fs::write(&policy, "[sandbox.r]\nallow = [\"origin.test\"]\n").unwrap();
    // SAFETY: kill(2) on the daemon this test started.
    assert_eq!(
        unsafe { libc::kill(d.pid() as libc::pid_t, libc::SIGHUP) },
        0
    );
    wait_for("the policy to be reloaded on SIGHUP", || {
        let status = fetch();
        (status == 200).then_some(()).ok_or(format!("{status}"))
    });
}

// 10. A sandbox registered by pid follows its container: once the container is restarted in
//     a new network namespace (its old one gone), the re-check binds listeners in the new
//     one, and requests (and their upstream connections) work from there.
#[test]
fn daemon_follows_a_sandbox_registered_by_pid_into_its_new_netns() {
    let cg = Cgroup::new("container");
    let first = Netns::with_veth();
    let second = Netns::with_veth();
    let ca = OriginCa::new();
    let origin_first = ca.origin(first.host_ip, &["origin.test"]);
    let origin_second = ca.origin(second.host_ip, &["origin.test"]);
    let d = Daemon::start(DaemonSpec {
        policy: "[sandbox.c]\nallow = [\"origin.test\"]\n".into(),
        daemon: vec![ca.daemon_line(), "recheck_interval = \"1s\"".into()],
        ..Default::default()
    });
    let egress_ca = d.ca_for_clients();
    // The container's init.
    let init = Background::start(&cg, Some(&first), &["sleep", "600"], &d.path("init1.out"));
    let pid = wait_for("the container's init in its cgroup", || {
        std::fs::read_to_string(cg.path().join("cgroup.procs"))
            .map_err(|e| e.to_string())?
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<u32>().ok())
            .ok_or("empty".to_owned())
    });
    let added = d.add(json!({"name": "c", "cgroup": cg.rel(), "pid": pid}));
    assert_ne!(added["netns"], "host", "{added}");
    let fetch = |ns: &Netns| {
        curl_https(
            &cg,
            Some(ns),
            &egress_ca,
            "origin.test",
            ns.host_ip,
            "/hello",
        )
        .status
    };
    assert_eq!(fetch(&first), 200);
    assert_eq!(
        origin_first.requests()[0].peer.ip(),
        IpAddr::V4(first.sandbox_ip)
    );

    // The container restarts: its init goes, a new one comes up in a new namespace.
    drop(init);
    drop(first);
    let _init = Background::start(&cg, Some(&second), &["sleep", "600"], &d.path("init2.out"));
    wait_for(
        "requests from the container's new namespace",
        || match fetch(&second) {
            200 => Ok(()),
            other => Err(format!("{other}; daemon log: {:?}", d.logs().last())),
        },
    );
    let seen = origin_second.requests();
    assert_eq!(
        seen[0].peer.ip(),
        IpAddr::V4(second.sandbox_ip),
        "the upstream connection leaves from the new namespace: {seen:?}"
    );
    let list = d.list();
    assert_eq!(
        list[0]["netns"],
        format!("net:[{}]", ino(&second.path)),
        "{list:#?}"
    );
    assert!(
        d.logs().iter().any(|l| l["message"]
            == "the sandbox's network namespace changed; listeners bound in the new one"),
        "the move is logged"
    );
}

fn ino(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(p).unwrap().ino()
}

/// A sandbox `s` in its own netns under a daemon whose drain timeout is `drain`, and a way
/// to start a request that the origin holds until released.
struct Draining {
    d: Daemon,
    egress_ca: PathBuf,
    ca: OriginCa,
    side: Upstream,
    ns: Netns,
    cg: Cgroup,
}

impl Draining {
    fn new(drain: &str) -> Self {
        let cg = Cgroup::new("draining");
        let ns = Netns::with_veth();
        let ca = OriginCa::new();
        let side = Upstream::start(&ns.host(8080).to_string());
        let d = Daemon::start(DaemonSpec {
            policy: "[sandbox.s]\nallow = [\"origin.test\"]\n".into(),
            daemon: vec![ca.daemon_line(), format!("drain_timeout = \"{drain}\"")],
            ..Default::default()
        });
        d.add(json!({"name": "s", "cgroup": cg.rel(), "netns": ns.path}));
        let egress_ca = d.ca_for_clients();
        Draining {
            d,
            egress_ca,
            ca,
            side,
            ns,
            cg,
        }
    }

    /// Starts `curl https://origin.test/hold` in the sandbox; returns once the origin holds
    /// it.
    fn held(&self, origin: &Origin) -> (Background, PathBuf) {
        let out = self.d.path("held.out");
        let curl = Background::start(
            &self.cg,
            Some(&self.ns),
            &[
                "curl",
                "-sS",
                "-m",
                "60",
                "--cacert",
                self.egress_ca.to_str().unwrap(),
                "--resolve",
                &format!("origin.test:443:{}", self.ns.host_ip),
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                "https://origin.test/hold",
            ],
            &out,
        );
        wait_for("the held request to reach the origin", || {
            (origin.request_count() > 0)
                .then_some(())
                .ok_or("not yet".to_owned())
        });
        (curl, out)
    }
}

// 11. Removing a sandbox stops capturing it at once and lets its requests in flight finish
//     within the drain timeout.
#[test]
fn daemon_remove_uncaptures_at_once_and_drains_requests_in_flight() {
    let t = Draining::new("60s");
    let origin = t.ca.origin(t.ns.host_ip, &["origin.test"]);
    let (curl, out) = t.held(&origin);
    std::thread::scope(|s| {
        let removing = s.spawn(|| t.d.remove("s"));
        // Out of the kernel and the list while its request still runs.
        wait_for("the removed sandbox to be uncaptured", || {
            let p = attached_programs(t.cg.path());
            p.is_empty().then_some(()).ok_or(format!("{p:?}"))
        });
        let open = connect_err(&t.cg, Some(&t.ns), &t.ns.host(8080).to_string());
        assert_eq!(
            open["ok"], true,
            "no longer captured while draining: {open}"
        );
        assert!(
            registered(&t.d).is_empty(),
            "no longer listed while draining"
        );
        assert!(
            !removing.is_finished(),
            "the removal waits for the request in flight"
        );
        origin.release();
        let report = removing.join().unwrap();
        assert_eq!(report["cut_off"], 0, "{report}");
    });
    assert!(curl.wait().success(), "the request in flight failed");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "released\n200",
        "the request in flight completes"
    );
    wait_accepted(&t.side, 1, "the uncaptured connect reached the listener");
}

// 12. A request still open at the drain deadline of a removal is cut off, and counted.
#[test]
fn daemon_remove_cuts_off_what_outlives_the_drain_timeout() {
    let t = Draining::new("1s");
    let origin = t.ca.origin(t.ns.host_ip, &["origin.test"]);
    let (curl, out) = t.held(&origin);
    let report = t.d.remove("s");
    assert_eq!(report["cut_off"], 1, "{report}");
    curl.wait();
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        !text.contains("released"),
        "the held request was cut off, not answered: {text}"
    );
}

/// Waits until `cg`'s programs are attached and a connect from it is refused (captured).
fn wait_captured(d: &Daemon, cg: &Cgroup, ns: &Netns, what: &str) {
    wait_for(what, || {
        if attached_programs(cg.path()).is_empty() {
            return Err(format!(
                "no programs on {}; sandboxes: {:#?}",
                cg.rel(),
                d.list()
            ));
        }
        let r = connect_err(cg, Some(ns), &ns.host(8080).to_string());
        (r["errno"] == libc::EPERM)
            .then_some(())
            .ok_or(format!("{r}"))
    });
}

// 13. A static sandbox (one the config declares) whose cgroup is deleted and made again, as
//     a restarted unit's or container parent's is, is captured again: the config says that
//     cgroup is a sandbox whenever it exists. Meanwhile `/readyz` says what it waits for.
#[test]
fn daemon_static_sandbox_is_captured_again_when_its_cgroup_is_recreated() {
    let cg = Cgroup::new("static");
    let ns = Netns::with_veth();
    let _side = Upstream::start(&ns.host(8080).to_string());
    let d = Daemon::start(DaemonSpec {
        policy: "[sandbox.s]\n".into(),
        daemon: vec!["recheck_interval = \"1s\"".into()],
        sandboxes: format!(
            "[[sandbox]]\nname = \"s\"\ncgroup = \"{}\"\nnetns = \"{}\"\n",
            cg.rel(),
            ns.path.display()
        ),
        ..Default::default()
    });
    wait_captured(&d, &cg, &ns, "the static sandbox to be captured");

    std::fs::remove_dir(cg.path()).unwrap();
    wait_for(
        "/readyz to name the static sandbox whose cgroup is gone",
        || {
            let (code, body) = d.admin_get("/readyz");
            (code == 503 && body.contains("sandbox s"))
                .then_some(())
                .ok_or(format!("{code} {body}; sandboxes: {:#?}", d.list()))
        },
    );
    cg.create();
    wait_captured(
        &d,
        &cg,
        &ns,
        "the re-made cgroup of the static sandbox to be captured",
    );
    let (code, body) = d.admin_get("/readyz");
    assert_eq!(code, 200, "{body}");
}

// 14. The same across a restart: a static sandbox whose cgroup vanished while no daemon ran
//     is captured again once its cgroup is made again.
#[test]
fn daemon_static_sandbox_whose_cgroup_vanished_while_down_is_captured_when_it_returns() {
    let cg = Cgroup::new("static");
    let ns = Netns::with_veth();
    let _side = Upstream::start(&ns.host(8080).to_string());
    let mut d = Daemon::start(DaemonSpec {
        policy: "[sandbox.s]\n".into(),
        daemon: vec!["recheck_interval = \"1s\"".into()],
        sandboxes: format!(
            "[[sandbox]]\nname = \"s\"\ncgroup = \"{}\"\nnetns = \"{}\"\n",
            cg.rel(),
            ns.path.display()
        ),
        ..Default::default()
    });
    wait_captured(&d, &cg, &ns, "the static sandbox to be captured");
    d.kill9();
    std::fs::remove_dir(cg.path()).unwrap();
    d.spawn();
    let (code, body) = d.admin_get("/readyz");
    assert_eq!(
        code, 503,
        "a static sandbox whose cgroup does not exist is pending: {body}"
    );
    assert!(body.contains("sandbox s"), "{body}");
    cg.create();
    wait_captured(
        &d,
        &cg,
        &ns,
        "the re-made cgroup of the static sandbox to be captured",
    );
}

// 15. A sandbox's options reach the kernel and leave with it: its own intercepted ports, its
//     policy's direct TCP allowances (replaced on reload), the strict backstop.
#[test]
fn daemon_sandbox_options_reach_the_kernel_and_leave_with_the_sandbox() {
    let cg = Cgroup::new("options");
    let ns = Netns::with_veth();
    let ca = OriginCa::new();
    let origin = Origin::start(
        &ns.host(8443).to_string(),
        Some(ca.ca.leaf(&["origin.test"])),
    );
    let on_443 = Upstream::start(&ns.host(443).to_string());
    let allowed = Upstream::start(&ns.host(9000).to_string());
    let other = Upstream::start(&ns.host(9001).to_string());
    let policy = |tcp: &str| format!("[sandbox.o]\nallow = [\"origin.test\"]\ntcp = [{tcp}]\n");
    let d = Daemon::start(DaemonSpec {
        policy: policy(&format!("\"{}:9000\"", ns.host_ip)),
        daemon: vec![ca.daemon_line()],
        ..Default::default()
    });
    let o = d.add(json!({
        "name": "o",
        "cgroup": cg.rel(),
        "netns": ns.path,
        "intercept_ports": [8443],
        "strict": true,
    }));
    assert_eq!(
        (&o["intercept_ports"], &o["strict"]),
        (&json!([8443]), &json!(true)),
        "{o}"
    );
    let id = o["id"].as_u64().unwrap() as u32;
    let egress_ca = d.ca_for_clients();
    let out = run_in(
        &cg,
        Some(&ns),
        &[
            "curl",
            "-sS",
            "-m",
            "20",
            "--cacert",
            egress_ca.to_str().unwrap(),
            "--resolve",
            &format!("origin.test:8443:{}", ns.host_ip),
            "https://origin.test:8443/hello",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from origin.test:8443",
        "port 8443 goes through the proxy: {out:?}"
    );
    assert_eq!(origin.request_count(), 1);
    let connect = |port: u16| connect_err(&cg, Some(&ns), &ns.host(port).to_string());
    assert_eq!(
        connect(443)["errno"],
        libc::EPERM,
        "443 is not intercepted for this sandbox"
    );
    assert_eq!(connect(9000)["ok"], true, "the policy's tcp allowance");
    assert_eq!(connect(9001)["errno"], libc::EPERM, "no allowance for 9001");
    wait_accepted(&allowed, 1, "the allowed connect reached its listener");
    assert_eq!((on_443.accepted(), other.accepted()), (0, 0));
    let ports: Vec<u32> = d
        .port_rows()
        .iter()
        .filter(|k| k.sandbox == id)
        .map(|k| k.port)
        .collect();
    assert_eq!(ports, vec![8443], "INTERCEPT_PORTS rows of the sandbox");
    let mine = |d: &Daemon| -> Vec<(u16, String)> {
        d.allow4_rows()
            .into_iter()
            .filter(|(s, ..)| *s == id)
            .map(|(_, p, n)| (p, n))
            .collect()
    };
    assert_eq!(mine(&d), vec![(9000, format!("{}/32", ns.host_ip))]);
    let row = d
        .sandbox_rows()
        .into_iter()
        .find(|(c, _)| *c == cg.id())
        .expect("the sandbox's SANDBOXES row");
    assert_eq!(
        row.1.flags & egress_common::SANDBOX_STRICT,
        egress_common::SANDBOX_STRICT
    );
    let programs = attached_programs(cg.path());
    assert!(
        programs.iter().any(|p| p.starts_with("egress_skb_str")),
        "the strict backstop is attached: {programs:?}"
    );

    // A reload replaces the allowances in the kernel.
    std::fs::write(
        d.path("policy.toml"),
        policy(&format!("\"{}:9001\"", ns.host_ip)),
    )
    .unwrap();
    let (code, report) = d.api("POST", "/v1/reload", None);
    assert_eq!((code, &report["errors"]), (200, &json!([])), "{report}");
    assert_eq!(mine(&d), vec![(9001, format!("{}/32", ns.host_ip))]);
    assert_eq!(
        connect(9000)["errno"],
        libc::EPERM,
        "the old allowance is gone"
    );
    assert_eq!(connect(9001)["ok"], true, "the new allowance");

    d.remove("o");
    assert!(mine(&d).is_empty(), "ALLOW4 rows outlived the sandbox");
    assert!(d.port_rows().iter().all(|k| k.sandbox != id));
    assert!(attached_programs(cg.path()).is_empty());
}

// 16. An API sandbox that cannot be taken back after a restart (its netns vanished while no
//     daemon ran) stays closed and is listed as pending, without holding up readiness; removing
//     it then takes everything of it out of the kernel.
#[test]
fn daemon_keeps_an_unadoptable_sandbox_closed_and_pending_until_removed() {
    let cg = Cgroup::new("orphaned");
    let gone = Netns::with_veth();
    let elsewhere = Netns::with_veth();
    let _side = Upstream::start(&elsewhere.host(8080).to_string());
    let mut d = Daemon::start(DaemonSpec {
        policy: "[sandbox.p]\n".into(),
        daemon: vec!["recheck_interval = \"1s\"".into()],
        ..Default::default()
    });
    let id = d.add(json!({"name": "p", "cgroup": cg.rel(), "netns": gone.path}))["id"]
        .as_u64()
        .unwrap();
    d.kill9();
    drop(gone);
    d.spawn();
    let list = d.list();
    assert_eq!(
        (&list[0]["name"], &list[0]["state"]),
        (&json!("p"), &json!("pending")),
        "{list:#?}"
    );
    assert!(
        list[0]["pending"]
            .as_str()
            .is_some_and(|p| p.contains("netns")),
        "{list:#?}"
    );
    wait_for(
        "/readyz 200: only the config's sandboxes hold it up",
        || {
            let (code, body) = d.admin_get("/readyz");
            (code == 200).then_some(()).ok_or(format!("{code} {body}"))
        },
    );
    assert!(d.link_dir(id).exists(), "its pins stay");
    assert!(
        !attached_programs(cg.path()).is_empty(),
        "its programs stay"
    );
    let r = connect_err(&cg, Some(&elsewhere), &elsewhere.host(8080).to_string());
    assert_eq!(r["errno"], libc::EPERM, "still closed: {r}");

    d.remove("p");
    assert!(d.list().is_empty());
    assert!(
        attached_programs(cg.path()).is_empty(),
        "its programs outlived the removal"
    );
    assert!(!d.link_dir(id).exists(), "its pins outlived the removal");
    assert!(d
        .sandbox_rows()
        .iter()
        .all(|(c, s)| *c != cg.id() && u64::from(s.id) != id));
    assert!(d.port_rows().iter().all(|k| u64::from(k.sandbox) != id));
    let r = connect_err(&cg, Some(&elsewhere), &elsewhere.host(8080).to_string());
    assert_eq!(r["ok"], true, "no longer captured: {r}");
}

// A second daemon on the same confdir (its state and pins) refuses to start, naming the
// first one, and takes nothing from it: the first one's API keeps answering.
#[test]
fn daemon_second_on_the_same_confdir_refuses_to_start() {
    let cg = Cgroup::new("one");
    let d = Daemon::start(DaemonSpec {
        policy: "[sandbox.s]\n".into(),
        ..Default::default()
    });
    d.add(json!({"name": "s", "cgroup": cg.rel()}));
    let out = Command::new(egress_bin())
        .args(["daemon", "--config"])
        .arg(&d.config)
        .output()
        .expect("run a second egress daemon");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains("another egress daemon") && stderr.contains(&d.pid().to_string()),
        "names the running daemon: {stderr}"
    );
    assert!(
        d.api.exists(),
        "the first daemon's API socket is left alone"
    );
    let names: Vec<String> = d
        .list()
        .iter()
        .map(|s| s["name"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(names, ["s"], "the first daemon still answers, unchanged");
}

// 18. A newer egress whose layout for a map differs: the pinned map that no longer fits is
//     replaced, not reused. The sandbox stays captured while no daemon runs (the old
//     programs keep their own map) and after the new daemon took its links over, and the
//     pin is the new object's map again.
#[test]
fn daemon_replaces_a_pinned_map_whose_layout_no_longer_fits() {
    let bpftool = "/usr/sbin/bpftool";
    need(bpftool);
    let cg = Cgroup::new("layout");
    let ns = Netns::with_veth();
    let side = ns.host(8080).to_string();
    let _side = Upstream::start(&side);
    let mut d = Daemon::start(DaemonSpec {
        policy: "[sandbox.s]\n".into(),
        ..Default::default()
    });
    d.add(json!({"name": "s", "cgroup": cg.rel(), "netns": ns.path}));
    wait_captured(&d, &cg, &ns, "the sandbox to be captured");
    d.kill9();
    let counters = d.pin_root.join("COUNTERS");
    std::fs::remove_file(&counters).unwrap();
    let out = Command::new(bpftool)
        .args(["map", "create"])
        .arg(&counters)
        .args(["type", "array", "key", "4", "value", "4", "entries", "1"])
        .args(["name", "COUNTERS"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bpftool map create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        connect_err(&cg, Some(&ns), &side)["errno"],
        libc::EPERM,
        "captured while no daemon runs"
    );
    d.spawn();
    let w = d.wait_log("pinned map does not match this binary's layout; replacing it");
    assert_eq!(w["map"], "COUNTERS", "{w}");
    wait_captured(
        &d,
        &cg,
        &ns,
        "the sandbox to be captured by the new programs",
    );
    // A per-CPU array of the object's layout again (opening the stand-in as one would
    // fail), and the new programs count into it.
    let before = pinned_counter(&counters, Counter::Denied);
    assert_eq!(connect_err(&cg, Some(&ns), &side)["errno"], libc::EPERM);
    assert!(
        pinned_counter(&counters, Counter::Denied) > before,
        "the new programs count into the new map"
    );
}

// Learn mode in the daemon: a sandbox added with `learn` is warned, not refused, and its
// policy is written when it is removed; that policy, applied, serves the same request and
// refuses another host with a hint naming the policy section.
#[test]
fn daemon_learn_mode_writes_the_policy_when_the_sandbox_is_removed() {
    let cg = Cgroup::new("learner");
    let ns = Netns::with_veth();
    let ca = OriginCa::new();
    let _origin = ca.origin(ns.host_ip, &["learned.test", "other.test"]);
    let d = Daemon::start(DaemonSpec {
        policy: "[sandbox.learner]\n".into(),
        daemon: vec![ca.daemon_line()],
        ..Default::default()
    });
    let out = d.path("learned.toml");
    d.add(json!({"name": "learner", "cgroup": cg.rel(), "netns": ns.path, "learn": out}));
    let egress_ca = d.ca_for_clients();
    let fetch = |host: &str| curl_https(&cg, Some(&ns), &egress_ca, host, ns.host_ip, "/hello");
    let got = fetch("learned.test");
    assert_eq!(got.status, 200, "learn mode lets it through: {got:?}");
    assert!(
        !out.exists(),
        "the policy is written on removal, not before"
    );
    d.remove("learner");
    let text = std::fs::read_to_string(&out)
        .unwrap_or_else(|e| panic!("no learned policy at {}: {e}", out.display()));
    assert!(
        text.starts_with("# Generated by egress learn on "),
        "{text}"
    );
    assert!(
        text.contains("[sandbox.learner]")
            && text.contains("  \"learned.test\",")
            && text.contains("host = \"learned.test\"\nmethods = [\"GET\"]\npaths = [\"/hello\"]"),
        "{text}"
    );
    assert!(!text.contains("other.test"), "{text}");

    // The learned policy, as the daemon's policy file: the same request passes, another
    // host gets a 403 whose hint names the section to edit.
    std::fs::write(d.path("policy.toml"), &text).unwrap();
    d.add(json!({"name": "learner", "cgroup": cg.rel(), "netns": ns.path}));
    let again = fetch("learned.test");
    assert_eq!(again.status, 200, "{again:?}");
    let other = fetch("other.test");
    assert_eq!(other.status, 403, "{other:?}");
    let body: Value =
        serde_json::from_str(&other.body).unwrap_or_else(|e| panic!("{e}: {other:?}"));
    assert_eq!(
        body["hint"], "to allow it, add \"other.test\" to allow in [sandbox.learner]",
        "{body}"
    );
    d.audit_find("request", "the refusal of other.test", |r| {
        r["host"] == "other.test" && r["decision"] == "deny"
    });
    let denied: Vec<Value> = d
        .audit()
        .into_iter()
        .filter(|r| r["sandbox"] == "learner" && r["decision"] == "deny")
        .collect();
    assert_eq!(
        denied.len(),
        1,
        "only the other host is refused under the learned policy: {denied:#?}"
    );
}
