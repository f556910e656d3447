//! Clients that trust only the system store: inside `egress run` they trust the egress CA
//! because the command's own mount namespace shows the system trust store with the CA
//! added, while the host's files stay as they are.
//!
//! Every client runs as `nobody` (egress's `--user`) under `env -i`, so no CA variable, the
//! test runner's or egress's, can be what made it work; `--no-ca-env` is given as well.
//! Node is the exception: it never reads the system store, and its test keeps
//! `NODE_EXTRA_CA_CERTS` to show that the variable is what works for it. uv trusts its own
//! bundled roots unless told `--system-certs`; its test shows both ways that work.
//! Package managers install from a package index and a registry the origin serves
//! ([`publish_packages`]).
//! The origin is on loopback with its own test CA, which egress trusts upstream
//! (`--upstream-ca`). Each test owns its addresses: 127.0.9N.2, 127.0.97.2-6, 127.0.98.2-3,
//! 127.0.99.2-4.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use egress_tests::{
    origin::{Site, TestCa},
    Egress, Finished, TempDir,
};

const WGET: &str = "/usr/bin/wget";
const CURL: &str = "/usr/bin/curl";
const OPENSSL: &str = "/usr/bin/openssl";
const PY: &str = "/usr/bin/python3";
const NPM: &str = "/usr/bin/npm";
const JAVA: &str = "/usr/bin/java";
const KEYTOOL: &str = "/usr/bin/keytool";
const NODE: &str = "/usr/bin/node";
const RUBY: &str = "/usr/bin/ruby";
const GIT: &str = "/usr/bin/git";
const GO: &str = "/usr/bin/go";
/// Debian's bundle, the one wget (GnuTLS), npm's pinned `cafile` and Python read.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The only environment the clients get.
const CLEAN_ENV: &[&str] = &["/usr/bin/env", "-i", "PATH=/usr/bin:/bin", "HOME=/tmp"];

fn need(bin: &str) {
    assert!(
        Path::new(bin).exists(),
        "{bin} is required by this test and missing; `cargo xtask setup` installs it"
    );
}

/// An HTTPS origin named `origin.test` on `ip`.
fn site(ip: &str) -> Site {
    Site::start("clients", ip, &["origin.test"])
}

trait Allowed {
    fn allowed<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str>;
    fn url(&self) -> String;
    fn hello(&self) -> String;
}

impl Allowed for Site {
    /// egress flags: trust the origin, let it through, open the private-range guard for
    /// loopback, plus `extra`.
    fn allowed<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["--allow", "origin.test", "--allow", &self.ip];
        v.extend_from_slice(extra);
        self.args(&v)
    }

    fn url(&self) -> String {
        format!("https://{}/hello", self.ip)
    }

    fn hello(&self) -> String {
        format!("hello from {}", self.ip)
    }
}

/// egress audited exactly one request, from `comm`, allowed and intercepted.
fn assert_audited(f: &Finished, comm: &str) {
    let a = f.audit_of("request");
    assert_eq!(a.len(), 1, "{:#?}", f.audit);
    assert_eq!(a[0]["comm"], comm, "{:#}", a[0]);
    assert_eq!(a[0]["decision"], "allow", "{:#}", a[0]);
    assert_eq!(a[0]["tls"], "mitm", "{:#}", a[0]);
    assert_eq!(a[0]["status"], 200, "{:#}", a[0]);
}

/// `sh -c SCRIPT` in the sandbox.
fn sh(args: &[&str], script: &str) -> Finished {
    Egress::run(args, &["/bin/sh", "-c", script]).finish()
}

fn clean(cmd: &str) -> String {
    format!("{} {cmd}", CLEAN_ENV.join(" "))
}

#[test]
fn wget_trusts_the_egress_ca_through_the_system_store_alone() {
    need(WGET);
    let s = site("127.0.90.2");
    let f = sh(
        &s.allowed(&["--no-ca-env"]),
        &clean(&format!("{WGET} --no-hsts -qO- {}", s.url())),
    );
    assert!(f.status.success(), "wget failed: {f:#?}");
    assert_eq!(f.stdout.trim(), s.hello(), "{f:#?}");
    let a = f.audit_of("request");
    assert_eq!(a.len(), 1, "{:#?}", f.audit);
    assert_eq!(a[0]["tls"], "mitm");
    assert_eq!(a[0]["comm"], "wget");
    assert_eq!(s.origin.requests().len(), 1);
    let mounted = f.log_with("the command sees the system trust store with the egress CA added");
    assert_eq!(mounted.len(), 1, "{:#?}", f.logs);
}

#[test]
fn without_the_mount_wget_does_not_know_the_issuer() {
    need(WGET);
    let s = site("127.0.91.2");
    let f = sh(
        &s.allowed(&["--no-ca-env", "--no-ca-mount"]),
        &format!(
            "{} 2>&1",
            clean(&format!("{WGET} --no-hsts -nv -O- {}", s.url()))
        ),
    );
    // wget's exit status 5 is "SSL verification failure".
    assert_eq!(f.status.code(), Some(5), "wget without the mount: {f:#?}");
    assert!(
        f.stdout.contains("doesn't have a known issuer"),
        "wget should refuse the egress leaf: {f:#?}"
    );
    assert!(s.origin.requests().is_empty());
    assert!(f
        .log_with("the command sees the system trust store with the egress CA added")
        .is_empty());
}

