//! `cargo xtask bench`: egress side by side with a direct connection, mitmproxy and Squid,
//! on one machine and in one run, written to BENCHMARKS.md.
//!
//! The harness installs its peers on first use ([`install`]), builds egress, creates two
//! network namespaces holding only `lo` with an nginx origin in each ([`peers`]), then runs
//! each peer in turn with its clients in an agent shell, reading the proxy's CPU and memory
//! from `/proc` around every phase ([`sys`]). wrk, h2load and curl do what they do well; the
//! harness's own client ([`client`]) does open-loop latency, first visits, minting, idle
//! connections and bare connects. [`report`] judges the targets and renders the table.
//!
//! A second section ([`daemon`]) measures `egress daemon` on its own: `add` latency and RSS
//! with many sandboxes, each a cgroup in its own network namespace, and keep-alive HTTPS
//! through one of them against the same client outside any sandbox.

mod client;
mod daemon;
mod install;
mod parse;
mod peers;
mod policy;
mod report;
pub mod soak;
mod sys;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use self::{
    client::Job,
    install::{Assets, DOMAIN, ORIGIN_IP, ORIGIN_NAME},
    peers::{Env, Kind, Session},
    report::{Bulk, Idle, Latency, Mint, PeerResults, Rate, Report},
    sys::{Cpu, NetNs, ProcReader, TempDir},
};

pub struct Options {
    pub quick: bool,
    pub smoke: bool,
    /// Only the node daemon section: print its table, write no report.
    pub daemon_only: bool,
    /// Use this egress binary instead of building one.
    pub egress_bin: Option<PathBuf>,
}

/// `--internal JSON`: one load-generator job, run inside a sandbox or namespace.
pub fn internal(job: &str) -> Result<()> {
    client::run(job)
}

/// How long and how hard each phase runs.
#[derive(Clone, Debug)]
struct Plan {
    name: &'static str,
    warmup_secs: u32,
    /// Metric 1 and 2 (wrk/h2load durations).
    load_secs: u32,
    concurrency: usize,
    lat_secs: f64,
    lat_ka_rate: f64,
    lat_nc_rate: f64,
    lat_ka_conns: usize,
    /// The higher rates, run only for peers that sustain at least twice as much.
    lat_ka_rate_hi: f64,
    lat_nc_rate_hi: f64,
    bulk_object: &'static str,
    bulk_cap_secs: u32,
    fv_count: usize,
    fv_secs: f64,
    mint_count: usize,
    mint_secs: f64,
    mint_concurrency: usize,
    idle_count: usize,
    idle_secs: f64,
    m7_secs: u32,
    m7_concurrency: usize,
    profile_secs: u32,
    daemon: daemon::Plan,
}

impl Plan {
    fn full() -> Self {
        Self {
            name: "full",
            warmup_secs: 2,
            load_secs: 10,
            concurrency: 64,
            lat_secs: 12.0,
            lat_ka_rate: 100.0,
            lat_nc_rate: 20.0,
            lat_ka_conns: 8,
            lat_ka_rate_hi: 2000.0,
            lat_nc_rate_hi: 400.0,
            bulk_object: "bulk-full",
            bulk_cap_secs: 15,
            fv_count: 200,
            fv_secs: 10.0,
            mint_count: 10_000,
            mint_secs: 8.0,
            mint_concurrency: 16,
            idle_count: 10_000,
            idle_secs: 15.0,
            m7_secs: 8,
            m7_concurrency: 32,
            profile_secs: 5,
            daemon: daemon::Plan::full(),
        }
    }

    fn quick() -> Self {
        Self {
            name: "quick",
            warmup_secs: 1,
            load_secs: 2,
            lat_secs: 3.0,
            bulk_object: "bulk-quick",
            bulk_cap_secs: 4,
            fv_count: 20,
            fv_secs: 3.0,
            mint_count: 2_000,
            mint_secs: 2.0,
            idle_count: 1_000,
            idle_secs: 4.0,
            m7_secs: 2,
            profile_secs: 0,
            daemon: daemon::Plan::quick(),
            ..Self::full()
        }
    }

