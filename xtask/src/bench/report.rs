//! Results, the targets they are judged against, and BENCHMARKS.md.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    client::{CountResult, FirstVisitResult},
    parse::Summary,
    sys::Cpu,
};

/// Column keys, in table order. The last column only has metric 7.
pub const DIRECT: &str = "direct";
pub const EGRESS: &str = "egress";
pub const MITMPROXY: &str = "mitmproxy";
pub const SQUID: &str = "squid";
pub const REDIRECT: &str = "iptables-redirect";
/// The reference relay addressed directly, with no capture at all (metric 7's floor).
pub const RELAY_ALONE: &str = "relay-alone";
pub const COLUMNS: &[&str] = &[DIRECT, EGRESS, MITMPROXY, SQUID, REDIRECT];

/// A count of operations over a time, with the proxy's CPU over the same span.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Rate {
    pub count: u64,
    pub secs: f64,
    pub errors: u64,
    /// Proxy CPU while it ran (none for direct).
    pub cpu: Option<Cpu>,
    /// Busy CPU of the whole machine (all cores) while it ran.
    pub machine_cpu_s: Option<f64>,
}

impl Rate {
    pub fn per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.count as f64 / self.secs
        } else {
            0.0
        }
    }

    /// Proxy CPU seconds per operation.
    pub fn cpu_per_op(&self) -> Option<f64> {
        let c = self.cpu?;
        (self.count > 0).then(|| c.total() / self.count as f64)
    }

    pub fn machine_per_op(&self) -> Option<f64> {
        let c = self.machine_cpu_s?;
        (self.count > 0).then(|| c / self.count as f64)
    }

    /// Adds another run of the same measurement: counts, times and CPU sum.
    pub fn absorb(&mut self, r: &Rate) {
        self.count += r.count;
        self.secs += r.secs;
        self.errors += r.errors;
        self.cpu = match (self.cpu, r.cpu) {
            (Some(a), Some(b)) => Some(a.plus(&b)),
            (a, b) => a.or(b),
        };
        self.machine_cpu_s = match (self.machine_cpu_s, r.machine_cpu_s) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub n: usize,
    pub errors: usize,
    pub rate: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Bulk {
    pub bytes: u64,
    pub secs: f64,
    /// Stopped by the time cap before the whole object arrived.
    pub capped: bool,
    pub cpu: Option<Cpu>,
}

impl Bulk {
    pub fn mb_per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 / 1e6 / self.secs
        } else {
            0.0
        }
    }

    pub fn cpu_per_gb(&self) -> Option<f64> {
        let c = self.cpu?;
        (self.bytes > 0).then(|| c.total() / (self.bytes as f64 / 1e9))
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Mint {
    pub new: CountResult,
    pub warm: CountResult,
    pub cpu_new: Option<Cpu>,
    pub cpu_warm: Option<Cpu>,
}

impl Mint {
    /// Extra proxy CPU seconds a new host costs over a repeat one.
    pub fn extra_cpu_per_host(&self) -> Option<f64> {
        let (n, w) = (self.cpu_new?, self.cpu_warm?);
        if self.new.done == 0 || self.warm.done == 0 {
            return None;
        }
        Some(n.total() / self.new.done as f64 - w.total() / self.warm.done as f64)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Idle {
    pub baseline_rss_kib: u64,
    pub held_rss_kib: u64,
    pub held: usize,
    pub errors: usize,
}

impl Idle {
    pub fn per_conn_kib(&self) -> Option<f64> {
        (self.held > 0).then(|| {
            (self.held_rss_kib as f64 - self.baseline_rss_kib as f64).max(0.0) / self.held as f64
        })
    }
}

/// Everything measured for one column.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PeerResults {
    pub new_conns: Option<Rate>,
    pub ka_h1: Option<Rate>,
    pub ka_h2: Option<Rate>,
    pub lat_ka: Option<Latency>,
    pub lat_nc: Option<Latency>,
    /// The same at a higher rate, for peers that can sustain it.
    pub lat_ka_hi: Option<Latency>,
    pub lat_nc_hi: Option<Latency>,
    /// `lat_ka` with client, proxy and origin all on one CPU.
    #[serde(default)]
    pub lat_ka_pinned: Option<Latency>,
    pub bulk: Option<Bulk>,
    pub first_visit: Option<FirstVisitResult>,
    pub mint: Option<Mint>,
    pub idle: Option<Idle>,
    pub plain_connect: Option<Rate>,
    pub plain_http: Option<Rate>,
    /// Why a cell is empty: metric key -> reason.
    pub missing: BTreeMap<String, String>,
}

/// The node daemon section: `egress daemon` with many sandboxes, each a cgroup in its own
/// network namespace.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DaemonResults {
    /// Sandboxes added (and then removed).
    pub sandboxes: usize,
    /// `POST /v1/sandboxes`, connect to last byte of the answer, microseconds.
    pub add_us: Option<Summary>,
    /// `DELETE /v1/sandboxes/NAME`, microseconds.
    pub remove_us: Option<Summary>,
    /// Daemon VmRSS: started and ready, with every sandbox added, after the keep-alive runs,
    /// after removing every sandbox.
    pub rss_started_kib: Option<u64>,
    pub rss_added_kib: Option<u64>,
    #[serde(default)]
    pub rss_traffic_kib: Option<u64>,
    pub rss_removed_kib: Option<u64>,
    /// How long the section took, seconds.
    #[serde(default)]
    pub secs: f64,
    /// wrk connections of the keep-alive comparison.
    pub ka_conns: usize,
    /// Keep-alive HTTPS through sandbox 0 (cpu: the daemon's), and from its namespace
    /// outside any sandbox.
    pub ka_sandbox: Option<Rate>,
    pub ka_direct: Option<Rate>,
    /// Allowed requests the daemon counted for sandbox 0 during the comparison.
    pub counted_requests: Option<u64>,
    /// Why a value is missing: key -> reason.
    pub missing: BTreeMap<String, String>,
}

impl DaemonResults {
    pub fn rss_per_sandbox_kib(&self) -> Option<f64> {
        let (a, b) = (self.rss_added_kib?, self.rss_started_kib?);
        (self.sandboxes > 0).then(|| (a as f64 - b as f64) / self.sandboxes as f64)
    }

    pub fn ka_ratio(&self) -> Option<f64> {
        let (s, d) = (self.ka_sandbox.as_ref()?, self.ka_direct.as_ref()?);
        (d.per_sec() > 0.0).then(|| s.per_sec() / d.per_sec())
    }

    /// The section's rows: metric, value, target, verdict.
    pub fn rows(&self) -> Vec<Row> {
        let n = self.sandboxes;
        let why = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| self.missing.get(*k))
                .map(|r| format!("n/a ({r})"))
                .unwrap_or_else(|| "—".into())
        };
        let row = |metric: String, value: Option<String>, keys: &[&str]| Row {
            metric,
            cells: vec![value.unwrap_or_else(|| why(keys))],
            target: String::new(),
            verdict: None,
        };
        let mib = |k: Option<u64>| k.map(|k| num(k as f64 / 1024.0));
        let mut rows = Vec::new();
        for (what, pick, key) in [
            (
                "`add`: `POST /v1/sandboxes`",
                (|d: &DaemonResults| d.add_us.as_ref()) as fn(&DaemonResults) -> Option<&Summary>,
                "add",
            ),
            (
                "`remove`: `DELETE /v1/sandboxes/NAME`",
                |d: &DaemonResults| d.remove_us.as_ref(),
                "remove",
            ),
        ] {
            for (pct, get) in [
                ("p50", (|s: &Summary| s.p50) as fn(&Summary) -> f64),
                ("p99", |s: &Summary| s.p99),
            ] {
                rows.push(row(
                    format!(
                        "{what} latency {pct}, ms ({n} sandboxes, each its own cgroup and netns)"
                    ),
                    pick(self).map(|s| format!("{} (n={})", ms(get(s)), s.n)),
                    &[key, "section"],
                ));
            }
        }
        rows.push(row(
            "Daemon RSS, MiB: started / with every sandbox / after the keep-alive runs / every sandbox removed".into(),
            (self.rss_started_kib.is_some() || self.rss_added_kib.is_some()).then(|| {
                [
                    self.rss_started_kib,
                    self.rss_added_kib,
                    self.rss_traffic_kib,
                    self.rss_removed_kib,
                ]
                .map(|k| mib(k).unwrap_or_else(|| "—".into()))
                .join(" / ")
            }),
            &["rss", "add", "section"],
        ));
        let per = self.rss_per_sandbox_kib();
        rows.push(Row {
            target: "≤1 MiB".into(),
            verdict: Some(at_most_abs(per, 1024.0, "KiB")),
            ..row(
                format!("Daemon RSS per sandbox, KiB ((with {n} − started) / {n})"),
                per.map(num),
                &["rss", "add", "section"],
            )
        });
        let c = self.ka_conns;
        let rate_cell = |r: Option<&Rate>| {
            r.map(|r| {
                let mut s = num(r.per_sec());
                if r.errors > 0 {
                    s.push_str(&format!(" [{} errors]", num(r.errors as f64)));
                }
                s
            })
        };
        rows.push(row(
            format!("Keep-alive HTTPS req/s through a netns sandbox (wrk, {c} connections, 1 KiB)"),
            rate_cell(self.ka_sandbox.as_ref()),
            &["ka_sandbox", "keepalive", "section"],
        ));
        rows.push(row(
            format!("Keep-alive HTTPS req/s direct from the same netns (wrk, {c} connections)"),
            rate_cell(self.ka_direct.as_ref()),
            &["ka_direct", "keepalive", "section"],
        ));
        rows.push(row(
            "… sandbox ÷ direct".into(),
            self.ka_ratio().map(|r| format!("{}×", ratio(r))),
            &["ka_sandbox", "ka_direct", "keepalive", "section"],
        ));
        rows.push(row(
            "… daemon CPU µs per request through the sandbox".into(),
            self.ka_sandbox.as_ref().and_then(|r| {
                let c = r.cpu?;
                let sys = if c.total() > 0.0 {
                    c.sys / c.total() * 100.0
                } else {
                    0.0
                };
                Some(format!("{} ({sys:.0}% sys)", num(r.cpu_per_op()? * 1e6)))
            }),
            &["ka_sandbox", "keepalive", "section"],
        ));
        rows
    }

    pub fn table(&self) -> String {
        section_table("egress daemon", self.rows())
    }
}