#[test]
fn curl_and_openssl_find_the_ca_in_the_hashed_directory() {
    need(CURL);
    need(OPENSSL);
    let s = site("127.0.92.2");
    // curl gets a CA file that does not sign the egress leaf (the origin's own), so only
    // --capath can make it pass; s_client reads nothing but -CApath.
    let script = format!(
        "set -e; {curl}; echo; {s_client} 2>&1",
        curl = clean(&format!(
            "{CURL} -sS --capath /etc/ssl/certs --cacert {} --resolve origin.test:443:{} \
             https://origin.test/hello",
            s.ca_file.display(),
            s.ip
        )),
        s_client = clean(&format!(
            "{OPENSSL} s_client -brief -connect {}:443 -servername origin.test \
             -verify_hostname origin.test -CApath /etc/ssl/certs -no-CAfile -no-CAstore \
             -verify_return_error </dev/null",
            s.ip
        )),
    );
    let f = sh(&s.allowed(&["--no-ca-env"]), &script);
    assert!(f.status.success(), "{f:#?}");
    let mut lines = f.stdout.lines();
    assert_eq!(lines.next(), Some("hello from origin.test"), "{f:#?}");
    assert!(f.stdout.contains("Verification: OK"), "{f:#?}");
    assert!(
        f.stdout.contains("Verified peername: origin.test"),
        "{f:#?}"
    );
}

#[test]
fn python_default_context_trusts_the_system_store() {
    need(PY);
    let s = site("127.0.93.2");
    let script = format!(
        "import os, ssl, urllib.request\n\
         assert 'SSL_CERT_FILE' not in os.environ and 'SSL_CERT_DIR' not in os.environ\n\
         ctx = ssl.create_default_context()\n\
         print(urllib.request.urlopen('{}', context=ctx).read().decode())",
        s.url()
    );
    let mut cmd: Vec<&str> = CLEAN_ENV.to_vec();
    cmd.extend([PY, "-c", &script]);
    let f = Egress::run(&s.allowed(&["--no-ca-env"]), &cmd).finish();
    assert!(f.status.success(), "{f:#?}");
    assert_eq!(f.stdout.trim(), s.hello(), "{f:#?}");
}

/// `npm ping` with a global npmrc pinning `cafile` to the system bundle (as some images
/// do): npm then trusts that file alone.
#[test]
fn npm_with_cafile_pinned_to_the_system_bundle() {
    need(NPM);
    let s = site("127.0.94.2");
    let npmrc = s.dir.path("global-npmrc");
    std::fs::write(&npmrc, format!("cafile={SYSTEM_BUNDLE}\n")).unwrap();
    let ping = |extra: &[&str]| {
        let cmd = clean(&format!(
            "{NPM} ping --globalconfig {} --userconfig /dev/null --cache {} \
             --registry https://{}/ --no-update-notifier --fetch-retries 0 2>&1",
            npmrc.display(),
            s.dir.path("npm-cache").display(),
            s.ip
        ));
        sh(&s.allowed(extra), &cmd)
    };
    let f = ping(&["--no-ca-env"]);
    assert!(f.status.success(), "{f:#?}");
    assert!(f.stdout.contains("PONG"), "{f:#?}");
    let seen = s.origin.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].path_and_query.starts_with("/-/ping"), "{seen:?}");

    let f = ping(&["--no-ca-env", "--no-ca-mount"]);
    assert!(
        !f.status.success(),
        "npm trusted egress without the mount: {f:#?}"
    );
    assert!(
        f.stdout.contains("SELF_SIGNED_CERT_IN_CHAIN")
            || f.stdout.contains("UNABLE_TO_VERIFY_LEAF_SIGNATURE")
            || f.stdout.contains("UNABLE_TO_GET_ISSUER_CERT_LOCALLY"),
        "npm should refuse the egress leaf: {f:#?}"
    );
    assert_eq!(s.origin.requests().len(), 1);
}

/// curl offered only h2, or only HTTP/1.1, over TLS it verifies with the mounted bundle
/// (`--cacert` names it explicitly, so curl's build-time default plays no part): egress's
/// ALPN answer follows the client's.
#[test]
fn curl_over_http2_and_http1_1_through_the_mounted_bundle() {
    need(CURL);
    for (ip, flag, version) in [
        ("127.0.97.2", "--http2", "2"),
        ("127.0.97.3", "--http1.1", "1.1"),
    ] {
        let s = site(ip);
        let f = sh(
            &s.allowed(&["--no-ca-env"]),
            &clean(&format!(
                "{CURL} -sS {flag} --cacert {SYSTEM_BUNDLE} -w ' %{{http_code}} %{{http_version}}' \
                 --resolve origin.test:443:{ip} https://origin.test/hello"
            )),
        );
        assert!(f.status.success(), "curl {flag}: {f:#?}");
        assert_eq!(
            f.stdout,
            format!("hello from origin.test 200 {version}"),
            "curl {flag}: {f:#?}"
        );
        assert_audited(&f, "curl");
        assert_eq!(s.origin.requests().len(), 1, "curl {flag}");
    }
}

