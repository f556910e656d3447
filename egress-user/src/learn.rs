//! Learn mode: a policy written from what a sandbox did. One [`Learner`] per sandbox is fed
//! audit records, either as they are written (`egress run --learn`, a daemon sandbox with
//! `learn`) or read back from a JSONL audit log (`egress policy suggest`), and renders a
//! commented policy file that `egress policy check` accepts and that, applied to the same
//! run, refuses nothing the run did.
//!
//! What it keeps: the hosts of requests (and TLS server names), with a `*.parent` wildcard
//! once [`Options::wildcard_min`] siblings of one parent appear (never over a one-label
//! parent such as `com`, nor over a known public suffix); methods and path prefixes per host
//! as `[[sandbox.NAME.rule]]` entries when there are few of them; passthrough hosts;
//! `tcp` destinations the kernel refused; private destinations reached (`private_ok`); and,
//! as comments, DNS names asked but never connected to, refused UDP sends and binds.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, Write as _},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::policy::{is_guarded_address, HostPattern, PathGlob, DENY_LIST_REASON, DOH_RULE};

/// Default for `--learn-wildcard-min`.
pub const DEFAULT_WILDCARD_MIN: usize = 3;
/// A host gets a rule only with at most this many methods and this many path prefixes.
pub const HANDFUL: usize = 4;

/// Parents a wildcard is never suggested over: second-level public suffixes under which
/// unrelated parties register names. One-label parents (`com`) are refused by rule.
const PUBLIC_SUFFIXES: &[&str] = &[
    "co.uk",
    "org.uk",
    "ac.uk",
    "gov.uk",
    "me.uk",
    "com.au",
    "net.au",
    "org.au",
    "co.nz",
    "co.jp",
    "ne.jp",
    "or.jp",
    "com.br",
    "com.cn",
    "com.mx",
    "co.in",
    "co.za",
    "com.tr",
    "com.sg",
    "com.hk",
    "co.kr",
    "github.io",
    "gitlab.io",
    "herokuapp.com",
    "appspot.com",
    "vercel.app",
    "netlify.app",
    "pages.dev",
    "workers.dev",
    "azurewebsites.net",
    "cloudfront.net",
    "amazonaws.com",
    "blogspot.com",
    "fly.dev",
    "onrender.com",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Siblings of one parent domain needed before `*.parent` is suggested.
    pub wildcard_min: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            wildcard_min: DEFAULT_WILDCARD_MIN,
        }
    }
}

/// The fields of an audit record learning reads; every record kind has some of them.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Observation {
    pub event: String,
    #[serde(default)]
    pub sandbox: String,
    pub host: Option<String>,
    pub sni: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub orig_dst: Option<String>,
    pub decision: Option<String>,
    pub rule: Option<String>,
    pub reason: Option<String>,
    pub protocol: Option<String>,
    pub dst: Option<String>,
    pub name: Option<String>,
    #[serde(default)]
    pub answers: Vec<String>,
    pub count: Option<u64>,
}

#[derive(Clone, Debug, Default)]
struct HostSeen {
    methods: BTreeSet<String>,
    prefixes: BTreeSet<String>,
    requests: u64,
    /// A method, path or prefix no rule could express (or that a rule would refuse).
    unruly: bool,
}

/// What one sandbox did, accumulated from its audit records.
#[derive(Clone, Debug, Default)]
pub struct Learner {
    opts: Options,
    records: u64,
    hosts: BTreeMap<String, HostSeen>,
    passthrough: BTreeSet<String>,
    private: BTreeSet<IpAddr>,
    tcp: BTreeSet<SocketAddr>,
    /// Name → answers.
    dns: BTreeMap<String, BTreeSet<IpAddr>>,
    udp: BTreeSet<String>,
    binds: BTreeSet<String>,
    lost: u64,
}

/// A line of an audit log that is not a record.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read audit log {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: not an audit record: {source}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: no records of sandbox {name:?} (it has: {have})", path.display())]
    NoSuchSandbox {
        path: PathBuf,
        name: String,
        have: String,
    },
    #[error("{}: no audit records of any sandbox", path.display())]
    Empty { path: PathBuf },
}