/// A whole run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub command: String,
    pub mode: String,
    pub date: String,
    pub duration_secs: f64,
    pub machine: Vec<(String, String)>,
    pub versions: Vec<(String, String)>,
    pub settings: Vec<(String, String)>,
    pub peers: BTreeMap<String, PeerResults>,
    /// Profile excerpts, by phase name.
    pub profiles: Vec<(String, String)>,
    pub notes: Vec<String>,
    /// The node daemon section.
    #[serde(default)]
    pub daemon: Option<DaemonResults>,
    /// The policy size section.
    #[serde(default)]
    pub policy: Option<super::policy::PolicyResults>,
}

/// Thousands separators for whole numbers, sensible decimals for small ones.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        return "—".into();
    }
    let a = x.abs();
    if a >= 100.0 {
        let n = x.round() as i64;
        let digits = n.unsigned_abs().to_string();
        let mut out = String::new();
        for (i, ch) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(ch);
        }
        if n < 0 {
            out.insert(0, '-');
        }
        out
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// `x` with its ratio to `base`, e.g. `8,141 (0.67×)`.
pub fn with_ratio(x: f64, base: Option<f64>) -> String {
    match base {
        Some(b) if b > 0.0 => format!("{} ({}×)", num(x), ratio(x / b)),
        _ => num(x),
    }
}

pub fn ratio(r: f64) -> String {
    if r >= 10.0 {
        format!("{r:.0}")
    } else if r >= 0.1 {
        format!("{r:.2}")
    } else {
        format!("{r:.3}")
    }
}

/// Milliseconds from microseconds, three decimals.
pub fn ms(us: f64) -> String {
    format!("{:.3}", us / 1000.0)
}

/// Signed milliseconds from microseconds.
pub fn ms_signed(us: f64) -> String {
    format!("{:+.3}", us / 1000.0)
}

/// A judged target.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Met(String),
    Missed(String),
    Unknown(String),
}

impl Verdict {
    pub fn cell(&self) -> String {
        match self {
            Verdict::Met(s) => format!("✅ {s}"),
            Verdict::Missed(s) => format!("❌ {s}"),
            Verdict::Unknown(s) => format!("— {s}"),
        }
    }
}

/// `value` must be at least `min`.
pub fn at_least(value: Option<f64>, min: f64, what: &str) -> Verdict {
    match value {
        None => Verdict::Unknown(format!("{what}: not measured")),
        Some(v) if v >= min => Verdict::Met(format!("{what} {}", ratio(v))),
        Some(v) => Verdict::Missed(format!(
            "{what} {} (short by {:.0}%)",
            ratio(v),
            (1.0 - v / min) * 100.0
        )),
    }
}

