//! DNS under policy, end to end: every port-53 query from the sandbox goes to egress's DNS
//! listener whatever address it was sent to, only permitted names reach the upstream (a
//! [`StubResolver`] per test), and the other ways out (QUIC, DoT, DoH, a server inside the
//! sandbox) are closed.
//!
//! Each test owns its loopback addresses (127.0.6N.x and 127.0.7N.x). Whenever a client
//! would ask the host's own resolver (getent, getaddrinfo, dig without @, curl by name), or a
//! resolver address that is not loopback, the sandbox gets `--isolate-net`: a namespace
//! holding only `lo`, so a query the redirect missed can never leave the machine.

use std::{
    collections::BTreeSet,
    io::{ErrorKind, Read as _},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    time::Duration,
};

use egress_tests::{
    dns::StubResolver,
    origin::{Origin, TestCa},
    testclient, touch, Egress, Finished, TempDir, Upstream,
};
use serde_json::Value;

const PY: &str = "/usr/bin/python3";
const DIG: &str = "/usr/bin/dig";
const NSLOOKUP: &str = "/usr/bin/nslookup";

/// Resolver addresses that exist nowhere (TEST-NET-1 and the IPv6 documentation prefix):
/// only used under `--isolate-net`.
const RESOLVER4: &str = "192.0.2.53";
const RESOLVER6: &str = "2001:db8::53";

/// Printed between the outputs of the commands of one sandboxed script.
const SEP: &str = "=====";

/// Raw DNS for the Python scripts: queries packed by hand, so that what goes on the wire is
/// exactly what the test says, with no resolver library retrying, appending search domains
/// or picking the server.
const PY_DNS: &str = r#"
import json, os, random, socket, struct, sys

def query(name, qtype=1, edns=False):
    qid = random.randrange(1, 65536)
    head = struct.pack('>HHHHHH', qid, 0x0100, 1, 0, 0, 1 if edns else 0)
    qname = b''.join(bytes([len(l)]) + l.encode() for l in name.split('.')) + b'\0'
    opt = b'\0' + struct.pack('>HHIH', 41, 1232, 0, 0) if edns else b''
    return qid, head + qname + struct.pack('>HH', qtype, 1) + opt

def skip_name(m, i):
    while m[i]:
        if m[i] & 0xc0 == 0xc0:
            return i + 2
        i += 1 + m[i]
    return i + 1

def parse(m):
    qid, flags, qd, an, ns, ar = struct.unpack('>HHHHHH', m[:12])
    i = 12
    for _ in range(qd):
        i = skip_name(m, i) + 4
    answers, ede = [], []
    for k in range(an + ns + ar):
        i = skip_name(m, i)
        rtype, _, _, n = struct.unpack('>HHIH', m[i:i + 10])
        data = m[i + 10:i + 10 + n]
        i += 10 + n
        if k < an and rtype == 1:
            answers.append(socket.inet_ntop(socket.AF_INET, data))
        elif k < an and rtype == 28:
            answers.append(socket.inet_ntop(socket.AF_INET6, data))
        elif rtype == 41:
            j = 0
            while j + 4 <= len(data):
                code, ln = struct.unpack('>HH', data[j:j + 4])
                if code == 15 and ln >= 2:
                    ede.append(struct.unpack('>H', data[j + 4:j + 6])[0])
                j += 4 + ln
    return {'id': qid, 'rcode': flags & 0xf, 'tc': bool(flags & 0x200), 'answers': answers, 'ede': ede}

def udp_ask(sock, name, qtype=1, edns=False, to=None):
    qid, q = query(name, qtype, edns)
    if to is None:
        sock.send(q)
    else:
        sock.sendto(q, to)
    data, frm = sock.recvfrom(65535)
    r = parse(data)
    r['from'] = list(frm[:2])
    r['id_ok'] = r['id'] == qid
    return r

def tcp_ask(sock, name, qtype=1):
    qid, q = query(name, qtype)
    sock.sendall(struct.pack('>H', len(q)) + q)
    def exact(n):
        b = b''
        while len(b) < n:
            c = sock.recv(n - len(b))
            if not c:
                raise EOFError('the resolver closed the TCP connection')
            b += c
        return b
    r = parse(exact(struct.unpack('>H', exact(2))[0]))
    r['id_ok'] = r['id'] == qid
    return r

def emit(**kw):
    print(json.dumps(kw), flush=True)
"#;

fn need(bin: &str) {
    assert!(
        Path::new(bin).exists(),
        "{bin} is required by this test and missing; `cargo xtask setup` installs it \
         (dig and nslookup come with bind9-dnsutils)"
    );
}

fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("test address {s:?}: {e}"))
}

/// `python3 -c` with the raw-DNS helpers loaded.
fn py(script: &str) -> Vec<String> {
    need(PY);
    vec![PY.into(), "-c".into(), format!("{PY_DNS}\n{script}")]
}

/// Single-quotes arguments for `sh -c`.
fn sh(args: &[&str]) -> String {
    args.iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One shell running `commands` in sequence, with [`SEP`] printed between their outputs.
fn script(commands: &[String]) -> Vec<String> {
    let joined = commands.join(&format!("; echo {SEP}; "));
    vec!["sh".into(), "-c".into(), joined]
}

/// The outputs of a [`script`], one per command.
fn sections(f: &Finished, n: usize) -> Vec<&str> {
    let parts: Vec<&str> = f.stdout.split(&format!("{SEP}\n")).collect();
    assert_eq!(
        parts.len(),
        n,
        "expected the output of {n} commands; {f:#?}"
    );
    parts
}

/// `--dns-upstream STUB` and `extra`.
fn args(stub: &StubResolver, extra: &[&str]) -> Vec<String> {
    let mut v = vec!["--dns-upstream".to_owned(), stub.addr().to_string()];
    v.extend(extra.iter().map(|s| (*s).to_owned()));
    v
}

fn run(args: &[String], cmd: &[String]) -> Finished {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let c: Vec<&str> = cmd.iter().map(String::as_str).collect();
    Egress::run(&a, &c).finish()
}

/// [`run`], for a command that must succeed.
fn run_ok(args: &[String], cmd: &[String]) -> Finished {
    let f = run(args, cmd);
    assert!(f.status.success(), "the sandboxed command failed: {f:#?}");
    f
}

/// The `dns` audit records for exactly this name.
fn dns<'a>(f: &'a Finished, name: &str) -> Vec<&'a Value> {
    f.audit_of("dns")
        .into_iter()
        .filter(|r| r["name"] == name)
        .collect()
}

