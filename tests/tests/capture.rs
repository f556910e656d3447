//! The eBPF capture against the real kernel, with real clients inside real sandboxes.
//!
//! Each test owns its loopback addresses (127.0.N.2) so that tests run in parallel.

use std::{path::PathBuf, process::Command, time::Duration};

use egress_common::{Counter, SockKey, SockRecord};
use egress_tests::{
    cgroup2_root,
    daemon::{run_in, Cgroup, NOBODY},
    egress_bin, gc, pinned_counter, pinned_map_len, testclient, touch, Egress, TempDir, Upstream,
};
use serde_json::Value;

fn tc() -> String {
    testclient().display().to_string()
}

/// The proxy's per-request lines (plain HTTP through the interceptor).
fn conn_closed(logs: &[Value]) -> Vec<&Value> {
    logs.iter().filter(|v| v["message"] == "request").collect()
}

/// The sandboxed client got the origin's answer, through the proxy.
fn assert_hello(out: &Value, origin: &str) {
    let resp = out["response"].as_str().unwrap_or("");
    assert!(
        resp.ends_with(&format!("hello from {origin}")),
        "expected a reply from {origin}: {out}"
    );
}

/// The origins of these tests are loopback addresses, and the proxy denies by default.
const LO: [&str; 4] = ["--allow", "127.0.0.0/8", "--allow", "::1"];

fn kernel_refusals(logs: &[Value]) -> Vec<&Value> {
    logs.iter()
        .filter(|v| v["target"] == "egress::kernel")
        .collect()
}

// 1. curl, and a Rust client, reach the upstream through the proxy, which saw the right
//    original destination, pid and comm.
#[test]
fn curl_reaches_upstream_through_proxy() {
    let up = Upstream::start("127.0.1.2:80");
    let mut e = Egress::run(&LO, &["curl", "-sS", "-m", "10", "http://127.0.1.2/"]);
    let started = e.wait_log("command started");
    let f = e.finish();
    assert!(f.status.success(), "{f:#?}");
    assert_eq!(f.stdout, "hello from 127.0.1.2:80", "{f:#?}");
    let closed = conn_closed(&f.logs);
    assert_eq!(closed.len(), 1, "{f:#?}");
    let c = closed[0];
    assert_eq!(c["orig_dst"], "127.0.1.2:80");
    assert_eq!(c["comm"], "curl");
    assert_eq!(
        c["pid"], started["pid"],
        "curl is the exec'd command, so it has the child's pid"
    );
    assert_eq!(c["status"], 200);
    assert_eq!(c["decision"], "allow");
    assert_eq!(up.accepted(), 1);
}

#[test]
fn rust_client_reaches_upstream_through_proxy() {
    let up = Upstream::start("127.0.2.2:80");
    let e = Egress::run(&LO, &[&tc(), "connect", "127.0.2.2:80"]);
    let f = e.finish();
    assert!(f.status.success(), "{f:#?}");
    let out = f.client_json();
    assert_hello(&out, "127.0.2.2:80");
    let closed = conn_closed(&f.logs);
    assert_eq!(closed.len(), 1, "{f:#?}");
    assert_eq!(closed[0]["orig_dst"], "127.0.2.2:80");
    assert_eq!(closed[0]["pid"], out["pid"]);
    // comm is truncated to 15 bytes by the kernel.
    assert_eq!(closed[0]["comm"], "egress-testclie");
    assert_eq!(up.accepted(), 1);
}

// 2. getpeername inside the sandbox returns the original address, not the proxy's.
#[test]
fn getpeername_returns_original_destination() {
    let _up = Upstream::start("127.0.3.2:80");
    let f = Egress::run(&LO, &[&tc(), "connect", "127.0.3.2:80"]).finish();
    let out = f.client_json();
    assert_eq!(out["peer"], "127.0.3.2:80", "{out}");
}