    fn settings(&self) -> Vec<(String, String)> {
        let s = |k: &str, v: String| (k.to_owned(), v);
        vec![
            s("Worker threads / processes", "1 for every proxy (egress: TOKIO_WORKER_THREADS=1; mitmproxy: one Python process; Squid: `workers 1`, plus up to 8 certificate helpers), 1 nginx worker per origin, 1 client thread".into()),
            s("Certificates", "ECDSA P-256 everywhere: origin leaf from a test CA; egress's own CA (in a fixed --confdir under target/bench) and a P-256 CA for mitmproxy and Squid; leaves minted with P-256 keys".into()),
            s("TLS", "1.3 on both legs (origin accepts only 1.3)".into()),
            s("Request logging", "on for every proxy: egress `--log info` (JSON to a file), mitmproxy `flow_detail=1`, Squid `access_log`".into()),
            s("Load duration (metrics 1, 2)", format!("{} s per phase after a {} s warm-up, {} connections", self.load_secs, self.warmup_secs, self.concurrency)),
            s("Open-loop latency (metric 3)", format!("{} s per mode and rate; keep-alive {} and {} req/s over {} connections, new connection {} and {} req/s; the higher rates only for peers that sustained twice that in metrics 1 and 2", self.lat_secs, self.lat_ka_rate, self.lat_ka_rate_hi, self.lat_ka_conns, self.lat_nc_rate, self.lat_nc_rate_hi)),
            s("Bulk (metric 4)", format!("{} ({} MiB), cap {} s", self.bulk_object, if self.bulk_object == "bulk-full" { install::BULK_FULL >> 20 } else { install::BULK_QUICK >> 20 }, self.bulk_cap_secs)),
            s("First visit / minting (metric 5)", format!("up to {} new names or {} s; up to {} new hosts or {} s, {} at a time", self.fv_count, self.fv_secs, self.mint_count, self.mint_secs, self.mint_concurrency)),
            s("Idle connections (metric 6)", format!("up to {} connections or {} s to open them, 32 at a time", self.idle_count, self.idle_secs)),
            s("Redirect (metric 7)", format!("{} s per arm, {} concurrent connectors; wrk -c{} for plain HTTP", self.m7_secs, self.m7_concurrency, self.m7_concurrency)),
            s("Node daemon", self.daemon.describe()),
        ]
    }
}

pub fn run(opts: Options) -> Result<()> {
    install::require_root()?;
    let started = Instant::now();
    let root = crate::workspace_root();
    let bench_dir = root.join("target/bench");
    fs::create_dir_all(&bench_dir)?;
    sys::set_mode(&bench_dir, 0o755)?;
    // The client holds 10,000 connections and so does the proxy; both inherit this.
    let nofile = sys::raise_nofile(200_000)?;

    let mitmdump = install::ensure_peers(&bench_dir)?;
    let assets = Assets::ensure(&bench_dir)?;
    let (egress_bin, client_bin) = binaries(&bench_dir, opts.egress_bin.as_deref())?;
    let egress_confdir = bench_dir.join("egress-confdir");
    fs::create_dir_all(&egress_confdir)?;

    NetNs::remove_stale();
    let plan = if opts.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    let mut run_dir = TempDir::create(bench_dir.join(format!("run-{}", std::process::id())))?;
    let hosts = run_dir.path().join("hosts");
    peers::write_hosts(&hosts, plan.fv_count, plan.mint_count)?;
    let env = Env {
        run_dir: run_dir.path().to_owned(),
        hosts,
        assets,
        egress_bin,
        client_bin,
        mitmdump,
        egress_confdir,
        nobody: peers::user_ids("nobody")?,
        proxy_user: peers::user_ids("proxy")?,
        nofile,
    };
    let pid = std::process::id();
    let plain = NetNs::create(&format!("{}{pid}-plain", NetNs::PREFIX))?;
    let nat = NetNs::create(&format!("{}{pid}-nat", NetNs::PREFIX))?;
    let _origin_plain = peers::start_origin(&env, &plain)?;
    let _origin_nat = peers::start_origin(&env, &nat)?;

    let outcome = if opts.smoke {
        smoke(&env, &plain, &nat)
    } else if opts.daemon_only {
        let mut notes = Vec::new();
        let r = daemon::measure(&env, &plan.daemon, &ProcReader::new(), &mut notes);
        println!(
            "Node daemon: {} sandboxes, {:.0} s\n\n{}",
            r.sandboxes,
            r.secs,
            r.table()
        );
        for n in notes {
            println!("- {n}");
        }
        match r.missing.get("section") {
            Some(why) => Err(anyhow::anyhow!("the daemon section failed: {why}")),
            None => Ok(()),
        }
    } else {
        measure(&env, &plain, &nat, &plan, started).and_then(|report| {
            write_report(&root, &bench_dir, &report, opts.quick)?;
            Ok(())
        })
    };
    if outcome.is_err() {
        run_dir.keep();
    }
    outcome
}

/// Builds (or takes) egress and builds the release client, and copies both into
/// `target/bench/bin`, so that a concurrent rebuild cannot swap them mid-run.
fn binaries(bench_dir: &Path, egress: Option<&Path>) -> Result<(PathBuf, PathBuf)> {
    let egress = match egress {
        Some(p) => p.to_owned(),
        None => crate::build(true)?,
    };
    // The load generator must not be a debug build.
    crate::run(Command::new("cargo").args(["build", "--release", "-p", "xtask"]))?;
    let bin = bench_dir.join("bin");
    fs::create_dir_all(&bin)?;
    sys::set_mode(&bin, 0o755)?;
    let copy = |from: &Path, name: &str| -> Result<PathBuf> {
        let to = bin.join(name);
        let tmp = bin.join(format!(".{name}.tmp"));
        fs::copy(from, &tmp).with_context(|| format!("copying {}", from.display()))?;
        sys::set_mode(&tmp, 0o755)?;
        fs::rename(&tmp, &to)?;
        Ok(to)
    };
    let root = crate::workspace_root();
    Ok((
        copy(&egress, "egress")?,
        copy(&root.join("target/release/xtask"), "xtask-bench")?,
    ))
}

