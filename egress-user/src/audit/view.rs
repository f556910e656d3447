//! `egress log`: the audit JSONL, filtered and laid out for a human at a terminal.

use std::io::{BufRead, Write};

use serde_json::Value;

/// Which records to show; every filter that is set must match.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub sandbox: Option<String>,
    pub decision: Option<String>,
    /// Substring of the host (requests), SNI or destination (connections, kernel).
    pub host: Option<String>,
    pub event: Option<String>,
}

impl Filter {
    pub fn matches(&self, v: &Value) -> bool {
        let s = |k: &str| v[k].as_str().unwrap_or("");
        self.sandbox.as_deref().is_none_or(|x| s("sandbox") == x)
            && self.decision.as_deref().is_none_or(|x| s("decision") == x)
            && self.event.as_deref().is_none_or(|x| s("event") == x)
            && self.host.as_deref().is_none_or(|x| {
                [s("host"), s("sni"), s("dst"), s("orig_dst"), s("name")]
                    .iter()
                    .any(|f| f.contains(x))
            })
    }
}

fn size(n: u64) -> String {
    match n {
        0..1024 => format!("{n}B"),
        1024..1_048_576 => format!("{:.1}K", n as f64 / 1024.0),
        _ => format!("{:.1}M", n as f64 / 1_048_576.0),
    }
}

/// One record as one line.
pub fn render(v: &Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    let who = format!("{}[{}]", s("comm"), n("pid"));
    let head = format!(
        "{} {:<8} {:<20} {:<11}",
        s("ts"),
        s("sandbox"),
        who,
        s("decision")
    );
    let why = |v: &Value| {
        let mut t = String::new();
        if let Some(r) = v["rule"].as_str().filter(|r| !r.is_empty()) {
            t.push_str(&format!(" rule={r}"));
        }
        if let Some(r) = v["reason"].as_str() {
            t.push_str(&format!(" reason={r:?}"));
        }
        if let Some(e) = v["error"].as_str() {
            t.push_str(&format!(" error={e:?}"));
        }
        t
    };
    match v["event"].as_str() {
        Some("request") => format!(
            "{head} {} {} {} {} up={} down={} {}ms{}",
            n("status"),
            s("method"),
            s("host"),
            s("path"),
            size(n("bytes_up")),
            size(n("bytes_down")),
            n("duration_ms"),
            why(v)
        ),
        Some("connection") => format!(
            "{head} conn {} sni={} up={} down={} {}ms{}",
            s("orig_dst"),
            v["sni"].as_str().unwrap_or("-"),
            size(n("bytes_up")),
            size(n("bytes_down")),
            n("duration_ms"),
            why(v)
        ),
        Some("kernel_deny") => format!(
            "{head} kernel {} {} ({})",
            s("protocol"),
            s("dst"),
            s("reason")
        ),
        Some("dns") => format!(
            "{head} dns {} {} {} {}{}",
            s("transport"),
            s("qtype"),
            s("name"),
            s("rcode"),
            why(v)
        ),
        Some("events_lost") => format!(
            "{} kernel refusals lost: {} (total {}) ({})",
            s("ts"),
            n("count"),
            n("total"),
            s("reason")
        ),
        _ => format!("{head} {v}"),
    }
}

/// Copies matching records from `input` to `out`; lines that are not JSON are shown as they
/// are, marked, so nothing in the file is hidden by the viewer.
pub fn run(input: impl BufRead, out: &mut impl Write, filter: &Filter) -> std::io::Result<usize> {
    let mut shown = 0;
    for line in input.lines() {
        let line = line?;
        match serde_json::from_str::<Value>(&line) {
            Ok(v) if filter.matches(&v) => {
                writeln!(out, "{}", render(&v))?;
                shown += 1;
            }
            Ok(_) => {}
            Err(_) if !line.trim().is_empty() => writeln!(out, "(not JSON) {line}")?,
            Err(_) => {}
        }
    }
    Ok(shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = r#"{"event":"request","ts":"2026-11-23T10:00:00.000Z","sandbox":"agent","pid":7,"comm":"curl","host":"pypi.org","method":"GET","path":"/simple/","status":200,"bytes_up":0,"bytes_down":2048,"duration_ms":12,"decision":"allow","rule":"pypi.org","tls":"mitm"}
{"event":"request","ts":"2026-11-23T10:00:01.000Z","sandbox":"agent","pid":7,"comm":"curl","host":"evil.example","method":"POST","path":"/x","status":403,"bytes_up":10,"bytes_down":90,"duration_ms":1,"decision":"deny","rule":"","reason":"host is not in the allowlist","tls":"mitm"}
{"event":"kernel_deny","ts":"2026-11-23T10:00:02.000Z","sandbox":"other","pid":9,"comm":"nc","protocol":"tcp","dst":"192.0.2.1:22","decision":"deny","reason":"tcp connect refused"}
garbage
"#;

    fn show(f: Filter) -> String {
        let mut out = Vec::new();
        run(LOG.as_bytes(), &mut out, &f).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn renders_each_kind_on_one_line() {
        let all = show(Filter::default());
        let lines: Vec<&str> = all.lines().collect();
        assert_eq!(lines.len(), 4, "{all}");
        assert!(
            lines[0].contains("200 GET pypi.org /simple/ up=0B down=2.0K 12ms rule=pypi.org"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains("deny")
                && lines[1].contains("reason=\"host is not in the allowlist\"")
        );
        assert!(lines[2].contains("kernel tcp 192.0.2.1:22"));
        assert_eq!(lines[3], "(not JSON) garbage");
    }

    #[test]
    fn filters_by_sandbox_decision_host_and_event() {
        let f = |f: Filter| {
            show(f)
                .lines()
                .filter(|l| !l.starts_with("(not JSON)"))
                .count()
        };
        assert_eq!(
            f(Filter {
                sandbox: Some("agent".into()),
                ..Default::default()
            }),
            2
        );
        assert_eq!(
            f(Filter {
                decision: Some("deny".into()),
                ..Default::default()
            }),
            2
        );
        assert_eq!(
            f(Filter {
                host: Some("pypi".into()),
                ..Default::default()
            }),
            1
        );
        assert_eq!(
            f(Filter {
                host: Some("192.0.2.1".into()),
                ..Default::default()
            }),
            1
        );
        assert_eq!(
            f(Filter {
                event: Some("kernel_deny".into()),
                ..Default::default()
            }),
            1
        );
    }
}
