//! The policy file, guards, warn mode, secrets and reload, end to end: real curl inside a
//! sandbox, the real capture, a loopback origin with its own test CA.
//!
//! Each test owns its loopback addresses (127.0.4N.2).

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use egress_tests::{egress_bin, origin::Site, testclient, Egress, Finished, TempDir, Upstream};
use serde_json::Value;

/// An HTTPS origin serving every name the tests use, on `ip`.
fn site(ip: &str) -> Site {
    Site::start(
        "policy",
        ip,
        &["origin.test", "api.origin.test", "other.test"],
    )
}

trait PolicySite {
    fn policy(&self, toml: &str) -> Vec<String>;
    fn policy_path(&self) -> PathBuf;
    fn curl(&self, extra: &[&str]) -> Vec<String>;
}

impl PolicySite for Site {
    /// Writes the policy file and returns the `egress run` arguments that use it.
    fn policy(&self, toml: &str) -> Vec<String> {
        let p = self.dir.path("policy.toml");
        std::fs::write(&p, toml).unwrap();
        vec![
            "--policy".into(),
            p.display().to_string(),
            "--upstream-ca".into(),
            self.ca_file.display().to_string(),
        ]
    }

    fn policy_path(&self) -> PathBuf {
        self.dir.path("policy.toml")
    }

    /// curl arguments resolving every test name to this origin.
    fn curl(&self, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = ["curl", "-sS", "-w", "%{http_code}\n"]
            .map(String::from)
            .to_vec();
        for name in ["origin.test", "api.origin.test", "other.test"] {
            v.push("--resolve".into());
            v.push(format!("{name}:443:{}", self.ip));
        }
        // `-o` applies to one URL each: give every URL its own.
        for a in extra {
            if a.starts_with("https://") {
                v.extend(["-o".to_string(), "/dev/null".to_string()]);
            }
            v.push(a.to_string());
        }
        v
    }
}