impl Learner {
    pub fn new(opts: Options) -> Self {
        Learner {
            opts,
            ..Default::default()
        }
    }

    /// Feeds one serialised record (a line of the audit log).
    pub fn observe_line(&mut self, line: &[u8]) -> Result<(), serde_json::Error> {
        let o: Observation = serde_json::from_slice(line)?;
        self.observe(&o);
        Ok(())
    }

    pub fn observe(&mut self, o: &Observation) {
        self.records += 1;
        let decision = o.decision.as_deref().unwrap_or("");
        // What the operator refused on purpose stays refused.
        let refused_on_purpose = decision == "deny"
            && (o.rule.as_deref() == Some(DOH_RULE)
                || o.reason
                    .as_deref()
                    .is_some_and(|r| r.contains(DENY_LIST_REASON)));
        match o.event.as_str() {
            "request" if !refused_on_purpose => {
                let Some(host) = o.host.as_deref().filter(|h| !h.is_empty()) else {
                    return;
                };
                let seen = self.hosts.entry(host.to_owned()).or_default();
                seen.requests += 1;
                match o.method.as_deref().filter(|m| method_token(m)) {
                    Some(m) => {
                        seen.methods.insert(m.to_owned());
                    }
                    None => seen.unruly = true,
                }
                match o.path.as_deref().and_then(path_prefix) {
                    Some(p) => {
                        seen.prefixes.insert(p);
                    }
                    None => seen.unruly = true,
                }
                if let Some(sni) = o.sni.as_deref().filter(|s| *s != host) {
                    // The TLS server name is judged by the host lists too.
                    self.hosts.entry(sni.to_owned()).or_default().unruly = true;
                }
                self.note_destination(o.orig_dst.as_deref());
            }
            "connection" if matches!(decision, "passthrough" | "warn") => {
                if let Some(sni) = o.sni.as_deref().filter(|s| !s.is_empty()) {
                    self.passthrough.insert(sni.to_owned());
                    self.note_destination(o.orig_dst.as_deref());
                }
            }
            "kernel_deny" => {
                let reason = o.reason.as_deref().unwrap_or("");
                let dst = o.dst.as_deref().unwrap_or("-");
                match o.protocol.as_deref() {
                    Some("tcp") if reason.starts_with("tcp connect") => {
                        if let Ok(a) = dst.parse::<SocketAddr>() {
                            if a.port() != 53 && a.port() != 0 {
                                self.tcp
                                    .insert(SocketAddr::new(a.ip().to_canonical(), a.port()));
                            }
                        }
                    }
                    _ if reason.starts_with("bind") => {
                        self.binds.insert(dst.to_owned());
                    }
                    Some("udp") => {
                        self.udp.insert(dst.to_owned());
                    }
                    _ => {}
                }
            }
            "dns" if !refused_on_purpose => {
                if let Some(name) = o.name.as_deref().filter(|n| !n.is_empty()) {
                    let answers = self.dns.entry(name.to_owned()).or_default();
                    answers.extend(o.answers.iter().filter_map(|a| a.parse::<IpAddr>().ok()));
                }
            }
            "events_lost" => self.lost += o.count.unwrap_or(0),
            _ => {}
        }
    }

    fn note_destination(&mut self, orig_dst: Option<&str>) {
        if let Some(a) = orig_dst.and_then(|d| d.parse::<SocketAddr>().ok()) {
            let ip = a.ip().to_canonical();
            if is_guarded_address(ip) {
                self.private.insert(ip);
            }
        }
    }