// 3a. A non-intercepted port gets EPERM, and the kernel reports it.
#[test]
fn non_intercepted_port_gets_eperm() {
    // Something is listening, so only the hook can make this fail.
    let up = Upstream::start("127.0.4.2:8080");
    let f = Egress::run(&LO, &[&tc(), "connect-err", "127.0.4.2:8080"]).finish();
    let out = f.client_json();
    assert_eq!(out["errno"], libc::EPERM, "{out}");
    assert_eq!(up.accepted(), 0);
    let audited = f.audit_of("kernel_deny");
    assert!(
        audited.iter().any(|r| r["dst"] == "127.0.4.2:8080"
            && r["protocol"] == "tcp"
            && r["pid"] == out["pid"]
            && r["sandbox"] == "run"),
        "{audited:#?}"
    );
    let refusals = kernel_refusals(&f.logs);
    assert!(
        refusals.iter().any(|r| r["dst"] == "127.0.4.2:8080"
            && r["comm"] == "egress-testclie"
            && r["pid"] == out["pid"]),
        "{refusals:#?}"
    );
}

// 3b. IPv6 (::1) and v4-mapped destinations are redirected or refused like IPv4.
#[test]
fn ipv6_and_v4_mapped_are_captured() {
    let up6 = Upstream::start("[::1]:18106");
    let up4 = Upstream::start("127.0.5.2:18106");
    let args = [&LO[..], &["--intercept-port", "18106"]].concat();
    let f = Egress::run(&args, &[&tc(), "connect", "[::1]:18106"]).finish();
    let out = f.client_json();
    assert_hello(&out, "[::1]:18106");
    assert_eq!(out["peer"], "[::1]:18106");
    assert_eq!(conn_closed(&f.logs)[0]["orig_dst"], "[::1]:18106");
    assert_eq!(up6.accepted(), 1);

    let f = Egress::run(&args, &[&tc(), "connect", "[::ffff:127.0.5.2]:18106"]).finish();
    let out = f.client_json();
    assert_hello(&out, "127.0.5.2:18106");
    assert_eq!(
        out["peer"], "[::ffff:127.0.5.2]:18106",
        "getpeername answers in the v6 form asked for"
    );
    assert_eq!(conn_closed(&f.logs)[0]["orig_dst"], "127.0.5.2:18106");
    assert_eq!(up4.accepted(), 1);

    let _other6 = Upstream::start("[::1]:18107");
    let _other4 = Upstream::start("127.0.5.2:18107");
    for dst in ["[::1]:18107", "[::ffff:127.0.5.2]:18107"] {
        let out = Egress::run(&args, &[&tc(), "connect-err", dst])
            .finish()
            .client_json();
        assert_eq!(out["errno"], libc::EPERM, "{dst}: {out}");
    }
}

// 3c. UDP to any port but 53 is refused.
#[test]
fn udp_other_than_dns_is_refused() {
    for (dst, sent) in [
        ("127.0.6.2:9999", false),
        ("127.0.6.2:443", false),
        ("[::1]:9999", false),
        ("127.0.6.2:53", true),
    ] {
        let out = Egress::run(&LO, &[&tc(), "udp", dst])
            .finish()
            .client_json();
        assert_eq!(out["sent"], sent, "{dst}: {out}");
        if !sent {
            assert_eq!(out["errno"], libc::EPERM, "{dst}: {out}");
        }
    }
}

// 4. The proxy's own upstream connects are not redirected (the upstream sees the proxy, not
//    a loop back into it), and a process outside the sandbox is untouched while one runs.
#[test]
fn outside_processes_and_proxy_upstreams_are_untouched() {
    let up = Upstream::start("127.0.7.2:80");
    let side = Upstream::start("127.0.7.2:8080");
    let dir = TempDir::new("outside");
    let go = dir.path("go");
    let mut e = Egress::run(
        &LO,
        &[
            &tc(),
            "--wait",
            &go.display().to_string(),
            "connect",
            "127.0.7.2:80",
        ],
    );
    e.ready();
    // This test process is outside the sandbox: a port the sandbox may not use works here,
    // and port 80 goes direct (no proxy record).
    std::net::TcpStream::connect("127.0.7.2:8080").expect("outside process must be untouched");
    let mut direct = std::net::TcpStream::connect("127.0.7.2:80").unwrap();
    use std::io::{Read as _, Write as _};
    direct.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut s = String::new();
    direct.read_to_string(&mut s).unwrap();
    assert!(s.ends_with("hello from 127.0.7.2:80"));
    assert_eq!(side.wait_accepted(1), 1);
    touch(&go, "");
    let f = e.finish();
    let out = f.client_json();
    assert_hello(&out, "127.0.7.2:80");
    // Exactly one connection through the proxy: the sandboxed one. Had the proxy's upstream
    // connect been redirected, it would have looped and been refused for lack of a record.
    assert_eq!(conn_closed(&f.logs).len(), 1, "{f:#?}");
    assert!(f
        .log_with("connection refused: no original destination recorded for it")
        .is_empty());
    assert_eq!(up.accepted(), 2);
}