/// `value` (microseconds) must be at most `max_us`.
pub fn at_most_us(value: Option<f64>, max_us: f64, what: &str) -> Verdict {
    match value {
        None => Verdict::Unknown(format!("{what}: not measured")),
        Some(v) if v <= max_us => Verdict::Met(format!("{what} {} ms", ms_signed(v))),
        Some(v) => Verdict::Missed(format!(
            "{what} {} ms ({} ms over)",
            ms_signed(v),
            ms(v - max_us)
        )),
    }
}

/// Absolute counts: `value` must be at least `min`.
pub fn at_least_abs(value: Option<f64>, min: f64, unit: &str) -> Verdict {
    match value {
        None => Verdict::Unknown("not measured".into()),
        Some(v) if v >= min => Verdict::Met(format!("{} {unit}", num(v))),
        Some(v) => Verdict::Missed(format!(
            "{} {unit} (short by {:.0}%)",
            num(v),
            (1.0 - v / min) * 100.0
        )),
    }
}

pub fn at_most_abs(value: Option<f64>, max: f64, unit: &str) -> Verdict {
    match value {
        None => Verdict::Unknown("not measured".into()),
        Some(v) if v <= max => Verdict::Met(format!("{} {unit}", num(v))),
        Some(v) => Verdict::Missed(format!("{} {unit} ({:.1}× the limit)", num(v), v / max)),
    }
}

/// Below this, an extra CPU cost per new host (seconds) is noise, not a measurement: the
/// difference of two CPU readings in clock ticks can come out at zero, or a rounding error
/// above it (Squid once showed 0.000 µs, "→ 576,460,752,303,423,488 hosts/s").
const MINT_NOISE_S: f64 = 1e-6;

/// Metric 5's minting verdict from the extra proxy CPU per new host (seconds). A cost within
/// noise can carry no verdict.
fn mint_verdict(extra_cpu_s: Option<f64>) -> Verdict {
    match extra_cpu_s {
        Some(x) if x < MINT_NOISE_S => Verdict::Unknown(format!(
            "extra CPU per new host {} µs is within noise",
            num(x * 1e6)
        )),
        x => at_least_abs(x.map(|x| 1.0 / x), 10_000.0, "hosts/s per core"),
    }
}

/// Combines verdicts: met only if all are met.
pub fn all(vs: Vec<Verdict>) -> Verdict {
    let text = vs
        .iter()
        .map(|v| match v {
            Verdict::Met(s) | Verdict::Missed(s) | Verdict::Unknown(s) => s.clone(),
        })
        .collect::<Vec<_>>()
        .join("; ");
    if vs.iter().any(|v| matches!(v, Verdict::Missed(_))) {
        Verdict::Missed(text)
    } else if vs.iter().any(|v| matches!(v, Verdict::Unknown(_))) {
        Verdict::Unknown(text)
    } else {
        Verdict::Met(text)
    }
}

/// One table row: the metric, one cell per column, the target and egress's verdict.
#[derive(Clone, Debug)]
pub struct Row {
    pub metric: String,
    pub cells: Vec<String>,
    pub target: String,
    pub verdict: Option<Verdict>,
}

/// A section's table: the metric, one value column named `column`, the target and the
/// verdict.
pub fn section_table(column: &str, rows: Vec<Row>) -> String {
    rows_table(&["Metric", column, "Target", "vs target"], rows, &[1])
}

/// Rows as a Markdown table under `headers`: metric, cells, target, verdict.
fn rows_table(headers: &[&str], rows: Vec<Row>, right: &[usize]) -> String {
    let headers: Vec<String> = headers.iter().map(|s| s.to_string()).collect();
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| {
            let mut v = vec![r.metric];
            v.extend(r.cells);
            v.push(r.target);
            v.push(r.verdict.map(|v| v.cell()).unwrap_or_default());
            v
        })
        .collect();
    markdown_table(&headers, &rows, right)
}

