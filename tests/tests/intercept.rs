//! The TLS interceptor end to end: real clients (curl, Python, Node, openssl) inside a
//! sandbox, the real eBPF capture, and a loopback origin with its own test CA.
//!
//! Each test owns its loopback addresses (127.0.2N.2). Clients trust the egress CA only
//! through the environment `egress run` sets; egress trusts the origin through
//! `--upstream-ca`.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use egress_tests::{
    egress_bin,
    origin::{self_signed_untrusted, Origin, Site},
    Egress, Finished, TempDir, Upstream,
};
use serde_json::Value;

const PY: &str = "/usr/bin/python3";

/// An HTTPS origin named `origin.test` on `ip`.
fn site(ip: &str) -> Site {
    Site::start("origin", ip, &["origin.test"])
}

fn requests(f: &Finished) -> Vec<&Value> {
    f.logs
        .iter()
        .filter(|v| v["message"] == "request")
        .collect()
}

fn need(bin: &str) {
    assert!(
        Path::new(bin).exists(),
        "{bin} is required by this test and missing; `cargo xtask setup` installs it"
    );
}

#[test]
fn curl_http1_and_http2_trust_the_egress_ca_through_the_environment() {
    let s = site("127.0.20.2");
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let f = Egress::run(
            &s.args(&["--allow", "origin.test"]),
            &[
                "curl",
                "-sS",
                flag,
                "--resolve",
                &s.resolve("origin.test"),
                "-w",
                "\n%{http_version}",
                "https://origin.test/hello",
            ],
        )
        .finish();
        assert!(f.status.success(), "{f:#?}");
        assert_eq!(
            f.stdout,
            format!("hello from origin.test\n{version}"),
            "{f:#?}"
        );
        let r = requests(&f);
        assert_eq!(r.len(), 1, "{f:#?}");
        assert_eq!(r[0]["tls"], "mitm");
        assert_eq!(r[0]["sni"], "origin.test");
        assert_eq!(r[0]["comm"], "curl");
        assert_eq!(r[0]["status"], 200);
        assert_eq!(r[0]["rule"], "origin.test");
        let a = f.audit_of("request");
        assert_eq!(a.len(), 1, "{:#?}", f.audit);
        assert_eq!(a[0]["host"], "origin.test");
        assert_eq!(a[0]["method"], "GET");
        assert_eq!(a[0]["path"], "/hello");
        assert_eq!(a[0]["tls"], "mitm");
        assert_eq!(a[0]["comm"], "curl");
        assert_eq!(a[0]["bytes_down"], "hello from origin.test".len());
    }
    let seen = s.origin.requests();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter()
            .all(|r| r.sni.as_deref() == Some("origin.test") && r.host == "origin.test"),
        "{seen:?}"
    );
    // Upstream protocol is chosen by the origin's ALPN (h2), whatever the client spoke.
    assert!(seen.iter().all(|r| r.version == "HTTP/2.0"), "{seen:?}");
}