// 5a. A process in a child cgroup of the sandbox is still captured.
#[test]
fn child_cgroup_is_still_captured() {
    let up = Upstream::start("127.0.8.2:80");
    let dir = TempDir::new("child");
    let go = dir.path("go");
    let mut e = Egress::run(
        &LO,
        &[
            &tc(),
            "--wait",
            &go.display().to_string(),
            "connect",
            "127.0.8.2:80",
        ],
    );
    let ready = e.ready();
    let pid = e.wait_log("command started")["pid"].as_u64().unwrap();
    let child = PathBuf::from(ready["cgroup"].as_str().unwrap()).join("nested");
    std::fs::create_dir(&child).unwrap();
    std::fs::write(child.join("cgroup.procs"), pid.to_string()).unwrap();
    let now = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(now.contains("/nested"), "{now}");
    touch(&go, "");
    let f = e.finish();
    let out = f.client_json();
    assert_hello(&out, "127.0.8.2:80");
    assert_eq!(conn_closed(&f.logs)[0]["orig_dst"], "127.0.8.2:80");
    assert_eq!(up.accepted(), 1);
    assert!(
        !child.exists(),
        "egress removes nested cgroups with the sandbox"
    );
}

// 5b. The sandboxed command cannot move itself out of its cgroup.
#[test]
fn sandbox_cannot_leave_its_cgroup() {
    use std::os::unix::fs::chown;
    // A subtree delegated to nobody, as a user's own cgroups are: P with children X and Y,
    // the directories and their cgroup.procs owned by nobody.
    let p = Cgroup::new("escape");
    let (x, y) = (p.child("x"), p.child("y"));
    for cg in [&p, &x, &y] {
        for f in [cg.path().to_path_buf(), cg.path().join("cgroup.procs")] {
            chown(&f, Some(NOBODY), Some(NOBODY)).unwrap();
        }
    }
    let target = y.path().join("cgroup.procs");
    let escape = |out: &[u8]| -> Value {
        serde_json::from_str(String::from_utf8_lossy(out).trim())
            .unwrap_or_else(|e| panic!("testclient printed no JSON ({e}): {out:?}"))
    };
    // Control: nobody, started in X, moves itself into Y, a cgroup it owns.
    let control = escape(&run_in(&x, None, &[&tc(), "escape", target.to_str().unwrap()]).stdout);
    assert_eq!(
        control["escaped"], true,
        "nobody can move between its own cgroups: {control}"
    );
    // The same move from inside the sandbox is refused: the sandbox's cgroup and its
    // ancestors are egress's (root's), and moving needs write access to the common ancestor.
    let f = Egress::run(&LO, &[&tc(), "escape", target.to_str().unwrap()]).finish();
    let out = f.client_json();
    assert_eq!(out["escaped"], false, "{out}");
    assert!(
        out["errno"] == libc::EACCES || out["errno"] == libc::EPERM,
        "{out}"
    );
    let in_y = std::fs::read_to_string(&target).unwrap();
    let pid = out["pid"].to_string();
    assert!(
        !in_y.lines().any(|l| l == pid),
        "the sandboxed process is in Y: {in_y}"
    );
}

// 6. Non-blocking connect and TCP fast open are captured.
#[test]
fn nonblocking_connect_is_captured() {
    let up = Upstream::start("127.0.9.2:80");
    let f = Egress::run(&LO, &[&tc(), "nonblock", "127.0.9.2:80"]).finish();
    let out = f.client_json();
    assert_hello(&out, "127.0.9.2:80");
    assert_eq!(out["peer"], "127.0.9.2:80");
    assert_eq!(up.accepted(), 1);
}

#[test]
fn tcp_fast_open_is_captured() {
    let up = Upstream::start("127.0.10.2:80");
    let f = Egress::run(&LO, &[&tc(), "fastopen", "127.0.10.2:80"]).finish();
    let out = f.client_json();
    assert_hello(&out, "127.0.10.2:80");
    assert_eq!(conn_closed(&f.logs)[0]["orig_dst"], "127.0.10.2:80");
    assert_eq!(up.accepted(), 1);
    // And MSG_FASTOPEN to a refused port is refused like connect.
    let out = Egress::run(&LO, &[&tc(), "fastopen", "127.0.10.2:8080"])
        .finish()
        .client_json();
    assert_eq!(out["errno"], libc::EPERM, "{out}");
}