/// Every peer starts and answers one request (curl, and the harness's client).
fn smoke(env: &Env, plain: &NetNs, nat: &NetNs) -> Result<()> {
    let mut failures = Vec::new();
    for kind in [
        Kind::Direct,
        Kind::Egress,
        Kind::Mitmproxy,
        Kind::Squid,
        Kind::Redirect,
    ] {
        let t = Instant::now();
        match smoke_one(env, plain, nat, kind) {
            Ok(what) => eprintln!(
                "bench smoke: {kind}: ok ({what}) in {:.1} s",
                t.elapsed().as_secs_f64()
            ),
            Err(e) => {
                eprintln!("bench smoke: {kind}: FAILED: {e:#}");
                failures.push(kind.to_string());
            }
        }
    }
    let t = Instant::now();
    match daemon::smoke(env) {
        Ok(what) => eprintln!(
            "bench smoke: node daemon: ok ({what}) in {:.1} s",
            t.elapsed().as_secs_f64()
        ),
        Err(e) => {
            eprintln!("bench smoke: node daemon: FAILED: {e:#}");
            failures.push("node daemon".into());
        }
    }
    if !failures.is_empty() {
        bail!("smoke failed for: {}", failures.join(", "));
    }
    eprintln!("bench smoke: every peer answered");
    Ok(())
}

fn smoke_one(env: &Env, plain: &NetNs, nat: &NetNs, kind: Kind) -> Result<String> {
    let mut s = Session::start(kind, env, plain, nat)?;
    let out = if kind == Kind::Redirect {
        let url = format!("http://{ORIGIN_NAME}/1k");
        let c = curl_once(&mut s, &url)?;
        format!("curl over the REDIRECT: HTTP {}", c.status)
    } else {
        let url = format!("https://{ORIGIN_NAME}/1k");
        let c = curl_once(&mut s, &url)?;
        let job = Job::OpenLoop {
            tls: s.tls(),
            name: ORIGIN_NAME.into(),
            path: "/1k".into(),
            rate: 1.0,
            secs: 1.0,
            keepalive: true,
            conns: 1,
        };
        let r: client::OpenLoopResult = run_job(&mut s, env, &job, 30)?;
        if r.errors > 0 || r.latency_us.n != 1 {
            bail!("the harness client's request failed: {r:?}");
        }
        format!("curl HTTP {}, harness client 200", c.status)
    };
    s.stop();
    Ok(out)
}

fn curl_once(s: &mut Session, url: &str) -> Result<parse::Curl> {
    let cmd = format!(
        "curl -sS -o /dev/null --max-time 10 {} -w '%{{http_code}} %{{size_download}} %{{time_total}}\\n' {url}",
        s.curl_ca()
    );
    let out = s.agent.run(&cmd, Duration::from_secs(15))?;
    let c = parse::curl(&out.text())?;
    if out.code != 0 || c.status != 200 {
        bail!("curl {url}: exit {}, output:\n{}", out.code, out.text());
    }
    Ok(c)
}

fn run_job<T: serde::de::DeserializeOwned>(
    s: &mut Session,
    env: &Env,
    job: &Job,
    limit_secs: u64,
) -> Result<T> {
    let out = s
        .agent
        .run(&env.job(job)?, Duration::from_secs(limit_secs))?;
    if out.code != 0 {
        bail!(
            "client job failed (exit {}):\n{}",
            out.code,
            sys::tail(&out.text(), 20)
        );
    }
    parse::result_json(&out.lines)
}

/// Proxy CPU and machine CPU around one phase.
struct Meter<'r> {
    reader: &'r ProcReader,
    ticks: f64,
}

impl Meter<'_> {
    fn phase<T>(
        &self,
        s: &mut Session,
        f: impl FnOnce(&mut Session) -> Result<T>,
    ) -> Result<(T, Option<Cpu>, f64)> {
        let pids = s.proxy_pids();
        let cpu0 = self.reader.cpu(&pids);
        let m0 = sys::machine_busy_secs(self.ticks);
        let out = f(s)?;
        let m1 = sys::machine_busy_secs(self.ticks);
        let cpu = (!pids.is_empty()).then(|| self.reader.cpu(&s.proxy_pids()).since(&cpu0));
        Ok((out, cpu, m1 - m0))
    }
}