/// Debian's `requests` takes its bundle from Debian's certifi, whose `where()` is the
/// system bundle: with no CA variable it verifies through the mounted file.
#[test]
fn python_requests_trusts_the_system_bundle() {
    need(PY);
    let s = site("127.0.97.4");
    let script = format!(
        "import os, certifi, requests\n\
         assert not any(v in os.environ for v in ('REQUESTS_CA_BUNDLE', 'CURL_CA_BUNDLE', 'SSL_CERT_FILE'))\n\
         assert certifi.where() == '{SYSTEM_BUNDLE}', certifi.where()\n\
         r = requests.get('{}', timeout=20)\n\
         print(r.status_code, r.text)",
        s.url()
    );
    let mut cmd: Vec<&str> = CLEAN_ENV.to_vec();
    cmd.extend([PY, "-c", &script]);
    let f = Egress::run(&s.allowed(&["--no-ca-env"]), &cmd).finish();
    assert!(f.status.success(), "{f:#?}");
    assert_eq!(f.stdout.trim(), format!("200 {}", s.hello()), "{f:#?}");
    assert_audited(&f, "python3");
}

const NODE_FETCH: &str = "
const extra = process.env.NODE_EXTRA_CA_CERTS;
if (process.env.NODE_OPTIONS || process.env.SSL_CERT_FILE) throw new Error('unexpected env');
fetch(process.argv[2]).then(async (r) => console.log(r.status, await r.text(), extra || '-'))
  .catch((e) => { console.log('error', e.cause ? e.cause.code : e.message); process.exit(3); });
";

/// Node's `fetch` trusts its own bundled roots, never the system store (no
/// `--use-openssl-ca`), so the mount alone does not help: what makes it work is
/// `NODE_EXTRA_CA_CERTS`, which egress sets (unless `--no-ca-env`) to its bundle of the
/// system roots plus the CA, replacing any value it inherited. The command keeps only that
/// variable of egress's environment; without it, under the mount, Node refuses.
#[test]
fn node_fetch_trusts_the_egress_ca_through_node_extra_ca_certs() {
    need(NODE);
    let s = site("127.0.97.5");
    let js = s.dir.path("fetch.js");
    std::fs::write(&js, NODE_FETCH).unwrap();
    let node = format!("{NODE} {} {} 2>&1", js.display(), s.url());
    let with_var = format!(
        "{} NODE_EXTRA_CA_CERTS=\"$NODE_EXTRA_CA_CERTS\" {node}",
        CLEAN_ENV.join(" ")
    );
    for extra in [&[][..], &["--no-ca-mount"]] {
        let f = sh(&s.allowed(extra), &with_var);
        assert!(f.status.success(), "{extra:?}: {f:#?}");
        let line = f.stdout.trim();
        let var = line
            .strip_prefix(&format!("200 {} ", s.hello()))
            .unwrap_or_else(|| panic!("{extra:?}: {f:#?}"));
        assert!(
            var.starts_with('/') && var != SYSTEM_BUNDLE,
            "NODE_EXTRA_CA_CERTS should be egress's bundle: {f:#?}"
        );
        assert_audited(&f, "node");
    }
    assert_eq!(s.origin.requests().len(), 2);

    // The mount, no variable at all: Node does not read the system store.
    let f = sh(&s.allowed(&["--no-ca-env"]), &clean(&node));
    assert_eq!(
        f.status.code(),
        Some(3),
        "node trusted egress without the variable: {f:#?}"
    );
    assert!(
        f.stdout.contains("SELF_SIGNED_CERT_IN_CHAIN")
            || f.stdout.contains("UNABLE_TO_VERIFY_LEAF_SIGNATURE")
            || f.stdout.contains("UNABLE_TO_GET_ISSUER_CERT_LOCALLY"),
        "{f:#?}"
    );
    assert_eq!(s.origin.requests().len(), 2);
}

/// Ruby's Net::HTTP verifies with OpenSSL's default paths, the system store: with the
/// mount it gets through, without it it refuses the egress leaf.
#[test]
fn ruby_net_http_trusts_the_system_store() {
    need(RUBY);
    let s = site("127.0.97.6");
    let script = format!(
        "require 'net/http'; \
         raise 'CA env' if ENV.key?('SSL_CERT_FILE') || ENV.key?('SSL_CERT_DIR'); \
         r = Net::HTTP.get_response(URI('{}')); puts \"#{{r.code}} #{{r.body}}\"",
        s.url()
    );
    let mut cmd: Vec<&str> = CLEAN_ENV.to_vec();
    cmd.extend([RUBY, "-e", &script]);
    let f = Egress::run(&s.allowed(&["--no-ca-env"]), &cmd).finish();
    assert!(f.status.success(), "{f:#?}");
    assert_eq!(f.stdout.trim(), format!("200 {}", s.hello()), "{f:#?}");
    assert_audited(&f, "ruby");

    let f = Egress::run(&s.allowed(&["--no-ca-env", "--no-ca-mount"]), &cmd).finish();
    assert!(
        !f.status.success(),
        "ruby trusted egress without the mount: {f:#?}"
    );
    assert!(f.stderr.contains("certificate verify failed"), "{f:#?}");
    assert_eq!(s.origin.requests().len(), 1);
}