/// A record's `answers`, sorted.
fn answers(r: &Value) -> Vec<String> {
    let mut v: Vec<String> = r["answers"]
        .as_array()
        .unwrap_or_else(|| panic!("dns record without an answers array: {r}"))
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap_or_else(|| panic!("answer is not a string: {r}"))
                .to_owned()
        })
        .collect();
    v.sort();
    v
}

/// Every record of `name` was allowed, answered NOERROR, went over `transport`; the A (or
/// AAAA) ones carry `want`. Returns how many there were.
fn assert_allowed(f: &Finished, name: &str, qtype: &str, want: &[&str], transport: &str) -> usize {
    let recs = dns(f, name);
    assert!(
        !recs.is_empty(),
        "no dns audit record for {name}; audit: {:#?}\nstdout: {}\nstderr: {}",
        f.audit,
        f.stdout,
        f.stderr
    );
    for r in &recs {
        assert_eq!(r["decision"], "allow", "{name} is permitted: {r}");
        assert_eq!(r["rcode"], "NOERROR", "{r}");
        assert_eq!(r["transport"], transport, "{r}");
        assert_eq!(r["sandbox"], "run", "{r}");
        assert!(r["suspect"].is_null(), "{name} is no tunnel: {r}");
        assert!(r["ts"].is_string(), "{r}");
        let client: Result<SocketAddr, _> = r["client"].as_str().unwrap_or("").parse();
        assert!(
            client.is_ok(),
            "client is the querying socket's address: {r}"
        );
    }
    let of_type: Vec<&&Value> = recs.iter().filter(|r| r["qtype"] == qtype).collect();
    assert!(
        !of_type.is_empty(),
        "no {qtype} query for {name} was audited: {recs:#?}"
    );
    let mut want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
    want.sort();
    for r in of_type {
        assert_eq!(answers(r), want, "answers for {name} {qtype}: {r}");
    }
    recs.len()
}

/// Every record of `name` was denied with NXDOMAIN and no answers. Returns how many.
fn assert_denied(f: &Finished, name: &str) -> usize {
    let recs = dns(f, name);
    assert!(
        !recs.is_empty(),
        "no dns audit record for the denied {name}; audit: {:#?}\nstdout: {}\nstderr: {}",
        f.audit,
        f.stdout,
        f.stderr
    );
    for r in &recs {
        assert_eq!(r["decision"], "deny", "{name} is not permitted: {r}");
        assert_eq!(r["rcode"], "NXDOMAIN", "{r}");
        assert!(answers(r).is_empty(), "a denied name has no answers: {r}");
        assert!(
            r["reason"].is_string(),
            "a denial says why in `reason`: {r}"
        );
    }
    recs.len()
}

fn assert_stub_never_saw(stub: &StubResolver, name: &str) {
    let seen = stub.queries();
    assert!(
        !seen.iter().any(|(n, _, _)| n.contains(name)),
        "{name} is denied, yet the upstream was asked about it: {seen:?}"
    );
}

/// The `sandbox removed` line egress logs at shutdown, with the DNS counters.
fn removed(f: &Finished) -> &Value {
    let lines = f.log_with("sandbox removed");
    assert_eq!(
        lines.len(),
        1,
        "one `sandbox removed` log line expected; logs: {:#?}",
        f.logs
    );
    lines[0]
}

fn counter(f: &Finished, field: &str) -> u64 {
    let line = removed(f);
    line[field]
        .as_u64()
        .unwrap_or_else(|| panic!("`sandbox removed` has no integer {field}: {line}"))
}

/// The pid egress logged for the command it exec'd.
fn command_pid(f: &Finished) -> Value {
    let started = f.log_with("command started");
    assert_eq!(started.len(), 1, "{:#?}", f.logs);
    started[0]["pid"].clone()
}

/// The host's first nameserver, port 53: what a client that reads /etc/resolv.conf (getent,
/// dig without @) addresses.
fn host_resolver() -> SocketAddr {
    let conf = std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_else(|e| panic!("reading /etc/resolv.conf: {e}"));
    let ns = conf
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        .unwrap_or_else(|| panic!("/etc/resolv.conf names no nameserver:\n{conf}"));
    SocketAddr::new(ip(ns.split('%').next().unwrap()), 53)
}

/// The first JSON object a sandboxed Python script printed.
fn json_out(f: &Finished) -> Value {
    f.stdout
        .lines()
        .find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(Value::is_object)
        })
        .unwrap_or_else(|| panic!("no JSON from the sandboxed script; {f:#?}"))
}

/// What dig printed: status, the `SERVER:` line up to its `(`, and the answer records as
/// (name, type, data).
struct Dig<'a> {
    text: &'a str,
    status: &'a str,
    server: &'a str,
    answers: Vec<(&'a str, &'a str, &'a str)>,
}

fn dig(text: &str) -> Dig<'_> {
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("dig printed no status:\n{text}"));
    let server = text
        .lines()
        .find_map(|l| l.strip_prefix(";; SERVER: "))
        .unwrap_or_else(|| panic!("dig printed no SERVER line:\n{text}"));
    let mut answers = Vec::new();
    let mut lines = text.lines().skip_while(|l| *l != ";; ANSWER SECTION:");
    lines.next();
    for l in lines.take_while(|l| !l.trim().is_empty()) {
        let w: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(w.len(), 5, "unexpected answer line from dig: {l:?}\n{text}");
        answers.push((w[0], w[3], w[4]));
    }
    Dig {
        text,
        status,
        server,
        answers,
    }
}

impl Dig<'_> {
    fn assert(&self, status: &str, server: &str, answers: &[(&str, &str, &str)]) {
        assert_eq!(self.status, status, "dig status:\n{}", self.text);
        assert!(
            self.server.starts_with(&format!("{server}(")),
            "dig must report the resolver it asked, {server}:\n{}",
            self.text
        );
        assert_eq!(self.answers, answers, "dig answers:\n{}", self.text);
    }
}