/// Renders a Markdown table; `|` inside cells is escaped. Columns whose index is in `right`
/// are right-aligned, the rest left-aligned.
pub fn markdown_table(headers: &[String], rows: &[Vec<String>], right: &[usize]) -> String {
    let esc = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    let mut out = String::new();
    out.push_str(&format!(
        "| {} |\n",
        headers
            .iter()
            .map(|h| esc(h))
            .collect::<Vec<_>>()
            .join(" | ")
    ));
    out.push_str(&format!(
        "|{}\n",
        headers
            .iter()
            .enumerate()
            .map(|(i, _)| if right.contains(&i) { "--:|" } else { "---|" })
            .collect::<String>()
    ));
    for r in rows {
        let mut cells: Vec<String> = r.iter().map(|c| esc(c)).collect();
        cells.resize(headers.len(), String::new());
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    out
}

impl Report {
    fn peer(&self, key: &str) -> Option<&PeerResults> {
        self.peers.get(key)
    }

    /// A cell: the value from `f`, or why it is missing.
    fn cell(&self, key: &str, metric: &str, f: impl Fn(&PeerResults) -> Option<String>) -> String {
        let Some(p) = self.peer(key) else {
            return "—".into();
        };
        match f(p) {
            Some(s) => s,
            None => p
                .missing
                .get(metric)
                .map(|r| format!("n/a ({r})"))
                .unwrap_or_else(|| "—".into()),
        }
    }

    fn row(
        &self,
        metric: &str,
        key: &str,
        f: impl Fn(&PeerResults, Option<&PeerResults>) -> Option<String>,
        target: &str,
        verdict: Option<Verdict>,
    ) -> Row {
        let direct = self.peer(DIRECT);
        Row {
            metric: metric.to_owned(),
            cells: COLUMNS
                .iter()
                .map(|c| self.cell(c, key, |p| f(p, direct)))
                .collect(),
            target: target.to_owned(),
            verdict,
        }
    }

    fn get<T>(&self, key: &str, f: impl Fn(&PeerResults) -> Option<T>) -> Option<T> {
        self.peer(key).and_then(f)
    }

    pub fn rows(&self) -> Vec<Row> {
        let ratio_to = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let rate = |p: &PeerResults, f: fn(&PeerResults) -> Option<&Rate>| f(p).map(Rate::per_sec);
        let cpu_cell = |r: &Rate, scale: f64| {
            let c = r.cpu?;
            let per = r.cpu_per_op()? * scale;
            let sys = if c.total() > 0.0 {
                c.sys / c.total() * 100.0
            } else {
                0.0
            };
            Some(format!("{} ({sys:.0}% sys)", num(per)))
        };
        let rate_cell = |r: Option<&Rate>, d: Option<&Rate>| {
            let r = r?;
            let mut s = with_ratio(r.per_sec(), d.map(Rate::per_sec));
            if r.errors > 0 {
                s.push_str(&format!(" [{} errors]", num(r.errors as f64)));
            }
            Some(s)
        };
        let mut rows = Vec::new();

        // 1. New connections.
        let nc = |k: &str| self.get(k, |p| rate(p, |p| p.new_conns.as_ref()));
        rows.push(self.row(
            "1. New HTTPS connections/s (wrk, 1 KiB request per connection)",
            "new_conns",
            |p, d| rate_cell(p.new_conns.as_ref(), d.and_then(|d| d.new_conns.as_ref())),
            "≥0.4× direct, ≥3× Squid",
            Some(all(vec![
                at_least(ratio_to(nc(EGRESS), nc(DIRECT)), 0.4, "×direct"),
                at_least(ratio_to(nc(EGRESS), nc(SQUID)), 3.0, "×Squid"),
            ])),
        ));
        rows.push(self.row(
            "1. Proxy CPU-seconds per 1,000 connections",
            "new_conns",
            |p, _| p.new_conns.as_ref().and_then(|r| cpu_cell(r, 1000.0)),
            "",
            None,
        ));

        // 2. Keep-alive.
        for (label, proto, key, pick) in [
            (
                "2. Keep-alive HTTP/1.1 req/s (wrk, 64 connections)",
                "HTTP/1.1",
                "ka_h1",
                (|p: &PeerResults| p.ka_h1.as_ref()) as fn(&PeerResults) -> Option<&Rate>,
            ),
            (
                "2. Keep-alive HTTP/2 req/s (h2load, 64 connections, 1 stream each)",
                "HTTP/2",
                "ka_h2",
                |p: &PeerResults| p.ka_h2.as_ref(),
            ),
        ] {
            let v = |k: &str| self.get(k, |p| rate(p, pick));
            rows.push(self.row(
                label,
                key,
                |p, d| rate_cell(pick(p), d.and_then(pick)),
                "≥0.5× direct, ≥30× mitmproxy",
                Some(all(vec![
                    at_least(ratio_to(v(EGRESS), v(DIRECT)), 0.5, "×direct"),
                    at_least(ratio_to(v(EGRESS), v(MITMPROXY)), 30.0, "×mitmproxy"),
                ])),
            ));
            rows.push(self.row(
                &format!("2. {proto} — proxy CPU µs per request"),
                key,
                |p, _| pick(p).and_then(|r| cpu_cell(r, 1e6)),
                "",
                None,
            ));
        }
        // HTTP/2 against HTTP/1.1 through the same peer. The direct column is what the two
        // clients and the origin alone make of the difference.
        let h2_over_h1 = |p: &PeerResults| {
            ratio_to(
                p.ka_h2.as_ref().map(Rate::per_sec),
                p.ka_h1.as_ref().map(Rate::per_sec),
            )
        };
        rows.push(self.row(
            "2. Keep-alive HTTP/2 req/s ÷ HTTP/1.1 req/s, each column its own",
            "ka_h2",
            |p, _| h2_over_h1(p).map(|r| format!("{}×", ratio(r))),
            "egress ≥0.9×",
            Some(at_least(
                self.get(EGRESS, h2_over_h1),
                0.9,
                "HTTP/2 ÷ HTTP/1.1",
            )),
        ));

        // 3. Latency.
        type Pick = fn(&PeerResults) -> Option<&Latency>;
        let modes: [(&str, &str, Pick); 5] = [
            ("keep-alive", "lat_ka", |p| p.lat_ka.as_ref()),
            (
                "keep-alive, every process on one CPU",
                "lat_ka_pinned",
                |p| p.lat_ka_pinned.as_ref(),
            ),
            ("new connection per request", "lat_nc", |p| {
                p.lat_nc.as_ref()
            }),
            ("keep-alive", "lat_ka_hi", |p| p.lat_ka_hi.as_ref()),
            ("new connection per request", "lat_nc_hi", |p| {
                p.lat_nc_hi.as_ref()
            }),
        ];
        for (what, key, pick) in &modes {
            for (pct, max_us, get_pct) in [
                (
                    "p50",
                    100.0,
                    (|l: &Latency| l.p50_us) as fn(&Latency) -> f64,
                ),
                ("p99", 500.0, |l: &Latency| l.p99_us),
            ] {
                let added = |k: &str| {
                    let base = self.get(DIRECT, |p| pick(p).map(get_pct))?;
                    Some(self.get(k, |p| pick(p).map(get_pct))? - base)
                };
                let rate_label = self
                    .get(DIRECT, |p| pick(p).map(|l| l.rate))
                    .map(|r| format!("{} req/s", num(r)))
                    .unwrap_or_default();
                rows.push(self.row(
                    &format!(
                        "3. Latency {pct}, {what}, ms (open loop, {rate_label}; added vs direct)"
                    ),
                    key,
                    |p, d| {
                        let l = pick(p)?;
                        let v = get_pct(l);
                        let mut s = ms(v);
                        if let Some(d) = d {
                            if let Some(base) = pick(d).map(get_pct) {
                                if !std::ptr::eq(p, d) {
                                    s.push_str(&format!(" ({})", ms_signed(v - base)));
                                }
                            }
                        }
                        if l.errors > 0 {
                            s.push_str(&format!(" [{} errors]", l.errors));
                        }
                        Some(s)
                    },
                    &format!("added ≤{} ms", max_us / 1000.0),
                    Some(at_most_us(added(EGRESS), max_us, "added")),
                ));
            }
        }

        // 3c. What egress adds over the relay, which only copies bytes: the same extra hop
        // with no work on it, so the floor of any proxy here.
        for (what, _, pick) in &modes[..2] {
            let over = |get_pct: fn(&Latency) -> f64| {
                let e = self.get(EGRESS, |p| pick(p).map(get_pct))?;
                let floor = self.get(REDIRECT, |p| pick(p).map(get_pct))?;
                Some(ms_signed(e - floor))
            };
            let cell = match (over(|l| l.p50_us), over(|l| l.p99_us)) {
                (Some(p50), Some(p99)) => format!("{p50} / {p99}"),
                _ => "n/a (the relay or egress not measured)".into(),
            };
            rows.push(Row {
                metric: format!(
                    "3. … egress minus the byte relay (the floor of an extra hop), p50 / p99, {what}, ms"
                ),
                cells: COLUMNS
                    .iter()
                    .map(|c| if *c == EGRESS { cell.clone() } else { "—".into() })
                    .collect(),
                target: String::new(),
                verdict: None,
            });
        }

        // 4. Bulk.
        let bulk = |k: &str| self.get(k, |p| p.bulk.as_ref().map(Bulk::mb_per_sec));
        rows.push(self.row(
            "4. Bulk single stream, MB/s (curl, HTTP/1.1)",
            "bulk",
            |p, d| {
                let b = p.bulk.as_ref()?;
                let mut s = with_ratio(
                    b.mb_per_sec(),
                    d.and_then(|d| d.bulk.as_ref()).map(Bulk::mb_per_sec),
                );
                if b.capped {
                    s.push_str(&format!(" [time cap: {} MB]", num(b.bytes as f64 / 1e6)));
                }
                Some(s)
            },
            "≥0.5× direct",
            Some(at_least(
                ratio_to(bulk(EGRESS), bulk(DIRECT)),
                0.5,
                "×direct",
            )),
        ));
        rows.push(self.row(
            "4. Proxy CPU-seconds per GB",
            "bulk",
            |p, _| {
                let b = p.bulk.as_ref()?;
                let c = b.cpu?;
                let sys = if c.total() > 0.0 {
                    c.sys / c.total() * 100.0
                } else {
                    0.0
                };
                Some(format!("{} ({sys:.0}% sys)", num(b.cpu_per_gb()?)))
            },
            "",
            None,
        ));

        // 5. First visit and minting.
        let fv = |k: &str| self.get(k, |p| p.first_visit.as_ref().map(|f| f.extra_total_us));
        rows.push(self.row(
            "5. First visit to a new SNI minus a warm one, ms (handshake + first response)",
            "first_visit",
            |p, _| {
                let f = p.first_visit.as_ref()?;
                Some(format!(
                    "{} ({} vs {})",
                    ms_signed(f.extra_total_us),
                    ms(f.new_total_us),
                    ms(f.warm_total_us)
                ))
            },
            "≤0.2 ms extra",
            Some(at_most_us(fv(EGRESS), 200.0, "extra")),
        ));
        rows.push(self.row(
            "5. … of which TLS handshake only, ms",
            "first_visit",
            |p, _| {
                let f = p.first_visit.as_ref()?;
                Some(format!(
                    "{} ({} vs {})",
                    ms_signed(f.extra_handshake_us),
                    ms(f.new_handshake_us),
                    ms(f.warm_handshake_us)
                ))
            },
            "",
            None,
        ));
        let minted = |k: &str| self.get(k, |p| p.mint.as_ref().map(|m| m.new.per_sec()));
        rows.push(self.row(
            "5. Distinct new hosts/s (TLS handshakes, each to a new SNI)",
            "mint",
            |p, _| {
                let m = p.mint.as_ref()?;
                let mut s = format!("{} (n={})", num(m.new.per_sec()), num(m.new.done as f64));
                if m.new.errors > 0 {
                    s.push_str(&format!(" [{} errors]", m.new.errors));
                }
                Some(s)
            },
            "≥10,000 hosts/s",
            Some(at_least_abs(minted(EGRESS), 10_000.0, "hosts/s")),
        ));
        rows.push(self.row(
            "5. Same-host handshakes/s (same client, cached leaf)",
            "mint",
            |p, _| Some(num(p.mint.as_ref()?.warm.per_sec())),
            "",
            None,
        ));
        let mint_verdict = mint_verdict(self.get(EGRESS, |p| {
            p.mint.as_ref().and_then(Mint::extra_cpu_per_host)
        }));
        rows.push(self.row(
            "5. Extra proxy CPU per new host, µs (→ hosts/s one core could mint)",
            "mint",
            |p, _| {
                let x = p.mint.as_ref()?.extra_cpu_per_host()?;
                Some(if x >= MINT_NOISE_S {
                    format!("{} (→ {})", num(x * 1e6), num(1.0 / x))
                } else {
                    format!("{} (within noise)", num(x * 1e6))
                })
            },
            "≥10,000 hosts/s",
            Some(mint_verdict),
        ));

        // 6. Idle memory.
        rows.push(self.row(
            "6. Proxy idle RSS, MiB",
            "idle",
            |p, _| Some(num(p.idle.as_ref()?.baseline_rss_kib as f64 / 1024.0)),
            "",
            None,
        ));
        let per_conn = |k: &str| self.get(k, |p| p.idle.as_ref().and_then(Idle::per_conn_kib));
        rows.push(self.row(
            "6. Proxy RSS per idle intercepted keep-alive connection, KiB",
            "idle",
            |p, _| {
                let i = p.idle.as_ref()?;
                Some(format!(
                    "{} (n={})",
                    num(i.per_conn_kib()?),
                    num(i.held as f64)
                ))
            },
            "≤64 KiB",
            Some(at_most_abs(per_conn(EGRESS), 64.0, "KiB")),
        ));

        // 7. The redirect itself.
        let pc = |k: &str| self.get(k, |p| p.plain_connect.as_ref().map(Rate::per_sec));
        rows.push(self.row(
            "7. Plain TCP connects/s through the capture to a user-space acceptor (egress: eBPF connect4; last column: iptables REDIRECT)",
            "plain_connect",
            |p, d| rate_cell(p.plain_connect.as_ref(), d.and_then(|d| d.plain_connect.as_ref())),
            "eBPF ≥ iptables REDIRECT",
            Some(at_least(ratio_to(pc(EGRESS), pc(REDIRECT)), 1.0, "×REDIRECT")),
        ));
        rows.push(self.row(
            "7. … machine CPU µs per connect (all cores)",
            "plain_connect",
            |p, _| Some(num(p.plain_connect.as_ref()?.machine_per_op()? * 1e6)),
            "",
            None,
        ));
        rows.push(self.row(
            "7. Plain HTTP, new connection per request, req/s (wrk, port 80)",
            "plain_http",
            |p, d| rate_cell(p.plain_http.as_ref(), d.and_then(|d| d.plain_http.as_ref())),
            "",
            None,
        ));
        rows
    }

    /// The one results table.
    pub fn table(&self) -> String {
        rows_table(
            &[
                "Metric",
                "direct",
                "egress",
                "mitmproxy",
                "Squid",
                "iptables REDIRECT + relay",
                "Target",
                "egress vs target",
            ],
            self.rows(),
            &[1, 2, 3, 4, 5],
        )
    }

    /// The targets egress missed, one line each.
    pub fn missed(&self) -> Vec<String> {
        let daemon = self.daemon.iter().flat_map(|d| {
            d.rows().into_iter().map(|mut r| {
                r.metric = format!("Node daemon: {}", r.metric);
                r
            })
        });
        let policy = self.policy.iter().flat_map(|p| {
            p.rows().into_iter().map(|mut r| {
                r.metric = format!("Policy size: {}", r.metric);
                r
            })
        });
        self.rows()
            .into_iter()
            .chain(daemon)
            .chain(policy)
            .filter_map(|r| match r.verdict {
                Some(Verdict::Missed(s)) => Some(format!("{}: {s}", r.metric)),
                _ => None,
            })
            .collect()
    }

    /// BENCHMARKS.md. The block between the analysis markers of `previous` is kept, so
    /// hand-written analysis survives a re-run.
    pub fn markdown(&self, previous: Option<&str>) -> String {
        let kv = |rows: &[(String, String)]| {
            let rows: Vec<Vec<String>> = rows
                .iter()
                .map(|(k, v)| vec![k.clone(), v.clone()])
                .collect();
            markdown_table(&["".into(), "".into()], &rows, &[])
        };
        let mut md = String::new();
        md.push_str("# Benchmarks\n\n");
        md.push_str(
            "egress side by side with a direct connection, mitmproxy and Squid, all on one machine \
             and in one run. Generated by the harness in `xtask/src/bench.rs`; do not edit by \
             hand except inside the analysis block, which re-runs keep.\n\n",
        );
        md.push_str(&format!(
            "Command: `{}` ({} run, {}, took {:.0} s)\n\n",
            self.command, self.mode, self.date, self.duration_secs
        ));
        md.push_str("## Results\n\n");
        md.push_str(&self.table());
        md.push_str(
            "\nRatios in parentheses are against the direct column. ✅/❌ judge egress against \
             the issue's targets. `n/a` says why a peer has no number.\n\n",
        );
        let missed = self.missed();
        if !missed.is_empty() {
            md.push_str("### Targets missed\n\n");
            for m in missed {
                md.push_str(&format!("- {m}\n"));
            }
            md.push('\n');
        }
        if let Some(d) = &self.daemon {
            md.push_str("## Node daemon\n\n");
            md.push_str(&format!(
                "`egress daemon` with {} sandboxes, each a cgroup in its own network namespace (the container case); the section took {:.0} s.\n\n",
                d.sandboxes, d.secs
            ));
            md.push_str(&d.table());
            md.push_str(DAEMON_METHOD);
            md.push('\n');
        }
        if let Some(p) = &self.policy {
            md.push_str("## Policy size\n\n");
            md.push_str(&p.table());
            md.push_str(super::policy::METHOD);
            md.push('\n');
        }
        md.push_str("## Analysis\n\n");
        md.push_str(ANALYSIS_BEGIN);
        md.push('\n');
        md.push_str(
            &previous
                .and_then(analysis_block)
                .unwrap_or_else(|| "_No analysis written yet._\n".to_owned()),
        );
        md.push_str(ANALYSIS_END);
        md.push_str("\n\n");
        if !self.notes.is_empty() {
            md.push_str("## Notes from this run\n\n");
            for n in &self.notes {
                md.push_str(&format!("- {n}\n"));
            }
            md.push('\n');
        }
        md.push_str("## Machine\n\n");
        md.push_str(&kv(&self.machine));
        md.push_str("\n## Versions\n\n");
        md.push_str(&kv(&self.versions));
        md.push_str("\n## Settings and method\n\n");
        md.push_str(&kv(&self.settings));
        md.push_str(METHOD);
        if !self.profiles.is_empty() {
            md.push_str("\n## Profiles of egress\n\n");
            for (name, text) in &self.profiles {
                md.push_str(&format!("### {name}\n\n```\n{}\n```\n\n", text.trim_end()));
            }
        }
        md
    }
}

pub const ANALYSIS_BEGIN: &str = "<!-- analysis:begin (kept across runs) -->";
pub const ANALYSIS_END: &str = "<!-- analysis:end -->";

/// The hand-written text between the analysis markers, if any.
pub fn analysis_block(doc: &str) -> Option<String> {
    let start = doc.find(ANALYSIS_BEGIN)? + ANALYSIS_BEGIN.len();
    let end = start + doc[start..].find(ANALYSIS_END)?;
    let text = doc[start..end].trim_start_matches('\n');
    (!text.trim().is_empty()).then(|| text.to_owned())
}

const METHOD: &str = "
How each number is made:

- **Topology.** Two network namespaces that hold only `lo`, created by the harness. Each has
  its own copy of the origin (nginx, one worker, TLS 1.3 only, ECDSA P-256 certificate from a
  test CA, HTTP/1.1 and HTTP/2). *plain* holds the direct client and egress with its sandbox;
  no netfilter table exists there, so no conntrack either. *nat* holds mitmproxy, Squid and the
  iptables arm of metric 7: an `iptables -t nat OUTPUT … -m owner --uid-owner nobody -j
  REDIRECT` rule sends the clients' connects to the proxy. Names resolve through a hosts file
  bind-mounted over `/etc/hosts` in a private mount namespace.
- **egress** runs as `egress --log-format json --log info --log-file F run --user nobody
  --allow '*.bench.test' --private-ok 127.0.0.2/32 --upstream-ca test-ca.pem --confdir
  target/bench/egress-confdir -- <client agent>` with `TOKIO_WORKER_THREADS=1`; the
  private-range guard stays on and exempts only the loopback origin.
- **Clients** always run as `nobody`: under `egress run --user nobody` for egress, with
  `setpriv` otherwise. wrk and h2load do not verify certificates; curl and the harness's own
  client verify against the CA each proxy presents (egress's through `SSL_CERT_FILE` /
  `CURL_CA_BUNDLE` as `egress run` sets them). The harness's client offers TLS 1.3 only and
  never resumes sessions, so every new connection is a full handshake, as with wrk.
- **Proxy CPU** is utime+stime of the proxy's processes from `/proc/<pid>/stat` before and
  after each phase (egress's own pid; mitmdump's pid; Squid and its certificate helpers).
  RSS is `VmRSS` from `/proc/<pid>/status`. Machine CPU is the busy time of all cores from
  `/proc/stat`.
- **1.** `wrk -t1 -c64 -H 'Connection: close'` on `/1k`, after a warm-up that cached the leaf.
- **2.** `wrk -t1 -c64` and `h2load -t1 -c64 -m1` on `/1k`.
- **3.** The harness's own open-loop client (`--internal open-loop`): a thread releases
  requests on a fixed schedule; each latency runs from its release to the last body byte, so
  waiting for a free connection counts. Keep-alive uses 8 connections; the other mode opens a
  connection (TCP + full TLS 1.3 handshake) per request. Rates are low enough for every peer.
  The keep-alive run at the low rate is repeated for direct and egress with every thread of
  the client, the proxy and the origin pinned to CPU 0 (`taskset -a -p`): on a VM, waking a
  thread on an idle CPU can cost more than the work, and varies from run to run. Both
  keep-alive runs at the low rate are also made through the reference relay of metric 7
  (last column; an iptables REDIRECT of port 443 to it): it copies bytes and does nothing
  else, TLS passes through it end to end, so its extra hop is the floor of any proxy here.
  The rows *egress minus the byte relay* subtract that floor from egress's figure.
- **4.** `curl --http1.1` of one large sparse file, with a time cap for slow peers (the cell
  then says how much arrived).
- **5.** The harness's client alternates a connection to a never-seen name
  (`fvN.bench.test`) with one to the warm name and reports medians of the pairs' differences;
  then it makes TLS handshakes, each to a new name (`mintN.bench.test`), 16 at a time, and the
  same number to one name. The extra proxy CPU per new host gives the minting capacity of one
  core. The origin's certificate covers `*.bench.test`, so new names verify upstream.
- **6.** The harness's client opens N connections, one request each, and holds the sockets
  (dropping its own TLS state); proxy RSS before vs while held.
- **7.** No TLS. *Connects/s*: the harness's client connects to the origin's port 80,
  half-closes and waits for the acceptor to close: under egress the connect is rewritten by
  connect4 and egress accepts, looks up the original destination in its BPF map and reads
  EOF; in the last column iptables REDIRECTs it to the harness's reference relay, which reads
  SO_ORIGINAL_DST and EOF. egress itself cannot sit behind a REDIRECT: it takes the original
  destination only from its own BPF record and refuses connections without one. *Plain HTTP*:
  `wrk -H 'Connection: close'` on port 80 (egress parses HTTP and pools its upstream; the
  relay splices bytes and dials the origin per connection).
";

const DAEMON_METHOD: &str = "
How: `egress daemon --config FILE --detach-on-exit` (`TOKIO_WORKER_THREADS=1`, log at info
to a file, audit to a file) runs in a namespace of its own that holds only `lo`, with its pins
in a bench-owned `bpffs_dir` under `/sys/fs/bpf`. The harness makes one cgroup per sandbox
under a cgroup of its own and one network namespace per sandbox (`ip netns add`, `lo` up),
then adds them one after another with `POST /v1/sandboxes` `{name, cgroup, policy, netns}`
over the API's unix socket, every one with the policy `allow = [\"*.bench.test\"]`, and at the
end removes them the same way with `DELETE /v1/sandboxes/NAME`. It speaks HTTP/1.1 itself,
one connection per request; the time runs from the connect to the last byte of the answer
(no `egress sandbox add` process is started), and covers the daemon binding the proxy and DNS listeners inside that namespace and
attaching and pinning the programs. RSS is the daemon's `VmRSS` from `/proc/<pid>/status`
half a second after it said it was ready, half a second after the last `add`, after the
keep-alive comparison below, and after every sandbox was removed with `DELETE`; the per-sandbox
figure uses only the first two. For the keep-alive comparison the first sandbox's
namespace has a veth to another namespace where the origin (the same nginx as above) listens
on 198.18.0.1 (RFC 2544 benchmarking range; the pair exists only between the two
namespaces); `wrk -t1 -cN` on `/1k` runs as `nobody` from that namespace once inside the
sandbox's cgroup (through egress, upstream from the sandbox's namespace) and once outside any
sandbox (direct), in alternating rounds after a warm-up of each. A curl through the sandbox
first checks that the answer carries the daemon's certificate.
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(num(1234567.4), "1,234,567");
        assert_eq!(num(999.6), "1,000");
        assert_eq!(num(100.0), "100");
        assert_eq!(num(42.42), "42.4");
        assert_eq!(num(3.456), "3.46");
        assert_eq!(num(0.01234), "0.012");
        assert_eq!(num(-2500.0), "-2,500");
        assert_eq!(num(f64::NAN), "—");
    }

    #[test]
    fn ratios_and_ms() {
        assert_eq!(with_ratio(8141.0, Some(12229.0)), "8,141 (0.67×)");
        assert_eq!(with_ratio(28.0, Some(12229.0)), "28.0 (0.002×)");
        assert_eq!(with_ratio(5.0, None), "5.00");
        assert_eq!(ms(1234.0), "1.234");
        assert_eq!(ms_signed(-50.0), "-0.050");
        assert_eq!(ms_signed(150.0), "+0.150");
    }

    #[test]
    fn a_minting_cost_within_noise_is_unknown_not_met() {
        assert!(matches!(mint_verdict(Some(-1e-6)), Verdict::Unknown(_)));
        assert!(matches!(mint_verdict(Some(0.0)), Verdict::Unknown(_)));
        assert!(matches!(mint_verdict(Some(1.7e-18)), Verdict::Unknown(_)));
        assert!(matches!(mint_verdict(None), Verdict::Unknown(_)));
        assert!(matches!(mint_verdict(Some(35e-6)), Verdict::Met(_)));
        assert!(matches!(mint_verdict(Some(500e-6)), Verdict::Missed(_)));
    }

    #[test]
    fn verdicts() {
        assert!(matches!(at_least(Some(0.67), 0.5, "x"), Verdict::Met(_)));
        assert_eq!(
            at_least(Some(0.25), 0.5, "×direct"),
            Verdict::Missed("×direct 0.25 (short by 50%)".into())
        );
        assert!(matches!(at_least(None, 0.5, "x"), Verdict::Unknown(_)));
        assert_eq!(
            at_most_us(Some(350.0), 100.0, "added"),
            Verdict::Missed("added +0.350 ms (0.250 ms over)".into())
        );
        assert!(matches!(
            at_most_us(Some(-20.0), 100.0, "added"),
            Verdict::Met(_)
        ));
        assert!(matches!(
            at_most_abs(Some(80.0), 64.0, "KiB"),
            Verdict::Missed(_)
        ));
        assert!(matches!(
            at_least_abs(Some(12_000.0), 10_000.0, "h/s"),
            Verdict::Met(_)
        ));
        let combined = all(vec![Verdict::Met("a".into()), Verdict::Missed("b".into())]);
        assert_eq!(combined, Verdict::Missed("a; b".into()));
        assert!(matches!(
            all(vec![Verdict::Met("a".into()), Verdict::Unknown("b".into())]),
            Verdict::Unknown(_)
        ));
    }

    #[test]
    fn table_escapes_and_pads() {
        let t = markdown_table(
            &["A".into(), "B".into(), "C".into()],
            &[vec!["x|y".into(), "1".into()]],
            &[1],
        );
        assert_eq!(t, "| A | B | C |\n|---|--:|---|\n| x\\|y | 1 |  |\n");
    }

    fn rate(count: u64, secs: f64, cpu: Option<f64>) -> Rate {
        Rate {
            count,
            secs,
            errors: 0,
            cpu: cpu.map(|c| Cpu {
                user: c * 0.75,
                sys: c * 0.25,
            }),
            machine_cpu_s: None,
        }
    }

    fn sample() -> Report {
        let lat = |p50_us, p99_us| Latency {
            p50_us,
            p99_us,
            n: 100,
            errors: 0,
            rate: 100.0,
        };
        let d = PeerResults {
            ka_h1: Some(rate(100_000, 10.0, None)),
            ka_h2: Some(rate(95_000, 10.0, None)),
            new_conns: Some(rate(20_000, 10.0, None)),
            lat_ka: Some(lat(200.0, 400.0)),
            ..Default::default()
        };
        let e = PeerResults {
            ka_h1: Some(rate(60_000, 10.0, Some(6.0))),
            ka_h2: Some(rate(51_000, 10.0, Some(6.0))),
            new_conns: Some(rate(6_000, 10.0, Some(3.0))),
            lat_ka: Some(lat(260.0, 1000.0)),
            idle: Some(Idle {
                baseline_rss_kib: 10_240,
                held_rss_kib: 10_240 + 40 * 1000,
                held: 1000,
                errors: 0,
            }),
            ..Default::default()
        };
        let m = PeerResults {
            ka_h1: Some(rate(1_000, 10.0, Some(10.0))),
            missing: [("ka_h2".to_owned(), "no HTTP/2".to_owned())].into(),
            ..Default::default()
        };
        let mut r = Report::default();
        r.peers.insert(DIRECT.into(), d);
        r.peers.insert(EGRESS.into(), e);
        r.peers.insert(MITMPROXY.into(), m);
        r
    }

    #[test]
    fn rows_compute_cells_and_verdicts() {
        let r = sample();
        let rows = r.rows();
        let row = |metric: &str| -> Row {
            rows.iter()
                .find(|x| x.metric.contains(metric))
                .unwrap_or_else(|| panic!("no row {metric}"))
                .clone()
        };
        let ka = row("2. Keep-alive HTTP/1.1");
        assert_eq!(ka.cells[0], "10,000 (1.00×)");
        assert_eq!(ka.cells[1], "6,000 (0.60×)");
        assert_eq!(ka.cells[2], "100 (0.010×)");
        assert_eq!(ka.cells[3], "—");
        // 0.6× direct meets 0.5×, but 60× mitmproxy also meets 30×.
        assert!(
            matches!(ka.verdict, Some(Verdict::Met(_))),
            "{:?}",
            ka.verdict
        );
        let cpu = row("2. HTTP/1.1 — proxy CPU");
        assert_eq!(cpu.cells[1], "100 (25% sys)");
        let h2 = row("HTTP/2 req/s");
        assert_eq!(h2.cells[2], "n/a (no HTTP/2)");
        let parity = row("÷ HTTP/1.1");
        assert_eq!(parity.cells[0], "0.95×");
        assert_eq!(parity.cells[1], "0.85×");
        assert_eq!(parity.cells[2], "n/a (no HTTP/2)");
        assert_eq!(
            parity.verdict,
            Some(Verdict::Missed(
                "HTTP/2 ÷ HTTP/1.1 0.85 (short by 6%)".into()
            ))
        );
        let nc = row("1. New");
        // 0.3× direct misses 0.4×; Squid unmeasured.
        assert!(
            matches!(nc.verdict, Some(Verdict::Missed(_))),
            "{:?}",
            nc.verdict
        );
        let p99 = row("p99, keep-alive");
        assert_eq!(p99.cells[0], "0.400");
        assert_eq!(p99.cells[1], "1.000 (+0.600)");
        assert_eq!(
            p99.verdict,
            Some(Verdict::Missed("added +0.600 ms (0.100 ms over)".into()))
        );
        let idle = row("per idle");
        assert_eq!(idle.cells[1], "40.0 (n=1,000)");
        assert!(matches!(idle.verdict, Some(Verdict::Met(_))));
    }

    #[test]
    fn daemon_rows_and_section() {
        let d = DaemonResults {
            sandboxes: 100,
            add_us: Some(Summary {
                n: 100,
                p50: 4_000.0,
                p99: 12_500.0,
                ..Default::default()
            }),
            rss_started_kib: Some(20 * 1024),
            rss_added_kib: Some(20 * 1024 + 100 * 2048),
            ka_conns: 64,
            ka_sandbox: Some(rate(50_000, 10.0, Some(5.0))),
            ka_direct: Some(rate(100_000, 10.0, None)),
            missing: [("remove".to_owned(), "daemon gone".to_owned())].into(),
            ..Default::default()
        };
        assert_eq!(d.rss_per_sandbox_kib(), Some(2048.0));
        assert_eq!(d.ka_ratio(), Some(0.5));
        let rows = d.rows();
        let cell = |prefix: &str| {
            rows.iter()
                .find(|r| r.metric.starts_with(prefix))
                .unwrap_or_else(|| panic!("no row {prefix}"))
                .cells[0]
                .clone()
        };
        assert_eq!(
            cell("`add`: `POST /v1/sandboxes` latency p50"),
            "4.000 (n=100)"
        );
        assert_eq!(
            cell("`add`: `POST /v1/sandboxes` latency p99"),
            "12.500 (n=100)"
        );
        assert_eq!(cell("`remove`"), "n/a (daemon gone)");
        assert_eq!(cell("Daemon RSS, MiB"), "20.0 / 220 / — / —");
        assert_eq!(cell("Keep-alive HTTPS req/s through"), "5,000");
        assert_eq!(cell("… sandbox ÷ direct"), "0.50×");
        assert_eq!(cell("… daemon CPU"), "100 (25% sys)");
        let per = rows
            .iter()
            .find(|r| r.metric.starts_with("Daemon RSS per sandbox"))
            .expect("per-sandbox row");
        assert!(matches!(per.verdict, Some(Verdict::Missed(_))));

        let mut r = sample();
        r.daemon = Some(d);
        let md = r.markdown(None);
        assert!(md.contains("## Node daemon\n\n`egress daemon` with 100 sandboxes"));
        assert!(md.contains("\n\n| Metric | egress daemon |"));
        assert!(r
            .missed()
            .iter()
            .any(|m| m.starts_with("Node daemon: Daemon RSS per sandbox")));
        let empty = DaemonResults {
            missing: [("section".to_owned(), "no bpffs".to_owned())].into(),
            ..Default::default()
        };
        assert!(empty.rows().iter().all(|r| r.cells[0] == "n/a (no bpffs)"));
    }

    #[test]
    fn markdown_keeps_the_analysis() {
        let r = sample();
        let first = r.markdown(None);
        assert!(first.contains("_No analysis written yet._"));
        let edited = first.replace("_No analysis written yet._\n", "Hand-written.\n");
        let second = r.markdown(Some(&edited));
        assert!(second.contains("Hand-written."));
        assert!(!second.contains("_No analysis written yet._"));
        assert_eq!(analysis_block(&second).as_deref(), Some("Hand-written.\n"));
        assert_eq!(analysis_block("no markers"), None);
        assert!(second.contains("| Metric | direct | egress |"));
        assert!(second.contains("### Targets missed"));
    }
}