/// A smart-HTTP git server: `git http-backend` as CGI behind Python's `http.server` in TLS.
/// argv: project root, leaf DER, key DER (PKCS#8), address. Prints `ready` once listening.
const GIT_SERVER: &str = r#"
import base64, http.server, ssl, subprocess, sys
root, cert, key, ip = sys.argv[1:]
pem = root + "/leaf.pem"
with open(pem, "w") as f:
    f.write(ssl.DER_cert_to_PEM_cert(open(cert, "rb").read()))
    f.write("-----BEGIN PRIVATE KEY-----\n" + base64.encodebytes(open(key, "rb").read()).decode()
            + "-----END PRIVATE KEY-----\n")
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self): self.cgi()
    def do_POST(self): self.cgi()
    def cgi(self):
        path, _, query = self.path.partition("?")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        env = {"GIT_PROJECT_ROOT": root, "GIT_HTTP_EXPORT_ALL": "1", "PATH_INFO": path,
               "QUERY_STRING": query, "REQUEST_METHOD": self.command,
               "CONTENT_TYPE": self.headers.get("Content-Type", ""),
               "CONTENT_LENGTH": str(len(body)), "REMOTE_ADDR": self.client_address[0],
               "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""), "PATH": "/usr/bin:/bin"}
        out = subprocess.run(["/usr/bin/git", "http-backend"], input=body, env=env,
                             capture_output=True, check=True).stdout
        head, _, rest = out.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.decode().split("\r\n"):
            k, _, v = line.partition(": ")
            if k.lower() == "status":
                status = int(v.split()[0])
            else:
                headers.append((k, v))
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(rest)))
        self.end_headers()
        self.wfile.write(rest)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(pem)
srv = http.server.ThreadingHTTPServer((ip, 443), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("ready", flush=True)
srv.serve_forever()
"#;

/// Kills the child this test started when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `git ls-remote` over smart HTTP: git's libcurl verifies with the system bundle. Protocol
/// v2 is a GET of info/refs and a POST of ls-refs, both audited as git-remote-https's.
#[test]
fn git_ls_remote_over_https_trusts_the_system_store() {
    use std::io::BufRead;
    need(GIT);
    need(PY);
    let ip = "127.0.98.2";
    let dir = TempDir::new("clients-git");
    let ca = TestCa::new("egress-test-clients-git-ca");
    let ca_file = dir.path("origin-ca.pem");
    ca.write_pem(&ca_file);
    let (chain, key) = ca.leaf(&["origin.test", ip]);
    std::fs::write(dir.path("leaf.der"), chain[0].as_ref()).unwrap();
    std::fs::write(dir.path("key.der"), key.secret_der()).unwrap();
    let root = dir.path("root");
    std::fs::create_dir(&root).unwrap();
    let made = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "set -e; cd {root}; {GIT} init -q -b main --bare repo.git; \
             t=$({GIT} -C repo.git mktree </dev/null); \
             c=$(GIT_AUTHOR_NAME=t GIT_AUTHOR_EMAIL=t@t GIT_COMMITTER_NAME=t \
                 GIT_COMMITTER_EMAIL=t@t {GIT} -C repo.git commit-tree $t -m init); \
             {GIT} -C repo.git update-ref refs/heads/main $c; echo $c",
            root = root.display()
        ))
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let commit = String::from_utf8(made.stdout).unwrap().trim().to_owned();
    let mut server = KillOnDrop(
        std::process::Command::new(PY)
            .args(["-c", GIT_SERVER])
            .arg(&root)
            .arg(dir.path("leaf.der"))
            .arg(dir.path("key.der"))
            .arg(ip)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufReader::new(server.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "the git server did not start");

    let args = [
        "--no-ca-env",
        "--upstream-ca",
        ca_file.to_str().unwrap(),
        "--private-ok",
        "127.0.0.0/8",
        "--allow",
        "origin.test",
    ];
    let f = sh(
        &args,
        &clean(&format!(
            "{GIT} -c http.curloptResolve=origin.test:443:{ip} ls-remote \
             https://origin.test/repo.git 2>&1"
        )),
    );
    assert!(f.status.success(), "{f:#?}");
    assert_eq!(
        f.stdout,
        format!("{commit}\tHEAD\n{commit}\trefs/heads/main\n"),
        "{f:#?}"
    );
    let a = f.audit_of("request");
    assert_eq!(a.len(), 2, "{:#?}", f.audit);
    for r in a {
        // comm is the kernel's 15 bytes of git-remote-https.
        assert_eq!(r["comm"], "git-remote-http", "{r:#}");
        assert_eq!(r["decision"], "allow", "{r:#}");
        assert_eq!(r["host"], "origin.test", "{r:#}");
        assert_eq!(r["status"], 200, "{r:#}");
    }
}

const GO_MAIN: &str = r#"
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
)

func main() {
	r, err := http.Get(os.Args[1])
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(3)
	}
	b, _ := io.ReadAll(r.Body)
	fmt.Println(r.StatusCode, string(b))
}
"#;

/// Go's crypto/x509 reads the system bundle (no SSL_CERT_FILE/SSL_CERT_DIR here): a static
/// `http.Get` binary, built on the host, gets through with the mount and not without it.
#[test]
fn go_http_get_trusts_the_system_store() {
    need(GO);
    let s = site("127.0.98.3");
    let src = s.dir.path("goget.go");
    std::fs::write(&src, GO_MAIN).unwrap();
    let bin = s.dir.path("goget");
    let built = std::process::Command::new(GO)
        .args(["build", "-o"])
        .arg(&bin)
        .arg(&src)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", s.dir.path("home"))
        .env("GOCACHE", s.dir.path("gocache"))
        .env("GOPATH", s.dir.path("gopath"))
        .env("GOPROXY", "off")
        .env("GO111MODULE", "off")
        .env("CGO_ENABLED", "0")
        .output()
        .unwrap();
    assert!(built.status.success(), "go build: {built:?}");
    let cmd = clean(&format!("{} {} 2>&1", bin.display(), s.url()));
    let f = sh(&s.allowed(&["--no-ca-env"]), &cmd);
    assert!(f.status.success(), "{f:#?}");
    assert_eq!(f.stdout.trim(), format!("200 {}", s.hello()), "{f:#?}");
    assert_audited(&f, "goget");

    let f = sh(&s.allowed(&["--no-ca-env", "--no-ca-mount"]), &cmd);
    assert_eq!(
        f.status.code(),
        Some(3),
        "go trusted egress without the mount: {f:#?}"
    );
    assert!(
        f.stdout
            .contains("x509: certificate signed by unknown authority"),
        "{f:#?}"
    );
    assert_eq!(s.origin.requests().len(), 1);
}