// getent (glibc's NSS, as most programs resolve): the allowed name resolves to the stub's
// address and is audited with the process that asked; the denied one fails and never reaches
// the upstream.
#[test]
fn getent_resolves_allowed_names_only() {
    let stub = StubResolver::start(&[
        ("good.dns.test", ip("127.0.60.2")),
        ("evil.dns.test", ip("127.0.60.3")),
    ]);
    let a = args(&stub, &["--isolate-net", "--allow", "good.dns.test"]);
    let resolver = host_resolver().to_string();

    let f = run(
        &a,
        &["getent".into(), "hosts".into(), "good.dns.test".into()],
    );
    assert!(f.status.success(), "getent hosts good.dns.test: {f:#?}");
    let line: Vec<&str> = f.stdout.split_whitespace().collect();
    assert_eq!(line, ["127.0.60.2", "good.dns.test"], "{f:#?}");
    assert_allowed(&f, "good.dns.test", "A", &["127.0.60.2"], "udp");
    let pid = command_pid(&f);
    for r in dns(&f, "good.dns.test") {
        assert_eq!(r["pid"], pid, "the query is getent's own: {r}");
        assert_eq!(r["comm"], "getent", "{r}");
        assert_eq!(
            r["resolver"], resolver,
            "the resolver getent addressed: {r}"
        );
    }
    assert!(
        stub.queries()
            .contains(&("good.dns.test".into(), "A".into(), "udp")),
        "the permitted query went upstream: {:?}",
        stub.queries()
    );
    assert_eq!(counter(&f, "dns_refused"), 0, "{}", removed(&f));
    assert!(counter(&f, "dns_queries") >= 1, "{}", removed(&f));

    let f = run(
        &a,
        &["getent".into(), "hosts".into(), "evil.dns.test".into()],
    );
    assert_eq!(
        f.status.code(),
        Some(2),
        "getent exits 2 for a name that does not resolve: {f:#?}"
    );
    assert_eq!(f.stdout, "", "{f:#?}");
    assert_denied(&f, "evil.dns.test");
    let pid = command_pid(&f);
    for r in dns(&f, "evil.dns.test") {
        assert_eq!(r["pid"], pid, "{r}");
        assert_eq!(r["comm"], "getent", "{r}");
        assert_eq!(r["resolver"], resolver, "{r}");
        assert!(r["suspect"].is_null(), "a short name is no tunnel: {r}");
    }
    assert_stub_never_saw(&stub, "evil.dns.test");
    assert!(counter(&f, "dns_refused") >= 1, "{}", removed(&f));
}

