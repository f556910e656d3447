//! `cargo xtask soak`: egress under hostile load, on loopback, bounded in time.
//!
//! One `egress run` holds an agent shell (as `nobody`) in a network namespace with an nginx
//! origin, as the benchmark does. Inside it the harness's client ([`super::client::hostile`])
//! runs a steady open-loop client alone, then again while hostile clients run at once:
//! thousands of idle intercepted keep-alive connections, slowloris at the HTTP and TLS
//! layers, header bombs, malformed TLS records, HTTP/2 rapid reset and CONTINUATION floods.
//! Outside, a sampler reads egress's RSS and open file descriptors from `/proc`.
//!
//! It passes when egress stays up and the steady client sees no error, the steady p99 under
//! attack stays within 2x its unloaded value, RSS stays under [`RSS_BOUND_MIB`], the file
//! descriptors return to their baseline, and the audit holds exactly one record per finished
//! request. The report goes to `target/bench/SOAK[.quick].md`; a full run also replaces the
//! soak section of BENCHMARKS.md.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use super::{
    client::{
        hostile::{Attack, Outcome, Plan},
        Job,
    },
    install::{self, Assets, ORIGIN_IP, ORIGIN_NAME},
    parse,
    peers::{self, Env},
    report, sys,
    sys::{Agent, NetNs, ProcReader, TempDir},
};

/// The RSS egress must stay under through the whole soak.
pub const RSS_BOUND_MIB: u64 = 768;
/// How much the steady client's p99 may grow under attack.
const P99_FACTOR: f64 = 2.0;
/// egress's limits the slowloris clients should meet (proxy::HEADER_READ_TIMEOUT and
/// proxy::SNIFF_TIMEOUT).
const HEADER_TIMEOUT_SECS: u64 = 30;
const SNIFF_TIMEOUT_SECS: u64 = 10;
/// How long the descriptors may take to return to baseline after the hostile clients stop.
const FD_SETTLE: Duration = Duration::from_secs(60);
const BEGIN: &str = "<!-- soak:begin -->";
const END: &str = "<!-- soak:end -->";

pub struct Options {
    pub quick: bool,
    pub egress_bin: Option<PathBuf>,
}

struct Shape {
    name: &'static str,
    rate: f64,
    conns: usize,
    unloaded_secs: f64,
    loaded_secs: f64,
    idle: usize,
    slowloris: usize,
}

impl Shape {
    fn full() -> Self {
        Self {
            name: "full",
            rate: 100.0,
            conns: 4,
            unloaded_secs: 20.0,
            loaded_secs: 40.0,
            idle: 10_000,
            slowloris: 50,
        }
    }

    fn quick() -> Self {
        Self {
            name: "quick",
            unloaded_secs: 8.0,
            // Past egress's 30 s header timeout, so the HTTP slowloris clients meet it.
            loaded_secs: 35.0,
            idle: 2_000,
            slowloris: 20,
            ..Self::full()
        }
    }
}

/// One reading of egress from `/proc`.
#[derive(Clone, Copy, Debug)]
struct Sample {
    rss_kib: u64,
    fds: usize,
}

fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

pub fn run(opts: Options) -> Result<()> {
    install::require_root()?;
    let shape = if opts.quick {
        Shape::quick()
    } else {
        Shape::full()
    };
    let root = crate::workspace_root();
    let bench_dir = root.join("target/bench");
    fs::create_dir_all(&bench_dir)?;
    sys::set_mode(&bench_dir, 0o755)?;
    let nofile = sys::raise_nofile(200_000)?;
    let assets = Assets::ensure(&bench_dir)?;
    let paths = ["soak-steady", "soak-idle", "soak-attack"];
    for p in paths {
        let file = assets.www().join(p);
        fs::write(&file, "a".repeat(1024))?;
        sys::set_mode(&file, 0o644)?;
    }
    let (egress_bin, client_bin) = super::binaries(&bench_dir, opts.egress_bin.as_deref())?;
    let egress_confdir = bench_dir.join("egress-confdir");
    fs::create_dir_all(&egress_confdir)?;
    NetNs::remove_stale();
    let mut run_dir = TempDir::create(bench_dir.join(format!("soak-{}", std::process::id())))?;
    let hosts = run_dir.path().join("hosts");
    peers::write_hosts(&hosts, 0, 0)?;
    let env = Env {
        run_dir: run_dir.path().to_owned(),
        hosts,
        assets,
        egress_bin,
        client_bin,
        // The soak runs no mitmproxy.
        mitmdump: PathBuf::new(),
        egress_confdir,
        nobody: peers::user_ids("nobody")?,
        proxy_user: peers::user_ids("proxy")?,
        nofile,
    };
    let ns = NetNs::create(&format!("{}{}-soak", NetNs::PREFIX, std::process::id()))?;
    let _origin = peers::start_origin(&env, &ns)?;
    let outcome = soak(&env, &ns, &shape).and_then(|r| {
        let md = r.markdown(&shape);
        println!("{md}");
        let name = if opts.quick {
            "SOAK.quick.md"
        } else {
            "SOAK.md"
        };
        fs::write(bench_dir.join(name), &md)?;
        if !opts.quick {
            write_section(&root.join("BENCHMARKS.md"), &md)?;
        }
        let failed: Vec<&str> = r
            .verdicts
            .iter()
            .filter(|(_, ok, _)| !ok)
            .map(|(what, _, _)| what.as_str())
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            bail!("the soak failed: {}", failed.join("; "))
        }
    });
    if outcome.is_err() {
        run_dir.keep();
    }
    outcome
}