fn measure(env: &Env, plain: &NetNs, nat: &NetNs, plan: &Plan, started: Instant) -> Result<Report> {
    let reader = ProcReader::new();
    let meter = Meter {
        reader: &reader,
        ticks: sys::clock_ticks(),
    };
    let mut report = Report {
        command: format!(
            "cargo xtask bench{}",
            if plan.name == "quick" { " --quick" } else { "" }
        ),
        mode: plan.name.into(),
        date: sys::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))?
            .trim()
            .to_owned(),
        machine: machine(),
        versions: versions(env),
        settings: plan.settings(),
        ..Report::default()
    };
    report.settings.push((
        "Open-file limit".into(),
        format!(
            "{} per process (the hard limit here; metric 6 opens at most {} connections through egress and {} through proxies that hold one upstream connection per client)",
            env.nofile,
            idle_count(plan, Kind::Egress, env.nofile),
            idle_count(plan, Kind::Squid, env.nofile)
        ),
    ));
    for kind in [Kind::Direct, Kind::Egress, Kind::Mitmproxy, Kind::Squid] {
        let t = Instant::now();
        eprintln!("bench: {kind} …");
        let mut s =
            Session::start(kind, env, plain, nat).with_context(|| format!("starting {kind}"))?;
        let mut r = PeerResults::default();
        peer_phases(env, &mut s, plan, &meter, &mut r, &mut report);
        if let Some(log) = s.log.clone() {
            s.stop();
            if kind == Kind::Egress {
                report.notes.extend(egress_log_summary(&log));
            }
        } else {
            s.stop();
        }
        eprintln!("bench: {kind} done in {:.0} s", t.elapsed().as_secs_f64());
        report.peers.insert(kind.key().into(), r);
    }
    for kind in [Kind::Redirect, Kind::RelayAlone] {
        eprintln!("bench: {kind} …");
        let mut s =
            Session::start(kind, env, plain, nat).with_context(|| format!("starting {kind}"))?;
        let mut r = PeerResults::default();
        let addr = match kind {
            Kind::Redirect => format!("{ORIGIN_IP}:80"),
            _ => format!("127.0.0.1:{}", peers::RELAY_PORT),
        };
        let url = match kind {
            Kind::Redirect => format!("http://{ORIGIN_NAME}/1k"),
            _ => format!("http://127.0.0.1:{}/1k", peers::RELAY_PORT),
        };
        redirect_phases(env, &mut s, plan, &meter, &mut r, &addr, &url);
        if kind == Kind::Redirect {
            // The low-rate keep-alive latency through a relay that only copies bytes: the
            // floor for any proxy's extra hop on this machine.
            let res = latency_phase(env, &mut s, plan, true, plan.lat_ka_rate);
            r.lat_ka = record(&mut r, "lat_ka", res);
            pinned_latency(env, &mut s, plan, &mut r);
        }
        s.stop();
        report.peers.insert(kind.key().into(), r);
    }
    if let Some(alone) = report.peers.get(report::RELAY_ALONE) {
        if let (Some(c), Some(h)) = (&alone.plain_connect, &alone.plain_http) {
            report.notes.push(format!(
                "The reference relay addressed directly (no capture at all) did {} connects/s and {} plain-HTTP req/s: the floor the REDIRECT column adds capture cost to.",
                report::num(c.per_sec()),
                report::num(h.per_sec())
            ));
        }
    }
    eprintln!("bench: policy size …");
    let t = Instant::now();
    report.policy = Some(policy::measure(env, plain, plan, &meter));
    eprintln!(
        "bench: policy size done in {:.0} s",
        t.elapsed().as_secs_f64()
    );
    eprintln!("bench: node daemon …");
    let t = Instant::now();
    report.daemon = Some(daemon::measure(
        env,
        &plan.daemon,
        &reader,
        &mut report.notes,
    ));
    eprintln!(
        "bench: node daemon done in {:.0} s",
        t.elapsed().as_secs_f64()
    );
    report.duration_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Records a phase's failure as the reason its cell is empty.
fn record<T>(r: &mut PeerResults, key: &str, res: Result<T>) -> Option<T> {
    match res {
        Ok(v) => Some(v),
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("bench:   {key}: {}", sys::tail(&msg, 5));
            r.missing.insert(key.into(), short_reason(&msg));
            None
        }
    }
}

fn short_reason(msg: &str) -> String {
    let first = msg.lines().next().unwrap_or(msg);
    if first.len() > 90 {
        format!(
            "{}…",
            &first[..first.char_indices().nth(90).map_or(first.len(), |(i, _)| i)]
        )
    } else {
        first.to_owned()
    }
}

fn wrk_rate(s: &mut Session, meter: &Meter, cmd: &str, limit: u64) -> Result<Rate> {
    let (out, cpu, machine) = meter.phase(s, |s| s.agent.run(cmd, Duration::from_secs(limit)))?;
    let w = parse::wrk(&out.text())?;
    if w.requests == 0 {
        bail!("no request succeeded:\n{}", out.text());
    }
    Ok(Rate {
        count: w.requests,
        secs: w.secs,
        errors: w.errors,
        cpu,
        machine_cpu_s: Some(machine),
    })
}