const JAVA_MAIN: &str = r#"
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;

public class Main {
    public static void main(String[] args) throws Exception {
        HttpResponse<String> r = HttpClient.newHttpClient().send(
            HttpRequest.newBuilder(URI.create(args[0])).build(),
            HttpResponse.BodyHandlers.ofString());
        System.out.println(r.statusCode() + " " + r.body());
    }
}
"#;

/// Java's HttpClient reads only its `cacerts`, which the sandbox sees as a PKCS#12 store of
/// the system roots plus the egress CA; keytool opens it with `changeit`, MAC checked.
#[test]
fn java_trusts_the_egress_ca_through_cacerts() {
    need(JAVA);
    need(KEYTOOL);
    let s = site("127.0.95.2");
    let main = s.dir.path("Main.java");
    std::fs::write(&main, JAVA_MAIN).unwrap();
    let script = format!(
        "set -e; {java}; {keytool}",
        java = clean(&format!("{JAVA} {} {} 2>&1", main.display(), s.url())),
        keytool = clean(&format!(
            "{KEYTOOL} -list -cacerts -storepass changeit -alias egress-ca 2>&1"
        )),
    );
    let f = sh(&s.allowed(&["--no-ca-env"]), &script);
    assert!(f.status.success(), "{f:#?}");
    let mut lines = f.stdout.lines();
    assert_eq!(
        lines.next(),
        Some(format!("200 {}", s.hello()).as_str()),
        "{f:#?}"
    );
    assert!(f.stdout.contains("egress-ca, "), "{f:#?}");
    assert!(f.stdout.contains("trustedCertEntry"), "{f:#?}");
    assert_eq!(f.audit_of("request")[0]["comm"], "java");
}

/// The CA variables (here without the mount) name a bundle of the system roots plus the
/// CA, and SSL_CERT_DIR a hashed directory that OpenSSL verifies through; npm's cafile
/// variable replaces its roots and still verifies.
#[test]
fn the_ca_variables_name_the_system_roots_plus_the_ca() {
    need(OPENSSL);
    need(NPM);
    let s = site("127.0.96.2");
    let vars = [
        "SSL_CERT_FILE",
        "CURL_CA_BUNDLE",
        "REQUESTS_CA_BUNDLE",
        "PIP_CERT",
        "NODE_EXTRA_CA_CERTS",
        "npm_config_cafile",
        "GIT_SSL_CAINFO",
        "CARGO_HTTP_CAINFO",
        "NIX_SSL_CERT_FILE",
        "AWS_CA_BUNDLE",
        "HTTPLIB2_CA_CERTS",
        "DENO_CERT",
        "BUNDLE_SSL_CA_CERT",
    ];
    let out = s.dir.path("vars");
    let mut script = format!("set -e; : > {o}; ", o = out.display());
    for v in vars.iter().chain(&["SSL_CERT_DIR"]) {
        script += &format!("echo \"{v}=${{{v}}}\" >> {}; ", out.display());
    }
    script += &clean(&format!(
        "SSL_CERT_DIR=\"$SSL_CERT_DIR\" {OPENSSL} s_client -brief -connect {}:443 \
         -servername origin.test -verify_hostname origin.test -no-CAfile -no-CAstore \
         -verify_return_error </dev/null 2>&1; ",
        s.ip
    ));
    script += &clean(&format!(
        "npm_config_cafile=\"$npm_config_cafile\" {NPM} ping --userconfig /dev/null \
         --cache {} --registry https://{}/ --no-update-notifier --fetch-retries 0 2>&1; ",
        s.dir.path("npm-cache").display(),
        s.ip
    ));
    // Copy what the sandbox saw before the run directory goes away with the sandbox.
    script += &format!(
        "cp \"$SSL_CERT_FILE\" {b}; ls -l \"$SSL_CERT_DIR\" > {d}",
        b = s.dir.path("bundle").display(),
        d = s.dir.path("dir").display()
    );
    let f = sh(&s.allowed(&["--no-ca-mount"]), &script);
    assert!(f.status.success(), "{f:#?}");
    assert!(f.stdout.contains("Verification: OK"), "{f:#?}");
    assert!(f.stdout.contains("PONG"), "{f:#?}");

    let seen = std::fs::read_to_string(&out).unwrap();
    let value = |v: &str| {
        seen.lines()
            .find_map(|l| l.strip_prefix(&format!("{v}=")))
            .unwrap_or_else(|| panic!("{v} missing: {seen}"))
            .to_owned()
    };
    let bundle_path = value("SSL_CERT_FILE");
    for v in vars {
        assert_eq!(value(v), bundle_path, "{v}: {seen}");
    }
    assert!(!value("SSL_CERT_DIR").is_empty(), "{seen}");
    let bundle = std::fs::read_to_string(s.dir.path("bundle")).unwrap();
    let system = std::fs::read_to_string(SYSTEM_BUNDLE).unwrap();
    assert!(
        bundle.starts_with(&system),
        "the bundle must hold the system roots"
    );
    assert_eq!(
        bundle.matches("BEGIN CERTIFICATE").count(),
        system.matches("BEGIN CERTIFICATE").count() + 1
    );
    assert!(bundle.contains("# egress CA, SHA-256"));
    let dir = std::fs::read_to_string(s.dir.path("dir")).unwrap();
    assert!(dir.contains("-> egress-ca.pem"), "{dir}");
}