    /// The policy file: `header` (already commented) then one `[sandbox.NAME]`.
    pub fn render(&self, name: &str, header: &str) -> String {
        let mut out = String::new();
        out.push_str(header);
        let allowed: BTreeSet<&str> = self
            .hosts
            .keys()
            .map(String::as_str)
            .filter(|h| h.parse::<HostPattern>().is_ok())
            .collect();
        let wildcards = wildcards(&allowed, self.opts.wildcard_min);
        let covered = |h: &str| {
            allowed.contains(h)
                || self.passthrough.contains(h)
                || wildcards.keys().any(|w| h.ends_with(&format!(".{w}")))
        };
        let tcp_ips: BTreeSet<IpAddr> = self.tcp.iter().map(SocketAddr::ip).collect();
        // Names resolved before a direct TCP connect must still resolve.
        let for_tcp: BTreeSet<&str> = self
            .dns
            .iter()
            .filter(|(n, ips)| !covered(n) && ips.iter().any(|ip| tcp_ips.contains(ip)))
            .map(|(n, _)| n.as_str())
            .filter(|n| n.parse::<HostPattern>().is_ok())
            .collect();
        let unused: Vec<&str> = self
            .dns
            .keys()
            .map(String::as_str)
            .filter(|n| !covered(n) && !for_tcp.contains(n))
            .collect();
        let bad_hosts: Vec<&str> = self
            .hosts
            .keys()
            .map(String::as_str)
            .filter(|h| !allowed.contains(h))
            .collect();

        let _ = writeln!(
            out,
            "# {} audit records: {} hosts, {} passthrough, {} tcp destinations, {} DNS names.",
            self.records,
            allowed.len(),
            self.passthrough.len(),
            self.tcp.len(),
            self.dns.len()
        );
        if self.lost > 0 {
            let _ = writeln!(
                out,
                "# {} kernel refusals were lost (ring buffer full): some tcp destinations may be missing.",
                self.lost
            );
        }
        let _ = writeln!(out, "\n[sandbox.{name}]");
        let mut allow: Vec<(String, String)> = Vec::new();
        for (w, kids) in &wildcards {
            allow.push((
                format!("*.{w}"),
                format!("{} seen: {}", kids.len(), kids.join(", ")),
            ));
        }
        for h in &allowed {
            if !wildcards.values().any(|k| k.iter().any(|k| k == h)) {
                allow.push((h.to_string(), String::new()));
            }
        }
        for n in &for_tcp {
            allow.push((n.to_string(), "resolved before a direct tcp connect".into()));
        }
        list(&mut out, "allow", &allow);
        let pt: Vec<(String, String)> = self
            .passthrough
            .iter()
            .filter(|h| h.parse::<HostPattern>().is_ok())
            .map(|h| (h.clone(), String::new()))
            .collect();
        list(&mut out, "passthrough", &pt);
        let tcp: Vec<(String, String)> = self
            .tcp
            .iter()
            .map(|a| {
                let s = match a.ip() {
                    IpAddr::V4(ip) => format!("{ip}/32:{}", a.port()),
                    IpAddr::V6(ip) => format!("[{ip}/128]:{}", a.port()),
                };
                (s, "refused by the kernel during the run".into())
            })
            .collect();
        list(&mut out, "tcp", &tcp);
        let private: Vec<(String, String)> = self
            .private
            .iter()
            .map(|ip| {
                (
                    ip.to_string(),
                    "a private or loopback destination reached".into(),
                )
            })
            .collect();
        list(&mut out, "private_ok", &private);

        let comment_list = |out: &mut String, title: &str, items: &[&str]| {
            if !items.is_empty() {
                let _ = writeln!(out, "\n# {title}");
                for i in items {
                    let _ = writeln!(out, "#   {i}");
                }
            }
        };
        comment_list(
            &mut out,
            "DNS names asked but never connected to (refused under this policy; add to allow if needed):",
            &unused,
        );
        comment_list(
            &mut out,
            "Hosts that are not valid host patterns (left out):",
            &bad_hosts,
        );
        let udp: Vec<&str> = self.udp.iter().map(String::as_str).collect();
        comment_list(
            &mut out,
            "UDP sends refused by the kernel (no policy key allows UDP other than DNS):",
            &udp,
        );
        let binds: Vec<&str> = self.binds.iter().map(String::as_str).collect();
        comment_list(
            &mut out,
            "Binds refused (the sandbox listens on loopback only; `inbound = [PORT]` opens a port):",
            &binds,
        );

        for h in &allowed {
            let seen = &self.hosts[*h];
            if seen.unruly
                || seen.methods.is_empty()
                || seen.methods.len() > HANDFUL
                || seen.prefixes.len() > HANDFUL
            {
                continue;
            }
            let _ = writeln!(out, "\n[[sandbox.{name}.rule]]");
            let _ = writeln!(out, "host = {}", quote(h));
            let m: Vec<String> = seen.methods.iter().map(|m| quote(m)).collect();
            let _ = writeln!(out, "methods = [{}]", m.join(", "));
            let p: Vec<String> = seen.prefixes.iter().map(|p| quote(p)).collect();
            let _ = writeln!(out, "paths = [{}]", p.join(", "));
        }
        out
    }
}