// 7. Map entries return to zero after 1,000 connections have closed.
#[test]
fn map_entries_return_to_zero_after_1000_connections() {
    let up = Upstream::start("127.0.11.2:80");
    let dir = TempDir::new("maps");
    let done = dir.path("done");
    let mut e = Egress::run(
        &LO,
        &[
            &tc(),
            "loop",
            "127.0.11.2:80",
            "1000",
            "--linger",
            &done.display().to_string(),
        ],
    );
    let pin_dir = PathBuf::from(e.ready()["pin_dir"].as_str().unwrap());
    let line = e.wait_stdout_line();
    let out: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(out["ok"], 1000, "{out}");
    // The client is still alive (lingering); every connection it made has closed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (cookie, tuple) = loop {
        let cookie = pinned_map_len::<u64, SockRecord>(&pin_dir.join("ORIG_BY_COOKIE"));
        let tuple = pinned_map_len::<SockKey, SockRecord>(&pin_dir.join("ORIG_BY_TUPLE"));
        if (cookie, tuple) == (0, 0) || std::time::Instant::now() > deadline {
            break (cookie, tuple);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        (cookie, tuple),
        (0, 0),
        "entries left behind by closed connections"
    );
    assert_eq!(
        pinned_counter(&pin_dir.join("COUNTERS"), Counter::Redirected),
        1000
    );
    assert_eq!(
        pinned_counter(&pin_dir.join("COUNTERS"), Counter::RecordFailed),
        0
    );
    touch(&done, "");
    let f = e.finish();
    assert!(f.status.success());
    assert_eq!(up.accepted(), 1000);
    // One audit record per request, none lost.
    let reqs = f.audit_of("request");
    assert_eq!(reqs.len(), 1000, "audit records");
    assert!(reqs.iter().all(|r| r["status"] == 200
        && r["decision"] == "allow"
        && r["bytes_down"].as_u64() > Some(0)));
    assert!(!pin_dir.exists(), "pins are removed on exit");
}