// Python's socket.getaddrinfo: every address of an allowed name; gaierror for a denied one.
#[test]
fn python_getaddrinfo_follows_the_policy() {
    let stub = StubResolver::start(&[
        ("good.dns.test", ip("127.0.61.2")),
        ("good.dns.test", ip("127.0.61.4")),
        ("evil.dns.test", ip("127.0.61.3")),
    ]);
    let f = run_ok(
        &args(&stub, &["--isolate-net", "--allow", "good.dns.test"]),
        &py(r#"
def res(name):
    try:
        return sorted({a[4][0] for a in socket.getaddrinfo(name, 443, socket.AF_INET, socket.SOCK_STREAM)})
    except socket.gaierror as e:
        return {'gaierror': e.errno}
emit(pid=os.getpid(), good=res('good.dns.test'), evil=res('evil.dns.test'))
"#),
    );
    let out = json_out(&f);
    assert_eq!(
        out["good"],
        serde_json::json!(["127.0.61.2", "127.0.61.4"]),
        "{f:#?}"
    );
    assert_eq!(
        out["evil"]["gaierror"],
        libc::EAI_NONAME,
        "a denied name is unknown (EAI_NONAME): {f:#?}"
    );
    assert_allowed(
        &f,
        "good.dns.test",
        "A",
        &["127.0.61.2", "127.0.61.4"],
        "udp",
    );
    assert_denied(&f, "evil.dns.test");
    for r in [dns(&f, "good.dns.test"), dns(&f, "evil.dns.test")].concat() {
        assert_eq!(r["comm"], "python3", "{r}");
        assert_eq!(r["pid"], out["pid"], "{r}");
        assert_eq!(r["qtype"], "A", "AF_INET asks for A only: {r}");
    }
    assert_stub_never_saw(&stub, "evil.dns.test");
}

// dig and nslookup, to the host's resolver and to another one: answers follow the policy, a
// blocked name carries EDE 15 (Blocked) for an EDNS client, and each tool reports the
// resolver it addressed, not egress's listener.
#[test]
fn dig_and_nslookup_see_the_resolver_they_asked() {
    need(DIG);
    need(NSLOOKUP);
    let stub = StubResolver::start(&[
        ("good.dns.test", ip("127.0.62.2")),
        ("evil.dns.test", ip("127.0.62.3")),
    ]);
    let f = run_ok(
        &args(&stub, &["--isolate-net", "--allow", "good.dns.test"]),
        &script(&[
            "dig good.dns.test".into(),
            format!("dig @{RESOLVER4} evil.dns.test"),
            format!("dig @{RESOLVER4} good.dns.test"),
            format!("nslookup good.dns.test {RESOLVER4}; echo rc=$?"),
            format!("nslookup evil.dns.test {RESOLVER4}; echo rc=$?"),
        ]),
    );
    let out = sections(&f, 5);
    let host = host_resolver();
    let host_dig = format!("{}#53", host.ip());
    let host = host.to_string();
    let other_dig = format!("{RESOLVER4}#53");

    dig(out[0]).assert(
        "NOERROR",
        &host_dig,
        &[("good.dns.test.", "A", "127.0.62.2")],
    );
    let blocked = dig(out[1]);
    blocked.assert("NXDOMAIN", &other_dig, &[]);
    assert!(
        out[1].contains("EDE: 15"),
        "dig sends EDNS, so the refusal carries EDE 15 (Blocked):\n{}",
        out[1]
    );
    // Its text says what would allow the name: the flag of `egress run`.
    assert!(
        out[1].contains(
            "egress: host is not in the allowlist; to allow it, run with --allow evil.dns.test"
        ),
        "the EDE text names the flag that would allow the name:\n{}",
        out[1]
    );
    dig(out[2]).assert(
        "NOERROR",
        &other_dig,
        &[("good.dns.test.", "A", "127.0.62.2")],
    );

    let ns_good = out[3];
    assert!(
        ns_good.contains(&format!("Server:\t\t{RESOLVER4}"))
            && ns_good.contains("Name:\tgood.dns.test\nAddress: 127.0.62.2")
            && ns_good.trim_end().ends_with("rc=0"),
        "nslookup good.dns.test:\n{ns_good}\nstderr: {}",
        f.stderr
    );
    let ns_evil = out[4];
    assert!(
        ns_evil.contains("server can't find evil.dns.test: NXDOMAIN")
            && ns_evil.trim_end().ends_with("rc=1"),
        "nslookup evil.dns.test:\n{ns_evil}\nstderr: {}",
        f.stderr
    );

    assert_allowed(&f, "good.dns.test", "A", &["127.0.62.2"], "udp");
    assert_denied(&f, "evil.dns.test");
    let resolvers: BTreeSet<&str> = dns(&f, "good.dns.test")
        .iter()
        .filter_map(|r| r["resolver"].as_str())
        .collect();
    let want: BTreeSet<&str> = [host.as_str(), "192.0.2.53:53"].into();
    assert_eq!(
        resolvers, want,
        "the audit names the resolver each client addressed: {:#?}",
        f.audit
    );
    assert!(
        dns(&f, "evil.dns.test")
            .iter()
            .all(|r| r["resolver"] == "192.0.2.53:53"),
        "{:#?}",
        f.audit
    );
    assert_stub_never_saw(&stub, "evil.dns.test");
}

// Raw UDP, unconnected: sendto a resolver that is not the host's, and recvfrom says the
// answer came from it. Connected: getpeername says the same.
#[test]
fn raw_udp_queries_answer_from_the_resolver_addressed() {
    let stub = StubResolver::start(&[
        ("good.dns.test", ip("127.0.63.2")),
        ("evil.dns.test", ip("127.0.63.3")),
    ]);
    let f = run_ok(
        &args(&stub, &["--isolate-net", "--allow", "good.dns.test"]),
        &py(&format!(
            r#"
R = ('{RESOLVER4}', 53)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
good = udp_ask(u, 'good.dns.test', to=R)
evil = udp_ask(u, 'evil.dns.test', edns=True, to=R)
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.settimeout(5)
c.connect(R)
peer = list(c.getpeername())
connected = udp_ask(c, 'good.dns.test')
emit(pid=os.getpid(), good=good, evil=evil, peer=peer, connected=connected)
"#
        )),
    );
    let out = json_out(&f);
    let resolver = serde_json::json!([RESOLVER4, 53]);
    for key in ["good", "connected"] {
        let r = &out[key];
        assert_eq!(r["id_ok"], true, "{key}: reply id: {f:#?}");
        assert_eq!(r["rcode"], 0, "{key}: {f:#?}");
        assert_eq!(
            r["answers"],
            serde_json::json!(["127.0.63.2"]),
            "{key}: {f:#?}"
        );
        assert_eq!(
            r["from"], resolver,
            "{key}: recvfrom must name the resolver the query was sent to: {f:#?}"
        );
    }
    let evil = &out["evil"];
    assert_eq!(evil["rcode"], 3, "NXDOMAIN for a denied name: {f:#?}");
    assert_eq!(evil["answers"], serde_json::json!([]), "{f:#?}");
    assert_eq!(evil["from"], resolver, "{f:#?}");
    assert_eq!(
        evil["ede"],
        serde_json::json!([15]),
        "an EDNS query is told why: Extended DNS Error 15 (Blocked): {f:#?}"
    );
    assert_eq!(
        out["peer"], resolver,
        "getpeername on a connected UDP socket names the resolver: {f:#?}"
    );

    assert_eq!(
        assert_allowed(&f, "good.dns.test", "A", &["127.0.63.2"], "udp"),
        2
    );
    assert_eq!(assert_denied(&f, "evil.dns.test"), 1);
    for r in [dns(&f, "good.dns.test"), dns(&f, "evil.dns.test")].concat() {
        assert_eq!(r["resolver"], "192.0.2.53:53", "{r}");
        assert_eq!(r["comm"], "python3", "{r}");
        assert_eq!(r["pid"], out["pid"], "{r}");
    }
    assert_stub_never_saw(&stub, "evil.dns.test");
}

// DNS over TCP (dig +tcp, and two length-prefixed queries on one Python connection) is
// captured like UDP and audited as tcp.
#[test]
fn dns_over_tcp_is_answered_and_audited() {
    need(DIG);
    let stub = StubResolver::start(&[
        ("good.dns.test", ip("127.0.64.2")),
        ("evil.dns.test", ip("127.0.64.3")),
    ]);
    let python = py(&format!(
        r#"
t = socket.create_connection(('{RESOLVER4}', 53), timeout=5)
emit(pid=os.getpid(), peer=list(t.getpeername()), good=tcp_ask(t, 'good.dns.test'), evil=tcp_ask(t, 'evil.dns.test'))
"#
    ));
    let python: Vec<&str> = python.iter().map(String::as_str).collect();
    let f = run_ok(
        &args(&stub, &["--isolate-net", "--allow", "good.dns.test"]),
        &script(&[
            format!("dig +tcp @{RESOLVER4} good.dns.test"),
            format!("dig +tcp @{RESOLVER4} evil.dns.test"),
            sh(&python),
        ]),
    );
    let out = sections(&f, 3);
    let server = format!("{RESOLVER4}#53");
    let good = dig(out[0]);
    good.assert("NOERROR", &server, &[("good.dns.test.", "A", "127.0.64.2")]);
    assert!(good.server.ends_with("(TCP)"), "{}", out[0]);
    let evil = dig(out[1]);
    evil.assert("NXDOMAIN", &server, &[]);
    assert!(evil.server.ends_with("(TCP)"), "{}", out[1]);

    let py_out: Value = serde_json::from_str(out[2].trim())
        .unwrap_or_else(|e| panic!("no JSON from the Python TCP client ({e}); {f:#?}"));
    assert_eq!(
        py_out["peer"],
        serde_json::json!([RESOLVER4, 53]),
        "getpeername on the TCP socket names the resolver: {f:#?}"
    );
    assert_eq!(py_out["good"]["id_ok"], true, "{f:#?}");
    assert_eq!(py_out["good"]["rcode"], 0, "{f:#?}");
    assert_eq!(
        py_out["good"]["answers"],
        serde_json::json!(["127.0.64.2"]),
        "{f:#?}"
    );
    assert_eq!(py_out["evil"]["rcode"], 3, "{f:#?}");

    assert_eq!(
        assert_allowed(&f, "good.dns.test", "A", &["127.0.64.2"], "tcp"),
        2,
        "one from dig, one from Python"
    );
    assert_eq!(assert_denied(&f, "evil.dns.test"), 2);
    for r in dns(&f, "evil.dns.test") {
        assert_eq!(r["transport"], "tcp", "{r}");
        assert_eq!(r["resolver"], "192.0.2.53:53", "{r}");
    }
    assert!(
        dns(&f, "good.dns.test")
            .iter()
            .chain(dns(&f, "evil.dns.test").iter())
            .any(|r| r["pid"] == py_out["pid"] && r["comm"] == "python3"),
        "{:#?}",
        f.audit
    );
    assert_stub_never_saw(&stub, "evil.dns.test");
}

// An upstream answer too big for UDP (TC set) is fetched again over TCP by egress: the
// client gets the whole answer over UDP without retrying itself.
#[test]
fn a_truncated_upstream_answer_is_retried_over_tcp() {
    need(DIG);
    let stub = StubResolver::start(&[("big.dns.test", ip("127.0.65.2"))]);
    stub.set_truncate_udp(true);
    let f = run(
        &args(&stub, &["--isolate-net", "--allow", "big.dns.test"]),
        &[DIG.into(), format!("@{RESOLVER4}"), "big.dns.test".into()],
    );
    assert!(f.status.success(), "{f:#?}");
    let d = dig(&f.stdout);
    d.assert(
        "NOERROR",
        &format!("{RESOLVER4}#53"),
        &[("big.dns.test.", "A", "127.0.65.2")],
    );
    assert!(
        d.server.ends_with("(UDP)") && !f.stdout.contains("Truncated"),
        "egress, not dig, should have retried over TCP:\n{}",
        f.stdout
    );
    assert!(
        stub.queries()
            .contains(&("big.dns.test".into(), "A".into(), "tcp")),
        "egress asked the upstream again over TCP: {:?}",
        stub.queries()
    );
    assert_allowed(&f, "big.dns.test", "A", &["127.0.65.2"], "udp");
}

// UDP to 443 (QUIC, HTTP/3) is refused in the kernel, v4 and v6, sendto and connect alike,
// and audited; nothing arrives at the listener.
#[test]
fn udp_to_443_is_refused_in_the_kernel() {
    let quic = UdpSocket::bind("127.0.66.2:443")
        .unwrap_or_else(|e| panic!("bind a UDP listener on 127.0.66.2:443: {e}"));
    // No query is expected; the stub keeps egress from ever using the host's resolver.
    let stub = StubResolver::start(&[]);
    let f = run_ok(
        &args(&stub, &["--allow", "*"]),
        &py(r#"
def attempt(family, op, dst):
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if op == 'sendto':
            s.sendto(b'\xc0quic initial', dst)
        else:
            s.connect(dst)
            s.send(b'\xc0quic initial')
        return 'sent'
    except OSError as e:
        return e.errno
emit(pid=os.getpid(),
     sendto4=attempt(socket.AF_INET, 'sendto', ('127.0.66.2', 443)),
     connect4=attempt(socket.AF_INET, 'connect', ('127.0.66.2', 443)),
     sendto6=attempt(socket.AF_INET6, 'sendto', ('::1', 443)))
"#),
    );
    let out = json_out(&f);
    for key in ["sendto4", "connect4", "sendto6"] {
        assert_eq!(
            out[key],
            libc::EPERM,
            "{key} to port 443 must fail with EPERM: {f:#?}"
        );
    }
    quic.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    let got = quic.recv_from(&mut buf);
    assert!(
        matches!(&got, Err(e) if e.kind() == ErrorKind::WouldBlock),
        "a datagram reached 127.0.66.2:443: {got:?}"
    );
    let denied = f.audit_of("kernel_deny");
    for dst in ["127.0.66.2:443", "[::1]:443"] {
        assert!(
            denied.iter().any(|r| r["protocol"] == "udp"
                && r["dst"] == dst
                && r["pid"] == out["pid"]
                && r["sandbox"] == "run"),
            "no kernel_deny record for UDP to {dst}: {denied:#?}"
        );
    }
}

// Port 0: glibc's address-selection probe connects a UDP socket to port 0 and sends nothing,
// so the connect is let through; a send on such a socket passes no sendmsg hook and must be
// dropped by the cgroup_skb program. TCP to port 0 is refused like any other port.
#[test]
fn udp_sends_to_port_zero_are_dropped() {
    let stub = StubResolver::start(&[("zero.dns.test", ip("127.0.73.2"))]);
    let f = run_ok(
        &args(&stub, &["--isolate-net", "--allow", "zero.dns.test"]),
        &py(r#"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(('127.0.73.2', 0))
try:
    s.send(b'out through port zero')
    udp = 'sent'
except OSError as e:
    udp = e.errno
t = socket.socket()
try:
    t.connect(('127.0.73.2', 0))
    tcp = 'connected'
except OSError as e:
    tcp = e.errno
emit(pid=os.getpid(), udp=udp, tcp=tcp,
     resolved=socket.getaddrinfo('zero.dns.test', None, socket.AF_INET)[0][4][0])
"#),
    );
    let out = json_out(&f);
    assert_eq!(
        out["udp"],
        libc::EPERM,
        "the datagram must be dropped: {f:#?}"
    );
    assert_eq!(out["tcp"], libc::EPERM, "{f:#?}");
    assert_eq!(
        out["resolved"], "127.0.73.2",
        "the probe itself still works: {f:#?}"
    );
    let denied = f.audit_of("kernel_deny");
    for proto in ["udp", "tcp"] {
        assert!(
            denied.iter().any(|r| r["protocol"] == proto
                && r["dst"] == "127.0.73.2:0"
                && r["sandbox"] == "run"),
            "no kernel_deny record for {proto} to port 0: {denied:#?}"
        );
    }
}

// DNS over TLS (TCP 853) is refused with EPERM even with every host allowed.
#[test]
fn dns_over_tls_port_853_is_refused() {
    let dot = Upstream::start("127.0.67.2:853");
    let stub = StubResolver::start(&[]);
    let tc = testclient().display().to_string();
    let f = run(
        &args(&stub, &["--allow", "*"]),
        &[tc, "connect-err".into(), "127.0.67.2:853".into()],
    );
    let out = f.client_json();
    assert_eq!(out["errno"], libc::EPERM, "{f:#?}");
    assert_eq!(dot.accepted(), 0, "nothing may reach the DoT port");
    let denied = f.audit_of("kernel_deny");
    assert!(
        denied.iter().any(|r| r["protocol"] == "tcp"
            && r["dst"] == "127.0.67.2:853"
            && r["pid"] == out["pid"]),
        "no kernel_deny record for TCP to 127.0.67.2:853: {denied:#?}"
    );
}

// IPv6 all the way: an AAAA answer, an IPv6 resolver address (dig -6), getaddrinfo with
// AF_INET6, and curl connecting over IPv6 to the name it resolved.
#[test]
fn aaaa_answers_ipv6_resolvers_and_ipv6_connects() {
    need(DIG);
    let stub = StubResolver::start(&[("good6.dns.test", ip("::1")), ("evil6.dns.test", ip("::1"))]);
    let origin = Origin::start("[::1]:0", None);
    let port = origin.addr().port().to_string();
    let python = py(&format!(
        "emit(addrs=sorted({{a[4][0] for a in socket.getaddrinfo('good6.dns.test', {port}, \
         socket.AF_INET6, socket.SOCK_STREAM)}}))"
    ));
    let python: Vec<&str> = python.iter().map(String::as_str).collect();
    let f = run_ok(
        &args(
            &stub,
            &[
                "--isolate-net",
                "--allow",
                "good6.dns.test",
                "--private-ok",
                "::1",
                "--intercept-port",
                &port,
            ],
        ),
        &script(&[
            format!("dig -6 @{RESOLVER6} AAAA good6.dns.test"),
            format!("dig -6 @{RESOLVER6} AAAA evil6.dns.test"),
            sh(&python),
            format!("curl -6 -sS -m 20 http://good6.dns.test:{port}/hello"),
        ]),
    );
    let out = sections(&f, 4);
    let server = format!("{RESOLVER6}#53");
    dig(out[0]).assert("NOERROR", &server, &[("good6.dns.test.", "AAAA", "::1")]);
    dig(out[1]).assert("NXDOMAIN", &server, &[]);
    let addrs: Value = serde_json::from_str(out[2].trim())
        .unwrap_or_else(|e| panic!("no JSON from getaddrinfo ({e}); {f:#?}"));
    assert_eq!(addrs["addrs"], serde_json::json!(["::1"]), "{f:#?}");
    assert_eq!(
        out[3],
        format!("hello from good6.dns.test:{port}"),
        "curl over IPv6 to the resolved name; {f:#?}"
    );
    let seen = origin.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].host, format!("good6.dns.test:{port}"));

    assert_allowed(&f, "good6.dns.test", "AAAA", &["::1"], "udp");
    assert!(
        dns(&f, "good6.dns.test")
            .iter()
            .any(|r| r["resolver"] == "[2001:db8::53]:53"),
        "dig -6 addressed an IPv6 resolver: {:#?}",
        f.audit
    );
    assert_denied(&f, "evil6.dns.test");
    assert!(
        dns(&f, "evil6.dns.test")
            .iter()
            .all(|r| r["resolver"] == "[2001:db8::53]:53" && r["qtype"] == "AAAA"),
        "{:#?}",
        f.audit
    );
    assert_stub_never_saw(&stub, "evil6.dns.test");
}

// Tunnelling: 100 queries with long random labels under a denied domain are all refused,
// flagged `suspect`, never forwarded, and counted; short names are not flagged.
#[test]
fn tunnelling_queries_are_refused_flagged_and_counted() {
    let stub = StubResolver::start(&[
        ("good.dns.test", ip("127.0.69.2")),
        ("www.tunnel.dns.test", ip("127.0.69.3")),
    ]);
    let f = run_ok(
        &args(&stub, &["--isolate-net", "--allow", "good.dns.test"]),
        &py(&format!(
            r#"
R = ('{RESOLVER4}', 53)
rng = random.Random(6969)
alnum = 'abcdefghijklmnopqrstuvwxyz0123456789'
names = ['%s.tunnel.dns.test' % ''.join(rng.choice(alnum) for _ in range(40 + i % 24)) for i in range(100)]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
replies = [udp_ask(s, n, to=R) for n in names]
emit(names=names,
     rcodes=[r['rcode'] for r in replies],
     ids_ok=all(r['id_ok'] for r in replies),
     good=udp_ask(s, 'good.dns.test', to=R),
     short=udp_ask(s, 'www.tunnel.dns.test', to=R))
"#
        )),
    );
    let out = json_out(&f);
    let names: BTreeSet<&str> = out["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 100, "{out}");
    assert_eq!(out["ids_ok"], true, "{out}");
    assert!(
        out["rcodes"].as_array().unwrap().iter().all(|c| c == 3),
        "every tunnelling query gets NXDOMAIN: {}",
        out["rcodes"]
    );
    assert_eq!(
        out["good"]["answers"],
        serde_json::json!(["127.0.69.2"]),
        "{out}"
    );
    assert_eq!(out["short"]["rcode"], 3, "{out}");

    let tunnel: Vec<&Value> = f
        .audit_of("dns")
        .into_iter()
        .filter(|r| {
            r["name"]
                .as_str()
                .is_some_and(|n| n.ends_with(".tunnel.dns.test") && n != "www.tunnel.dns.test")
        })
        .collect();
    assert_eq!(
        tunnel.len(),
        100,
        "one dns record per tunnelling query: {:#?}",
        f.audit
    );
    let audited: BTreeSet<&str> = tunnel.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(audited, names, "the audit names the queries that were sent");
    for r in &tunnel {
        assert_eq!(r["decision"], "deny", "{r}");
        assert_eq!(r["rcode"], "NXDOMAIN", "{r}");
        assert!(
            matches!(
                r["suspect"].as_str(),
                Some("long-label" | "high-entropy" | "long-name")
            ),
            "a {}-character random label is a tunnelling suspect: {r}",
            r["name"].as_str().unwrap().split('.').next().unwrap().len()
        );
    }
    assert_eq!(assert_denied(&f, "www.tunnel.dns.test"), 1);
    assert!(
        dns(&f, "www.tunnel.dns.test")[0]["suspect"].is_null(),
        "a plain denied name is not a suspect: {:#?}",
        f.audit
    );
    assert_allowed(&f, "good.dns.test", "A", &["127.0.69.2"], "udp");
    assert_stub_never_saw(&stub, "tunnel.dns.test");

    let line = removed(&f);
    assert_eq!(counter(&f, "dns_tunnel_suspects"), 100, "{line}");
    assert_eq!(counter(&f, "dns_refused"), 101, "{line}");
    assert_eq!(counter(&f, "dns_queries"), 102, "{line}");
}

/// Two TLS origins at 127.0.70.2 and .3, both presenting a leaf for good.dns.test: only the
/// policy can tell them apart.
struct PinSite {
    good: Origin,
    spoof: Origin,
    ca_file: PathBuf,
    dir: TempDir,
}

fn pin_site() -> PinSite {
    let dir = TempDir::new("pinning");
    let ca = TestCa::new("egress-test-origin-ca");
    let ca_file = dir.path("origin-ca.pem");
    ca.write_pem(&ca_file);
    let good = Origin::start("127.0.70.2:443", Some(ca.leaf(&["good.dns.test"])));
    let spoof = Origin::start("127.0.70.3:443", Some(ca.leaf(&["good.dns.test"])));
    PinSite {
        good,
        spoof,
        ca_file,
        dir,
    }
}

/// curl printing `CODE DENIED-HEADER` per request.
fn curl_code(extra: &[&str], url: &str) -> String {
    let mut v = vec![
        "curl",
        "-sS",
        "-m",
        "20",
        "-o",
        "/dev/null",
        "-w",
        // `\n` is curl's own escape, kept literal by the quoting.
        "%{http_code} %header{x-egress-denied}\\n",
    ];
    v.extend_from_slice(extra);
    v.push(url);
    sh(&v)
}

/// The `CODE DENIED-HEADER` lines of a script of [`curl_code`] calls.
fn code_lines(f: &Finished) -> Vec<String> {
    f.stdout
        .lines()
        .filter(|l| *l != SEP)
        .map(|l| l.trim().to_owned())
        .collect()
}

// DNS pinning: a request whose name did not resolve, through egress, to the address the
// client connected to is refused, whether the name was resolved elsewhere or never; the
// same spoof passes without pinning.
#[test]
fn dns_pinning_refuses_connections_to_addresses_the_name_did_not_resolve_to() {
    let s = pin_site();
    let stub = StubResolver::start(&[
        ("good.dns.test", ip("127.0.70.2")),
        ("evil.dns.test", ip("127.0.70.3")),
    ]);
    let ca = s.ca_file.display().to_string();
    let spoof = ["--resolve", "good.dns.test:443:127.0.70.3"];
    let url = "https://good.dns.test/hello";
    let both = script(&[curl_code(&[], url), curl_code(&spoof, url)]);
    let policy = |file: &str, pinning: &str| {
        let p = s.dir.path(file);
        std::fs::write(
            &p,
            format!(
                "[sandbox.run]\nprivate_ok = [\"127.0.0.0/8\"]\nallow = [\"good.dns.test\"]\n{pinning}"
            ),
        )
        .unwrap();
        p.display().to_string()
    };

    // Pinned by the policy file: the name resolved to .2, so .3 is refused.
    let pinned = policy("pinned.toml", "dns_pinning = true\n");
    let f = run(
        &args(
            &stub,
            &["--isolate-net", "--policy", &pinned, "--upstream-ca", &ca],
        ),
        &both,
    );
    assert_eq!(code_lines(&f), ["200", "403 dns-pinning"], "{f:#?}");
    assert_eq!(s.good.requests().len(), 1, "{:?}", s.good.requests());
    assert!(
        s.spoof.requests().is_empty(),
        "a pinned-out request never reaches the other address: {:?}",
        s.spoof.requests()
    );
    let reqs = f.audit_of("request");
    assert_eq!(reqs.len(), 2, "{:#?}", f.audit);
    assert_eq!(reqs[0]["decision"], "allow", "{}", reqs[0]);
    assert_eq!(reqs[1]["decision"], "deny", "{}", reqs[1]);
    assert!(
        reqs[1]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("pinning")),
        "the refusal names DNS pinning: {}",
        reqs[1]
    );
    assert_allowed(&f, "good.dns.test", "A", &["127.0.70.2"], "udp");

    // Control: the same spoof without pinning goes through.
    let unpinned = policy("unpinned.toml", "");
    let f = run(
        &args(
            &stub,
            &["--isolate-net", "--policy", &unpinned, "--upstream-ca", &ca],
        ),
        &both,
    );
    assert_eq!(code_lines(&f), ["200", "200"], "{f:#?}");
    assert_eq!(s.spoof.requests().len(), 1, "{:?}", s.spoof.requests());

    // Pinned by the flag, and the name never resolved at all in this sandbox.
    let f = run(
        &args(
            &stub,
            &[
                "--isolate-net",
                "--dns-pinning",
                "--allow",
                "good.dns.test",
                "--private-ok",
                "127.0.0.0/8",
                "--upstream-ca",
                &ca,
            ],
        ),
        &script(&[curl_code(&spoof, url)]),
    );
    assert_eq!(code_lines(&f), ["403 dns-pinning"], "{f:#?}");
    assert_eq!(
        s.spoof.requests().len(),
        1,
        "still only the control's request"
    );
}

// The DoH guard: well-known DoH hosts and application/dns-message requests are refused even
// under --allow '*', and their names do not resolve; an exact allow entry lifts it for the
// host it names.
#[test]
fn doh_is_refused_even_when_everything_is_allowed() {
    let dir = TempDir::new("doh");
    let ca = TestCa::new("egress-test-origin-ca");
    let ca_file = dir.path("origin-ca.pem");
    ca.write_pem(&ca_file);
    let ca_file = ca_file.display().to_string();
    let origin = Origin::start(
        "127.0.71.2:443",
        Some(ca.leaf(&["dns.google", "cloudflare-dns.com", "ok.dns.test"])),
    );
    let stub = StubResolver::start(&[
        ("dns.google", ip("127.0.71.2")),
        ("ok.dns.test", ip("127.0.71.2")),
    ]);
    let google = ["--resolve", "dns.google:443:127.0.71.2"];
    let cloudflare = ["--resolve", "cloudflare-dns.com:443:127.0.71.2"];
    let ok = ["--resolve", "ok.dns.test:443:127.0.71.2"];
    let query = "dns-query?dns=AAABAAABAAAAAAAAA3d3dwdleGFtcGxlA2NvbQAAAQAB";
    let base = [
        "--isolate-net",
        "--private-ok",
        "127.0.0.0/8",
        "--upstream-ca",
        &ca_file,
    ];

    let f = run(
        &args(&stub, &[&base[..], &["--allow", "*"]].concat()),
        &script(&[
            curl_code(&google, &format!("https://dns.google/{query}")),
            curl_code(&cloudflare, &format!("https://cloudflare-dns.com/{query}")),
            curl_code(&ok, "https://ok.dns.test/hello"),
            curl_code(
                &[&ok[..], &["-H", "Accept: application/dns-message"]].concat(),
                "https://ok.dns.test/hello",
            ),
            curl_code(
                &[
                    &ok[..],
                    &[
                        "-H",
                        "Content-Type: application/dns-message",
                        "--data-binary",
                        "query",
                    ],
                ]
                .concat(),
                "https://ok.dns.test/hello",
            ),
            "getent hosts dns.google; echo getent=$?".into(),
        ]),
    );
    assert_eq!(
        code_lines(&f),
        ["403 doh", "403 doh", "200", "403 doh", "403 doh", "getent=2"],
        "DoH hosts and dns-message requests are refused under --allow '*'; {f:#?}"
    );
    let seen = origin.requests();
    assert_eq!(
        seen.len(),
        1,
        "only the plain request reaches the origin: {seen:?}"
    );
    assert_eq!(seen[0].host, "ok.dns.test");
    let denied = f
        .audit_of("request")
        .into_iter()
        .filter(|r| r["decision"] == "deny")
        .count();
    assert_eq!(denied, 4, "{:#?}", f.audit);
    assert_denied(&f, "dns.google");
    assert_stub_never_saw(&stub, "dns.google");

    // An exact entry for the host is the way to use it on purpose.
    let f = run(
        &args(&stub, &[&base[..], &["--allow", "dns.google"]].concat()),
        &script(&[curl_code(&google, "https://dns.google/hello")]),
    );
    assert_eq!(
        code_lines(&f),
        ["200"],
        "an exact allow lifts the DoH guard; {f:#?}"
    );
    assert_eq!(origin.requests().len(), 2);
}

/// What a [`strict_run`] saw.
struct StrictRun {
    f: Finished,
    /// What the host read from the sandboxed server, or why it could not.
    got: std::io::Result<String>,
    /// Connections the upstream behind the proxy accepted.
    proxied: usize,
}

/// A server in the sandbox on 127.0.72.2:PORT, which the host connects to.
fn strict_run(strict: bool, port: u16) -> StrictRun {
    let stub = StubResolver::start(&[("good.dns.test", ip("127.0.72.2"))]);
    let up = Upstream::start("127.0.72.3:80");
    let dir = TempDir::new("strict");
    let done = dir.path("done");
    let mut a = args(
        &stub,
        &[
            "--allow",
            "127.0.0.0/8",
            "--allow",
            "good.dns.test",
            "--private-ok",
            "127.0.0.0/8",
        ],
    );
    if strict {
        a.push("--strict".into());
    }
    // Serves until the test says done, then checks that DNS (to an unused loopback resolver
    // address) and the proxy still work.
    let cmd = py(&format!(
        r#"
import urllib.request
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(('127.0.72.2', {port}))
srv.listen(8)
srv.settimeout(0.1)
print('listening', flush=True)
accepted = 0
while not os.path.exists('{done}'):
    try:
        c, _ = srv.accept()
    except socket.timeout:
        continue
    accepted += 1
    c.sendall(b'hello from the sandbox')
    c.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
dns = udp_ask(u, 'good.dns.test', to=('127.0.0.153', 53))
body = urllib.request.urlopen('http://127.0.72.3/', timeout=10).read().decode()
emit(accepted=accepted, dns=dns, body=body)
"#,
        done = done.display()
    ));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let c: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let mut e = Egress::run(&a, &c);
    let first = e.wait_stdout_line();
    assert_eq!(first, "listening", "the sandboxed server did not start");
    let target: SocketAddr = format!("127.0.72.2:{port}").parse().unwrap();
    let got = TcpStream::connect_timeout(&target, Duration::from_secs(3)).and_then(|mut s| {
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    });
    touch(&done, "");
    StrictRun {
        f: e.finish(),
        got,
        proxied: up.accepted(),
    }
}

// --strict: a backstop in cgroup_skb/egress drops any packet from a sandbox socket that is
// not going to egress's listeners or an --allow-tcp allowance. A server in the sandbox can
// answer the host without it, and cannot with it; DNS and the proxy work either way.
#[test]
fn strict_drops_packets_that_bypass_the_proxy() {
    let StrictRun { f, got, proxied } = strict_run(false, 8072);
    assert_eq!(
        got.as_deref().ok(),
        Some("hello from the sandbox"),
        "without --strict the sandboxed server answers the host: {got:?}; {f:#?}"
    );
    let out = json_out(&f);
    assert_eq!(out["accepted"], 1, "{f:#?}");
    assert_eq!(
        out["dns"]["answers"],
        serde_json::json!(["127.0.72.2"]),
        "{f:#?}"
    );
    assert_eq!(out["body"], "hello from 127.0.72.3:80", "{f:#?}");
    assert_eq!(proxied, 1, "{f:#?}");
    assert_eq!(counter(&f, "strict_dropped"), 0, "{}", removed(&f));

    let StrictRun { f, got, proxied } = strict_run(true, 8073);
    assert_eq!(
        got.as_ref().map_err(std::io::Error::kind),
        Err(ErrorKind::TimedOut),
        "with --strict the server's SYN-ACK is dropped, so the host's connect times out: \
         {got:?}; {f:#?}"
    );
    let out = json_out(&f);
    assert_eq!(out["accepted"], 0, "{f:#?}");
    assert_eq!(
        out["dns"]["answers"],
        serde_json::json!(["127.0.72.2"]),
        "DNS still works under --strict: {f:#?}"
    );
    assert_eq!(
        out["body"], "hello from 127.0.72.3:80",
        "the proxy still works under --strict: {f:#?}"
    );
    assert_eq!(proxied, 1, "{f:#?}");
    assert!(
        counter(&f, "strict_dropped") > 0,
        "the dropped SYN-ACKs are counted: {}",
        removed(&f)
    );
}