use std::fmt::Write as _;

fn list(out: &mut String, key: &str, items: &[(String, String)]) {
    if items.is_empty() {
        return;
    }
    let _ = writeln!(out, "{key} = [");
    for (v, note) in items {
        if note.is_empty() {
            let _ = writeln!(out, "  {},", quote(v));
        } else {
            let _ = writeln!(out, "  {},  # {note}", quote(v));
        }
    }
    let _ = writeln!(out, "]");
}

/// A TOML basic string (JSON's escapes are all valid TOML escapes).
fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn method_token(m: &str) -> bool {
    !m.is_empty()
        && m.bytes().all(|b| {
            b.is_ascii_uppercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        })
}

/// The glob a rule lists for `path`: its first segment (`/simple/six/` → `/simple/**`), or
/// the path itself when it has one segment. `None` when no glob could allow it (dot
/// segments, glob characters, not a path).
fn path_prefix(path: &str) -> Option<String> {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    if !path.starts_with('/') || path.contains(['*']) {
        return None;
    }
    let dot = |s: &str| {
        let l = s.to_ascii_lowercase().replace("%2e", ".");
        l == "." || l == ".."
    };
    if path.split('/').any(dot) {
        return None;
    }
    let p = crate::policy::hint::prefix_glob(path);
    let glob = PathGlob::parse(&p).ok()?;
    glob.matches(path).then_some(p)
}

/// `parent → siblings` for every parent with at least `min` distinct children among
/// `hosts`, never over a one-label parent or a public suffix.
fn wildcards(hosts: &BTreeSet<&str>, min: usize) -> BTreeMap<String, Vec<String>> {
    let mut by_parent: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for h in hosts {
        if h.parse::<IpAddr>().is_ok() {
            continue;
        }
        if let Some((_, parent)) = h.split_once('.') {
            by_parent
                .entry(parent.to_owned())
                .or_default()
                .push(h.to_string());
        }
    }
    by_parent.retain(|parent, kids| {
        parent.contains('.') && !PUBLIC_SUFFIXES.contains(&parent.as_str()) && kids.len() >= min
    });
    by_parent
}

/// The comment block every generated file starts with.
pub fn header(tool: &str, command: &str) -> String {
    format!(
        "# Generated by egress {tool} on {}.\n# Command: {command}\n# Review it before enforcing: it allows what was seen, and nothing else.\n",
        crate::audit::now()
    )
}

/// The command line of this process, quoted for a shell where needed.
pub fn command_line() -> String {
    std::env::args()
        .enumerate()
        .map(|(i, a)| match i {
            // The program by its name, not the path it was started from.
            0 => Path::new(&a)
                .file_name()
                .map_or(a.clone(), |f| f.to_string_lossy().into_owned()),
            _ => a,
        })
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@+%".contains(&b))
            {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One learner per sandbox, from an audit log (JSONL; `-` for standard input).
pub fn read_audit(
    path: &Path,
    sandbox: Option<&str>,
    opts: Options,
) -> Result<BTreeMap<String, Learner>, ReadError> {
    let io = |source| ReadError::Io {
        path: path.to_owned(),
        source,
    };
    let reader: Box<dyn std::io::BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(path).map_err(io)?,
        ))
    };
    let mut out: BTreeMap<String, Learner> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        let o: Observation = serde_json::from_str(&line).map_err(|source| ReadError::Line {
            path: path.to_owned(),
            line: i + 1,
            source,
        })?;
        if o.sandbox.is_empty() {
            continue;
        }
        seen.insert(o.sandbox.clone());
        if sandbox.is_some_and(|s| s != o.sandbox) {
            continue;
        }
        out.entry(o.sandbox.clone())
            .or_insert_with(|| Learner::new(opts))
            .observe(&o);
    }
    if out.is_empty() {
        return Err(match sandbox {
            Some(name) => ReadError::NoSuchSandbox {
                path: path.to_owned(),
                name: name.to_owned(),
                have: seen.into_iter().collect::<Vec<_>>().join(", "),
            },
            None => ReadError::Empty {
                path: path.to_owned(),
            },
        });
    }
    Ok(out)
}