/// Single-quotes arguments for `sh -c`.
fn sh(args: &[String]) -> String {
    args.iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One curl invocation per request (curl's -H and -X apply to every URL of an invocation),
/// run in sequence by one shell inside the sandbox.
fn each(s: &Site, requests: &[&[&str]]) -> Vec<String> {
    let script = requests
        .iter()
        .map(|r| sh(&s.curl(r)))
        .collect::<Vec<_>>()
        .join("; ");
    vec!["sh".into(), "-c".into(), script]
}

fn run(args: &[String], cmd: &[String]) -> Finished {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let c: Vec<&str> = cmd.iter().map(String::as_str).collect();
    Egress::run(&a, &c).finish()
}

/// Status codes curl printed, one per URL.
fn codes(f: &Finished) -> Vec<u16> {
    f.stdout
        .lines()
        .map(|l| l.trim().parse().unwrap_or_else(|_| panic!("{f:#?}")))
        .collect()
}

fn audit_requests(f: &Finished) -> Vec<&Value> {
    f.audit_of("request")
}

const LOOPBACK_OK: &str = "private_ok = [\"127.0.0.0/8\"]";

#[test]
fn allow_deny_and_wildcards_from_the_policy_file() {
    let s = site("127.0.40.2");
    let args = s.policy(&format!(
        "[sandbox.run]\n{LOOPBACK_OK}\nallow = [\"*.origin.test\", \"other.test\"]\ndeny = [\"other.test\"]\n"
    ));
    let f = run(
        &args,
        &s.curl(&[
            "https://api.origin.test/hello",
            "https://origin.test/hello",
            "https://other.test/hello",
        ]),
    );
    // *.origin.test covers api.origin.test but not the apex; deny beats allow.
    assert_eq!(codes(&f), [200, 403, 403], "{f:#?}");
    let a = audit_requests(&f);
    assert_eq!(a[0]["rule"], "*.origin.test");
    assert!(
        a[1]["reason"]
            .as_str()
            .unwrap()
            .contains("host is not in the allowlist"),
        "{}",
        a[1]
    );
    assert_eq!(a[2]["rule"], "other.test", "the deny rule is named");
    assert_eq!(a[2]["decision"], "deny");
}

#[test]
fn method_and_path_rules_and_header_edits() {
    let s = site("127.0.41.2");
    let args = s.policy(&format!(
        r#"[sandbox.run]
{LOOPBACK_OK}
allow = ["origin.test"]
[[sandbox.run.rule]]
host = "origin.test"
methods = ["GET"]
paths = ["/hello", "/status/*"]
set_headers = {{ "X-Egress-Sandbox" = "run" }}
remove_headers = ["Authorization"]
"#
    ));
    let f = run(
        &args,
        &each(
            &s,
            &[
                &[
                    "-H",
                    "Authorization: Bearer leaked",
                    "https://origin.test/hello",
                ],
                &[
                    "-H",
                    "Authorization: Bearer leaked",
                    "https://origin.test/status/204",
                ],
                &["https://origin.test/echo"],
                &["-X", "POST", "https://origin.test/hello"],
            ],
        ),
    );
    assert_eq!(codes(&f), [200, 204, 403, 403], "{f:#?}");
    let seen = s.origin.requests();
    assert_eq!(
        seen.len(),
        2,
        "denied requests never reach the origin: {seen:?}"
    );
    for r in &seen {
        let h = |n: &str| {
            r.headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(h("x-egress-sandbox").as_deref(), Some("run"), "{r:?}");
        assert_eq!(
            h("authorization"),
            None,
            "Authorization must be stripped: {r:?}"
        );
    }
    let a = audit_requests(&f);
    assert!(
        a[2]["reason"].as_str().unwrap().contains("path"),
        "{}",
        a[2]
    );
    assert!(
        a[3]["reason"].as_str().unwrap().contains("POST"),
        "{}",
        a[3]
    );
}

#[test]
fn warn_mode_logs_what_it_would_deny_and_lets_it_through() {
    let s = site("127.0.42.2");
    let args = s.policy(&format!(
        "[sandbox.run]\nmode = \"warn\"\n{LOOPBACK_OK}\nallow = [\"other.test\"]\n"
    ));
    let f = run(&args, &s.curl(&["https://origin.test/hello"]));
    assert_eq!(codes(&f), [200], "{f:#?}");
    let a = audit_requests(&f);
    assert_eq!(a[0]["decision"], "warn");
    assert!(
        a[0]["reason"]
            .as_str()
            .unwrap()
            .contains("host is not in the allowlist"),
        "{}",
        a[0]
    );
    assert_eq!(s.origin.requests().len(), 1);
}

#[test]
fn private_range_guard_refuses_names_that_resolve_inside() {
    let s = site("127.0.43.2");
    // origin.test resolves (via --resolve) to a loopback address: an SSRF into the host.
    let guarded = s.policy("[sandbox.run]\nallow = [\"origin.test\"]\n");
    let f = run(&guarded, &s.curl(&["https://origin.test/hello"]));
    assert_eq!(codes(&f), [403], "{f:#?}");
    assert!(
        audit_requests(&f)[0]["reason"]
            .as_str()
            .unwrap()
            .contains("private"),
        "{:#?}",
        f.audit
    );
    assert!(s.origin.requests().is_empty());

    // An explicit opt-out lets it through.
    let open =
        s.policy("[sandbox.run]\nallow = [\"origin.test\"]\nguards = { private_ranges = false }\n");
    let f = run(&open, &s.curl(&["https://origin.test/hello"]));
    assert_eq!(codes(&f), [200], "{f:#?}");
}

#[test]
fn sni_and_host_must_agree() {
    let s = site("127.0.44.2");
    let args = s.policy(&format!(
        "[sandbox.run]\n{LOOPBACK_OK}\nallow = [\"origin.test\", \"other.test\"]\n"
    ));
    // Domain fronting: TLS to origin.test, HTTP Host other.test. Both are allowed, yet refused.
    let f = run(
        &args,
        &s.curl(&[
            "--http1.1",
            "-H",
            "Host: other.test",
            "https://origin.test/hello",
        ]),
    );
    assert_eq!(codes(&f), [403], "{f:#?}");
    assert!(
        audit_requests(&f)[0]["reason"]
            .as_str()
            .unwrap()
            .contains("differ"),
        "{:#?}",
        f.audit
    );
    assert!(s.origin.requests().is_empty());
}

#[test]
fn non_http_tcp_allowance_from_the_policy_is_enforced_in_the_kernel() {
    let up = Upstream::start("127.0.45.2:5432");
    let _closed = Upstream::start("127.0.45.2:5433");
    let dir = TempDir::new("tcp");
    let p = dir.path("policy.toml");
    std::fs::write(&p, "[sandbox.run]\ntcp = [\"127.0.45.0/24:5432\"]\n").unwrap();
    let tc = testclient().display().to_string();
    let ok = Egress::run(
        &["--policy", p.to_str().unwrap()],
        &[&tc, "connect-err", "127.0.45.2:5432"],
    )
    .finish();
    assert_eq!(ok.client_json()["ok"], true, "{ok:#?}");
    assert_eq!(up.accepted(), 1);
    let no = Egress::run(
        &["--policy", p.to_str().unwrap()],
        &[&tc, "connect-err", "127.0.45.2:5433"],
    )
    .finish();
    assert_eq!(no.client_json()["errno"], libc::EPERM, "{no:#?}");
}

#[test]
fn secrets_are_swapped_only_toward_authorized_hosts() {
    let s = site("127.0.46.2");
    let real = "sk-real-secret-0123456789";
    let args = s.policy(&format!(
        r#"[sandbox.run]
{LOOPBACK_OK}
allow = ["origin.test", "other.test"]
[sandbox.run.secrets.EGRESS_SECRET_TEST]
env = "EGRESS_TEST_REAL_SECRET"
hosts = ["origin.test"]
"#
    ));
    let b64 = "QmVhcmVyIHNrLXJlYWwtc2VjcmV0LTAxMjM0NTY3ODk="; // base64("Bearer sk-real-secret-0123456789")
                                                              // SAFETY: the tests in this binary never read this variable concurrently; egress (a child)
                                                              // inherits it, the sandboxed command never sees it (it is not passed on).
    unsafe { std::env::set_var("EGRESS_TEST_REAL_SECRET", real) };
    let smuggle = format!("X-Smuggle: {b64}");
    let f = run(
        &args,
        &each(
            &s,
            &[
                &[
                    "-H",
                    "Authorization: Bearer EGRESS_SECRET_TEST",
                    "https://origin.test/hello",
                ],
                &[
                    "-H",
                    "Authorization: Bearer EGRESS_SECRET_TEST",
                    "https://other.test/hello",
                ],
                &["-H", &smuggle, "https://other.test/hello"],
            ],
        ),
    );
    assert_eq!(codes(&f), [200, 403, 403], "{f:#?}");
    let seen = s.origin.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let auth = seen[0]
        .headers
        .iter()
        .find(|(k, _)| k == "authorization")
        .map(|(_, v)| v.as_str());
    assert_eq!(
        auth,
        Some(&*format!("Bearer {real}")),
        "placeholder replaced toward the authorized host"
    );
    let audit_text = serde_json::to_string(&f.audit).unwrap();
    assert!(
        !audit_text.contains(real),
        "the real value never reaches the audit log"
    );
    assert!(!f.stderr.contains(real) && !f.logs.iter().any(|l| l.to_string().contains(real)));
    let a = audit_requests(&f);
    assert!(
        a[1]["reason"]
            .as_str()
            .unwrap()
            .contains("EGRESS_SECRET_TEST"),
        "{}",
        a[1]
    );
    assert!(
        a[2]["reason"].as_str().unwrap().contains("base64"),
        "{}",
        a[2]
    );
}

#[test]
fn reload_under_load_finishes_requests_in_flight_under_the_old_policy() {
    let s = site("127.0.47.2");
    let args = s.policy(&format!(
        "[sandbox.run]\n{LOOPBACK_OK}\nallow = [\"origin.test\"]\n"
    ));
    // 20 requests to origin.test that the origin holds until the test releases them; once
    // the new policy is live, one more to origin.test and one to other.test.
    const HELD: usize = 20;
    let (after, checked) = (s.dir.path("after"), s.dir.path("checked"));
    let curl = |host: &str, tag: &str, path: &str| {
        format!(
            "curl -sS --resolve {host}:443:{ip} -o /dev/null -w '{tag} %{{http_code}}\\n' https://{host}{path}",
            ip = s.ip
        )
    };
    let script = format!(
        "for i in $(seq {HELD}); do {held} & done; \
         while [ ! -e {go} ]; do sleep 0.05; done; \
         {{ {old}; {new}; }} > {after} 2>&1; touch {checked}; wait",
        held = curl("origin.test", "held", "/hold"),
        old = curl("origin.test", "old-host", "/hello"),
        new = curl("other.test", "new-host", "/hello"),
        go = s.dir.path("go").display(),
        after = after.display(),
        checked = checked.display(),
    );
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut e = Egress::run(&a, &["sh", "-c", &script]);
    e.wait_log("command started");
    // Every held request has reached the origin: they are in flight across the reload.
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.origin.request_count() < HELD {
        assert!(
            Instant::now() < deadline,
            "only {} of {HELD} requests reached the origin",
            s.origin.request_count()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The new policy is not a superset: origin.test is no longer allowed.
    std::fs::write(
        s.policy_path(),
        format!("[sandbox.run]\n{LOOPBACK_OK}\nallow = [\"other.test\"]\n"),
    )
    .unwrap();
    // SIGHUP as well, so the test does not depend on mtime granularity.
    // SAFETY: kill(2) on the egress process this test started.
    unsafe { libc::kill(e.pid() as i32, libc::SIGHUP) };
    e.wait_log("policy reloaded");
    std::fs::write(s.dir.path("go"), "").unwrap();
    while !checked.exists() {
        assert!(
            Instant::now() < deadline,
            "the requests after the reload never finished"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let after_text = std::fs::read_to_string(&after).unwrap();
    assert_eq!(
        after_text.lines().collect::<Vec<_>>(),
        ["old-host 403", "new-host 200"],
        "new requests follow the new policy"
    );
    // Still held: nothing of the 20 has finished yet. Now let them finish.
    assert_eq!(
        s.origin.request_count(),
        HELD + 1,
        "the 20 held and other.test"
    );
    s.origin.release();
    let f = e.finish();
    let held: Vec<&str> = f.stdout.lines().filter(|l| l.starts_with("held")).collect();
    assert_eq!(
        held,
        vec!["held 200"; HELD],
        "every request in flight at the reload finished under the old policy: {f:#?}"
    );
    let audited = f
        .audit_of("request")
        .into_iter()
        .filter(|r| r["path"] == "/hold" && r["decision"] == "allow" && r["rule"] == "origin.test")
        .count();
    assert_eq!(
        audited, HELD,
        "each held request audited as allowed by the old rule"
    );
}

#[test]
fn an_invalid_reload_keeps_the_old_policy() {
    let s = site("127.0.48.2");
    let args = s.policy(&format!(
        "[sandbox.run]\n{LOOPBACK_OK}\nallow = [\"origin.test\"]\n"
    ));
    let go = s.dir.path("go");
    let script = format!(
        "while [ ! -e {go} ]; do sleep 0.05; done; {}",
        sh(&s.curl(&["https://origin.test/hello"])),
        go = go.display()
    );
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut e = Egress::run(&a, &["sh", "-c", &script]);
    e.wait_log("command started");
    std::fs::write(
        s.policy_path(),
        "[sandbox.run]\nallow = [\"bad host name!\"]\n",
    )
    .unwrap();
    // SAFETY: kill(2) on the egress process this test started.
    unsafe { libc::kill(e.pid() as i32, libc::SIGHUP) };
    e.wait_log("policy reload failed; keeping the previous policy");
    std::fs::write(&go, "").unwrap();
    let f = e.finish();
    assert_eq!(codes(&f), [200], "{f:#?}");
}

#[test]
fn policy_check_names_line_column_and_key_for_ten_broken_files() {
    let dir = TempDir::new("check");
    // (file, where: LINE:COL, the key path named). Every position is checked whole: the
    // line, the column of the offending token, and the key.
    let cases: &[(&str, &str, &str)] = &[
        ("[sandbox.a]\nallow = [\"ok.com\", \"bad host\"]\n", "2:20", "sandbox.a.allow[1]"),
        ("[sandbox.a]\nallow = \"x\"\n", "2:9", "sandbox.a.allow"),
        ("[sandbox.a]\nalow = []\n", "2:1", "sandbox.a.alow"),
        // A syntax error names no key: `-`.
        ("[sandbox.a\n", "1:11", "-"),
        ("[sandbox.a]\ntcp = [\"10.0.0.0/8\"]\n", "2:8", "sandbox.a.tcp[0]"),
        ("[sandbox.a]\nmode = \"loud\"\n", "2:8", "sandbox.a.mode"),
        ("[sandbox.a]\n[[sandbox.a.rule]]\nhost = \"x.com\"\nmethods = [\"G ET\"]\n", "4:12", "sandbox.a.rule[0].methods[0]"),
        ("[sandbox.a]\n[[sandbox.a.rule]]\nhost = \"x.com\"\npaths = [\"nope\"]\n", "4:10", "sandbox.a.rule[0].paths[0]"),
        ("[sandbox.a]\n[sandbox.a.secrets.EGRESS_SECRET_X]\nenv = \"A\"\nfile = \"/b\"\nhosts = [\"x.com\"]\n", "4:8", "sandbox.a.secrets.EGRESS_SECRET_X.file"),
        ("[sandbox.\"Bad Name\"]\n", "1:10", "sandbox.\"Bad Name\""),
    ];
    for (i, (text, at, key)) in cases.iter().enumerate() {
        let p = dir.path(&format!("p{i}.toml"));
        std::fs::write(&p, text).unwrap();
        let out = Command::new(egress_bin())
            .args(["policy", "check"])
            .arg(&p)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "case {i}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.trim().lines().count(),
            1,
            "case {i}: one error, one line: {err}"
        );
        let want = format!("egress: {}:{at}: {key}: ", p.display());
        assert!(
            err.starts_with(&want),
            "case {i}: want the error to start with {want:?}, got {err}"
        );
    }
    let good = dir.path("good.toml");
    std::fs::write(&good, "[sandbox.a]\nallow = [\"pypi.org\"]\n").unwrap();
    let out = Command::new(egress_bin())
        .args(["policy", "check"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn flags_extend_and_override_the_file() {
    let s = site("127.0.49.2");
    let mut args = s.policy(&format!(
        "[sandbox.run]\n{LOOPBACK_OK}\nallow = [\"origin.test\"]\n"
    ));
    // --allow extends the file's allow list; --deny overrides its allow (deny wins).
    args.extend(["--allow", "other.test", "--deny", "origin.test"].map(String::from));
    let f = run(
        &args,
        &each(
            &s,
            &[
                &["https://origin.test/hello"],
                &["https://other.test/hello"],
            ],
        ),
    );
    assert_eq!(codes(&f), [403, 200], "{f:#?}");
    assert_eq!(
        f.audit_of("request")[0]["rule"],
        "origin.test",
        "the deny rule is named"
    );
}

/// The JSON bodies of the 403s curl printed (one per line, before the status line).
fn deny_bodies(f: &Finished) -> Vec<Value> {
    f.stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["error"] == "egress_denied")
        .collect()
}

#[test]
fn deny_bodies_say_what_would_allow_the_request() {
    let s = site("127.0.71.2");
    let mut args = s.policy(
        "[sandbox.run]\nallow = [\"origin.test\"]\n[[sandbox.run.rule]]\nhost = \"origin.test\"\nmethods = [\"GET\"]\n",
    );
    let curl = |extra: &[&str]| {
        let mut v = vec![
            "curl".to_string(),
            "-sS".into(),
            "-w".into(),
            "%{http_code}\n".into(),
        ];
        for name in ["origin.test", "other.test"] {
            v.push("--resolve".into());
            v.push(format!("{name}:443:{}", s.ip));
        }
        v.extend(extra.iter().map(|a| a.to_string()));
        sh(&v)
    };
    let script = [
        curl(&["https://other.test/hello"]),
        curl(&["-X", "POST", "https://origin.test/hello"]),
        curl(&["https://origin.test/hello"]),
    ]
    .join("; ");
    let cmd = vec!["sh".to_string(), "-c".into(), script.clone()];
    let f = run(&args, &cmd);
    let bodies = deny_bodies(&f);
    assert_eq!(bodies.len(), 3, "{f:#?}");
    let hint = |i: usize| {
        bodies[i]["hint"]
            .as_str()
            .unwrap_or_else(|| panic!("no hint: {}", bodies[i]))
            .to_owned()
    };
    // `egress run` with a policy file: the file's section and the flag.
    assert_eq!(bodies[0]["host"], "other.test");
    assert_eq!(
        hint(0),
        "to allow it, add \"other.test\" to allow in [sandbox.run], or run with --allow other.test"
    );
    assert_eq!(
        hint(1),
        "to allow it, add \"POST\" to methods of the rule with host = \"origin.test\" ([[sandbox.run.rule]] number 1)"
    );
    assert_eq!(
        hint(2),
        "to allow it, add \"127.0.71.2\" to private_ok in [sandbox.run], or run with --private-ok 127.0.71.2"
    );
    assert!(s.origin.requests().is_empty());

    // Following the hints lets all three through.
    args.extend(["--allow", "other.test", "--private-ok", "127.0.71.2"].map(String::from));
    std::fs::write(
        s.policy_path(),
        "[sandbox.run]\nallow = [\"origin.test\"]\n[[sandbox.run.rule]]\nhost = \"origin.test\"\nmethods = [\"GET\", \"POST\"]\n",
    )
    .unwrap();
    let f = run(&args, &cmd);
    assert!(deny_bodies(&f).is_empty(), "{f:#?}");
    assert_eq!(s.origin.requests().len(), 3, "{f:#?}");
}