fn peer_phases(
    env: &Env,
    s: &mut Session,
    plan: &Plan,
    meter: &Meter,
    r: &mut PeerResults,
    report: &mut Report,
) {
    let kind = s.kind;
    let https = format!("https://{ORIGIN_NAME}/1k");
    let c = plan.concurrency;
    let d = plan.load_secs;
    let limit = u64::from(d) + 20;

    // Warm-up: leaf minted and cached, upstream connections pooled, Python warmed.
    let warm = format!("wrk -t1 -c4 -d{}s --timeout 10s {https}", plan.warmup_secs);
    if let Err(e) = s.agent.run(&warm, Duration::from_secs(30)) {
        r.missing.insert("warmup".into(), format!("{e:#}"));
    }

    // 6 first, while the proxy is fresh: idle RSS, then RSS with N idle connections.
    if s.has_proxy() {
        let res = idle_phase(env, s, plan, meter);
        r.idle = record(r, "idle", res);
    } else {
        r.missing.insert("idle".into(), "no proxy".into());
    }

    // 1. New connections.
    let cmd = format!("wrk -t1 -c{c} -d{d}s --timeout 10s -H 'Connection: close' {https}");
    let res = wrk_rate(s, meter, &cmd, limit);
    r.new_conns = record(r, "new_conns", res);

    // 2. Keep-alive, HTTP/1.1 then HTTP/2.
    let cmd = format!("wrk -t1 -c{c} -d{d}s --timeout 10s {https}");
    let res = wrk_rate(s, meter, &cmd, limit);
    r.ka_h1 = record(r, "ka_h1", res);
    let res = h2_phase(s, meter, c, d, &https);
    r.ka_h2 = record(r, "ka_h2", res);

    // 3. Open-loop latency: a low rate every peer sustains, then a higher one.
    let ka_cap = r.ka_h1.as_ref().map_or(0.0, Rate::per_sec);
    let nc_cap = r.new_conns.as_ref().map_or(0.0, Rate::per_sec);
    for (key, keepalive, rate, capacity) in [
        ("lat_ka", true, plan.lat_ka_rate, None),
        ("lat_nc", false, plan.lat_nc_rate, None),
        ("lat_ka_hi", true, plan.lat_ka_rate_hi, Some(ka_cap)),
        ("lat_nc_hi", false, plan.lat_nc_rate_hi, Some(nc_cap)),
    ] {
        if let Some(cap) = capacity {
            if cap < 2.0 * rate {
                r.missing.insert(
                    key.into(),
                    format!("{} req/s is over half its capacity", report::num(rate)),
                );
                continue;
            }
        }
        let res = latency_phase(env, s, plan, keepalive, rate);
        let slot = match key {
            "lat_ka" => &mut r.lat_ka,
            "lat_nc" => &mut r.lat_nc,
            "lat_ka_hi" => &mut r.lat_ka_hi,
            _ => &mut r.lat_nc_hi,
        };
        *slot = match res {
            Ok(l) => Some(l),
            Err(e) => {
                let msg = format!("{e:#}");
                eprintln!("bench:   {key}: {}", sys::tail(&msg, 5));
                r.missing.insert(key.into(), short_reason(&msg));
                None
            }
        };
    }

    // 3b. The low-rate keep-alive latency again, with every process on the path (client,
    // proxy, origin) on one CPU. On this VM waking a thread on another, idle CPU costs more
    // than the work, and more from run to run; on one CPU the row shows what the proxy
    // itself adds.
    if matches!(kind, Kind::Direct | Kind::Egress) {
        pinned_latency(env, s, plan, r);
    } else {
        r.missing.insert(
            "lat_ka_pinned".into(),
            "measured for direct, egress and the relay only".into(),
        );
    }

    // 4. Bulk.
    let res = bulk_phase(s, meter, plan);
    r.bulk = record(r, "bulk", res);

    // 5. First visits, then minting.
    let job = Job::FirstVisit {
        tls: s.tls(),
        warm: ORIGIN_NAME.into(),
        prefix: "fv".into(),
        domain: DOMAIN.into(),
        path: "/1k".into(),
        count: plan.fv_count,
        secs: plan.fv_secs,
    };
    let res =
        run_job::<client::FirstVisitResult>(s, env, &job, plan.fv_secs as u64 + 60).and_then(|f| {
            if f.visits == 0 {
                bail!("no first visit succeeded ({} errors)", f.errors)
            }
            Ok(f)
        });
    r.first_visit = record(r, "first_visit", res);
    let res = mint_phase(env, s, plan, meter);
    r.mint = record(r, "mint", res);

    // 7. The redirect itself (direct and egress here; the iptables arm has its own session).
    if matches!(kind, Kind::Direct | Kind::Egress) {
        redirect_phases(
            env,
            s,
            plan,
            meter,
            r,
            &format!("{ORIGIN_IP}:80"),
            &format!("http://{ORIGIN_NAME}/1k"),
        );
    }

    // Profiles of egress, taken after the measured phases so perf does not slow them.
    if kind == Kind::Egress && plan.profile_secs > 0 {
        for (name, cmd) in [
            (
                "keep-alive HTTP/1.1 (wrk -c64)",
                format!(
                    "wrk -t1 -c{c} -d{}s --timeout 10s {https}",
                    plan.profile_secs
                ),
            ),
            (
                "new connection per request (wrk -c64, Connection: close)",
                format!(
                    "wrk -t1 -c{c} -d{}s --timeout 10s -H 'Connection: close' {https}",
                    plan.profile_secs
                ),
            ),
        ] {
            match profile(env, s, &cmd, plan.profile_secs) {
                Ok(text) => report.profiles.push((name.to_owned(), text)),
                Err(e) => report
                    .notes
                    .push(format!("profile of {name} failed: {e:#}")),
            }
        }
    }
}