struct Report {
    out: Outcome,
    rss_base_kib: u64,
    rss_peak_kib: u64,
    fds_base: usize,
    fds_peak: usize,
    fds_after: usize,
    fds_settle_secs: f64,
    held: usize,
    audit: BTreeMap<String, usize>,
    egress_up: bool,
    secs: f64,
    /// (criterion, passed, what was measured)
    verdicts: Vec<(String, bool, String)>,
}

fn soak(env: &Env, ns: &NetNs, shape: &Shape) -> Result<Report> {
    let started = Instant::now();
    let log = env.run_dir.join("egress.log");
    let audit = env.run_dir.join("audit.jsonl");
    // Its own audit file, which the soak counts; every worker thread the machine has,
    // as a deployment would run it.
    let mut cmd = peers::egress_run(env, ns, &log, None);
    cmd.arg("--audit")
        .arg(&audit)
        .args(["--", "sh", "-c", sys::AGENT_LOOP]);
    let stderr = env.run_dir.join("agent.stderr");
    let mut agent = Agent::start("egress run", &mut cmd, &stderr, Duration::from_secs(60))?;
    let pid = agent.pid();

    // One request first, so the baseline holds what a warm egress holds.
    let warm = agent.run(
        &format!("curl -sS -o /dev/null -w '%{{http_code}}\\n' https://{ORIGIN_NAME}/1k"),
        Duration::from_secs(20),
    )?;
    if warm.code != 0 || warm.text().trim() != "200" {
        bail!("the warm-up request failed: {}", warm.text());
    }
    std::thread::sleep(Duration::from_millis(500));
    let reader = ProcReader::new();
    let (rss_base_kib, fds_base) = (reader.rss_kib(&[pid]), fd_count(pid));

    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (samples, sampling) = (samples.clone(), sampling.clone());
        std::thread::spawn(move || {
            let reader = ProcReader::new();
            while sampling.load(Ordering::Relaxed) {
                let s = Sample {
                    rss_kib: reader.rss_kib(&[pid]),
                    fds: fd_count(pid),
                };
                samples.lock().unwrap_or_else(|e| e.into_inner()).push(s);
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };

    let plan = Plan {
        tls: super::client::Tls {
            addr: format!("{ORIGIN_IP}:443").parse()?,
            ca: None,
        },
        name: ORIGIN_NAME.into(),
        rate: shape.rate,
        conns: shape.conns,
        unloaded_secs: shape.unloaded_secs,
        loaded_secs: shape.loaded_secs,
        idle: shape.idle,
        slowloris: shape.slowloris,
        steady_path: "/soak-steady".into(),
        idle_path: "/soak-idle".into(),
        attack_path: "/soak-attack".into(),
    };
    let limit = Duration::from_secs((shape.unloaded_secs + shape.loaded_secs) as u64 + 240);
    let mut held = 0;
    let job = agent.run_with(&env.job(&Job::Soak(plan))?, limit, |line| {
        eprintln!("soak: {line}");
        if let Some(n) = line.strip_prefix("@@HELD ") {
            held = n.trim().parse().unwrap_or(0);
        }
    });
    let ended = Instant::now();
    // The hostile clients are gone: the descriptors must come back.
    let mut fds_after = fd_count(pid);
    while fds_after > fds_base && ended.elapsed() < FD_SETTLE {
        std::thread::sleep(Duration::from_millis(250));
        fds_after = fd_count(pid);
    }
    let fds_settle_secs = ended.elapsed().as_secs_f64();
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    let job = job?;
    if job.code != 0 {
        bail!(
            "the soak client failed (exit {}):\n{}",
            job.code,
            sys::tail(&job.text(), 30)
        );
    }
    let out: Outcome = parse::result_json(&job.lines)?;

    // Still up: it answers a fresh request after all that.
    let after = agent.run(
        &format!("curl -sS -o /dev/null -w '%{{http_code}}\\n' https://{ORIGIN_NAME}/1k"),
        Duration::from_secs(20),
    )?;
    let egress_up = after.code == 0 && after.text().trim() == "200";
    agent.finish(Duration::from_secs(15));

    let samples = samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let rss_peak_kib = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let fds_peak = samples.iter().map(|s| s.fds).max().unwrap_or(0);
    let audit = audited_paths(&audit)?;
    let mut r = Report {
        out,
        rss_base_kib,
        rss_peak_kib,
        fds_base,
        fds_peak,
        fds_after,
        fds_settle_secs,
        held,
        audit,
        egress_up,
        secs: started.elapsed().as_secs_f64(),
        verdicts: Vec::new(),
    };
    r.judge();
    Ok(r)
}

/// Request records per path in the audit (the soak gives each client kind its own path).
fn audited_paths(audit: &Path) -> Result<BTreeMap<String, usize>> {
    let text = fs::read_to_string(audit).with_context(|| format!("reading {}", audit.display()))?;
    let mut by_path = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", audit.display(), i + 1))?;
        if v["event"] == "request" {
            let path = v["path"].as_str().unwrap_or("?").to_owned();
            *by_path.entry(path).or_default() += 1;
        }
    }
    Ok(by_path)
}

impl Report {
    fn judge(&mut self) {
        let o = &self.out;
        let steady_errors = o.unloaded.errors + o.loaded.errors;
        let mut v = vec![(
            "egress stays up".to_owned(),
            self.egress_up && steady_errors == 0,
            format!(
                "a fresh request after the soak: {}; steady client errors: {steady_errors}",
                if self.egress_up { "200" } else { "failed" }
            ),
        )];
        let (p0, p1) = (o.unloaded.latency_us.p99, o.loaded.latency_us.p99);
        v.push((
            format!("steady p99 under attack ≤ {P99_FACTOR}× unloaded"),
            p0 > 0.0 && p1 <= P99_FACTOR * p0,
            format!(
                "{} → {} ({:.2}×)",
                report::ms(p0),
                report::ms(p1),
                p1 / p0.max(1.0)
            ),
        ));
        v.push((
            format!("RSS stays under {RSS_BOUND_MIB} MiB"),
            self.rss_peak_kib > 0 && self.rss_peak_kib < RSS_BOUND_MIB * 1024,
            format!(
                "{:.1} MiB at rest, {:.1} MiB at peak",
                self.rss_base_kib as f64 / 1024.0,
                self.rss_peak_kib as f64 / 1024.0
            ),
        ));
        v.push((
            "file descriptors return to baseline".to_owned(),
            self.fds_after <= self.fds_base,
            format!(
                "{} at rest, {} at peak, {} after {:.1} s",
                self.fds_base, self.fds_peak, self.fds_after, self.fds_settle_secs
            ),
        ));
        let steady_ok = o.unloaded.latency_us.n + o.loaded.latency_us.n;
        let audited = |p: &str| self.audit.get(p).copied().unwrap_or(0);
        let (steady_audited, idle_audited) = (audited("/soak-steady"), audited("/soak-idle"));
        v.push((
            "exactly one audit record per finished request".to_owned(),
            steady_audited == steady_ok && idle_audited == o.idle.done && o.idle.done > 0,
            format!(
                "steady: {steady_ok} answered, {steady_audited} records; idle: {} answered, {idle_audited} records",
                o.idle.done
            ),
        ));
        // Hostile connections are cut off, each by the limit meant for it.
        let attack = |k: &str| o.attacks.get(k).cloned().unwrap_or_default();
        let ended_by_egress = |a: &Attack| -> u64 {
            a.outcomes
                .iter()
                .filter(|(what, _)| {
                    what.starts_with("closed")
                        || what.starts_with("status")
                        || what.contains("GOAWAY")
                })
                .map(|(_, n)| n)
                .sum()
        };
        for (kind, limit) in [
            ("slowloris (HTTP headers)", HEADER_TIMEOUT_SECS),
            ("slowloris (TLS hello)", SNIFF_TIMEOUT_SECS),
        ] {
            let a = attack(kind);
            v.push((
                format!("{kind} cut off within {limit} s (+2)"),
                ended_by_egress(&a) > 0 && a.max_before_stop <= limit + 2,
                format!(
                    "{} of {} closed by egress, the longest after {} s",
                    ended_by_egress(&a),
                    a.tries,
                    a.max_before_stop
                ),
            ));
        }
        // One connection of each may still be under way when the soak stops.
        let rr = attack("HTTP/2 rapid reset");
        v.push((
            "HTTP/2 rapid reset connections are ended by egress".to_owned(),
            rr.tries > 0 && ended_by_egress(&rr) + 1 >= rr.tries,
            format!("{} of {} connections", ended_by_egress(&rr), rr.tries),
        ));
        let cf = attack("HTTP/2 CONTINUATION flood");
        v.push((
            "HTTP/2 CONTINUATION floods are stopped within 1 MiB".to_owned(),
            cf.tries > 0 && ended_by_egress(&cf) + 1 >= cf.tries && cf.max_before_stop <= 1 << 20,
            format!(
                "{} of {} connections, the most one got in {} KiB",
                ended_by_egress(&cf),
                cf.tries,
                cf.max_before_stop / 1024
            ),
        ));
        self.verdicts = v;
    }

    fn markdown(&self, shape: &Shape) -> String {
        let o = &self.out;
        let mut md = format!(
            "## Soak under hostile load\n\n\
             `cargo xtask soak{}` ({} plan, {:.0} s, egress with its default worker threads on \
             this 2-core VM). A steady client makes {} HTTPS requests/s over {} keep-alive \
             connections for {:.0} s alone, then for {:.0} s while all of the following run at \
             once from the same sandbox: {} idle intercepted keep-alive connections ({} held), \
             {} slowloris clients at the HTTP layer and {} at the TLS layer (one byte a \
             second), header bombs (one every 100 ms), malformed TLS records (one connection \
             every 25 ms), HTTP/2 rapid reset and CONTINUATION floods (a connection every \
             250 ms each; a rapid-reset connection sends up to 20,000 HEADERS+RST_STREAM \
             pairs).\n\n",
            if shape.name == "quick" {
                " --quick"
            } else {
                ""
            },
            shape.name,
            self.secs,
            shape.rate,
            shape.conns,
            shape.unloaded_secs,
            shape.loaded_secs,
            shape.idle,
            self.held,
            shape.slowloris,
            shape.slowloris,
        );
        let rows: Vec<Vec<String>> = self
            .verdicts
            .iter()
            .map(|(what, ok, measured)| {
                vec![
                    what.clone(),
                    measured.clone(),
                    if *ok { "✅".into() } else { "❌".into() },
                ]
            })
            .collect();
        md.push_str(&report::markdown_table(
            &["criterion".into(), "measured".into(), "verdict".into()],
            &rows,
            &[],
        ));
        md.push_str(&format!(
            "\nSteady client: unloaded p50 {} / p99 {} (n={}), under attack p50 {} / p99 {} \
             (n={}).\n\n",
            report::ms(o.unloaded.latency_us.p50),
            report::ms(o.unloaded.latency_us.p99),
            o.unloaded.latency_us.n,
            report::ms(o.loaded.latency_us.p50),
            report::ms(o.loaded.latency_us.p99),
            o.loaded.latency_us.n,
        ));
        let rows: Vec<Vec<String>> = o
            .attacks
            .iter()
            .map(|(kind, a)| {
                let outcomes: Vec<String> = a
                    .outcomes
                    .iter()
                    .map(|(what, n)| format!("{what}: {n}"))
                    .collect();
                vec![
                    kind.clone(),
                    a.tries.to_string(),
                    outcomes.join("; "),
                    format!("{} {}", a.max_before_stop, a.unit),
                ]
            })
            .collect();
        md.push_str(&report::markdown_table(
            &[
                "hostile client".into(),
                "attempts".into(),
                "how they ended".into(),
                "most one got in".into(),
            ],
            &rows,
            &[1],
        ));
        md.push_str(&format!(
            "\nAudit records for the attack path: {}.\n",
            self.audit.get("/soak-attack").copied().unwrap_or(0)
        ));
        md
    }
}

/// Replaces the soak section of `file` (between its markers), or appends one.
fn write_section(file: &Path, md: &str) -> Result<()> {
    let doc = fs::read_to_string(file).unwrap_or_default();
    let section = format!("{BEGIN}\n{md}{END}\n");
    let new = match (doc.find(BEGIN), doc.find(END)) {
        (Some(b), Some(e)) if e > b => format!(
            "{}{section}{}",
            &doc[..b],
            &doc[e + END.len()..].trim_start_matches('\n')
        ),
        _ => format!("{}\n{section}", doc.trim_end()),
    };
    fs::write(file, new).with_context(|| format!("writing {}", file.display()))
}