#[test]
fn a_host_not_allowed_gets_a_clear_403() {
    let s = site("127.0.21.2");
    let f = Egress::run(
        &s.args(&["--allow", "other.test"]),
        &[
            "curl",
            "-sS",
            "-i",
            "--resolve",
            &s.resolve("origin.test"),
            "https://origin.test/hello",
        ],
    )
    .finish();
    assert!(f.stdout.starts_with("HTTP/2 403"), "{f:#?}");
    assert!(
        f.stdout.contains("x-egress-denied: host-not-allowed"),
        "{}",
        f.stdout
    );
    let body: Value = serde_json::from_str(f.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(body["host"], "origin.test");
    assert_eq!(body["error"], "egress_denied");
    assert!(
        s.origin.requests().is_empty(),
        "a denied request never reaches the origin"
    );
    assert_eq!(requests(&f)[0]["decision"], "deny");
    let a = f.audit_of("request");
    assert_eq!(a[0]["decision"], "deny");
    assert_eq!(a[0]["status"], 403);
    assert_eq!(
        a[0]["reason"],
        "TLS server name: host is not in the allowlist"
    );
}

#[test]
fn python_urllib_trusts_the_egress_ca_for_an_ip_literal_url() {
    need(PY);
    let s = site("127.0.22.2");
    let script = "import urllib.request; print(urllib.request.urlopen('https://127.0.22.2/hello').read().decode())";
    let f = Egress::run(&s.args(&["--allow", "127.0.22.2"]), &[PY, "-c", script]).finish();
    assert!(f.status.success(), "{f:#?}");
    assert_eq!(f.stdout.trim(), "hello from 127.0.22.2", "{f:#?}");
    // No SNI for an IP: the leaf carries an IP SAN, and the upstream is verified by IP too.
    assert_eq!(s.origin.requests()[0].sni, None);
}

#[test]
fn node_fetch_trusts_the_egress_ca() {
    need("/usr/bin/node");
    let s = site("127.0.23.2");
    let script = "fetch('https://127.0.23.2/hello').then(r => r.text()).then(t => console.log(t)).catch(e => { console.error(e); process.exit(1) })";
    let f = Egress::run(
        &s.args(&["--allow", "127.0.23.2"]),
        &["/usr/bin/node", "-e", script],
    )
    .finish();
    assert!(f.status.success(), "{f:#?}");
    assert_eq!(f.stdout.trim(), "hello from 127.0.23.2", "{f:#?}");
}

#[test]
fn server_sent_events_arrive_one_by_one() {
    need(PY);
    let s = site("127.0.24.2");
    // Print the arrival time of every event line as it is read.
    let script = "import time, urllib.request\n\
                  r = urllib.request.urlopen('https://127.0.24.2/sse')\n\
                  t0 = time.monotonic()\n\
                  for line in r:\n\
                  \x20   if line.startswith(b'data:'): print(round((time.monotonic() - t0) * 1000), line.decode().strip(), flush=True)\n";
    let arrivals = |stdout: &str| -> Vec<u64> {
        stdout
            .lines()
            .map(|l| l.split(' ').next().unwrap().parse().unwrap())
            .collect()
    };
    // The control: the same client straight to the origin, outside egress, trusting the
    // origin's CA. It shows what spacing this machine delivers right now.
    let direct = Command::new(PY)
        .args(["-c", script])
        .env("SSL_CERT_FILE", &s.ca_file)
        .output()
        .unwrap();
    assert!(direct.status.success(), "{direct:?}");
    let control = arrivals(&String::from_utf8_lossy(&direct.stdout));
    let f = Egress::run(&s.args(&["--allow", "127.0.24.2"]), &[PY, "-c", script]).finish();
    assert!(f.status.success(), "{f:#?}");
    let times = arrivals(&f.stdout);
    assert_eq!((times.len(), control.len()), (5, 5), "{}", f.stdout);
    // The origin spaces them ~200 ms apart; buffering in the proxy would bunch them at the
    // end. Judged against the control rather than a fixed threshold, so that a loaded
    // machine's jitter does not decide: the spread must be at least half the control's, and
    // at most one gap may shrink below a quarter of the control's smallest.
    let spread = |t: &[u64]| t[4] - t[0];
    assert!(
        spread(&times) * 2 >= spread(&control),
        "events arrived bunched: {times:?} (direct: {control:?})"
    );
    let min_gap = control.windows(2).map(|w| w[1] - w[0]).min().unwrap();
    let short = times
        .windows(2)
        .filter(|w| (w[1] - w[0]) * 4 < min_gap)
        .count();
    assert!(
        short <= 1,
        "events arrived bunched: {times:?} (direct: {control:?})"
    );
}

#[test]
fn websocket_echo_round_trip() {
    need(PY);
    let s = site("127.0.25.2");
    // A minimal RFC 6455 client on Python's ssl module: upgrade, one masked text frame, read
    // the echo.
    let script = r#"
import os, socket, ssl, base64, struct
ctx = ssl.create_default_context(); ctx.set_alpn_protocols(['http/1.1'])
s = ctx.wrap_socket(socket.create_connection(('127.0.25.2', 443)), server_hostname='127.0.25.2')
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(('GET /ws HTTP/1.1\r\nHost: 127.0.25.2\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n'
           'Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n' % key).encode())
head = b''
while b'\r\n\r\n' not in head: head += s.recv(1)
print(head.split(b'\r\n')[0].decode())
msg = b'hello through egress'
mask = os.urandom(4)
s.sendall(bytes([0x81, 0x80 | len(msg)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(msg)))
hdr = s.recv(2)
n = hdr[1] & 0x7f
data = b''
while len(data) < n: data += s.recv(n - len(data))
print(data.decode())
"#;
    let f = Egress::run(&s.args(&["--allow", "127.0.25.2"]), &[PY, "-c", script]).finish();
    assert!(f.status.success(), "{f:#?}");
    let lines: Vec<&str> = f.stdout.lines().collect();
    assert_eq!(
        lines,
        ["HTTP/1.1 101 Switching Protocols", "hello through egress"],
        "{f:#?}"
    );
    assert_eq!(requests(&f)[0]["status"], 101);
}

#[test]
fn a_1gib_download_streams_with_bounded_proxy_memory() {
    let s = site("127.0.26.2");
    let gib: u64 = 1 << 30;
    let url = format!("https://origin.test/bytes?n={gib}");
    let e = Egress::run(
        &s.args(&["--allow", "origin.test"]),
        &[
            "curl",
            "-sS",
            "--resolve",
            &s.resolve("origin.test"),
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            &url,
        ],
    );
    let pid = e.pid();
    // Sample the proxy's peak RSS while the download runs.
    let mut peak_kib = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
        if let Some(v) = status.lines().find_map(|l| l.strip_prefix("VmHWM:")) {
            peak_kib = peak_kib.max(v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0));
        }
        if e.logs().iter().any(|v| v["message"] == "command exited") || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let f = e.finish();
    assert!(f.status.success(), "{f:#?}");
    assert_eq!(f.stdout, gib.to_string(), "the whole GiB arrived");
    assert!(peak_kib > 0, "could not read the proxy's RSS");
    eprintln!("proxy peak RSS during a 1 GiB download: {peak_kib} KiB");
    // The body streams through in frames; buffering it would need over 1,048,576 KiB.
    assert!(
        peak_kib < 128 * 1024,
        "proxy peak RSS {peak_kib} KiB for a 1 GiB body"
    );
}

#[test]
fn passthrough_host_shows_the_upstream_certificate() {
    let s = site("127.0.27.2");
    // The client must trust the origin's own CA here: egress does not decrypt.
    let script = format!(
        "openssl s_client -connect 127.0.27.2:443 -servername origin.test -CAfile {} </dev/null 2>/dev/null | grep -E '^(issuer|Verify return code)'",
        s.ca_file.display()
    );
    let f = Egress::run(
        &s.args(&["--passthrough", "origin.test"]),
        &["sh", "-c", &script],
    )
    .finish();
    assert!(f.status.success(), "{f:#?}");
    assert!(
        f.stdout.contains("issuer=CN = egress-test-origin-ca")
            || f.stdout.contains("issuer=CN=egress-test-origin-ca"),
        "{}",
        f.stdout
    );
    assert!(
        f.stdout.contains("Verify return code: 0 (ok)"),
        "{}",
        f.stdout
    );
    let closed: Vec<&Value> = f
        .logs
        .iter()
        .filter(|v| v["message"] == "connection closed")
        .collect();
    assert_eq!(closed.len(), 1, "{f:#?}");
    assert_eq!(closed[0]["decision"], "passthrough");
    let audited = f.audit_of("connection");
    assert_eq!(audited.len(), 1, "{:#?}", f.audit);
    assert_eq!(audited[0]["tls"], "passthrough");
    assert_eq!(audited[0]["sni"], "origin.test");
    assert!(audited[0]["bytes_down"].as_u64().unwrap() > 0);
    assert_eq!(closed[0]["sni"], "origin.test");
    assert!(closed[0]["bytes_down"].as_u64().unwrap() > 0);
}

#[test]
fn an_untrusted_upstream_certificate_gives_502() {
    let origin = Origin::start(
        "127.0.28.2:443",
        Some(self_signed_untrusted(&["origin.test"])),
    );
    let f = Egress::run(
        &["--allow", "origin.test", "--private-ok", "127.0.0.0/8"],
        &[
            "curl",
            "-sS",
            "-w",
            "\n%{http_code}",
            "--resolve",
            "origin.test:443:127.0.28.2",
            "https://origin.test/hello",
        ],
    )
    .finish();
    let (body, code) = f.stdout.rsplit_once('\n').unwrap();
    assert_eq!(code, "502", "{f:#?}");
    assert!(
        body.contains("egress:") && body.to_lowercase().contains("certificate"),
        "{body}"
    );
    assert!(
        origin.requests().is_empty(),
        "no request may go to an unverified upstream"
    );
    assert!(
        !origin.tls_failures().is_empty(),
        "egress connected and rejected the certificate"
    );
    assert_eq!(requests(&f)[0]["status"], 502);
}

#[test]
fn a_non_tls_non_http_stream_on_443_is_refused() {
    need(PY);
    let up = Upstream::start("127.0.29.2:443");
    let script = "import socket\n\
                  s = socket.create_connection(('127.0.29.2', 443))\n\
                  s.sendall(b'SSH-2.0-OpenSSH_9.0\\r\\n')\n\
                  print(repr(s.recv(100)))\n";
    let f = Egress::run(&["--allow", "*"], &[PY, "-c", script]).finish();
    assert_eq!(f.stdout.trim(), "b''", "{f:#?}");
    assert_eq!(up.accepted(), 0);
    let refused: Vec<&Value> = f
        .logs
        .iter()
        .filter(|v| v["message"] == "connection refused")
        .collect();
    assert_eq!(refused.len(), 1, "{f:#?}");
    assert_eq!(refused[0]["reason"], "neither TLS nor HTTP");
}

#[test]
fn truncated_client_hellos_and_garbage_never_crash_the_proxy() {
    need(PY);
    let s = site("127.0.30.2");
    // A real ClientHello from Python's ssl, sent cut at every prefix length, then garbage,
    // then one real request that must still work.
    let script = r#"
import os, random, socket, ssl, urllib.request
ctx = ssl.create_default_context()
i, o = ssl.MemoryBIO(), ssl.MemoryBIO()
obj = ctx.wrap_bio(i, o, server_hostname='origin.test')
try: obj.do_handshake()
except ssl.SSLWantReadError: pass
hello = o.read()
rng = random.Random(7)
cases = [hello[:n] for n in range(len(hello))] + [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 600))) for _ in range(100)]
cases += [b'\x16\x03\x01' + bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300))) for _ in range(100)]
for c in cases:
    s = socket.create_connection(('127.0.30.2', 443))
    s.sendall(c); s.shutdown(socket.SHUT_WR)
    try: s.recv(10)
    except OSError: pass
    s.close()