/// The low-rate keep-alive latency with every process on the path on one CPU.
fn pinned_latency(env: &Env, s: &mut Session, plan: &Plan, r: &mut PeerResults) {
    let res = on_one_cpu(env, s, |s| {
        latency_phase(env, s, plan, true, plan.lat_ka_rate)
    });
    r.lat_ka_pinned = record(r, "lat_ka_pinned", res);
}

/// Runs `f` with every thread of the session's processes (the agent or proxy and their
/// children) and of the origins pinned to CPU 0, then lets them run anywhere again.
fn on_one_cpu<T>(
    env: &Env,
    s: &mut Session,
    f: impl FnOnce(&mut Session) -> Result<T>,
) -> Result<T> {
    let online = fs::read_to_string("/sys/devices/system/cpu/online")
        .context("reading /sys/devices/system/cpu/online")?;
    let mut pids = sys::process_tree(s.agent.pid());
    pids.extend(s.proxy_pids());
    for dir in fs::read_dir(&env.run_dir)?.flatten() {
        if dir.file_name().to_string_lossy().starts_with("nginx-") {
            if let Ok(pid) = fs::read_to_string(dir.path().join("nginx.pid")) {
                pids.extend(pid.trim().parse::<u32>().ok());
            }
        }
    }
    // egress is its own agent, so it is in both lists: pin it once.
    pids.sort_unstable();
    pids.dedup();
    let pin = |cpus: &str| -> Result<()> {
        for pid in &pids {
            sys::output(Command::new("taskset").args(["-a", "-p", "-c", cpus, &pid.to_string()]))?;
        }
        Ok(())
    };
    pin("0")?;
    let out = f(s);
    pin(online.trim())?;
    out
}

fn h2_phase(s: &mut Session, meter: &Meter, c: usize, d: u32, url: &str) -> Result<Rate> {
    let cmd = format!("h2load -t1 -c{c} -m1 -D {d} {url}");
    let (out, cpu, machine) = meter.phase(s, |s| {
        s.agent.run(&cmd, Duration::from_secs(u64::from(d) + 20))
    })?;
    let text = out.text();
    if text.contains("No protocol negotiated") {
        bail!("no HTTP/2 (ALPN offered no h2)");
    }
    let h = parse::h2load(&text)?;
    if h.protocol.as_deref() != Some("h2") {
        bail!("negotiated {:?}, not h2", h.protocol);
    }
    if h.succeeded == 0 {
        bail!("no request succeeded:\n{text}");
    }
    Ok(Rate {
        count: h.succeeded,
        secs: h.secs,
        errors: h.failed,
        cpu,
        machine_cpu_s: Some(machine),
    })
}

fn latency_phase(
    env: &Env,
    s: &mut Session,
    plan: &Plan,
    keepalive: bool,
    rate: f64,
) -> Result<Latency> {
    let job = Job::OpenLoop {
        tls: s.tls(),
        name: ORIGIN_NAME.into(),
        path: "/1k".into(),
        rate,
        secs: plan.lat_secs,
        keepalive,
        conns: plan.lat_ka_conns,
    };
    let o: client::OpenLoopResult = run_job(s, env, &job, plan.lat_secs as u64 + 40)?;
    if o.latency_us.n == 0 {
        bail!("no request succeeded ({} errors)", o.errors)
    }
    Ok(Latency {
        p50_us: o.latency_us.p50,
        p99_us: o.latency_us.p99,
        n: o.latency_us.n,
        errors: o.errors,
        rate,
    })
}

fn bulk_phase(s: &mut Session, meter: &Meter, plan: &Plan) -> Result<Bulk> {
    let url = format!("https://{ORIGIN_NAME}/{}", plan.bulk_object);
    let cmd = format!(
        "curl -sS -o /dev/null --http1.1 --max-time {} {} -w '%{{http_code}} %{{size_download}} %{{time_total}}\\n' {url}",
        plan.bulk_cap_secs,
        s.curl_ca()
    );
    let (out, cpu, _) = meter.phase(s, |s| {
        s.agent.run(
            &cmd,
            Duration::from_secs(u64::from(plan.bulk_cap_secs) + 20),
        )
    })?;
    let c = parse::curl(&out.text())?;
    // 28: the time cap; what arrived still measures throughput.
    if (out.code != 0 && out.code != 28) || c.status != 200 || c.bytes == 0 {
        bail!("curl exit {}:\n{}", out.code, out.text());
    }
    Ok(Bulk {
        bytes: c.bytes,
        secs: c.secs,
        capped: out.code == 28,
        cpu,
    })
}