// 8. With the proxy gone (egress SIGKILLed), sandbox connects fail and never go direct;
//    `egress gc` then removes what the dead run left.
#[test]
fn killed_proxy_fails_closed() {
    let up = Upstream::start("127.0.12.2:80");
    let side = Upstream::start("127.0.12.2:8080");
    let dir = TempDir::new("kill9");
    let go = dir.path("go");
    let go_s = go.display().to_string();
    // The sandboxed shell outlives egress: it waits for the flag, then tries both ports.
    let script = format!(
        "while [ ! -e {go_s} ]; do sleep 0.02; done; {tc} connect 127.0.12.2:80; {tc} connect-err 127.0.12.2:8080",
        tc = tc()
    );
    let out_file = dir.path("out");
    let script = format!("({script}) > {} 2>&1", out_file.display());
    // The output file must be writable by the sandbox user.
    std::fs::write(&out_file, "").unwrap();
    std::fs::set_permissions(
        &out_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    let mut e = Egress::run(&LO, &["sh", "-c", &script]);
    // From here until the orphan is done, no other test may start egress (its gc would kill
    // the orphan this test is watching).
    let _quiet = egress_tests::NO_NEW_EGRESS
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let ready = e.ready();
    e.wait_log("command started");
    let cgroup = PathBuf::from(ready["cgroup"].as_str().unwrap());
    let pin_dir = PathBuf::from(ready["pin_dir"].as_str().unwrap());
    e.kill9();
    assert!(
        cgroup.exists() && pin_dir.exists(),
        "state survives SIGKILL on purpose"
    );
    touch(&go, "");
    // Wait for the orphaned sandbox to finish its attempts.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let lines = loop {
        let text = std::fs::read_to_string(&out_file).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if lines.len() == 2 || std::time::Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(
        lines[0]["errno"],
        libc::ECONNREFUSED,
        "redirected to a closed listener: {}",
        lines[0]
    );
    assert_eq!(lines[1]["errno"], libc::EPERM, "{}", lines[1]);
    assert_eq!(up.accepted(), 0, "nothing went direct");
    assert_eq!(side.accepted(), 0, "nothing went direct");
    let out = gc();
    assert!(out.status.success(), "{out:?}");
    assert!(!cgroup.exists(), "gc removes the dead run's cgroup");
    assert!(!pin_dir.exists(), "gc removes the dead run's pins");
    drop(e);
}

// 9. --isolate-net: only lo inside, and the proxy is still the way out.
#[test]
fn isolate_net_gives_only_loopback_and_the_proxy() {
    let up = Upstream::start("127.0.13.2:80");
    let f = Egress::run(
        &[&LO[..], &["--isolate-net"]].concat(),
        &["ip", "-o", "link"],
    )
    .finish();
    assert!(f.status.success(), "{f:#?}");
    let links: Vec<&str> = f.stdout.lines().collect();
    assert_eq!(links.len(), 1, "{links:?}");
    assert!(
        links[0].contains(": lo:") && links[0].contains("UP"),
        "{links:?}"
    );

    let f = Egress::run(
        &[&LO[..], &["--isolate-net"]].concat(),
        &[&tc(), "connect", "127.0.13.2:80"],
    )
    .finish();
    let out = f.client_json();
    assert_hello(&out, "127.0.13.2:80");
    assert_eq!(out["peer"], "127.0.13.2:80");
    assert_eq!(up.accepted(), 1);
}

// A direct connect from the sandbox to the proxy's own port has no record: refused, logged.
#[test]
fn direct_connect_to_listener_is_refused_and_logged() {
    let dir = TempDir::new("direct");
    let go = dir.path("go");
    let mut e = Egress::run(
        &LO,
        &[&tc(), "--wait", &go.display().to_string(), "connect", "@"],
    );
    let listen = e.ready()["listen4"].as_str().unwrap().to_owned();
    touch(&go, &listen);
    let f = e.finish();
    let out = f.client_json();
    assert_eq!(out["response"], "", "the proxy must not serve it: {out}");
    assert_eq!(
        f.log_with("connection refused: no original destination recorded for it")
            .len(),
        1,
        "{f:#?}"
    );
    assert!(conn_closed(&f.logs).is_empty());
}

// The command's exit status and signals pass through.
#[test]
fn exit_status_passes_through() {
    let f = Egress::run(&LO, &["sh", "-c", "exit 7"]).finish();
    assert_eq!(f.status.code(), Some(7), "{f:#?}");
    let f = Egress::run(&LO, &["sh", "-c", "kill -TERM $$"]).finish();
    assert_eq!(f.status.code(), Some(128 + libc::SIGTERM), "{f:#?}");
    let f = Egress::run(&LO, &["/nonexistent/command"]).finish();
    assert_eq!(f.status.code(), Some(127), "{f:#?}");
}

#[test]
fn signals_are_forwarded() {
    let mut e = Egress::run(&LO, &["sleep", "30"]);
    e.wait_log("command started");
    // SAFETY: kill(2) on the egress process this test started.
    unsafe { libc::kill(e.pid() as i32, libc::SIGTERM) };
    let f = e.finish();
    assert_eq!(f.status.code(), Some(128 + libc::SIGTERM), "{f:#?}");
}

// Bad input: one clear line, and a distinct exit code.
#[test]
fn unknown_flag_and_missing_command_exit_64() {
    for args in [
        &["run", "--bogus", "--", "true"][..],
        &["run"][..],
        &["run", "--"][..],
        &["run", "--allow-tcp", "nope", "--", "true"][..],
    ] {
        let out = Command::new(egress_bin()).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("error:"), "{args:?}: {err}");
    }
}

#[test]
fn missing_cgroup2_mount_is_named() {
    egress_tests::require_root();
    let root = cgroup2_root();
    // A private mount namespace where cgroup2 is unmounted: the host is not touched.
    let script = format!(
        "umount -l {} && exec {} run --user nobody -- true",
        root.display(),
        egress_bin().display()
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cgroup2") && err.contains("mountinfo"),
        "{err}"
    );
}

#[test]
fn running_without_privileges_names_the_capability() {
    use std::os::unix::process::CommandExt as _;
    let out = Command::new(egress_bin())
        .args(["run", "--user", "nobody", "--", "true"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(77), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CAP_BPF") && err.contains("CAP_SYS_ADMIN"),
        "{err}"
    );
}