/// Every standard trust-store path of this host, as (path, what it is): a file's bytes, a
/// symlink's target, a directory's entries (recursively).
fn snapshot() -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(p: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            return;
        };
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(p).unwrap();
            out.push((
                p.to_owned(),
                format!("-> {}", target.display()).into_bytes(),
            ));
            if let Ok(canon) = std::fs::canonicalize(p) {
                if canon.is_file() && !canon.starts_with("/etc/ssl/certs") {
                    walk(&canon, out);
                }
            }
        } else if meta.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            entries.sort();
            out.push((p.to_owned(), b"dir".to_vec()));
            for e in entries {
                walk(&e, out);
            }
        } else {
            out.push((p.to_owned(), std::fs::read(p).unwrap()));
        }
    }
    let mut out = Vec::new();
    for p in ["/etc/ssl", "/etc/pki", "/var/lib/ca-certificates"] {
        walk(Path::new(p), &mut out);
    }
    if let Ok(jvms) = std::fs::read_dir("/usr/lib/jvm") {
        for j in jvms {
            walk(&j.unwrap().path().join("lib/security/cacerts"), &mut out);
        }
    }
    out
}

/// The host's mount table lines that touch a trust store.
fn trust_mounts() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains("/etc/ssl") || l.contains("/etc/pki") || l.contains("/jvm"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_host_store_is_never_changed_and_outside_processes_see_the_original() {
    need(SYSTEM_BUNDLE);
    let before = snapshot();
    assert!(
        before.iter().any(|(p, _)| p == Path::new(SYSTEM_BUNDLE)),
        "the snapshot must cover the system bundle"
    );
    let mounts_before = trust_mounts();
    let dir = TempDir::new("clients-host");
    let (ready, go) = (dir.path("ready"), dir.path("go"));
    let script = format!(
        "grep -c 'egress CA' {SYSTEM_BUNDLE} > {inside}; \
         cp /etc/ssl/certs/egress-ca.pem {ca}; \
         touch {ready}; \
         while [ ! -e {go} ]; do sleep 0.05; done",
        inside = dir.path("inside").display(),
        ca = dir.path("ca.pem").display(),
        ready = ready.display(),
        go = go.display(),
    );
    let run = Egress::run(&[], &["/bin/sh", "-c", &script]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready.exists() {
        assert!(
            Instant::now() < deadline,
            "the sandbox never got ready: {:#?}",
            run.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // While the sandbox runs: it sees the CA in the bundle, the host does not.
    let inside = std::fs::read_to_string(dir.path("inside")).unwrap();
    assert_eq!(
        inside.trim(),
        "1",
        "the sandbox's bundle should hold the CA once"
    );
    let ca = std::fs::read_to_string(dir.path("ca.pem")).unwrap();
    let pem = &ca[ca.find("-----BEGIN").expect("the CA's PEM")..];
    let host = std::fs::read_to_string(SYSTEM_BUNDLE).unwrap();
    assert!(!host.contains(pem), "the host bundle holds the egress CA");
    assert!(!host.contains("egress CA"));
    assert!(
        snapshot() == before,
        "the host's trust store changed during the run"
    );
    assert_eq!(
        trust_mounts(),
        mounts_before,
        "the host's mount table changed"
    );
    std::fs::write(&go, "").unwrap();
    let f = run.finish();
    assert!(f.status.success(), "{f:#?}");
    let after = snapshot();
    if after != before {
        let changed: Vec<_> = before
            .iter()
            .zip(&after)
            .filter(|(a, b)| a != b)
            .map(|(a, _)| a.0.display().to_string())
            .collect();
        panic!("the host's trust store changed: {changed:?}");
    }
    assert_eq!(trust_mounts(), mounts_before);
}

/// `egress run` with `unshare(2)` refused by a seccomp filter (as a container without
/// CAP_SYS_ADMIN would): the run fails, naming the step and `--no-ca-mount`, and never
/// starts the command without its trust-store mounts; with `--no-ca-mount` it runs.
#[test]
fn without_a_mount_namespace_egress_run_refuses_and_names_the_way_out() {
    egress_tests::require_root();
    drop(
        egress_tests::NO_NEW_EGRESS
            .lock()
            .unwrap_or_else(|p| p.into_inner()),
    );
    let dir = TempDir::new("clients-nons");
    let flag = dir.path("ran");
    let run = |extra: &[&str]| {
        let mut c = std::process::Command::new(egress_tests::egress_bin());
        c.env("EGRESS_CONFDIR", dir.path("conf"))
            .args(["run", "--user", "nobody"])
            .args(extra)
            .args(["--", "/usr/bin/touch"])
            .arg(&flag);
        // SAFETY: only prctl(2) between fork and exec, on a filter that lives in this
        // closure's frame for the duration of the call.
        #[allow(unsafe_code)]
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut c, deny_unshare);
        }
        c.output().expect("run egress")
    };
    let out = run(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{out:?}");
    assert!(stderr.contains("unshare(CLONE_NEWNS) failed"), "{stderr}");
    assert!(stderr.contains("--no-ca-mount"), "{stderr}");
    assert!(
        !flag.exists(),
        "the command ran without its mount namespace"
    );

    let out = run(&["--no-ca-mount"]);
    assert!(out.status.success(), "{out:?}");
    assert!(flag.exists(), "the command did not run under --no-ca-mount");
}

/// A seccomp filter failing `unshare` with EPERM and allowing everything else.
#[allow(unsafe_code)]
fn deny_unshare() -> std::io::Result<()> {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const RET_ERRNO: u32 = 0x0005_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let mut filter = [
        // seccomp_data.nr
        op(LD_W_ABS, 0, 0, 0),
        op(JEQ_K, 0, 1, libc::SYS_unshare as u32),
        op(RET_K, 0, 0, RET_ERRNO | libc::EPERM as u32),
        op(RET_K, 0, 0, RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: prog points at `filter`, both alive for the call.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Builds the `egress-probe` wheel and npm tarball (tests/fixtures/packages.py) and
/// publishes them on the site: a PEP 503 simple index under `/simple/`, and an npm
/// registry at `/`. Returns the message the installed package holds.
fn publish_packages(s: &Site) -> String {
    let dir = s.dir.path("packages");
    std::fs::create_dir(&dir).unwrap();
    let out = std::process::Command::new(PY)
        .args(["-c", include_str!("../fixtures/packages.py")])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "packages.py: {out:?}");
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let digest = |k: &str| made[k].as_str().unwrap().to_owned();
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();

    let wheel = "egress_probe-1.0-py3-none-any.whl";
    s.origin.serve_file(
        "/simple/egress-probe/",
        "text/html",
        format!(
            "<!DOCTYPE html><html><body>\
             <a href=\"/files/{wheel}#sha256={}\">{wheel}</a></body></html>",
            digest("wheel_sha256")
        ),
    );
    s.origin.serve_file(
        &format!("/files/{wheel}"),
        "application/octet-stream",
        read(wheel),
    );

    let tgz = "egress-probe-1.0.0.tgz";
    let tarball = format!("https://{}/egress-probe/-/{tgz}", s.ip);
    let packument = serde_json::json!({
        "name": "egress-probe",
        "dist-tags": { "latest": "1.0.0" },
        "versions": { "1.0.0": {
            "name": "egress-probe",
            "version": "1.0.0",
            "main": "index.js",
            "dist": {
                "tarball": tarball,
                "shasum": digest("tgz_sha1"),
                "integrity": digest("tgz_integrity"),
            },
        } },
    });
    s.origin
        .serve_file("/egress-probe", "application/json", packument.to_string());
    s.origin.serve_file(
        &format!("/egress-probe/-/{tgz}"),
        "application/octet-stream",
        read(tgz),
    );
    digest("message")
}

/// The install printed `message` last, the origin served exactly `paths` in order, and
/// egress audited each of them from `comm`, allowed, intercepted and answered 200.
fn assert_installed(f: &Finished, s: &Site, message: &str, paths: &[&str], comm: &str) {
    assert!(f.status.success(), "{f:#?}");
    assert_eq!(f.stdout.lines().last(), Some(message), "{f:#?}");
    let served: Vec<String> = s
        .origin
        .requests()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect();
    assert_eq!(served, paths, "{f:#?}");
    let a = f.audit_of("request");
    assert_eq!(a.len(), paths.len(), "{:#?}", f.audit);
    for r in a {
        assert_eq!(r["comm"], comm, "{r:#}");
        assert_eq!(r["decision"], "allow", "{r:#}");
        assert_eq!(r["tls"], "mitm", "{r:#}");
        assert_eq!(r["status"], 200, "{r:#}");
    }
}

/// Debian's pip (its vendored certifi is the system bundle) installs a wheel from a simple
/// index: the index page, then the wheel, both verified through the mounted bundle. Without
/// the mount it refuses the egress leaf and fetches nothing.
#[test]
fn pip_install_from_an_index_through_the_system_store() {
    need(PY);
    let s = site("127.0.99.2");
    let message = publish_packages(&s);
    let target = s.dir.path("site-packages");
    let pip = |extra: &[&str]| {
        let cmd = clean(&format!(
            "{PY} -m pip install --isolated --no-cache-dir --disable-pip-version-check \
             --retries 0 --timeout 20 --index-url https://{ip}/simple/ --target {t} \
             egress-probe 2>&1 && PYTHONPATH={t} {PY} -c \
             'import egress_probe; print(egress_probe.MESSAGE)'",
            ip = s.ip,
            t = target.display(),
        ));
        sh(&s.allowed(extra), &cmd)
    };
    let f = pip(&["--no-ca-env"]);
    assert_installed(
        &f,
        &s,
        &message,
        &[
            "/simple/egress-probe/",
            "/files/egress_probe-1.0-py3-none-any.whl",
        ],
        "python3",
    );

    std::fs::remove_dir_all(&target).unwrap();
    let f = pip(&["--no-ca-env", "--no-ca-mount"]);
    assert!(
        !f.status.success(),
        "pip trusted egress without the mount: {f:#?}"
    );
    assert!(f.stdout.contains("CERTIFICATE_VERIFY_FAILED"), "{f:#?}");
    assert_eq!(
        s.origin.request_count(),
        2,
        "nothing more reached the origin"
    );
}

/// `npm install` with a global npmrc pinning `cafile` to the system bundle: the packument,
/// then the tarball it names (integrity-checked), both verified through the mounted file;
/// node then loads the installed package. Without the mount npm refuses the egress leaf.
#[test]
fn npm_install_from_a_registry_with_cafile_pinned_to_the_system_bundle() {
    need(NPM);
    need(NODE);
    let s = site("127.0.99.4");
    let message = publish_packages(&s);
    let npmrc = s.dir.path("global-npmrc");
    std::fs::write(&npmrc, format!("cafile={SYSTEM_BUNDLE}\n")).unwrap();
    let (project, cache) = (s.dir.path("project"), s.dir.path("npm-cache"));
    let install = |extra: &[&str]| {
        // Nothing from an earlier install: npm would take the package from its cache.
        let _ = std::fs::remove_dir_all(&project);
        let _ = std::fs::remove_dir_all(&cache);
        std::fs::create_dir(&project).unwrap();
        std::fs::set_permissions(
            &project,
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let cmd = clean(&format!(
            "{NPM} install --globalconfig {rc} --userconfig /dev/null --cache {cache} \
             --registry https://{ip}/ --prefix {p} --no-update-notifier --no-audit --no-fund \
             --fetch-retries 0 egress-probe 2>&1 && cd {p} && \
             {NODE} -e 'console.log(require(\"egress-probe\"))'",
            rc = npmrc.display(),
            cache = cache.display(),
            ip = s.ip,
            p = project.display(),
        ));
        sh(&s.allowed(extra), &cmd)
    };
    let f = install(&["--no-ca-env"]);
    // npm sets its process title to its command line; the kernel keeps 15 bytes of it.
    assert_installed(
        &f,
        &s,
        &message,
        &["/egress-probe", "/egress-probe/-/egress-probe-1.0.0.tgz"],
        "npm install egr",
    );

    let f = install(&["--no-ca-env", "--no-ca-mount"]);
    assert!(
        !f.status.success(),
        "npm trusted egress without the mount: {f:#?}"
    );
    assert!(
        f.stdout.contains("SELF_SIGNED_CERT_IN_CHAIN")
            || f.stdout.contains("UNABLE_TO_VERIFY_LEAF_SIGNATURE")
            || f.stdout.contains("UNABLE_TO_GET_ISSUER_CERT_LOCALLY"),
        "npm should refuse the egress leaf: {f:#?}"
    );
    assert_eq!(
        s.origin.request_count(),
        2,
        "nothing more reached the origin"
    );
}

/// uv, installed by `cargo xtask setup` (`EGRESS_UV`).
fn uv() -> String {
    let uv = std::env::var("EGRESS_UV").expect(
        "EGRESS_UV is not set: run the privileged tests through `cargo xtask test`, \
         which installs uv",
    );
    need(&uv);
    uv
}

/// uv trusts its bundled Mozilla roots by default, not the system store. Inside `egress run`
/// it works either way a user would set it up: with `--system-certs` through the mounted
/// store alone, or by default through `SSL_CERT_FILE`, which egress sets to its bundle (here
/// without the mount). With neither, it refuses the egress leaf: the README says so.
#[test]
fn uv_trusts_egress_through_system_certs_or_ssl_cert_file() {
    need(PY);
    let uv = uv();
    let s = site("127.0.99.3");
    let message = publish_packages(&s);
    let target = s.dir.path("site-packages");
    let install = |extra: &[&str], env: &str, flags: &str| {
        let _ = std::fs::remove_dir_all(&target);
        let cmd = clean(&format!(
            "{env} UV_HTTP_RETRIES=0 {uv} pip install {flags} --no-config --no-cache \
             --python {PY} --index-url https://{ip}/simple/ --target {t} egress-probe 2>&1 \
             && PYTHONPATH={t} {PY} -c 'import egress_probe; print(egress_probe.MESSAGE)'",
            ip = s.ip,
            t = target.display(),
        ));
        sh(&s.allowed(extra), &cmd)
    };
    let installed = |f: &Finished, what: &str| {
        assert!(f.status.success(), "{what}: {f:#?}");
        assert_eq!(
            f.stdout.lines().last(),
            Some(message.as_str()),
            "{what}: {f:#?}"
        );
        let a = f.audit_of("request");
        assert!(!a.is_empty(), "{what}: {f:#?}");
        for r in &a {
            // uv works on a thread it names `main2` (for a bigger stack), and comm is the
            // thread's name.
            assert_eq!(r["comm"], "main2", "{what}: {r:#}");
            assert_eq!(r["tls"], "mitm", "{what}: {r:#}");
            assert_eq!(r["status"], 200, "{what}: {r:#}");
        }
        assert_eq!(a[0]["path"], "/simple/egress-probe/", "{what}: {f:#?}");
        assert!(
            a.iter()
                .any(|r| r["path"] == "/files/egress_probe-1.0-py3-none-any.whl"),
            "{what}: {f:#?}"
        );
    };

    let f = install(&["--no-ca-env"], "", "--system-certs");
    installed(&f, "--system-certs under the mount");

    let f = install(&["--no-ca-mount"], "SSL_CERT_FILE=\"$SSL_CERT_FILE\"", "");
    installed(&f, "SSL_CERT_FILE from egress");

    let seen = s.origin.request_count();
    let f = install(&["--no-ca-env"], "", "");
    assert!(
        !f.status.success(),
        "uv trusted egress by its bundled roots: {f:#?}"
    );
    assert!(f.stdout.contains("UnknownIssuer"), "{f:#?}");
    assert_eq!(
        s.origin.request_count(),
        seen,
        "nothing more reached the origin"
    );
}