fn mint_phase(env: &Env, s: &mut Session, plan: &Plan, meter: &Meter) -> Result<Mint> {
    let tls = s.tls();
    let job = |prefix: Option<&str>, domain: &str, count: usize| Job::Handshakes {
        tls: tls.clone(),
        prefix: prefix.map(str::to_owned),
        domain: domain.into(),
        count,
        concurrency: plan.mint_concurrency,
        secs: plan.mint_secs,
    };
    let limit = plan.mint_secs as u64 + 40;
    let new_job = job(Some("mint"), DOMAIN, plan.mint_count);
    let (new, cpu_new, _) = meter.phase(s, |s| {
        run_job::<client::CountResult>(s, env, &new_job, limit)
    })?;
    if new.done == 0 {
        bail!(
            "no handshake to a new name succeeded: {}",
            new.first_error.clone().unwrap_or_default()
        );
    }
    // The same number of handshakes to one (cached) name, for comparison.
    let warm_job = job(None, ORIGIN_NAME, new.done);
    let (warm, cpu_warm, _) = meter.phase(s, |s| {
        run_job::<client::CountResult>(s, env, &warm_job, limit)
    })?;
    Ok(Mint {
        new,
        warm,
        cpu_new,
        cpu_warm,
    })
}

fn idle_phase(env: &Env, s: &mut Session, plan: &Plan, meter: &Meter) -> Result<Idle> {
    let pids = s.proxy_pids();
    // Let the warm-up's connections close first.
    std::thread::sleep(Duration::from_millis(500));
    let baseline = meter.reader.rss_kib(&pids);
    let job = Job::Idle {
        tls: s.tls(),
        name: ORIGIN_NAME.into(),
        path: "/1k".into(),
        count: idle_count(plan, s.kind, env.nofile),
        concurrency: 32,
        secs: plan.idle_secs,
        hold_secs: 2.5,
    };
    let mut held_rss = None;
    let reader = meter.reader;
    let out = s.agent.run_with(
        &env.job(&job)?,
        Duration::from_secs(plan.idle_secs as u64 + 40),
        |line| {
            if line.starts_with("@@HELD") {
                // Give the proxy a moment to finish the last responses.
                std::thread::sleep(Duration::from_millis(1000));
                held_rss = Some(reader.rss_kib(&pids));
            }
        },
    )?;
    if out.code != 0 {
        bail!("idle client failed:\n{}", sys::tail(&out.text(), 20));
    }
    let res: client::CountResult = parse::result_json(&out.lines)?;
    let held_rss = held_rss.context("the idle client never reported holding its connections")?;
    if res.done == 0 {
        bail!(
            "no connection opened: {}",
            res.first_error.unwrap_or_default()
        );
    }
    Ok(Idle {
        baseline_rss_kib: baseline,
        held_rss_kib: held_rss,
        held: res.done,
        errors: res.errors,
    })
}

/// How many idle connections fit under the open-file limit: egress pools its upstream
/// connections, the other proxies hold one upstream connection per client connection.
fn idle_count(plan: &Plan, kind: Kind, nofile: u64) -> usize {
    let room = nofile.saturating_sub(600) as usize;
    let per_conn = if kind == Kind::Egress { 1 } else { 2 };
    plan.idle_count.min(room / per_conn)
}

fn redirect_phases(
    env: &Env,
    s: &mut Session,
    plan: &Plan,
    meter: &Meter,
    r: &mut PeerResults,
    addr: &str,
    url: &str,
) {
    let res = addr
        .parse()
        .context("address")
        .and_then(|addr| {
            let job = Job::Connect {
                addr,
                concurrency: plan.m7_concurrency,
                secs: f64::from(plan.m7_secs),
            };
            meter.phase(s, |s| {
                run_job::<client::CountResult>(s, env, &job, u64::from(plan.m7_secs) + 30)
            })
        })
        .and_then(|(c, cpu, machine)| {
            if c.done == 0 {
                bail!(
                    "no connect completed: {}",
                    c.first_error.unwrap_or_default()
                );
            }
            Ok(Rate {
                count: c.done as u64,
                secs: c.secs,
                errors: c.errors as u64,
                cpu,
                machine_cpu_s: Some(machine),
            })
        });
    r.plain_connect = record(r, "plain_connect", res);
    let c = plan.m7_concurrency;
    let cmd = format!(
        "wrk -t1 -c{c} -d{}s --timeout 10s -H 'Connection: close' {url}",
        plan.m7_secs
    );
    let res = wrk_rate(s, meter, &cmd, u64::from(plan.m7_secs) + 20);
    r.plain_http = record(r, "plain_http", res);
}

