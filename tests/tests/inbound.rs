//! A sandbox listens on loopback only: no way out through inbound connections.
//!
//! A real Python server inside the sandbox binds and listens; this test process, outside
//! every sandbox, plays the client that would collect what the sandbox serves. The
//! "non-loopback host address" is the host end of a veth pair the test creates into a
//! namespace of its own (a /30 of 198.18.0.0/15, removed by a `Drop` guard): traffic to it
//! never leaves the host.
//!
//! Every test owns its port and host address, so they run in parallel. Every test name
//! starts with `inbound` so that `cargo xtask test inbound` selects them.

use std::{
    io::{ErrorKind, Read as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use egress_tests::{
    daemon::{wait_for, Background, Cgroup, Daemon, DaemonSpec, Netns},
    Egress, Finished, TempDir,
};
use serde_json::{json, Value};

/// Binds argv[1]:argv[2] (TCP), listens, prints where it is bound (or the bind's errno),
/// then serves one connection "secret from the sandbox" and says whether one came within
/// argv[3] seconds (default 30).
const SERVER: &str = r#"
import json, os, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if fam == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
try:
    s.bind((host, port))
except OSError as e:
    print(json.dumps({"errno": e.errno, "pid": os.getpid()}), flush=True)
    sys.exit(0)
s.listen(8)
print(json.dumps({"local": s.getsockname()[0], "port": s.getsockname()[1], "pid": os.getpid()}), flush=True)
s.settimeout(float(sys.argv[3]) if len(sys.argv) > 3 else 30)
try:
    c, peer = s.accept()
    c.sendall(b"secret from the sandbox")
    c.close()
    print(json.dumps({"accepted": peer[0]}), flush=True)
except socket.timeout:
    print(json.dumps({"accepted": None}), flush=True)
"#;

/// A non-loopback address of the host, owned by the test: the host end of a veth pair into
/// a namespace of the test's own (this kernel has no dummy interfaces), removed on drop.
struct HostAddr {
    _ns: Netns,
    addr: Ipv4Addr,
}

impl HostAddr {
    fn new() -> HostAddr {
        let ns = Netns::with_veth();
        HostAddr {
            addr: ns.host_ip,
            _ns: ns,
        }
    }

    fn at(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.addr.into(), port)
    }
}

/// Connects from outside the sandbox and reads what the server sends.
fn fetch(addr: SocketAddr) -> Result<String, std::io::Error> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

fn refused(addr: SocketAddr) {
    match fetch(addr) {
        Err(e) => assert_eq!(
            e.kind(),
            ErrorKind::ConnectionRefused,
            "{addr}: expected connection refused, got {e}"
        ),
        Ok(text) => panic!("{addr}: a client outside the sandbox read {text:?}"),
    }
}

fn server(args: &[&str], host: &str, port: u16) -> Egress {
    Egress::run(args, &["python3", "-c", SERVER, host, &port.to_string()])
}

/// A server that gives up waiting for a client after a second.
fn brief_server(args: &[&str], host: &str, port: u16) -> Egress {
    Egress::run(
        args,
        &["python3", "-c", SERVER, host, &port.to_string(), "1"],
    )
}

/// The server's first line: where it is bound, or the bind's errno.
fn bound(e: &mut Egress) -> Value {
    let line = e.wait_stdout_line();
    serde_json::from_str(&line).unwrap_or_else(|err| panic!("{err}: {line}"))
}

/// The `kernel_deny` audit records of refused binds.
fn bind_denials(f: &Finished) -> Vec<&Value> {
    f.audit_of("kernel_deny")
        .into_iter()
        .filter(|r| r["reason"].as_str().unwrap_or("").starts_with("bind "))
        .collect()
}

/// A wildcard bind is held to loopback: outside clients are refused, and the host's own
/// loopback still reaches it.
fn wildcard_is_loopback(args: &[&str], port: u16) {
    let host = HostAddr::new();
    let mut e = brief_server(args, "0.0.0.0", port);
    let b = bound(&mut e);
    assert_eq!(b["local"], "127.0.0.1", "{b}");
    refused(host.at(port));
    let f = e.finish();
    assert!(f.status.success(), "{f:#?}");
}

// (1) The exfiltration case: 0.0.0.0:P becomes 127.0.0.1:P; a client outside the sandbox
//     connecting to a host address is refused; (4) a host process reaches the loopback
//     listener.
#[test]
fn inbound_wildcard_bind_is_rewritten_to_loopback() {
    let port = 17771;
    let host = HostAddr::new();
    let mut e = server(&[], "0.0.0.0", port);
    let b = bound(&mut e);
    assert_eq!(b["local"], "127.0.0.1", "{b}");
    refused(host.at(port));
    assert_eq!(
        fetch(SocketAddr::from(([127, 0, 0, 1], port))).expect("host process to loopback"),
        "secret from the sandbox"
    );
    let f = e.finish();
    assert!(f.status.success(), "{f:#?}");
    assert!(f.stdout.contains(r#"{"accepted": "127.0.0.1"}"#), "{f:#?}");
    assert!(bind_denials(&f).is_empty(), "a rewrite is not a refusal");
}

// (2) A bind to a specific non-loopback address gets EPERM and a kernel_deny record.
#[test]
fn inbound_specific_address_bind_is_refused_and_audited() {
    let port = 17772;
    let host = HostAddr::new();
    let mut e = server(&[], &host.addr.to_string(), port);
    let b = bound(&mut e);
    assert_eq!(b["errno"], libc::EPERM, "{b}");
    refused(host.at(port));
    let f = e.finish();
    let denials = bind_denials(&f);
    assert!(
        denials.iter().any(|r| r["dst"] == host.at(port).to_string()
            && r["pid"] == b["pid"]
            && r["comm"] == "python3"
            && r["protocol"] == "tcp"
            && r["decision"] == "deny"
            && r["sandbox"] == "run"),
        "{denials:#?}"
    );
}

// (3) --allow-inbound P: the wildcard bind stays, and an outside client reads the data.
#[test]
fn inbound_allowed_port_listens_on_every_address() {
    let port = 17773;
    let host = HostAddr::new();
    let mut e = server(&["--allow-inbound", &port.to_string()], "0.0.0.0", port);
    let b = bound(&mut e);
    assert_eq!(b["local"], "0.0.0.0", "{b}");
    assert_eq!(
        fetch(host.at(port)).expect("outside client to an allowed port"),
        "secret from the sandbox"
    );
    let f = e.finish();
    assert!(f.status.success(), "{f:#?}");
    // Another port is still held to loopback.
    let mut e = brief_server(
        &["--allow-inbound", &port.to_string()],
        "0.0.0.0",
        port + 100,
    );
    assert_eq!(bound(&mut e)["local"], "127.0.0.1");
    refused(host.at(port + 100));
    e.finish();
}

// (4) A host process connects to a sandbox's loopback listener.
#[test]
fn inbound_host_process_reaches_a_loopback_listener() {
    let port = 17774;
    let mut e = server(&[], "127.0.0.1", port);
    assert_eq!(bound(&mut e)["local"], "127.0.0.1");
    assert_eq!(
        fetch(SocketAddr::from(([127, 0, 0, 1], port))).expect("host process to loopback"),
        "secret from the sandbox"
    );
    let f = e.finish();
    assert!(f.status.success(), "{f:#?}");
    assert!(bind_denials(&f).is_empty());
}

// (5) IPv6: `::` (dual-stack) becomes `::1`, so the v4 host address is refused too;
//     `::ffff:198.19.x.y` is judged as IPv4 and refused; `::ffff:127.0.0.1` passes.
#[test]
fn inbound_ipv6_wildcard_and_v4_mapped() {
    let port = 17775;
    let host = HostAddr::new();
    let mut e = server(&[], "::", port);
    assert_eq!(bound(&mut e)["local"], "::1");
    refused(host.at(port));
    assert_eq!(
        fetch("[::1]:17775".parse().unwrap()).expect("host process to ::1"),
        "secret from the sandbox"
    );
    e.finish();

    let mapped = format!("::ffff:{}", host.addr);
    let mut e = server(&[], &mapped, port);
    let b = bound(&mut e);
    assert_eq!(b["errno"], libc::EPERM, "{b}");
    let f = e.finish();
    assert!(
        bind_denials(&f)
            .iter()
            .any(|r| r["dst"] == host.at(port).to_string() && r["pid"] == b["pid"]),
        "{f:#?}"
    );

    let mut e = brief_server(&[], "::ffff:127.0.0.1", port);
    assert_eq!(bound(&mut e)["local"], "::ffff:127.0.0.1");
    e.finish();
}

// (6) --strict: the same rules, and an allowed port's replies pass the packet backstop.
#[test]
fn inbound_strict_applies_the_same_rules() {
    let port = 17776;
    wildcard_is_loopback(&["--strict"], port);

    let host = HostAddr::new();
    let mut e = server(&["--strict"], &host.addr.to_string(), port);
    assert_eq!(bound(&mut e)["errno"], libc::EPERM);
    e.finish();

    let mut e = server(
        &["--strict", "--allow-inbound", &port.to_string()],
        "0.0.0.0",
        port,
    );
    assert_eq!(bound(&mut e)["local"], "0.0.0.0");
    assert_eq!(
        fetch(host.at(port)).expect("outside client to an allowed port under --strict"),
        "secret from the sandbox"
    );
    e.finish();
}

// (6) --isolate-net: the same rules inside the sandbox's own namespace (EPERM, not
//     EADDRNOTAVAIL: the hook refuses before the address is even looked up).
#[test]
fn inbound_isolate_net_applies_the_same_rules() {
    let port = 17777;
    let mut e = brief_server(&["--isolate-net"], "0.0.0.0", port);
    assert_eq!(bound(&mut e)["local"], "127.0.0.1");
    e.finish();

    let mut e = brief_server(&["--isolate-net"], "198.18.255.254", port);
    assert_eq!(bound(&mut e)["errno"], libc::EPERM);
    e.finish();

    let mut e = brief_server(
        &["--isolate-net", "--allow-inbound", &port.to_string()],
        "0.0.0.0",
        port,
    );
    assert_eq!(bound(&mut e)["local"], "0.0.0.0");
    e.finish();
}

// Ordinary clients are untouched: port 0 binds (UDP and TCP, wildcard or a specific
// address, as `curl --interface` does) pass as asked.
#[test]
fn inbound_port_zero_binds_are_left_alone() {
    let host = HostAddr::new();
    let script = format!(
        r#"
import json, socket
out = {{}}
for name, fam, typ, host in [("udp4", socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0"),
                             ("udp6", socket.AF_INET6, socket.SOCK_DGRAM, "::"),
                             ("tcp_src", socket.AF_INET, socket.SOCK_STREAM, "{addr}")]:
    s = socket.socket(fam, typ)
    s.bind((host, 0))
    out[name] = s.getsockname()[0]
print(json.dumps(out), flush=True)
"#,
        addr = host.addr
    );
    let f = Egress::run(&[], &["python3", "-c", &script]).finish();
    assert!(f.status.success(), "{f:#?}");
    let out = f.client_json();
    assert_eq!(
        out,
        json!({"udp4": "0.0.0.0", "udp6": "::", "tcp_src": host.addr.to_string()})
    );
    assert!(bind_denials(&f).is_empty(), "{f:#?}");
}

// (7) The policy file's `inbound = [PORT]` under `egress run --policy`.
#[test]
fn inbound_policy_file_key() {
    let port = 17778;
    let host = HostAddr::new();
    let dir = TempDir::new("inbound-policy");
    let policy = dir.path("policy.toml");
    std::fs::write(&policy, format!("[sandbox.web]\ninbound = [{port}]\n")).unwrap();
    let policy = policy.display().to_string();
    let mut e = server(&["--policy", &policy], "0.0.0.0", port);
    assert_eq!(bound(&mut e)["local"], "0.0.0.0");
    assert_eq!(
        fetch(host.at(port)).expect("outside client to a port the policy allows"),
        "secret from the sandbox"
    );
    e.finish();
    // A port the policy does not name is held to loopback.
    let mut e = brief_server(&["--policy", &policy], "0.0.0.0", port + 100);
    assert_eq!(bound(&mut e)["local"], "127.0.0.1");
    refused(host.at(port + 100));
    e.finish();
}

// The daemon applies a policy's `inbound` to its sandbox (in its own netns, reached over
// its veth), and removing the sandbox deletes exactly its rows.
#[test]
fn inbound_daemon_applies_policy_and_removes_its_rows() {
    let port = 17779;
    let cg = Cgroup::new("inbound");
    let cg_other = Cgroup::new("inbound-other");
    let ns = Netns::with_veth();
    let d = Daemon::start(DaemonSpec {
        policy: format!(
            "[sandbox.web]\ninbound = [{port}]\n[sandbox.other]\ninbound = [{port}, {}]\n",
            port + 1
        ),
        ..Default::default()
    });
    let id = d.add(json!({"name": "web", "cgroup": cg.rel(), "netns": ns.path}))["id"]
        .as_u64()
        .unwrap() as u32;
    let other = d.add(json!({"name": "other", "cgroup": cg_other.rel()}))["id"]
        .as_u64()
        .unwrap() as u32;
    let rows = d.inbound_rows();
    assert!(
        rows.iter()
            .any(|k| k.sandbox == id && k.port == u32::from(port)),
        "{rows:?}"
    );
    let mut theirs: Vec<u32> = rows
        .iter()
        .filter(|k| k.sandbox == other)
        .map(|k| k.port)
        .collect();
    theirs.sort_unstable();
    assert_eq!(theirs, [u32::from(port), u32::from(port) + 1], "{rows:?}");

    let run = |host: &str, port: u16, tag: &str| {
        let out = d.path(tag);
        let bg = Background::start(
            &cg,
            Some(&ns),
            &["/usr/bin/python3", "-c", SERVER, host, &port.to_string()],
            &out,
        );
        let first = wait_for("the sandboxed server to bind", || {
            let text = std::fs::read_to_string(&out).map_err(|e| e.to_string())?;
            text.lines()
                .next()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .ok_or_else(|| "nothing yet".to_string())
        });
        (bg, first)
    };
    let sandbox_at = |port: u16| SocketAddr::new(ns.sandbox_ip.into(), port);
    let (bg, b) = run("0.0.0.0", port, "allowed");
    assert_eq!(b["local"], "0.0.0.0", "{b}");
    assert_eq!(
        fetch(sandbox_at(port)).expect("host to the sandbox's allowed port over the veth"),
        "secret from the sandbox"
    );
    bg.wait();
    let (bg, b) = run("0.0.0.0", port + 100, "held");
    assert_eq!(b["local"], "127.0.0.1", "{b}");
    refused(sandbox_at(port + 100));
    drop(bg);

    d.remove("web");
    let rows = d.inbound_rows();
    assert!(!rows.iter().any(|k| k.sandbox == id), "{rows:?}");
    assert_eq!(
        rows.iter().filter(|k| k.sandbox == other).count(),
        2,
        "removing one sandbox leaves another's rows: {rows:?}"
    );
    d.remove("other");
    assert!(d.inbound_rows().is_empty(), "{:?}", d.inbound_rows());
}