print(len(hello), len(cases))
print(urllib.request.urlopen('https://127.0.30.2/hello').read().decode())
"#;
    let f = Egress::run(&s.args(&["--allow", "127.0.30.2"]), &[PY, "-c", script]).finish();
    assert!(f.status.success(), "{f:#?}");
    let lines: Vec<&str> = f.stdout.lines().collect();
    let n: Vec<usize> = lines[0].split(' ').map(|x| x.parse().unwrap()).collect();
    assert!(n[0] > 200, "a real ClientHello was cut: {lines:?}");
    assert_eq!(
        lines[1], "hello from 127.0.30.2",
        "the proxy still serves after {} bad inputs",
        n[1]
    );
    assert_eq!(
        s.origin.requests().len(),
        1,
        "no truncated hello produced an upstream request"
    );
}

#[test]
fn the_ca_survives_a_restart() {
    let dir = TempDir::new("ca");
    let conf = dir.path("conf");
    let conf_s = conf.to_str().unwrap();
    let fp = |cmd: &str| {
        let out = Command::new(egress_bin())
            .args(["ca", cmd, "--confdir", conf_s])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let first = fp("fingerprint");
    assert!(first.trim().len() == 95 && first.contains(':'), "{first}");
    let key_mode = std::fs::metadata(conf.join("ca-key.pem"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key_mode) & 0o777,
        0o600
    );
    // A run with the same confdir uses, and keeps, the same CA: curl trusts only that CA
    // (a copy the sandbox user can read), not whatever egress points the environment at, so
    // a run that ignored --confdir (and minted a CA elsewhere) fails verification.
    let trusted = dir.path("trusted-ca.pem");
    std::fs::copy(conf.join("ca.pem"), &trusted).unwrap();
    std::fs::set_permissions(
        &trusted,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let s = site("127.0.31.2");
    let f = Egress::run(
        &s.args(&["--allow", "origin.test", "--confdir", conf_s]),
        &[
            "curl",
            "-sS",
            "--cacert",
            trusted.to_str().unwrap(),
            "--resolve",
            &s.resolve("origin.test"),
            "https://origin.test/hello",
        ],
    )
    .finish();
    assert_eq!(f.stdout, "hello from origin.test", "{f:#?}");
    assert_eq!(fp("fingerprint"), first);
    let exported = fp("export");
    assert_eq!(
        exported,
        std::fs::read_to_string(conf.join("ca.pem")).unwrap()
    );
    assert_eq!(fp("path").trim(), conf.join("ca.pem").to_str().unwrap());
}

#[test]
fn idle_and_slow_clients_do_not_hurt_others() {
    need(PY);
    let s = site("127.0.32.2");
    // 300 connections that never finish a ClientHello (slowloris), then a normal request.
    let script = r#"
import socket, time, urllib.request
def timed():
    t = time.monotonic()
    body = urllib.request.urlopen('https://127.0.32.2/hello').read().decode()
    return body, round((time.monotonic() - t) * 1000)
timed()  # the first visit mints the leaf; the control is the second
_, control = timed()
idle = []
for i in range(300):
    c = socket.create_connection(('127.0.32.2', 443))
    if i % 2: c.sendall(b'\x16\x03\x01\x02')
    idle.append(c)
body, loaded = timed()
print(body)
print(control, loaded)
"#;
    let f = Egress::run(&s.args(&["--allow", "127.0.32.2"]), &[PY, "-c", script]).finish();
    assert!(f.status.success(), "{f:#?}");
    let lines: Vec<&str> = f.stdout.lines().collect();
    assert_eq!(lines[0], "hello from 127.0.32.2", "{f:#?}");
    let ms: Vec<u64> = lines[1].split(' ').map(|x| x.parse().unwrap()).collect();
    let (control, loaded) = (ms[0], ms[1]);
    // Against the same request without the stalled clients: a proxy that let them hold it
    // up would take seconds (until their timeouts), not a scheduling hiccup more.
    assert!(
        loaded <= control + 2000,
        "a normal request took {loaded} ms next to 300 stalled clients, {control} ms without"
    );
}

#[test]
fn oversized_request_headers_are_refused() {
    let s = site("127.0.33.2");
    let big = format!("X-Bomb: {}", "a".repeat(100 * 1024));
    let f = Egress::run(
        &s.args(&["--allow", "origin.test"]),
        &[
            "curl",
            "-sS",
            "--http1.1",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &big,
            "--resolve",
            &s.resolve("origin.test"),
            "https://origin.test/hello",
        ],
    )
    .finish();
    assert_eq!(f.stdout, "431", "{f:#?}");
    assert!(s.origin.requests().is_empty());
}

#[test]
fn openssl_validates_the_minted_leaf() {
    let s = site("127.0.34.2");
    // $SSL_CERT_FILE is the bundle egress wrote for the command.
    let script = "openssl s_client -connect 127.0.34.2:443 -servername origin.test -verify_hostname origin.test \
                  -CAfile \"$SSL_CERT_FILE\" </dev/null 2>/dev/null | grep -E '^(issuer|Verify return code)'";
    let f = Egress::run(&s.args(&["--allow", "origin.test"]), &["sh", "-c", script]).finish();
    assert!(f.status.success(), "{f:#?}");
    assert!(
        f.stdout.contains("issuer=CN = egress CA")
            || f.stdout.contains("issuer=CN=egress CA")
            || f.stdout.contains("egress CA"),
        "{}",
        f.stdout
    );
    assert!(
        f.stdout.contains("Verify return code: 0 (ok)"),
        "{}",
        f.stdout
    );
}

#[test]
fn a_large_client_hello_sent_byte_by_byte_gets_the_right_leaf() {
    need(PY);
    let s = site("127.0.35.2");
    // A ClientHello of over 1.5 KiB (a long ALPN list, as post-quantum key shares make
    // browsers' hellos this size), written one byte per segment with TCP_NODELAY, then the
    // handshake finished through memory BIOs. The leaf must be minted for the SNI.
    let script = r#"
import os, socket, ssl, time
ctx = ssl.create_default_context(cafile=os.environ['SSL_CERT_FILE'])
ctx.set_alpn_protocols(['x-padding-%02d-%s' % (i, 'p' * 20) for i in range(60)] + ['http/1.1'])
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(inc, out, server_hostname='origin.test')
s = socket.create_connection(('127.0.35.2', 443))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = out.read()
for b in hello:
    s.send(bytes([b]))
    time.sleep(0.001)
while True:
    try:
        tls.do_handshake()
        break
    except ssl.SSLWantReadError:
        pending = out.read()
        if pending:
            s.sendall(pending)
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit('closed during the handshake')
        inc.write(chunk)
pending = out.read()
if pending:
    s.sendall(pending)
san = [v for k, v in tls.getpeercert()['subjectAltName'] if k == 'DNS']
tls.write(b'GET /hello HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n\r\n')
s.sendall(out.read())
s.settimeout(10)
body = b''
def complete(b):
    head, sep, rest = b.partition(b'\r\n\r\n')
    if not sep:
        return False
    for line in head.split(b'\r\n')[1:]:
        k, _, v = line.partition(b':')
        if k.strip().lower() == b'content-length':
            return len(rest) >= int(v)
    return False
while not complete(body):
    try:
        body += tls.read(65536)
        continue
    except ssl.SSLWantReadError:
        pass
    chunk = s.recv(65536)
    if not chunk:
        break
    inc.write(chunk)
print(len(hello))
print(','.join(san))
print(body.split(b'\r\n', 1)[0].decode())
print(body.rsplit(b'\r\n\r\n', 1)[-1].decode())
"#;
    let f = Egress::run(&s.args(&["--allow", "origin.test"]), &[PY, "-c", script]).finish();
    assert!(f.status.success(), "{f:#?}");
    let lines: Vec<&str> = f.stdout.lines().collect();
    let hello_len: usize = lines[0].parse().unwrap();
    assert!(hello_len > 1500, "the hello was only {hello_len} bytes");
    assert_eq!(lines[1], "origin.test", "the leaf's names: {f:#?}");
    assert_eq!(lines[2], "HTTP/1.1 200 OK", "{f:#?}");
    assert_eq!(lines[3], "hello from origin.test", "{f:#?}");
    let r = f.audit_of("request");
    assert_eq!(r.len(), 1, "{f:#?}");
    assert_eq!(r[0]["sni"], "origin.test");
}

#[test]
fn a_post_quantum_rustls_hello_gets_the_right_leaf_wherever_its_sni_sits() {
    let s = site("127.0.35.3");
    // rustls on aws-lc-rs offers X25519MLKEM768 (a 1,216-byte key share: a 1,460-byte hello)
    // and shuffles its extensions per hello, so over 24 attempts the SNI sits past byte 1024
    // in some and before it in others; half the hellos are written in 100-byte segments.
    const ATTEMPTS: usize = 24;
    let client = egress_tests::testclient();
    let f = Egress::run(
        &s.args(&["--allow", "origin.test"]),
        &[
            client.to_str().unwrap(),
            "pq-tls",
            "127.0.35.3:443",
            "origin.test",
            &ATTEMPTS.to_string(),
        ],
    )
    .finish();
    assert!(f.status.success(), "{f:#?}");
    let out: Value =
        serde_json::from_str(f.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {f:#?}"));
    let attempts = out["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), ATTEMPTS);
    let mut sni_past_1024 = 0;
    for a in attempts {
        assert_eq!(a["error"], Value::Null, "{a:#}");
        assert_eq!(a["status_line"], "HTTP/1.1 200 OK", "{a:#}");
        assert_eq!(a["body"], "hello from origin.test", "{a:#}");
        let groups: Vec<u64> = a["groups"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        assert!(
            groups.contains(&0x11ec),
            "no X25519MLKEM768 key share offered: {a:#}"
        );
        assert!(a["hello_len"].as_u64().unwrap() > 1400, "{a:#}");
        if a["sni_at"].as_u64().unwrap() > 1024 {
            sni_past_1024 += 1;
        }
    }
    assert!(
        (1..ATTEMPTS).contains(&sni_past_1024),
        "the SNI sat past byte 1024 in {sni_past_1024} of {ATTEMPTS} hellos: {attempts:#?}"
    );
    let r = f.audit_of("request");
    assert_eq!(r.len(), ATTEMPTS, "{f:#?}");
    assert!(
        r.iter()
            .all(|r| r["sni"] == "origin.test" && r["status"] == 200),
        "{r:#?}"
    );
}