/// A flat CPU profile (self time by symbol) of the proxy while `cmd` runs.
fn profile(env: &Env, s: &mut Session, cmd: &str, secs: u32) -> Result<String> {
    let pid = s.proxy_pid().context("no proxy pid")?;
    let data = env
        .run_dir
        .join(format!("perf-{}.data", Instant::now().elapsed().as_nanos()));
    let mut perf = sys::Proc::spawn(
        "perf record",
        Command::new("perf")
            .args([
                "record",
                "-e",
                "cpu-clock",
                "-F",
                "999",
                "-p",
                &pid.to_string(),
                "-o",
            ])
            .arg(&data)
            .args(["--", "sleep", &(secs + 1).to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    s.agent
        .run(cmd, Duration::from_secs(u64::from(secs) + 20))?;
    if perf.wait_timeout(Duration::from_secs(20)).is_none() {
        bail!("perf record did not finish");
    }
    let text = sys::output(
        Command::new("perf")
            .args(["report", "--stdio", "--no-children", "--sort", "dso,symbol"])
            .args(["--percent-limit", "1", "-i"])
            .arg(&data),
    )?;
    let _ = fs::remove_file(&data);
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(str::trim_end)
        .take(30)
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Counts of egress's warnings and errors during the run, with a few examples.
fn egress_log_summary(log: &Path) -> Vec<String> {
    let Ok(text) = fs::read_to_string(log) else {
        return vec![format!("egress log {} unreadable", log.display())];
    };
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    let mut requests = 0usize;
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let level = v["level"].as_str().unwrap_or("");
        let msg = v["message"]
            .as_str()
            .or(v["fields"]["message"].as_str())
            .unwrap_or("");
        if msg == "request" {
            requests += 1;
        }
        if level == "WARN" || level == "ERROR" {
            *counts.entry(format!("{level} {msg}")).or_default() += 1;
        }
    }
    let mut notes = vec![format!(
        "egress logged {requests} request lines at info level."
    )];
    for (msg, n) in counts.iter().take(8) {
        notes.push(format!("egress log: {n} × `{}`", short_reason(msg)));
    }
    notes
}

fn machine() -> Vec<(String, String)> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_owned();
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0))
        .unwrap_or_default();
    let nproc = install::version_of("nproc", &[]);
    vec![
        ("CPU".into(), format!("{nproc} × {model}")),
        ("Memory".into(), mem),
        ("Kernel".into(), install::version_of("uname", &["-srm"])),
        (
            "OS".into(),
            fs::read_to_string("/etc/os-release")
                .ok()
                .and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                        .map(|v| v.trim_matches('"').to_owned())
                })
                .unwrap_or_default(),
        ),
    ]
}

fn versions(env: &Env) -> Vec<(String, String)> {
    let root = crate::workspace_root();
    let commit = sys::output_lossy(Command::new("git").arg("-C").arg(&root).args([
        "rev-parse",
        "--short",
        "HEAD",
    ]));
    let dirty = !sys::output_lossy(Command::new("git").arg("-C").arg(&root).args([
        "status",
        "--porcelain",
        "egress-user",
        "egress-ebpf",
        "egress-common",
    ]))
    .trim()
    .is_empty();
    let egress = install::version_of(&env.egress_bin.to_string_lossy(), &["--version"]);
    let v = |k: &str, val: String| (k.to_owned(), val);
    vec![
        v(
            "egress",
            format!(
                "{egress}, commit {}{}",
                commit.trim(),
                if dirty {
                    " with uncommitted changes"
                } else {
                    ""
                }
            ),
        ),
        v("nginx (origin)", install::version_of("nginx", &["-v"])),
        v(
            "mitmproxy",
            install::version_of(&env.mitmdump.to_string_lossy(), &["--version"]),
        ),
        v("Squid", install::version_of("squid", &["-v"])),
        v("wrk", install::version_of("wrk", &["-v"])),
        v("h2load", install::version_of("h2load", &["--version"])),
        v("curl", install::version_of("curl", &["--version"])),
        v("OpenSSL", install::version_of("openssl", &["version"])),
        v("iptables", install::version_of("iptables", &["-V"])),
        v("rustc", install::version_of("rustc", &["--version"])),
    ]
}

fn write_report(root: &Path, bench_dir: &Path, report: &Report, quick: bool) -> Result<()> {
    let path = if quick {
        bench_dir.join("BENCHMARKS.quick.md")
    } else {
        root.join("BENCHMARKS.md")
    };
    let previous = fs::read_to_string(root.join("BENCHMARKS.md")).ok();
    let md = report.markdown(previous.as_deref());
    fs::write(&path, &md)?;
    fs::write(
        bench_dir.join(if quick {
            "results.quick.json"
        } else {
            "results.json"
        }),
        serde_json::to_string_pretty(report)?,
    )?;
    println!("{}", report.table());
    if let Some(d) = &report.daemon {
        println!("Node daemon\n\n{}", d.table());
    }
    eprintln!("bench: wrote {}", path.display());
    Ok(())
}