/// Writes `text` to `path` through a temporary file in the same directory and a rename, so
/// a reader never sees half a policy.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let file = path.file_name().map(|f| f.to_string_lossy().into_owned());
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        file.unwrap_or_else(|| "policy".into()),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp)?;
    let res = f
        .write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// A learner kept for a sandbox while it runs, and where its policy goes.
pub struct Session {
    pub learner: Learner,
    pub out: PathBuf,
    /// The policy section written (the sandbox's name in the audit log).
    pub name: String,
    pub command: String,
}

impl Session {
    /// Renders and writes the policy; logs where it went.
    pub fn write(&self) -> std::io::Result<()> {
        let text = self
            .learner
            .render(&self.name, &header("learn", &self.command));
        write_atomically(&self.out, &text)?;
        tracing::info!(file = %self.out.display(), sandbox = %self.name, records = self.learner.records, "learned policy written");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(host: &str, method: &str, path: &str) -> Observation {
        Observation {
            event: "request".into(),
            sandbox: "agent".into(),
            host: Some(host.into()),
            method: Some(method.into()),
            path: Some(path.into()),
            orig_dst: Some("203.0.113.7:443".into()),
            decision: Some("warn".into()),
            ..Default::default()
        }
    }

    fn learn(obs: &[Observation], min: usize) -> crate::policy::SandboxPolicy {
        let mut l = Learner::new(Options { wildcard_min: min });
        for o in obs {
            l.observe(o);
        }
        let text = l.render("agent", &header("learn", "test"));
        crate::policy::file::parse(&text, Path::new("learned.toml"))
            .unwrap_or_else(|e| panic!("the learned policy does not compile: {e}\n{text}"))
            .sandboxes
            .remove("agent")
            .expect("sandbox agent")
    }

    #[test]
    fn a_wildcard_needs_min_siblings_and_never_covers_a_public_suffix() {
        let two = [
            req("a.cdn.example", "GET", "/"),
            req("b.cdn.example", "GET", "/"),
        ];
        let p = learn(&two, 3);
        assert_eq!(
            p.allow,
            crate::policy::file::tests::pats(&["a.cdn.example", "b.cdn.example"])
        );
        let three = [
            two[0].clone(),
            two[1].clone(),
            req("c.cdn.example", "GET", "/x"),
        ];
        let p = learn(&three, 3);
        assert_eq!(
            p.allow,
            crate::policy::file::tests::pats(&["*.cdn.example"])
        );
        assert_eq!(p.rules.len(), 3, "rules stay per host");
        // Min 2 suggests it with two.
        assert_eq!(
            learn(&two, 2).allow,
            crate::policy::file::tests::pats(&["*.cdn.example"])
        );
        // Never *.com, nor over a public suffix.
        let tlds = [
            req("a.com", "GET", "/"),
            req("b.com", "GET", "/"),
            req("c.com", "GET", "/"),
            req("x.co.uk", "GET", "/"),
            req("y.co.uk", "GET", "/"),
            req("z.co.uk", "GET", "/"),
        ];
        let p = learn(&tlds, 3);
        assert_eq!(p.allow.len(), 6, "{:?}", p.allow);
        assert!(p.allow.iter().all(|a| matches!(a, HostPattern::Exact(_))));
    }

    #[test]
    fn rules_only_when_methods_and_prefixes_are_few() {
        let mut obs = vec![
            req("pypi.org", "GET", "/simple/six/"),
            req("pypi.org", "GET", "/simple/requests/?<redacted>"),
            req("pypi.org", "HEAD", "/"),
        ];
        for i in 0..(HANDFUL + 1) {
            obs.push(req("busy.example", "GET", &format!("/p{i}/x")));
        }
        obs.push(req("odd.example", "GET", "/a/../b"));
        let p = learn(&obs, 3);
        assert_eq!(p.rules.len(), 1, "{:?}", p.rules);
        let r = &p.rules[0];
        assert_eq!(r.host.to_string(), "pypi.org");
        assert_eq!(
            r.methods.as_ref().unwrap(),
            &[http::Method::GET, http::Method::HEAD]
        );
        for o in &obs[..3] {
            let path = o.path.as_deref().unwrap();
            let m: http::Method = o.method.as_deref().unwrap().parse().unwrap();
            assert!(
                matches!(
                    p.request_decision("pypi.org", &m, path),
                    crate::policy::RequestDecision::Allow { .. }
                ),
                "{path}"
            );
        }
        assert!(matches!(
            p.request_decision("pypi.org", &http::Method::POST, "/simple/"),
            crate::policy::RequestDecision::Deny { .. }
        ));
    }

    #[test]
    fn tcp_private_passthrough_and_dns_are_kept() {
        let obs: Vec<Observation> = [
            r#"{"event":"kernel_deny","sandbox":"agent","protocol":"tcp","dst":"10.0.0.5:5432","decision":"deny","reason":"tcp connect refused"}"#,
            r#"{"event":"kernel_deny","sandbox":"agent","protocol":"udp","dst":"8.8.8.8:443","decision":"deny","reason":"udp refused"}"#,
            r#"{"event":"connection","sandbox":"agent","sni":"bank.example","orig_dst":"198.51.100.1:443","decision":"passthrough"}"#,
            r#"{"event":"request","sandbox":"agent","host":"local.test","sni":"local.test","method":"GET","path":"/","orig_dst":"127.0.70.1:443","decision":"warn"}"#,
            r#"{"event":"request","sandbox":"agent","host":"evil.example","method":"GET","path":"/","orig_dst":"198.51.100.9:443","decision":"deny","rule":"evil.example","reason":"host is on the deny list"}"#,
            r#"{"event":"dns","sandbox":"agent","name":"db.internal","answers":["10.0.0.5"],"decision":"warn"}"#,
            r#"{"event":"dns","sandbox":"agent","name":"local.test","answers":["127.0.70.1"],"decision":"warn"}"#,
            r#"{"event":"dns","sandbox":"agent","name":"unused.example","answers":["192.0.2.1"],"decision":"warn"}"#,
        ]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
        let p = learn(&obs, 3);
        assert_eq!(
            p.allow,
            crate::policy::file::tests::pats(&["local.test", "db.internal"])
        );
        assert_eq!(
            p.passthrough,
            crate::policy::file::tests::pats(&["bank.example"])
        );
        assert_eq!(p.tcp.len(), 1);
        assert_eq!(p.tcp[0].to_string(), "10.0.0.5/32:5432");
        assert!(p.private_ok("127.0.70.1".parse().unwrap()));
        assert!(!p.private_ok("127.0.70.2".parse().unwrap()));
        let mut l = Learner::new(Options::default());
        obs.iter().for_each(|o| l.observe(o));
        let text = l.render("agent", "");
        assert!(text.contains("#   unused.example"), "{text}");
        assert!(text.contains("#   8.8.8.8:443"), "{text}");
        assert!(
            !text.contains("evil.example"),
            "a deny-listed host is not learned"
        );
    }

    #[test]
    fn bad_audit_input_names_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.jsonl");
        let e = read_audit(&missing, None, Options::default()).unwrap_err();
        assert!(e.to_string().contains("nope.jsonl"), "{e}");
        let bad = dir.path().join("audit.jsonl");
        std::fs::write(
            &bad,
            "{\"event\":\"dns\",\"sandbox\":\"a\",\"name\":\"x.example\"}\n\n{\"event\": oops\n",
        )
        .unwrap();
        let e = read_audit(&bad, None, Options::default()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("audit.jsonl:3:"), "{msg}");
        let ok = dir.path().join("ok.jsonl");
        std::fs::write(
            &ok,
            "{\"event\":\"dns\",\"sandbox\":\"a\",\"name\":\"x.example\"}\n",
        )
        .unwrap();
        let e = read_audit(&ok, Some("b"), Options::default()).unwrap_err();
        assert!(e.to_string().contains("(it has: a)"), "{e}");
    }

    #[test]
    fn writes_are_atomic_and_leave_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("learned.toml");
        write_atomically(&p, "x = 1\n").unwrap();
        write_atomically(&p, "x = 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "x = 2\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
